"""load_balancer.py against real mock backend processes and raw loopback servers.

The balancer runs in-process (aiohttp AppRunner on a free port) so tests can wait on its health
events and drive its clock; CLI behaviour is tested on a real ``python load_balancer.py``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from test_geo_router import DATACENTERS, LONDON, MILTON, SHARED_GEOIP, SINGAPORE, build_city_db
from test_mock_backends import mock_backends, stop, wait_ready

from lb_config import (
    BackendSpec,
    CacheConfig,
    ConfigError,
    EjectionConfig,
    HealthCheckConfig,
    LBConfig,
    load_config,
)
from load_balancer import (
    BALANCER,
    Backend,
    Balancer,
    GuardedRunner,
    ResponseCache,
    SmoothWeighted,
    StrategyEnv,
    build_app,
    hrw_score,
    parse_args,
)
from tests.services import ROOT, FakeClock, free_port

INTERVAL = 0.25


def async_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test body on a fresh event loop (keeps fixtures synchronous)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def make_config(
    urls: Sequence[str], weights: Sequence[int] | None = None, checks: bool = True, **overrides: Any
) -> LBConfig:
    """Fast health checks (INTERVAL), or none at all when a test drives failures itself."""
    specs = [BackendSpec(u, w) for u, w in zip(urls, weights or [1] * len(urls), strict=True)]
    health = HealthCheckConfig(enabled=checks, interval=INTERVAL, timeout=0.5, rise=2, fall=2)
    return LBConfig(backends=specs, health_check=health, **overrides)


@dataclass
class Harness:
    """A running balancer: its base URL, its state and a client session."""

    url: str
    lb: Balancer
    client: aiohttp.ClientSession

    async def get(self, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
        async with self.client.get(self.url + path, **kwargs) as resp:
            body = await resp.read()
            data = json.loads(body) if resp.content_type == "application/json" else body
            return resp.status, resp.headers, data

    async def backend_of(self, path: str = "/", **kwargs: Any) -> str:
        status, headers, _ = await self.get(path, **kwargs)
        assert status == 200
        return headers["X-Backend"]

    def backend(self, url: str) -> Backend:
        found = self.lb.pool.find(url)
        assert found is not None
        return found


@asynccontextmanager
async def running_lb(config: LBConfig, **kwargs: Any) -> AsyncIterator[Harness]:
    app = build_app(config, **kwargs)
    runner = GuardedRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as client:
            yield Harness(f"http://127.0.0.1:{port}", app[BALANCER], client)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def raw_backend(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A hand-written HTTP server on loopback, for responses aiohttp or Flask would not send."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def gather_limited(count: int, concurrency: int, make: Callable[[], Awaitable[str]]) -> list[str]:
    """Run ``make()`` ``count`` times with at most ``concurrency`` in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> str:
        async with gate:
            return await make()

    return await asyncio.gather(*(one() for _ in range(count)))


@pytest.fixture(scope="module")
def backends() -> Iterator[list[str]]:
    with mock_backends([free_port() for _ in range(3)]) as urls:
        yield urls


@pytest.fixture(autouse=True)
def reset_backends(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "backends" in request.fixturenames:
        for url in request.getfixturevalue("backends"):
            requests.post(url + "/admin/health", json={"healthy": True}, timeout=5)
            requests.post(url + "/admin/delay", json={"delay_ms": 0}, timeout=5)


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


# --------------------------------------------------------------------------- strategies


@async_test
async def test_round_robin_cycles_backends_in_exact_order(backends: list[str]) -> None:
    async with running_lb(make_config(backends)) as h:
        seen = [await h.backend_of("/") for _ in range(9)]
    assert seen == backends * 3


def test_smooth_weighted_order_for_weights_5_1_1() -> None:
    strategy = SmoothWeighted(StrategyEnv(time.monotonic, random.Random(1), None, 10.0))
    pool = [Backend("a", 5), Backend("b", 1), Backend("c", 1)]
    order = "".join(strategy.choose(pool, "").url for _ in range(14))
    assert order == "aabacaa" * 2


@async_test
async def test_weighted_strategy_through_the_proxy(backends: list[str]) -> None:
    async with running_lb(make_config(backends, [5, 1, 1], strategy="weighted")) as h:
        seen = [await h.backend_of("/") for _ in range(7)]
    a, b, c = backends
    assert seen == [a, a, b, a, c, a, a]


def test_rendezvous_hash_moves_only_the_removed_backends_clients() -> None:
    pool = [Backend(f"http://10.0.0.{i}:80") for i in range(1, 5)]
    clients = [f"203.0.{i // 250}.{i % 250}" for i in range(2000)]

    def assign(backends: list[Backend]) -> dict[str, str]:
        return {ip: max(backends, key=lambda b: hrw_score(ip, b)).url for ip in clients}

    before = assign(pool)
    removed = pool[1].url
    after = assign([b for b in pool if b.url != removed])
    moved = {ip for ip in clients if before[ip] != after[ip]}
    assert moved == {ip for ip in clients if before[ip] == removed}
    assert 350 < len(moved) < 650  # about a quarter of the clients lived there
    assert len({after[ip] for ip in moved}) == 3  # and they spread over all the others


@async_test
async def test_ip_hash_keeps_clients_when_another_backend_goes_down(backends: list[str]) -> None:
    clients = [f"198.51.100.{i}" for i in range(1, 41)]
    async with running_lb(make_config(backends, strategy="ip_hash", trusted_proxies=1)) as h:

        async def mapping() -> dict[str, str]:
            return {ip: await h.backend_of("/", headers={"X-Forwarded-For": ip}) for ip in clients}

        before = await mapping()
        assert before == await mapping()  # sticky
        down = h.backend(backends[1])
        requests.post(backends[1] + "/admin/health", json={"healthy": False}, timeout=5)
        await h.lb.pool.wait_for(lambda: not down.healthy, timeout=3 * INTERVAL + 1)
        after = await mapping()
    for ip in clients:
        if before[ip] != backends[1]:
            assert after[ip] == before[ip]
        else:
            assert after[ip] != backends[1]
    assert backends[1] in before.values()


@async_test
async def test_least_connections_avoids_a_slow_backend(backends: list[str]) -> None:
    requests.post(backends[0] + "/admin/delay", json={"delay_ms": 300}, timeout=5)
    async with running_lb(make_config(backends, strategy="least_connections")) as h:
        seen = Counter(await gather_limited(36, 6, lambda: h.backend_of("/")))
    assert seen[backends[0]] <= 36 * 0.2, seen
    assert seen[backends[1]] > 0 and seen[backends[2]] > 0


@async_test
async def test_adaptive_shifts_load_away_from_a_backend_made_slow(backends: list[str]) -> None:
    async with running_lb(make_config(backends, strategy="adaptive"), rng=random.Random(7)) as h:
        warm = Counter([await h.backend_of("/") for _ in range(30)])
        assert all(warm[u] > 0 for u in backends), warm  # fast and equal: everyone gets traffic
        requests.post(backends[0] + "/admin/delay", json={"delay_ms": 200}, timeout=5)
        seen = Counter(await gather_limited(60, 4, lambda: h.backend_of("/")))
    assert seen[backends[0]] <= 60 * 0.1, seen


# --------------------------------------------------------------------------- health and failures


class Load:
    """Concurrent GET loop through the balancer that records statuses and signals progress."""

    def __init__(self, h: Harness, workers: int = 3) -> None:
        self.h = h
        self.statuses: list[int] = []
        self.served_by: Counter[str] = Counter()
        self._progress = asyncio.Condition()
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run()) for _ in range(workers)]

    async def _run(self) -> None:
        while not self._stop.is_set():
            status, headers, _ = await self.h.get("/")
            self.statuses.append(status)
            self.served_by[headers.get("X-Backend", "")] += 1
            async with self._progress:
                self._progress.notify_all()

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(predicate)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


