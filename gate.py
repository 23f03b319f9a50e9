"""The request gate: who a request is (API key identity, client-IP subject), whether its IP has
been counted (``IpCheck``), and the decision: consume or peek a key's or user's limits in one store
round trip, rate headers, 429/401/403 refusals.

``KeyDirectory`` maps a presented key to its immutable identity with a per-process cache; tier
and blocked state stay in the limiter store, so every worker sees a change on the next request.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hmac
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from flask import current_app, g, request
from werkzeug.exceptions import HTTPException

import auth
import database as db
import log_manager as abuse
import notifier as events
import policy_rules
from config import DEFAULT_TIER
from errors import ApiError, bad_request
from limiter import LimitResult, PolicyDecision, RequestDecision

if TYPE_CHECKING:
    from wiring import Services

log = logging.getLogger("ratelimiter")

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


# --- the per-IP check: counted once per request ------------------------------------------------

_COMBINED_CHECK = "_checks_ip_in_its_store_call"


class IpCheck:
    """Whether this request's client IP has been counted against the per-IP limit: the one owner of
    that state, kept on ``g`` from before_request on. Most views have it counted before they run;
    views under ``refused_before_the_combined_check`` leave it pending for their combined IP+key
    store call (one round trip), and whatever refuses the request first counts it, once."""

    def __init__(self, svc: Services, ip: str) -> None:
        self._svc = svc
        self.ip = ip
        self.counted = False

    @classmethod
    def start(cls, svc: Services, ip: str) -> IpCheck:
        check = g.ip_check = cls(svc, ip)
        return check

    def before_view(self, view: Callable[..., Any] | None, method: str) -> None:
        """Count now, unless the view counts in its own store call (an automatic OPTIONS never runs it)."""
        if getattr(view, _COMBINED_CHECK, False) and method != "OPTIONS":
            return
        self.now()

    def pending(self) -> str | None:
        """The IP for a combined store call to count, or None when it has been counted already."""
        return None if self.counted else self.ip

    def now(self) -> None:
        """The per-IP limit on its own (one store call) unless already counted; 429 ip_banned when refused."""
        if self.counted:
            return
        self.counted = True
        ip_guard(self._svc, self.ip)

    def record(self, decision: Any) -> None:
        """The IP part of a combined store call's answer: a started ban is an event; a refusal raises."""
        self.counted = True
        record_ip_decision(self._svc, self.ip, decision)


def ip_check() -> IpCheck:
    """This request's IP check (made by before_request)."""
    check: IpCheck = g.ip_check
    return check


# --- decisions: rate headers, consume and peek of keys and users ----------------------------------

def epoch_ceil(value: float) -> int:
    return int(math.ceil(value))


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


def refuse_ip(svc: Services, decision: Any) -> ApiError:
    svc.metrics.observe_ip_refusal()
    retry = max(1, epoch_ceil(decision.retry_after))
    return ApiError(429, "ip_banned", f"Too many requests from this IP address; try again in {retry} s",
                    headers={"Retry-After": str(retry)}, retry_after=retry)


def record_ip_decision(svc: Services, ip: str, decision: Any) -> None:
    if decision is None:
        return
    if decision.ban_started:
        svc.events.emit(events.IP_BANNED, ip, ban_count=decision.ban_count, seconds=epoch_ceil(decision.retry_after))
        svc.abuse.record(abuse.IP_BAN, ip, ban_count=decision.ban_count)  # its callback emits any alert
    if not decision.allowed:
        raise refuse_ip(svc, decision)


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
                return DEFAULT_TIER, True
            return row.tier, bool(row.blocked or row.revoked_at is not None)
        user = conn.execute(
            sa.select(db.users.c.tier, db.users.c.created_at).where(db.users.c.id == int(ident))
        ).first()
        if user is None or auth.account_stamp(user.created_at) != tag:
            return DEFAULT_TIER, True
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
        ip_check().record(decision.ip)
    return decision


