"""The state machine (finetune_operator.decide); the glue around it is in test_reconcile.py.

Each test builds the world as the API server would show it (a FineTuneJob with a status, its Jobs,
pods and progress ConfigMap), runs ``observe`` + ``decide`` at a fixed time, and checks the next
status, the actions in order and the events.
"""

from __future__ import annotations

from typing import Any

import pytest

from finetune_operator import conditions as cond
from finetune_operator.decide import (
    CreateAttempt,
    CreateJobChildren,
    Decision,
    DeleteAttempt,
    DeleteFineTuneJob,
    decide,
)
from finetune_operator.observe import Children, observe
from finetune_operator.reconcile import dump_status
from finetune_operator.render import AttemptIntent
from finetune_operator.settings import Settings
from tests.support.builders import (
    JobBuilder,
    at,
    attempt_job,
    identity_objects,
    make_job,
    pod,
    progress_config_map,
    ts,
)

pytestmark = pytest.mark.unit

SETTINGS = Settings(start_failure_grace_seconds=120)
CKPT_URI = "s3://ckpt/"
"""spec.checkpoints.uri of make_job()."""
CKPT_100 = {"step": 100, "uri": "s3://ckpt/default/a/step-000000100/", "complete": True, "time": ts(50)}
CKPT_200 = {"step": 200, "uri": "s3://ckpt/default/a/step-000000200/", "complete": True, "time": ts(90)}


def world(
    builder: JobBuilder,
    jobs: list[Any] = (),  # type: ignore[assignment]
    pods: list[Any] = (),  # type: ignore[assignment]
    report: dict[str, Any] | None = None,
    now: float = 100,
    settings: Settings = SETTINGS,
    setup: bool = True,
) -> Decision:
    """Decide for ``builder``'s job with the given children (builders or dicts) at ``T0 + now``."""
    job = builder.build()
    config_maps = [progress_config_map(job, report)] if setup else []
    children = Children(
        jobs=[j.build() if hasattr(j, "build") else j for j in jobs],
        pods=[p.build() if hasattr(p, "build") else p for p in pods],
        config_maps=config_maps,
        identity=identity_objects(job) if setup else [],
    )
    return decide(job, observe(children, job.metadata["name"]), at(now), settings)


def running(builder: JobBuilder, attempt: int = 1, **status: Any) -> JobBuilder:
    """A job whose attempt ``attempt`` has been running since T0."""
    return builder.status(**{"phase": "Running", "attempt": attempt, "startTime": ts(0), **status})


def created(decision: Decision) -> list[AttemptIntent]:
    return [a.intent for a in decision.actions if isinstance(a, CreateAttempt)]


def condition(decision: Decision, type_: str) -> tuple[str, str]:
    found = cond.get_condition(decision.status.conditions, type_)
    assert found is not None, type_
    return found.status, found.reason


# ------------------------------------------------------------------------------------------ lifecycle


def test_new_job_creates_its_identity_and_attempt_one() -> None:
    d = world(make_job("a"), setup=False, now=0)
    assert d.actions == (
        CreateJobChildren(),
        CreateAttempt(AttemptIntent(attempt=1, checkpoints_uri=CKPT_URI)),
    )
    assert (d.status.phase, d.status.reason, d.status.attempt) == ("Initializing", cond.INITIALIZING, 1)
    assert d.status.start_time == at(0)
    assert condition(d, cond.RECONCILING) == ("True", cond.INITIALIZING)
    assert condition(d, cond.READY)[0] == "False"
    assert condition(d, cond.STALLED)[0] == "False"
    assert condition(d, cond.ADMITTED) == ("True", cond.ADMITTED_REASON)
    assert [e.reason for e in d.events] == [cond.INITIALIZING]


def test_new_job_with_a_queue_is_queued() -> None:
    d = world(make_job("a").queue("team-a"), now=0)
    assert created(d) == [AttemptIntent(attempt=1, checkpoints_uri=CKPT_URI)]
    assert (d.status.phase, d.status.reason) == ("Queued", cond.QUEUED)
    assert d.status.start_time is None  # the deadline clock starts at admission
    assert condition(d, cond.ADMITTED) == ("False", cond.QUEUED)


