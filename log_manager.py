"""Logging and abuse detection, all kept off the request path.

- ``configure_logging``: JSON lines to stderr and a rotating ``LOG_DIR/app.log``.
- ``RequestLogger``: request records to ``LOG_DIR/requests.log`` written by a background thread.
- ``AbuseDetector``: sliding-window counters per (kind, source) raising ``Alert`` objects.
- ``BatchWriter``: a daemon thread that hands queued items to a flush callable in batches.
- ``RefusalSampler``: at most one logged refusal per client and interval, with a count of the rest.
- ``clean_text``: what a log may store of a client-supplied string (no NUL, valid UTF-8, bounded).
- ``mask_api_key``: the defensive scrub every log line goes through.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from config import ConfigError

if TYPE_CHECKING:
    from config import Config

log = logging.getLogger(__name__)

APP_LOG_NAME = "app.log"
REQUEST_LOG_NAME = "requests.log"
REQUEST_FIELDS: tuple[str, ...] = (
    "timestamp",
    "level",
    "method",
    "path",
    "status",
    "ip",
    "key_prefix",
    "duration_ms",
    "message",
)

MAX_FIELD_CHARS = 500  # per field of a request record, as the request_logs table's widest column
# A full key: "rl_" + 8 hex characters (the visible prefix) + "_" + at least 43 urlsafe characters.
_API_KEY_RE = re.compile(r"(rl_[0-9a-fA-F]{8})_[A-Za-z0-9_-]{43,}")
# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged as a field.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_MANAGED_ATTR = "_rate_limiter_managed"


class LogSetupError(ConfigError):
    """LOG_DIR or the log settings cannot be used (for example the directory is not writable)."""


def mask_api_key(text: str) -> str:
    """Replace every full API key in ``text`` with its visible prefix followed by an ellipsis."""
    if "rl_" not in text:
        return text
    return _API_KEY_RE.sub(r"\1…", text)


def clean_text(value: Any, max_chars: int | None = None) -> Any:
    """A client-supplied string as a log may store it: NUL removed (PostgreSQL refuses it in text),
    lone surrogates replaced (not encodable as UTF-8), cut to ``max_chars``. Non-strings pass."""
    if not isinstance(value, str):
        return value
    if "\x00" in value:
        value = value.replace("\x00", "")
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value if max_chars is None else value[:max_chars]


def scrub(value: Any) -> Any:
    """Return ``value`` with API keys masked in every string, recursing into dicts, lists and tuples."""
    if isinstance(value, str):
        return mask_api_key(value)
    if isinstance(value, dict):
        return {scrub(str(k)): scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(v) for v in value]
    return value


def utc_iso(epoch: float | None = None) -> str:
    """ISO 8601 UTC with millisecond precision and a ``Z`` suffix, e.g. ``2026-12-01T10:00:00.000Z``."""
    moment = dt.datetime.fromtimestamp(time.time() if epoch is None else epoch, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _masked_str(value: Any) -> str:
    return mask_api_key(str(value))


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(scrub(payload), default=_masked_str, ensure_ascii=False, separators=(",", ":"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, then any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "timestamp": utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack_info"] = self.formatStack(record.stack_info)
        return _dumps(payload)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time, so a replaced or closed stream
    (test capture, a daemon redirect) never leaves a handler holding a dead file object."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


def _ensure_dir(log_dir: str) -> str:
    """Create ``log_dir`` and prove it is writable, or raise LogSetupError naming it."""
    try:
        os.makedirs(log_dir, exist_ok=True)
        probe = os.path.join(log_dir, f".write-test-{os.getpid()}-{threading.get_ident()}")
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise LogSetupError(f"LOG_DIR {log_dir!r} is not a writable directory: {exc.strerror or exc}") from None
    return log_dir


def _rotating_handler(path: str, max_bytes: int, backup_count: int, shared: bool = False) -> logging.Handler:
    """A size-rotated file handler; with ``shared`` (several worker processes append to the same
    file) a WatchedFileHandler instead, because in-process rotation is not safe across processes:
    rotate such files with logrotate, and the handler reopens them."""
    try:
        if shared:
            return logging.handlers.WatchedFileHandler(path, encoding="utf-8")
        return logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
        )
    except OSError as exc:
        raise LogSetupError(f"cannot open log file {path!r}: {exc.strerror or exc}") from None


def configure_logging(config: Config) -> None:
    """Send the root logger's records as JSON lines to stderr and ``LOG_DIR/app.log``.

    Idempotent: the handlers this function installed before are replaced, never duplicated,
    so calling it again (tests, a reloaded config) is safe. Raises LogSetupError when LOG_DIR
    cannot be created or written, or LOG_LEVEL is not a logging level.
    """
    level = logging.getLevelName(str(config.log_level).upper())
    if not isinstance(level, int):
        raise LogSetupError(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {config.log_level!r}")
    log_dir = _ensure_dir(config.log_dir)
    file_handler = _rotating_handler(os.path.join(log_dir, APP_LOG_NAME), config.log_max_bytes,
                                     config.log_backup_count, shared=config.web_concurrency > 1)
    formatter = JsonFormatter()
    handlers: list[logging.Handler] = [_StderrHandler(), file_handler]
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MANAGED_ATTR, False)]:
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _MANAGED_ATTR, True)
        root.addHandler(handler)
    root.setLevel(level)


# --------------------------------------------------------------------------- batch writer


class BatchWriter:
    """Queue items from any thread; a daemon thread hands them to ``flush(list)`` in batches.

    ``put`` never blocks (a full queue answers False and counts a drop). A batch whose flush
    raises is logged and retried on the next tick, up to ``max_retries`` times, then dropped and
    counted, so a transient database error does not lose accepted data and a lasting one does
    not grow memory without bound.

    With ``transient`` (a predicate on the exception) one bad item cannot take its batch down: a
    failed batch is written again item by item; items refused with a non-transient error are
    dropped alone (counted as ``rejected``, one log line per batch), and at the first transient
    error the rest of the batch is kept for the retry above.
    """

    def __init__(
        self,
        flush: Callable[[list[Any]], None],
        *,
        interval: float = 1.0,
        max_batch: int = 500,
        max_queue: int = 100_000,
        max_retries: int = 3,
        name: str = "batch-writer",
        transient: Callable[[BaseException], bool] | None = None,
        autostart: bool = True,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or interval <= 0:
            raise ValueError("max_batch and max_queue must be >= 1 and interval > 0")
        self._flush = flush
        self._interval = interval
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._max_retries = max_retries
        self._name = name
        self._transient = transient
        self._items: collections.deque[Any] = collections.deque()
        self._cond = threading.Condition()
        self._flush_lock = threading.Lock()
        self._retry_batch: list[Any] | None = None
        self._attempts = 0
        self._closing = False
        self._counts = dict(accepted=0, flushed=0, batches=0, dropped=0, failed=0, retries=0, rejected=0)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        if autostart:
            self.start()

    def start(self) -> None:
        """Start the background thread (once); until then ``put`` only queues."""
        with self._cond:
            if self._thread.is_alive() or self._thread.ident is not None or self._closing:
                return
            self._thread.start()

    def put(self, item: Any) -> bool:
        """Queue ``item`` for the next flush; False (and counted as dropped) if full or closed."""
        with self._cond:
            if self._closing or len(self._items) >= self._max_queue:
                self._counts["dropped"] += 1
                return False
            self._items.append(item)
            self._counts["accepted"] += 1
            if len(self._items) >= self._max_batch:
                self._cond.notify()
        return True

    def flush_now(self) -> int:
        """Flush everything waiting, on the calling thread; return how many items were written."""
        written = 0
        with self._flush_lock:
            while True:
                batch = self._retry_batch or self._take()
                if not batch:
                    return written
                done = self._try_flush(batch)
                written += done
                if self._retry_batch is not None:
                    return written

    def close(self, timeout: float = 5.0) -> bool:
        """Stop accepting items, flush what was accepted, stop the thread; True if it finished in time."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            started = self._thread.ident is not None
        if not started:  # never started: write what was queued here, as the thread would have
            self.flush_now()
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> dict[str, int]:
        """Counters: accepted, flushed, batches, dropped (queue full), failed (given up), retries,
        rejected (single items the flush refused), queued."""
        with self._cond:
            queued = len(self._items) + len(self._retry_batch or ())
            return dict(self._counts, queued=queued)

    def _take(self) -> list[Any]:
        with self._cond:
            count = min(self._max_batch, len(self._items))
            return [self._items.popleft() for _ in range(count)]

    def _try_flush(self, batch: list[Any]) -> int:
        """Flush one batch; on failure isolate bad items, keep the rest for a retry or give it up.
        Returns how many items were written."""
        try:
            self._flush(batch)
        except Exception as exc:
            if self._transient is not None and not self._transient(exc):
                return self._flush_each(batch)
            return self._failed(batch)
        with self._cond:
            self._counts["flushed"] += len(batch)
            self._counts["batches"] += 1
            self._retry_batch, self._attempts = None, 0
        return len(batch)

    def _flush_each(self, batch: list[Any]) -> int:
        """Write ``batch`` one item at a time: drop the items refused for themselves, keep the rest
        from the first transient error on for a retry."""
        assert self._transient is not None
        written, refused, first_error = 0, 0, ""
        for index, item in enumerate(batch):
            try:
                self._flush([item])
            except Exception as exc:
                if self._transient(exc):
                    with self._cond:
                        self._counts["flushed"] += written
                        self._counts["rejected"] += refused
                    self._report_rejected(refused, first_error)
                    return written + self._failed(batch[index:])
                refused += 1
                first_error = first_error or (str(exc).splitlines() or [type(exc).__name__])[0]
            else:
                written += 1
        with self._cond:
            self._counts["flushed"] += written
            self._counts["batches"] += 1
            self._counts["rejected"] += refused
            self._retry_batch, self._attempts = None, 0
        self._report_rejected(refused, first_error)
        return written

    def _report_rejected(self, refused: int, error: str) -> None:
        if refused:
            log.warning("%s: dropped %d item(s) the flush refused, kept the rest of the batch: %s",
                        self._name, refused, error[:300])

    def _failed(self, batch: list[Any]) -> int:
        """A failure that says nothing about the items: retry the batch later, or give it up."""
        self._attempts += 1
        give_up = self._attempts > self._max_retries
        log.exception(
            "%s: flush of %d items failed (attempt %d)%s",
            self._name,
            len(batch),
            self._attempts,
            ", dropping the batch" if give_up else ", will retry",
        )
        with self._cond:
            if give_up:
                self._counts["failed"] += len(batch)
                self._retry_batch, self._attempts = None, 0
            else:
                self._counts["retries"] += 1
                self._retry_batch = batch
        return 0

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._retry_batch is not None or (not self._closing and len(self._items) < self._max_batch):
                    self._cond.wait(self._interval)
                closing = self._closing
            self.flush_now()
            with self._cond:
                if closing and not self._items and self._retry_batch is None:
                    return


