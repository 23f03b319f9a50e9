"""The admin blueprint: users, keys, tiers, IP bans, overrides and credits, request logs, the
audit trail and alerts. Every route needs the admin token (``auth.admin_required``)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Response, g, jsonify, request

import auth
import database as db
import notifier as events
import policy_rules
import wiring
from api_io import int_arg, json_body, key_json, parse_timestamp, str_field, user_json
from config import DEFAULT_TIER, TIER_ORDER
from errors import ApiError, bad_request
from gate import ip_subject, key_subject, user_subject
from wiring import Services

admin_bp = Blueprint("admin", __name__)

MAX_PER_PAGE = 200


def revoke_in_store(svc: Services, key_id: int, key_hash: str) -> None:
    """Every worker refuses a revoked key on its next request: blocked in the shared meta."""
    svc.limiter.set_meta(key_subject(key_id, key_hash), tier=DEFAULT_TIER, blocked=True)
    svc.keys.forget(key_id)


def audit(conn: sa.Connection, action: str, target: str, **details: Any) -> None:
    db.add_audit(conn, g.admin_actor, action, target, details)


def find_user(conn: sa.Connection, body: dict[str, Any]) -> Any:
    user_id = body.get("user_id")
    username = body.get("username")
    if user_id is not None:
        if not isinstance(user_id, int) or isinstance(user_id, bool) or not 1 <= user_id <= 2**31 - 1:
            raise bad_request("user_id", "'user_id' must be an integer between 1 and 2147483647")
        row = conn.execute(sa.select(db.users).where(db.users.c.id == user_id)).first()
    elif username is not None:
        if not isinstance(username, str):
            raise bad_request("username", "'username' must be a string")
        row = conn.execute(sa.select(db.users).where(db.users.c.username == username)).first()
    else:
        raise bad_request("user_id", "Give 'user_id' or 'username'")
    if row is None:
        raise ApiError(404, "user_not_found", "No such user")
    return row


def find_key(conn: sa.Connection, body: dict[str, Any]) -> Any:
    c = db.api_keys.c
    condition: sa.ColumnElement[bool]
    if body.get("api_key") is not None:
        raw = str_field(body, "api_key", max_len=200)
        condition = c.key_hash == auth.hash_api_key(raw)
    elif body.get("key_id") is not None:
        key_id = body["key_id"]
        if not isinstance(key_id, int) or isinstance(key_id, bool) or not 1 <= key_id <= 2**31 - 1:
            raise bad_request("key_id", "'key_id' must be an integer between 1 and 2147483647")
        condition = c.id == key_id
    elif body.get("prefix") is not None:
        condition = c.prefix == str_field(body, "prefix", max_len=32)
    else:
        raise bad_request("api_key", "Give 'api_key', 'key_id' or 'prefix'")
    row = conn.execute(
        sa.select(db.api_keys, db.users.c.tier, db.users.c.username)
        .select_from(db.api_keys.join(db.users, db.api_keys.c.user_id == db.users.c.id))
        .where(condition)
    ).first()
    if row is None:
        raise ApiError(404, "key_not_found", "No such API key")
    return row


@admin_bp.get("/admin/users")
@auth.admin_required
def admin_users() -> Response:
    page = int_arg("page", 1)
    per_page = int_arg("per_page", 50, maximum=MAX_PER_PAGE)
    key_counts = (
        sa.select(db.api_keys.c.user_id, sa.func.count().label("n"))
        .where(db.api_keys.c.revoked_at.is_(None)).group_by(db.api_keys.c.user_id).subquery()
    )
    with wiring.current().engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(db.users)).scalar_one()
        rows = conn.execute(
            sa.select(db.users, sa.func.coalesce(key_counts.c.n, 0).label("key_count"))
            .select_from(db.users.outerjoin(key_counts, key_counts.c.user_id == db.users.c.id))
            .order_by(db.users.c.id).limit(per_page).offset((page - 1) * per_page)
        ).all()
    users = [{**user_json(row), "api_keys": row.key_count, "is_admin": bool(row.is_admin)} for row in rows]
    return jsonify(users=users, total=total, page=page, per_page=per_page)


@admin_bp.delete("/admin/users/<int(max=2147483647):user_id>")
@auth.admin_required
def delete_user(user_id: int) -> Response:
    """Delete a user with their keys and tokens; every worker refuses them on the next request."""
    svc = wiring.current()
    with svc.engine.begin() as conn:
        user = conn.execute(sa.select(db.users).where(db.users.c.id == user_id)).first()
        if user is None:
            raise ApiError(404, "user_not_found", "No such user")
        keys = conn.execute(sa.select(db.api_keys.c.id, db.api_keys.c.key_hash)
                            .where(db.api_keys.c.user_id == user_id)).all()
        conn.execute(db.api_keys.delete().where(db.api_keys.c.user_id == user_id))
        conn.execute(db.refresh_tokens.delete().where(db.refresh_tokens.c.user_id == user_id))
        conn.execute(db.users.delete().where(db.users.c.id == user_id))
        audit(conn, "delete_user", f"user:{user.username}", user_id=user_id, api_keys=len(keys))
    # Its JWTs die with it (and, carrying its account stamp, never match a later account).
    svc.limiter.set_meta(user_subject(user_id, auth.account_stamp(user.created_at)), tier=DEFAULT_TIER, blocked=True)
    for key in keys:
        revoke_in_store(svc, key.id, key.key_hash)
    svc.events.emit(events.USER_DELETED, user.username, user_id=user_id, api_keys=len(keys), actor=g.admin_actor)
    return jsonify(user={**user_json(user), "deleted": True}, api_keys_deleted=len(keys))


@admin_bp.get("/admin/keys")
@auth.admin_required
def admin_keys() -> Response:
    per_page = int_arg("per_page", 50, maximum=MAX_PER_PAGE)
    page = int_arg("page", 1)
    query = sa.select(db.api_keys, db.users.c.tier, db.users.c.username).select_from(
        db.api_keys.join(db.users, db.api_keys.c.user_id == db.users.c.id))
    user_id = request.args.get("user_id")
    if user_id:
        query = query.where(db.api_keys.c.user_id == int_arg("user_id", 0))
    with wiring.current().engine.connect() as conn:
        rows = conn.execute(query.order_by(db.api_keys.c.id).limit(per_page).offset((page - 1) * per_page)).all()
    keys = [{**key_json(row), "user_id": row.user_id, "username": row.username,
             "revoked": row.revoked_at is not None, "blocked_reason": row.blocked_reason} for row in rows]
    return jsonify(keys=keys, page=page, per_page=per_page)


@admin_bp.post("/admin/upgrade_tier")
@auth.admin_required
def upgrade_tier() -> Response:
    svc = wiring.current()
    body = json_body()
    tier = str_field(body, "tier", max_len=20)
    if tier not in svc.config.tier_limits:
        raise bad_request("tier", f"'tier' must be one of {', '.join(TIER_ORDER)}")
    with svc.engine.begin() as conn:
        user = find_user(conn, body)
        conn.execute(db.users.update().where(db.users.c.id == user.id).values(tier=tier, updated_at=db.utcnow()))
        keys = conn.execute(sa.select(db.api_keys.c.id, db.api_keys.c.key_hash, db.api_keys.c.blocked,
                                      db.api_keys.c.revoked_at).where(db.api_keys.c.user_id == user.id)).all()
        audit(conn, "upgrade_tier", f"user:{user.username}", old_tier=user.tier, new_tier=tier, user_id=user.id)
        updated = conn.execute(sa.select(db.users).where(db.users.c.id == user.id)).first()
    svc.limiter.set_meta(user_subject(user.id, auth.account_stamp(user.created_at)), tier=tier, blocked=False)
    for key in keys:
        svc.limiter.set_meta(key_subject(key.id, key.key_hash), tier=tier, blocked=bool(key.blocked or key.revoked_at))
    svc.events.emit(events.TIER_CHANGED, user.username, old_tier=user.tier, new_tier=tier, actor=g.admin_actor)
    return jsonify(user=user_json(updated))


def set_key_blocked(blocked: bool) -> Response:
    svc = wiring.current()
    body = json_body()
    reason = str_field(body, "reason", required=False, max_len=500) or ""
    with svc.engine.begin() as conn:
        key = find_key(conn, body)
        conn.execute(db.api_keys.update().where(db.api_keys.c.id == key.id)
                     .values(blocked=blocked, blocked_reason=reason if blocked else None))
        audit(conn, "block_key" if blocked else "unblock_key", f"key:{key.prefix}", key_id=key.id,
              owner=key.username, reason=reason)
    svc.limiter.set_meta(key_subject(key.id, key.key_hash), tier=key.tier,
                         blocked=blocked or key.revoked_at is not None)
    svc.events.emit(events.KEY_BLOCKED if blocked else events.KEY_UNBLOCKED, key.prefix, owner=key.username,
                    reason=reason, actor=g.admin_actor)
    return jsonify(key={"id": key.id, "prefix": key.prefix, "name": key.name, "blocked": blocked,
                        "reason": reason if blocked else None})


@admin_bp.post("/admin/block_key")
@auth.admin_required
def block_key() -> Response:
    return set_key_blocked(True)


@admin_bp.post("/admin/unblock_key")
@auth.admin_required
def unblock_key() -> Response:
    return set_key_blocked(False)


@admin_bp.post("/admin/revoke_key")
@auth.admin_required
def admin_revoke_key() -> Response:
    svc = wiring.current()
    body = json_body()
    with svc.engine.begin() as conn:
        key = find_key(conn, body)
        conn.execute(db.api_keys.update().where(db.api_keys.c.id == key.id).values(revoked_at=db.utcnow()))
        audit(conn, "revoke_key", f"key:{key.prefix}", key_id=key.id, owner=key.username)
    revoke_in_store(svc, key.id, key.key_hash)
    svc.events.emit(events.KEY_BANNED, key.prefix, owner=key.username, actor=g.admin_actor, severity="warning")
    return jsonify(key={"id": key.id, "prefix": key.prefix, "revoked": True, "blocked": True})


@admin_bp.get("/admin/bans")
@auth.admin_required
def list_bans() -> Response:
    return jsonify(bans=wiring.current().limiter.list_bans())


def ip_field(body: dict[str, Any]) -> str:
    """The subject an admin ban names: an IPv6 address (or a network inside one subject, as
    /admin/bans lists it) means its whole /IPV6_PREFIX_LENGTH network, as requests are counted."""
    raw = str_field(body, "ip", max_len=64).strip()
    prefix = wiring.current().config.ipv6_prefix_length
    try:
        network = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise bad_request("ip", "'ip' must be an IPv4 or IPv6 address") from None
    if network.num_addresses == 1:
        return ip_subject(str(network.network_address), prefix)
    if network.version == 6 and network.prefixlen >= prefix:
        return ip_subject(str(network.network_address), prefix)
    raise bad_request("ip", f"'ip' must be an address, or an IPv6 network of at least /{prefix} "
                            "(IPV6_PREFIX_LENGTH)")


@admin_bp.post("/admin/ban_ip")
@auth.admin_required
def ban_ip() -> Response:
    svc = wiring.current()
    body = json_body()
    ip = ip_field(body)
    seconds = body.get("seconds", svc.config.temp_ban_seconds)
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not 1 <= seconds <= 30 * 86400:
        raise bad_request("seconds", "'seconds' must be an integer between 1 and 2592000")
    svc.limiter.ban_ip(ip, seconds)
    now = db.utcnow()
    with svc.engine.begin() as conn:
        conn.execute(db.ip_bans.insert().values(ip=ip, banned_at=now, expires_at=now + dt.timedelta(seconds=seconds),
                                                ban_count=1, reason="admin"))
        audit(conn, "ban_ip", f"ip:{ip}", seconds=seconds)
    svc.events.emit(events.IP_BANNED, ip, seconds=seconds, actor=g.admin_actor)
    return jsonify(ban={"ip": ip, "seconds": seconds})


@admin_bp.post("/admin/unban_ip")
@auth.admin_required
def unban_ip() -> Response:
    svc = wiring.current()
    ip = ip_field(json_body())
    lifted = svc.limiter.unban_ip(ip)
    if not lifted:
        raise ApiError(404, "ban_not_found", f"{ip} is not banned")
    with svc.engine.begin() as conn:
        conn.execute(db.ip_bans.update().where(db.ip_bans.c.ip == ip, db.ip_bans.c.lifted_at.is_(None))
                     .values(lifted_at=db.utcnow()))
        audit(conn, "unban_ip", f"ip:{ip}")
    svc.events.emit(events.IP_UNBANNED, ip, actor=g.admin_actor)
    return jsonify(ban={"ip": ip, "lifted": True})


def parse_since(raw: str | None) -> dt.datetime | None:
    if not raw:
        return None
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        if value.tzinfo is not None:  # year 1 or 9999 with an offset overflows here
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise bad_request("since", "'since' must be an ISO 8601 timestamp, e.g. 2026-12-01T10:00:00Z") from None
    return value


@admin_bp.get("/logs")
@auth.admin_required
def logs() -> Response:
    svc = wiring.current()
    limit = int_arg("limit", 100, maximum=1000)
    level = (request.args.get("level") or "").upper()
    if level and level not in ("INFO", "WARNING", "ERROR"):
        raise bad_request("level", "'level' must be INFO, WARNING or ERROR")
    since = parse_since(request.args.get("since"))
    svc.log_writer.flush_now()
    c = db.request_logs.c
    query = sa.select(db.request_logs).order_by(c.id.desc()).limit(limit)
    if level:
        query = query.where(c.level == level)
    if since is not None:
        query = query.where(c.timestamp >= since)
    with svc.engine.connect() as conn:
        rows = conn.execute(query).all()
    entries = [{"timestamp": db.iso(r.timestamp), "level": r.level, "method": r.method, "path": r.path,
                "status": r.status, "ip": r.ip, "key_prefix": r.key_prefix, "duration_ms": r.duration_ms,
                "message": r.message} for r in rows]
    return jsonify(logs=entries)


@admin_bp.get("/admin/audit")
@auth.admin_required
def audit_entries() -> Response:
    limit = int_arg("limit", 100, maximum=1000)
    with wiring.current().engine.connect() as conn:
        rows = conn.execute(sa.select(db.audit_log).order_by(db.audit_log.c.id.desc()).limit(limit)).all()
    entries = [{"id": r.id, "timestamp": db.iso(r.timestamp), "actor": r.actor, "action": r.action,
                "target": r.target, "details": json.loads(r.details or "{}")} for r in rows]
    return jsonify(entries=entries)


@admin_bp.get("/admin/alerts")
@auth.admin_required
def admin_alerts() -> Response:
    return jsonify(alerts=recent_alerts(int_arg("limit", 50, maximum=500)))


def recent_alerts(limit: int) -> list[dict[str, Any]]:
    svc = wiring.current()
    svc.alert_writer.flush_now()
    with svc.engine.connect() as conn:
        rows = conn.execute(sa.select(db.alerts).order_by(db.alerts.c.id.desc()).limit(limit)).all()
    return [{"timestamp": db.iso(r.timestamp), "kind": r.kind, "source": r.source, "severity": r.severity,
             "details": json.loads(r.details or "{}")} for r in rows]


# --- admin: limit overrides and credits (policy_rules.py mirrors them into the limiter store) ---

MAX_OVERRIDES_LISTED = 500


def publish_policy(svc: Services, *, subjects: Sequence[str] = (), key_id: int | None = None,
                   user_id: int | None = None) -> None:
    """Mirror the effective override and credits of these subjects, of a key, or of a user (their
    JWT subject and every key) into the limiter store's meta."""
    subjects = list(subjects)
    if key_id is not None or user_id is not None:
        with svc.engine.connect() as conn:
            keys, users = policy_rules.affected_rows(conn, key_id=key_id, user_id=user_id)
        subjects += [key_subject(row.id, row.key_hash) for row in keys]
        subjects += [user_subject(row.id, auth.account_stamp(row.created_at)) for row in users]
    policy_rules.publish(svc, subjects)


