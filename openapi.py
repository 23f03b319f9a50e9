"""The OpenAPI 3.1 document served at ``GET /openapi.json``.

``ROUTES`` is the declarative table: one dict per path and method, naming its auth mode, request
body, success response and the error codes its view raises. ``build_spec`` expands each entry with
what the request pipeline adds to every route (per-IP limit, JSON body errors, auth errors), so the
table lists only what is particular to a route. ``ERROR_CODES`` is the catalogue of machine codes.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask

from config import TIER_ORDER

OPENAPI_VERSION = "3.1.0"
MAX_ID = 2**31 - 1  # ids are 32-bit database integers; larger values are refused with 400/404
DEFAULT_TIERS = TIER_ORDER
ISO_EXAMPLE = "2026-12-01T10:00:00Z"

Schema = dict[str, Any]


# --- schema helpers --------------------------------------------------------------------------

def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None, **extra: Any) -> Schema:
    """A JSON object with these required and optional properties (extra properties allowed)."""
    schema: Schema = {"type": "object", "properties": {**required, **(optional or {})}}
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


def string(**kw: Any) -> Schema:
    return {"type": "string", **kw}


def nullable_string(**kw: Any) -> Schema:
    return {"type": ["string", "null"], **kw}


def integer(**kw: Any) -> Schema:
    return {"type": "integer", **kw}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


TIMESTAMP = string(format="date-time", description="ISO 8601 UTC", examples=[ISO_EXAMPLE])
NULLABLE_TIMESTAMP = nullable_string(format="date-time", description="ISO 8601 UTC, or null")
ID = integer(minimum=1, maximum=MAX_ID)
COUNTS = {"type": "object", "additionalProperties": integer(minimum=0)}


# --- error catalogue -------------------------------------------------------------------------
# code -> (status, meaning). The codes views raise (app.py, auth.py) and the ones errors.py maps
# werkzeug's own HTTP errors to.

ERROR_CODES: dict[str, tuple[int, str]] = {
    "invalid_field": (400, "A field or query parameter is missing or invalid (wrong type, too long, out of range, "
                           "a NUL character or an unpaired surrogate); `field` names it"),
    "malformed_json": (400, "The body is not valid JSON, not an object, too deeply nested, or a member name holds "
                            "a NUL character or an unpaired surrogate"),
    "missing_forwarded_uri": (400, "A /forward_auth call names no original request (X-Forwarded-Uri, X-Original-URI)"),
    "missing_api_key": (401, "No API key in X-API-Key, ?api_key= or the body"),
    "invalid_api_key": (401, "The API key is unknown or revoked"),
    "api_key_expired": (401, "The API key's expires_at has passed; `expired_at` says when"),
    "missing_token": (401, "No Authorization: Bearer <access_token> header"),
    "invalid_token": (401, "The token is malformed, badly signed, of the wrong type, or its account is gone"),
    "token_expired": (401, "The token has expired"),
    "token_revoked": (401, "The access token was revoked by a logout"),
    "token_reused": (401, "The refresh token was already spent or revoked; its whole login is revoked"),
    "invalid_credentials": (401, "Unknown username or wrong password (the same answer for both)"),
    "missing_admin_token": (401, "No Authorization: Bearer <ADMIN_TOKEN> header"),
    "invalid_admin_token": (401, "The admin token is not valid"),
    "api_key_blocked": (403, "An administrator blocked this API key; `reason` says why"),
    "credits_exhausted": (403, "The key's credits are spent (its rate limits admitted the request); nothing was spent"),
    "forbidden": (403, "Authenticated but not allowed (not an admin; another user's refresh token)"),
    "key_not_found": (404, "No such API key (or not one of yours)"),
    "user_not_found": (404, "No such user"),
    "ban_not_found": (404, "That IP address is not banned"),
    "override_not_found": (404, "No limit override with that id"),
    "not_found": (404, "No route matches the URL"),
    "method_not_allowed": (405, "The route exists but not with this method; `Allow` lists the methods"),
    "username_taken": (409, "The username is already registered"),
    "unsupported_by_store": (409, "Overrides and credits are not available on a Redis Cluster store"),
    "too_many_keys": (409, "The account already holds the maximum number of active API keys"),
    "payload_too_large": (413, "The body is larger than MAX_CONTENT_LENGTH (64 KiB by default)"),
    "unsupported_media_type": (415, "The body is not sent as Content-Type: application/json"),
    "rate_limit_exceeded": (429, "The key's (or user's) tier limit for the window is used up"),
    "ip_banned": (429, "This IP address exceeded the per-IP limit and is banned for a while"),
    "too_many_registrations": (429, "Too many accounts registered from this IP address in the last hour"),
    "too_many_failed_logins": (429, "Too many failed sign-ins from this IP address"),
    "internal_error": (500, "A bug: the server logged it. No input should produce this"),
    "limiter_unavailable": (503, "The shared rate-limit store is unreachable (RATELIMIT_FAIL_MODE=closed)"),
}

# Codes whose body carries more than error/message, and the component describing it.
ERROR_SCHEMAS = {
    "invalid_field": "FieldError",
    "api_key_blocked": "BlockedKeyError",
    "rate_limit_exceeded": "RateLimitError",
    "ip_banned": "RetryError",
    "too_many_registrations": "RetryError",
    "too_many_failed_logins": "RetryError",
}
RETRY_CODES = {"rate_limit_exceeded", "ip_banned", "too_many_registrations", "too_many_failed_logins",
               "limiter_unavailable"}

AUTH_ERRORS: dict[str, dict[int, list[str]]] = {
    "key": {401: ["missing_api_key", "invalid_api_key", "api_key_expired"],
            403: ["api_key_blocked", "credits_exhausted"]},
    "key_or_jwt": {401: ["missing_api_key", "invalid_api_key", "api_key_expired", "invalid_token", "token_expired",
                         "token_revoked"],
                   403: ["api_key_blocked", "credits_exhausted"]},
    "jwt": {401: ["missing_token", "invalid_token", "token_expired", "token_revoked"]},
    "admin": {401: ["missing_admin_token", "invalid_admin_token"], 403: ["forbidden"]},
    "optional_admin": {401: ["invalid_admin_token"], 403: ["forbidden"]},
}
SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "none": [],
    "key": [{"apiKeyHeader": []}, {"apiKeyQuery": []}],
    "key_or_jwt": [{"apiKeyHeader": []}, {"apiKeyQuery": []}, {"bearerAuth": []}],
    "jwt": [{"bearerAuth": []}],
    "admin": [{"adminToken": []}],
    "optional_admin": [{}, {"adminToken": []}],
}
BODY_ERRORS = {400: ["malformed_json"], 413: ["payload_too_large"], 415: ["unsupported_media_type"]}


# --- request parameters ----------------------------------------------------------------------

API_KEY_PARAMS = [
    {"name": "X-API-Key", "in": "header", "required": False, "schema": string(),
     "description": "API key (preferred over the query parameter, which ends up in access logs)"},
    {"name": "api_key", "in": "query", "required": False, "schema": string(), "description": "API key"},
]


def query_int(name: str, default: int | None, maximum: int = MAX_ID, description: str = "") -> Schema:
    schema = integer(minimum=1, maximum=maximum)
    if default is not None:
        schema["default"] = default
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


ANALYTICS_MINUTES = query_int("minutes", 60, maximum=1440, description="range in minutes: at most 180 without the "
                              "admin token (figures up to 5 s old), 1440 with it")
PAGING = [query_int("page", 1, description="1-based page number"),
          query_int("per_page", 50, maximum=200, description="items per page")]


# --- request bodies --------------------------------------------------------------------------

KEY_SELECTOR: dict[str, Schema] = {
    "api_key": string(maxLength=200, description="the full key"),
    "key_id": {**ID, "description": "the key's id"},
    "prefix": string(maxLength=32, description="the key's visible prefix, e.g. rl_1a2b3c4d"),
}
SELECT_KEY = [{"required": ["api_key"]}, {"required": ["key_id"]}, {"required": ["prefix"]}]
IP_ADDRESS = string(maxLength=64, anyOf=[{"format": "ipv4"}, {"format": "ipv6"}], examples=["203.0.113.7"])

BODIES: dict[str, Schema] = {
    "Register": obj(
        {"username": string(pattern=r"^[A-Za-z0-9_.-]{3,64}$", examples=["alice"]),
         "password": string(minLength=8, maxLength=1024, examples=["correct horse battery"])},
        {"email": nullable_string(maxLength=254, pattern=r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$",
                                  examples=["alice@example.com"])},
    ),
    "Login": obj({"username": string(maxLength=64), "password": string(maxLength=1024)}),
    "Refresh": obj({"refresh_token": string(maxLength=4096)}),
    "Logout": obj({}, {"refresh_token": nullable_string(maxLength=4096, description="also revoke this login")}),
    "CreateKey": obj({}, {"name": nullable_string(maxLength=100, examples=["production"]),
                          "expires_at": nullable_string(format="date-time", maxLength=40, examples=[ISO_EXAMPLE],
                                                        description="ISO 8601; must lie in the future")}),
    "SdkCheck": obj({"api_key": string()}, {"endpoint": nullable_string(maxLength=500, examples=["/data"])}),
    "SdkTrack": obj(
        {"api_key": string(), "endpoint": string(maxLength=500, examples=["/data"])},
        {"method": nullable_string(maxLength=10, examples=["GET"]),
         "status": {"type": ["integer", "null"], "minimum": 100, "maximum": 599, "examples": [200]},
         "cost": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000, "examples": [5],
                  "description": "units of every limit (and credits) this call spends; default the route's cost"}},
    ),
    "UpgradeTier": obj(
        {"tier": ref("Tier")},
        {"user_id": {**ID}, "username": string()},
        anyOf=[{"required": ["user_id"]}, {"required": ["username"]}],
    ),
    "BlockKey": obj({}, {**KEY_SELECTOR, "reason": nullable_string(maxLength=500)}, anyOf=SELECT_KEY),
    "SelectKey": obj({}, KEY_SELECTOR, anyOf=SELECT_KEY),
    "BanIp": obj({"ip": IP_ADDRESS}, {"seconds": integer(minimum=1, maximum=30 * 86400, default=300)}),
    "UnbanIp": obj({"ip": IP_ADDRESS}),
    "Override": obj(
        {"limits": {**array(string(maxLength=40, examples=["50/minute"])), "minItems": 1, "maxItems": 8,
                    "description": "rates in Flask-Limiter notation; two may not share a window"}},
        {"key_id": {**ID}, "prefix": string(maxLength=32), "user_id": {**ID}, "username": string(),
         "expires_at": nullable_string(format="date-time", maxLength=40, description="ISO 8601, in the future"),
         "reason": nullable_string(maxLength=500)},
        anyOf=[{"required": ["key_id"]}, {"required": ["prefix"]}, {"required": ["user_id"]},
               {"required": ["username"]}],
    ),
    "Credits": obj(
        {"credits": {"type": ["integer", "null"], "minimum": 0, "maximum": 1_000_000_000,
                     "description": "the balance to set; null removes the key's credits"}},
        {"refill": {"type": ["object", "null"], "required": ["amount", "every"],
                    "properties": {"amount": integer(minimum=1, maximum=1_000_000_000),
                                   "every": string(enum=["day", "month"])}}},
    ),
}


# --- response bodies -------------------------------------------------------------------------

USER = obj({"id": ID, "username": string(), "email": nullable_string(), "tier": ref("Tier"),
            "created_at": TIMESTAMP})
API_KEY = obj({"id": ID, "prefix": string(), "name": string(), "tier": ref("Tier"), "blocked": {"type": "boolean"},
               "created_at": TIMESTAMP, "last_used_at": NULLABLE_TIMESTAMP},
              {"expires_at": NULLABLE_TIMESTAMP, "credits_remaining": {"type": ["integer", "null"]}})
TOKENS: dict[str, Schema] = {
    "access_token": string(description="JWT, send as Authorization: Bearer"),
    "refresh_token": string(description="JWT, single use: POST /auth/refresh"),
    "token_type": {"const": "Bearer"},
    "expires_in": integer(minimum=1, description="access token lifetime in seconds"),
}
USAGE = obj({"limit": integer(minimum=1), "remaining": integer(minimum=0), "reset_epoch": integer()})
METRICS = obj(
    {"uptime_seconds": {"type": "number"}, "requests_total": integer(minimum=0),
     "allowed_total": integer(minimum=0), "rate_limited_total": integer(minimum=0),
     "by_tier": {"type": "object", "additionalProperties": COUNTS}, "by_status": COUNTS},
    {"ip_refused_total": integer(minimum=0), "alerts": COUNTS, "avg_response_ms": {"type": "number"},
     "shadow_refusals": {**COUNTS, "description": "requests a shadow limit would have refused, per limit name"}},
)
OVERRIDE = obj({"id": ID, "key_id": {"type": ["integer", "null"]}, "user_id": {"type": ["integer", "null"]},
                "limits": array(string()), "reason": string(), "created_at": TIMESTAMP, "created_by": string(),
                "expires_at": NULLABLE_TIMESTAMP, "active": {"type": "boolean"}},
               {"target": string(), "deleted": {"const": True}})
ALERT = obj({"timestamp": TIMESTAMP, "kind": string(), "source": string(), "severity": string(),
             "details": {"type": "object"}})

SCHEMAS: dict[str, Schema] = {
    "Tier": string(enum=list(DEFAULT_TIERS)),  # replaced by the app's configured tiers
    "Error": obj({"error": string(description="machine code"), "message": string(description="human sentence")},
                 examples=[{"error": "invalid_api_key", "message": "The API key is not valid"}]),
    "FieldError": {"allOf": [ref("Error"), obj({"field": string(description="the offending field")})]},
    "BlockedKeyError": {"allOf": [ref("Error"), obj({"reason": string()})]},
    "RetryError": {"allOf": [ref("Error"), obj({"retry_after": integer(minimum=1)})]},
    "RateLimitError": {"allOf": [ref("Error"), obj({
        "limit": integer(minimum=1), "remaining": {"const": 0}, "retry_after": integer(minimum=1),
        "tier": ref("Tier")}, {"policy": string(description="the limit that refused, e.g. free-day")})]},
    "User": USER,
    "ApiKey": API_KEY,
    "Session": obj({"user": ref("User"), **TOKENS}),
    "TokenPair": obj(TOKENS),
    "Usage": USAGE,
    "Index": obj({"name": string(), "version": string(), "status": {"const": "ok"}, "endpoints": array(string())},
                 {"tiers": COUNTS, "docs": string()}),
    "Health": obj({"status": string(enum=["ok", "degraded"]),
                   "checks": obj({"database": string(), "limiter_store": string()})},
                  {"version": string(), "limiter_store": string(enum=["memory", "redis"])}),
    "OpenApi": obj({"openapi": string(), "info": {"type": "object"}, "paths": {"type": "object"}}),
    "Data": obj({"data": obj({"message": string(), "served_at": TIMESTAMP, "user_id": ID},
                             {"key_prefix": string()}),
                 "tier": ref("Tier"), "usage": ref("Usage")}),
    "KeyUsage": obj({"key_prefix": string(), "tier": ref("Tier"), "limit": integer(minimum=1),
                     "used": integer(minimum=0), "remaining": integer(minimum=0),
                     "window_seconds": integer(minimum=1), "reset_epoch": integer(),
                     "totals": obj({"today": integer(minimum=0), "all_time": integer(minimum=0)})},
                    {"expires_at": NULLABLE_TIMESTAMP, "credits_remaining": {"type": ["integer", "null"]},
                     "policies": array(obj({"name": string(), "limit": integer(minimum=1),
                                            "remaining": integer(minimum=0), "window_seconds": integer(minimum=1),
                                            "reset_epoch": integer(), "shadow": {"type": "boolean"}}))}),
    "SdkCheck": obj({"allowed": {"type": "boolean"}, "limit": integer(minimum=1), "remaining": integer(minimum=0),
                     "reset_epoch": integer(), "retry_after": integer(minimum=0)}, {"tier": ref("Tier")}),
    "SdkTrack": obj({"tracked": {"const": True}, "limit": integer(minimum=1), "remaining": integer(minimum=0),
                     "reset_epoch": integer()}, {"tier": ref("Tier")}),
    "ForwardAuth": obj({"allowed": {"const": True}},
                       description="the identity and the window are in the response headers (X-Auth-*, X-RateLimit-*)"),
    "Me": obj({"user": ref("User"), "api_keys": array(ref("ApiKey"))}),
    "ApiKeys": obj({"api_keys": array(ref("ApiKey"))}),
    "CreatedKey": obj({"api_key": string(description="the full key; shown only in this response"),
                       "id": ID, "prefix": string(), "name": string(), "tier": ref("Tier"),
                       "created_at": TIMESTAMP}, {"message": string(), "expires_at": NULLABLE_TIMESTAMP}),
    "Message": obj({"message": string()}),
    "RevokedKey": obj({"message": string(), "key": obj({"id": ID, "prefix": string(), "revoked": {"const": True}})}),
    "Metrics": {"allOf": [METRICS, obj(
        {"active_keys": integer(minimum=0), "limiter_store": string(enum=["memory", "redis"])},
        {"limiter_health": string(enum=["ok", "degraded"]), "strategy": string(), "tier_limits": COUNTS,
         "window_seconds": integer(minimum=1), "scope": string(), "pid": integer()})]},
    "Analytics": obj(
        {"minutes": integer(minimum=1), "series": array(obj({"t": TIMESTAMP, "allowed": integer(minimum=0),
                                                             "limited": integer(minimum=0)})),
         "totals": obj({"allowed": integer(minimum=0), "limited": integer(minimum=0)}),
         "by_tier": {"type": "object", "additionalProperties": COUNTS}},
        {"tier_limits": COUNTS, "window_seconds": integer(minimum=1), "metrics": METRICS,
         "limiter_store": string(), "limiter_health": string(), "socketio": {"type": "boolean"},
         "top_keys": array({"type": "object"}), "recent_429s": array({"type": "object"}),
         "alerts": array(ALERT), "events": array({"type": "object"})},
        description="top_keys, recent_429s, alerts and events only for an admin bearer token",
    ),
    "AdminUsers": obj({"users": array({"allOf": [ref("User"), obj(
        {"api_keys": integer(minimum=0, description="active keys")}, {"is_admin": {"type": "boolean"}})]}),
        "total": integer(minimum=0), "page": integer(minimum=1), "per_page": integer(minimum=1)}),
    "AdminKeys": obj({"keys": array({"allOf": [ref("ApiKey"), obj(
        {"user_id": ID, "username": string(), "revoked": {"type": "boolean"},
         "blocked_reason": nullable_string()})]}),
        "page": integer(minimum=1), "per_page": integer(minimum=1)}),
    "UserResult": obj({"user": ref("User")}),
    "UserDeleted": obj({"user": {"allOf": [ref("User"), obj({"deleted": {"const": True}})]},
                        "api_keys_deleted": integer(minimum=0)}),
    "KeyBlock": obj({"key": obj({"id": ID, "prefix": string(), "blocked": {"type": "boolean"}},
                                {"name": string(), "reason": nullable_string()})}),
    "KeyRevoked": obj({"key": obj({"id": ID, "prefix": string(), "revoked": {"const": True},
                                   "blocked": {"const": True}})}),
    "Bans": obj({"bans": array(obj({"ip": string(), "expires_epoch": integer(), "ban_count": integer(minimum=1)}))}),
    "Ban": obj({"ban": obj({"ip": string()}, {"seconds": integer(minimum=1), "lifted": {"const": True}})}),
    "Logs": obj({"logs": array(obj({
        "timestamp": TIMESTAMP, "level": string(enum=["INFO", "WARNING", "ERROR"]), "method": string(),
        "path": string(), "status": integer(), "ip": nullable_string(), "key_prefix": nullable_string(),
        "duration_ms": {"type": ["number", "null"]}, "message": nullable_string()}))}),
    "Audit": obj({"entries": array(obj({"timestamp": TIMESTAMP, "actor": string(), "action": string(),
                                        "target": string(), "details": {"type": "object"}},
                                       {"id": ID}))}),
    "Alerts": obj({"alerts": array(ALERT)}),
    "RateOverride": OVERRIDE,
    "OverrideResult": obj({"override": OVERRIDE}),
    "Overrides": obj({"overrides": array(OVERRIDE)}),
    "KeyCredits": obj({"key": obj({"id": ID, "prefix": string(), "credits": {"type": ["integer", "null"]},
                                   "refill": {"type": ["object", "null"]},
                                   "credits_remaining": {"type": ["integer", "null"]}})}),
}


# --- headers ---------------------------------------------------------------------------------

HEADERS: dict[str, Schema] = {
    "X-RateLimit-Limit": {"description": "requests allowed per window at this tier",
                          "schema": integer(minimum=1)},
    "X-RateLimit-Remaining": {"description": "requests left in the current window", "schema": integer(minimum=0)},
    "X-RateLimit-Reset": {"description": "epoch seconds when one more request will be admitted at the earliest",
                          "schema": integer()},
    "RateLimit-Policy": {"description": 'IETF draft structured field: "<tier>";q=<limit>;w=<window seconds>; '
                                        'with a policy file, every limit that applied ("free-minute", "free-day")',
                         "schema": string(pattern=r'^"[a-z0-9-]+";q=\d+;w=\d+(, "[a-z0-9-]+";q=\d+;w=\d+)*$',
                                          examples=['"free";q=5;w=60'])},
    "RateLimit": {"description": 'IETF draft structured field: "<limit>";r=<remaining>;t=<seconds to reset>, '
                                 'for the limit closest to refusal',
                  "schema": string(pattern=r'^"[a-z0-9-]+";r=\d+;t=\d+$', examples=['"free";r=4;t=60'])},
    "Retry-After": {"description": "whole seconds to wait before retrying (>= 1)", "schema": integer(minimum=1)},
}
HEADERS.update({
    "X-Auth-User-Id": {"description": "gateway identity: the admitted user's id", "schema": string(pattern=r"^\d+$")},
    "X-Auth-Username": {"description": "gateway identity: the admitted user's username", "schema": string()},
    "X-Auth-Tier": {"description": "gateway identity: the tier the request was limited at", "schema": string()},
    "X-Auth-Key-Prefix": {"description": "gateway identity: the API key's prefix (key calls only)",
                          "schema": string()},
})
IDENTITY_HEADERS = {"X-Auth-User-Id": True, "X-Auth-Username": True, "X-Auth-Tier": True, "X-Auth-Key-Prefix": False}
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "RateLimit-Policy", "RateLimit")


# --- the route table -------------------------------------------------------------------------
# Keys: tag, summary, auth (none|key|key_or_jwt|jwt|admin|optional_admin), params, body (name in BODIES),
# body_optional, ok ((status, schema name) or (status, media type)), errors ({status: [codes]}),
# limited (consume|peek: X-RateLimit-* headers), ip_limited (False for liveness and static assets).

HTML = "text/html"
JS = "application/javascript"

FORWARDED_URI = string(maxLength=8192, pattern=r"^(/|https?://)[\x21-\x7e]*$", examples=["/v1/orders?page=2"])
FORWARDED_METHOD = string(enum=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"])
FORWARD_AUTH_METHODS = ("get", "post", "put", "patch", "delete")
ORIGINAL_PATH = {"name": "original", "in": "path", "required": True, "schema": string(),
                 "description": "the original request's path without its leading '/' (may be empty)"}
FORWARD_AUTH: dict[str, Any] = {
    "tag": "gateway",
    "summary": "Gateway decision (nginx auth_request, Caddy forward_auth, Traefik ForwardAuth, Envoy ext_authz): "
               "the /data decision and budget for the request described by X-Forwarded-Method/X-Forwarded-Uri or "
               "X-Original-Method/X-Original-URI; admitted: 200 with X-Auth-* identity headers for the upstream. "
               "With X-Forward-Auth-Gateway: nginx a refusal is answered 401 (a real 401) or 403, its real status "
               "in X-Forward-Auth-Status and its JSON body in X-Forward-Auth-Body (see API_DOCUMENTATION.md)",
    "auth": "key_or_jwt",
    "params": [
        {"name": "X-Forwarded-Method", "in": "header", "required": False, "schema": FORWARDED_METHOD,
         "description": "the original method (Traefik, Caddy); default: this call's method"},
        {"name": "X-Forwarded-Uri", "in": "header", "required": False, "schema": FORWARDED_URI,
         "description": "the original path and query (Traefik, Caddy); wins over X-Original-URI"},
        {"name": "X-Original-Method", "in": "header", "required": False, "schema": FORWARDED_METHOD,
         "description": "the original method (nginx)"},
        {"name": "X-Original-URI", "in": "header", "required": False, "schema": FORWARDED_URI,
         "description": "the original path and query (nginx $request_uri); its api_key parameter is a credential"},
        API_KEY_PARAMS[0],
    ],
    "limited": "consume",
    "ok": (200, "ForwardAuth"),
    "ok_headers": IDENTITY_HEADERS,
    "errors": {400: ["missing_forwarded_uri", "invalid_field"], 429: ["rate_limit_exceeded"]},
}

ROUTES: dict[str, dict[str, dict[str, Any]]] = {
    "/": {"get": {"tag": "core", "summary": "Service name, version and the list of routes", "ok": (200, "Index")}},
    "/health": {"get": {
        "tag": "core", "summary": "Liveness and dependency checks (exempt from the per-IP limit)",
        "ok": (200, "Health"), "ip_limited": False, "extra": {503: ("One check failed", "Health")},
    }},
    "/openapi.json": {"get": {"tag": "core", "summary": "This OpenAPI document", "ok": (200, "OpenApi")}},
    "/dashboard": {"get": {"tag": "dashboard", "summary": "Live usage dashboard (HTML page)", "ok": (200, HTML)}},
    "/data": {"get": {
        "tag": "data", "summary": "Protected sample data; counts one request against the key or user",
        "auth": "key_or_jwt", "params": API_KEY_PARAMS, "limited": "consume", "ok": (200, "Data"),
        "errors": {429: ["rate_limit_exceeded"]},
    }},
    "/usage": {"get": {
        "tag": "data", "summary": "The key's current window and totals; consumes nothing",
        "auth": "key", "params": API_KEY_PARAMS, "limited": "peek", "ok": (200, "KeyUsage"),
    }},
    "/forward_auth": {method: FORWARD_AUTH for method in FORWARD_AUTH_METHODS},
    "/forward_auth/{original}": {method: {**FORWARD_AUTH, "params": [ORIGINAL_PATH, *FORWARD_AUTH["params"]],
                                          "summary": "The same decision, Envoy ext_authz style: the original path "
                                                     "follows /forward_auth, the method is this call's"}
                                 for method in FORWARD_AUTH_METHODS},
    "/auth/register": {"post": {
        "tag": "auth", "summary": "Create an account (tier free) and sign in", "body": "Register",
        "ok": (201, "Session"), "errors": {409: ["username_taken"], 429: ["too_many_registrations"]},
    }},
    "/auth/login": {"post": {
        "tag": "auth", "summary": "Sign in with username and password", "body": "Login", "ok": (200, "Session"),
        "errors": {401: ["invalid_credentials"], 429: ["too_many_failed_logins"]},
    }},
    "/auth/refresh": {"post": {
        "tag": "auth", "summary": "Spend a refresh token for a new token pair (rotation)", "body": "Refresh",
        "ok": (200, "TokenPair"), "errors": {401: ["invalid_token", "token_expired", "token_reused"]},
    }},
    "/auth/logout": {"post": {
        "tag": "auth", "summary": "Revoke this access token (and the login of a given refresh token)",
        "auth": "jwt", "body": "Logout", "body_optional": True, "ok": (200, "Message"),
        "errors": {403: ["forbidden"]},
    }},
    "/auth/me": {"get": {"tag": "auth", "summary": "The signed-in user and their active API keys", "auth": "jwt",
                         "ok": (200, "Me")}},
    "/auth/api_keys": {"get": {"tag": "auth", "summary": "The signed-in user's active API keys", "auth": "jwt",
                               "ok": (200, "ApiKeys")}},
    "/auth/create_api_key": {"post": {
        "tag": "auth", "summary": "Create an API key; the full key is shown only in this response",
        "auth": "jwt", "body": "CreateKey", "body_optional": True, "ok": (201, "CreatedKey"),
        "errors": {409: ["too_many_keys"]},
    }},
    "/auth/api_keys/{key_id}": {"delete": {
        "tag": "auth", "summary": "Revoke one of your API keys", "auth": "jwt",
        "params": [{"name": "key_id", "in": "path", "required": True, "schema": integer(minimum=0, maximum=MAX_ID)}],
        "ok": (200, "RevokedKey"), "errors": {404: ["key_not_found", "not_found"]},
    }},
    "/sdk.js": {"get": {"tag": "sdk", "summary": "Browser SDK, classic script", "ok": (200, JS),
                        "ip_limited": False, "conditional": True}},
    "/sdk.mjs": {"get": {"tag": "sdk", "summary": "Browser SDK, ES module", "ok": (200, JS),
                         "ip_limited": False, "conditional": True}},
    "/sdk": {"get": {"tag": "sdk", "summary": "SDK setup and demo page (HTML)", "ok": (200, HTML),
                     "conditional": True}},
    "/sdk/check": {"post": {
        "tag": "sdk", "summary": "Would a request with this key be admitted now? Consumes nothing",
        "auth": "body_key", "body": "SdkCheck", "limited": "peek", "ok": (200, "SdkCheck"),
    }},
    "/sdk/track": {"post": {
        "tag": "sdk", "summary": "Count one request against the key", "auth": "body_key", "body": "SdkTrack",
        "limited": "consume", "ok": (200, "SdkTrack"), "errors": {429: ["rate_limit_exceeded"]},
    }},
    "/admin/users": {"get": {"tag": "admin", "summary": "All users, paged", "auth": "admin", "params": PAGING,
                             "ok": (200, "AdminUsers"), "errors": {400: ["invalid_field"]}}},
    "/admin/keys": {"get": {
        "tag": "admin", "summary": "All API keys (revoked ones too), paged", "auth": "admin",
        "params": [*PAGING, query_int("user_id", None, description="only this user's keys")],
        "ok": (200, "AdminKeys"), "errors": {400: ["invalid_field"]},
    }},
    "/admin/upgrade_tier": {"post": {
        "tag": "admin", "summary": "Move a user (and all their keys) to a tier", "auth": "admin",
        "body": "UpgradeTier", "ok": (200, "UserResult"), "errors": {404: ["user_not_found"]},
    }},
    "/admin/block_key": {"post": {
        "tag": "admin", "summary": "Block an API key (403 api_key_blocked from then on)", "auth": "admin",
        "body": "BlockKey", "ok": (200, "KeyBlock"), "errors": {404: ["key_not_found"]},
    }},
    "/admin/unblock_key": {"post": {
        "tag": "admin", "summary": "Unblock an API key", "auth": "admin", "body": "BlockKey", "ok": (200, "KeyBlock"),
        "errors": {404: ["key_not_found"]},
    }},
    "/admin/revoke_key": {"post": {
        "tag": "admin", "summary": "Revoke an API key for good", "auth": "admin", "body": "SelectKey",
        "ok": (200, "KeyRevoked"), "errors": {404: ["key_not_found"]},
    }},
    "/admin/users/{user_id}": {"delete": {
        "tag": "admin", "summary": "Delete a user with their keys and tokens", "auth": "admin",
        "params": [{"name": "user_id", "in": "path", "required": True, "schema": integer(minimum=0, maximum=MAX_ID)}],
        "ok": (200, "UserDeleted"), "errors": {404: ["user_not_found", "not_found"]},
    }},
    "/admin/overrides": {
        "get": {"tag": "admin", "summary": "Limit overrides, newest first (active and lapsed)", "auth": "admin",
                "ok": (200, "Overrides")},
        "post": {"tag": "admin", "summary": "Replace the tier limits of a key, or of a user and all their keys",
                 "auth": "admin", "body": "Override", "ok": (201, "OverrideResult"),
                 "errors": {404: ["key_not_found", "user_not_found"], 409: ["unsupported_by_store"]}},
    },
    "/admin/overrides/{override_id}": {"delete": {
        "tag": "admin", "summary": "Delete a limit override (the tier limits apply again)", "auth": "admin",
        "params": [{"name": "override_id", "in": "path", "required": True,
                    "schema": integer(minimum=0, maximum=MAX_ID)}],
        "ok": (200, "OverrideResult"), "errors": {404: ["override_not_found", "not_found"]},
    }},
    "/admin/keys/{key_id}/credits": {"post": {
        "tag": "admin", "summary": "Set a key's credits and their refill", "auth": "admin", "body": "Credits",
        "params": [{"name": "key_id", "in": "path", "required": True, "schema": integer(minimum=0, maximum=MAX_ID)}],
        "ok": (200, "KeyCredits"), "errors": {404: ["key_not_found", "not_found"], 409: ["unsupported_by_store"]},
    }},
    "/admin/bans": {"get": {"tag": "admin", "summary": "Active IP bans", "auth": "admin", "ok": (200, "Bans")}},
    "/admin/ban_ip": {"post": {"tag": "admin", "summary": "Ban an IP address", "auth": "admin", "body": "BanIp",
                               "ok": (200, "Ban")}},
    "/admin/unban_ip": {"post": {"tag": "admin", "summary": "Lift an IP ban", "auth": "admin", "body": "UnbanIp",
                                 "ok": (200, "Ban"), "errors": {404: ["ban_not_found"]}}},
    "/admin/audit": {"get": {"tag": "admin", "summary": "Admin actions, newest first", "auth": "admin",
                             "params": [query_int("limit", 100, maximum=1000)], "ok": (200, "Audit"),
                             "errors": {400: ["invalid_field"]}}},
    "/admin/alerts": {"get": {"tag": "admin", "summary": "Abuse alerts, newest first", "auth": "admin",
                              "params": [query_int("limit", 50, maximum=500)], "ok": (200, "Alerts"),
                              "errors": {400: ["invalid_field"]}}},
    "/logs": {"get": {
        "tag": "admin", "summary": "Request log, newest first", "auth": "admin",
        "params": [query_int("limit", 100, maximum=1000),
                   {"name": "level", "in": "query", "required": False,
                    "schema": string(enum=["INFO", "WARNING", "ERROR", "info", "warning", "error"])},
                   {"name": "since", "in": "query", "required": False, "schema": string(format="date-time"),
                    "description": "only entries at or after this ISO 8601 time"}],
        "ok": (200, "Logs"), "errors": {400: ["invalid_field"]},
    }},
    "/api/metrics": {"get": {"tag": "metrics", "summary": "This process's counters as JSON", "ok": (200, "Metrics")}},
    "/api/analytics": {"get": {
        "tag": "metrics", "summary": "Requests per minute and per tier; more detail with an admin token",
        "auth": "optional_admin", "params": [ANALYTICS_MINUTES], "ok": (200, "Analytics"),
        "errors": {400: ["invalid_field"]},
    }},
    "/metrics": {"get": {"tag": "metrics", "summary": "Prometheus text exposition", "ok": (200, "text/plain")}},
}

TAGS = [
    {"name": "core", "description": "Service information, health and this document"},
    {"name": "auth", "description": "Accounts, tokens and API keys"},
    {"name": "data", "description": "The rate-limited API: /data and /usage"},
    {"name": "gateway", "description": "The decision a gateway asks before it lets a request through to any API"},
    {"name": "sdk", "description": "Browser SDK assets and its check/track endpoints"},
    {"name": "admin", "description": "Administration (Bearer ADMIN_TOKEN or an admin user's JWT)"},
    {"name": "metrics", "description": "Metrics and analytics"},
    {"name": "dashboard", "description": "HTML dashboard"},
]

SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                   "description": "A user's access token from /auth/register, /auth/login or /auth/refresh"},
    "adminToken": {"type": "http", "scheme": "bearer",
                   "description": "The ADMIN_TOKEN configured on the server (or an admin user's access token)"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "apiKeyQuery": {"type": "apiKey", "in": "query", "name": "api_key"},
}


# --- expansion -------------------------------------------------------------------------------

def error_codes(route: dict[str, Any]) -> dict[int, list[str]]:
    """Every error code the route can answer, by status: its own plus the pipeline's."""
    merged: dict[int, list[str]] = {}

    def add(codes: dict[int, list[str]]) -> None:
        for status, names in codes.items():
            merged.setdefault(status, [])
            merged[status] += [name for name in names if name not in merged[status]]

    auth = route.get("auth", "none")
    add(AUTH_ERRORS.get(auth, {}))
    if auth == "body_key":
        add({400: ["invalid_field"], **AUTH_ERRORS["key"]})
    if route.get("body"):
        add(BODY_ERRORS)
        if BODIES[route["body"]].get("properties"):
            add({400: ["invalid_field"]})
    add(route.get("errors", {}))
    if route.get("ip_limited", True):
        add({429: ["ip_banned"], 503: ["limiter_unavailable"]})
    elif route.get("limited"):
        add({503: ["limiter_unavailable"]})
    return dict(sorted(merged.items()))


