"""Forward-auth conventions around the ``/forward_auth`` decision (the view lives in app.py).

A gateway (nginx ``auth_request``, Caddy ``forward_auth``, Traefik ``ForwardAuth``, Envoy
``ext_authz``, the bundled balancer) asks once per client request whether to let it through. This
module reads what the gateway says about that request, names the admitted subject in the
identity headers, and dresses refusals for nginx, whose ``auth_request`` understands only 2xx,
401 and 403. It imports no app code, so app.py can use it without a cycle.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qsl, unquote, urlsplit

import sqlalchemy as sa
from flask import Flask, Request, Response, current_app, request
from werkzeug.routing import PathConverter

import database as db
from errors import ApiError, bad_request

URL_PREFIX = "/forward_auth"
# The gateway's own request may use any of these; HEAD comes with GET. OPTIONS is listed so that a
# pre-flight Envoy forwards as it came is decided like any request, not answered by Flask unasked.
VIEW_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Methods the original request may have had (RFC 9110 plus PATCH); anything else is refused.
ORIGINAL_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
MAX_URI_CHARS = 8192  # nginx's default large_client_header_buffers holds a request line this long

# The admitted answer's body; what the gateway needs is in the headers.
ADMITTED_BODY = b'{"allowed":true}\n'
IDENTITY_HEADERS = ("X-Auth-User-Id", "X-Auth-Username", "X-Auth-Tier", "X-Auth-Key-Prefix")
# nginx mode: the gateway announces itself with this request header ...
MODE_HEADER = "X-Forward-Auth-Gateway"
# ... and a refusal then comes as 401/403 carrying the real status and JSON body in these two.
STATUS_HEADER = "X-Forward-Auth-Status"
BODY_HEADER = "X-Forward-Auth-Body"

_URI_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII without space: other bytes must be percent-encoded
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ForwardedPathConverter(PathConverter):
    """``<forwarded_path:original>``: the rest of the URL, possibly empty. Envoy's ext_authz calls
    ``path_prefix`` + the original path, so a request for ``/`` arrives as ``/forward_auth/``."""

    regex = r"[\s\S]*"  # any character, newlines included (".*" stops at one: a 404)
    part_isolating = False


@dataclasses.dataclass(frozen=True)
class ForwardedRequest:
    """The client's request as the gateway describes it."""

    method: str
    uri: str  # as forwarded: path and query, percent-encoded
    path: str  # percent-decoded, for route rules and logs
    query: str

    def api_key(self) -> str | None:
        """``api_key`` from the original query string, as /data reads ``?api_key=``."""
        for name, value in parse_qsl(self.query, keep_blank_values=True):
            if name == "api_key":
                return value or None
        return None


def _first(req: Request, *names: str) -> tuple[str, str] | None:
    """(name, value) of the first non-empty header; read from the WSGI environ (hot path)."""
    environ = req.environ
    for name in names:
        value = environ.get("HTTP_" + name.upper().replace("-", "_"))
        if value:
            return name, value
    return None


def forwarded_request(req: Request, original: str | None) -> ForwardedRequest:
    """Read the original request from the X-Forwarded-* (Traefik, Caddy) or X-Original-* (nginx)
    headers, or from the path after /forward_auth/ (Envoy); 400 when absent or malformed."""
    method_header = _first(req, "X-Forwarded-Method", "X-Original-Method")
    method = method_header[1].strip() if method_header else req.method
    if method not in ORIGINAL_METHODS:
        field = method_header[0] if method_header else "method"
        raise bad_request(field, f"'{field}' must be one of {', '.join(sorted(ORIGINAL_METHODS))}")
    uri_header = _first(req, "X-Forwarded-Uri", "X-Original-URI")
    if uri_header is not None:
        field, uri = uri_header
    elif original is not None:
        field, uri = "path", _suffix_uri(req, original)
    else:
        raise ApiError(400, "missing_forwarded_uri",
                       "Describe the original request with X-Forwarded-Method and X-Forwarded-Uri "
                       "(or X-Original-Method and X-Original-URI)")
    path, query = _split_uri(field, uri)
    return ForwardedRequest(method=method, uri=uri, path=path, query=query)


def _suffix_uri(req: Request, original: str) -> str:
    """The original path and query as received (Envoy form), not re-encoded by werkzeug."""
    raw = req.environ.get("RAW_URI") or req.environ.get("REQUEST_URI") or ""
    if raw.startswith(URL_PREFIX + "/"):
        return raw[len(URL_PREFIX):]
    query = req.query_string.decode("latin-1")
    return "/" + original + (f"?{query}" if query else "")


