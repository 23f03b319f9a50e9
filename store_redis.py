"""The shared stores: one Redis, Redis behind Sentinel, Redis Cluster; and the Lua scripts they run.

Every decision is one script (EVALSHA) over lean pooled connections (redis_wire.py); the cold paths
(meta, flags, bans, credits) go through redis-py. A script's reply is a positional array (the wire);
each store converts it into the named ``CheckReply``/``PolicyReply`` of store.py in one place
(``_check_reply``, ``_policy_reply``, ``ClusterStore.check``).

Key names put the subject in a Redis Cluster hash tag (``rl:{k:42}:sw``, ``rl:{ip:1.2.3.4}:ban``).
On one Redis (plain or behind Sentinel) ``check`` is one script over the IP's keys, the subject's
keys, the flags and the ban index. On Redis Cluster it is one script per slot (the IP's, the
subject's) plus the flag reads, sent to their nodes at once: one round trip of wall time.
"""

from __future__ import annotations

import hashlib
import os
import string
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

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
from store import (
    BAN_STARTED,
    BANNED,
    BLOCKED_OR_FLAGGED,
    CLUSTER,
    CREDIT_CODES,
    DAY_US,
    DECIDED,
    IP_CODES,
    IP_OK,
    META_CODES,
    META_TTL_US,
    MISSING,
    NO_HIT,
    NO_SUBJECT,
    NOT_CHECKED,
    PLAIN,
    SENTINEL,
    CheckReply,
    Keys,
    Policy,
    PolicyReply,
    RuleLimit,
    Store,
    new_nonce,
)
from strategies import LUA_STRATEGIES, Strategy, StrategyRaw

_new_tuple = tuple.__new__

# --------------------------------------------------------------------------- the scripts
# Every script starts with the library: the strategies' functions (strategies.py), then the bans'.

LUA_BANS = """
local DAY = 86400000000

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
"""

LUA_LIBRARY = LUA_STRATEGIES + LUA_BANS

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


def _check_reply(out: list) -> CheckReply:
    """The check script's array ``[ip code, until, bans, meta code, tier, blocked, allowed, a, b, c, limit,
    flags...]`` as a CheckReply (ResponseError when it is not one)."""
    try:
        return _new_tuple(CheckReply, (IP_CODES[out[0]], out[1], out[2], META_CODES[out[3]], out[4].decode(),
                                       out[5], (out[6], out[7], out[8], out[9]), out[10], tuple(out[11:])))
    except (AttributeError, IndexError, TypeError):
        raise redis.ResponseError(f"unexpected reply to the check script: {out!r:.80}") from None


def _policy_reply(reply: Any, flags: int) -> PolicyReply:
    """The policy script's ``{numbers joined by commas, tier, override}`` as a PolicyReply: the numbers are
    the header (tier and override as 0), GROUP numbers per limit, then the ``flags`` flag values."""
    try:
        numbers, tier, applied = reply
        out = list(map(int, numbers.split(b",")))
        end = HEADER + out[HEADER - 1] * GROUP
        if len(out) != end + flags:
            raise ValueError("wrong length")
        limits = tuple((out[j], out[j + 1], out[j + 2], out[j + 3]) for j in range(HEADER, end, GROUP))
        return _new_tuple(PolicyReply, (IP_CODES[out[0]], out[1], out[2], META_CODES[out[3]], tier.decode(), out[5],
                                        out[6], CREDIT_CODES[out[7]], out[8], applied.decode(), limits,
                                        tuple(out[end:])))
    except (AttributeError, ValueError, IndexError, TypeError):
        raise redis.ResponseError(f"unexpected reply to the policy script: {reply!r:.80}") from None



def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render(template: string.Template, policy: Policy, strategy: str, **extra: Any) -> str:
    """A script with the policy's numbers (and ``extra``) rendered in as Lua constants."""
    limits = "{" + ", ".join(f"[{_lua_string(t)}] = {n}" for t, n in policy.tier_limits.items()) + "}"
    return template.substitute({**policy._asdict(), "limits": limits, "strategy": strategy,
                                "ban_multiplier": repr(policy.ban_multiplier), **extra})


# --------------------------------------------------------------------------- the stores

