"""Tests for limiter.py: every behaviour runs on the memory store and on the real Redis.

Time is an injected fake clock; no test sleeps to wait out a window.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.services import ROOT

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis_wire  # noqa: E402
from limiter import (  # noqa: E402
    STRATEGIES,
    LimitResult,
    RateLimiter,
    StoreUnavailable,
)
from tests.services import (  # noqa: E402
    REDIS_URL,
    SHARED_REDIS_START,
    FakeClock,
    free_port,
    require_redis,
    start_private_redis,
    wait_until,
)

T0 = 1_800_000_000.0
TIERS = {"free": 5, "basic": 20, "premium": 100, "enterprise": 1000}


@pytest.fixture(params=["memory", "redis", "cluster", "sentinel"])
def store_url(request) -> str:
    """Every behaviour on each store: memory, one Redis, a Redis Cluster, Redis behind Sentinel."""
    if request.param == "redis":
        require_redis()
        return REDIS_URL
    if request.param in ("cluster", "sentinel"):
        return request.getfixturevalue(f"redis_{request.param}").url
    return "memory://"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def make(store_url, clock):
    """Factory of limiters on the parametrized store, each with a unique key prefix, cleaned up after."""
    made: list[RateLimiter] = []

    def factory(**kwargs) -> RateLimiter:
        kwargs.setdefault("tier_limits", TIERS)
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("key_prefix", f"t{uuid.uuid4().hex[:10]}")
        limiter = RateLimiter(kwargs.pop("storage_url", store_url), **kwargs)
        made.append(limiter)
        cache_live(limiter)
        return limiter

    yield factory
    for limiter in made:
        limiter.reset()
        limiter.close()


def cache_live(limiter: RateLimiter) -> None:
    """Wait until the limiter's refusal cache is subscribed, so refusals from here on are answered
    from it: every behaviour below then also runs with the cache in the path."""
    cache = limiter._refusals
    if cache is not None and limiter.health() == "ok":
        cache.ready()
        wait_until(lambda: cache.live)


def redis_keys(prefix: str) -> list[bytes]:
    return list(require_redis().scan_iter(match=prefix + ":*"))


# --------------------------------------------------------------------------- strategies

def test_sliding_window_admits_limit_then_denies_until_oldest_leaves(make, clock):
    rl = make()
    results = []
    for _ in range(3):
        results.append(rl.hit("a", 3))
        clock.advance(10)
    assert [r.allowed for r in results] == [True, True, True]
    assert [r.remaining for r in results] == [2, 1, 0]
    assert results[0].reset == T0 + 60
    denied = rl.hit("a", 3)  # at T0 + 30
    assert denied == LimitResult(False, 3, 0, T0 + 60, 30.0)
    clock.advance(30 - 1e-6)
    assert not rl.hit("a", 3).allowed
    clock.advance(1e-6)  # T0 + 60: the request at T0 left the half-open window (t - 60, t]
    again = rl.hit("a", 3)
    assert again.allowed and again.remaining == 0 and again.reset == T0 + 70


def test_rejected_requests_are_not_counted(make, clock):
    rl = make()
    for _ in range(2):
        rl.hit("a", 2)
    clock.advance(30)
    for _ in range(5):
        assert not rl.hit("a", 2).allowed
    clock.advance(30)  # the two admitted ones expire; the five refused ones never counted
    assert [rl.hit("a", 2).allowed for _ in range(3)] == [True, True, False]


def test_cost_counts_several_requests(make, clock):
    rl = make()
    assert rl.hit("a", 5, cost=3).remaining == 2
    denied = rl.hit("a", 5, cost=3)
    assert not denied.allowed and denied.retry_after == 60.0
    assert rl.hit("a", 5, cost=2).allowed


# reset expected right after 3 admitted hits at ``start`` (limit 3, window 60), per strategy
EXPECTED_RESET = {
    "sliding_window": lambda start: start + 60,  # oldest counted + window
    "fixed_window": lambda start: start - start % 60 + 60,  # end of the aligned window
    "sliding_window_counter": lambda start: start - start % 60 + 60,  # end of the current bucket
    "gcra": lambda start: start + 20,  # earliest time one more request is admitted (refill 60/3 s)
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_admits_limit_denies_and_retry_after_is_exact(make, clock, strategy):
    clock.now = T0 - T0 % 60 + 15  # 15 s into an aligned window, so window-based strategies are comparable
    start = clock.now
    rl = make(strategy=strategy)
    admitted = [rl.hit("s", 3) for _ in range(3)]
    assert [r.allowed for r in admitted] == [True] * 3
    assert [r.remaining for r in admitted] == [2, 1, 0]
    assert admitted[-1].reset == EXPECTED_RESET[strategy](start)
    denied = rl.hit("s", 3)
    assert not denied.allowed and denied.remaining == 0 and denied.retry_after > 0
    clock.advance(denied.retry_after - 1e-6)
    assert not rl.peek("s", 3).allowed, "admitted before retry_after"
    clock.advance(1e-6)
    assert rl.hit("s", 3).allowed, "not admitted at retry_after"


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_forgets_everything_after_a_quiet_window(make, clock, strategy):
    rl = make(strategy=strategy)
    for _ in range(4):
        rl.hit("s", 4)
    clock.advance(120)
    assert [rl.hit("s", 4).allowed for _ in range(5)] == [True] * 4 + [False]


def test_sliding_window_counter_weights_previous_bucket(make, clock):
    clock.now = T0 - T0 % 60  # bucket start
    rl = make(strategy="sliding_window_counter")
    for _ in range(10):
        assert rl.hit("s", 10).allowed
    clock.advance(60 + 30)  # half-way through the next bucket: previous counts 10 * 0.5 = 5
    assert [rl.hit("s", 10).allowed for _ in range(6)] == [True] * 5 + [False]


def test_fixed_window_resets_at_the_boundary(make, clock):
    clock.now = T0 - T0 % 60 + 59
    rl = make(strategy="fixed_window")
    assert [rl.hit("s", 2).allowed for _ in range(3)] == [True, True, False]
    clock.advance(1)
    assert rl.hit("s", 2).allowed


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_peek_consumes_nothing(make, clock, strategy):
    rl = make(strategy=strategy)
    rl.hit("s", 3)
    before = rl.peek("s", 3)
    for _ in range(10):
        assert rl.peek("s", 3) == before
    assert before.allowed and before.remaining == 2
    assert [rl.hit("s", 3).allowed for _ in range(3)] == [True, True, False]
    assert not rl.peek("s", 3).allowed


def test_unknown_names_are_value_errors_listing_valid_ones():
    with pytest.raises(ValueError, match="sliding_window.*gcra"):
        RateLimiter(strategy="leaky", tier_limits=TIERS)
    with pytest.raises(ValueError, match="redis://"):
        RateLimiter("memcached://x", tier_limits=TIERS)
    with pytest.raises(ValueError, match="closed"):
        RateLimiter(tier_limits=TIERS, fail_mode="maybe")


def test_from_config_reads_the_limiter_settings(clock):
    from config import Config

    cfg = Config(strategy="gcra", tier_limits={"free": 2}, window_seconds=10, ip_rate_limit=7, ip_window=30,
                 temp_ban_seconds=40, ban_multiplier=3.0, fail_mode="open")
    rl = RateLimiter.from_config(cfg, clock=clock)
    assert (rl.strategy.name, rl.window, rl.ip_limit, rl.ip_window) == ("gcra", 10, 7, 30)
    assert (rl.ban_seconds, rl.ban_multiplier, rl.fail_mode, rl.store_kind) == (40, 3.0, "open", "memory")


# --------------------------------------------------------------------------- check_request

def test_check_request_counts_ip_and_bans_when_exceeded(make, clock):
    rl = make(ip_limit=3, ip_window=60, ban_seconds=10)
    decisions = [rl.check_request("9.9.9.9", None) for _ in range(3)]
    assert all(d.ip.allowed and not d.ip.banned for d in decisions)
    assert all(d.result is None for d in decisions)
    over = rl.check_request("9.9.9.9", None)
    assert over.ip == (False, True, 10.0, 1, True)
    clock.advance(4)
    again = rl.check_request("9.9.9.9", None)
    assert again.ip == (False, True, 6.0, 1, False), "a running ban is not started again"
    assert rl.check_request("8.8.8.8", None).ip.allowed, "other IPs are unaffected"


def test_banned_ip_is_refused_without_counting(make, clock):
    rl = make(ip_limit=3, ip_window=5, ban_seconds=10)
    for _ in range(4):
        rl.check_request("9.9.9.9", None)  # the 4th starts the ban at T0
    clock.advance(9)
    for _ in range(10):
        assert rl.check_request("9.9.9.9", None).ip.banned
    clock.advance(1)  # ban over; the refused requests at T0+9 must not count
    assert [rl.check_request("9.9.9.9", None).ip.allowed for _ in range(4)] == [True, True, True, False]


def test_repeat_bans_within_a_day_escalate(make, clock):
    rl = make(ip_limit=1, ip_window=1, ban_seconds=10, ban_multiplier=2.0)
    lengths = []
    for _ in range(3):
        rl.check_request("7.7.7.7", None)
        ban = rl.check_request("7.7.7.7", None).ip
        assert ban.ban_started
        lengths.append((ban.retry_after, ban.ban_count))
        clock.advance(ban.retry_after + 1)
    assert lengths == [(10.0, 1), (20.0, 2), (40.0, 3)]
    clock.advance(86_400)  # a day later the history is forgotten
    rl.check_request("7.7.7.7", None)
    assert rl.check_request("7.7.7.7", None).ip[2:] == (10.0, 1, True)


def test_ban_ip_unban_ip_and_list_bans(make, clock):
    rl = make(ip_limit=1, ip_window=1, ban_seconds=10)
    rl.ban_ip("1.1.1.1", 100)
    rl.check_request("2.2.2.2", None)
    rl.check_request("2.2.2.2", None)
    bans = rl.list_bans()
    assert bans == [{"ip": "2.2.2.2", "expires_epoch": int(T0) + 10, "ban_count": 1},
                    {"ip": "1.1.1.1", "expires_epoch": int(T0) + 100, "ban_count": 1}]
    assert rl.check_request("1.1.1.1", None).ip.banned
    assert rl.unban_ip("1.1.1.1") is True
    assert rl.unban_ip("1.1.1.1") is False
    assert rl.check_request("1.1.1.1", None).ip.allowed
    clock.advance(11)
    assert rl.list_bans() == []


def test_meta_missing_records_nothing(make, clock):
    rl = make(ip_limit=2)
    first = rl.check_request("5.5.5.5", "k1")
    assert first.meta_missing and first.result is None and first.tier is None
    rl.set_meta("k1", tier="free", blocked=False)
    decisions = [rl.check_request("5.5.5.5", "k1") for _ in range(2)]
    assert [d.result.remaining for d in decisions] == [4, 3], "the meta_missing call hit the subject"
    assert all(d.ip.allowed for d in decisions), "the meta_missing call counted against the IP"
    assert decisions[0].tier == "free" and not decisions[0].meta_missing


def test_blocked_subject_gets_no_result_and_no_hit(make, clock):
    rl = make()
    rl.set_meta("k1", tier="free", blocked=True)
    blocked = rl.check_request("5.5.5.5", "k1")
    assert blocked.blocked and blocked.result is None and blocked.tier == "free"
    rl.set_meta("k1", tier="free", blocked=False)
    assert rl.check_request("5.5.5.5", "k1").result.remaining == 4


def test_subject_hits_use_the_tier_limit(make, clock):
    rl = make()
    rl.set_meta("k1", tier="basic", blocked=False)
    results = [rl.check_request(None, "k1").result for _ in range(21)]
    assert [r.allowed for r in results] == [True] * 20 + [False]
    assert results[0].limit == 20 and results[-1].retry_after == 60.0


def test_tier_change_keeps_requests_already_counted(make, clock):
    rl = make()
    rl.set_meta("k1", tier="premium", blocked=False)
    for _ in range(5):
        assert rl.check_request(None, "k1").result.allowed
    rl.set_meta("k1", tier="free", blocked=False)
    down = rl.check_request(None, "k1")
    assert not down.result.allowed and down.result.limit == 5 and down.tier == "free"
    rl.set_meta("k1", tier="basic", blocked=False)
    assert rl.check_request(None, "k1").result.remaining == 20 - 6


def test_flags_are_reported_and_expire(make, clock):
    rl = make()
    rl.set_meta("k1", tier="free", blocked=False)
    rl.set_flag("revoked:abc", ttl=30)
    decision = rl.check_request("5.5.5.5", "k1", flags=["revoked:abc", "revoked:xyz"])
    assert decision.flags == {"revoked:abc": True, "revoked:xyz": False}
    assert rl.has_flag("revoked:abc") and not rl.has_flag("revoked:xyz")
    clock.advance(30)
    assert not rl.has_flag("revoked:abc")
    assert rl.check_request(None, "k1", flags=["revoked:abc"]).flags == {"revoked:abc": False}


def test_a_set_flag_refuses_without_counting_the_subject(make, clock):
    # A revoked JWT is refused (401) by the app: its request must not consume the user's quota.
    rl = make(ip_limit=3)
    rl.set_meta("u1", tier="free", blocked=False)
    rl.set_flag("revoked:abc", ttl=30)
    for _ in range(8):
        d = rl.check_request(None, "u1", flags=["revoked:abc", "revoked:xyz"])
        assert d.result is None and d.flags == {"revoked:abc": True, "revoked:xyz": False}
        assert d.tier == "free" and not d.blocked and not d.meta_missing
    ok = rl.check_request("5.5.5.5", "u1", flags=["revoked:xyz"])
    assert ok.result.allowed and ok.result.remaining == 4, "flagged requests were counted against the subject"
    flagged = rl.check_request("5.5.5.5", "u1", flags=["revoked:abc"])
    assert flagged.result is None and flagged.ip.allowed
    over = rl.check_request("5.5.5.5", "u1", flags=["revoked:abc"])
    assert over.result is None and over.ip.allowed, "the IP still counts: three requests so far"
    assert rl.check_request("5.5.5.5", "u1", flags=["revoked:abc"]).ip.banned, "flagged requests count for the IP"
    assert rl.peek("u1", 5).remaining == 4


def test_delete_meta_makes_meta_missing_again(make):
    rl = make()
    rl.set_meta("k1", tier="free", blocked=False)
    rl.delete_meta("k1")
    assert rl.check_request(None, "k1").meta_missing


def test_meta_expires_after_a_day_in_memory(clock):
    rl = RateLimiter(tier_limits=TIERS, clock=clock)
    rl.set_meta("k1", tier="free", blocked=False)
    clock.advance(86_400 - 1)
    assert not rl.check_request(None, "k1").meta_missing
    clock.advance(1)
    assert rl.check_request(None, "k1").meta_missing


def test_memory_store_drops_expired_entries(clock):
    rl = RateLimiter(tier_limits=TIERS, clock=clock)
    for i in range(1000):
        rl.hit(f"s{i}", 5)
        rl.check_request(f"10.0.{i // 250}.{i % 250}", None)
    assert len(rl._store._data) > 1000
    clock.advance(120)
    rl.hit("late", 5)
    assert len(rl._store._data) == 1


# --------------------------------------------------------------------------- models and differentials

def reference_sliding_window(times: list[float], limit: int, window: float) -> list[bool]:
    """The contract, literally: admitted iff fewer than limit admitted requests in (t - window, t]."""
    admitted: list[float] = []
    decisions = []
    for t in times:
        ok = sum(1 for a in admitted if t - window < a <= t) < limit
        if ok:
            admitted.append(t)
        decisions.append(ok)
    return decisions


def test_sliding_window_matches_limits_moving_window(make, clock, monkeypatch):
    # limits reads time.time() inside limits.storage.memory, so we drive it with a patched time module
    # (the real library on our exact trace, not a re-implementation). One honest difference: limits counts
    # an entry at exactly t - window as still inside ([t - w, t]) where the contract says (t - w, t]; the
    # traces carry a per-request microsecond jitter so no two requests are exactly one window apart, and the
    # boundary itself is pinned by test_sliding_window_admits_limit_then_denies_until_oldest_leaves.
    import limits.storage.memory
    from limits import RateLimitItemPerSecond
    from limits.strategies import MovingWindowRateLimiter

    monkeypatch.setattr(limits.storage.memory, "time", types.SimpleNamespace(time=clock))
    rng = random.Random(1234)
    for trace in range(20):
        limit, window = rng.randint(1, 8), rng.randint(1, 5)
        rl = make()
        reference = MovingWindowRateLimiter(limits.storage.memory.MemoryStorage())
        item = RateLimitItemPerSecond(limit, window)
        t_ms = 0
        for i in range(300):
            t_ms += rng.choice([0, 1, 10, 100, 250, 1000, 3000])
            clock.now = T0 + t_ms / 1000 + i * 1e-6
            ours = rl.hit(f"s{trace}", limit, window=window).allowed
            assert ours == reference.hit(item, f"s{trace}"), f"trace {trace} request {i} at {t_ms} ms"


timelines = st.lists(st.integers(min_value=0, max_value=3_000_000), min_size=1, max_size=60)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gaps=timelines, limit=st.integers(1, 6), window=st.integers(1, 4))
def test_property_sliding_window_never_exceeds_limit_and_matches_model(make, clock, gaps, limit, window):
    rl = make()
    times, t = [], T0
    decisions = []
    for gap in gaps:  # microsecond gaps, including 0 (simultaneous) and exact window multiples
        t += gap / 1_000_000
        clock.now = t
        times.append(round(t * 1_000_000))
        decisions.append(rl.hit("s", limit, window=window).allowed)
    assert decisions == reference_sliding_window(times, limit, window * 1_000_000)
    admitted = [x for x, ok in zip(times, decisions, strict=True) if ok]
    for end in admitted:
        assert sum(1 for a in admitted if end - window * 1_000_000 < a <= end) <= limit
    rl.reset()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_memory_and_redis_decide_identically(clock, strategy):
    require_redis()
    prefix = f"t{uuid.uuid4().hex[:10]}"
    limiters = [RateLimiter(url, strategy, tier_limits=TIERS, clock=clock, key_prefix=prefix)
                for url in ("memory://", REDIS_URL)]
    rng = random.Random(strategy)
    try:
        for i in range(400):
            clock.advance(rng.choice([0, 0.001, 0.3, 1, 7, 20]))
            subject, limit, cost = rng.choice("ab"), rng.randint(1, 6), rng.choice([1, 1, 1, 2])
            op = rng.choice(["hit", "hit", "peek"])
            if op == "hit":
                results = [rl.hit(subject, limit, window=10, cost=cost) for rl in limiters]
            else:
                results = [rl.peek(subject, limit, window=10) for rl in limiters]
            assert results[0] == results[1], f"step {i}: {op} {subject} limit={limit} cost={cost}"
    finally:
        for rl in limiters:
            rl.reset()
            rl.close()


# --------------------------------------------------------------------------- concurrency

@pytest.mark.parametrize("round_", range(5))
def test_threads_admit_exactly_the_limit(make, round_):
    rl = make(clock=time.time)
    admitted = []
    barrier = threading.Barrier(50)

    def worker() -> None:
        barrier.wait()
        admitted.extend(rl.hit("shared", 100).allowed for _ in range(10))

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 500 and sum(admitted) == 100


def _process_worker(limiter: RateLimiter, barrier, queue) -> None:
    barrier.wait()
    queue.put(sum(limiter.hit("shared", 150).allowed for _ in range(100)))


def test_processes_sharing_redis_admit_exactly_the_limit():
    require_redis()
    prefix = f"t{uuid.uuid4().hex[:10]}"
    limiter = RateLimiter(REDIS_URL, tier_limits=TIERS, key_prefix=prefix)
    limiter.hit("warm-up", 1)  # pooled connections exist before the fork: children must not share them
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(limiter, barrier, queue)) for _ in range(4)]
    try:
        for proc in procs:
            proc.start()
        counts = [queue.get(timeout=30) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        assert sum(counts) == 150
        assert limiter.hit("shared", 150).allowed is False
    finally:
        limiter.reset()
        limiter.close()


def test_every_redis_key_has_a_ttl(clock):
    client = require_redis()
    prefix = f"t{uuid.uuid4().hex[:10]}"
    for strategy in STRATEGIES:
        rl = RateLimiter(REDIS_URL, strategy, tier_limits=TIERS, clock=clock, key_prefix=prefix, ip_limit=1,
                         ip_window=5)
        rl.hit("s", 3)
        rl.set_meta("k", tier="free", blocked=False)
        rl.check_request("3.3.3.3", "k")
        rl.check_request("3.3.3.3", "k")  # ban
        rl.set_flag("revoked:x", 60)
        rl.ban_ip("4.4.4.4", 30)
        rl.close()
    keys = redis_keys(prefix)
    try:
        assert len(keys) >= 10
        assert {key: client.pttl(key) for key in keys if client.pttl(key) <= 0} == {}
    finally:
        client.delete(*keys)


# --------------------------------------------------------------------------- fail modes

DEAD_URL = f"redis://127.0.0.1:{free_port()}/0"


def test_fail_mode_memory_falls_back_and_warns_once(clock, caplog):
    caplog.set_level(logging.WARNING, logger="limiter")
    rl = RateLimiter(DEAD_URL, tier_limits=TIERS, clock=clock, fail_mode="memory")
    assert rl.store_kind == "redis" and rl.health() == "degraded"
    assert [rl.hit("a", 2).allowed for _ in range(3)] == [True, True, False]
    rl.set_meta("k", tier="free", blocked=False)
    assert rl.check_request("1.2.3.4", "k").result.remaining == 4
    clock.advance(5)  # probes are due and fail again: still one warning
    assert rl.hit("a", 2).allowed is False
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1
    rl.close()


def test_fail_mode_open_admits_everything(clock):
    rl = RateLimiter(DEAD_URL, tier_limits=TIERS, clock=clock, fail_mode="open", ip_limit=1)
    results = [rl.hit("a", 2) for _ in range(5)]
    assert all(r.allowed and r.remaining == 1 and r.retry_after == 0.0 for r in results)
    rl.set_meta("k", tier="basic", blocked=False)
    decisions = [rl.check_request("1.2.3.4", "k") for _ in range(3)]
    assert all(d.ip.allowed and d.result.allowed and d.result.remaining == 19 for d in decisions)
    assert rl.health() == "degraded"


def test_fail_mode_closed_raises_store_unavailable(clock):
    rl = RateLimiter(DEAD_URL, tier_limits=TIERS, clock=clock, fail_mode="closed")
    for call in (lambda: rl.hit("a", 2), lambda: rl.peek("a", 2), lambda: rl.check_request("1.2.3.4", "k"),
                 lambda: rl.set_meta("k", tier="free", blocked=False), lambda: rl.has_flag("x")):
        with pytest.raises(StoreUnavailable):
            call()
    assert rl.health() == "degraded"
    rl.reset()
    rl.close()


def test_outage_probe_backs_off_and_recovers_with_pending_writes(clock, tmp_path):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    port = free_port()
    rl = RateLimiter(f"redis://127.0.0.1:{port}/0", tier_limits=TIERS, clock=clock, fail_mode="memory")
    rl.set_flag("revoked:during-outage", 3600)
    clock.advance(1)  # probe 1 fails, next in 2 s
    assert rl.health() == "degraded"
    clock.advance(2)  # probe 2 fails, next in 4 s
    assert rl.health() == "degraded"
    server, client = start_private_redis(port, tmp_path)
    try:
        clock.advance(3.9)
        assert rl.health() == "degraded", "probed before the backoff allowed"
        clock.advance(0.1)
        assert rl.health() == "ok"
        assert client.exists("rl:{f:revoked:during-outage}"), "a write made during the outage was lost"
        assert rl.hit("a", 1).allowed and not rl.hit("a", 1).allowed
        assert client.exists("rl:{k:a}:sw"), "hits do not go to Redis after recovery"
        rl.close()
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.fault
def test_real_redis_outage_under_load_then_exact_again():
    client = require_redis()
    clock = FakeClock(time.time())
    prefix = f"t{uuid.uuid4().hex[:10]}"
    rl = RateLimiter(REDIS_URL, tier_limits=TIERS, clock=clock, key_prefix=prefix, fail_mode="memory")
    errors: list[BaseException] = []
    stop = threading.Event()

    def load(n: int) -> None:
        while not stop.is_set():
            try:
                rl.hit(f"load{n}", 1000)
                rl.check_request(f"10.0.0.{n}", None)
            except BaseException as exc:  # noqa: B036 - anything escaping is the failure we look for
                errors.append(exc)

    threads = [threading.Thread(target=load, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.2)
        subprocess.run(["redis-cli", "shutdown", "nosave"], check=False, capture_output=True)
        time.sleep(0.5)
        assert rl.health() == "degraded"
    finally:
        subprocess.run(SHARED_REDIS_START, check=True)
    for _ in range(100):
        try:
            client.ping()
            break
        except Exception:
            time.sleep(0.05)  # waiting for the server to start, not for a window
    for _ in range(10):  # move the injected clock past the backoff until a probe succeeds
        clock.advance(30)
        if rl.health() == "ok":
            break
    stop.set()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        assert rl.health() == "ok"
        assert [rl.hit("after", 3).allowed for _ in range(4)] == [True, True, True, False]
        assert client.exists(f"{prefix}:{{k:after}}:sw")
    finally:
        rl.reset()
        rl.close()


# --------------------------------------------------------------------------- outage replay, health, RESP

def _outage(rl: RateLimiter, on: bool, saved: dict) -> None:
    """Make this limiter's Redis store fail (or work again) without touching the shared server."""
    import redis

    def down(*args, **kwargs):
        raise redis.ConnectionError("simulated outage")

    for op in ("check", "hit", "set_meta", "delete_meta", "set_flag", "has_flag", "ban", "unban", "bans", "ping"):
        if on:
            saved[(id(rl), op)] = getattr(rl._store, op)
            setattr(rl._store, op, down)
        else:
            setattr(rl._store, op, saved.pop((id(rl), op)))


