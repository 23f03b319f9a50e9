"""Send credentials every way a client can, then look for them in whatever a deployment logged."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable
from pathlib import Path

import requests


def send_credentials(base: str, admin_token: str) -> list[str]:
    """Register, make a key, and use key and tokens in query strings and headers; return the secrets."""
    name = f"leak_{uuid.uuid4().hex[:10]}"
    tokens = requests.post(f"{base}/auth/register", json={"username": name, "password": "long enough pw"}, timeout=10)
    assert tokens.status_code == 201, tokens.text
    access, refresh = tokens.json()["access_token"], tokens.json()["refresh_token"]
    bearer = {"Authorization": f"Bearer {access}"}
    key = requests.post(f"{base}/auth/create_api_key", json={}, headers=bearer, timeout=10).json()["api_key"]
    unknown = f"rl_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    referer = {"Referer": f"https://example.test/page?api_key={key}&token={access}"}
    calls = [
        ("GET", f"/data?api_key={key}", {}),
        ("GET", f"/data?api%5Fkey={key.replace('_', '%5F')}", {}),
        ("GET", "/data", {"X-API-Key": key}),
        ("GET", f"/data?api_key={key}&access_token={access}", referer),
        ("GET", f"/data?api_key={unknown}", {}),
        ("GET", f"/no-such-route?api_key={key}&token={refresh}", {}),
        ("GET", "/auth/me", bearer),
        ("GET", f"/auth/me?token={access}", {"Authorization": f"Bearer {access}x"}),
        ("GET", "/admin/users", {"Authorization": f"Bearer {admin_token}"}),
        ("GET", f"/admin/users?admin_token={admin_token}", {}),
    ]
    for method, path, headers in calls:
        requests.request(method, f"{base}{path}", headers=headers, timeout=10)
    requests.post(f"{base}/auth/refresh", json={"refresh_token": refresh}, timeout=10)
    return [key, key.split("_", 2)[2], unknown, access, refresh, admin_token]


def admin_views(base: str, admin_token: str) -> list[str]:
    """What operators read over HTTP: request logs, audit, alerts, keys and the dashboard's event feed."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    paths = ["/logs", "/admin/audit", "/admin/alerts", "/admin/keys", "/api/analytics"]
    return [requests.get(f"{base}{path}", headers=headers, timeout=10).text for path in paths]


def leaks(texts: Iterable[str], sent: list[str]) -> list[str]:
    """Every sent secret that appears in one of ``texts`` (shortened, so the failure does not leak it)."""
    corpus = "\n".join(texts)
    return [f"{secret[:12]}…" for secret in sent if secret in corpus]


def files_under(folder: Path) -> list[str]:
    """The text of every file below ``folder`` (log files, rotated logs, the SQLite database)."""
    return [path.read_bytes().decode("utf-8", "replace") for path in folder.rglob("*") if path.is_file()]
