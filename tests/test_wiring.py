"""App lifecycle: create_app builds and starts nothing; Services.start/close own the background work."""

from __future__ import annotations

import atexit
import threading

from app import create_app
from tests.conftest import test_config as app_config
from tests.services import wait_until


def live_threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def test_a_created_app_starts_no_thread_and_registers_no_exit_hook(tmp_path):
    before, hooks = live_threads(), atexit._ncallbacks()
    app = create_app(app_config(tmp_path, email_enabled=True, alert_email_to=["ops@example.test"]))
    svc = app.extensions["rl"]
    try:
        assert live_threads() == before
        assert atexit._ncallbacks() == hooks
    finally:
        svc.close()
        svc.engine.dispose()
    assert live_threads() == before  # closing an app that never started is fine and starts nothing


def test_a_started_app_stops_every_thread_it_started_on_close(tmp_path):
    before = live_threads()
    app = create_app(app_config(tmp_path, email_enabled=True, alert_email_to=["ops@example.test"]))
    svc = app.extensions["rl"]
    svc.start()
    svc.start()  # idempotent
    started = {thread.name for thread in live_threads() - before}
    assert {"usage-flusher", "request-log-writer", "alert-writer", "request-log", "email-notifier"} <= started
    svc.close()
    svc.engine.dispose()
    wait_until(lambda: live_threads() <= before)


def test_requests_logged_before_start_are_written_by_close(tmp_path):
    app = create_app(app_config(tmp_path))
    svc = app.extensions["rl"]
    assert app.test_client().get("/health").status_code in (200, 503)
    assert app.test_client().get("/nowhere").status_code == 404
    svc.close()
    assert svc.log_writer.stats()["flushed"] >= 1
    svc.engine.dispose()
