"""Request input and JSON shapes shared by the blueprints: the JSON body and its fields, query
integers, timestamps, and how users and keys are rendered."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal, overload

from flask import request

import database as db
from errors import ApiError, bad_request


def json_body(*, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object, or a 415/400 naming what is wrong."""
    if optional and not request.get_data(cache=True):
        return {}
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "Send the body as JSON with Content-Type: application/json")
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # nesting deeper than the parser allows
        body = None
    if body is None:
        raise ApiError(400, "malformed_json", "The request body is not valid JSON")
    if not isinstance(body, dict):
        raise ApiError(400, "malformed_json", "The JSON body must be an object")
    for name, value in body.items():
        if not storable_text(name):
            raise ApiError(400, "malformed_json", "A member name holds a NUL character or an unpaired surrogate")
        if not storable_text(value):
            label = name[:100] or '""'  # an empty member name is still a field to name
            raise bad_request(label, f"'{label}' must not contain NUL characters or unpaired surrogates")
    return body


def storable_text(value: Any) -> bool:
    """False if a string in ``value`` (nested lists and objects included) holds a NUL, which
    PostgreSQL cannot store in text, or a lone surrogate ("\\ud800" parses as JSON), which UTF-8
    cannot encode, so cannot be hashed, stored or logged. Checked once for every JSON body, so no
    route can forget it."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item or not item.isascii() and _has_surrogate(item):
                return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


@overload
def str_field(body: dict[str, Any], name: str, *, required: Literal[True] = True, max_len: int = 200) -> str: ...


@overload
def str_field(body: dict[str, Any], name: str, *, required: bool, max_len: int = 200) -> str | None: ...


def str_field(body: dict[str, Any], name: str, *, required: bool = True, max_len: int = 200) -> str | None:
    """A string member of the body: 400 if it is missing (when required), not a string, holds a NUL or is
    longer than ``max_len``."""
    value = body.get(name)
    if value is None:
        if required:
            raise bad_request(name, f"'{name}' is required")
        return None
    if not isinstance(value, str):
        raise bad_request(name, f"'{name}' must be a string")
    if "\x00" in value:  # PostgreSQL cannot store NUL in text, and no field has a use for it
        raise bad_request(name, f"'{name}' must not contain NUL characters")
    if len(value) > max_len:
        raise bad_request(name, f"'{name}' must be at most {max_len} characters")
    return value


def int_arg(name: str, default: int, *, minimum: int = 1, maximum: int = 2**31 - 1) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bad_request(name, f"'{name}' must be an integer") from None
    if value < minimum or value > maximum:  # the default maximum keeps ids and offsets in database range
        raise bad_request(name, f"'{name}' must be at least {minimum} and at most {maximum}")
    return value


def user_json(row: Any) -> dict[str, Any]:
    return {"id": row.id, "username": row.username, "email": row.email, "tier": row.tier,
            "created_at": db.iso(row.created_at)}


def key_json(row: Any) -> dict[str, Any]:
    return {"id": row.id, "prefix": row.prefix, "name": row.name, "tier": row.tier, "blocked": bool(row.blocked),
            "created_at": db.iso(row.created_at), "last_used_at": db.iso(row.last_used_at),
            "expires_at": db.iso(row.expires_at)}


def parse_timestamp(body: dict[str, Any], name: str, *, after: float) -> dt.datetime | None:
    """An optional ISO 8601 field as naive UTC; 400 unless it lies after ``after`` (epoch seconds)."""
    raw = str_field(body, name, required=False, max_len=40)
    if raw is None:
        return None
    try:
        value = dt.datetime.fromisoformat(raw.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        epoch = db.epoch(value)
    except (ValueError, OverflowError):
        raise bad_request(name, f"'{name}' must be an ISO 8601 timestamp, e.g. 2026-12-31T23:59:59Z") from None
    if epoch is None or epoch <= after:
        raise bad_request(name, f"'{name}' must lie in the future")
    return value