class RefusalSampler:
    """Which refusals of a client to log: the first, then at most one per ``interval`` seconds,
    each carrying how many were left out since the last one.

    For banned clients: their requests are refused without being counted against them, so a
    row per refusal would let one client write rows as fast as it can send. Thread-safe; at most
    ``max_sources`` clients are tracked, the least recently seen going first.
    """

    def __init__(self, *, interval: float = 60.0, max_sources: int = 10_000,
                 clock: Callable[[], float] = time.time) -> None:
        self._interval = interval
        self._max_sources = max_sources
        self._clock = clock
        self._lock = threading.Lock()
        self._sources: collections.OrderedDict[str, list[float]] = collections.OrderedDict()
        self.suppressed_total = 0

    def admit(self, source: str) -> int | None:
        """None: do not log this refusal. Otherwise log it; the number is how many refusals of
        ``source`` were not logged since its previous logged one."""
        now = self._clock()
        with self._lock:
            entry = self._sources.get(source)
            if entry is not None and now - entry[0] < self._interval:
                entry[1] += 1
                self.suppressed_total += 1
                return None
            skipped = int(entry[1]) if entry is not None else 0
            self._sources[source] = [now, 0]
            self._sources.move_to_end(source)
            while len(self._sources) > self._max_sources:
                self._sources.popitem(last=False)
            return skipped


