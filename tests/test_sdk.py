"""The SDK's server side: /sdk.js and /sdk.mjs, the /sdk page, /sdk/check and /sdk/track, and CORS."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

ORIGIN = "http://app.example:8000"
OTHER_ORIGIN = "http://evil.example"
FREE_LIMIT = 5
PASSWORD = "correct horse battery"


@pytest.fixture
def key(auth) -> str:
    _, created = auth.user_with_key()
    return created["api_key"]


def register_key(client: Any) -> str:
    """A fresh free-tier key on ``client``'s app (for apps built with make_app)."""
    user = client.post("/auth/register", json={"username": f"u_{uuid.uuid4().hex[:10]}", "password": PASSWORD})
    token = user.get_json()["access_token"]
    created = client.post("/auth/create_api_key", json={}, headers={"Authorization": f"Bearer {token}"})
    return created.get_json()["api_key"]


def check(client: Any, api_key: str | None, **extra: Any) -> Any:
    body = {"api_key": api_key, **extra} if api_key is not None else extra
    return client.post("/sdk/check", json=body)


def track(client: Any, api_key: str | None, endpoint: str = "/search", **extra: Any) -> Any:
    body = {"endpoint": endpoint, **extra}
    if api_key is not None:
        body["api_key"] = api_key
    return client.post("/sdk/track", json=body)


