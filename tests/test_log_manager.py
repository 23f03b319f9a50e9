"""JSON logging, the request log file, abuse detection and the batch writer."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from config import Config
from log_manager import (
    AbuseDetector,
    Alert,
    BatchWriter,
    LogSetupError,
    RefusalSampler,
    RequestLogger,
    clean_text,
    configure_logging,
    iter_request_log,
    mask_api_key,
)
from tests.services import wait_until

FULL_KEY = "rl_1a2b3c4d_" + "Zx9-_" * 9  # 45 urlsafe characters after the prefix
MASKED = "rl_1a2b3c4d…"


def read_lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# --------------------------------------------------------------------------- configure_logging


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, restored to its handlers and level after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_configure_logging_writes_json_lines_to_file_and_stderr(tmp_path, root_logger, capsys):
    log_dir = tmp_path / "logs" / "nested"
    configure_logging(Config(log_dir=str(log_dir), log_level="INFO"))

    logging.getLogger("rl.test").warning("key %s blocked", FULL_KEY, extra={"key_prefix": "rl_1a2b3c4d"})
    logging.getLogger("rl.test").debug("below the level")
    for handler in root_logger.handlers:
        handler.flush()

    [line] = read_lines(log_dir / "app.log")
    assert line["level"] == "WARNING" and line["logger"] == "rl.test"
    assert line["message"] == f"key {MASKED} blocked"
    assert line["key_prefix"] == "rl_1a2b3c4d"
    assert line["timestamp"].endswith("Z") and "T" in line["timestamp"]
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["message"] == line["message"]


def test_stderr_handler_follows_a_replaced_sys_stderr(tmp_path, root_logger, monkeypatch):
    configure_logging(Config(log_dir=str(tmp_path)))
    replacement = io.StringIO()
    monkeypatch.setattr(sys, "stderr", replacement)

    logging.getLogger("rl.test").warning("after the swap")

    assert json.loads(replacement.getvalue())["message"] == "after the swap"


def test_configure_logging_twice_adds_no_duplicate_handlers(tmp_path, root_logger):
    config = Config(log_dir=str(tmp_path))
    configure_logging(config)
    count = len(root_logger.handlers)
    configure_logging(config)

    assert len(root_logger.handlers) == count
    logging.getLogger("rl.test").error("once")
    for handler in root_logger.handlers:
        handler.flush()
    assert [entry["message"] for entry in read_lines(tmp_path / "app.log")] == ["once"]


def test_configure_logging_includes_exception_text(tmp_path, root_logger):
    configure_logging(Config(log_dir=str(tmp_path)))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("rl.test").exception("failed")
    for handler in root_logger.handlers:
        handler.flush()

    assert "RuntimeError: boom" in read_lines(tmp_path / "app.log")[0]["exc_info"]


def test_unwritable_log_dir_is_a_clear_error(tmp_path, root_logger):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")

    with pytest.raises(LogSetupError, match="LOG_DIR"):
        configure_logging(Config(log_dir=str(blocker / "logs")))


def test_bad_log_level_is_a_clear_error(tmp_path, root_logger):
    with pytest.raises(LogSetupError, match="LOG_LEVEL"):
        configure_logging(Config(log_dir=str(tmp_path), log_level="LOUD"))


# --------------------------------------------------------------------------- mask_api_key


def test_mask_api_key_keeps_only_the_prefix():
    assert mask_api_key(f"GET /data?api_key={FULL_KEY}&x=1") == f"GET /data?api_key={MASKED}&x=1"
    assert mask_api_key(f"{FULL_KEY} and {FULL_KEY}") == f"{MASKED} and {MASKED}"


def test_mask_api_key_leaves_prefixes_and_short_strings_alone():
    assert mask_api_key("key rl_1a2b3c4d was blocked") == "key rl_1a2b3c4d was blocked"
    assert mask_api_key("rl_1a2b3c4d_short") == "rl_1a2b3c4d_short"


# --------------------------------------------------------------------------- RequestLogger


@pytest.fixture
def request_logger(tmp_path) -> Iterator[Callable[..., RequestLogger]]:
    made: list[RequestLogger] = []

    def build(**kwargs) -> RequestLogger:
        kwargs.setdefault("max_bytes", 1024 * 1024)
        made.append(RequestLogger(str(tmp_path), **kwargs))
        return made[-1]

    yield build
    for item in made:
        item.close()


def test_request_records_are_json_lines_with_every_field(request_logger, tmp_path):
    logger = request_logger()
    logger.log(
        {
            "method": "GET",
            "path": "/data",
            "status": 200,
            "ip": "127.0.0.1",
            "key_prefix": "rl_1a2b3c4d",
            "duration_ms": 1.5,
            "message": "ok",
        }
    )
    logger.log({"method": "GET", "path": "/usage", "status": 429, "level": "WARNING", "tier": "free"})
    logger.close()

    first, second = read_lines(tmp_path / "requests.log")
    assert {"timestamp", "level", "method", "path", "status", "ip", "key_prefix", "duration_ms", "message"} <= set(
        first
    )
    assert first["status"] == 200 and first["level"] == "INFO" and first["timestamp"].endswith("Z")
    assert second["level"] == "WARNING" and second["tier"] == "free" and second["ip"] is None


def test_a_full_api_key_never_reaches_the_request_log(request_logger, tmp_path):
    logger = request_logger()
    logger.log({"path": f"/data?api_key={FULL_KEY}", "message": f"bad key {FULL_KEY}", "extra": {"k": [FULL_KEY]}})
    logger.close()

    text = (tmp_path / "requests.log").read_text(encoding="utf-8")
    assert "Zx9-_" not in text
    assert list(iter_request_log(str(tmp_path / "requests.log")))[0]["path"] == f"/data?api_key={MASKED}"


def test_request_log_file_io_happens_off_the_callers_thread(request_logger, monkeypatch):
    writers: set[str] = set()
    original = logging.handlers.RotatingFileHandler.emit

    def spy(self, record):
        writers.add(threading.current_thread().name)
        return original(self, record)

    monkeypatch.setattr(logging.handlers.RotatingFileHandler, "emit", spy)
    logger = request_logger()
    assert logger.log({"path": "/data"}) is True
    assert writers == set()
    logger.close()

    assert writers and threading.current_thread().name not in writers


def test_request_log_rotates_at_max_bytes(request_logger, tmp_path):
    logger = request_logger(max_bytes=1024, backup_count=3)
    for i in range(60):
        logger.log({"path": f"/data/{i}", "message": "x" * 40})
    logger.close()

    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("requests.log"))
    assert files == ["requests.log", "requests.log.1", "requests.log.2", "requests.log.3"]
    assert all(os.path.getsize(tmp_path / name) <= 1024 for name in files)


def test_prune_removes_rotated_files_older_than_retention(request_logger, tmp_path):
    logger = request_logger(retention_days=7)
    now = time.time()
    for name, age_days in [("requests.log.1", 1), ("requests.log.2", 8), ("app.log.3", 30), ("notes.txt", 30)]:
        (tmp_path / name).write_text("{}\n")
        os.utime(tmp_path / name, (now - age_days * 86400, now - age_days * 86400))
    os.utime(tmp_path / "requests.log", (now - 30 * 86400, now - 30 * 86400))

    removed = logger.prune(now=now)

    assert sorted(os.path.basename(p) for p in removed) == ["app.log.3", "requests.log.2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "requests.log", "requests.log.1"]


# --------------------------------------------------------------------------- AbuseDetector


def detector(clock: Callable[[], float], alerts: list[Alert] | None = None, **kwargs) -> AbuseDetector:
    kwargs.setdefault("thresholds", {"failed_login": 3, "invalid_key": 3, "rate_limited": 5, "ip_ban": 2})
    on_alert = alerts.append if alerts is not None else None
    return AbuseDetector(window_seconds=60, on_alert=on_alert, clock=clock, **kwargs)


def test_alert_fires_once_when_the_threshold_is_reached(clock):
    alerts: list[Alert] = []
    abuse = detector(clock, alerts)

    results = []
    for _ in range(5):
        results.append(abuse.record("failed_login", "203.0.113.9", username="alice"))
        clock.advance(1)

    assert results[:2] == [None, None] and results[3:] == [None, None]
    alert = results[2]
    assert alerts == [alert]
    assert (alert.kind, alert.source, alert.count, alert.severity) == ("failed_login", "203.0.113.9", 3, "warning")
    assert alert.last_seen - alert.first_seen == 2
    assert alert.details == {"username": "alice"}


def test_events_older_than_the_window_do_not_count(clock):
    abuse = detector(clock)
    abuse.record("invalid_key", "198.51.100.7")
    abuse.record("invalid_key", "198.51.100.7")
    clock.advance(61)

    assert abuse.record("invalid_key", "198.51.100.7") is None
    assert abuse.record("invalid_key", "198.51.100.7") is None
    assert abuse.record("invalid_key", "198.51.100.7") is not None


def test_sources_and_kinds_are_counted_separately(clock):
    abuse = detector(clock)
    for source in ("10.0.0.1", "10.0.0.2"):
        abuse.record("failed_login", source)
        abuse.record("invalid_key", source)

    assert abuse.recent_alerts() == []


def test_cooldown_keeps_quiet_then_alerts_again_as_critical(clock):
    alerts: list[Alert] = []
    abuse = detector(clock, alerts, cooldown_seconds=120)
    for _ in range(3):
        abuse.record("failed_login", "203.0.113.9")
    clock.advance(100)
    for _ in range(3):
        assert abuse.record("failed_login", "203.0.113.9") is None
    clock.advance(20)

    again = abuse.record("failed_login", "203.0.113.9")

    assert again is not None and again.severity == "critical"
    assert len(alerts) == 2


def test_two_ip_bans_escalate_to_a_critical_alert(clock):
    abuse = detector(clock)
    assert abuse.record("ip_ban", "203.0.113.9", ban_seconds=300) is None
    alert = abuse.record("ip_ban", "203.0.113.9", ban_seconds=600)
    assert alert is not None and alert.severity == "critical" and alert.to_dict()["last_seen"].endswith("Z")


def test_a_failing_on_alert_is_logged_not_raised(clock, caplog):
    def broken(alert: Alert) -> None:
        raise RuntimeError("mail server on fire")

    abuse = AbuseDetector(window_seconds=60, thresholds={"failed_login": 1}, on_alert=broken, clock=clock)
    with caplog.at_level(logging.ERROR, logger="log_manager"):
        assert abuse.record("failed_login", "203.0.113.9") is not None
    assert "on_alert callback failed" in caplog.text


def test_stale_sources_are_evicted_and_tracking_is_capped(clock):
    abuse = detector(clock, max_sources=50)
    for i in range(200):
        abuse.record("invalid_key", f"10.0.{i // 256}.{i % 256}")
    assert abuse.tracked_sources() == 50

    clock.advance(61)
    abuse.record("invalid_key", "192.0.2.1")
    assert abuse.tracked_sources() == 1


def test_recent_alerts_are_newest_first_and_bounded(clock):
    abuse = AbuseDetector(window_seconds=60, thresholds={"rate_limited": 1}, clock=clock, max_alerts=3)
    for i in range(5):
        abuse.record("rate_limited", f"rl_0000000{i}")

    assert [a.source for a in abuse.recent_alerts(10)] == ["rl_00000004", "rl_00000003", "rl_00000002"]
    assert len(abuse.recent_alerts(1)) == 1


def test_concurrent_records_raise_exactly_one_alert():
    alerts: list[Alert] = []
    abuse = AbuseDetector(window_seconds=60, thresholds={"failed_login": 100}, on_alert=alerts.append)
    barrier = threading.Barrier(8)

    def hammer() -> None:
        barrier.wait()
        for _ in range(50):
            abuse.record("failed_login", "203.0.113.9")

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert len(alerts) == 1 and alerts[0].count == 100


def test_unknown_kind_is_rejected(clock):
    with pytest.raises(ValueError):
        detector(clock).record("sneezing", "x")


def test_from_config_uses_the_abuse_settings():
    config = Config(abuse_window_seconds=30, abuse_failed_logins=4, abuse_invalid_keys=5, abuse_429_storm=6)
    abuse = AbuseDetector.from_config(config)
    assert abuse.window_seconds == 30
    assert abuse.thresholds == {"failed_login": 4, "invalid_key": 5, "rate_limited": 6, "ip_ban": 2,
                                "registration_throttled": 1}


# --------------------------------------------------------------------------- BatchWriter


@pytest.fixture
def batch_writer() -> Iterator[Callable[..., BatchWriter]]:
    made: list[BatchWriter] = []

    def build(flush: Callable[[list], None], **kwargs) -> BatchWriter:
        made.append(BatchWriter(flush, **kwargs))
        return made[-1]

    yield build
    for item in made:
        item.close(timeout=5)


def test_a_full_batch_is_flushed_without_waiting_for_the_interval(batch_writer):
    batches: list[list[int]] = []
    writer = batch_writer(batches.append, interval=60, max_batch=10)
    for i in range(25):
        assert writer.put(i)

    wait_until(lambda: sum(map(len, batches)) >= 10)  # long before the 60 s interval
    flushed = [item for batch in batches for item in batch]
    assert all(len(batch) <= 10 for batch in batches)
    assert flushed == list(range(len(flushed)))


def test_items_are_flushed_every_interval(batch_writer):
    batches: list[list[str]] = []
    writer = batch_writer(batches.append, interval=0.05, max_batch=100)
    writer.put("a")
    writer.put("b")

    wait_until(lambda: batches == [["a", "b"]])
    assert writer.stats()["flushed"] == 2


def test_a_failed_flush_keeps_the_batch_and_retries_it(batch_writer, caplog):
    batches: list[list[int]] = []
    failures = [RuntimeError("database is locked")]

    def flush(batch: list[int]) -> None:
        if failures:
            raise failures.pop()
        batches.append(list(batch))

    writer = batch_writer(flush, interval=0.05, max_batch=100)
    for i in range(3):
        writer.put(i)

    wait_until(lambda: batches == [[0, 1, 2]])
    stats = writer.stats()
    assert stats["retries"] == 1 and stats["failed"] == 0 and stats["flushed"] == 3
    assert "will retry" in caplog.text


def test_a_batch_that_keeps_failing_is_dropped_and_counted(batch_writer):
    attempts: list[int] = []

    def flush(batch: list[int]) -> None:
        attempts.append(len(batch))
        raise RuntimeError("database gone")

    writer = batch_writer(flush, interval=0.02, max_batch=100, max_retries=2)
    writer.put(1)
    writer.put(2)

    wait_until(lambda: writer.stats()["failed"] == 2)
    assert attempts == [2, 2, 2]
    assert writer.stats()["queued"] == 0


def test_close_drains_everything_accepted(batch_writer):
    seen: list[int] = []
    writer = batch_writer(seen.extend, interval=60, max_batch=1000)
    for i in range(500):
        writer.put(i)

    assert writer.close(timeout=5) is True
    assert seen == list(range(500))
    assert writer.put(501) is False


def test_put_never_blocks_when_the_queue_is_full(batch_writer):
    release = threading.Event()
    writer = batch_writer(lambda batch: release.wait(10), interval=0.01, max_batch=1, max_queue=5)
    writer.put("in flight")
    wait_until(lambda: writer.stats()["queued"] == 0)  # the flusher is now stuck in flush

    started = time.perf_counter()
    results = [writer.put(i) for i in range(20)]
    elapsed = time.perf_counter() - started
    release.set()

    assert elapsed < 0.05
    assert results.count(True) == 5 and writer.stats()["dropped"] == 15


def test_flush_now_writes_synchronously(batch_writer):
    seen: list[str] = []
    writer = batch_writer(seen.extend, interval=60, max_batch=1000)
    writer.put("x")

    assert writer.flush_now() == 1
    assert seen == ["x"]


# --------------------------------------------------------------------------- bad input, sampling


def test_clean_text_strips_nul_replaces_lone_surrogates_and_truncates():
    assert clean_text("/a\x00b\ud800c", 4) == "/ab?"
    assert clean_text("plain") == "plain" and clean_text(None) is None and clean_text(42, 1) == 42


def test_nul_and_lone_surrogates_do_not_cost_the_request_log_its_lines(request_logger, tmp_path):
    logger = request_logger()
    logger.log({"method": "GET", "path": "/a\x00b\ud800c", "ip": "x" * 2000})
    logger.log({"method": "GET", "path": "/next"})
    logger.close()
    first, second = read_lines(tmp_path / "requests.log")
    assert first["path"] == "/ab?c" and len(first["ip"]) == 500 and second["path"] == "/next"


def test_items_refused_for_themselves_are_dropped_alone(batch_writer, caplog):
    written: list[int] = []

    def flush(items: list[int]) -> None:
        if any(item < 0 for item in items):
            raise ValueError(f"negative item in {items}")
        written.extend(items)

    writer = batch_writer(flush, interval=60, transient=lambda exc: not isinstance(exc, ValueError))
    for item in (1, -2, 3, -4, 5):
        writer.put(item)
    assert writer.flush_now() == 3
    assert written == [1, 3, 5]
    stats = writer.stats()
    assert (stats["flushed"], stats["rejected"], stats["failed"], stats["queued"]) == (3, 2, 0, 0)
    assert [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()] == [
        "batch-writer: dropped 2 item(s) the flush refused, kept the rest of the batch: negative item in [-2]"]


def test_refusals_are_logged_once_per_interval_with_the_count_left_out(clock):
    sampler = RefusalSampler(interval=60, clock=clock)
    assert sampler.admit("192.0.2.1") == 0
    assert [sampler.admit("192.0.2.1") for _ in range(5)] == [None] * 5
    assert sampler.admit("192.0.2.2") == 0  # each client on its own
    clock.advance(60)
    assert sampler.admit("192.0.2.1") == 5
    assert sampler.admit("192.0.2.1") is None and sampler.suppressed_total == 6


def test_refusal_sampler_tracks_a_bounded_number_of_clients(clock):
    sampler = RefusalSampler(interval=60, max_sources=3, clock=clock)
    for i in range(10):
        sampler.admit(f"192.0.2.{i}")
    assert sampler.admit("192.0.2.9") is None  # still tracked
    assert sampler.admit("192.0.2.0") == 0  # evicted: logged again (with no count to report)
