"""API key expiry: set at creation, refused from the exact second on (injected clock), shown to the owner."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

import database as db
from tests.services import fresh_postgres_database


def iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def create(client, auth, token, **body):
    return client.post("/auth/create_api_key", json={"name": "k", **body}, headers=auth.bearer(token))


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_key_expires_at_the_exact_second(make_app, auth, clock, store):
    client = make_app(store=store).test_client()
    auth = auth.on(client)
    user = auth.register()
    expires = clock.now + 100
    response = create(client, auth, user["access_token"], expires_at=iso(expires))
    assert response.status_code == 201 and response.get_json()["expires_at"] == iso(expires)
    key = response.get_json()["api_key"]
    clock.advance(99.999)
    assert client.get("/data", headers={"X-API-Key": key}).status_code == 200
    clock.advance(0.001)
    refused = client.get("/data", headers={"X-API-Key": key})
    assert refused.status_code == 401
    assert refused.get_json()["error"] == "api_key_expired" and refused.get_json()["expired_at"] == iso(expires)
    assert client.get("/usage", headers={"X-API-Key": key}).get_json()["error"] == "api_key_expired"


def test_an_offset_timestamp_is_read_as_utc(client, auth, clock):
    user = auth.register()
    local = dt.datetime.fromtimestamp(clock.now + 3600, dt.timezone(dt.timedelta(hours=2))).isoformat()
    response = create(client, auth, user["access_token"], expires_at=local)
    assert response.get_json()["expires_at"] == iso(clock.now + 3600)


@pytest.mark.parametrize("value", ["yesterday", "2020-01-01T00:00:00Z", 12, "9999-12-31T23:59:59-12:00", ""])
def test_a_past_or_malformed_expiry_is_400(client, auth, value):
    user = auth.register()
    response = create(client, auth, user["access_token"], expires_at=value)
    assert response.status_code == 400 and response.get_json()["field"] == "expires_at"


def test_now_is_already_too_late(client, auth, clock):
    user = auth.register()
    assert create(client, auth, user["access_token"], expires_at=iso(clock.now)).status_code == 400


def test_usage_and_me_show_the_expiry(client, auth, clock):
    user = auth.register()
    key = create(client, auth, user["access_token"], expires_at=iso(clock.now + 7200)).get_json()
    usage = client.get("/usage", headers={"X-API-Key": key["api_key"]}).get_json()
    assert usage["expires_at"] == iso(clock.now + 7200)
    me = client.get("/auth/me", headers=auth.bearer(user["access_token"])).get_json()
    assert me["api_keys"][0]["expires_at"] == iso(clock.now + 7200)
    plain = auth.create_key(user["access_token"])
    assert client.get("/usage", headers={"X-API-Key": plain["api_key"]}).get_json()["expires_at"] is None


def _downgrade_to_version_2(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE rate_overrides"))
        for column in ("expires_at", "credits", "credit_refill_amount", "credit_refill_every"):
            conn.execute(sa.text(f"ALTER TABLE api_keys DROP COLUMN {column}"))
        conn.execute(db.schema_migrations.delete().where(db.schema_migrations.c.version > 2))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_version_2_database_migrates_to_version_3(tmp_path, backend):
    drop = None
    url = f"sqlite:///{tmp_path / 'v1.db'}"
    if backend == "postgres":
        url, drop = fresh_postgres_database()
    try:
        engine = db.make_engine(url)
        db.migrate(engine)
        _downgrade_to_version_2(engine)
        assert db.check(engine) != []
        assert db.migrate(engine) == [3]
        assert db.check(engine) == []
        engine.dispose()
    finally:
        if drop:
            drop()