def preflight(client: Any, path: str, origin: str, method: str = "POST", headers: str = "content-type") -> Any:
    return client.options(
        path,
        headers={"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers},
    )


# --- the script and the page ---------------------------------------------------------------


def test_sdk_js_is_cacheable_javascript_for_any_origin(client) -> None:
    response = client.get("/sdk.js")
    assert response.status_code == 200
    assert response.mimetype == "application/javascript"
    cache_control = response.headers["Cache-Control"]
    assert "public" in cache_control and "max-age=300" in cache_control
    assert response.headers.get("ETag")
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert b"RateLimiter" in response.data


def test_sdk_js_revalidates_with_etag(client) -> None:
    etag = client.get("/sdk.js").headers["ETag"]
    response = client.get("/sdk.js", headers={"If-None-Match": etag})
    assert response.status_code == 304


def test_sdk_js_is_a_classic_script_without_eval_or_inner_html(client) -> None:
    source = client.get("/sdk.js").get_data(as_text=True)
    assert not re.search(r"^\s*(export|import)\b", source, re.MULTILINE)
    assert "'use strict'" in source
    assert not re.search(
        r"\beval\s*\(|new Function\b|\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", source
    )


def test_sdk_mjs_reexports_the_classic_script(client) -> None:
    response = client.get("/sdk.mjs")
    assert response.status_code == 200
    assert response.mimetype == "application/javascript"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    source = response.get_data(as_text=True)
    assert "import './sdk.js';" in source
    assert "export default RateLimiter;" in source


def test_sdk_script_requests_do_not_count_against_the_ip_limit(make_app) -> None:
    client = make_app(ip_rate_limit=2).test_client()
    statuses = [client.get(path).status_code for path in ("/sdk.js", "/sdk.mjs") * 3]
    assert statuses == [200] * 6


def test_sdk_page_is_html_with_labelled_demo_and_no_cdn(client) -> None:
    response = client.get("/sdk")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert '<script src="/sdk.js"></script>' in page
    assert '<label for="api-key">API key</label>' in page
    for button in ("Check", "Call /data", "Track", "Call until limited"):
        assert f">{button}</button>" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


# --- /sdk/check and /sdk/track ------------------------------------------------------------


def test_check_consumes_nothing(client, key) -> None:
    bodies = [check(client, key, endpoint="/search").get_json() for _ in range(FREE_LIMIT + 2)]
    assert {b["remaining"] for b in bodies} == {FREE_LIMIT}
    assert bodies[0]["allowed"] is True and bodies[0]["retry_after"] == 0 and bodies[0]["tier"] == "free"
    assert bodies[0]["limit"] == FREE_LIMIT and isinstance(bodies[0]["reset_epoch"], int)
    assert client.get("/usage", headers={"X-API-Key": key}).get_json()["used"] == 0


def test_track_counts_one_request(client, key) -> None:
    response = track(client, key, method="GET", status=200)
    assert response.status_code == 200
    assert response.get_json() == {
        "tracked": True,
        "tier": "free",
        "limit": FREE_LIMIT,
        "remaining": FREE_LIMIT - 1,
        "reset_epoch": response.get_json()["reset_epoch"],
    }
    assert response.headers["X-RateLimit-Remaining"] == str(FREE_LIMIT - 1)
    assert check(client, key).get_json()["remaining"] == FREE_LIMIT - 1


def test_track_and_data_share_one_budget(client, key) -> None:
    assert client.get("/data", headers={"X-API-Key": key}).status_code == 200
    assert track(client, key).get_json()["remaining"] == FREE_LIMIT - 2


def test_track_over_the_limit_is_429_with_retry_after(client, key) -> None:
    statuses = [track(client, key).status_code for _ in range(FREE_LIMIT + 1)]
    assert statuses == [200] * FREE_LIMIT + [429]
    response = track(client, key)
    body = response.get_json()
    assert response.status_code == 429
    assert body["error"] == "rate_limit_exceeded" and body["message"]
    assert body["limit"] == FREE_LIMIT and body["remaining"] == 0 and body["tier"] == "free"
    assert 1 <= body["retry_after"] <= 60
    assert response.headers["Retry-After"] == str(body["retry_after"])


def test_check_when_limited_reports_retry_after_and_window_reopens(client, key, clock) -> None:
    for _ in range(FREE_LIMIT):
        track(client, key)
    limited = check(client, key).get_json()
    assert limited["allowed"] is False and limited["remaining"] == 0 and limited["retry_after"] == 60
    clock.advance(60)
    reopened = check(client, key).get_json()
    assert reopened["allowed"] is True and reopened["remaining"] == FREE_LIMIT


@pytest.mark.parametrize("call", [check, track])
def test_missing_api_key_is_401(client, call) -> None:
    response = call(client, None)
    assert response.status_code == 401
    assert response.get_json()["error"] == "missing_api_key"


@pytest.mark.parametrize("call", [check, track])
def test_invalid_api_key_is_401(client, call) -> None:
    response = call(client, "rl_not_a_real_key")
    assert response.status_code == 401
    assert response.get_json()["error"] == "invalid_api_key"


@pytest.mark.parametrize("call", [check, track])
def test_blocked_key_is_403(client, auth, key, call) -> None:
    blocked = client.post("/admin/block_key", json={"api_key": key, "reason": "abuse"}, headers=auth.admin)
    assert blocked.status_code == 200
    response = call(client, key)
    assert response.status_code == 403
    assert response.get_json()["error"] == "api_key_blocked"


def test_sdk_endpoints_read_the_key_from_the_json_body_only(client, key) -> None:
    response = client.post(f"/sdk/check?api_key={key}", json={})
    assert response.status_code == 401  # the SDK endpoints read the key from the JSON body only


def test_track_requires_an_endpoint(client, key) -> None:
    response = client.post("/sdk/track", json={"api_key": key})
    assert response.status_code == 400
    assert response.get_json()["field"] == "endpoint"


def test_track_rejects_a_status_that_is_not_an_http_code(client, key) -> None:
    response = track(client, key, status=1000)
    assert response.status_code == 400
    assert response.get_json()["field"] == "status"


def test_check_needs_a_json_body(client, key) -> None:
    response = client.post("/sdk/check", data=f"api_key={key}", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 415


# --- CORS -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/sdk/check", "/sdk/track"])
def test_preflight_for_json_post_from_an_allowed_origin(make_app, path) -> None:
    client = make_app(cors_origins=[ORIGIN]).test_client()
    response = preflight(client, path, ORIGIN)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "content-type" in response.headers["Access-Control-Allow-Headers"].lower()
    assert int(response.headers["Access-Control-Max-Age"]) > 0


@pytest.mark.parametrize("path", ["/data", "/usage"])
def test_preflight_for_get_with_api_key_header(make_app, path) -> None:
    client = make_app(cors_origins=[ORIGIN]).test_client()
    response = preflight(client, path, ORIGIN, method="GET", headers="x-api-key")
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "x-api-key" in response.headers["Access-Control-Allow-Headers"].lower()


@pytest.mark.parametrize("path", ["/sdk/check", "/sdk/track", "/data"])
def test_preflight_from_a_refused_origin_gets_no_cors_headers(make_app, path) -> None:
    client = make_app(cors_origins=[ORIGIN]).test_client()
    response = preflight(client, path, OTHER_ORIGIN)
    assert "Access-Control-Allow-Origin" not in response.headers
    assert "Access-Control-Allow-Methods" not in response.headers


def test_wildcard_cors_origins_allow_any_origin(make_app) -> None:
    client = make_app(cors_origins=["*"]).test_client()
    response = preflight(client, "/sdk/check", OTHER_ORIGIN)
    # "*" is answered by echoing the request's origin, and the answer then varies by Origin
    assert response.headers["Access-Control-Allow-Origin"] == OTHER_ORIGIN
    assert "Origin" in response.headers["Vary"]
    assert "content-type" in response.headers["Access-Control-Allow-Headers"].lower()


def test_cross_origin_answers_expose_the_rate_limit_headers(make_app) -> None:
    client = make_app(cors_origins=[ORIGIN]).test_client()
    api_key = register_key(client)
    for _ in range(FREE_LIMIT):
        client.post("/sdk/track", json={"api_key": api_key, "endpoint": "/x"}, headers={"Origin": ORIGIN})
    response = client.post("/sdk/track", json={"api_key": api_key, "endpoint": "/x"}, headers={"Origin": ORIGIN})
    assert response.status_code == 429
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = {h.strip().lower() for h in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {
        "retry-after",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
        "ratelimit",
        "ratelimit-policy",
    } <= exposed
