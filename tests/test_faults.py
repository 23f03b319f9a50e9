"""Fault injection with real services: Redis and PostgreSQL stopped and restarted under load.

These tests stop the machine's own Redis / PostgreSQL and always start them again (in a
``finally``), with the same commands the machine uses at boot. They are marked ``fault``.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import subprocess
import threading
import time

import pytest
import redis as redis_lib

from tests.services import (
    POSTGRES_URL,
    REDIS_URL,
    SHARED_REDIS_START,
    port_open,
    require_postgres,
    require_redis,
    wait_until,
)

pytestmark = pytest.mark.fault



def redis_up() -> bool:
    try:
        return redis_lib.Redis.from_url(REDIS_URL, socket_timeout=0.5).ping()
    except redis_lib.RedisError:
        return False


def stop_redis() -> None:
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"], capture_output=True,
                   timeout=10)
    wait_until(lambda: not port_open("127.0.0.1", 6379), 30, message="Redis did not stop")


def start_redis() -> None:
    if not redis_up():
        subprocess.run(SHARED_REDIS_START, capture_output=True, timeout=30)
    wait_until(redis_up, 30, message="Redis did not come back")


def postgres_cluster() -> list[str]:
    versions = sorted(os.path.basename(p) for p in glob.glob("/etc/postgresql/*"))
    if not versions:
        pytest.skip("no local PostgreSQL cluster to restart")
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"]


class Load:
    """Background GET /data calls through the Flask test client; records every status code."""

    def __init__(self, app, key: str, threads: int = 4) -> None:
        self._app = app
        self._key = key
        self._stop = threading.Event()
        self.statuses: list[int] = []
        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        client = self._app.test_client()
        while not self._stop.is_set():
            response = client.get("/data", headers={"X-API-Key": self._key})
            with self._lock:
                self.statuses.append(response.status_code)
                self.bodies.append(response.get_json(silent=True) or {})
            time.sleep(0.005)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def exactness_probe(client, auth) -> list[int]:
    _, key = auth.user_with_key()
    return [client.get("/data", headers={"X-API-Key": key["api_key"]}).status_code for _ in range(8)]


@pytest.mark.parametrize("mode", ["memory", "open", "closed"])
def test_redis_restart_under_load_follows_the_fail_mode(make_app, auth, mode):
    require_redis()
    app = make_app(store="redis", fail_mode=mode, use_clock=False, tier_limits={"free": 1_000_000, "basic": 20,
                                                                                  "premium": 100, "enterprise": 1000})
    client = app.test_client()
    auth = auth.on(client)
    _, key = auth.user_with_key()
    try:
        with Load(app, key["api_key"]) as load:
            assert wait_until(lambda: len(load.statuses) > 20, 30)
            stop_redis()
            outage_start = len(load.statuses)
            assert wait_until(lambda: len(load.statuses) > outage_start + 40, 30)
            health = client.get("/health")
            assert health.status_code == 503 and health.get_json()["checks"]["limiter_store"] == "degraded"
            start_redis()
            wait_until(lambda: client.get("/health").status_code == 200, timeout=60,
                       message="the limiter did not re-probe Redis and recover")
            during = load.statuses[outage_start:]
    finally:
        start_redis()
    assert 500 not in load.statuses
    if mode == "closed":
        assert 503 in during
        refused = [b for s, b in zip(load.statuses, load.bodies, strict=True) if s == 503]
        assert all(b.get("error") == "limiter_unavailable" for b in refused)
    else:
        assert set(during) <= {200}, set(during)
    # limits are exact again once Redis is back (a new free key, limit restored to 5)
    exact = make_app(store="redis", fail_mode=mode, use_clock=False)
    exact_client = exact.test_client()
    auth = auth.on(exact_client)
    assert exactness_probe(exact_client, auth) == [200] * 5 + [429] * 3


def test_postgres_restart_under_load_recovers(make_app, auth):
    require_postgres()
    cluster = postgres_cluster()
    app = make_app(backend="postgres", use_clock=False,
                   tier_limits={"free": 1_000_000, "basic": 20, "premium": 100, "enterprise": 1000})
    client = app.test_client()
    auth = auth.on(client)
    _, key = auth.user_with_key()
    try:
        with Load(app, key["api_key"], threads=3) as load:
            assert wait_until(lambda: len(load.statuses) > 20, 30)
            subprocess.run([*cluster, "restart", "-m", "fast"], capture_output=True, timeout=120, check=True)
            assert wait_until(lambda: port_open("127.0.0.1", 5432), timeout=60)
            after = len(load.statuses)
            assert wait_until(lambda: len(load.statuses) > after + 20, 30)
    finally:
        subprocess.run([*cluster, "start"], capture_output=True, timeout=120)
        wait_until(lambda: port_open("127.0.0.1", 5432), timeout=60)
    # the hot path needs no database: an API key already known keeps working throughout
    assert set(load.statuses) <= {200, 503}, set(load.statuses)
    assert 500 not in load.statuses
    # the pool recovers: new connections work (auth writes to the database)
    assert wait_until(lambda: client.get("/health").status_code == 200, timeout=30)
    auth.register()
    # every admitted request is counted once the flusher reaches the database again
    svc = app.extensions["rl"]
    assert wait_until(lambda: svc.usage.flush() >= 0 and client.get(
        "/usage", headers={"X-API-Key": key["api_key"]}).get_json()["totals"]["all_time"] == load.statuses.count(200),
        timeout=30)
    require_postgres(POSTGRES_URL)


def test_store_outage_never_leaks_a_traceback(make_app, auth):
    require_redis()
    app = make_app(store="redis", fail_mode="closed", use_clock=False)
    client = app.test_client()
    auth = auth.on(client)
    _, key = auth.user_with_key()
    try:
        stop_redis()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: client.get("/data", headers={"X-API-Key": key["api_key"]}),
                                      range(40)))
    finally:
        start_redis()
    assert {r.status_code for r in responses} == {503}
    assert all("Traceback" not in r.get_data(as_text=True) for r in responses)
    assert all(r.get_json()["error"] == "limiter_unavailable" for r in responses)
