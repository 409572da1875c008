"""``ftjob`` against the real local control plane and the real S3 server.

There is no operator here: the tests write a FineTuneJob's status through the status subresource,
as the operator would, and check what the CLI shows and does. ``watch`` runs in a pseudo-terminal,
``logs`` against pods the development node agent really runs, ``plot`` on TensorBoard files written
by torch's SummaryWriter (what the trainer's callback uses), and ``run --local`` trains for real.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from finetune_devenv.cluster import Cluster
from finetune_devenv.s3server import S3Server
from finetune_operator import api
from finetune_operator.cli import main
from tests.fixtures.nodeagent import NodeAgentProcess

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
Obj = dict[str, Any]


@dataclass
class Result:
    code: int
    out: str
    err: str


Ftjob = Callable[..., Result]


@pytest.fixture
def kube_args(cluster: Cluster, namespace: str) -> list[str]:
    return ["--kubeconfig", str(cluster.kubeconfig), "--context", cluster.context, "-n", namespace]


@pytest.fixture
def ftjob(
    kube_args: list[str],
    s3_server: S3Server,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Ftjob:
    """Run ``ftjob ARGS`` in-process (with the test cluster's options unless ``kube=False``)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)

    def run(*args: str, kube: bool = True) -> Result:
        code = main([*args, *(kube_args if kube else [])])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def manifest(name: str, bucket: str, endpoint: str, **spec: Any) -> Obj:
    body: Obj = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": f"s3://{bucket}/models/tiny/", "quantization": "none"},
            "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
            "dataset": {"train": f"s3://{bucket}/data/chat.jsonl", "maxSeqLength": 128},
            "hyperparameters": {"maxSteps": 6, "perDeviceBatchSize": 4, "learningRate": 5.0e-3},
            "resources": {"gpusPerNode": 0},
            "distributed": {"zeroStage": 0},
            "checkpoints": {"uri": f"s3://{bucket}/ckpt/", "everySteps": 3},
            "output": {"uri": f"s3://{bucket}/out/{name}/"},
            "storage": {"endpointUrl": endpoint},
        },
    }
    for key, value in spec.items():
        body["spec"][key] = {**body["spec"].get(key, {}), **value}
    return body


def write(path: Path, *docs: Obj) -> str:
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


def custom(kube_api: Any) -> Any:
    return client.CustomObjectsApi(kube_api)


def set_status(kube_api: Any, namespace: str, name: str, status: Obj) -> None:
    """Write the status the way the operator does (status subresource)."""
    custom(kube_api).patch_namespaced_custom_object_status(
        api.GROUP,
        api.VERSION,
        namespace,
        api.PLURAL,
        name,
        {"status": status},
        _content_type="application/merge-patch+json",
    )


def read_job(kube_api: Any, namespace: str, name: str) -> Obj:
    response = custom(kube_api).get_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, name, _preload_content=False
    )
    data: Obj = json.loads(response.data)
    return data


def upload(server: S3Server, bucket: str, key: str, source: Path | bytes) -> None:
    body = source.read_bytes() if isinstance(source, Path) else source
    server.client().put_object(Bucket=bucket, Key=key, Body=body)


RUNNING = {
    "phase": "Running",
    "attempt": 2,
    "restarts": {"total": 1, "countedTowardsLimit": 0, "lastReason": "Preempted"},
    "progress": {"step": 12, "totalSteps": 40, "percent": 30, "etaSeconds": 95},
    "metrics": {"trainLoss": 1.5, "learningRate": 0.0002, "tokensPerSecond": 812.5},
    "checkpoints": [{"step": 10, "uri": "s3://b/ckpt/ns/a/step-000000010/", "complete": True}],
}


# ----------------------------------------------------------------------------------- the daily loop


