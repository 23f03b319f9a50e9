"""Security review (issue 11, items 4-6): request logs that one bad request cannot erase, the
per-IP check ahead of routing errors, bounded and pruned request logs, IPv6 subjects by prefix."""

from __future__ import annotations

import datetime as dt
import os
import time

import pytest
import sqlalchemy as sa

import database as db
from log_manager import BatchWriter
from tests.conftest import ADMIN_TOKEN, PASSWORD
from tests.services import wait_until

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BACKENDS = ["sqlite", "postgres"]


def logs(client, limit: int = 100) -> list[dict]:
    response = client.get(f"/logs?limit={limit}", headers=ADMIN, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert response.status_code == 200, response.get_json()
    return [entry for entry in response.get_json()["logs"] if entry["path"] != "/logs"]


def log_rows(app) -> list[dict]:
    svc = app.extensions["rl"]
    svc.log_writer.flush_now()
    with svc.engine.connect() as conn:
        return db.rows_as_dicts(conn.execute(sa.select(db.request_logs).order_by(db.request_logs.c.id)))


# --- item 4: one bad request must not erase other clients' request logs ----------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_request_does_not_erase_other_clients_logs(make_app, backend):
    app = make_app(backend=backend, trusted_proxies=1)
    client = app.test_client()
    assert client.get("/", headers={"X-Forwarded-For": "198.51.100.1"}).status_code == 200
    long_method = client.open("/", method="PROPFINDPROPFIND", headers={"X-Forwarded-For": "198.51.100.66"})
    nul_path = client.get("/nul%00here", headers={"X-Forwarded-For": "198.51.100.66"})
    odd_ip = client.get("/", headers={"X-Forwarded-For": "x" * 300})
    assert client.get("/", headers={"X-Forwarded-For": "198.51.100.2"}).status_code == 200
    assert (long_method.status_code, nul_path.status_code, odd_ip.status_code) == (405, 404, 200)

    entries = list(reversed(logs(client)))
    assert [(e["method"], e["path"], e["ip"]) for e in entries] == [
        ("GET", "/", "198.51.100.1"),
        ("PROPFINDPR", "/", "198.51.100.66"),  # cut to the column's 10 characters
        ("GET", "/nulhere", "198.51.100.66"),  # NUL removed
        ("GET", "/", "x" * 64),
        ("GET", "/", "198.51.100.2"),
    ]
    assert app.extensions["rl"].log_writer.stats()["failed"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_the_database_refuses_is_dropped_alone_and_counted(make_app, backend, caplog):
    app = make_app(backend=backend)
    engine = app.extensions["rl"].engine
    writer = BatchWriter(lambda rows: db.add_request_logs(engine, rows), interval=60, name="test-log-writer",
                         transient=db.is_transient_error)
    base = {"timestamp": db.utcnow(), "level": "INFO", "method": "GET", "status": 200, "ip": "192.0.2.1",
            "duration_ms": 1.0, "message": ""}
    try:
        for path in ("/first", "/refused", "/third"):
            writer.put({**base, "path": path, "status": None if path == "/refused" else 200})
        assert writer.flush_now() == 2
        stats = writer.stats()
    finally:
        writer.close()
    assert (stats["flushed"], stats["rejected"], stats["failed"], stats["queued"]) == (2, 1, 0, 0)
    with engine.connect() as conn:
        paths = conn.execute(sa.select(db.request_logs.c.path).order_by(db.request_logs.c.id)).scalars().all()
    assert paths == ["/first", "/third"]
    assert any("dropped 1 item(s)" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lone_surrogates_and_nul_are_cleaned_before_the_insert(make_app, backend):
    app = make_app(backend=backend)
    engine = app.extensions["rl"].engine
    db.add_request_logs(engine, [{"timestamp": db.utcnow(), "level": "INFO", "method": "G\x00ET", "status": 200,
                                  "path": "/a\ud800b\x00c", "ip": "\x00192.0.2.1", "duration_ms": 1.0,
                                  "message": "m" * 900}])
    with engine.connect() as conn:
        row = conn.execute(sa.select(db.request_logs)).one()
    assert (row.method, row.path, row.ip, len(row.message)) == ("GET", "/a?bc", "192.0.2.1", 500)


def test_a_database_outage_keeps_the_batch_for_a_retry():
    """Isolation must not turn an outage into dropped rows: a transient error keeps the batch."""
    calls: list[int] = []

    def flush(rows: list) -> None:
        calls.append(len(rows))
        if len(calls) <= 2:
            raise sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection"))

    writer = BatchWriter(flush, interval=60, max_retries=3, transient=db.is_transient_error)
    try:
        for i in range(3):
            writer.put(i)
        assert writer.flush_now() == 0 and writer.stats()["queued"] == 3
        assert writer.flush_now() == 0
        assert writer.flush_now() == 3
        assert writer.stats()["rejected"] == 0 and writer.stats()["failed"] == 0
    finally:
        writer.close()
    assert calls == [3, 3, 3]


# --- item 5: a banned IP is refused everywhere, before routing errors -------------------------

def banned_client(make_app, **config):
    app = make_app(ip_rate_limit=3, temp_ban_seconds=300, max_content_length=2048, **config)
    client = app.test_client()
    for _ in range(4):
        client.get("/", environ_base=ATTACKER)
    assert client.get("/", environ_base=ATTACKER).get_json()["error"] == "ip_banned"
    return app, client


ATTACKER = {"REMOTE_ADDR": "192.0.2.66"}
BIG_BODY = '{"api_key": "' + "x" * 4096 + '"}'


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/no/such/path", None),
    ("DELETE", "/data", None),
    ("PATCH", "/auth/login", None),
    ("OPTIONS", "/data", None),
    ("OPTIONS", "/", None),
    ("OPTIONS", "/no/such/path", None),
    ("POST", "/sdk/track", BIG_BODY),
    ("POST", "/sdk/check", BIG_BODY),
    ("POST", "/auth/register", BIG_BODY),
    ("HEAD", "/data", None),
])
def test_a_banned_ip_gets_ip_banned_before_404_405_413_and_options(make_app, method, path, body):
    _, client = banned_client(make_app)
    response = client.open(path, method=method, data=body, content_type="application/json",
                           environ_base=ATTACKER, headers={"Origin": "https://example.org"})
    assert response.status_code == 429, (method, path, response.status_code)
    if method != "HEAD":
        assert response.get_json()["error"] == "ip_banned"
    assert int(response.headers["Retry-After"]) >= 1


def test_static_files_and_health_stay_open_to_a_banned_ip(make_app):
    _, client = banned_client(make_app)
    for path in ("/health", "/static/dashboard.css", "/sdk.js"):
        response = client.get(path, environ_base=ATTACKER)
        assert response.status_code == 200, path
        response.close()


@pytest.mark.parametrize("method, path", [("GET", "/no/such/path"), ("DELETE", "/data"), ("OPTIONS", "/data"),
                                          ("OPTIONS", "/")])
def test_routing_errors_and_options_count_against_the_ip_limit(make_app, method, path):
    client = make_app(ip_rate_limit=3).test_client()
    statuses = [client.open(path, method=method).status_code for _ in range(3)]
    assert 429 not in statuses
    refused = client.get("/")
    assert refused.status_code == 429 and refused.get_json()["error"] == "ip_banned"


def test_an_oversized_body_counts_against_the_ip_limit(make_app):
    client = make_app(ip_rate_limit=3, max_content_length=2048).test_client()
    statuses = [client.post("/sdk/track", data=BIG_BODY, content_type="application/json").status_code
                for _ in range(3)]
    assert statuses == [413] * 3
    assert client.get("/").status_code == 429


def test_a_banned_flood_writes_one_request_log_row_per_minute(make_app, clock):
    app, client = banned_client(make_app)
    before = [r for r in log_rows(app) if r["message"].startswith("ip_banned")]
    assert len(before) == 1  # the first refusal of the ban
    for path in ("/", "/nope", "/data") * 30:
        assert client.get(path, environ_base=ATTACKER).status_code == 429
    refused = [r for r in log_rows(app) if r["message"].startswith("ip_banned")]
    assert refused == before
    assert app.extensions["rl"].metrics.snapshot()["ip_refused_total"] == 92
    clock.advance(61)
    assert client.get("/data", environ_base=ATTACKER).status_code == 429
    refused = [r for r in log_rows(app) if r["message"].startswith("ip_banned")]
    assert len(refused) == 2
    assert refused[-1]["message"] == "ip_banned; 91 more refusals of this client not logged"
    assert refused[-1]["ip"] == "192.0.2.66" and refused[-1]["path"] == "/data"


def test_log_retention_runs_by_itself_on_the_apps_clock(make_app, clock, tmp_path):
    import wiring

    app = make_app(log_retention_days=14)
    svc = app.extensions["rl"]
    wait_until(lambda: svc.housekeeping_due > 0)  # the start-up pass
    assert svc.housekeeping_due == pytest.approx(clock.now + wiring.HOUSEKEEPING_SECONDS)
    log_dir = tmp_path / "logs"
    old, recent = log_dir / "requests.log.3", log_dir / "requests.log.1"
    for path, age_days in ((old, 15), (recent, 1)):
        path.write_text("{}\n")
        stamp = time.time() - age_days * 86400
        os.utime(path, (stamp, stamp))
    now = db.utcnow()
    row = {"level": "INFO", "method": "GET", "path": "/", "status": 200, "ip": "192.0.2.1", "duration_ms": 1.0,
           "message": ""}
    db.add_request_logs(svc.engine, [{**row, "timestamp": now - dt.timedelta(days=15), "path": "/old"},
                                     {**row, "timestamp": now - dt.timedelta(days=1), "path": "/recent"}])

    def logged_paths() -> list[str]:
        with svc.engine.connect() as conn:
            return list(conn.execute(sa.select(db.request_logs.c.path)).scalars().all())

    clock.advance(wiring.HOUSEKEEPING_SECONDS + 1)
    # The pass removes files first, then rows: wait for both rather than the first one seen.
    wait_until(lambda: not old.exists() and "/old" not in logged_paths())
    assert recent.exists() and (log_dir / "requests.log").exists()
    assert "/recent" in logged_paths()
    assert svc.housekeeping_due == pytest.approx(clock.now + wiring.HOUSEKEEPING_SECONDS)


# --- item 6: IPv6 clients are one subject per prefix -------------------------------------------

def v6(address: str) -> dict[str, str]:
    return {"REMOTE_ADDR": address}


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_ipv6_addresses_of_one_64_share_the_ip_limit_and_the_ban(make_app, store):
    client = make_app(store=store, ip_rate_limit=3).test_client()
    statuses = [client.get("/", environ_base=v6(f"2001:db8:1:2::{i:x}")).status_code for i in range(1, 5)]
    assert statuses == [200, 200, 200, 429]
    other_host = client.get("/", environ_base=v6("2001:db8:1:2:ffff:ffff:ffff:fffe"))
    assert other_host.status_code == 429 and other_host.get_json()["error"] == "ip_banned"
    assert client.get("/", environ_base=v6("2001:db8:1:3::1")).status_code == 200  # the next /64
    bans = client.get("/admin/bans", headers=ADMIN, environ_base=v6("::1")).get_json()["bans"]
    assert [b["ip"] for b in bans] == ["2001:db8:1:2::/64"]


@pytest.mark.parametrize("prefix, same", [(128, False), (56, True)])
def test_the_ipv6_prefix_length_is_configurable(make_app, prefix, same):
    client = make_app(ip_rate_limit=2, ipv6_prefix_length=prefix).test_client()
    client.get("/", environ_base=v6("2001:db8:1:200::1"))
    client.get("/", environ_base=v6("2001:db8:1:200::2"))
    third = client.get("/", environ_base=v6("2001:db8:1:2ff::3")).status_code  # same /56, another /64
    assert third == (429 if same else 200)


def test_forwarded_ipv6_and_ipv4_mapped_addresses_are_normalized(make_app):
    client = make_app(ip_rate_limit=3, trusted_proxies=1).test_client()
    for forwarded in ("2001:db8:9:9::a", "2001:DB8:9:9:0:0:0:b", "10.1.2.3, 2001:db8:9:9::c"):
        assert client.get("/", headers={"X-Forwarded-For": forwarded}).status_code == 200
    assert client.get("/", headers={"X-Forwarded-For": "2001:db8:9:9::d"}).status_code == 429
    for _ in range(3):
        assert client.get("/", headers={"X-Forwarded-For": "::ffff:192.0.2.9"}).status_code == 200
    assert client.get("/", headers={"X-Forwarded-For": "192.0.2.9"}).status_code == 429


def test_sign_in_and_registration_throttles_count_an_ipv6_64_as_one_client(make_app):
    client = make_app(login_failures_per_ip=2, register_per_ip_per_hour=2).test_client()
    logins = [client.post("/auth/login", json={"username": "nobody", "password": PASSWORD},
                          environ_base=v6(f"2001:db8:7:7::{i}")).status_code for i in range(1, 4)]
    assert logins == [401, 401, 429]
    registrations = [client.post("/auth/register", json={"username": f"farm{i}", "password": PASSWORD},
                                 environ_base=v6(f"2001:db8:8:8::{i}")).status_code for i in range(1, 4)]
    assert registrations == [201, 201, 429]
    assert client.post("/auth/register", json={"username": "elsewhere", "password": PASSWORD},
                       environ_base=v6("2001:db8:8:9::1")).status_code == 201


def test_an_admin_ban_of_an_ipv6_address_bans_its_prefix_and_the_listed_form_lifts_it(make_app):
    client = make_app().test_client()
    banned = client.post("/admin/ban_ip", json={"ip": "2001:db8:5:6::1", "seconds": 600}, headers=ADMIN)
    assert banned.status_code == 200 and banned.get_json()["ban"]["ip"] == "2001:db8:5:6::/64"
    neighbour = client.get("/", environ_base=v6("2001:db8:5:6:abcd::9"))
    assert neighbour.status_code == 429 and neighbour.get_json()["error"] == "ip_banned"
    assert client.get("/", environ_base=v6("2001:db8:5:7::1")).status_code == 200
    listed = client.get("/admin/bans", headers=ADMIN).get_json()["bans"][0]["ip"]
    assert client.post("/admin/unban_ip", json={"ip": listed}, headers=ADMIN).status_code == 200
    assert client.get("/", environ_base=v6("2001:db8:5:6:abcd::9")).status_code == 200
    too_wide = client.post("/admin/ban_ip", json={"ip": "2001:db8::/32"}, headers=ADMIN)
    assert too_wide.status_code == 400 and too_wide.get_json()["field"] == "ip"
