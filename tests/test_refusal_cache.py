"""The refusal cache: a refused subject (or banned IP) is answered from memory until it could be
admitted again, and every write that could admit it earlier reaches every process at once."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from limiter import RateLimiter  # noqa: E402
from tests.services import REDIS_URL, require_redis, wait_until  # noqa: E402

TIERS = {"free": 5, "basic": 20, "premium": 100, "enterprise": 1000}
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["redis", "cluster", "sentinel"])
def url(request) -> str:
    if request.param == "redis":
        require_redis()
        return REDIS_URL
    return request.getfixturevalue(f"redis_{request.param}").url


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def instances(url, clock):
    """Factory of limiters sharing one store and key prefix (separate app instances), cache subscribed."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    made: list[RateLimiter] = []

    def make(**kwargs) -> RateLimiter:
        kwargs.setdefault("tier_limits", TIERS)
        rl = RateLimiter(url, clock=clock, key_prefix=prefix, **kwargs)
        made.append(rl)
        if rl._refusals is not None:
            heard_over_pubsub(rl)
            rl._refusals.ready()
            wait_until(lambda: rl._refusals.live)
        return rl

    yield make
    for rl in made:
        rl.reset()
        rl.close()


def count_store_calls(rl: RateLimiter) -> list[int]:
    calls = [0]
    real = rl._store.check

    def check(*args):
        calls[0] += 1
        return real(*args)

    rl._store.check = check
    return calls


HEARD: dict[int, list[str]] = {}  # id(limiter) -> names its subscriber thread received, in order


def heard_over_pubsub(rl: RateLimiter) -> None:
    """Record the invalidations ``rl``'s subscriber receives (not its own local drops)."""
    cache, heard = rl._refusals, HEARD.setdefault(id(rl), [])
    drop = cache.drop

    def recording_drop(name: str) -> None:
        if threading.current_thread().name == "refusal-cache":
            heard.append(name)
        drop(name)

    cache.drop = recording_drop


def settled(write: Callable[[], object], name: str, *limiters: RateLimiter) -> None:
    """Make a write that publishes ``name`` and wait until each limiter's subscriber has received it.

    A refusal is cached only if no invalidation arrives while it is decided, and an arriving one drops
    it: a write's message still in flight (its echo included) would otherwise drop, or keep out, the
    refusal a test then looks for. In production that only costs one store round trip."""
    before = [HEARD[id(rl)].count(name) for rl in limiters]
    write()
    for rl, count in zip(limiters, before, strict=True):
        wait_until(lambda rl=rl, count=count: HEARD[id(rl)].count(name) > count, 5,
                   message=f"{name} never arrived over pub/sub")


def exhaust(rl: RateLimiter, subject: str, ip: str = "1.1.1.1") -> None:
    while rl.check_request(ip, subject).result.allowed:
        pass


def test_a_refusal_is_answered_from_memory_until_retry_after_exactly(instances, clock):
    rl = instances(ip_limit=1000)
    settled(lambda: rl.set_meta("k", tier="free", blocked=False), "s:k", rl)
    for _ in range(5):
        rl.check_request("1.1.1.1", "k")
        clock.now += 1
    first = rl.check_request("1.1.1.1", "k")
    assert not first.result.allowed and first.result.retry_after == pytest.approx(55.0)
    calls = count_store_calls(rl)
    refused = [rl.check_request("1.1.1.1", "k") for _ in range(100)]
    assert calls[0] == 0, "a cached refusal went to the store"
    assert all(not d.result.allowed and d.tier == "free" and d.ip.allowed for d in refused)
    assert refused[0].result == first.result
    assert rl.check_request("1.1.1.1", "k", consume=False).result.allowed is False  # a peek too
    clock.now += 54.999
    assert rl.check_request("1.1.1.1", "k").result.allowed is False and calls[0] == 0
    clock.now += 0.001  # the oldest request leaves the window: the store is asked and admits
    assert rl.check_request("1.1.1.1", "k").result.allowed is True and calls[0] == 1
    # Requests refused from memory were not counted against the IP (documented): 5 + 1 + 1 counted.
    assert rl.check_request("1.1.1.1", None).ip.allowed


def test_requests_with_flags_always_ask_the_store(instances):
    rl = instances()
    rl.set_meta("k", tier="free", blocked=False)
    exhaust(rl, "k")
    calls = count_store_calls(rl)
    rl.set_flag("revoked:j", 60)
    assert rl.check_request("1.1.1.1", "k", ["revoked:j"]).flags == {"revoked:j": True}
    assert calls[0] == 1


def test_tier_change_on_one_instance_invalidates_the_others(instances):
    a, b = instances(), instances()
    settled(lambda: b.set_meta("k", tier="free", blocked=False), "s:k", b)
    exhaust(b, "k")
    assert b._refusals.get("s:k", round(b._clock() * 1e6)) is not None
    start = time.monotonic()
    a.set_meta("k", tier="basic", blocked=False)  # what /admin/upgrade_tier does
    wait_until(lambda: b._refusals.get("s:k", round(b._clock() * 1e6)) is None, 5)
    took = time.monotonic() - start
    decision = b.check_request("1.1.1.1", "k")
    assert decision.result.allowed and decision.tier == "basic" and decision.result.remaining == 14
    assert took < 1.0, f"invalidation took {took:.3f} s"


