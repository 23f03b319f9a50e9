"""The API rate limiter service: application factory, request pipeline and HTTP routes.

``create_app(config)`` builds one Flask app with its services in ``app.extensions``; the
routes are grouped in blueprints by section (core, auth, data/usage/sdk, admin, dashboard,
metrics). ``gunicorn app:app`` builds the app lazily on first access, so importing this module
does no I/O; ``python app.py`` serves it on ``PORT`` (default 5000).
"""

from __future__ import annotations

import argparse
import atexit
import collections
import dataclasses
import datetime as dt
import functools
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Flask, Response, current_app, g, jsonify, render_template, request, send_from_directory
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

import auth
import database as db
import errors
import gateway
import log_redaction
import policy_rules
from analytics import Metrics, MetricsCollector, UsageRecorder
from config import TIER_ORDER, Config, ConfigError
from errors import ApiError, bad_request
from limiter import LimitResult, PolicyDecision, RateLimiter, RequestDecision, StoreUnavailable
from log_manager import AbuseDetector, Alert, BatchWriter, RefusalSampler, RequestLogger, configure_logging
from notifier import Notifier
from policy import Policy, load_policy

log = logging.getLogger("ratelimiter")

VERSION = "1.0.0"
USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{3,64}$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$")
MAX_KEYS_PER_USER = 25
KEY_GENERATION_ATTEMPTS = 5  # draws of a new key when its prefix collides with an existing one
MAX_PER_PAGE = 200
SDK_CACHE_SECONDS = 300
# Routes that never count against the per-IP limit: static files and liveness.
IP_EXEMPT_ENDPOINTS = {"static", "core.health", "sdk.sdk_js"}
ADMIN_ROOM = "admins"  # Socket.IO room of dashboard sockets that connected with ADMIN_TOKEN


# --- services ------------------------------------------------------------------------------

KEY_TAG_CHARS = 16  # hex digits of the key's hash in its limiter subject


def key_subject(key_id: int, key_hash: str) -> str:
    """Limiter subject of an API key: id and the start of the key's hash, so that a cached record
    or store entry of a deleted key can never match a later key that got the same id."""
    return f"k:{key_id}.{key_hash[:KEY_TAG_CHARS]}"


def user_subject(user_id: int, stamp: str) -> str:
    """Limiter subject of a user's tokens: id and account stamp (``auth.account_stamp``), so that a
    deleted account's tokens never reach the meta or counters of an account that got the same id."""
    return f"u:{user_id}.{stamp}"


@dataclasses.dataclass(frozen=True)
class KeyRecord:
    """Identity of an API key (immutable); tier and blocked state live in the limiter store."""

    id: int
    user_id: int
    prefix: str
    name: str
    tag: str  # the start of the key's hash: binds the record to this very key
    expires_at: float | None = None  # epoch seconds; immutable, so the per-process cache may hold it

    @property
    def subject(self) -> str:
        return key_subject(self.id, self.tag)


class KeyDirectory:
    """Per-process cache from key hash to identity, with a negative cache for unknown keys.

    Keys are random, so an unknown hash stays unknown: caching misses briefly is safe and
    keeps key enumeration from reaching the database on every guess.
    """

    def __init__(self, engine: sa.engine.Engine, *, size: int = 50_000, miss_ttl: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._size = size
        self._miss_ttl = miss_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._hits: collections.OrderedDict[str, KeyRecord] = collections.OrderedDict()
        self._misses: collections.OrderedDict[str, float] = collections.OrderedDict()

    def cached(self, raw_key: str) -> tuple[str, KeyRecord | None, bool]:
        """(hash, record, known) from the cache only; ``known`` False means ask the database."""
        key_hash = auth.hash_api_key(raw_key)
        with self._lock:
            record = self._hits.get(key_hash)
            if record is not None:
                self._hits.move_to_end(key_hash)
                return key_hash, record, True
            expires = self._misses.get(key_hash)
            if expires is not None and expires > self._clock():
                return key_hash, None, True
        return key_hash, None, False

    def load(self, key_hash: str) -> KeyRecord | None:
        """Look the hash up in the database (active keys only) and cache the answer."""
        c = db.api_keys.c
        with self._engine.connect() as conn:
            row = conn.execute(
                sa.select(c.id, c.user_id, c.prefix, c.name, c.key_hash, c.expires_at)
                .where(c.key_hash == key_hash, c.revoked_at.is_(None))
            ).first()
        record = None
        if row is not None and hmac.compare_digest(row.key_hash, key_hash):
            record = KeyRecord(row.id, row.user_id, row.prefix, row.name, row.key_hash[:KEY_TAG_CHARS],
                               db.epoch(row.expires_at))
        with self._lock:
            if record is None:
                self._misses[key_hash] = self._clock() + self._miss_ttl
                self._trim(self._misses)
            else:
                self._hits[key_hash] = record
                self._trim(self._hits)
        return record

    def _trim(self, cache: collections.OrderedDict[str, Any]) -> None:
        while len(cache) > self._size:
            cache.popitem(last=False)

    def forget(self, key_id: int) -> None:
        with self._lock:
            for key_hash, record in list(self._hits.items()):
                if record.id == key_id:
                    del self._hits[key_hash]


class EventBus:
    """The one place events are emitted: log line, alert row, e-mail, live dashboard feed."""

    ALERT_KINDS = {"abuse_alert", "rate_limit_spike", "ip_banned", "key_banned"}

    def __init__(self, svc: Services) -> None:
        self._svc = svc
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)

    def emit(self, kind: str, subject: str, **details: Any) -> None:
        event = {"timestamp": db.iso(db.utcnow()), "kind": kind, "subject": subject, "details": details}
        self.recent.appendleft(event)
        log.info("event %s %s", kind, subject, extra={"event": kind, "subject": subject, "details": details})
        svc = self._svc
        if kind in self.ALERT_KINDS:
            svc.metrics.observe_alert(details.get("alert_kind", kind))
            svc.alert_writer.put({
                "timestamp": db.utcnow(), "kind": details.get("alert_kind", kind), "source": subject[:200],
                "severity": details.get("severity", "warning"), "details": json.dumps(details, default=str),
            })
        svc.notifier.notify(kind, subject, details)
        if svc.socketio is not None:
            try:  # events name users, keys and IPs: only sockets that presented ADMIN_TOKEN get them
                svc.socketio.emit("event", event, to=ADMIN_ROOM)
            except Exception:  # a live feed must never break the request that caused the event
                log.debug("socket.io emit failed", exc_info=True)


@dataclasses.dataclass
class Services:
    """Everything one app instance owns; stored in ``app.extensions["rl"]``."""

    config: Config
    engine: sa.engine.Engine
    limiter: RateLimiter
    clock: Callable[[], float]
    metrics: Metrics
    usage: UsageRecorder
    keys: KeyDirectory
    notifier: Notifier
    request_logger: RequestLogger
    log_writer: BatchWriter
    alert_writer: BatchWriter
    abuse: AbuseDetector | None = None
    events: EventBus | None = None
    socketio: Any = None
    flusher: threading.Thread | None = None
    active_keys_cache: tuple[float, int] = (-1e9, 0)
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    refusal_log: RefusalSampler | None = None
    analytics_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    analytics_cache: tuple[float, dt.datetime | None, list[Any]] = (0.0, None, [])
    housekeeping_due: float = 0.0  # svc.clock() time of the next retention pass; 0: not run yet
    rules: Policy | None = None  # RATELIMIT_POLICY; None: the tier limits over one window, as before
    # key id -> (cached at, low-credit threshold, refill period): read once a minute per process
    credit_grants: dict[int, tuple[float, int, str | None]] = dataclasses.field(default_factory=dict)

    def now(self) -> dt.datetime:
        """The injected clock as a naive UTC datetime, the form usage buckets are stored in."""
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC).replace(tzinfo=None)

    def close(self) -> None:
        """Flush analytics and logs, stop background threads; safe to call twice."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self.flusher is not None:
            self.flusher.join(timeout=5)
        self.usage.flush()
        self.log_writer.close()
        self.alert_writer.close()
        self.request_logger.close()
        self.notifier.close()
        self.limiter.close()


def services() -> Services:
    return current_app.extensions["rl"]


# --- request helpers ---------------------------------------------------------------------------

def json_body(*, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object, or a 415/400 naming what is wrong."""
    if optional and not request.get_data(cache=True):
        return {}
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "Send the body as JSON with Content-Type: application/json")
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # nesting deeper than the parser allows
        body = None
    if body is None:
        raise ApiError(400, "malformed_json", "The request body is not valid JSON")
    if not isinstance(body, dict):
        raise ApiError(400, "malformed_json", "The JSON body must be an object")
    for name, value in body.items():
        if not storable_text(name):
            raise ApiError(400, "malformed_json", "A member name holds a NUL character or an unpaired surrogate")
        if not storable_text(value):
            label = name[:100] or '""'  # an empty member name is still a field to name
            raise bad_request(label, f"'{label}' must not contain NUL characters or unpaired surrogates")
    return body


def storable_text(value: Any) -> bool:
    """False if a string in ``value`` (nested lists and objects included) holds a NUL, which
    PostgreSQL cannot store in text, or a lone surrogate ("\\ud800" parses as JSON), which UTF-8
    cannot encode, so cannot be hashed, stored or logged. Checked once for every JSON body, so no
    route can forget it."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item or not item.isascii() and _has_surrogate(item):
                return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def str_field(body: dict[str, Any], name: str, *, required: bool = True, max_len: int = 200) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request(name, f"'{name}' is required")
        return None
    if not isinstance(value, str):
        raise bad_request(name, f"'{name}' must be a string")
    if "\x00" in value:  # PostgreSQL cannot store NUL in text, and no field has a use for it
        raise bad_request(name, f"'{name}' must not contain NUL characters")
    if len(value) > max_len:
        raise bad_request(name, f"'{name}' must be at most {max_len} characters")
    return value


def int_arg(name: str, default: int, *, minimum: int = 1, maximum: int = 2**31 - 1) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(name, f"'{name}' must be an integer") from None
    if value < minimum or value > maximum:  # the default maximum keeps ids and offsets in database range
        raise bad_request(name, f"'{name}' must be at least {minimum} and at most {maximum}")
    return value


def epoch_ceil(value: float) -> int:
    return int(math.ceil(value))


def usage_dict(result: LimitResult) -> dict[str, Any]:
    return {"limit": result.limit, "remaining": result.remaining, "reset_epoch": epoch_ceil(result.reset)}


def rate_headers(result: LimitResult, tier: str, window: int, now: float) -> dict[str, str]:
    """X-RateLimit-* plus the IETF draft's structured RateLimit-Policy / RateLimit fields."""
    reset_in = max(0, epoch_ceil(result.reset - now))
    headers = {
        "X-RateLimit-Limit": str(result.limit),
        "X-RateLimit-Remaining": str(result.remaining),
        "X-RateLimit-Reset": str(epoch_ceil(result.reset)),
        "RateLimit-Policy": f'"{tier}";q={result.limit};w={window}',
        "RateLimit": f'"{tier}";r={result.remaining};t={reset_in}',
    }
    if not result.allowed:
        headers["Retry-After"] = str(max(1, epoch_ceil(result.retry_after)))
    return headers


