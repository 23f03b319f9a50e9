"""The dashboard in headless Chromium against a live server: live numbers, admin panel, escaping."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import requests

import database as db
from tests.conftest import ADMIN_TOKEN, ARTIFACTS, PASSWORD

pytestmark = pytest.mark.browser

WAIT_MS = 15_000
XSS_USERNAME = "<script>window.__xss=1</script>"
XSS_KEY_NAME = "<img src=x onerror=window.__xss=2>"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def expect(target):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(target)


def user_with_key(base: str, key_name: str = "browser key") -> tuple[dict, dict]:
    username = f"user_{uuid.uuid4().hex[:8]}"
    user = requests.post(f"{base}/auth/register", json={"username": username, "password": PASSWORD}, timeout=10)
    assert user.status_code == 201, user.text
    token = user.json()["access_token"]
    key = requests.post(f"{base}/auth/create_api_key", json={"name": key_name},
                        headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert key.status_code == 201, key.text
    return user.json(), key.json()


def call_data(base: str, api_key: str, times: int) -> list[int]:
    return [requests.get(f"{base}/data", headers={"X-API-Key": api_key}, timeout=10).status_code
            for _ in range(times)]


def open_dashboard(page, server) -> None:
    page.goto(f"{server.url}/dashboard")
    expect(page.locator("#total-allowed")).not_to_have_text("–", timeout=WAIT_MS)


def sign_in(page, token: str = ADMIN_TOKEN) -> None:
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def assert_no_errors(page) -> None:
    assert page.console_errors == []
    assert page.page_errors == []


def assert_no_errors_but(page, status: str) -> None:
    """Only the browser's own log line for the expected failed fetch, no script errors."""
    assert page.page_errors == []
    assert all(f"status of {status}" in text for text in page.console_errors), page.console_errors


def test_dashboard_loads_without_errors(live_server, page):
    server = live_server()
    open_dashboard(page, server)
    expect(page.locator('#tier-limits [data-tier="free"] .tier-limit')).to_have_text("5")
    expect(page.locator('#tier-limits [data-tier="enterprise"] .tier-limit')).to_have_text("1000")
    expect(page.locator("#chart svg")).to_be_visible()
    expect(page.locator("#m-store")).to_have_text("memory")
    expect(page.locator("#m-health")).to_have_text("healthy")
    expect(page.locator("#admin-content")).to_be_hidden()
    assert_no_errors(page)


def test_numbers_follow_traffic_by_polling_when_socketio_is_off(live_server, page):
    server = live_server()
    socket_requests: list[str] = []
    page.on("request", lambda request: "/socket.io/" in request.url and socket_requests.append(request.url))
    open_dashboard(page, server)
    expect(page.locator("#connection")).to_contain_text("polling")
    expect(page.locator("#total-allowed")).to_have_text("0")

    _, key = user_with_key(server.url)
    assert call_data(server.url, key["api_key"], 7) == [200] * 5 + [429] * 2

    expect(page.locator("#total-allowed")).to_have_text("5", timeout=WAIT_MS)
    expect(page.locator("#total-limited")).to_have_text("2", timeout=WAIT_MS)
    expect(page.locator("#by-tier tr", has_text="free")).to_contain_text("5")
    assert page.locator("#chart svg rect.bar-bad").count() >= 1
    assert socket_requests == []
    assert_no_errors(page)