@async_test
async def test_killed_backend_is_ejected_and_no_idempotent_request_fails(backends: list[str]) -> None:
    port = free_port()
    victim_url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(ROOT / "mock_backends.py"), "--ports", str(port)]
    victim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready([victim_url + "/health"], victim)
        async with running_lb(make_config([*backends[:2], victim_url])) as h:
            target = h.backend(victim_url)
            load = Load(h)
            try:
                await load.wait(lambda: load.served_by[victim_url] >= 5, timeout=5)
                victim.kill()
                victim.wait()
                killed_at = time.monotonic()
                await h.lb.pool.wait_for(lambda: not target.healthy, timeout=2 * INTERVAL + 2)
                assert time.monotonic() - killed_at <= 2 * INTERVAL + 0.2
                served = len(load.statuses)
                await load.wait(lambda: len(load.statuses) >= served + 30, timeout=10)
            finally:
                await load.stop()
            assert load.statuses and set(load.statuses) == {200}

            victim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            await h.lb.pool.wait_for(lambda: target.healthy, timeout=15)
            seen = {await h.backend_of("/") for _ in range(6)}
            assert victim_url in seen
    finally:
        stop(victim)


@async_test
async def test_passive_ejection_grows_each_time(backends: list[str]) -> None:
    clock = FakeClock(1000.0)
    dead = closed_port_url()
    ejection = EjectionConfig(max_failures=2, base_seconds=5, max_seconds=60)
    cfg = make_config([dead, backends[0]], ejection=ejection, checks=False)
    async with running_lb(cfg, clock=clock) as h:
        target = h.backend(dead)
        durations = []
        for _ in range(3):
            for _attempt in range(10):
                if target.ejected_until > clock.now:
                    break
                assert (await h.get("/"))[0] == 200  # retried on the live backend
            durations.append(target.ejected_until - clock.now)
            clock.now = target.ejected_until
    assert durations == [5, 10, 20]