def test_cache_fill_during_an_outage_is_replayed_as_a_delete_not_a_stale_write(clock):
    require_redis()
    prefix = f"t{uuid.uuid4().hex[:10]}"
    a, b = (RateLimiter(REDIS_URL, tier_limits=TIERS, clock=clock, key_prefix=prefix) for _ in range(2))
    saved: dict = {}
    try:
        a.set_meta("k:1", tier="free", blocked=False)
        _outage(a, True, saved)
        _outage(b, True, saved)
        assert b.check_request(None, "k:1").meta_missing  # B's fallback is empty: the app loads from its DB
        b.set_meta("k:1", tier="free", blocked=False)  # ... and fills the cache (stale a moment later)
        a.check_request(None, "k:1")
        _outage(a, False, saved)
        _outage(b, False, saved)
        clock.advance(2)
        a.check_request(None, "k:1")  # A recovers first
        a.set_meta("k:1", tier="free", blocked=True)  # an admin blocks the key through A (DB updated too)
        assert a.check_request(None, "k:1").blocked
        clock.advance(1)
        b.check_request(None, "k:1")  # B recovers and replays what it queued
        after = a.check_request(None, "k:1")
        assert not (after.tier and not after.blocked), "B's stale cache fill unblocked the key again"
        assert after.meta_missing, "the replay should drop the entry so the next request reloads it"
    finally:
        for rl in (a, b):
            rl.reset()
            rl.close()


