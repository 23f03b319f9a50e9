"""The rate-limit algorithms, each as twins: a Lua function (run inside Redis) and ``apply`` (memory).

Each strategy class holds both, side by side, so a change to one is made next to the other, and
tests/test_strategies.py runs them against each other. Both twins return the same raw answer,
a ``StrategyRaw`` ``(allowed, a, b, c)``; ``result`` (shared by the two stores) turns it into the
``LimitResult`` callers see. ``record=0`` is a peek: the same decision, nothing written.

Times are integer microseconds of the caller's clock (never Redis TIME). Nothing here touches a
store: ``apply`` takes the key's state and returns the new one; the Lua functions are text that
store_redis.py assembles into its scripts.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

US = 1_000_000  # the time unit of the stores and scripts: microseconds


class LimitResult(NamedTuple):
    """One limit's answer: admitted or not, what is left, when the window resets and when to retry (seconds)."""

    allowed: bool
    limit: int
    remaining: int
    reset: float
    retry_after: float


# A strategy's raw answer, as both twins return it: (allowed, a, b, c). What a, b, c hold is each
# strategy's own (its docstring says; its ``result`` unpacks them by those names); ``allowed`` is a bool
# from memory, 1/0 from Redis. A plain tuple rather than a NamedTuple: the memory twin builds one per
# decision (two per check), and building a NamedTuple, even through tuple.__new__, made hit() 10% slower.
StrategyRaw = tuple[int, int, int, int]

_new_tuple = tuple.__new__  # skips NamedTuple's Python-level __new__: this runs on every decision


def _limit_result(allowed: Any, limit: int, used: int, reset_us: int, retry_us: int) -> LimitResult:
    remaining = limit - used if used < limit else 0
    retry = 0.0 if allowed else (retry_us / US if retry_us > 0 else 0.0)
    return _new_tuple(LimitResult, (bool(allowed), limit, remaining, reset_us / US, retry))


# Helpers every Lua strategy function uses; the strategies' functions follow them in the library.
LUA_HELPERS = """
local function num(x) return string.format('%d', x) end
local function ms(us) return num(math.max(1, math.ceil(us / 1000))) end
local function bucket(now, window)
  local b = math.floor(now / window)
  if b * window > now then b = b - 1 end
  return b
end
"""


class Strategy:
    """One algorithm: ``lua`` for Redis and its twin ``apply`` for memory; ``result`` shared.

    ``lua`` defines ``<name>(key, now, limit, window, cost, record, nonce)`` returning
    {allowed, a, b, c}; ``lua_undo`` defines ``undo_<name>(key, now, limit, window, nonce)``, which
    takes back one request recorded at ``now`` (Redis Cluster only: the subject's slot counted a
    request that the IP's slot or a flag then refused). Memory decides in one place and never undoes.
    """

    name: ClassVar[str]
    suffix: ClassVar[str]
    lua: ClassVar[str]
    lua_undo: ClassVar[str]

    def apply(self, state: Any, now: int, limit: int, window: int, cost: int,
              record: int) -> tuple[Any, int, StrategyRaw]:
        """Memory twin of the Lua function: (new state, its expiry in us, raw answer)."""
        raise NotImplementedError

    def result(self, raw: Sequence[int], now: int, limit: int, window: int, cost: int) -> LimitResult:
        raise NotImplementedError


