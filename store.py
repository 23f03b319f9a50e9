"""What a rate-limit store is: the ``Store`` protocol, the replies it gives, and the scheme registry.

Both stores (store_memory.py, store_redis.py) implement ``Store`` and answer a decision with the
same named replies, ``CheckReply`` and ``PolicyReply``: memory builds them directly, each Redis
store converts its script's positional reply into them in one place. ``RateLimiter`` (limiter.py)
reads them by field name and never sees the wire.

``STORE_SCHEMES`` is the one list of storage URL schemes: limiter.py picks a store by it,
redis_wire.parse_store_url parses by it and config.py validates ``REDIS_URL`` against it.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
from collections.abc import Sequence
from enum import IntEnum
from typing import NamedTuple, Protocol, runtime_checkable

import redis

from strategies import US, StrategyRaw

DAY_US = 86_400 * US
META_TTL_US = DAY_US  # a subject's meta (tier, blocked) is a cache of the database, reloaded daily
MAX_BAN_US = 30 * DAY_US

# What a store failure looks like: redis-py raises RedisError subclasses, the lean connection turns
# socket errors, timeouts and unparsable replies into redis.ConnectionError; OSError is the backstop.
STORE_ERRORS = (redis.RedisError, OSError)

# --------------------------------------------------------------------------- the scheme registry
# scheme -> the kind of store that serves it: "memory" (MemoryStore), "plain" (RedisStore on one
# Redis), "sentinel" (SentinelStore), "cluster" (ClusterStore). Adding a scheme here is all it takes
# for config.py and redis_wire.py to accept it; limiter.py and store_redis.py map kinds to classes.
MEMORY, PLAIN, SENTINEL, CLUSTER = "memory", "plain", "sentinel", "cluster"
STORE_SCHEMES: dict[str, str] = {
    "memory://": MEMORY,
    "redis://": PLAIN,
    "rediss://": PLAIN,
    "unix://": PLAIN,
    "redis+sentinel://": SENTINEL,
    "redis+cluster://": CLUSTER,
}


def url_kind(url: str) -> str | None:
    """The kind of store ``url``'s scheme names (see STORE_SCHEMES); None when the scheme is not registered."""
    scheme, sep, _ = url.partition("://")
    return STORE_SCHEMES.get(scheme + sep) if sep else None


def valid_schemes() -> str:
    """The registered schemes, for error messages."""
    return ", ".join(STORE_SCHEMES)


# --------------------------------------------------------------------------- decision codes
# The scripts return these as integers (the wire); the stores hand them on as members.

class IpCode(IntEnum):
    """What the IP part of a decision did."""

    NOT_CHECKED = 0  # no IP given (exempt)
    OK = 1  # counted, under the IP limit
    BANNED = 2  # a ban is active: nothing counted
    BAN_STARTED = 3  # this request went over the IP limit and started a ban


class MetaCode(IntEnum):
    """What the subject part of a decision did."""

    NO_SUBJECT = 0  # no subject given, or the IP was refused first (nothing about the subject is reported)
    MISSING = 1  # the subject's meta is not cached: nothing counted, the caller loads it and asks again
    DECIDED = 2  # the subject's limit(s) decided
    BLOCKED_OR_FLAGGED = 3  # the subject is blocked, or a flag is set: refused, the subject's limit untouched
    NEEDS_POLICY = 4  # check only: an override or credits apply, check_policy decides (nothing counted)


class CreditCode(IntEnum):
    """The subject's credits in a policy decision."""

    NO_CREDITS = 0
    ENOUGH = 1  # spent along with the limits when the request is admitted
    SHORT = 2  # fewer than the cost: refused, nothing spent


IP_CODES, META_CODES, CREDIT_CODES = tuple(IpCode), tuple(MetaCode), tuple(CreditCode)  # member by value

