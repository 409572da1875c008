"""Storage faults: S3 down during a checkpoint, S3 failing a fraction of requests, wrong credentials.

The real trainer on the CPU against a real SeaweedFS server, through
:class:`~tests.support.faults.S3FaultProxy`. Nothing may be lost: every run finishes, every
checkpoint it leaves has its completion marker, training steps are neither skipped nor repeated
beyond a resume, and the adapter's manifest is written. Wrong credentials are the opposite case:
retrying cannot help, so the trainer must stop at once with a reason that names the credentials, and
the operator must fail the FineTuneJob with that reason instead of restarting it.

Short form: 15 s outage, 20% of requests failing; ``make soak``: 60 s, 30%.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_devenv.s3server import S3Server
from finetune_operator import conditions as cond
from finetune_operator import constants as c
from finetune_trainer.runconfig import ExitCode
from tests.fixtures.operator import OperatorProcess
from tests.integration.test_operator_lifecycle import World
from tests.reliability.test_trainer_faults import complete_steps, resumed_step
from tests.support import faults
from tests.support.builders import make_job
from tests.support.tiny_model import build_tiny_model
from tests.support.waiting import wait_for
from tests.trainer.conftest import s3_keys
from tests.trainer.harness import DATA, TrainerProcess, make_config

pytestmark = [pytest.mark.trainer, pytest.mark.slow, pytest.mark.reliability, pytest.mark.timeout(1800)]

OUTAGE_SECONDS = faults.scale(15, 60)
ERROR_RATE = faults.scale(20, 30) / 100


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


def upload_inputs(server: S3Server, bucket: str, model: Path) -> dict[str, Any]:
    """The tiny model and the chat dataset in S3; returns the config changes that point at them."""
    s3 = server.client()
    for path in sorted(model.iterdir()):
        s3.upload_file(str(path), bucket, f"models/tiny/{path.name}")
    s3.upload_file(str(DATA / "chat_small.jsonl"), bucket, "data/train.jsonl")
    return {
        "model": {"uri": f"s3://{bucket}/models/tiny/"},
        "dataset": {"train": f"s3://{bucket}/data/train.jsonl"},
    }


def trainer(
    root: Path, name: str, attempt: int, server: S3Server, bucket: str, endpoint: str, **changes: Any
) -> TrainerProcess:
    """One attempt of job ``name`` whose S3 traffic goes to ``endpoint`` (``changes`` name the model)."""
    config = make_config(
        name=name,
        model_uri="",
        bucket=bucket,
        endpoint_url=endpoint,
        progress_path=root / name / f"progress-{attempt}.json",
        job={"attempt": attempt},
        **changes,
    )
    env = {**server.env(), "AWS_ENDPOINT_URL_S3": endpoint}
    return TrainerProcess(root / name / f"attempt-{attempt}", config, env=env)


def assert_finished_intact(run: TrainerProcess, server: S3Server, bucket: str, name: str, steps: int) -> None:
    """Exit 0, every step trained once since the resume point, only complete checkpoints left, and
    the manifest written last lists adapter files that are all in S3."""
    assert run.proc is not None and run.proc.returncode == 0, run.log_tail()
    start = resumed_step(run) or 0
    assert sorted(run.losses()) == list(range(start + 1, steps + 1))
    complete, torn = complete_steps(server, bucket, name)
    assert complete and complete[-1] == steps and torn == [], (complete, torn)
    outputs = s3_keys(server, bucket, f"out/test/{name}/")
    manifest = server.client().get_object(Bucket=bucket, Key=f"out/test/{name}/manifest.json")
    listed = json.loads(manifest["Body"].read())["adapter_files"]
    missing = [f for f in listed if outputs.get(f"out/test/{name}/adapter/{f}", 0) <= 0]
    assert listed and not missing, f"manifest lists adapter files not in S3: {missing}"


def test_s3_down_during_a_checkpoint(tmp_path: Path, s3_server_private: S3Server, tiny_model: Path) -> None:
    server = s3_server_private
    bucket = server.make_bucket("outage")
    with faults.S3FaultProxy(server.endpoint_url) as proxy:
        run = trainer(
            tmp_path, "outage", 1, server, bucket, proxy.endpoint_url,
            model={"uri": str(tiny_model)},
            hyperparameters={"max_steps": 20},
            checkpoints={"every_steps": 5, "keep": 3},
        ).start()  # fmt: skip
        held = proxy.hold(rf"^PUT /{bucket}/ckpt/test/outage/step-000000010/", 1.0)
        assert run.proc is not None
        proc = run.proc
        wait_for("the upload of checkpoint 10", lambda: held.started.is_set() or proc.poll() is not None, 600)
        assert proc.poll() is None, run.log_tail()
        server.kill()  # the held upload reaches a dead server
        down_at = time.monotonic()
        time.sleep(OUTAGE_SECONDS)
        server.start()
        down_for = time.monotonic() - down_at
        assert run.wait(timeout=900) == 0, run.log_tail()
        figures = proxy.figures()
    took = {
        int(s): float(t)
        for s, t in re.findall(r"checkpoint (\d+) committed to \S+ in ([\d.]+)s", run.log_text())
    }
    assert took[10] >= OUTAGE_SECONDS * 0.8, f"checkpoint 10 did not wait for S3: {took}"
    assert_finished_intact(run, server, bucket, "outage", 20)
    assert complete_steps(server, bucket, "outage")[0] == [10, 15, 20]
    faults.record(
        "storage-outage",
        outage_seconds=round(down_for, 1),
        checkpoint_seconds=took[10],
        connections_dropped=figures["s3_connections_dropped"],
        s3_requests=figures["s3_requests"],
        steps_lost=0,
        torn_checkpoints_left=0,
    )


def test_s3_failing_a_fraction_of_requests(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, tiny_model: Path
) -> None:
    _, seed = faults.seeded("storage-errors")
    inputs = upload_inputs(s3_server, s3_bucket, tiny_model)
    changes = {**inputs, "hyperparameters": {"max_steps": 20}, "checkpoints": {"every_steps": 5, "keep": 2}}
    with faults.S3FaultProxy(s3_server.endpoint_url, error_rate=ERROR_RATE, seed=seed) as proxy:
        endpoint = proxy.endpoint_url
        first = trainer(tmp_path, "flaky", 1, s3_server, s3_bucket, endpoint, **changes).start()
        assert first.proc is not None
        proc = first.proc
        wait_for(
            "checkpoint 10",
            lambda: 10 in complete_steps(s3_server, s3_bucket, "flaky")[0] or proc.poll() is not None,
            900,
        )
        assert proc.poll() is None, first.log_tail()
        first.kill_tree()  # the second attempt resumes through the same flaky server
        proxy.quiet()
        newest = complete_steps(s3_server, s3_bucket, "flaky")[0][-1]
        second = trainer(tmp_path, "flaky", 2, s3_server, s3_bucket, endpoint, **changes)
        assert second.run(timeout=900) == 0, second.log_tail()
        figures = proxy.figures()
    assert resumed_step(second) == newest
    assert_finished_intact(second, s3_server, s3_bucket, "flaky", 20)
    assert figures["s3_errors_injected"] >= 10, figures
    faults.record("storage-errors", seed=seed, error_rate=ERROR_RATE, attempts=2, jobs_finished=1, **figures)


@pytest.mark.integration
def test_wrong_credentials_fail_fast_and_the_operator_does_not_retry(
    tmp_path: Path,
    s3_server: S3Server,
    s3_bucket: str,
    tiny_model: Path,
    kube_api: client.ApiClient,
    namespace: str,
    operator: OperatorProcess,
) -> None:
    inputs = upload_inputs(s3_server, s3_bucket, tiny_model)
    wrong = "wrong-" + secrets.token_urlsafe(24)
    with faults.S3FaultProxy(s3_server.endpoint_url) as proxy:
        run = trainer(tmp_path, "creds", 1, s3_server, s3_bucket, proxy.endpoint_url, **inputs)
        started = time.monotonic()
        code = run.run(timeout=300, AWS_SECRET_ACCESS_KEY=wrong)
        took = time.monotonic() - started
        figures = proxy.figures()
    reason = run.termination_reason()
    assert code == ExitCode.INPUT_UNREADABLE, run.log_tail()
    assert "access refused" in reason and "credentials" in reason and "s3SecretRef" in reason, reason
    assert figures["s3_requests"] <= 5, f"retried a request that cannot succeed: {figures}"
    assert wrong not in run.log_text() + reason

    # What the operator makes of it: the pod's exit code and termination message, as a kubelet reports them.
    world = World(kube_api, namespace)
    world.create(make_job("creds").gpus(0).max_restarts(3).manifest())
    (pod,) = world.running_pods(c.attempt_name("creds", 1), 1)
    world.kubelet.fail(pod, code, reason)
    status = world.wait_phase("creds", "Failed", timeout=60)
    assert status["reason"] == cond.INPUT_UNREADABLE and "access refused" in status["message"], status
    time.sleep(5)  # several resyncs: still no second attempt
    assert world.jobs("creds") == [c.attempt_name("creds", 1)]
    assert world.status("creds")["restarts"]["total"] == 0
    faults.record(
        "storage-credentials",
        exit_code=int(code),
        seconds_to_fail=round(took, 1),
        s3_requests=figures["s3_requests"],
        operator_reason=status["reason"],
        attempts=1,
    )