class RedisStore:
    """Shared store on one Redis: hot-path scripts over lean pooled connections, cold paths over redis-py."""

    kind = "redis"

    def __init__(self, url: str, keys: Keys, strategy: Strategy, policy: Policy, spec: StoreSpec | None = None) -> None:
        self.keys = keys
        self.strategy = strategy
        self.policy = policy
        self.spec = spec or parse_store_url(url)
        self._params = dict(self.spec.params)
        self._redis: Any = None  # the redis-py client of the cold paths, made on first use
        self._url = url
        self._idle: list[RespConnection] = []
        self._pid = os.getpid()
        policy_lua = LUA_LIBRARY + render(LUA_POLICY, policy, strategy.name)
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

    def hit(self, key: str, now: int, limit: int, window: int, cost: int, record: int) -> StrategyRaw:
        allowed, a, b, c = self._eval("hit", (key,), (now, limit, window, cost, record, new_nonce()), 4)
        return allowed, a, b, c

    def check(self, keys: list[str], now: int, ip: str, has_subject: int) -> CheckReply:
        return _check_reply(self._eval("check", keys, (now, new_nonce(), ip, str(int(has_subject))), len(keys) + 5))

    def set_meta(self, key: str, now: int, tier: str, blocked: bool) -> None:
        with self._client.pipeline() as pipe:
            pipe.hset(key, mapping={"tier": tier, "blocked": int(blocked)}).pexpire(key, META_TTL_US // 1000)
            pipe.execute()

    # ---- policy decisions: see LUA_POLICY_CHECK
    def configure_policy(self, tiers: dict[str, list[RuleLimit]], default_tier: str, shadow: bool) -> None:
        rules = "{" + ", ".join(
            f"[{_lua_string(tier)}] = {{" + ", ".join(
                f"{{{r.quota}, {r.window}, {r.shadow}, {_lua_string(r.suffix)}}}" for r in limits) + "}"
            for tier, limits in tiers.items()) + "}"
        script = render(LUA_POLICY_CHECK, self.policy, self.strategy.name, tiers=rules,
                        default_tier=_lua_string(default_tier), shadow=int(shadow))
        self._scripts["policy"] = (LUA_LIBRARY + script).encode()
        self._scripts["policy_meta"] = LUA_POLICY_META.encode()
        for name in ("policy", "policy_meta"):  # known by SHA from the start, as the others (NOSCRIPT loads them)
            sha = hashlib.sha1(self._scripts[name], usedforsecurity=False).hexdigest().encode()
            self._sha[name], self._by_sha[sha] = sha, name

    def check_policy(self, keys: list[str], now: int, ip: str, mode: int, cost: int, periods: tuple[str, str],
                     routes: Sequence[RuleLimit]) -> PolicyReply:
        args: list[Any] = [now, new_nonce(), ip, mode, cost, periods[0], periods[1], len(routes)]
        for limit in routes:
            args.extend(limit)
        return _policy_reply(self._eval("policy", keys, args, 3), len(keys) - 6)

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

    def check(self, keys: list[str], now: int, ip: str, has_subject: int) -> CheckReply:
        """The IP's script, the subject's script and the flag reads at once; then the combined answer,
        the same as the one-Redis script's. A subject hit counted for a request that the IP's slot or a
        flag refuses is taken back (the one-Redis script would not have counted it), and so is an IP hit
        counted for a request whose subject's meta is missing."""
        nonce = new_nonce()
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
        ip_code, until, bans = NOT_CHECKED, 0, 0
        if ip:
            ip_code, until, bans = replies.pop(0)  # {code, until, bans}: see LUA_CHECK_IP
            ip_code = IP_CODES[ip_code]
        subject = replies.pop(0) if has_subject else None
        flags = tuple(1 if int(v or 0) > now else 0 for v in replies)
        after: list[tuple[str, tuple]] = []  # compensations, and the ban index of a ban just started
        if ip_code == BAN_STARTED:
            after.append((self.keys.ban_index, (b"EVALSHA", self._sha["index"], 1, self.keys.ban_index, now, ip,
                                                until)))
        meta, tier, blocked, hit, limit = NO_SUBJECT, "", 0, NO_HIT, 0
        if subject is not None:
            meta_code, tier_name, blocked_, allowed, a, b, c, limit_ = subject  # see LUA_CHECK_SUBJECT
            recorded = has_subject == 1 and meta_code == DECIDED and allowed == 1
            if ip_code >= BANNED:
                pass  # the IP is refused: nothing about the subject is reported, as on one Redis
            elif meta_code == MISSING:
                meta = MISSING
                if ip_code == IP_OK:
                    after.append((keys[2], (b"ZREM", keys[2], nonce + ":1")))
            elif meta_code == BLOCKED_OR_FLAGGED or 1 in flags:
                meta, tier, blocked, limit = BLOCKED_OR_FLAGGED, tier_name.decode(), blocked_, limit_
            else:
                meta, tier, hit, limit = DECIDED, tier_name.decode(), (allowed, a, b, c), limit_
            if recorded and (ip_code >= BANNED or 1 in flags):
                after.append((keys[5], (b"EVALSHA", self._sha["undo"], 1, keys[5], now, nonce, limit_)))
        if after:
            for reply in self.batch(after):
                if isinstance(reply, Exception):
                    raise reply
        return CheckReply(ip_code, until, bans, meta, tier, blocked, hit, limit, flags)

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


REDIS_STORES: dict[str, type[RedisStore]] = {PLAIN: RedisStore, SENTINEL: SentinelStore, CLUSTER: ClusterStore}


def make_redis_store(url: str, keys: Keys, strategy: Strategy, policy: Policy) -> RedisStore:
    """The store for a Redis URL (its kind from store.STORE_SCHEMES): one Redis, one found through
    Sentinel, or a Redis Cluster."""
    spec = parse_store_url(url)
    return REDIS_STORES[spec.kind](url, keys, strategy, policy, spec)


# mypy checks each class against the Store protocol here
_conforms: tuple[type[Store], ...] = (RedisStore, SentinelStore, ClusterStore)

