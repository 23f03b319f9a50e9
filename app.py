"""The API rate limiter service: application factory, request pipeline and HTTP routes.

``create_app(config)`` builds one Flask app with its services (``wiring.py``) in
``app.extensions``; the routes are grouped in blueprints by section (core, auth, data/usage/sdk,
gateway, dashboard, metrics here; admin in ``admin.py``). ``gunicorn app:app`` builds the app
lazily on first access, so importing this module does no I/O; ``python app.py`` serves it on
``PORT`` (default 5000).
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import functools
import hmac
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Flask, Response, current_app, g, jsonify, render_template, request, send_from_directory
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from werkzeug.middleware.proxy_fix import ProxyFix

import auth
import database as db
import errors
import gateway
import log_manager as abuse
import log_redaction
import policy_rules
import wiring
from admin import admin_bp, publish_policy, recent_alerts, revoke_in_store
from analytics import MetricsCollector
from api_io import int_arg, json_body, key_json, parse_timestamp, str_field, user_json
from config import DEFAULT_TIER, Config, ConfigError
from errors import ApiError, bad_request
from gate import (
    IpCheck,
    api_key_from_request,
    consume_key,
    consume_user,
    epoch_ceil,
    exempt_request,
    ip_subject,
    key_subject,
    peek_key,
    refused_before_the_combined_check,
    user_subject,
)
from limiter import LimitResult, StoreUnavailable
from log_manager import configure_logging
from wiring import ADMIN_ROOM, Services, build_services

log = logging.getLogger("ratelimiter")

VERSION = "1.0.0"
USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{3,64}$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$")
MAX_KEYS_PER_USER = 25
KEY_GENERATION_ATTEMPTS = 5  # draws of a new key when its prefix collides with an existing one
SDK_CACHE_SECONDS = 300
# Routes that never count against the per-IP limit: static files and liveness.
IP_EXEMPT_ENDPOINTS = {"static", "core.health", "sdk.sdk_js"}


def usage_dict(result: LimitResult) -> dict[str, Any]:
    return {"limit": result.limit, "remaining": result.remaining, "reset_epoch": epoch_ceil(result.reset)}


# --- blueprints ------------------------------------------------------------------------------

core = Blueprint("core", __name__)
auth_bp = Blueprint("auth", __name__, url_prefix="/auth")
data_bp = Blueprint("data", __name__)
sdk_bp = Blueprint("sdk", __name__)
dashboard_bp = Blueprint("dashboard", __name__)
metrics_bp = Blueprint("metrics", __name__)


@core.get("/")
def index() -> Response:
    rules = sorted({rule.rule for rule in current_app.url_map.iter_rules() if rule.endpoint != "static"})
    return jsonify(name="API Rate Limiter", version=VERSION, status="ok", endpoints=rules,
                   tiers=wiring.current().config.tier_limits, docs="/openapi.json")


@core.get("/health")
def health() -> tuple[Response, int]:
    svc = wiring.current()
    checks = {"database": "ok", "limiter_store": "ok"}
    try:
        with svc.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # any driver error means "not ok", reported, never raised
        checks["database"] = f"error: {type(exc).__name__}"
    store = svc.limiter.health()
    checks["limiter_store"] = store
    ok = checks["database"] == "ok" and store == "ok"
    body = {"status": "ok" if ok else "degraded", "checks": checks, "version": VERSION,
            "limiter_store": svc.limiter.store_kind}
    return jsonify(body), 200 if ok else 503


@core.get("/openapi.json")
def openapi() -> Response:
    import openapi as spec

    return jsonify(spec.build_spec(current_app, VERSION))


# --- auth ---



def credentials(body: dict[str, Any]) -> tuple[str, str]:
    username = str_field(body, "username", max_len=64)
    password = str_field(body, "password", max_len=auth.MAX_PASSWORD_CHARS)
    return username, password


def throttle(svc: Services, name: str, limit: int, window: int, code: str, message: str) -> None:
    """A secondary limit (registrations, sign-in attempts) on the same store; atomic check-and-count.

    Brute-force protection must outlive a store outage: in fail mode "open" these still count per
    process (the limiter's fallback store) rather than admitting every attempt."""
    result = svc.limiter.hit(name, limit, window, open_when_down=False)
    if not result.allowed:
        retry = max(1, epoch_ceil(result.retry_after))
        raise ApiError(429, code, message, headers={"Retry-After": str(retry)}, retry_after=retry)


@auth_bp.post("/register")
def register() -> tuple[Response, int]:
    svc = wiring.current()
    body = json_body()
    username, password = credentials(body)
    email = str_field(body, "email", required=False, max_len=254)
    if not USERNAME_RE.fullmatch(username):  # fullmatch: "$" alone would let a trailing newline through
        raise bad_request("username", "'username' must be 3-64 characters of letters, digits, '_', '.' or '-'")
    if len(password) < 8:
        raise bad_request("password", "'password' must be at least 8 characters")
    if email is not None and not EMAIL_RE.fullmatch(email):
        raise bad_request("email", "'email' is not a valid e-mail address")
    try:
        throttle(svc, f"reg:{g.client_ip}", svc.config.register_per_ip_per_hour, 3600, "too_many_registrations",
                 "Too many accounts registered from this address; try again later")
    except ApiError:
        svc.abuse.record(abuse.REGISTRATION_THROTTLED, g.client_ip)
        raise
    now = db.utcnow()
    try:
        with svc.engine.begin() as conn:
            user_id = conn.execute(db.users.insert().values(
                username=username, email=email, password_hash=auth.hash_password(password, svc.config.bcrypt_rounds),
                tier=DEFAULT_TIER, is_admin=False, created_at=now, updated_at=now,
            ).returning(db.users.c.id)).scalar_one()
    except sa.exc.IntegrityError:
        raise ApiError(409, "username_taken", f"The username '{username}' is already taken") from None
    svc.limiter.set_meta(user_subject(user_id, auth.account_stamp(now)), tier=DEFAULT_TIER, blocked=False)
    user = {"id": user_id, "username": username, "email": email, "tier": DEFAULT_TIER, "created_at": db.iso(now)}
    return jsonify(user=user, **current_app.extensions["jwt"].issue(user_id)), 201


@functools.lru_cache(maxsize=4)
def _dummy_hash(rounds: int) -> str:
    """A real bcrypt hash to check against for unknown users, so timing does not reveal them."""
    return auth.hash_password("not-a-real-password", rounds)


@auth_bp.post("/login")
def login() -> Response:
    svc = wiring.current()
    body = json_body()
    username, password = credentials(body)
    # Every attempt is counted before bcrypt runs, atomically, so parallel guesses cannot get past
    # the limit the way a check-then-count would let them.
    throttle(svc, f"lf:{g.client_ip}", svc.config.login_failures_per_ip, svc.config.login_failure_window,
             "too_many_failed_logins", "Too many sign-in attempts from this address; wait and retry")
    with svc.engine.connect() as conn:
        row = conn.execute(sa.select(db.users).where(db.users.c.username == username)).first()
    valid = auth.check_password(password, row.password_hash if row else _dummy_hash(svc.config.bcrypt_rounds))
    if row is None or not valid:
        svc.abuse.record(abuse.FAILED_LOGIN, g.client_ip, username=username[:64])
        raise ApiError(401, "invalid_credentials", "Unknown username or wrong password")
    return jsonify(user=user_json(row), **current_app.extensions["jwt"].issue(row.id))


@auth_bp.post("/refresh")
def refresh() -> Response:
    body = json_body()
    token = str_field(body, "refresh_token", max_len=4096)
    return jsonify(current_app.extensions["jwt"].rotate(token))


@auth_bp.post("/logout")
@auth.jwt_required
def logout() -> Response:
    manager = current_app.extensions["jwt"]
    body = json_body(optional=True)
    refresh_token = str_field(body, "refresh_token", required=False, max_len=4096)
    if refresh_token:
        claims = manager.decode(refresh_token, "refresh")
        if claims["sub"] != g.jwt["sub"]:
            raise ApiError(403, "forbidden", "That refresh token belongs to another user")
        manager.revoke_family(claims["fam"])
    manager.revoke_access(g.jwt)
    return jsonify(message="Signed out; the token is no longer accepted")


def user_keys(conn: sa.Connection, user_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        sa.select(db.api_keys, db.users.c.tier)
        .select_from(db.api_keys.join(db.users, db.api_keys.c.user_id == db.users.c.id))
        .where(db.api_keys.c.user_id == user_id, db.api_keys.c.revoked_at.is_(None))
        .order_by(db.api_keys.c.id)
    ).all()
    return [policy_rules.with_credits(wiring.current(), key_json(row), row, key_subject(row.id, row.key_hash))
            for row in rows]


def current_user_row(conn: sa.Connection) -> Any:
    row = conn.execute(sa.select(db.users).where(db.users.c.id == g.user_id)).first()
    if row is None:
        raise ApiError(401, "invalid_token", "The account of this token no longer exists")
    return row


@auth_bp.get("/me")
@auth.jwt_required
def me() -> Response:
    with wiring.current().engine.connect() as conn:
        row = current_user_row(conn)
        return jsonify(user=user_json(row), api_keys=user_keys(conn, row.id))


@auth_bp.get("/api_keys")
@auth.jwt_required
def list_api_keys() -> Response:
    with wiring.current().engine.connect() as conn:
        return jsonify(api_keys=user_keys(conn, g.user_id))


@auth_bp.post("/create_api_key")
@auth.jwt_required
def create_api_key() -> tuple[Response, int]:
    svc = wiring.current()
    body = json_body(optional=True)
    name = (str_field(body, "name", required=False, max_len=100) or "").strip()
    expires_at = parse_timestamp(body, "expires_at", after=svc.clock())
    # The visible prefix has 32 random bits: among many keys two can collide (birthday bound), and
    # the unique index then refuses the insert. A fresh key is drawn instead of answering 500.
    for attempt in range(KEY_GENERATION_ATTEMPTS):
        new_key = auth.generate_api_key()
        try:
            key_id, user, now = insert_api_key(svc, new_key, name, expires_at)
            break
        except sa.exc.IntegrityError:
            if attempt == KEY_GENERATION_ATTEMPTS - 1:
                raise
            log.warning("API key prefix or hash collision; drawing a new key")
    subject = key_subject(key_id, new_key.key_hash)
    svc.limiter.set_meta(subject, tier=user.tier, blocked=False)
    publish_policy(svc, subjects=[subject])  # an override of the owner covers the new key too
    return jsonify(api_key=new_key.key, id=key_id, prefix=new_key.prefix, name=name, tier=user.tier,
                   created_at=db.iso(now), expires_at=db.iso(expires_at),
                   message="Store this key now: it is shown only once"), 201


def insert_api_key(svc: Services, new_key: auth.NewApiKey, name: str,
                   expires_at: dt.datetime | None) -> tuple[int, Any, dt.datetime]:
    """Insert the caller's new key under the per-user cap; (key id, user row, creation time)."""
    now = db.utcnow()
    with svc.engine.begin() as conn:
        user = current_user_row(conn)
        count = conn.execute(
            sa.select(sa.func.count()).select_from(db.api_keys)
            .where(db.api_keys.c.user_id == user.id, db.api_keys.c.revoked_at.is_(None))
        ).scalar_one()
        if count >= MAX_KEYS_PER_USER:
            raise ApiError(409, "too_many_keys", f"An account may hold at most {MAX_KEYS_PER_USER} active keys")
        key_id = conn.execute(db.api_keys.insert().values(
            user_id=user.id, prefix=new_key.prefix, key_hash=new_key.key_hash, name=name, blocked=False,
            created_at=now, expires_at=expires_at,
        ).returning(db.api_keys.c.id)).scalar_one()
    return key_id, user, now




@auth_bp.delete("/api_keys/<int(max=2147483647):key_id>")
@auth.jwt_required
def revoke_own_key(key_id: int) -> Response:
    svc = wiring.current()
    with svc.engine.begin() as conn:
        row = conn.execute(sa.select(db.api_keys).where(
            db.api_keys.c.id == key_id, db.api_keys.c.user_id == g.user_id, db.api_keys.c.revoked_at.is_(None)
        )).first()
        if row is None:  # another user's key looks exactly like a missing one
            raise ApiError(404, "key_not_found", f"You have no active API key with id {key_id}")
        conn.execute(db.api_keys.update().where(db.api_keys.c.id == key_id).values(revoked_at=db.utcnow()))
    revoke_in_store(svc, key_id, row.key_hash)
    return jsonify(message="API key revoked", key={"id": key_id, "prefix": row.prefix, "revoked": True})




# --- data, usage, sdk ---

@data_bp.get("/data")
@refused_before_the_combined_check
def data() -> Response:
    svc = wiring.current()
    if exempt_request(svc):  # a policy route marked exempt: no key, not counted
        return jsonify(data={"message": "Public data: this route is exempt from key and limits",
                             "served_at": db.iso(db.utcnow())}, tier=None, usage=None)
    token = auth.bearer_token()
    raw_key = api_key_from_request()
    if raw_key or token is None:
        record, result, tier = consume_key(svc, raw_key)
        owner = {"key_prefix": record.prefix, "user_id": record.user_id}
    else:
        result, tier = consume_user(svc, token)
        owner = {"user_id": g.user_id}
    payload = {
        "message": "Protected sample data: this request passed authentication and the rate limiter",
        "served_at": db.iso(db.utcnow()),
        **owner,
    }
    return jsonify(data=payload, tier=tier, usage=usage_dict(result))



@data_bp.get("/usage")
@refused_before_the_combined_check
def usage() -> Response:
    svc = wiring.current()
    g.rule_target = None  # reading usage is not a call to a policy route
    record, result, tier = peek_key(svc, api_key_from_request())
    today = dt.datetime.combine(svc.now().date(), dt.time())
    totals = svc.usage.totals(f"k:{record.id}", today)
    expires_at = db.iso(db.from_epoch(record.expires_at)) if record.expires_at is not None else None
    return jsonify(key_prefix=record.prefix, tier=tier, limit=result.limit, used=result.limit - result.remaining,
                   remaining=result.remaining, window_seconds=svc.config.window_seconds,
                   reset_epoch=epoch_ceil(result.reset), totals=totals, expires_at=expires_at,
                   **policy_rules.usage_fields(g.get("policy_decision")))


# --- gateway: the /data decision for any upstream API ---

gateway_bp = Blueprint("gateway", __name__)


@gateway_bp.route(gateway.URL_PREFIX, methods=gateway.VIEW_METHODS, provide_automatic_options=False)
@gateway_bp.route(f"{gateway.URL_PREFIX}/<forwarded_path:original>", methods=gateway.VIEW_METHODS,
                  provide_automatic_options=False)
@refused_before_the_combined_check
def forward_auth(original: str | None = None) -> Response:
    """A gateway's sub-request: exactly the /data decision and budget for the request it describes;
    admitted answers name the subject in X-Auth-* headers for the upstream."""
    svc = wiring.current()
    req = request._get_current_object()  # type: ignore[attr-defined]  # one proxy lookup, not one per header
    # The original request (method, decoded path) is request state for whatever matches routes.
    g.forwarded = forwarded = gateway.forwarded_request(req, original)
    if exempt_request(svc):  # a policy route marked exempt: no credentials, not counted (the IP is)
        return Response(gateway.ADMITTED_BODY, mimetype="application/json")
    token = auth.bearer_token()
    raw_key = req.environ.get("HTTP_X_API_KEY") or forwarded.api_key()
    key_prefix = None
    if raw_key or token is None:
        record, _, tier = consume_key(svc, raw_key)
        user_id, key_prefix = record.user_id, record.prefix
    else:
        _, tier = consume_user(svc, token)
        user_id = g.user_id
    username = gateway.usernames().get(user_id)
    # A constant body: gateways read the headers, and the decision must cost no more than /data.
    return Response(gateway.ADMITTED_BODY, mimetype="application/json",
                    headers=gateway.identity_headers(user_id, username, tier, key_prefix))


@sdk_bp.get("/sdk.js", defaults={"filename": "ratelimiter-sdk.js"})
@sdk_bp.get("/sdk.mjs", defaults={"filename": "ratelimiter-sdk.mjs"})
def sdk_js(filename: str) -> Response:
    """The SDK as a classic script (/sdk.js) and its ES-module wrapper (/sdk.mjs); one endpoint, so
    both stay exempt from the per-IP limit and the request log."""
    response = send_from_directory(static_folder(), filename,
                                   mimetype="application/javascript", max_age=SDK_CACHE_SECONDS)
    response.headers["Access-Control-Allow-Origin"] = "*"
    return response


@sdk_bp.get("/sdk")
def sdk_page() -> Response:
    return send_from_directory(static_folder(), "demo.html", mimetype="text/html", max_age=0)


def static_folder() -> str:
    """The app's static/ directory (create_app always sets one)."""
    folder = current_app.static_folder
    assert folder is not None
    return folder


@sdk_bp.post("/sdk/check")
@refused_before_the_combined_check
def sdk_check() -> Response:
    svc = wiring.current()
    body = json_body()
    endpoint = str_field(body, "endpoint", required=False, max_len=500)
    g.rule_target = ("GET", endpoint) if endpoint else None
    _, result, tier = peek_key(svc, api_key_from_request(body))
    return jsonify(allowed=result.remaining > 0, tier=tier, retry_after=epoch_ceil(result.retry_after)
                   if result.remaining <= 0 else 0, **usage_dict(result))


@sdk_bp.post("/sdk/track")
@refused_before_the_combined_check
def sdk_track() -> Response:
    svc = wiring.current()
    body = json_body()
    endpoint = str_field(body, "endpoint", max_len=500)
    method = str_field(body, "method", required=False, max_len=10)
    status = body.get("status")
    if status is not None and (not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599):
        raise bad_request("status", "'status' must be an HTTP status code between 100 and 599")
    policy_rules.track_target(body, (method or "GET").upper(), endpoint or "")
    _, result, tier = consume_key(svc, api_key_from_request(body))
    return jsonify(tracked=True, tier=tier, **usage_dict(result))




# --- metrics and analytics ---

@metrics_bp.get("/api/metrics")
def api_metrics() -> Response:
    svc = wiring.current()
    snapshot = svc.metrics.snapshot()
    snapshot.update(
        active_keys=active_subjects(svc),
        limiter_store=svc.limiter.store_kind,
        limiter_health=svc.limiter.health(),
        strategy=svc.config.strategy,
        tier_limits=svc.config.tier_limits,
        window_seconds=svc.config.window_seconds,
        scope="process",
        pid=os.getpid(),
    )
    return jsonify(snapshot)


ACTIVE_KEYS_CACHE_SECONDS = 2.0


def active_subjects(svc: Services) -> int:
    """API keys with requests in the current window, across all workers, as of the last flush.

    The anonymous /api/metrics must not become a database load: one COUNT per two seconds at most."""
    cached_at, value = svc.active_keys_cache
    if time.monotonic() - cached_at < ACTIVE_KEYS_CACHE_SECONDS:
        return value
    since = svc.now() - dt.timedelta(seconds=svc.config.window_seconds)
    c = db.usage_counters.c
    with svc.engine.connect() as conn:
        value = conn.execute(
            sa.select(sa.func.count(sa.distinct(c.subject)))
            .where(c.bucket_start >= since.replace(second=0, microsecond=0), c.key_id.is_not(None))
        ).scalar_one()
    svc.active_keys_cache = (time.monotonic(), value)
    return value


@metrics_bp.get("/metrics")
def prometheus_metrics() -> Response:
    svc = wiring.current()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(svc.metrics, lambda: {
        "limiter_store_up": 1.0 if svc.limiter.health() == "ok" else 0.0,
        "analytics_flush_failures": float(svc.usage.flush_failures),
    }))
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)  # mimetype= would add a second charset


