"""Async HTTP load balancer: strategies, health checks, retries, streaming proxy and a response cache.

``build_app(config)`` returns an aiohttp application that fronts ``config.backends``. Admin
routes (``/stats``, ``/dashboard``, ``/change_strategy``, ``/lb/...``) win over the proxy
catch-all. Every error it produces itself is ``{"error": code, "message": text}``.
Clients are served by ``lb_server``: proxied requests on a lean llhttp protocol that calls
``reply_to``/``route`` here, everything else (the admin routes included) by this aiohttp app.
Proxied requests travel over the balancer's own keep-alive HTTP/1.1 connection pool
(``lb_upstream.UpstreamPool``); the aiohttp ``ClientSession`` serves the active health checks.
Run it with ``python load_balancer.py`` (see ``--help``); configuration (``lb_config``) comes
from a JSON file, the environment (``LB_*``) and flags, in increasing precedence. The dashboard
page and script are ``templates/lb_dashboard.html`` and ``static/lb_dashboard.js``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import random
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web
from multidict import CIMultiDict

import log_redaction
from geo_router import GeoRouter
from lb_config import (  # the configuration names stay importable from here, as before the split
    STRATEGY_NAMES,
    BackendSpec,
    CacheConfig,
    ConfigError,
    EjectionConfig,
    HealthCheckConfig,  # noqa: F401 - re-exported for callers of the pre-split module
    LBConfig,
    load_config,
)
from lb_gateway import Admission, ForwardAuth
from lb_server import (  # GuardedRunner and the guard stay importable from here, as before the split
    FRONT_END,
    ClientRequest,
    ConnectionGuard,
    FrontEnd,
    GuardedHandler,
    GuardedRunner,
)
from lb_upstream import UpstreamConnection, UpstreamError, UpstreamPool, UpstreamResponse

log = logging.getLogger(__name__)

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
STREAM_CHUNK = 64 * 1024
# Requests carrying credentials are never answered from (or stored in) the shared cache; an API
# key counts as a credential even though HTTP caches do not know the header.
PRIVATE_REQUEST_HEADERS = ("Authorization", "Cookie", "X-API-Key")
BODY_FRAMING = frozenset({"content-length", "transfer-encoding"})  # never removable via Connection tokens


# --------------------------------------------------------------------------- errors


class LBError(Exception):
    """Root of the balancer's own errors; the middleware turns one into a JSON response."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class BadRequest(LBError):
    """The client sent something the balancer cannot act on."""

    status, code = 400, "bad_request"


class ClientGone(LBError):
    """The client disconnected before the balancer could answer; nobody will read the reply."""

    status, code = 499, "client_closed_request"


class Unauthorized(LBError):
    """An admin route needs ``Authorization: Bearer <LB_ADMIN_TOKEN>``."""

    status, code = 401, "unauthorized"


class Forbidden(LBError):
    """Without LB_ADMIN_TOKEN, admin routes answer loopback clients only."""

    status, code = 403, "forbidden"


class UnsupportedMediaType(LBError):
    """JSON only, so no cross-site HTML form can post an admin change."""

    status, code = 415, "unsupported_media_type"


class NoHealthyBackends(LBError):
    """Every backend is down or ejected."""

    status, code = 503, "no_healthy_backends"


class BadGateway(LBError):
    """A backend failed and the request could not be retried elsewhere."""

    status, code = 502, "bad_gateway"