@async_test
async def test_post_is_retried_when_the_connection_was_refused(backends: list[str]) -> None:
    cfg = make_config([closed_port_url(), backends[0]], checks=False)
    async with running_lb(cfg) as h:
        async with h.client.post(h.url + "/submit", data=b"x" * 1000) as resp:
            body = await resp.json()
            assert resp.status == 200
            assert resp.headers["X-Backend"] == backends[0]
    assert body["method"] == "POST" and body["body_length"] == 1000


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the request head, then close without answering."""
    await read_head(reader)
    writer.close()


@async_test
async def test_post_that_reached_a_failing_backend_is_not_retried(backends: list[str]) -> None:
    async with raw_backend(hang_up) as bad:
        cfg = make_config([bad, backends[0]], checks=False)
        async with running_lb(cfg) as h:
            async with h.client.post(h.url + "/submit", data=b"payload") as resp:
                body = await resp.json()
                assert resp.status == 502
            assert h.backend(backends[0]).total_requests == 0
    assert body["error"] == "bad_gateway" and body["message"]


@async_test
async def test_get_to_a_failing_backend_is_retried_on_another(backends: list[str]) -> None:
    async with raw_backend(hang_up) as bad:
        cfg = make_config([bad, backends[0]], checks=False)
        async with running_lb(cfg) as h:
            assert await h.backend_of("/") == backends[0]
            assert h.backend(bad).failures == 1


@async_test
async def test_single_dead_backend_gives_502_json() -> None:
    cfg = make_config([closed_port_url()], checks=False)
    async with running_lb(cfg) as h:
        status, _, body = await h.get("/anything")
    assert status == 502
    assert body["error"] == "bad_gateway" and isinstance(body["message"], str)


@async_test
async def test_all_backends_unhealthy_gives_503_json(backends: list[str]) -> None:
    async with running_lb(make_config(backends)) as h:
        for url in backends:
            requests.post(url + "/admin/health", json={"healthy": False}, timeout=5)
        await h.lb.pool.wait_for(lambda: not h.lb.pool.candidates(), timeout=3 * INTERVAL + 1)
        status, _, body = await h.get("/")
        health = await h.get("/lb/health")
    assert status == 503
    assert body["error"] == "no_healthy_backends" and body["message"]
    assert health[2] == {"status": "ok", "healthy_backends": 0}


@async_test
async def test_backend_500_is_passed_through_not_retried(backends: list[str]) -> None:
    async with running_lb(make_config(backends)) as h:
        status, headers, body = await h.get("/?fail=1")
        assert sum(b.total_requests for b in h.lb.pool.backends) == 1
    assert status == 500 and body["error"] == "injected_failure"
    assert headers["X-Backend"] == backends[0]


# --------------------------------------------------------------------------- proxying


@async_test
async def test_forwarded_for_is_appended_and_hop_by_hop_request_headers_dropped(backends: list[str]) -> None:
    headers = {
        "X-Forwarded-For": "203.0.113.9",
        "Connection": "keep-alive, X-Secret",
        "X-Secret": "hop",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic abc",
        "X-Kept": "end-to-end",
    }
    async with running_lb(make_config(backends)) as h:
        _, _, echo = await h.get("/echo", headers=headers)
    seen = {k.lower(): v for k, v in echo["headers"].items()}
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-kept"] == "end-to-end"
    for hop in ("x-secret", "keep-alive", "te", "proxy-authorization"):
        assert hop not in seen


async def hop_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Internal\r\nX-Internal: secret\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nUpgrade: h2c\r\nX-Public: yes\r\n\r\nok"
    )
    await writer.drain()
    writer.close()


@async_test
async def test_hop_by_hop_response_headers_are_stripped() -> None:
    async with raw_backend(hop_headers) as url:
        cfg = make_config([url], checks=False)
        async with running_lb(cfg) as h:
            status, headers, body = await h.get("/")
    assert status == 200 and body == b"ok"
    assert headers["X-Public"] == "yes" and headers["X-Backend"] == url
    for hop in ("X-Internal", "Keep-Alive", "Proxy-Authenticate", "Upgrade"):
        assert hop not in headers


@async_test
async def test_response_is_streamed_chunk_by_chunk() -> None:
    gate = asyncio.Event()

    async def slow_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await gate.wait()  # the rest only once the client proved it already has the first chunk
        writer.write(b"4\r\nlast\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    async with raw_backend(slow_chunks) as url:
        cfg = make_config([url], checks=False)
        async with running_lb(cfg) as h, h.client.get(h.url + "/") as resp:
            async with asyncio.timeout(5):
                first = await resp.content.readany()
            gate.set()
            rest = await resp.content.read()
    assert first == b"first"
    assert rest == b"last"


@async_test
async def test_failure_after_bytes_reached_the_client_is_not_retried(backends: list[str]) -> None:
    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 100_000)
        await writer.drain()
        writer.close()

    async with raw_backend(truncated) as bad:
        cfg = make_config([bad, backends[0]], checks=False)
        async with running_lb(cfg) as h:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with h.client.get(h.url + "/") as resp:
                    await resp.read()
            assert h.backend(backends[0]).total_requests == 0


@async_test
async def test_large_upload_is_streamed_to_the_backend(backends: list[str]) -> None:
    payload = bytes(range(256)) * (20 * 4096)  # 20 MiB

    async def body() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 1 << 20):
            yield payload[i : i + (1 << 20)]

    async with running_lb(make_config(backends)) as h:
        async with h.client.put(h.url + "/upload", data=body()) as resp:
            echo = await resp.json()
    assert echo["body_length"] == len(payload)
    assert echo["body_sha256"] == hashlib.sha256(payload).hexdigest()


# --------------------------------------------------------------------------- cache


@async_test
async def test_cache_serves_max_age_responses_until_they_expire(backends: list[str]) -> None:
    clock = FakeClock(1000.0)
    async with running_lb(make_config(backends), clock=clock) as h:
        path = "/item?cache_control=max-age=30"
        _, first_headers, first = await h.get(path)
        _, second_headers, second = await h.get(path)
        clock.now += 31
        _, third_headers, third = await h.get(path)
        stats = (await h.get("/stats"))[2]["cache"]
    assert (first_headers["X-Cache"], second_headers["X-Cache"], third_headers["X-Cache"]) == ("MISS", "HIT", "MISS")
    assert second == first
    assert third["request_id"] != first["request_id"] or third["server"] != first["server"]
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 2, 1)


@pytest.mark.parametrize("cache_control", ["no-store", "private, max-age=60", "no-cache, max-age=60", ""])
@async_test
async def test_uncacheable_responses_are_not_stored(backends: list[str], cache_control: str) -> None:
    async with running_lb(make_config(backends)) as h:
        params = {"cache_control": cache_control} if cache_control else None
        _, _, first = await h.get("/item", params=params)
        _, headers, second = await h.get("/item", params=params)
        assert (await h.get("/stats"))[2]["cache"]["entries"] == 0
    assert headers["X-Cache"] == "MISS"
    assert (second["server"], second["request_id"]) != (first["server"], first["request_id"])


@pytest.mark.parametrize("credential", ["Authorization", "Cookie", "X-API-Key"])
@async_test
async def test_requests_with_credentials_bypass_the_cache(backends: list[str], credential: str) -> None:
    async with running_lb(make_config(backends)) as h:
        params = {"cache_control": "max-age=60"}
        await h.get("/mine", params=params)  # an anonymous answer is stored...
        _, headers, _ = await h.get("/mine", params=params, headers={credential: "secret-of-one-client"})
        entries = (await h.get("/stats"))[2]["cache"]["entries"]
    assert "X-Cache" not in headers  # ...but never served to (or stored from) a request with credentials
    assert entries == 1


@async_test
async def test_s_maxage_wins_over_max_age(backends: list[str]) -> None:
    async with running_lb(make_config(backends)) as h:
        params = {"cache_control": "max-age=0, s-maxage=60"}
        await h.get("/shared", params=params)
        _, headers, _ = await h.get("/shared", params=params)
    assert headers["X-Cache"] == "HIT"


@async_test
async def test_request_no_cache_refetches_and_no_store_bypasses(backends: list[str]) -> None:
    async with running_lb(make_config(backends)) as h:
        params = {"cache_control": "max-age=60"}
        _, _, first = await h.get("/page", params=params)
        _, refreshed_headers, refreshed = await h.get("/page", params=params, headers={"Cache-Control": "no-cache"})
        _, hit_headers, hit = await h.get("/page", params=params)
        _, bypass_headers, _ = await h.get("/other", params=params, headers={"Cache-Control": "no-store"})
        _, after_bypass, _ = await h.get("/other", params=params)
    assert refreshed_headers["X-Cache"] == "MISS"
    assert (refreshed["server"], refreshed["request_id"]) != (first["server"], first["request_id"])
    assert hit_headers["X-Cache"] == "HIT" and hit == refreshed  # the refetch replaced the entry
    assert "X-Cache" not in bypass_headers
    assert after_bypass["X-Cache"] == "MISS"  # nothing was stored by the no-store request


def test_cache_is_lru_bounded_by_entries_and_bytes() -> None:
    from multidict import CIMultiDict

    clock = FakeClock(1000.0)
    cache = ResponseCache(CacheConfig(max_entries=2, max_bytes=100, max_entry_bytes=80), clock)
    headers = CIMultiDict({"Cache-Control": "max-age=60"})
    for key in ("a", "b"):
        assert cache.put(key, 200, headers, b"1" * 10, "x")
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", 200, headers, b"1" * 10, "x")
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    cache.put("d", 200, headers, b"1" * 80, "x")  # 10 + 80 + 10 > 100 evicts down to fit
    assert cache.bytes <= 100 and len(cache._entries) <= 2
    assert not cache.put("big", 200, headers, b"1" * 81, "x")


CACHE_HEADER_LINES = {
    b"/private-second": b"Cache-Control: max-age=60\r\nCache-Control: private\r\n",
    b"/no-store-second": b"Cache-Control: public\r\nCache-Control: max-age=60, no-store\r\n",
    b"/vary-second": b"Cache-Control: max-age=60\r\nVary: Accept-Encoding\r\nVary: Cookie\r\n",
    b"/vary-star": b"Cache-Control: max-age=60\r\nVary: accept-encoding\r\nVary: *\r\n",
    b"/cacheable": b"Cache-Control: public\r\nCache-Control: max-age=60\r\nVary: Accept-Encoding\r\n",
}


@async_test
async def test_repeated_cache_control_and_vary_lines_are_combined() -> None:
    """Issue 11 item 9: a second Cache-Control or Vary line counts as much as the first."""
    served = Counter[bytes]()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                target = (await read_head(reader)).split(b" ")[1]
                served[target] += 1
                body = b"%s #%d" % (target, served[target])
                writer.write(
                    b"HTTP/1.1 200 OK\r\n%bContent-Length: %d\r\n\r\n%b" % (CACHE_HEADER_LINES[target], len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False)) as h:
        for path in CACHE_HEADER_LINES:
            first = await h.get(path.decode())
            second = await h.get(path.decode())
            assert first[0] == second[0] == 200
    assert served == {
        b"/private-second": 2,
        b"/no-store-second": 2,
        b"/vary-second": 2,
        b"/vary-star": 2,
        b"/cacheable": 1,
    }


# --------------------------------------------------------------------------- admin routes


@async_test
async def test_stats_has_the_contract_fields(backends: list[str]) -> None:
    async with running_lb(make_config(backends)) as h:
        await h.get("/")
        status, _, stats = await h.get("/stats")
    assert status == 200
    assert {"strategy", "strategies", "total_requests", "backends", "cache"} <= stats.keys()
    assert stats["strategy"] == "round_robin" and stats["total_requests"] == 1
    assert {"round_robin", "least_connections", "weighted", "ip_hash", "adaptive"} <= set(stats["strategies"])
    required = {"url", "healthy", "weight", "active_connections", "total_requests", "failures", "avg_response_ms"}
    assert all(required <= b.keys() for b in stats["backends"])
    assert [b["url"] for b in stats["backends"]] == backends
    assert {"hits", "misses", "entries"} <= stats["cache"].keys()


@async_test
async def test_change_strategy_accepts_valid_and_rejects_invalid(backends: list[str]) -> None:
    async with running_lb(make_config(backends)) as h:
        post = h.client.post
        async with post(h.url + "/change_strategy", json={"strategy": "least_connections"}) as resp:
            assert resp.status == 200 and await resp.json() == {"strategy": "least_connections"}
        for body in (b'{"strategy": "fastest"}', b"{not json", b'["round_robin"]', b"{}"):
            async with post(
                h.url + "/change_strategy", data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                error = await resp.json()
                assert resp.status == 400, body
                assert error["error"] == "bad_request" and "round_robin" in error["message"]
                assert "weighted" in error["valid"]
        async with h.client.get(h.url + "/change_strategy") as resp:
            assert resp.status == 405 and (await resp.json())["error"] == "method_not_allowed"
        assert (await h.get("/stats"))[2]["strategy"] == "least_connections"


@async_test
async def test_dashboard_is_self_contained_and_escapes_with_text_content(backends: list[str]) -> None:
    async with running_lb(make_config(backends)) as h:
        status, headers, html = await h.get("/dashboard")
        _, js_headers, script = await h.get("/lb/dashboard.js")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="/lb/dashboard.js"' in html and b"https://" not in html
    assert js_headers["Content-Type"].startswith("application/javascript")
    assert b"textContent" in script and b"innerHTML" not in script
    assert b"/stats" in script and b"/change_strategy" in script


@async_test
async def test_unexpected_exception_is_logged_once_and_answered_500(
    backends: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    async with running_lb(make_config(backends)) as h:

        def broken(candidates: Any, client_ip: str) -> Backend:
            raise RuntimeError("boom")

        h.lb.strategy.choose = broken  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="load_balancer"):
            status, _, body = await h.get("/")
    assert status == 500 and body["error"] == "internal_error"
    assert len([r for r in caplog.records if r.exc_info]) == 1


# --------------------------------------------------------------------------- geo


@pytest.fixture(scope="module")
def geo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared = SHARED_GEOIP / "GeoIP2-City-Test.mmdb"
    return shared if shared.exists() else build_city_db(tmp_path_factory.mktemp("geo") / "city.mmdb")


@async_test
async def test_geo_strategy_routes_to_the_nearest_healthy_datacenter(backends: list[str], geo_db: Path) -> None:
    placed = [
        dc.__class__(dc.name, dc.latitude, dc.longitude, (url,)) for dc, url in zip(DATACENTERS, backends, strict=True)
    ]
    cfg = make_config(backends, strategy="geo", trusted_proxies=1)
    cfg.datacenters, cfg.default_datacenter, cfg.geoip_db_path = placed, "ap-southeast", str(geo_db)
    for spec, dc in zip(cfg.backends, placed, strict=True):
        spec.datacenter = dc.name
    async with running_lb(cfg) as h:

        async def route(ip: str) -> str:
            return await h.backend_of("/", headers={"X-Forwarded-For": ip})

        assert [await route(ip) for ip in (LONDON, MILTON, SINGAPORE)] == backends
        assert await route("10.0.0.1") == backends[2]  # private: the default datacenter
        requests.post(backends[0] + "/admin/health", json={"healthy": False}, timeout=5)
        eu = h.backend(backends[0])
        await h.lb.pool.wait_for(lambda: not eu.healthy, timeout=3 * INTERVAL + 1)
        assert await route(LONDON) == backends[1]  # next nearest to London is us-west


# --------------------------------------------------------------------------- the CLI


def start_cli(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "load_balancer.py"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_cli_streams_20_mb_without_buffering_and_exits_0_on_sigterm(backends: list[str]) -> None:
    port = free_port()
    proc = start_cli(["--port", str(port)], env={"LB_BACKENDS": ",".join(backends)})
    try:
        wait_ready([f"http://127.0.0.1:{port}/lb/health"], proc)
        requests.get(f"http://127.0.0.1:{port}/bytes?n=100000", timeout=10)  # warm up lazy imports
        before = peak_rss_kib(proc.pid)
        size = 20 * 1024 * 1024
        with requests.get(f"http://127.0.0.1:{port}/bytes?n={size}", stream=True, timeout=30) as resp:
            received = sum(len(c) for c in resp.iter_content(chunk_size=256 * 1024))
        growth_mib = (peak_rss_kib(proc.pid) - before) / 1024
    finally:
        code = stop(proc)
    assert received == size
    assert growth_mib < 8, f"balancer peak RSS grew {growth_mib:.1f} MiB while relaying 20 MiB"
    assert code == 0


def test_cli_drains_in_flight_requests_on_shutdown(backends: list[str]) -> None:
    port = free_port()
    proc = start_cli(["--port", str(port), "--backends", backends[0]])
    result: dict[str, Any] = {}
    try:
        wait_ready([f"http://127.0.0.1:{port}/lb/health"], proc)

        def slow_request() -> None:
            result["response"] = requests.get(f"http://127.0.0.1:{port}/slow?delay_ms=1500", timeout=10)

        worker = threading.Thread(target=slow_request)
        worker.start()
        deadline = time.monotonic() + 5
        while (
            requests.get(f"http://127.0.0.1:{port}/stats", timeout=5).json()["backends"][0]["active_connections"] == 0
        ):
            assert time.monotonic() < deadline, "the slow request never reached the backend"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        worker.join(timeout=15)
        assert proc.wait(timeout=15) == 0
    finally:
        stop(proc)
    assert result["response"].status_code == 200
    assert result["response"].json()["path"] == "/slow"


def test_cli_busy_port_gives_one_line_and_nonzero_exit() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = start_cli(["--port", str(port), "--backends", closed_port_url()])
        code = proc.wait(timeout=30)
        err = proc.stderr.read() if proc.stderr else ""
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert str(port) in err and "in use" in err


def test_cli_config_file_and_flags(backends: list[str], tmp_path: Path) -> None:
    config = {
        "strategy": "weighted",
        "backends": [{"url": backends[0], "weight": 3}, backends[1]],
        "health_check": {"interval": 0.5},
        "cache": {"max_entries": 10},
    }
    path = tmp_path / "lb.json"
    path.write_text(json.dumps(config))
    port = free_port()
    proc = start_cli(["--config", str(path), "--port", str(port)], env={"LB_STRATEGY": "ip_hash"})
    try:
        wait_ready([f"http://127.0.0.1:{port}/lb/health"], proc)
        stats = requests.get(f"http://127.0.0.1:{port}/stats", timeout=5).json()
    finally:
        stop(proc)
    assert stats["strategy"] == "ip_hash"  # the environment wins over the file
    assert [(b["url"], b["weight"]) for b in stats["backends"]] == [(backends[0], 3), (backends[1], 1)]


def test_cli_rejects_a_bad_strategy_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "load_balancer.py"), "--strategy", "fastest", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "fastest" in result.stderr


@async_test
async def test_head_keeps_the_backends_content_length_and_sends_no_body(backends: list[str]) -> None:
    async with running_lb(make_config(backends)) as h, h.client.head(h.url + "/bytes?n=5000") as resp:
        body = await resp.read()
    assert resp.status == 200
    assert resp.headers["Content-Length"] == "5000"
    assert body == b""


@async_test
async def test_keep_alive_connections_to_a_backend_are_reused() -> None:
    connections = 0

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                await read_head(reader)
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
        writer.close()

    async with raw_backend(keep_alive) as url:
        cfg = make_config([url], checks=False)
        async with running_lb(cfg) as h:
            statuses = [(await h.get("/"))[0] for _ in range(5)]
    assert statuses == [204] * 5
    assert connections == 1


@async_test
async def test_backend_that_never_answers_times_out_into_502() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await reader.read()  # hold the connection open without answering until the proxy gives up

    async with raw_backend(silent) as url, running_lb(make_config([url], checks=False, read_timeout=0.3)) as h:
        started = time.monotonic()
        status, _, body = await h.get("/")
        elapsed = time.monotonic() - started
    assert status == 502 and body["error"] == "bad_gateway"
    assert "no response within 0.3s" in body["message"]
    assert 0.3 <= elapsed < 5


def test_config_datacenters_bring_their_own_backends() -> None:
    from lb_config import apply_mapping

    config = LBConfig()
    apply_mapping(
        config,
        {
            "strategy": "geo",
            "default_datacenter": "us-west",
            "datacenters": [
                {"name": "eu-west", "lat": 51.5, "lon": -0.12, "backends": ["http://127.0.0.1:7001/"]},
                {"name": "us-west", "lat": 37.77, "lon": -122.42, "backends": ["http://127.0.0.1:7002"]},
            ],
        },
    )
    config.validate()
    placed = [(b.url, b.datacenter) for b in config.backends]
    assert placed == [("http://127.0.0.1:7001", "eu-west"), ("http://127.0.0.1:7002", "us-west")]
    assert [dc.name for dc in config.datacenters] == ["eu-west", "us-west"]


@async_test
async def test_backend_url_path_is_a_prefix_for_proxied_paths(backends: list[str]) -> None:
    async with running_lb(make_config([backends[0] + "/mounted"], checks=False)) as h:
        _, _, echo = await h.get("/items?x=1")
    assert echo["path"] == "/mounted/items" and echo["query"] == {"x": ["1"]}


# --------------------------------------------------------------------------- framing and connection hygiene


async def raw_exchange(url: str, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the balancer and read until it closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


def framing_lines(head: bytes) -> list[bytes]:
    """The Content-Length and Transfer-Encoding lines of a request head, lower-cased."""
    return [
        line for line in head.lower().split(b"\r\n") if line.startswith((b"content-length:", b"transfer-encoding:"))
    ]


class RecordingBackend:
    """A keep-alive backend that frames request bodies by Content-Length and records what it parsed."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.open = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while True:
                head = await read_head(reader)
                self.heads.append(head)
                fields = dict(line.split(b":", 1) for line in head.lower().split(b"\r\n")[1:] if b":" in line)
                length = int(fields.get(b"content-length", b"0"))
                self.bodies.append(await reader.readexactly(length))
                reply = b"resp-for " + head.split(b"\r\n")[0]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(reply), reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    @property
    def request_lines(self) -> list[bytes]:
        return [head.split(b"\r\n")[0] for head in self.heads]


