"""Policy glue between the HTTP API and the limiter: the headers of multi-limit decisions, runtime
overrides and credits.

Overrides and credits are rows in the database (the record, audited) mirrored into the limiter
store's per-subject meta, where every decision already reads tier and blocked state: a change is
seen by every worker and instance on its next request, without a database read per request.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from flask import g

import database as db
from errors import ApiError, bad_request
from limiter import PolicyDecision
from policy import MAX_COST, Limit, override_limits

CREDIT_PERIODS = ("day", "month")
MAX_CREDITS = 1_000_000_000
LOW_CREDITS_FRACTION = 10  # alert when a key's credits fall to a tenth of its grant (or refill)


def policy_headers(decision: PolicyDecision, now: float) -> dict[str, str]:
    """``RateLimit-Policy`` lists every limit that applied; the others report the limit closest to
    refusal (or the one that refused)."""
    reported, result = decision.reported, decision.result
    assert reported is not None and result is not None
    reset = math.ceil(result.reset)
    headers = {
        "X-RateLimit-Limit": str(reported.quota),
        "X-RateLimit-Remaining": str(result.remaining),
        "X-RateLimit-Reset": str(reset),
        "RateLimit-Policy": ", ".join(f'"{o.name}";q={o.quota};w={o.window}' for o in decision.limits),
        "RateLimit": f'"{reported.name}";r={result.remaining};t={max(0, math.ceil(result.reset - now))}',
    }
    if not decision.allowed and not decision.credits_exhausted:
        headers["Retry-After"] = str(max(1, math.ceil(result.retry_after)))
    return headers


def usage_fields(decision: Any) -> dict[str, Any]:
    """Extra /usage fields: the key's credits and, for a multi-limit decision, every limit."""
    if not isinstance(decision, PolicyDecision):
        return {"credits_remaining": None}
    return {
        "credits_remaining": decision.credits,
        "policies": [{"name": o.name, "limit": o.quota, "remaining": o.result.remaining, "window_seconds": o.window,
                      "reset_epoch": math.ceil(o.result.reset), "shadow": o.shadow} for o in decision.limits],
    }


def with_credits(svc: Any, key: dict[str, Any], row: Any, subject: str) -> dict[str, Any]:
    """A key's JSON plus ``credits_remaining`` (None when the key has no credits)."""
    key["credits_remaining"] = svc.limiter.credits_remaining(subject) if row.credits is not None else None
    return key


def track_target(body: dict[str, Any], method: str, endpoint: str) -> None:
    """/sdk/track counts a call to the owner's ``endpoint``: route rules match it, and ``cost`` (bounded)
    replaces the route's cost."""
    g.rule_target = (method, endpoint)
    cost = body.get("cost")
    if cost is None:
        return
    if not isinstance(cost, int) or isinstance(cost, bool) or not 1 <= cost <= MAX_COST:
        raise bad_request("cost", f"'cost' must be an integer from 1 to {MAX_COST}")
    g.rule_cost = cost


# --- overrides and credits in the database ----------------------------------------------------

def _active(now: float) -> Any:
    c = db.rate_overrides.c
    return sa.or_(c.expires_at.is_(None), c.expires_at > db.from_epoch(now))


def _newest_override(conn: sa.Connection, now: float, **target: int) -> Any:
    c = db.rate_overrides.c
    column, value = next(iter(target.items()))
    return conn.execute(sa.select(db.rate_overrides).where(getattr(c, column) == value, _active(now))
                        .order_by(c.id.desc()).limit(1)).first()


def subject_policy_meta(conn: sa.Connection, subject: str, now: float) -> tuple[tuple[Limit, ...], float | None, bool]:
    """(override limits, their expiry epoch, has credits) of ``k:<id>`` or ``u:<id>``: a key's own
    override wins over its owner's."""
    kind, _, rest = subject.partition(":")
    ident = rest.partition(".")[0]  # "k:<id>.<hash tag>", "u:<id>.<account stamp>"
    row = credits_on = None
    if kind == "k":
        key = conn.execute(sa.select(db.api_keys.c.user_id, db.api_keys.c.credits)
                           .where(db.api_keys.c.id == int(ident))).first()
        if key is None:
            return (), None, False
        credits_on = key.credits is not None
        row = _newest_override(conn, now, key_id=int(ident)) or _newest_override(conn, now, user_id=key.user_id)
    else:
        row = _newest_override(conn, now, user_id=int(ident))
    if row is None:
        return (), None, bool(credits_on)
    return override_limits(json.loads(row.limits)), db.epoch(row.expires_at), bool(credits_on)