def error_response(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


# --------------------------------------------------------------------------- backends


@dataclass(eq=False)
class Backend:
    """Runtime state of one upstream: health, load, latency and failure history."""

    url: str
    weight: int = 1
    datacenter: str | None = None
    healthy: bool = True
    active: int = 0
    total_requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    last_ejected_at: float = -math.inf
    check_successes: int = 0
    check_failures: int = 0
    latency_sum_ms: float = 0.0
    latency_count: int = 0
    ewma_ms: float = 0.0
    ewma_stamp: float = 0.0
    host: str = field(init=False)
    port: int = field(init=False)
    tls: bool = field(init=False)
    netloc: str = field(init=False)
    prefix: str = field(init=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.netloc = parts.netloc
        self.prefix = parts.path.rstrip("/")  # a backend URL may mount the service under a path

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def observe_latency(self, rtt_ms: float, now: float, decay_seconds: float) -> None:
        """Record a response time: running mean for /stats, peak EWMA for ``adaptive``."""
        self.latency_sum_ms += rtt_ms
        self.latency_count += 1
        if rtt_ms > self.ewma_ms:
            self.ewma_ms = rtt_ms  # peak-sensitive: a slowdown counts at once, recovery is smoothed
        else:
            w = self._weight(now, decay_seconds)
            self.ewma_ms = self.ewma_ms * w + rtt_ms * (1 - w)
        self.ewma_stamp = now

    def decayed_ewma(self, now: float, decay_seconds: float) -> float:
        """Peak EWMA drifts down while unobserved, so a once-slow backend is tried again."""
        return self.ewma_ms * self._weight(now, decay_seconds)

    def _weight(self, now: float, decay_seconds: float) -> float:
        return math.exp(-max(0.0, now - self.ewma_stamp) / decay_seconds)

    def stats(self, now: float) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.available(now),
            "weight": self.weight,
            "active_connections": self.active,
            "total_requests": self.total_requests,
            "failures": self.failures,
            "avg_response_ms": round(self.latency_sum_ms / self.latency_count, 3) if self.latency_count else 0.0,
            "health_check_ok": self.healthy,
            "ejected": now < self.ejected_until,
            "ejected_for_seconds": round(max(0.0, self.ejected_until - now), 3),
            "consecutive_failures": self.consecutive_failures,
            "peak_ewma_ms": round(self.ewma_ms, 3),
            "datacenter": self.datacenter,
        }


class Pool:
    """The backends, their availability, passive ejection and a change signal for waiters."""

    def __init__(self, specs: Sequence[BackendSpec], ejection: EjectionConfig, clock: Callable[[], float]) -> None:
        self.backends = [Backend(s.url, s.weight, s.datacenter) for s in specs]
        self.ejection = ejection
        self.clock = clock
        self._changed = asyncio.Event()

    def candidates(self, exclude: Sequence[Backend] = ()) -> list[Backend]:
        now = self.clock()
        return [b for b in self.backends if b.available(now) and b not in exclude]

    def find(self, url: str) -> Backend | None:
        return next((b for b in self.backends if b.url == url.rstrip("/")), None)

    def record_success(self, backend: Backend) -> None:
        backend.consecutive_failures = 0
        if self.clock() - backend.last_ejected_at > self.ejection.max_seconds:
            backend.ejections = 0

    def record_failure(self, backend: Backend, reason: object) -> None:
        """Count a transport failure; eject after ``max_failures`` in a row, for longer each time."""
        backend.failures += 1
        backend.consecutive_failures += 1
        if backend.consecutive_failures < self.ejection.max_failures:
            return
        now = self.clock()
        backend.ejections += 1
        seconds = min(self.ejection.base_seconds * 2 ** (backend.ejections - 1), self.ejection.max_seconds)
        backend.ejected_until = now + seconds
        backend.last_ejected_at = now
        backend.consecutive_failures = 0
        log.warning("ejecting %s for %.1fs after repeated failures (%s)", backend.url, seconds, reason)
        self.notify()

    def set_healthy(self, backend: Backend, healthy: bool) -> None:
        if backend.healthy == healthy:
            return
        backend.healthy = healthy
        if healthy:
            backend.ejected_until = 0.0  # an active check proved it is back: end any passive ejection
        log.warning("backend %s is now %s", backend.url, "healthy" if healthy else "unhealthy")
        self.notify()

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait (bounded) until ``predicate()`` holds; re-checked on every health change."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._changed.wait()


# --------------------------------------------------------------------------- strategies


@dataclass
class StrategyEnv:
    """What strategies may need besides the candidates: a clock, randomness, geography."""

    clock: Callable[[], float]
    rng: random.Random
    geo: GeoRouter | None
    decay_seconds: float


class Strategy:
    """Picks one backend among the available ``candidates`` (never empty)."""

    name: ClassVar[str]
    needs_client_ip: ClassVar[bool] = False  # computed per request only for strategies that use it

    def __init__(self, env: StrategyEnv) -> None:
        self.env = env

    def choose(self, candidates: Sequence[Backend], client_ip: str) -> Backend:
        raise NotImplementedError


class RoundRobin(Strategy):
    """Each available backend in turn."""

    name = "round_robin"

    def __init__(self, env: StrategyEnv) -> None:
        super().__init__(env)
        self._next = 0

    def choose(self, candidates: Sequence[Backend], client_ip: str) -> Backend:
        backend = candidates[self._next % len(candidates)]
        self._next += 1
        return backend


class LeastConnections(Strategy):
    """Fewest in-flight requests per unit of weight; ties go to the least used."""

    name = "least_connections"

    def choose(self, candidates: Sequence[Backend], client_ip: str) -> Backend:
        return min(candidates, key=lambda b: (b.active / b.weight, b.total_requests / b.weight))


class SmoothWeighted(Strategy):
    """nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a."""

    name = "weighted"

    def __init__(self, env: StrategyEnv) -> None:
        super().__init__(env)
        self._current: dict[str, int] = {}

    def choose(self, candidates: Sequence[Backend], client_ip: str) -> Backend:
        total = 0
        best: Backend | None = None
        for backend in candidates:
            current = self._current.get(backend.url, 0) + backend.weight
            self._current[backend.url] = current
            total += backend.weight
            if best is None or current > self._current[best.url]:
                best = backend
        assert best is not None
        self._current[best.url] -= total
        return best


def hrw_score(client_ip: str, backend: Backend) -> float:
    """Weighted rendezvous score: removing a backend only moves the clients it held."""
    digest = hashlib.blake2b(f"{client_ip}|{backend.url}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
    return -backend.weight / math.log(unit)


class IpHash(Strategy):
    """Rendezvous (highest random weight) hashing of the client address."""

    name = "ip_hash"
    needs_client_ip = True

    def choose(self, candidates: Sequence[Backend], client_ip: str) -> Backend:
        return max(candidates, key=lambda b: hrw_score(client_ip, b))


class Adaptive(Strategy):
    """Power of two choices on peak-EWMA latency times in-flight requests."""

    name = "adaptive"

    def cost(self, backend: Backend, now: float) -> float:
        return (backend.decayed_ewma(now, self.env.decay_seconds) + 1.0) * (backend.active + 1) / backend.weight

    def choose(self, candidates: Sequence[Backend], client_ip: str) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self.env.rng.sample(list(candidates), 2)
        now = self.env.clock()
        return first if self.cost(first, now) <= self.cost(second, now) else second


class Geo(RoundRobin):
    """Nearest healthy datacenter to the client (geo_router), round robin inside it."""

    name = "geo"
    needs_client_ip = True

    def choose(self, candidates: Sequence[Backend], client_ip: str) -> Backend:
        geo = self.env.geo
        placed = {b.datacenter for b in candidates if b.datacenter}
        dc = geo.nearest(client_ip, placed) if geo is not None and placed else None
        local = [b for b in candidates if dc is not None and b.datacenter == dc.name]
        return super().choose(local or candidates, client_ip)


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (RoundRobin, LeastConnections, SmoothWeighted, IpHash, Adaptive, Geo)
}
if tuple(STRATEGIES) != STRATEGY_NAMES:  # lb_config validates names without importing the classes
    raise RuntimeError(f"lb_config.STRATEGY_NAMES {STRATEGY_NAMES} does not match STRATEGIES {tuple(STRATEGIES)}")


# --------------------------------------------------------------------------- cache


@dataclass
class CachedResponse:
    """A stored 200 response with its freshness deadline."""

    status: int
    headers: CIMultiDict[str]
    body: bytes
    backend: str
    stored_at: float
    expires_at: float


def cache_directives(value: str | None) -> dict[str, str]:
    """Parse a Cache-Control header into ``{directive: argument}`` (lower-case names)."""
    directives: dict[str, str] = {}
    for part in (value or "").split(","):
        name, _, arg = part.strip().partition("=")
        if name:
            directives[name.lower()] = arg.strip().strip('"')
    return directives


def combined(headers: CIMultiDict[str] | Any, name: str) -> str:
    """Every line of a list-valued header joined with commas, as HTTP defines repeated fields
    (RFC 9110 5.3): a second ``Cache-Control: private`` line must count as much as the first."""
    values: list[str] = headers.getall(name, [])
    return values[0] if len(values) == 1 else ", ".join(values)


def freshness_seconds(headers: CIMultiDict[str]) -> float | None:
    """How long a shared cache may keep a response, or None when it must not store it."""
    cc = cache_directives(combined(headers, "Cache-Control"))
    if {"no-store", "private", "no-cache"} & cc.keys() or "Set-Cookie" in headers:
        return None
    vary = {token.strip().lower() for token in combined(headers, "Vary").split(",")} - {""}
    if vary - {"accept-encoding"}:  # the key holds Accept-Encoding only; anything else (or *) is not cached
        return None
    for directive in ("s-maxage", "max-age"):
        if directive in cc:
            try:
                seconds = float(cc[directive])
            except ValueError:
                return None
            return seconds if seconds > 0 else None
    return None


class ResponseCache:
    """LRU cache of GET responses bounded by entry count and total body bytes."""

    def __init__(self, config: CacheConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self._entries: OrderedDict[str, CachedResponse] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(request: ClientRequest) -> str:
        return f"{request.headers.get('Host', '')}{origin_target(request)}|{request.headers.get('Accept-Encoding', '')}"

    @staticmethod
    def request_mode(request: ClientRequest) -> str:
        """``bypass`` (never cached), ``refresh`` (fetch, may store) or ``use``."""
        if request.method != "GET" or any(name in request.headers for name in PRIVATE_REQUEST_HEADERS):
            return "bypass"
        cc = cache_directives(combined(request.headers, "Cache-Control"))
        if "no-store" in cc:
            return "bypass"
        if "no-cache" in cc or cc.get("max-age") == "0" or "no-cache" in combined(request.headers, "Pragma"):
            return "refresh"
        return "use"

    def get(self, key: str) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at <= self.clock():
            self._drop(key)
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: str, status: int, headers: CIMultiDict[str], body: bytes, backend: str) -> bool:
        ttl = freshness_seconds(headers)
        if not self.config.enabled or status != 200 or ttl is None or len(body) > self.config.max_entry_bytes:
            return False
        now = self.clock()
        self._drop(key)
        self._entries[key] = CachedResponse(status, headers, body, backend, now, now + ttl)
        self.bytes += len(body)
        while len(self._entries) > self.config.max_entries or self.bytes > self.config.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= len(entry.body)

    def stats(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self._entries), "bytes": self.bytes}


