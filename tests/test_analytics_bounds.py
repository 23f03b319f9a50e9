"""Security review (issue 11, item 7): anonymous /api/analytics cannot be made into a database
load: a capped range, and one shared computation per few seconds whatever range or rate is asked."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import app as app_module
from tests.conftest import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@contextlib.contextmanager
def usage_scans(application) -> Iterator[list[str]]:
    """SELECTs on usage_counters made by this thread while the block runs."""
    engine = application.extensions["rl"].engine
    seen: list[str] = []
    me = threading.get_ident()

    def count(conn, cursor, statement, *args):
        if threading.get_ident() == me and statement.lstrip().upper().startswith("SELECT") \
                and "usage_counters" in statement:
            seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)


def traffic(client, auth, calls: int) -> None:
    _, key = auth.user_with_key()
    for _ in range(calls):
        client.get("/data", headers={"X-API-Key": key["api_key"]})


def test_the_anonymous_range_is_capped_and_admins_keep_a_full_day(client):
    refused = client.get("/api/analytics?minutes=1440")
    assert refused.status_code == 400
    assert refused.get_json()["field"] == "minutes" and "180" in refused.get_json()["message"]
    assert client.get(f"/api/analytics?minutes={app_module.ANALYTICS_PUBLIC_MINUTES}").status_code == 200
    admin = client.get("/api/analytics?minutes=1440", headers=ADMIN)
    assert admin.status_code == 200 and len(admin.get_json()["series"]) == 1440
    assert client.get("/api/analytics?minutes=1441", headers=ADMIN).status_code == 400


def test_anonymous_calls_share_one_scan_per_interval_whatever_the_range(app, client, auth, clock):
    traffic(client, auth, 3)
    with usage_scans(app) as scans:
        first = client.get("/api/analytics?minutes=60").get_json()
        assert len(scans) == 1
        for minutes in (1, 15, 59, 60, 61, 120, 179, 180) * 5:
            assert client.get(f"/api/analytics?minutes={minutes}").status_code == 200
        assert len(scans) == 1
        clock.advance(app_module.ANALYTICS_CACHE_SECONDS)
        client.get("/api/analytics?minutes=60")
        assert len(scans) == 2
    assert first["totals"] == {"allowed": 3, "limited": 0}


def test_cached_figures_are_sliced_exactly_for_each_range(client, auth, clock):
    _, key = auth.user_with_key()
    for _ in range(4):  # one allowed request in each of four consecutive minutes
        client.get("/data", headers={"X-API-Key": key["api_key"]})
        clock.advance(60)
    clock.advance(-60)
    for minutes, allowed in ((1, 1), (2, 2), (3, 3), (4, 4), (180, 4)):
        body = client.get(f"/api/analytics?minutes={minutes}").get_json()
        fresh = client.get(f"/api/analytics?minutes={minutes}", headers=ADMIN).get_json()
        assert body["totals"] == fresh["totals"] == {"allowed": allowed, "limited": 0}, minutes
        assert body["series"] == fresh["series"] and len(body["series"]) == minutes
        assert body["by_tier"] == fresh["by_tier"] == {"free": {"allowed": allowed, "limited": 0}}


def test_admins_always_get_fresh_figures(client, auth):
    assert client.get("/api/analytics").get_json()["totals"]["allowed"] == 0  # fills the anonymous cache
    traffic(client, auth, 2)
    assert client.get("/api/analytics", headers=ADMIN).get_json()["totals"]["allowed"] == 2
    assert client.get("/api/analytics").get_json()["totals"]["allowed"] == 0  # cached for a few seconds


@pytest.mark.parametrize("headers, status", [({"Authorization": "Bearer nope"}, 401), ({}, 400)])
def test_a_bad_token_is_refused_before_the_range_is_read(client, headers, status):
    assert client.get("/api/analytics?minutes=1440", headers=headers).status_code == status
