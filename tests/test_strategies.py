"""Each strategy's twins against each other: its Lua function (in Redis) and its Python ``apply``
(memory) give the same raw answer, step by step, for the same timeline of hits and peeks.

tests/test_limiter.py compares the two stores through ``RateLimiter`` results; this compares the raw
tuples themselves, so a difference that ``result`` happens to hide (e.g. in ``oldest`` while the
count is zero) still fails here.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store import Keys, Policy
from store_memory import MemoryStore
from store_redis import make_redis_store
from strategies import STRATEGIES, US, get_strategy
from tests.services import REDIS_URL, require_redis

T0 = 1_800_000_000 * US
WINDOW = 10 * US
POLICY = Policy({"free": 5}, 5, WINDOW, 100, 60 * US, 300 * US, 2.0)

# (microseconds to advance, limit, cost, record)
STEPS = st.lists(st.tuples(st.sampled_from([0, 1, 1000, 999_999, 2_500_000, WINDOW - 1, WINDOW, 3 * WINDOW]),
                           st.integers(1, 6), st.sampled_from([1, 1, 2, 7]), st.sampled_from([1, 1, 0])),
                 min_size=1, max_size=50)


@pytest.fixture(scope="module")
def redis_client():
    return require_redis()


@pytest.mark.parametrize("name", list(STRATEGIES))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS)
def test_the_lua_and_python_twins_give_the_same_raw_answers(redis_client, name, steps):
    keys = Keys(f"t{uuid.uuid4().hex[:10]}")
    strategy = get_strategy(name)
    memory = MemoryStore(keys, strategy, POLICY)
    redis_store = make_redis_store(REDIS_URL, keys, strategy, POLICY)
    key = keys.subject("s", strategy.suffix)
    now = T0
    try:
        for i, (advance, limit, cost, record) in enumerate(steps):
            now += advance
            ours = memory.hit(key, now, limit, WINDOW, cost, record)
            theirs = redis_store.hit(key, now, limit, WINDOW, cost, record)
            assert (int(ours[0]), *ours[1:]) == tuple(theirs), f"step {i}: {steps[:i + 1]}"
    finally:
        redis_store.reset()
        redis_store.close()


def test_an_unknown_strategy_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match="unknown rate-limit strategy 'leaky'; valid: sliding_window, "):
        get_strategy("leaky")