@async_test
async def test_connection_header_cannot_strip_content_length_to_smuggle_a_request() -> None:
    backend = RecordingBackend()
    smuggled = b"GET /admin/secret HTTP/1.1\r\nHost: b\r\n\r\n"
    attack = (
        b"POST /public HTTP/1.1\r\nHost: lb\r\nConnection: keep-alive, Content-Length, Transfer-Encoding\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(smuggled), smuggled)
    )
    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False)) as h:
        attacker = await raw_exchange(h.url, attack.replace(b"keep-alive", b"close"))
        victim = await raw_exchange(h.url, b"GET /victim HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
    assert attacker.endswith(b"resp-for POST /public HTTP/1.1")
    assert victim.endswith(b"resp-for GET /victim HTTP/1.1")
    assert backend.request_lines == [b"POST /public HTTP/1.1", b"GET /victim HTTP/1.1"]
    assert backend.bodies[0] == smuggled
    assert framing_lines(backend.heads[0]) == [b"content-length: %d" % len(smuggled)]


@async_test
async def test_upload_of_unknown_length_is_sent_chunked_with_one_framing_header() -> None:
    heads: list[bytes] = []

    async def chunked_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_head(reader))
        body = b""
        while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) > 0:
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        writer.close()

    request = (
        b"PUT /up HTTP/1.1\r\nHost: lb\r\nConnection: close, Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )
    async with raw_backend(chunked_echo) as url, running_lb(make_config([url], checks=False)) as h:
        answer = await raw_exchange(h.url, request)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nabcdefg")
    assert framing_lines(heads[0]) == [b"transfer-encoding: chunked"]


@async_test
@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: 5, 6\r\n",
    ],
)
async def test_ambiguous_request_framing_is_rejected_before_reaching_a_backend(framing: bytes) -> None:
    backend = RecordingBackend()
    request = b"POST /x HTTP/1.1\r\nHost: lb\r\n" + framing + b"\r\n5\r\nhello\r\n0\r\n\r\n"
    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False)) as h:
        answer = await raw_exchange(h.url, request)
    assert answer.split(b"\r\n")[0].endswith(b"400 Bad Request")
    assert backend.heads == []


