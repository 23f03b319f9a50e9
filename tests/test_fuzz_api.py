"""Fuzz the API against its own OpenAPI document, and its JSON body parsers with arbitrary input.

schemathesis (pinned 4.32.5) generates valid and invalid requests for every documented operation
from ``/openapi.json`` and calls the app through WSGI with real user, API key and admin
credentials. Each response must not be a 5xx, must have a documented status, content type and
headers, and must match its documented schema. A second, Hypothesis-only test throws arbitrary
bytes and JSON values at every POST route: never a 5xx, always the error shape.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import openapi
from tests.conftest import ADMIN_TOKEN, PASSWORD

pytestmark = pytest.mark.slow

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "30"))  # per operation; raise it for a deeper run
FUZZ_CONFIG = dict(
    ip_rate_limit=1_000_000,  # the fuzzer must not ban itself; bans are covered in test_openapi
    register_per_ip_per_hour=1_000_000,
    login_failures_per_ip=1_000_000,
    abuse_auto_ban=False,
)


@pytest.fixture
def fuzz_app(make_app, tmp_path: Path):
    """Factory for an app on a SQLite file in RAM when /dev/shm exists (the fuzzer makes thousands of
    small commits, and on a virtual disk their fsyncs would take most of the run), or on a fresh
    PostgreSQL database with ``build("postgres")``."""
    files: list[Path] = []

    def build(backend: str = "sqlite") -> Flask:
        if backend == "postgres":
            return make_app(backend="postgres", use_clock=False, **FUZZ_CONFIG)
        folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
        files.append(folder / f"rl-fuzz-{uuid.uuid4().hex}.db")
        return make_app(use_clock=False, database_url=f"sqlite:///{files[-1]}", **FUZZ_CONFIG)

    yield build
    for file in files:
        for leftover in file.parent.glob(f"{file.name}*"):
            leftover.unlink(missing_ok=True)


class Credentials:
    """A user, an access token and an API key that stay usable while the fuzzer revokes, blocks and
    logs out: each is checked before use and replaced when the last case spent it."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.client = app.test_client()
        self.admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        self.users = 0
        self.user: dict[str, Any] = {}
        self.key: dict[str, Any] = {}
        self.token = ""
        self._new_user()

    def _new_user(self) -> None:
        self.users += 1
        body = self.client.post("/auth/register", json={"username": f"fuzzer_{self.users}", "password": PASSWORD})
        self.user, self.token = body.get_json()["user"], body.get_json()["access_token"]
        self.client.post("/admin/upgrade_tier", json={"user_id": self.user["id"], "tier": "enterprise"},
                         headers=self.admin)
        self.key = self.client.post("/auth/create_api_key", json={"name": "fuzz"}, headers=self.bearer).get_json()

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def login(self) -> dict[str, Any]:
        """A new token pair, for calls that spend or revoke what they carry (logout, refresh)."""
        body = {"username": self.user["username"], "password": PASSWORD}
        return self.client.post("/auth/login", json=body).get_json()

    def ensure_usable(self) -> None:
        """Replace the user when the fuzzer revoked the token or blocked/revoked the key (or filled it up)."""
        me = self.client.get("/auth/me", headers=self.bearer)
        usage = self.client.get("/usage", headers={"X-API-Key": self.key["api_key"]})
        if me.status_code != 200 or usage.status_code != 200 or len(me.get_json()["api_keys"]) > 20:
            self._new_user()
        self.app.extensions["rl"].limiter.unban_ip("127.0.0.1")  # in case a case banned the loopback

    def headers_for(self, auth: str, path: str) -> dict[str, str]:
        if auth in ("admin", "optional_admin"):
            return self.admin
        if path == "/auth/logout":
            return {"Authorization": f"Bearer {self.login()['access_token']}"}
        if auth == "jwt":
            return self.bearer
        return {}

    def real_values(self) -> dict[str, Any]:
        """Field name -> a value that names something that exists (for bodies and path parameters)."""
        return {"api_key": self.key["api_key"], "key_id": self.key["id"], "prefix": self.key["prefix"],
                "user_id": self.user["id"], "username": self.user["username"],
                "refresh_token": self.login()["refresh_token"]}


OPERATIONS = [(path, method) for path, methods in openapi.ROUTES.items() for method in methods]


def route_of(case: Any) -> dict[str, Any]:
    return openapi.ROUTES[case.operation.path][case.method.lower()]