ANALYTICS_MAX_MINUTES = 24 * 60
ANALYTICS_PUBLIC_MINUTES = 180  # without the admin token: the dashboard's widest range
ANALYTICS_CACHE_SECONDS = 5.0  # anonymous figures are computed at most this often per process

UsageRows = list[tuple[dt.datetime, str, int, int]]


def usage_since(svc: Services, since: dt.datetime) -> UsageRows:
    """(minute, tier, allowed, limited) from ``since`` on: one grouped scan, from which any
    shorter range's series and tier totals are sliced."""
    c = db.usage_counters.c
    svc.usage.flush()
    with svc.engine.connect() as conn:
        rows = conn.execute(
            sa.select(c.bucket_start, c.tier, sa.func.sum(c.allowed), sa.func.sum(c.limited))
            .where(c.bucket_start >= since).group_by(c.bucket_start, c.tier)
        ).all()
    return [(row[0], row[1], int(row[2]), int(row[3])) for row in rows]


def public_usage(svc: Services, minute: dt.datetime) -> UsageRows:
    """The anonymous view's rows, shared by every anonymous call for ANALYTICS_CACHE_SECONDS (and
    the same minute): an anonymous caller cannot make the database scan more than one public
    range per interval, whatever range or rate it asks for. One computation at a time."""
    with svc.analytics_lock:
        cached_at, cached_minute, rows = svc.analytics_cache
        if cached_minute != minute or not 0 <= svc.clock() - cached_at < ANALYTICS_CACHE_SECONDS:
            rows = usage_since(svc, minute - dt.timedelta(minutes=ANALYTICS_PUBLIC_MINUTES - 1))
            svc.analytics_cache = (svc.clock(), minute, rows)
        return rows


