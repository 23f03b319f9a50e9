"""Rate limiting through the HTTP API: headers, bodies, tiers, blocks, IP bans, fail modes,
and exactness across gunicorn workers and app instances sharing Redis."""

from __future__ import annotations

import uuid

import pytest

from tests.conftest import ADMIN_TOKEN, PASSWORD
from tests.services import REDIS_URL, free_port, gunicorn_instances, new_api_key, require_redis, spread_calls

STORES = ["memory", "redis"]


@pytest.fixture(params=STORES)
def store(request):
    return request.param


def get_data(client, key, **headers):
    return client.get("/data", headers={"X-API-Key": key, **headers})


def test_data_carries_rate_limit_headers(make_app, auth, clock, store):
    client = make_app(store=store).test_client()
    auth = auth.on(client)
    _, key = auth.user_with_key()
    response = get_data(client, key["api_key"])
    assert response.status_code == 200
    body = response.get_json()
    assert body["tier"] == "free" and body["usage"]["limit"] == 5 and body["usage"]["remaining"] == 4
    assert response.headers["X-RateLimit-Limit"] == "5"
    assert response.headers["X-RateLimit-Remaining"] == "4"
    assert int(response.headers["X-RateLimit-Reset"]) == int(clock.now) + 60
    assert response.headers["RateLimit-Policy"] == '"free";q=5;w=60'
    assert response.headers["RateLimit"] == '"free";r=4;t=60'


def test_free_tier_admits_exactly_five_then_429_with_contract_body(make_app, auth, clock, store):
    client = make_app(store=store).test_client()
    auth = auth.on(client)
    _, key = auth.user_with_key()
    statuses = []
    for _ in range(5):
        statuses.append(get_data(client, key["api_key"]).status_code)
        clock.advance(1)
    limited = get_data(client, key["api_key"])
    assert statuses == [200] * 5
    assert limited.status_code == 429
    body = limited.get_json()
    assert body["error"] == "rate_limit_exceeded" and body["limit"] == 5 and body["remaining"] == 0
    assert body["tier"] == "free" and body["retry_after"] == 55
    assert limited.headers["Retry-After"] == "55"


def test_window_slides_exactly(make_app, auth, clock, store):
    client = make_app(store=store).test_client()
    auth = auth.on(client)
    _, key = auth.user_with_key()
    start = clock.now
    for _ in range(5):
        assert get_data(client, key["api_key"]).status_code == 200
        clock.advance(1)
    clock.now = start + 59.9
    assert get_data(client, key["api_key"]).status_code == 429
    clock.now = start + 60.001
    assert get_data(client, key["api_key"]).status_code == 200
    assert get_data(client, key["api_key"]).status_code == 429  # the other four are still in the window


def test_rejected_requests_do_not_count(make_app, auth, clock):
    client = make_app().test_client()
    auth = auth.on(client)
    _, key = auth.user_with_key()
    start = clock.now
    for _ in range(5):
        get_data(client, key["api_key"])
    for _ in range(20):
        clock.advance(1)
        assert get_data(client, key["api_key"]).status_code == 429
    clock.now = start + 60.5
    assert get_data(client, key["api_key"]).status_code == 200


def test_each_key_has_its_own_budget(make_app, auth):
    client = make_app().test_client()
    auth = auth.on(client)
    user, first = auth.user_with_key()
    second = auth.create_key(user["access_token"])
    for _ in range(5):
        get_data(client, first["api_key"])
    assert get_data(client, first["api_key"]).status_code == 429
    assert get_data(client, second["api_key"]).status_code == 200


def test_api_key_accepted_as_query_parameter(client, auth):
    _, key = auth.user_with_key()
    assert client.get(f"/data?api_key={key['api_key']}").status_code == 200


def test_missing_and_invalid_keys(client):
    missing = client.get("/data")
    assert missing.status_code == 401 and missing.get_json()["error"] == "missing_api_key"
    invalid = get_data(client, "rl_deadbeef_" + "x" * 43)
    assert invalid.status_code == 401 and invalid.get_json()["error"] == "invalid_api_key"
    huge = get_data(client, "k" * 5000)
    assert huge.status_code in (401, 431)


def test_usage_reads_without_consuming(client, auth):
    _, key = auth.user_with_key()
    get_data(client, key["api_key"])
    for _ in range(3):
        usage = client.get("/usage", headers={"X-API-Key": key["api_key"]})
        assert usage.status_code == 200
    body = usage.get_json()
    assert body["used"] == 1 and body["remaining"] == 4 and body["limit"] == 5
    assert body["key_prefix"] == key["prefix"] and body["window_seconds"] == 60
    assert body["totals"] == {"today": 1, "all_time": 1}
    assert get_data(client, key["api_key"]).get_json()["usage"]["remaining"] == 3


