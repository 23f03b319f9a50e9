"""Admin API: the auth matrix on every admin route, each action and its audit entry, logs,
metrics and usage after known traffic, abuse alerts, and e-mail through a real SMTP server."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import sqlalchemy as sa

import database as db
from tests.conftest import ADMIN_TOKEN
from tests.services import free_port, wait_until

ADMIN_BODIES = {
    "/admin/upgrade_tier": {"user_id": 1, "tier": "basic"},
    "/admin/block_key": {"key_id": 1},
    "/admin/unblock_key": {"key_id": 1},
    "/admin/revoke_key": {"key_id": 1},
    "/admin/ban_ip": {"ip": "192.0.2.1"},
    "/admin/unban_ip": {"ip": "192.0.2.1"},
}


def admin_rules(app):
    """Every route of the admin blueprint, found from the URL map so new ones are covered too."""
    return sorted((rule.rule, method) for rule in app.url_map.iter_rules() if rule.endpoint.startswith("admin.")
                  for method in rule.methods - {"HEAD", "OPTIONS"})


def call(client, path, method, headers):
    path = re.sub(r"<[^>]+>", "1", path)  # /admin/users/<int:user_id> -> /admin/users/1
    if method == "GET":
        return client.get(path, headers=headers)
    return client.open(path, method=method, json=ADMIN_BODIES.get(path, {}), headers=headers)


def test_admin_routes_include_the_contracts(app):
    paths = {path for path, _ in admin_rules(app)}
    assert {"/admin/users", "/admin/upgrade_tier", "/admin/block_key", "/admin/unblock_key", "/logs",
            "/admin/audit"} <= paths


def test_every_admin_route_refuses_non_admins(app, client, auth):
    user, key = auth.user_with_key()
    attempts = {
        "no token": ({}, 401),
        "wrong token": ({"Authorization": "Bearer wrong-token"}, 401),
        "token prefix": ({"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}, 401),
        "empty bearer": ({"Authorization": "Bearer "}, 401),
        "user JWT": (auth.bearer(user["access_token"]), 403),
        "API key as bearer": (auth.bearer(key["api_key"]), 401),
        "API key header": ({"X-API-Key": key["api_key"]}, 401),
    }
    for path, method in admin_rules(app):
        for label, (headers, status) in attempts.items():
            response = call(client, path, method, headers)
            assert response.status_code == status, f"{method} {path} with {label}: {response.status_code}"
            assert "error" in response.get_json()
    with app.extensions["rl"].engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(db.audit_log)).scalar_one() == 0
        assert conn.execute(sa.select(db.users.c.tier)).scalar_one() == "free"


def test_unset_admin_token_never_matches_an_empty_header(make_app):
    client = make_app(admin_token=None).test_client()
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
        assert client.get("/admin/users", headers=headers).status_code == 401


def audit_entries(client, auth):
    response = client.get("/admin/audit", headers=auth.admin)
    assert response.status_code == 200
    return response.get_json()["entries"]


def test_users_listing_is_paginated(client, auth):
    for i in range(5):
        auth.register(f"page{i}")
    first = client.get("/admin/users?page=1&per_page=2", headers=auth.admin).get_json()
    third = client.get("/admin/users?page=3&per_page=2", headers=auth.admin).get_json()
    assert first["total"] == 5 and first["per_page"] == 2 and len(first["users"]) == 2
    assert [u["username"] for u in third["users"]] == ["page4"]
    assert set(first["users"][0]) >= {"id", "username", "email", "tier", "api_keys", "created_at"}
    for bad in ("page=0", "per_page=100000", "page=abc"):
        assert client.get(f"/admin/users?{bad}", headers=auth.admin).status_code == 400


def test_upgrade_tier_validates_and_is_audited(client, auth):
    user = auth.register("tiered")
    assert client.post("/admin/upgrade_tier", json={"username": "tiered", "tier": "gold"},
                       headers=auth.admin).status_code == 400
    assert client.post("/admin/upgrade_tier", json={"username": "ghost", "tier": "basic"},
                       headers=auth.admin).status_code == 404
    response = client.post("/admin/upgrade_tier", json={"username": "tiered", "tier": "premium"}, headers=auth.admin)
    assert response.status_code == 200 and response.get_json()["user"]["tier"] == "premium"
    entry = audit_entries(client, auth)[0]
    assert entry["action"] == "upgrade_tier" and entry["target"] == "user:tiered"
    assert entry["actor"] == "admin-token" and entry["details"]["new_tier"] == "premium"
    assert entry["details"]["old_tier"] == "free" and entry["timestamp"].endswith("Z")
    assert client.get("/auth/me", headers=auth.bearer(user["access_token"])).get_json()["user"]["tier"] == "premium"


def test_block_unblock_and_revoke_are_audited(client, auth):
    _, key = auth.user_with_key()
    blocked = client.post("/admin/block_key", json={"api_key": key["api_key"], "reason": "abuse"}, headers=auth.admin)
    assert blocked.get_json()["key"] == {**blocked.get_json()["key"], "id": key["id"], "blocked": True}
    response = client.get("/data", headers={"X-API-Key": key["api_key"]})
    assert response.status_code == 403 and response.get_json()["error"] == "api_key_blocked"
    unblocked = client.post("/admin/unblock_key", json={"prefix": key["prefix"]}, headers=auth.admin)
    assert unblocked.get_json()["key"]["blocked"] is False
    assert client.get("/data", headers={"X-API-Key": key["api_key"]}).status_code == 200
    client.post("/admin/revoke_key", json={"key_id": key["id"]}, headers=auth.admin)
    assert client.get("/data", headers={"X-API-Key": key["api_key"]}).status_code == 401
    actions = [e["action"] for e in audit_entries(client, auth)]
    assert actions[:3] == ["revoke_key", "unblock_key", "block_key"]
    assert client.post("/admin/block_key", json={"key_id": 9999}, headers=auth.admin).status_code == 404
    assert client.post("/admin/block_key", json={}, headers=auth.admin).status_code == 400


def test_manual_ip_ban_and_unban_are_audited(client, auth):
    assert client.post("/admin/ban_ip", json={"ip": "not-an-ip"}, headers=auth.admin).status_code == 400
    assert client.post("/admin/ban_ip", json={"ip": "198.51.100.4", "seconds": 60},
                       headers=auth.admin).status_code == 200
    refused = client.get("/", environ_base={"REMOTE_ADDR": "198.51.100.4"})
    assert refused.status_code == 429 and refused.get_json()["error"] == "ip_banned"
    assert client.post("/admin/unban_ip", json={"ip": "198.51.100.4"}, headers=auth.admin).status_code == 200
    assert client.get("/", environ_base={"REMOTE_ADDR": "198.51.100.4"}).status_code == 200
    assert client.post("/admin/unban_ip", json={"ip": "198.51.100.4"}, headers=auth.admin).status_code == 404
    assert [e["action"] for e in audit_entries(client, auth)][:2] == ["unban_ip", "ban_ip"]


def test_logs_record_requests_without_full_keys(app, client, auth):
    _, key = auth.user_with_key()
    client.get(f"/data?api_key={key['api_key']}")
    client.get("/data", headers={"X-API-Key": key["api_key"]})
    client.get("/data", headers={"X-API-Key": "rl_00000000_" + "y" * 43})
    logs = client.get("/logs?limit=50", headers=auth.admin).get_json()["logs"]
    data_logs = [entry for entry in logs if entry["path"] == "/data"]
    assert len(data_logs) == 3
    assert {entry["status"] for entry in data_logs} == {200, 401}
    assert data_logs[-1]["key_prefix"] == key["prefix"]
    assert set(data_logs[0]) >= {"timestamp", "level", "method", "path", "status", "ip", "key_prefix",
                                 "duration_ms", "message"}
    warnings = client.get("/logs?level=WARNING", headers=auth.admin).get_json()["logs"]
    assert warnings and all(entry["level"] == "WARNING" for entry in warnings)
    assert client.get("/logs?since=yesterday", headers=auth.admin).status_code == 400
    assert client.get("/logs?since=2999-01-01T00:00:00Z", headers=auth.admin).get_json()["logs"] == []
    svc = app.extensions["rl"]
    svc.request_logger.close()
    log_text = "".join(p.read_text() for p in Path(svc.config.log_dir).glob("*.log*"))
    assert key["prefix"] in log_text
    assert key["api_key"] not in log_text
    with svc.engine.connect() as conn:
        stored = json.dumps([dict(r._mapping) for r in conn.execute(sa.select(db.request_logs))], default=str)
    assert key["api_key"] not in stored


def test_metrics_and_usage_after_known_traffic(client, auth):
    _, key = auth.user_with_key()
    for _ in range(7):
        client.get("/data", headers={"X-API-Key": key["api_key"]})
    client.application.extensions["rl"].usage.flush()  # what the background flusher does every second
    metrics = client.get("/api/metrics").get_json()
    assert metrics["allowed_total"] == 5 and metrics["rate_limited_total"] == 2
    assert metrics["by_tier"]["free"] == {"allowed": 5, "limited": 2}
    assert metrics["by_status"]["429"] == 2 and metrics["limiter_store"] == "memory"
    assert metrics["active_keys"] == 1 and metrics["uptime_seconds"] >= 0
    assert metrics["requests_total"] >= 7
    usage = client.get("/usage", headers={"X-API-Key": key["api_key"]}).get_json()
    assert usage["totals"]["all_time"] == 5
    prometheus = client.get("/metrics")
    assert prometheus.status_code == 200 and prometheus.mimetype == "text/plain"
    text = prometheus.get_data(as_text=True)
    assert 'ratelimiter_decisions_total{outcome="limited",tier="free"} 2.0' in text
    assert 'ratelimiter_http_requests_total{status="429"} 2.0' in text


def test_429_storm_raises_a_rate_limit_spike_alert(make_app, auth):
    client = make_app(abuse_429_storm=3).test_client()
    auth = auth.on(client)
    _, key = auth.user_with_key()
    for _ in range(8):
        client.get("/data", headers={"X-API-Key": key["api_key"]})
    alerts = client.get("/admin/alerts", headers=auth.admin).get_json()["alerts"]
    assert [a["kind"] for a in alerts] == ["rate_limited"]
    assert alerts[0]["source"] == key["prefix"]


def test_key_enumeration_raises_an_abuse_alert(make_app, auth):
    client = make_app(abuse_invalid_keys=5).test_client()
    for i in range(6):
        client.get("/data", headers={"X-API-Key": f"rl_{i:08x}_" + "z" * 43})
    alerts = client.get("/admin/alerts", headers=auth.admin).get_json()["alerts"]
    assert [a["kind"] for a in alerts] == ["invalid_key"]


def test_credential_stuffing_can_auto_ban_the_ip(make_app, auth):
    client = make_app(abuse_failed_logins=3, abuse_auto_ban=True, login_failures_per_ip=100).test_client()
    for _ in range(3):
        client.post("/auth/login", json={"username": "victim", "password": "guess-guess"})
    response = client.get("/")
    assert response.status_code == 429 and response.get_json()["error"] == "ip_banned"


# --- e-mail through a real SMTP server ---

def test_admin_action_sends_an_email(make_app, auth, smtp_server):
    inbox, port = smtp_server()
    client = make_app(email_enabled=True, smtp_host="127.0.0.1", smtp_port=port, smtp_use_tls=False,
                      alert_email_to=["ops@example.com", "sec@example.com"], email_from="limiter@example.com",
                      use_clock=False).test_client()
    auth = auth.on(client)
    _, key = auth.user_with_key()
    client.post("/admin/block_key", json={"key_id": key["id"], "reason": "scraping"}, headers=auth.admin)
    assert wait_until(lambda: len(inbox.envelopes) == 1)
    message = inbox.envelopes[0]
    assert sorted(message.rcpt_tos) == ["ops@example.com", "sec@example.com"]
    assert message.mail_from == "limiter@example.com"
    text = message.content.decode()
    assert f"Key blocked: {key['prefix']}" in text and "scraping" in text
    assert key["api_key"] not in text


def test_dead_smtp_server_does_not_slow_requests(make_app, auth):
    client = make_app(email_enabled=True, smtp_host="127.0.0.1", smtp_port=free_port(), smtp_use_tls=False,
                      alert_email_to=["ops@example.com"], use_clock=False).test_client()
    auth = auth.on(client)
    _, key = auth.user_with_key()
    started = time.perf_counter()
    response = client.post("/admin/block_key", json={"key_id": key["id"]}, headers=auth.admin)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert elapsed < 0.5, f"blocking took {elapsed:.3f}s with a dead SMTP server"
    notifier = client.application.extensions["rl"].notifier
    assert wait_until(lambda: notifier.stats()["failed"] == 1, timeout=30)