# --------------------------------------------------------------------------- request log


class RequestLogger:
    """Writes request records as JSON lines to ``LOG_DIR/requests.log`` from a background thread.

    ``log`` only copies the record onto a queue, so the request thread never touches the file.
    Every string is scrubbed with ``mask_api_key`` before it is written.
    """

    def __init__(
        self,
        log_dir: str,
        max_bytes: int = 10 * 1024 * 1024,
        backup_count: int = 5,
        retention_days: int = 14,
        *,
        interval: float = 0.25,
        max_queue: int = 100_000,
        shared: bool = False,
        autostart: bool = True,
    ) -> None:
        self.log_dir = _ensure_dir(log_dir)
        self.path = os.path.join(log_dir, REQUEST_LOG_NAME)
        self.retention_days = retention_days
        self._handler = _rotating_handler(self.path, max_bytes, backup_count, shared)
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._writer = BatchWriter(
            self._write, interval=interval, max_queue=max_queue, max_retries=0, name="request-log",
            autostart=autostart,
        )

    @classmethod
    def from_config(cls, config: Config, *, autostart: bool = True) -> RequestLogger:
        """Build the request logger the settings describe."""
        return cls(config.log_dir, config.log_max_bytes, config.log_backup_count, config.log_retention_days,
                   shared=config.web_concurrency > 1, autostart=autostart)

    def start(self) -> None:
        """Start the writer thread (once)."""
        self._writer.start()

    def log(self, record: dict[str, Any]) -> bool:
        """Queue one request record; the standard fields default to None. False if the queue is full."""
        entry: dict[str, Any] = {field: None for field in REQUEST_FIELDS}
        entry.update(record)
        if entry["timestamp"] is None:
            entry["timestamp"] = utc_iso()
        if entry["level"] is None:
            entry["level"] = "INFO"
        return self._writer.put(entry)

    def flush(self) -> None:
        """Write everything queued so far (synchronously)."""
        self._writer.flush_now()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, stop the thread and close the file."""
        self._writer.close(timeout)
        self._handler.close()

    def stats(self) -> dict[str, int]:
        return self._writer.stats()

    def prune(self, now: float | None = None) -> list[str]:
        """Delete rotated log files (``*.log.N``) in LOG_DIR older than retention_days; return their paths."""
        cutoff = (time.time() if now is None else now) - self.retention_days * 86400
        return prune_rotated_logs(self.log_dir, cutoff)

    def _write(self, batch: list[dict[str, Any]]) -> None:
        for entry in batch:
            clean = {name: clean_text(value, MAX_FIELD_CHARS) for name, value in entry.items()}
            self._handler.handle(logging.makeLogRecord({"msg": _dumps(clean), "levelno": logging.INFO}))


_ROTATED_RE = re.compile(r".+\.log\.\d+$")


def prune_rotated_logs(log_dir: str, cutoff_epoch: float) -> list[str]:
    """Remove rotated files in ``log_dir`` last modified before ``cutoff_epoch``; never the live files."""
    removed: list[str] = []
    for entry in os.scandir(log_dir):
        if not (entry.is_file() and _ROTATED_RE.match(entry.name)):
            continue
        try:
            if entry.stat().st_mtime < cutoff_epoch:
                os.remove(entry.path)
                removed.append(entry.path)
        except OSError as exc:
            log.warning("could not prune %s: %s", entry.path, exc)
    return sorted(removed)


# --------------------------------------------------------------------------- abuse detection

FAILED_LOGIN = "failed_login"
INVALID_KEY = "invalid_key"
RATE_LIMITED = "rate_limited"
IP_BAN = "ip_ban"
REGISTRATION_THROTTLED = "registration_throttled"
ABUSE_KINDS: tuple[str, ...] = (FAILED_LOGIN, INVALID_KEY, RATE_LIMITED, IP_BAN, REGISTRATION_THROTTLED)
ABUSE_DESCRIPTIONS: dict[str, str] = {
    FAILED_LOGIN: "possible credential stuffing",
    INVALID_KEY: "possible API key enumeration",
    RATE_LIMITED: "429 storm",
    IP_BAN: "repeated IP bans",
    REGISTRATION_THROTTLED: "possible account farming",
}
DEFAULT_IP_BAN_THRESHOLD = 2


@dataclasses.dataclass(frozen=True)
class Alert:
    """One abuse alert: ``count`` events of ``kind`` from ``source`` within ``window_seconds``."""

    kind: str
    source: str
    count: int
    window_seconds: float
    first_seen: float
    last_seen: float
    details: dict[str, Any]
    severity: str

    @property
    def description(self) -> str:
        return ABUSE_DESCRIPTIONS.get(self.kind, self.kind)

    @property
    def summary(self) -> str:
        """One line for logs and e-mail subjects, e.g. ``failed_login from 203.0.113.9``."""
        return f"{self.kind} from {self.source}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form with ISO timestamps, for the dashboard and the notifier."""
        data = dataclasses.asdict(self)
        data["first_seen"] = utc_iso(self.first_seen)
        data["last_seen"] = utc_iso(self.last_seen)
        data["description"] = self.description
        return data