def test_framing_check_rejects_what_a_lenient_parser_might_let_through() -> None:
    from aiohttp.test_utils import make_mocked_request
    from multidict import CIMultiDict

    from load_balancer import BadRequest, check_framing

    for headers in (
        [("Transfer-Encoding", "chunked"), ("Content-Length", "5")],
        [("Content-Length", "5"), ("Content-Length", "6")],
        [("Content-Length", "5"), ("Content-Length", "5")],
    ):
        with pytest.raises(BadRequest):
            check_framing(make_mocked_request("POST", "/", headers=CIMultiDict(headers)))
    check_framing(make_mocked_request("POST", "/", headers=CIMultiDict([("Content-Length", "5")])))
    check_framing(make_mocked_request("GET", "/"))


@async_test
@pytest.mark.parametrize("gap", [0.0, 0.05], ids=["same-packet", "later"])
async def test_unsolicited_bytes_from_a_backend_never_reach_the_next_client(gap: float) -> None:
    connections = 0
    injected = asyncio.Event()

    async def sloppy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        try:
            while True:
                await read_head(reader)
                if first:  # a body longer than its Content-Length: the tail looks like a second response
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    if gap:
                        await writer.drain()
                        await asyncio.sleep(gap)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Injected: 1\r\n\r\nPOISON")
                    await writer.drain()
                    injected.set()
                    first = False
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nright")
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async with raw_backend(sloppy) as url, running_lb(make_config([url], checks=False)) as h:
        assert (await h.get("/a"))[2] == b"ok"
        async with asyncio.timeout(5):
            await injected.wait()
        await asyncio.sleep(0.1)  # let the stray bytes arrive at the balancer
        status, headers, body = await h.get("/b")
    assert (status, body) == (200, b"right")
    assert "X-Injected" not in headers
    assert connections == 2


