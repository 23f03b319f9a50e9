"""Server-side cost of ``GET /api/analytics``, anonymous and admin, with a day of usage history.

Populates K API keys (default 300) with one usage row per key and minute for the last H
minutes (default 1440, a day: 432 000 rows), then times calls through Flask's test client
(in process, so the number is the server's work per call, not network or client time):

- anonymous, the same range repeated (the dashboard's poll, or a flood of identical calls);
- anonymous, a different range on every call (an attacker trying to defeat a cache);
- anonymous ``minutes=1440`` (the amplification vector of issue 11);
- admin ``minutes=1440`` (the full range stays available to administrators).

    python bench/analytics_bench.py [--keys 300] [--history 1440] [--calls 30] [--database-url URL]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa  # noqa: E402

import database as db  # noqa: E402
from app import create_app  # noqa: E402
from config import Config  # noqa: E402

ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"


def populate(engine: sa.engine.Engine, keys: int, history: int) -> int:
    """``keys`` users with one key each and one usage row per key and minute; returns rows written."""
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None, second=0, microsecond=0)
    with engine.begin() as conn:
        for i in range(keys):
            user_id = conn.execute(db.users.insert().values(
                username=f"bench{i}", password_hash="x", tier="free", is_admin=False, created_at=now, updated_at=now,
            ).returning(db.users.c.id)).scalar_one()
            conn.execute(db.api_keys.insert().values(id=user_id, user_id=user_id, prefix=f"rl_{i:08x}",
                                                     key_hash=f"{i:064x}", name=f"key {i}", created_at=now))
    tiers = ("free", "basic", "premium", "enterprise")
    written = 0
    with engine.begin() as conn:  # one transaction: a commit per minute would time the disk, not the query
        for minute in range(history):
            bucket = now - dt.timedelta(minutes=minute)
            rows = [{"subject": f"k:{i + 1}", "bucket_start": bucket, "key_id": i + 1, "user_id": i + 1,
                     "tier": tiers[i % 4], "allowed": 1 + (i + minute) % 7, "limited": (i * minute) % 3}
                    for i in range(keys)]
            conn.execute(db.usage_counters.insert(), rows)
            written += len(rows)
    return written


def timed(client, paths: list[str], headers: dict[str, str] | None = None) -> tuple[float, float, set[int]]:
    """(median ms, max ms, statuses) over one call per path."""
    durations, statuses = [], set()
    for path in paths:
        started = time.perf_counter()
        response = client.get(path, headers=headers or {})
        durations.append((time.perf_counter() - started) * 1000)
        statuses.add(response.status_code)
    return statistics.median(durations), max(durations), statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=300)
    parser.add_argument("--history", type=int, default=1440, help="minutes of usage rows per key")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--database-url", help="default: a fresh SQLite file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Config.from_env(
            {}, env="testing", testing=True, jwt_secret_key="bench-secret-key-that-is-long-enough-0123",
            admin_token=ADMIN_TOKEN, database_url=args.database_url or f"sqlite:///{tmp}/bench.db",
            log_dir=f"{tmp}/logs", enable_socketio=False, ip_rate_limit=10**9, log_level="WARNING",
        )
        app = create_app(config)
        app.extensions["rl"].start()
        svc = app.extensions["rl"]
        started = time.perf_counter()
        rows = populate(svc.engine, args.keys, args.history)
        elapsed = time.perf_counter() - started
        print(f"{args.keys} keys, {rows} usage rows ({svc.engine.dialect.name}) written in {elapsed:.1f} s")
        client = app.test_client()
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        cases = [
            ("anonymous minutes=60, repeated", ["/api/analytics?minutes=60"] * args.calls, None),
            ("anonymous minutes=180, repeated", ["/api/analytics?minutes=180"] * args.calls, None),
            ("anonymous minutes varying 1..180", [f"/api/analytics?minutes={180 - i % 180}"
                                                  for i in range(args.calls)], None),
            ("anonymous minutes=1440, repeated", ["/api/analytics?minutes=1440"] * args.calls, None),
            ("admin minutes=1440, repeated", ["/api/analytics?minutes=1440"] * max(3, args.calls // 5), admin),
        ]
        print("| case | calls | median ms | max ms | status |\n|---|---:|---:|---:|---|")
        for name, paths, headers in cases:
            median, worst, statuses = timed(client, paths, headers)
            print(f"| {name} | {len(paths)} | {median:.1f} | {worst:.1f} | {', '.join(map(str, sorted(statuses)))} |")
        svc.close()
        svc.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
