"""Failures in the middle of training: kill -9, SIGTERM, an S3 outage. Nothing is lost, nothing torn
is resumed from, and a LoRA run resumed from a checkpoint matches the uninterrupted one."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from finetune_devenv.s3server import S3Server
from finetune_trainer.callbacks import FAULT_PAUSE_ENV
from finetune_trainer.runconfig import CHECKPOINT_MARKER, ExitCode
from tests.trainer.conftest import NewRun, make_run_factory, s3_keys
from tests.trainer.harness import TrainerProcess, wait_until

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

STEPS = {"hyperparameters": {"max_steps": 20}, "checkpoints": {"every_steps": 5, "keep": 3}}


def complete_steps(server: S3Server, bucket: str, job: str) -> list[int]:
    keys = s3_keys(server, bucket, f"ckpt/test/{job}/")
    return sorted(int(k.split("/")[3][5:]) for k in keys if k.endswith(f"/{CHECKPOINT_MARKER}"))


def step_folders(server: S3Server, bucket: str, job: str) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for key in s3_keys(server, bucket, f"ckpt/test/{job}/"):
        parts = key.split("/")
        if parts[3].startswith("step-"):
            found.setdefault(int(parts[3][5:]), set()).add("/".join(parts[4:]))
    return found


def resumed_step(run: TrainerProcess) -> int | None:
    match = re.search(r"resuming from s3://\S+/step-(\d{9})/", run.log_text())
    return int(match.group(1)) if match else None


def test_kill9_after_checkpoint_resumes_like_uninterrupted(
    new_run: NewRun, s3_server: S3Server, s3_bucket: str
) -> None:
    reference = new_run("reference", **STEPS)
    assert reference.run() == 0, reference.log_tail()
    expected = reference.losses()

    # Hold checkpoint 15 uncommitted so that the kill lands after checkpoint 10, whatever the machine's speed.
    first = new_run("killed", pod="attempt-1", env={FAULT_PAUSE_ENV: "15:60"}, **STEPS).start()
    wait_until(
        lambda: "marker of checkpoint 15" in first.log_text(), timeout=240, what="checkpoint 15 upload"
    )
    first.kill_tree()
    newest = complete_steps(s3_server, s3_bucket, "killed")[-1]
    assert newest == 10

    second = new_run("killed", pod="attempt-2", job={"attempt": 2}, **STEPS)
    assert second.run() == 0, second.log_tail()
    assert resumed_step(second) == newest
    losses = second.losses()
    assert sorted(losses) == list(range(newest + 1, 21)), "training restarted from the checkpoint's step"
    for step, loss in losses.items():  # LoRA without quantisation resumes bit for bit (to float noise)
        assert loss == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}"


def test_kill9_during_upload_never_resumes_from_torn_checkpoint(
    new_run: NewRun, s3_server: S3Server, s3_bucket: str
) -> None:
    first = new_run("torn", pod="attempt-1", env={FAULT_PAUSE_ENV: "10:60"}, **STEPS).start()
    wait_until(
        lambda: "pausing 60s before writing the marker of checkpoint 10" in first.log_text(),
        timeout=240,
        what="checkpoint 10 uploaded but not committed",
    )
    first.kill_tree()
    folders = step_folders(s3_server, s3_bucket, "torn")
    assert CHECKPOINT_MARKER in folders[5]
    assert "adapter_model.safetensors" in folders[10], "the torn checkpoint's files are in S3"
    assert CHECKPOINT_MARKER not in folders[10], "but it must not look complete"

    second = new_run("torn", pod="attempt-2", job={"attempt": 2}, **STEPS)
    assert second.run() == 0, second.log_tail()
    assert resumed_step(second) == 5
    assert sorted(second.losses()) == list(range(6, 21))
    folders = step_folders(s3_server, s3_bucket, "torn")
    assert sorted(folders) == [10, 15, 20] and all(CHECKPOINT_MARKER in f for f in folders.values())


def test_sigterm_checkpoints_and_exits_preempted(
    new_run: NewRun, s3_server: S3Server, s3_bucket: str
) -> None:
    run = new_run("preempted", hyperparameters={"max_steps": 5000}, checkpoints={"every_steps": 1000}).start()
    wait_until(
        lambda: (run.progress() or {}).get("step", 0) >= 3, timeout=240, what="training to reach step 3"
    )
    run.signal(signal.SIGTERM)
    assert run.wait(timeout=120) == ExitCode.PREEMPTED, run.log_tail()
    steps = complete_steps(s3_server, s3_bucket, "preempted")
    assert len(steps) == 1 and 3 <= steps[0] < 1000
    assert max(run.losses()) == steps[0], "the final checkpoint is the last step trained"
    assert run.termination_reason() == "", "a preemption is retryable: no termination reason"
    progress = run.progress()
    assert progress is not None and [c["step"] for c in progress["checkpoints"]] == steps


def test_s3_outage_during_checkpoint_is_retried(
    tmp_path: Path, s3_server_private: S3Server, tiny_model: Path
) -> None:
    bucket = s3_server_private.make_bucket("outage")
    new_run = make_run_factory(tmp_path, s3_server_private, bucket, str(tiny_model))
    run = new_run(
        "outage", hyperparameters={"max_steps": 30}, checkpoints={"every_steps": 10, "keep": 3}
    ).start()
    wait_until(
        lambda: 10 in complete_steps(s3_server_private, bucket, "outage"), timeout=240, what="checkpoint 10"
    )
    s3_server_private.restart(down_for=10, hard=True)  # gone for 10 s while checkpoint 20 or 30 is written
    assert run.wait(timeout=300) == 0, run.log_tail()
    took = [float(t) for t in re.findall(r"checkpoint [23]0 committed to \S+ in ([\d.]+)s", run.log_text())]
    assert len(took) == 2 and max(took) >= 5, f"a checkpoint was written while the server was down: {took}"
    assert complete_steps(s3_server_private, bucket, "outage") == [10, 20, 30]
    assert "out/test/outage/manifest.json" in s3_keys(s3_server_private, bucket, "out/")