@async_test
@pytest.mark.parametrize(
    "framing, body",
    [
        (b"Transfer-Encoding: chunked\r\nContent-Length: 100\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        (b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
    ],
    ids=["te-and-cl", "repeated-cl"],
)
async def test_response_with_doubtful_framing_is_relayed_but_its_connection_not_reused(
    framing: bytes, body: bytes
) -> None:
    connections = 0

    async def doubtful(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                await read_head(reader)
                writer.write(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n" + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async with raw_backend(doubtful) as url, running_lb(make_config([url], checks=False)) as h:
        async with asyncio.timeout(5):
            answers = [await h.get("/") for _ in range(2)]
    assert [(status, data) for status, _, data in answers] == [(200, b"hello")] * 2
    assert connections == 2


@async_test
async def test_response_with_conflicting_content_lengths_is_a_502() -> None:
    async def conflicting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello\r\n\r\n")
        await writer.drain()
        writer.close()

    async with raw_backend(conflicting) as url, running_lb(make_config([url], checks=False, retries=0)) as h:
        status, _, body = await h.get("/")
    assert status == 502 and body["error"] == "bad_gateway"


@async_test
async def test_client_abort_mid_upload_closes_the_backend_connection(caplog: pytest.LogCaptureFixture) -> None:
    backend = RecordingBackend()
    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False)) as h:
        host, port = h.url.removeprefix("http://").split(":")
        with caplog.at_level(logging.DEBUG, logger="load_balancer"):
            for sent in range(1, 4):
                _, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"POST /x HTTP/1.1\r\nHost: lb\r\nContent-Length: 100000\r\n\r\nhello")
                await writer.drain()
                async with asyncio.timeout(5):
                    while len(backend.heads) < sent:
                        await asyncio.sleep(0.01)
                writer.transport.abort()
            async with asyncio.timeout(5):
                while backend.open:
                    await asyncio.sleep(0.01)
            assert all(b.active == 0 for b in h.lb.pool.backends)
    mine = [r for r in caplog.records if r.name in ("load_balancer", "lb_upstream")]
    assert not [r for r in mine if r.levelno >= logging.WARNING or "unhandled" in r.getMessage()]