@metrics_bp.get("/api/analytics")
def api_analytics() -> Response:
    """Request volume per minute (allowed vs limited) and per tier; detail for admins only.

    Anonymous callers get up to ANALYTICS_PUBLIC_MINUTES from a short cache; admins any range
    up to a day, fresh."""
    svc = wiring.current()
    admin = auth.bearer_token() is not None
    if admin:
        g.admin_actor = auth.admin_actor()
    minutes = int_arg("minutes", 60, maximum=ANALYTICS_MAX_MINUTES)
    if not admin and minutes > ANALYTICS_PUBLIC_MINUTES:
        raise bad_request("minutes", f"'minutes' must be at most {ANALYTICS_PUBLIC_MINUTES} without the admin "
                                     f"token (at most {ANALYTICS_MAX_MINUTES} with it)")
    # The usage buckets are stamped with the app's clock, so the window must be measured by it too.
    minute = svc.now().replace(second=0, microsecond=0)
    since = minute - dt.timedelta(minutes=minutes - 1)
    rows = usage_since(svc, since) if admin else public_usage(svc, minute)
    by_minute: dict[dt.datetime, list[int]] = {}
    by_tier: dict[str, dict[str, int]] = {}
    for bucket, tier, allowed, limited in rows:
        if bucket < since:
            continue
        counts = by_minute.setdefault(bucket, [0, 0])
        counts[0] += allowed
        counts[1] += limited
        totals = by_tier.setdefault(tier, {"allowed": 0, "limited": 0})
        totals["allowed"] += allowed
        totals["limited"] += limited
    buckets = []
    for i in range(minutes):
        start = since + dt.timedelta(minutes=i)
        allowed, limited = by_minute.get(start, (0, 0))
        buckets.append({"t": db.iso(start), "allowed": allowed, "limited": limited})
    body: dict[str, Any] = {
        "minutes": minutes,
        "series": buckets,
        "totals": {"allowed": sum(b["allowed"] for b in buckets), "limited": sum(b["limited"] for b in buckets)},
        "by_tier": by_tier,
        "tier_limits": svc.config.tier_limits,
        "window_seconds": svc.config.window_seconds,
        "metrics": svc.metrics.snapshot(),
        "limiter_store": svc.limiter.store_kind,
        "limiter_health": svc.limiter.health(),
        "socketio": svc.socketio is not None,
    }
    if admin:
        body.update(admin_analytics(svc, since))
    return jsonify(body)


