"""Redis Cluster and Sentinel against real servers (tests/redis_servers.py): URL forms, routing
(slots, MOVED, ASK), one round of wall time per decision, exactness across gunicorn workers and
instances, and a master killed under load. The behaviour suite of tests/test_limiter.py also runs
on both topologies (its ``store_url`` fixture)."""

from __future__ import annotations

import sys
import threading
import uuid
from pathlib import Path

import pytest
import redis
import requests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis_wire  # noqa: E402
from config import Config, ConfigError  # noqa: E402
from limiter import Keys, RateLimiter  # noqa: E402
from redis_wire import key_slot, parse_store_url  # noqa: E402
from tests.conftest import ADMIN_TOKEN, PASSWORD  # noqa: E402
from tests.services import gunicorn_instances, new_api_key, spread_calls, wait_until  # noqa: E402
from tests.test_app_entry import run_app  # noqa: E402

TIERS = {"free": 5, "basic": 20, "premium": 100, "enterprise": 1000}


@pytest.fixture(params=["cluster", "sentinel"])
def topology(request):
    return request.getfixturevalue(f"redis_{request.param}")


def limiter_on(url: str, **kwargs) -> RateLimiter:
    kwargs.setdefault("tier_limits", TIERS)
    kwargs.setdefault("key_prefix", f"t{uuid.uuid4().hex[:10]}")
    return RateLimiter(url, **kwargs)


# --------------------------------------------------------------------------- URLs

def test_store_url_forms_parse():
    spec = parse_store_url("redis+sentinel://:p%40ss@h1:26379,h2/mymaster/3")
    assert spec.kind == "sentinel" and spec.nodes == (("h1", 26379), ("h2", 26379))
    assert spec.service == "mymaster" and spec.params == {"password": "p@ss", "db": 3}
    spec = parse_store_url("redis+cluster://u:pw@10.0.0.1:7000,[::1]:7001")
    assert spec.kind == "cluster" and spec.nodes == (("10.0.0.1", 7000), ("::1", 7001))
    assert spec.params == {"username": "u", "password": "pw"}
    assert parse_store_url("redis://127.0.0.1:6379/2").params["db"] == 2


@pytest.mark.parametrize("url, message", [
    ("redis+sentinel://h:26379", "must name the Sentinel service"),
    ("redis+sentinel://h:26379/svc/zero", "database 'zero' is not a number"),
    ("redis+cluster://h:notaport", "port 'notaport' is not a number"),
    ("redis+cluster://h:7000/3", "only database 0"),
    ("redis+cluster://:hunter2@", "names no host"),
    ("redis+cluster://h:99999", "out of range"),
])
def test_bad_store_urls_are_rejected_at_start_with_one_line(tmp_path, url, message):
    result = run_app(tmp_path, REDIS_URL=url)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "REDIS_URL" in errors[0], result.stderr
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


def test_each_subjects_keys_share_one_slot():
    keys = Keys("rl").check_keys("1.2.3.4", "k:42", "sw", ["revoked:x"])
    assert len({key_slot(k) for k in keys[:3]}) == 1, "the IP's keys must share a slot"
    assert key_slot(keys[4]) == key_slot(keys[5]), "the subject's meta and counter must share a slot"


def test_wrong_sentinel_password_degrades_instead_of_crashing(redis_sentinel):
    url = redis_sentinel.url.replace("s3cret%20pass", "wrong")
    rl = limiter_on(url, fail_mode="memory")
    try:
        assert rl.health() == "degraded"
        assert [rl.hit("a", 1).allowed for _ in range(2)] == [True, False]  # the fallback still limits
    finally:
        rl.close()


# --------------------------------------------------------------------------- cluster routing

def _on_two_masters(rl: RateLimiter) -> tuple[str, str]:
    """An IP and a subject whose slots live on different masters."""
    slots = rl._store.slots
    slots.refresh()
    ip_node = slots.node(key_slot(rl.keys.ip("9.9.9.9", "ban")))
    for i in range(1000):
        subject = f"s{i}"
        if slots.node(key_slot(rl.keys.subject(subject, "meta"))) != ip_node:
            return "9.9.9.9", subject
    raise AssertionError("no subject on another master")