# --------------------------------------------------------------------------- the balancer


class UpstreamFailure(Exception):
    """A backend attempt failed before any byte reached the client."""

    def __init__(self, backend: Backend, cause: BaseException, sent: bool) -> None:
        super().__init__(f"{backend.url}: {type(cause).__name__}: {cause}")
        self.sent = sent


class RequestBody:
    """Streams the client's body upstream once, remembering whether any of it was read."""

    def __init__(self, request: ClientRequest, admission: Admission | None = None) -> None:
        self.request = request
        self.started = False
        self.admission = admission  # gateway mode: the decision that admitted this request

    @property
    def present(self) -> bool:
        return self.request.body_exists

    @property
    def chunked(self) -> bool:
        """Re-frame as chunked when the client did not say how long its body is."""
        return self.present and self.request.content_length is None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body pieces; never more or fewer bytes than the Content-Length sent upstream."""
        self.started = True
        expected = self.request.content_length
        seen = 0
        async for chunk in self.request.content.iter_chunked(STREAM_CHUNK):
            seen += len(chunk)
            if expected is not None and seen > expected:
                raise BadRequest(f"request body is longer than its Content-Length ({expected})")
            yield chunk
        if expected is not None and seen != expected:
            raise ClientGone(f"request body ended after {seen} of {expected} bytes")


class Balancer:
    """Per-app state: config, pool, current strategy, cache, HTTP session and counters."""

    def __init__(
        self, config: LBConfig, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.clock = clock
        self.pool = Pool(config.backends, config.ejection, clock)
        self.cache = ResponseCache(config.cache, clock)
        self.geo: GeoRouter | None = None
        if config.datacenters:
            self.geo = GeoRouter(config.datacenters, config.default_datacenter, config.geoip_db_path)
        self.env = StrategyEnv(clock, rng or random.Random(), self.geo, config.adaptive_decay_seconds)
        self.strategy: Strategy = STRATEGIES[config.strategy](self.env)
        self.session: ClientSession | None = None
        self.upstream = UpstreamPool(config.connect_timeout, config.buffer_bytes)
        self.guard = ConnectionGuard(config.max_connections, config.request_head_timeout, config.keepalive_timeout,
                                     config.send_timeout)
        self.forward_auth: ForwardAuth | None = None
        if config.forward_auth_url:
            self.forward_auth = ForwardAuth(
                config.forward_auth_url, config.forward_auth_timeout, config.forward_auth_fail == "open"
            )
        self.total_requests = 0
        self.started_at = time.time()

    def set_strategy(self, name: str) -> None:
        if name != self.strategy.name:
            self.strategy = STRATEGIES[name](self.env)
            log.info("strategy changed to %s", name)

    def client_ip(self, request: ClientRequest) -> str:
        """The socket peer, or the X-Forwarded-For entry ``trusted_proxies`` hops back."""
        hops = self.config.trusted_proxies
        forwarded = [p.strip() for p in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",") if p.strip()]
        if hops and len(forwarded) >= hops:
            return forwarded[-hops]
        return request.remote or ""

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        data = {
            "strategy": self.strategy.name,
            "strategies": list(STRATEGIES),
            "total_requests": self.total_requests,
            "backends": [b.stats(now) for b in self.pool.backends],
            "cache": self.cache.stats(),
            "healthy_backends": len(self.pool.candidates()),
            "connections": self.guard.stats(),
            "forward_auth": (
                self.forward_auth.stats()
                if self.forward_auth is not None
                else {"url": None, "admitted": 0, "refused": 0, "errors": 0}
            ),
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }
        if self.geo is not None:
            data["geo"] = self.geo.stats()
        return data


BALANCER = web.AppKey("balancer", Balancer)


def check_framing(request: ClientRequest) -> None:
    """Refuse a body whose length is ambiguous (aiohttp's parser already does; this is a second line)."""
    headers = request.headers
    if "Content-Length" in headers and ("Transfer-Encoding" in headers or len(headers.getall("Content-Length")) > 1):
        raise BadRequest("conflicting Content-Length / Transfer-Encoding headers")


def request_head(
    request: ClientRequest, backend: Backend, chunked: bool, identity: Sequence[tuple[str, str]] = ()
) -> bytes:
    """The upstream request line and headers: hop-by-hop and framing ones dropped, X-Forwarded-* added.

    The body framing is always written here (Content-Length of what will be sent, or chunked), never
    copied from the client, so nothing the client puts in ``Connection`` can leave a body unframed.
    """
    previous = ", ".join(request.headers.getall("X-Forwarded-For", ()))
    peer = request.remote or "unknown"
    lines = [f"{request.method} {backend.prefix}{origin_target(request)} HTTP/1.1", f"Host: {backend.netloc}"]
    lines += [
        f"{k}: {v}"
        for k, v in filter_headers(request.headers.items(), request.headers.get("Connection"))
        if not k.lower().startswith("x-auth-")  # identity headers come from the gateway decision only
    ]
    lines += [f"{k}: {v}" for k, v in identity]
    lines.append(f"X-Forwarded-For: {previous}, {peer}" if previous else f"X-Forwarded-For: {peer}")
    lines.append(f"X-Forwarded-Proto: {request.scheme}")
    if "Host" in request.headers:  # never request.host: for an absolute-form target that is the URL's authority
        lines.append(f"X-Forwarded-Host: {request.headers['Host']}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif request.content_length is not None:
        lines.append(f"Content-Length: {request.content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


def origin_target(request: ClientRequest) -> str:
    """The request target as a path and query (origin-form).

    An absolute-form target (``GET http://169.254.169.254/x HTTP/1.1``) is what a forward proxy
    gets; this reverse proxy keeps only its path and query, so a backend never sees an authority
    the client chose (aiohttp's router has already refused targets with no path, and ``*``).
    """
    target = request.raw_path
    if target.startswith("/"):
        return target
    origin = request.rel_url.raw_path_qs
    if not origin.startswith("/"):
        raise BadRequest("the request target must be a path or an absolute URL with a path")
    return origin


REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
RESPONSE_DROP = HOP_BY_HOP | {"content-length"}  # aiohttp frames the body it sends


def filter_headers(
    items: Iterable[tuple[str, str]], connection: str | None, drop: frozenset[str] = REQUEST_DROP
) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers, those named in Connection (framing ones excepted), and those the proxy sets."""
    if connection:
        drop = drop | ({t.strip().lower() for t in connection.split(",")} - BODY_FRAMING)
    return [(k, v) for k, v in items if k.lower() not in drop]


def response_headers(upstream: UpstreamResponse, backend: Backend) -> CIMultiDict[str]:
    headers = CIMultiDict(filter_headers(upstream.headers, upstream.connection, RESPONSE_DROP))
    headers["X-Backend"] = backend.url
    return headers


class Relay:
    """A backend's answer to pass on: whole (``body``, its connection already back in the pool) or
    still to stream from ``conn``, which ``finished``/``failed``/``abandoned`` then releases or closes."""

    __slots__ = ("lb", "backend", "upstream", "headers", "body", "conn")

    def __init__(
        self, lb: Balancer, backend: Backend, upstream: UpstreamResponse, headers: CIMultiDict[str],
        conn: UpstreamConnection | None,
    ) -> None:  # fmt: skip
        self.lb = lb
        self.backend = backend
        self.upstream = upstream
        self.headers = headers
        self.body = upstream.body if conn is None else None
        self.conn = conn

    @property
    def status(self) -> int:
        return self.upstream.status

    @property
    def reason(self) -> str:
        return self.upstream.reason

    @property
    def content_length(self) -> int | None:
        return self.upstream.content_length

    def pieces(self) -> AsyncIterator[bytes]:
        return self.upstream.chunks(self.lb.config.read_timeout)

    def finished(self) -> None:
        """The whole body reached the client: the connection may carry another request."""
        if self.conn is not None:
            self.lb.upstream.release(self.backend, self.conn)
            self.conn = None

    def failed(self, exc: Exception) -> None:
        """The backend failed mid-body: count it against the backend and drop its connection."""
        self.lb.pool.record_failure(self.backend, exc)
        log.warning("upstream %s failed mid-stream (%s); closing the client connection", self.backend.url, exc)
        self.abandoned()

    def abandoned(self) -> None:
        """The client went away: a half-read response can never go back into the pool."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None


async def proxy(request: web.Request) -> web.StreamResponse:
    """The aiohttp route behind the admin routes: forward and answer through aiohttp's response objects."""
    reply = await route(request.app[BALANCER], request)
    if isinstance(reply, web.Response):
        return reply
    if reply.body is not None and request.method != "HEAD":
        return web.Response(status=reply.status, reason=reply.reason, headers=reply.headers, body=reply.body)
    return await stream(request, reply)


async def reply_to(lb: Balancer, request: ClientRequest) -> web.Response | Relay:
    """The lean path's entry (``FrontEnd.serve``): ``route``, with errors answered as the middleware does."""
    try:
        return await route(lb, request)
    except Exception as exc:
        return error_reply(exc, request)


async def route(lb: Balancer, request: ClientRequest) -> web.Response | Relay:
    """Forward to a chosen backend, retrying elsewhere while that is still safe."""
    lb.total_requests += 1
    check_framing(request)
    admission: Admission | None = None
    if lb.forward_auth is not None:
        assert lb.session is not None
        outcome = await lb.forward_auth.decide(lb.session, request, lb.client_ip(request), origin_target(request))
        if isinstance(outcome, web.Response):
            return outcome  # refused (as the decision endpoint said) or the decision service is unreachable
        admission = outcome
    cache_mode = lb.cache.request_mode(request) if lb.config.cache.enabled else "bypass"
    cache_key = lb.cache.key(request) if cache_mode != "bypass" else None
    if cache_mode == "use" and cache_key is not None:
        entry = lb.cache.get(cache_key)
        if entry is not None:
            response = cached_response(entry, lb.clock())
            add_rate_headers(admission, response.headers)  # type: ignore[arg-type]
            return response
    body = RequestBody(request, admission)
    client_ip = lb.client_ip(request) if lb.strategy.needs_client_ip else ""
    tried: list[Backend] = []
    last_error: UpstreamFailure | None = None
    for _ in range(lb.config.retries + 1):
        candidates = lb.pool.candidates(exclude=tried)
        if not candidates:
            break
        backend = lb.strategy.choose(candidates, client_ip)
        tried.append(backend)
        try:
            return await forward(request, lb, backend, body, cache_key)
        except UpstreamFailure as exc:
            last_error = exc
            log.warning("upstream failure: %s", exc)
            if not retryable(request.method, exc, body):
                break
    if last_error is None:
        raise NoHealthyBackends("no healthy backend is available to serve this request")
    raise BadGateway(f"the backend failed and the request could not be retried ({last_error})")


def retryable(method: str, failure: UpstreamFailure, body: RequestBody) -> bool:
    """Retry what was never sent, and idempotent requests whose body was not consumed."""
    return not failure.sent or (method in IDEMPOTENT_METHODS and not body.started)


async def forward(
    request: ClientRequest, lb: Balancer, backend: Backend, body: RequestBody, cache_key: str | None
) -> Relay:
    """One attempt against ``backend``; raises UpstreamFailure if nothing was sent to the client."""
    backend.active += 1
    backend.total_requests += 1
    started = lb.clock()
    conn: UpstreamConnection | None = None  # owned here until released or handed to the Relay
    try:
        try:
            try:
                conn, upstream = await exchange(request, lb, backend, body, fresh=False)
            except UpstreamError as exc:
                # The backend closed a pooled connection just as the request left (its keep-alive
                # timeout): nothing was answered, so a request that may be resent goes on a new one.
                if not (exc.stale and request.method in IDEMPOTENT_METHODS and not body.started):
                    raise
                log.debug("stale keep-alive connection to %s; resending on a new one", backend.url)
                conn, upstream = await exchange(request, lb, backend, body, fresh=True)
        except UpstreamError as exc:
            raise failed(lb, backend, exc) from exc
        except ConnectionError as exc:  # only reading the client's body raises this: the client is gone
            log.info("client went away while sending its body for %s: %s", backend.url, exc)
            raise ClientGone(f"client disconnected while sending its body ({exc})") from None
        now = lb.clock()
        backend.observe_latency((now - started) * 1000, now, lb.config.adaptive_decay_seconds)
        if upstream.status >= 500:
            backend.failures += 1
        else:
            lb.pool.record_success(backend)
        headers = response_headers(upstream, backend)
        add_rate_headers(body.admission, headers)
        if upstream.body is None:
            relay, conn = Relay(lb, backend, upstream, headers, conn), None  # the relay releases or closes it
            return relay
        if cache_key is not None and request.method != "HEAD":
            headers["X-Cache"] = "MISS"
            lb.cache.put(cache_key, upstream.status, headers, upstream.body, backend.url)
        lb.upstream.release(backend, conn)
        conn = None
        return Relay(lb, backend, upstream, headers, None)
    except BaseException:
        if conn is not None:  # never leave a half-used connection open (or, worse, in the pool)
            conn.close()
        raise
    finally:
        backend.active -= 1


async def exchange(
    request: ClientRequest, lb: Balancer, backend: Backend, body: RequestBody, fresh: bool
) -> tuple[UpstreamConnection, UpstreamResponse]:
    """Send the request on a pooled (or ``fresh``) connection and wait for the response head."""
    conn = await lb.upstream.acquire(backend, fresh)
    try:
        identity = body.admission.identity if body.admission is not None else ()
        conn.start(request_head(request, backend, body.chunked, identity), request.method == "HEAD")
        if body.present:
            await conn.send_body(body.chunks(), body.chunked)
        return conn, await conn.response(lb.config.read_timeout)
    except BaseException:
        conn.close()
        raise


def failed(lb: Balancer, backend: Backend, exc: UpstreamError) -> UpstreamFailure:
    lb.pool.record_failure(backend, exc)
    backend.observe_latency(lb.config.read_timeout * 1000, lb.clock(), lb.config.adaptive_decay_seconds)
    return UpstreamFailure(backend, exc, exc.sent)


async def stream(request: web.Request, relay: Relay) -> web.StreamResponse:
    """Relay a large or unsized body piece by piece; a failure now can only cut the connection."""
    response = web.StreamResponse(status=relay.status, reason=relay.reason, headers=relay.headers)
    if relay.content_length is not None:
        response.content_length = relay.content_length
    try:
        await response.prepare(request)
        async for chunk in relay.pieces():
            await response.write(chunk)
    except UpstreamError as exc:
        relay.failed(exc)
        abort(request)
        return response
    except ConnectionError:
        log.info("client went away while streaming from %s", relay.backend.url)
        relay.abandoned()
        abort(request)
        return response
    except BaseException:
        relay.abandoned()
        raise
    relay.finished()
    await response.write_eof()
    return response


def abort(request: web.Request) -> None:
    """Drop the client connection, so a truncated body can never look complete."""
    if request.transport is not None:
        request.transport.close()


def add_rate_headers(admission: Admission | None, headers: CIMultiDict[str]) -> None:
    """In gateway mode, the decision's rate-limit headers replace any the backend sent."""
    if admission is None or not admission.rate:
        return
    for name, _ in admission.rate:
        headers.popall(name, None)
    headers.extend(admission.rate)


def cached_response(entry: CachedResponse, now: float) -> web.Response:
    headers = CIMultiDict(entry.headers)
    headers["X-Cache"] = "HIT"
    headers["Age"] = str(int(now - entry.stored_at))
    return web.Response(status=entry.status, headers=headers, body=entry.body)


# --------------------------------------------------------------------------- health checks


async def check_backend(lb: Balancer, backend: Backend) -> None:
    """One active probe; ``rise`` successes or ``fall`` failures in a row flip the state."""
    assert lb.session is not None
    hc = lb.config.health_check
    try:
        async with lb.session.get(backend.url + hc.path, timeout=ClientTimeout(total=hc.timeout)) as resp:
            await resp.read()
            ok = 200 <= resp.status < 300
    except (TimeoutError, ClientError):
        ok = False
    if ok:
        backend.check_successes, backend.check_failures = backend.check_successes + 1, 0
        if backend.check_successes >= hc.rise:
            lb.pool.set_healthy(backend, True)
    else:
        backend.check_failures, backend.check_successes = backend.check_failures + 1, 0
        if backend.check_failures >= hc.fall:
            lb.pool.set_healthy(backend, False)


async def health_loop(lb: Balancer) -> None:
    interval = lb.config.health_check.interval
    while True:
        await asyncio.gather(*(check_backend(lb, b) for b in lb.pool.backends))
        await asyncio.sleep(interval)


async def balancer_context(app: web.Application) -> AsyncIterator[None]:
    """Open the keep-alive session (health probes) and the checker; close them and the proxy pool on cleanup."""
    lb = app[BALANCER]
    cfg = lb.config
    connector = TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=300)
    lb.session = ClientSession(
        connector=connector,
        timeout=ClientTimeout(total=None, sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout),
    )
    checker = asyncio.create_task(health_loop(lb)) if cfg.health_check.enabled else None
    try:
        yield
    finally:
        if checker is not None:
            checker.cancel()
            await asyncio.gather(checker, return_exceptions=True)
        await lb.session.close()
        lb.upstream.close()
        if lb.geo is not None:
            lb.geo.close()


# --------------------------------------------------------------------------- admin routes

routes = web.RouteTableDef()


@routes.get("/stats")
async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[BALANCER].stats())


@routes.get("/lb/health")
async def lb_health(request: web.Request) -> web.Response:
    healthy = len(request.app[BALANCER].pool.candidates())
    return web.json_response({"status": "ok", "healthy_backends": healthy})


def require_admin(request: web.Request, lb: Balancer) -> None:
    """``Authorization: Bearer <LB_ADMIN_TOKEN>`` when a token is set (constant-time compare);
    otherwise the caller must be on this machine (the socket peer, never X-Forwarded-For)."""
    token = lb.config.admin_token
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise Unauthorized("send Authorization: Bearer <LB_ADMIN_TOKEN>")
        return
    if not is_loopback(request.remote):
        raise Forbidden("without LB_ADMIN_TOKEN only clients on this machine may change the balancer")


def is_loopback(address: str | None) -> bool:
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None  # dual-stack sockets
    return (mapped or ip).is_loopback


@routes.post("/change_strategy")
async def change_strategy(request: web.Request) -> web.Response:
    lb = request.app[BALANCER]
    require_admin(request, lb)
    if request.content_type != "application/json":
        raise UnsupportedMediaType("send the body as Content-Type: application/json")
    valid = list(STRATEGIES)
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest(f'body must be JSON {{"strategy": ...}}; valid: {", ".join(valid)}', valid=valid) from None
    name = body.get("strategy") if isinstance(body, dict) else None
    if name not in STRATEGIES:
        raise BadRequest(f"field 'strategy' must be one of: {', '.join(valid)}", valid=valid)
    lb.set_strategy(name)
    return web.json_response({"strategy": lb.strategy.name})


@routes.get("/dashboard")
async def dashboard(request: web.Request) -> web.Response:
    response = web.Response(text=DASHBOARD_HTML, content_type="text/html")
    response.headers["Content-Security-Policy"] = "default-src 'self'; style-src 'self' 'unsafe-inline'"
    return response


@routes.get("/lb/dashboard.js")
async def dashboard_js(request: web.Request) -> web.Response:
    return web.Response(text=DASHBOARD_JS, content_type="application/javascript")


async def method_not_allowed(request: web.Request) -> web.Response:
    raise web.HTTPMethodNotAllowed(request.method, [])


STATUS_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def error_reply(exc: Exception, request: ClientRequest) -> web.Response:
    """The JSON answer for an error raised while serving ``request``; a true bug is logged once (500)."""
    if isinstance(exc, LBError):
        response = error_response(exc.status, exc.code, exc.message, **exc.extra)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="load balancer"'
        return response
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        return error_response(exc.status, STATUS_CODES.get(exc.status, "http_error"), exc.reason)
    log.error("unhandled error on %s %s", request.method, request.raw_path.split("?", 1)[0], exc_info=exc)
    return error_response(500, "internal_error", "the load balancer hit an unexpected error")


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    """Turn domain and HTTP errors into JSON (``error_reply``) on the aiohttp path.

    It also tells the connection's guard when a request head is complete and when the request is
    over (one middleware rather than two: each one is a coroutine frame on every request).
    """
    protocol = request.protocol
    guarded = protocol if isinstance(protocol, GuardedHandler) else None
    if guarded is not None:
        guarded.request_started()
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_reply(exc, request)
    except Exception as exc:
        return error_reply(exc, request)
    finally:
        if guarded is not None:
            guarded.request_finished()


# The balancer's own routes: aiohttp serves them (and any method on them: 405), never the proxy.
OWN_PATHS = frozenset({"/stats", "/change_strategy", "/dashboard", "/lb/health", "/lb/dashboard.js"})


def build_app(
    config: LBConfig, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None
) -> web.Application:
    """Application factory: admin routes first, then the proxy catch-all (serve it with ``GuardedRunner``,
    which answers proxied requests on the lean path and hands the rest to this app)."""
    app = web.Application(middlewares=[error_middleware])
    lb = app[BALANCER] = Balancer(config.validate(), clock, rng)
    app[FRONT_END] = FrontEnd(lb.guard, functools.partial(reply_to, lb), OWN_PATHS)
    app.add_routes(routes)
    for path in sorted(OWN_PATHS):
        app.router.add_route("*", path, method_not_allowed)
    app.router.add_route("*", "/{path:.*}", proxy)
    app.cleanup_ctx.append(balancer_context)
    return app


# --------------------------------------------------------------------------- dashboard

HERE = Path(__file__).resolve().parent
DASHBOARD_HTML = (HERE / "templates" / "lb_dashboard.html").read_text(encoding="utf-8")
DASHBOARD_JS = (HERE / "static" / "lb_dashboard.js").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- entry point


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front so a busy port is one clear error line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"port {port} on {host} is already in use") from None
        raise
    return sock