def coin(value: Any) -> bool:
    """A deterministic coin flip on generated data: heads for about half the cases."""
    return len(str(value)) % 2 == 0


def with_credentials(case: Any, credentials: Credentials) -> dict[str, str]:
    """Real credentials and real ids for about half the cases, so that both the happy path and the
    refusals are explored; returns the headers to send."""
    auth = route_of(case).get("auth", "none")
    headers = credentials.headers_for(auth, case.operation.path)
    if auth in ("key", "key_or_jwt"):
        generated = (case.headers or {}).get("X-API-Key") or (case.query or {}).get("api_key")
        if not generated or coin(generated):
            headers = {"X-API-Key": credentials.key["api_key"]}
    if isinstance(case.body, dict) and case.operation.path != "/auth/register":
        real = credentials.real_values() if set(case.body) & {"api_key", "key_id", "prefix", "user_id",
                                                              "username", "refresh_token"} else {}
        for name in set(case.body) & set(real):
            if coin(case.body[name]):
                case.body[name] = real[name]
    if case.path_parameters and coin(case.path_parameters.get("key_id")):
        case.path_parameters["key_id"] = credentials.key["id"]
    return headers


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m.upper()} {p}" for p, m in OPERATIONS])
def test_operation_conforms_to_the_openapi_document(fuzz_app, path, method):
    """Valid and invalid requests generated from the served document: no 5xx, documented answers only."""
    application = fuzz_app()
    credentials = Credentials(application)
    operation = schemathesis.openapi.from_wsgi("/openapi.json", application)[path][method.upper()]
    cases = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def check(case: Any) -> None:
        credentials.ensure_usable()
        case.call_and_validate(headers=with_credentials(case, credentials), checks=CHECKS)

    check()


# --- body parsers ------------------------------------------------------------------------------

POST_ROUTES = sorted(path for path, methods in openapi.ROUTES.items() if methods.get("post", {}).get("body"))
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


# Values that get past the first checks of each field, and near misses (lone surrogates, overflows),
# so that a draw often reaches the code behind validation (hashing, SQL, the limiter).
PLAUSIBLE: dict[str, list[Any]] = {
    "username": ["fuzz_user", "fuzzer_1", "user\ud800x"],
    "password": ["long enough password", "pass\ud800word!", "x" * 1025],
    "email": ["a@example.com", "a\ud800@example.com", None],
    "refresh_token": ["a.b.c", "\udfff.x.y"],
    "name": ["key", "\ud800", "x" * 101],
    "api_key": ["rl_deadbeef_x", "rl_\ud800", "x" * 201],
    "endpoint": ["/data", "\ud800"],
    "method": ["GET", "\ud800"],
    "status": [200, 99, 600, True, 2**70],
    "tier": ["free", "enterprise", "gold", "\ud800"],
    "user_id": [1, 2**31, 2**63, -1, 2**80],
    "key_id": [1, 2**31, 2**63, -1, 2**80],
    "prefix": ["rl_deadbeef", "\ud800"],
    "reason": ["abuse", "\ud800"],
    "ip": ["203.0.113.7", "::1", "fe80::1%eth0", "\ud800", "999.1.1.1"],
    "seconds": [1, 0, 2592001, 2**80, 1.5],
}
surrogate_text = st.text(alphabet=st.characters(categories=["Cs", "Ll", "Nd", "Zs"]), max_size=20)


def field_values(name: str) -> st.SearchStrategy[Any]:
    return st.sampled_from(PLAUSIBLE.get(name, [None])) | json_values | surrogate_text


def field_names(path: str) -> list[str]:
    body = openapi.BODIES[openapi.ROUTES[path]["post"]["body"]]
    return sorted(body["properties"])


