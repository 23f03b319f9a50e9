"""The dashboard page and the analytics API behind it, through Flask's test client."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import ADMIN_TOKEN

ADMIN_FIELDS = ("top_keys", "recent_429s", "alerts", "events")


def page_config(html: str) -> dict:
    """The JSON the template hands to dashboard.js."""
    match = re.search(r'<script type="application/json" id="dashboard-config">(.*?)</script>', html, re.S)
    assert match, "dashboard-config script missing"
    return json.loads(match.group(1))


def send_traffic(client, key: str, calls: int) -> list[int]:
    return [client.get("/data", headers={"X-API-Key": key}).status_code for _ in range(calls)]


def test_dashboard_renders_the_configured_tier_limits(make_app):
    app = make_app(tier_limits={"free": 7, "basic": 21, "premium": 99, "enterprise": 1234})
    response = app.test_client().get("/dashboard")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    for tier, limit in (("free", 7), ("basic", 21), ("premium", 99), ("enterprise", 1234)):
        assert f'data-tier="{tier}"' in html
        assert f'data-limit="{limit}"' in html
    assert "/static/dashboard.js" in html and "/static/dashboard.css" in html
    assert page_config(html)["tier_limits"] == {"free": 7, "basic": 21, "premium": 99, "enterprise": 1234}


def test_dashboard_loads_the_socketio_client_only_when_socketio_is_on(make_app):
    off = make_app().test_client().get("/dashboard").get_data(as_text=True)
    on = make_app(enable_socketio=True).test_client().get("/dashboard").get_data(as_text=True)
    assert "socket.io.min.js" not in off and page_config(off)["socketio"] is False
    assert "/static/vendor/socket.io.min.js" in on and page_config(on)["socketio"] is True


def test_dashboard_assets_are_served_locally(client):
    for path in ("/static/dashboard.js", "/static/dashboard.css", "/static/vendor/socket.io.min.js",
                 "/static/vendor/socket.io.LICENSE"):
        response = client.get(path)
        assert response.status_code == 200, path
        response.close()


def test_vendored_socketio_client_speaks_engineio_v4(client):
    response = client.get("/static/vendor/socket.io.min.js")
    source = response.get_data(as_text=True)
    response.close()
    assert "Socket.IO v4." in source
    assert "EIO=4" in source or ".protocol=4" in source


def test_analytics_counts_allowed_and_limited_requests(client, auth):
    _, key = auth.user_with_key()
    statuses = send_traffic(client, key["api_key"], 8)
    assert statuses == [200] * 5 + [429] * 3

    body = client.get("/api/analytics?minutes=60").get_json()
    assert body["totals"] == {"allowed": 5, "limited": 3}
    assert body["by_tier"]["free"] == {"allowed": 5, "limited": 3}
    assert len(body["series"]) == 60
    assert body["series"][-1]["allowed"] == 5 and body["series"][-1]["limited"] == 3
    assert body["tier_limits"]["free"] == 5
    assert body["metrics"]["rate_limited_total"] == 3
    assert body["limiter_store"] == "memory" and body["limiter_health"] == "ok"
    assert body["socketio"] is False


def test_analytics_window_follows_the_app_clock(client, auth, clock):
    _, key = auth.user_with_key()
    send_traffic(client, key["api_key"], 2)
    clock.advance(2 * 3600)
    body = client.get("/api/analytics?minutes=60").get_json()
    assert body["totals"] == {"allowed": 0, "limited": 0}
    assert client.get("/api/analytics?minutes=180").get_json()["totals"] == {"allowed": 2, "limited": 0}


def test_analytics_hides_admin_fields_without_a_token(client, auth):
    _, key = auth.user_with_key()
    send_traffic(client, key["api_key"], 6)
    body = client.get("/api/analytics").get_json()
    for field in ADMIN_FIELDS:
        assert field not in body


def test_analytics_shows_admin_fields_with_the_admin_token(client, auth):
    _, key = auth.user_with_key()
    send_traffic(client, key["api_key"], 7)
    response = client.post("/admin/block_key", json={"key_id": key["id"], "reason": "abuse"}, headers=auth.admin)
    assert response.status_code == 200

    body = client.get("/api/analytics", headers=auth.admin).get_json()
    assert body["top_keys"][0] == {"prefix": key["prefix"], "name": "test key", "tier": "free",
                                   "allowed": 5, "limited": 2}
    assert [row["path"] for row in body["recent_429s"]] == ["/data", "/data"]
    assert all(row["key_prefix"] == key["prefix"] for row in body["recent_429s"])
    assert isinstance(body["alerts"], list)
    assert body["events"][0]["kind"] == "key_blocked" and body["events"][0]["subject"] == key["prefix"]


def test_analytics_with_a_wrong_admin_token_is_401(client):
    response = client.get("/api/analytics", headers={"Authorization": "Bearer not-the-admin-token"})
    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_admin_token"


@pytest.mark.parametrize("minutes", ["0", "abc", "100000"])
def test_analytics_rejects_a_bad_range(client, minutes):
    response = client.get(f"/api/analytics?minutes={minutes}")
    assert response.status_code == 400
    assert response.get_json()["error"]


def test_socketio_events_reach_only_admin_sockets(make_app):
    app = make_app(enable_socketio=True)
    socketio = app.extensions["rl"].socketio
    http = app.test_client()
    admin = socketio.test_client(app, flask_test_client=http, auth={"token": ADMIN_TOKEN})
    viewer = socketio.test_client(app, flask_test_client=http, auth={"token": "wrong"})
    assert admin.is_connected() and viewer.is_connected()
    assert [m["name"] for m in viewer.get_received()] == ["metrics"]  # a snapshot greets every client
    admin.get_received()

    from tests.conftest import AuthActions

    _, key = AuthActions(http).user_with_key()
    response = http.post("/admin/block_key", json={"key_id": key["id"]}, headers=AuthActions.bearer(ADMIN_TOKEN))
    assert response.status_code == 200

    events = [m["args"][0] for m in admin.get_received() if m["name"] == "event"]
    assert [(e["kind"], e["subject"]) for e in events] == [("key_blocked", key["prefix"])]
    assert [m for m in viewer.get_received() if m["name"] == "event"] == []
    admin.disconnect()
    viewer.disconnect()
