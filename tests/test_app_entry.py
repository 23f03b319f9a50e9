"""Entry points: `python app.py`, `gunicorn app:app`, config errors, busy port, clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.leak_probe import admin_views, files_under, leaks, send_credentials
from tests.services import ROOT, free_port, wait_for_http

SECRET = "entry-point-test-secret-0123456789abcdef"


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "ADMIN_", "FLASK_", "REDIS_", "DATABASE_"))}
    env.update(DB_PATH=str(tmp_path / "entry.db"), LOG_DIR=str(tmp_path / "logs"), BCRYPT_ROUNDS="4",
               ENABLE_SOCKETIO="false")
    env.update(extra)
    return env


def run_app(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "app.py"), *args], cwd=tmp_path, env=base_env(tmp_path, **env),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("env, message", [
    ({"FLASK_ENV": "production", "ADMIN_TOKEN": "x"}, "JWT_SECRET_KEY must be set to at least 32 bytes"),
    ({"FLASK_ENV": "production", "JWT_SECRET_KEY": "short", "ADMIN_TOKEN": "x"}, "at least 32 bytes"),
    ({"FLASK_ENV": "production", "JWT_SECRET_KEY": SECRET}, "ADMIN_TOKEN must be set"),
    ({"RATELIMIT_STRATEGY": "leaky"}, "RATELIMIT_STRATEGY must be one of"),
    ({"RATELIMIT_FAIL_MODE": "maybe"}, "RATELIMIT_FAIL_MODE must be one of"),
    ({"IP_RATE_LIMIT": "lots"}, "IP_RATE_LIMIT must be an integer"),
    ({"TIER_LIMITS": "gold=5"}, "TIER_LIMITS entry"),
    ({"REDIS_URL": "http://nope"}, "REDIS_URL must start with"),
    ({"ENABLE_SOCKETIO": "perhaps"}, "boolean"),
    ({"DATABASE_URL": "nonsense://"}, "DATABASE_URL names a database driver"),
    ({"DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1:1/none"}, "cannot open the database"),
    ({"DB_PATH": "/nonexistent-dir/x.db"}, "directory for DB_PATH does not exist"),
])
def test_bad_configuration_gives_one_line_and_exit_2(tmp_path, env, message):
    result = run_app(tmp_path, **env)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_production_refuses_several_workers_without_redis(tmp_path):
    result = run_app(tmp_path, FLASK_ENV="production", JWT_SECRET_KEY=SECRET, ADMIN_TOKEN="t", WEB_CONCURRENCY="4")
    assert result.returncode == 2 and "needs REDIS_URL" in result.stderr


def test_importing_app_does_no_io(tmp_path):
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import app"],
                            cwd=tmp_path, env=base_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "entry.db").exists() and not (tmp_path / "logs").exists()


def test_busy_port_gives_one_clear_line(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = run_app(tmp_path, "--port", str(port))
    assert result.returncode == 1
    assert f"port {port}" in result.stderr and "already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_python_app_serves_and_flushes_on_sigterm(tmp_path):
    port = free_port()
    env = base_env(tmp_path, JWT_SECRET_KEY=SECRET, ADMIN_TOKEN="entry-admin", ANALYTICS_FLUSH_SECONDS="3600")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc, output=proc.stderr.read)
        token = requests.post(f"{url}/auth/register", json={"username": "entry", "password": "password123"},
                              timeout=10).json()["access_token"]
        key = requests.post(f"{url}/auth/create_api_key", json={}, headers={"Authorization": f"Bearer {token}"},
                            timeout=10).json()["api_key"]
        assert requests.get(f"{url}/data", headers={"X-API-Key": key}, timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read()
    # the usage counted in memory (flush interval 1 h) was written on shutdown
    import sqlalchemy as sa

    import database as db

    engine = db.make_engine(f"sqlite:///{tmp_path / 'entry.db'}")
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.sum(db.usage_counters.c.allowed))).scalar_one() == 1
    engine.dispose()


def test_gunicorn_with_bad_config_stops_instead_of_respawning(tmp_path):
    env = base_env(tmp_path, FLASK_ENV="production", ADMIN_TOKEN="x")
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-w", "1", "-b", f"127.0.0.1:{free_port()}",
                             "--no-control-socket", "app:app"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert "error: JWT_SECRET_KEY must be set" in result.stderr
    assert result.stderr.count("error: JWT_SECRET_KEY") == 1


def test_gunicorn_worker_flag_is_seen_by_the_app(tmp_path):
    """`-w 3` without WEB_CONCURRENCY: gunicorn.conf.py passes the count on, so production refuses."""
    env = base_env(tmp_path, FLASK_ENV="production", JWT_SECRET_KEY=SECRET, ADMIN_TOKEN="t")
    env.pop("WEB_CONCURRENCY", None)
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-w", "3", "-b", f"127.0.0.1:{free_port()}",
                             "--no-control-socket", "app:app"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("3 workers (gunicorn -w or WEB_CONCURRENCY) needs REDIS_URL") == 1
    assert "Booting worker" not in result.stderr  # refused by the master: no worker races to fail


@pytest.mark.parametrize("env", [
    {"FLASK_ENV": "production", "ADMIN_TOKEN": "x"},
    {"DB_PATH": "/nonexistent-dir/x.db"},
], ids=["config", "database"])
def test_gunicorn_refuses_in_the_master_before_forking_any_worker(tmp_path, env):
    """Several workers failing at once made gunicorn's arbiter crash (exit 1, HaltServer traceback)."""
    result = subprocess.run([sys.executable, "-m", "gunicorn", "-w", "4", "-b", f"127.0.0.1:{free_port()}",
                             "--no-control-socket", "app:app"],
                            cwd=ROOT, env=base_env(tmp_path, **env), capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1, result.stderr
    assert "Booting worker" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("socketio", ["false", "true"])
def test_python_app_logs_no_key_or_token(tmp_path, socketio):
    """werkzeug's request lines quote the query string: `?api_key=` must come out masked."""
    port = free_port()
    admin = "entry-admin-token-0123456789"
    env = base_env(tmp_path, JWT_SECRET_KEY=SECRET, ADMIN_TOKEN=admin, ENABLE_SOCKETIO=socketio)
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, output=proc.stderr.read)
        sent = send_credentials(f"http://127.0.0.1:{port}", admin)
        views = admin_views(f"http://127.0.0.1:{port}", admin)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert leaks([out, err, *views, *files_under(tmp_path)], sent) == []


