"""Database schema, versioned migrations, data access helpers and the ``python database.py`` CLI.

SQLAlchemy Core (no ORM): every statement is built from the tables below, so values are
always bound parameters. SQLite is the default (WAL, busy timeout); PostgreSQL is used when
``DATABASE_URL`` says so (pooled, pre-pinged, and disposed after a fork).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from config import DEFAULT_TIER, TIER_ORDER, Config, ConfigError
from log_manager import clean_text

log = logging.getLogger(__name__)

metadata = sa.MetaData()

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("username", sa.String(64), nullable=False, unique=True),
    sa.Column("email", sa.String(254)),
    sa.Column("password_hash", sa.String(128), nullable=False),
    sa.Column("tier", sa.String(16), nullable=False, server_default=DEFAULT_TIER),
    sa.Column("is_admin", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.CheckConstraint("tier IN ('free', 'basic', 'premium', 'enterprise')", name="ck_users_tier"),
    # Ids are never reused (SQLite would hand out the highest deleted id again without AUTOINCREMENT;
    # PostgreSQL's sequences never do): a deleted user's id must not name someone else later.
    sqlite_autoincrement=True,
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("prefix", sa.String(32), nullable=False, unique=True),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("name", sa.String(100), nullable=False, server_default=""),
    sa.Column("blocked", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("blocked_reason", sa.String(500)),
    sa.Column("revoked_at", sa.DateTime),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("last_used_at", sa.DateTime),
    # Migration 3: key expiry and admin-set credits (the remaining balance lives in the limiter store).
    sa.Column("expires_at", sa.DateTime),
    sa.Column("credits", sa.Integer),
    sa.Column("credit_refill_amount", sa.Integer),
    sa.Column("credit_refill_every", sa.String(8)),
    sqlite_autoincrement=True,
)

refresh_tokens = sa.Table(
    "refresh_tokens",
    metadata,
    sa.Column("jti", sa.String(64), primary_key=True),
    sa.Column("family_id", sa.String(64), nullable=False, index=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("issued_at", sa.DateTime, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False),
    sa.Column("used_at", sa.DateTime),
    sa.Column("revoked_at", sa.DateTime),
)

revoked_tokens = sa.Table(
    "revoked_tokens",
    metadata,
    sa.Column("jti", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.Integer),
    sa.Column("expires_at", sa.DateTime, nullable=False, index=True),
    sa.Column("revoked_at", sa.DateTime, nullable=False),
)

usage_counters = sa.Table(
    "usage_counters",
    metadata,
    sa.Column("subject", sa.String(64), primary_key=True),
    sa.Column("bucket_start", sa.DateTime, primary_key=True),
    sa.Column("key_id", sa.Integer, index=True),
    sa.Column("user_id", sa.Integer, index=True),
    sa.Column("tier", sa.String(16), nullable=False),
    sa.Column("allowed", sa.Integer, nullable=False, server_default="0"),
    sa.Column("limited", sa.Integer, nullable=False, server_default="0"),
)
sa.Index("ix_usage_counters_bucket_start", usage_counters.c.bucket_start)

request_logs = sa.Table(
    "request_logs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("timestamp", sa.DateTime, nullable=False, index=True),
    sa.Column("level", sa.String(10), nullable=False),
    sa.Column("method", sa.String(10), nullable=False),
    sa.Column("path", sa.String(500), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("ip", sa.String(64)),
    sa.Column("key_prefix", sa.String(32)),
    sa.Column("user_id", sa.Integer),
    sa.Column("duration_ms", sa.Float, nullable=False),
    sa.Column("message", sa.String(500), nullable=False, server_default=""),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("timestamp", sa.DateTime, nullable=False, index=True),
    sa.Column("actor", sa.String(100), nullable=False),
    sa.Column("action", sa.String(50), nullable=False),
    sa.Column("target", sa.String(200), nullable=False),
    sa.Column("details", sa.Text, nullable=False, server_default="{}"),
)

ip_bans = sa.Table(
    "ip_bans",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("ip", sa.String(64), nullable=False, index=True),
    sa.Column("banned_at", sa.DateTime, nullable=False),
    sa.Column("expires_at", sa.DateTime, nullable=False),
    sa.Column("ban_count", sa.Integer, nullable=False, server_default="1"),
    sa.Column("reason", sa.String(200), nullable=False, server_default=""),
    sa.Column("lifted_at", sa.DateTime),
)

alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("timestamp", sa.DateTime, nullable=False, index=True),
    sa.Column("kind", sa.String(50), nullable=False),
    sa.Column("source", sa.String(200), nullable=False),
    sa.Column("severity", sa.String(10), nullable=False, server_default="warning"),
    sa.Column("details", sa.Text, nullable=False, server_default="{}"),
)

# Runtime limit overrides (admin): for one key, or for a user (their JWT calls and every key of theirs).
rate_overrides = sa.Table(
    "rate_overrides",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key_id", sa.Integer, sa.ForeignKey("api_keys.id", ondelete="CASCADE"), index=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), index=True),
    sa.Column("limits", sa.Text, nullable=False),
    sa.Column("reason", sa.String(500), nullable=False, server_default=""),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("created_by", sa.String(100), nullable=False),
    sa.Column("expires_at", sa.DateTime),
)

schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("applied_at", sa.DateTime, nullable=False),
)

class DatabaseError(Exception):
    """The database is unreachable, broken, or not at the schema this code expects."""


def utcnow() -> dt.datetime:
    """Naive UTC now: every DateTime column stores UTC without tzinfo."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def iso(value: dt.datetime | None) -> str | None:
    """ISO 8601 UTC with a trailing Z, as the API contract wants."""
    if value is None:
        return None
    return value.replace(microsecond=0).isoformat() + "Z"