def refuse_ip(decision: Any) -> ApiError:
    services().metrics.observe_ip_refusal()
    retry = max(1, epoch_ceil(decision.retry_after))
    return ApiError(429, "ip_banned", f"Too many requests from this IP address; try again in {retry} s",
                    headers={"Retry-After": str(retry)}, retry_after=retry)


def record_ip_decision(svc: Services, ip: str, decision: Any) -> None:
    if decision is None:
        return
    if decision.ban_started:
        svc.events.emit("ip_banned", ip, ban_count=decision.ban_count, seconds=epoch_ceil(decision.retry_after))
        svc.abuse.record("ip_ban", ip, ban_count=decision.ban_count)  # its callback emits any alert
    if not decision.allowed:
        raise refuse_ip(decision)


def load_meta(svc: Services, subject: str) -> tuple[str, bool]:
    """Tier and blocked state of a key or user subject from the database; blocked when the row is
    gone or is another key or account than the subject's tag names (an id given out again)."""
    kind, _, rest = subject.partition(":")
    ident, _, tag = rest.partition(".")
    with svc.engine.connect() as conn:
        if kind == "k":
            row = conn.execute(
                sa.select(db.users.c.tier, db.api_keys.c.blocked, db.api_keys.c.revoked_at, db.api_keys.c.key_hash)
                .select_from(db.api_keys.join(db.users, db.api_keys.c.user_id == db.users.c.id))
                .where(db.api_keys.c.id == int(ident))
            ).first()
            if row is None or not tag or not row.key_hash.startswith(tag):
                return "free", True
            return row.tier, bool(row.blocked or row.revoked_at is not None)
        user = conn.execute(
            sa.select(db.users.c.tier, db.users.c.created_at).where(db.users.c.id == int(ident))
        ).first()
        if user is None or auth.account_stamp(user.created_at) != tag:
            return "free", True
        return user.tier, False


def decide(svc: Services, ip: str | None, subject: str, flags: Sequence[str] = (), *,
           consume: bool = True) -> RequestDecision | PolicyDecision:
    """One store round trip: IP check plus the subject's hit, or peek with ``consume=False``
    (a second trip only if the subject's meta was evicted from the store). ``meta_missing`` stays
    True when the meta had to be loaded: the store may have lost other data (flags) too. With a
    policy file, a cost, or a subject with an override or credits, the multi-limit decision
    (decide_policy) instead."""
    if svc.rules is not None or g.get("rule_cost", 1) > 1:
        return decide_policy(svc, ip, subject, flags, consume=consume)
    decision = svc.limiter.check_request(ip, subject, flags, consume=consume)
    if decision.needs_policy:
        return decide_policy(svc, ip, subject, flags, consume=consume, diverted=True)
    if decision.meta_missing and (decision.ip is None or decision.ip.allowed):
        reload_meta(svc, subject)
        retry = svc.limiter.check_request(None, subject, flags, consume=consume)
        if retry.needs_policy:
            return decide_policy(svc, ip, subject, flags, consume=consume, ip_decision=decision.ip, diverted=True)
        decision = retry._replace(ip=decision.ip, meta_missing=True)
    if ip is not None:
        g.ip_checked = True
        record_ip_decision(svc, ip, decision.ip)
    return decision


def clean_tier(svc: Services, decision: RequestDecision | PolicyDecision) -> str:
    """The tier to report for a decision, the same in headers and body.

    The store's meta is data, not trusted: a tier it does not know was limited at the default
    (free) limit, and must not reach headers, bodies, metrics labels or analytics rows as it is."""
    return decision.tier if decision.tier in svc.config.tier_limits else "free"


def apply_limit(svc: Services, decision: RequestDecision | PolicyDecision, subject: str, *, key: KeyRecord | None,
                user_id: int) -> LimitResult:
    """Turn a decision into headers on ``g`` and a 429 when refused; count it for analytics."""
    if isinstance(decision, PolicyDecision):
        return apply_policy(svc, decision, subject, key=key, user_id=user_id)
    result = decision.result
    tier = clean_tier(svc, decision)
    assert result is not None
    g.rate_headers = rate_headers(result, tier, svc.config.window_seconds, svc.clock())
    g.tier = tier
    # Analytics rows keep the plain "k:<id>" / "u:<id>" subjects: ids are never reused in the database.
    usage_subject = f"k:{key.id}" if key else f"u:{user_id}"
    svc.usage.record(usage_subject, key_id=key.id if key else None, user_id=user_id, tier=tier,
                     allowed=result.allowed)
    svc.metrics.observe_decision(tier, result.allowed)
    if not result.allowed:
        svc.abuse.record("rate_limited", key.prefix if key else usage_subject)
        retry = max(1, epoch_ceil(result.retry_after))
        raise ApiError(429, "rate_limit_exceeded",
                       f"Rate limit of {result.limit} requests per {svc.config.window_seconds} s exceeded "
                       f"for the {tier} tier; retry in {retry} s",
                       limit=result.limit, remaining=0, retry_after=retry, tier=tier)
    return result


# --- policy decisions: several limits, cost, overrides, credits, shadow ---------------------------

def policy_route(svc: Services) -> Any:
    """The policy route of this request (the tracked or forwarded endpoint where a view set
    ``g.rule_target``, else the request itself), or None."""
    if svc.rules is None:
        return None
    if "rule_target" in g:
        target = g.rule_target
    elif "forwarded" in g:  # /forward_auth: the request the gateway describes
        target = (g.forwarded.method, g.forwarded.path)
    else:
        target = (request.method, request.path)
    return svc.rules.route_for(*target) if target else None


def exempt_request(svc: Services) -> bool:
    """True for a route the policy marks exempt: only the per-IP limit applies (checked here)."""
    route = policy_route(svc)
    if route is None or not route.exempt:
        return False
    g.ip_checked = True
    ip_guard(svc, g.client_ip)
    return True


def reload_meta(svc: Services, subject: str) -> None:
    """Refill the store's meta of ``subject`` from the database: tier, blocked, override, credits."""
    tier, blocked = load_meta(svc, subject)
    svc.limiter.set_meta(subject, tier=tier, blocked=blocked)
    with svc.engine.connect() as conn:
        limits, expires, credits_on = policy_rules.subject_policy_meta(conn, subject, svc.clock())
    if limits or credits_on:
        svc.limiter.set_policy_meta(subject, override=limits, expires_at=expires, credits=credits_on)


def decide_policy(svc: Services, ip: str | None, subject: str, flags: Sequence[str] = (), *, consume: bool = True,
                  ip_decision: Any = None, diverted: bool = False) -> PolicyDecision:
    """Every limit that applies, cost and credits in one store round trip (``ip_decision``: the IP
    was already checked by an earlier call that counted nothing; ``diverted``: the single-limit
    script already answered that this subject needs the policy script)."""
    route = policy_route(svc)
    cost = g.get("rule_cost") or (route.cost if route is not None else 1)
    decision = svc.limiter.check_policy(None if ip_decision else ip, subject, flags, route=route, cost=cost,
                                        consume=consume, single=not diverted)
    if ip_decision is not None:
        decision = decision._replace(ip=ip_decision)
    if decision.meta_missing and (decision.ip is None or decision.ip.allowed):
        reload_meta(svc, subject)
        retry = svc.limiter.check_policy(None, subject, flags, route=route, cost=cost, consume=consume,
                                         single=not diverted)
        decision = retry._replace(ip=decision.ip, meta_missing=True)
    if ip is not None:
        g.ip_checked = True
        record_ip_decision(svc, ip, decision.ip)
    g.policy_decision = decision
    return decision


def apply_policy(svc: Services, decision: PolicyDecision, subject: str, *, key: KeyRecord | None,
                 user_id: int) -> LimitResult:
    """Headers, analytics, shadow reports and credit alerts of a multi-limit decision; 429 naming the
    refusing limit, or 403 credits_exhausted."""
    result, reported = decision.result, decision.reported
    assert result is not None and reported is not None
    tier = clean_tier(svc, decision)
    g.rate_headers = policy_rules.policy_headers(decision, svc.clock())
    g.tier = tier
    for outcome in decision.shadow_refused:
        report_shadow_refusal(svc, subject, outcome)
    usage_subject = f"k:{key.id}" if key else f"u:{user_id}"  # as in apply_limit: plain ids for analytics
    svc.usage.record(usage_subject, key_id=key.id if key else None, user_id=user_id, tier=tier,
                     allowed=decision.allowed)
    svc.metrics.observe_decision(tier, decision.allowed)
    if decision.credits is not None and key is not None and decision.allowed:
        check_low_credits(svc, key, decision.credits)
    if decision.credits_exhausted:
        raise ApiError(403, "credits_exhausted", "This API key has used up its credits",
                       credits_remaining=decision.credits)
    if not decision.allowed:
        svc.abuse.record("rate_limited", key.prefix if key else usage_subject)
        retry = max(1, epoch_ceil(result.retry_after))
        raise ApiError(429, "rate_limit_exceeded",
                       f"Rate limit {reported.name} ({reported.quota} per {reported.window} s) exceeded; "
                       f"retry in {retry} s", limit=reported.quota, remaining=0, retry_after=retry, tier=tier,
                       policy=reported.name)
    return result


def report_shadow_refusal(svc: Services, subject: str, outcome: Any) -> None:
    """Count a would-be refusal; log it once per subject and limit per window (on every worker, via
    the store's atomic hit)."""
    svc.metrics.observe_shadow_refusal(outcome.name)
    if svc.limiter.hit(f"shadow:{subject}:{outcome.name}", 1, outcome.window).allowed:
        log.warning("shadow limit %s would refuse %s (%s per %s s)", outcome.name, subject, outcome.quota,
                    outcome.window, extra={"event": "shadow_refusal", "subject": subject, "policy": outcome.name})


CREDIT_GRANT_CACHE_SECONDS = 60.0


