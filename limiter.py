"""Rate-limit algorithms, storage backends and IP bans; framework-agnostic.

``RateLimiter`` makes every decision in one atomic store operation: on ``memory://`` a
Python function under a lock, on Redis one Lua script (EVALSHA). Both stores return the
same raw tuples and share the code that turns them into results, so they decide
identically for the same timeline. Times are integer microseconds of the injected clock,
passed into the scripts (never Redis TIME), so tests can drive time and app instances agree.

Key names put the subject in a Redis Cluster hash tag (``rl:{k:42}:sw``, ``rl:{ip:1.2.3.4}:ban``).
On one Redis (plain or behind Sentinel) ``check_request`` is one script over the IP's keys, the
subject's keys, the flags and the ban index. On Redis Cluster it is one script per slot (the IP's,
the subject's) plus the flag reads, sent to their nodes at once: one round trip of wall time.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import itertools
import logging
import math
import os
import re
import secrets
import string
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from policy import default_policy, limit_name
from redis_wire import (
    CONNECT_TIMEOUT,
    OP_TIMEOUT,
    Addr,
    ConnectFailed,
    RespConnection,
    SentinelResolver,
    SlotMap,
    StoreSpec,
    encode,
    key_slot,
    parse_store_url,
)
from refusal_cache import EVERYTHING, RefusalCache

log = logging.getLogger(__name__)

US = 1_000_000
DAY_US = 86_400 * US
META_TTL_US = DAY_US
MAX_BAN_US = 30 * DAY_US
STORAGE_SCHEMES = ("memory://", "redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")
FAIL_MODES = ("memory", "open", "closed")
PROBE_FIRST_US, PROBE_MAX_US = 1 * US, 30 * US
HEALTH_PROBE_US = 1 * US  # health() pings an up store at most this often


class LimitResult(NamedTuple):
    allowed: bool
    limit: int
    remaining: int
    reset: float
    retry_after: float


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


# What a store failure looks like: redis-py raises RedisError subclasses, the lean connection turns
# socket errors, timeouts and unparsable replies into redis.ConnectionError; OSError is the backstop.
STORE_ERRORS = (redis.RedisError, OSError)


# Unique sorted-set members across threads, processes (fork) and hosts.
_seq = itertools.count()
_token = [""]


def _new_token() -> None:
    _token[0] = f"{os.getpid():x}.{secrets.token_hex(6)}."


_new_token()
os.register_at_fork(after_in_child=_new_token)


def _nonce() -> str:
    return _token[0] + str(next(_seq))


# --------------------------------------------------------------------------- strategies
# Each strategy is one function in Lua (Redis) and its twin ``apply`` in Python (memory),
# both returning the raw tuple (allowed, a, b, c); ``result`` (shared) turns it into a
# LimitResult. ``record=0`` is a peek: same decision, nothing written.

LUA_LIBRARY = """
local DAY = 86400000000
local function num(x) return string.format('%d', x) end
local function ms(us) return num(math.max(1, math.ceil(us / 1000))) end
local function bucket(now, window)
  local b = math.floor(now / window)
  if b * window > now then b = b - 1 end
  return b
end

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

local function ban_count(hist, now)
  return redis.call('ZCOUNT', hist, '(' .. num(now - DAY), '+inf')
end

local function index_add(index, ip, now, u)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', num(now))
  redis.call('ZADD', index, num(u), ip)
  if redis.call('PTTL', index) < (u - now) / 1000 then redis.call('PEXPIRE', index, ms(u - now)) end
end

-- index: the ban index key, or false when it lives in another cluster slot (the caller adds the
-- IP to it with the index script).
local function start_ban(ban, hist, index, ip, now, length, base, mult, cap, nonce)
  redis.call('ZREMRANGEBYSCORE', hist, '-inf', num(now - DAY))
  local n = redis.call('ZCARD', hist) + 1
  if length == 0 then length = math.min(math.floor(base * mult ^ (n - 1)), cap) end
  local u = now + length
  redis.call('SET', ban, num(u), 'PX', ms(length))
  redis.call('ZADD', hist, num(now), nonce)
  redis.call('PEXPIRE', hist, ms(DAY))
  if index then index_add(index, ip, now, u) end
  return n, u
end

