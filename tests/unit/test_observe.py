"""Summarising a FineTuneJob's children (finetune_operator.observe)."""

from __future__ import annotations

import json

import pytest

from finetune_operator.observe import Children, observe, parse_progress, pod_facts
from finetune_operator.render import AttemptIntent, attempt_children
from finetune_operator.settings import Settings
from tests.support.builders import at, attempt_job, identity_objects, make_job, pod, progress_config_map

pytestmark = pytest.mark.unit

JOB = make_job("a").nodes(2).build()


def test_nothing_yet() -> None:
    obs = observe(Children(), "a")
    assert obs.attempts == {}
    assert obs.newest is None
    assert obs.missing_job_children == ("ConfigMap", "ServiceAccount", "Role", "RoleBinding")
    assert obs.progress is None


def test_per_job_children_present() -> None:
    obs = observe(Children(config_maps=[progress_config_map(JOB)], identity=identity_objects(JOB)), "a")
    assert obs.missing_job_children == ()


def test_attempts_by_number_with_their_pods_and_intent() -> None:
    intent = AttemptIntent(attempt=2, restarts_total=1, restarts_counted=0, last_restart_reason="Preempted")
    children = Children(
        jobs=[
            attempt_job(JOB, 1).failed().deleting().build(),
            attempt_job(JOB, 2, intent).started(5).build(),
        ],
        pods=[
            pod(JOB, 1, 0).exited(143).build(),
            pod(JOB, 2, 1).running().build(),
            pod(JOB, 2, 0).build(),
        ],
    )
    obs = observe(children, "a")
    assert sorted(obs.attempts) == [1, 2]
    assert obs.newest is not None and obs.newest.attempt == 2
    old, new = obs.attempts[1], obs.attempts[2]
    assert old.deleting and old.failed and not old.failing
    assert new.intent == intent
    assert new.start_time == at(5)
    assert [p.rank for p in new.pods] == [0, 1]  # sorted by rank, only this attempt's pods
    assert new.running_pods == 1
    assert len(new.live_pods) == 2
    assert obs.leftovers == {1, 2}


def test_failure_target_before_failed() -> None:
    obs = observe(Children(jobs=[attempt_job(JOB, 1).failing().build()]), "a")
    state = obs.attempts[1]
    assert state.failing and not state.failed


def test_job_conditions() -> None:
    done = observe(Children(jobs=[attempt_job(JOB, 1).complete().build()]), "a").attempts[1]
    assert done.complete and not done.failed
    queued = observe(Children(jobs=[attempt_job(JOB, 1).suspended().build()]), "a").attempts[1]
    assert queued.suspended
    failed = observe(
        Children(jobs=[attempt_job(JOB, 1).failed("PodFailurePolicy", "Container trainer failed").build()]),
        "a",
    ).attempts[1]
    assert (failed.failure_reason, failed.failure_message) == ("PodFailurePolicy", "Container trainer failed")


def test_leftover_service_and_config_map_of_an_attempt_without_job() -> None:
    service, config_map, _ = attempt_children(JOB, AttemptIntent(attempt=3), Settings())
    obs = observe(Children(services=[service], config_maps=[config_map]), "a")
    assert obs.attempts == {}
    assert obs.leftovers == {3}


@pytest.mark.parametrize(
    ("builder", "expected"),
    [
        (
            lambda p: p.exited(3, "row 7: no 'messages'\n"),
            {"exit_code": 3, "message": "row 7: no 'messages'"},
        ),
        (lambda p: p.oom(), {"exit_code": 137, "terminated_reason": "OOMKilled"}),
        (
            lambda p: p.disrupted("DeletionByTaintManager"),
            {"disruption": "DeletionByTaintManager", "exit_code": 143},
        ),
        (lambda p: p.evicted(), {"status_reason": "Evicted", "phase": "Failed", "disruption": None}),
        (
            lambda p: p.waiting("ErrImagePull", 'pull "x" failed'),
            {"waiting_reason": "ErrImagePull", "waiting_message": 'pull "x" failed', "phase": "Pending"},
        ),
        (lambda p: p.running(), {"phase": "Running", "ready": True, "exit_code": None}),
        (lambda p: p.started(30), {"since": at(30)}),
        (lambda p: p, {"since": at(0), "rank": 1}),
    ],
)
def test_pod_facts(builder: object, expected: dict[str, object]) -> None:
    facts = pod_facts(builder(pod(JOB, 1, 1)).build())  # type: ignore[operator]
    for key, value in expected.items():
        assert getattr(facts, key) == value, key


def test_progress_report_parsed_and_bad_json_reported() -> None:
    report = {"attempt": 1, "state": "training", "step": 5, "totalSteps": 10, "time": "2026-01-01T12:00:00Z"}
    parsed, error = parse_progress(progress_config_map(JOB, report))
    assert error is None and parsed is not None
    assert (parsed.step, parsed.total_steps) == (5, 10)
    broken = progress_config_map(JOB)
    broken["data"] = {"progress.json": "{not json"}
    parsed, error = parse_progress(broken)
    assert parsed is None and error is not None and "progress.json" in error
    assert parse_progress(progress_config_map(JOB)) == (None, None)
    obs = observe(Children(config_maps=[progress_config_map(JOB, report)]), "a")
    assert obs.progress is not None and obs.progress.step == 5
    assert json.loads(progress_config_map(JOB, report)["data"]["progress.json"]) == report
