"""Secrets never reach a log: every record a process creates is redacted before any handler sees it.

Clients send API keys in ``?api_key=`` and tokens in headers; gunicorn's and werkzeug's access
logs print the raw request line, and an exception message can quote a URL. ``install()`` wraps
the logging module's record factory, so whatever the logger (gunicorn.access, werkzeug, aiohttp,
ours) and whatever the handler (stdout, files, syslog), the message is already clean.

Masked: values of secret-looking query/form parameters and JSON fields (``api_key``, ``token``,
``password``…), API keys anywhere (their public prefix stays, for tracing), JWTs,
``Bearer``/``Basic`` credentials and the values of the ``Authorization``, ``X-API-Key``,
``X-Admin-Token`` and ``Cookie`` headers when a line quotes them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from urllib.parse import unquote_plus

from log_manager import mask_api_key

MASK = "[REDACTED]"
SECRET_PARAMETERS = frozenset({
    "api_key", "apikey", "key", "x_api_key", "token", "access_token", "refresh_token", "id_token", "jwt",
    "auth", "authorization", "password", "passwd", "secret", "client_secret", "admin_token", "x_admin_token",
    "session", "cookie", "signature", "sig",
})

_PAIR_RE = re.compile(r"(?P<name>[A-Za-z0-9_.~%+-]+)=(?P<value>[^&;\s\"'#<>]*)")
_JSON_PAIR_RE = re.compile(r'"(?P<name>[A-Za-z0-9_-]+)"(?P<sep>\s*:\s*)"(?P<value>(?:[^"\\]|\\.)*)"')
_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_SCHEME_RE = re.compile(r"(?i)\b(bearer|basic)(\s+|%20|\+)(?!\[REDACTED)[A-Za-z0-9._~+/=%-]{6,}")
_HEADER_RE = re.compile(
    r"(?i)\b(x-api-key|x-admin-token|authorization|proxy-authorization|cookie)(\"?'?\s*[:=]\s*\"?'?)"
    r"(?!(?:bearer|basic)\b|\[REDACTED)([^\s\"',;&]+)"
)


def _secret_value(value: str) -> bool:
    return mask_api_key(value) != value or bool(_JWT_RE.search(value))


def _mask_pair(match: re.Match[str]) -> str:
    name = unquote_plus(match["name"]).strip().lower().replace("-", "_")
    raw = match["value"]
    value = unquote_plus(raw)
    if not raw or not (name in SECRET_PARAMETERS or _secret_value(value)):
        return match[0]
    masked = mask_api_key(value)  # a lone API key keeps its public prefix: "rl_1a2b3c4d…"
    return f"{match['name']}={masked if masked != value and len(masked) == 12 else MASK}"


def _mask_json_pair(match: re.Match[str]) -> str:
    name = match["name"].lower().replace("-", "_")
    if name not in SECRET_PARAMETERS or not match["value"]:
        return match[0]
    return f'"{match["name"]}"{match["sep"]}"{MASK}"'


def redact(text: str) -> str:
    """``text`` with every credential it quotes masked (see the module docstring)."""
    if "=" in text:
        text = _PAIR_RE.sub(_mask_pair, text)
    if '"' in text:
        text = _JSON_PAIR_RE.sub(_mask_json_pair, text)
    text = mask_api_key(text)
    text = _JWT_RE.sub(MASK, text)
    text = _SCHEME_RE.sub(lambda m: f"{m[1]} {MASK}", text)
    return _HEADER_RE.sub(lambda m: f"{m[1]}{m[2]}{MASK}", text)


_FORMATTER = logging.Formatter()


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Replace the record's message (and formatted traceback) by their redacted text."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken format is logging's own error to report at emit time
        return record
    cleaned = redact(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(_FORMATTER.formatException(record.exc_info))
    return record


def install() -> None:
    """Redact every record this process creates from now on; calling it again changes nothing."""
    current: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()
    if getattr(current, "redacting", False):
        return

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        return redact_record(current(*args, **kwargs))

    factory.redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