def event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="aiohttp load balancer in front of HTTP backends.")
    parser.add_argument("--config", help="JSON config file (also LB_CONFIG)")
    parser.add_argument("--host", help="address to listen on [127.0.0.1]")
    parser.add_argument("--port", type=int, help="port to listen on [8080]")
    parser.add_argument("--backends", help="comma list of backend URLs (also LB_BACKENDS)")
    parser.add_argument("--weights", help="comma list of weights matching --backends (also LB_WEIGHTS)")
    parser.add_argument("--strategy", help=f"one of {', '.join(STRATEGIES)} (also LB_STRATEGY)")
    parser.add_argument(
        "--forward-auth",
        dest="forward_auth_url",
        metavar="URL",
        help="gateway mode: ask this decision endpoint (e.g. http://127.0.0.1:5000/forward_auth) before "
        "proxying each request (also LB_FORWARD_AUTH_URL)",
    )
    parser.add_argument(
        "--forward-auth-timeout",
        type=float,
        metavar="SECONDS",
        help="decision time limit [1] (LB_FORWARD_AUTH_TIMEOUT)",
    )
    parser.add_argument(
        "--forward-auth-fail",
        choices=("closed", "open"),
        help="decision service unreachable: closed answers 503, open proxies anyway [closed] (LB_FORWARD_AUTH_FAIL)",
    )
    parser.add_argument("--log-level", default=os.environ.get("LB_LOG_LEVEL", "INFO"), help="logging level [INFO]")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_redaction.install()  # no credential a client sends may reach the balancer's log
    try:
        config = load_config(args, os.environ)
        sock = bind_socket(config.host, config.port)
    except (ConfigError, OSError) as exc:
        print(f"load_balancer: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 1
    log.info(
        "listening on http://%s:%d, strategy %s, backends %s",
        config.host,
        config.port,
        config.strategy,
        ", ".join(b.url for b in config.backends),
    )
    loop = event_loop()
    asyncio.set_event_loop(loop)
    main_task = loop.create_task(serve(build_app(config), sock, config.shutdown_timeout))
    try:
        loop.run_until_complete(main_task)
    except (web.GracefulExit, KeyboardInterrupt):  # SIGTERM / SIGINT: drain, then stop
        main_task.cancel()
        loop.run_until_complete(asyncio.gather(main_task, return_exceptions=True))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return 0


async def serve(app: web.Application, sock: socket.socket, shutdown_timeout: float) -> None:
    """What ``web.run_app`` does, with the guarded runner: serve until a signal, then drain in-flight requests."""
    runner = GuardedRunner(app, handle_signals=True, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