@pytest.mark.parametrize(
    ("jobs", "pods", "phase", "reason", "pods_ready"),
    [
        ([attempt_job], [], "Initializing", cond.INITIALIZING, "False"),
        ([attempt_job], [("running", 0)], "Initializing", cond.INITIALIZING, "False"),
        ([attempt_job], [("running", 0), ("running", 1)], "Running", cond.RUNNING, "True"),
        ([attempt_job], [("succeeded", 0), ("running", 1)], "Running", cond.RUNNING, "True"),
        ([lambda j, n: attempt_job(j, n).suspended()], [], "Queued", cond.QUEUED, "False"),
        ([lambda j, n: attempt_job(j, n).failing()], [], "Restarting", cond.RESTARTING, "False"),
    ],
)
def test_phase_of_a_live_attempt(
    jobs: list[Any], pods: list[Any], phase: str, reason: str, pods_ready: str
) -> None:
    builder = running(make_job("a").nodes(2))
    job = builder.build()
    d = world(
        builder,
        jobs=[make(job, 1) for make in jobs],
        pods=[getattr(pod(job, 1, rank), state)() for state, rank in pods],
    )
    assert (d.status.phase, d.status.reason) == (phase, reason)
    assert condition(d, cond.PODS_READY)[0] == pods_ready
    assert created(d) == []


def test_success() -> None:
    builder = running(make_job("a"))
    job = builder.build()
    d = world(builder, jobs=[attempt_job(job, 1).complete()], pods=[pod(job, 1).succeeded()])
    assert (d.status.phase, d.status.reason) == ("Succeeded", cond.SUCCEEDED_REASON)
    assert d.status.output.adapter_uri == "s3://out/a/adapter/"
    assert d.status.completion_time == at(100)
    assert condition(d, cond.READY) == ("True", cond.SUCCEEDED_REASON)
    assert condition(d, cond.RECONCILING)[0] == "False"
    assert condition(d, cond.SUCCEEDED)[0] == "True"
    assert d.actions == ()
    assert [(e.type, e.reason) for e in d.events] == [("Normal", cond.SUCCEEDED_REASON)]


def test_finished_jobs_stay_finished() -> None:
    builder = make_job("a").status(phase="Succeeded", attempt=1, completionTime=ts(50))
    job = builder.build()
    d = world(builder, jobs=[attempt_job(job, 1).complete()])
    assert d.status.phase == "Succeeded"
    assert d.actions == ()


# ---------------------------------------------------------------------------------- gang restarts


def test_rank_failure_restarts_the_gang_from_the_newest_checkpoint() -> None:
    builder = running(make_job("a").nodes(2), checkpoints=[CKPT_100])
    job = builder.build()
    report = {
        "attempt": 1,
        "state": "training",
        "step": 230,
        "time": ts(95),
        "checkpoints": [CKPT_100, CKPT_200],
    }
    d = world(
        builder,
        jobs=[attempt_job(job, 1).failed()],
        pods=[pod(job, 1, 0).exited(143), pod(job, 1, 1).exited(1, "NCCL watchdog timeout")],
        report=report,
    )
    assert d.actions == (
        CreateAttempt(
            AttemptIntent(
                attempt=2,
                restarts_total=1,
                restarts_counted=1,
                last_restart_reason=cond.TRAINER_ERROR,
                cause=cond.TRAINER_ERROR,
                resume_from=CKPT_200["uri"],
                checkpoints_uri=CKPT_URI,
            )
        ),
        DeleteAttempt(1),  # after the new attempt exists
    )
    assert (d.status.phase, d.status.reason, d.status.attempt) == ("Restarting", cond.TRAINER_ERROR, 2)
    assert "NCCL watchdog timeout" in (d.status.message or "")
    assert "rank 1" in (d.status.message or "")
    assert (d.status.restarts.total, d.status.restarts.counted_towards_limit) == (1, 1)
    assert d.events[0].type == "Warning"


@pytest.mark.parametrize(
    ("pods", "reason"),
    [
        ([("disrupted", ("PreemptionByScheduler",)), ("exited", (1,))], cond.PREEMPTED),
        ([("disrupted", ("EvictionByEvictionAPI",)), ("exited", (143,))], cond.EVICTED),
        ([("disrupted", ("DeletionByTaintManager",)), ("exited", (143,))], cond.NODE_LOST),
        ([("disrupted", ("DeletionByPodGC",))], cond.NODE_LOST),
        ([("evicted", ())], cond.EVICTED),
        ([("exited", (143,)), ("exited", (143,))], cond.PREEMPTED),
    ],
)
def test_disruptions_restart_without_counting(pods: list[tuple[str, tuple[Any, ...]]], reason: str) -> None:
    builder = running(make_job("a").nodes(len(pods)).max_restarts(0))
    job = builder.build()
    d = world(
        builder,
        jobs=[attempt_job(job, 1).failed()],
        pods=[getattr(pod(job, 1, rank), how)(*args) for rank, (how, args) in enumerate(pods)],
    )
    (intent,) = created(d)
    assert (intent.attempt, intent.restarts_total, intent.restarts_counted, intent.cause) == (2, 1, 0, reason)
    assert (d.status.phase, d.status.reason) == ("Restarting", reason)
    assert d.status.restarts.last_reason == reason


