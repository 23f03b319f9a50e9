"""Usage analytics and runtime metrics, kept off the request path.

``UsageRecorder`` aggregates allowed/limited counts per (subject, minute) in memory and a
background thread upserts them in one transaction per flush, so a request costs a dict
update, never a database write. ``Metrics`` holds this process's counters and feeds both
``/api/metrics`` (JSON) and ``/metrics`` (Prometheus text).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

import database as db

log = logging.getLogger(__name__)


def minute_bucket(epoch: float) -> dt.datetime:
    """Start of the UTC minute holding ``epoch``, naive as every stored timestamp."""
    return dt.datetime.fromtimestamp(int(epoch // 60 * 60), dt.UTC).replace(tzinfo=None)


@dataclasses.dataclass
class _Pending:
    key_id: int | None
    user_id: int | None
    tier: str
    allowed: int = 0
    limited: int = 0


class UsageRecorder:
    """Counts decisions per subject and minute; ``flush`` writes them in one batch."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock
        self._lock = threading.Lock()  # guards the pending dicts; held for microseconds (hot path)
        # Held across a flush's swap-and-write and a totals read, so a reader never sees counts
        # that are in neither place (moved out of pending, not yet committed) or in both.
        self._flush_lock = threading.Lock()
        self._pending: dict[tuple[str, dt.datetime], _Pending] = {}
        self._last_used: dict[int, dt.datetime] = {}
        self.flush_failures = 0

    def record(self, subject: str, *, key_id: int | None, user_id: int | None, tier: str, allowed: bool) -> None:
        now = self._clock()
        bucket = minute_bucket(now)
        with self._lock:
            entry = self._pending.get((subject, bucket))
            if entry is None:
                entry = self._pending[(subject, bucket)] = _Pending(key_id, user_id, tier)
            entry.tier = tier
            if allowed:
                entry.allowed += 1
            else:
                entry.limited += 1
            if key_id is not None and allowed:
                self._last_used[key_id] = dt.datetime.fromtimestamp(now, dt.UTC).replace(tzinfo=None)

    def pending_counts(self, subject: str, since: dt.datetime) -> tuple[int, int]:
        """(allowed since ``since``, allowed in total) not yet written, for exact /usage totals."""
        today = total = 0
        with self._lock:
            for (name, bucket), entry in self._pending.items():
                if name == subject:
                    total += entry.allowed
                    if bucket >= since:
                        today += entry.allowed
        return today, total

    def flush(self) -> int:
        """Write what is pending; on failure keep it for the next flush. Returns rows written."""
        with self._flush_lock:
            return self._flush()

    def _flush(self) -> int:
        with self._lock:
            pending, self._pending = self._pending, {}
            last_used, self._last_used = self._last_used, {}
        if not pending and not last_used:
            return 0
        rows = [
            {"subject": subject, "bucket_start": bucket, "key_id": e.key_id, "user_id": e.user_id,
             "tier": e.tier, "allowed": e.allowed, "limited": e.limited}
            for (subject, bucket), e in pending.items()
        ]
        try:
            db.add_usage(self._engine, rows, last_used)
        except Exception as exc:  # the database may be restarting: keep the counts, retry later
            self.flush_failures += 1
            log.warning("usage flush failed, will retry: %s", str(exc).splitlines()[0] if str(exc) else exc)
            self._merge_back(pending, last_used)
            return 0
        return len(rows)

    def _merge_back(self, pending: dict[tuple[str, dt.datetime], _Pending], last_used: dict[int, dt.datetime]) -> None:
        with self._lock:
            for key, entry in pending.items():
                current = self._pending.get(key)
                if current is None:
                    self._pending[key] = entry
                else:
                    current.allowed += entry.allowed
                    current.limited += entry.limited
            for key_id, ts in last_used.items():
                self._last_used.setdefault(key_id, ts)

    def totals(self, subject: str, today_start: dt.datetime) -> dict[str, int]:
        """Allowed requests of ``subject`` today and in all time, stored plus pending."""
        c = db.usage_counters.c
        with self._flush_lock, self._engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(c.allowed), 0),
                    sa.func.coalesce(sa.func.sum(sa.case((c.bucket_start >= today_start, c.allowed), else_=0)), 0),
                ).where(c.subject == subject)
            ).one()
            pending_today, pending_total = self.pending_counts(subject, today_start)
        return {"today": int(row[1]) + pending_today, "all_time": int(row[0]) + pending_total}