def check_low_credits(svc: Services, key: KeyRecord, remaining: int) -> None:
    """E-mail (through the event bus) when a key's credits run low: once per key per refill period."""
    cached = svc.credit_grants.get(key.id)
    if cached is None or time.monotonic() - cached[0] > CREDIT_GRANT_CACHE_SECONDS:
        with svc.engine.connect() as conn:
            row = conn.execute(sa.select(db.api_keys.c.credits, db.api_keys.c.credit_refill_amount,
                                         db.api_keys.c.credit_refill_every).where(db.api_keys.c.id == key.id)).first()
        threshold = policy_rules.low_credit_threshold(row.credits, row.credit_refill_amount) if row else 0
        every = row.credit_refill_every if row else None
        cached = svc.credit_grants[key.id] = (time.monotonic(), threshold, every)
    _, threshold, every = cached
    if remaining > threshold:
        return
    now = svc.now()
    period, seconds = ((f"m{now.year}-{now.month}", 32 * 86400) if every == "month"
                       else (f"d{now.date()}", 86400) if every == "day" else ("once", 30 * 86400))
    if svc.limiter.hit(f"credits-low:{key.id}:{period}", 1, seconds).allowed:
        svc.events.emit("credits_low", key.prefix, key_id=key.id, credits_remaining=remaining, threshold=threshold)


def api_key_from_request(body: dict[str, Any] | None = None) -> str | None:
    if body is not None:
        value = body.get("api_key")
        if value is not None and not isinstance(value, str):
            raise bad_request("api_key", "'api_key' must be a string")
        return value or None
    return request.headers.get("X-API-Key") or request.args.get("api_key") or None


def ip_guard(svc: Services, ip: str | None) -> None:
    """The per-IP limit on its own (one store call); raises 429 ip_banned when refused."""
    if ip is not None:
        record_ip_decision(svc, ip, svc.limiter.check_request(ip, None).ip)


