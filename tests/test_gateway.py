"""The /forward_auth decision (app.py's view, gateway.py's conventions): the /data decision and
budget for the request a gateway describes, identity headers, bad input, and nginx mode."""

from __future__ import annotations

import json

import pytest

import gateway

NGINX = {"X-Forward-Auth-Gateway": "nginx"}


def forwarded(uri: str = "/v1/orders", method: str = "GET", **headers: str) -> dict[str, str]:
    return {"X-Forwarded-Method": method, "X-Forwarded-Uri": uri, **headers}


@pytest.fixture
def key(auth) -> tuple[dict, dict]:
    return auth.user_with_key()


def test_admitted_request_gets_200_identity_and_rate_headers(client, key):
    user, api_key = key
    response = client.get("/forward_auth", headers=forwarded(**{"X-API-Key": api_key["api_key"]}))
    assert response.status_code == 200
    assert response.headers["X-Auth-User-Id"] == str(user["user"]["id"])
    assert response.headers["X-Auth-Username"] == user["user"]["username"]
    assert response.headers["X-Auth-Tier"] == "free"
    assert response.headers["X-Auth-Key-Prefix"] == api_key["prefix"]
    assert response.headers["X-RateLimit-Limit"] == "5" and response.headers["X-RateLimit-Remaining"] == "4"
    assert response.headers["RateLimit-Policy"] == '"free";q=5;w=60'
    assert response.get_json() == {"allowed": True}


def test_nginx_headers_and_the_api_key_in_the_forwarded_query_are_understood(client, key):
    _, api_key = key
    headers = {"X-Original-Method": "POST", "X-Original-URI": f"/v1/orders?x=1&api_key={api_key['api_key']}"}
    response = client.get("/forward_auth", headers=headers)
    assert response.status_code == 200
    assert response.headers["X-Auth-Key-Prefix"] == api_key["prefix"]


def test_a_jwt_call_is_limited_per_user_and_names_no_key(client, key, auth):
    user, _ = key
    response = client.get("/forward_auth", headers=forwarded(**auth.bearer(user["access_token"])))
    assert response.status_code == 200
    assert response.headers["X-Auth-User-Id"] == str(user["user"]["id"])
    assert "X-Auth-Key-Prefix" not in response.headers
    assert client.get("/data", headers=auth.bearer(user["access_token"])).get_json()["usage"]["remaining"] == 3


def test_envoy_style_path_carries_the_original_path_method_and_query(client, key):
    _, api_key = key
    response = client.delete(f"/forward_auth/v1/orders/7?api_key={api_key['api_key']}")
    assert response.status_code == 200
    assert response.headers["X-Auth-Key-Prefix"] == api_key["prefix"]
    root = client.get("/forward_auth/", headers={"X-API-Key": api_key["api_key"]})
    assert root.status_code == 200


def test_forwarded_request_reads_each_convention():
    from flask import Request
    from werkzeug.test import EnvironBuilder

    def parse(path: str = "/forward_auth", original: str | None = None, **headers: str) -> gateway.ForwardedRequest:
        return gateway.forwarded_request(Request(EnvironBuilder(path=path, headers=headers).get_environ()), original)

    assert parse(**forwarded("/a%20b?q=1", "PUT")) == gateway.ForwardedRequest("PUT", "/a%20b?q=1", "/a b", "q=1")
    assert parse(**{"X-Original-Method": "HEAD", "X-Original-URI": "/n"}).method == "HEAD"
    both = parse(**forwarded("/traefik"), **{"X-Original-URI": "/nginx"})
    assert both.path == "/traefik"  # the X-Forwarded pair wins; each shipped config blanks the other
    assert parse(**{"X-Forwarded-Uri": "https://api.example.com/x?y=1"}).path == "/x"
    envoy = parse("/forward_auth/v1/a%2Fb?k=v", original="v1/a/b")
    assert (envoy.method, envoy.uri, envoy.query) == ("GET", "/v1/a%2Fb?k=v", "k=v")