def test_tier_change_applies_next_request_and_keeps_counted_requests(make_app, auth, store):
    client = make_app(store=store).test_client()
    auth = auth.on(client)
    user, key = auth.user_with_key()
    for _ in range(5):
        get_data(client, key["api_key"])
    assert get_data(client, key["api_key"]).status_code == 429
    upgraded = client.post("/admin/upgrade_tier", json={"user_id": user["user"]["id"], "tier": "basic"},
                           headers=auth.admin)
    assert upgraded.status_code == 200 and upgraded.get_json()["user"]["tier"] == "basic"
    response = get_data(client, key["api_key"])
    assert response.status_code == 200
    assert response.get_json()["tier"] == "basic"
    assert response.get_json()["usage"] == {**response.get_json()["usage"], "limit": 20, "remaining": 14}


def test_block_is_seen_by_every_instance_on_the_next_request(make_app, auth):
    first = make_app(store="redis")
    prefix = first.extensions["rl"].config.key_prefix
    second = make_app(store="redis", key_prefix=prefix)
    c1, c2 = first.test_client(), second.test_client()
    auth = auth.on(c1)
    _, key = auth.user_with_key()
    assert get_data(c2, key["api_key"]).status_code == 200  # second instance caches the key
    assert c1.post("/admin/block_key", json={"prefix": key["prefix"]}, headers=auth.admin).status_code == 200
    blocked = get_data(c2, key["api_key"])
    assert blocked.status_code == 403 and blocked.get_json()["error"] == "api_key_blocked"
    assert c1.post("/admin/unblock_key", json={"key_id": key["id"]}, headers=auth.admin).status_code == 200
    assert get_data(c2, key["api_key"]).status_code == 200


def test_jwt_calls_to_data_are_limited_per_user(client, auth):
    user = auth.register()
    headers = auth.bearer(user["access_token"])
    statuses = [client.get("/data", headers=headers).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]


def test_revoked_jwt_is_refused_on_data(client, auth):
    user = auth.register()
    headers = auth.bearer(user["access_token"])
    assert client.get("/data", headers=headers).status_code == 200
    client.post("/auth/logout", headers=headers)
    response = client.get("/data", headers=headers)
    assert response.status_code == 401 and response.get_json()["error"] == "token_revoked"


# --- per-IP limit and bans ---

def test_ip_limit_bans_with_escalation(make_app, clock, store):
    client = make_app(store=store, ip_rate_limit=3, ip_window=60, temp_ban_seconds=10, ban_multiplier=2.0).test_client()
    for _ in range(3):
        assert client.get("/").status_code == 200
    banned = client.get("/")
    assert banned.status_code == 429
    assert banned.get_json()["error"] == "ip_banned" and banned.get_json()["retry_after"] == 10
    assert banned.headers["Retry-After"] == "10"
    clock.advance(5)
    assert client.get("/").status_code == 429  # still banned, and not counted
    clock.advance(5.5)
    clock.advance(60)  # the earlier requests leave the window too
    for _ in range(3):
        assert client.get("/").status_code == 200
    second_ban = client.get("/")
    assert second_ban.status_code == 429 and second_ban.get_json()["retry_after"] == 20


def test_health_is_exempt_from_the_ip_limit(make_app):
    client = make_app(ip_rate_limit=2).test_client()
    for _ in range(10):
        assert client.get("/health").status_code == 200


