"""The benchmark's peers for GET /data: Flask-Limiter with a hand-rolled key store, or no limiting.

``PEER_MODE=flask_limiter`` is what a team would write without this project: API keys looked up
by SHA-256 in a dict (kept in memory, the kindest possible key store for the peer), a per-key
limit at the key's tier and a per-IP limit, both Flask-Limiter moving windows on the same Redis.
``PEER_MODE=none`` does the key lookup and nothing else: the cost floor of the endpoint.

Keys come from ``PEER_KEYS`` (comma list of full keys); every key is on the enterprise tier.
Run under gunicorn exactly like the real app: ``gunicorn -w 2 bench.peer_app:app``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os

from flask import Flask, Response, abort, jsonify, request

MODE = os.environ.get("PEER_MODE", "flask_limiter")
KEYS = {hashlib.sha256(k.encode()).hexdigest(): k[:11] for k in os.environ.get("PEER_KEYS", "").split(",") if k}
KEY_LIMIT = os.environ.get("PEER_KEY_LIMIT", "1000000000/minute")
IP_LIMIT = os.environ.get("PEER_IP_LIMIT", "1000000000/minute")

app = Flask(__name__)


def current_key_prefix() -> str:
    raw = request.headers.get("X-API-Key") or request.args.get("api_key") or ""
    prefix = KEYS.get(hashlib.sha256(raw.encode()).hexdigest())
    if prefix is None:
        abort(401)
    return prefix


def data() -> Response:
    prefix = current_key_prefix()
    return jsonify(data={"message": "sample", "served_at": dt.datetime.now(dt.UTC).isoformat(),
                         "key_prefix": prefix}, tier="enterprise")


if MODE == "flask_limiter":
    from flask_limiter import Limiter
    from flask_limiter.util import get_remote_address

    limiter = Limiter(get_remote_address, app=app, storage_uri=os.environ["REDIS_URL"], strategy="moving-window",
                      default_limits=[IP_LIMIT], headers_enabled=True, key_prefix="peerbench")
    data = limiter.limit(KEY_LIMIT, key_func=current_key_prefix)(data)

app.add_url_rule("/data", "data", data)
