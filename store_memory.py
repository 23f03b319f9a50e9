"""The per-process store (``memory://``, and the fallback while a shared store is down).

``MemoryStore`` is the Python twin of the Redis scripts in store_redis.py: the same keys, the same
steps in the same order, the same replies (built here directly as ``CheckReply``/``PolicyReply``),
each decision under one lock. tests/test_limiter.py and tests/test_policy_limiter.py run both
stores through the same timelines.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence
from typing import Any

from config import DEFAULT_TIER
from store import (
    BAN_STARTED,
    BANNED,
    BLOCKED_OR_FLAGGED,
    DAY_US,
    DECIDED,
    ENOUGH,
    IP_OK,
    META_TTL_US,
    MISSING,
    NEEDS_POLICY,
    NO_CREDITS,
    NO_HIT,
    NO_SUBJECT,
    NOT_CHECKED,
    SHORT,
    CheckReply,
    Keys,
    Policy,
    PolicyReply,
    RuleLimit,
    Store,
    parse_override,
)
from strategies import US, SlidingWindow, Strategy, StrategyRaw

NEVER_US = 2**62  # expiry of entries that never expire (credits)

_new_tuple = tuple.__new__


def _needs_policy(meta: tuple, now: int) -> bool:
    """A meta tuple (tier, blocked, override, its expiry, credits) with an active override or credits."""
    return (meta[2] is not None and (meta[3] == 0 or meta[3] > now)) or bool(meta[4])


class MemoryStore:
    """Per-process store: a dict of key -> [expires_us, value] under one lock, swept as it expires."""

    kind = "memory"
    SWEEP_EVERY_US = 5 * US

    def __init__(self, keys: Keys, strategy: Strategy, policy: Policy) -> None:
        self.keys = keys
        self.strategy = strategy
        self.policy = policy
        self.ip_log = SlidingWindow()
        self.rules: dict[str, list[RuleLimit]] = {}
        self.rules_default = DEFAULT_TIER
        self.rules_shadow = 0
        self._data: dict[str, list] = {}
        self._lock = threading.Lock()
        self._next_sweep = 0

    def _get(self, key: str, now: int) -> Any:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._data[key]
            return None
        return item[1]

    def _put(self, key: str, value: Any, expires: int) -> None:
        self._data[key] = [expires, value]

    def _sweep(self, now: int) -> None:
        """Drop expired entries every few seconds of clock time so memory stays bounded."""
        self._next_sweep = now + self.SWEEP_EVERY_US
        for key in [k for k, item in self._data.items() if item[0] <= now]:
            del self._data[key]

    def _apply(self, strategy: Strategy, key: str, now: int, limit: int, window: int, cost: int,
               record: int) -> StrategyRaw:
        item = self._data.get(key)
        current = item[1] if item is not None and item[0] > now else None
        state, expires, raw = strategy.apply(current, now, limit, window, cost, record)
        if raw[0] and record:
            if item is None:
                self._data[key] = [expires, state]
            else:
                item[0], item[1] = expires, state
        elif item is not None and not current:  # expired, or a sliding log trimmed to nothing
            del self._data[key]
        return raw

    def hit(self, key: str, now: int, limit: int, window: int, cost: int, record: int) -> StrategyRaw:
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            return self._apply(self.strategy, key, now, limit, window, cost, record)

    def _ban_count(self, hist_key: str, now: int) -> int:
        history = self._get(hist_key, now) or []
        return len(history) - bisect.bisect_right(history, now - DAY_US)

    def _start_ban(self, ip: str, now: int, length: int, base: int, mult: float, cap: int) -> tuple[int, int]:
        hist_key = self.keys.ip(ip, "bans")
        history = [t for t in self._get(hist_key, now) or [] if t > now - DAY_US]
        n = len(history) + 1
        if length == 0:
            length = min(math.floor(base * mult ** (n - 1)), cap)
        until = now + length
        self._put(self.keys.ip(ip, "ban"), until, until)
        bisect.insort(history, now)
        self._put(hist_key, history, now + DAY_US)
        index = {k: v for k, v in (self._get(self.keys.ban_index, now) or {}).items() if v > now}
        index[ip] = until
        self._put(self.keys.ban_index, index, max(index.values()))
        return n, until

    def _flags(self, keys: list[str], now: int) -> tuple[int, ...]:
        """The flags (keys after the sixth) read first, as in the scripts: a flagged request skips the subject hit."""
        return tuple(int((self._get(k, now) or 0) > now) for k in keys[6:])

    def check(self, keys: list[str], now: int, ip: str, has_subject: int) -> CheckReply:
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            if len(keys) > 6:
                flags = self._flags(keys, now)
                return self._check(keys, now, ip, has_subject, 1 in flags, flags)
            return self._check(keys, now, ip, has_subject, False, ())

    def _check(self, keys: list[str], now: int, ip: str, has_subject: int, flagged: bool,
               flags: tuple[int, ...]) -> CheckReply:
        # The IP's steps are written out here and in _check_policy, not in helpers: this runs on every request.
        policy = self.policy
        ip_code, bans = NOT_CHECKED, 0
        if ip:
            until = self._get(keys[0], now) or 0
            bans = self._ban_count(keys[1], now)
            if until > now:
                return _new_tuple(CheckReply, (BANNED, until, bans, NO_SUBJECT, "", 0, NO_HIT, 0, flags))
            ip_code = IP_OK
        tier, blocked, limit = "", 0, 0
        if has_subject:
            meta = self._get(keys[4], now)
            if meta is None:
                return _new_tuple(CheckReply, (ip_code, 0, bans, MISSING, "", 0, NO_HIT, 0, flags))
            tier, blocked = meta[0], meta[1]
            if len(meta) > 2 and _needs_policy(meta, now):  # override or credits: the policy path decides
                return _new_tuple(CheckReply, (ip_code, 0, bans, NEEDS_POLICY, "", 0, NO_HIT, 0, flags))
            limit = policy.tier_limits.get(tier, policy.default_limit)
        if ip and not self._apply(self.ip_log, keys[2], now, policy.ip_limit, policy.ip_window, 1, 1)[0]:
            n, until = self._start_ban(ip, now, 0, policy.ban_us, policy.ban_multiplier, policy.ban_cap)
            return _new_tuple(CheckReply, (BAN_STARTED, until, n, NO_SUBJECT, "", 0, NO_HIT, 0, flags))
        if not has_subject:
            return _new_tuple(CheckReply, (ip_code, 0, bans, NO_SUBJECT, "", 0, NO_HIT, 0, flags))
        if blocked or flagged:
            return _new_tuple(CheckReply, (ip_code, 0, bans, BLOCKED_OR_FLAGGED, tier, blocked, NO_HIT, limit, flags))
        hit = self._apply(self.strategy, keys[5], now, limit, policy.window, 1, 1 if has_subject == 1 else 0)
        return _new_tuple(CheckReply, (ip_code, 0, bans, DECIDED, tier, 0, hit, limit, flags))

    def set_meta(self, key: str, now: int, tier: str, blocked: bool) -> None:
        with self._lock:
            old = self._get(key, now)
            self._put(key, (tier, int(blocked), *(old[2:] if old else ())), now + META_TTL_US)

    # ---- policy decisions (several limits, cost, overrides, credits): the twin of store_redis.LUA_POLICY_CHECK
    def configure_policy(self, tiers: dict[str, list[RuleLimit]], default_tier: str, shadow: bool) -> None:
        self.rules, self.rules_default, self.rules_shadow = tiers, default_tier, int(shadow)

    def check_policy(self, keys: list[str], now: int, ip: str, mode: int, cost: int, periods: tuple[str, str],
                     routes: Sequence[RuleLimit]) -> PolicyReply:
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            flags = self._flags(keys, now) if len(keys) > 6 else ()
            return self._check_policy(keys, now, ip, mode, cost, periods, routes, 1 in flags, flags)

    def _check_policy(self, keys: list[str], now: int, ip: str, mode: int, cost: int, periods: tuple[str, str],
                      routes: Sequence[RuleLimit], flagged: bool, flags: tuple[int, ...]) -> PolicyReply:
        policy = self.policy
        ip_code, bans = NOT_CHECKED, 0
        if ip:
            until = self._get(keys[0], now) or 0
            bans = self._ban_count(keys[1], now)
            if until > now:
                return PolicyReply(BANNED, until, bans, NO_SUBJECT, "", 0, 0, NO_CREDITS, 0, "", (), flags)
            ip_code = IP_OK
        meta = None
        if mode:
            meta = self._get(keys[4], now)
            if meta is None:
                return PolicyReply(ip_code, 0, bans, MISSING, "", 0, 0, NO_CREDITS, 0, "", (), flags)
        if ip and not self._apply(self.ip_log, keys[2], now, policy.ip_limit, policy.ip_window, 1, 1)[0]:
            n, until = self._start_ban(ip, now, 0, policy.ban_us, policy.ban_multiplier, policy.ban_cap)
            return PolicyReply(BAN_STARTED, until, n, NO_SUBJECT, "", 0, 0, NO_CREDITS, 0, "", (), flags)
        if meta is None:
            return PolicyReply(ip_code, 0, bans, NO_SUBJECT, "", 0, 0, NO_CREDITS, 0, "", (), flags)
        tier, blocked = meta[0], meta[1]
        if blocked or flagged:
            return PolicyReply(ip_code, 0, bans, BLOCKED_OR_FLAGGED, tier, blocked, 0, NO_CREDITS, 0, "", (), flags)
        override, expiry, credits_on = meta[2:] if len(meta) > 2 else (None, 0, 0)
        if override is not None and (expiry == 0 or expiry > now):
            limits, applied = parse_override(override), override
        else:
            limits, applied = self.rules.get(tier) or self.rules[self.rules_default], ""
        if routes:
            limits = [*limits, *routes]
        code, left = NO_CREDITS, 0
        period = wallet = None
        if credits_on:  # credits first: they do not depend on the limits
            wallet = self._get(keys[5], now)
            left = wallet["n"] if wallet else 0
            if wallet and wallet.get("a") is not None:
                period = periods[1] if wallet["e"] == "month" else periods[0]
                if wallet.get("p") != period:
                    left = wallet["a"]
            code = ENOUGH if left >= cost else SHORT
        record = 1 if mode == 1 and code != SHORT else 0
        ok = 0 if code == SHORT else 1
        base, apply, strategy, shadow_all = keys[4][:-4], self._apply, self.strategy, self.rules_shadow
        raws = []
        last = len(limits) - 1
        for i, (quota, window, shadow, suffix) in enumerate(limits):
            # the last limit is checked and, when every other one admits, spent in the same call
            raw = apply(strategy, base + suffix, now, quota, window, cost, ok * record if i == last else 0)
            raws.append(raw)
            if not raw[0] and not shadow and not shadow_all:
                ok = 0
        if ok and record:
            for i in range(last):
                if raws[i][0]:
                    quota, window, _, suffix = limits[i]
                    raws[i] = apply(strategy, base + suffix, now, quota, window, cost, 1)
            if code == ENOUGH and wallet is not None:
                left -= cost
                wallet["n"] = left
                if period is not None:
                    wallet["p"] = period
        return _new_tuple(PolicyReply, (ip_code, 0, bans, DECIDED, tier, 0, ok, code, left, applied, tuple(raws),
                                        flags))

    def set_policy_meta(self, key: str, now: int, override: str, expiry: int, credits_on: bool) -> None:
        with self._lock:
            meta = self._get(key, now)
            if meta is not None:
                self._put(key, (meta[0], meta[1], override or None, expiry, int(credits_on)), self._data[key][0])

    def set_credits(self, key: str, now: int, credits: int, amount: int | None, every: str | None,
                    period: str) -> None:
        with self._lock:
            wallet = {"n": credits, "a": amount, "e": every, "p": period} if amount is not None else {"n": credits}
            self._put(key, wallet, NEVER_US)

    def peek_credits(self, key: str, now: int, periods: tuple[str, str]) -> int | None:
        with self._lock:
            wallet = self._get(key, now)
            if wallet is None:
                return None
            if wallet.get("a") is not None:
                period = periods[1] if wallet["e"] == "month" else periods[0]
                if wallet.get("p") != period:
                    return wallet["a"]
            return wallet["n"]

    def delete_meta(self, key: str, now: int) -> None:
        with self._lock:
            self._data.pop(key, None)

    def set_flag(self, key: str, now: int, ttl_us: int) -> None:
        with self._lock:
            self._put(key, now + ttl_us, now + ttl_us)

    def has_flag(self, key: str, now: int) -> bool:
        with self._lock:
            return (self._get(key, now) or 0) > now

    def ban(self, ip: str, now: int, length: int, nonce: str) -> tuple[int, int]:
        with self._lock:
            return self._start_ban(ip, now, length, 0, 1.0, 0)

    def unban(self, ip: str, now: int, replay: bool = False) -> bool:
        with self._lock:
            if replay and any(t > now for t in self._get(self.keys.ip(ip, "bans"), now) or ()):
                return False
            active = (self._get(self.keys.ip(ip, "ban"), now) or 0) > now
            self._data.pop(self.keys.ip(ip, "ban"), None)
            self._data.pop(self.keys.ip(ip, "sw"), None)
            (self._get(self.keys.ban_index, now) or {}).pop(ip, None)
            return active

    def bans(self, now: int) -> list[tuple[str, int, int]]:
        with self._lock:
            index = self._get(self.keys.ban_index, now) or {}
            return [(ip, until, self._ban_count(self.keys.ip(ip, "bans"), now))
                    for ip, until in sorted(index.items(), key=lambda kv: kv[1]) if until > now]

    def publish(self, channel: str, message: str) -> None:
        """Nothing to tell: a memory store has no other processes."""

    def ping(self) -> None:
        """The memory store is always there."""

    def alive(self) -> None:
        """The memory store is always there."""

    def reset(self) -> None:
        with self._lock:
            self._data.clear()

    def close(self) -> None:
        self.reset()


_conforms: type[Store] = MemoryStore  # mypy checks MemoryStore against the Store protocol here
