"""The SQL layer on SQLite and on the real PostgreSQL: migrations, checks, batched writes, CLI."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

import database as db
from tests.services import ROOT, fresh_postgres_database


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'layer.db'}"
        return
    url, drop = fresh_postgres_database()
    yield url
    drop()


@pytest.fixture
def engine(db_url):
    engine = db.make_engine(db_url)
    db.migrate(engine)
    yield engine
    engine.dispose()


def add_user(engine, username="alice", tier="free") -> int:
    now = db.utcnow()
    with engine.begin() as conn:
        return conn.execute(db.users.insert().values(
            username=username, password_hash="x" * 60, tier=tier, is_admin=False, created_at=now, updated_at=now,
        ).returning(db.users.c.id)).scalar_one()


def test_migrate_is_idempotent_and_records_version(engine):
    assert db.migrate(engine) == []
    with engine.connect() as conn:
        assert db.current_version(conn) == db.SCHEMA_VERSION


def test_check_passes_on_a_migrated_database(engine):
    assert db.check(engine) == []


def test_check_reports_a_missing_column(engine):
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE alerts"))
        conn.execute(sa.text("CREATE TABLE alerts (id INTEGER PRIMARY KEY, kind VARCHAR(50))"))
    problems = db.check(engine)
    assert any("alerts.timestamp" in p for p in problems), problems


def test_verify_passes_on_clean_data_and_flags_bad_tier(engine):
    add_user(engine, "alice")
    assert db.verify(engine) == []
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("ALTER TABLE users DROP CONSTRAINT ck_users_tier"))
        else:  # SQLite keeps CHECKs in the table definition: bypass with a writable schema
            conn.execute(sa.text("PRAGMA ignore_check_constraints=ON"))
        conn.execute(db.users.update().values(tier="platinum"))
    assert any("unknown tier" in p for p in db.verify(engine))


def test_tier_check_constraint_rejects_unknown_tier(engine):
    with pytest.raises(sa.exc.IntegrityError):
        add_user(engine, "bob", tier="gold")


def test_add_usage_upserts_counts_per_bucket(engine):
    bucket = dt.datetime(2026, 12, 1, 10, 0)
    row = {"subject": "k:1", "bucket_start": bucket, "key_id": 1, "user_id": 1, "tier": "free",
           "allowed": 3, "limited": 1}
    db.add_usage(engine, [row])
    db.add_usage(engine, [{**row, "allowed": 2, "limited": 4}])
    with engine.connect() as conn:
        stored = conn.execute(sa.select(db.usage_counters)).one()
    assert (stored.allowed, stored.limited) == (5, 5)


def test_purge_removes_only_expired_tokens(engine):
    uid = add_user(engine)
    now = db.utcnow()
    with engine.begin() as conn:
        conn.execute(db.revoked_tokens.insert(), [
            {"jti": "old", "user_id": uid, "expires_at": now - dt.timedelta(hours=1), "revoked_at": now},
            {"jti": "new", "user_id": uid, "expires_at": now + dt.timedelta(hours=1), "revoked_at": now},
        ])
    removed = db.purge_expired(engine)
    assert removed["revoked_tokens"] == 1
    with engine.connect() as conn:
        assert [r.jti for r in conn.execute(sa.select(db.revoked_tokens))] == ["new"]


def test_sql_injection_in_values_is_stored_as_text(engine):
    name = "x'); DROP TABLE users; --"
    add_user(engine, name)
    with engine.connect() as conn:
        assert conn.execute(sa.select(db.users.c.username)).scalar_one() == name


def add_key(engine, user_id: int, prefix: str) -> int:
    with engine.begin() as conn:
        return conn.execute(db.api_keys.insert().values(
            user_id=user_id, prefix=prefix, key_hash=prefix.ljust(64, "0"), name="", blocked=False,
            created_at=db.utcnow(),
        ).returning(db.api_keys.c.id)).scalar_one()


def test_deleted_user_and_key_ids_are_never_handed_out_again(engine):
    keep = add_user(engine, "keeper")
    gone = add_user(engine, "leaver")
    gone_key = add_key(engine, gone, "rl_00000001")
    with engine.begin() as conn:
        conn.execute(db.users.delete().where(db.users.c.id == gone))  # its key goes with it (cascade)
    newcomer = add_user(engine, "newcomer")
    assert newcomer > gone > keep
    assert add_key(engine, newcomer, "rl_00000002") > gone_key


def legacy_sqlite(path: Path) -> sa.Engine:
    """A SQLite database at schema version 1 as it was created before AUTOINCREMENT."""
    engine = db.make_engine(f"sqlite:///{path}")
    scratch = sa.MetaData()
    for table in db.metadata.sorted_tables:
        table.to_metadata(scratch).dialect_options["sqlite"]["autoincrement"] = False
    with engine.begin() as conn:
        scratch.create_all(conn)
        conn.execute(db.schema_migrations.insert().values(version=1, name="initial schema", applied_at=db.utcnow()))
    return engine


def test_migration_2_rebuilds_legacy_sqlite_tables_without_losing_rows_or_reusing_ids(tmp_path):
    engine = legacy_sqlite(tmp_path / "legacy.db")
    first, second, third = (add_user(engine, name) for name in ("ann", "ben", "cat"))
    key = add_key(engine, second, "rl_0000000a")
    doomed_key = add_key(engine, third, "rl_0000000b")
    now = db.utcnow()
    with engine.begin() as conn:
        conn.execute(db.refresh_tokens.insert().values(jti="j1", family_id="f1", user_id=second, issued_at=now,
                                                       expires_at=now + dt.timedelta(days=1)))
        conn.execute(db.usage_counters.insert().values(subject="u:7", bucket_start=now, key_id=None, user_id=7,
                                                       tier="free", allowed=1, limited=0))
        conn.execute(db.users.delete().where(db.users.c.id == third))
        legacy_ddl = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'users'").scalar_one()
    assert "AUTOINCREMENT" not in legacy_ddl.upper()
    assert add_key(engine, second, "rl_0000000c") == doomed_key  # the defect: a deleted id handed out again

    assert db.migrate(engine) == [2, 3]

    with engine.connect() as conn:
        for name in ("users", "api_keys"):
            ddl = conn.exec_driver_sql(f"SELECT sql FROM sqlite_master WHERE name = '{name}'").scalar_one()
            assert "AUTOINCREMENT" in ddl.upper(), ddl
        assert conn.execute(sa.select(db.users.c.id).order_by(db.users.c.id)).scalars().all() == [first, second]
        assert key in conn.execute(sa.select(db.api_keys.c.id)).scalars().all()
        assert conn.execute(sa.select(db.refresh_tokens.c.jti)).scalars().all() == ["j1"]  # nothing cascaded
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
        assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
    assert db.check(engine) == []
    assert add_user(engine, "dan") == 8  # above every id ever seen, the usage counters' included
    engine.dispose()


def test_a_failed_sqlite_migration_leaves_nothing_behind(tmp_path, monkeypatch):
    engine = legacy_sqlite(tmp_path / "legacy.db")
    add_user(engine, "ann")

    def broken(conn) -> None:
        db._migration_2(conn)
        raise RuntimeError("boom")

    monkeypatch.setattr(db, "MIGRATIONS", [db.MIGRATIONS[0], (2, "broken", broken)])
    with pytest.raises(RuntimeError):
        db.migrate(engine)
    with engine.connect() as conn:
        assert db.current_version(conn) == 1
        ddl = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'users'").scalar_one()
        assert "AUTOINCREMENT" not in ddl.upper()
        assert "users__rebuilt" not in sa.inspect(conn).get_table_names()
        assert conn.execute(sa.select(db.users.c.username)).scalars().all() == ["ann"]
    engine.dispose()


def test_setup_postgress_sql_matches_metadata():
    url, drop = fresh_postgres_database()
    try:
        engine = sa.create_engine(url)
        sql = (ROOT / "setup_postgress.sql").read_text()
        raw = engine.raw_connection()
        try:
            with raw.cursor() as cursor:
                cursor.execute(sql)
            raw.commit()
        finally:
            raw.close()
        assert db.check(engine) == []
        with engine.connect() as conn:
            inspector = sa.inspect(conn)
            live_tables = set(inspector.get_table_names())
            checks = {c["name"] for c in inspector.get_check_constraints("users")}
        assert live_tables == {t.name for t in db.metadata.sorted_tables}
        assert "ck_users_tier" in checks
        engine.dispose()
    finally:
        drop()


def _write_usage(url: str, worker: int, count: int, start) -> None:
    engine = db.make_engine(url)
    start.wait(60)  # every process writes at the same moment
    bucket = dt.datetime(2026, 12, 1, 10, 0)
    for i in range(count):
        db.add_usage(engine, [{"subject": f"k:{i % 5}", "bucket_start": bucket, "key_id": i % 5, "user_id": 1,
                               "tier": "free", "allowed": 1, "limited": 0}])
    engine.dispose()


def test_sqlite_takes_4_processes_x_250_concurrent_writes_with_exact_totals(tmp_path):
    url = f"sqlite:///{tmp_path / 'concurrent.db'}"
    engine = db.make_engine(url)
    db.migrate(engine)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_write_usage, args=(url, n, 250, start)) for n in range(4)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.sum(db.usage_counters.c.allowed))).scalar_one()
    assert total == 1000
    engine.dispose()


def test_backup_copies_a_live_sqlite_database(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'live.db'}")
    db.migrate(engine)
    add_user(engine, "carol")
    target = tmp_path / "copy.db"
    db.backup(engine, str(target))
    copy = sqlite3.connect(target)
    assert copy.execute("SELECT username FROM users").fetchall() == [("carol",)]
    copy.close()


def test_backup_refuses_postgres_with_a_clear_message():
    url, drop = fresh_postgres_database()
    try:
        with pytest.raises(db.DatabaseError, match="pg_dump"):
            db.backup(db.make_engine(url), "/tmp/never")
    finally:
        drop()


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "database.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_cli_migrate_check_verify_backup(tmp_path, db_url):
    result = run_cli("--database-url", db_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "schema at version" in result.stdout
    for command in ("check", "verify"):
        result = run_cli("--database-url", db_url, command, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"{command}: ok" in result.stdout
    result = run_cli("--database-url", db_url, "backup", str(tmp_path / "b.db"), cwd=tmp_path)
    if db_url.startswith("sqlite"):
        assert result.returncode == 0 and (tmp_path / "b.db").exists()
    else:
        assert result.returncode == 1 and "pg_dump" in result.stderr


def test_cli_check_on_empty_database_fails_cleanly(tmp_path):
    result = run_cli("--database-url", f"sqlite:///{tmp_path / 'empty.db'}", "check", cwd=tmp_path)
    assert result.returncode == 1
    assert "missing table" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_broken_database_gives_one_line(tmp_path):
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"this is not a sqlite database" * 100)
    result = run_cli("--database-url", f"sqlite:///{broken}", "check", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_cli_unreachable_postgres_gives_one_line(tmp_path):
    result = run_cli("--database-url", "postgresql+psycopg2://postgres@127.0.0.1:1/none", "verify", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.startswith("error:")


def test_cli_unknown_command_exits_non_zero(tmp_path):
    result = run_cli("explode", cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name,value", [("LOG_RETENTION_DAYS", "abc"), ("LOG_RETENTION_DAYS", "0"),
                                        ("IP_RATE_LIMIT", "many")])
def test_cli_bad_setting_gives_one_line_and_non_zero_exit(tmp_path, name, value):
    """The CLI reads the environment through Config, so a bad value is the same one-line error as the API's."""
    env = {"PATH": "/usr/bin:/bin", "DB_PATH": str(tmp_path / "cli.db"), name: value}
    result = subprocess.run([sys.executable, str(ROOT / "database.py"), "purge"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {name} must be") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cli.db").exists()


def test_cli_purge_uses_log_retention_days_from_config(tmp_path):
    url = f"sqlite:///{tmp_path / 'purge.db'}"
    engine = db.make_engine(url)
    db.migrate(engine)
    old = db.utcnow() - dt.timedelta(days=3)
    with engine.begin() as conn:
        conn.execute(db.request_logs.insert().values(timestamp=old, level="INFO", method="GET", path="/x",
                                                     status=200, duration_ms=1.0))
    engine.dispose()
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": url, "LOG_RETENTION_DAYS": "5"}
    kept = subprocess.run([sys.executable, str(ROOT / "database.py"), "purge"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert kept.returncode == 0, kept.stderr
    assert "request_logs: 0 removed" in kept.stdout
    env["LOG_RETENTION_DAYS"] = "2"
    removed = subprocess.run([sys.executable, str(ROOT / "database.py"), "purge"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=60)
    assert removed.returncode == 0, removed.stderr
    assert "request_logs: 1 removed" in removed.stdout


def test_cli_uses_db_path_from_environment(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "DB_PATH": str(tmp_path / "fromenv.db")}
    result = subprocess.run([sys.executable, str(ROOT / "database.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "fromenv.db").exists()


def _migrate_at_once(url: str, start) -> None:
    engine = db.make_engine(url)
    start.wait(60)
    db.migrate(engine)
    engine.dispose()


def migrate_from_four_processes_at_once(url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_migrate_at_once, args=(url, start)) for _ in range(4)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    engine = db.make_engine(url)
    assert db.check(engine) == []
    engine.dispose()


def test_workers_migrating_a_fresh_database_at_once_all_succeed(request, tmp_path):
    migrate_from_four_processes_at_once(f"sqlite:///{tmp_path / 'fresh.db'}")
    url, drop = fresh_postgres_database()
    request.addfinalizer(drop)
    migrate_from_four_processes_at_once(url)
