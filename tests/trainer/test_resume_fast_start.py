"""A resume whose checkpoint was written with exactly this data and these settings skips the
launcher's dataset check (stage.check_data); every other start checks the data as before.

The stage runs in a subprocess of its own, so "the tokenizer was not loaded" is a fact about that
process (transformers never imported), not a timing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from finetune_devenv.s3server import S3Server
from finetune_trainer.checkpoints import CheckpointStore, fingerprint
from finetune_trainer.runconfig import CHECKPOINT_MARKER, ExitCode, RunConfig
from finetune_trainer.s3 import ObjectStore
from tests.trainer.conftest import NewRun, make_run_factory
from tests.trainer.harness import DATA, REPO, make_config

pytestmark = pytest.mark.trainer

SKIPPED = "dataset check skipped: the checkpoint at step 5 was written by a run with this exact fingerprint"
VALIDATED = "dataset OK: messages format"
GOOD = (DATA / "chat_small.jsonl").read_bytes()
BAD = (DATA / "invalid" / "chat_errors.jsonl").read_bytes()

STAGE = textwrap.dedent(
    """
    import json, logging, sys
    from dataclasses import asdict
    from pathlib import Path
    from finetune_trainer.runconfig import RunConfig
    from finetune_trainer.s3 import ObjectStore
    from finetune_trainer.stage import stage
    from finetune_trainer.train import classify

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = RunConfig.model_validate_json(Path(sys.argv[1]).read_text())
    out = {"code": 0}
    try:
        out["staged"] = asdict(stage(config, Path(sys.argv[2]), ObjectStore(config.s3), world_size=1))
    except Exception as exc:
        code, out["reason"] = classify(exc)
        out["code"] = int(code)
    out["transformers_imported"] = "transformers" in sys.modules
    print(json.dumps(out))
    """
)


def run_stage(config: dict[str, Any], root: Path, server: S3Server) -> dict[str, Any]:
    """stage() in a fresh process as the launcher runs it; its result, plus its log as ``log``."""
    root.mkdir(parents=True)
    (root / "run-config.json").write_text(json.dumps(config))
    env = {**os.environ, **server.env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", STAGE, str(root / "run-config.json"), str(root / "work")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    result["log"] = done.stderr
    return result


def commit_checkpoint(server: S3Server, config: dict[str, Any], facts: dict[str, Any], tmp: Path) -> None:
    """A complete checkpoint at step 5, written the way CheckpointPublisher writes one."""
    folder = tmp / "checkpoint-5"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    ckpts = CheckpointStore(ObjectStore(env=server.env()), RunConfig.model_validate(config).checkpoints.uri)
    ckpts.commit(5, ckpts.upload_part(folder, 5), facts, attempt=1, time="2025-01-01T00:00:00Z")


def facts_of(config: dict[str, Any], data: bytes) -> dict[str, Any]:
    """The fingerprint a worker of ``config`` writes into its markers (train.py)."""
    sha = hashlib.sha256(data).hexdigest()
    facts: dict[str, Any] = fingerprint(RunConfig.model_validate(config), world_size=1, data_sha256=sha)
    return facts


@pytest.fixture
def job(tmp_path: Path, s3_server: S3Server, s3_bucket: str, tiny_model: Path) -> dict[str, Any]:
    """The config of a job whose data is in S3 (the good chat data, for now)."""
    s3_server.client().put_object(Bucket=s3_bucket, Key="data/chat.jsonl", Body=GOOD)
    return make_config(
        name="fast",
        model_uri=str(tiny_model),
        bucket=s3_bucket,
        endpoint_url=s3_server.endpoint_url,
        progress_path=tmp_path / "progress.json",
        dataset={"train": f"s3://{s3_bucket}/data/chat.jsonl"},
    )


def test_same_fingerprint_skips_the_check_and_loads_no_tokenizer(
    job: dict[str, Any], s3_server: S3Server, tmp_path: Path
) -> None:
    commit_checkpoint(s3_server, job, facts_of(job, GOOD), tmp_path)
    resumed = {**job, "job": {**job["job"], "attempt": 2}}
    result = run_stage(resumed, tmp_path / "attempt-2", s3_server)
    assert result["code"] == 0, result["log"]
    assert SKIPPED in result["log"] and VALIDATED not in result["log"]
    assert result["transformers_imported"] is False, "the tokenizer was loaded"
    staged = result["staged"]
    assert staged["data_sha256"] == hashlib.sha256(GOOD).hexdigest(), "the sha256 validate_data returns"
    assert staged["resume_step"] == 5 and set(staged["seconds"]) == {
        "model_files",
        "dataset",
        "checkpoint",
        "model_weights",
    }


def bucket(job: dict[str, Any]) -> str:
    return str(job["dataset"]["train"]).split("/")[2]


def _other_bytes(job: dict[str, Any], server: S3Server) -> dict[str, Any]:
    fewer = b"".join(GOOD.splitlines(keepends=True)[:-1])
    server.client().put_object(Bucket=bucket(job), Key="data/chat.jsonl", Body=fewer)
    return job


def _learning_rate(job: dict[str, Any], server: S3Server) -> dict[str, Any]:
    return {**job, "hyperparameters": {**job["hyperparameters"], "learning_rate": 1e-3}}


def _named_by_resume_from(job: dict[str, Any], server: S3Server) -> dict[str, Any]:
    changed = _learning_rate(job, server)
    folder = f"{job['checkpoints']['uri']}step-000000005/"
    return {**changed, "checkpoints": {**changed["checkpoints"], "resume_from": folder}}


@pytest.mark.parametrize(
    "change",
    [_other_bytes, _learning_rate, _named_by_resume_from],
    ids=["other-bytes-same-uri", "warning-only-change", "resume-from-with-other-fingerprint"],
)
def test_any_difference_from_the_fingerprint_is_checked_as_before(
    job: dict[str, Any], s3_server: S3Server, tmp_path: Path, change: Any
) -> None:
    commit_checkpoint(s3_server, job, facts_of(job, GOOD), tmp_path)
    resumed = change(job, s3_server)
    result = run_stage(resumed, tmp_path / "attempt-2", s3_server)
    assert result["code"] == 0, result["log"]
    assert VALIDATED in result["log"] and "dataset check skipped" not in result["log"]
    assert result["transformers_imported"] is True
    assert result["staged"]["resume_step"] == 5, "a change that is only a warning still resumes"
    data = s3_server.client().get_object(Bucket=bucket(job), Key="data/chat.jsonl")["Body"].read()
    assert result["staged"]["data_sha256"] == hashlib.sha256(data).hexdigest()


def test_a_separate_eval_file_is_always_checked(
    job: dict[str, Any], s3_server: S3Server, tmp_path: Path
) -> None:
    """The fingerprint holds the eval file's URI, not its bytes: an equal fingerprint proves nothing."""
    with_eval = {**job, "dataset": {**job["dataset"], "eval": str(DATA / "chat_small.jsonl")}}
    commit_checkpoint(s3_server, with_eval, facts_of(with_eval, GOOD), tmp_path)
    result = run_stage(with_eval, tmp_path / "attempt-2", s3_server)
    assert result["code"] == 0, result["log"]
    assert VALIDATED in result["log"] and result["transformers_imported"] is True
    assert result["staged"]["resume_step"] == 5