def refused_before_the_combined_check(view: Callable[..., Any]) -> Callable[..., Any]:
    """For views that do the IP check inside their combined store call: a request they refuse
    before reaching that call (bad body, missing key) still counts against the IP, once."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        g.ip_checked = False
        try:
            return view(*args, **kwargs)
        except ApiError as exc:
            if not g.ip_checked and exc.code not in ("ip_banned", "limiter_unavailable"):
                ip_guard(services(), g.client_ip)
            raise
        except HTTPException:  # e.g. a 413 body: a banned IP is refused as such, and the IP counts
            if not g.ip_checked:
                ip_guard(services(), g.client_ip)
            raise

    wrapper.combined_ip_check = True  # type: ignore[attr-defined]
    return wrapper


def resolve_key(svc: Services, raw_key: str | None, ip: str | None) -> tuple[KeyRecord, str | None]:
    """Authenticate an API key. Returns (record, ip still to check): when the cache knew the key,
    the IP check is left for the combined store call; otherwise it is done first, so a banned IP
    guessing keys never reaches the database."""
    if not raw_key:
        raise ApiError(401, "missing_api_key", "Send an API key as X-API-Key header or api_key parameter")
    if len(raw_key) > 200:
        raise ApiError(401, "invalid_api_key", "The API key is not valid")
    key_hash, record, known = svc.keys.cached(raw_key)
    if not known:
        if ip is not None:
            g.ip_checked = True
            ip_guard(svc, ip)
            ip = None
        record = svc.keys.load(key_hash)
    if record is None:
        if ip is not None:
            g.ip_checked = True
            ip_guard(svc, ip)
        svc.abuse.record("invalid_key", g.client_ip)
        raise ApiError(401, "invalid_api_key", "The API key is not valid")
    g.key_prefix = record.prefix
    g.user_id = record.user_id
    if record.expires_at is not None and svc.clock() >= record.expires_at:
        if ip is not None:
            g.ip_checked = True
            ip_guard(svc, ip)
        raise ApiError(401, "api_key_expired", "This API key has expired; create a new one",
                       expired_at=db.iso(db.from_epoch(record.expires_at)))
    return record, ip


def refuse_blocked_key(svc: Services, record: KeyRecord) -> ApiError:
    """Blocked in the store: tell a revoked key (401) from a blocked one (403)."""
    with svc.engine.connect() as conn:
        row = conn.execute(
            sa.select(db.api_keys.c.revoked_at, db.api_keys.c.blocked_reason, db.api_keys.c.key_hash)
            .where(db.api_keys.c.id == record.id)
        ).first()
    if row is None or row.revoked_at is not None or not row.key_hash.startswith(record.tag):
        svc.keys.forget(record.id)
        return ApiError(401, "invalid_api_key", "The API key is not valid")
    return ApiError(403, "api_key_blocked", "This API key has been blocked by an administrator",
                    reason=row.blocked_reason or "")


def consume_key(svc: Services, raw_key: str | None) -> tuple[KeyRecord, LimitResult, str]:
    """Authenticate a key and count one request against it (the hot path); 401/403/429 raise."""
    record, ip = resolve_key(svc, raw_key, g.client_ip)
    subject = record.subject
    decision = decide(svc, ip, subject)
    if decision.blocked:
        raise refuse_blocked_key(svc, record)
    result = apply_limit(svc, decision, subject, key=record, user_id=record.user_id)
    return record, result, clean_tier(svc, decision)


def peek_key(svc: Services, raw_key: str | None) -> tuple[KeyRecord, LimitResult, str]:
    """Authenticate a key and read its window without consuming (for /usage and /sdk/check):
    the same single store call as /data, tier and block state included, no database read."""
    record, ip = resolve_key(svc, raw_key, g.client_ip)
    subject = record.subject
    decision = decide(svc, ip, subject, consume=False)
    if decision.blocked:
        raise refuse_blocked_key(svc, record)
    tier = clean_tier(svc, decision)
    result = decision.result
    assert result is not None
    if isinstance(decision, PolicyDecision):
        g.rate_headers = policy_rules.policy_headers(decision, svc.clock())
    else:
        g.rate_headers = rate_headers(result, tier, svc.config.window_seconds, svc.clock())
    return record, result, tier


# --- blueprints ------------------------------------------------------------------------------

core = Blueprint("core", __name__)
auth_bp = Blueprint("auth", __name__, url_prefix="/auth")
data_bp = Blueprint("data", __name__)
sdk_bp = Blueprint("sdk", __name__)
admin_bp = Blueprint("admin", __name__)
dashboard_bp = Blueprint("dashboard", __name__)
metrics_bp = Blueprint("metrics", __name__)


@core.get("/")
def index() -> Response:
    rules = sorted({rule.rule for rule in current_app.url_map.iter_rules() if rule.endpoint != "static"})
    return jsonify(name="API Rate Limiter", version=VERSION, status="ok", endpoints=rules,
                   tiers=services().config.tier_limits, docs="/openapi.json")


@core.get("/health")
def health() -> tuple[Response, int]:
    svc = services()
    checks = {"database": "ok", "limiter_store": "ok"}
    try:
        with svc.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # any driver error means "not ok", reported, never raised
        checks["database"] = f"error: {type(exc).__name__}"
    store = svc.limiter.health()
    checks["limiter_store"] = store
    ok = checks["database"] == "ok" and store == "ok"
    body = {"status": "ok" if ok else "degraded", "checks": checks, "version": VERSION,
            "limiter_store": svc.limiter.store_kind}
    return jsonify(body), 200 if ok else 503


@core.get("/openapi.json")
def openapi() -> Response:
    import openapi as spec

    return jsonify(spec.build_spec(current_app, VERSION))


# --- auth ---

def user_json(row: Any) -> dict[str, Any]:
    return {"id": row.id, "username": row.username, "email": row.email, "tier": row.tier,
            "created_at": db.iso(row.created_at)}


def key_json(row: Any) -> dict[str, Any]:
    return {"id": row.id, "prefix": row.prefix, "name": row.name, "tier": row.tier, "blocked": bool(row.blocked),
            "created_at": db.iso(row.created_at), "last_used_at": db.iso(row.last_used_at),
            "expires_at": db.iso(row.expires_at)}


def credentials(body: dict[str, Any]) -> tuple[str, str]:
    username = str_field(body, "username", max_len=64)
    password = str_field(body, "password", max_len=auth.MAX_PASSWORD_CHARS)
    return username, password  # type: ignore[return-value]


def throttle(svc: Services, name: str, limit: int, window: int, code: str, message: str) -> None:
    """A secondary limit (registrations, sign-in attempts) on the same store; atomic check-and-count.

    Brute-force protection must outlive a store outage: in fail mode "open" these still count per
    process (the limiter's fallback store) rather than admitting every attempt."""
    result = svc.limiter.hit(name, limit, window, open_when_down=False)
    if not result.allowed:
        retry = max(1, epoch_ceil(result.retry_after))
        raise ApiError(429, code, message, headers={"Retry-After": str(retry)}, retry_after=retry)


@auth_bp.post("/register")
def register() -> tuple[Response, int]:
    svc = services()
    body = json_body()
    username, password = credentials(body)
    email = str_field(body, "email", required=False, max_len=254)
    if not USERNAME_RE.fullmatch(username):  # fullmatch: "$" alone would let a trailing newline through
        raise bad_request("username", "'username' must be 3-64 characters of letters, digits, '_', '.' or '-'")
    if len(password) < 8:
        raise bad_request("password", "'password' must be at least 8 characters")
    if email is not None and not EMAIL_RE.fullmatch(email):
        raise bad_request("email", "'email' is not a valid e-mail address")
    try:
        throttle(svc, f"reg:{g.client_ip}", svc.config.register_per_ip_per_hour, 3600, "too_many_registrations",
                 "Too many accounts registered from this address; try again later")
    except ApiError:
        svc.abuse.record("registration_throttled", g.client_ip)
        raise
    now = db.utcnow()
    try:
        with svc.engine.begin() as conn:
            user_id = conn.execute(db.users.insert().values(
                username=username, email=email, password_hash=auth.hash_password(password, svc.config.bcrypt_rounds),
                tier="free", is_admin=False, created_at=now, updated_at=now,
            ).returning(db.users.c.id)).scalar_one()
    except sa.exc.IntegrityError:
        raise ApiError(409, "username_taken", f"The username '{username}' is already taken") from None
    svc.limiter.set_meta(user_subject(user_id, auth.account_stamp(now)), tier="free", blocked=False)
    user = {"id": user_id, "username": username, "email": email, "tier": "free", "created_at": db.iso(now)}
    return jsonify(user=user, **current_app.extensions["jwt"].issue(user_id)), 201


@functools.lru_cache(maxsize=4)
def _dummy_hash(rounds: int) -> str:
    """A real bcrypt hash to check against for unknown users, so timing does not reveal them."""
    return auth.hash_password("not-a-real-password", rounds)


@auth_bp.post("/login")
def login() -> Response:
    svc = services()
    body = json_body()
    username, password = credentials(body)
    # Every attempt is counted before bcrypt runs, atomically, so parallel guesses cannot get past
    # the limit the way a check-then-count would let them.
    throttle(svc, f"lf:{g.client_ip}", svc.config.login_failures_per_ip, svc.config.login_failure_window,
             "too_many_failed_logins", "Too many sign-in attempts from this address; wait and retry")
    with svc.engine.connect() as conn:
        row = conn.execute(sa.select(db.users).where(db.users.c.username == username)).first()
    valid = auth.check_password(password, row.password_hash if row else _dummy_hash(svc.config.bcrypt_rounds))
    if row is None or not valid:
        svc.abuse.record("failed_login", g.client_ip, username=username[:64])
        raise ApiError(401, "invalid_credentials", "Unknown username or wrong password")
    return jsonify(user=user_json(row), **current_app.extensions["jwt"].issue(row.id))


@auth_bp.post("/refresh")
def refresh() -> Response:
    body = json_body()
    token = str_field(body, "refresh_token", max_len=4096)
    return jsonify(current_app.extensions["jwt"].rotate(token))


@auth_bp.post("/logout")
@auth.jwt_required
def logout() -> Response:
    manager = current_app.extensions["jwt"]
    body = json_body(optional=True)
    refresh_token = str_field(body, "refresh_token", required=False, max_len=4096)
    if refresh_token:
        claims = manager.decode(refresh_token, "refresh")
        if claims["sub"] != g.jwt["sub"]:
            raise ApiError(403, "forbidden", "That refresh token belongs to another user")
        manager.revoke_family(claims["fam"])
    manager.revoke_access(g.jwt)
    return jsonify(message="Signed out; the token is no longer accepted")


def user_keys(conn: sa.Connection, user_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        sa.select(db.api_keys, db.users.c.tier)
        .select_from(db.api_keys.join(db.users, db.api_keys.c.user_id == db.users.c.id))
        .where(db.api_keys.c.user_id == user_id, db.api_keys.c.revoked_at.is_(None))
        .order_by(db.api_keys.c.id)
    ).all()
    return [policy_rules.with_credits(services(), key_json(row), row, key_subject(row.id, row.key_hash))
            for row in rows]


def current_user_row(conn: sa.Connection) -> Any:
    row = conn.execute(sa.select(db.users).where(db.users.c.id == g.user_id)).first()
    if row is None:
        raise ApiError(401, "invalid_token", "The account of this token no longer exists")
    return row


@auth_bp.get("/me")
@auth.jwt_required
def me() -> Response:
    with services().engine.connect() as conn:
        row = current_user_row(conn)
        return jsonify(user=user_json(row), api_keys=user_keys(conn, row.id))


@auth_bp.get("/api_keys")
@auth.jwt_required
def list_api_keys() -> Response:
    with services().engine.connect() as conn:
        return jsonify(api_keys=user_keys(conn, g.user_id))


@auth_bp.post("/create_api_key")
@auth.jwt_required
def create_api_key() -> tuple[Response, int]:
    svc = services()
    body = json_body(optional=True)
    name = (str_field(body, "name", required=False, max_len=100) or "").strip()
    expires_at = parse_timestamp(body, "expires_at", after=svc.clock())
    # The visible prefix has 32 random bits: among many keys two can collide (birthday bound), and
    # the unique index then refuses the insert. A fresh key is drawn instead of answering 500.
    for attempt in range(KEY_GENERATION_ATTEMPTS):
        new_key = auth.generate_api_key()
        try:
            key_id, user, now = insert_api_key(svc, new_key, name, expires_at)
            break
        except sa.exc.IntegrityError:
            if attempt == KEY_GENERATION_ATTEMPTS - 1:
                raise
            log.warning("API key prefix or hash collision; drawing a new key")
    subject = key_subject(key_id, new_key.key_hash)
    svc.limiter.set_meta(subject, tier=user.tier, blocked=False)
    publish_policy(svc, subjects=[subject])  # an override of the owner covers the new key too
    return jsonify(api_key=new_key.key, id=key_id, prefix=new_key.prefix, name=name, tier=user.tier,
                   created_at=db.iso(now), expires_at=db.iso(expires_at),
                   message="Store this key now: it is shown only once"), 201


def insert_api_key(svc: Services, new_key: auth.NewApiKey, name: str,
                   expires_at: dt.datetime | None) -> tuple[int, Any, dt.datetime]:
    """Insert the caller's new key under the per-user cap; (key id, user row, creation time)."""
    now = db.utcnow()
    with svc.engine.begin() as conn:
        user = current_user_row(conn)
        count = conn.execute(
            sa.select(sa.func.count()).select_from(db.api_keys)
            .where(db.api_keys.c.user_id == user.id, db.api_keys.c.revoked_at.is_(None))
        ).scalar_one()
        if count >= MAX_KEYS_PER_USER:
            raise ApiError(409, "too_many_keys", f"An account may hold at most {MAX_KEYS_PER_USER} active keys")
        key_id = conn.execute(db.api_keys.insert().values(
            user_id=user.id, prefix=new_key.prefix, key_hash=new_key.key_hash, name=name, blocked=False,
            created_at=now, expires_at=expires_at,
        ).returning(db.api_keys.c.id)).scalar_one()
    return key_id, user, now


def parse_timestamp(body: dict[str, Any], name: str, *, after: float) -> dt.datetime | None:
    """An optional ISO 8601 field as naive UTC; 400 unless it lies after ``after`` (epoch seconds)."""
    raw = str_field(body, name, required=False, max_len=40)
    if raw is None:
        return None
    try:
        value = dt.datetime.fromisoformat(raw.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        epoch = db.epoch(value)
    except (ValueError, OverflowError):
        raise bad_request(name, f"'{name}' must be an ISO 8601 timestamp, e.g. 2026-12-31T23:59:59Z") from None
    if epoch is None or epoch <= after:
        raise bad_request(name, f"'{name}' must lie in the future")
    return value


@auth_bp.delete("/api_keys/<int(max=2147483647):key_id>")
@auth.jwt_required
def revoke_own_key(key_id: int) -> Response:
    svc = services()
    with svc.engine.begin() as conn:
        row = conn.execute(sa.select(db.api_keys).where(
            db.api_keys.c.id == key_id, db.api_keys.c.user_id == g.user_id, db.api_keys.c.revoked_at.is_(None)
        )).first()
        if row is None:  # another user's key looks exactly like a missing one
            raise ApiError(404, "key_not_found", f"You have no active API key with id {key_id}")
        conn.execute(db.api_keys.update().where(db.api_keys.c.id == key_id).values(revoked_at=db.utcnow()))
    revoke_in_store(svc, key_id, row.key_hash)
    return jsonify(message="API key revoked", key={"id": key_id, "prefix": row.prefix, "revoked": True})


def revoke_in_store(svc: Services, key_id: int, key_hash: str) -> None:
    """Every worker refuses a revoked key on its next request: blocked in the shared meta."""
    svc.limiter.set_meta(key_subject(key_id, key_hash), tier="free", blocked=True)
    svc.keys.forget(key_id)


# --- data, usage, sdk ---

@data_bp.get("/data")
@refused_before_the_combined_check
def data() -> Response:
    svc = services()
    if exempt_request(svc):  # a policy route marked exempt: no key, not counted
        return jsonify(data={"message": "Public data: this route is exempt from key and limits",
                             "served_at": db.iso(db.utcnow())}, tier=None, usage=None)
    token = auth.bearer_token()
    raw_key = api_key_from_request()
    if raw_key or token is None:
        record, result, tier = consume_key(svc, raw_key)
        owner = {"key_prefix": record.prefix, "user_id": record.user_id}
    else:
        result, tier = consume_user(svc, token)
        owner = {"user_id": g.user_id}
    payload = {
        "message": "Protected sample data: this request passed authentication and the rate limiter",
        "served_at": db.iso(db.utcnow()),
        **owner,
    }
    return jsonify(data=payload, tier=tier, usage=usage_dict(result))


def consume_user(svc: Services, token: str) -> tuple[LimitResult, str]:
    """A JWT call to /data: limited per user, revocation read in the same store call."""
    manager: auth.JWTManager = current_app.extensions["jwt"]
    try:
        claims = manager.decode(token, "access")
    except ApiError:
        g.ip_checked = True
        ip_guard(svc, g.client_ip)
        raise
    g.user_id = int(claims["sub"])
    subject = user_subject(g.user_id, claims["gen"])
    flag = f"revoked:{claims['jti']}"
    decision = decide(svc, g.client_ip, subject, [flag])
    revoked = decision.flags.get(flag, False) or manager.revoked_although_not_flagged(
        claims["jti"], store_lost_meta=decision.meta_missing)
    if revoked:
        raise ApiError(401, "token_revoked", "The token has been revoked")
    if decision.blocked:
        raise ApiError(401, "invalid_token", "The account of this token no longer exists")
    result = apply_limit(svc, decision, subject, key=None, user_id=g.user_id)
    return result, clean_tier(svc, decision)


@data_bp.get("/usage")
@refused_before_the_combined_check
def usage() -> Response:
    svc = services()
    g.rule_target = None  # reading usage is not a call to a policy route
    record, result, tier = peek_key(svc, api_key_from_request())
    today = dt.datetime.combine(svc.now().date(), dt.time())
    totals = svc.usage.totals(f"k:{record.id}", today)
    expires_at = db.iso(db.from_epoch(record.expires_at)) if record.expires_at is not None else None
    return jsonify(key_prefix=record.prefix, tier=tier, limit=result.limit, used=result.limit - result.remaining,
                   remaining=result.remaining, window_seconds=svc.config.window_seconds,
                   reset_epoch=epoch_ceil(result.reset), totals=totals, expires_at=expires_at,
                   **policy_rules.usage_fields(g.get("policy_decision")))


# --- gateway: the /data decision for any upstream API ---

gateway_bp = Blueprint("gateway", __name__)


@gateway_bp.route(gateway.URL_PREFIX, methods=gateway.VIEW_METHODS, provide_automatic_options=False)
@gateway_bp.route(f"{gateway.URL_PREFIX}/<forwarded_path:original>", methods=gateway.VIEW_METHODS,
                  provide_automatic_options=False)
@refused_before_the_combined_check
def forward_auth(original: str | None = None) -> Response:
    """A gateway's sub-request: exactly the /data decision and budget for the request it describes;
    admitted answers name the subject in X-Auth-* headers for the upstream."""
    svc = services()
    req = request._get_current_object()  # type: ignore[attr-defined]  # one proxy lookup, not one per header
    # The original request (method, decoded path) is request state for whatever matches routes.
    g.forwarded = forwarded = gateway.forwarded_request(req, original)
    if exempt_request(svc):  # a policy route marked exempt: no credentials, not counted (the IP is)
        return Response(gateway.ADMITTED_BODY, mimetype="application/json")
    token = auth.bearer_token()
    raw_key = req.environ.get("HTTP_X_API_KEY") or forwarded.api_key()
    key_prefix = None
    if raw_key or token is None:
        record, _, tier = consume_key(svc, raw_key)
        user_id, key_prefix = record.user_id, record.prefix
    else:
        _, tier = consume_user(svc, token)
        user_id = g.user_id
    username = current_app.extensions["rl.usernames"].get(user_id)
    # A constant body: gateways read the headers, and the decision must cost no more than /data.
    return Response(gateway.ADMITTED_BODY, mimetype="application/json",
                    headers=gateway.identity_headers(user_id, username, tier, key_prefix))


@sdk_bp.get("/sdk.js", defaults={"filename": "ratelimiter-sdk.js"})
@sdk_bp.get("/sdk.mjs", defaults={"filename": "ratelimiter-sdk.mjs"})
def sdk_js(filename: str) -> Response:
    """The SDK as a classic script (/sdk.js) and its ES-module wrapper (/sdk.mjs); one endpoint, so
    both stay exempt from the per-IP limit and the request log."""
    response = send_from_directory(current_app.static_folder, filename,
                                   mimetype="application/javascript", max_age=SDK_CACHE_SECONDS)
    response.headers["Access-Control-Allow-Origin"] = "*"
    return response


@sdk_bp.get("/sdk")
def sdk_page() -> Response:
    return send_from_directory(current_app.static_folder, "demo.html", mimetype="text/html", max_age=0)


@sdk_bp.post("/sdk/check")
@refused_before_the_combined_check
def sdk_check() -> Response:
    svc = services()
    body = json_body()
    endpoint = str_field(body, "endpoint", required=False, max_len=500)
    g.rule_target = ("GET", endpoint) if endpoint else None
    _, result, tier = peek_key(svc, api_key_from_request(body))
    return jsonify(allowed=result.remaining > 0, tier=tier, retry_after=epoch_ceil(result.retry_after)
                   if result.remaining <= 0 else 0, **usage_dict(result))


@sdk_bp.post("/sdk/track")
@refused_before_the_combined_check
def sdk_track() -> Response:
    svc = services()
    body = json_body()
    endpoint = str_field(body, "endpoint", max_len=500)
    method = str_field(body, "method", required=False, max_len=10)
    status = body.get("status")
    if status is not None and (not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599):
        raise bad_request("status", "'status' must be an HTTP status code between 100 and 599")
    policy_rules.track_target(body, (method or "GET").upper(), endpoint or "")
    _, result, tier = consume_key(svc, api_key_from_request(body))
    return jsonify(tracked=True, tier=tier, **usage_dict(result))


# --- admin ---

def audit(conn: sa.Connection, action: str, target: str, **details: Any) -> None:
    db.add_audit(conn, g.admin_actor, action, target, details)


def find_user(conn: sa.Connection, body: dict[str, Any]) -> Any:
    user_id = body.get("user_id")
    username = body.get("username")
    if user_id is not None:
        if not isinstance(user_id, int) or isinstance(user_id, bool) or not 1 <= user_id <= 2**31 - 1:
            raise bad_request("user_id", "'user_id' must be an integer between 1 and 2147483647")
        row = conn.execute(sa.select(db.users).where(db.users.c.id == user_id)).first()
    elif username is not None:
        if not isinstance(username, str):
            raise bad_request("username", "'username' must be a string")
        row = conn.execute(sa.select(db.users).where(db.users.c.username == username)).first()
    else:
        raise bad_request("user_id", "Give 'user_id' or 'username'")
    if row is None:
        raise ApiError(404, "user_not_found", "No such user")
    return row


def find_key(conn: sa.Connection, body: dict[str, Any]) -> Any:
    c = db.api_keys.c
    if body.get("api_key") is not None:
        raw = str_field(body, "api_key", max_len=200)
        condition = c.key_hash == auth.hash_api_key(raw)
    elif body.get("key_id") is not None:
        key_id = body["key_id"]
        if not isinstance(key_id, int) or isinstance(key_id, bool) or not 1 <= key_id <= 2**31 - 1:
            raise bad_request("key_id", "'key_id' must be an integer between 1 and 2147483647")
        condition = c.id == key_id
    elif body.get("prefix") is not None:
        condition = c.prefix == str_field(body, "prefix", max_len=32)
    else:
        raise bad_request("api_key", "Give 'api_key', 'key_id' or 'prefix'")
    row = conn.execute(
        sa.select(db.api_keys, db.users.c.tier, db.users.c.username)
        .select_from(db.api_keys.join(db.users, db.api_keys.c.user_id == db.users.c.id))
        .where(condition)
    ).first()
    if row is None:
        raise ApiError(404, "key_not_found", "No such API key")
    return row


@admin_bp.get("/admin/users")
@auth.admin_required
def admin_users() -> Response:
    page = int_arg("page", 1)
    per_page = int_arg("per_page", 50, maximum=MAX_PER_PAGE)
    key_counts = (
        sa.select(db.api_keys.c.user_id, sa.func.count().label("n"))
        .where(db.api_keys.c.revoked_at.is_(None)).group_by(db.api_keys.c.user_id).subquery()
    )
    with services().engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(db.users)).scalar_one()
        rows = conn.execute(
            sa.select(db.users, sa.func.coalesce(key_counts.c.n, 0).label("key_count"))
            .select_from(db.users.outerjoin(key_counts, key_counts.c.user_id == db.users.c.id))
            .order_by(db.users.c.id).limit(per_page).offset((page - 1) * per_page)
        ).all()
    users = [{**user_json(row), "api_keys": row.key_count, "is_admin": bool(row.is_admin)} for row in rows]
    return jsonify(users=users, total=total, page=page, per_page=per_page)


@admin_bp.delete("/admin/users/<int(max=2147483647):user_id>")
@auth.admin_required
def delete_user(user_id: int) -> Response:
    """Delete a user with their keys and tokens; every worker refuses them on the next request."""
    svc = services()
    with svc.engine.begin() as conn:
        user = conn.execute(sa.select(db.users).where(db.users.c.id == user_id)).first()
        if user is None:
            raise ApiError(404, "user_not_found", "No such user")
        keys = conn.execute(sa.select(db.api_keys.c.id, db.api_keys.c.key_hash)
                            .where(db.api_keys.c.user_id == user_id)).all()
        conn.execute(db.api_keys.delete().where(db.api_keys.c.user_id == user_id))
        conn.execute(db.refresh_tokens.delete().where(db.refresh_tokens.c.user_id == user_id))
        conn.execute(db.users.delete().where(db.users.c.id == user_id))
        audit(conn, "delete_user", f"user:{user.username}", user_id=user_id, api_keys=len(keys))
    # Its JWTs die with it (and, carrying its account stamp, never match a later account).
    svc.limiter.set_meta(user_subject(user_id, auth.account_stamp(user.created_at)), tier="free", blocked=True)
    for key in keys:
        revoke_in_store(svc, key.id, key.key_hash)
    return jsonify(user={**user_json(user), "deleted": True}, api_keys_deleted=len(keys))


@admin_bp.get("/admin/keys")
@auth.admin_required
def admin_keys() -> Response:
    per_page = int_arg("per_page", 50, maximum=MAX_PER_PAGE)
    page = int_arg("page", 1)
    query = sa.select(db.api_keys, db.users.c.tier, db.users.c.username).select_from(
        db.api_keys.join(db.users, db.api_keys.c.user_id == db.users.c.id))
    user_id = request.args.get("user_id")
    if user_id:
        query = query.where(db.api_keys.c.user_id == int_arg("user_id", 0))
    with services().engine.connect() as conn:
        rows = conn.execute(query.order_by(db.api_keys.c.id).limit(per_page).offset((page - 1) * per_page)).all()
    keys = [{**key_json(row), "user_id": row.user_id, "username": row.username,
             "revoked": row.revoked_at is not None, "blocked_reason": row.blocked_reason} for row in rows]
    return jsonify(keys=keys, page=page, per_page=per_page)


@admin_bp.post("/admin/upgrade_tier")
@auth.admin_required
def upgrade_tier() -> Response:
    svc = services()
    body = json_body()
    tier = str_field(body, "tier", max_len=20)
    if tier not in svc.config.tier_limits:
        raise bad_request("tier", f"'tier' must be one of {', '.join(TIER_ORDER)}")
    with svc.engine.begin() as conn:
        user = find_user(conn, body)
        conn.execute(db.users.update().where(db.users.c.id == user.id).values(tier=tier, updated_at=db.utcnow()))
        keys = conn.execute(sa.select(db.api_keys.c.id, db.api_keys.c.key_hash, db.api_keys.c.blocked,
                                      db.api_keys.c.revoked_at).where(db.api_keys.c.user_id == user.id)).all()
        audit(conn, "upgrade_tier", f"user:{user.username}", old_tier=user.tier, new_tier=tier, user_id=user.id)
        updated = conn.execute(sa.select(db.users).where(db.users.c.id == user.id)).first()
    svc.limiter.set_meta(user_subject(user.id, auth.account_stamp(user.created_at)), tier=tier, blocked=False)
    for key in keys:
        svc.limiter.set_meta(key_subject(key.id, key.key_hash), tier=tier, blocked=bool(key.blocked or key.revoked_at))
    svc.events.emit("tier_changed", user.username, old_tier=user.tier, new_tier=tier, actor=g.admin_actor)
    return jsonify(user=user_json(updated))


def set_key_blocked(blocked: bool) -> Response:
    svc = services()
    body = json_body()
    reason = str_field(body, "reason", required=False, max_len=500) or ""
    with svc.engine.begin() as conn:
        key = find_key(conn, body)
        conn.execute(db.api_keys.update().where(db.api_keys.c.id == key.id)
                     .values(blocked=blocked, blocked_reason=reason if blocked else None))
        audit(conn, "block_key" if blocked else "unblock_key", f"key:{key.prefix}", key_id=key.id,
              owner=key.username, reason=reason)
    svc.limiter.set_meta(key_subject(key.id, key.key_hash), tier=key.tier,
                         blocked=blocked or key.revoked_at is not None)
    svc.events.emit("key_blocked" if blocked else "key_unblocked", key.prefix, owner=key.username, reason=reason,
                    actor=g.admin_actor)
    return jsonify(key={"id": key.id, "prefix": key.prefix, "name": key.name, "blocked": blocked,
                        "reason": reason if blocked else None})


@admin_bp.post("/admin/block_key")
@auth.admin_required
def block_key() -> Response:
    return set_key_blocked(True)


@admin_bp.post("/admin/unblock_key")
@auth.admin_required
def unblock_key() -> Response:
    return set_key_blocked(False)


@admin_bp.post("/admin/revoke_key")
@auth.admin_required
def admin_revoke_key() -> Response:
    svc = services()
    body = json_body()
    with svc.engine.begin() as conn:
        key = find_key(conn, body)
        conn.execute(db.api_keys.update().where(db.api_keys.c.id == key.id).values(revoked_at=db.utcnow()))
        audit(conn, "revoke_key", f"key:{key.prefix}", key_id=key.id, owner=key.username)
    revoke_in_store(svc, key.id, key.key_hash)
    svc.events.emit("key_banned", key.prefix, owner=key.username, actor=g.admin_actor, severity="warning")
    return jsonify(key={"id": key.id, "prefix": key.prefix, "revoked": True, "blocked": True})


@admin_bp.get("/admin/bans")
@auth.admin_required
def list_bans() -> Response:
    return jsonify(bans=services().limiter.list_bans())


def ip_field(body: dict[str, Any]) -> str:
    """The subject an admin ban names: an IPv6 address (or a network inside one subject, as
    /admin/bans lists it) means its whole /IPV6_PREFIX_LENGTH network, as requests are counted."""
    raw = str_field(body, "ip", max_len=64).strip()
    prefix = services().config.ipv6_prefix_length
    try:
        network = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise bad_request("ip", "'ip' must be an IPv4 or IPv6 address") from None
    if network.num_addresses == 1:
        return ip_subject(str(network.network_address), prefix)
    if network.version == 6 and network.prefixlen >= prefix:
        return ip_subject(str(network.network_address), prefix)
    raise bad_request("ip", f"'ip' must be an address, or an IPv6 network of at least /{prefix} "
                            "(IPV6_PREFIX_LENGTH)")


@admin_bp.post("/admin/ban_ip")
@auth.admin_required
def ban_ip() -> Response:
    svc = services()
    body = json_body()
    ip = ip_field(body)
    seconds = body.get("seconds", svc.config.temp_ban_seconds)
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not 1 <= seconds <= 30 * 86400:
        raise bad_request("seconds", "'seconds' must be an integer between 1 and 2592000")
    svc.limiter.ban_ip(ip, seconds)
    now = db.utcnow()
    with svc.engine.begin() as conn:
        conn.execute(db.ip_bans.insert().values(ip=ip, banned_at=now, expires_at=now + dt.timedelta(seconds=seconds),
                                                ban_count=1, reason="admin"))
        audit(conn, "ban_ip", f"ip:{ip}", seconds=seconds)
    svc.events.emit("ip_banned", ip, seconds=seconds, actor=g.admin_actor)
    return jsonify(ban={"ip": ip, "seconds": seconds})


@admin_bp.post("/admin/unban_ip")
@auth.admin_required
def unban_ip() -> Response:
    svc = services()
    ip = ip_field(json_body())
    lifted = svc.limiter.unban_ip(ip)
    if not lifted:
        raise ApiError(404, "ban_not_found", f"{ip} is not banned")
    with svc.engine.begin() as conn:
        conn.execute(db.ip_bans.update().where(db.ip_bans.c.ip == ip, db.ip_bans.c.lifted_at.is_(None))
                     .values(lifted_at=db.utcnow()))
        audit(conn, "unban_ip", f"ip:{ip}")
    return jsonify(ban={"ip": ip, "lifted": True})


def parse_since(raw: str | None) -> dt.datetime | None:
    if not raw:
        return None
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        if value.tzinfo is not None:  # year 1 or 9999 with an offset overflows here
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise bad_request("since", "'since' must be an ISO 8601 timestamp, e.g. 2026-12-01T10:00:00Z") from None
    return value


@admin_bp.get("/logs")
@auth.admin_required
def logs() -> Response:
    svc = services()
    limit = int_arg("limit", 100, maximum=1000)
    level = (request.args.get("level") or "").upper()
    if level and level not in ("INFO", "WARNING", "ERROR"):
        raise bad_request("level", "'level' must be INFO, WARNING or ERROR")
    since = parse_since(request.args.get("since"))
    svc.log_writer.flush_now()
    c = db.request_logs.c
    query = sa.select(db.request_logs).order_by(c.id.desc()).limit(limit)
    if level:
        query = query.where(c.level == level)
    if since is not None:
        query = query.where(c.timestamp >= since)
    with svc.engine.connect() as conn:
        rows = conn.execute(query).all()
    entries = [{"timestamp": db.iso(r.timestamp), "level": r.level, "method": r.method, "path": r.path,
                "status": r.status, "ip": r.ip, "key_prefix": r.key_prefix, "duration_ms": r.duration_ms,
                "message": r.message} for r in rows]
    return jsonify(logs=entries)


@admin_bp.get("/admin/audit")
@auth.admin_required
def audit_entries() -> Response:
    limit = int_arg("limit", 100, maximum=1000)
    with services().engine.connect() as conn:
        rows = conn.execute(sa.select(db.audit_log).order_by(db.audit_log.c.id.desc()).limit(limit)).all()
    entries = [{"id": r.id, "timestamp": db.iso(r.timestamp), "actor": r.actor, "action": r.action,
                "target": r.target, "details": json.loads(r.details or "{}")} for r in rows]
    return jsonify(entries=entries)


@admin_bp.get("/admin/alerts")
@auth.admin_required
def admin_alerts() -> Response:
    return jsonify(alerts=recent_alerts(int_arg("limit", 50, maximum=500)))


def recent_alerts(limit: int) -> list[dict[str, Any]]:
    svc = services()
    svc.alert_writer.flush_now()
    with svc.engine.connect() as conn:
        rows = conn.execute(sa.select(db.alerts).order_by(db.alerts.c.id.desc()).limit(limit)).all()
    return [{"timestamp": db.iso(r.timestamp), "kind": r.kind, "source": r.source, "severity": r.severity,
             "details": json.loads(r.details or "{}")} for r in rows]


# --- admin: limit overrides and credits (policy_rules.py mirrors them into the limiter store) ---

MAX_OVERRIDES_LISTED = 500


def publish_policy(svc: Services, *, subjects: Sequence[str] = (), key_id: int | None = None,
                   user_id: int | None = None) -> None:
    """Mirror the effective override and credits of these subjects, of a key, or of a user (their
    JWT subject and every key) into the limiter store's meta."""
    subjects = list(subjects)
    if key_id is not None or user_id is not None:
        with svc.engine.connect() as conn:
            keys, users = policy_rules.affected_rows(conn, key_id=key_id, user_id=user_id)
        subjects += [key_subject(row.id, row.key_hash) for row in keys]
        subjects += [user_subject(row.id, auth.account_stamp(row.created_at)) for row in users]
    policy_rules.publish(svc, subjects)


@admin_bp.post("/admin/overrides")
@auth.admin_required
def create_override() -> tuple[Response, int]:
    """Replace the tier's limits of a key, or of a user and all their keys, until ``expires_at``."""
    svc = services()
    policy_rules.require_policy_store(svc.limiter)
    body = json_body()
    limits = policy_rules.parse_override_limits(body)
    expires_at = parse_timestamp(body, "expires_at", after=svc.clock())
    reason = str_field(body, "reason", required=False, max_len=500) or ""
    with svc.engine.begin() as conn:
        if any(body.get(name) is not None for name in ("key_id", "prefix", "api_key")):
            key = find_key(conn, body)
            target, key_id, user_id = f"key:{key.prefix}", key.id, None
        else:
            user = find_user(conn, body)
            target, key_id, user_id = f"user:{user.username}", None, user.id
        override_id = conn.execute(db.rate_overrides.insert().values(
            key_id=key_id, user_id=user_id, limits=json.dumps(limits), reason=reason, created_at=db.utcnow(),
            created_by=g.admin_actor, expires_at=expires_at,
        ).returning(db.rate_overrides.c.id)).scalar_one()
        audit(conn, "create_override", target, override_id=override_id, limits=limits, reason=reason,
              expires_at=db.iso(expires_at))
        row = conn.execute(sa.select(db.rate_overrides).where(db.rate_overrides.c.id == override_id)).one()
    publish_policy(svc, key_id=key_id, user_id=user_id)
    return jsonify(override={**policy_rules.override_json(row, svc.clock()), "target": target}), 201


@admin_bp.get("/admin/overrides")
@auth.admin_required
def list_overrides() -> Response:
    svc = services()
    with svc.engine.connect() as conn:
        rows = conn.execute(sa.select(db.rate_overrides).order_by(db.rate_overrides.c.id.desc())
                            .limit(MAX_OVERRIDES_LISTED)).all()
    now = svc.clock()
    return jsonify(overrides=[policy_rules.override_json(row, now) for row in rows])


@admin_bp.delete("/admin/overrides/<int(max=2147483647):override_id>")
@auth.admin_required
def delete_override(override_id: int) -> Response:
    svc = services()
    with svc.engine.begin() as conn:
        row = conn.execute(sa.select(db.rate_overrides).where(db.rate_overrides.c.id == override_id)).first()
        if row is None:
            raise ApiError(404, "override_not_found", f"No override with id {override_id}")
        conn.execute(db.rate_overrides.delete().where(db.rate_overrides.c.id == override_id))
        target = f"key:{row.key_id}" if row.key_id is not None else f"user:{row.user_id}"
        audit(conn, "delete_override", target, override_id=override_id, limits=json.loads(row.limits))
    publish_policy(svc, key_id=row.key_id, user_id=row.user_id)
    return jsonify(override={**policy_rules.override_json(row, svc.clock()), "deleted": True})


@admin_bp.post("/admin/keys/<int(max=2147483647):key_id>/credits")
@auth.admin_required
def set_key_credits(key_id: int) -> Response:
    """Grant credits (spent by each admitted request's cost), optionally refilled every day or month."""
    svc = services()
    policy_rules.require_policy_store(svc.limiter)
    credits, amount, every = policy_rules.parse_credits(json_body())
    with svc.engine.begin() as conn:
        key = find_key(conn, {"key_id": key_id})
        conn.execute(db.api_keys.update().where(db.api_keys.c.id == key_id).values(
            credits=credits, credit_refill_amount=amount, credit_refill_every=every))
        audit(conn, "set_credits", f"key:{key.prefix}", key_id=key_id, credits=credits, refill_amount=amount,
              refill_every=every)
    if credits is not None:
        svc.limiter.set_credits(key_subject(key.id, key.key_hash), credits, refill=amount, every=every)
    svc.credit_grants.pop(key_id, None)
    publish_policy(svc, key_id=key_id)
    refill = {"amount": amount, "every": every} if amount is not None else None
    return jsonify(key={"id": key_id, "prefix": key.prefix, "credits": credits, "refill": refill,
                        "credits_remaining": credits})


# --- metrics and analytics ---

@metrics_bp.get("/api/metrics")
def api_metrics() -> Response:
    svc = services()
    snapshot = svc.metrics.snapshot()
    snapshot.update(
        active_keys=active_subjects(svc),
        limiter_store=svc.limiter.store_kind,
        limiter_health=svc.limiter.health(),
        strategy=svc.config.strategy,
        tier_limits=svc.config.tier_limits,
        window_seconds=svc.config.window_seconds,
        scope="process",
        pid=os.getpid(),
    )
    return jsonify(snapshot)


ACTIVE_KEYS_CACHE_SECONDS = 2.0


def active_subjects(svc: Services) -> int:
    """API keys with requests in the current window, across all workers, as of the last flush.

    The anonymous /api/metrics must not become a database load: one COUNT per two seconds at most."""
    cached_at, value = svc.active_keys_cache
    if time.monotonic() - cached_at < ACTIVE_KEYS_CACHE_SECONDS:
        return value
    since = svc.now() - dt.timedelta(seconds=svc.config.window_seconds)
    c = db.usage_counters.c
    with svc.engine.connect() as conn:
        value = conn.execute(
            sa.select(sa.func.count(sa.distinct(c.subject)))
            .where(c.bucket_start >= since.replace(second=0, microsecond=0), c.key_id.is_not(None))
        ).scalar_one()
    svc.active_keys_cache = (time.monotonic(), value)
    return value


@metrics_bp.get("/metrics")
def prometheus_metrics() -> Response:
    svc = services()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(svc.metrics, lambda: {
        "limiter_store_up": 1.0 if svc.limiter.health() == "ok" else 0.0,
        "analytics_flush_failures": float(svc.usage.flush_failures),
    }))
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)  # mimetype= would add a second charset


