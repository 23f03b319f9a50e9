"""gunicorn settings read automatically from the working directory (`gunicorn app:app`).

One hook, run in the master before any worker is forked:
- it tells the app how many workers it starts, so that the app can warn (and refuse in
  production) when several workers would each keep their own in-memory counters, whether the
  count came from `-w N` or from WEB_CONCURRENCY;
- in development without JWT_SECRET_KEY it draws one random key for all workers. Each worker
  would otherwise draw its own, and a token signed by one worker would be refused by the other.
  (Production refuses to start without JWT_SECRET_KEY.)
"""

import os
import secrets


def on_starting(server):  # noqa: ANN001 - gunicorn's hook signature
    os.environ["WEB_CONCURRENCY"] = str(server.cfg.workers)
    production = (os.environ.get("FLASK_ENV") or "development").strip().lower() == "production"
    if not os.environ.get("JWT_SECRET_KEY") and not production:
        os.environ["JWT_SECRET_KEY"] = secrets.token_urlsafe(48)  # inherited by every worker
        server.log.warning("JWT_SECRET_KEY is not set: using one random key for the %s worker(s) of this gunicorn "
                           "(tokens end when it stops); set JWT_SECRET_KEY to keep them", server.cfg.workers)
