"""The served OpenAPI document: valid, in step with the URL map and the error codes the code raises,
and true to what real calls return (bodies checked with jsonschema, headers with their schemas).

Pins: openapi-spec-validator==0.9.0, jsonschema==4.26.0 (both imported here).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import errors
import openapi
from tests.conftest import ROOT

IGNORED_METHODS = {"HEAD", "OPTIONS"}


@pytest.fixture
def spec(client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.is_json
    return response.get_json()


class Documented:
    """Checks responses against the document: status listed, body valid, required headers present and valid."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.registry = Registry().with_resource("urn:api", Resource(contents=spec, specification=DRAFT202012))

    def _validate(self, pointer: str, instance: Any) -> None:
        validator = jsonschema.Draft202012Validator({"$ref": f"urn:api#{pointer}"}, registry=self.registry,
                                                    format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        validator.validate(instance)

    def __call__(self, response: Any, path: str, method: str) -> Any:
        """Assert ``response`` is documented for ``method path``; return its JSON body (or None)."""
        responses = self.spec["paths"][path][method]["responses"]
        status = str(response.status_code)
        assert status in responses, f"{method.upper()} {path} answered undocumented {status}: {response.get_data()!r}"
        documented = responses[status]
        base = f"/paths/{path.replace('~', '~0').replace('/', '~1')}/{method}/responses/{status}"
        media = response.mimetype
        assert media in documented.get("content", {media: None}), f"{method} {path} {status}: {media} undocumented"
        body = response.get_json() if response.is_json else None
        if media == "application/json":
            self._validate(f"{base}/content/application~1json/schema", body)
        for name, header in documented.get("headers", {}).items():
            if "$ref" in header:
                header = self.spec["components"]["headers"][header["$ref"].rsplit("/", 1)[1]]
            value = response.headers.get(name)
            if header.get("required"):
                assert value is not None, f"{method} {path} {status}: header {name} missing"
            if value is not None:
                typed: Any = int(value) if header["schema"].get("type") == "integer" else value
                jsonschema.validate(typed, header["schema"])
        return body


@pytest.fixture
def documented(spec) -> Documented:
    return Documented(spec)


# --- the document itself -----------------------------------------------------------------------

def test_document_is_valid_openapi_31(spec):
    validate(spec)
    assert spec["openapi"].startswith("3.1")


def test_every_url_rule_is_documented_and_every_documented_operation_exists(app, spec):
    routes = {(openapi.rule_to_path(rule.rule), method.lower())
              for rule in app.url_map.iter_rules() if rule.endpoint != "static"
              for method in rule.methods - IGNORED_METHODS}
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert routes - documented == set(), "routes missing from openapi.ROUTES"
    assert documented - routes == set(), "documented operations the app does not serve"


def test_flask_converters_become_openapi_path_templates():
    assert openapi.rule_to_path("/auth/api_keys/<int(max=2147483647):key_id>") == "/auth/api_keys/{key_id}"
    assert openapi.rule_to_path("/static/<path:filename>") == "/static/{filename}"
    assert openapi.rule_to_path("/x/<name>") == "/x/{name}"


APP_MODULES = ("app.py", "admin.py", "api_io.py", "gate.py", "auth.py", "errors.py", "gateway.py", "policy_rules.py")


def raised_error_codes() -> dict[str, set[int]]:
    """(code -> statuses) of every ApiError(status, "code", ...) in the application's modules."""
    found: dict[str, set[int]] = {}
    for module in APP_MODULES:
        source = (Path(ROOT) / module).read_text()
        for status, code in re.findall(r'ApiError\(\s*(\d{3}),\s*"([a-z_]+)"', source):
            found.setdefault(code, set()).add(int(status))
    found.setdefault("invalid_field", set()).add(400)  # errors.bad_request
    found.setdefault("internal_error", set()).add(500)  # errors.init_app's catch-all
    return found


def test_every_raised_error_code_is_catalogued_with_its_status():
    for code, statuses in raised_error_codes().items():
        assert code in openapi.ERROR_CODES, f"{code} is raised but not in openapi.ERROR_CODES"
        assert statuses == {openapi.ERROR_CODES[code][0]}, code


def test_every_catalogued_error_code_appears_in_the_code():
    source = "".join((Path(ROOT) / module).read_text() for module in APP_MODULES)
    unused = {code for code in openapi.ERROR_CODES if f'"{code}"' not in source}
    assert unused - set(errors._HTTP_CODES.values()) == set()


def test_every_error_response_uses_the_error_model(spec):
    for path, item in spec["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                if int(status) >= 400 and not (path == "/health" and status == "503"):
                    schema = response["content"]["application/json"]["schema"]
                    assert "#/components/schemas/" in repr(schema), (method, path, status)


def test_limited_routes_document_rate_limit_headers_and_429_retry_after(spec):
    for path, method in (("/data", "get"), ("/sdk/track", "post")):
        responses = spec["paths"][path][method]["responses"]
        assert set(openapi.RATE_HEADERS) <= set(responses["200"]["headers"])
        assert responses["429"]["headers"]["Retry-After"]["required"] is True


def test_tier_enum_follows_the_configured_tiers(spec, app):
    assert spec["components"]["schemas"]["Tier"]["enum"] == list(app.extensions["rl"].config.tier_limits)


# --- real calls against the documented shapes --------------------------------------------------

def test_core_routes_match_the_document(client, documented):
    assert documented(client.get("/"), "/", "get")["status"] == "ok"
    assert documented(client.get("/health"), "/health", "get")["checks"]["database"] == "ok"
    documented(client.get("/openapi.json"), "/openapi.json", "get")
    assert documented(client.get("/api/metrics"), "/api/metrics", "get")["limiter_store"] == "memory"


def test_html_js_and_prometheus_routes_have_their_content_types(client, documented):
    for path, media in (("/dashboard", "text/html"), ("/sdk", "text/html"), ("/sdk.js", "application/javascript"),
                        ("/metrics", "text/plain")):
        response = client.get(path)
        documented(response, path, "get")
        assert response.status_code == 200 and response.mimetype == media
        assert response.headers["Content-Type"].count("charset") <= 1


def test_auth_flow_matches_the_document(client, auth, documented):
    session = documented(client.post("/auth/register", json={"username": "docs_user", "password": "long enough pw",
                                                            "email": "docs@example.com"}),
                         "/auth/register", "post")
    taken = client.post("/auth/register", json={"username": "docs_user", "password": "long enough pw"})
    assert documented(taken, "/auth/register", "post")["error"] == "username_taken"
    short = client.post("/auth/register", json={"username": "x", "password": "long enough pw"})
    assert documented(short, "/auth/register", "post")["field"] == "username"
    login = documented(auth.login("docs_user", "long enough pw"), "/auth/login", "post")
    wrong = auth.login("docs_user", "wrong password")
    assert documented(wrong, "/auth/login", "post")["error"] == "invalid_credentials"
    pair = documented(client.post("/auth/refresh", json={"refresh_token": login["refresh_token"]}),
                      "/auth/refresh", "post")
    replay = client.post("/auth/refresh", json={"refresh_token": login["refresh_token"]})
    assert documented(replay, "/auth/refresh", "post")["error"] == "token_reused"
    bearer = auth.bearer(session["access_token"])
    key = documented(client.post("/auth/create_api_key", json={"name": "docs"}, headers=bearer),
                     "/auth/create_api_key", "post")
    assert documented(client.get("/auth/me", headers=bearer), "/auth/me", "get")["api_keys"][0]["id"] == key["id"]
    documented(client.get("/auth/api_keys", headers=bearer), "/auth/api_keys", "get")
    path = "/auth/api_keys/{key_id}"
    documented(client.delete(f"/auth/api_keys/{key['id']}", headers=bearer), path, "delete")
    gone = client.delete(f"/auth/api_keys/{key['id']}", headers=bearer)
    assert documented(gone, path, "delete")["error"] == "key_not_found"
    documented(client.post("/auth/logout", json={"refresh_token": pair["refresh_token"]},
                           headers=auth.bearer(pair["access_token"])), "/auth/logout", "post")
    missing = client.get("/auth/me")
    assert documented(missing, "/auth/me", "get")["error"] == "missing_token"


def test_data_usage_and_sdk_calls_match_the_document(client, auth, documented):
    user, key = auth.user_with_key()
    headers = {"X-API-Key": key["api_key"]}
    body = documented(client.get("/data", headers=headers), "/data", "get")
    assert body["usage"]["remaining"] == 4
    documented(client.get(f"/data?api_key={key['api_key']}"), "/data", "get")
    documented(client.get("/data", headers=auth.bearer(user["access_token"])), "/data", "get")
    assert documented(client.get("/usage", headers=headers), "/usage", "get")["used"] == 2
    documented(client.post("/sdk/check", json={"api_key": key["api_key"], "endpoint": "/x"}), "/sdk/check", "post")
    documented(client.post("/sdk/track", json={"api_key": key["api_key"], "endpoint": "/x", "method": "GET",
                                               "status": 200}), "/sdk/track", "post")
    assert documented(client.get("/data"), "/data", "get")["error"] == "missing_api_key"
    assert documented(client.get("/data", headers={"X-API-Key": "rl_nope"}), "/data", "get")["error"] == \
        "invalid_api_key"


def test_rate_limited_responses_match_the_document(client, auth, documented):
    _, key = auth.user_with_key()
    for _ in range(5):
        client.get("/data", headers={"X-API-Key": key["api_key"]})
    limited = client.get("/data", headers={"X-API-Key": key["api_key"]})
    body = documented(limited, "/data", "get")
    assert limited.status_code == 429 and body["error"] == "rate_limit_exceeded" and body["tier"] == "free"
    assert int(limited.headers["Retry-After"]) >= 1 and limited.headers["X-RateLimit-Remaining"] == "0"
    track = client.post("/sdk/track", json={"api_key": key["api_key"], "endpoint": "/x"})
    assert documented(track, "/sdk/track", "post")["error"] == "rate_limit_exceeded"
    check = documented(client.post("/sdk/check", json={"api_key": key["api_key"]}), "/sdk/check", "post")
    assert check["allowed"] is False and check["retry_after"] >= 1


def test_ip_ban_matches_the_document(make_app, documented):
    client = make_app(ip_rate_limit=2).test_client()
    responses = [client.get("/api/metrics") for _ in range(3)]
    assert responses[-1].status_code == 429
    assert documented(responses[-1], "/api/metrics", "get")["error"] == "ip_banned"


def test_admin_calls_match_the_document(client, auth, documented):
    user, key = auth.user_with_key()
    admin = auth.admin
    documented(client.get("/admin/users?page=1&per_page=10", headers=admin), "/admin/users", "get")
    documented(client.get(f"/admin/keys?user_id={user['user']['id']}", headers=admin), "/admin/keys", "get")
    upgraded = client.post("/admin/upgrade_tier", json={"username": user["user"]["username"], "tier": "premium"},
                           headers=admin)
    assert documented(upgraded, "/admin/upgrade_tier", "post")["user"]["tier"] == "premium"
    bad_tier = client.post("/admin/upgrade_tier", json={"user_id": 1, "tier": "gold"}, headers=admin)
    assert documented(bad_tier, "/admin/upgrade_tier", "post")["field"] == "tier"
    blocked = client.post("/admin/block_key", json={"prefix": key["prefix"], "reason": "docs"}, headers=admin)
    assert documented(blocked, "/admin/block_key", "post")["key"]["blocked"] is True
    refused = client.get("/data", headers={"X-API-Key": key["api_key"]})
    assert documented(refused, "/data", "get")["error"] == "api_key_blocked"
    documented(client.post("/admin/unblock_key", json={"key_id": key["id"]}, headers=admin),
               "/admin/unblock_key", "post")
    documented(client.post("/admin/revoke_key", json={"api_key": key["api_key"]}, headers=admin),
               "/admin/revoke_key", "post")
    unknown = client.post("/admin/block_key", json={"key_id": 999_999}, headers=admin)
    assert documented(unknown, "/admin/block_key", "post")["error"] == "key_not_found"
    documented(client.post("/admin/ban_ip", json={"ip": "203.0.113.9", "seconds": 60}, headers=admin),
               "/admin/ban_ip", "post")
    assert documented(client.get("/admin/bans", headers=admin), "/admin/bans", "get")["bans"][0]["ip"] == "203.0.113.9"
    documented(client.post("/admin/unban_ip", json={"ip": "203.0.113.9"}, headers=admin), "/admin/unban_ip", "post")
    not_banned = client.post("/admin/unban_ip", json={"ip": "203.0.113.9"}, headers=admin)
    assert documented(not_banned, "/admin/unban_ip", "post")["error"] == "ban_not_found"
    assert documented(client.get("/logs?limit=5&level=info", headers=admin), "/logs", "get")["logs"]
    assert documented(client.get("/admin/audit", headers=admin), "/admin/audit", "get")["entries"]
    documented(client.get("/admin/alerts", headers=admin), "/admin/alerts", "get")
    assert "top_keys" in documented(client.get("/api/analytics?minutes=5", headers=admin), "/api/analytics", "get")
    anonymous = client.get("/admin/users")
    assert documented(anonymous, "/admin/users", "get")["error"] == "missing_admin_token"
    not_admin = client.get("/admin/users", headers=auth.bearer(user["access_token"]))
    assert documented(not_admin, "/admin/users", "get")["error"] == "forbidden"


def test_body_errors_match_the_document(app, client, auth, documented):
    path = "/auth/register"
    not_json = client.post(path, data="username=x", content_type="application/x-www-form-urlencoded")
    assert documented(not_json, path, "post")["error"] == "unsupported_media_type"
    malformed = client.post(path, data="{", content_type="application/json")
    assert documented(malformed, path, "post")["error"] == "malformed_json"
    too_large = client.post(path, data="x" * (app.config["MAX_CONTENT_LENGTH"] + 1), content_type="application/json")
    assert documented(too_large, path, "post")["error"] == "payload_too_large"
    bad_query = client.get("/admin/users?per_page=0", headers=auth.admin)
    assert documented(bad_query, "/admin/users", "get")["field"] == "per_page"


# Each of these answered 500 (or, for the newline, was accepted) before the fixes found by fuzzing.
CRASH_INPUTS = [
    ("post", "/auth/register", '{"username": "crash_user", "password": "pass\\ud800word!"}', None, 400,
     "invalid_field"),
    ("post", "/sdk/check", "[" * 50_000, None, 400, "malformed_json"),
    ("post", "/auth/register", '{"username": "abc\\n", "password": "long enough pw"}', None, 400, "invalid_field"),
    ("post", "/admin/upgrade_tier", '{"user_id": 1180591620717411303424, "tier": "free"}', "admin", 400,
     "invalid_field"),
    ("post", "/admin/block_key", '{"key_id": 9223372036854775808}', "admin", 400, "invalid_field"),
    ("get", "/admin/users?page=99999999999999999999", None, "admin", 400, "invalid_field"),
    ("get", "/admin/keys?user_id=99999999999999999999", None, "admin", 400, "invalid_field"),
    ("get", "/logs?since=0001-01-01T00:00:00%2B01:00", None, "admin", 400, "invalid_field"),
    ("get", "/logs?since=9999-12-31T23:59:59-01:00", None, "admin", 400, "invalid_field"),
    ("delete", "/auth/api_keys/99999999999999999999", None, "user", 404, "not_found"),
]


@pytest.mark.parametrize(("method", "url", "body", "who", "status", "code"), CRASH_INPUTS,
                         ids=[f"{m} {u[:40]}" for m, u, *_ in CRASH_INPUTS])
def test_inputs_that_once_crashed_get_a_documented_error(client, auth, documented, method, url, body, who,
                                                         status, code):
    headers = auth.admin if who == "admin" else auth.bearer(auth.register()["access_token"]) if who else {}
    response = client.open(url, method=method.upper(), data=body, headers=headers,
                           content_type="application/json" if body is not None else None)
    path = "/auth/api_keys/{key_id}" if url.startswith("/auth/api_keys/") else url.split("?")[0]
    assert response.status_code == status
    assert documented(response, path, method)["error"] == code