ANALYTICS_MAX_MINUTES = 24 * 60
ANALYTICS_PUBLIC_MINUTES = 180  # without the admin token: the dashboard's widest range
ANALYTICS_CACHE_SECONDS = 5.0  # anonymous figures are computed at most this often per process

UsageRows = list[tuple[dt.datetime, str, int, int]]


def usage_since(svc: Services, since: dt.datetime) -> UsageRows:
    """(minute, tier, allowed, limited) from ``since`` on: one grouped scan, from which any
    shorter range's series and tier totals are sliced."""
    c = db.usage_counters.c
    svc.usage.flush()
    with svc.engine.connect() as conn:
        rows = conn.execute(
            sa.select(c.bucket_start, c.tier, sa.func.sum(c.allowed), sa.func.sum(c.limited))
            .where(c.bucket_start >= since).group_by(c.bucket_start, c.tier)
        ).all()
    return [(row[0], row[1], int(row[2]), int(row[3])) for row in rows]


def public_usage(svc: Services, minute: dt.datetime) -> UsageRows:
    """The anonymous view's rows, shared by every anonymous call for ANALYTICS_CACHE_SECONDS (and
    the same minute): an anonymous caller cannot make the database scan more than one public
    range per interval, whatever range or rate it asks for. One computation at a time."""
    with svc.analytics_lock:
        cached_at, cached_minute, rows = svc.analytics_cache
        if cached_minute != minute or not 0 <= svc.clock() - cached_at < ANALYTICS_CACHE_SECONDS:
            rows = usage_since(svc, minute - dt.timedelta(minutes=ANALYTICS_PUBLIC_MINUTES - 1))
            svc.analytics_cache = (svc.clock(), minute, rows)
        return rows