def test_forward_auth_and_data_spend_one_budget(client, key):
    _, api_key = key
    headers = {"X-API-Key": api_key["api_key"]}
    for _ in range(3):
        assert client.get("/data", headers=headers).status_code == 200
    assert client.get("/forward_auth", headers=forwarded(**headers)).status_code == 200
    assert client.get("/data", headers=headers).status_code == 200
    assert client.get("/forward_auth", headers=forwarded(**headers)).status_code == 429
    assert client.get("/data", headers=headers).status_code == 429


def test_refusals_are_those_of_data(client, key, auth):
    _, api_key = key
    headers = {"X-API-Key": api_key["api_key"]}
    for _ in range(5):
        client.get("/data", headers=headers)
    data, decision = client.get("/data", headers=headers), client.get("/forward_auth", headers=forwarded(**headers))
    assert decision.status_code == data.status_code == 429
    assert decision.get_json() == data.get_json()
    for name in ("Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "RateLimit",
                 "RateLimit-Policy"):
        assert decision.headers[name] == data.headers[name], name
    assert "X-Auth-User-Id" not in decision.headers
    missing = client.get("/forward_auth", headers=forwarded())
    assert (missing.status_code, missing.get_json()["error"]) == (401, "missing_api_key")
    invalid = client.get("/forward_auth", headers=forwarded(**{"X-API-Key": "rl_not_a_key"}))
    assert (invalid.status_code, invalid.get_json()["error"]) == (401, "invalid_api_key")
    client.post("/admin/block_key", json={"key_id": api_key["id"]}, headers=auth.admin)
    blocked = client.get("/forward_auth", headers=forwarded(**headers))
    assert (blocked.status_code, blocked.get_json()["error"]) == (403, "api_key_blocked")


@pytest.mark.parametrize("method", ["OPTIONS", "HEAD"])
def test_every_method_of_the_call_is_decided_not_answered_by_flask(client, method):
    response = client.open("/forward_auth", method=method, headers=forwarded(method=method))
    assert response.status_code == 401  # no key: refused, not a 200 Allow list


def test_missing_forwarded_uri_is_400(client):
    response = client.get("/forward_auth", headers={"X-Forwarded-Method": "GET", "X-API-Key": "x"})
    assert response.status_code == 400
    assert response.get_json()["error"] == "missing_forwarded_uri"


BAD_INPUT = [
    ("X-Forwarded-Uri", "/" + "a" * 9000),
    ("X-Forwarded-Uri", "/v1/\x00x"),
    ("X-Forwarded-Uri", "/v1/%00x"),
    ("X-Forwarded-Uri", "/v1/%1Fx"),
    ("X-Forwarded-Uri", "/v1/a b"),
    ("X-Forwarded-Uri", "/v1/%zz"),
    ("X-Forwarded-Uri", "/v1/%4"),
    ("X-Forwarded-Uri", "/v1/%C3%28"),
    ("X-Forwarded-Uri", "v1/relative"),
    ("X-Forwarded-Uri", "http://[::1/x"),
    ("X-Forwarded-Uri", "/caf\u00e9"),
    ("X-Original-URI", "\x7f\x01garbage"),
    ("X-Forwarded-Method", "FOOBAR"),
    ("X-Forwarded-Method", "get"),
    ("X-Original-Method", "G\x00ET"),
]


@pytest.mark.parametrize(("header", "value"), BAD_INPUT, ids=[f"{h}={v[:12]!r}" for h, v in BAD_INPUT])
def test_bad_forwarded_input_is_a_400_naming_the_header(client, key, header, value):
    _, api_key = key
    headers = {"X-API-Key": api_key["api_key"], header: value}
    if header != "X-Original-URI":
        headers.setdefault("X-Forwarded-Uri", "/ok")
    response = client.get("/forward_auth", headers=headers)
    assert response.status_code == 400, response.get_data()
    body = response.get_json()
    assert body["error"] == "invalid_field" and body["field"] == header and body["message"]
    assert client.get("/usage", headers={"X-API-Key": api_key["api_key"]}).get_json()["used"] == 0