def epoch(value: dt.datetime | None) -> float | None:
    """A stored naive-UTC datetime as epoch seconds (how the limiter's clock counts)."""
    return None if value is None else value.replace(tzinfo=dt.UTC).timestamp()


def from_epoch(value: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(value, dt.UTC).replace(tzinfo=None)


# --- migrations -------------------------------------------------------------------------

def _migration_1(conn: Connection) -> None:
    """Initial schema: every table in ``metadata``."""
    metadata.create_all(conn, tables=[t for t in metadata.sorted_tables if t is not schema_migrations])


# Where else an id of these tables was written: the sequence restarts above all of them, so an id
# deleted before AUTOINCREMENT existed is not handed out again either.
_ID_REFERENCES = {
    "users": [(usage_counters, "user_id"), (revoked_tokens, "user_id")],
    "api_keys": [(usage_counters, "key_id")],
}


def _migration_2(conn: Connection) -> None:
    """SQLite: rebuild ``users`` and ``api_keys`` with AUTOINCREMENT so deleted ids are never reused
    (the documented create-copy-drop-rename procedure; _migrate turns foreign keys off around it, so
    dropping the old table cascades nothing). PostgreSQL: nothing to do, sequences never go back."""
    if conn.dialect.name != "sqlite":
        return
    for table in (users, api_keys):
        ddl = conn.execute(sa.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :name"),
                           {"name": table.name}).scalar_one()
        if "AUTOINCREMENT" in ddl.upper():
            continue  # created by migration 1 from the current metadata
        scratch = sa.MetaData()
        for other in metadata.sorted_tables:  # so that the copy's foreign keys resolve
            other.to_metadata(scratch)
        rebuilt = table.to_metadata(scratch, name=f"{table.name}__rebuilt")
        conn.execute(sa.schema.CreateTable(rebuilt))
        # Only the columns the live table has: later migrations add theirs (the rebuilt table has them already).
        live = {column["name"] for column in sa.inspect(conn).get_columns(table.name)}
        copied = [column for column in table.columns if column.name in live]
        conn.execute(rebuilt.insert().from_select([column.name for column in copied], sa.select(*copied)))
        conn.exec_driver_sql(f'DROP TABLE "{table.name}"')
        conn.exec_driver_sql(f'ALTER TABLE "{rebuilt.name}" RENAME TO "{table.name}"')
        for index in table.indexes:
            index.create(conn)
        highest = [conn.execute(sa.select(sa.func.max(table.c.id))).scalar()]
        highest += [conn.execute(sa.select(sa.func.max(other.c[column]))).scalar()
                    for other, column in _ID_REFERENCES[table.name]]
        conn.execute(sa.text("DELETE FROM sqlite_sequence WHERE name IN (:name, :scratch)"),
                     {"name": table.name, "scratch": rebuilt.name})
        conn.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:name, :seq)"),
                     {"name": table.name, "seq": max([n for n in highest if n is not None], default=0)})