def _split_uri(field: str, uri: str) -> tuple[str, str]:
    """(decoded path, raw query) of an origin-form or absolute http(s) URI; 400 when malformed."""
    if len(uri) > MAX_URI_CHARS:
        raise bad_request(field, f"'{field}' is longer than {MAX_URI_CHARS} characters")
    if not _URI_CHARS.fullmatch(uri):
        raise bad_request(field, f"'{field}' must be printable ASCII without spaces or NUL; percent-encode other bytes")
    if _BAD_PERCENT.search(uri):
        raise bad_request(field, f"'{field}' has a '%' that is not followed by two hex digits")
    if uri.startswith(("http://", "https://")):
        try:
            parts = urlsplit(uri)
        except ValueError:
            raise bad_request(field, f"'{field}' is not a valid URL") from None
        raw_path, query = parts.path or "/", parts.query
    elif uri.startswith("/"):
        raw_path, _, query = uri.partition("#")[0].partition("?")
    else:
        raise bad_request(field, f"'{field}' must be a path starting with '/' or an absolute http(s) URL")
    if "%" not in raw_path:
        return raw_path, query
    try:
        path = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise bad_request(field, f"'{field}' has a percent-encoded path that is not UTF-8") from None
    if _CONTROL.search(path):  # NUL included
        raise bad_request(field, f"'{field}' encodes a control character in its path")
    return path, query


class UsernameCache:
    """User id -> username for ``X-Auth-Username``, so the decision reads no database on a hit.

    Usernames never change; entries still expire after ``ttl`` seconds, because SQLite may give a
    deleted user's id (the highest one) to the next account."""

    def __init__(self, engine: sa.engine.Engine, *, ttl: float = 300.0, size: int = 50_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._ttl = ttl
        self._size = size
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[int, tuple[str | None, float]] = collections.OrderedDict()

    def get(self, user_id: int) -> str | None:
        now = self._clock()
        with self._lock:
            cached = self._entries.get(user_id)
            if cached is not None and cached[1] > now:
                return cached[0]
        with self._engine.connect() as conn:
            username = conn.execute(sa.select(db.users.c.username).where(db.users.c.id == user_id)).scalar()
        with self._lock:
            self._entries[user_id] = (username, now + self._ttl)
            self._entries.move_to_end(user_id)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return username


def identity_headers(user_id: int, username: str | None, tier: str, key_prefix: str | None) -> list[tuple[str, str]]:
    """The headers a gateway copies onto the admitted request for the upstream."""
    values = (str(user_id), username, tier, key_prefix)
    return [(name, value) for name, value in zip(IDENTITY_HEADERS, values, strict=True) if value]


def dress_refusal_for_nginx(response: Response) -> Response:
    """After the request pipeline (which logged and counted the real status): when nginx asked,
    a refusal becomes 401 (for a real 401) or 403, with its real status and compact JSON body in
    headers that the shipped nginx.conf captures with auth_request_set and sends back as they were."""
    if response.status_code < 300 or request.blueprint != "gateway":
        return response
    if request.headers.get(MODE_HEADER, "").strip().lower() != "nginx":
        return response
    status = response.status_code
    response.headers[STATUS_HEADER] = str(status)
    body = response.get_json(silent=True) if response.is_json else None
    if isinstance(body, dict):  # ASCII-only and single-line, so it is a valid header value
        response.headers[BODY_HEADER] = json.dumps(body, separators=(",", ":"), ensure_ascii=True)
    response.status_code = 401 if status == 401 else 403
    return response


def init_app(app: Flask, engine: sa.engine.Engine) -> None:
    """Wire the gateway support into ``app``; call before its blueprints and before the main
    after_request hook (Flask runs after_request hooks in reverse order: this one runs last)."""
    app.url_map.converters["forwarded_path"] = ForwardedPathConverter
    app.extensions[USERNAMES_EXTENSION] = UsernameCache(engine)
    app.after_request(dress_refusal_for_nginx)


USERNAMES_EXTENSION = "gateway.usernames"


def usernames() -> UsernameCache:
    """The username cache of the app handling this request (set up by ``init_app``)."""
    cache: UsernameCache = current_app.extensions[USERNAMES_EXTENSION]
    return cache