def test_submit_get_list_suspend_resume_checkpoints_cancel(
    ftjob: Ftjob, tmp_path: Path, s3_bucket: str, s3_server: S3Server, kube_api: Any, namespace: str
) -> None:
    path = write(tmp_path / "job.yaml", manifest("alpha", s3_bucket, s3_server.endpoint_url))
    first = ftjob("submit", path)
    assert (first.code, first.out.strip()) == (0, "finetunejobs.finetune.dev/alpha created")
    assert ftjob("submit", path).out.strip() == "finetunejobs.finetune.dev/alpha configured"
    changed = write(
        tmp_path / "changed.yaml",
        manifest("alpha", s3_bucket, s3_server.endpoint_url, checkpoints={"keep": 7}),
    )
    assert ftjob("submit", changed, "--dry-run").out.strip().endswith("configured (server dry run)")
    stored = read_job(kube_api, namespace, "alpha")
    assert stored["spec"]["checkpoints"].get("keep") != 7
    assert "ftjob" in {m["manager"] for m in stored["metadata"]["managedFields"]}

    pending = ftjob("get", "alpha")
    assert pending.code == 0
    header, row = pending.out.strip().splitlines()[:2]
    assert header.split()[:3] == ["NAME", "PHASE", "PROGRESS"] and row.split()[:3] == [
        "alpha",
        "Pending",
        "-",
    ]
    assert json.loads(ftjob("get", "alpha", "-o", "json").out)["metadata"]["name"] == "alpha"

    set_status(kube_api, namespace, "alpha", RUNNING)
    running = ftjob("get", "alpha").out.splitlines()[1]
    assert running.split()[:4] == ["alpha", "Running", "12/40", "(30%)"] and "1.5" in running

    listed = ftjob("list")
    assert listed.out.splitlines()[0].startswith("NAME") and listed.out.splitlines()[1].startswith("alpha ")
    everywhere = ftjob("list", "-A")
    assert f"{namespace}   alpha" in everywhere.out
    items = json.loads(ftjob("list", "-o", "json").out)["items"]
    assert [i["metadata"]["name"] for i in items] == ["alpha"]

    checkpoints = ftjob("checkpoints", "alpha")
    assert checkpoints.out.splitlines()[1].split() == ["10", "True", "-", "s3://b/ckpt/ns/a/step-000000010/"]

    assert "suspended" in ftjob("suspend", "alpha").out
    assert read_job(kube_api, namespace, "alpha")["spec"]["runPolicy"]["suspend"] is True
    resumed = ftjob("resume", "alpha", "-o", "json")
    assert json.loads(resumed.out)["spec"]["runPolicy"]["suspend"] is False

    refused = ftjob("cancel", "alpha")  # pytest's stdin is not a terminal
    assert refused.code == 1 and "run again with --yes" in refused.err
    assert ftjob("cancel", "alpha", "--yes").out.strip() == (
        "finetunejobs.finetune.dev/alpha cancelled: deleted, its pods are stopping"
    )
    gone = ftjob("get", "alpha")
    assert gone.code == 1
    assert gone.err.strip() == (
        f"error: finetunejob 'alpha' not found in namespace '{namespace}' — "
        f"list the jobs with: ftjob list -n {namespace}"
    )


def test_invalid_manifests_are_refused_naming_the_field(
    ftjob: Ftjob, tmp_path: Path, s3_bucket: str, s3_server: S3Server
) -> None:
    local = manifest("bad", s3_bucket, s3_server.endpoint_url, adapter={"r": 0})
    caught_here = ftjob("submit", write(tmp_path / "local.yaml", local))
    assert caught_here.code == 1
    assert (
        caught_here.err.count("\n") == 1
        and "spec.adapter.r: Input should be greater than or equal to 1" in caught_here.err
    )
    # Only the API server's CEL rule knows this one: its message names the field.
    same_uri = manifest("bad", s3_bucket, s3_server.endpoint_url, output={"uri": f"s3://{s3_bucket}/ckpt/"})
    caught_there = ftjob("submit", write(tmp_path / "server.yaml", same_uri))
    assert caught_there.code == 1 and caught_there.err.count("\n") == 1
    assert caught_there.err.startswith("error: the API server refused the FineTuneJob: ")
    assert "spec.output.uri" in caught_there.err and "must differ from checkpoints.uri" in caught_there.err
    assert caught_there.err.rstrip().endswith("— fix the manifest and submit again")


def test_an_unreachable_cluster_is_one_line(ftjob: Ftjob, tmp_path: Path, cluster: Cluster) -> None:
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    for entry in config["clusters"]:
        entry["cluster"]["server"] = "https://127.0.0.1:9"  # discard port: nothing listens
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    started = time.monotonic()
    result = ftjob("list", "--kubeconfig", str(path), kube=False)
    assert result.code == 1 and time.monotonic() - started < 20
    assert result.err.strip() == (
        "error: cannot reach the Kubernetes API server at https://127.0.0.1:9 (MaxRetryError) — check that "
        "the cluster is up and that --kubeconfig/--context point at it"
    )
    missing = ftjob("list", "--kubeconfig", str(tmp_path / "nope"), kube=False)
    assert missing.err.strip().startswith("error: no kubeconfig at ") and missing.code == 1


