"""store.py: every store satisfies the Store protocol, the scheme registry is what each entry point
accepts, and the memory and Redis stores give the same named replies for the same timeline."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import Config, ConfigError
from limiter import RateLimiter
from redis_wire import parse_store_url
from store import (
    STORE_SCHEMES,
    CheckReply,
    IpCode,
    Keys,
    MetaCode,
    Policy,
    Store,
    url_kind,
)
from store_memory import MemoryStore
from store_redis import REDIS_STORES, make_redis_store
from strategies import US, SlidingWindow, get_strategy
from tests.services import REDIS_URL, require_redis

POLICY = Policy({"free": 3, "basic": 6}, 3, 10 * US, 2, 10 * US, 30 * US, 2.0)  # IP: 2 per 10 s, then a 30 s ban
# One URL per registered scheme; a scheme added to the registry without one here fails the tests below.
EXAMPLE_URLS = {
    "memory://": "memory://",
    "redis://": "redis://127.0.0.1:6379/0",
    "rediss://": "rediss://cache.example:6380/1",
    "unix://": "unix:///run/redis/redis.sock",
    "redis+sentinel://": "redis+sentinel://127.0.0.1:26379,127.0.0.2:26379/mymaster",
    "redis+cluster://": "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
}


def example_url(scheme: str) -> str:
    return EXAMPLE_URLS[scheme]


# --------------------------------------------------------------------------- the protocol

def test_the_memory_store_is_a_store():
    assert isinstance(MemoryStore(Keys("t"), SlidingWindow(), POLICY), Store)


@pytest.mark.parametrize("scheme", [s for s, kind in STORE_SCHEMES.items() if kind in REDIS_STORES])
def test_each_redis_store_is_a_store(scheme):
    store = make_redis_store(example_url(scheme), Keys("t"), SlidingWindow(), POLICY)  # connects on first use
    try:
        assert isinstance(store, Store) and type(store) is REDIS_STORES[STORE_SCHEMES[scheme]]
    finally:
        store.close()


def test_an_object_missing_a_store_operation_is_not_a_store():
    class NoBans(MemoryStore):
        bans = None  # type: ignore[assignment]

    assert not isinstance(NoBans(Keys("t"), SlidingWindow(), POLICY), Store)


# --------------------------------------------------------------------------- the scheme registry

@pytest.mark.parametrize("scheme", list(STORE_SCHEMES))
def test_config_accepts_every_registered_scheme(scheme):
    config = Config.from_env({}, storage_url=example_url(scheme)).validate()
    assert config.store_kind == ("memory" if STORE_SCHEMES[scheme] == "memory" else "redis")


def test_config_refuses_an_unregistered_scheme_naming_the_registered_ones():
    with pytest.raises(ConfigError) as caught:
        Config.from_env({}, storage_url="memcached://127.0.0.1:11211").validate()
    assert str(caught.value) == (f"REDIS_URL must start with one of {', '.join(STORE_SCHEMES)}, "
                                 "got 'memcached://127.0.0.1:11211'")


def test_the_limiter_refuses_an_unregistered_scheme_naming_the_registered_ones():
    with pytest.raises(ValueError, match=f"valid schemes: {', '.join(STORE_SCHEMES)}$".replace("+", r"\+")):
        RateLimiter("memcached://127.0.0.1:11211", tier_limits={"free": 1})


@pytest.mark.parametrize("scheme", [s for s, kind in STORE_SCHEMES.items() if kind in REDIS_STORES])
def test_the_url_parser_reads_every_registered_redis_scheme_as_its_kind(scheme):
    assert parse_store_url(example_url(scheme)).kind == STORE_SCHEMES[scheme]


def test_the_url_parser_refuses_an_unregistered_scheme_naming_the_registered_ones():
    with pytest.raises(ValueError, match="valid schemes: memory://, redis://, "):
        parse_store_url("memcached://127.0.0.1:11211")


def test_a_scheme_is_matched_whole_not_as_a_prefix():
    assert url_kind("redis+sentinel://h/s") == "sentinel" and url_kind("redis+other://h") is None
    assert url_kind("no scheme") is None


# --------------------------------------------------------------------------- the same replies

CHECK = st.tuples(st.just("check"), st.sampled_from(["1.1.1.1", "1.1.1.1", "2.2.2.2", ""]),
                  st.sampled_from([0, 1, 1, 2]), st.booleans())
OPS = st.lists(st.one_of(
    CHECK, CHECK, CHECK,
    st.tuples(st.just("meta"), st.sampled_from(["free", "basic"]), st.sampled_from([0, 0, 1]), st.just(False)),
    st.tuples(st.just("flag"), st.just(""), st.just(0), st.just(False)),
    st.tuples(st.just("wait"), st.sampled_from([1, 999_999, 3 * US, 10 * US, 31 * US]), st.just(0), st.just(False)),
), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_memory_and_redis_give_the_same_check_replies(ops):
    """The check script and MemoryStore.check, step by step: IP limit and bans, missing meta, blocked
    and flagged subjects, counting and peeking; the replies compare equal field by field."""
    require_redis()
    keys = Keys(f"t{uuid.uuid4().hex[:10]}")
    strategy = get_strategy("sliding_window")
    stores = [MemoryStore(keys, strategy, POLICY), make_redis_store(REDIS_URL, keys, strategy, POLICY)]
    now = 1_800_000_000 * US
    try:
        for step, (op, a, b, c) in enumerate(ops):
            for store in stores:
                if op == "meta":
                    store.set_meta(keys.subject("s", "meta"), now, a, bool(b))
                elif op == "flag":
                    store.set_flag(keys.flag("revoked"), now, 5 * US)
            if op == "wait":
                now += a
            elif op == "check":
                check_keys = keys.check_keys(a or None, "s" if b else None, strategy.suffix, ["revoked"] if c else [])
                replies = [store.check(check_keys, now, a, b) for store in stores]
                assert all(type(reply) is CheckReply for reply in replies)
                assert type(replies[1].ip) is IpCode and type(replies[1].meta) is MetaCode
                memory, shared = replies
                assert memory._replace(hit=tuple(map(int, memory.hit))) == shared, f"step {step}: {ops[:step + 1]}"
    finally:
        stores[1].reset()
        stores[1].close()


@pytest.mark.parametrize("refuse", [
    lambda url: Config.from_env({}, storage_url=url).validate(),
    lambda url: RateLimiter(url, tier_limits={"free": 1}),
    parse_store_url,
], ids=["config", "limiter", "url_parser"])
def test_a_refused_storage_url_never_repeats_its_password(refuse):
    with pytest.raises(ValueError) as caught:
        refuse("memcached://:hunter2secret@127.0.0.1:11211")
    assert "hunter2secret" not in str(caught.value) and "memcached://:***@127.0.0.1:11211" in str(caught.value)
