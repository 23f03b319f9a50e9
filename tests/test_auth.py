"""Auth routes and token attacks, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

import auth as auth_module
from tests.conftest import PASSWORD


@pytest.fixture(params=["sqlite", "postgres"])
def client(request, make_app):
    return make_app(backend=request.param).test_client()


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def me(client, token):
    return client.get("/auth/me", headers={"Authorization": f"Bearer {token}"})


# --- register / login ---

def test_register_returns_user_and_tokens(client, auth):
    body = auth.register("alice", email="alice@example.com")
    assert body["user"]["username"] == "alice"
    assert body["user"]["tier"] == "free"
    assert body["user"]["email"] == "alice@example.com"
    assert body["user"]["created_at"].endswith("Z")
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900
    assert me(client, body["access_token"]).status_code == 200


def test_register_duplicate_username_is_409(client, auth):
    auth.register("bob")
    response = client.post("/auth/register", json={"username": "bob", "password": PASSWORD})
    assert response.status_code == 409
    assert response.get_json()["error"] == "username_taken"


@pytest.mark.parametrize("payload, field", [
    ({"password": PASSWORD}, "username"),
    ({"username": "ab", "password": PASSWORD}, "username"),
    ({"username": "has space", "password": PASSWORD}, "username"),
    ({"username": "x" * 65, "password": PASSWORD}, "username"),
    ({"username": "carol", "password": "short"}, "password"),
    ({"username": "carol", "password": 12345678}, "password"),
    ({"username": "carol", "password": PASSWORD, "email": "not-an-email"}, "email"),
])
def test_register_validation_names_the_field(client, payload, field):
    response = client.post("/auth/register", json=payload)
    assert response.status_code == 400
    body = response.get_json()
    assert body["field"] == field and field in body["message"]


def test_register_rejects_non_json_and_malformed_json(client):
    assert client.post("/auth/register", data="username=a").status_code == 415
    response = client.post("/auth/register", data="{not json", content_type="application/json")
    assert response.status_code == 400 and response.get_json()["error"] == "malformed_json"
    response = client.post("/auth/register", json=["a", "list"])
    assert response.status_code == 400


def test_password_longer_than_bcrypt_limit_works_and_is_not_truncated(client, auth):
    long_password = "p" * 100
    auth.register("longpw", password=long_password)
    assert auth.login("longpw", long_password).status_code == 200
    assert auth.login("longpw", "p" * 72).status_code == 401


def test_login_success_and_uniform_failure(client, auth):
    auth.register("dave")
    assert auth.login("dave").status_code == 200
    wrong = auth.login("dave", "wrong password")
    unknown = auth.login("nobody-here", "wrong password")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.get_json() == unknown.get_json()
    assert wrong.get_json()["error"] == "invalid_credentials"


def test_failed_logins_are_throttled_per_ip(make_app):
    client = make_app(login_failures_per_ip=3).test_client()
    client.post("/auth/register", json={"username": "erin", "password": PASSWORD})
    for _ in range(3):
        assert client.post("/auth/login", json={"username": "erin", "password": "bad-password"}).status_code == 401
    response = client.post("/auth/login", json={"username": "erin", "password": PASSWORD})
    assert response.status_code == 429
    assert response.get_json()["error"] == "too_many_failed_logins"
    assert int(response.headers["Retry-After"]) >= 1


def test_registration_is_throttled_per_ip(make_app):
    client = make_app(register_per_ip_per_hour=2).test_client()
    for name in ("reg1", "reg2"):
        assert client.post("/auth/register", json={"username": name, "password": PASSWORD}).status_code == 201
    response = client.post("/auth/register", json={"username": "reg3", "password": PASSWORD})
    assert response.status_code == 429 and response.get_json()["error"] == "too_many_registrations"


@pytest.mark.parametrize("mode", ["open", "memory"])
def test_sign_in_and_registration_throttles_hold_while_the_store_is_down(make_app, mode):
    """RATELIMIT_FAIL_MODE=open admits API traffic during an outage, but brute-force protection
    keeps counting per process (the store here is a closed port, not the shared Redis)."""
    from tests.services import free_port

    client = make_app(storage_url=f"redis://127.0.0.1:{free_port()}/0", fail_mode=mode,
                      login_failures_per_ip=3, register_per_ip_per_hour=2).test_client()
    for name in ("down1", "down2"):
        assert client.post("/auth/register", json={"username": name, "password": PASSWORD}).status_code == 201
    response = client.post("/auth/register", json={"username": "down3", "password": PASSWORD})
    assert response.status_code == 429 and response.get_json()["error"] == "too_many_registrations"
    for _ in range(3):
        assert client.post("/auth/login", json={"username": "down1", "password": "bad-password"}).status_code == 401
    response = client.post("/auth/login", json={"username": "down1", "password": PASSWORD})
    assert response.status_code == 429 and response.get_json()["error"] == "too_many_failed_logins"
    assert client.get("/health").get_json()["checks"]["limiter_store"] == "degraded"


def test_passwords_are_stored_as_bcrypt(client, auth):
    import sqlalchemy as sa

    import database as db

    auth.register("frank")
    with client.application.extensions["rl"].engine.connect() as conn:
        stored = conn.execute(sa.select(db.users.c.password_hash)).scalar_one()
    assert stored.startswith("$2b$") and PASSWORD not in stored


# --- tokens ---

def test_refresh_rotates_and_replay_revokes_the_family(client, auth):
    tokens = auth.register("gina")
    first = client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert first.status_code == 200
    rotated = first.get_json()
    assert rotated["refresh_token"] != tokens["refresh_token"]
    replay = client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert replay.status_code == 401 and replay.get_json()["error"] == "token_reused"
    # the whole family is gone: the rotated token no longer works either
    assert client.post("/auth/refresh", json={"refresh_token": rotated["refresh_token"]}).status_code == 401


def test_refresh_token_cannot_be_used_as_access_token(client, auth):
    tokens = auth.register("hank")
    response = me(client, tokens["refresh_token"])
    assert response.status_code == 401


def test_access_token_cannot_be_used_as_refresh_token(client, auth):
    tokens = auth.register("ivy")
    response = client.post("/auth/refresh", json={"refresh_token": tokens["access_token"]})
    assert response.status_code == 401


def test_alg_none_token_is_rejected(client, auth):
    tokens = auth.register("jack")
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    forged = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."
    assert me(client, forged).status_code == 401


def test_tampered_token_is_rejected(client, auth):
    tokens = auth.register("kate")
    header, payload, signature = tokens["access_token"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "999"
    assert me(client, f"{header}.{b64(claims)}.{signature}").status_code == 401


def test_token_signed_with_another_key_or_algorithm_is_rejected(client, auth):
    tokens = auth.register("liam")
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    other = jwt.encode(claims, "another-secret-of-enough-length-0123456789", algorithm="HS256")
    assert me(client, other).status_code == 401
    hs512 = jwt.encode(claims, "test-secret-key-that-is-long-enough-0123456789", algorithm="HS512")
    assert me(client, hs512).status_code == 401


def test_expired_token_is_rejected(client, auth):
    tokens = auth.register("mona")
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    claims.update(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    expired = jwt.encode(claims, "test-secret-key-that-is-long-enough-0123456789", algorithm="HS256")
    response = me(client, expired)
    assert response.status_code == 401 and response.get_json()["error"] == "token_expired"


def test_token_without_required_claims_is_rejected(client):
    token = jwt.encode({"sub": "1", "type": "access"}, "test-secret-key-that-is-long-enough-0123456789",
                       algorithm="HS256")
    assert me(client, token).status_code == 401


def test_garbage_authorization_headers_are_401(client):
    for header in ("Bearer", "Bearer ", "Basic abc", "Bearer a.b.c", "Bearer " + "x" * 5000):
        response = client.get("/auth/me", headers={"Authorization": header})
        assert response.status_code == 401, header


def test_logout_revokes_access_and_refresh_tokens(client, auth):
    tokens = auth.register("nina")
    response = client.post("/auth/logout", json={"refresh_token": tokens["refresh_token"]},
                           headers=auth.bearer(tokens["access_token"]))
    assert response.status_code == 200 and "message" in response.get_json()
    revoked = me(client, tokens["access_token"])
    assert revoked.status_code == 401 and revoked.get_json()["error"] == "token_revoked"
    assert client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]}).status_code == 401


def test_revocation_is_seen_by_a_second_app_instance_sharing_the_store(make_app):
    first = make_app(store="redis").test_client()
    tokens = first.post("/auth/register", json={"username": "oscar", "password": PASSWORD}).get_json()
    second_app = make_app(store="redis", key_prefix=first.application.extensions["rl"].config.key_prefix)
    second = second_app.test_client()
    assert me(second, tokens["access_token"]).status_code == 200
    first.post("/auth/logout", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert me(second, tokens["access_token"]).status_code == 401


def forget_store_keys(app, pattern: str = "*") -> int:
    """What a Redis restart without persistence, a failover or a FLUSH does to this app's keys
    (only its private prefix: the shared Redis is never flushed)."""
    from tests.services import require_redis

    client = require_redis()
    prefix = app.extensions["rl"].config.key_prefix
    keys = list(client.scan_iter(match=f"{prefix}:{pattern}", count=500))
    if keys:
        client.delete(*keys)
    return len(keys)


@pytest.mark.parametrize("route", ["/auth/me", "/data"])
def test_a_revoked_token_stays_revoked_when_the_store_loses_its_data(make_app, route):
    first = make_app(store="redis")
    second = make_app(store="redis", key_prefix=first.extensions["rl"].config.key_prefix)
    one, other = first.test_client(), second.test_client()
    revoked = one.post("/auth/register", json={"username": "wiped", "password": PASSWORD}).get_json()
    live = one.post("/auth/login", json={"username": "wiped", "password": PASSWORD}).get_json()
    assert one.post("/auth/logout", headers={"Authorization": f"Bearer {revoked['access_token']}"}).status_code == 200
    assert forget_store_keys(first) > 0
    for client in (other, one):
        response = client.get(route, headers={"Authorization": f"Bearer {revoked['access_token']}"})
        assert response.status_code == 401 and response.get_json()["error"] == "token_revoked", client
        assert client.get(route, headers={"Authorization": f"Bearer {live['access_token']}"}).status_code == 200


def test_a_revoked_token_stays_revoked_when_only_its_flag_is_evicted(make_app, clock):
    """Eviction can drop the flag and keep the rest: every process holds its own copy of the
    revocations, re-read from the database at most every REVOCATION_SYNC_SECONDS."""
    first = make_app(store="redis")
    second = make_app(store="redis", key_prefix=first.extensions["rl"].config.key_prefix)
    one, other = first.test_client(), second.test_client()
    tokens = one.post("/auth/register", json={"username": "evicted", "password": PASSWORD}).get_json()
    headers = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert other.get("/data", headers=headers).status_code == 200
    assert one.post("/auth/logout", headers=headers).status_code == 200
    assert forget_store_keys(first, "{f:revoked:*") == 1
    assert one.get("/data", headers=headers).status_code == 401  # the revoking process knows at once
    clock.advance(auth_module.REVOCATION_SYNC_SECONDS)
    assert other.get("/data", headers=headers).status_code == 401


def test_revocations_survive_a_restart_on_the_memory_store(make_app, tmp_path):
    first = make_app()
    client = first.test_client()
    tokens = client.post("/auth/register", json={"username": "pete", "password": PASSWORD}).get_json()
    client.post("/auth/logout", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    restarted = make_app().test_client()  # same database, fresh memory store
    assert me(restarted, tokens["access_token"]).status_code == 401


# --- API keys ---

def test_create_api_key_returns_full_key_once_and_stores_only_hash(client, auth):
    import sqlalchemy as sa

    import database as db

    tokens = auth.register("quinn")
    created = auth.create_key(tokens["access_token"], name="ci key")
    key = created["api_key"]
    assert key.startswith(created["prefix"] + "_") and len(key) >= 11 + 1 + 43
    assert created["tier"] == "free" and created["name"] == "ci key"
    with client.application.extensions["rl"].engine.connect() as conn:
        row = conn.execute(sa.select(db.api_keys)).one()
    assert row.key_hash == auth_module.hash_api_key(key) and key not in json.dumps(dict(row._mapping), default=str)
    listed = me(client, tokens["access_token"]).get_json()["api_keys"]
    assert listed[0]["prefix"] == created["prefix"]
    assert "api_key" not in listed[0] and key not in json.dumps(listed)


def test_create_api_key_requires_a_token(client):
    response = client.post("/auth/create_api_key", json={})
    assert response.status_code == 401 and response.get_json()["error"] == "missing_token"


def test_user_can_revoke_own_key_but_not_anothers(client, auth):
    alice = auth.register("alice2")
    bob = auth.register("bob2")
    key = auth.create_key(alice["access_token"])
    other = client.delete(f"/auth/api_keys/{key['id']}", headers=auth.bearer(bob["access_token"]))
    assert other.status_code == 404
    assert client.get("/data", headers={"X-API-Key": key["api_key"]}).status_code == 200
    own = client.delete(f"/auth/api_keys/{key['id']}", headers=auth.bearer(alice["access_token"]))
    assert own.status_code == 200
    response = client.get("/data", headers={"X-API-Key": key["api_key"]})
    assert response.status_code == 401 and response.get_json()["error"] == "invalid_api_key"


def test_key_count_per_user_is_capped(client, auth):
    import app as app_module

    tokens = auth.register("rita")
    for _ in range(app_module.MAX_KEYS_PER_USER):
        auth.create_key(tokens["access_token"])
    response = client.post("/auth/create_api_key", json={}, headers=auth.bearer(tokens["access_token"]))
    assert response.status_code == 409 and response.get_json()["error"] == "too_many_keys"


def test_a_colliding_key_prefix_draws_a_new_key_instead_of_a_500(client, auth, monkeypatch):
    """32 random bits of prefix collide now and then: the generator is forced to repeat the prefix
    of an existing key twice, and the third draw must be used."""
    real_token_hex = auth_module.secrets.token_hex
    forced = {"left": 1}

    def colliding_token_hex(nbytes: int | None = None) -> str:
        if nbytes == 4 and forced["left"] > 0:
            forced["left"] -= 1
            return "deadbeef"
        return real_token_hex(nbytes)

    monkeypatch.setattr(auth_module.secrets, "token_hex", colliding_token_hex)
    tokens = auth.register("collider")
    first = auth.create_key(tokens["access_token"])
    assert first["prefix"] == "rl_deadbeef"
    forced["left"] = 2
    response = client.post("/auth/create_api_key", json={"name": "second"}, headers=auth.bearer(tokens["access_token"]))
    assert response.status_code == 201, response.get_json()
    second = response.get_json()
    assert second["prefix"] != first["prefix"] and forced["left"] == 0
    assert client.get("/data", headers={"X-API-Key": second["api_key"]}).status_code == 200
    assert client.get("/data", headers={"X-API-Key": first["api_key"]}).status_code == 200


def test_user_cannot_set_own_tier_on_register(client):
    response = client.post("/auth/register", json={"username": "sam", "password": PASSWORD, "tier": "enterprise"})
    assert response.status_code == 201 and response.get_json()["user"]["tier"] == "free"


def test_nul_characters_are_a_400_not_a_500(client, auth):
    assert client.post("/auth/login", json={"username": "a\u0000b", "password": PASSWORD}).status_code == 400
    response = client.post("/auth/register", json={"username": "nul_user", "password": PASSWORD,
                                                    "email": "a\u0000@b.cc"})
    assert response.status_code == 400 and response.get_json()["field"] == "email"
    tokens = auth.register("nul_owner")
    response = client.post("/auth/create_api_key", json={"name": "k\u0000"},
                           headers=auth.bearer(tokens["access_token"]))
    assert response.status_code == 400 and response.get_json()["field"] == "name"


def test_concurrent_refresh_with_one_token_leaves_no_live_family(client, auth):
    import concurrent.futures

    tokens = auth.register("racer")
    app = client.application

    def refresh_once(_: int):
        with app.test_client() as own:
            return own.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(refresh_once, range(8)))
    winners = [r.get_json() for r in responses if r.status_code == 200]
    assert len(winners) <= 1
    assert {r.status_code for r in responses} <= {200, 401}
    if winners:  # the replays revoked the whole family, the winner's new token included
        again = client.post("/auth/refresh", json={"refresh_token": winners[0]["refresh_token"]})
        assert again.status_code == 401


def test_parallel_wrong_passwords_cannot_exceed_the_attempt_limit(make_app):
    import concurrent.futures

    app = make_app(login_failures_per_ip=5)
    client = app.test_client()
    client.post("/auth/register", json={"username": "target", "password": PASSWORD})

    def guess(i: int) -> int:
        with app.test_client() as own:
            return own.post("/auth/login", json={"username": "target", "password": f"guess-{i:04d}"}).status_code

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(guess, range(30)))
    assert statuses.count(401) == 5 and statuses.count(429) == 25