def admin_analytics(svc: Services, since: dt.datetime) -> dict[str, Any]:
    c = db.usage_counters.c
    k = db.api_keys.c
    svc.log_writer.flush_now()  # before opening our connection: the flush needs one of its own
    with svc.engine.connect() as conn:
        top = conn.execute(
            sa.select(k.prefix, k.name, c.tier, sa.func.sum(c.allowed).label("allowed"),
                      sa.func.sum(c.limited).label("limited"))
            .select_from(db.usage_counters.join(db.api_keys, db.api_keys.c.id == c.key_id))
            .where(c.bucket_start >= since).group_by(k.prefix, k.name, c.tier)
            .order_by(sa.desc("allowed")).limit(10)
        ).all()
        recent_429 = conn.execute(
            sa.select(db.request_logs).where(db.request_logs.c.status == 429)
            .order_by(db.request_logs.c.id.desc()).limit(20)
        ).all()
    return {
        "top_keys": [{"prefix": r.prefix, "name": r.name, "tier": r.tier, "allowed": int(r.allowed),
                      "limited": int(r.limited)} for r in top],
        "recent_429s": [{"timestamp": db.iso(r.timestamp), "path": r.path, "ip": r.ip, "key_prefix": r.key_prefix,
                         "message": r.message} for r in recent_429],
        "alerts": recent_alerts(20),
        "events": list(svc.events.recent)[:50],
    }


