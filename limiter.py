"""The rate limiter: ``RateLimiter``, the facade the app calls, and the decisions it returns.

``RateLimiter`` makes every decision in one atomic store operation: on ``memory://`` a Python
function under a lock (store_memory.py), on Redis one Lua script (store_redis.py). Both stores
implement store.Store and answer with the same named replies, which this module turns into
results, so they decide identically for the same timeline. Times are integer microseconds of the
injected clock, passed into the scripts (never Redis TIME), so tests can drive time and app
instances agree. The algorithms live in strategies.py; the store is picked by URL scheme from
store.STORE_SCHEMES. This module also owns the fail modes (fallback, queued writes, recovery)
and the refusal cache.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from config import DEFAULT_TIER
from policy import default_policy, limit_name
from redis_wire import redact_url
from refusal_cache import EVERYTHING, RefusalCache
from store import (
    BAN_STARTED,
    BANNED,
    DAY_US,
    DECIDED,
    MEMORY,
    MISSING,
    NEEDS_POLICY,
    NO_CREDITS,
    SHORT,
    STORE_ERRORS,
    CheckReply,
    Keys,
    Policy,
    PolicyReply,
    RuleLimit,
    Store,
    encode_override,
    new_nonce,
    parse_override,
    url_kind,
    valid_schemes,
)
from store_memory import MemoryStore
from store_redis import ClusterStore, make_redis_store
from strategies import STRATEGIES, US, LimitResult, get_strategy

__all__ = [  # what callers import from here; the parts live in strategies.py and the store modules
    "STRATEGIES", "US", "IpDecision", "Keys", "LimitOutcome", "LimitResult", "PolicyDecision", "RateLimiter",
    "RequestDecision", "StoreUnavailable", "get_strategy",
]

log = logging.getLogger(__name__)

FAIL_MODES = ("memory", "open", "closed")
PROBE_FIRST_US, PROBE_MAX_US = 1 * US, 30 * US
HEALTH_PROBE_US = 1 * US  # health() pings an up store at most this often


class IpDecision(NamedTuple):
    allowed: bool
    banned: bool
    retry_after: float
    ban_count: int
    ban_started: bool


class RequestDecision(NamedTuple):
    ip: IpDecision | None
    result: LimitResult | None
    tier: str | None
    blocked: bool
    meta_missing: bool
    flags: dict[str, bool]
    needs_policy: bool = False  # an override or credits apply: ask check_policy (nothing was counted)


class StoreUnavailable(Exception):
    """The shared store is down and fail_mode is "closed": the caller answers 503."""


class LimitOutcome(NamedTuple):
    """How one limit of a policy decision answered; ``shadow`` limits report but never refuse."""

    name: str
    source: str
    quota: int
    window: int
    shadow: bool
    result: LimitResult


class PolicyDecision(NamedTuple):
    """A multi-limit decision. ``result`` is the limit to report (the refusing one, else the one
    closest to refusal); ``allowed`` False with ``credits_exhausted`` means only credits refused."""

    ip: IpDecision | None
    result: LimitResult | None
    tier: str | None
    blocked: bool
    meta_missing: bool
    flags: dict[str, bool]
    allowed: bool = True
    limits: tuple[LimitOutcome, ...] = ()
    reported: LimitOutcome | None = None
    credits: int | None = None
    credits_exhausted: bool = False
    shadow_refused: tuple[LimitOutcome, ...] = ()


def _periods(now: int) -> tuple[str, str]:
    """Credit refill periods of clock time ``now`` (us): UTC day number and month number."""
    seconds = now // US
    day = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return str(seconds // 86400), str(day.year * 12 + day.month - 1)


_new_tuple = tuple.__new__

# writes queued while down
_REPLAYED = frozenset(("set_meta", "delete_meta", "set_flag", "ban", "unban", "set_policy_meta", "set_credits"))


class RateLimiter:
    """Rate limiter with IP bans, subject meta and flags over a memory or Redis store.

    When Redis is unreachable, ``fail_mode`` decides: "memory" falls back to a per-process
    store and re-probes with backoff, "open" admits everything (answers from the fallback
    store for meta and flags), "closed" raises StoreUnavailable. No store error escapes.

    Writes made while Redis is unreachable are queued (latest per key) and replayed when it
    answers again: flags and bans as they were made, an unban only if no ban started after it,
    and meta writes as deletes. Meta is a cache of the app's database: replaying a fill made
    during the outage could overwrite a newer change made through another worker, whereas a
    delete makes the next request report ``meta_missing`` and reload it.
    """

    def __init__(self, storage_url: str = "memory://", strategy: str = "sliding_window", *,
                 tier_limits: dict[str, int], window: int = 60, ip_limit: int = 100, ip_window: int = 60,
                 ban_seconds: int = 300, ban_multiplier: float = 2.0, fail_mode: str = "memory",
                 key_prefix: str = "rl", clock: Callable[[], float] = time.time, refusal_cache: bool = True,
                 rules: Any = None) -> None:
        kind = url_kind(storage_url)
        if kind is None:
            raise ValueError(f"unknown storage URL {redact_url(storage_url)!r}; valid schemes: {valid_schemes()}")
        if fail_mode not in FAIL_MODES:
            raise ValueError(f"unknown fail_mode {fail_mode!r}; valid: {', '.join(FAIL_MODES)}")
        if not tier_limits:
            raise ValueError("tier_limits must name at least one tier")
        self.strategy = get_strategy(strategy)
        self.tier_limits = dict(tier_limits)
        self.default_limit = tier_limits.get(DEFAULT_TIER, min(tier_limits.values()))
        self.window, self.ip_limit, self.ip_window = window, ip_limit, ip_window
        self.ban_seconds, self.ban_multiplier = ban_seconds, ban_multiplier
        self.fail_mode = fail_mode
        self.keys = Keys(key_prefix)
        self._clock = clock
        self.policy = Policy(self.tier_limits, self.default_limit, window * US, ip_limit, ip_window * US,
                             ban_seconds * US, float(ban_multiplier))
        self._subject_prefix = f"{key_prefix}:{{k:"
        self._strategy_suffix = f"}}:{self.strategy.suffix}"
        self._configure_rules(rules)  # may set self.policy: before the stores are made
        self._fallback: Store = MemoryStore(self.keys, self.strategy, self.policy)
        self._fallback.configure_policy(self._tier_rules, self._rules_default, self.rules_shadow)
        self._store: Store = self._fallback
        self._down = False
        self._probe_delay = PROBE_FIRST_US
        self._next_probe = 0
        self._pending: dict[str, tuple[str, tuple]] = {}  # writes made while down, replayed on recovery
        self._state_lock = threading.Lock()  # guards _down, the probe times and _pending
        self._health_at = -2 * HEALTH_PROBE_US  # clock time of health()'s last PING of an up store
        self._refusals: RefusalCache | None = None  # refusals answered from memory (shared stores only)
        self._channel = f"{key_prefix}:refusals"
        if kind == MEMORY:
            return
        store = make_redis_store(storage_url, self.keys, self.strategy, self.policy)
        store.configure_policy(self._tier_rules, self._rules_default, self.rules_shadow)
        if refusal_cache:
            self._refusals = RefusalCache(store.subscriber(self._channel))
        self._store = store
        try:
            self._store.ping()
        except STORE_ERRORS as exc:
            self._mark_down(exc, self._now())

    @classmethod
    def from_config(cls, config: Any, clock: Callable[[], float] = time.time, rules: Any = None) -> RateLimiter:
        """Build from ``config.Config``."""
        return cls(config.storage_url, config.strategy, tier_limits=config.tier_limits, window=config.window_seconds,
                   ip_limit=config.ip_rate_limit, ip_window=config.ip_window, ban_seconds=config.temp_ban_seconds,
                   ban_multiplier=config.ban_multiplier, fail_mode=config.fail_mode, key_prefix=config.key_prefix,
                   clock=clock, rules=rules, refusal_cache=config.refusal_cache)

    @property
    def supports_policy(self) -> bool:
        """False on Redis Cluster: the multi-limit script reads the IP's and the subject's keys in one
        call, which a cluster cannot run across slots (a policy file is refused there at start-up)."""
        return not isinstance(self._store, ClusterStore)

    @property
    def store_kind(self) -> str:
        """The configured store ("memory" or "redis"), also while falling back."""
        return self._store.kind

    def _now(self) -> int:
        return round(self._clock() * US)

    # ---- fail modes
    def _mark_down(self, exc: Exception, now: int) -> None:
        if self._refusals is not None:
            self._refusals.clear()
        with self._state_lock:
            if not self._down:
                log.warning("rate-limit store unreachable (%s); fail_mode=%s until it answers again", exc,
                            self.fail_mode)
                self._down, self._probe_delay = True, PROBE_FIRST_US
            self._next_probe = now + self._probe_delay

    def _try_recover(self, now: int) -> bool:
        """Re-probe Redis when the backoff allows; True when it is back."""
        if now < self._next_probe:
            return False
        with self._state_lock:
            if not self._down:
                return True
            self._next_probe = now + PROBE_MAX_US  # one prober at a time
        try:
            self._store.ping()
            while True:  # writes queued while replaying are replayed before the store counts as up
                with self._state_lock:
                    batch, self._pending = self._pending, {}
                    if not batch:
                        self._down = False
                        self._fallback.reset()
                        break
                self._replay(batch)
        except STORE_ERRORS:
            with self._state_lock:
                self._probe_delay = min(self._probe_delay * 2, PROBE_MAX_US)
                self._next_probe = now + self._probe_delay
            return False
        log.warning("rate-limit store reachable again; shared limits restored")
        if self._refusals is not None:  # writes made during the outage published nothing: drop every refusal
            self._invalidate(EVERYTHING)
        return True

    def _replay(self, batch: dict[str, tuple[str, tuple]]) -> None:
        """Apply queued writes in order; on failure re-queue the rest (newer writes to a key win)."""
        items = list(batch.items())
        for i, (_, (op, args)) in enumerate(items):
            try:
                getattr(self._store, op)(*args)
            except BaseException:
                with self._state_lock:
                    rest = {key: entry for key, entry in items[i:] if key not in self._pending}
                    rest.update(self._pending)
                    self._pending = rest
                raise

    def _queue(self, op: str, args: tuple) -> bool:
        """Queue a write made while down for replay; False if the store is up again (write through)."""
        if op in ("set_meta", "set_policy_meta"):  # a cache fill may be stale by recovery: replay it as a delete
            entry = ("delete_meta", args[:2])
        elif op == "unban":
            entry = ("unban", (*args, True))
        else:
            entry = (op, args)
        with self._state_lock:
            if not self._down:
                return False
            if len(self._pending) < 100_000 or args[0] in self._pending:
                self._pending.pop(args[0], None)  # the latest write per key wins, in order
                self._pending[args[0]] = entry
            return True

    def _exec(self, op: str, *args: Any) -> tuple[Any, bool]:
        """Run ``op`` on the store: (raw, degraded). Falls back, or raises StoreUnavailable."""
        for _ in range(2):
            if not self._down or self._try_recover(self._now()):
                try:
                    return getattr(self._store, op)(*args), False
                except STORE_ERRORS as exc:
                    self._mark_down(exc, self._now())
            if self.fail_mode == "closed":
                raise StoreUnavailable("rate-limit store is unreachable")
            if op not in _REPLAYED or self._queue(op, args):
                break
        if op == "check" and self.fail_mode == "open":
            args = (args[0], args[1], "", args[3])  # open: no IP counting; meta and flags from the fallback
        return getattr(self._fallback, op)(*args), True

    def health(self) -> str:
        """"ok", or "degraded" while the shared store is unreachable.

        Down: re-probes when the backoff allows. Up: PINGs Redis at most once per second of the
        clock (cheap enough to poll), so an idle instance notices an outage too.
        """
        now = self._now()
        if self._down:
            return "ok" if self._try_recover(now) else "degraded"
        if self._store is self._fallback or 0 <= now - self._health_at < HEALTH_PROBE_US:
            return "ok"  # (a clock set back re-probes at once)
        with self._state_lock:  # one prober; the others answer from the last probe
            if self._down or 0 <= now - self._health_at < HEALTH_PROBE_US:
                return "degraded" if self._down else "ok"
            self._health_at = now
        try:
            self._store.alive()
        except STORE_ERRORS as exc:
            self._mark_down(exc, now)
            return "degraded"
        return "ok"

    # ---- limits
    def _limit(self, subject: str, limit: int, window: int | None, cost: int, record: int,
               open_when_down: bool = True) -> LimitResult:
        if cost < 1:
            raise ValueError("cost must be >= 1")
        now = round(self._clock() * US)
        win = (window or self.window) * US
        key = f"{self._subject_prefix}{subject}{self._strategy_suffix}"
        if not self._down:  # fast path: no tuple packing, no getattr
            try:
                return self.strategy.result(self._store.hit(key, now, limit, win, cost, record), now, limit, win, cost)
            except STORE_ERRORS as exc:
                self._mark_down(exc, now)
        raw, degraded = self._exec("hit", key, now, limit, win, cost, record)
        if degraded and self.fail_mode == "open" and open_when_down:
            return LimitResult(True, limit, max(0, limit - cost), (now + win) / US, 0.0)
        return self.strategy.result(raw, now, limit, win, cost)

    def hit(self, subject: str, limit: int, window: int | None = None, cost: int = 1, *,
            open_when_down: bool = True) -> LimitResult:
        """Atomically decide and, if admitted, record ``cost`` requests for ``subject``.

        The log is per subject (not per limit or window), so a tier change keeps what was counted.
        ``open_when_down=False`` is for brute-force throttles (sign-in, registration): in fail mode
        "open" they still count, per process, while the shared store is down, instead of admitting all.
        """
        return self._limit(subject, limit, window, cost, 1, open_when_down)

    def peek(self, subject: str, limit: int, window: int | None = None) -> LimitResult:
        """What ``hit`` would answer now for one request, consuming nothing."""
        return self._limit(subject, limit, window, 1, 0)

    def check_request(self, ip: str | None, subject: str | None, flags: Sequence[str] = (), *,
                      consume: bool = True) -> RequestDecision:
        """The hot path in one store round trip: IP ban and limit, subject meta, subject hit, flags.

        When the subject's meta is missing nothing is recorded (not even the IP hit): the
        caller loads tier/blocked from the database, calls ``set_meta`` and calls again.
        ``consume=False`` peeks at the subject (same answer, nothing recorded for it; the IP
        still counts), e.g. for a "may I?" check that must not spend the budget.
        """
        now = round(self._clock() * US)
        keys = self.keys.check_keys(ip, subject, self.strategy.suffix, flags)
        # 0: no subject, 1: count the request, 2: peek. Passed through to both stores as is.
        has_subject = 0 if subject is None else 1 if consume else 2
        if not self._down:  # fast path, as in _limit
            cache, generation = self._refusals, None
            if cache is not None and not flags:  # flags are answered by the store only
                cached = self._cached_refusal(cache, ip, subject, now)
                if cached is not None:
                    return cached
                generation = cache.ready()
            try:
                decision = self._decision(self._store.check(keys, now, ip or "", has_subject), now, ip, flags, False)
            except STORE_ERRORS as exc:
                self._mark_down(exc, now)
            else:
                if generation is not None:
                    self._remember(cache, decision, ip, subject, now, generation)  # type: ignore[arg-type]
                return decision
        raw, degraded = self._exec("check", keys, now, ip or "", has_subject)
        return self._decision(raw, now, ip, flags, degraded and self.fail_mode == "open")

    # ---- the refusal cache: "i:<ip>" banned until; "s:<subject>" refused until (tier, limit, reset)
    @staticmethod
    def _cached_refusal(cache: RefusalCache, ip: str | None, subject: str | None, now: int) -> RequestDecision | None:
        if ip is not None:
            ban = cache.get("i:" + ip, now)
            if ban is not None:
                until, bans = ban
                return RequestDecision(IpDecision(False, True, (until - now) / US, bans, False), None, None, False,
                                       False, {})
        if subject is not None:
            refusal = cache.get("s:" + subject, now)
            if refusal is not None:
                until, tier, limit, reset = refusal
                result = _new_tuple(LimitResult, (False, limit, 0, reset, (until - now) / US))
                # ban_count is only reported with a ban that starts: 0 here, as for any admitted IP
                ip_decision = None if ip is None else IpDecision(True, False, 0.0, 0, False)
                return RequestDecision(ip_decision, result, tier, False, False, {})
        return None

    @staticmethod
    def _remember(cache: RefusalCache, decision: RequestDecision, ip: str | None, subject: str | None, now: int,
                  generation: int) -> None:
        ip_decision, result = decision.ip, decision.result
        if ip_decision is not None and ip_decision.banned and ip_decision.retry_after > 0:
            until = now + round(ip_decision.retry_after * US)
            cache.put("i:" + ip, until, (until, ip_decision.ban_count), generation)  # type: ignore[operator]
        elif result is not None and not result.allowed and result.retry_after > 0 and not decision.blocked:
            until = now + round(result.retry_after * US)
            cache.put("s:" + subject, until, (until, decision.tier, result.limit, result.reset),  # type: ignore[operator]
                      generation)

    def _invalidate(self, name: str) -> None:
        """Drop ``name``'s cached refusal here and, through the store's channel, in every process."""
        cache = self._refusals
        if cache is None:
            return
        cache.drop(name)
        try:
            self._exec("publish", self._channel, name)
        except StoreUnavailable:
            pass  # the others' subscriptions break too; recovery then invalidates everything

    def invalidate_refusals(self, subject: str | None = None) -> None:
        """Forget cached refusals of ``subject`` (all when None) in every process, e.g. after an
        override raised its limit. set_meta, delete_meta, unban_ip and reset call this themselves."""
        self._invalidate(EVERYTHING if subject is None else "s:" + subject)

    def _decision(self, reply: CheckReply, now: int, ip: str | None, flags: Sequence[str],
                  opened: bool) -> RequestDecision:
        meta = reply.meta
        if meta == NEEDS_POLICY and not opened:  # the subject has an override or credits: nothing was counted
            return RequestDecision(None, None, None, False, False, {}, True)
        flag_map = {name: bool(v) for name, v in zip(flags, reply.flags, strict=True)} if flags else {}
        ip_decision = None
        if ip is not None:
            refused = reply.ip >= BANNED
            if opened:
                ip_decision = IpDecision(True, False, 0.0, reply.bans, False)
            else:
                ip_decision = IpDecision(not refused, refused, max(0, reply.ip_until - now) / US if refused else 0.0,
                                         reply.bans, reply.ip == BAN_STARTED)
            if refused and not opened:
                return RequestDecision(ip_decision, None, None, False, False, flag_map)
        result = None
        if meta == DECIDED:
            limit, win = reply.limit, self.policy.window
            result = (LimitResult(True, limit, max(0, limit - 1), (now + win) / US, 0.0) if opened
                      else self.strategy.result(reply.hit, now, limit, win, 1))
        return RequestDecision(ip_decision, result, reply.tier or None, bool(reply.blocked), meta == MISSING, flag_map)

    # ---- policy decisions: several limits, cost, overrides, credits (one store round trip)
    def _configure_rules(self, rules: Any) -> None:
        """Tier limits as the stores enforce them; ``rules`` is a policy.Policy (None: one window per tier)."""
        self.rules = rules if rules is not None else default_policy(self.tier_limits, self.window)
        self.rules_shadow = bool(self.rules.shadow)
        self._tier_rules = {tier: self.rule_limits(limits) for tier, limits in self.rules.tiers.items()}
        # per tier: (name, source, quota, window us, window s, shadow) of each limit, in the stores' order
        self._tier_meta = {tier: self._limit_meta(limits, "tier") for tier, limits in self.rules.tiers.items()}
        self._rules_default = DEFAULT_TIER if DEFAULT_TIER in self._tier_rules else next(iter(self._tier_rules))
        self._route_cache: dict[int, tuple[Any, list[RuleLimit], list[tuple]]] = {}
        self._override_cache: dict[str, list[tuple]] = {}
        self._period_cache: tuple[int, tuple[str, str]] = (-1, ("", ""))
        # One enforced limit per tier over the base window: the single-limit script decides it exactly as
        # the policy script would (same keys, same limits), so such decisions take today's path.
        self._simple = not self.rules_shadow and all(
            len(limits) == 1 and limits[0].window == self.window and not limits[0].shadow
            for limits in self.rules.tiers.values())
        if self._simple and rules is not None:
            self.tier_limits = {tier: limits[0].quota for tier, limits in self.rules.tiers.items()}
            self.default_limit = self.tier_limits.get(DEFAULT_TIER, min(self.tier_limits.values()))
            self.policy = self.policy._replace(tier_limits=self.tier_limits, default_limit=self.default_limit)

    def _limit_meta(self, limits: Sequence[Any], source: str) -> list[tuple]:
        return [(limit.name, source, limit.quota, limit.window * US, limit.window, limit.shadow or self.rules_shadow)
                for limit in limits]

    def _route(self, route: Any) -> tuple[Any, list[RuleLimit], list[tuple]]:
        """A route's limits as the stores take them, and their meta; cached per route object."""
        entry = self._route_cache.get(id(route))
        if entry is None or entry[0] is not route:
            entry = (route, self.rule_limits(route.limits, route.index), self._limit_meta(route.limits, "route"))
            if len(self._route_cache) > 1000:
                self._route_cache.clear()
            self._route_cache[id(route)] = entry
        return entry

    def _override_meta(self, encoded: str) -> list[tuple]:
        meta = self._override_cache.get(encoded)
        if meta is None:
            meta = [(limit_name("override", r.window // US), "override", r.quota, r.window, r.window // US, False)
                    for r in parse_override(encoded)]
            if len(self._override_cache) > 1000:
                self._override_cache.clear()
            self._override_cache[encoded] = meta
        return meta

    def _periods(self, now: int) -> tuple[str, str]:
        day = now // DAY_US
        cached = self._period_cache
        if cached[0] != day:
            cached = self._period_cache = (day, _periods(now))
        return cached[1]

    def _limit_suffix(self, window: int) -> str:
        """Key suffix of a tier or override limit: the base window keeps today's key, so switching to a
        policy file, or to an override, keeps what was counted."""
        return self.strategy.suffix if window == self.window else f"{self.strategy.suffix}:{window}"

    def rule_limits(self, limits: Sequence[Any], route_index: int | None = None) -> list[RuleLimit]:
        """policy.Limit objects as the stores take them (route limits get their own keys)."""
        sfx = self.strategy.suffix
        return [RuleLimit(limit.quota, limit.window * US, int(limit.shadow),
                          f"{sfx}:r{route_index}:{limit.window}" if route_index is not None
                          else self._limit_suffix(limit.window)) for limit in limits]

    def check_policy(self, ip: str | None, subject: str, flags: Sequence[str] = (), *, route: Any = None,
                     cost: int = 1, consume: bool = True, single: bool = True) -> PolicyDecision:
        """Like check_request, with every limit that applies in one atomic store call: the tier's
        (or the subject's override), the route's extra limits, and the key's credits. All are
        spent (``cost`` units each) or none is. ``single=False`` skips the single-limit script
        (the caller already learnt from it that this subject has an override or credits)."""
        if single and self._simple and cost == 1 and (route is None or not route.limits):
            decision = self.check_request(ip, subject, flags, consume=consume)
            if not decision.needs_policy:  # else nothing was counted: the policy script decides
                return self._as_policy_decision(decision)
        if cost < 1:
            raise ValueError("cost must be >= 1")
        entry = self._route(route) if route is not None and route.limits else None
        now = round(self._clock() * US)
        keys = self.keys.check_keys(ip, subject, "cr", flags)
        args = (keys, now, ip or "", 1 if consume else 2, cost, self._periods(now), entry[1] if entry else ())
        if not self._down:
            try:
                return self._policy_decision(self._store.check_policy(*args), now, ip, flags, entry, cost, False)
            except STORE_ERRORS as exc:
                self._mark_down(exc, now)
        raw, degraded = self._exec("check_policy", *args)
        return self._policy_decision(raw, now, ip, flags, entry, cost, degraded and self.fail_mode == "open")

    def _as_policy_decision(self, decision: RequestDecision) -> PolicyDecision:
        """A single-limit decision in the multi-limit form (one outcome, named after the tier's limit)."""
        result = decision.result
        if result is None:
            return PolicyDecision(decision.ip, None, decision.tier, decision.blocked, decision.meta_missing,
                                  decision.flags, False)
        name, source, quota, _, window, shadow = (self._tier_meta.get(decision.tier or "")
                                                  or self._tier_meta[self._rules_default])[0]
        outcome = _new_tuple(LimitOutcome, (name, source, quota, window, shadow, result))
        return _new_tuple(PolicyDecision, (decision.ip, result, decision.tier, False, False, decision.flags,
                                           result.allowed, (outcome,), outcome, None, False, ()))

    def _policy_decision(self, reply: PolicyReply, now: int, ip: str | None, flags: Sequence[str], route: Any,
                         cost: int, opened: bool) -> PolicyDecision:
        flag_map = {name: bool(v) for name, v in zip(flags, reply.flags, strict=True)} if flags else {}
        ip_decision = None
        if ip is not None:
            refused = reply.ip >= BANNED and not opened
            ip_decision = _new_tuple(IpDecision, (not refused, refused,
                                                  max(0, reply.ip_until - now) / US if refused else 0.0,
                                                  reply.bans, reply.ip == BAN_STARTED and not opened))
            if refused:
                return PolicyDecision(ip_decision, None, None, False, False, flag_map, False)
        tier = reply.tier
        if reply.meta != DECIDED:
            return PolicyDecision(ip_decision, None, tier or None, bool(reply.blocked), reply.meta == MISSING,
                                  flag_map, False)
        applied = reply.override
        metas = self._override_meta(applied) if applied else (self._tier_meta.get(tier)
                                                              or self._tier_meta[self._rules_default])
        if route is not None:
            metas = metas + route[2]
        result_of = self.strategy.result
        outcomes: list[LimitOutcome] = []
        refusing = closest = closest_any = None
        raws = reply.limits
        for i, (name, source, quota, window_us, window, shadow) in enumerate(metas):  # (zip(strict=True) costs more)
            raw = raws[i]
            if opened:  # fail mode "open": every limit admits, and reports what it counted
                raw = (True, raw[1], raw[2], raw[3])
            result = result_of(raw, now, quota, window_us, cost)
            outcome = _new_tuple(LimitOutcome, (name, source, quota, window, shadow, result))
            outcomes.append(outcome)
            rank = (result.remaining, -window)
            if closest_any is None or rank < closest_any[0]:
                closest_any = (rank, outcome)
            if shadow:
                continue
            if not result.allowed:
                if refusing is None or result.retry_after > refusing.result.retry_after:
                    refusing = outcome
            elif closest is None or rank < closest[0]:
                closest = (rank, outcome)
        reported = refusing or (closest or closest_any or (None, None))[1]
        allowed = bool(reply.allowed) or opened
        shown = reported.result if reported is not None else None
        if allowed and shown is not None and not shown.allowed:  # a shadow limit: reported, but admitted
            shown = shown._replace(allowed=True, retry_after=0.0)
        shadow_refused = tuple(o for o in outcomes if o.shadow and not o.result.allowed)
        return PolicyDecision(ip_decision, shown, tier or None, False, False, flag_map, allowed, tuple(outcomes),
                              reported, reply.credits_left if reply.credit != NO_CREDITS else None,
                              reply.credit == SHORT and refusing is None and not opened, shadow_refused)

    def set_policy_meta(self, subject: str, *, override: Sequence[Any] = (), expires_at: float | None = None,
                        credits: bool = False) -> None:
        """Store the subject's override (policy.Limit list, lapsing at ``expires_at`` epoch seconds)
        and whether it has credits, beside its tier, where every decision reads them."""
        encoded = encode_override(self.rule_limits(override)) if override else ""
        expiry = 0 if expires_at is None else round(expires_at * US)
        self._exec("set_policy_meta", self.keys.subject(subject, "meta"), self._now(), encoded, expiry, credits)
        self._invalidate("s:" + subject)  # a raised override admits at once in every process

    def set_credits(self, subject: str, credits: int, *, refill: int | None = None, every: str | None = None) -> None:
        """Set the subject's credit balance, and its refill (``every`` "day" or "month", UTC)."""
        now = self._now()
        day, month = _periods(now)
        self._exec("set_credits", self.keys.subject(subject, "cr"), now, credits, refill, every,
                   month if every == "month" else day)
        self._invalidate("s:" + subject)

    def credits_remaining(self, subject: str) -> int | None:
        """The subject's credits as the next decision would see them (refill included); None: no credits."""
        now = self._now()
        return self._exec("peek_credits", self.keys.subject(subject, "cr"), now, _periods(now))[0]

    # ---- meta, flags, bans
    def set_meta(self, subject: str, *, tier: str, blocked: bool) -> None:
        """Store the subject's tier and blocked flag where check_request reads them (TTL one day)."""
        self._exec("set_meta", self.keys.subject(subject, "meta"), self._now(), tier, blocked)
        self._invalidate("s:" + subject)

    def delete_meta(self, subject: str) -> None:
        """Forget the subject's meta (e.g. key deleted); the next check reports meta_missing."""
        self._exec("delete_meta", self.keys.subject(subject, "meta"), self._now())
        self._invalidate("s:" + subject)

    def set_flag(self, name: str, ttl: int) -> None:
        """Set a flag (e.g. ``revoked:<jti>``) for ``ttl`` seconds, seen by every worker."""
        self._exec("set_flag", self.keys.flag(name), self._now(), ttl * US)

    def has_flag(self, name: str) -> bool:
        return bool(self._exec("has_flag", self.keys.flag(name), self._now())[0])

    def ban_ip(self, ip: str, seconds: int) -> None:
        """Ban ``ip`` for ``seconds`` (counts as a ban for escalation)."""
        self._exec("ban", ip, self._now(), seconds * US, new_nonce())

    def unban_ip(self, ip: str) -> bool:
        """Lift a ban and forget the IP's recent requests; True if a ban was active."""
        lifted = bool(self._exec("unban", ip, self._now())[0])
        self._invalidate("i:" + ip)
        return lifted

    def list_bans(self) -> list[dict]:
        """Active bans from the ban index: [{"ip", "expires_epoch", "ban_count"}]."""
        entries, _ = self._exec("bans", self._now())
        return [{"ip": ip, "expires_epoch": math.ceil(until / US), "ban_count": n} for ip, until, n in entries]

    def reset(self) -> None:
        """Testing helper: forget every key under this limiter's prefix."""
        self._fallback.reset()
        if self._store is not self._fallback:
            try:
                self._store.reset()
            except STORE_ERRORS as exc:
                log.warning("reset could not reach Redis: %s", exc)
        self._invalidate(EVERYTHING)

    def close(self) -> None:
        """Close connections; the limiter must not be used afterwards."""
        if self._refusals is not None:
            self._refusals.close()
        try:
            self._store.close()
        except STORE_ERRORS:
            pass
        self._fallback.close()
