"""Policies through the HTTP API: several limits with their headers, cost, exempt routes, shadow mode,
runtime overrides and credits, on the memory store and on Redis shared by several app instances."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

STORES = ["memory", "redis"]
TWO_LIMITS = """
[tiers]
free = ["3/minute", "5/hour"]
"""


@pytest.fixture(params=STORES)
def store(request):
    return request.param


def policy_app(make_app, tmp_path: Path, text: str, **kwargs):
    path = tmp_path / f"policy-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(text)
    return make_app(policy_path=str(path), **kwargs)


def client_and_key(application, auth):
    client = application.test_client()
    auth = auth.on(client)
    user, key = auth.user_with_key()
    return client, key, user


def get(client, key, path="/data"):
    return client.get(path, headers={"X-API-Key": key["api_key"]})


def test_every_limit_is_listed_and_the_closest_one_reported(make_app, auth, tmp_path, clock, store):
    client, key, _ = client_and_key(policy_app(make_app, tmp_path, TWO_LIMITS, store=store), auth)
    first = get(client, key)
    assert first.status_code == 200
    assert first.headers["RateLimit-Policy"] == '"free-minute";q=3;w=60, "free-hour";q=5;w=3600'
    assert first.headers["RateLimit"].startswith('"free-minute";r=2;')
    assert first.headers["X-RateLimit-Limit"] == "3" and first.headers["X-RateLimit-Remaining"] == "2"
    for _ in range(2):
        assert get(client, key).status_code == 200
    refused = get(client, key)
    assert refused.status_code == 429 and refused.get_json()["policy"] == "free-minute"
    assert int(refused.headers["Retry-After"]) == 60
    clock.advance(60)
    assert get(client, key).status_code == 200
    assert get(client, key).headers["RateLimit"].startswith('"free-hour";r=0;')
    refused = get(client, key)
    assert refused.status_code == 429 and refused.get_json()["policy"] == "free-hour"
    assert refused.get_json()["limit"] == 5 and refused.headers["X-RateLimit-Limit"] == "5"


def test_a_refused_request_spends_no_limit(make_app, auth, tmp_path, clock, store):
    text = '[tiers]\nfree = ["10/minute", "4/hour"]\n[[routes]]\nmatch = "GET /data"\ncost = 3\n'
    client, key, _ = client_and_key(policy_app(make_app, tmp_path, text, store=store), auth)
    assert get(client, key).status_code == 200
    refused = get(client, key)  # 3 more would make 6 > 4 per hour: refused, and the minute limit keeps 7
    assert refused.status_code == 429 and refused.get_json()["policy"] == "free-hour"
    usage = client.get("/usage", headers={"X-API-Key": key["api_key"]}).get_json()
    assert {p["name"]: p["remaining"] for p in usage["policies"]} == {"free-minute": 7, "free-hour": 1}


def test_sdk_track_takes_a_bounded_cost(make_app, auth, tmp_path, store):
    client, key, _ = client_and_key(make_app(store=store), auth)
    body = {"api_key": key["api_key"], "endpoint": "/v1/search", "cost": 4}
    tracked = client.post("/sdk/track", json=body)
    assert tracked.status_code == 200 and tracked.get_json()["remaining"] == 1
    assert client.post("/sdk/track", json={**body, "cost": 2}).status_code == 429
    assert client.post("/sdk/track", json={**body, "cost": 1001}).get_json()["field"] == "cost"
    assert client.post("/sdk/track", json={**body, "cost": 1}).status_code == 200


def test_an_exempt_route_needs_no_key_and_counts_nothing(make_app, tmp_path):
    client = policy_app(make_app, tmp_path, '[[routes]]\nmatch = "GET /data"\nexempt = true\n').test_client()
    for _ in range(10):
        response = client.get("/data")
        assert response.status_code == 200 and "X-RateLimit-Limit" not in response.headers


def test_the_exempt_route_still_counts_the_ip(make_app, tmp_path):
    application = policy_app(make_app, tmp_path, '[[routes]]\nmatch = "GET /data"\nexempt = true\n', ip_rate_limit=3)
    client = application.test_client()
    assert [client.get("/data").status_code for _ in range(4)] == [200, 200, 200, 429]


def test_shadow_mode_admits_and_reports(make_app, auth, tmp_path, store):
    application = policy_app(make_app, tmp_path, 'shadow = true\n' + TWO_LIMITS, store=store)
    client, key, _ = client_and_key(application, auth)
    statuses = [get(client, key).status_code for _ in range(5)]
    assert statuses == [200] * 5
    assert application.extensions["rl"].metrics.snapshot()["shadow_refusals"] == {"free-minute": 2}
    text = client.get("/metrics").get_data(as_text=True)
    assert 'ratelimit_shadow_refusals_total{policy="free-minute"} 2.0' in text
    assert client.get("/api/metrics").get_json()["shadow_refusals"] == {"free-minute": 2}


def test_a_shadow_route_limit_reports_while_the_tier_limits_enforce(make_app, auth, tmp_path, store):
    text = '[[routes]]\nmatch = "GET /data"\nlimits = ["1/minute"]\nshadow = true\n'
    client, key, _ = client_and_key(policy_app(make_app, tmp_path, text, store=store), auth)
    statuses = [get(client, key).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]


def admin_post(client, auth, path, body):
    return client.post(path, json=body, headers=auth.admin)


def test_an_override_replaces_the_tier_limits_until_deleted(make_app, auth, store):
    client, key, _ = client_and_key(make_app(store=store), auth)
    created = admin_post(client, auth, "/admin/overrides", {"key_id": key["id"], "limits": ["2/minute"],
                                                             "reason": "trial"})
    assert created.status_code == 201, created.get_json()
    override = created.get_json()["override"]
    assert override["limits"] == ["2/minute"] and override["active"] and override["key_id"] == key["id"]
    assert [get(client, key).status_code for _ in range(3)] == [200, 200, 429]
    assert get(client, key).get_json()["policy"] == "override-minute"
    listed = client.get("/admin/overrides", headers=auth.admin).get_json()["overrides"]
    assert [o["id"] for o in listed] == [override["id"]]
    deleted = client.delete(f"/admin/overrides/{override['id']}", headers=auth.admin)
    assert deleted.status_code == 200
    assert [get(client, key).status_code for _ in range(4)] == [200, 200, 200, 429]  # free: 5 per minute, 2 spent
    actions = [e["action"] for e in client.get("/admin/audit", headers=auth.admin).get_json()["entries"]]
    assert actions[:2] == ["delete_override", "create_override"]
    assert client.delete(f"/admin/overrides/{override['id']}", headers=auth.admin).status_code == 404


def test_an_override_lapses_by_itself(make_app, auth, clock, store):
    client, key, _ = client_and_key(make_app(store=store), auth)
    expires = clock.now + 30
    import datetime as dt
    stamp = dt.datetime.fromtimestamp(expires, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"prefix": key["prefix"], "limits": ["1/minute"], "expires_at": stamp}
    assert admin_post(client, auth, "/admin/overrides", body).status_code == 201
    assert [get(client, key).status_code for _ in range(2)] == [200, 429]
    clock.advance(30)
    assert get(client, key).status_code == 200  # the tier's 5 per minute again (2 spent)


def test_a_user_override_covers_every_key_and_jwt_calls(make_app, auth, store):
    client, key, user = client_and_key(make_app(store=store), auth)
    other = auth.create_key(user["access_token"], "second")
    body = {"username": user["user"]["username"], "limits": ["1/minute"]}
    assert admin_post(client, auth, "/admin/overrides", body).status_code == 201
    assert [get(client, key).status_code for _ in range(2)] == [200, 429]
    assert [get(client, other).status_code for _ in range(2)] == [200, 429]
    jwt = auth.bearer(user["access_token"])
    assert [client.get("/data", headers=jwt).status_code for _ in range(2)] == [200, 429]
    third = auth.create_key(user["access_token"], "third")  # created after the override: covered too
    assert [get(client, third).status_code for _ in range(2)] == [200, 429]


@pytest.mark.parametrize("body", [
    {"limits": ["1/minute"]},
    {"key_id": 1, "limits": "1/minute"},
    {"key_id": 1, "limits": ["1/fortnight"]},
    {"key_id": 1, "limits": []},
    {"key_id": 1, "limits": ["1/minute"], "expires_at": "2000-01-01T00:00:00Z"},
    {"key_id": 1, "limits": ["1/minute"], "reason": 5},
])
def test_bad_overrides_are_400(client, auth, body):
    auth.user_with_key()
    response = admin_post(client, auth, "/admin/overrides", body)
    assert response.status_code == 400, response.get_json()


def test_an_override_of_an_unknown_key_is_404(client, auth):
    assert admin_post(client, auth, "/admin/overrides", {"key_id": 999, "limits": ["1/minute"]}).status_code == 404


def test_an_override_is_seen_at_once_by_another_instance(make_app, auth, tmp_path):
    prefix = f"rltest{uuid.uuid4().hex[:8]}"
    shared = {"store": "redis", "key_prefix": prefix, "database_url": f"sqlite:///{tmp_path / 'shared.db'}"}
    first, second = make_app(**shared), make_app(**shared)
    client, key, _ = client_and_key(first, auth)
    other = second.test_client()
    assert get(other, key).status_code == 200  # the second instance has the key cached, and its meta
    body = {"key_id": key["id"], "limits": ["2/minute"]}
    assert admin_post(client, auth, "/admin/overrides", body).status_code == 201
    assert [get(other, key).status_code for _ in range(2)] == [200, 429]


def test_credits_are_spent_by_admitted_requests_only(make_app, auth, tmp_path, clock, store):
    text = '[tiers]\nfree = ["3/minute"]\n[[routes]]\nmatch = "GET /data"\ncost = 2\n'
    client, key, user = client_and_key(policy_app(make_app, tmp_path, text, store=store), auth)
    granted = admin_post(client, auth, f"/admin/keys/{key['id']}/credits", {"credits": 5})
    assert granted.status_code == 200 and granted.get_json()["key"]["credits_remaining"] == 5
    assert get(client, key).status_code == 200  # 3 credits left, 1 of the minute
    assert get(client, key).status_code == 429  # the rate limit refuses first: no credit spent
    usage = client.get("/usage", headers={"X-API-Key": key["api_key"]}).get_json()
    assert usage["credits_remaining"] == 3
    clock.advance(60)
    assert get(client, key).status_code == 200
    clock.advance(60)
    exhausted = get(client, key)
    assert exhausted.status_code == 403 and exhausted.get_json()["error"] == "credits_exhausted"
    assert "Retry-After" not in exhausted.headers
    me = client.get("/auth/me", headers=auth.bearer(user["access_token"])).get_json()
    assert me["api_keys"][0]["credits_remaining"] == 1
    clock.advance(60)
    assert admin_post(client, auth, f"/admin/keys/{key['id']}/credits", {"credits": None}).status_code == 200
    assert get(client, key).status_code == 200


def test_credits_refill_every_day(make_app, auth, clock, store):
    client, key, _ = client_and_key(make_app(store=store), auth)
    body = {"credits": 1, "refill": {"amount": 2, "every": "day"}}
    assert admin_post(client, auth, f"/admin/keys/{key['id']}/credits", body).status_code == 200
    assert [get(client, key).status_code for _ in range(2)] == [200, 403]
    clock.advance(86400)
    assert [get(client, key).status_code for _ in range(3)] == [200, 200, 403]


@pytest.mark.parametrize("body", [{}, {"credits": -1}, {"credits": "5"}, {"credits": 5, "refill": {"amount": 0}},
                                  {"credits": 5, "refill": {"amount": 5, "every": "week"}}])
def test_bad_credits_are_400(client, auth, body):
    _, key = auth.user_with_key()
    assert admin_post(client, auth, f"/admin/keys/{key['id']}/credits", body).status_code == 400


def test_low_credits_send_one_alert_per_period(make_app, auth, clock):
    application = make_app()
    client, key, _ = client_and_key(application, auth)
    assert admin_post(client, auth, f"/admin/keys/{key['id']}/credits", {"credits": 20}).status_code == 200
    svc = application.extensions["rl"]
    for _ in range(19):
        assert get(client, key).status_code == 200
        clock.advance(13)
    lows = [e for e in svc.events.recent if e["kind"] == "credits_low"]
    assert len(lows) == 1 and lows[0]["details"]["credits_remaining"] == 2


@pytest.mark.slow
def test_a_two_limit_policy_is_exact_across_gunicorn_workers_and_instances(tmp_path):
    """2 instances x 4 workers on Redis: a route of cost 2 under 100/minute and 60/hour admits exactly
    30 of 300 requests, and the minute limit shows exactly those 60 units spent."""
    import requests

    from tests.conftest import ADMIN_TOKEN, PASSWORD
    from tests.services import REDIS_URL, gunicorn_instances, new_api_key, require_redis, spread_calls

    require_redis()
    policy = tmp_path / "policy.toml"
    policy.write_text('[tiers]\nfree = ["100/minute", "60/hour"]\n[[routes]]\nmatch = "GET /data"\ncost = 2\n')
    prefix = f"rlpol{uuid.uuid4().hex[:8]}"
    env = {"REDIS_URL": REDIS_URL, "RATELIMIT_KEY_PREFIX": prefix, "RATELIMIT_POLICY": str(policy),
           "ADMIN_TOKEN": ADMIN_TOKEN}
    try:
        with gunicorn_instances(tmp_path, env) as urls:
            key = new_api_key(urls[0], urls[1], PASSWORD, name="pol")
            statuses = spread_calls(urls, key, 300, threads=40)
            assert statuses.count(200) == 30 and statuses.count(429) == 270
            usage = requests.get(f"{urls[0]}/usage", headers={"X-API-Key": key}, timeout=10).json()
            assert {p["name"]: p["remaining"] for p in usage["policies"]} == {"free-minute": 40, "free-hour": 0}
    finally:
        client = require_redis()
        leftover = list(client.scan_iter(f"{prefix}*"))
        if leftover:
            client.delete(*leftover)


def test_low_credits_are_emailed_once(make_app, auth, clock, smtp_server):  # noqa: F811 (fixture)
    inbox, port = smtp_server()
    application = make_app(email_enabled=True, smtp_host="127.0.0.1", smtp_port=port, smtp_use_tls=False,
                           alert_email_to=["ops@example.test"], email_event_cooldown_seconds=0)
    client, key, _ = client_and_key(application, auth)
    assert admin_post(client, auth, f"/admin/keys/{key['id']}/credits", {"credits": 10}).status_code == 200
    for _ in range(10):
        assert get(client, key).status_code == 200
        clock.advance(13)
    assert get(client, key).status_code == 403
    assert application.extensions["rl"].notifier.close(timeout=10)
    subjects = [message["Subject"] for message in inbox.messages()]
    assert subjects == [f"[RateLimiter] Credits running low: {key['prefix']}"]


def test_route_rules_apply_to_the_request_forward_auth_describes(make_app, auth, tmp_path):
    text = ('[[routes]]\nmatch = "POST /v1/search*"\ncost = 5\n'
            '[[routes]]\nmatch = "GET /status"\nexempt = true\n')
    client, key, _ = client_and_key(policy_app(make_app, tmp_path, text), auth)

    def forward(method, uri, **headers):
        return client.get("/forward_auth", headers={"X-Forwarded-Method": method, "X-Forwarded-Uri": uri, **headers})

    assert forward("GET", "/status").status_code == 200  # exempt: no key needed, nothing counted
    search = forward("POST", "/v1/search?q=x", **{"X-API-Key": key["api_key"]})
    assert search.status_code == 200 and search.headers["X-RateLimit-Remaining"] == "0"  # cost 5 of 5
    refused = forward("GET", "/v1/orders", **{"X-API-Key": key["api_key"]})
    assert refused.status_code == 429 and refused.get_json()["policy"] == "free-minute"