@admin_bp.post("/admin/overrides")
@auth.admin_required
def create_override() -> tuple[Response, int]:
    """Replace the tier's limits of a key, or of a user and all their keys, until ``expires_at``."""
    svc = wiring.current()
    policy_rules.require_policy_store(svc.limiter)
    body = json_body()
    limits = policy_rules.parse_override_limits(body)
    expires_at = parse_timestamp(body, "expires_at", after=svc.clock())
    reason = str_field(body, "reason", required=False, max_len=500) or ""
    with svc.engine.begin() as conn:
        if any(body.get(name) is not None for name in ("key_id", "prefix", "api_key")):
            key = find_key(conn, body)
            target, key_id, user_id = f"key:{key.prefix}", key.id, None
        else:
            user = find_user(conn, body)
            target, key_id, user_id = f"user:{user.username}", None, user.id
        override_id = conn.execute(db.rate_overrides.insert().values(
            key_id=key_id, user_id=user_id, limits=json.dumps(limits), reason=reason, created_at=db.utcnow(),
            created_by=g.admin_actor, expires_at=expires_at,
        ).returning(db.rate_overrides.c.id)).scalar_one()
        audit(conn, "create_override", target, override_id=override_id, limits=limits, reason=reason,
              expires_at=db.iso(expires_at))
        row = conn.execute(sa.select(db.rate_overrides).where(db.rate_overrides.c.id == override_id)).one()
    publish_policy(svc, key_id=key_id, user_id=user_id)
    svc.events.emit(events.OVERRIDE_CREATED, target, override_id=override_id, limits=limits, actor=g.admin_actor)
    return jsonify(override={**policy_rules.override_json(row, svc.clock()), "target": target}), 201


