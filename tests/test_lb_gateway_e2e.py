"""Gateway mode of the balancer end to end (issue 13 item 3): every part a real process.

``tests/test_lb_gateway.py`` drives the balancer against a stub decision server; here the
decision comes from the real API (``python app.py``, its ``/forward_auth``), the upstream is a
real mock backend whose echo route shows the headers it received, and the balancer runs as
``python load_balancer.py --forward-auth URL``. Also ``run_system.py --dev --gateway``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.services import ROOT, wait_for_http, wait_until
from tests.test_app_entry import base_env
from tests.test_run_system import System, clean_env, distinct_free_ports, port_args

SECRET = "lb-gateway-e2e-secret-0123456789abcdef"
FREE_LIMIT = 3  # per window: the 4th request in it is refused


@dataclass
class Stack:
    api: str
    backend: str
    lb: str
    api_proc: subprocess.Popen


def start(argv: list[str], env: dict[str, str] | None, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def wait_up(url: str, proc: subprocess.Popen) -> None:
    def ready() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.args
        return answers(url)

    wait_until(ready, timeout=30)


def start_stack(tmp: Path, procs: list[subprocess.Popen]) -> Stack:
    """The API, one mock backend and the balancer in gateway mode, each on a free loopback port."""
    api_port, backend_port, lb_port = distinct_free_ports(3)
    env = base_env(tmp, JWT_SECRET_KEY=SECRET, ADMIN_TOKEN="lb-gateway-e2e-admin", TRUSTED_PROXIES="1",
                   TIER_LIMITS=f"free={FREE_LIMIT}", IP_RATE_LIMIT="100000", REGISTER_PER_IP_PER_HOUR="100000")
    api = f"http://127.0.0.1:{api_port}"
    api_proc = start([str(ROOT / "app.py"), "--port", str(api_port)], env, tmp)
    procs.append(api_proc)
    backend = f"http://127.0.0.1:{backend_port}"
    backend_proc = start([str(ROOT / "mock_backends.py"), "--ports", str(backend_port)], None, tmp)
    procs.append(backend_proc)
    wait_for_http(f"{api}/health", api_proc)
    wait_up(f"{backend}/health", backend_proc)
    lb = f"http://127.0.0.1:{lb_port}"
    lb_proc = start([str(ROOT / "load_balancer.py"), "--port", str(lb_port), "--backends", backend,
                     "--forward-auth", f"{api}/forward_auth"], None, tmp)
    procs.append(lb_proc)
    wait_up(f"{lb}/lb/health", lb_proc)
    wait_until(lambda: requests.get(f"{lb}/lb/health", timeout=2).json()["healthy_backends"] == 1, timeout=30)
    return Stack(api, backend, lb, api_proc)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    procs: list[subprocess.Popen] = []
    try:
        yield start_stack(tmp_path_factory.mktemp("lb-gateway-e2e"), procs)
    finally:
        for proc in reversed(procs):
            stop(proc)


def new_key(api: str) -> tuple[int, str]:
    """A fresh user (so every test has its own budget) and a free-tier key: (user id, key)."""
    name = f"gw{uuid.uuid4().hex[:10]}"
    registered = requests.post(f"{api}/auth/register", json={"username": name, "password": "password123"},
                               timeout=10)
    assert registered.status_code == 201, registered.text
    token = registered.json()["access_token"]
    created = requests.post(f"{api}/auth/create_api_key", json={}, headers={"Authorization": f"Bearer {token}"},
                            timeout=10)
    assert created.status_code == 201, created.text
    me = requests.get(f"{api}/auth/me", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert me.status_code == 200, me.text
    return int(me.json()["user"]["id"]), created.json()["api_key"]


def via_lb(stack: Stack, key: str | None, path: str = "/v1/echo", **headers: str) -> requests.Response:
    if key is not None:
        headers["X-API-Key"] = key
    return requests.get(f"{stack.lb}{path}", headers=headers, timeout=10)


@pytest.mark.slow
def test_a_key_is_admitted_with_identity_upstream_and_rate_headers_back(stack: Stack) -> None:
    user_id, key = new_key(stack.api)
    response = via_lb(stack, key)
    assert response.status_code == 200, response.text
    assert response.headers["X-RateLimit-Limit"] == str(FREE_LIMIT)
    assert response.headers["X-RateLimit-Remaining"] == str(FREE_LIMIT - 1)
    assert "X-RateLimit-Reset" in response.headers
    seen = response.json()
    assert seen["path"] == "/v1/echo"  # the backend's echo route answered
    received = seen["headers"]
    assert received["X-Auth-User-Id"] == str(user_id)
    assert received["X-Auth-Tier"] == "free"
    assert key.startswith(received["X-Auth-Key-Prefix"]) and len(received["X-Auth-Key-Prefix"]) < len(key)


@pytest.mark.slow
def test_spoofed_identity_headers_never_reach_the_backend(stack: Stack) -> None:
    user_id, key = new_key(stack.api)
    response = via_lb(stack, key, **{"X-Auth-User-Id": "1", "X-Auth-Tier": "enterprise", "X-Auth-Username": "admin"})
    assert response.status_code == 200, response.text
    received = response.json()["headers"]
    assert received["X-Auth-User-Id"] == str(user_id) != "1"
    assert received["X-Auth-Tier"] == "free"
    assert received.get("X-Auth-Username") != "admin"


@pytest.mark.slow
def test_no_key_is_refused_by_the_balancer_with_the_apis_401(stack: Stack) -> None:
    response = via_lb(stack, None)
    assert response.status_code == 401
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"] == "missing_api_key"
    assert "X-Backend" not in response.headers  # never proxied


@pytest.mark.slow
def test_the_request_past_the_limit_gets_429_with_retry_after(stack: Stack) -> None:
    _, key = new_key(stack.api)
    for _ in range(FREE_LIMIT):
        assert via_lb(stack, key).status_code == 200
    refused = via_lb(stack, key)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert refused.json()["error"] == "rate_limit_exceeded"
    assert "X-Backend" not in refused.headers


@pytest.mark.slow
def test_data_and_the_balancer_spend_one_budget(stack: Stack) -> None:
    _, key = new_key(stack.api)
    for _ in range(FREE_LIMIT - 1):
        assert requests.get(f"{stack.api}/data", headers={"X-API-Key": key}, timeout=10).status_code == 200
    last = via_lb(stack, key)
    assert last.status_code == 200 and last.headers["X-RateLimit-Remaining"] == "0"
    assert via_lb(stack, key).status_code == 429
    assert requests.get(f"{stack.api}/data", headers={"X-API-Key": key}, timeout=10).status_code == 429


@pytest.mark.slow
def test_decisions_are_counted_in_the_balancer_stats(stack: Stack) -> None:
    before = requests.get(f"{stack.lb}/stats", timeout=10).json()["forward_auth"]
    _, key = new_key(stack.api)
    assert via_lb(stack, key).status_code == 200
    assert via_lb(stack, None).status_code == 401
    after = requests.get(f"{stack.lb}/stats", timeout=10).json()["forward_auth"]
    assert after["admitted"] - before["admitted"] == 1 and after["refused"] - before["refused"] == 1


@pytest.mark.slow
def test_the_api_stopped_fails_closed_with_503(tmp_path: Path) -> None:
    procs: list[subprocess.Popen] = []
    try:
        own = start_stack(tmp_path, procs)
        _, key = new_key(own.api)
        assert via_lb(own, key).status_code == 200
        stop(own.api_proc)
        refused = via_lb(own, key)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "ratelimiter_unavailable"
        assert "Retry-After" in refused.headers and "X-Backend" not in refused.headers
    finally:
        for proc in reversed(procs):
            stop(proc)


@pytest.mark.slow
def test_run_system_gateway_protects_the_mock_backends(tmp_path: Path) -> None:
    api, lb, *backends = distinct_free_ports(5)
    system = System(["--dev", "--skip-db", "--gateway", *port_args(api, lb, backends)], clean_env(tmp_path), tmp_path)
    try:
        system.table()
        system.wait_for(r"gateway mode: try curl")
        refused = requests.get(f"http://127.0.0.1:{lb}/", timeout=10)
        assert refused.status_code == 401 and refused.json()["error"] == "missing_api_key"
        _, key = new_key(f"http://127.0.0.1:{api}")
        admitted = requests.get(f"http://127.0.0.1:{lb}/", headers={"X-API-Key": key}, timeout=10)
        assert admitted.status_code == 200, admitted.text
        assert admitted.json()["server"].startswith("backend-")
        assert "X-RateLimit-Remaining" in admitted.headers
    finally:
        system.kill_everything()
