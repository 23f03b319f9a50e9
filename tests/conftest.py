"""Shared fixtures in the flaskr style: ``app``, ``client``, ``auth`` helper, injectable clock.

Every app is built from a ``Config`` (never the process environment), on a fresh SQLite file
by default; ``make_app(backend="postgres")`` builds one on a fresh PostgreSQL database and
``store="redis"`` on the real Redis with a private key prefix, all cleaned up afterwards.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]  # conftest runs first: put the project on sys.path
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config import Config  # noqa: E402
from tests.services import REDIS_URL, FakeClock, Inbox, free_port, fresh_postgres_database, require_redis  # noqa: E402

pytest_plugins = ["tests.redis_servers"]  # session fixtures: a private Redis Cluster and Sentinel set

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"

# The test SMTP servers (aiosmtpd) narrate every connection at INFO; the app's JSON log handler on
# the root logger would print that between test results.
logging.getLogger("mail.log").setLevel(logging.WARNING)
PASSWORD = "correct horse battery"


def test_config(tmp_path: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = dict(
        env="testing",
        testing=True,
        jwt_secret_key="test-secret-key-that-is-long-enough-0123456789",
        admin_token=ADMIN_TOKEN,
        database_url=f"sqlite:///{tmp_path / 'test.db'}",
        storage_url="memory://",
        log_dir=str(tmp_path / "logs"),
        bcrypt_rounds=4,
        enable_socketio=False,
        ip_rate_limit=10_000,
        flush_interval=0.05,
    )
    values.update(overrides)
    return Config.from_env({}, **values)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_app(tmp_path: Path, clock: FakeClock):
    """Factory: ``make_app(backend="sqlite"|"postgres", store="memory"|"redis", use_clock=True, **config)``."""
    from app import create_app

    built: list[Any] = []
    cleanups: list[Any] = []

    def factory(*, backend: str = "sqlite", store: str = "memory", use_clock: bool = True, **overrides: Any):
        if backend == "postgres":
            url, drop = fresh_postgres_database()
            cleanups.append(drop)
            overrides.setdefault("database_url", url)
        if store == "redis":
            require_redis()
            overrides.setdefault("storage_url", REDIS_URL)
            overrides.setdefault("redis_url", REDIS_URL)
            overrides.setdefault("key_prefix", f"rltest{uuid.uuid4().hex[:8]}")
        application = create_app(test_config(tmp_path, **overrides), clock=clock if use_clock else time.time)
        application.extensions["rl"].start()  # the background flusher and writers, as the entry points do
        built.append(application)
        return application

    yield factory
    for application in built:
        svc = application.extensions["rl"]
        try:
            svc.limiter.reset()
        finally:
            svc.close()
            svc.engine.dispose()
    for drop in cleanups:
        drop()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


class AuthActions:
    """Register users, sign in, create keys, and build headers, as a client would.

    Bound to the ``client`` fixture on first use (so tests that build their own app never
    build the default one); ``auth.on(client)`` gives the same helpers for another client.
    """

    def __init__(self, client: Any = None, default: Callable[[], Any] | None = None) -> None:
        self._bound = client
        self._default = default

    @property
    def _client(self) -> Any:
        if self._bound is None:
            assert self._default is not None, "AuthActions needs a client"
            self._bound = self._default()
        return self._bound

    def on(self, client: Any) -> AuthActions:
        """The same helpers against ``client`` (an app the test built itself)."""
        return AuthActions(client)

    def register(self, username: str | None = None, password: str = PASSWORD, **extra: Any) -> dict[str, Any]:
        username = username or f"user_{uuid.uuid4().hex[:8]}"
        response = self._client.post("/auth/register", json={"username": username, "password": password, **extra})
        assert response.status_code == 201, response.get_json()
        return response.get_json()

    def login(self, username: str, password: str = PASSWORD) -> Any:
        return self._client.post("/auth/login", json={"username": username, "password": password})

    @staticmethod
    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    @property
    def admin(self) -> dict[str, str]:
        return self.bearer(ADMIN_TOKEN)

    def create_key(self, access_token: str, name: str = "test key") -> dict[str, Any]:
        response = self._client.post("/auth/create_api_key", json={"name": name}, headers=self.bearer(access_token))
        assert response.status_code == 201, response.get_json()
        return response.get_json()

    def user_with_key(self, tier: str | None = None, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """A new user and one API key, optionally moved to ``tier`` by the admin API."""
        user = self.register(**extra)
        key = self.create_key(user["access_token"])
        if tier:
            response = self._client.post("/admin/upgrade_tier", json={"user_id": user["user"]["id"], "tier": tier},
                                         headers=self.admin)
            assert response.status_code == 200, response.get_json()
        return user, key


@pytest.fixture
def auth(request: pytest.FixtureRequest) -> AuthActions:
    return AuthActions(default=lambda: request.getfixturevalue("client"))


@pytest.fixture
def smtp_server() -> Iterator[Callable[..., tuple[Inbox, int]]]:
    """Factory starting an aiosmtpd server on a free loopback port; every server is stopped afterwards."""
    from aiosmtpd.controller import Controller

    controllers: list[Any] = []

    def start(**kwargs: Any) -> tuple[Inbox, int]:
        inbox, port = Inbox(), free_port()
        controller = Controller(inbox, hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        controllers.append(controller)
        return inbox, port

    yield start
    for controller in controllers:
        controller.stop()


class LiveServer:
    """A real HTTP server for an app on a free loopback port, in a background thread."""

    def __init__(self, application: Any) -> None:
        import threading

        from werkzeug.serving import make_server

        self.app = application
        self._server = make_server("127.0.0.1", 0, application, threaded=True)
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(5)


@pytest.fixture
def live_server(make_app):
    """Factory: ``live_server(**make_app_kwargs)`` -> LiveServer (stopped after the test)."""
    servers: list[LiveServer] = []

    def start(**kwargs: Any) -> LiveServer:
        kwargs.setdefault("use_clock", False)
        server = LiveServer(make_app(**kwargs))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by Playwright (skips locally, fails in CI when missing).

    Module scope, not session: Playwright's sync API keeps an asyncio loop running in the main
    thread while it is open, which would break later tests that call ``asyncio.run``."""
    from tests.services import CHROMIUM_ARGS, require_chromium

    executable = require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield instance
        instance.close()


@pytest.fixture
def page(browser):
    """A fresh browser page that records console errors and uncaught page errors."""
    context = browser.new_context()
    page = context.new_page()
    page.console_errors = []  # type: ignore[attr-defined]
    page.page_errors = []  # type: ignore[attr-defined]
    page.on("console", lambda msg: msg.type == "error" and page.console_errors.append(msg.text))
    page.on("pageerror", lambda exc: page.page_errors.append(str(exc)))
    yield page
    context.close()


ARTIFACTS = ROOT / "test-artifacts"