@admin_bp.get("/admin/overrides")
@auth.admin_required
def list_overrides() -> Response:
    svc = wiring.current()
    with svc.engine.connect() as conn:
        rows = conn.execute(sa.select(db.rate_overrides).order_by(db.rate_overrides.c.id.desc())
                            .limit(MAX_OVERRIDES_LISTED)).all()
    now = svc.clock()
    return jsonify(overrides=[policy_rules.override_json(row, now) for row in rows])


@admin_bp.delete("/admin/overrides/<int(max=2147483647):override_id>")
@auth.admin_required
def delete_override(override_id: int) -> Response:
    svc = wiring.current()
    with svc.engine.begin() as conn:
        row = conn.execute(sa.select(db.rate_overrides).where(db.rate_overrides.c.id == override_id)).first()
        if row is None:
            raise ApiError(404, "override_not_found", f"No override with id {override_id}")
        conn.execute(db.rate_overrides.delete().where(db.rate_overrides.c.id == override_id))
        target = f"key:{row.key_id}" if row.key_id is not None else f"user:{row.user_id}"
        audit(conn, "delete_override", target, override_id=override_id, limits=json.loads(row.limits))
    publish_policy(svc, key_id=row.key_id, user_id=row.user_id)
    svc.events.emit(events.OVERRIDE_DELETED, target, override_id=override_id, actor=g.admin_actor)
    return jsonify(override={**policy_rules.override_json(row, svc.clock()), "deleted": True})


