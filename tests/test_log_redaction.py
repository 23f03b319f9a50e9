"""log_redaction: what a log line keeps and what it loses."""

from __future__ import annotations

import logging

import pytest

import log_redaction
from log_redaction import MASK, redact

KEY = "rl_1a2b3c4d_" + "A" * 43
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJlLXZhbHVl"


@pytest.mark.parametrize("line, expected", [
    (f'"GET /data?api_key={KEY} HTTP/1.1" 200', '"GET /data?api_key=rl_1a2b3c4d… HTTP/1.1" 200'),
    (f"GET /data?x=1&api%5Fkey={KEY.replace('_', '%5F')}&y=2", "GET /data?x=1&api%5Fkey=rl_1a2b3c4d…&y=2"),
    ("GET /x?token=abc123&q=hello", f"GET /x?token={MASK}&q=hello"),
    (f"GET /x?q={JWT}", f"GET /x?q={MASK}"),
    (f"Authorization: Bearer {JWT}", f"Authorization: Bearer {MASK}"),
    ("X-Admin-Token: supersecret", f"X-Admin-Token: {MASK}"),
    ("Authorization: Basic dXNlcjpwYXNz", f"Authorization: Basic {MASK}"),
    ('{"username": "ann", "password": "hunter2 \\" x"}', f'{{"username": "ann", "password": "{MASK}"}}'),
    (f"key {KEY} used", "key rl_1a2b3c4d… used"),
    ("status=200 path=/data level=INFO", "status=200 path=/data level=INFO"),
    ("Basic auth failed", "Basic auth failed"),
])
def test_redact(line: str, expected: str) -> None:
    assert redact(line) == expected


def test_installed_factory_redacts_records_of_every_logger_and_their_tracebacks(caplog) -> None:
    log_redaction.install()
    log_redaction.install()  # twice changes nothing
    with caplog.at_level(logging.INFO):
        logging.getLogger("werkzeug").info('"%s" %s', f"GET /data?api_key={KEY} HTTP/1.1", 200)
        try:
            raise ValueError(f"bad url /x?token={JWT}")
        except ValueError:
            logging.getLogger("anything").exception("failed")
    assert KEY not in caplog.text and JWT not in caplog.text
    assert "api_key=rl_1a2b3c4d…" in caplog.text and f"token={MASK}" in caplog.text