def test_block_unblock_delete_meta_and_reset_invalidate_the_others(instances):
    a, b = instances(), instances()
    settled(lambda: b.set_meta("k", tier="free", blocked=False), "s:k", b)
    exhaust(b, "k")
    a.set_meta("k", tier="free", blocked=True)
    wait_until(lambda: b._refusals.get("s:k", round(b._clock() * 1e6)) is None, 5)
    assert b.check_request("1.1.1.1", "k").blocked
    settled(lambda: a.set_meta("k", tier="free", blocked=False), "s:k", b)
    exhaust(b, "k")  # still exhausted: refused and cached again
    a.delete_meta("k")
    wait_until(lambda: b._refusals.get("s:k", round(b._clock() * 1e6)) is None, 5)
    assert b.check_request("1.1.1.1", "k").meta_missing
    settled(lambda: b.set_meta("k", tier="free", blocked=False), "s:k", b)
    exhaust(b, "k")
    a.reset()
    wait_until(lambda: b._refusals.get("s:k", round(b._clock() * 1e6)) is None, 5)


def test_a_cached_ban_is_lifted_everywhere_by_unban(instances):
    a, b = instances(ip_limit=2), instances(ip_limit=2)
    decisions = [b.check_request("6.6.6.6", None) for _ in range(3)]
    assert decisions[-1].ip.banned
    calls = count_store_calls(b)
    again = b.check_request("6.6.6.6", None)
    assert again.ip.banned and not again.ip.ban_started and calls[0] == 0
    assert a.unban_ip("6.6.6.6") is True
    wait_until(lambda: b._refusals.get("i:6.6.6.6", round(b._clock() * 1e6)) is None, 5)
    assert b.check_request("6.6.6.6", None).ip.allowed


def test_a_lost_subscription_drops_every_refusal_until_resubscribed(url, instances):
    rl = instances()
    settled(lambda: rl.set_meta("k", tier="free", blocked=False), "s:k", rl)
    exhaust(rl, "k")
    cache = rl._refusals
    assert cache.get("s:k", round(rl._clock() * 1e6)) is not None
    generation = cache.generation
    name = f"refusal-cache:{rl._channel}"  # only this limiter's subscription (the shared Redis has others)
    killed = 0
    for port in _data_ports(url, rl):
        client = redis.Redis(port=port, **_auth(rl))
        for info in client.client_list(_type="pubsub"):
            if info["name"] == name:
                killed += client.client_kill_filter(_id=info["id"])
    assert killed == 1
    wait_until(lambda: cache.generation != generation)
    assert cache.get("s:k", round(rl._clock() * 1e6)) is None, "a refusal outlived its invalidation channel"
    wait_until(lambda: cache.live, 10)  # resubscribes by itself
    assert rl.check_request("1.1.1.1", "k").result.allowed is False


def _auth(rl: RateLimiter) -> dict:
    return {k: v for k, v in rl._store.spec.params.items() if k in ("password", "username")}


def _data_ports(url: str, rl: RateLimiter) -> list[int]:
    store = rl._store
    if hasattr(store, "slots"):
        return [port for _, port in store.slots.masters]
    if hasattr(store, "resolver"):
        return [store.resolver.master()[1]]
    return [6379]


# --------------------------------------------------------------------------- two app instances

def test_two_app_instances_invalidate_each_other_on_tier_change_and_block(make_app, auth):
    app_a = make_app(store="redis", key_prefix=(prefix := f"rltest{uuid.uuid4().hex[:8]}"))
    app_b = make_app(store="redis", key_prefix=prefix)
    client_a, client_b = app_a.test_client(), app_b.test_client()
    auth = auth.on(client_a)
    user, key = auth.user_with_key()
    limiter_b = app_b.extensions["rl"].limiter
    limiter_b._refusals.ready()
    wait_until(lambda: limiter_b._refusals.live)
    headers = {"X-API-Key": key["api_key"]}
    statuses = [client_b.get("/data", headers=headers).status_code for _ in range(7)]
    assert statuses == [200] * 5 + [429, 429]
    assert limiter_b._refusals._entries, "the refusal was not cached"
    response = client_a.post("/admin/upgrade_tier", json={"user_id": user["user"]["id"], "tier": "basic"},
                             headers=auth.admin)
    assert response.status_code == 200
    wait_until(lambda: not limiter_b._refusals._entries, 5)
    assert client_b.get("/data", headers=headers).status_code == 200
    while client_b.get("/data", headers=headers).status_code == 200:
        pass
    assert limiter_b._refusals._entries
    key_id = key.get("key_id") or key.get("id")
    assert client_a.post("/admin/block_key", json={"key_id": key_id}, headers=auth.admin).status_code == 200
    wait_until(lambda: not limiter_b._refusals._entries, 5)
    blocked = client_b.get("/data", headers=headers)
    assert blocked.status_code == 403, blocked.get_json()