def affected_rows(conn: sa.Connection, *, key_id: int | None = None,
                  user_id: int | None = None) -> tuple[list[Any], list[Any]]:
    """(key rows, user rows) whose effective override changes with one on this key or user."""
    k, u = db.api_keys.c, db.users.c
    if key_id is not None:
        return list(conn.execute(sa.select(k.id, k.key_hash).where(k.id == key_id))), []
    keys = list(conn.execute(sa.select(k.id, k.key_hash).where(k.user_id == user_id)))
    return keys, list(conn.execute(sa.select(u.id, u.created_at).where(u.id == user_id)))


def publish(svc: Any, subjects: Iterable[str]) -> None:
    """Mirror the subjects' effective override and credits flag into the limiter store's meta."""
    now = svc.clock()
    with svc.engine.connect() as conn:
        metas = [(subject, subject_policy_meta(conn, subject, now)) for subject in subjects]
    for subject, (limits, expires, credits_on) in metas:
        svc.limiter.set_policy_meta(subject, override=limits, expires_at=expires, credits=credits_on)


def override_json(row: Any, now: float) -> dict[str, Any]:
    expires = db.epoch(row.expires_at)
    return {"id": row.id, "key_id": row.key_id, "user_id": row.user_id, "limits": json.loads(row.limits),
            "reason": row.reason, "created_at": db.iso(row.created_at), "created_by": row.created_by,
            "expires_at": db.iso(row.expires_at), "active": expires is None or expires > now}


def require_policy_store(limiter: Any) -> None:
    """Overrides and credits need the policy script, which a Redis Cluster store does not run yet:
    refuse them there (409) rather than accept a setting that no decision would apply."""
    if not limiter.supports_policy:
        raise ApiError(409, "unsupported_by_store",
                       "Overrides and credits need one Redis, Sentinel or the memory store, not Redis Cluster")


def parse_override_limits(body: dict[str, Any]) -> list[str]:
    """The override's ``limits`` as given (validated like a tier's), or a 400 naming the field."""
    raw = body.get("limits")
    if not isinstance(raw, list) or not all(isinstance(item, str) and len(item) <= 40 for item in raw):
        raise bad_request("limits", "'limits' must be a list of rates like [\"50/minute\", \"1000/day\"]")
    try:
        override_limits(raw)
    except ValueError as exc:
        raise bad_request("limits", f"'limits' {exc}") from None
    return raw


def parse_credits(body: dict[str, Any]) -> tuple[int | None, int | None, str | None]:
    """(credits, refill amount, refill period) of POST /admin/keys/{id}/credits; credits None removes them."""
    credits = body.get("credits", ...)
    if credits is ...:
        raise bad_request("credits", "'credits' is required (null removes the key's credits)")
    if credits is not None and (not isinstance(credits, int) or isinstance(credits, bool)
                                or not 0 <= credits <= MAX_CREDITS):
        raise bad_request("credits", f"'credits' must be an integer from 0 to {MAX_CREDITS}, or null")
    refill = body.get("refill")
    if refill is None:
        return credits, None, None
    if credits is None or not isinstance(refill, dict):
        raise bad_request("refill", "'refill' must be an object {\"amount\": N, \"every\": \"day\"|\"month\"}")
    amount, every = refill.get("amount"), refill.get("every")
    if not isinstance(amount, int) or isinstance(amount, bool) or not 1 <= amount <= MAX_CREDITS:
        raise bad_request("refill", f"'refill.amount' must be an integer from 1 to {MAX_CREDITS}")
    if every not in CREDIT_PERIODS:
        raise bad_request("refill", "'refill.every' must be \"day\" or \"month\"")
    return credits, amount, every


def low_credit_threshold(grant: int | None, refill: int | None) -> int:
    """Credits at or below which the owner is alerted: a tenth of the refill, else of the grant."""
    base = refill or grant or 0
    return max(1, base // LOW_CREDITS_FRACTION)