# The members as plain names for the hot path: a global is read several times faster than IpCode.BANNED.
NOT_CHECKED, IP_OK, BANNED, BAN_STARTED = IpCode.NOT_CHECKED, IpCode.OK, IpCode.BANNED, IpCode.BAN_STARTED
NO_SUBJECT, MISSING, DECIDED = MetaCode.NO_SUBJECT, MetaCode.MISSING, MetaCode.DECIDED
BLOCKED_OR_FLAGGED, NEEDS_POLICY = MetaCode.BLOCKED_OR_FLAGGED, MetaCode.NEEDS_POLICY
NO_CREDITS, ENOUGH, SHORT = CreditCode.NO_CREDITS, CreditCode.ENOUGH, CreditCode.SHORT

NO_HIT: StrategyRaw = (0, 0, 0, 0)  # the subject hit of a reply where no limit decided


class CheckReply(NamedTuple):
    """A ``check`` decision: the IP, the subject's meta and its one limit, the flags."""

    ip: IpCode
    ip_until: int  # BANNED, BAN_STARTED: when the ban ends (us)
    bans: int  # bans of the IP in the last day (BAN_STARTED: this one included)
    meta: MetaCode
    tier: str  # DECIDED, BLOCKED_OR_FLAGGED: the subject's tier, else ""
    blocked: int  # 1: the subject is blocked
    hit: StrategyRaw  # DECIDED: the subject's limit's raw answer, else NO_HIT
    limit: int  # DECIDED, BLOCKED_OR_FLAGGED: the tier's limit
    flags: tuple[int, ...]  # per flag key, in order: 1 when set


class PolicyReply(NamedTuple):
    """A ``check_policy`` decision: every limit that applies, the credits, the flags."""

    ip: IpCode
    ip_until: int
    bans: int
    meta: MetaCode  # never NEEDS_POLICY
    tier: str
    blocked: int
    allowed: int  # 1: every enforced limit and the credits admit (and, when counting, all were spent)
    credit: CreditCode
    credits_left: int  # the balance after this request (ENOUGH, SHORT)
    override: str  # the subject's override that applied, encoded (see encode_override); "" when none
    limits: tuple[StrategyRaw, ...]  # DECIDED: per limit, the tier's (or the override's) then the route's
    flags: tuple[int, ...]


# --------------------------------------------------------------------------- what the stores are given

class RuleLimit(NamedTuple):
    """One limit as the stores get it: window in microseconds, key suffix after ``rl:{k:42}:``."""

    quota: int
    window: int
    shadow: int
    suffix: str


_OVERRIDE_RE = re.compile(r"(\d+):(\d+):([^,]+)")


def parse_override(text: str) -> list[RuleLimit]:
    """The meta's override field, ``quota:window_us:suffix,...``, as the policy script's gmatch reads it."""
    return [RuleLimit(int(q), int(w), 0, sfx) for q, w, sfx in _OVERRIDE_RE.findall(text)]


def encode_override(limits: Sequence[RuleLimit]) -> str:
    return ",".join(f"{limit.quota}:{limit.window}:{limit.suffix}" for limit in limits)


class Policy(NamedTuple):
    """What check enforces; times in microseconds. Both stores get it at construction."""

    tier_limits: dict[str, int]
    default_limit: int
    window: int
    ip_limit: int
    ip_window: int
    ban_us: int
    ban_multiplier: float
    ban_cap: int = MAX_BAN_US