@metrics_bp.get("/api/analytics")
def api_analytics() -> Response:
    """Request volume per minute (allowed vs limited) and per tier; detail for admins only.

    Anonymous callers get up to ANALYTICS_PUBLIC_MINUTES from a short cache; admins any range
    up to a day, fresh."""
    svc = services()
    admin = auth.bearer_token() is not None
    if admin:
        g.admin_actor = auth.admin_actor()
    minutes = int_arg("minutes", 60, maximum=ANALYTICS_MAX_MINUTES)
    if not admin and minutes > ANALYTICS_PUBLIC_MINUTES:
        raise bad_request("minutes", f"'minutes' must be at most {ANALYTICS_PUBLIC_MINUTES} without the admin "
                                     f"token (at most {ANALYTICS_MAX_MINUTES} with it)")
    # The usage buckets are stamped with the app's clock, so the window must be measured by it too.
    minute = svc.now().replace(second=0, microsecond=0)
    since = minute - dt.timedelta(minutes=minutes - 1)
    rows = usage_since(svc, since) if admin else public_usage(svc, minute)
    by_minute: dict[dt.datetime, list[int]] = {}
    by_tier: dict[str, dict[str, int]] = {}
    for bucket, tier, allowed, limited in rows:
        if bucket < since:
            continue
        counts = by_minute.setdefault(bucket, [0, 0])
        counts[0] += allowed
        counts[1] += limited
        totals = by_tier.setdefault(tier, {"allowed": 0, "limited": 0})
        totals["allowed"] += allowed
        totals["limited"] += limited
    buckets = []
    for i in range(minutes):
        start = since + dt.timedelta(minutes=i)
        allowed, limited = by_minute.get(start, (0, 0))
        buckets.append({"t": db.iso(start), "allowed": allowed, "limited": limited})
    body: dict[str, Any] = {
        "minutes": minutes,
        "series": buckets,
        "totals": {"allowed": sum(b["allowed"] for b in buckets), "limited": sum(b["limited"] for b in buckets)},
        "by_tier": by_tier,
        "tier_limits": svc.config.tier_limits,
        "window_seconds": svc.config.window_seconds,
        "metrics": svc.metrics.snapshot(),
        "limiter_store": svc.limiter.store_kind,
        "limiter_health": svc.limiter.health(),
        "socketio": svc.socketio is not None,
    }
    if admin:
        body.update(admin_analytics(svc, since))
    return jsonify(body)


