"""Dockerfile, .dockerignore and railway.toml: parsed, and their start commands run as local processes.

Docker is not available here, so the image's CMD (and Railway's start command) run directly
from the repository with the environment the image would give them, a free port in place of
8000 / $PORT, and the secrets a deployment must provide.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from tests.leak_probe import admin_views, files_under, leaks, send_credentials
from tests.services import REDIS_URL, ROOT, free_port, require_redis, wait_until

DEPLOY_SECRETS = {
    "JWT_SECRET_KEY": "deploy-test-secret-0123456789abcdef-0123456789",
    "ADMIN_TOKEN": "deploy-test-admin-token-0123456789",
}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    logical = re.sub(
        r"\\\n\s*", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    )
    pairs = []
    for line in logical.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def instruction(name: str) -> list[str]:
    return [args for keyword, args in dockerfile_instructions() if keyword == name]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instruction("ENV"):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def railway() -> dict:
    with (ROOT / "railway.toml").open("rb") as handle:
        return tomllib.load(handle)


def deploy_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The process environment a deployment gives the app: image ENV, secrets, a volume, a Redis."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FLASK_", "WEB_", "REDIS_", "DB_"))}
    env.pop("DATABASE_URL", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # where pip put gunicorn
    env.update(DEPLOY_SECRETS, REDIS_URL=REDIS_URL, **extra)
    env.update({"DB_PATH": str(tmp_path / "data" / "ratelimiter.db"), "LOG_DIR": str(tmp_path / "data" / "logs")})
    (tmp_path / "data").mkdir(exist_ok=True)
    return env


def worker_count(master_pid: int) -> int:
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    return len(children)


@contextmanager
def serving(argv: list[str], env: dict[str, str], port: int, timeout: float = 60.0) -> Iterator[subprocess.Popen]:
    """Run ``argv`` from the repository root until /health answers 200; stop its process group after."""
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{argv[0]} exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass  # not listening yet, or the first request is still building the app
            if time.monotonic() > deadline:
                pytest.fail(f"/health on port {port} not 200 within {timeout} s")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for_workers(master_pid: int, expected: int, timeout: float = 20.0) -> int:
    wait_until(lambda: worker_count(master_pid) == expected, timeout, interval=0.1,
               message=f"gunicorn {master_pid} did not reach {expected} workers: {worker_count(master_pid)}")
    return expected


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_from_python_311_slim() -> None:
    assert instruction("FROM") == ["python:3.11-slim"]


def test_dockerfile_installs_requirements_without_pip_cache() -> None:
    installs = [args for args in instruction("RUN") if "pip install" in args]
    assert any("--no-cache-dir" in args and "-r requirements.txt" in args for args in installs)


def test_dockerfile_runs_as_a_non_root_user_before_its_command() -> None:
    keywords = [keyword for keyword, _ in dockerfile_instructions()]
    users = instruction("USER")
    assert users and users[-1] not in ("root", "0")
    assert keywords.index("USER") < keywords.index("CMD")


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image() -> None:
    patterns = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", "venv", ".venv", "*.db", "certs", "logs", ".env", "__pycache__"} <= patterns


@pytest.mark.slow
def test_dockerfile_cmd_serves_health_and_root_with_two_workers(tmp_path: Path) -> None:
    """The image's CMD, ENV and HEALTHCHECK run as written (only the port moved): two workers, healthy."""
    require_redis()
    port = free_port()
    cmd = json.loads(instruction("CMD")[-1])
    assert cmd.count("0.0.0.0:8000") == 1  # the port the image documents; moved below to a free one
    argv = [arg.replace(":8000", f":{port}") for arg in cmd]
    env = deploy_env(tmp_path, **dockerfile_env())
    with serving(argv, env, port) as proc:
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert health.json()["status"] == "ok"
        root = requests.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert root.status_code == 200 and root.json()["status"] == "ok"
        assert wait_for_workers(proc.pid, 2) == 2
        check = json.loads(instruction("HEALTHCHECK")[0].split("CMD", 1)[1])
        assert check[0] == "python"  # python:3.11-slim has no curl
        probe = subprocess.run([sys.executable, *(arg.replace(":8000", f":{port}") for arg in check[1:])], timeout=30)
        assert probe.returncode == 0


@pytest.mark.slow
def test_dockerfile_cmd_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    port = free_port()
    argv = [arg.replace(":8000", f":{port}") for arg in json.loads(instruction("CMD")[-1])]
    env = deploy_env(tmp_path, **dockerfile_env())
    del env["JWT_SECRET_KEY"]  # refused only in production (FLASK_ENV from the Dockerfile's ENV)
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "JWT_SECRET_KEY" in result.stdout + result.stderr


# ---------------------------------------------------------------- railway.toml