def test_error_on_one_rank_is_counted_even_though_the_others_stopped_with_143() -> None:
    builder = running(make_job("a").nodes(3))
    job = builder.build()
    d = world(
        builder,
        jobs=[attempt_job(job, 1).failed()],
        pods=[pod(job, 1, 0).exited(143), pod(job, 1, 1).exited(143), pod(job, 1, 2).exited(1, "boom")],
    )
    (intent,) = created(d)
    assert (intent.restarts_counted, intent.cause) == (1, cond.TRAINER_ERROR)


@pytest.mark.parametrize(
    ("exit_code", "reason"),
    [(3, cond.INVALID_DATA), (4, cond.INVALID_CONFIG), (5, cond.INPUT_UNREADABLE)],
)
def test_non_retryable_exit_codes_fail_at_once_with_the_trainers_message(exit_code: int, reason: str) -> None:
    builder = running(make_job("a").nodes(2))
    job = builder.build()
    d = world(
        builder,
        jobs=[attempt_job(job, 1).failed("PodFailurePolicy")],
        pods=[
            pod(job, 1, 0).exited(exit_code, "train.jsonl line 7: missing 'messages'"),
            pod(job, 1, 1).exited(143),
        ],
    )
    assert (d.status.phase, d.status.reason) == ("Failed", reason)
    assert "train.jsonl line 7: missing 'messages'" in (d.status.message or "")
    assert created(d) == []
    assert condition(d, cond.STALLED) == ("True", reason)
    assert condition(d, cond.FAILED) == ("True", reason)
    assert condition(d, cond.RECONCILING)[0] == "False"
    assert d.status.completion_time == at(100)
    assert d.events[0].type == "Warning"


def test_oom_fails_fast_and_says_how_to_fix_it() -> None:
    builder = running(make_job("a"))
    job = builder.build()
    d = world(builder, jobs=[attempt_job(job, 1).failed()], pods=[pod(job, 1).oom()])
    assert (d.status.phase, d.status.reason) == ("Failed", cond.OUT_OF_MEMORY)
    message = d.status.message or ""
    assert "perDeviceBatchSize" in message and "maxSeqLength" in message and "offload" in message


def test_failed_job_without_pods_is_a_counted_error_with_the_jobs_message() -> None:
    builder = running(make_job("a"))
    job = builder.build()
    d = world(builder, jobs=[attempt_job(job, 1).failed("BackoffLimitExceeded", "Job has reached the limit")])
    (intent,) = created(d)
    assert intent.restarts_counted == 1
    assert "Job has reached the limit" in (d.status.message or "")


def test_max_restarts_exhausted_fails() -> None:
    intent = AttemptIntent(
        attempt=2, restarts_total=1, restarts_counted=1, last_restart_reason=cond.TRAINER_ERROR
    )
    builder = running(make_job("a").max_restarts(1), attempt=2)
    job = builder.build()
    d = world(builder, jobs=[attempt_job(job, 2, intent).failed()], pods=[pod(job, 2).exited(1, "boom")])
    assert (d.status.phase, d.status.reason) == ("Failed", cond.BACKOFF_LIMIT_EXCEEDED)
    assert "maxRestarts=1" in (d.status.message or "")
    assert created(d) == []


def test_preemption_still_restarts_when_the_limit_is_reached() -> None:
    intent = AttemptIntent(
        attempt=2, restarts_total=1, restarts_counted=1, last_restart_reason=cond.TRAINER_ERROR
    )
    builder = running(make_job("a").max_restarts(1), attempt=2)
    job = builder.build()
    d = world(builder, jobs=[attempt_job(job, 2, intent).failed()], pods=[pod(job, 2).disrupted()])
    (new,) = created(d)
    assert (new.attempt, new.restarts_total, new.restarts_counted) == (3, 2, 1)


# ------------------------------------------------------------------------------------ start failures