# --------------------------------------------------------------------------- issue 16: framings on reused connections


def chunked_reply(body: bytes, piece: int) -> bytes:
    chunks = b"".join(
        b"%x\r\n%b\r\n" % (len(body[i : i + piece]), body[i : i + piece]) for i in range(0, len(body), piece)
    )
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


STREAMED = {size: bytes(48 + i % 10 for i in range(size)) for size in (50, 300, 5000)}


async def keep_alive_streamer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive backend like Node or a streaming framework: ``/stream/N`` chunked, ``/small`` sized."""
    try:
        while True:
            target = (await read_head(reader)).split(b" ")[1]
            if target.startswith(b"/stream/"):
                writer.write(chunked_reply(STREAMED[int(target.rsplit(b"/", 1)[1])], 1000))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@async_test
async def test_chunked_responses_after_chunked_and_sized_ones_on_one_reused_connection() -> None:
    """The three reports of issue 16, in order, on one pooled backend connection."""
    sequence = [
        ("/stream/300", STREAMED[300]),
        ("/stream/300", STREAMED[300]),  # chunked after chunked: was 200 with an empty body
        ("/small", b"small"),
        ("/stream/50", STREAMED[50]),  # chunked after a small sized one: was framing bytes, then a hang
        ("/small", b"small"),
        ("/stream/5000", STREAMED[5000]),  # was cut mid-body: missing CRLF after chunk data
        ("/stream/5000", STREAMED[5000]),
    ]
    async with (
        raw_backend(keep_alive_streamer) as url,
        running_lb(make_config([url], checks=False, read_timeout=5.0)) as h,
    ):
        for path, expected in sequence:
            status, _, body = await h.get(path)
            assert (status, body) == (200, expected), path
        assert h.backend(url).failures == 0
        idle = h.lb.upstream._idle[url]
        assert len(idle) == 1 and idle[0].exchanges == len(sequence)  # every answer came over one connection


@async_test
async def test_mock_backend_stream_route_is_relayed_whole(backends: list[str]) -> None:
    """The mock backends' chunked route (no Content-Length) through the balancer, small and streamed."""
    async with running_lb(make_config(backends[:1], checks=False, buffer_bytes=1000)) as h:
        for size in (0, 999, 5000, 300_000, 5000):
            status, headers, body = await h.get(f"/stream?n={size}&chunk=777")
            assert status == 200 and "Content-Length" not in headers
            assert body == bytes(48 + i % 10 for i in range(size))


@async_test
async def test_backend_closing_an_idle_keep_alive_connection_is_not_a_failure() -> None:
    """The backend's keep-alive timeout races the next request: resent once on a new connection."""
    connections = 0

    async def one_answer_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # says keep-alive, then hangs up
        await writer.drain()
        await reader.read(1)  # the next request (or EOF) arrives: hang up without answering it
        writer.close()

    async with raw_backend(one_answer_per_connection) as url, running_lb(make_config([url], checks=False)) as h:
        for _ in range(5):
            status, _, body = await h.get("/")
            assert (status, body) == (200, b"ok")
        backend = h.backend(url)
    assert backend.failures == 0 and backend.consecutive_failures == 0
    assert connections >= 5


def test_trusted_proxies_comes_from_the_environment_like_the_api(tmp_path: Path) -> None:
    path = tmp_path / "lb.json"
    path.write_text(json.dumps({"trusted_proxies": 2}))
    args = parse_args(["--config", str(path)])
    assert load_config(args, {}).trusted_proxies == 2  # the config-file key still works
    assert load_config(args, {"TRUSTED_PROXIES": "1"}).trusted_proxies == 1  # the environment wins
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
        load_config(parse_args([]), {"TRUSTED_PROXIES": "-1"})
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_config(parse_args([]), {"TRUSTED_PROXIES": "many"})


@async_test
async def test_trusted_proxies_env_picks_the_client_from_x_forwarded_for(backends: list[str]) -> None:
    config = load_config(parse_args(["--backends", backends[0]]), {"TRUSTED_PROXIES": "1"})
    config.health_check.enabled = False
    async with running_lb(config) as h:
        app_request = make_mocked_request("GET", "/", headers={"X-Forwarded-For": "203.0.113.9, 198.51.100.7"})
        assert h.lb.client_ip(app_request) == "198.51.100.7"


# --------------------------------------------------------------------------- issue 11 items 10-12


async def post_strategy(h: Harness, **kwargs: Any) -> tuple[int, Any]:
    async with h.client.post(h.url + "/change_strategy", **kwargs) as resp:
        return resp.status, await resp.json()


@async_test
async def test_change_strategy_takes_json_only(backends: list[str]) -> None:
    """A cross-site HTML form (text/plain, urlencoded) cannot switch the strategy."""
    async with running_lb(make_config(backends, checks=False)) as h:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            status, error = await post_strategy(
                h, data=b'{"strategy": "least_connections"}', headers={"Content-Type": content_type}
            )
            assert (status, error["error"]) == (415, "unsupported_media_type"), content_type
        assert h.lb.strategy.name == "round_robin"


