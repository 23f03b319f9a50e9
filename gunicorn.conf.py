"""gunicorn settings read automatically from the working directory (`gunicorn app:app`).

- The master tells the app how many workers it starts, so that the app can warn (and refuse in
  production) when several workers would each keep their own in-memory counters, whether the
  count came from `-w N` or from WEB_CONCURRENCY.
- In development without JWT_SECRET_KEY the master draws one random key for all workers. Each
  worker would otherwise draw its own, and a token signed by one worker would be refused by the
  other. (Production refuses to start without JWT_SECRET_KEY.)
- The master checks the configuration and opens (migrates) the database once, before it forks:
  with a bad setting every worker would fail to boot at the same moment, and gunicorn's arbiter,
  while halting for the first failure, dies with a traceback and exit 1 on the second one.
- Every log record of the master and its workers, the access log included, goes through
  `log_redaction`: request lines carry API keys in `?api_key=`.
- Workers are `gunicorn_worker.BufferingThreadWorker`: threads that only run requests already
  read in full, so slow or half-open clients hold no thread (a `sync` worker is stalled by one).
"""

from __future__ import annotations

import os
import secrets
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the project, whatever the cwd

import log_redaction  # noqa: E402 - needs the path above

log_redaction.install()

worker_class = "gunicorn_worker.BufferingThreadWorker"
threads = 8  # per worker; the app is thread-safe (python app.py serves threaded too)


def on_starting(server):  # noqa: ANN001 - gunicorn's hook signature
    os.environ["WEB_CONCURRENCY"] = str(server.cfg.workers)
    share_one_jwt_key(server)
    check_before_fork()


def share_one_jwt_key(server) -> None:  # noqa: ANN001
    """Development only: one random JWT key, drawn here and inherited by every worker."""
    production = (os.environ.get("FLASK_ENV") or "development").strip().lower() == "production"
    if not os.environ.get("JWT_SECRET_KEY") and not production:
        os.environ["JWT_SECRET_KEY"] = secrets.token_urlsafe(48)
        server.log.warning("JWT_SECRET_KEY is not set: using one random key for the %s worker(s) of this gunicorn "
                           "(tokens end when it stops); set JWT_SECRET_KEY to keep them", server.cfg.workers)


def check_before_fork() -> None:
    """Exit 3 (gunicorn's "worker failed to boot") with one line, before any worker exists."""
    import database as db
    from config import Config, ConfigError

    try:
        config = Config.from_env().validate()
        db.open_database(config.database_url).dispose()
    except (ConfigError, db.DatabaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(3) from None