def admin_analytics(svc: Services, since: dt.datetime) -> dict[str, Any]:
    c = db.usage_counters.c
    k = db.api_keys.c
    svc.log_writer.flush_now()  # before opening our connection: the flush needs one of its own
    with svc.engine.connect() as conn:
        top = conn.execute(
            sa.select(k.prefix, k.name, c.tier, sa.func.sum(c.allowed).label("allowed"),
                      sa.func.sum(c.limited).label("limited"))
            .select_from(db.usage_counters.join(db.api_keys, db.api_keys.c.id == c.key_id))
            .where(c.bucket_start >= since).group_by(k.prefix, k.name, c.tier)
            .order_by(sa.desc("allowed")).limit(10)
        ).all()
        recent_429 = conn.execute(
            sa.select(db.request_logs).where(db.request_logs.c.status == 429)
            .order_by(db.request_logs.c.id.desc()).limit(20)
        ).all()
    return {
        "top_keys": [{"prefix": r.prefix, "name": r.name, "tier": r.tier, "allowed": int(r.allowed),
                      "limited": int(r.limited)} for r in top],
        "recent_429s": [{"timestamp": db.iso(r.timestamp), "path": r.path, "ip": r.ip, "key_prefix": r.key_prefix,
                         "message": r.message} for r in recent_429],
        "alerts": recent_alerts(20),
        "events": list(svc.events.recent)[:50],
    }


@dashboard_bp.get("/dashboard")
def dashboard() -> str:
    svc = services()
    return render_template("dashboard.html", tier_limits=svc.config.tier_limits, version=VERSION,
                           window_seconds=svc.config.window_seconds, socketio=svc.socketio is not None)


# --- request pipeline --------------------------------------------------------------------------

def ip_subject(address: str, ipv6_prefix: int) -> str:
    """What the per-IP limit, bans and throttles count: an IPv4 address as it is, an IPv6 address
    as its /``ipv6_prefix`` network (one client holds a whole /64, so per-address limits on IPv6
    would be no limits), an IPv4-mapped IPv6 address as its IPv4 address. Anything else (a
    malformed forwarded header) stays as it came, so it is still counted."""
    if len(address) > MAX_ADDRESS_CHARS:  # no address is this long; not worth a cache slot either
        return address
    return _ip_subject(address, ipv6_prefix)


MAX_ADDRESS_CHARS = 64


@functools.lru_cache(maxsize=16384)
def _ip_subject(address: str, ipv6_prefix: int) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ipv6_prefix >= 128:
        return str(ipaddress.IPv6Address(int(ip)))  # int(): without a zone id ("%eth0")
    return str(ipaddress.IPv6Network((int(ip), ipv6_prefix), strict=False))


def before_request() -> None:
    """Derive the client's subject (the one place it is derived), then the per-IP check, which runs
    before routing errors: a banned IP gets 429 on unknown paths, wrong methods and OPTIONS too."""
    g.started = time.perf_counter()
    svc = services()
    g.client_addr = request.remote_addr or "unknown"
    g.client_ip = ip_subject(g.client_addr, svc.config.ipv6_prefix_length)
    g.key_prefix = None
    g.user_id = None
    if request.endpoint in IP_EXEMPT_ENDPOINTS:
        return
    view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
    if getattr(view, "combined_ip_check", False) and request.method != "OPTIONS":
        return  # the view checks the IP in its own store call (an automatic OPTIONS never runs it)
    ip_guard(svc, g.client_ip)


CORS_PATHS = ("/data", "/usage", "/sdk/")
CORS_EXPOSE = "X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, RateLimit, RateLimit-Policy, Retry-After"
CORS_ALLOW_HEADERS = {"content-type", "x-api-key", "authorization"}
CORS_MAX_AGE = "600"


def add_cors_headers(response: Response, allowed_origins: list[str]) -> None:
    """CORS for the routes browsers call cross-origin (/data, /usage, /sdk/*), per CORS_ORIGINS.

    The allowed origin is echoed (with ``Vary: Origin``) even for ``*``, so caches never mix answers;
    a refused origin gets no CORS headers and the browser blocks the response. Done here rather
    than with flask-cors because it runs on every request of the hot path and costs a fraction."""
    origin = request.headers.get("Origin")
    if not origin or not request.path.startswith(CORS_PATHS):
        return
    response.vary.add("Origin")
    if "*" not in allowed_origins and origin not in allowed_origins:
        return
    headers = [("Access-Control-Allow-Origin", origin)]
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        asked = request.headers.get("Access-Control-Request-Headers", "")
        granted = [h.strip() for h in asked.split(",") if h.strip().lower() in CORS_ALLOW_HEADERS]
        headers += [("Access-Control-Allow-Methods", response.headers.get("Allow", "GET, POST, OPTIONS")),
                    ("Access-Control-Max-Age", CORS_MAX_AGE)]
        if granted:
            headers.append(("Access-Control-Allow-Headers", ", ".join(granted)))
    else:
        headers.append(("Access-Control-Expose-Headers", CORS_EXPOSE))
    response.headers.extend(headers)


