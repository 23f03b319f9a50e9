"""One error shape for the whole API: ``{"error": code, "message": text}`` with the right status.

Views raise ``ApiError``; the handlers registered by ``init_app`` turn it, every werkzeug
HTTP exception (404, 405, 413, ...) and any unexpected exception into that JSON shape.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

# Machine codes for werkzeug's own errors, so a 404 reads "not_found", not "Not Found".
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    429: "rate_limit_exceeded",
    431: "headers_too_large",
    500: "internal_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An error the client should see: HTTP status, machine code, human sentence, extra fields."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **extra: Any) -> Response:
    response = jsonify({"error": code, "message": message, **extra})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def bad_request(field: str, message: str) -> ApiError:
    """A 400 naming the offending field (``field`` is also returned as ``"field"``)."""
    return ApiError(400, "invalid_field" if field else "bad_request", message, field=field)


def init_app(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers, **exc.extra)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = exc.description or exc.name
        if status == 405:
            allowed = ", ".join(sorted(exc.valid_methods or [])) if hasattr(exc, "valid_methods") else ""
            message = f"Method not allowed here; use {allowed}" if allowed else "Method not allowed"
            response = error_response(status, code, message)
            if allowed:
                response.headers["Allow"] = allowed
            return response
        if status == 413:
            message = f"Request body is larger than {app.config.get('MAX_CONTENT_LENGTH')} bytes"
        return error_response(status, code, message)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error: %s", exc)
        return error_response(500, "internal_error", "An unexpected error occurred; it has been logged")
