"""The dashboard's admin panel manages limit overrides (headless Chromium against a live server)."""

from __future__ import annotations

import pytest
import requests

from tests.test_dashboard_browser import (
    ADMIN,
    WAIT_MS,
    assert_no_errors,
    call_data,
    expect,
    open_dashboard,
    sign_in,
    user_with_key,
)

pytestmark = pytest.mark.browser


def test_admin_sets_and_deletes_an_override_from_the_dashboard(live_server, page):
    server = live_server()
    _, key = user_with_key(server.url)
    open_dashboard(page, server)
    sign_in(page)
    page.locator("#override-target").fill(key["prefix"])
    page.locator("#override-limits").fill("1/minute, 100/day")
    page.locator("#override-reason").fill("trial")
    page.get_by_role("button", name="Override").click()
    expect(page.locator("#message")).to_contain_text("Override 1/minute, 100/day", timeout=WAIT_MS)
    row = page.locator("#overrides tr", has_text=f"key #{key['id']}")
    expect(row).to_have_count(1, timeout=WAIT_MS)
    assert call_data(server.url, key["api_key"], 2) == [200, 429]
    expect(page.locator("#audit tr[data-action=create_override]")).to_have_count(1, timeout=WAIT_MS)
    row.get_by_role("button", name="Delete").click()
    expect(page.locator("#message")).to_contain_text("deleted", timeout=WAIT_MS)
    expect(row).to_have_count(0)
    assert requests.get(f"{server.url}/admin/overrides", headers=ADMIN, timeout=10).json()["overrides"] == []
    assert call_data(server.url, key["api_key"], 1) == [200]
    assert_no_errors(page)


def test_a_bad_override_shows_the_400(live_server, page):
    server = live_server()
    _, key = user_with_key(server.url)
    open_dashboard(page, server)
    sign_in(page)
    page.locator("#override-target").fill(key["prefix"])
    page.locator("#override-limits").fill("5/fortnight")
    page.get_by_role("button", name="Override").click()
    expect(page.locator("#message")).to_contain_text("unknown unit", timeout=WAIT_MS)
    assert page.page_errors == []