# HTML pages: no framing, no MIME sniffing, no referrer leaks; scripts only from this origin
# (the SDK demo page teaches with an inline script, so it alone allows one).
PAGE_CSP = ("default-src 'self'; script-src 'self'{inline}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
PAGE_HEADERS = {"X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def add_security_headers(response: Response) -> None:
    response.headers["X-Content-Type-Options"] = "nosniff"
    if response.mimetype == "text/html":
        inline = " 'unsafe-inline'" if request.endpoint == "sdk.sdk_page" else ""
        response.headers["Content-Security-Policy"] = PAGE_CSP.format(inline=inline)
        response.headers.update(PAGE_HEADERS)


def after_request(response: Response) -> Response:
    add_security_headers(response)
    rate = g.get("rate_headers")
    if rate:  # appended, not set one by one: Headers.set/setdefault scan and raise per header (hot path)
        response.headers.extend(rate)
    if request.endpoint in ("static", "sdk.sdk_js"):
        return response
    svc = services()
    add_cors_headers(response, svc.config.cors_origins)
    duration = time.perf_counter() - g.get("started", time.perf_counter())
    svc.metrics.observe_request(response.status_code, duration)
    status = response.status_code
    level = "ERROR" if status >= 500 else "WARNING" if status >= 400 else "INFO"
    message = ""
    if status >= 400 and response.is_json:
        body = response.get_json(silent=True) or {}
        message = str(body.get("error", ""))[:500]
    if message == "ip_banned" and svc.refusal_log is not None:
        # A banned client's flood is not counted against it, so it must not write a row per request.
        skipped = svc.refusal_log.admit(g.get("client_ip") or "unknown")
        if skipped is None:
            return response
        if skipped:
            message = f"ip_banned; {skipped} more refusals of this client not logged"
    record = {
        "timestamp": db.utcnow(), "level": level, "method": request.method, "path": request.path[:500],
        "status": status, "ip": g.get("client_addr"), "key_prefix": g.get("key_prefix"),
        "user_id": g.get("user_id"), "duration_ms": round(duration * 1000, 3), "message": message,
    }
    svc.log_writer.put(record)
    svc.request_logger.log({**record, "timestamp": db.iso(record["timestamp"])})
    return response


HOUSEKEEPING_SECONDS = 3600.0


def run_housekeeping(svc: Services) -> None:
    """Apply LOG_RETENTION_DAYS: rotated log files and request-log rows older than that go (with
    spent tokens). Each cutoff is measured by the clock that stamped the data (file times, row
    timestamps), so only the schedule follows the app's clock."""
    files = svc.request_logger.prune()
    rows = db.purge_expired(svc.engine, log_retention_days=svc.config.log_retention_days)
    if files or any(rows.values()):
        log.info("retention: removed %d rotated log files and %s", len(files),
                 ", ".join(f"{n} {table} rows" for table, n in rows.items()))


def run_flusher(svc: Services) -> None:
    """Background loop: write usage counters every ``flush_interval`` until the app stops, and
    apply log retention at start-up and every HOUSEKEEPING_SECONDS after (by ``svc.clock``)."""
    while not svc.stopping.wait(svc.config.flush_interval):
        try:
            svc.usage.flush()
        except Exception:  # keep the loop alive whatever the database does
            log.exception("usage flush loop error")
        now = svc.clock()
        if now >= svc.housekeeping_due:
            svc.housekeeping_due = now + HOUSEKEEPING_SECONDS
            try:
                run_housekeeping(svc)
            except Exception:  # a failed pass is retried at the next one
                log.exception("log retention pass failed")


# --- factory -----------------------------------------------------------------------------------

def build_services(config: Config, clock: Callable[[], float]) -> Services:
    # A bad policy file stops start-up (PolicyError is a ConfigError) before anything is opened.
    rules = load_policy(config.policy_path, config.tier_limits, config.window_seconds) if config.policy_path else None
    engine = db.open_database(config.database_url)
    limiter = RateLimiter.from_config(config, clock=clock, rules=rules)
    request_logger = RequestLogger.from_config(config)
    svc = Services(
        config=config, engine=engine, limiter=limiter, clock=clock,
        metrics=Metrics(clock=clock), usage=UsageRecorder(engine, clock=clock),
        keys=KeyDirectory(engine, clock=clock), notifier=Notifier(config, clock=clock),
        request_logger=request_logger,
        log_writer=BatchWriter(lambda rows: db.add_request_logs(engine, rows), interval=config.flush_interval,
                               name="request-log-writer", transient=db.is_transient_error),
        alert_writer=BatchWriter(lambda rows: _write_alerts(engine, rows), interval=config.flush_interval,
                                 name="alert-writer", transient=db.is_transient_error),
        rules=rules,
    )
    svc.events = EventBus(svc)
    svc.refusal_log = RefusalSampler(clock=clock)
    svc.abuse = AbuseDetector.from_config(config, on_alert=lambda alert: on_alert(svc, alert), clock=clock)
    return svc


def _write_alerts(engine: sa.engine.Engine, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(db.alerts.insert(), rows)


def on_alert(svc: Services, alert: Alert) -> None:
    """Abuse detector callback: a 429 storm is a rate-limit spike; the rest are abuse alerts."""
    kind = "rate_limit_spike" if alert.kind == "rate_limited" else "abuse_alert"
    svc.events.emit(kind, alert.source, alert_kind=alert.kind, count=alert.count,
                    window_seconds=alert.window_seconds, severity=alert.severity)
    if svc.config.abuse_auto_ban and alert.kind in ("failed_login", "invalid_key"):
        svc.limiter.ban_ip(alert.source, svc.config.temp_ban_seconds)
        svc.events.emit("ip_banned", alert.source, seconds=svc.config.temp_ban_seconds, reason=alert.kind)


def init_socketio(app: Flask, svc: Services) -> None:
    if not svc.config.enable_socketio:
        return
    if svc.config.web_concurrency > 1:
        log.warning("ENABLE_SOCKETIO ignored with %s workers (Socket.IO needs sticky sessions); "
                    "the dashboard polls instead", svc.config.web_concurrency)
        return
    from flask_socketio import SocketIO, emit, join_room

    socketio = SocketIO(app, async_mode="threading", logger=False, engineio_logger=False)
    svc.socketio = socketio
    started = threading.Event()

    def snapshot() -> dict[str, Any]:
        return {**svc.metrics.snapshot(), "limiter_health": svc.limiter.health()}

    def push_metrics() -> None:
        while not svc.stopping.wait(2.0):
            socketio.emit("metrics", snapshot())

    def is_admin(auth_data: Any) -> bool:
        token = auth_data.get("token") if isinstance(auth_data, dict) else None
        admin_token = svc.config.admin_token
        return bool(isinstance(token, str) and admin_token
                    and hmac.compare_digest(token.encode("utf-8"), admin_token.encode("utf-8")))

    @socketio.on("connect")
    def _connect(auth_data: Any = None) -> None:
        if is_admin(auth_data):
            join_room(ADMIN_ROOM)
        emit("metrics", snapshot())  # the new client sees numbers at once, not after the next tick
        if not started.is_set():
            started.set()
            socketio.start_background_task(push_metrics)


def create_app(config: Config | None = None, *, clock: Callable[[], float] = time.time) -> Flask:
    """Build the API. Raises ConfigError / database.DatabaseError with a one-line message."""
    config = (config or Config.from_env()).validate()
    configure_logging(config)
    log_redaction.install()  # werkzeug's and gunicorn's access logs quote ?api_key=
    if config.jwt_secret_generated:
        log.warning("JWT_SECRET_KEY is not set: using a random key for this process (tokens die on restart)")
    if config.web_concurrency > 1 and config.store_kind == "memory":
        log.warning("WEB_CONCURRENCY=%s without REDIS_URL: each worker keeps its own counters, so every limit "
                    "is multiplied by the number of workers. Set REDIS_URL.", config.web_concurrency)
    app = Flask(__name__, static_folder="static", template_folder="templates")
    app.config.update(MAX_CONTENT_LENGTH=config.max_content_length, TESTING=config.testing)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    if config.trusted_proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=config.trusted_proxies, x_proto=config.trusted_proxies)
    errors.init_app(app)
    # Any limiter call may find the shared store down in fail mode "closed": always a JSON 503.
    app.register_error_handler(StoreUnavailable, lambda _exc: errors.error_response(
        503, "limiter_unavailable", "The rate-limit store is unreachable; try again shortly", {"Retry-After": "5"}))
    svc = build_services(config, clock)
    app.extensions.update({"rl": svc, "rl.config": config, "rl.engine": svc.engine, "rl.limiter": svc.limiter})
    auth.JWTManager(app, clock=clock)
    svc.notifier.init_app(app)
    with app.app_context():
        try:
            current_app.extensions["jwt"].load_revocations()
        except StoreUnavailable:  # fail mode closed, store down: seeded on the first request that finds it empty
            log.warning("rate-limit store unreachable at start-up; revocations will be seeded when it answers")
    gateway.init_app(app, svc.engine)  # before the blueprints (URL converter) and after_request below
    for blueprint in (core, auth_bp, data_bp, sdk_bp, admin_bp, dashboard_bp, metrics_bp, gateway_bp):
        app.register_blueprint(blueprint)
    app.before_request(before_request)
    app.after_request(after_request)
    init_socketio(app, svc)
    svc.flusher = threading.Thread(target=run_flusher, args=(svc,), name="usage-flusher", daemon=True)
    svc.flusher.start()
    atexit.register(svc.close)
    return app


# --- entry points --------------------------------------------------------------------------------

_lazy_app: Flask | None = None
_lazy_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """``app.app`` for gunicorn, built on first access so that importing this module does no I/O."""
    global _lazy_app
    if name != "app":
        raise AttributeError(name)
    with _lazy_lock:
        if _lazy_app is None:
            try:
                _lazy_app = create_app()
            except (ConfigError, db.DatabaseError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                # 3 is gunicorn's "worker failed to boot": the arbiter stops instead of respawning.
                raise SystemExit(3) from None
    return _lazy_app


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # SO_REUSEADDR as the server itself uses: connections of a killed predecessor in TIME_WAIT
        # must not make a restart look like a busy port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python app.py", description="Run the API rate limiter service.")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=None, help="default: PORT or 5000")
    parser.add_argument("--ssl-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--ssl-key", help="private key for --ssl-cert (PEM)")
    args = parser.parse_args(argv)
    if bool(args.ssl_cert) != bool(args.ssl_key):
        print("error: --ssl-cert and --ssl-key go together", file=sys.stderr)
        return 2
    try:
        config = Config.from_env()
        application = create_app(config)
    except (ConfigError, db.DatabaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    port = args.port or config.port
    if port_in_use(args.host, port):
        print(f"error: port {port} on {args.host} is already in use; stop the other process or use --port",
              file=sys.stderr)
        return 1
    ssl_context = (args.ssl_cert, args.ssl_key) if args.ssl_cert else None
    log.info("serving on %s://%s:%s", "https" if ssl_context else "http", args.host, port)
    svc = application.extensions["rl"]
    signal.signal(signal.SIGTERM, _interrupt)  # flush analytics and logs on a supervisor's TERM too
    try:
        if svc.socketio is not None:
            svc.socketio.run(application, host=args.host, port=port, ssl_context=ssl_context,
                             allow_unsafe_werkzeug=True, use_reloader=False, log_output=False)
        else:
            application.run(host=args.host, port=port, ssl_context=ssl_context, use_reloader=False, threaded=True)
    except KeyboardInterrupt:
        pass
    finally:
        svc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