@dashboard_bp.get("/dashboard")
def dashboard() -> str:
    svc = wiring.current()
    return render_template("dashboard.html", tier_limits=svc.config.tier_limits, version=VERSION,
                           window_seconds=svc.config.window_seconds, socketio=svc.socketio is not None)


# --- request pipeline --------------------------------------------------------------------------



def before_request() -> None:
    """Derive the client's subject (the one place it is derived), then the per-IP check, which runs
    before routing errors: a banned IP gets 429 on unknown paths, wrong methods and OPTIONS too."""
    g.started = time.perf_counter()
    svc = wiring.current()
    g.client_addr = request.remote_addr or "unknown"
    g.client_ip = ip_subject(g.client_addr, svc.config.ipv6_prefix_length)
    g.key_prefix = None
    g.user_id = None
    check = IpCheck.start(svc, g.client_ip)
    if request.endpoint in IP_EXEMPT_ENDPOINTS:
        return
    view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
    check.before_view(view, request.method)


CORS_PATHS = ("/data", "/usage", "/sdk/")
CORS_EXPOSE = "X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, RateLimit, RateLimit-Policy, Retry-After"
CORS_ALLOW_HEADERS = {"content-type", "x-api-key", "authorization"}
CORS_MAX_AGE = "600"


def add_cors_headers(response: Response, allowed_origins: list[str]) -> None:
    """CORS for the routes browsers call cross-origin (/data, /usage, /sdk/*), per CORS_ORIGINS.

    The allowed origin is echoed (with ``Vary: Origin``) even for ``*``, so caches never mix answers;
    a refused origin gets no CORS headers and the browser blocks the response. Done here rather
    than with flask-cors because it runs on every request of the hot path and costs a fraction."""
    origin = request.headers.get("Origin")
    if not origin or not request.path.startswith(CORS_PATHS):
        return
    response.vary.add("Origin")
    if "*" not in allowed_origins and origin not in allowed_origins:
        return
    headers = [("Access-Control-Allow-Origin", origin)]
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        asked = request.headers.get("Access-Control-Request-Headers", "")
        granted = [h.strip() for h in asked.split(",") if h.strip().lower() in CORS_ALLOW_HEADERS]
        headers += [("Access-Control-Allow-Methods", response.headers.get("Allow", "GET, POST, OPTIONS")),
                    ("Access-Control-Max-Age", CORS_MAX_AGE)]
        if granted:
            headers.append(("Access-Control-Allow-Headers", ", ".join(granted)))
    else:
        headers.append(("Access-Control-Expose-Headers", CORS_EXPOSE))
    response.headers.extend(headers)


