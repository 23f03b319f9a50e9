"""Service wiring: everything one app instance owns (``Services``), the one event bus, and the
background flusher that batches usage counts and applies log retention.

``build_services(config, clock)`` opens the database and the limiter store; ``current()`` is the
typed way for views and extensions to reach the services of the app handling the request.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from flask import current_app

import database as db
import log_manager as abuse
import notifier as events
from analytics import Metrics, UsageRecorder
from config import Config
from gate import KeyDirectory
from limiter import RateLimiter
from log_manager import AbuseDetector, Alert, BatchWriter, RefusalSampler, RequestLogger
from notifier import Notifier
from policy import Policy, load_policy

log = logging.getLogger("ratelimiter")

ADMIN_ROOM = "admins"  # Socket.IO room of dashboard sockets that connected with ADMIN_TOKEN


class EventBus:
    """The one place events are emitted: log line, alert row, e-mail, live dashboard feed."""

    ALERT_KINDS = {events.ABUSE_ALERT, events.RATE_LIMIT_SPIKE, events.IP_BANNED, events.KEY_BANNED}

    def __init__(self, svc: Services) -> None:
        self._svc = svc
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)

    def emit(self, kind: str, subject: str, **details: Any) -> None:
        event = {"timestamp": db.iso(db.utcnow()), "kind": kind, "subject": subject, "details": details}
        self.recent.appendleft(event)
        log.info("event %s %s", kind, subject, extra={"event": kind, "subject": subject, "details": details})
        svc = self._svc
        if kind in self.ALERT_KINDS:
            svc.metrics.observe_alert(details.get("alert_kind", kind))
            svc.alert_writer.put({
                "timestamp": db.utcnow(), "kind": details.get("alert_kind", kind), "source": subject[:200],
                "severity": details.get("severity", "warning"), "details": json.dumps(details, default=str),
            })
        if kind not in events.FEED_ONLY_EVENTS:
            svc.notifier.notify(kind, subject, details)
        if svc.socketio is not None:
            try:  # events name users, keys and IPs: only sockets that presented ADMIN_TOKEN get them
                svc.socketio.emit("event", event, to=ADMIN_ROOM)
            except Exception:  # a live feed must never break the request that caused the event
                log.debug("socket.io emit failed", exc_info=True)


@dataclasses.dataclass
class Services:
    """Everything one app instance owns; stored in ``app.extensions["rl"]``."""

    config: Config
    engine: sa.engine.Engine
    limiter: RateLimiter
    clock: Callable[[], float]
    metrics: Metrics
    usage: UsageRecorder
    keys: KeyDirectory
    notifier: Notifier
    request_logger: RequestLogger
    log_writer: BatchWriter
    alert_writer: BatchWriter
    # Built right after the services they need (build_services): never None once the app exists.
    abuse: AbuseDetector = dataclasses.field(init=False)
    events: EventBus = dataclasses.field(init=False)
    socketio: Any = None
    flusher: threading.Thread | None = None
    active_keys_cache: tuple[float, int] = (-1e9, 0)
    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    start_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    refusal_log: RefusalSampler = dataclasses.field(init=False)
    analytics_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    analytics_cache: tuple[float, dt.datetime | None, list[Any]] = (0.0, None, [])
    housekeeping_due: float = 0.0  # svc.clock() time of the next retention pass; 0: not run yet
    rules: Policy | None = None  # RATELIMIT_POLICY; None: the tier limits over one window, as before
    # key id -> (cached at, low-credit threshold, refill period): read once a minute per process
    credit_grants: dict[int, tuple[float, int, str | None]] = dataclasses.field(default_factory=dict)

    def now(self) -> dt.datetime:
        """The injected clock as a naive UTC datetime, the form usage buckets are stored in."""
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC).replace(tzinfo=None)

    def start(self) -> None:
        """Start the background threads (writers, e-mail sender, usage flusher); idempotent.

        Called by the entry points (``python app.py``, gunicorn's ``app:app``), not by
        ``create_app``: building an app starts nothing, so a test can build and drop one."""
        with self.start_lock:
            if self.flusher is not None or self.stopping.is_set():
                return
            self.log_writer.start()
            self.alert_writer.start()
            self.request_logger.start()
            self.notifier.start()
            self.flusher = threading.Thread(target=run_flusher, args=(self,), name="usage-flusher", daemon=True)
            self.flusher.start()

    def close(self) -> None:
        """Flush analytics and logs, stop background threads; safe to call twice, and on an app
        that was never started."""
        with self.start_lock:
            if self.stopping.is_set():
                return
            self.stopping.set()
        if self.flusher is not None:
            self.flusher.join(timeout=5)
        self.usage.flush()
        self.log_writer.close()
        self.alert_writer.close()
        self.request_logger.close()
        self.notifier.close()
        self.limiter.close()


def current() -> Services:
    """The services of the app handling this request (``app.extensions["rl"]``), typed."""
    svc: Services = current_app.extensions["rl"]
    return svc


HOUSEKEEPING_SECONDS = 3600.0


def run_housekeeping(svc: Services) -> None:
    """Apply LOG_RETENTION_DAYS: rotated log files and request-log rows older than that go (with
    spent tokens). Each cutoff is measured by the clock that stamped the data (file times, row
    timestamps), so only the schedule follows the app's clock."""
    files = svc.request_logger.prune()
    rows = db.purge_expired(svc.engine, log_retention_days=svc.config.log_retention_days)
    if files or any(rows.values()):
        log.info("retention: removed %d rotated log files and %s", len(files),
                 ", ".join(f"{n} {table} rows" for table, n in rows.items()))


def run_flusher(svc: Services) -> None:
    """Background loop: write usage counters every ``flush_interval`` until the app stops, and
    apply log retention at start-up and every HOUSEKEEPING_SECONDS after (by ``svc.clock``)."""
    while not svc.stopping.wait(svc.config.flush_interval):
        try:
            svc.usage.flush()
        except Exception:  # keep the loop alive whatever the database does
            log.exception("usage flush loop error")
        now = svc.clock()
        if now >= svc.housekeeping_due:
            svc.housekeeping_due = now + HOUSEKEEPING_SECONDS
            try:
                run_housekeeping(svc)
            except Exception:  # a failed pass is retried at the next one
                log.exception("log retention pass failed")


def build_services(config: Config, clock: Callable[[], float]) -> Services:
    # A bad policy file stops start-up (PolicyError is a ConfigError) before anything is opened.
    rules = load_policy(config.policy_path, config.tier_limits, config.window_seconds) if config.policy_path else None
    engine = db.open_database(config.database_url)
    limiter = RateLimiter.from_config(config, clock=clock, rules=rules)
    request_logger = RequestLogger.from_config(config, autostart=False)
    svc = Services(
        config=config, engine=engine, limiter=limiter, clock=clock,
        metrics=Metrics(clock=clock), usage=UsageRecorder(engine, clock=clock),
        keys=KeyDirectory(engine, clock=clock), notifier=Notifier(config, clock=clock, autostart=False),
        request_logger=request_logger,
        log_writer=BatchWriter(lambda rows: db.add_request_logs(engine, rows), interval=config.flush_interval,
                               name="request-log-writer", transient=db.is_transient_error, autostart=False),
        alert_writer=BatchWriter(lambda rows: _write_alerts(engine, rows), interval=config.flush_interval,
                                 name="alert-writer", transient=db.is_transient_error, autostart=False),
        rules=rules,
    )
    svc.events = EventBus(svc)
    svc.refusal_log = RefusalSampler(clock=clock)
    svc.abuse = AbuseDetector.from_config(config, on_alert=lambda alert: on_alert(svc, alert), clock=clock)
    return svc


def _write_alerts(engine: sa.engine.Engine, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        conn.execute(db.alerts.insert(), rows)


def on_alert(svc: Services, alert: Alert) -> None:
    """Abuse detector callback: a 429 storm is a rate-limit spike; the rest are abuse alerts."""
    kind = events.RATE_LIMIT_SPIKE if alert.kind == abuse.RATE_LIMITED else events.ABUSE_ALERT
    svc.events.emit(kind, alert.source, alert_kind=alert.kind, count=alert.count,
                    window_seconds=alert.window_seconds, severity=alert.severity)
    if svc.config.abuse_auto_ban and alert.kind in (abuse.FAILED_LOGIN, abuse.INVALID_KEY):
        svc.limiter.ban_ip(alert.source, svc.config.temp_ban_seconds)
        svc.events.emit(events.IP_BANNED, alert.source, seconds=svc.config.temp_ban_seconds, reason=alert.kind)
