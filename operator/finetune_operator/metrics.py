"""Prometheus metrics of the operator: what a platform team alerts on.

- ``finetune_jobs{namespace, phase}`` (gauge): FineTuneJobs by phase, as this replica last saw them.
- ``finetune_job_restarts_total{namespace, reason}`` (counter): gang restarts by reason (Preempted...).
- ``finetune_reconcile_duration_seconds{outcome}`` (histogram): one reconcile, read to status written.
- ``finetune_job_time_to_first_step_seconds{namespace}`` (histogram): creation to first optimiser step.
- ``finetune_job_checkpoint_age_seconds{namespace, name}`` (gauge): age of the newest complete checkpoint.

Everything is derived from the status the reconciler computed (``before`` -> ``after``, dicts as the
API server stores them), never from which trigger fired, so the numbers survive an operator restart:
a counter only moves when the status it is derived from moves (a restart already in the status is
not counted twice). Only the active replica reconciles, so only it reports jobs; a standby replica
reports none. Gauges are computed at scrape time from the last status seen per job.

The registry is an object of its own (not prometheus_client's global one), so tests build a fresh
one and the module has no import-time side effects.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from finetune_operator.api import Phase

RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FIRST_STEP_BUCKETS = (30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
"""Creation to first step spans image pulls, queueing and loading 70B weights: seconds to hours."""

Status = Mapping[str, Any]
PHASES: tuple[str, ...] = get_args(Phase)


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 timestamp as the API server writes it (``...Z``), else None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def newest_checkpoint_time(status: Status) -> datetime | None:
    """Completion time of the newest complete checkpoint in ``status.checkpoints``."""
    times = [
        parse_time(item.get("time"))
        for item in status.get("checkpoints") or []
        if isinstance(item, Mapping) and item.get("complete", True)
    ]
    found = [t for t in times if t is not None]
    return max(found) if found else None


def restarts_added(before: Status, after: Status) -> tuple[int, str] | None:
    """``(how many, last reason)`` when ``status.restarts.total`` grew from ``before`` to ``after``."""
    old = int((before.get("restarts") or {}).get("total") or 0)
    new_restarts = after.get("restarts") or {}
    new = int(new_restarts.get("total") or 0)
    if new <= old:
        return None
    return new - old, str(new_restarts.get("lastReason") or "Unknown")


def first_step_reached(before: Status, after: Status) -> bool:
    """True on the reconcile where progress.step first becomes positive."""
    old = int((before.get("progress") or {}).get("step") or 0)
    new = int((after.get("progress") or {}).get("step") or 0)
    return old == 0 and new > 0


@dataclass(frozen=True)
class _Seen:
    """What the gauges need of one FineTuneJob: its phase and newest checkpoint time."""

    phase: str
    checkpoint_time: datetime | None


class _JobGauges(Collector):
    """Scrape-time gauges over the last status seen per FineTuneJob."""

    def __init__(self, jobs: Callable[[], dict[tuple[str, str], _Seen]], clock: Callable[[], datetime]):
        self._jobs = jobs
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        jobs = self._jobs()
        by_phase = GaugeMetricFamily(
            "finetune_jobs", "FineTuneJobs by phase, as last reconciled.", labels=["namespace", "phase"]
        )
        counts: dict[tuple[str, str], int] = {}
        for (namespace, _), seen in jobs.items():
            counts[(namespace, seen.phase)] = counts.get((namespace, seen.phase), 0) + 1
        for namespace in sorted({ns for ns, _ in jobs}):
            for phase in PHASES:  # every phase, zeroes included, so rate() and absent() behave
                by_phase.add_metric([namespace, phase], counts.get((namespace, phase), 0))
        yield by_phase

        age = GaugeMetricFamily(
            "finetune_job_checkpoint_age_seconds",
            "Seconds since the newest complete checkpoint of each FineTuneJob that has one.",
            labels=["namespace", "name"],
        )
        now = self._clock()
        for (namespace, name), seen in sorted(jobs.items()):
            if seen.checkpoint_time is not None:
                age.add_metric([namespace, name], max(0.0, (now - seen.checkpoint_time).total_seconds()))
        yield age


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Metrics:
    """The operator's metrics and the calls the reconciler makes to keep them current."""

    def __init__(self, clock: Callable[[], datetime] = _utcnow) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str], _Seen] = {}
        self.restarts = Counter(
            "finetune_job_restarts",
            "Gang restarts of FineTuneJobs, by the reason the previous attempt ended.",
            ["namespace", "reason"],
            registry=self.registry,
        )
        self.reconcile_duration = Histogram(
            "finetune_reconcile_duration_seconds",
            "Time of one reconcile, from reading the FineTuneJob to writing its status.",
            ["outcome"],
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_step = Histogram(
            "finetune_job_time_to_first_step_seconds",
            "Seconds from a FineTuneJob's creation to its first optimiser step.",
            ["namespace"],
            buckets=FIRST_STEP_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_JobGauges(self._snapshot, clock))

    def _snapshot(self) -> dict[tuple[str, str], _Seen]:
        with self._lock:
            return dict(self._jobs)

    def job_observed(self, namespace: str, name: str, created: object, before: Status, after: Status) -> None:
        """Record one reconcile's outcome: ``before`` is the status read, ``after`` the status written.

        Call it after the status write succeeded (or when nothing had to be written): counting
        before a write that then conflicts would count the same restart again on the retry.
        ``created`` is ``metadata.creationTimestamp`` as the API server wrote it.
        """
        with self._lock:
            self._jobs[(namespace, name)] = _Seen(
                phase=str(after.get("phase") or "Pending"), checkpoint_time=newest_checkpoint_time(after)
            )
        added = restarts_added(before, after)
        if added is not None:
            count, reason = added
            self.restarts.labels(namespace=namespace, reason=reason).inc(count)
        created_at = parse_time(created)
        if created_at is not None and first_step_reached(before, after):
            seconds = max(0.0, (self._clock() - created_at).total_seconds())
            self.time_to_first_step.labels(namespace=namespace).observe(seconds)

    def job_deleted(self, namespace: str, name: str) -> None:
        """Stop reporting a FineTuneJob that no longer exists."""
        with self._lock:
            self._jobs.pop((namespace, name), None)

    def reconcile_timer(self) -> _ReconcileTimer:
        """``with metrics.reconcile_timer() as t: ...; t.outcome = "conflict"`` times one reconcile."""
        return _ReconcileTimer(self.reconcile_duration)

    def serve(self, port: int, address: str = "0.0.0.0") -> WSGIServer:
        """Serve ``/metrics`` on ``address:port`` from a daemon thread (prometheus_client's server).

        The operator serves until it exits; ``shutdown()`` on the returned server stops it earlier.
        """
        server, _ = start_http_server(port, addr=address, registry=self.registry)
        return server


class _ReconcileTimer:
    """Times a ``with`` block; the outcome is ``ok`` unless set, or ``error`` when it raised."""

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self.outcome = "ok"
        self._start = 0.0

    def __enter__(self) -> _ReconcileTimer:
        self._start = time.monotonic()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        outcome = "error" if exc_type is not None else self.outcome
        self._histogram.labels(outcome=outcome).observe(time.monotonic() - self._start)
