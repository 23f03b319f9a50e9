"""gunicorn settings read automatically from the working directory (`gunicorn app:app`).

Only one hook: the master tells the app how many workers it starts, so that the app can warn
(and refuse in production) when several workers would each keep their own in-memory counters,
whether the count came from `-w N` or from WEB_CONCURRENCY.
"""

import os


def on_starting(server):  # noqa: ANN001 - gunicorn's hook signature
    os.environ["WEB_CONCURRENCY"] = str(server.cfg.workers)