class Metrics:
    """This process's request counters (thread-safe), exported as JSON and as Prometheus text."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.started = clock()
        self._lock = threading.Lock()
        self.requests_total = 0
        self.allowed_total = 0
        self.rate_limited_total = 0
        self.ip_refused_total = 0
        self.by_status: Counter[str] = Counter()
        self.by_tier: dict[str, Counter[str]] = defaultdict(Counter)
        self.alerts: Counter[str] = Counter()
        self.shadow_refusals: Counter[str] = Counter()  # per policy (limit) name
        self.latency_sum = 0.0

    def observe_request(self, status: int, duration: float) -> None:
        with self._lock:
            self.requests_total += 1
            self.by_status[str(status)] += 1
            self.latency_sum += duration

    def observe_decision(self, tier: str, allowed: bool) -> None:
        with self._lock:
            if allowed:
                self.allowed_total += 1
                self.by_tier[tier]["allowed"] += 1
            else:
                self.rate_limited_total += 1
                self.by_tier[tier]["limited"] += 1

    def observe_ip_refusal(self) -> None:
        with self._lock:
            self.ip_refused_total += 1

    def observe_shadow_refusal(self, policy: str) -> None:
        with self._lock:
            self.shadow_refusals[policy] += 1

    def observe_alert(self, kind: str) -> None:
        with self._lock:
            self.alerts[kind] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "uptime_seconds": round(self._clock() - self.started, 3),
                "requests_total": self.requests_total,
                "allowed_total": self.allowed_total,
                "rate_limited_total": self.rate_limited_total,
                "ip_refused_total": self.ip_refused_total,
                "by_tier": {tier: dict(counts) for tier, counts in self.by_tier.items()},
                "by_status": dict(self.by_status),
                "alerts": dict(self.alerts),
                "shadow_refusals": dict(self.shadow_refusals),
                "avg_response_ms": round(self.latency_sum / self.requests_total * 1000, 3)
                if self.requests_total else 0.0,
            }


class MetricsCollector(Collector):
    """Prometheus view of ``Metrics`` plus live gauges supplied by the app."""

    def __init__(self, metrics: Metrics, gauges: Callable[[], dict[str, float]]) -> None:
        self._metrics = metrics
        self._gauges = gauges

    def collect(self) -> Iterator[Any]:
        snap = self._metrics.snapshot()
        requests = CounterMetricFamily("ratelimiter_http_requests", "HTTP requests by status", labels=["status"])
        for status, count in sorted(snap["by_status"].items()):
            requests.add_metric([status], count)
        yield requests
        decisions = CounterMetricFamily(
            "ratelimiter_decisions", "Rate-limit decisions by tier and outcome", labels=["tier", "outcome"]
        )
        for tier, counts in sorted(snap["by_tier"].items()):
            for outcome in ("allowed", "limited"):
                decisions.add_metric([tier, outcome], counts.get(outcome, 0))
        yield decisions
        refused = CounterMetricFamily("ratelimiter_ip_refused", "Requests refused by the per-IP limit or a ban")
        refused.add_metric([], snap["ip_refused_total"])
        yield refused
        alerts = CounterMetricFamily("ratelimiter_alerts", "Abuse alerts raised", labels=["kind"])
        for kind, count in sorted(snap["alerts"].items()):
            alerts.add_metric([kind], count)
        yield alerts
        shadow = CounterMetricFamily("ratelimit_shadow_refusals", "Requests a shadow limit would have refused",
                                     labels=["policy"])
        for policy, count in sorted(snap["shadow_refusals"].items()):
            shadow.add_metric([policy], count)
        yield shadow
        uptime = GaugeMetricFamily("ratelimiter_uptime_seconds", "Seconds since this process started")
        uptime.add_metric([], snap["uptime_seconds"])
        yield uptime
        for name, value in sorted(self._gauges().items()):
            gauge = GaugeMetricFamily(f"ratelimiter_{name}", name.replace("_", " "))
            gauge.add_metric([], value)
            yield gauge