@pytest.mark.parametrize(
    ("reason", "message", "waited", "expected"),
    [
        ("ErrImagePull", 'pull access denied for "bad/image"', 60, None),
        ("ErrImagePull", 'pull access denied for "bad/image"', 121, cond.IMAGE_PULL_FAILED),
        ("ImagePullBackOff", 'Back-off pulling image "bad/image"', 300, cond.IMAGE_PULL_FAILED),
        ("InvalidImageName", 'couldn\'t parse image name "BAD"', 1, cond.IMAGE_PULL_FAILED),
        ("CreateContainerConfigError", 'secret "s3-creds" not found', 121, cond.CONTAINER_CONFIG_ERROR),
        ("ContainerCreating", "", 3600, None),
    ],
)
def test_pods_that_cannot_start(reason: str, message: str, waited: int, expected: str | None) -> None:
    builder = running(make_job("a"), phase="Initializing")
    job = builder.build()
    d = world(
        builder,
        jobs=[attempt_job(job, 1)],
        pods=[pod(job, 1).started(10).waiting(reason, message)],
        now=10 + waited,
    )
    if expected is None:
        assert d.status.phase == "Initializing"
        assert d.actions == ()
    else:
        assert (d.status.phase, d.status.reason) == ("Failed", expected)
        assert message in (d.status.message or "")
        assert d.actions == (DeleteAttempt(1),)


# ------------------------------------------------------------------------------- suspend and resume


def test_suspend_stops_the_pods() -> None:
    builder = running(make_job("a").suspend(), checkpoints=[CKPT_100])
    job = builder.build()
    d = world(builder, jobs=[attempt_job(job, 1)], pods=[pod(job, 1).running()])
    assert d.actions == (DeleteAttempt(1),)
    assert (d.status.phase, d.status.reason) == ("Suspended", cond.SUSPENDED_REASON)
    assert condition(d, cond.SUSPENDED)[0] == "True"
    assert condition(d, cond.RECONCILING)[0] == "False"


def test_suspended_stays_suspended_while_the_old_job_goes_away() -> None:
    builder = make_job("a").suspend().status(phase="Suspended", attempt=1, startTime=ts(0))
    job = builder.build()
    d = world(builder, jobs=[attempt_job(job, 1).deleting()])
    assert d.status.phase == "Suspended"
    assert created(d) == []


def test_a_restart_whose_status_write_was_lost_still_gets_its_event() -> None:
    """The decision to restart created attempt 2, but its status write lost a race with a suspend:
    the next reconcile goes straight to Suspended and the restart's reason is announced there."""
    builder = (
        make_job("a")
        .suspend()
        .status(phase="Restarting", reason="Restarting", attempt=1, startTime=ts(0), restarts={"total": 0})
    )
    job = builder.build()
    intent = AttemptIntent(
        attempt=2,
        restarts_total=1,
        restarts_counted=1,
        last_restart_reason="TrainerError",
        cause="TrainerError",
    )
    d = world(builder, jobs=[attempt_job(job, 1).deleting(), attempt_job(job, 2, intent)])
    assert d.status.phase == "Suspended"
    assert (d.status.restarts.total, d.status.restarts.last_reason) == (1, "TrainerError")
    warnings = [e for e in d.events if e.reason == "TrainerError"]
    assert len(warnings) == 1 and warnings[0].type == "Warning", d.events


def test_a_restart_announced_by_its_phase_gets_no_second_event() -> None:
    builder = running(make_job("a"))
    job = builder.build()
    d = world(
        builder, jobs=[attempt_job(job, 1).failed()], pods=[pod(job, 1).exited(1, "RuntimeError: boom")]
    )
    assert d.status.phase == "Restarting"
    assert [e.reason for e in d.events].count(d.status.reason) == 1, d.events


def test_resume_starts_the_next_attempt_from_the_newest_checkpoint_uncounted() -> None:
    builder = make_job("a").status(
        phase="Suspended",
        attempt=1,
        startTime=ts(0),
        checkpoints=[CKPT_100, CKPT_200],
        restarts={"total": 0, "countedTowardsLimit": 0},
    )
    d = world(builder)
    assert created(d) == [
        AttemptIntent(
            attempt=2,
            restarts_total=0,
            restarts_counted=0,
            cause=cond.RESUMED,
            resume_from=CKPT_200["uri"],
            checkpoints_uri=CKPT_URI,
        )
    ]
    assert (d.status.phase, d.status.reason, d.status.attempt) == ("Initializing", cond.RESUMED, 2)