def test_railway_builds_with_nixpacks_and_checks_health() -> None:
    config = railway()
    assert config["build"]["builder"].lower() == "nixpacks"
    assert config["deploy"]["healthcheckPath"] == "/health"


def test_railway_start_command_is_the_gunicorn_one_on_port() -> None:
    command = railway()["deploy"]["startCommand"]
    assert "gunicorn" in command and "app:app" in command
    assert "0.0.0.0:$PORT" in command


@pytest.mark.slow
def test_railway_start_command_serves_on_port_with_default_two_workers(tmp_path: Path) -> None:
    require_redis()
    port = free_port()
    env = deploy_env(tmp_path, FLASK_ENV="production", PORT=str(port))
    with serving(shlex.split(railway()["deploy"]["startCommand"]), env, port) as proc:
        assert requests.get(f"http://127.0.0.1:{port}/", timeout=5).json()["status"] == "ok"
        assert wait_for_workers(proc.pid, 2) == 2  # sh exec'd gunicorn: proc.pid is the master


# ---------------------------------------------------------------- both start commands


def deployed_command(source: str, tmp_path: Path, port: int, **extra: str) -> tuple[list[str], dict[str, str]]:
    """The exact Dockerfile CMD or railway.toml startCommand on ``port``, with the environment it gets."""
    private = {"RATELIMIT_KEY_PREFIX": f"deploy{os.getpid()}{port}", "BCRYPT_ROUNDS": "4", **extra}
    if source == "dockerfile":
        argv = [arg.replace(":8000", f":{port}") for arg in json.loads(instruction("CMD")[-1])]
        return argv, deploy_env(tmp_path, **dockerfile_env(), **private)
    env = deploy_env(tmp_path, FLASK_ENV="production", PORT=str(port), **private)
    return shlex.split(railway()["deploy"]["startCommand"]), env


@pytest.mark.slow
@pytest.mark.parametrize("source", ["dockerfile", "railway"])
def test_no_log_of_the_deployed_command_holds_a_key_or_token(tmp_path: Path, source: str) -> None:
    require_redis()
    port = free_port()
    argv, env = deployed_command(source, tmp_path, port)
    with serving(argv, env, port) as proc:
        sent = send_credentials(f"http://127.0.0.1:{port}", DEPLOY_SECRETS["ADMIN_TOKEN"])
        views = admin_views(f"http://127.0.0.1:{port}", DEPLOY_SECRETS["ADMIN_TOKEN"])
    output = proc.stdout.read()
    assert "GET /data?api_key=rl_" in output  # the access log is on, and names the key by its prefix
    assert leaks([output, *views, *files_under(tmp_path / "data")], sent) == []


class Slowloris:
    """Clients that send a request head or body a byte at a time, and some that send nothing at all."""

    def __init__(self, port: int, trickling: int, silent: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(trickling + silent)]
        self.trickling = self.socks[:trickling]
        self.thread = threading.Thread(target=self._trickle, daemon=True)

    def _trickle(self) -> None:
        for index, sock in enumerate(self.trickling):
            if index % 2:  # a complete head, then a body one byte at a time
                sock.sendall(b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n{")
            else:  # a header line that never ends
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        while not self.stop.wait(0.5):
            for sock in self.trickling:
                try:
                    sock.sendall(b" ")
                except OSError:
                    pass  # closed by the server: that is the point

    def __enter__(self) -> Slowloris:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for sock in self.socks:
            sock.close()


def served_within(port: int, path: str = "/health") -> float:
    started = time.monotonic()
    response = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)
    assert response.status_code == 200
    return time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("source", ["dockerfile", "railway"])
def test_slow_and_half_open_clients_do_not_stall_the_deployed_command(tmp_path: Path, source: str) -> None:
    require_redis()
    port = free_port()
    argv, env = deployed_command(source, tmp_path, port, REQUEST_READ_TIMEOUT="3")
    with serving(argv, env, port) as proc:
        workers = wait_for_workers(proc.pid, 2)
        threads = 8  # gunicorn.conf.py
        with Slowloris(port, trickling=2 * workers * threads + 4, silent=2 * workers * threads) as attack:
            time.sleep(1)  # let every slow client be accepted and start its head
            assert max(served_within(port) for _ in range(5)) < 2.0
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not all(closed(sock) for sock in attack.socks):
                time.sleep(0.2)
            assert all(closed(sock) for sock in attack.socks), "slow clients must be cut off"
        assert served_within(port) < 2.0
        assert answer_after_half_close(port).startswith(b"HTTP/1.0 200")  # sent, then shut its side: answered


def answer_after_half_close(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    return answer


def closed(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (an error answer such as 408 may come first)."""
    sock.setblocking(False)
    try:
        while sock.recv(4096):
            pass  # the 408 answer
    except BlockingIOError:
        return False
    except OSError:
        pass  # reset: closed too
    return True


# ---------------------------------------------------------------- documented claims