@dataclasses.dataclass
class _Track:
    events: collections.deque[float]
    last_seen: float
    quiet_until: float = 0.0
    alerts: int = 0


class AbuseDetector:
    """Counts events per (kind, source) in a sliding window and raises one Alert at the threshold.

    After an alert the (kind, source) stays quiet for ``cooldown_seconds`` (default: the window).
    Thread-safe. Memory is bounded: each source keeps at most ``threshold`` timestamps, sources
    idle for a window (and cooldown) are evicted, and at most ``max_sources`` are tracked, the
    least recently seen going first.
    """

    def __init__(
        self,
        *,
        window_seconds: float,
        thresholds: dict[str, int],
        on_alert: Callable[[Alert], None] | None = None,
        clock: Callable[[], float] = time.time,
        cooldown_seconds: float | None = None,
        max_sources: int = 10_000,
        max_alerts: int = 200,
    ) -> None:
        if window_seconds <= 0 or any(v < 1 for v in thresholds.values()):
            raise ValueError("window_seconds must be > 0 and every threshold >= 1")
        self.window_seconds = window_seconds
        self.cooldown_seconds = window_seconds if cooldown_seconds is None else cooldown_seconds
        self.thresholds = dict(thresholds)
        self._on_alert = on_alert
        self._clock = clock
        self._max_sources = max_sources
        self._tracks: collections.OrderedDict[tuple[str, str], _Track] = collections.OrderedDict()
        self._alerts: collections.deque[Alert] = collections.deque(maxlen=max_alerts)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Config, on_alert: Callable[[Alert], None] | None = None, *,
                    clock: Callable[[], float] = time.time) -> AbuseDetector:
        """Detector with the ABUSE_* thresholds; two IP bans in the window escalate, and the first
        refused registration burst from an address (account farming) is worth an alert."""
        thresholds = {
            FAILED_LOGIN: config.abuse_failed_logins,
            INVALID_KEY: config.abuse_invalid_keys,
            RATE_LIMITED: config.abuse_429_storm,
            IP_BAN: DEFAULT_IP_BAN_THRESHOLD,
            REGISTRATION_THROTTLED: 1,
        }
        return cls(window_seconds=config.abuse_window_seconds, thresholds=thresholds, on_alert=on_alert, clock=clock)

    def record(self, kind: str, source: str, **details: Any) -> Alert | None:
        """Count one event; return the Alert if this event reached the threshold, else None."""
        threshold = self.thresholds.get(kind)
        if threshold is None:
            raise ValueError(f"unknown abuse kind {kind!r}; expected one of {', '.join(self.thresholds)}")
        now = self._clock()
        with self._lock:
            self._evict(now)
            track = self._track(kind, str(source), threshold, now)
            if now < track.quiet_until or len(track.events) < threshold:
                return None
            track.alerts += 1
            track.quiet_until = now + self.cooldown_seconds
            alert = Alert(
                kind=kind,
                source=str(source),
                count=len(track.events),
                window_seconds=self.window_seconds,
                first_seen=track.events[0],
                last_seen=now,
                details=dict(details),
                severity="critical" if kind == IP_BAN or track.alerts > 1 else "warning",
            )
            self._alerts.append(alert)
        log.warning("abuse alert: %s (%s)", alert.summary, alert.description, extra={"alert": alert.to_dict()})
        self._deliver(alert)
        return alert

    def recent_alerts(self, limit: int = 50) -> list[Alert]:
        """The latest alerts, newest first."""
        with self._lock:
            return list(reversed(self._alerts))[: max(0, limit)]

    def tracked_sources(self) -> int:
        with self._lock:
            return len(self._tracks)

    def _track(self, kind: str, source: str, threshold: int, now: float) -> _Track:
        key = (kind, source)
        track = self._tracks.get(key)
        if track is None:
            track = self._tracks[key] = _Track(collections.deque(maxlen=threshold), now)
            while len(self._tracks) > self._max_sources:
                self._tracks.popitem(last=False)
        else:
            self._tracks.move_to_end(key)
        horizon = now - self.window_seconds
        while track.events and track.events[0] <= horizon:
            track.events.popleft()
        track.events.append(now)
        track.last_seen = now
        return track

    def _evict(self, now: float) -> None:
        """Drop sources idle for longer than both the window and the cooldown (oldest first)."""
        horizon = now - max(self.window_seconds, self.cooldown_seconds)
        while self._tracks:
            oldest = next(iter(self._tracks.values()))
            if oldest.last_seen > horizon:
                return
            self._tracks.popitem(last=False)

    def _deliver(self, alert: Alert) -> None:
        if self._on_alert is None:
            return
        try:
            self._on_alert(alert)
        except Exception:
            log.exception("on_alert callback failed for %s", alert.summary)


def iter_request_log(path: str) -> Iterable[dict[str, Any]]:
    """Yield the records of a requests.log file, skipping lines that are not JSON (for /logs and tests)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                yield json.loads(line)
            except ValueError:
                continue