@async_test
async def test_change_strategy_requires_the_admin_token_when_set(backends: list[str]) -> None:
    config = load_config(parse_args(["--backends", backends[0]]), {"LB_ADMIN_TOKEN": "s3cret-token"})
    config.health_check.enabled = False
    async with running_lb(config) as h:
        body = {"strategy": "least_connections"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
            status, error = await post_strategy(h, json=body, headers=headers)
            assert (status, error["error"]) == (401, "unauthorized"), headers
        assert h.lb.strategy.name == "round_robin"
        status, answer = await post_strategy(h, json=body, headers={"Authorization": "Bearer s3cret-token"})
        assert (status, answer) == (200, {"strategy": "least_connections"})


class PeerTransport:
    """Just enough of a transport for ``request.remote``: the socket peer's address."""

    def __init__(self, peer: str) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 40000) if name == "peername" else default


@pytest.mark.parametrize("peer", ["203.0.113.7", "192.0.2.2", "::ffff:8.8.8.8", "2001:db8::1"])
def test_without_a_token_only_loopback_callers_may_change_the_balancer(peer: str) -> None:
    from load_balancer import Forbidden, require_admin

    lb = Balancer(make_config(["http://127.0.0.1:9"], checks=False))
    for local in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        require_admin(make_mocked_request("POST", "/change_strategy", transport=PeerTransport(local)), lb)
    remote = make_mocked_request(
        "POST", "/change_strategy", headers={"X-Forwarded-For": "127.0.0.1"}, transport=PeerTransport(peer)
    )
    with pytest.raises(Forbidden):  # X-Forwarded-For claiming loopback changes nothing
        require_admin(remote, lb)


@async_test
async def test_mock_backend_admin_routes_are_not_reachable_through_the_balancer(backends: list[str]) -> None:
    async with running_lb(make_config(backends[:1], checks=False)) as h:
        for path, body in (("/admin/health", {"healthy": False}), ("/admin/delay", {"delay_ms": 5000})):
            async with h.client.post(h.url + path, json=body) as resp:
                assert resp.status == 403 and (await resp.json())["error"] == "forbidden", path
    assert requests.get(backends[0] + "/health", timeout=5).status_code == 200  # still healthy
    assert requests.post(backends[0] + "/admin/delay", json={"delay_ms": 0}, timeout=5).status_code == 200  # direct


def test_mock_backend_admin_routes_through_a_proxy_take_lb_admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    import mock_backends

    monkeypatch.setenv("LB_ADMIN_TOKEN", "tok-123")
    client = mock_backends.create_app("backend-1", 5001).test_client()
    proxied = {"X-Forwarded-For": "198.51.100.1"}
    assert client.post("/admin/health", json={"healthy": False}, headers=proxied).status_code == 403
    wrong = {**proxied, "Authorization": "Bearer nope"}
    assert client.post("/admin/health", json={"healthy": False}, headers=wrong).status_code == 403
    right = {**proxied, "Authorization": "Bearer tok-123"}
    assert client.post("/admin/health", json={"healthy": False}, headers=right).status_code == 200
    assert client.get("/health").status_code == 503


@async_test
@pytest.mark.parametrize(
    "target", [b"http://169.254.169.254/latest/meta-data?x=1", b"HTTP://169.254.169.254:80/latest/meta-data?x=1"]
)
async def test_absolute_form_target_reaches_the_backend_in_origin_form_only(target: bytes) -> None:
    backend = RecordingBackend()
    request = b"GET %b HTTP/1.1\r\nHost: lb.example\r\nConnection: close\r\n\r\n" % target
    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False)) as h:
        answer = await raw_exchange(h.url, request)
    assert answer.startswith(b"HTTP/1.1 200")
    assert backend.request_lines == [b"GET /latest/meta-data?x=1 HTTP/1.1"]
    assert b"169.254.169.254" not in backend.heads[0]
    assert b"x-forwarded-host: lb.example" in backend.heads[0].lower()


async def trickle(port: int, opened: asyncio.Event, count: list[int]) -> bool:
    """A slowloris client: a request head one header line at a time, never finished. True if the balancer hung up."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    count[0] += 1
    if count[0] >= 300:
        opened.set()
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: lb\r\n")
        for i in range(600):  # up to a minute of trickling, far beyond the head timeout
            writer.write(b"X-Slow-%d: 1\r\n" % i)
            await writer.drain()
            try:
                async with asyncio.timeout(0.1):
                    if await reader.read(1) == b"":
                        return True
            except TimeoutError:
                continue
        return False
    except ConnectionError:
        return True
    finally:
        writer.close()


@async_test
async def test_trickling_connections_are_capped_and_timed_out_and_a_normal_request_is_served(
    backends: list[str],
) -> None:
    config = make_config(backends[:1], checks=False, max_connections=100, request_head_timeout=1.0)
    async with running_lb(config) as h:
        port = int(h.url.rsplit(":", 1)[1])
        opened, count = asyncio.Event(), [0]
        attack = [asyncio.create_task(trickle(port, opened, count)) for _ in range(300)]
        async with asyncio.timeout(20):
            await opened.wait()
        guard = h.lb.guard
        assert len(guard.open) <= 100  # the cap held
        async with asyncio.timeout(5):  # served while the attack goes on, well before the head timeout
            status, _, body = await h.get("/")
        assert status == 200 and body["server"] == "backend-1"
        async with asyncio.timeout(30):
            hung_up = await asyncio.gather(*attack)
        assert all(hung_up)  # every trickler was evicted or timed out, none kept a slot
        stats = (await h.get("/stats"))[2]["connections"]
    assert stats["evicted"] >= 1 and stats["head_timeouts"] >= 1
    assert stats["evicted"] + stats["head_timeouts"] >= 200  # at most 100 were open at a time
    assert stats["max"] == 100


def test_send_timeout_comes_from_the_file_or_the_environment_and_must_be_positive(tmp_path: Path) -> None:
    path = tmp_path / "lb.json"
    path.write_text(json.dumps({"send_timeout": 15}))
    assert load_config(parse_args([]), {}).send_timeout == 60.0
    assert load_config(parse_args(["--config", str(path)]), {}).send_timeout == 15.0
    assert load_config(parse_args([]), {"LB_SEND_TIMEOUT": "2.5"}).send_timeout == 2.5
    with pytest.raises(ConfigError, match="send_timeout must be > 0"):
        load_config(parse_args([]), {"LB_SEND_TIMEOUT": "0"})