def test_an_older_marker_without_a_fingerprint_is_checked(
    job: dict[str, Any], s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    commit_checkpoint(s3_server, job, facts_of(job, GOOD), tmp_path)
    key = f"ckpt/test/fast/step-000000005/{CHECKPOINT_MARKER}"
    client = s3_server.client()
    marker = json.loads(client.get_object(Bucket=s3_bucket, Key=key)["Body"].read())
    del marker["fingerprint"], marker["fingerprint_sha256"]
    client.put_object(Bucket=s3_bucket, Key=key, Body=json.dumps(marker).encode())
    result = run_stage(job, tmp_path / "attempt-2", s3_server)
    assert VALIDATED in result["log"] and result["transformers_imported"] is True


def test_changed_data_with_a_bad_line_fails_before_the_checkpoint_and_the_weights(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, tiny_model_s3: str
) -> None:
    """The real launcher: data replaced at the same URI since the checkpoint was written."""
    new_run = make_run_factory(tmp_path, s3_server, s3_bucket, tiny_model_s3)
    s3_server.client().put_object(Bucket=s3_bucket, Key="data/chat.jsonl", Body=GOOD)
    changes = {"dataset": {"train": f"s3://{s3_bucket}/data/chat.jsonl"}, "job": {"attempt": 2}}
    run = new_run("replaced", **changes)
    config = json.loads(run.config_path.read_text())
    commit_checkpoint(s3_server, config, facts_of(config, GOOD), tmp_path / "seed")
    s3_server.client().put_object(Bucket=s3_bucket, Key="data/chat.jsonl", Body=BAD)

    assert run.run(timeout=120) == ExitCode.INVALID_DATA, run.log_tail()
    reason = run.termination_reason()
    assert "line 2: messages[1].role is 'bot'" in reason and "line 8: invalid JSON" in reason
    assert "dataset check skipped" not in run.log_text()
    assert not (run.workdir / "resume").exists(), "the checkpoint was downloaded before the data check"
    assert not (run.workdir / "model" / "model.safetensors").exists()
    assert "starting 1 worker" not in run.log_text()


@pytest.mark.slow
def test_resumed_attempt_skips_the_check_and_writes_the_same_fingerprint(
    new_run: NewRun, s3_server: S3Server, s3_bucket: str
) -> None:
    """End to end: the marker a real worker wrote lets the next attempt skip, and so does its own."""
    steps = {"hyperparameters": {"max_steps": 10}, "checkpoints": {"every_steps": 5, "keep": 3}}
    first = new_run("same", pod="attempt-1", **steps)
    assert first.run() == 0, first.log_tail()
    assert VALIDATED in first.log_text() and "dataset check skipped" not in first.log_text()
    client = s3_server.client()
    # The last checkpoint's marker was never written (the node was lost): attempt 2 resumes from step 5.
    client.delete_object(Bucket=s3_bucket, Key=f"ckpt/test/same/step-000000010/{CHECKPOINT_MARKER}")

    second = new_run("same", pod="attempt-2", job={"attempt": 2}, **steps)
    assert second.run() == 0, second.log_tail()
    log = second.log_text()
    assert SKIPPED in log and VALIDATED not in log
    assert sorted(second.losses()) == list(range(6, 11)), "training went on from step 5"
    markers = {
        step: json.loads(
            client.get_object(Bucket=s3_bucket, Key=f"ckpt/test/same/step-{step:09d}/{CHECKPOINT_MARKER}")[
                "Body"
            ].read()
        )
        for step in (5, 10)
    }
    assert markers[10]["attempt"] == 2
    assert markers[10]["fingerprint_sha256"] == markers[5]["fingerprint_sha256"]