class SlidingWindow(Strategy):
    """Exact sliding log: admitted iff fewer than ``limit`` admitted requests in (now - window, now].

    Raw: (allowed, count, oldest entry, the entry whose leaving admits this request).
    """

    name, suffix = "sliding_window", "sw"

    lua = """
local function sliding_window(key, now, limit, window, cost, record, nonce)
  -- Read the head first: trimming (and re-reading it) is needed only when the oldest entry expired,
  -- and a refusal then costs two commands. Lua-side cost dominates this script on a busy server.
  local oldest = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
  if oldest and oldest <= now - window then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', num(now - window))
    oldest = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2])
  end
  local count = 0
  if oldest then count = redis.call('ZCARD', key) end
  local allowed = count + cost <= limit
  if allowed and record == 1 then
    for i = 1, cost do redis.call('ZADD', key, num(now), nonce .. ':' .. i) end
    count = count + cost
    redis.call('PEXPIRE', key, ms(window))
    if not oldest or now < oldest then oldest = now end
  end
  oldest = oldest or 0
  local kth = 0
  if not allowed then
    local idx = count - limit + cost - 1
    if idx >= count then kth = now
    elseif idx == 0 then kth = oldest
    else kth = tonumber(redis.call('ZRANGE', key, idx, idx, 'WITHSCORES')[2]) end
  end
  return {allowed and 1 or 0, count, oldest, kth}
end
"""

    def apply(self, state, now, limit, window, cost, record):
        entries = state if state is not None else []
        cut = bisect.bisect_right(entries, now - window)
        if cut:
            del entries[:cut]
        count = len(entries)
        allowed = count + cost <= limit
        if allowed and record:
            if not entries or entries[-1] <= now:
                entries.extend([now] * cost)
            else:
                for _ in range(cost):
                    bisect.insort(entries, now)
            count += cost
        kth = 0
        if not allowed:
            idx = count - limit + cost - 1
            kth = entries[idx] if idx < count else now
        oldest = entries[0] if entries else 0
        return entries, (entries[-1] + window if entries else 0), (allowed, count, oldest, kth)

    def result(self, raw, now, limit, window, cost):
        allowed, count, oldest, kth = raw
        return _limit_result(allowed, limit, count, oldest + window if count else now, kth + window - now)

    lua_undo = """
local function undo_sliding_window(key, now, limit, window, nonce)
  redis.call('ZREM', key, nonce .. ':1')
end
"""


class FixedWindow(Strategy):
    """Counter per aligned window; cheap, allows up to 2x limit across a boundary.

    Raw: (allowed, count in the current window, time elapsed in it, 0).
    """

    name, suffix = "fixed_window", "fw"

    lua = """
local function fixed_window(key, now, limit, window, cost, record, nonce)
  local b = bucket(now, window)
  local st = redis.call('HMGET', key, 'b', 'n')
  local count = 0
  if tonumber(st[1]) == b then count = tonumber(st[2]) end
  local allowed = count + cost <= limit
  if allowed and record == 1 then
    count = count + cost
    redis.call('HSET', key, 'b', num(b), 'n', num(count))
    -- 1 s past the bucket's end: Redis expires in its own time, and a request a hair before the end
    -- (or an instance whose clock lags) must still find the count; the stored bucket 'b' ends it anyway
    redis.call('PEXPIRE', key, ms((b + 1) * window - now + 1000000))
  end
  return {allowed and 1 or 0, count, now - b * window, 0}
end
"""

    def apply(self, state, now, limit, window, cost, record):
        b = now // window
        count = state[1] if state is not None and state[0] == b else 0
        allowed = count + cost <= limit
        if allowed and record:
            count += cost
            state = (b, count)
        return state, (b + 1) * window, (allowed, count, now - b * window, 0)

    def result(self, raw, now, limit, window, cost):
        allowed, count, elapsed, _ = raw
        end = now - elapsed + window
        return _limit_result(allowed, limit, count, end, end - now)

    lua_undo = """
local function undo_fixed_window(key, now, limit, window, nonce)
  local st = redis.call('HMGET', key, 'b', 'n')
  if tonumber(st[1]) == bucket(now, window) and (tonumber(st[2]) or 0) > 0 then redis.call('HINCRBY', key, 'n', -1) end
end
"""


