"""Non-retryable failures end fast, with the exit code the operator acts on and a reason it can show."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune_devenv.s3server import S3Server
from finetune_trainer.runconfig import ExitCode
from tests.trainer.conftest import NewRun, make_run_factory
from tests.trainer.harness import DATA

pytestmark = pytest.mark.trainer


def test_invalid_data_fails_fast_before_the_model_is_loaded(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, tiny_model_s3: str
) -> None:
    new_run = make_run_factory(tmp_path, s3_server, s3_bucket, tiny_model_s3)
    run = new_run("bad-data", dataset={"train": str(DATA / "invalid" / "chat_errors.jsonl")})
    assert run.run(timeout=120) == ExitCode.INVALID_DATA, run.log_tail()
    reason = run.termination_reason()
    assert "line 2: messages[1].role is 'bot'" in reason
    assert "line 8: invalid JSON" in reason
    assert "python -m finetune_trainer validate" in reason, "the reason says how to check a fix"
    # Only the tokenizer was fetched: no weights downloaded, no worker (no GPU) started.
    assert (run.workdir / "model" / "tokenizer.json").is_file()
    assert not (run.workdir / "model" / "model.safetensors").exists()
    assert "starting 1 worker" not in run.log_text()
    progress = run.progress()
    assert progress is not None and progress["state"] == "failed" and "line 2" in progress["message"]


@pytest.mark.slow
def test_incompatible_change_is_refused_on_resume(new_run: NewRun) -> None:
    first = new_run("changed", hyperparameters={"max_steps": 5}, checkpoints={"every_steps": 5})
    assert first.run() == 0, first.log_tail()
    second = new_run(
        "changed",
        pod="attempt-2",
        adapter={"r": 4},
        hyperparameters={"max_steps": 10, "learning_rate": 1e-3},
        checkpoints={"every_steps": 5},
    )
    assert second.run(timeout=120) == ExitCode.INVALID_CONFIG, second.log_tail()
    reason = second.termination_reason()
    assert "adapter.r changed from 8 to 4" in reason
    assert "learning_rate" not in reason, "a harmless change is a warning, not a reason to fail"


def test_validate_command_reports_every_bad_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "finetune_trainer", "validate", str(DATA / "invalid" / "chat_errors.jsonl")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == ExitCode.INVALID_DATA
    assert "line 2:" in done.stdout + done.stderr and "line 13:" in done.stdout + done.stderr
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_trainer",
            "validate",
            str(DATA / "preference_small.jsonl"),
            "--method",
            "dpo",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