def _migration_3(conn: Connection) -> None:
    """Key expiry, credits and overrides. A database created by migration 1 (or rebuilt by migration 2)
    from this code's metadata already has them, hence the checks."""
    have = {column["name"] for column in sa.inspect(conn).get_columns("api_keys")}
    for column in (api_keys.c.expires_at, api_keys.c.credits, api_keys.c.credit_refill_amount,
                   api_keys.c.credit_refill_every):
        if column.name not in have:
            conn.execute(sa.text(f"ALTER TABLE api_keys ADD COLUMN {column.name} {column.type.compile(conn.dialect)}"))
    rate_overrides.create(conn, checkfirst=True)


MIGRATIONS: list[tuple[int, str, Any]] = [
    (1, "initial schema", _migration_1),
    (2, "ids never reused (SQLite AUTOINCREMENT)", _migration_2),
    (3, "key expiry, credits, rate overrides", _migration_3),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def current_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table("schema_migrations"):
        return 0
    return conn.execute(sa.select(sa.func.coalesce(sa.func.max(schema_migrations.c.version), 0))).scalar_one()


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Serialise migrations across processes (gunicorn workers start together): a file lock beside
    a SQLite file, a session advisory lock on PostgreSQL, held from before the first CREATE."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(727274)"))
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(727274)"))
                conn.commit()
        return
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    with open(f"{os.path.abspath(path)}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def migrate(engine: Engine) -> list[int]:
    """Apply pending migrations in order, each in its own transaction; return the versions applied."""
    with _migration_lock(engine):
        return _migrate(engine)


def _migrate(engine: Engine) -> list[int]:
    applied: list[int] = []
    with engine.begin() as conn:
        schema_migrations.create(conn, checkfirst=True)
    for version, name, step in MIGRATIONS:
        with _migration_transaction(engine) as conn:
            if current_version(conn) >= version:
                continue
            step(conn)
            conn.execute(schema_migrations.insert().values(version=version, name=name, applied_at=utcnow()))
            applied.append(version)
            log.info("applied migration %s (%s)", version, name)
    return applied


@contextlib.contextmanager
def _migration_transaction(engine: Engine) -> Iterator[Connection]:
    """One migration, all or nothing. On SQLite the driver would commit DDL as it goes and
    enforce foreign keys while a table is rebuilt (dropping a parent cascades into its children):
    so foreign keys are off, the transaction is begun explicitly, and checked before it commits."""
    if engine.dialect.name != "sqlite":
        with engine.begin() as conn:
            yield conn
        return
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction: before BEGIN
        conn.commit()
        try:
            with conn.begin():
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                yield conn
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                if broken:
                    raise DatabaseError(f"migration left {len(broken)} row(s) with a broken foreign key")
        finally:
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()


# --- engine -------------------------------------------------------------------------------

def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    """Create an engine for ``url`` with the settings each backend needs under several workers."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise DatabaseError(f"DATABASE_URL is not a valid SQLAlchemy URL: {url!r}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = os.path.dirname(os.path.abspath(parsed.database))
            if not os.path.isdir(folder):
                raise DatabaseError(f"directory for DB_PATH does not exist: {folder}")
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    try:
        return sa.create_engine(
            url,
            pool_size=5,
            max_overflow=10,
            pool_pre_ping=True,
            pool_recycle=1800,
            connect_args={"connect_timeout": 5} if parsed.get_backend_name() == "postgresql" else {},
        )
    except (ImportError, sa.exc.NoSuchModuleError):
        raise DatabaseError(
            f"DATABASE_URL names a database driver this service cannot load: {parsed.drivername!r}"
        ) from None


def open_database(url: str) -> Engine:
    """Engine for ``url`` with migrations applied; any failure becomes a one-line DatabaseError."""
    engine = make_engine(url)
    try:
        migrate(engine)
    except sa.exc.SQLAlchemyError as exc:
        engine.dispose()
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise DatabaseError(f"cannot open the database at {_describe(url)}: {first[0] if first else exc}") from None
    # A forked child (gunicorn --preload) must not reuse the parent's pooled sockets.
    os.register_at_fork(after_in_child=lambda: engine.dispose(close=False))
    return engine




# --- checks ----------------------------------------------------------------------------

def _type_family(column_type: Any) -> str:
    name = type(column_type).__name__.upper()
    for family, words in (
        ("int", ("INT", "SERIAL")),
        ("bool", ("BOOL",)),
        ("float", ("FLOAT", "REAL", "DOUBLE", "NUMERIC")),
        ("datetime", ("DATETIME", "TIMESTAMP")),
        ("text", ("CHAR", "TEXT", "STRING", "CLOB")),
    ):
        if any(word in name for word in words):
            return family
    return name.lower()


def schema_differences(conn: Connection) -> list[str]:
    """Compare the live schema with ``metadata``: missing tables, columns, type families, indexes."""
    inspector = sa.inspect(conn)
    problems: list[str] = []
    for table in metadata.sorted_tables:
        if not inspector.has_table(table.name):
            problems.append(f"missing table {table.name}")
            continue
        live = {col["name"]: col for col in inspector.get_columns(table.name)}
        for column in table.columns:
            found = live.get(column.name)
            if found is None:
                problems.append(f"missing column {table.name}.{column.name}")
                continue
            want, got = _type_family(column.type), _type_family(found["type"])
            if want != got and not (want == "bool" and got == "int"):
                problems.append(f"column {table.name}.{column.name} is {got}, expected {want}")
            if bool(found["nullable"]) != bool(column.nullable) and not column.primary_key:
                problems.append(f"column {table.name}.{column.name} nullable={found['nullable']}")
        live_indexes = {tuple(ix["column_names"]) for ix in inspector.get_indexes(table.name)}
        live_indexes |= {tuple(uc["column_names"]) for uc in inspector.get_unique_constraints(table.name)}
        for index in table.indexes:
            cols = tuple(c.name for c in index.columns)
            if cols not in live_indexes:
                problems.append(f"missing index on {table.name}({', '.join(cols)})")
        for column in table.columns:
            if column.unique and (column.name,) not in live_indexes:
                problems.append(f"missing unique constraint on {table.name}.{column.name}")
    return problems


def check(engine: Engine) -> list[str]:
    """Schema is at the latest migration and matches the code; returns problems (empty = ok)."""
    with engine.connect() as conn:
        version = current_version(conn)
        problems = [] if version == SCHEMA_VERSION else [f"schema version {version}, code expects {SCHEMA_VERSION}"]
        problems += schema_differences(conn)
    return problems


def verify(engine: Engine) -> list[str]:
    """Integrity checks on the data: orphans, bad tiers, duplicate or malformed key records."""
    problems: list[str] = []
    with engine.connect() as conn:
        orphan_keys = conn.execute(
            sa.select(sa.func.count()).select_from(api_keys.outerjoin(users, api_keys.c.user_id == users.c.id))
            .where(users.c.id.is_(None))
        ).scalar_one()
        if orphan_keys:
            problems.append(f"{orphan_keys} API key(s) belong to no user")
        bad_tiers = conn.execute(
            sa.select(sa.func.count()).select_from(users).where(users.c.tier.not_in(TIER_ORDER))
        ).scalar_one()
        if bad_tiers:
            problems.append(f"{bad_tiers} user(s) have an unknown tier")
        bad_hashes = conn.execute(
            sa.select(sa.func.count()).select_from(api_keys).where(sa.func.length(api_keys.c.key_hash) != 64)
        ).scalar_one()
        if bad_hashes:
            problems.append(f"{bad_hashes} API key(s) have a malformed hash")
        orphan_tokens = conn.execute(
            sa.select(sa.func.count())
            .select_from(refresh_tokens.outerjoin(users, refresh_tokens.c.user_id == users.c.id))
            .where(users.c.id.is_(None))
        ).scalar_one()
        if orphan_tokens:
            problems.append(f"{orphan_tokens} refresh token(s) belong to no user")
        negative = conn.execute(
            sa.select(sa.func.count()).select_from(usage_counters)
            .where(sa.or_(usage_counters.c.allowed < 0, usage_counters.c.limited < 0))
        ).scalar_one()
        if negative:
            problems.append(f"{negative} usage counter row(s) are negative")
    return problems


def backup(engine: Engine, target: str) -> str:
    """Online backup of a SQLite database to ``target`` (consistent while the app runs)."""
    if engine.dialect.name != "sqlite":
        raise DatabaseError(
            "backup works on SQLite only; for PostgreSQL use pg_dump, e.g. pg_dump -Fc DBNAME > backup.dump"
        )
    source_path = engine.url.database
    if not source_path or source_path == ":memory:":
        raise DatabaseError("an in-memory SQLite database cannot be backed up")
    if os.path.abspath(target) == os.path.abspath(source_path):
        raise DatabaseError("backup target is the database itself")
    source = sqlite3.connect(source_path)
    try:
        dest = sqlite3.connect(target)
        try:
            source.backup(dest)
        finally:
            dest.close()
    finally:
        source.close()
    return target


def purge_expired(engine: Engine, *, log_retention_days: int = 14) -> dict[str, int]:
    """Delete spent tokens and request logs past retention; return rows removed per table."""
    now = utcnow()
    removed: dict[str, int] = {}
    with engine.begin() as conn:
        removed["revoked_tokens"] = conn.execute(
            revoked_tokens.delete().where(revoked_tokens.c.expires_at < now)
        ).rowcount
        removed["refresh_tokens"] = conn.execute(
            refresh_tokens.delete().where(refresh_tokens.c.expires_at < now)
        ).rowcount
        removed["request_logs"] = conn.execute(
            request_logs.delete().where(request_logs.c.timestamp < now - dt.timedelta(days=log_retention_days))
        ).rowcount
    return removed


# --- batched writes (called from background writers, never on the request path) --------

def _upsert(conn: Connection):
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(usage_counters)


def add_usage(engine: Engine, rows: Sequence[dict[str, Any]], last_used: dict[int, dt.datetime] | None = None) -> None:
    """Add allowed/limited counts per (subject, minute bucket) and record keys' last use,
    all in one transaction, so a failed flush can be retried whole without double counting."""
    if not rows and not last_used:
        return
    with engine.begin() as conn:
        if rows:
            stmt = _upsert(conn)
            stmt = stmt.on_conflict_do_update(
                index_elements=[usage_counters.c.subject, usage_counters.c.bucket_start],
                set_={
                    "allowed": usage_counters.c.allowed + stmt.excluded.allowed,
                    "limited": usage_counters.c.limited + stmt.excluded.limited,
                    "tier": stmt.excluded.tier,
                },
            )
            conn.execute(stmt, list(rows))
        if last_used:
            conn.execute(
                api_keys.update().where(api_keys.c.id == sa.bindparam("kid"))
                .values(last_used_at=sa.bindparam("ts")),
                [{"kid": kid, "ts": ts} for kid, ts in last_used.items()],
            )


_REQUEST_LOG_TEXT = {column.name: column.type.length for column in request_logs.columns
                     if isinstance(column.type, sa.String)}


def clean_request_log(row: dict[str, Any]) -> dict[str, Any]:
    """A request-log row every database accepts: what came from the client (path, method, a
    forwarded address) without NUL, valid UTF-8, cut to its column's size."""
    return {name: clean_text(value, _REQUEST_LOG_TEXT[name]) if name in _REQUEST_LOG_TEXT else value
            for name, value in row.items()}


def add_request_logs(engine: Engine, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        with engine.begin() as conn:
            conn.execute(request_logs.insert(), [clean_request_log(row) for row in rows])


def is_transient_error(exc: BaseException) -> bool:
    """The database could not be reached or was busy (retry the write later), as opposed to a
    row it refuses (a batch writer drops that row alone)."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.DisconnectionError
                      | sa.exc.TimeoutError | OSError)


def add_audit(conn: Connection, actor: str, action: str, target: str, details: dict[str, Any]) -> None:
    conn.execute(
        audit_log.insert().values(
            timestamp=utcnow(), actor=actor[:100], action=action[:50], target=target[:200],
            details=json.dumps(details, default=str),
        )
    )


def rows_as_dicts(result: Iterable[Any]) -> list[dict[str, Any]]:
    return [dict(row._mapping) for row in result]


# --- CLI ----------------------------------------------------------------------------------

def _describe(url: str) -> str:
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python database.py",
        description="Create or migrate the database (no command), or check, verify, back up, or purge it.",
    )
    parser.add_argument("--database-url", help="SQLAlchemy URL (default: DATABASE_URL, else sqlite:///DB_PATH)")
    sub = parser.add_subparsers(dest="command", metavar="{migrate,check,verify,backup,purge}")
    sub.add_parser("migrate", help="apply pending migrations (the default)")
    sub.add_parser("check", help="schema is at the latest version and matches the code")
    sub.add_parser("verify", help="data integrity: orphan keys, unknown tiers, malformed rows")
    backup_parser = sub.add_parser("backup", help="online backup of a SQLite database")
    backup_parser.add_argument("path", nargs="?", help="target file (default: <db>.backup-<timestamp>)")
    sub.add_parser("purge", help="delete expired tokens and request logs past retention")
    args = parser.parse_args(argv)
    try:
        config = Config.from_env()  # the one reading of the environment, shared with the API
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = args.database_url or config.database_url
    command = args.command or "migrate"
    try:
        engine = make_engine(url)
        if command == "migrate":
            applied = migrate(engine)
            print(f"{_describe(url)}: schema at version {SCHEMA_VERSION}"
                  + (f" (applied {', '.join(map(str, applied))})" if applied else " (already current)"))
            return 0
        if command == "backup":
            target = args.path or f"{engine.url.database}.backup-{utcnow():%Y%m%d%H%M%S}"
            print(f"backed up to {backup(engine, target)}")
            return 0
        if command == "purge":
            removed = purge_expired(engine, log_retention_days=config.log_retention_days)
            print(", ".join(f"{table}: {count} removed" for table, count in removed.items()))
            return 0
        problems = check(engine) if command == "check" else verify(engine)
    except (DatabaseError, sa.exc.SQLAlchemyError, sqlite3.Error, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {command} failed on {_describe(url)}: {message}", file=sys.stderr)
        return 1
    if problems:
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        print(f"{command}: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{command}: ok ({_describe(url)}, schema version {SCHEMA_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