def test_writes_queued_while_replaying_are_not_lost(clock):
    client = require_redis()
    prefix = f"t{uuid.uuid4().hex[:10]}"
    rl = RateLimiter(REDIS_URL, tier_limits=TIERS, clock=clock, key_prefix=prefix)
    saved: dict = {}
    try:
        _outage(rl, True, saved)
        rl.set_flag("first", 60)
        _outage(rl, False, saved)
        real_set_flag = rl._store.set_flag

        def set_flag_and_race(key, now, ttl_us):
            real_set_flag(key, now, ttl_us)
            if key.endswith("first}"):  # another request writes while the replay runs
                rl.set_flag("second", 60)

        rl._store.set_flag = set_flag_and_race
        clock.advance(1)
        assert rl.health() == "ok"
        assert client.exists(f"{prefix}:{{f:first}}")
        assert client.exists(f"{prefix}:{{f:second}}"), "a write queued during the replay was dropped"
        assert rl._pending == {}
    finally:
        rl.reset()
        rl.close()


def test_health_probes_an_idle_store_at_most_once_per_second(clock, tmp_path):
    port = free_port()
    server, client = start_private_redis(port, tmp_path)
    try:
        rl = RateLimiter(f"redis://127.0.0.1:{port}/0", tier_limits=TIERS, clock=clock, fail_mode="memory")
        assert rl.health() == "ok"
        probes = []
        real_probe = rl._store.alive
        rl._store.alive = lambda: (probes.append(1), real_probe())[1]
        clock.advance(1)
        assert [rl.health() for _ in range(50)] == ["ok"] * 50
        assert len(probes) == 1, "health() must cache its probe for a second"
        server.terminate()
        server.wait(timeout=10)
        assert rl.health() == "ok", "within the second the cached answer stands"
        clock.advance(1)
        assert rl.health() == "degraded", "an idle limiter must notice that Redis is gone"
        assert rl._down
        rl.close()
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=10)