def test_a_job_deleted_behind_the_operators_back_is_replaced_uncounted() -> None:
    builder = running(make_job("a"))
    d = world(builder)
    (intent,) = created(d)
    assert (intent.attempt, intent.restarts_total, intent.restarts_counted, intent.cause) == (
        2,
        1,
        0,
        cond.ATTEMPT_MISSING,
    )


# ------------------------------------------------------------------------------------------ policies


def test_active_deadline_across_attempts() -> None:
    builder = running(make_job("a").deadline(3600), attempt=3)
    job = builder.build()
    d = world(builder, jobs=[attempt_job(job, 3)], pods=[pod(job, 3).running()], now=3601)
    assert (d.status.phase, d.status.reason) == ("Failed", cond.DEADLINE_EXCEEDED)
    assert "activeDeadlineSeconds=3600" in (d.status.message or "")
    assert d.actions == (DeleteAttempt(3),)
    early = world(builder, jobs=[attempt_job(job, 3)], pods=[pod(job, 3).running()], now=3599)
    assert early.status.phase == "Running"


@pytest.mark.parametrize(("now", "deleted"), [(129, False), (130, True)])
def test_ttl_after_finished(now: float, deleted: bool) -> None:
    builder = make_job("a").ttl(30).status(phase="Failed", attempt=1, completionTime=ts(100))
    d = world(builder, now=now)
    assert (DeleteFineTuneJob() in d.actions) is deleted


def test_kueue_admission_moves_queued_to_initializing() -> None:
    builder = make_job("a").queue("team-a").status(phase="Queued", attempt=1)
    job = builder.build()
    queued = world(builder, jobs=[attempt_job(job, 1).suspended()])
    assert queued.status.phase == "Queued"
    admitted = world(builder, jobs=[attempt_job(job, 1).suspended(False).started(40)])
    assert admitted.status.phase == "Initializing"
    assert admitted.status.start_time == at(40)
    assert condition(admitted, cond.ADMITTED)[0] == "True"


def test_deletion_cancels_and_stops_the_pods() -> None:
    builder = running(make_job("a")).deleting()
    job = builder.build()
    d = world(builder, jobs=[attempt_job(job, 1)], pods=[pod(job, 1).running()])
    assert (d.status.phase, d.status.reason) == ("Cancelled", cond.CANCELLED)
    assert d.actions == (DeleteAttempt(1),)


# ------------------------------------------------------------------------------------- crash safety


def test_status_is_rederived_from_the_newest_job_after_a_lost_status_write() -> None:
    """Crash after creating attempt 2 and before deleting attempt 1 or writing the status."""
    builder = running(make_job("a"))  # the status still says attempt 1, no restarts
    job = builder.build()
    intent = AttemptIntent(
        attempt=2,
        restarts_total=1,
        restarts_counted=1,
        last_restart_reason=cond.TRAINER_ERROR,
        cause="TrainerError",
    )
    d = world(
        builder,
        jobs=[attempt_job(job, 1).failed(), attempt_job(job, 2, intent)],
        pods=[pod(job, 1).exited(1), pod(job, 2)],
    )
    assert created(d) == []  # no duplicate attempt
    assert d.actions == (DeleteAttempt(1),)
    assert d.status.attempt == 2
    assert (d.status.restarts.total, d.status.restarts.counted_towards_limit) == (1, 1)
    assert d.status.restarts.last_reason == cond.TRAINER_ERROR
    assert d.status.phase == "Initializing"


def test_leftovers_of_old_attempts_are_deleted() -> None:
    from finetune_operator.render import attempt_children

    builder = running(make_job("a"), attempt=2)
    job = builder.build()
    old_service, old_config, _ = attempt_children(job, AttemptIntent(attempt=1), SETTINGS)
    children = Children(
        jobs=[attempt_job(job, 2).build()],
        services=[old_service],
        config_maps=[old_config, progress_config_map(job)],
        identity=identity_objects(job),
    )
    d = decide(job, observe(children, "a"), at(100), SETTINGS)
    assert d.actions == (DeleteAttempt(1),)


def test_deciding_twice_changes_nothing_the_second_time() -> None:
    builder = running(make_job("a").nodes(2))
    job = builder.build()
    jobs = [attempt_job(job, 1)]
    pods = [pod(job, 1, 0).running(), pod(job, 1, 1).running()]
    first = world(builder, jobs=jobs, pods=pods)
    again = make_job("a").nodes(2).status(**dump_status(first.status))
    second = world(again, jobs=jobs, pods=pods, now=200)
    assert dump_status(second.status) == dump_status(first.status)
    assert second.events == ()
    assert second.actions == ()


