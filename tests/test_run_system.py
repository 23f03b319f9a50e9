"""run_system.py as a real process: checks, start-up, supervision, restarts, TLS and clean shutdown."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

import run_system
from tests.leak_probe import files_under, leaks, send_credentials
from tests.services import ROOT, free_port, fresh_postgres_database, port_open, require_redis, wait_until

SCRIPT = ROOT / "run_system.py"
# Settings a developer's shell might carry that would change what the system under test uses.
SCRUBBED = ("REDIS_URL", "DATABASE_URL", "ADMIN_TOKEN", "JWT_SECRET_KEY", "FLASK_ENV", "WEB_CONCURRENCY", "PORT")


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in SCRUBBED}
    env.update({"DB_PATH": str(tmp_path / "system.db"), "LOG_DIR": str(tmp_path / "logs"), **extra})
    return env


def distinct_free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


class System:
    """A running ``run_system.py``: its merged output, collected by a thread, can be awaited line by line."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60.0, start: int = 0) -> re.Match[str]:
        """First output line (from index ``start``) matching ``pattern``; fails with the output so far."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self.changed:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and seen == len(self.lines)):
                    pytest.fail(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines[-40:]))
                self.changed.wait(min(remaining, 0.5))

    def table(self) -> dict[str, int]:
        """Component -> PID from the printed table, once the system says it is ready."""
        self.wait_for(r"^System ready")
        header = max(i for i, line in enumerate(self.lines) if line.strip().startswith("COMPONENT"))
        rows = {}
        for line in self.lines[header + 1 :]:
            if line.startswith("System ready"):
                return rows
            name, pid, *_ = line.split()
            rows[name] = int(pid)
        return rows

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill_everything(self) -> None:
        """Safety net for a failed test: no process group of ours may outlive it."""
        pids = [*self.table_if_printed().values(), *self.restarted_pids()]
        try:
            self.stop(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def table_if_printed(self) -> dict[str, int]:
        return self.table() if any(line.startswith("System ready") for line in self.lines) else {}

    def restarted_pids(self) -> list[int]:
        return [int(m.group(1)) for line in self.lines if (m := re.search(r" restarted \(pid (\d+)", line))]


def run_once(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def port_args(api: int, lb: int, backends: list[int]) -> list[str]:
    return ["--api-port", str(api), "--lb-port", str(lb), "--backend-ports", ",".join(map(str, backends))]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator:
    """Start run_system.py with given flags in ``tmp_path``; every started system is torn down."""
    systems: list[System] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> System:
        system = System(args, env or clean_env(tmp_path), tmp_path)
        systems.append(system)
        return system

    yield start
    for system in systems:
        system.kill_everything()


@pytest.fixture
def full_ports() -> tuple[int, int, list[int]]:
    api, lb, *backends = distinct_free_ports(5)
    return api, lb, backends


# ---------------------------------------------------------------- restart policy (no processes)


def test_restart_backoff_doubles_to_the_cap_and_the_budget_renews_after_the_window() -> None:
    now = [0.0]
    policy = run_system.RestartPolicy(base=1, cap=4, limit=5, window=60, clock=lambda: now[0])
    delays = []
    for _ in range(5):
        delays.append(policy.next_delay())
        policy.record()
    assert delays == [1, 2, 4, 4, 4]
    assert policy.next_delay() is None
    now[0] = 61.0
    assert policy.next_delay() == 1


def test_a_stop_signal_arriving_in_the_middle_of_a_wait_does_not_deadlock() -> None:
    """The handler runs between two bytecodes of the main thread, even inside the wait itself."""
    supervisor = run_system.Supervisor([], "127.0.0.1", 1.0)

    def waiting_while_signals_arrive() -> None:
        def tracer(frame, event, _arg):  # a signal delivered at every line the wait executes
            if event == "line":
                supervisor.request_stop(signal.SIGTERM)
            return tracer

        sys.settrace(tracer)
        try:
            supervisor.stopping.wait(0.01)
        finally:
            sys.settrace(None)

    waiter = threading.Thread(target=waiting_while_signals_arrive, daemon=True)
    waiter.start()
    waiter.join(timeout=10)
    assert not waiter.is_alive(), "request_stop waited for a lock held by the code it interrupted"
    assert supervisor.stopping.is_set() and supervisor.forced.is_set()


# ---------------------------------------------------------------- checks before start


def test_busy_port_is_one_clear_line_and_a_non_zero_exit(tmp_path: Path, full_ports) -> None:
    api, lb, backends = full_ports
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", api))
        blocker.listen(1)
        result = run_once(["--dev", "--skip-db", *port_args(api, lb, backends)], clean_env(tmp_path), tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"port {api}" in lines[0] and "api" in lines[0] and "--api-port" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


def test_workers_without_redis_and_without_redis_server_binary_is_a_clear_error(tmp_path: Path, full_ports) -> None:
    env = clean_env(tmp_path, PATH=str(tmp_path / "empty-bin"))
    result = run_once(["--dev", "--skip-db", "--workers", "2", *port_args(*full_ports)], env, tmp_path)
    assert result.returncode != 0
    assert "redis-server is not on PATH" in result.stderr
    assert "--redis" in result.stderr and "REDIS_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_database_url_is_named_with_the_fix(tmp_path: Path, full_ports) -> None:
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/test"
    result = run_once(["--dev", "--database-url", url, *port_args(*full_ports)], clean_env(tmp_path), tmp_path)
    assert result.returncode != 0
    assert "is not reachable" in result.stderr and "--skip-db" in result.stderr
    assert "Traceback" not in result.stderr


def test_unwritable_sqlite_directory_is_reported(tmp_path: Path, full_ports) -> None:
    env = clean_env(tmp_path, DB_PATH=str(tmp_path / "no-such-dir" / "x.db"))
    result = run_once(["--dev", *port_args(*full_ports)], env, tmp_path)
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "DB_PATH" in result.stderr


def test_help_lists_every_flag(tmp_path: Path) -> None:
    result = run_once(["--help"], clean_env(tmp_path), tmp_path)
    assert result.returncode == 0
    for flag in (
        "--dev",
        "--skip-db",
        "--no-lb",
        "--no-backends",
        "--ssl",
        "--api-port",
        "--lb-port",
        "--backend-ports",
        "--host",
        "--workers",
        "--redis",
        "--database-url",
    ):
        assert flag in result.stdout


# ---------------------------------------------------------------- the running system


@pytest.mark.slow
def test_dev_system_serves_api_and_balancer_and_restarts_a_killed_child(launch, full_ports) -> None:
    api, lb, backends = full_ports
    system = launch(["--dev", "--skip-db", *port_args(api, lb, backends)])
    pids = system.table()
    assert set(pids) == {"backends", "api", "lb"}
    assert any(line.startswith("[api] ") for line in system.lines)

    registered = requests.post(
        f"http://127.0.0.1:{api}/auth/register", json={"username": "alice", "password": "long enough pw"}, timeout=10
    )
    assert registered.status_code == 201, registered.text
    through_lb = requests.get(f"http://127.0.0.1:{lb}/", timeout=10)
    assert through_lb.status_code == 200
    assert through_lb.headers["X-Backend"].rsplit(":", 1)[1] in {str(port) for port in backends}
    assert through_lb.json()["server"].startswith("backend-")

    mark = len(system.lines)
    os.kill(pids["backends"], signal.SIGKILL)
    new_pid = int(system.wait_for(r"backends restarted \(pid (\d+)", timeout=30, start=mark).group(1))
    assert new_pid != pids["backends"]
    for port in backends:
        assert requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200


@pytest.mark.slow
def test_sigint_stops_every_child_exits_zero_and_frees_every_port(launch, full_ports) -> None:
    api, lb, backends = full_ports
    system = launch(["--dev", "--skip-db", *port_args(api, lb, backends)])
    pids = system.table()
    assert system.stop(signal.SIGINT) == 0
    for port in (api, lb, *backends):
        assert not port_open("127.0.0.1", port), f"port {port} still answers"
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


@pytest.mark.slow
def test_sigterm_also_stops_cleanly(launch, full_ports) -> None:
    system = launch(["--dev", "--skip-db", "--no-lb", *port_args(*full_ports)])
    system.table()
    assert system.stop(signal.SIGTERM) == 0


@pytest.mark.slow
@pytest.mark.parametrize("server", [[], ["--workers", "1"]], ids=["app.py", "gunicorn"])
def test_ssl_serves_https_trusted_through_the_generated_certificate(
    launch, tmp_path: Path, full_ports, server: list[str]
) -> None:
    api = full_ports[0]
    cert_dir = tmp_path / "tls"
    args = ["--dev", "--skip-db", "--ssl", "--cert-dir", str(cert_dir), "--no-lb", "--no-backends", *server]
    system = launch([*args, *port_args(*full_ports)])
    system.table()
    response = requests.get(f"https://127.0.0.1:{api}/health", verify=str(cert_dir / "cert.pem"), timeout=10)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"https://127.0.0.1:{api}/health", timeout=10)  # not trusted by the system store
    assert system.stop() == 0


@pytest.mark.slow
def test_api_failing_at_start_is_named_with_its_output_and_everything_stops(launch, tmp_path: Path, full_ports) -> None:
    api, lb, backends = full_ports
    env = clean_env(tmp_path, FLASK_ENV="production")  # no JWT_SECRET_KEY: the API refuses to start
    system = launch(["--skip-db", *port_args(api, lb, backends)], env)
    system.wait_for(r"error: api exited with code \d+ while starting; last output: .*JWT_SECRET_KEY")
    assert system.proc.wait(timeout=30) != 0
    for port in (api, lb, *backends):
        assert not port_open("127.0.0.1", port)


@pytest.mark.slow
def test_workers_run_gunicorn_with_a_private_redis_server(launch, tmp_path: Path, full_ports) -> None:
    api = full_ports[0]
    system = launch(["--dev", "--skip-db", "--workers", "2", "--no-lb", "--no-backends", *port_args(*full_ports)])
    pids = system.table()
    assert set(pids) == {"redis", "api"}
    metrics = requests.get(f"http://127.0.0.1:{api}/api/metrics", timeout=10).json()
    assert metrics["limiter_store"] == "redis"
    assert system.stop() == 0
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


@pytest.mark.slow
def test_redis_flag_is_passed_to_the_api_as_its_shared_store(launch, full_ports) -> None:
    require_redis()
    api = full_ports[0]
    args = ["--dev", "--skip-db", "--workers", "2", "--redis", "redis://127.0.0.1:6379/0", "--no-lb", "--no-backends"]
    system = launch([*args, *port_args(*full_ports)])
    assert set(system.table()) == {"api"}
    assert requests.get(f"http://127.0.0.1:{api}/api/metrics", timeout=10).json()["limiter_store"] == "redis"


@pytest.mark.slow
def test_children_stop_when_run_system_itself_is_killed(launch, full_ports) -> None:
    api, lb, backends = full_ports
    system = launch(["--dev", "--skip-db", *port_args(api, lb, backends)])
    system.table()
    system.proc.kill()  # no chance to clean up: the children's parent-death signal must do it
    system.proc.wait()
    ports = [api, lb, *backends]
    wait_until(lambda: not any(port_open("127.0.0.1", port) for port in ports), 20,
               message=f"still listening: {[port for port in ports if port_open('127.0.0.1', port)]}")


def kill_until_given_up(system: System, name: str, first_pid: int, timeout: float = 60.0) -> int:
    """SIGKILL ``name`` each time it comes back; return how many restarts happened before the give-up."""
    pid, restarts, mark = first_pid, 0, len(system.lines)
    while True:
        os.kill(pid, signal.SIGKILL)
        match = system.wait_for(rf"{name} restarted \(pid (\d+)|{name} died \d+ times", timeout=timeout, start=mark)
        mark = len(system.lines)
        if match.group(1) is None:
            return restarts
        pid, restarts = int(match.group(1)), restarts + 1


@pytest.mark.slow
def test_api_killed_past_the_restart_budget_stops_everything_with_non_zero_exit(launch, tmp_path, full_ports) -> None:
    api, lb, backends = full_ports
    env = clean_env(tmp_path, RUN_SYSTEM_BACKOFF_BASE="0.05")
    system = launch(["--dev", "--skip-db", *port_args(api, lb, backends)], env)
    kill_until_given_up(system, "api", system.table()["api"])
    system.wait_for(r"error: the api cannot be kept running: stopping everything")
    assert system.proc.wait(timeout=30) == 1
    for port in (api, lb, *backends):
        assert not port_open("127.0.0.1", port)


@pytest.mark.slow
def test_backends_killed_past_the_restart_budget_leave_the_rest_running(launch, tmp_path, full_ports) -> None:
    api, lb, backends = full_ports
    env = clean_env(tmp_path, RUN_SYSTEM_BACKOFF_BASE="0.05")
    system = launch(["--dev", "--skip-db", "--no-lb", *port_args(api, lb, backends)], env)
    assert kill_until_given_up(system, "backends", system.table()["backends"]) == 5
    system.wait_for(r"error: continuing without backends")
    assert requests.get(f"http://127.0.0.1:{api}/health", timeout=10).status_code == 200
    assert system.proc.poll() is None
    assert system.stop() == 0


@pytest.mark.slow
def test_database_url_is_checked_and_given_to_the_api(launch, full_ports) -> None:
    url, drop = fresh_postgres_database()
    try:
        api = full_ports[0]
        system = launch(["--dev", "--database-url", url, "--no-lb", "--no-backends", *port_args(*full_ports)])
        system.table()
        body = {"username": "pg_user", "password": "long enough pw"}
        assert requests.post(f"http://127.0.0.1:{api}/auth/register", json=body, timeout=10).status_code == 201
        assert system.stop() == 0
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM users WHERE username = 'pg_user'")).scalar_one() == 1
        engine.dispose()
    finally:
        drop()


def test_backends_stop_when_sigterm_lands_on_one_of_their_server_threads(tmp_path: Path) -> None:
    """The parent-death SIGTERM may be delivered to any thread; the backends once ignored it then."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "mock_backends.py"), "--ports", str(port)],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", port):
            assert proc.poll() is None and time.monotonic() < deadline, "the backend did not start"
            time.sleep(0.05)
        tasks = Path(f"/proc/{proc.pid}/task")
        while not (threads := [int(tid) for tid in os.listdir(tasks) if int(tid) != proc.pid]):
            time.sleep(0.05)
        os.kill(threads[0], signal.SIGTERM)  # kill() with a thread's id: Linux hands the signal to that thread
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_dev_system_output_and_logs_hold_no_key_or_token(launch, tmp_path: Path, full_ports) -> None:
    api, lb, backends = full_ports
    admin = "run-system-admin-token-0123456789"
    system = launch(["--dev", "--skip-db", *port_args(api, lb, backends)], clean_env(tmp_path, ADMIN_TOKEN=admin))
    system.table()
    sent = send_credentials(f"http://127.0.0.1:{api}", admin)
    key, access = sent[0], sent[3]
    bearer = {"Authorization": f"Bearer {access}"}
    through_lb = requests.get(f"http://127.0.0.1:{lb}/data?api_key={key}", headers=bearer, timeout=10)
    assert through_lb.status_code == 200
    assert system.stop() == 0
    assert leaks([*system.lines, *files_under(tmp_path)], sent) == []