class FakeRedis:
    """A loopback RESP server: PING and SCRIPT LOAD answer properly, EVALSHA gets ``reply`` (then ``close``)."""

    def __init__(self, reply: bytes, close: bool = False) -> None:
        self.reply, self.close_after = reply, close
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while line := reader.readline():
                args = []
                for _ in range(int(line[1:])):
                    size = int(reader.readline()[1:])
                    args.append(reader.read(size + 2)[:-2])
                if args[0].upper() == b"PING":
                    conn.sendall(b"+PONG\r\n")
                elif args[0].upper() == b"SCRIPT":
                    conn.sendall(b"$40\r\n" + b"0" * 40 + b"\r\n")
                else:
                    conn.sendall(self.reply)
                    if self.close_after:
                        conn.shutdown(socket.SHUT_RDWR)
                        return
        except OSError:
            pass

    def stop(self) -> None:
        self.server.close()
        for conn in self.conns:
            conn.close()


BAD_REPLIES = {
    "bulk cut by a timeout": (b"$10\r\nabc", False),
    "bulk cut by a close": (b"$10\r\nabc", True),
    "line cut by a timeout": (b"*4\r\n:1\r\n:2", False),
    "array cut by a close": (b"*4\r\n:1\r\n", True),
    "bad length": (b"$x\r\n", False),
    "unknown type byte": (b"?what\r\n", False),
    "integer instead of a table": (b":1\r\n", False),
    "short table": (b"*2\r\n:1\r\n:2\r\n", False),
}