def test_kubectl_plugin(
    ftjob: Ftjob, kube_args: list[str], tmp_path: Path, s3_bucket: str, s3_server: S3Server
) -> None:
    """``kubectl ftjob``: kubectl finds the ``kubectl-ftjob`` console script on PATH."""
    assert (
        ftjob(
            "submit", write(tmp_path / "job.yaml", manifest("theta", s3_bucket, s3_server.endpoint_url))
        ).code
        == 0
    )
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [str(bin_dir / "kubectl"), "ftjob", "list", *kube_args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].startswith("theta ")
    usage = subprocess.run(
        [str(bin_dir / "kubectl"), "ftjob", "--help"], env=env, capture_output=True, text=True
    )
    assert usage.stdout.startswith("usage: kubectl ftjob ")


# -------------------------------------------------------------------------------------- data and S3


def test_validate_reads_s3_and_counts_tokens_with_the_models_tokenizer(
    ftjob: Ftjob, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    from tests.support.tiny_model import build_tokenizer

    upload(s3_server, s3_bucket, "data/chat.jsonl", DATA / "chat_small.jsonl")
    upload(s3_server, s3_bucket, "data/bad.jsonl", DATA / "invalid" / "chat_errors.jsonl")
    for path in build_tokenizer(tmp_path / "tok").iterdir():
        upload(s3_server, s3_bucket, f"models/tiny/{path.name}", path)
    upload(s3_server, s3_bucket, "models/tiny/model.safetensors", b"weights are never downloaded")

    good = ftjob("validate", f"s3://{s3_bucket}/data/chat.jsonl", "-o", "json", kube=False)
    assert good.code == 0
    report = json.loads(good.out)
    assert (report["source"], report["n_examples"], report["token_stats"]["estimated"]) == (
        f"s3://{s3_bucket}/data/chat.jsonl",
        42,
        True,
    )
    exact = ftjob(
        "validate",
        f"s3://{s3_bucket}/data/chat.jsonl",
        "--model",
        f"s3://{s3_bucket}/models/tiny/",
        "-o",
        "json",
        kube=False,
    )
    assert exact.code == 0
    stats = json.loads(exact.out)["token_stats"]
    assert stats["estimated"] is False and stats["max"] != report["token_stats"]["max"]

    bad = ftjob("validate", f"s3://{s3_bucket}/data/bad.jsonl", kube=False)
    assert bad.code == 1 and "line 2: messages[1].role is 'bot'" in bad.out
    missing = ftjob("validate", f"s3://{s3_bucket}/data/none.jsonl", kube=False)
    assert missing.code == 1 and missing.err.count("\n") == 1 and "no such object" in missing.err


def test_submit_check_data_refuses_bad_data_before_applying(
    ftjob: Ftjob, s3_server: S3Server, s3_bucket: str, tmp_path: Path, kube_api: Any, namespace: str
) -> None:
    upload(s3_server, s3_bucket, "data/chat.jsonl", DATA / "invalid" / "chat_errors.jsonl")
    path = write(tmp_path / "job.yaml", manifest("beta", s3_bucket, s3_server.endpoint_url))
    refused = ftjob("submit", path, "--check-data")
    assert refused.code == 1
    assert "line 2: messages[1].role is 'bot'" in refused.err
    assert refused.err.strip().splitlines()[-1].startswith("error: the dataset of beta is not valid for sft")
    assert ftjob("get", "beta").code == 1  # nothing was applied
    upload(s3_server, s3_bucket, "data/chat.jsonl", DATA / "chat_small.jsonl")
    assert ftjob("submit", path, "--check-data").code == 0


def write_tensorboard(folder: Path, points: list[tuple[int, float, float]], evals: dict[int, float]) -> Path:
    """One attempt's event file, written by torch's SummaryWriter with the trainer callback's tags."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    for step, loss, lr in points:
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/learning_rate", lr, step)
        if step in evals:
            writer.add_scalar("eval/loss", evals[step], step)
    writer.close()
    (event,) = folder.glob("events.out.tfevents.*")
    return event


def test_checkpoints_from_s3_and_plot(
    ftjob: Ftjob, s3_server: S3Server, s3_bucket: str, tmp_path: Path, namespace: str
) -> None:
    from PIL import Image

    assert (
        ftjob(
            "submit", write(tmp_path / "job.yaml", manifest("gamma", s3_bucket, s3_server.endpoint_url))
        ).code
        == 0
    )
    root = f"ckpt/{namespace}/gamma/"
    marker = {
        "step": 10,
        "files": [{"path": "adapter_model.safetensors", "size": 4}],
        "fingerprint": {},
        "fingerprint_sha256": "x",
        "time": "2026-01-01T00:00:00Z",
        "attempt": 1,
    }
    upload(s3_server, s3_bucket, root + "step-000000010/adapter_model.safetensors", b"abcd")
    upload(s3_server, s3_bucket, root + "step-000000010/COMPLETE", json.dumps(marker).encode())
    upload(s3_server, s3_bucket, root + "step-000000020/adapter_model.safetensors", b"torn")
    listed = json.loads(ftjob("checkpoints", "gamma", "--from-s3", "-o", "json").out)
    assert [(c["step"], c["complete"], c["time"]) for c in listed] == [
        (10, True, "2026-01-01T00:00:00Z"),
        (20, False, None),
    ]

    early = ftjob("plot", "gamma", "-f", str(tmp_path / "none.png"))
    assert early.code == 1 and "no loss curves under" in early.err

    # attempt 1 logs steps 1-15, checkpoint at 10; attempt 2 resumes there and logs 11-20 again
    first = [(s, 3.0 - 0.05 * s, 1e-3) for s in range(1, 16)]
    second = [(s, 2.0 - 0.05 * s, 1e-3 * (20 - s) / 10) for s in range(11, 21)]
    attempt1 = write_tensorboard(tmp_path / "tb1", first, {10: 2.6})
    time.sleep(1.1)  # event file names and first wall times order the attempts
    attempt2 = write_tensorboard(tmp_path / "tb2", second, {20: 1.2})
    for event in (attempt1, attempt2):
        upload(s3_server, s3_bucket, f"{root}tensorboard/{event.name}", event)

    png = tmp_path / "curves.png"
    result = ftjob("plot", "gamma", "-f", str(png), "-o", "json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    expected = {s: loss for s, loss, _ in first} | {s: loss for s, loss, _ in second}
    assert [step for step, _ in data["trainLoss"]] == sorted(expected)
    assert all(value == pytest.approx(expected[step], rel=1e-6) for step, value in data["trainLoss"])
    assert data["evalLoss"] == [[10, pytest.approx(2.6)], [20, pytest.approx(1.2)]]
    assert data["learningRate"][-1] == [20, pytest.approx(0.0)]
    assert data["restarts"] == [11]

    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1200, 800)
        colours = {rgb for _, rgb in image.convert("RGB").getcolors(maxcolors=1_000_000) or []}
    # matplotlib's tab: train loss blue, eval orange, learning rate green, restarts red
    for name, rgb in {
        "blue": (31, 119, 180),
        "orange": (255, 127, 14),
        "green": (44, 160, 44),
        "red": (214, 39, 40),
    }.items():
        assert rgb in colours, f"no {name} pixels: that curve was not drawn"
    text = ftjob("plot", "gamma", "-f", str(tmp_path / "small.png"), "--width", "640", "--height", "400")
    assert (
        text.out.strip() == f"wrote {tmp_path / 'small.png'} (20 train, 2 eval points, restarts at steps 11)"
    )
    with Image.open(tmp_path / "small.png") as image:
        assert image.size == (640, 400)


# ------------------------------------------------------------------------------ watch in a terminal

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class Terminal:
    """``ftjob`` in a pseudo-terminal of 120x40: what a person would see, escape codes removed."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.master = master
        self.raw = b""

    def read(self, timeout: float = 0.2) -> None:
        while select.select([self.master], [], [], timeout)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the other side closed: the process ended
                return
            if not chunk:
                return
            self.raw += chunk
            timeout = 0.05

    @property
    def screen(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", errors="replace"))

    def wait_for(self, *texts: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read()
            if all(t in self.screen for t in texts):
                return
        raise AssertionError(f"{texts} not on the screen after {timeout}s:\n{self.screen[-3000:]}")

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.read()
        self.read()
        code = self.proc.wait(timeout=1)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminal(kube_args: list[str]) -> Iterator[Callable[..., Terminal]]:
    opened: list[Terminal] = []

    def open_(*args: str) -> Terminal:
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
        env.pop("NO_COLOR", None)
        term = Terminal([sys.executable, "-m", "finetune_operator.cli", *args, *kube_args], env)
        opened.append(term)
        return term

    yield open_
    for term in opened:
        term.close()


def test_watch_shows_progress_live_and_exits_with_the_outcome(
    ftjob: Ftjob,
    terminal: Callable[..., Terminal],
    tmp_path: Path,
    s3_bucket: str,
    s3_server: S3Server,
    kube_api: Any,
    namespace: str,
) -> None:
    for name in ("delta", "epsilon"):
        assert (
            ftjob(
                "submit", write(tmp_path / f"{name}.yaml", manifest(name, s3_bucket, s3_server.endpoint_url))
            ).code
            == 0
        )
    set_status(kube_api, namespace, "delta", {"phase": "Initializing", "attempt": 1})
    screen = terminal("watch", "delta", "--interval", "0.2")
    screen.wait_for("delta", "Initializing", "attempt 1")

    losses = [2.0, 1.8, 1.5]
    for step, loss in enumerate(losses, start=4):
        set_status(
            kube_api,
            namespace,
            "delta",
            {
                **RUNNING,
                "attempt": 1,
                "progress": {"step": step, "totalSteps": 20},
                "metrics": {"trainLoss": loss, "tokensPerSecond": 812.5},
            },
        )
        screen.wait_for(f"step {step}/20", f"loss {loss:g}")
    screen.wait_for("Running", "tokens/s 812.5", "checkpoint step 10", "loss █▅▁")
    assert screen.proc.poll() is None  # still following

    set_status(
        kube_api,
        namespace,
        "delta",
        {
            "phase": "Succeeded",
            "progress": {"step": 20, "totalSteps": 20},
            "output": {"adapterUri": f"s3://{s3_bucket}/out/delta/adapter/"},
        },
    )
    assert screen.exit_code() == 0
    assert "Succeeded" in screen.screen and "step 20/20 (100%)" in screen.screen

    set_status(
        kube_api,
        namespace,
        "epsilon",
        {"phase": "Failed", "reason": "InvalidData", "message": "line 7: empty content", "attempt": 1},
    )
    failed = terminal("watch", "epsilon")
    assert failed.exit_code() == 1
    expected = "error: finetunejob epsilon failed: InvalidData: line 7: empty content — see its logs"
    assert f"{expected}: ftjob logs epsilon" in failed.screen


def test_watch_once_and_json(
    ftjob: Ftjob, tmp_path: Path, s3_bucket: str, s3_server: S3Server, kube_api: Any, namespace: str
) -> None:
    assert (
        ftjob("submit", write(tmp_path / "j.yaml", manifest("zeta", s3_bucket, s3_server.endpoint_url))).code
        == 0
    )
    set_status(kube_api, namespace, "zeta", RUNNING)
    once = ftjob("watch", "zeta", "--once")  # not a terminal: one plain line
    assert once.code == 0
    assert once.out.strip() == (
        "zeta Running attempt 2 restarts 1 step 12/40 (30%) loss 1.5 tokens/s 812.5 ETA 1m35s checkpoint 10"
    )
    line = json.loads(ftjob("watch", "zeta", "--once", "-o", "json").out)
    assert (line["phase"], line["step"], line["train_loss"]) == ("Running", 12, 1.5)
    timed = ftjob("watch", "zeta", "--interval", "0.1", "--timeout", "0.5")
    assert timed.code == 1 and "still Running after the --timeout" in timed.err


# ----------------------------------------------------------------------------- logs (node agent)


def test_logs_fall_back_to_the_node_agent_files(
    ftjob: Ftjob,
    node_agent: NodeAgentProcess,
    kube_api: Any,
    namespace: str,
    tmp_path: Path,
    s3_bucket: str,
    s3_server: S3Server,
) -> None:
    from finetune_operator import constants as c

    assert (
        ftjob("submit", write(tmp_path / "j.yaml", manifest("eta", s3_bucket, s3_server.endpoint_url))).code
        == 0
    )
    none_yet = ftjob("logs", "eta", "--node-agent-dir", str(node_agent.state_dir))
    assert none_yet.code == 1 and "has not started an attempt yet" in none_yet.err
    set_status(kube_api, namespace, "eta", {"phase": "Running", "attempt": 1})
    labels = {c.LABEL_JOB_NAME: "eta", c.LABEL_ATTEMPT: "1"}
    script = (
        "import os, sys, time; r = os.environ['JOB_COMPLETION_INDEX']; "
        "print(f'hello from rank {r}', flush=True); time.sleep(float(r) * 3); "
        "print(f'rank {r} done', flush=True)"
    )
    job: Any = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "eta-a1", "labels": labels},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {"name": "trainer", "image": "unused", "command": ["python", "-c", script]}
                    ],
                },
            },
        },
    }
    client.BatchV1Api(kube_api).create_namespaced_job(namespace, job)

    def pods_running() -> bool:
        pods = (
            client.CoreV1Api(kube_api)
            .list_namespaced_pod(namespace, label_selector="finetune.dev/job-name=eta")
            .items
        )
        return len(pods) == 2 and all(
            p.status is not None and p.status.phase in ("Running", "Succeeded") for p in pods
        )

    deadline = time.monotonic() + 60
    while not pods_running():
        assert time.monotonic() < deadline, "the node agent did not start the pods"
        time.sleep(0.2)
    followed = ftjob("logs", "eta", "--rank", "1", "--follow", "--node-agent-dir", str(node_agent.state_dir))
    assert followed.code == 0, followed.err
    assert followed.out.splitlines() == ["hello from rank 1", "rank 1 done"]
    assert followed.err.startswith("note: no kubelet answered; reading the node agent's log file")
    rank0 = ftjob("logs", "eta", "--node-agent-dir", str(node_agent.state_dir))
    assert rank0.out.startswith("hello from rank 0")
    missing = ftjob("logs", "eta", "--rank", "5", "--node-agent-dir", str(node_agent.state_dir))
    assert (
        missing.code == 1 and "no pod for rank 5 of attempt 1 of eta (ranks with pods: 0, 1)" in missing.err
    )