class SlidingWindowCounter(Strategy):
    """Two fixed buckets, the previous weighted by its overlap with the window: O(1) memory, approximate.

    Raw: (allowed, previous bucket's count, current bucket's count, time elapsed in the current one).
    """

    name, suffix = "sliding_window_counter", "swc"

    lua = """
local function sliding_window_counter(key, now, limit, window, cost, record, nonce)
  local b = bucket(now, window)
  local st = redis.call('HMGET', key, 'b', 'c', 'p')
  local sb, cur, prev = tonumber(st[1]), tonumber(st[2]) or 0, tonumber(st[3]) or 0
  if sb ~= b then
    if sb == b - 1 then prev = cur else prev = 0 end
    cur = 0
  end
  local e = now - b * window
  local allowed = prev * (window - e) + (cur + cost) * window <= limit * window
  if allowed and record == 1 then
    cur = cur + cost
    redis.call('HSET', key, 'b', num(b), 'c', num(cur), 'p', num(prev))
    redis.call('PEXPIRE', key, ms((b + 2) * window - now))
  end
  return {allowed and 1 or 0, prev, cur, e}
end
"""

    def apply(self, state, now, limit, window, cost, record):
        b = now // window
        sb, cur, prev = state if state is not None else (None, 0, 0)
        if sb != b:
            prev = cur if sb == b - 1 else 0
            cur = 0
        e = now - b * window
        allowed = prev * (window - e) + (cur + cost) * window <= limit * window
        if allowed and record:
            cur += cost
            state = (b, cur, prev)
        return state, (b + 2) * window, (allowed, prev, cur, e)

    def result(self, raw, now, limit, window, cost):
        allowed, prev, cur, e = raw
        used = -(-(prev * (window - e) + cur * window) // window)
        if allowed:
            retry = 0
        elif cur + cost <= limit:  # the previous bucket's weight must decay first
            retry = window - (limit - cur - cost) * window // prev - e
        elif cost > limit:
            retry = window
        else:  # wait for the next bucket, where this bucket becomes the decaying one
            retry = window - e + (max(0, window - (limit - cost) * window // cur) if cur else 0)
        return _limit_result(allowed, limit, used, now - e + window, retry)

    lua_undo = """
local function undo_sliding_window_counter(key, now, limit, window, nonce)
  local st = redis.call('HMGET', key, 'b', 'c')
  if tonumber(st[1]) == bucket(now, window) and (tonumber(st[2]) or 0) > 0 then redis.call('HINCRBY', key, 'c', -1) end
end
"""


class Gcra(Strategy):
    """Token bucket as GCRA: one theoretical arrival time per key, a burst of ``limit``, refill window/limit.

    Raw: (allowed, theoretical arrival time, emission interval, 0).
    """

    name, suffix = "gcra", "gcra"

    lua = """
local function gcra(key, now, limit, window, cost, record, nonce)
  local interval = math.floor(window / limit)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new = tat + cost * interval
  local allowed = new - now <= window
  if allowed and record == 1 then
    tat = new
    redis.call('SET', key, num(tat), 'PX', ms(tat - now))
  end
  return {allowed and 1 or 0, tat, interval, 0}
end
"""

    def apply(self, state, now, limit, window, cost, record):
        interval = window // limit
        tat = max(state if state is not None else now, now)
        allowed = tat + cost * interval - now <= window
        if allowed and record:
            tat += cost * interval
            state = tat
        return state, tat, (allowed, tat, interval, 0)

    def result(self, raw, now, limit, window, cost):
        allowed, tat, interval, _ = raw
        free = limit if interval == 0 else min(limit, (window - (tat - now)) // interval)
        reset = max(now, tat + interval - window)
        return _limit_result(allowed, limit, limit - free, reset, tat + cost * interval - window - now)

    lua_undo = """
local function undo_gcra(key, now, limit, window, nonce)
  local tat = tonumber(redis.call('GET', key))
  if not tat then return end
  tat = tat - math.floor(window / limit)
  if tat > now then redis.call('SET', key, num(tat), 'PX', ms(tat - now)) else redis.call('DEL', key) end
end
"""


# The one registry of strategy names (config.py validates RATELIMIT_STRATEGY against it).
STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (SlidingWindow, SlidingWindowCounter, FixedWindow, Gcra)}

# Every strategy's Lua function and its undo, after the helpers they use: the head of every script.
LUA_STRATEGIES = LUA_HELPERS + "".join(s.lua + s.lua_undo for s in STRATEGIES.values())


def get_strategy(name: str) -> Strategy:
    """Return the strategy registered as ``name``; ValueError naming the valid ones otherwise."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown rate-limit strategy {name!r}; valid: {', '.join(STRATEGIES)}") from None