@pytest.mark.parametrize("case", list(BAD_REPLIES))
@pytest.mark.parametrize("fail_mode", ["memory", "closed"])
def test_broken_replies_never_escape_and_drop_the_connection(clock, monkeypatch, case, fail_mode):
    monkeypatch.setattr(redis_wire, "OP_TIMEOUT", 0.2)
    reply, close = BAD_REPLIES[case]
    fake = FakeRedis(reply, close)
    rl = RateLimiter(f"redis://127.0.0.1:{fake.port}/0", tier_limits=TIERS, clock=clock, fail_mode=fail_mode)
    try:
        assert rl.health() == "ok" and not rl._down
        if fail_mode == "closed":
            with pytest.raises(StoreUnavailable):
                rl.hit("a", 2)
            with pytest.raises(StoreUnavailable):
                rl.check_request("1.2.3.4", "k")
        else:
            assert rl.hit("a", 2).allowed
            assert rl.check_request("1.2.3.4", "k").meta_missing
        assert rl._down
        if case not in ("integer instead of a table", "short table"):  # complete replies leave it in step
            assert rl._store._idle == [], "a connection out of step went back to the pool"
    finally:
        rl.close()
        fake.stop()


def test_resp_read_raises_connection_error_on_a_short_bulk(monkeypatch):
    import redis

    monkeypatch.setattr(redis_wire, "OP_TIMEOUT", 0.2)
    fake = FakeRedis(b"$10\r\nabc")
    conn = redis_wire.RespConnection({"host": "127.0.0.1", "port": fake.port})
    try:
        with pytest.raises(redis.ConnectionError):
            conn.call(b"GET", b"x")
    finally:
        conn.close()
        fake.stop()