def test_forwarded_for_is_ignored_without_trusted_proxies(make_app):
    client = make_app(ip_rate_limit=3).test_client()
    statuses = [client.get("/", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(5)]
    assert statuses[-1] == 429


def test_forwarded_for_is_used_behind_a_trusted_proxy(make_app):
    client = make_app(ip_rate_limit=3, trusted_proxies=1).test_client()
    statuses = [client.get("/", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(6)]
    assert statuses == [200] * 6
    same = [client.get("/", headers={"X-Forwarded-For": "6.6.6.6, 10.0.0.9"}).status_code for _ in range(3)]
    assert same == [200] * 3  # the right-most hop (written by our proxy) is the client: 10.0.0.9
    spoofed = client.get("/", headers={"X-Forwarded-For": "1.1.1.1, 10.0.0.9"})
    assert spoofed.status_code == 429  # prepending other addresses does not dodge the limit


def test_admin_can_list_and_lift_bans(make_app, auth):
    app = make_app(ip_rate_limit=2, temp_ban_seconds=100)
    client = app.test_client()
    for _ in range(3):
        client.get("/", environ_base={"REMOTE_ADDR": "203.0.113.7"})
    bans = client.get("/admin/bans", headers=auth.admin).get_json()["bans"]
    assert [b["ip"] for b in bans] == ["203.0.113.7"]
    lifted = client.post("/admin/unban_ip", json={"ip": "203.0.113.7"}, headers=auth.admin)
    assert lifted.status_code == 200
    assert client.get("/", environ_base={"REMOTE_ADDR": "203.0.113.7"}).status_code == 200


# --- fail modes ---

def dead_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


@pytest.mark.parametrize("mode, expected", [("memory", 200), ("open", 200), ("closed", 503)])
def test_unreachable_store_follows_fail_mode(make_app, auth, mode, expected):
    app = make_app(storage_url=dead_redis_url(), fail_mode=mode)
    client = app.test_client()
    auth = auth.on(client)
    if mode == "closed":
        response = client.post("/auth/register", json={"username": "nobody", "password": PASSWORD})
        assert response.status_code == 503 and response.get_json()["error"] == "limiter_unavailable"
        return
    _, key = auth.user_with_key()
    response = get_data(client, key["api_key"])
    assert response.status_code == expected
    health = client.get("/health")
    assert health.status_code == 503 and health.get_json()["checks"]["limiter_store"] == "degraded"


def test_memory_fallback_still_limits(make_app, auth):
    client = make_app(storage_url=dead_redis_url(), fail_mode="memory").test_client()
    auth = auth.on(client)
    _, key = auth.user_with_key()
    statuses = [get_data(client, key["api_key"]).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]


# --- several gunicorn workers x several instances sharing Redis ---

@pytest.mark.slow
def test_limit_is_exact_across_gunicorn_workers_and_instances(tmp_path):
    require_redis()
    prefix = f"rlgun{uuid.uuid4().hex[:8]}"
    env = {"REDIS_URL": REDIS_URL, "RATELIMIT_KEY_PREFIX": prefix, "TIER_LIMITS": "free=100",
           "ADMIN_TOKEN": ADMIN_TOKEN}
    try:
        with gunicorn_instances(tmp_path, env) as urls:
            for round_number in range(3):
                key = new_api_key(urls[0], urls[1], PASSWORD, name=f"gun{round_number}")
                statuses = spread_calls(urls, key, 500)
                assert statuses.count(200) == 100, f"round {round_number}: {statuses.count(200)} admitted"
                assert statuses.count(429) == 400
    finally:
        client = require_redis()
        leftover = list(client.scan_iter(f"{prefix}*"))
        assert all(client.ttl(k) > 0 for k in leftover), "every key written must carry a TTL"
        if leftover:
            client.delete(*leftover)


def test_requests_refused_before_the_key_check_still_count_against_the_ip(make_app):
    client = make_app(ip_rate_limit=3).test_client()
    statuses = [client.get("/data").status_code for _ in range(3)]  # no key at all
    assert statuses == [401] * 3
    banned = client.get("/data")
    assert banned.status_code == 429 and banned.get_json()["error"] == "ip_banned"
    client2 = make_app(ip_rate_limit=2).test_client()
    statuses = [client2.post("/sdk/track", data="not json", content_type="text/plain").status_code for _ in range(2)]
    assert statuses == [415, 415]
    assert client2.post("/sdk/track", data="x", content_type="text/plain").get_json()["error"] == "ip_banned"


def test_store_down_in_closed_mode_is_a_503_everywhere(make_app, auth):
    client = make_app(storage_url=dead_redis_url(), fail_mode="closed").test_client()
    for method, path, kwargs in [
        ("GET", "/data", {"headers": {"Authorization": "Bearer abc.def.ghi"}}),
        ("GET", "/data", {"headers": {"X-API-Key": "rl_00000000_" + "x" * 43}}),
        ("POST", "/auth/login", {"json": {"username": "nobody", "password": "whatever-pw"}}),
        ("GET", "/admin/bans", {"headers": auth.admin}),
        ("GET", "/", {}),
    ]:
        response = client.open(path, method=method, **kwargs)
        assert response.status_code == 503, (path, response.get_json())
        assert response.get_json()["error"] == "limiter_unavailable"
        assert response.headers["Retry-After"] == "5"


def test_hot_path_runs_no_sql_once_the_key_is_known(app, client, auth):
    """/data, /sdk/check and /sdk/track with a known key: no statement on the request's thread
    (usage and logs are written by background threads, in batches)."""
    import threading

    import sqlalchemy as sa

    _, key = auth.user_with_key(tier="premium")
    client.get("/data", headers={"X-API-Key": key["api_key"]})  # warms the per-process key cache
    statements: list[str] = []
    me = threading.get_ident()

    def count(conn, cursor, statement, *args):
        if threading.get_ident() == me:
            statements.append(statement)

    engine = app.extensions["rl"].engine
    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        assert client.get("/data", headers={"X-API-Key": key["api_key"]}).status_code == 200
        assert client.post("/sdk/check", json={"api_key": key["api_key"]}).status_code == 200
        assert client.post("/sdk/track", json={"api_key": key["api_key"], "endpoint": "/x"}).status_code == 200
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    assert statements == []