def test_a_refused_admin_token_shows_a_401_message(live_server, page):
    server = live_server()
    open_dashboard(page, server)
    sign_in(page, "not-the-admin-token")
    expect(page.locator("#message")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#message")).to_contain_text("401")
    expect(page.locator("#admin-content")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0
    assert page.page_errors == []


def test_a_rejected_admin_action_shows_the_400(live_server, page):
    server = live_server()
    open_dashboard(page, server)
    sign_in(page)
    expect(page.locator("#admin-content")).to_be_visible(timeout=WAIT_MS)
    page.locator("#ban-ip").fill("not-an-ip")
    page.get_by_role("button", name="Ban", exact=True).click()
    message = page.locator("#message")
    expect(message).to_contain_text("Ban IP", timeout=WAIT_MS)
    expect(message).to_contain_text("400")
    expect(message).to_contain_text("'ip' must be an IPv4 or IPv6 address")
    assert_no_errors_but(page, "400")


def test_the_page_shows_its_own_429(live_server, page):
    server = live_server(ip_rate_limit=2, ip_window=60)
    page.goto(f"{server.url}/dashboard")
    message = page.locator("#message")
    expect(message).to_be_visible(timeout=WAIT_MS)
    expect(message).to_contain_text("429")
    assert page.page_errors == []
    assert_no_errors_but(page, "429")


def test_admin_changes_a_tier_and_blocks_a_key(live_server, page):
    server = live_server()
    user, key = user_with_key(server.url)
    username, prefix = user["user"]["username"], key["prefix"]
    open_dashboard(page, server)
    sign_in(page)
    expect(page.locator("#admin-content")).to_be_visible(timeout=WAIT_MS)
    assert page.evaluate("sessionStorage.getItem('ratelimiter.adminToken')") == ADMIN_TOKEN
    assert page.evaluate("localStorage.length") == 0
    assert ADMIN_TOKEN not in page.url

    page.get_by_label(f"Tier of {username}").select_option("premium")
    expect(page.locator("#message")).to_contain_text(f"Tier of {username} is now premium", timeout=WAIT_MS)
    usage = requests.get(f"{server.url}/usage", headers={"X-API-Key": key["api_key"]}, timeout=10).json()
    assert usage["tier"] == "premium" and usage["limit"] == 100

    page.get_by_role("button", name=f"Block key {prefix}").click()
    key_row = page.locator(f'#keys tr[data-key-id="{key["id"]}"]')
    expect(key_row).to_contain_text("blocked", timeout=WAIT_MS)
    blocked = requests.get(f"{server.url}/data", headers={"X-API-Key": key["api_key"]}, timeout=10)
    assert blocked.status_code == 403
    assert blocked.json()["error"] == "api_key_blocked"

    audit = page.locator("#audit")
    expect(audit.locator('tr[data-action="block_key"]')).to_contain_text(f"key:{prefix}", timeout=WAIT_MS)
    expect(audit.locator('tr[data-action="upgrade_tier"]')).to_contain_text(f"user:{username}")

    page.get_by_role("button", name=f"Unblock key {prefix}").click()
    expect(key_row).to_contain_text("active", timeout=WAIT_MS)
    assert call_data(server.url, key["api_key"], 1) == [200]

    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#admin-content")).to_be_hidden()
    assert page.evaluate("sessionStorage.length") == 0
    assert_no_errors(page)


def test_user_supplied_text_is_shown_literally(live_server, page):
    server = live_server()
    user, key = user_with_key(server.url, key_name=XSS_KEY_NAME)
    # The API refuses such usernames; the page must still be safe with whatever the database holds.
    with server.app.extensions["rl"].engine.begin() as conn:
        conn.execute(db.users.update().where(db.users.c.id == user["user"]["id"]).values(username=XSS_USERNAME))
    blocked = requests.post(f"{server.url}/admin/block_key", json={"key_id": key["id"], "reason": XSS_KEY_NAME},
                            headers=ADMIN, timeout=10)
    assert blocked.status_code == 200

    open_dashboard(page, server)
    sign_in(page)
    expect(page.locator("#users td.username", has_text=XSS_USERNAME)).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator("#keys td.key-name", has_text=XSS_KEY_NAME)).to_have_count(1)
    expect(page.locator("#audit tr[data-action=block_key] td.details")).to_contain_text(XSS_KEY_NAME)
    expect(page.locator("#events li[data-kind=key_blocked]")).to_contain_text(XSS_USERNAME, timeout=WAIT_MS)
    assert page.locator("main img").count() == 0
    assert page.locator("main script").count() == 0
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert_no_errors(page)


def test_live_event_arrives_over_socketio(live_server, page):
    server = live_server(enable_socketio=True)
    _, key = user_with_key(server.url)
    open_dashboard(page, server)
    sign_in(page)
    expect(page.locator("#admin-content")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#connection")).to_have_text("live · socket.io", timeout=WAIT_MS)
    # From here on /api/analytics is unreachable: what shows up in the feed came over the socket.
    page.route("**/api/analytics**", lambda route: route.abort())
    before = page.locator("#m-requests").text_content()

    response = requests.post(f"{server.url}/admin/block_key", json={"key_id": key["id"]}, headers=ADMIN, timeout=10)
    assert response.status_code == 200
    expect(page.locator("#events li[data-kind=key_blocked]")).to_contain_text(key["prefix"], timeout=WAIT_MS)
    # The "metrics" push (every 2 s) counts the block request too.
    expect(page.locator("#m-requests")).not_to_have_text(before, timeout=WAIT_MS)
    assert page.page_errors == []


def test_falls_back_to_polling_when_the_socket_fails(live_server, page):
    server = live_server(enable_socketio=True)
    page.route("**/socket.io/**", lambda route: route.abort())
    open_dashboard(page, server)
    expect(page.locator("#connection")).to_contain_text("polling")

    _, key = user_with_key(server.url)
    call_data(server.url, key["api_key"], 3)
    expect(page.locator("#total-allowed")).to_have_text("3", timeout=WAIT_MS)
    assert page.page_errors == []


def seed_history(server, key: dict, user_id: int, minutes: int = 50) -> None:
    """Usage counters for the past ``minutes`` as the flusher would have written them: a chart with a shape."""
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None, second=0, microsecond=0)
    rows = [{"subject": f"k:{key['id']}", "bucket_start": now - dt.timedelta(minutes=m), "key_id": key["id"],
             "user_id": user_id, "tier": "basic", "allowed": 20 - abs(m % 20 - 10), "limited": max(0, m % 9 - 5)}
            for m in range(1, minutes + 1)]
    db.add_usage(server.app.extensions["rl"].engine, rows)


def test_screenshot_with_traffic_and_admin_panel(live_server, page):
    server = live_server()
    for tier, calls in (("free", 9), ("basic", 24), ("premium", 40), (None, 3)):
        user, key = user_with_key(server.url, key_name=f"{tier or 'spare'} client")
        if tier:
            requests.post(f"{server.url}/admin/upgrade_tier", json={"user_id": user["user"]["id"], "tier": tier},
                          headers=ADMIN, timeout=10)
        call_data(server.url, key["api_key"], calls)
        if tier == "basic":
            seed_history(server, key, user["user"]["id"])
    requests.post(f"{server.url}/admin/block_key", json={"key_id": key["id"], "reason": "testing"}, headers=ADMIN,
                  timeout=10)
    requests.post(f"{server.url}/admin/ban_ip", json={"ip": "203.0.113.7", "seconds": 600}, headers=ADMIN, timeout=10)

    page.set_viewport_size({"width": 1366, "height": 900})
    open_dashboard(page, server)
    sign_in(page)
    expect(page.locator("#audit tr[data-action=ban_ip]")).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator("#total-limited")).not_to_have_text("0")
    assert page.locator("#chart svg rect.bar-ok").count() >= 40
    page.evaluate("window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
    assert_no_errors(page)



def test_users_are_paginated(live_server, page):
    server = live_server()
    names = [user_with_key(server.url)[0]["user"]["username"] for _ in range(12)]
    open_dashboard(page, server)
    sign_in(page)
    expect(page.locator("#users-page")).to_have_text("page 1 of 2 · 12 users", timeout=WAIT_MS)
    expect(page.locator("#users tr")).to_have_count(10)
    expect(page.locator("#users-prev")).to_be_disabled()
    page.locator("#users-next").click()
    expect(page.locator("#users-page")).to_contain_text("page 2 of 2", timeout=WAIT_MS)
    expect(page.locator("#users td.username")).to_have_text(names[10:])
    expect(page.locator("#users-next")).to_be_disabled()
    assert_no_errors(page)


def test_revoke_takes_a_second_click_and_kills_the_key(live_server, page):
    server = live_server()
    _, key = user_with_key(server.url)
    open_dashboard(page, server)
    sign_in(page)
    revoke = page.get_by_role("button", name=f"Revoke key {key['prefix']}")
    revoke.click()
    expect(revoke).to_have_text("Confirm revoke")
    assert call_data(server.url, key["api_key"], 1) == [200]
    revoke.click()
    key_row = page.locator(f'#keys tr[data-key-id="{key["id"]}"]')
    expect(key_row).to_contain_text("revoked", timeout=WAIT_MS)
    assert call_data(server.url, key["api_key"], 1) == [401]
    expect(page.locator("#audit tr[data-action=revoke_key]")).to_contain_text(f"key:{key['prefix']}")
    assert_no_errors(page)


def test_unban_lifts_an_ip_ban(live_server, page):
    server = live_server()
    response = requests.post(f"{server.url}/admin/ban_ip", json={"ip": "198.51.100.23", "seconds": 900},
                             headers=ADMIN, timeout=10)
    assert response.status_code == 200
    open_dashboard(page, server)
    sign_in(page)
    ban_row = page.locator("#bans tr", has_text="198.51.100.23")
    expect(ban_row).to_have_count(1, timeout=WAIT_MS)
    ban_row.get_by_role("button", name="Unban").click()
    expect(page.locator("#message")).to_contain_text("198.51.100.23 is no longer banned", timeout=WAIT_MS)
    expect(ban_row).to_have_count(0)
    assert requests.get(f"{server.url}/admin/bans", headers=ADMIN, timeout=10).json()["bans"] == []
    expect(page.locator("#audit tr[data-action=unban_ip]")).to_contain_text("ip:198.51.100.23")
    assert_no_errors(page)
