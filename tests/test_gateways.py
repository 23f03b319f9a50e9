"""The shipped gateway configurations (gateways/), driven end to end: real nginx and real Caddy in
front of a real upstream (an echo server that reports what it received), deciding with the real
API's /forward_auth over loopback.

Each test runs against both gateways. A missing binary is tests.services.unavailable() (fails in
CI, skips elsewhere); CI installs them (.ci/run: nginx-light, caddy).
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import ROOT, AuthActions
from tests.services import free_port, port_open, unavailable, wait_until

GATEWAYS = ROOT / "gateways"
NGINX = os.environ.get("NGINX_PATH", "/usr/sbin/nginx")
CADDY = os.environ.get("CADDY_PATH", "/usr/bin/caddy")
pytestmark = pytest.mark.slow  # starts real gateway processes

RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "RateLimit-Policy", "RateLimit")


class EchoUpstream:
    """The protected API: answers every request with the method, path, headers and body it got."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        upstream = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _echo(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                seen = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                        "body": self.rfile.read(length).decode("utf-8", "replace")}
                upstream.received.append(seen)
                payload = json.dumps(seen).encode()
                status = re.search(r"[?&]status=(\d{3})", self.path)  # the upstream's own errors, on request
                self.send_response(int(status.group(1)) if status else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("X-RateLimit-Limit", "999999")  # the gateway must not let this through
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_FOOBAR = _echo

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def render(text: str, values: dict[str, str]) -> str:
    """What envsubst does with the placeholder list the README gives."""
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    return text


def start_nginx(tmp: Path, values: dict[str, str]) -> subprocess.Popen:
    if not os.path.exists(NGINX):
        unavailable(f"nginx at {NGINX}")
    config = render((GATEWAYS / "nginx.conf.template").read_text(), values)
    # The shipped file keeps the distribution's temporary paths; here they go to a private prefix
    # so that the test needs no system directory.
    temp_paths = "".join(f"    {kind}_temp_path {tmp}/{kind};\n"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    config = config.replace("http {\n", "http {\n" + temp_paths, 1)
    (tmp / "nginx.conf").write_text(config)
    log = open(tmp / "nginx.out", "wb")  # noqa: SIM115 - closed with the process below
    return subprocess.Popen(
        [NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"),
         "-g", f"daemon off; pid {tmp}/nginx.pid; error_log {tmp}/error.log warn;"],
        stdout=log, stderr=log,
    )


def start_caddy(tmp: Path, values: dict[str, str]) -> subprocess.Popen:
    if not os.path.exists(CADDY):
        unavailable(f"caddy at {CADDY}")
    env = {**os.environ, **values, "HOME": str(tmp), "XDG_DATA_HOME": str(tmp), "XDG_CONFIG_HOME": str(tmp)}
    log = open(tmp / "caddy.out", "wb")  # noqa: SIM115 - closed with the process below
    return subprocess.Popen([CADDY, "run", "--config", str(GATEWAYS / "Caddyfile"), "--adapter", "caddyfile"],
                            env=env, stdout=log, stderr=log, cwd=tmp)


class Gateway:
    """A running gateway on a free port: its URL, the upstream behind it, and the API deciding."""

    def __init__(self, kind: str, url: str, upstream: EchoUpstream, api: Any) -> None:
        self.kind = kind
        self.url = url
        self.upstream = upstream
        self.api = api
        self.auth = AuthActions(api.app.test_client())

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=10, **kwargs)


@pytest.fixture(params=["nginx", "caddy"])
def gateway(request: pytest.FixtureRequest, live_server: Any, tmp_path: Path) -> Iterator[Gateway]:
    binary = NGINX if request.param == "nginx" else CADDY
    if not os.path.exists(binary):  # before starting anything else
        unavailable(f"{request.param} at {binary}")
    api = live_server(trusted_proxies=1)  # the gateway is one hop: the client's address counts
    upstream = EchoUpstream()
    port = free_port()
    values = {"LISTEN_PORT": str(port), "UPSTREAM": upstream.address, "RATELIMITER": f"127.0.0.1:{api.port}"}
    start = start_nginx if request.param == "nginx" else start_caddy
    proc = start(tmp_path, values)
    try:
        wait_until(lambda: proc.poll() is not None or port_open("127.0.0.1", port), timeout=20)
        if proc.poll() is not None:
            out = "".join(p.read_text() for p in tmp_path.glob("*.out")) + "".join(
                p.read_text() for p in tmp_path.glob("error.log"))
            pytest.fail(f"{request.param} exited with {proc.returncode}: {out}")
        yield Gateway(request.param, f"http://127.0.0.1:{port}", upstream, api)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        upstream.stop()


def raw_get(gw: Gateway, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    host, port = gw.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def key_for(gw: Gateway) -> tuple[dict[str, Any], str]:
    user, key = gw.auth.user_with_key()
    return user, key["api_key"]


def test_admitted_request_reaches_the_upstream_with_identity_and_the_client_gets_rate_headers(gateway):
    user, key = key_for(gateway)
    response = gateway.get("/v1/items?page=2", headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    seen = response.json()
    assert seen["path"] == "/v1/items?page=2"
    assert seen["headers"]["X-Auth-User-Id"] == str(user["user"]["id"])
    assert seen["headers"]["X-Auth-Username"] == user["user"]["username"]
    assert seen["headers"]["X-Auth-Tier"] == "free"
    assert seen["headers"]["X-Auth-Key-Prefix"] == key[:len(seen["headers"]["X-Auth-Key-Prefix"])]
    assert response.headers["X-RateLimit-Limit"] == "5"  # the limiter's, not the upstream's 999999
    assert response.headers["X-RateLimit-Remaining"] == "4"
    assert response.headers["RateLimit-Policy"] == '"free";q=5;w=60'
    assert all(name in response.headers for name in RATE_HEADERS)
    assert "Retry-After" not in response.headers


def test_api_key_in_the_query_and_a_post_body_pass_through(gateway):
    _, key = key_for(gateway)
    response = requests.post(f"{gateway.url}/v1/upload?api_key={key}", data=b'{"n": 1}', timeout=10,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    seen = response.json()
    assert (seen["method"], seen["body"]) == ("POST", '{"n": 1}')
    assert seen["headers"]["X-Auth-Tier"] == "free"


def test_spoofed_identity_headers_never_reach_the_upstream(gateway):
    user, _ = key_for(gateway)
    spoofed = {"X-Auth-User-Id": "999999", "X-Auth-Username": "admin", "X-Auth-Tier": "enterprise",
               "X-Auth-Key-Prefix": "rl_spoofed"}
    response = gateway.get("/v1/me", headers={**spoofed, **gateway.auth.bearer(user["access_token"])})
    assert response.status_code == 200, response.text
    headers = response.json()["headers"]
    assert headers["X-Auth-User-Id"] == str(user["user"]["id"])
    assert headers["X-Auth-Username"] == user["user"]["username"]
    assert headers["X-Auth-Tier"] == "free"
    assert "X-Auth-Key-Prefix" not in headers, repr(headers)  # a JWT call has no key: the client copy is gone too


def test_rate_limited_client_gets_429_with_retry_after_rate_headers_and_json_body(gateway):
    _, key = key_for(gateway)
    for _ in range(5):
        assert gateway.get("/v1/items", headers={"X-API-Key": key}).status_code == 200
    admitted = len(gateway.upstream.received)
    limited = gateway.get("/v1/items", headers={"X-API-Key": key})
    assert limited.status_code == 429
    assert limited.headers["Content-Type"].startswith("application/json")
    body = limited.json()
    assert body["error"] == "rate_limit_exceeded" and body["limit"] == 5 and body["tier"] == "free"
    assert int(limited.headers["Retry-After"]) >= 1 and body["retry_after"] == int(limited.headers["Retry-After"])
    assert limited.headers["X-RateLimit-Remaining"] == "0" and limited.headers["X-RateLimit-Limit"] == "5"
    assert len(gateway.upstream.received) == admitted


def test_the_gateway_and_data_spend_one_budget(gateway):
    _, key = key_for(gateway)
    client = gateway.api.app.test_client()
    for _ in range(4):
        assert client.get("/data", headers={"X-API-Key": key}).status_code == 200
    assert gateway.get("/v1/items", headers={"X-API-Key": key}).headers["X-RateLimit-Remaining"] == "0"
    assert gateway.get("/v1/items", headers={"X-API-Key": key}).status_code == 429


@pytest.mark.parametrize("status", [401, 403, 500])
def test_the_upstreams_own_errors_reach_the_client_untouched(gateway, status):
    _, key = key_for(gateway)
    response = gateway.get(f"/v1/fail?status={status}", headers={"X-API-Key": key})
    assert response.status_code == status
    assert response.json()["path"] == f"/v1/fail?status={status}"  # the upstream's body, not a refusal
    assert response.headers["X-RateLimit-Remaining"] == "4"


def test_the_limiter_counts_the_clients_address_not_a_spoofed_one(gateway):
    _, key = key_for(gateway)
    admin = gateway.auth._client
    assert admin.post("/admin/ban_ip", json={"ip": "203.0.113.50"}, headers=gateway.auth.admin).status_code == 200
    spoofed = gateway.get("/v1/items", headers={"X-API-Key": key, "X-Forwarded-For": "203.0.113.50"})
    assert spoofed.status_code == 200
    assert admin.post("/admin/ban_ip", json={"ip": "127.0.0.1"}, headers=gateway.auth.admin).status_code == 200
    banned = gateway.get("/v1/items", headers={"X-API-Key": key, "X-Forwarded-For": "203.0.113.51"})
    assert banned.status_code == 429 and banned.json()["error"] == "ip_banned"
    assert int(banned.headers["Retry-After"]) >= 1
    assert len(gateway.upstream.received) == 1


@pytest.mark.parametrize(("headers", "error"), [({}, "missing_api_key"), ({"X-API-Key": "rl_not_a_key"},
                                                                         "invalid_api_key")])
def test_missing_or_invalid_credentials_get_401_json(gateway, headers, error):
    response = gateway.get("/v1/items", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == error
    assert gateway.upstream.received == []


def test_blocked_key_gets_403_api_key_blocked(gateway):
    _, key = key_for(gateway)
    blocked = gateway.auth._client.post("/admin/block_key", json={"api_key": key, "reason": "test"},
                                        headers=gateway.auth.admin)
    assert blocked.status_code == 200
    response = gateway.get("/v1/items", headers={"X-API-Key": key})
    assert response.status_code == 403 and response.json()["error"] == "api_key_blocked"
    assert gateway.upstream.received == []


@pytest.mark.parametrize("method", ["FOOBAR", "PROPFIND"])
def test_unknown_method_is_refused_not_let_through(gateway, method):
    _, key = key_for(gateway)
    response = requests.request(method, f"{gateway.url}/v1/items", headers={"X-API-Key": key}, timeout=10)
    assert 400 <= response.status_code < 500
    assert gateway.upstream.received == []


@pytest.mark.parametrize("path", ["/v1/%zz", "/v1/%00secret", "/v1/%C3%28", "/v1/" + "a" * 9000])
def test_malformed_request_uris_are_refused_not_let_through(gateway, path):
    _, key = key_for(gateway)
    status, body = raw_get(gateway, path, {"X-API-Key": key})  # sent as written, not re-encoded
    assert 400 <= status < 500, body
    assert gateway.upstream.received == []


@pytest.mark.parametrize("method", ["GET", "FOOBAR"])
def test_the_decisions_bad_input_refusal_reaches_the_client_as_json(gateway, method):
    """Both gateways pass this URI and method on; the rate limiter refuses them with its 400 JSON."""
    _, key = key_for(gateway)
    path = "/v1/%C3%28" if method == "GET" else "/v1/items"
    response = requests.request(method, gateway.url + path, headers={"X-API-Key": key}, timeout=10)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_field"
    assert gateway.upstream.received == []


def test_unreachable_rate_limiter_refuses_the_request(gateway):
    _, key = key_for(gateway)
    gateway.api.stop()
    gateway.api._server.server_close()  # refused connections, not a silent backlog
    response = gateway.get("/v1/items", headers={"X-API-Key": key})
    assert response.status_code == 503
    assert response.json()["error"] == "ratelimiter_unavailable"
    assert gateway.upstream.received == []


def test_an_unreachable_upstream_is_not_blamed_on_the_rate_limiter(gateway):
    _, key = key_for(gateway)
    gateway.upstream.stop()
    response = gateway.get("/v1/items", headers={"X-API-Key": key})
    assert response.status_code == 502
    assert "ratelimiter_unavailable" not in response.text


def test_nginx_template_has_only_the_three_documented_placeholders():
    text = (GATEWAYS / "nginx.conf.template").read_text()
    assert set(re.findall(r"\$\{(\w+)\}", text)) == {"LISTEN_PORT", "UPSTREAM", "RATELIMITER"}


def test_caddyfile_has_only_the_three_documented_placeholders():
    text = (GATEWAYS / "Caddyfile").read_text()
    assert set(re.findall(r"\{\$(\w+)\}", text)) == {"LISTEN_PORT", "UPSTREAM", "RATELIMITER"}


# --- Traefik and Envoy: no binary here, so their files are checked against the same contract ---

IDENTITY = ["X-Auth-User-Id", "X-Auth-Username", "X-Auth-Tier", "X-Auth-Key-Prefix"]


def test_traefik_config_strips_client_identity_then_asks_the_decision():
    import yaml  # PyYAML comes with schemathesis

    http_config = yaml.safe_load((GATEWAYS / "traefik.yml").read_text())["http"]
    router = http_config["routers"]["protected-api"]
    assert router["middlewares"] == ["strip-client-identity", "ratelimiter"]
    stripped = http_config["middlewares"]["strip-client-identity"]["headers"]["customRequestHeaders"]
    assert all(stripped[name] == "" for name in IDENTITY)
    forward = http_config["middlewares"]["ratelimiter"]["forwardAuth"]
    assert forward["address"] == 'http://{{ env "RATELIMITER" }}/forward_auth'
    assert forward["trustForwardHeader"] is False
    assert set(IDENTITY) <= set(forward["authResponseHeaders"])


def test_envoy_config_strips_client_identity_then_asks_the_decision():
    import yaml

    values = {"LISTEN_PORT": "8091", "UPSTREAM_HOST": "127.0.0.1", "UPSTREAM_PORT": "5001",
              "RATELIMITER_HOST": "127.0.0.1", "RATELIMITER_PORT": "5000"}
    text = (GATEWAYS / "envoy.yaml").read_text()
    assert set(re.findall(r"\$\{(\w+)\}", text)) == set(values)
    config = yaml.safe_load(render(text, values))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = {f["name"].rsplit(".", 1)[1]: f.get("typed_config", {}) for f in manager["http_filters"]}
    assert list(filters) == ["header_mutation", "ext_authz", "router"]
    removed = [m["remove"] for m in filters["header_mutation"]["mutations"]["request_mutations"]]
    assert removed == [name.lower() for name in IDENTITY]
    authz = filters["ext_authz"]
    assert authz["failure_mode_allow"] is False
    service = authz["http_service"]
    assert service["path_prefix"] == "/forward_auth" and service["server_uri"]["cluster"] == "ratelimiter"
    response = service["authorization_response"]
    upstream = [p["exact"] for p in response["allowed_upstream_headers"]["patterns"]]
    assert upstream == [name.lower() for name in IDENTITY]
    assert {"prefix": "x-ratelimit-"} in response["allowed_client_headers_on_success"]["patterns"]
    assert {"exact": "retry-after"} in response["allowed_client_headers"]["patterns"]
    clusters = {c["name"] for c in config["static_resources"]["clusters"]}
    assert clusters == {"ratelimiter", "protected_api"}
