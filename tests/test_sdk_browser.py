"""The browser SDK in headless Chromium: cross-origin use, the /sdk demo page, the snippet, ES modules.

Cross-origin pages are served by a second tiny HTTP server on another loopback port, so the
SDK's requests to the API are real CORS requests (with preflight for the JSON POSTs).
"""

from __future__ import annotations

import functools
import json
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.services import ROOT

pytestmark = pytest.mark.browser

ARTIFACTS = ROOT / "test-artifacts"
FREE_LIMIT = 5
TIMEOUT_MS = 10_000
PASSWORD = "correct horse battery"
# Chromium reports a refused connection on the console by itself; that is the browser, not the page.
CONNECTION_REFUSED = re.compile(r"net::ERR_CONNECTION_REFUSED")


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass


class StaticSite:
    """A second origin: a threaded http.server serving a temporary directory on a free port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def page(self, body: str, head: str = "") -> str:
        """Write an HTML page (with an empty favicon, so no 404 reaches the console); return its URL."""
        name = f"page-{uuid.uuid4().hex[:8]}.html"
        html = (
            f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
            f"<title>SDK test</title>{head}</head><body>{body}</body></html>"
        )
        (self.root / name).write_text(html, encoding="utf-8")
        return f"{self.url}/{name}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[StaticSite]:
    root = tmp_path / "site"
    root.mkdir()
    server = StaticSite(root)
    yield server
    server.stop()


def new_api_key(server: Any) -> str:
    """Register a user on the live server's app and return a fresh (free tier) API key."""
    client = server.app.test_client()
    username = f"sdk_{uuid.uuid4().hex[:10]}"
    response = client.post("/auth/register", json={"username": username, "password": PASSWORD})
    assert response.status_code == 201, response.get_json()
    token = response.get_json()["access_token"]
    response = client.post("/auth/create_api_key", json={"name": "sdk"}, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 201, response.get_json()
    return response.get_json()["api_key"]


def used_on_server(server: Any, key: str) -> int:
    response = server.app.test_client().get("/usage", headers={"X-API-Key": key})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["used"]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_page(site: StaticSite, api_url: str, key: str, base_url: str | None = None) -> str:
    """A page on the other origin that loads /sdk.js from the API and records every SDK event."""
    options = json.dumps({"baseUrl": base_url or api_url, "apiKey": key, "endpoint": "/cross-origin"})
    return site.page(
        head=f'<script src="{api_url}/sdk.js"></script>',
        body=f"""<div id="widget"></div>
<script>
  window.events = {{ limited: [], usage: [], error: [] }};
  window.unhandled = [];
  window.addEventListener("unhandledrejection", (event) => window.unhandled.push(String(event.reason)));
  window.client = RateLimiter.init({options});
  for (const name of Object.keys(window.events)) {{
    client.on(name, (payload) => window.events[name].push(
      payload instanceof Error ? {{ name: payload.name, code: payload.code, message: payload.message }} : payload));
  }}
</script>""",
    )


TRACK_UNTIL_LIMITED = """async () => {
  const before = await client.check();
  let succeeded = 0;
  let refusal = null;
  for (let i = 0; i < 20 && refusal === null; i++) {
    try {
      await client.track("/cross-origin", { method: "GET", status: 200 });
      succeeded += 1;
    } catch (err) {
      refusal = { name: err.name, isLimit: err instanceof RateLimiter.RateLimitError, limit: err.limit,
                  retryAfter: err.retryAfter, remaining: err.remaining, message: err.message };
    }
  }
  const after = await client.check();
  return { before, succeeded, refusal, after, usage: client.getUsage() };
}"""


def mount_widget(page: Page) -> None:
    # An arrow function: Playwright would call a function that a bare expression evaluates to.
    page.evaluate("() => { window.unmount = client.mountWidget(document.getElementById('widget')); }")


def assert_clean_console(page: Page) -> None:
    assert page.page_errors == []  # type: ignore[attr-defined]
    assert page.console_errors == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("cors", ["site", "*"])
def test_cross_origin_page_checks_and_tracks_until_limited(
    page: Page, live_server, site: StaticSite, cors: str
) -> None:
    api = live_server(cors_origins=[site.url if cors == "site" else "*"])
    key = new_api_key(api)
    page.goto(client_page(site, api.url, key))
    mount_widget(page)

    result = page.evaluate(TRACK_UNTIL_LIMITED)

    assert result["before"]["allowed"] is True and result["before"]["remaining"] == FREE_LIMIT
    assert result["succeeded"] == FREE_LIMIT
    refusal = result["refusal"]
    assert refusal["name"] == "RateLimitError" and refusal["isLimit"] is True
    assert refusal["limit"] == FREE_LIMIT and refusal["remaining"] == 0 and 1 <= refusal["retryAfter"] <= 60
    assert refusal["message"].startswith(f"Rate limit reached: {FREE_LIMIT} of {FREE_LIMIT} used, resets in ")
    assert result["after"]["allowed"] is False and result["after"]["remaining"] == 0
    assert result["usage"]["limited"] is True and result["usage"]["tier"] == "free"
    assert used_on_server(api, key) == FREE_LIMIT
    expect(page.locator(".rl-widget-counts")).to_have_text(f"0 / {FREE_LIMIT} requests left (free tier)")
    expect(page.locator(".rl-widget-reset")).to_contain_text(f"Rate limit reached: {FREE_LIMIT} of {FREE_LIMIT} used")
    events = page.evaluate("window.events")
    assert events["limited"] and events["limited"][0]["limit"] == FREE_LIMIT
    assert events["error"] == []
    remaining = [u["remaining"] for u in events["usage"]]
    assert [n for i, n in enumerate(remaining) if i == 0 or n != remaining[i - 1]] == [5, 4, 3, 2, 1, 0]
    assert_clean_console(page)


def test_widget_counts_down_and_unmounts(page: Page, live_server, site: StaticSite) -> None:
    api = live_server(cors_origins=[site.url])
    key = new_api_key(api)
    page.goto(client_page(site, api.url, key))
    mount_widget(page)
    page.evaluate("async () => { for (let i = 0; i < 5; i++) await client.track('/w'); }")
    reset = page.locator(".rl-widget-reset")
    expect(reset).to_have_text(re.compile(r"^Rate limit reached: 5 of 5 used, resets in \d+ s$"))
    first = int(re.search(r"(\d+) s$", reset.inner_text()).group(1))
    page.wait_for_function(
        "(first) => { const m = /(\\d+) s$/.exec(document.querySelector('.rl-widget-reset').textContent);"
        " return m && Number(m[1]) < first; }",
        arg=first,
        timeout=TIMEOUT_MS,
    )
    page.evaluate("window.unmount()")
    expect(page.locator(".rl-widget")).to_have_count(0)
    assert_clean_console(page)


def test_fetch_counts_each_call_once_and_refuses_locally(page: Page, live_server, site: StaticSite) -> None:
    api = live_server(cors_origins=[site.url])
    key = new_api_key(api)
    (site.root / "hello.json").write_text('{"hello": "world"}', encoding="utf-8")
    page.goto(client_page(site, api.url, key))

    result = page.evaluate(
        """async ([api, key, site]) => {
          const own = await client.fetch(site + "/hello.json");   // not limited by the API: tracked after
          const afterOwn = client.getUsage().remaining;
          const statuses = [];
          let refusal = null;
          while (refusal === null && statuses.length < 20) {
            try {
              const response = await client.fetch(api + "/data", { headers: { "X-API-Key": key } });
              statuses.push(response.status);
            } catch (err) {
              refusal = { name: err.name, local: err.local, status: err.status };
            }
          }
          return { own: await own.json(), afterOwn, statuses, refusal };
        }""",
        [api.url, key, site.url],
    )

    assert result["own"] == {"hello": "world"} and result["afterOwn"] == FREE_LIMIT - 1
    assert result["statuses"] == [200] * (FREE_LIMIT - 1)
    assert result["refusal"] == {"name": "RateLimitError", "local": True, "status": 429}
    assert used_on_server(api, key) == FREE_LIMIT  # /data counted itself; the SDK did not track it again
    assert_clean_console(page)


def test_server_side_429_becomes_rate_limit_error_with_retry_after(page: Page, live_server, site: StaticSite) -> None:
    api = live_server(cors_origins=[site.url])
    key = new_api_key(api)
    page.goto(client_page(site, api.url, key))
    for _ in range(FREE_LIMIT):  # spend the budget elsewhere, so this page's client still thinks it has some
        assert api.app.test_client().post("/sdk/track", json={"api_key": key, "endpoint": "/x"}).status_code == 200

    refusal = page.evaluate(
        """async () => {
          try { await client.track("/cross-origin"); return null; }
          catch (err) { return { name: err.name, local: err.local, retryAfter: err.retryAfter,
                                 code: err.code, body: err.body, limited: client.getUsage().limited }; }
        }"""
    )

    assert refusal["name"] == "RateLimitError" and refusal["local"] is False
    assert refusal["code"] == "rate_limit_exceeded" and refusal["body"]["error"] == "rate_limit_exceeded"
    assert 1 <= refusal["retryAfter"] <= 60 and refusal["limited"] is True
    assert page.evaluate("window.events.limited.length") == 1
    assert page.page_errors == []  # type: ignore[attr-defined]
    # Chromium itself logs every HTTP error response; that line is the only console error allowed.
    assert page.console_errors == [  # type: ignore[attr-defined]
        "Failed to load resource: the server responded with a status of 429 (TOO MANY REQUESTS)"
    ]


def test_fetch_honours_retry_after_of_a_429(page: Page, live_server, site: StaticSite) -> None:
    api = live_server(cors_origins=[site.url])
    key = new_api_key(api)
    page.goto(client_page(site, api.url, key))
    page.evaluate("() => client.track('/first')")  # the page now believes it has 4 calls left
    for _ in range(FREE_LIMIT - 1):  # ...which another client spends
        assert api.app.test_client().get("/data", headers={"X-API-Key": key}).status_code == 200

    result = page.evaluate(
        """async ([api, key]) => {
          const init = { headers: { "X-API-Key": key } };
          const first = await client.fetch(api + "/data", init);
          let second = null;
          try { await client.fetch(api + "/data", init); }
          catch (err) { second = { name: err.name, local: err.local }; }
          return { status: first.status, retryAfter: first.headers.get("Retry-After"), second,
                   usage: client.getUsage() };
        }""",
        [api.url, key],
    )

    assert result["status"] == 429 and 1 <= int(result["retryAfter"]) <= 60
    assert result["second"] == {"name": "RateLimitError", "local": True}  # refused without a request
    assert result["usage"]["limited"] is True and result["usage"]["retryAfter"] >= 1
    assert page.evaluate("window.events.limited.length") == 2
    assert used_on_server(api, key) == FREE_LIMIT
    assert page.page_errors == []  # type: ignore[attr-defined]


def test_unreachable_server_emits_error_and_rejects(page: Page, live_server, site: StaticSite) -> None:
    api = live_server()
    page.goto(client_page(site, api.url, "rl_whatever", base_url=f"http://127.0.0.1:{closed_port()}"))

    result = page.evaluate(
        """async () => {
          const outcomes = [];
          for (const call of [() => client.check(), () => client.track("/x"), () => client.fetch("/nowhere")]) {
            try { await call(); outcomes.push("resolved"); }
            catch (err) { outcomes.push({ name: err.name, code: err.code,
                                          typed: err instanceof RateLimiter.RateLimiterError }); }
          }
          return outcomes;
        }"""
    )
    mount_widget(page)
    expect(page.locator(".rl-widget-counts")).to_contain_text("Usage unavailable")

    expected = {"name": "RateLimiterError", "code": "network_error", "typed": True}
    assert result == [expected, expected, expected]
    page.evaluate("() => new Promise((resolve) => setTimeout(resolve, 0))")  # let rejection tracking run
    assert page.evaluate("window.unhandled") == []
    assert [e["code"] for e in page.evaluate("window.events.error")] == ["network_error"] * 4
    assert page.page_errors == []  # type: ignore[attr-defined]
    assert all(CONNECTION_REFUSED.search(text) for text in page.console_errors)  # type: ignore[attr-defined]


def test_origin_not_in_cors_origins_is_refused_by_the_browser(page: Page, live_server, site: StaticSite) -> None:
    api = live_server(cors_origins=["http://allowed.example"])
    key = new_api_key(api)
    page.goto(client_page(site, api.url, key))

    outcome = page.evaluate(
        "async () => { try { await client.check(); return 'resolved'; } catch (err) { return err.code; } }"
    )

    assert outcome == "network_error"
    assert [e["code"] for e in page.evaluate("window.events.error")] == ["network_error"]
    assert any("CORS" in text for text in page.console_errors)  # type: ignore[attr-defined]
    assert used_on_server(api, key) == 0


def test_es_module_import(page: Page, live_server, site: StaticSite) -> None:
    api = live_server(cors_origins=[site.url])
    key = new_api_key(api)
    url = site.page(f"""<script type="module">
  import RateLimiter, {{ RateLimiter as Named, RateLimitError, init }} from "{api.url}/sdk.mjs";
  const client = init({{ baseUrl: "{api.url}", apiKey: "{key}" }});
  const checked = await client.check("/module");
  window.moduleResult = {{
    same: RateLimiter === Named && RateLimiter === globalThis.RateLimiter,
    errorClass: RateLimitError.name,
    remaining: checked.remaining,
  }};
</script>""")
    page.goto(url)
    page.wait_for_function("window.moduleResult !== undefined", timeout=TIMEOUT_MS)
    assert page.evaluate("window.moduleResult") == {
        "same": True,
        "errorClass": "RateLimitError",
        "remaining": FREE_LIMIT,
    }
    assert_clean_console(page)


def test_script_tag_and_module_import_share_one_sdk(page: Page, live_server, site: StaticSite) -> None:
    api = live_server(cors_origins=[site.url])
    url = site.page(
        head=f'<script src="{api.url}/sdk.js"></script>',
        body=f"""<script type="module">
  import RateLimiter from "{api.url}/sdk.mjs";
  window.shared = RateLimiter === window.RateLimiter;
</script>""",
    )
    page.goto(url)
    page.wait_for_function("window.shared !== undefined", timeout=TIMEOUT_MS)
    assert page.evaluate("window.shared") is True
    assert_clean_console(page)


def test_snippet_from_sdk_page_works_on_another_origin(page: Page, live_server, site: StaticSite) -> None:
    api = live_server(cors_origins=[site.url])
    key = new_api_key(api)
    page.goto(f"{api.url}/sdk")
    snippet = page.locator("#snippet").inner_text()
    assert f'src="{api.url}/sdk.js"' in snippet and f'baseUrl: "{api.url}"' in snippet

    page.goto(site.page(snippet.replace("YOUR_API_KEY", key)))
    expect(page.locator(".rl-widget-counts")).to_have_text(f"{FREE_LIMIT} / {FREE_LIMIT} requests left (free tier)")
    tracked = page.evaluate("limiter.track('/search', { method: 'GET', status: 200 })")
    assert tracked["tracked"] is True and tracked["remaining"] == FREE_LIMIT - 1
    expect(page.locator(".rl-widget-counts")).to_have_text(f"{FREE_LIMIT - 1} / {FREE_LIMIT} requests left (free tier)")
    assert_clean_console(page)


def test_demo_page_buttons_count_down_to_429(page: Page, live_server) -> None:
    api = live_server()
    key = new_api_key(api)
    page.set_viewport_size({"width": 1100, "height": 1000})
    page.goto(f"{api.url}/sdk")
    message = page.locator("#message")

    page.get_by_role("button", name="Check").click()
    expect(message).to_have_text("Paste an API key first.")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Check").click()
    expect(message).to_have_text(f"Allowed: {FREE_LIMIT} of {FREE_LIMIT} left.")
    page.get_by_role("button", name="Track").click()
    expect(message).to_have_text(f"Tracked: {FREE_LIMIT - 1} of {FREE_LIMIT} left.")
    page.get_by_role("button", name="Call /data").click()
    expect(message).to_have_text("GET /data answered 200.")
    expect(page.locator("#output")).to_contain_text('"remaining": 3')
    page.get_by_role("button", name="Call until limited").click()

    expect(message).to_contain_text(
        "3 calls succeeded, then call 4 got HTTP 429 rate_limit_exceeded", timeout=TIMEOUT_MS
    )
    reset = page.locator(".rl-widget-reset")
    expect(reset).to_have_text(re.compile(r"^Rate limit reached: 5 of 5 used, resets in \d+ s$"))
    expect(page.locator(".rl-widget-counts")).to_have_text("0 / 5 requests left (free tier)")
    first = int(re.search(r"(\d+) s$", reset.inner_text()).group(1))
    page.wait_for_function(
        "(first) => { const m = /(\\d+) s$/.exec(document.querySelector('.rl-widget-reset').textContent);"
        " return m && Number(m[1]) < first; }",
        arg=first,
        timeout=TIMEOUT_MS,
    )
    assert used_on_server(api, key) == FREE_LIMIT
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "sdk-demo.png"), full_page=True)
    assert_clean_console(page)
