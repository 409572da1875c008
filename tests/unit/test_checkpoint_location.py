"""Where checkpoints go when a FineTuneJob sets no ``spec.checkpoints.uri``: the platform's default.

The location is chosen once, before the first attempt, recorded in ``status.checkpointsUri`` and on
every attempt's Job (annotation), and never changes afterwards, even when the platform's default does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from finetune_operator import conditions as cond
from finetune_operator import constants as c
from finetune_operator.decide import CreateAttempt, Decision, decide
from finetune_operator.observe import Children, observe
from finetune_operator.render import (
    AttemptIntent,
    NoCheckpointLocation,
    attempt_children,
    checkpoint_prefix,
    run_config,
)
from finetune_operator.settings import Settings
from finetune_trainer.runconfig import RUN_CONFIG_FILE, RunConfig
from tests.support.builders import JobBuilder, at, attempt_job, identity_objects, make_job, pod, ts

pytestmark = pytest.mark.unit

PLATFORM = Settings(default_checkpoint_uri="s3://platform-checkpoints/")


def no_uri(builder: JobBuilder) -> JobBuilder:
    """The job leaves spec.checkpoints.uri unset (everySteps kept: other fields still apply)."""
    return builder._set("checkpoints", {"everySteps": 50})


def decide_now(
    builder: JobBuilder, settings: Settings, jobs: Sequence[Any] = (), pods: Sequence[Any] = ()
) -> Decision:
    job = builder.build()
    children = Children(
        jobs=[j.build() for j in jobs],
        pods=[p.build() for p in pods],
        config_maps=[],
        identity=identity_objects(job),
    )
    return decide(job, observe(children, job.metadata["name"]), at(100), settings)


def intents(decision: Decision) -> list[AttemptIntent]:
    return [a.intent for a in decision.actions if isinstance(a, CreateAttempt)]


def test_the_platform_default_is_used_and_recorded_at_the_first_start() -> None:
    d = decide_now(no_uri(make_job("a", "team-a")), PLATFORM)

    assert d.status.checkpoints_uri == "s3://platform-checkpoints/"
    assert [i.checkpoints_uri for i in intents(d)] == ["s3://platform-checkpoints/"]
    assert d.status.phase == "Initializing"


def test_the_jobs_own_uri_wins_over_the_platform_default() -> None:
    d = decide_now(make_job("a"), PLATFORM)

    assert d.status.checkpoints_uri == "s3://ckpt/"
    assert [i.checkpoints_uri for i in intents(d)] == ["s3://ckpt/"]


def test_without_uri_and_without_default_the_job_fails_and_says_what_to_set() -> None:
    d = decide_now(no_uri(make_job("a")), Settings())

    assert (d.status.phase, d.status.reason) == ("Failed", cond.INVALID_SPEC)
    message = d.status.message or ""
    assert "spec.checkpoints.uri" in message
    assert "defaults.checkpointUri" in message and "FTJ_DEFAULT_CHECKPOINT_URI" in message
    assert not intents(d), "no attempt may start without a checkpoint location"
    assert d.status.completion_time is not None
    assert d.status.checkpoints_uri is None


def test_a_default_equal_to_the_output_uri_fails_like_the_api_servers_rule() -> None:
    builder = no_uri(make_job("a"))._set("output.uri", "s3://platform-checkpoints")
    d = decide_now(builder, PLATFORM)

    assert (d.status.phase, d.status.reason) == ("Failed", cond.INVALID_SPEC)
    assert "output.uri must differ" in (d.status.message or "")


def test_a_changed_platform_default_does_not_move_a_started_job() -> None:
    builder = no_uri(make_job("a")).status(
        phase="Running", attempt=1, startTime=ts(0), checkpointsUri="s3://platform-checkpoints/"
    )
    job = builder.build()
    first = AttemptIntent(attempt=1, checkpoints_uri="s3://platform-checkpoints/")
    moved = Settings(default_checkpoint_uri="s3://new-bucket/")

    d = decide_now(
        builder, moved, jobs=[attempt_job(job, 1, first).failed()], pods=[pod(job, 1, 0).exited(1)]
    )

    assert [i.checkpoints_uri for i in intents(d)] == ["s3://platform-checkpoints/"]
    assert d.status.checkpoints_uri == "s3://platform-checkpoints/"
    (intent,) = intents(d)
    config = run_config(job, intent.attempt, None, moved, intent.checkpoints_uri)
    assert config.checkpoints.uri == "s3://platform-checkpoints/default/a/"


def test_a_lost_status_write_is_recovered_from_the_attempts_job() -> None:
    """Attempt 1 was created, the operator crashed before writing the status, the default changed."""
    builder = no_uri(make_job("a"))
    job = builder.build()
    created = AttemptIntent(attempt=1, checkpoints_uri="s3://platform-checkpoints/")

    d = decide_now(
        builder, Settings(default_checkpoint_uri="s3://new-bucket/"), jobs=[attempt_job(job, 1, created)]
    )

    assert d.status.checkpoints_uri == "s3://platform-checkpoints/"
    assert d.status.attempt == 1 and not intents(d)


def test_the_attempts_job_carries_the_location_and_its_run_config_uses_it() -> None:
    job = no_uri(make_job("a", "team-a")).build()
    intent = AttemptIntent(attempt=1, checkpoints_uri="s3://platform-checkpoints/")

    _, config_map, training_job = attempt_children(job, intent, PLATFORM)

    assert training_job["metadata"]["annotations"][c.ANN_CHECKPOINTS_URI] == "s3://platform-checkpoints/"
    assert AttemptIntent.from_annotations(1, training_job["metadata"]["annotations"]) == intent
    config = RunConfig.model_validate_json(config_map["data"][RUN_CONFIG_FILE])
    assert config.checkpoints.uri == "s3://platform-checkpoints/team-a/a/"  # as if the job had written it
    assert config.checkpoints.every_steps == 50


def test_the_cli_finds_a_started_jobs_checkpoints_through_its_status() -> None:
    started = no_uri(make_job("a")).status(attempt=1, checkpointsUri="s3://platform-checkpoints/").build()
    assert checkpoint_prefix(started) == "s3://platform-checkpoints/default/a/"

    with pytest.raises(NoCheckpointLocation, match="FTJ_DEFAULT_CHECKPOINT_URI"):
        checkpoint_prefix(no_uri(make_job("a")).build())