class Keys:
    """Key names; the subject sits in a hash tag so one subject's keys share a cluster slot."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.ban_index = f"{prefix}:bans"

    def subject(self, subject: str, suffix: str) -> str:
        return f"{self.prefix}:{{k:{subject}}}:{suffix}"

    def ip(self, ip: str, suffix: str) -> str:
        return f"{self.prefix}:{{ip:{ip}}}:{suffix}"

    def flag(self, name: str) -> str:
        return f"{self.prefix}:{{f:{name}}}"

    def check_keys(self, ip: str | None, subject: str | None, suffix: str, flags: Sequence[str]) -> list[str]:
        """KEYS of the check script, in its order; absent parts get a placeholder."""
        ipk = f"{self.prefix}:{{ip:{ip if ip is not None else '-'}}}:"
        sub = f"{self.prefix}:{{k:{subject if subject is not None else '-'}}}:"
        keys = [ipk + "ban", ipk + "bans", ipk + "sw", self.ban_index, sub + "meta", sub + suffix]
        if flags:
            keys.extend(map(self.flag, flags))
        return keys


# Unique sorted-set members across threads, processes (fork) and hosts.
_seq = itertools.count()
_token = [""]


def _new_token() -> None:
    _token[0] = f"{os.getpid():x}.{secrets.token_hex(6)}."


_new_token()
os.register_at_fork(after_in_child=_new_token)


def new_nonce() -> str:
    """A member name no other request, thread, process or host uses (the Redis scripts' log entries)."""
    return _token[0] + str(next(_seq))


# --------------------------------------------------------------------------- the interface

@runtime_checkable
class Store(Protocol):
    """What RateLimiter asks of a store. Times are microseconds of the limiter's clock; keys come
    from ``Keys``. Every decision is one atomic operation; a shared store raises one of STORE_ERRORS
    when it cannot answer (the limiter's fail mode then decides)."""

    kind: str  # "memory" or "redis": what RateLimiter.store_kind reports
    keys: Keys

    def configure_policy(self, tiers: dict[str, list[RuleLimit]], default_tier: str, shadow: bool) -> None:
        """The limits of each tier for check_policy (``shadow``: no limit refuses, all report)."""

    def hit(self, key: str, now: int, limit: int, window: int, cost: int, record: int) -> StrategyRaw:
        """Decide one limit of ``key`` and, when ``record`` and admitted, count ``cost`` requests."""

    def check(self, keys: list[str], now: int, ip: str, has_subject: int) -> CheckReply:
        """The hot path: IP ban and limit, subject meta, the subject's limit, flags (``keys`` from
        Keys.check_keys; ``ip`` "" skips the IP; ``has_subject`` 0 none, 1 count, 2 peek)."""

    def check_policy(self, keys: list[str], now: int, ip: str, mode: int, cost: int, periods: tuple[str, str],
                     routes: Sequence[RuleLimit]) -> PolicyReply:
        """Every limit that applies, the route's and the credits, all spent or none (``mode`` as
        ``has_subject``; ``periods`` the current credit refill day and month)."""

    def set_meta(self, key: str, now: int, tier: str, blocked: bool) -> None: ...

    def delete_meta(self, key: str, now: int) -> None: ...

    def set_policy_meta(self, key: str, now: int, override: str, expiry: int, credits_on: bool) -> None: ...

    def set_credits(self, key: str, now: int, credits: int, amount: int | None, every: str | None,
                    period: str) -> None: ...

    def peek_credits(self, key: str, now: int, periods: tuple[str, str]) -> int | None: ...

    def set_flag(self, key: str, now: int, ttl_us: int) -> None: ...

    def has_flag(self, key: str, now: int) -> bool: ...

    def ban(self, ip: str, now: int, length: int, nonce: str) -> tuple[int, int]:
        """Ban ``ip`` for ``length`` us: (bans in the last day, ban end)."""

    def unban(self, ip: str, now: int, replay: bool = False) -> bool:
        """Lift a ban; True if one was active. ``replay``: skipped when a ban started after ``now``."""

    def bans(self, now: int) -> list[tuple[str, int, int]]:
        """Active bans: (ip, end, bans in the last day), soonest end first."""

    def publish(self, channel: str, message: str) -> None: ...

    def ping(self) -> None:
        """Probe before using the store (again); raises when it cannot answer."""

    def alive(self) -> None:
        """The cheap health check of a store believed up."""

    def reset(self) -> None:
        """Forget every key under the prefix (tests)."""

    def close(self) -> None: ...

