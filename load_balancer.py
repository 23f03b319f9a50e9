"""Async HTTP load balancer: strategies, health checks, retries, streaming proxy and a response cache.

``build_app(config)`` returns an aiohttp application that fronts ``config.backends``. Admin
routes (``/stats``, ``/dashboard``, ``/change_strategy``, ``/lb/...``) win over the proxy
catch-all. Every error it produces itself is ``{"error": code, "message": text}``.
Proxied requests travel over the balancer's own keep-alive HTTP/1.1 connection pool
(``UpstreamPool``); the aiohttp ``ClientSession`` serves the active health checks.
Run it with ``python load_balancer.py`` (see ``--help``); configuration comes from a JSON file,
the environment (``LB_*``) and flags, in increasing precedence.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import random
import socket
import ssl
import sys
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web
from multidict import CIMultiDict

import log_redaction
from geo_router import Datacenter, GeoRouter

log = logging.getLogger(__name__)

DEFAULT_BACKENDS = ("http://127.0.0.1:5001", "http://127.0.0.1:5002", "http://127.0.0.1:5003")
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
STREAM_HIGH_WATER = 1024 * 1024  # pause reading a backend when this much body waits for a slow client
MAX_HEAD_BYTES = 64 * 1024
FRAMING_HEADERS = frozenset({"connection", "content-length", "transfer-encoding"})
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


class NoHealthyBackends(LBError):
    """Every backend is down or ejected."""

    status, code = 503, "no_healthy_backends"


class BadGateway(LBError):
    """A backend failed and the request could not be retried elsewhere."""

    status, code = 502, "bad_gateway"


class ConfigError(ValueError):
    """The configuration (file, environment or flags) cannot be run."""


def error_response(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": code, "message": message, **extra}, status=status)


# --------------------------------------------------------------------------- configuration


@dataclass
class BackendSpec:
    """One upstream as configured."""

    url: str
    weight: int = 1
    datacenter: str | None = None


@dataclass
class HealthCheckConfig:
    """Active health checks: GET ``path`` every ``interval`` seconds."""

    enabled: bool = True
    path: str = "/health"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 2


@dataclass
class EjectionConfig:
    """Passive ejection: ``max_failures`` consecutive transport failures eject a backend."""

    max_failures: int = 3
    base_seconds: float = 5.0
    max_seconds: float = 300.0


@dataclass
class CacheConfig:
    """Bounds of the shared GET response cache."""

    enabled: bool = True
    max_entries: int = 1024
    max_bytes: int = 64 * 1024 * 1024
    max_entry_bytes: int = 1024 * 1024


@dataclass
class LBConfig:
    """Everything the balancer needs; built by ``load_config`` or directly in tests."""

    backends: list[BackendSpec] = field(default_factory=lambda: [BackendSpec(u) for u in DEFAULT_BACKENDS])
    strategy: str = "round_robin"
    host: str = "127.0.0.1"
    port: int = 8080
    retries: int = 2
    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    buffer_bytes: int = 1024 * 1024
    shutdown_timeout: float = 30.0
    trusted_proxies: int = 0
    adaptive_decay_seconds: float = 10.0
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    ejection: EjectionConfig = field(default_factory=EjectionConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    datacenters: list[Datacenter] = field(default_factory=list)
    default_datacenter: str | None = None
    geoip_db_path: str | None = None

    def validate(self) -> LBConfig:
        if not self.backends:
            raise ConfigError("at least one backend is required")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; valid: {', '.join(STRATEGIES)}")
        for spec in self.backends:
            if not spec.url.startswith(("http://", "https://")):
                raise ConfigError(f"backend URL must start with http:// or https://, got {spec.url!r}")
            if spec.weight < 1:
                raise ConfigError(f"backend weight must be >= 1, got {spec.weight} for {spec.url}")
        names = {dc.name for dc in self.datacenters}
        if self.default_datacenter and self.default_datacenter not in names:
            raise ConfigError(f"default_datacenter {self.default_datacenter!r} is not a configured datacenter")
        return self


def _coerce(value: Any, like: Any, where: str) -> Any:
    """Coerce a JSON/env value to the type of the dataclass default ``like``."""
    try:
        if isinstance(like, bool):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, got {value!r}") from None
    return value


def _fill(obj: Any, values: Mapping[str, Any], where: str) -> None:
    """Set scalar dataclass fields of ``obj`` from ``values``, rejecting unknown keys."""
    known = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown configuration key {where}{key!r}")
        setattr(obj, key, _coerce(value, getattr(obj, key), f"{where}{key}"))


def parse_backend(item: Any) -> BackendSpec:
    if isinstance(item, str):
        return BackendSpec(item.strip().rstrip("/"))
    if isinstance(item, Mapping) and isinstance(item.get("url"), str):
        spec = BackendSpec(item["url"].strip().rstrip("/"))
        _fill(spec, {k: v for k, v in item.items() if k != "url"}, "backends[].")
        return spec
    raise ConfigError(f"a backend must be a URL or {{'url': ..., 'weight': ...}}, got {item!r}")


def parse_datacenters(items: Any) -> tuple[list[Datacenter], dict[str, str]]:
    """Parse ``[{"name", "lat", "lon", "backends": [urls]}]``; return them and url -> datacenter."""
    if not isinstance(items, list):
        raise ConfigError("datacenters must be a list of {name, lat, lon, backends}")
    datacenters, placement = [], {}
    for item in items:
        try:
            urls = tuple(u.rstrip("/") for u in item.get("backends", []))
            dc = Datacenter(str(item["name"]), float(item["lat"]), float(item["lon"]), urls)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(f"datacenter entries need name, lat, lon (and backends), got {item!r}") from None
        datacenters.append(dc)
        placement.update(dict.fromkeys(urls, dc.name))
    return datacenters, placement


def apply_mapping(config: LBConfig, data: Mapping[str, Any]) -> None:
    """Apply a JSON-shaped mapping (the config file format) onto ``config``."""
    data = dict(data)
    if "datacenters" in data and "backends" not in data:
        config.backends = []  # the datacenters list their own backends; don't keep the defaults
    if "backends" in data:
        config.backends = [parse_backend(b) for b in data.pop("backends")]
    if "datacenters" in data:
        config.datacenters, placement = parse_datacenters(data.pop("datacenters"))
        urls = {b.url for b in config.backends}
        config.backends.extend(BackendSpec(u) for u in placement if u not in urls)
        for spec in config.backends:
            spec.datacenter = placement.get(spec.url, spec.datacenter)
    for section in ("health_check", "ejection", "cache"):
        if section in data:
            _fill(getattr(config, section), data.pop(section), f"{section}.")
    for key in ("strategy", "host", "default_datacenter", "geoip_db_path"):
        if key in data:
            setattr(config, key, data.pop(key))
    _fill(config, data, "")


def env_mapping(env: Mapping[str, str]) -> dict[str, Any]:
    """Translate ``LB_*`` variables (and ``GEOIP_DB_PATH``) into the config file format."""
    data: dict[str, Any] = {}
    if env.get("LB_BACKENDS"):
        urls = [u for u in env["LB_BACKENDS"].split(",") if u.strip()]
        weights = [w for w in env.get("LB_WEIGHTS", "").split(",") if w.strip()]
        if weights and len(weights) != len(urls):
            raise ConfigError(f"LB_WEIGHTS has {len(weights)} entries for {len(urls)} LB_BACKENDS")
        data["backends"] = [{"url": u, "weight": w} for u, w in zip(urls, weights or ["1"] * len(urls), strict=True)]
    if env.get("LB_DATACENTERS"):
        try:
            data["datacenters"] = json.loads(env["LB_DATACENTERS"])
        except json.JSONDecodeError as exc:
            raise ConfigError(f"LB_DATACENTERS must be a JSON list: {exc}") from None
    for var, key in (
        ("LB_STRATEGY", "strategy"),
        ("LB_HOST", "host"),
        ("LB_PORT", "port"),
        ("LB_DEFAULT_DATACENTER", "default_datacenter"),
        ("GEOIP_DB_PATH", "geoip_db_path"),
    ):
        if env.get(var):
            data[key] = env[var]
    if env.get("LB_HEALTH_INTERVAL"):
        data["health_check"] = {"interval": env["LB_HEALTH_INTERVAL"]}
    return data


def load_config(args: argparse.Namespace, env: Mapping[str, str]) -> LBConfig:
    """Defaults < JSON file (``--config`` or ``LB_CONFIG``) < environment < flags."""
    config = LBConfig()
    path = args.config or env.get("LB_CONFIG")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        apply_mapping(config, data)
    apply_mapping(config, env_mapping(env))
    flags: dict[str, Any] = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.strategy:
        flags["strategy"] = args.strategy
    if args.backends:
        flags.update(env_mapping({"LB_BACKENDS": args.backends, "LB_WEIGHTS": args.weights or ""}))
    apply_mapping(config, flags)
    return config.validate()


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


def freshness_seconds(headers: Mapping[str, str]) -> float | None:
    """How long a shared cache may keep a response, or None when it must not store it."""
    cc = cache_directives(headers.get("Cache-Control"))
    if {"no-store", "private", "no-cache"} & cc.keys() or "Set-Cookie" in headers:
        return None
    if headers.get("Vary", "").strip().lower() not in ("", "accept-encoding"):
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
    def key(request: web.Request) -> str:
        return f"{request.host}{request.raw_path}|{request.headers.get('Accept-Encoding', '')}"

    @staticmethod
    def request_mode(request: web.Request) -> str:
        """``bypass`` (never cached), ``refresh`` (fetch, may store) or ``use``."""
        if request.method != "GET" or any(name in request.headers for name in PRIVATE_REQUEST_HEADERS):
            return "bypass"
        cc = cache_directives(request.headers.get("Cache-Control"))
        if "no-store" in cc:
            return "bypass"
        if "no-cache" in cc or cc.get("max-age") == "0" or request.headers.get("Pragma") == "no-cache":
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


# --------------------------------------------------------------------------- upstream HTTP/1.1 client


class UpstreamError(Exception):
    """The backend connection failed; ``sent`` is False only when it was never established."""

    def __init__(self, message: str, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class UpstreamResponse:
    """Status, headers and either the whole (small) body or a stream of body pieces."""

    def __init__(self, conn: UpstreamConnection, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        self.conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length: int | None = None
        self.connection: str | None = None
        self.body: bytes | None = None
        self._pieces: deque[bytes] = deque()
        self._queued = 0
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.error: BaseException | None = None

    def feed(self, data: bytes) -> None:
        self._pieces.append(data)
        self._queued += len(data)
        if self._queued > STREAM_HIGH_WATER:
            self.conn.pause_reading()
        self._wake()

    def finish(self, error: BaseException | None = None) -> None:
        self.complete = True
        self.error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def chunks(self, read_timeout: float) -> AsyncIterator[bytes]:
        """Yield body pieces as they arrive; raise UpstreamError if the body is cut short."""
        while True:
            if self._pieces:
                data = self._pieces.popleft()
                self._queued -= len(data)
                if self._queued < STREAM_HIGH_WATER // 2:
                    self.conn.resume_reading()
                yield data
            elif self.complete:
                if self.error is not None:
                    raise UpstreamError(f"body cut short: {self.error}")
                return
            else:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    async with asyncio.timeout(read_timeout):
                        await self._waiter
                except TimeoutError:
                    raise UpstreamError(f"no body data for {read_timeout}s") from None
                finally:
                    self._waiter = None


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a backend, parsing responses as bytes arrive.

    A hand-written client instead of aiohttp's: profiling showed the generic client to be
    most of the proxy's CPU time per request, and the balancer needs only plain HTTP/1.1.
    """

    def __init__(self, buffer_limit: int) -> None:
        self.buffer_limit = buffer_limit
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._buf = bytearray()
        self._head_request = False
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._framing = ""
        self._remaining = 0
        self._keep_alive = False
        self._done = True  # no request in flight: any byte the backend sends now is unsolicited
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._done:  # no request in flight: never let these bytes become the next client's response
            log.debug("closing a backend connection that sent %d unsolicited bytes", len(data))
            self._buf.clear()
            self.close()
            return
        self._buf += data
        try:
            self._process()
        except (ValueError, IndexError) as exc:
            self._fail(UpstreamError(f"malformed response from backend: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._framing == "close" and self._response is not None and not self._done:
            self._finish_body()
        self._fail(UpstreamError(f"connection closed by backend ({exc or 'EOF'})"))
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(UpstreamError("connection lost while sending"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # used by the proxy

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    @property
    def idle_clean(self) -> bool:
        """Open, nothing in flight and nothing buffered: safe to carry a new request."""
        return self._done and not self._buf and self.usable

    def start(self, head: bytes, head_request: bool) -> None:
        """Send the request head and get ready to parse the response."""
        if not self.idle_clean:
            self.close()
            raise UpstreamError("backend connection is not clean to reuse", sent=False)
        self._head_request = head_request
        self._head_waiter = asyncio.get_running_loop().create_future()
        self._response = None
        self._framing = ""
        self._done = False
        self._keep_alive = False
        self.transport.write(head)

    async def send_body(self, chunks: AsyncIterator[bytes], chunked: bool) -> None:
        async for chunk in chunks:
            if not self.usable:
                raise UpstreamError("backend closed the connection while the body was sent")
            if chunk:
                self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)  # type: ignore[union-attr]
            if self._write_paused:
                self._drain_waiter = asyncio.get_running_loop().create_future()
                await self._drain_waiter
        if chunked and self.usable:
            self.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]

    async def response(self, read_timeout: float) -> UpstreamResponse:
        """Wait for the response head (and a small body); a plain timer is cheaper than asyncio.timeout."""
        waiter = self._head_waiter
        assert waiter is not None
        if waiter.done():
            return waiter.result()
        timer = asyncio.get_running_loop().call_later(read_timeout, self._time_out, read_timeout)
        try:
            return await waiter
        finally:
            timer.cancel()

    def _time_out(self, seconds: float) -> None:
        self._fail(UpstreamError(f"no response within {seconds}s"))
        self.close()

    @property
    def reusable(self) -> bool:
        return self._done and self._keep_alive and not self._buf and self.usable

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()  # abandoned mid-request: nobody will await the response any more
        if self.transport is not None:
            self.transport.close()

    # parsing

    def _process(self) -> None:
        if self._response is None and not self._parse_head():
            return
        if self._done:
            return
        if self._framing == "length-buffered":
            self._take_buffered()
        elif self._framing == "length":
            self._take_length()
        elif self._framing == "chunked":
            self._take_chunks()
        elif self._framing == "close" and self._buf:
            self._stream(bytes(self._buf))
            self._buf.clear()

    def _parse_head(self) -> bool:
        """Parse a status line and headers (skipping 1xx); return True once a response has started."""
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD_BYTES:
                    raise ValueError("response head too large")
                return False
            lines = bytes(self._buf[:end]).decode("utf-8", "replace").split("\r\n")
            del self._buf[: end + 4]
            version, _, rest = lines[0].partition(" ")
            code, _, reason = rest.partition(" ")
            status = int(code)
            if 100 <= status < 200:
                continue
            headers = []
            fields = {}  # the few framing headers, lower-cased, read in the same pass
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep or not name or name != name.strip():
                    raise ValueError(f"bad header line {line[:40]!r}")
                value = value.strip()
                headers.append((name, value))
                lower = name.lower()
                if lower in FRAMING_HEADERS:
                    fields[lower] = f"{fields[lower]}, {value}" if lower in fields else value
            self._begin(UpstreamResponse(self, status, reason, headers), version, fields)
            return True

    def _begin(self, response: UpstreamResponse, version: str, fields: dict[str, str]) -> None:
        """Decide how the body is framed and whether to hand over the head now or with the body."""
        self._response = response
        response.connection = fields.get("connection")
        connection = fields.get("connection", "").lower()
        self._keep_alive = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
        length = fields.get("content-length")
        if length is not None:
            if "," in length:  # repeated Content-Length: tolerable only if every value agrees, never kept alive
                values = {v.strip() for v in length.split(",")}
                if len(values) != 1:
                    raise ValueError(f"conflicting Content-Length values {length!r}")
                length = values.pop()
                self._keep_alive = False
            if not (length.isascii() and length.isdigit()):
                raise ValueError(f"invalid Content-Length {length!r}")
            response.content_length = int(length)
        te = fields.get("transfer-encoding")
        if te is not None:  # it overrides Content-Length; having both smells of smuggling, so do not reuse
            response.content_length = None
            if length is not None:
                self._keep_alive = False
        if self._head_request or response.status in (204, 304):
            self._framing = "none"
        elif te is not None:
            if te.rsplit(",", 1)[-1].strip().lower() == "chunked":
                self._framing = "chunked"
            else:  # a final coding other than chunked: the body runs until the backend closes
                self._framing = "close"
                self._keep_alive = False
        elif length is not None:
            self._framing = "length"
            self._remaining = response.content_length
        else:
            self._framing = "close"
            self._keep_alive = False
        if self._framing == "none":
            response.body = b""
            self._finish_body()
        elif self._framing == "length" and self._remaining <= self.buffer_limit:
            self._framing = "length-buffered"
            self._take_buffered()
        else:
            self._deliver_head()

    def _take_buffered(self) -> None:
        if len(self._buf) >= self._remaining:
            assert self._response is not None
            self._response.body = bytes(self._buf[: self._remaining])
            del self._buf[: self._remaining]
            self._finish_body()

    def _take_length(self) -> None:
        if self._buf:
            piece = bytes(self._buf[: self._remaining])
            del self._buf[: len(piece)]
            self._remaining -= len(piece)
            self._stream(piece)
        if self._remaining == 0:
            self._finish_body()

    def _take_chunks(self) -> None:
        """Decode ``Transfer-Encoding: chunked`` as far as the buffer allows."""
        while not self._done:
            if self._remaining > 0:
                if not self._buf:
                    return
                piece = bytes(self._buf[: self._remaining])
                del self._buf[: len(piece)]
                self._remaining -= len(piece)
                self._stream(piece)
                if self._remaining:
                    return
                self._remaining = -2  # expect the CRLF after the data
            line_end = self._buf.find(b"\r\n")
            if line_end < 0:
                return
            line = bytes(self._buf[:line_end])
            del self._buf[: line_end + 2]
            if self._remaining == -2:
                self._remaining = 0
                if line:
                    raise ValueError("missing CRLF after chunk data")
            elif self._remaining == -1:  # trailer section: ends with an empty line
                if not line:
                    self._finish_body()
            else:
                size = int(line.split(b";", 1)[0].strip(), 16)
                self._remaining = size if size else -1

    def _stream(self, piece: bytes) -> None:
        if piece and self._response is not None:
            self._response.feed(piece)

    def _deliver_head(self) -> None:
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_result(self._response)  # type: ignore[arg-type]

    def _finish_body(self) -> None:
        self._done = True
        self._deliver_head()
        if self._response is not None:
            self._response.finish()

    def _fail(self, error: UpstreamError) -> None:
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(error)
        elif self._response is not None and not self._done:
            self._response.finish(error)


class UpstreamPool:
    """Idle keep-alive connections per backend, reused most-recent first."""

    def __init__(
        self, connect_timeout: float, buffer_limit: int, max_idle: int = 256, idle_seconds: float = 30.0
    ) -> None:
        self.connect_timeout = connect_timeout
        self.buffer_limit = buffer_limit
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._idle: dict[str, list[UpstreamConnection]] = {}

    async def acquire(self, backend: Backend) -> UpstreamConnection:
        """An idle connection to ``backend`` or a new one; a failed connect raises ``sent=False``."""
        idle = self._idle.get(backend.url)
        loop = asyncio.get_running_loop()
        while idle:
            conn = idle.pop()
            if conn.idle_clean and loop.time() - conn.idle_since < self.idle_seconds:
                return conn
            conn.close()
        tls = ssl.create_default_context() if backend.tls else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self.buffer_limit), backend.host, backend.port, ssl=tls
                )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(
                f"cannot connect to {backend.netloc}: {exc or type(exc).__name__}", sent=False
            ) from None
        return conn

    def release(self, backend: Backend, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(backend.url, [])
        if conn.reusable and len(idle) < self.max_idle:
            conn.idle_since = asyncio.get_running_loop().time()
            idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


# --------------------------------------------------------------------------- the balancer


class UpstreamFailure(Exception):
    """A backend attempt failed before any byte reached the client."""

    def __init__(self, backend: Backend, cause: BaseException, sent: bool) -> None:
        super().__init__(f"{backend.url}: {type(cause).__name__}: {cause}")
        self.sent = sent


class RequestBody:
    """Streams the client's body upstream once, remembering whether any of it was read."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.started = False

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
            self.geo = GeoRouter(config.datacenters, config.default_datacenter, config.geoip_db_path or "")
        self.env = StrategyEnv(clock, rng or random.Random(), self.geo, config.adaptive_decay_seconds)
        self.strategy: Strategy = STRATEGIES[config.strategy](self.env)
        self.session: ClientSession | None = None
        self.upstream = UpstreamPool(config.connect_timeout, config.buffer_bytes)
        self.total_requests = 0
        self.started_at = time.time()

    def set_strategy(self, name: str) -> None:
        if name != self.strategy.name:
            self.strategy = STRATEGIES[name](self.env)
            log.info("strategy changed to %s", name)

    def client_ip(self, request: web.Request) -> str:
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
            "uptime_seconds": round(time.time() - self.started_at, 3),
        }
        if self.geo is not None:
            data["geo"] = self.geo.stats()
        return data


BALANCER = web.AppKey("balancer", Balancer)


def check_framing(request: web.Request) -> None:
    """Refuse a body whose length is ambiguous (aiohttp's parser already does; this is a second line)."""
    headers = request.headers
    if "Content-Length" in headers and ("Transfer-Encoding" in headers or len(headers.getall("Content-Length")) > 1):
        raise BadRequest("conflicting Content-Length / Transfer-Encoding headers")


def request_head(request: web.Request, backend: Backend, chunked: bool) -> bytes:
    """The upstream request line and headers: hop-by-hop and framing ones dropped, X-Forwarded-* added.

    The body framing is always written here (Content-Length of what will be sent, or chunked), never
    copied from the client, so nothing the client puts in ``Connection`` can leave a body unframed.
    """
    previous = ", ".join(request.headers.getall("X-Forwarded-For", ()))
    peer = request.remote or "unknown"
    lines = [f"{request.method} {backend.prefix}{request.raw_path} HTTP/1.1", f"Host: {backend.netloc}"]
    lines += [f"{k}: {v}" for k, v in filter_headers(request.headers.items(), request.headers.get("Connection"))]
    lines.append(f"X-Forwarded-For: {previous}, {peer}" if previous else f"X-Forwarded-For: {peer}")
    lines.append(f"X-Forwarded-Proto: {request.scheme}")
    lines.append(f"X-Forwarded-Host: {request.host}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif request.content_length is not None:
        lines.append(f"Content-Length: {request.content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


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


async def proxy(request: web.Request) -> web.StreamResponse:
    """Forward to a chosen backend, retrying elsewhere while that is still safe."""
    lb = request.app[BALANCER]
    lb.total_requests += 1
    check_framing(request)
    cache_mode = lb.cache.request_mode(request) if lb.config.cache.enabled else "bypass"
    cache_key = lb.cache.key(request) if cache_mode != "bypass" else None
    if cache_mode == "use" and cache_key is not None:
        entry = lb.cache.get(cache_key)
        if entry is not None:
            return cached_response(entry, lb.clock())
    body = RequestBody(request)
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
    request: web.Request, lb: Balancer, backend: Backend, body: RequestBody, cache_key: str | None
) -> web.StreamResponse:
    """One attempt against ``backend``; raises UpstreamFailure if nothing was sent to the client."""
    backend.active += 1
    backend.total_requests += 1
    started = lb.clock()
    conn: UpstreamConnection | None = None  # owned here until released or handed to stream()
    try:
        try:
            conn = await lb.upstream.acquire(backend)
            conn.start(request_head(request, backend, body.chunked), request.method == "HEAD")
            if body.present:
                await conn.send_body(body.chunks(), body.chunked)
            upstream = await conn.response(lb.config.read_timeout)
        except UpstreamError as exc:
            raise failed(lb, backend, exc) from exc
        except ConnectionError as exc:  # only reading the client's body raises this: the client is gone
            log.info("client went away while sending its body for %s: %s", backend.url, exc)
            raise ClientGone(f"client disconnected while sending its body ({exc})") from None
        backend.observe_latency((lb.clock() - started) * 1000, lb.clock(), lb.config.adaptive_decay_seconds)
        if upstream.status >= 500:
            backend.failures += 1
        else:
            lb.pool.record_success(backend)
        headers = response_headers(upstream, backend)
        if upstream.body is None or request.method == "HEAD":
            conn = None  # stream() releases or closes it
            return await stream(request, lb, backend, upstream, headers)
        if cache_key is not None:
            headers["X-Cache"] = "MISS"
            lb.cache.put(cache_key, upstream.status, headers, upstream.body, backend.url)
        lb.upstream.release(backend, conn)
        conn = None
        return web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=upstream.body)
    except BaseException:
        if conn is not None:  # never leave a half-used connection open (or, worse, in the pool)
            conn.close()
        raise
    finally:
        backend.active -= 1


def failed(lb: Balancer, backend: Backend, exc: UpstreamError) -> UpstreamFailure:
    lb.pool.record_failure(backend, exc)
    backend.observe_latency(lb.config.read_timeout * 1000, lb.clock(), lb.config.adaptive_decay_seconds)
    return UpstreamFailure(backend, exc, exc.sent)


async def stream(
    request: web.Request, lb: Balancer, backend: Backend, upstream: UpstreamResponse, headers: CIMultiDict[str]
) -> web.StreamResponse:
    """Relay a large or unsized body piece by piece; a failure now can only cut the connection."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    try:
        await response.prepare(request)
        async for chunk in upstream.chunks(lb.config.read_timeout):
            await response.write(chunk)
    except UpstreamError as exc:
        lb.pool.record_failure(backend, exc)
        log.warning("upstream %s failed mid-stream (%s); closing the client connection", backend.url, exc)
        abort(request, upstream.conn)
        return response
    except ConnectionError:
        log.info("client went away while streaming from %s", backend.url)
        abort(request, upstream.conn)
        return response
    except BaseException:
        upstream.conn.close()
        raise
    lb.upstream.release(backend, upstream.conn)
    await response.write_eof()
    return response


def abort(request: web.Request, conn: UpstreamConnection) -> None:
    """Drop both connections, so a truncated body can never look complete."""
    conn.close()
    if request.transport is not None:
        request.transport.close()


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


@routes.post("/change_strategy")
async def change_strategy(request: web.Request) -> web.Response:
    lb = request.app[BALANCER]
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


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    """Turn domain and HTTP errors into JSON; log a true bug once and answer 500."""
    try:
        return await handler(request)
    except LBError as exc:
        return error_response(exc.status, exc.code, exc.message, **exc.extra)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, STATUS_CODES.get(exc.status, "http_error"), exc.reason)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "the load balancer hit an unexpected error")


def build_app(
    config: LBConfig, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None
) -> web.Application:
    """Application factory: admin routes first, then the proxy catch-all."""
    app = web.Application(middlewares=[error_middleware])
    app[BALANCER] = Balancer(config.validate(), clock, rng)
    app.add_routes(routes)
    for path in ("/stats", "/change_strategy", "/dashboard", "/lb/health", "/lb/dashboard.js"):
        app.router.add_route("*", path, method_not_allowed)
    app.router.add_route("*", "/{path:.*}", proxy)
    app.cleanup_ctx.append(balancer_context)
    return app


# --------------------------------------------------------------------------- dashboard

DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Load balancer</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}.up{color:#080}.down{color:#b00;font-weight:bold}
#error{color:#b00}
</style></head><body>
<h1>Load balancer</h1>
<p>Strategy: <select id="strategy"></select> <span id="strategy-status"></span></p>
<p>Total requests: <b id="total">-</b> &middot; healthy backends: <b id="healthy">-</b></p>
<table><thead><tr><th>backend</th><th>state</th><th>weight</th><th>active</th><th>requests</th>
<th>failures</th><th>avg ms</th></tr></thead><tbody id="backends"></tbody></table>
<p>Cache: hits <b id="cache-hits">-</b>, misses <b id="cache-misses">-</b>, entries <b id="cache-entries">-</b></p>
<p id="error"></p>
<script src="/lb/dashboard.js"></script>
</body></html>
"""

DASHBOARD_JS = """'use strict';
const $ = (id) => document.getElementById(id);
function cell(row, text, cls) {
  const td = document.createElement('td');
  td.textContent = String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
}
function render(stats) {
  $('total').textContent = String(stats.total_requests);
  $('healthy').textContent = String(stats.backends.filter((b) => b.healthy).length);
  $('cache-hits').textContent = String(stats.cache.hits);
  $('cache-misses').textContent = String(stats.cache.misses);
  $('cache-entries').textContent = String(stats.cache.entries);
  const select = $('strategy');
  if (select.options.length !== stats.strategies.length) {
    select.replaceChildren(...stats.strategies.map((name) => new Option(name, name)));
  }
  if (document.activeElement !== select) select.value = stats.strategy;
  const body = $('backends');
  body.replaceChildren(...stats.backends.map((b) => {
    const row = document.createElement('tr');
    cell(row, b.url);
    cell(row, b.healthy ? 'up' : 'down', b.healthy ? 'up' : 'down');
    cell(row, b.weight);
    cell(row, b.active_connections);
    cell(row, b.total_requests);
    cell(row, b.failures);
    cell(row, b.avg_response_ms.toFixed(1));
    return row;
  }));
}
async function poll() {
  try {
    const resp = await fetch('/stats', {cache: 'no-store'});
    render(await resp.json());
    $('error').textContent = '';
  } catch (err) {
    $('error').textContent = 'cannot reach /stats: ' + err;
  }
}
$('strategy').addEventListener('change', async (event) => {
  const resp = await fetch('/change_strategy', {
    method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({strategy: event.target.value}),
  });
  const data = await resp.json();
  $('strategy-status').textContent = resp.ok ? 'switched' : data.message;
  poll();
});
poll();
setInterval(poll, 1000);
"""


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
    web.run_app(
        build_app(config),
        sock=sock,
        shutdown_timeout=config.shutdown_timeout,
        access_log=None,
        print=None,
        loop=event_loop(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
