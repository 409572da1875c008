"""Pure pieces of the CLI: tables, durations, job views, the watch frame and its sparkline."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from rich.console import Console

from finetune_operator.cli import output
from finetune_operator.cli.errors import CliError
from finetune_operator.cli.view import LIST_HEADERS, JobView, list_row
from finetune_operator.cli.watch import LossHistory, follow, frame, outcome, plain_line, sparkline
from finetune_trainer.runconfig import CheckpointEvent, ProgressReport

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def job_object(**status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "bot", "namespace": "team", "creationTimestamp": "2026-01-01T11:55:00Z"},
        "spec": {},
        "status": status,
    }


RUNNING = job_object(
    phase="Running",
    attempt=2,
    restarts={"total": 1, "countedTowardsLimit": 0, "lastReason": "Preempted"},
    progress={"step": 1200, "totalSteps": 3000, "percent": 40, "epoch": 1.2, "etaSeconds": 5400},
    metrics={"trainLoss": 1.2345678, "evalLoss": 1.35, "learningRate": 4.1e-5, "tokensPerSecond": 8400.0},
    checkpoints=[
        {"step": 1000, "uri": "s3://ckpt/team/bot/step-000001000/", "complete": True},
        {"step": 1200, "uri": "s3://ckpt/team/bot/step-000001200/", "complete": True},
    ],
)


def test_table_is_aligned_like_kubectl() -> None:
    text = output.table(("name", "phase"), [["a", "Running"], ["longer-name", None]])
    assert text.splitlines() == ["NAME          PHASE", "a             Running", "longer-name"]


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(None, "-"), (-1, "-"), (9, "9s"), (250, "4m10s"), (3900, "1h05m"), (200_000, "2d07h")],
)
def test_duration(seconds: float | None, expected: str) -> None:
    assert output.duration(seconds) == expected


def test_age() -> None:
    assert output.age("2026-01-01T11:59:15Z", NOW) == "45s"
    assert output.age("2026-01-01T11:00:00Z", NOW) == "60m"
    assert output.age("2025-12-29T12:00:00Z", NOW) == "3d"
    assert output.age(None, NOW) == "<unknown>"


def test_dump_json_and_yaml() -> None:
    assert json.loads(output.dump({"a": [1, 2]}, "json")) == {"a": [1, 2]}
    assert output.dump({"a": [1, 2]}, "yaml") == "a:\n- 1\n- 2"


def test_job_view_from_status() -> None:
    view = JobView.from_object(RUNNING)
    assert (view.phase, view.attempt, view.restarts, view.step, view.total_steps) == (
        "Running",
        2,
        1,
        1200,
        3000,
    )
    assert view.progress_text() == "1200/3000 (40%)"
    assert view.latest_checkpoint == (1200, "s3://ckpt/team/bot/step-000001200/")
    assert list_row(view, NOW) == [
        "bot",
        "Running",
        "1200/3000 (40%)",
        "1.235",
        "1.35",
        "8400",
        "2",
        "1",
        "5m",
    ]
    assert len(LIST_HEADERS) == len(list_row(view, NOW))
    assert JobView.from_object(job_object()).progress_text() == "-"


def test_job_view_from_progress_report() -> None:
    report = ProgressReport(
        attempt=1,
        state="checkpointing",
        step=10,
        total_steps=40,
        train_loss=2.0,
        checkpoints=[CheckpointEvent(step=10, uri="s3://b/c/step-000000010/", time="t")],
        time="t",
    )
    view = JobView.from_report("local-job", report)
    assert (view.phase, view.step, view.percent, view.latest_checkpoint) == (
        "Running",
        10,
        25.0,
        (10, "s3://b/c/step-000000010/"),
    )
    assert JobView.from_report("x", report.model_copy(update={"state": "finished"})).final


def test_sparkline_scales_lowest_to_highest() -> None:
    assert sparkline([]) == ""
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
    assert sparkline([1.0, 1.0]) == "▅▅"
    assert len(sparkline([float(i) for i in range(100)], width=40)) == 40


def test_loss_history_keeps_the_latest_per_step() -> None:
    history = LossHistory(keep=3)
    for step, loss in [(1, 3.0), (2, 2.5), (2, 2.4), (3, 2.0), (4, 1.5)]:
        history.add(JobView("j", step=step, train_loss=loss))
    history.add(JobView("j", step=5, train_loss=None))
    assert history.values() == [2.4, 2.0, 1.5]


def render(renderable: Any) -> str:
    console = Console(file=io.StringIO(), width=120, force_terminal=False, color_system=None)
    console.print(renderable)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(text, str)
    return text


def test_frame_shows_what_a_person_looks_for() -> None:
    text = render(frame(JobView.from_object(RUNNING), [2.0, 1.5, 1.2]))
    for expected in (
        "bot",
        "Running",
        "attempt 2",
        "restarts 1",
        "step 1200/3000 (40%)",
        "ETA 1h30m",
        "loss 1.235",
        "eval loss 1.35",
        "lr 4.10e-05",
        "tokens/s 8400",
        "epoch 1.20",
        "loss █▄▁",
        "checkpoint step 1200  s3://ckpt/team/bot/step-000001200/",
    ):
        assert expected in text, f"{expected!r} not in:\n{text}"
    assert "step 1200/3000" in plain_line(JobView.from_object(RUNNING))


def test_outcome_of_a_finished_job() -> None:
    assert outcome(JobView("j", phase="Succeeded")) == 0
    with pytest.raises(CliError) as failed:
        outcome(JobView("j", phase="Failed", reason="InvalidData", message="line 7: empty content"))
    assert (
        str(failed.value)
        == "finetunejob j failed: InvalidData: line 7: empty content — see its logs: ftjob logs j"
    )


def test_follow_prints_each_change_once_and_exits_with_the_outcome(
    capsys: pytest.CaptureFixture[str],
) -> None:
    views = iter(
        [
            JobView("j", phase="Running", step=1),
            JobView("j", phase="Running", step=1),
            JobView("j", phase="Running", step=2),
            JobView("j", phase="Succeeded", step=2),
        ]
    )
    assert follow(lambda: next(views), mode="plain", interval=0) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" step ")[1].split()[0] for line in lines] == ["1", "2", "2"]
    assert "Succeeded" in lines[-1]
    json_views = iter([JobView("j", phase="Failed", message="boom")])
    with pytest.raises(CliError, match="boom"):
        follow(lambda: next(json_views), mode="json", interval=0)
    assert json.loads(capsys.readouterr().out)["phase"] == "Failed"