def test_a_decision_over_two_nodes_writes_to_both_before_reading(redis_cluster, monkeypatch):
    rl = limiter_on(redis_cluster.url)
    try:
        ip, subject = _on_two_masters(rl)
        rl.set_meta(subject, tier="free", blocked=False)
        rl.check_request(ip, subject)  # warm: connections and scripts exist
        events: list[tuple[str, int]] = []
        send, reply = redis_wire.RespConnection.send, redis_wire.RespConnection.reply
        monkeypatch.setattr(redis_wire.RespConnection, "send",
                            lambda self, data: (events.append(("send", id(self))), send(self, data))[1])
        monkeypatch.setattr(redis_wire.RespConnection, "reply",
                            lambda self: (events.append(("read", id(self))), reply(self))[1])
        decision = rl.check_request(ip, subject)
        assert decision.ip.allowed and decision.result.remaining == 3
        kinds = [kind for kind, _ in events]
        assert kinds == ["send", "send", "read", "read"], events
        assert len({conn for _, conn in events}) == 2, "both scripts went to one node"
    finally:
        rl.reset()
        rl.close()


def test_a_stale_slot_map_is_corrected_by_moved(redis_cluster):
    rl = limiter_on(redis_cluster.url)
    try:
        slots = rl._store.slots
        slots.refresh()
        wrong = slots.masters[0]
        slots.slots = [wrong] * len(slots.slots)  # as if every slot had moved to that master
        slots.stale = False
        assert [rl.hit(f"m{i % 7}", 3).allowed for i in range(28)].count(True) == 21
        assert not slots.stale or slots.refresh() is None
        assert len(set(slots.slots)) == 3, "the map was not relearned"
    finally:
        rl.reset()
        rl.close()


def test_ask_during_a_slot_migration_keeps_counting_exactly(redis_cluster):
    rl = limiter_on(redis_cluster.url)
    key = rl.keys.subject("mig", "sw")
    slot = key_slot(key)
    slots = rl._store.slots
    slots.refresh()
    source = slots.node(slot)
    target = next(addr for addr in slots.masters if addr != source)
    src, dst = redis.Redis(port=source[1]), redis.Redis(port=target[1])
    src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
    try:
        assert [rl.hit("mig", 5).allowed for _ in range(3)] == [True] * 3
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        src.execute_command("MIGRATE", "127.0.0.1", target[1], "", 0, 5000, "KEYS", key)
        # The source now answers ASK for this key: the store must follow it with ASKING.
        assert [rl.hit("mig", 5).allowed for _ in range(3)] == [True, True, False]
        for node in (dst, src):
            node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        for addr in slots.masters:
            redis.Redis(port=addr[1]).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        # Migration finished: the source answers MOVED; the count carried over.
        assert rl.hit("mig", 5).allowed is False
        assert slots.node(slot) == target or slots.stale
    finally:
        # hand the slot back, so the session's cluster looks as it did
        if dst.exists(key):
            dst.delete(key)
        for addr in slots.masters:
            redis.Redis(port=addr[1]).execute_command("CLUSTER", "SETSLOT", slot, "NODE", src_id)
        redis_cluster.wait_ok()
        rl.reset()
        rl.close()


# --------------------------------------------------------------------------- exactness, several processes

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cluster", "sentinel"])
def test_limit_is_exact_across_gunicorn_workers_and_instances(request, tmp_path, kind):
    servers = request.getfixturevalue(f"redis_{kind}")
    prefix = f"rlgun{uuid.uuid4().hex[:8]}"
    env = {"REDIS_URL": servers.url, "RATELIMIT_KEY_PREFIX": prefix, "TIER_LIMITS": "free=100",
           "ADMIN_TOKEN": ADMIN_TOKEN}
    try:
        with gunicorn_instances(tmp_path, env) as urls:
            for round_number in range(2):
                key = new_api_key(urls[0], urls[1], PASSWORD, name=f"gun{round_number}")
                statuses = spread_calls(urls, key, 400)
                assert statuses.count(200) == 100, f"round {round_number}: {statuses.count(200)} admitted"
                assert statuses.count(429) == 300
    finally:
        rl = limiter_on(servers.url, key_prefix=prefix)
        rl.reset()
        rl.close()