-- Undo one request recorded at ``now`` under ``nonce`` (Redis Cluster only: the subject's slot
-- counted a request that the IP's slot or a flag then refused).
local function undo_sliding_window(key, now, limit, window, nonce)
  redis.call('ZREM', key, nonce .. ':1')
end

local function undo_fixed_window(key, now, limit, window, nonce)
  local st = redis.call('HMGET', key, 'b', 'n')
  if tonumber(st[1]) == bucket(now, window) and (tonumber(st[2]) or 0) > 0 then redis.call('HINCRBY', key, 'n', -1) end
end

local function undo_sliding_window_counter(key, now, limit, window, nonce)
  local st = redis.call('HMGET', key, 'b', 'c')
  if tonumber(st[1]) == bucket(now, window) and (tonumber(st[2]) or 0) > 0 then redis.call('HINCRBY', key, 'c', -1) end
end

local function undo_gcra(key, now, limit, window, nonce)
  local tat = tonumber(redis.call('GET', key))
  if not tat then return end
  tat = tat - math.floor(window / limit)
  if tat > now then redis.call('SET', key, num(tat), 'PX', ms(tat - now)) else redis.call('DEL', key) end
end
"""

# KEYS[1] subject key; ARGV now, limit, window, cost, record, nonce
LUA_HIT = "return {strategy}(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), " \
    "tonumber(ARGV[5]), ARGV[6])"

# The request's policy, rendered into the source as constants (one script per configuration: fewer
# arguments to send and parse on every request), and its two parts: the IP's and the subject's.
# Each part touches only its own hash slot, so on Redis Cluster each runs as a script of its own.
LUA_POLICY = string.Template("""
local LIMITS, DEFAULT_LIMIT, WINDOW = $limits, $default_limit, $window
local IP_LIMIT, IP_WINDOW, BAN_US, BAN_MULT, BAN_CAP = $ip_limit, $ip_window, $ban_us, $ban_multiplier, $ban_cap

-- The IP's ban: (until, bans in the last day); banned while until > now.
local function ip_gate(ban, hist, now)
  return tonumber(redis.call('GET', ban)) or 0, ban_count(hist, now)
end

-- Count the request against the IP; over the limit starts a ban: returns (n, until) then, else nil.
local function ip_count(ban, hist, iplog, index, ip, now, nonce)
  local r = sliding_window(iplog, now, IP_LIMIT, IP_WINDOW, 1, 1, nonce)
  if r[1] == 1 then return nil end
  return start_ban(ban, hist, index, ip, now, 0, BAN_US, BAN_MULT, BAN_CAP, nonce)
end

-- The subject's tier and blocked flag, and the tier's limit; nil when the meta is missing.
local function subject_meta(meta)
  local m = redis.call('HMGET', meta, 'tier', 'blocked', 'ovx', 'cr')
  if not m[1] then return nil end
  -- an active override ('ovx': its expiry, 0 never) or credits divert the subject to the policy script
  local ovx = tonumber(m[3])
  local diverted = (ovx and (ovx == 0 or ovx > tonumber(ARGV[1]))) or m[4] ~= false
  return m[1], tonumber(m[2]) or 0, LIMITS[m[1]] or DEFAULT_LIMIT, diverted
end

-- mode '1' counts the request, '2' peeks (same answer, nothing written).
local function subject_hit(key, now, limit, mode, nonce)
  return $strategy(key, now, limit, WINDOW, 1, mode == '1' and 1 or 0, nonce)
end
""")

# One Redis: KEYS ban, ban history, ip log, ban index, meta, subject key, flags...
# ARGV: now, nonce, ip ('' = exempt), has_subject ('0' none, '1' count, '2' peek).
LUA_CHECK = """
local now, nonce, ip, mode = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
-- Flags are read before anything is counted: a flagged request (e.g. a revoked token) is refused by
-- the caller, so the subject hit is skipped like a blocked subject's (the IP still counts).
local flags, flagged = {}, false
for i = 7, #KEYS do
  local v = tonumber(redis.call('GET', KEYS[i]))
  if v and v > now then flags[#flags + 1] = 1; flagged = true else flags[#flags + 1] = 0 end
end
local function finish(out)
  for i = 1, #flags do out[#out + 1] = flags[i] end
  return out
end
local ip_code, bans = 0, 0
if ip ~= '' then
  local until_
  until_, bans = ip_gate(KEYS[1], KEYS[2], now)
  if until_ > now then return finish({2, until_, bans, 0, '', 0, 0, 0, 0, 0, 0}) end
  ip_code = 1
end
local tier, blocked, limit, diverted = '', 0, 0, false
if mode ~= '0' then
  tier, blocked, limit, diverted = subject_meta(KEYS[5])
  if not tier then return finish({ip_code, 0, bans, 1, '', 0, 0, 0, 0, 0, 0}) end
  -- an active override or credits: decided by the policy script instead (nothing counted here)
  if diverted then return finish({ip_code, 0, bans, 4, '', 0, 0, 0, 0, 0, 0}) end
end
if ip ~= '' then
  local n, u = ip_count(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ip, now, nonce)
  if n then return finish({3, u, n, 0, '', 0, 0, 0, 0, 0, 0}) end
end
if mode == '0' then return finish({ip_code, 0, bans, 0, '', 0, 0, 0, 0, 0, 0}) end
if blocked == 1 or flagged then return finish({ip_code, 0, bans, 3, tier, blocked, 0, 0, 0, 0, limit}) end
local r = subject_hit(KEYS[6], now, limit, mode, nonce)
return finish({ip_code, 0, bans, 2, tier, 0, r[1], r[2], r[3], r[4], limit})
"""

# Redis Cluster, the IP's slot. KEYS ban, ban history, ip log; ARGV now, nonce, ip.
# Returns {1, 0, bans} counted, {2, until, bans} banned (nothing counted), {3, until, n} ban started
# (the caller adds the IP to the ban index, which lives in another slot).
LUA_CHECK_IP = """
local now, nonce, ip = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local until_, bans = ip_gate(KEYS[1], KEYS[2], now)
if until_ > now then return {2, until_, bans} end
local n, u = ip_count(KEYS[1], KEYS[2], KEYS[3], false, ip, now, nonce)
if n then return {3, u, n} end
return {1, 0, bans}
"""

# Redis Cluster, the subject's slot. KEYS meta, subject key; ARGV now, nonce, mode ('1' count, '2' peek).
# Returns {meta_code, tier, blocked, allowed, a, b, c, limit}: meta_code 1 missing, 2 decided, 3 blocked.
LUA_CHECK_SUBJECT = """
local now, nonce, mode = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local tier, blocked, limit = subject_meta(KEYS[1])
if not tier then return {1, '', 0, 0, 0, 0, 0, 0} end
if blocked == 1 then return {3, tier, 1, 0, 0, 0, 0, limit} end
local r = subject_hit(KEYS[2], now, limit, mode, nonce)
return {2, tier, 0, r[1], r[2], r[3], r[4], limit}
"""

# Redis Cluster: take back a subject hit. KEYS subject key; ARGV now, nonce, limit.
LUA_UNDO = "undo_{strategy}(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[3]), {window}, ARGV[2]) return 1"

# Redis Cluster, the ban index's slot. KEYS index; ARGV now, ip, until.
LUA_INDEX = "index_add(KEYS[1], ARGV[2], tonumber(ARGV[1]), tonumber(ARGV[3])) return 1"

# KEYS ban, history[, index]; ARGV now, ip, length_us, nonce (no index on Redis Cluster: see LUA_INDEX)
LUA_BAN = "local n, u = start_ban(KEYS[1], KEYS[2], KEYS[3] or false, ARGV[2], tonumber(ARGV[1]), " \
    "tonumber(ARGV[3]), 0, 1, 0, ARGV[4]) return {n, u}"
# KEYS ban, ip log, index, ban history; ARGV now, ip, replay ('1': an unban queued during an outage,
# skipped when a ban started after it, e.g. one set through another worker in the meantime)
LUA_UNBAN = """
if ARGV[3] == '1' and redis.call('ZCOUNT', KEYS[4], '(' .. ARGV[1], '+inf') > 0 then return 0 end
local active = (tonumber(redis.call('GET', KEYS[1])) or 0) > tonumber(ARGV[1])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return active and 1 or 0
"""
# Redis Cluster, the IP's slot: LUA_UNBAN without the index. KEYS ban, ip log, ban history; returns -1
# when a replayed unban is skipped, else 1/0 (was a ban active); the caller then removes the IP from the index.
LUA_UNBAN_IP = """
if ARGV[3] == '1' and redis.call('ZCOUNT', KEYS[3], '(' .. ARGV[1], '+inf') > 0 then return -1 end
local active = (tonumber(redis.call('GET', KEYS[1])) or 0) > tonumber(ARGV[1])
redis.call('DEL', KEYS[1], KEYS[2])
return active and 1 or 0
"""

# KEYS: ban, ban history, ip log, ban index, meta, credits, flags...
# ARGV: now, nonce, ip ('' = exempt), mode ('0' no subject, '1' count, '2' peek), cost, day period,
# month period, number of route limits, then per route limit: quota, window, shadow (0/1), key suffix.
# Every limit that applies (the tier's, or the subject's override, plus the route's) is checked first
# with nothing written; only when every enforced limit admits (and credits suffice) are all of them
# spent, in the same script: all or nothing. Limit keys share the subject's hash tag; their names are
# built here from the meta key (``rl:{k:42}:meta`` -> ``rl:{k:42}:sw:86400``).
LUA_POLICY_CHECK = string.Template("""
local TIERS, DEFAULT_TIER, SHADOW = $tiers, $default_tier, $shadow
local IP_LIMIT, IP_WINDOW, BAN_US, BAN_MULT, BAN_CAP = $ip_limit, $ip_window, $ban_us, $ban_multiplier, $ban_cap
local now, nonce, ip, mode, cost = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local flags, flagged = {}, false
for i = 7, #KEYS do
  local v = tonumber(redis.call('GET', KEYS[i]))
  if v and v > now then flags[#flags + 1] = 1; flagged = true else flags[#flags + 1] = 0 end
end
-- The reply is {numbers joined by commas, tier, override}: one bulk string parses far faster in the
-- client than an array of two dozen integers.
local function finish(out)
  for i = 1, #flags do out[#out + 1] = flags[i] end
  local tier_, ovr_ = out[5], out[10]
  out[5], out[10] = 0, 0
  for i = 1, #out do out[i] = num(out[i]) end
  return {table.concat(out, ','), tier_, ovr_}
end
local ip_code, bans = 0, 0
if ip ~= '' then
  local until_ = tonumber(redis.call('GET', KEYS[1])) or 0
  bans = ban_count(KEYS[2], now)
  if until_ > now then return finish({2, until_, bans, 0, '', 0, 0, 0, 0, '', 0}) end
  ip_code = 1
end
local m = {}
if mode ~= '0' then
  m = redis.call('HMGET', KEYS[5], 'tier', 'blocked', 'ovr', 'ovx', 'cr')
  if not m[1] then return finish({ip_code, 0, bans, 1, '', 0, 0, 0, 0, '', 0}) end
end
if ip ~= '' then
  local r = sliding_window(KEYS[3], now, IP_LIMIT, IP_WINDOW, 1, 1, nonce)
  if r[1] == 0 then
    local n, u = start_ban(KEYS[1], KEYS[2], KEYS[4], ip, now, 0, BAN_US, BAN_MULT, BAN_CAP, nonce)
    return finish({3, u, n, 0, '', 0, 0, 0, 0, '', 0})
  end
end
if mode == '0' then return finish({ip_code, 0, bans, 0, '', 0, 0, 0, 0, '', 0}) end
local tier, blocked = m[1], tonumber(m[2]) or 0
if blocked == 1 or flagged then return finish({ip_code, 0, bans, 3, tier, blocked, 0, 0, 0, '', 0}) end
local base = string.sub(KEYS[5], 1, -5)
local Q, W, S, K, n, ovr = {}, {}, {}, {}, 0, ''
local ovx = tonumber(m[4])
if m[3] and ovx and (ovx == 0 or ovx > now) then
  ovr = m[3]
  for q, w, sfx in string.gmatch(ovr, '(%d+):(%d+):([^,]+)') do
    n = n + 1; Q[n], W[n], S[n], K[n] = tonumber(q), tonumber(w), 0, base .. sfx
  end
else
  for _, t in ipairs(TIERS[tier] or TIERS[DEFAULT_TIER]) do
    n = n + 1; Q[n], W[n], S[n], K[n] = t[1], t[2], t[3], base .. t[4]
  end
end
for i = 1, tonumber(ARGV[8]) do
  local j = 5 + 4 * i
  n = n + 1
  Q[n], W[n], S[n], K[n] = tonumber(ARGV[j]), tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]), base .. ARGV[j + 3]
end
-- credits first: they do not depend on the limits, and short credits mean nothing is spent
local ccode, left, period = 0, 0, nil
if m[5] then
  local c = redis.call('HMGET', KEYS[6], 'n', 'a', 'e', 'p')
  left = tonumber(c[1]) or 0
  if c[2] and c[3] then
    period = c[3] == 'month' and ARGV[7] or ARGV[6]
    if c[4] ~= period then left = tonumber(c[2]) end
  end
  ccode = left >= cost and 1 or 2
end
local record = (mode == '1' and ccode ~= 2) and 1 or 0
local ok = ccode == 2 and 0 or 1
local R = {}
for i = 1, n - 1 do
  R[i] = $strategy(K[i], now, Q[i], W[i], cost, 0, nonce)
  if R[i][1] == 0 and S[i] == 0 and SHADOW == 0 then ok = 0 end
end
-- the last limit is checked and, when every other one admits, spent in the same call (one pass fewer)
R[n] = $strategy(K[n], now, Q[n], W[n], cost, ok * record, nonce)
if R[n][1] == 0 and S[n] == 0 and SHADOW == 0 then ok = 0 end
if ok == 1 and record == 1 then
  for i = 1, n - 1 do
    if R[i][1] == 1 then R[i] = $strategy(K[i], now, Q[i], W[i], cost, 1, nonce) end
  end
  if ccode == 1 then
    left = left - cost
    redis.call('HSET', KEYS[6], 'n', num(left))
    if period then redis.call('HSET', KEYS[6], 'p', period) end
  end
end
local out = {ip_code, 0, bans, 2, tier, 0, ok, ccode, left, ovr, n}
for i = 1, n do
  local r = R[i]
  out[#out + 1] = r[1]; out[#out + 1] = r[2]; out[#out + 1] = r[3]; out[#out + 1] = r[4]
end
return finish(out)
""")

# KEYS meta; ARGV override ('' none), its expiry (0 never), credits ('1'/'0'). Only an existing meta is
# changed: a missing one is reloaded from the database, these fields included, on the next request.
LUA_POLICY_META = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[1], 'ovr', 'ovx', 'cr')
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'ovr', ARGV[1], 'ovx', ARGV[2]) end
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'cr', '1') end
return 1
"""
HEADER = 11  # fields of a policy check reply before the per-limit groups (the override applied is the 10th)
GROUP = 4  # fields per limit (the strategy's raw tuple), in order: tier or override limits, then the route's


class RuleLimit(NamedTuple):
    """One limit as the stores get it: window in microseconds, key suffix after ``rl:{k:42}:``."""

    quota: int
    window: int
    shadow: int
    suffix: str


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


def _needs_policy(meta: tuple, now: int) -> bool:
    """A memory meta tuple (tier, blocked, override, its expiry, credits) with an active override or credits."""
    return (meta[2] is not None and (meta[3] == 0 or meta[3] > now)) or bool(meta[4])


NEVER_US = 2**62  # memory-store expiry of entries that never expire (credits)
_OVERRIDE_RE = re.compile(r"(\d+):(\d+):([^,]+)")


def parse_override(text: str) -> list[RuleLimit]:
    """The meta's override field, ``quota:window_us:suffix,...``, as the script's gmatch reads it."""
    return [RuleLimit(int(q), int(w), 0, sfx) for q, w, sfx in _OVERRIDE_RE.findall(text)]


def encode_override(limits: Sequence[RuleLimit]) -> str:
    return ",".join(f"{limit.quota}:{limit.window}:{limit.suffix}" for limit in limits)


def _periods(now: int) -> tuple[str, str]:
    """Credit refill periods of clock time ``now`` (us): UTC day number and month number."""
    seconds = now // US
    day = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return str(seconds // 86400), str(day.year * 12 + day.month - 1)


class Strategy:
    """One algorithm: a Lua function for Redis, ``apply`` for memory, ``result`` shared."""

    name: ClassVar[str]
    suffix: ClassVar[str]

    def apply(self, state: Any, now: int, limit: int, window: int, cost: int, record: int) -> tuple[Any, int, tuple]:
        """Memory twin of the Lua function: (new state, its expiry in us, raw tuple)."""
        raise NotImplementedError

    def result(self, raw: Sequence[int], now: int, limit: int, window: int, cost: int) -> LimitResult:
        raise NotImplementedError


_new_tuple = tuple.__new__


def _limit_result(allowed: Any, limit: int, used: int, reset_us: int, retry_us: int) -> LimitResult:
    # tuple.__new__ skips NamedTuple's Python-level __new__: this runs on every decision.
    remaining = limit - used if used < limit else 0
    retry = 0.0 if allowed else (retry_us / US if retry_us > 0 else 0.0)
    return _new_tuple(LimitResult, (bool(allowed), limit, remaining, reset_us / US, retry))


class SlidingWindow(Strategy):
    """Exact sliding log: admitted iff fewer than ``limit`` admitted requests in (now - window, now]."""

    name, suffix = "sliding_window", "sw"

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


class FixedWindow(Strategy):
    """Counter per aligned window; cheap, allows up to 2x limit across a boundary."""

    name, suffix = "fixed_window", "fw"

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


class SlidingWindowCounter(Strategy):
    """Two fixed buckets, the previous weighted by its overlap with the window: O(1) memory, approximate."""

    name, suffix = "sliding_window_counter", "swc"

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


class Gcra(Strategy):
    """Token bucket as GCRA: one theoretical arrival time per key, a burst of ``limit``, refill window/limit."""

    name, suffix = "gcra", "gcra"

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


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (SlidingWindow, SlidingWindowCounter, FixedWindow, Gcra)}


def get_strategy(name: str) -> Strategy:
    """Return the strategy registered as ``name``; ValueError naming the valid ones otherwise."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown rate-limit strategy {name!r}; valid: {', '.join(STRATEGIES)}") from None


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


class Policy(NamedTuple):
    """What check_request enforces; times in microseconds. Both stores get it at construction."""

    tier_limits: dict[str, int]
    default_limit: int
    window: int
    ip_limit: int
    ip_window: int
    ban_us: int
    ban_multiplier: float
    ban_cap: int = MAX_BAN_US

    def render(self, template: string.Template, strategy: str) -> str:
        """The check script with this policy's numbers as Lua constants."""
        limits = "{" + ", ".join(f"[{_lua_string(t)}] = {n}" for t, n in self.tier_limits.items()) + "}"
        values = {**self._asdict(), "limits": limits, "strategy": strategy, "ban_multiplier": repr(self.ban_multiplier)}
        return template.substitute(values)


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# --------------------------------------------------------------------------- stores
# Both stores offer: hit, check, set_meta, delete_meta, set_flag, has_flag, ban, unban,
# bans, ping, reset, close. Arguments and raw results are identical.

class MemoryStore:
    """Per-process store: a dict of key -> [expires_us, value] under one lock, swept as it expires."""

    kind = "memory"
    SWEEP_EVERY_US = 5 * US

    def __init__(self, keys: Keys, strategy: Strategy, policy: Policy) -> None:
        self.keys = keys
        self.strategy = strategy
        self.policy = policy
        self.ip_log = SlidingWindow()
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

    def _apply(self, strategy: Strategy, key: str, now: int, limit: int, window: int, cost: int, record: int):
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

    def hit(self, key: str, now: int, limit: int, window: int, cost: int, record: int) -> tuple:
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

    def check(self, keys: list[str], now: int, ip: str, has_subject: int) -> list:
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            if len(keys) > 6:  # flags first, as in the script: a flagged request skips the subject hit
                flags = [int((self._get(k, now) or 0) > now) for k in keys[6:]]
                out = self._check(keys, now, ip, has_subject, self.policy, 1 in flags)
                out.extend(flags)
                return out
            return self._check(keys, now, ip, has_subject, self.policy, False)

    def _check(self, keys: list[str], now: int, ip: str, has_subject: int, policy: Policy, flagged: bool) -> list:
        ip_code = bans = 0
        if ip:
            until = self._get(keys[0], now) or 0
            bans = self._ban_count(keys[1], now)
            if until > now:
                return [2, until, bans, 0, "", 0, 0, 0, 0, 0, 0]
            ip_code = 1
        tier, blocked, limit = "", 0, 0
        if has_subject:
            meta = self._get(keys[4], now)
            if meta is None:
                return [ip_code, 0, bans, 1, "", 0, 0, 0, 0, 0, 0]
            tier, blocked = meta[0], meta[1]
            if len(meta) > 2 and _needs_policy(meta, now):  # override or credits: the policy path decides
                return [ip_code, 0, bans, 4, "", 0, 0, 0, 0, 0, 0]
            limit = policy.tier_limits.get(tier, policy.default_limit)
        if ip and not self._apply(self.ip_log, keys[2], now, policy.ip_limit, policy.ip_window, 1, 1)[0]:
            n, until = self._start_ban(ip, now, 0, policy.ban_us, policy.ban_multiplier, policy.ban_cap)
            return [3, until, n, 0, "", 0, 0, 0, 0, 0, 0]
        if not has_subject:
            return [ip_code, 0, bans, 0, "", 0, 0, 0, 0, 0, 0]
        if blocked or flagged:
            return [ip_code, 0, bans, 3, tier, blocked, 0, 0, 0, 0, limit]
        raw = self._apply(self.strategy, keys[5], now, limit, policy.window, 1, 1 if has_subject == 1 else 0)
        return [ip_code, 0, bans, 2, tier, 0, *raw, limit]

    def set_meta(self, key: str, now: int, tier: str, blocked: bool) -> None:
        with self._lock:
            old = self._get(key, now)
            self._put(key, (tier, int(blocked), *(old[2:] if old else ())), now + META_TTL_US)

    # ---- policy decisions (several limits, cost, overrides, credits): see LUA_POLICY_CHECK
    rules: dict[str, list[RuleLimit]] = {}
    rules_default = "free"
    rules_shadow = 0

    def configure_policy(self, tiers: dict[str, list[RuleLimit]], default_tier: str, shadow: bool) -> None:
        self.rules, self.rules_default, self.rules_shadow = tiers, default_tier, int(shadow)

    def check_policy(self, keys: list[str], now: int, ip: str, mode: int, cost: int, periods: tuple[str, str],
                     routes: Sequence[RuleLimit]) -> list:
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            flags = [int((self._get(k, now) or 0) > now) for k in keys[6:]]
            out = self._check_policy(keys, now, ip, mode, cost, periods, routes, 1 in flags)
            out.extend(flags)
            return out

    def _check_policy(self, keys: list[str], now: int, ip: str, mode: int, cost: int, periods: tuple[str, str],
                      routes: Sequence[RuleLimit], flagged: bool) -> list:
        policy = self.policy
        ip_code = bans = 0
        if ip:
            until = self._get(keys[0], now) or 0
            bans = self._ban_count(keys[1], now)
            if until > now:
                return [2, until, bans, 0, "", 0, 0, 0, 0, "", 0]
            ip_code = 1
        meta = None
        if mode:
            meta = self._get(keys[4], now)
            if meta is None:
                return [ip_code, 0, bans, 1, "", 0, 0, 0, 0, "", 0]
        if ip and not self._apply(self.ip_log, keys[2], now, policy.ip_limit, policy.ip_window, 1, 1)[0]:
            n, until = self._start_ban(ip, now, 0, policy.ban_us, policy.ban_multiplier, policy.ban_cap)
            return [3, until, n, 0, "", 0, 0, 0, 0, "", 0]
        if meta is None:
            return [ip_code, 0, bans, 0, "", 0, 0, 0, 0, "", 0]
        tier, blocked = meta[0], meta[1]
        if blocked or flagged:
            return [ip_code, 0, bans, 3, tier, blocked, 0, 0, 0, "", 0]
        override, expiry, credits_on = meta[2:] if len(meta) > 2 else (None, 0, 0)
        if override is not None and (expiry == 0 or expiry > now):
            limits, applied = parse_override(override), override
        else:
            limits, applied = self.rules.get(tier) or self.rules[self.rules_default], ""
        if routes:
            limits = [*limits, *routes]
        code = left = 0
        period = wallet = None
        if credits_on:  # credits first: they do not depend on the limits
            wallet = self._get(keys[5], now)
            left = wallet["n"] if wallet else 0
            if wallet and wallet.get("a") is not None:
                period = periods[1] if wallet["e"] == "month" else periods[0]
                if wallet.get("p") != period:
                    left = wallet["a"]
            code = 1 if left >= cost else 2
        record = 1 if mode == 1 and code != 2 else 0
        ok = 0 if code == 2 else 1
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
            if code == 1 and wallet is not None:
                left -= cost
                wallet["n"] = left
                if period is not None:
                    wallet["p"] = period
        out = [ip_code, 0, bans, 2, tier, 0, ok, code, left, applied, len(limits)]
        for allowed, a, b, c in raws:
            out += (int(allowed), a, b, c)
        return out

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


_RespConnection = RespConnection  # the name older code and tests know


class RedisStore:
    """Shared store on one Redis: hot-path scripts over lean pooled connections, cold paths over redis-py."""

    kind = "redis"

    def __init__(self, url: str, keys: Keys, strategy: Strategy, policy: Policy, spec: StoreSpec | None = None) -> None:
        self.keys = keys
        self.spec = spec or parse_store_url(url)
        self._params = dict(self.spec.params)
        self._redis: Any = None  # the redis-py client of the cold paths, made on first use
        self._url = url
        self._idle: list[RespConnection] = []
        self._pid = os.getpid()
        policy_lua = LUA_LIBRARY + policy.render(LUA_POLICY, strategy.name)
        sources = {
            "hit": LUA_LIBRARY + LUA_HIT.format(strategy=strategy.name),
            "check": policy_lua + LUA_CHECK,
            "check_ip": policy_lua + LUA_CHECK_IP,
            "check_subject": policy_lua + LUA_CHECK_SUBJECT,
            "undo": LUA_LIBRARY + LUA_UNDO.format(strategy=strategy.name, window=policy.window),
            "index": LUA_LIBRARY + LUA_INDEX,
            "ban": LUA_LIBRARY + LUA_BAN,
            "unban": LUA_UNBAN,
            "unban_ip": LUA_UNBAN_IP,
        }
        self._scripts = {name: src.encode() for name, src in sources.items()}
        self._sha = {name: hashlib.sha1(src, usedforsecurity=False).hexdigest().encode()
                     for name, src in self._scripts.items()}
        self._by_sha = {sha: name for name, sha in self._sha.items()}

    @property
    def _client(self) -> Any:
        if self._redis is None:
            self._redis = self._make_client()
        return self._redis

    def _make_client(self) -> Any:
        return redis.Redis.from_url(self._url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=OP_TIMEOUT,
                                    retry=Retry(NoBackoff(), 0))

    def _conn(self) -> RespConnection:
        if self._pid != os.getpid():  # forked: never share a parent's sockets
            self._idle, self._pid = [], os.getpid()
        try:
            return self._idle.pop()
        except IndexError:
            return RespConnection(self._params)

    def _eval(self, name: str, keys: Sequence[str], args: Sequence[Any], size: int = -1) -> Any:
        """EVALSHA, loading the script on first use or after a NOSCRIPT (e.g. Redis restarted).

        ``size`` >= 0: the reply must be a list of that length (else ResponseError).
        """
        conn = self._conn()
        try:
            sha = self._sha.get(name) or self._load(conn, name)
            try:
                reply = conn.call(b"EVALSHA", sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                reply = conn.call(b"EVALSHA", self._load(conn, name), len(keys), *keys, *args)
        except redis.ResponseError:  # a whole error reply was read: the connection is in step
            self._idle.append(conn)
            raise
        except BaseException:  # anything else may leave a reply half read: never reuse the connection
            conn.close()
            raise
        self._idle.append(conn)
        if size >= 0 and (type(reply) is not list or len(reply) != size):
            raise redis.ResponseError(f"unexpected reply to the {name} script: {reply!r:.80}")
        return reply

    def _run(self, fn: Callable[[RespConnection], Any]) -> Any:
        """``fn(conn)`` on a pooled connection, pooled again only if it is still in step."""
        conn = self._conn()
        try:
            reply = fn(conn)
        except redis.ResponseError:
            self._idle.append(conn)
            raise
        except BaseException:
            conn.close()
            raise
        self._idle.append(conn)
        return reply

    def _load(self, conn: RespConnection, name: str) -> bytes:
        self._sha[name] = sha = conn.call(b"SCRIPT", b"LOAD", self._scripts[name])
        self._by_sha[sha] = name
        return sha

    def ping(self) -> None:
        """PING and (re)load the scripts: the probe before using the store (again)."""
        def probe(conn: RespConnection) -> None:
            conn.call(b"PING")
            for name in self._scripts:
                self._load(conn, name)

        self._run(probe)

    def alive(self) -> None:
        """A bare PING (the health check of a store believed up)."""
        if self._run(lambda conn: conn.call(b"PING")) != b"PONG":
            raise redis.ResponseError("unexpected reply to PING")

    def hit(self, key: str, now: int, limit: int, window: int, cost: int, record: int) -> list:
        return self._eval("hit", (key,), (now, limit, window, cost, record, _nonce()), 4)

    def check(self, keys: list[str], now: int, ip: str, has_subject: int) -> list:
        out = self._eval("check", keys, (now, _nonce(), ip, str(int(has_subject))), len(keys) + 5)
        tier = out[4]
        if type(tier) is not bytes:
            raise redis.ResponseError(f"unexpected tier in the check reply: {tier!r:.80}")
        out[4] = tier.decode()
        return out

    def set_meta(self, key: str, now: int, tier: str, blocked: bool) -> None:
        with self._client.pipeline() as pipe:
            pipe.hset(key, mapping={"tier": tier, "blocked": int(blocked)}).pexpire(key, META_TTL_US // 1000)
            pipe.execute()

    # ---- policy decisions: see LUA_POLICY_CHECK
    def configure_policy(self, script: str) -> None:
        self._scripts["policy"] = (LUA_LIBRARY + script).encode()
        self._scripts["policy_meta"] = LUA_POLICY_META.encode()
        for name in ("policy", "policy_meta"):  # known by SHA from the start, as the others (NOSCRIPT loads them)
            sha = hashlib.sha1(self._scripts[name], usedforsecurity=False).hexdigest().encode()
            self._sha[name], self._by_sha[sha] = sha, name

    def check_policy(self, keys: list[str], now: int, ip: str, mode: int, cost: int, periods: tuple[str, str],
                     routes: Sequence[RuleLimit]) -> list:
        args: list[Any] = [now, _nonce(), ip, mode, cost, periods[0], periods[1], len(routes)]
        for limit in routes:
            args.extend(limit)
        reply = self._eval("policy", keys, args, 3)
        numbers, tier, applied = reply
        try:
            out: list[Any] = list(map(int, numbers.split(b",")))
            out[4], out[9] = tier.decode(), applied.decode()
        except (AttributeError, ValueError, IndexError):
            raise redis.ResponseError(f"unexpected reply to the policy script: {reply!r:.80}") from None
        if len(out) < HEADER:
            raise redis.ResponseError(f"unexpected reply to the policy script: {reply!r:.80}")
        return out

    def set_policy_meta(self, key: str, now: int, override: str, expiry: int, credits_on: bool) -> None:
        self._eval("policy_meta", (key,), (override, expiry, "1" if credits_on else "0"))

    def set_credits(self, key: str, now: int, credits: int, amount: int | None, every: str | None,
                    period: str) -> None:
        with self._client.pipeline() as pipe:
            pipe.delete(key)
            fields: dict[Any, Any] = {"n": credits}
            if amount is not None:
                fields.update(a=amount, e=every or "day", p=period)
            pipe.hset(key, mapping=fields)
            pipe.execute()

    def peek_credits(self, key: str, now: int, periods: tuple[str, str]) -> int | None:
        n, amount, every, period = self._client.hmget(key, "n", "a", "e", "p")  # type: ignore[misc]
        if n is None:
            return None
        if amount is not None and every is not None:
            current = periods[1] if every == b"month" else periods[0]
            if (period or b"") != current.encode():
                return int(amount)
        return int(n)

    def delete_meta(self, key: str, now: int) -> None:
        self._client.delete(key)

    def set_flag(self, key: str, now: int, ttl_us: int) -> None:
        self._client.set(key, now + ttl_us, px=max(1, ttl_us // 1000))

    def has_flag(self, key: str, now: int) -> bool:
        return int(self._client.get(key) or 0) > now

    def ban(self, ip: str, now: int, length: int, nonce: str) -> tuple[int, int]:
        keys = (self.keys.ip(ip, "ban"), self.keys.ip(ip, "bans"), self.keys.ban_index)
        n, until = self._eval("ban", keys, (now, ip, length, nonce), 2)
        return n, until

    def unban(self, ip: str, now: int, replay: bool = False) -> bool:
        keys = (self.keys.ip(ip, "ban"), self.keys.ip(ip, "sw"), self.keys.ban_index, self.keys.ip(ip, "bans"))
        return bool(self._eval("unban", keys, (now, ip, "1" if replay else "0")))

    def bans(self, now: int) -> list[tuple[str, int, int]]:
        self._client.zremrangebyscore(self.keys.ban_index, "-inf", now)
        entries = self._client.zrange(self.keys.ban_index, 0, -1, withscores=True)
        with self._client.pipeline(transaction=False) as pipe:
            for ip, _ in entries:
                pipe.zcount(self.keys.ip(ip.decode(), "bans"), f"({now - DAY_US}", "+inf")
            counts = pipe.execute()
        return [(ip.decode(), int(until), n) for (ip, until), n in zip(entries, counts, strict=True)]

    def publish(self, channel: str, message: str) -> None:
        self._client.publish(channel, message)

    # The subscription must fail loudly, never reconnect and resubscribe by itself: messages sent while
    # it was away would be lost unseen. The client name lets operators (and tests) find it.
    PUBSUB_OPTIONS: ClassVar[dict[str, Any]] = dict(socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=OP_TIMEOUT,
                                                    health_check_interval=1, retry=Retry(NoBackoff(), 0))

    def _pubsub_client(self, name: str) -> redis.Redis:
        return redis.Redis.from_url(self._url, client_name=name, **self.PUBSUB_OPTIONS)

    def subscriber(self, channel: str) -> Callable[[], Any]:
        """A function that subscribes to ``channel`` and returns the PubSub once Redis confirmed it."""
        def subscribe() -> Any:
            pubsub = self._pubsub_client(f"refusal-cache:{channel}").pubsub()
            try:
                pubsub.subscribe(channel)
                for _ in range(3):
                    message = pubsub.get_message(timeout=1.0)
                    if message and message["type"] == "subscribe":
                        return pubsub
                raise redis.ConnectionError(f"no confirmation of SUBSCRIBE {channel}")
            except BaseException:
                pubsub.close()
                raise

        return subscribe

    def reset(self) -> None:
        batch = []
        for key in self._client.scan_iter(match=self.keys.prefix + ":*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                self._client.delete(*batch)
                batch = []
        if batch:
            self._client.delete(*batch)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
        if self._redis is not None:
            self._redis.close()


class SentinelStore(RedisStore):
    """One Redis found through Sentinel: the master is asked of the sentinels, and asked again
    when a connection to it fails or it answers READONLY (it was demoted by a failover)."""

    def __init__(self, url: str, keys: Keys, strategy: Strategy, policy: Policy, spec: StoreSpec) -> None:
        super().__init__(url, keys, strategy, policy, spec)
        self.resolver = SentinelResolver(spec)
        self._master: Addr | None = None

    def _current(self) -> Addr:
        addr = self.resolver.master()
        if addr != self._master:  # a new master: connections to the old one must not be reused
            stale, self._idle = self._idle, []
            for conn in stale:
                conn.close()
            if self._redis is not None:
                self._redis.close()
                self._redis = None
            self._params = {**self.spec.params, "host": addr[0], "port": addr[1]}
            self._master = addr
        return addr

    def _make_client(self) -> Any:
        self._current()
        return redis.Redis(**{k: v for k, v in self._params.items() if k in ("host", "port", "db", "username",
                                                                              "password")},
                           socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=OP_TIMEOUT,
                           retry=Retry(NoBackoff(), 0))

    def _conn(self) -> RespConnection:
        self._current()
        return super()._conn()

    @property
    def _client(self) -> Any:
        self._current()
        if self._redis is None:
            self._redis = self._make_client()
        return self._redis

    def _lost(self) -> None:
        self.resolver.forget()

    def _eval(self, name: str, keys: Sequence[str], args: Sequence[Any], size: int = -1) -> Any:
        try:
            return super()._eval(name, keys, args, size)
        except (ConnectFailed, redis.exceptions.ReadOnlyError):  # nothing was executed: safe to try the new master
            self._lost()
            return super()._eval(name, keys, args, size)
        except redis.ConnectionError:  # the script may have run: not retried (it would count twice)
            self._lost()
            raise

    def _run(self, fn: Callable[[RespConnection], Any]) -> Any:
        try:
            return super()._run(fn)
        except (redis.ConnectionError, redis.exceptions.ReadOnlyError):
            self._lost()
            raise

    def ping(self) -> None:
        """Ask the sentinels again, then probe the master they name."""
        self._lost()
        super().ping()

    def _cold(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (redis.ConnectionError, redis.exceptions.ReadOnlyError):
            self._lost()
            raise

    def set_meta(self, key: str, now: int, tier: str, blocked: bool) -> None:
        self._cold(lambda: RedisStore.set_meta(self, key, now, tier, blocked))

    def delete_meta(self, key: str, now: int) -> None:
        self._cold(lambda: RedisStore.delete_meta(self, key, now))

    def set_flag(self, key: str, now: int, ttl_us: int) -> None:
        self._cold(lambda: RedisStore.set_flag(self, key, now, ttl_us))

    def has_flag(self, key: str, now: int) -> bool:
        return self._cold(lambda: RedisStore.has_flag(self, key, now))

    def bans(self, now: int) -> list[tuple[str, int, int]]:
        return self._cold(lambda: RedisStore.bans(self, now))

    def reset(self) -> None:
        self._cold(lambda: RedisStore.reset(self))

    def publish(self, channel: str, message: str) -> None:
        self._cold(lambda: RedisStore.publish(self, channel, message))

    def _pubsub_client(self, name: str) -> redis.Redis:
        host, port = self.resolver.master()
        return redis.Redis(host=host, port=port, client_name=name, **self.PUBSUB_OPTIONS,
                           **{k: v for k, v in self.spec.params.items() if k in ("db", "username", "password")})


class ClusterStore(RedisStore):
    """Redis Cluster: every script runs on the master of its keys' slot (one subject per script).

    The hot path keeps its own slot map (``CLUSTER SLOTS``), fixes it on MOVED, follows ASK with
    ASKING, and retries TRYAGAIN; commands bound for several nodes are written to all of them
    before any reply is read, so a decision spanning two slots costs one round trip of wall time.
    Cold paths go through redis-py's RedisCluster.
    """

    REDIRECTS = 5

    def __init__(self, url: str, keys: Keys, strategy: Strategy, policy: Policy, spec: StoreSpec) -> None:
        super().__init__(url, keys, strategy, policy, spec)
        self.slots = SlotMap(spec)
        self._pools: dict[Addr, list[RespConnection]] = {}

    def _make_client(self) -> Any:
        from redis.cluster import ClusterNode, RedisCluster

        auth = {k: v for k, v in self.spec.params.items() if k in ("username", "password")}
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in self.spec.nodes], **auth,
                            socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=OP_TIMEOUT,
                            retry=Retry(NoBackoff(), 1))

    def _node_conn(self, addr: Addr) -> RespConnection:
        if self._pid != os.getpid():
            self._pools, self._pid = {}, os.getpid()
        try:
            return self._pools[addr].pop()
        except (KeyError, IndexError):
            return RespConnection({**self.spec.params, "host": addr[0], "port": addr[1]})

    def _release(self, addr: Addr, conn: RespConnection) -> None:
        self._pools.setdefault(addr, []).append(conn)

    def batch(self, commands: Sequence[tuple[str, tuple]]) -> list[Any]:
        """Run each (routing key, command) on the master of the key's slot; replies in order.

        Every node's commands are written (pipelined) before any reply is read. Error replies come
        back as exceptions in the list; redirections and NOSCRIPT are handled here.
        """
        replies: list[Any] = [None] * len(commands)
        # item: (index, slot, command, ASK target or None)
        todo: list[tuple[int, int, tuple, Addr | None]] = [(i, key_slot(key), cmd, None)
                                                            for i, (key, cmd) in enumerate(commands)]
        for attempt in range(self.REDIRECTS):
            groups: dict[Addr, list] = {}
            for item in todo:
                groups.setdefault(item[3] or self.slots.node(item[1]), []).append(item)
            todo = []
            open_: list[tuple[Addr, RespConnection, list]] = []
            try:
                for addr, items in groups.items():
                    conn = self._node_conn(addr)
                    open_.append((addr, conn, items))
                    conn.send(b"".join((encode(b"ASKING") if ask else b"") + encode(*cmd)
                                       for _, _, cmd, ask in items))
                while open_:
                    addr, conn, items = open_[0]
                    missing: list[bytes] = []
                    for i, slot, cmd, ask in items:
                        if ask:
                            conn.reply()
                        reply = conn.reply()
                        if isinstance(reply, redis.exceptions.MovedError):
                            self.slots.moved(slot, (reply.host, reply.port))
                            todo.append((i, slot, cmd, None))
                        elif isinstance(reply, redis.exceptions.AskError):
                            todo.append((i, slot, cmd, (reply.host, reply.port)))
                        elif isinstance(reply, redis.exceptions.NoScriptError):
                            missing.append(cmd[1])
                            todo.append((i, slot, cmd, addr if ask else None))
                        elif isinstance(reply, redis.exceptions.TryAgainError):  # a slot half migrated
                            todo.append((i, slot, cmd, ask))
                        else:
                            replies[i] = reply
                    for sha in dict.fromkeys(missing):
                        conn.call(b"SCRIPT", b"LOAD", self._scripts[self._by_sha[sha]])
                    open_.pop(0)
                    self._release(addr, conn)
            except BaseException:
                for _, conn, _ in open_:  # possibly mid-reply: never reused
                    conn.close()
                self.slots.stale = True
                raise
            if not todo:
                return replies
            if attempt:
                time.sleep(0.005 * attempt)  # TRYAGAIN / a migration under way: let it finish
        raise redis.exceptions.ClusterError("too many cluster redirections")

    def _eval(self, name: str, keys: Sequence[str], args: Sequence[Any], size: int = -1) -> Any:
        reply = self.batch([(keys[0], (b"EVALSHA", self._sha[name], len(keys), *keys, *args))])[0]
        if isinstance(reply, Exception):
            raise reply
        if size >= 0 and (type(reply) is not list or len(reply) != size):
            raise redis.ResponseError(f"unexpected reply to the {name} script: {reply!r:.80}")
        return reply

    def _on_masters(self, *command: Any) -> list[Any]:
        """``command`` on every master (its reply per master)."""
        masters = self.slots.masters
        out = []
        for addr in masters:
            conn = self._node_conn(addr)
            try:
                out.append(conn.call(*command))
            except BaseException:
                conn.close()
                self.slots.stale = True
                raise
            self._release(addr, conn)
        return out

    def ping(self) -> None:
        """Reload the slot map (every slot must be served), then PING and load the scripts on every master."""
        self.slots.refresh()
        if None in self.slots.slots:
            raise redis.exceptions.ClusterDownError("CLUSTERDOWN not every slot is served")
        self._on_masters(b"PING")
        for name in self._scripts:
            self._on_masters(b"SCRIPT", b"LOAD", self._scripts[name])

    def alive(self) -> None:
        if self.slots.stale:
            self.slots.refresh()
        if any(reply != b"PONG" for reply in self._on_masters(b"PING")):
            raise redis.ResponseError("unexpected reply to PING")

    def check(self, keys: list[str], now: int, ip: str, has_subject: int) -> list:
        """The IP's script, the subject's script and the flag reads at once; then the combined answer,
        the same as the one-Redis script's. A subject hit counted for a request that the IP's slot or a
        flag refuses is taken back (the one-Redis script would not have counted it), and so is an IP hit
        counted for a request whose subject's meta is missing."""
        nonce = _nonce()
        commands: list[tuple[str, tuple]] = []
        if ip:
            commands.append((keys[0], (b"EVALSHA", self._sha["check_ip"], 3, *keys[:3], now, nonce, ip)))
        if has_subject:
            commands.append((keys[4], (b"EVALSHA", self._sha["check_subject"], 2, keys[4], keys[5], now, nonce,
                                       has_subject)))
        commands.extend((flag, (b"GET", flag)) for flag in keys[6:])
        replies = self.batch(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        ip_code, until, bans = replies.pop(0) if ip else (0, 0, 0)
        subject = replies.pop(0) if has_subject else None
        flags = [1 if int(v or 0) > now else 0 for v in replies]
        after: list[tuple[str, tuple]] = []  # compensations, and the ban index of a ban just started
        if ip_code == 3:
            after.append((self.keys.ban_index, (b"EVALSHA", self._sha["index"], 1, self.keys.ban_index, now, ip,
                                                until)))
        out = [ip_code, until, bans, 0, "", 0, 0, 0, 0, 0, 0]
        if subject is not None:
            meta_code, tier, blocked, allowed, a, b, c, limit = subject
            recorded = has_subject == 1 and meta_code == 2 and allowed == 1
            if ip_code >= 2:
                pass  # the IP is refused: nothing about the subject is reported, as on one Redis
            elif meta_code == 1:
                out[3] = 1
                if ip_code == 1:
                    after.append((keys[2], (b"ZREM", keys[2], nonce + ":1")))
            elif meta_code == 3 or 1 in flags:
                out[3:] = [3, tier.decode(), blocked, 0, 0, 0, 0, limit]
            else:
                out[3:] = [2, tier.decode(), 0, allowed, a, b, c, limit]
            if recorded and (ip_code >= 2 or 1 in flags):
                after.append((keys[5], (b"EVALSHA", self._sha["undo"], 1, keys[5], now, nonce, limit)))
        if after:
            for reply in self.batch(after):
                if isinstance(reply, Exception):
                    raise reply
        out.extend(flags)
        return out

    def set_meta(self, key: str, now: int, tier: str, blocked: bool) -> None:
        with self._client.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping={"tier": tier, "blocked": int(blocked)}).pexpire(key, META_TTL_US // 1000)
            pipe.execute()

    def ban(self, ip: str, now: int, length: int, nonce: str) -> tuple[int, int]:
        n, until = self._eval("ban", (self.keys.ip(ip, "ban"), self.keys.ip(ip, "bans")), (now, ip, length, nonce), 2)
        self._eval("index", (self.keys.ban_index,), (now, ip, until))
        return n, until

    def unban(self, ip: str, now: int, replay: bool = False) -> bool:
        keys = (self.keys.ip(ip, "ban"), self.keys.ip(ip, "sw"), self.keys.ip(ip, "bans"))
        active = self._eval("unban_ip", keys, (now, ip, "1" if replay else "0"))
        if active == -1:
            return False
        self._client.zrem(self.keys.ban_index, ip)
        return bool(active)

    def _pubsub_client(self, name: str) -> redis.Redis:
        if self.slots.stale:
            self.slots.refresh()
        host, port = self.slots.masters[os.getpid() % len(self.slots.masters)]  # spread the subscribers
        return redis.Redis(host=host, port=port, client_name=name, **self.PUBSUB_OPTIONS,
                           **{k: v for k, v in self.spec.params.items() if k in ("username", "password")})

    def close(self) -> None:
        for pool in self._pools.values():
            while pool:
                pool.pop().close()
        super().close()


def make_redis_store(url: str, keys: Keys, strategy: Strategy, policy: Policy) -> RedisStore:
    """The store for a Redis URL: one Redis, one found through Sentinel, or a Redis Cluster."""
    spec = parse_store_url(url)
    kind = {"plain": RedisStore, "sentinel": SentinelStore, "cluster": ClusterStore}[spec.kind]
    return kind(url, keys, strategy, policy, spec)


# --------------------------------------------------------------------------- the limiter

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
        if not storage_url.startswith(STORAGE_SCHEMES):
            raise ValueError(f"unknown storage URL {storage_url!r}; valid schemes: {', '.join(STORAGE_SCHEMES)}")
        if fail_mode not in FAIL_MODES:
            raise ValueError(f"unknown fail_mode {fail_mode!r}; valid: {', '.join(FAIL_MODES)}")
        if not tier_limits:
            raise ValueError("tier_limits must name at least one tier")
        self.strategy = get_strategy(strategy)
        self.tier_limits = dict(tier_limits)
        self.default_limit = tier_limits.get("free", min(tier_limits.values()))
        self.window, self.ip_limit, self.ip_window = window, ip_limit, ip_window
        self.ban_seconds, self.ban_multiplier = ban_seconds, ban_multiplier
        self.fail_mode = fail_mode
        self.keys = Keys(key_prefix)
        self._clock = clock
        self.policy = Policy(self.tier_limits, self.default_limit, window * US, ip_limit, ip_window * US,
                             ban_seconds * US, float(ban_multiplier))
        self._subject_prefix = f"{key_prefix}:{{k:"
        self._strategy_suffix = f"}}:{self.strategy.suffix}"
        self._fallback = MemoryStore(self.keys, self.strategy, self.policy)
        self._configure_rules(rules)
        self._store: MemoryStore | RedisStore = self._fallback
        self._down = False
        self._probe_delay = PROBE_FIRST_US
        self._next_probe = 0
        self._pending: dict[str, tuple[str, tuple]] = {}  # writes made while down, replayed on recovery
        self._state_lock = threading.Lock()  # guards _down, the probe times and _pending
        self._health_at = -2 * HEALTH_PROBE_US  # clock time of health()'s last PING of an up store
        self._refusals: RefusalCache | None = None  # refusals answered from memory (shared stores only)
        self._channel = f"{key_prefix}:refusals"
        if storage_url.startswith("memory://"):
            return
        self._store = make_redis_store(storage_url, self.keys, self.strategy, self.policy)
        self._store.configure_policy(self._policy_script())
        if refusal_cache:
            self._refusals = RefusalCache(self._store.subscriber(self._channel))
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

    def _decision(self, raw: list, now: int, ip: str | None, flags: Sequence[str], opened: bool) -> RequestDecision:
        if raw[3] == 4 and not opened:  # the subject has an override or credits: nothing was counted
            return RequestDecision(None, None, None, False, False, {}, True)
        win = self.policy.window
        ip_code, until, bans, meta_code, tier, blocked, allowed, a, b, c, limit = raw[:11]
        flag_map = {name: bool(v) for name, v in zip(flags, raw[11:], strict=True)}
        ip_decision = None
        if ip is not None:
            refused = ip_code >= 2
            if opened:
                ip_decision = IpDecision(True, False, 0.0, bans, False)
            else:
                ip_decision = IpDecision(not refused, refused, max(0, until - now) / US if refused else 0.0, bans,
                                         ip_code == 3)
            if refused and not opened:
                return RequestDecision(ip_decision, None, None, False, False, flag_map)
        result = None
        if meta_code == 2:
            result = (LimitResult(True, limit, max(0, limit - 1), (now + win) / US, 0.0) if opened
                      else self.strategy.result((allowed, a, b, c), now, limit, win, 1))
        return RequestDecision(ip_decision, result, tier or None, bool(blocked), meta_code == 1, flag_map)

    # ---- policy decisions: several limits, cost, overrides, credits (one store round trip)
    def _configure_rules(self, rules: Any) -> None:
        """Tier limits as the stores enforce them; ``rules`` is a policy.Policy (None: one window per tier)."""
        self.rules = rules if rules is not None else default_policy(self.tier_limits, self.window)
        self.rules_shadow = bool(self.rules.shadow)
        self._tier_rules = {tier: self.rule_limits(limits) for tier, limits in self.rules.tiers.items()}
        # per tier: (name, source, quota, window us, window s, shadow) of each limit, in the stores' order
        self._tier_meta = {tier: self._limit_meta(limits, "tier") for tier, limits in self.rules.tiers.items()}
        self._rules_default = "free" if "free" in self._tier_rules else next(iter(self._tier_rules))
        self._route_cache: dict[int, tuple[Any, list[RuleLimit], list[tuple]]] = {}
        self._override_cache: dict[str, list[tuple]] = {}
        self._period_cache: tuple[int, tuple[str, str]] = (-1, ("", ""))
        self._fallback.configure_policy(self._tier_rules, self._rules_default, self.rules_shadow)
        # One enforced limit per tier over the base window: the single-limit script decides it exactly as
        # the policy script would (same keys, same limits), so such decisions take today's path.
        self._simple = not self.rules_shadow and all(
            len(limits) == 1 and limits[0].window == self.window and not limits[0].shadow
            for limits in self.rules.tiers.values())
        if self._simple and rules is not None:
            self.tier_limits = {tier: limits[0].quota for tier, limits in self.rules.tiers.items()}
            self.default_limit = self.tier_limits.get("free", min(self.tier_limits.values()))
            self.policy = self.policy._replace(tier_limits=self.tier_limits, default_limit=self.default_limit)
            self._fallback.policy = self.policy

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

    def _policy_script(self) -> str:
        tiers = "{" + ", ".join(
            f"[{_lua_string(tier)}] = {{" + ", ".join(
                f"{{{r.quota}, {r.window}, {r.shadow}, {_lua_string(r.suffix)}}}" for r in rules) + "}"
            for tier, rules in self._tier_rules.items()) + "}"
        values = {**self.policy._asdict(), "tiers": tiers, "default_tier": _lua_string(self._rules_default),
                  "shadow": int(self.rules_shadow), "strategy": self.strategy.name,
                  "ban_multiplier": repr(self.policy.ban_multiplier)}
        return LUA_POLICY_CHECK.substitute(values)

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

    def _policy_decision(self, raw: list, now: int, ip: str | None, flags: Sequence[str], route: Any, cost: int,
                         opened: bool) -> PolicyDecision:
        ip_code, until, bans, meta_code, tier, blocked, ok, credit_code, left, applied, n = raw[:HEADER]
        flag_map = {name: bool(v) for name, v in zip(flags, raw[HEADER + n * GROUP:], strict=True)} if flags else {}
        ip_decision = None
        if ip is not None:
            refused = ip_code >= 2 and not opened
            ip_decision = _new_tuple(IpDecision, (not refused, refused, max(0, until - now) / US if refused else 0.0,
                                                  bans, ip_code == 3 and not opened))
            if refused:
                return PolicyDecision(ip_decision, None, None, False, False, flag_map, False)
        if meta_code != 2:
            return PolicyDecision(ip_decision, None, tier or None, bool(blocked), meta_code == 1, flag_map, False)
        metas = self._override_meta(applied) if applied else (self._tier_meta.get(tier)
                                                              or self._tier_meta[self._rules_default])
        if route is not None:
            metas = metas + route[2]
        result_of = self.strategy.result
        outcomes: list[LimitOutcome] = []
        refusing = closest = closest_any = None
        j = HEADER
        for name, source, quota, window_us, window, shadow in metas:
            result = result_of((raw[j] or opened, raw[j + 1], raw[j + 2], raw[j + 3]), now, quota, window_us, cost)
            j += GROUP
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
        allowed = bool(ok) or opened
        shown = reported.result if reported is not None else None
        if allowed and shown is not None and not shown.allowed:  # a shadow limit: reported, but admitted
            shown = shown._replace(allowed=True, retry_after=0.0)
        shadow_refused = tuple(o for o in outcomes if o.shadow and not o.result.allowed)
        return PolicyDecision(ip_decision, shown, tier or None, False, False, flag_map, allowed, tuple(outcomes),
                              reported, left if credit_code else None,
                              credit_code == 2 and refusing is None and not opened, shadow_refused)

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
        self._exec("ban", ip, self._now(), seconds * US, _nonce())

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