# HTML pages: no framing, no MIME sniffing, no referrer leaks; scripts only from this origin
# (the SDK demo page teaches with an inline script, so it alone allows one).
PAGE_CSP = ("default-src 'self'; script-src 'self'{inline}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
PAGE_HEADERS = {"X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def add_security_headers(response: Response) -> None:
    response.headers["X-Content-Type-Options"] = "nosniff"
    if response.mimetype == "text/html":
        inline = " 'unsafe-inline'" if request.endpoint == "sdk.sdk_page" else ""
        response.headers["Content-Security-Policy"] = PAGE_CSP.format(inline=inline)
        response.headers.update(PAGE_HEADERS)


def after_request(response: Response) -> Response:
    add_security_headers(response)
    rate = g.get("rate_headers")
    if rate:  # appended, not set one by one: Headers.set/setdefault scan and raise per header (hot path)
        response.headers.extend(rate)
    if request.endpoint in ("static", "sdk.sdk_js"):
        return response
    svc = wiring.current()
    add_cors_headers(response, svc.config.cors_origins)
    duration = time.perf_counter() - g.get("started", time.perf_counter())
    svc.metrics.observe_request(response.status_code, duration)
    status = response.status_code
    level = "ERROR" if status >= 500 else "WARNING" if status >= 400 else "INFO"
    message = ""
    if status >= 400 and response.is_json:
        body = response.get_json(silent=True) or {}
        message = str(body.get("error", ""))[:500]
    if message == "ip_banned":
        # A banned client's flood is not counted against it, so it must not write a row per request.
        skipped = svc.refusal_log.admit(g.get("client_ip") or "unknown")
        if skipped is None:
            return response
        if skipped:
            message = f"ip_banned; {skipped} more refusals of this client not logged"
    record = {
        "timestamp": db.utcnow(), "level": level, "method": request.method, "path": request.path[:500],
        "status": status, "ip": g.get("client_addr"), "key_prefix": g.get("key_prefix"),
        "user_id": g.get("user_id"), "duration_ms": round(duration * 1000, 3), "message": message,
    }
    svc.log_writer.put(record)
    svc.request_logger.log({**record, "timestamp": db.iso(record["timestamp"])})
    return response




# --- factory -----------------------------------------------------------------------------------



def init_socketio(app: Flask, svc: Services) -> None:
    if not svc.config.enable_socketio:
        return
    if svc.config.web_concurrency > 1:
        log.warning("ENABLE_SOCKETIO ignored with %s workers (Socket.IO needs sticky sessions); "
                    "the dashboard polls instead", svc.config.web_concurrency)
        return
    from flask_socketio import SocketIO, emit, join_room

    socketio = SocketIO(app, async_mode="threading", logger=False, engineio_logger=False)
    svc.socketio = socketio
    started = threading.Event()

    def snapshot() -> dict[str, Any]:
        return {**svc.metrics.snapshot(), "limiter_health": svc.limiter.health()}

    def push_metrics() -> None:
        while not svc.stopping.wait(2.0):
            socketio.emit("metrics", snapshot())

    def is_admin(auth_data: Any) -> bool:
        token = auth_data.get("token") if isinstance(auth_data, dict) else None
        admin_token = svc.config.admin_token
        return bool(isinstance(token, str) and admin_token
                    and hmac.compare_digest(token.encode("utf-8"), admin_token.encode("utf-8")))

    @socketio.on("connect")
    def _connect(auth_data: Any = None) -> None:
        if is_admin(auth_data):
            join_room(ADMIN_ROOM)
        emit("metrics", snapshot())  # the new client sees numbers at once, not after the next tick
        if not started.is_set():
            started.set()
            socketio.start_background_task(push_metrics)


def create_app(config: Config | None = None, *, clock: Callable[[], float] = time.time) -> Flask:
    """Build the API. Raises ConfigError / database.DatabaseError with a one-line message."""
    config = (config or Config.from_env()).validate()
    configure_logging(config)
    log_redaction.install()  # werkzeug's and gunicorn's access logs quote ?api_key=
    if config.jwt_secret_generated:
        log.warning("JWT_SECRET_KEY is not set: using a random key for this process (tokens die on restart)")
    if config.web_concurrency > 1 and config.store_kind == "memory":
        log.warning("WEB_CONCURRENCY=%s without REDIS_URL: each worker keeps its own counters, so every limit "
                    "is multiplied by the number of workers. Set REDIS_URL.", config.web_concurrency)
    app = Flask(__name__, static_folder="static", template_folder="templates")
    app.config.update(MAX_CONTENT_LENGTH=config.max_content_length, TESTING=config.testing)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    if config.trusted_proxies:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]  # Flask's documented way to wrap the WSGI app
            app.wsgi_app, x_for=config.trusted_proxies, x_proto=config.trusted_proxies)
    errors.init_app(app)
    # Any limiter call may find the shared store down in fail mode "closed": always a JSON 503.
    app.register_error_handler(StoreUnavailable, lambda _exc: errors.error_response(
        503, "limiter_unavailable", "The rate-limit store is unreachable; try again shortly", {"Retry-After": "5"}))
    svc = build_services(config, clock)
    app.extensions["rl"] = svc  # reached through wiring.current(), typed
    auth.JWTManager(app, svc, clock=clock)
    svc.notifier.init_app(app)
    with app.app_context():
        try:
            current_app.extensions["jwt"].load_revocations()
        except StoreUnavailable:  # fail mode closed, store down: seeded on the first request that finds it empty
            log.warning("rate-limit store unreachable at start-up; revocations will be seeded when it answers")
    gateway.init_app(app, svc.engine)  # before the blueprints (URL converter) and after_request below
    for blueprint in (core, auth_bp, data_bp, sdk_bp, admin_bp, dashboard_bp, metrics_bp, gateway_bp):
        app.register_blueprint(blueprint)
    app.before_request(before_request)
    app.after_request(after_request)
    init_socketio(app, svc)
    return app  # starts nothing: the entry points call svc.start() (and svc.close() at the end)