def test_refused_bad_input_still_counts_against_the_ip(make_app):
    client = make_app(ip_rate_limit=2).test_client()
    statuses = [client.get("/forward_auth").status_code for _ in range(3)]
    assert statuses == [400, 400, 429]
    assert client.get("/forward_auth").get_json()["error"] == "ip_banned"


def test_the_client_address_comes_from_x_forwarded_for_under_trusted_proxies(make_app):
    client = make_app(ip_rate_limit=2, trusted_proxies=1).test_client()
    banned = [client.get("/forward_auth", headers={"X-Forwarded-For": "203.0.113.1"}).status_code for _ in range(3)]
    assert banned[-1] == 429
    other = client.get("/forward_auth", headers={"X-Forwarded-For": "203.0.113.2"})
    assert other.get_json()["error"] == "missing_forwarded_uri"


def test_nginx_mode_answers_refusals_as_403_with_the_real_status_and_body_in_headers(app, client, key):
    _, api_key = key
    headers = {**forwarded(**{"X-API-Key": api_key["api_key"]}), **NGINX}
    for _ in range(5):
        assert client.get("/forward_auth", headers=headers).status_code == 200
    refused = client.get("/forward_auth", headers=headers)
    assert refused.status_code == 403
    assert refused.headers[gateway.STATUS_HEADER] == "429"
    assert json.loads(refused.headers[gateway.BODY_HEADER]) == refused.get_json()
    assert refused.get_json()["error"] == "rate_limit_exceeded"
    assert int(refused.headers["Retry-After"]) >= 1 and refused.headers["X-RateLimit-Remaining"] == "0"
    # Logs and metrics saw the real 429, not the 403 nginx is told.
    assert app.extensions["rl"].metrics.snapshot()["by_status"]["429"] == 1


def test_nginx_mode_keeps_401_and_dresses_400(client):
    unauthenticated = client.get("/forward_auth", headers={**forwarded(), **NGINX})
    assert unauthenticated.status_code == 401 and unauthenticated.headers[gateway.STATUS_HEADER] == "401"
    bad = client.get("/forward_auth", headers={"X-Original-URI": "/%zz", **NGINX})
    assert bad.status_code == 403 and bad.headers[gateway.STATUS_HEADER] == "400"
    assert json.loads(bad.headers[gateway.BODY_HEADER])["field"] == "X-Original-URI"


def test_nginx_mode_leaves_admitted_answers_alone(client, key):
    _, api_key = key
    response = client.get("/forward_auth", headers={**forwarded(**{"X-API-Key": api_key["api_key"]}), **NGINX})
    assert response.status_code == 200 and gateway.STATUS_HEADER not in response.headers


def test_username_cache_reads_once_and_expires(app):
    now = [0.0]
    cache = gateway.UsernameCache(app.extensions["rl"].engine, ttl=10, clock=lambda: now[0])
    assert cache.get(12345) is None
    import database as db

    with app.extensions["rl"].engine.begin() as conn:
        conn.execute(db.users.insert().values(id=12345, username="late_user", password_hash="x", tier="free",
                                              is_admin=False, created_at=db.utcnow(), updated_at=db.utcnow()))
    assert cache.get(12345) is None  # cached answer
    now[0] = 11
    assert cache.get(12345) == "late_user"


def test_an_absolute_forwarded_uri_is_read_never_fetched(client, key):
    import socket

    _, api_key = key
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.2)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}/internal?x=1"
        response = client.get("/forward_auth", headers=forwarded(uri, **{"X-API-Key": api_key["api_key"]}))
        assert response.status_code == 200
        with pytest.raises(TimeoutError):
            listener.accept()
