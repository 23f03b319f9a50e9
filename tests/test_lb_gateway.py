"""Gateway mode of the balancer (issue 13 item 3) against a real aiohttp decision server.

The decision server follows the forward-auth contract of API_CONTRACT.md: 200 with identity and
rate-limit headers for a good key, a 429 JSON refusal with Retry-After, a 401 without a key; it
can also hang (timeout) or be absent (nothing listens) to drive the fail modes. The upstream is
a real mock backend process whose echo route shows what reached it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web
from test_load_balancer import async_test, make_config, running_lb
from test_mock_backends import mock_backends

from lb_config import ConfigError, load_config
from load_balancer import parse_args
from tests.services import free_port

ADMITTED_HEADERS = {
    "X-Auth-User-Id": "42",
    "X-Auth-Username": "alice",
    "X-Auth-Tier": "premium",
    "X-Auth-Key-Prefix": "rl_ab12cd34",
    "X-RateLimit-Limit": "100",
    "X-RateLimit-Remaining": "99",
    "X-RateLimit-Reset": "1790000060",
    "RateLimit": "limit=100, remaining=99, reset=60",
    "RateLimit-Policy": "100;w=60",
}
RATE_NAMES = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "RateLimit", "RateLimit-Policy")
REFUSAL = {"error": "rate_limit_exceeded", "message": "5 requests per 60 s; retry in 7 s", "retry_after": 7}
SPOOFED = {"X-Auth-User-Id": "1", "X-Auth-Tier": "enterprise", "X-Auth-Username": "admin"}


class Decider:
    """A decision endpoint: records every call and the connections it came on."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self.peers: set[Any] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(dict(request.headers))
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        key = request.headers.get("X-API-Key")
        if key == "good" or request.headers.get("Authorization") == "Bearer user-jwt":
            return web.json_response({"status": "admitted"}, headers=ADMITTED_HEADERS)
        if key == "limited":
            headers = {"Retry-After": "7", "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0"}
            return web.json_response(REFUSAL, status=429, headers=headers)
        if key == "hang":
            await asyncio.Event().wait()
        if key == "broken":
            return web.json_response({"error": "internal_error", "message": "boom"}, status=500)
        return web.json_response({"error": "missing_api_key", "message": "send X-API-Key"}, status=401)


