"""The operator's Prometheus metrics (finetune_operator.metrics): derived from status transitions."""

from __future__ import annotations

import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from finetune_devenv import _proc
from finetune_operator.metrics import (
    PHASES,
    Metrics,
    first_step_reached,
    newest_checkpoint_time,
    parse_time,
    restarts_added,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
CREATED = "2026-11-21T11:50:00Z"


def status(phase: str = "Running", **extra: Any) -> dict[str, Any]:
    return {"phase": phase, **extra}


def fresh() -> Metrics:
    return Metrics(clock=lambda: NOW)


def value(metrics: Metrics, metric: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(metric, labels)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2026-11-21T11:50:00Z", datetime(2026, 11, 21, 11, 50, tzinfo=UTC)),
        ("2026-11-21T11:50:00.5+00:00", datetime(2026, 11, 21, 11, 50, 0, 500000, tzinfo=UTC)),
        ("not a time", None),
        ("", None),
        (None, None),
        (12, None),
    ],
)
def test_parse_time(raw: object, expected: datetime | None) -> None:
    assert parse_time(raw) == expected


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ({}, {}, None),
        ({}, {"restarts": {"total": 1, "lastReason": "Preempted"}}, (1, "Preempted")),
        (
            {"restarts": {"total": 1}},
            {"restarts": {"total": 3, "lastReason": "TrainerError"}},
            (2, "TrainerError"),
        ),
        ({"restarts": {"total": 2}}, {"restarts": {"total": 2, "lastReason": "Preempted"}}, None),
        ({}, {"restarts": {"total": 1}}, (1, "Unknown")),
    ],
)
def test_restarts_added(before: dict[str, Any], after: dict[str, Any], expected: object) -> None:
    assert restarts_added(before, after) == expected


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ({}, {"progress": {"step": 1}}, True),
        ({"progress": {"step": 0}}, {"progress": {"step": 5}}, True),
        ({"progress": {"step": 5}}, {"progress": {"step": 6}}, False),
        ({}, {"progress": {"step": 0}}, False),
        ({}, {}, False),
    ],
)
def test_first_step_reached(before: dict[str, Any], after: dict[str, Any], expected: bool) -> None:
    assert first_step_reached(before, after) is expected


def test_newest_checkpoint_time_ignores_incomplete_and_untimed() -> None:
    checkpoints = [
        {"step": 100, "uri": "s3://c/100/", "complete": True, "time": "2026-11-21T11:00:00Z"},
        {"step": 200, "uri": "s3://c/200/", "complete": True, "time": "2026-11-21T11:30:00Z"},
        {"step": 300, "uri": "s3://c/300/", "complete": False, "time": "2026-11-21T11:55:00Z"},
        {"step": 400, "uri": "s3://c/400/"},
    ]
    assert newest_checkpoint_time({"checkpoints": checkpoints}) == datetime(2026, 11, 21, 11, 30, tzinfo=UTC)
    assert newest_checkpoint_time({}) is None


def test_jobs_by_phase_counts_every_phase_per_namespace() -> None:
    metrics = fresh()
    metrics.job_observed("a", "one", CREATED, {}, status("Running"))
    metrics.job_observed("a", "two", CREATED, {}, status("Running"))
    metrics.job_observed("a", "three", CREATED, {}, status("Queued"))
    metrics.job_observed("b", "one", CREATED, {}, status("Succeeded"))
    assert value(metrics, "finetune_jobs", namespace="a", phase="Running") == 2
    assert value(metrics, "finetune_jobs", namespace="a", phase="Queued") == 1
    assert value(metrics, "finetune_jobs", namespace="a", phase="Failed") == 0
    assert value(metrics, "finetune_jobs", namespace="b", phase="Succeeded") == 1
    for phase in PHASES:
        assert value(metrics, "finetune_jobs", namespace="b", phase=phase) is not None

    metrics.job_observed("a", "three", CREATED, status("Queued"), status("Running"))
    metrics.job_deleted("a", "one")
    assert value(metrics, "finetune_jobs", namespace="a", phase="Running") == 2
    assert value(metrics, "finetune_jobs", namespace="a", phase="Queued") == 0


def test_restarts_are_counted_once_per_status_change() -> None:
    metrics = fresh()
    before = status("Running", restarts={"total": 0})
    after = status("Restarting", restarts={"total": 1, "lastReason": "Preempted"})
    metrics.job_observed("a", "job", CREATED, before, after)
    metrics.job_observed("a", "job", CREATED, after, after)  # the next reconcile: nothing new
    assert value(metrics, "finetune_job_restarts_total", namespace="a", reason="Preempted") == 1
    failed = status("Restarting", restarts={"total": 2, "lastReason": "TrainerError"})
    metrics.job_observed("a", "job", CREATED, after, failed)
    assert value(metrics, "finetune_job_restarts_total", namespace="a", reason="TrainerError") == 1


def test_time_to_first_step_is_observed_once_from_creation() -> None:
    metrics = fresh()
    running = status("Running", progress={"step": 0})
    stepping = status("Running", progress={"step": 3})
    metrics.job_observed("a", "job", CREATED, running, stepping)
    metrics.job_observed("a", "job", CREATED, stepping, status("Running", progress={"step": 9}))
    assert value(metrics, "finetune_job_time_to_first_step_seconds_count", namespace="a") == 1
    assert value(metrics, "finetune_job_time_to_first_step_seconds_sum", namespace="a") == 600.0
    assert value(metrics, "finetune_job_time_to_first_step_seconds_bucket", namespace="a", le="600.0") == 1
    assert value(metrics, "finetune_job_time_to_first_step_seconds_bucket", namespace="a", le="300.0") == 0


def test_checkpoint_age_is_computed_at_scrape_time() -> None:
    clock = [NOW]
    metrics = Metrics(clock=lambda: clock[0])
    saved = (NOW - timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    checkpoint = {"step": 200, "uri": "s3://c/200/", "complete": True, "time": saved}
    metrics.job_observed("a", "job", CREATED, {}, status("Running", checkpoints=[checkpoint]))
    metrics.job_observed("a", "fresh", CREATED, {}, status("Running"))
    assert value(metrics, "finetune_job_checkpoint_age_seconds", namespace="a", name="job") == 600.0
    clock[0] = NOW + timedelta(seconds=30)
    assert value(metrics, "finetune_job_checkpoint_age_seconds", namespace="a", name="job") == 630.0
    assert value(metrics, "finetune_job_checkpoint_age_seconds", namespace="a", name="fresh") is None


def test_reconcile_timer_records_outcome() -> None:
    metrics = fresh()
    with metrics.reconcile_timer():
        pass
    with metrics.reconcile_timer() as timer:
        timer.outcome = "conflict"
    with pytest.raises(RuntimeError), metrics.reconcile_timer():
        raise RuntimeError("boom")
    for outcome in ("ok", "conflict", "error"):
        assert value(metrics, "finetune_reconcile_duration_seconds_count", outcome=outcome) == 1


def test_serve_exposes_the_registry_over_http() -> None:
    metrics = fresh()
    metrics.job_observed("a", "job", CREATED, {}, status("Running"))
    (port,) = _proc.free_ports(1)
    server = metrics.serve(port, address="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert 'finetune_jobs{namespace="a",phase="Running"} 1.0' in body
    assert "# TYPE finetune_reconcile_duration_seconds histogram" in body
    assert "# TYPE finetune_job_restarts_total counter" in body