# --------------------------------------------------------------------------- failover

def _kill_master(kind: str, servers) -> int:
    """Kill the master that serves most of the test's keys (for the cluster: the first master)."""
    port = servers.masters()[0] if kind == "cluster" else servers.master()
    servers.kill(port)
    return port


def _failed_over(kind: str, servers, killed: int) -> bool:
    if kind == "cluster":
        try:
            return killed not in servers.masters() and len(servers.masters()) == 3
        except redis.RedisError:
            return False
    try:
        return servers.master() != killed
    except redis.RedisError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cluster", "sentinel"])
def test_master_killed_under_load_no_500_and_decisions_resume(request, live_server, kind):
    servers = request.getfixturevalue(f"redis_{kind}")
    server = live_server(storage_url=servers.url, redis_url=servers.url, fail_mode="memory")
    base = server.url
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def new_key() -> str:
        user = requests.post(f"{base}/auth/register", timeout=10,
                             json={"username": f"fo{uuid.uuid4().hex[:8]}", "password": PASSWORD}).json()
        return requests.post(f"{base}/auth/create_api_key", json={}, timeout=10,
                             headers={"Authorization": f"Bearer {user['access_token']}"}).json()["api_key"]

    keys = [new_key() for _ in range(4)]
    statuses: dict[int, int] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def load(n: int) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                status = session.get(f"{base}/data", headers={"X-API-Key": keys[n % 4]}, timeout=30).status_code
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    killed = None
    try:
        wait_until(lambda: sum(statuses.values()) > 50, 30)
        killed = _kill_master(kind, servers)
        wait_until(lambda: _failed_over(kind, servers, killed), 60)
        # Decisions resume by themselves: the limiter's probe finds the new master.
        wait_until(lambda: requests.get(f"{base}/health", timeout=10).status_code == 200, 60)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert set(statuses) <= {200, 429}, statuses
        fresh = new_key()
        got = [requests.get(f"{base}/data", headers={"X-API-Key": fresh}, timeout=10).status_code for _ in range(6)]
        assert got == [200] * 5 + [429]
        assert requests.get(f"{base}/admin/bans", headers=admin, timeout=10).status_code == 200
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        if killed is not None:
            servers.restart(killed)
            servers.wait_ok(60)


def test_a_policy_file_is_refused_at_start_on_a_cluster():
    """The multi-limit script reads the IP's and the subject's keys in one call: no cluster yet."""
    env = {"REDIS_URL": "redis+cluster://127.0.0.1:7000", "RATELIMIT_POLICY": "policy.example.toml"}
    with pytest.raises(ConfigError, match="RATELIMIT_POLICY is not supported with a redis\\+cluster"):
        Config.from_env(env).validate()


def test_overrides_and_credits_answer_409_on_a_cluster_store(make_app, redis_cluster):
    client = make_app(storage_url=redis_cluster.url, redis_url=redis_cluster.url).test_client()
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    user = client.post("/auth/register", json={"username": "cl_owner", "password": PASSWORD}).get_json()
    key = client.post("/auth/create_api_key", json={},
                      headers={"Authorization": f"Bearer {user['access_token']}"}).get_json()
    override = client.post("/admin/overrides", json={"key_id": key["id"], "limits": ["50/minute"]}, headers=admin)
    credits = client.post(f"/admin/keys/{key['id']}/credits", json={"credits": 10}, headers=admin)
    for reply in (override, credits):
        assert reply.status_code == 409 and reply.get_json()["error"] == "unsupported_by_store"
    assert client.get("/data", headers={"X-API-Key": key["api_key"]}).status_code == 200