def test_a_script_error_returns_the_connection_to_the_pool(clock):
    import redis

    require_redis()
    rl = RateLimiter(REDIS_URL, tier_limits=TIERS, clock=clock, key_prefix=f"t{uuid.uuid4().hex[:10]}")
    store = rl._store
    try:
        store._scripts["boom"] = "return redis.error_reply('ERR boom')"
        store.close()
        with pytest.raises(redis.ResponseError, match="boom"):
            store._eval("boom", (), ())
        assert len(store._idle) == 1, "the connection leaked (neither pooled nor closed)"
        assert store._idle[0].call(b"PING") == b"PONG", "the pooled connection is out of step"
        with pytest.raises(redis.ResponseError, match="boom"):
            store._eval("boom", (), ())
        assert len(store._idle) == 1
        nested = "return {1, redis.error_reply('ERR nested'), 3}"
        store._scripts["nested"] = nested
        with pytest.raises(redis.ResponseError, match="nested"):
            store._eval("nested", (), ())
        assert store._idle[-1].call(b"PING") == b"PONG", "an error inside an array left the rest unread"
        assert rl.hit("a", 2).allowed and not rl._down
    finally:
        rl.reset()
        rl.close()


def test_unban_replayed_after_recovery_does_not_lift_a_newer_ban(clock):
    require_redis()
    prefix = f"t{uuid.uuid4().hex[:10]}"
    a, b = (RateLimiter(REDIS_URL, tier_limits=TIERS, clock=clock, key_prefix=prefix) for _ in range(2))
    saved: dict = {}
    try:
        a.ban_ip("6.6.6.6", 100)
        _outage(b, True, saved)
        b.unban_ip("6.6.6.6")  # queued while B cannot reach Redis
        _outage(b, False, saved)
        clock.advance(1)
        a.ban_ip("6.6.6.6", 100)  # a newer ban through A
        clock.advance(1)
        assert b.health() == "ok"  # B recovers and replays its unban
        assert a.check_request("6.6.6.6", None).ip.banned, "a stale unban lifted a newer ban"
        a.unban_ip("6.6.6.6")
        assert not a.check_request("6.6.6.6", None).ip.banned
    finally:
        for rl in (a, b):
            rl.reset()
            rl.close()


def test_check_request_can_peek_without_spending_the_subject(make):
    limiter = make(ip_limit=1000)
    limit = TIERS["free"]
    limiter.set_meta("k:peek", tier="free", blocked=False)
    for _ in range(3):
        peeked = limiter.check_request("10.9.8.7", "k:peek", consume=False)
        assert peeked.result.allowed and peeked.result.remaining == limit  # nothing spent
    spent = [limiter.check_request("10.9.8.7", "k:peek").result.allowed for _ in range(limit + 1)]
    assert spent == [True] * limit + [False]
    full = limiter.check_request("10.9.8.7", "k:peek", consume=False)
    assert not full.result.allowed and full.result.remaining == 0 and full.result.retry_after > 0