@admin_bp.post("/admin/keys/<int(max=2147483647):key_id>/credits")
@auth.admin_required
def set_key_credits(key_id: int) -> Response:
    """Grant credits (spent by each admitted request's cost), optionally refilled every day or month."""
    svc = wiring.current()
    policy_rules.require_policy_store(svc.limiter)
    credits, amount, every = policy_rules.parse_credits(json_body())
    with svc.engine.begin() as conn:
        key = find_key(conn, {"key_id": key_id})
        conn.execute(db.api_keys.update().where(db.api_keys.c.id == key_id).values(
            credits=credits, credit_refill_amount=amount, credit_refill_every=every))
        audit(conn, "set_credits", f"key:{key.prefix}", key_id=key_id, credits=credits, refill_amount=amount,
              refill_every=every)
    if credits is not None:
        svc.limiter.set_credits(key_subject(key.id, key.key_hash), credits, refill=amount, every=every)
    svc.credit_grants.pop(key_id, None)
    publish_policy(svc, key_id=key_id)
    svc.events.emit(events.CREDITS_SET, key.prefix, key_id=key_id, credits=credits, refill_amount=amount,
                    refill_every=every, actor=g.admin_actor)
    refill = {"amount": amount, "every": every} if amount is not None else None
    return jsonify(key={"id": key_id, "prefix": key.prefix, "credits": credits, "refill": refill,
                        "credits_remaining": credits})