# --- entry points --------------------------------------------------------------------------------

_lazy_app: Flask | None = None
_lazy_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """``app.app`` for gunicorn, built on first access so that importing this module does no I/O."""
    global _lazy_app
    if name != "app":
        raise AttributeError(name)
    with _lazy_lock:
        if _lazy_app is None:
            try:
                _lazy_app = create_app()
            except (ConfigError, db.DatabaseError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                # 3 is gunicorn's "worker failed to boot": the arbiter stops instead of respawning.
                raise SystemExit(3) from None
            svc: Services = _lazy_app.extensions["rl"]
            svc.start()
            atexit.register(svc.close)  # the worker's exit flushes analytics and logs
    return _lazy_app


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # SO_REUSEADDR as the server itself uses: connections of a killed predecessor in TIME_WAIT
        # must not make a restart look like a busy port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python app.py", description="Run the API rate limiter service.")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=None, help="default: PORT or 5000")
    parser.add_argument("--ssl-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--ssl-key", help="private key for --ssl-cert (PEM)")
    args = parser.parse_args(argv)
    if bool(args.ssl_cert) != bool(args.ssl_key):
        print("error: --ssl-cert and --ssl-key go together", file=sys.stderr)
        return 2
    try:
        config = Config.from_env()
        application = create_app(config)
    except (ConfigError, db.DatabaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    port = args.port or config.port
    if port_in_use(args.host, port):
        print(f"error: port {port} on {args.host} is already in use; stop the other process or use --port",
              file=sys.stderr)
        return 1
    ssl_context = (args.ssl_cert, args.ssl_key) if args.ssl_cert else None
    log.info("serving on %s://%s:%s", "https" if ssl_context else "http", args.host, port)
    svc: Services = application.extensions["rl"]
    svc.start()
    signal.signal(signal.SIGTERM, _interrupt)  # flush analytics and logs on a supervisor's TERM too
    try:
        if svc.socketio is not None:
            svc.socketio.run(application, host=args.host, port=port, ssl_context=ssl_context,
                             allow_unsafe_werkzeug=True, use_reloader=False, log_output=False)
        else:
            application.run(host=args.host, port=port, ssl_context=ssl_context, use_reloader=False, threaded=True)
    except KeyboardInterrupt:
        pass
    finally:
        svc.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