# ----------------------------------------------------------------------------------- run --local


@pytest.mark.trainer
def test_run_local_trains_and_publishes_the_adapter(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    from tests.support.tiny_model import build_tiny_model

    for path in build_tiny_model(tmp_path / "tiny").iterdir():
        upload(s3_server, s3_bucket, f"models/tiny/{path.name}", path)
    upload(s3_server, s3_bucket, "data/chat.jsonl", DATA / "chat_small.jsonl")
    path = write(tmp_path / "job.yaml", manifest("local-tiny", s3_bucket, s3_server.endpoint_url))
    workdir = tmp_path / "work"
    env = {
        **os.environ,
        **s3_server.env(),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(
        [sys.executable, "-m", "finetune_operator.cli", "run", "--local", path, "--workdir", str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (workdir / "trainer.log").read_text() if (workdir / "trainer.log").exists() else ""
    assert done.returncode == 0, f"{done.stderr}\n--- trainer log ---\n{log[-5000:]}"
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == f"adapter: s3://{s3_bucket}/out/local-tiny/adapter/"
    assert any(" Succeeded " in line and "step 6/6" in line for line in lines), lines
    objects = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert "out/local-tiny/adapter/adapter_model.safetensors" in objects
    assert "out/local-tiny/manifest.json" in objects
    assert "ckpt/local/local-tiny/step-000000003/COMPLETE" in objects
    config = json.loads((workdir / "run-config.json").read_text())
    assert config["checkpoints"]["uri"] == f"s3://{s3_bucket}/ckpt/local/local-tiny/"
    assert config["progress"] == {
        "transport": "file",
        "namespace": "",
        "name": "",
        "path": str(workdir / "progress.json"),
        "min_interval_seconds": 0.5,
    }
    # the trainer's own TensorBoard log plots too
    png = tmp_path / "local.png"
    plotted = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_operator.cli",
            "plot",
            "local-tiny",
            "--tensorboard-dir",
            str(workdir / "work" / "tensorboard"),
            "-f",
            str(png),
            "-o",
            "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plotted.returncode == 0, plotted.stderr
    assert [step for step, _ in json.loads(plotted.stdout)["trainLoss"]] == list(range(1, 7))