def test_gunicorn_workers_without_jwt_secret_key_share_one_generated_key(tmp_path):
    """Development, `gunicorn -w 2`, no JWT_SECRET_KEY: a token minted by either worker is accepted
    by both. Tokens are minted (refreshed) and checked over fresh connections until both workers have served
    (each answer names its worker's pid); with one key per worker about half the checks fail."""
    port = free_port()
    env = base_env(tmp_path, IP_RATE_LIMIT="100000")
    env.pop("WEB_CONCURRENCY", None)
    log = tmp_path / "gunicorn.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}",
                                 "--no-control-socket", "--graceful-timeout", "5", "app:app"],
                                cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not requests_ok(f"{url}/health"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        body = {"username": "two_workers", "password": "correct horse battery"}
        registered = requests.post(f"{url}/auth/register", json=body, timeout=30)
        assert registered.status_code == 201, registered.text
        refresh = registered.json()["refresh_token"]
        pids: set[int] = set()
        checks = 0
        while (len(pids) < 2 or checks < 20) and checks < 400:
            minted = requests.post(f"{url}/auth/refresh", json={"refresh_token": refresh},
                                   headers={"Connection": "close"}, timeout=30)
            assert minted.status_code == 200, minted.text  # the refresh token was signed by either worker
            token, refresh = minted.json()["access_token"], minted.json()["refresh_token"]
            me = requests.get(f"{url}/auth/me", headers={"Authorization": f"Bearer {token}", "Connection": "close"},
                              timeout=30)
            assert me.status_code == 200, me.text
            pids.add(requests.get(f"{url}/api/metrics", headers={"Connection": "close"}, timeout=30).json()["pid"])
            checks += 1
        assert len(pids) == 2, f"only worker {pids} answered {checks} times"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert "JWT_SECRET_KEY is not set: using one random key for the 2 worker(s)" in log.read_text()


def requests_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False
