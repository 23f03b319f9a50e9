"""The multi-limit decision (RateLimiter.check_policy) against an independent Python model, on the
memory store and on Redis, with every strategy; all-or-nothing under concurrency."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from limiter import STRATEGIES, US, RateLimiter
from policy import Limit, Route, parse_policy
from tests.services import REDIS_URL, FakeClock, require_redis

T0 = 1_800_000_000.0
TIERS = {"free": 5, "basic": 20, "premium": 100, "enterprise": 1000}
BASE_WINDOW = 10
RULES = parse_policy({"tiers": {"free": ["3/10 seconds", "5/minute"]}}, "test", TIERS, BASE_WINDOW)
# one limit over the base window: decided by the single-limit script unless an override or credits apply
SIMPLE = parse_policy({"tiers": {"free": ["3/10 seconds"]}}, "test", TIERS, BASE_WINDOW)
RULE_SETS = {"two_limits": RULES, "one_limit": SIMPLE}
ROUTES = [None, Route(1, "*", "/r", 1, False, (Limit("route1-20s", 2, 20),)),
          Route(2, "*", "/s", 1, False, (Limit("route2-20s", 1, 20, shadow=True),))]
OVERRIDES = [(), (Limit("override-10s", 4, 10),), (Limit("override-30s", 2, 30), Limit("override-minute", 6, 60))]


# --------------------------------------------------------------------------- the model

def model_admits(strategy: str, state: dict, key: tuple, now: int, quota: int, window: int, cost: int) -> bool:
    """Would ``cost`` more units fit? Written from each algorithm's definition, not from limiter.py."""
    if strategy == "sliding_window":
        return sum(1 for t in state.get(key, []) if t > now - window) + cost <= quota
    if strategy == "fixed_window":
        bucket, count = state.get(key, (None, 0))
        return (count if bucket == now // window else 0) + cost <= quota
    if strategy == "sliding_window_counter":
        bucket, cur, prev = state.get(key, (None, 0, 0))
        b = now // window
        if bucket != b:
            prev, cur = (cur if bucket == b - 1 else 0), 0
        elapsed = now - b * window
        return prev * (window - elapsed) + (cur + cost) * window <= quota * window
    interval = window // quota
    tat = max(state.get(key, now), now)
    return tat + cost * interval - now <= window


def model_spend(strategy: str, state: dict, key: tuple, now: int, quota: int, window: int, cost: int) -> None:
    if strategy == "sliding_window":
        state[key] = [t for t in state.get(key, []) if t > now - window] + [now] * cost
    elif strategy == "fixed_window":
        bucket, count = state.get(key, (None, 0))
        b = now // window
        state[key] = (b, (count if bucket == b else 0) + cost)
    elif strategy == "sliding_window_counter":
        bucket, cur, prev = state.get(key, (None, 0, 0))
        b = now // window
        if bucket != b:
            prev, cur = (cur if bucket == b - 1 else 0), 0
        state[key] = (b, cur + cost, prev)
    else:
        state[key] = max(state.get(key, now), now) + cost * (window // quota)


@dataclass
class Model:
    strategy: str
    rules: object = RULES
    state: dict = field(default_factory=dict)
    override: tuple = ()
    override_until: int | None = None
    credits: int | None = None

    def decide(self, now: int, route: Route | None, cost: int) -> tuple[bool, bool, dict[str, bool]]:
        """(admitted, refused for credits only, per-limit "would admit")."""
        active = self.override and (self.override_until is None or self.override_until > now)
        limits = [(("w", lim.window), lim) for lim in (self.override if active else self.rules.tiers["free"])]
        if route is not None:
            limits += [(("r", route.index, lim.window), lim) for lim in route.limits]
        admits = {lim.name: model_admits(self.strategy, self.state, key, now, lim.quota, lim.window * US, cost)
                  for key, lim in limits}
        ok = all(admits[lim.name] or lim.shadow for _, lim in limits)
        credits_short = self.credits is not None and self.credits < cost
        if ok and not credits_short:
            for key, lim in limits:
                if admits[lim.name]:
                    model_spend(self.strategy, self.state, key, now, lim.quota, lim.window * US, cost)
            if self.credits is not None:
                self.credits -= cost
        return ok and not credits_short, ok and credits_short, admits


# --------------------------------------------------------------------------- differential test

OPS = st.lists(st.one_of(
    st.tuples(st.just("req"), st.integers(1, 3), st.sampled_from([0, 0, 1, 2])),
    st.tuples(st.just("adv"), st.sampled_from([0, 1, 499, 3000, 9999, 10_000, 25_000]), st.just(0)),
    st.tuples(st.just("ovr"), st.integers(0, len(OVERRIDES) - 1), st.sampled_from([None, 5_000, 40_000])),
    st.tuples(st.just("cr"), st.sampled_from([None, 0, 4, 12]), st.just(0)),
), min_size=1, max_size=60)


def run_against_model(limiter: RateLimiter, clock: FakeClock, strategy: str, ops: list) -> None:
    model = Model(strategy, limiter.rules)
    limiter.set_meta("k:1", tier="free", blocked=False)
    for step, (op, a, b) in enumerate(ops):
        now = round(clock() * US)
        if op == "adv":
            clock.now += a / 1000
        elif op == "ovr":
            model.override = OVERRIDES[a]
            model.override_until = None if b is None else now + b * 1000
            limiter.set_policy_meta("k:1", override=OVERRIDES[a], credits=model.credits is not None,
                                    expires_at=None if b is None else model.override_until / US)
        elif op == "cr":
            model.credits = a
            if a is not None:
                limiter.set_credits("k:1", a)
            limiter.set_policy_meta("k:1", override=model.override, credits=a is not None,
                                    expires_at=None if model.override_until is None else model.override_until / US)
        else:
            route = ROUTES[b]
            decision = limiter.check_policy(None, "k:1", route=route, cost=a)
            allowed, credits_only, admits = model.decide(now, route, a)
            got = {o.name: o.result.allowed for o in decision.limits}
            context = f"step {step}: cost={a} route={b} ops={ops[:step + 1]}"
            assert got == admits, context
            assert (decision.allowed, decision.credits_exhausted) == (allowed, credits_only), context
            if model.credits is not None:
                assert decision.credits == model.credits, context


def make_limiter(url: str, strategy: str, clock: FakeClock, rules=RULES) -> RateLimiter:
    return RateLimiter(url, strategy, tier_limits=TIERS, window=BASE_WINDOW, clock=clock, rules=rules,
                       key_prefix=f"t{uuid.uuid4().hex[:10]}")


@pytest.mark.parametrize("rules", list(RULE_SETS))
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_memory_decisions_match_the_model(strategy, rules, ops):
    clock = FakeClock(T0)
    limiter = make_limiter("memory://", strategy, clock, RULE_SETS[rules])
    run_against_model(limiter, clock, strategy, ops)


@pytest.mark.parametrize("rules", list(RULE_SETS))
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_redis_decisions_match_the_model(strategy, rules, ops):
    require_redis()
    clock = FakeClock(T0)
    limiter = make_limiter(REDIS_URL, strategy, clock, RULE_SETS[rules])
    try:
        run_against_model(limiter, clock, strategy, ops)
    finally:
        limiter.reset()
        limiter.close()


# --------------------------------------------------------------------------- all or nothing

@pytest.mark.parametrize("store", ["memory", "redis"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_no_limit_is_spent_by_a_refused_request_under_concurrency(store, strategy):
    """Limits 10 per 10 s and 25 per minute at cost 3: exactly 3 requests fit; had any of the many
    refused ones spent the minute limit, it would show less than 25 - 9 left."""
    url = REDIS_URL if store == "redis" else "memory://"
    if store == "redis":
        require_redis()
    rules = parse_policy({"tiers": {"free": ["10/10 seconds", "25/minute"]}}, "test", TIERS, BASE_WINDOW)
    limiter = RateLimiter(url, strategy, tier_limits=TIERS, window=BASE_WINDOW, clock=lambda: T0, rules=rules,
                          key_prefix=f"t{uuid.uuid4().hex[:10]}")
    try:
        limiter.set_meta("k:1", tier="free", blocked=False)
        barrier = threading.Barrier(16)
        admitted: list[bool] = []

        def worker() -> None:
            barrier.wait()
            admitted.extend(limiter.check_policy(None, "k:1", cost=3).allowed for _ in range(10))

        threads = [threading.Thread(target=worker) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(admitted) == 3 and len(admitted) == 160
        peek = limiter.check_policy(None, "k:1", consume=False)
        if strategy in ("sliding_window", "fixed_window"):
            assert {o.name: o.result.remaining for o in peek.limits} == {"free-10s": 1, "free-minute": 16}
        else:  # the approximate strategies: the minute limit still admits what 25 - 9 allows
            assert limiter.check_policy(None, "k:1", cost=1).limits[1].result.allowed
    finally:
        limiter.reset()
        limiter.close()


def test_a_policy_decision_is_one_redis_round_trip(monkeypatch):
    require_redis()
    from redis_wire import RespConnection

    limiter = make_limiter(REDIS_URL, "sliding_window", FakeClock(T0))
    try:
        limiter.set_meta("k:1", tier="free", blocked=False)
        limiter.check_policy("1.2.3.4", "k:1", route=ROUTES[1], cost=2)  # the script is loaded
        calls: list[bytes] = []
        original = RespConnection.call

        def counting(self, *args):
            calls.append(args[0])
            return original(self, *args)

        monkeypatch.setattr(RespConnection, "call", counting)
        monkeypatch.setattr(limiter._store._client, "execute_command", lambda *a, **k: pytest.fail("redis-py used"))
        decision = limiter.check_policy("1.2.3.4", "k:1", route=ROUTES[1], cost=2)
        assert calls == [b"EVALSHA"] and len(decision.limits) == 3
    finally:
        monkeypatch.undo()
        limiter.reset()
        limiter.close()


def test_default_path_diverts_to_the_policy_only_for_subjects_with_an_override():
    limiter = RateLimiter("memory://", tier_limits=TIERS, clock=time.time)
    limiter.set_meta("k:1", tier="free", blocked=False)
    assert not limiter.check_request(None, "k:1").needs_policy
    limiter.set_policy_meta("k:1", override=(Limit("override-minute", 1, 60),))
    decision = limiter.check_request(None, "k:1")
    assert decision.needs_policy and decision.result is None
    assert limiter.check_policy(None, "k:1").limits[0].result.remaining == 0  # the diverted call counted nothing


def test_a_one_limit_policy_takes_the_single_limit_path():
    limiter = make_limiter("memory://", "sliding_window", FakeClock(T0), SIMPLE)
    assert limiter._simple and limiter.tier_limits["free"] == 3
    assert not make_limiter("memory://", "sliding_window", FakeClock(T0), RULES)._simple


def test_a_fixed_window_count_made_just_before_the_bucket_ends_outlives_it_in_redis():
    """Redis expires keys in its own time: a count made 1 ms before the bucket's end once had a 1 ms
    TTL, so the next request of the same bucket (by the app's clock) found nothing (Hypothesis found
    it as a flaky admit). The key now lives a second past the bucket; the stored bucket ends it."""
    client = require_redis()
    clock = FakeClock(T0)
    limiter = make_limiter(REDIS_URL, "fixed_window", clock, SIMPLE)
    try:
        limiter.set_meta("k:1", tier="free", blocked=False)
        clock.now += 9.999  # 1 ms before the 10 s bucket ends
        started = time.monotonic()
        assert limiter.check_policy(None, "k:1", cost=1).allowed
        ttl = client.pttl(limiter.keys.subject("k:1", limiter.strategy.suffix))
        spent_ms = (time.monotonic() - started) * 1000
        assert ttl >= 1000 - spent_ms, f"the count's key expires in {ttl} ms, {spent_ms:.0f} ms after it was made"
        assert not limiter.check_policy(None, "k:1", cost=3).allowed  # 1 + 3 > 3 in the same bucket
    finally:
        limiter.reset()
        limiter.close()