def test_last_transition_time_moves_only_when_a_condition_flips() -> None:
    builder = running(make_job("a"))
    job = builder.build()
    first = world(builder, jobs=[attempt_job(job, 1)], pods=[pod(job, 1).running()], now=100)
    later = make_job("a").status(**dump_status(first.status))
    done = world(later, jobs=[attempt_job(job, 1).complete()], pods=[pod(job, 1).succeeded()], now=500)
    times = {c.type: c.last_transition_time for c in done.status.conditions}
    assert times[cond.READY] == at(500)  # flipped False -> True
    assert times[cond.STALLED] == at(100)  # stayed False
    assert times[cond.CHECKPOINT_AVAILABLE] == at(100)


def test_observed_generation() -> None:
    d = world(running(make_job("a")).generation(7), jobs=[attempt_job(make_job("a").build(), 1)])
    assert d.status.observed_generation == 7
    assert all(c.observed_generation == 7 for c in d.status.conditions)


# ------------------------------------------------------------------------------------------ progress


def test_progress_of_the_current_attempt_is_mirrored() -> None:
    builder = running(make_job("a"), progress={"step": 100, "lastUpdateTime": ts(50)})
    job = builder.build()
    many = [
        {"step": s, "uri": f"s3://ckpt/default/a/step-{s:09d}/", "complete": True, "time": ts(s)}
        for s in range(1, 14)
    ]
    report = {
        "attempt": 1,
        "state": "training",
        "step": 150,
        "totalSteps": 400,
        "epoch": 1.5,
        "trainLoss": 1.2534567891,
        "learningRate": 1.00002e-4,
        "tokensPerSecond": 8400.37,
        "checkpoints": many,
        "time": ts(100),
    }
    d = world(builder, jobs=[attempt_job(job, 1)], pods=[pod(job, 1).running()], report=report)
    p = d.status.progress
    assert (p.step, p.total_steps, p.percent, p.epoch) == (150, 400, 37, 1.5)
    assert p.eta_seconds == 250  # 50 steps took 50 s; 250 steps left
    assert p.last_update_time == at(100)
    m = d.status.metrics
    # four significant digits: what the Loss column of `kubectl get ftj` shows
    assert (m.train_loss, m.learning_rate, m.tokens_per_second) == (1.253, 1e-4, 8400.0)
    steps = [cp.step for cp in d.status.checkpoints]
    assert steps == list(range(4, 14))  # newest last, bounded to the newest 10
    assert condition(d, cond.CHECKPOINT_AVAILABLE) == ("True", cond.CHECKPOINT_SAVED)
    assert any(e.reason == cond.CHECKPOINT_SAVED for e in d.events)


def test_trainers_eta_and_adapter_uri_win() -> None:
    builder = running(make_job("a"))
    job = builder.build()
    report = {
        "attempt": 1,
        "state": "finished",
        "step": 10,
        "totalSteps": 20,
        "etaSeconds": 33.4,
        "adapterUri": "s3://out/a/adapter/",
        "time": ts(100),
    }
    d = world(builder, jobs=[attempt_job(job, 1)], report=report)
    assert d.status.progress.eta_seconds == 33
    assert d.status.output.adapter_uri == "s3://out/a/adapter/"


def test_stale_progress_from_an_older_attempt_is_ignored_but_its_checkpoints_count() -> None:
    builder = running(make_job("a"), attempt=2, progress={"step": 120, "lastUpdateTime": ts(80)})
    job = builder.build()
    report = {
        "attempt": 1,
        "state": "checkpointing",
        "step": 200,
        "trainLoss": 9.9,
        "checkpoints": [CKPT_200],
        "time": ts(95),
    }
    d = world(builder, jobs=[attempt_job(job, 2)], report=report)
    assert d.status.progress.step == 120
    assert d.status.metrics.train_loss is None
    assert [cp.step for cp in d.status.checkpoints] == [200]


def test_a_fatal_failure_is_not_announced_as_a_restart_while_pods_stop() -> None:
    builder = running(make_job("a").nodes(2))
    job = builder.build()
    d = world(
        builder,
        jobs=[attempt_job(job, 1).failing()],
        pods=[pod(job, 1, 0).exited(3, "line 7: no assistant turn"), pod(job, 1, 1).running()],
    )
    assert d.status.phase == "Running"
    assert "failed (InvalidData)" in (d.status.message or "")
    assert created(d) == []