@st.composite
def raw_bodies(draw: st.DrawFn, path: str) -> bytes:
    """Arbitrary bytes, any JSON value, or an object of the route's own fields holding plausible or
    arbitrary JSON values (lone surrogates and huge integers included), or very deep nesting."""
    kind = draw(st.sampled_from(["bytes", "json", "fields", "fields", "fields", "deep"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "deep":
        depth = draw(st.integers(min_value=100, max_value=30_000))
        return b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))
    if kind == "json":
        value = draw(json_values)
    else:
        fields = {name: field_values(name) for name in field_names(path)}
        value = draw(st.fixed_dictionaries({}, optional=fields))
        value.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    return json.dumps(value, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("path", POST_ROUTES)
def test_post_bodies_never_cause_a_server_error(fuzz_app, path):
    application = fuzz_app()
    credentials = Credentials(application)
    client = application.test_client()
    route = openapi.ROUTES[path]["post"]
    documented = {int(status) for status in openapi.build_spec(application, "test")["paths"][path]["post"]["responses"]}

    @settings(max_examples=4 * MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        body=raw_bodies(path),
        content_type=st.sampled_from(
            ["application/json", "application/json", "text/plain", "application/merge-patch+json"]
        ),
    )
    def check(body: bytes, content_type: str) -> None:
        credentials.ensure_usable()
        headers = {"Content-Type": content_type, **credentials.headers_for(route.get("auth", "none"), path)}
        response = client.post(path, data=body, headers=headers)
        assert response.status_code < 500, (path, body[:200], response.get_data()[:300])
        assert response.status_code in documented, (path, body[:200], response.status_code, response.get_json())
        if response.status_code >= 400:
            payload = response.get_json()
            assert isinstance(payload.get("error"), str) and isinstance(payload.get("message"), str), payload

    check()


# --- strings PostgreSQL cannot store -----------------------------------------------------------

with_nul = st.one_of(
    st.sampled_from(["\x00", "fuzz_user\x00", "rl_deadbeef\x00", "free\x00", "203.0.113.7\x00", "\udfff\x00"]),
    st.tuples(st.text(max_size=12), st.text(max_size=12)).map(lambda parts: f"{parts[0]}\x00{parts[1]}"),
)
nasty_text = st.one_of(
    with_nul,
    st.text(alphabet=st.characters(categories=["Cc", "Cs", "Ll", "Nd"]), max_size=40),  # Cs: lone surrogates
    st.integers(min_value=65, max_value=20_000).map(lambda n: "x" * n),
)
# Weighted towards NUL, the one PostgreSQL refuses; wrong types and containers too.
nasty_values = st.one_of(with_nul, with_nul, nasty_text, json_scalars, st.lists(nasty_text, max_size=3),
                         st.dictionaries(nasty_text, nasty_text, max_size=2))


@st.composite
def bodies_with_a_nasty_field(draw: st.DrawFn, path: str, target: str) -> bytes:
    """``target`` holds a string with NUL, a lone surrogate, control characters or many characters,
    or a value of the wrong type; any subset of the other fields is present at plausible values, so
    that the bad one gets past the others' checks and as deep into the route as it can."""
    others = draw(st.sets(st.sampled_from([name for name in field_names(path) if name != target] or [target])))
    body = {name: PLAUSIBLE.get(name, ["x"])[0] for name in others - {target}}
    body[target] = draw(nasty_values)
    return json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


POST_FIELDS = [(path, name) for path in POST_ROUTES for name in field_names(path)]


@pytest.mark.parametrize(("path", "target"), POST_FIELDS, ids=[f"{p} {n}" for p, n in POST_FIELDS])
def test_nul_surrogates_long_strings_and_wrong_types_never_500_on_postgres(fuzz_app, path, target):
    """PostgreSQL refuses NUL in text (SQLite stores it): every field of every JSON route is a 4xx in
    the error shape there, never a 500 (a NUL username in /admin/upgrade_tier was one)."""
    application = fuzz_app("postgres")
    credentials = Credentials(application)
    client = application.test_client()
    route = openapi.ROUTES[path]["post"]

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(body=bodies_with_a_nasty_field(path, target))
    def check(body: bytes) -> None:
        credentials.ensure_usable()
        headers = {"Content-Type": "application/json", **credentials.headers_for(route.get("auth", "none"), path)}
        response = client.post(path, data=body, headers=headers)
        assert response.status_code < 500, (path, body[:200], response.get_data()[:300])
        if response.status_code >= 400:
            payload = response.get_json()
            assert isinstance(payload.get("error"), str) and isinstance(payload.get("message"), str), payload

    check()


def test_nul_in_the_username_of_upgrade_tier_is_a_400_naming_the_field_on_postgres(fuzz_app):
    client = fuzz_app("postgres").test_client()
    response = client.post("/admin/upgrade_tier", json={"username": "a\x00b", "tier": "basic"},
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 400 and response.get_json()["field"] == "username"