@asynccontextmanager
async def decision_server() -> AsyncIterator[tuple[str, Decider]]:
    decider = Decider()
    app = web.Application()
    app.router.add_route("*", "/forward_auth", decider.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/forward_auth", decider
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
def backend() -> Iterator[str]:
    with mock_backends([free_port()]) as urls:
        yield urls[0]


def gateway_config(backend: str, url: str, **overrides: Any) -> Any:
    return make_config([backend], checks=False, forward_auth_url=url, **overrides)


@async_test
async def test_admitted_request_carries_identity_upstream_and_rate_headers_back(backend: str) -> None:
    async with decision_server() as (url, decider), running_lb(gateway_config(backend, url)) as h:
        for _ in range(5):
            status, headers, echo = await h.get(
                "/orders/7?expand=items&api_key=x", headers={"X-API-Key": "good", **SPOOFED}
            )
            assert status == 200
            for name in ("X-Auth-User-Id", "X-Auth-Username", "X-Auth-Tier", "X-Auth-Key-Prefix"):
                assert echo["headers"][name] == ADMITTED_HEADERS[name]  # the decision's, never the client's
            for name in RATE_NAMES:
                assert headers.getall(name) == [ADMITTED_HEADERS[name]]
        status, _, echo = await h.get("/me", headers={"Authorization": "Bearer user-jwt"})
        assert status == 200 and echo["headers"]["Authorization"] == "Bearer user-jwt"
        stats = (await h.get("/stats"))[2]["forward_auth"]
    call = decider.calls[0]
    assert call["X-Forwarded-Method"] == "GET"
    assert call["X-Forwarded-Uri"] == "/orders/7?expand=items&api_key=x"
    assert call["X-Forwarded-For"] == "127.0.0.1"
    assert call["X-Forwarded-Proto"] == "http"
    assert call["X-Forwarded-Host"] == h.url.removeprefix("http://")
    assert call["X-API-Key"] == "good" and "X-Auth-User-Id" not in call
    assert decider.calls[-1]["Authorization"] == "Bearer user-jwt"
    assert len(decider.peers) == 1  # one keep-alive connection for all six decisions
    assert stats == {"url": url, "fail": "closed", "admitted": 6, "refused": 0, "errors": 0}


@async_test
async def test_refusal_is_returned_to_the_client_as_the_decision_gave_it(backend: str) -> None:
    async with decision_server() as (url, _), running_lb(gateway_config(backend, url)) as h:
        status, headers, body = await h.get("/orders", headers={"X-API-Key": "limited"})
        assert (status, body) == (429, REFUSAL)
        assert headers["Retry-After"] == "7" and headers["X-RateLimit-Remaining"] == "0"
        assert headers["Content-Type"].startswith("application/json")
        status, _, body = await h.get("/orders")
        assert status == 401 and body["error"] == "missing_api_key"
        lb = h.lb
        assert lb.pool.backends[0].total_requests == 0  # the upstream never saw a refused request
        assert (await h.get("/stats"))[2]["forward_auth"]["refused"] == 2


@async_test
@pytest.mark.parametrize("failure", ["hang", "down", "broken"])
async def test_decision_service_failure_fails_closed_by_default(backend: str, failure: str) -> None:
    async with decision_server() as (url, _):
        if failure == "down":
            url = f"http://127.0.0.1:{free_port()}/forward_auth"
        config = gateway_config(backend, url, forward_auth_timeout=0.3)
        async with running_lb(config) as h:
            status, headers, body = await h.get("/orders", headers={"X-API-Key": failure})
            assert (status, body["error"]) == (503, "ratelimiter_unavailable")
            assert headers["Retry-After"] == "1"
            assert h.lb.pool.backends[0].total_requests == 0
            assert (await h.get("/stats"))[2]["forward_auth"]["errors"] == 1


@async_test
@pytest.mark.parametrize("failure", ["hang", "down"])
async def test_decision_service_failure_fails_open_when_asked_without_trusting_client_identity(
    backend: str, failure: str
) -> None:
    async with decision_server() as (url, _):
        if failure == "down":
            url = f"http://127.0.0.1:{free_port()}/forward_auth"
        config = gateway_config(backend, url, forward_auth_timeout=0.3, forward_auth_fail="open")
        async with running_lb(config) as h:
            status, headers, echo = await h.get("/orders", headers={"X-API-Key": failure, **SPOOFED})
            assert status == 200 and echo["path"] == "/orders"
            assert not [name for name in echo["headers"] if name.lower().startswith("x-auth-")]
            assert "X-RateLimit-Limit" not in headers
            assert (await h.get("/stats"))[2]["forward_auth"] == {
                "url": url,
                "fail": "open",
                "admitted": 0,
                "refused": 0,
                "errors": 1,
            }


@async_test
async def test_client_identity_headers_never_reach_a_backend_even_without_gateway_mode(backend: str) -> None:
    async with running_lb(make_config([backend], checks=False)) as h:
        status, _, echo = await h.get("/x", headers=SPOOFED)
        stats = (await h.get("/stats"))[2]["forward_auth"]
    assert status == 200 and not [name for name in echo["headers"] if name.lower().startswith("x-auth-")]
    assert stats == {"url": None, "admitted": 0, "refused": 0, "errors": 0}


def test_gateway_flags_and_environment() -> None:
    url = "http://127.0.0.1:5000/forward_auth"
    args = parse_args(["--forward-auth", url, "--forward-auth-timeout", "0.5", "--forward-auth-fail", "open"])
    config = load_config(args, {})
    assert (config.forward_auth_url, config.forward_auth_timeout, config.forward_auth_fail) == (url, 0.5, "open")
    config = load_config(parse_args([]), {"LB_FORWARD_AUTH_URL": url})
    assert (config.forward_auth_url, config.forward_auth_timeout, config.forward_auth_fail) == (url, 1.0, "closed")
    flags_win = load_config(parse_args(["--forward-auth-fail", "open"]), {"LB_FORWARD_AUTH_FAIL": "closed"})
    assert flags_win.forward_auth_fail == "open"
    for env in (
        {"LB_FORWARD_AUTH_URL": "ftp://x"},
        {"LB_FORWARD_AUTH_TIMEOUT": "0"},
        {"LB_FORWARD_AUTH_FAIL": "maybe"},
    ):
        with pytest.raises(ConfigError, match="forward-auth"):
            load_config(parse_args([]), env)


def test_run_system_gateway_flag_points_the_balancer_at_the_apis_decision_endpoint() -> None:
    import run_system

    args = run_system.build_parser().parse_args(["--dev", "--gateway"])
    plan = run_system.build_plan(args, {})
    lb = next(c for c in plan.components if c.name == "lb")
    at = lb.argv.index("--forward-auth")
    assert lb.argv[at + 1] == f"http://127.0.0.1:{args.api_port}/forward_auth"
    assert any("gateway mode" in note for note in plan.notes)
    plain = run_system.build_plan(run_system.build_parser().parse_args(["--dev"]), {})
    assert "--forward-auth" not in next(c for c in plain.components if c.name == "lb").argv
