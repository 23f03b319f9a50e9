"""Reach the real services tests need: Redis, PostgreSQL, Chromium.

Outside CI a missing service is a clear skip; with ``CI=true`` it is a failure, because
CI promises these services and a silent skip would hide a broken environment.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import email
import email.policy
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the project checkout the tests run against
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# How .ci/run starts the shared Redis; fault tests that stop it start it again the same way.
SHARED_REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
                      "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
                      "--logfile", "/var/log/redis/ci.log"]


def unavailable(what: str) -> None:
    """Fail in CI, skip elsewhere, naming the service that could not be reached."""
    message = f"{what} is not reachable"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: required services must run)")
    pytest.skip(message)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_redis(url: str = REDIS_URL):
    """Return a redis client on ``url`` or skip/fail."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        unavailable(f"Redis at {url}")
    return client


def require_postgres(url: str = POSTGRES_URL) -> str:
    """Return ``url`` if PostgreSQL answers there, else skip/fail."""
    if not port_open("127.0.0.1", 5432):
        unavailable("PostgreSQL at 127.0.0.1:5432")
    return url


def fresh_postgres_database(url: str = POSTGRES_URL) -> tuple[str, Callable[[], None]]:
    """Create an empty, uniquely named PostgreSQL database; return (url, drop)."""
    import sqlalchemy as sa

    require_postgres(url)
    name = f"rl_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    db_url = url.rsplit("/", 1)[0] + "/" + name

    def drop() -> None:
        engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()

    return db_url, drop


def start_private_redis(port: int, folder: Path) -> tuple[subprocess.Popen, Any]:
    """A redis-server of the test's own on ``port`` (the shared one is never stopped), once it answers.

    Returns (process, client); the caller terminates the process."""
    import redis

    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
    wait_until(answers, 5, interval=0.05, message=f"private redis-server on port {port} did not start")
    return server, client


def require_chromium() -> str:
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        unavailable(f"Chromium at {CHROMIUM}")
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Inbox:
    """aiosmtpd handler that keeps every message it accepts (the ``smtp_server`` fixture's mailbox)."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd hook
        self.envelopes.append(envelope)
        return "250 Message accepted"

    def messages(self) -> list[EmailMessage]:
        return [email.message_from_bytes(e.original_content, policy=email.policy.default) for e in self.envelopes]


class FakeClock:
    """A settable clock: tests move time instead of sleeping through windows."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01,
               message: str | None = None) -> bool:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds (never a fixed sleep).

    Returns True, so ``assert wait_until(...)`` reads as the claim it checks."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(message or f"condition not met within {timeout} s")
        time.sleep(interval)
    return True


def wait_for_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 30.0, status: int | None = 200,
                  output: Callable[[], str] | None = None) -> None:
    """Poll ``url`` until it answers (with ``status`` unless None); fail at once if ``proc`` exits first.

    ``output`` describes what the process printed, for the failure message."""
    import requests

    def answered() -> bool:
        if proc is not None and proc.poll() is not None:
            said = output() if output is not None else ""
            pytest.fail(f"{proc.args!r} exited ({proc.returncode}) before {url} answered: {said}")
        try:
            code = requests.get(url, timeout=1).status_code
        except requests.RequestException:
            return False
        return status is None or code == status
    wait_until(answered, timeout, interval=0.05, message=f"{url} did not answer {status or ''} within {timeout} s")


# --------------------------------------------------------------------------- several app instances

GUNICORN_ENV = {  # what every multi-instance test shares; tests add the store and the limits
    "IP_RATE_LIMIT": "1000000", "JWT_SECRET_KEY": "gunicorn-test-secret-0123456789abcdef",
    "WEB_CONCURRENCY": "4", "BCRYPT_ROUNDS": "4", "ENABLE_SOCKETIO": "false",
}


def start_gunicorn(port: int, env: dict[str, str], workers: int, log: Path) -> subprocess.Popen:
    """``gunicorn app:app`` with ``workers`` workers in its own process group, output to ``log``."""
    # Output goes to a file: an unread pipe fills up and blocks the workers' logging.
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}", "--graceful-timeout",
             "5", "--no-control-socket", "app:app"],
            cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True,
        )


@contextlib.contextmanager
def gunicorn_instances(folder: Path, env: dict[str, str], instances: int = 2, workers: int = 4) -> Iterator[list[str]]:
    """``instances`` gunicorn servers of the app sharing one database (in ``folder``) and ``env``; yields
    their base URLs once each answers /health, and stops every worker (SIGTERM to the group) on exit."""
    env = {**os.environ, **GUNICORN_ENV, "DB_PATH": str(folder / "shared.db"), "LOG_DIR": str(folder / "logs"),
           "WEB_CONCURRENCY": str(workers), **env}
    ports = [free_port() for _ in range(instances)]
    logs = [folder / f"gunicorn-{port}.log" for port in ports]
    procs: list[subprocess.Popen] = []
    try:
        for port, log in zip(ports, logs, strict=True):
            procs.append(start_gunicorn(port, env, workers, log))
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, proc, log in zip(urls, procs, logs, strict=True):
            wait_for_http(f"{url}/health", proc, 60, output=functools.partial(_tail, log))
        yield urls
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(30)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


def new_api_key(register_at: str, create_at: str, password: str, name: str = "multi") -> str:
    """Register a user on one instance and create its API key on another (so both share the database)."""
    import requests

    user = requests.post(f"{register_at}/auth/register", timeout=10,
                         json={"username": f"{name}{uuid.uuid4().hex[:8]}", "password": password})
    assert user.ok, user.text
    created = requests.post(f"{create_at}/auth/create_api_key", json={}, timeout=10,
                            headers={"Authorization": f"Bearer {user.json()['access_token']}"})
    assert created.ok, created.text
    return created.json()["api_key"]


def spread_calls(urls: list[str], key: str, calls: int, threads: int = 50) -> list[int]:
    """``calls`` concurrent ``GET /data`` with ``key``, alternating over ``urls``; their status codes."""
    import requests

    def call(i: int) -> int:
        with requests.Session() as session:
            return session.get(f"{urls[i % len(urls)]}/data", headers={"X-API-Key": key}, timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(call, range(calls)))