def clean_tier(svc: Services, decision: RequestDecision | PolicyDecision) -> str:
    """The tier to report for a decision, the same in headers and body.

    The store's meta is data, not trusted: a tier it does not know was limited at the default
    (free) limit, and must not reach headers, bodies, metrics labels or analytics rows as it is."""
    return decision.tier if decision.tier in svc.config.tier_limits else DEFAULT_TIER


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
        svc.abuse.record(abuse.RATE_LIMITED, key.prefix if key else usage_subject)
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
    ip_check().now()
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
        ip_check().record(decision.ip)
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
        svc.abuse.record(abuse.RATE_LIMITED, key.prefix if key else usage_subject)
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
        svc.events.emit(events.CREDITS_LOW, key.prefix, key_id=key.id, credits_remaining=remaining, threshold=threshold)


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
        try:
            return view(*args, **kwargs)
        except ApiError as exc:
            if exc.code not in ("ip_banned", "limiter_unavailable"):
                ip_check().now()
            raise
        except HTTPException:  # e.g. a 413 body: a banned IP is refused as such, and the IP counts
            ip_check().now()
            raise

    setattr(wrapper, _COMBINED_CHECK, True)  # read by IpCheck.before_view, and nowhere else
    return wrapper


def resolve_key(svc: Services, raw_key: str | None) -> KeyRecord:
    """Authenticate an API key. When the cache knew the key, the IP check is left for the combined
    store call; otherwise it is done first, so a banned IP guessing keys never reaches the database."""
    if not raw_key:
        raise ApiError(401, "missing_api_key", "Send an API key as X-API-Key header or api_key parameter")
    if len(raw_key) > 200:
        raise ApiError(401, "invalid_api_key", "The API key is not valid")
    key_hash, record, known = svc.keys.cached(raw_key)
    if not known:
        ip_check().now()
        record = svc.keys.load(key_hash)
    if record is None:
        ip_check().now()
        svc.abuse.record(abuse.INVALID_KEY, g.client_ip)
        raise ApiError(401, "invalid_api_key", "The API key is not valid")
    g.key_prefix = record.prefix
    g.user_id = record.user_id
    if record.expires_at is not None and svc.clock() >= record.expires_at:
        ip_check().now()
        raise ApiError(401, "api_key_expired", "This API key has expired; create a new one",
                       expired_at=db.iso(db.from_epoch(record.expires_at)))
    return record


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
    record = resolve_key(svc, raw_key)
    subject = record.subject
    decision = decide(svc, ip_check().pending(), subject)
    if decision.blocked:
        raise refuse_blocked_key(svc, record)
    result = apply_limit(svc, decision, subject, key=record, user_id=record.user_id)
    return record, result, clean_tier(svc, decision)


def peek_key(svc: Services, raw_key: str | None) -> tuple[KeyRecord, LimitResult, str]:
    """Authenticate a key and read its window without consuming (for /usage and /sdk/check):
    the same single store call as /data, tier and block state included, no database read."""
    record = resolve_key(svc, raw_key)
    subject = record.subject
    decision = decide(svc, ip_check().pending(), subject, consume=False)
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


def consume_user(svc: Services, token: str) -> tuple[LimitResult, str]:
    """A JWT call to /data: limited per user, revocation read in the same store call."""
    manager: auth.JWTManager = current_app.extensions["jwt"]
    try:
        claims = manager.decode(token, "access")
    except ApiError:
        ip_check().now()
        raise
    g.user_id = int(claims["sub"])
    subject = user_subject(g.user_id, claims["gen"])
    flag = f"revoked:{claims['jti']}"
    decision = decide(svc, ip_check().pending(), subject, [flag])
    revoked = decision.flags.get(flag, False) or manager.revoked_although_not_flagged(
        claims["jti"], store_lost_meta=decision.meta_missing)
    if revoked:
        raise ApiError(401, "token_revoked", "The token has been revoked")
    if decision.blocked:
        raise ApiError(401, "invalid_token", "The account of this token no longer exists")
    result = apply_limit(svc, decision, subject, key=None, user_id=g.user_id)
    return result, clean_tier(svc, decision)
