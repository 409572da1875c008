"""Run the real trainer entrypoint (``python -m finetune_trainer``) as a subprocess, the way a pod does.

    run = TrainerProcess(tmp_path / "a", config, env=s3.env())
    assert run.run() == 0
    run.losses()        # {step: loss} from the worker's metrics.jsonl (full precision)
    run.progress()      # the last ProgressReport the FileReporter wrote

Every run gets its own workdir (like a pod's emptyDir), log file, termination log and rendezvous
port. ``kill_tree`` SIGKILLs the launcher and everything it started (torchrun runs in a session of
its own, so a process-group kill would miss it).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from finetune_trainer.runconfig import RunConfig

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict update (``changes`` wins), returning a new dict."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def make_config(
    *,
    name: str,
    model_uri: str,
    bucket: str,
    endpoint_url: str,
    progress_path: Path,
    **changes: Any,
) -> dict[str, Any]:
    """A small, fast run config for the tiny model (SFT + LoRA, plain DDP, 30 steps); ``changes``
    are merged in (e.g. ``method="dpo"``, ``distributed={"zero_stage": 3}``)."""
    config: dict[str, Any] = {
        "job": {"namespace": "test", "name": name, "attempt": 1},
        "method": "sft",
        "model": {"uri": model_uri, "quantization": "none"},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "dataset": {"train": str(DATA / "chat_small.jsonl"), "max_seq_length": 128},
        "hyperparameters": {
            "max_steps": 30,
            "learning_rate": 5e-3,
            "per_device_batch_size": 8,
            "logging_steps": 1,
            "lr_scheduler": "constant",
            "warmup_ratio": 0.0,
        },
        "distributed": {"zero_stage": 0, "procs_per_node": 1},
        "checkpoints": {"uri": f"s3://{bucket}/ckpt/test/{name}/", "every_steps": 10, "keep": 2},
        "output": {"uri": f"s3://{bucket}/out/test/{name}/"},
        "s3": {"endpoint_url": endpoint_url},
        "progress": {"transport": "file", "path": str(progress_path), "min_interval_seconds": 0},
    }
    config = merge(config, changes)
    RunConfig.model_validate(config)  # a typo in a test fails here, not in the subprocess
    return config


class TrainerProcess:
    """One launcher process (one "pod") with its own workdir."""

    def __init__(self, root: Path, config: dict[str, Any], *, env: Mapping[str, str]) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "run-config.json"
        self.config_path.write_text(json.dumps(config, indent=1))
        self.workdir = root / "work"
        self.log_path = root / "trainer.log"
        self.termination_log = root / "termination-log"
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "FTJ_TERMINATION_LOG": str(self.termination_log),
            "MASTER_PORT": str(free_port()),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self, **env: str) -> TrainerProcess:
        self.started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "finetune_trainer",
                    "run",
                    "--config",
                    str(self.config_path),
                    "--workdir",
                    str(self.workdir),
                ],
                cwd=REPO,
                env={**self.env, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait(self, timeout: float = 300) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            raise AssertionError(f"trainer did not finish in {timeout}s; log:\n{self.log_tail()}") from None

    def run(self, timeout: float = 300, **env: str) -> int:
        return self.start(**env).wait(timeout)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill_tree(self) -> None:
        """SIGKILL the launcher and all its descendants at once, like a node that vanishes."""
        if self.proc is None:
            return
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        wait_until(lambda: not any(_alive(p) for p in pids), timeout=30, what="killed processes to exit")

    # -- what the run left behind --------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def metrics(self) -> list[dict[str, Any]]:
        path = self.workdir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def losses(self) -> dict[int, float]:
        """Training loss per logged step (the last one wins if a step was logged twice)."""
        return {int(m["step"]): float(m["loss"]) for m in self.metrics() if "loss" in m}

    def progress(self) -> dict[str, Any] | None:
        path = Path(json.loads(self.config_path.read_text())["progress"]["path"])
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data

    def termination_reason(self) -> str:
        return self.termination_log.read_text() if self.termination_log.exists() else ""


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (children, grandchildren, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_until(check: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
