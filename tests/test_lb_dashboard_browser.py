"""The balancer's dashboard in headless Chromium, against a real ``python load_balancer.py``.

It must show the gateway (forward-auth) counters and switch the strategy with the admin token.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import requests
from playwright.sync_api import expect
from test_mock_backends import mock_backends, stop, wait_ready

from tests.services import ROOT, free_port

TOKEN = "dashboard-test-token"


@pytest.fixture(scope="module")
def balancer() -> Iterator[tuple[str, str]]:
    """A balancer in gateway mode whose decision service is down (fail closed), with an admin token."""
    with mock_backends([free_port()]) as urls:
        port = free_port()
        decider = f"http://127.0.0.1:{free_port()}/forward_auth"  # nothing listens there
        cmd = [sys.executable, str(ROOT / "load_balancer.py"), "--port", str(port), "--backends", urls[0]]
        cmd += ["--forward-auth", decider, "--forward-auth-timeout", "0.5"]
        env = {"PATH": "/usr/bin:/bin", "LB_ADMIN_TOKEN": TOKEN}
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready([url + "/lb/health"], proc)
            yield url, decider
        finally:
            stop(proc)


def test_dashboard_shows_gateway_counts_and_switches_strategy_with_the_token(balancer, page) -> None:
    url, decider = balancer
    assert requests.get(url + "/orders", timeout=5).status_code == 503  # one decision error
    page.goto(url + "/dashboard")
    expect(page.locator("#fa-errors")).to_have_text("1", timeout=5000)  # locators: the page's CSP forbids eval
    assert decider in page.text_content("#fa-url") and "closed" in page.text_content("#fa-url")
    assert page.text_content("#fa-admitted") == "0" and page.text_content("#fa-refused") == "0"

    page.select_option("#strategy", "least_connections")  # no token yet: refused
    expect(page.locator("#strategy-status")).to_contain_text("LB_ADMIN_TOKEN", timeout=5000)
    assert requests.get(url + "/stats", timeout=5).json()["strategy"] == "round_robin"

    page.fill("#token", TOKEN)
    page.dispatch_event("#token", "change")
    page.select_option("#strategy", "adaptive")
    expect(page.locator("#strategy-status")).to_have_text("switched", timeout=5000)
    assert requests.get(url + "/stats", timeout=5).json()["strategy"] == "adaptive"
    assert not page.page_errors