def error_schema(codes: list[str]) -> Schema:
    variants: dict[str, list[str]] = {}
    for code in codes:
        variants.setdefault(ERROR_SCHEMAS.get(code, "Error"), []).append(code)
    options = [{"allOf": [ref(name), obj({"error": string(enum=names)})]} for name, names in variants.items()]
    return options[0] if len(options) == 1 else {"anyOf": options}


def header_refs(names: tuple[str, ...] | list[str], required: bool) -> dict[str, Any]:
    """Response headers: inline and required, or a reference to the optional component."""
    if required:
        return {name: {**HEADERS[name], "required": True} for name in names}
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


def error_response(codes: list[str]) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": "; ".join(f"`{code}`: {ERROR_CODES[code][1]}" for code in codes),
        "content": {"application/json": {"schema": error_schema(codes)}},
    }
    headers: dict[str, Any] = {}
    if any(code in RETRY_CODES for code in codes):
        headers.update(header_refs(["Retry-After"], required=True))
    if "rate_limit_exceeded" in codes:  # absent on ip_banned, so not required
        headers.update(header_refs(RATE_HEADERS, required=False))
    if headers:
        response["headers"] = headers
    return response


def success_response(route: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, target = route["ok"]
    if "/" in target:
        content = {target: {"schema": string()}}
    else:
        content = {"application/json": {"schema": ref(target)}}
    response: dict[str, Any] = {"description": route["summary"], "content": content}
    if route.get("limited"):
        response["headers"] = header_refs(RATE_HEADERS, required=True)
    for name, required in route.get("ok_headers", {}).items():
        response["headers"].update(header_refs([name], required=required))
    return status, response


def operation(path: str, method: str, route: dict[str, Any]) -> dict[str, Any]:
    status, ok = success_response(route)
    responses: dict[str, Any] = {str(status): ok}
    if route.get("conditional"):
        responses["304"] = {"description": "Not modified (If-None-Match / If-Modified-Since matched)"}
    for extra_status, (description, schema) in route.get("extra", {}).items():
        responses[str(extra_status)] = {"description": description,
                                        "content": {"application/json": {"schema": ref(schema)}}}
    for err_status, codes in error_codes(route).items():
        responses[str(err_status)] = error_response(codes)
    op: dict[str, Any] = {
        "operationId": f"{method}_{re.sub(r'[^a-z0-9]+', '_', path.lower()).strip('_') or 'index'}",
        "tags": [route["tag"]],
        "summary": route["summary"],
        "security": SECURITY.get(route.get("auth", "none"), []),
        "responses": dict(sorted(responses.items())),
    }
    if route.get("params"):
        op["parameters"] = route["params"]
    if route.get("body"):
        op["requestBody"] = {"required": not route.get("body_optional", False),
                             "content": {"application/json": {"schema": ref(f"{route['body']}Request")}}}
    return op


def rule_to_path(rule: str) -> str:
    """Flask's ``/auth/api_keys/<int(max=9):key_id>`` -> OpenAPI's ``/auth/api_keys/{key_id}``."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def build_spec(app: Flask, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``app``: the route table, with this app's configured tiers."""
    services = app.extensions.get("rl")
    config = getattr(services, "config", None)
    tiers = list(getattr(config, "tier_limits", None) or DEFAULT_TIERS)
    schemas = {**SCHEMAS, "Tier": string(enum=tiers, examples=tiers[:1])}
    schemas.update({f"{name}Request": body for name, body in BODIES.items()})
    paths = {path: {method: operation(path, method, route) for method, route in methods.items()}
             for path, methods in ROUTES.items()}
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "API Rate Limiter",
            "version": version,
            "description": "Tiered, exactly-windowed rate limiting with API keys and JWT accounts. "
                           "Every error is {\"error\": code, \"message\": text}; see API_DOCUMENTATION.md.",
        },
        "servers": [{"url": "/"}],
        "tags": TAGS,
        "paths": paths,
        "components": {"schemas": schemas, "headers": HEADERS, "securitySchemes": SECURITY_SCHEMES},
    }
