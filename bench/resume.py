"""Pod start to first training step: resumed from a checkpoint in S3, against a start from scratch.

    python -m bench.resume [--reps 3]

The trainer runs as a pod runs it (``python -m finetune_trainer run --config ... --workdir ...``,
one process per node, tiny Llama on the CPU, model and data in a local SeaweedFS). The clock starts
when the process is started and stops when global rank 0 writes its first line to ``metrics.jsonl``
(``logging_steps = 1``: the end of the first optimiser step, polled every 20 ms).

- ``scratch``: a new job: stage model and data, load, train step 1.
- ``resume``: the same job after a checkpoint at step 10: also find the newest complete checkpoint,
  check its marker, download it, restore adapter/optimizer/RNG state, train step 11. The checkpoint
  was written by a run of the same spec, so its fingerprint matches and the launcher skips the
  dataset check that run already passed (``finetune_trainer.stage``), as on a real restart.

Each run is also split into phases (:data:`PHASES`): the launcher records how long each staging
step took (``staged.json``), and the benchmark stamps every line of the trainer's output with the
time it arrived, so the end of staging and the moment the model is loaded are known.

Every resume run gets its own copy of the same checkpoint (a server-side copy), so no run resumes
from what an earlier one wrote. The tiny model's checkpoint is small: what is measured is the fixed
cost of resuming; the report adds the download time of a 70B adapter checkpoint at the throughput
measured by ``bench.checkpoints``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import REPO, WORK, Run, env_float, log, summary
from finetune_devenv.s3server import S3Server
from finetune_devenv.tiny_model import build_tiny_model

BUCKET = "bench"
DATA = REPO / "tests" / "data" / "chat_small.jsonl"
SEED_STEPS = 10


def run_config(name: str, server: S3Server, work: Path, max_steps: int) -> dict[str, Any]:
    return {
        "job": {"namespace": "bench", "name": name, "attempt": 1},
        "method": "sft",
        "model": {"uri": f"s3://{BUCKET}/models/tiny/", "quantization": "none"},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "dataset": {"train": f"s3://{BUCKET}/data/chat.jsonl", "max_seq_length": 128},
        "hyperparameters": {
            "max_steps": max_steps,
            "learning_rate": 5e-3,
            "per_device_batch_size": 8,
            "logging_steps": 1,
            "lr_scheduler": "constant",
            "warmup_ratio": 0.0,
        },
        "distributed": {"zero_stage": 0, "procs_per_node": 1},
        "checkpoints": {"uri": f"s3://{BUCKET}/ckpt/bench/{name}/", "every_steps": SEED_STEPS, "keep": 2},
        "output": {"uri": f"s3://{BUCKET}/out/bench/{name}/"},
        "s3": {"endpoint_url": server.endpoint_url},
        "progress": {
            "transport": "file",
            "path": str(work / name / "progress.json"),
            "min_interval_seconds": 0,
        },
    }


def train(name: str, server: S3Server, work: Path, max_steps: int, attempt: int = 1) -> dict[str, Any]:
    """Run the trainer to the end; seconds from its start to each phase and to exit.

    Every output line is stamped with the seconds since the process started as it arrives (the
    trainer writes line by line); the phases are read from those stamps and from the per-step
    seconds the launcher writes to ``staged.json`` (see :func:`phases`).
    """
    folder = work / name / f"attempt-{attempt}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    config = run_config(name, server, work, max_steps)
    config["job"]["attempt"] = attempt
    (folder / "run-config.json").write_text(json.dumps(config))
    metrics = folder / "work" / "metrics.jsonl"
    env = {
        **os.environ,
        **server.env(),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FTJ_TERMINATION_LOG": str(folder / "termination-log"),
    }
    argv = [
        sys.executable,
        "-m",
        "finetune_trainer",
        "run",
        "--config",
        str(folder / "run-config.json"),
        "--workdir",
        str(folder / "work"),
    ]
    lines: list[tuple[float, str]] = []
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reader = threading.Thread(target=_stamp_lines, args=(proc, started, lines), daemon=True)
    reader.start()
    first: float | None = None
    while proc.poll() is None:
        if first is None and metrics.exists() and metrics.stat().st_size > 0:
            first = time.monotonic() - started
        time.sleep(0.02)
    ended = time.monotonic() - started
    reader.join(10)
    log_text = "".join(f"[{t:8.3f}] {line}" for t, line in lines)
    (folder / "trainer.log").write_text(log_text)
    if proc.returncode != 0 or first is None:
        raise RuntimeError(f"trainer {name} exited with {proc.returncode}:\n{log_text[-4000:]}")
    step = json.loads(metrics.read_text().splitlines()[0]).get("step")
    staged = json.loads((folder / "work" / "staged.json").read_text())
    return {
        "first_step_s": first,
        "exit_s": ended,
        "first_logged_step": float(step or 0),
        "phases": phases(lines, staged.get("seconds", {}), first),
    }


def _stamp_lines(proc: subprocess.Popen[bytes], started: float, out: list[tuple[float, str]]) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        out.append((time.monotonic() - started, raw.decode(errors="replace")))


PHASES = {
    "launcher start": "Python and the launcher's imports, until staging begins",
    "model files": "config and tokenizer from S3",
    "dataset check": "import the tokenizer, read and validate the dataset with exact token counts",
    "checkpoint": "find the newest complete checkpoint, check its marker, download and check it",
    "model weights": "the base model's weights from S3",
    "model load": "torchrun, the worker's imports, data and tokenizer, loading the model",
    "first step": "building the trainer, restoring adapter/optimizer/RNG state (resume only), step 1",
}
STAGED_LINE = "node staged in"  # the launcher's last line before it starts the workers (stage.py)
LOADED_LINE = "finetune_trainer.loader: loaded"  # the worker's line once the model is loaded


def phases(lines: list[tuple[float, str]], staged: dict[str, float], first_step_s: float) -> dict[str, float]:
    """Seconds per phase of :data:`PHASES`; they add up to ``first_step_s``.

    Staging ends when the launcher logs :data:`STAGED_LINE` and began the sum of its steps earlier;
    the model is loaded when the worker logs :data:`LOADED_LINE`.
    """
    staged_at = _stamp(lines, STAGED_LINE)
    loaded_at = _stamp(lines, LOADED_LINE)
    steps = {
        "model files": staged.get("model_files", 0.0),
        "dataset check": staged.get("dataset", 0.0),
        "checkpoint": staged.get("checkpoint", 0.0),
        "model weights": staged.get("model_weights", 0.0),
    }
    return {
        "launcher start": max(0.0, staged_at - sum(steps.values())),
        **steps,
        "model load": loaded_at - staged_at,
        "first step": first_step_s - loaded_at,
    }


def _stamp(lines: list[tuple[float, str]], text: str) -> float:
    found = next((t for t, line in lines if text in line), None)
    if found is None:
        raise RuntimeError(f"the trainer did not log {text!r}: cannot split its start into phases")
    return found


def copy_checkpoint(server: S3Server, source: str, target: str) -> int:
    """Server-side copy of every object under ``source`` to ``target``; returns the bytes."""
    client = server.client()
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=source):
        for obj in page.get("Contents", []):
            key = target + obj["Key"][len(source) :]
            client.copy_object(Bucket=BUCKET, Key=key, CopySource={"Bucket": BUCKET, "Key": obj["Key"]})
            total += obj["Size"]
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.resume",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reps", type=int, default=int(env_float("FTJ_BENCH_RESUME_REPS", 2)))
    args = parser.parse_args(argv)
    work = WORK / "resume"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run = Run(
        "resume",
        "tiny",
        {
            "reps": args.reps,
            "seed_steps": SEED_STEPS,
            "model": "tiny Llama (2 layers, hidden 64), LoRA r=8, 1 process, CPU",
            "phases": PHASES,
        },
    )
    with S3Server(work / "s3") as server:
        server.make_bucket(BUCKET)
        client = server.client()
        model = build_tiny_model(work / "tiny-model")
        for path in sorted(model.iterdir()):
            client.upload_file(str(path), BUCKET, f"models/tiny/{path.name}")
        client.upload_file(str(DATA), BUCKET, "data/chat.jsonl")
        log("seed run: train past the step-10 checkpoint")
        # The same spec as the resumed runs (max_steps included), as every attempt of a FineTuneJob
        # has: the launcher then finds the checkpoint's fingerprint equal and skips the data check.
        train("seed", server, work, SEED_STEPS + 2)
        step = f"step-{SEED_STEPS:09d}/"
        runs: dict[str, list[dict[str, Any]]] = {"scratch": [], "resume": []}
        for rep in range(args.reps):
            for kind in ("scratch", "resume") if rep % 2 == 0 else ("resume", "scratch"):
                name = f"{kind}-{rep}"
                if kind == "resume":
                    size = copy_checkpoint(server, f"ckpt/bench/seed/{step}", f"ckpt/bench/{name}/{step}")
                    run.data["checkpoint_bytes"] = size
                    result = train(name, server, work, SEED_STEPS + 2, attempt=2)
                else:
                    result = train(name, server, work, 2)
                runs[kind].append(result)
                log(
                    f"  {name}: first step after {result['first_step_s']:.1f}s "
                    f"(step {result['first_logged_step']:.0f})"
                )
    for kind, values in runs.items():
        run.data[kind] = {
            "first_step_s": summary([v["first_step_s"] for v in values]),
            "first_logged_step": values[0]["first_logged_step"],
            "phases_s": {p: statistics.median(v["phases"][p] for v in values) for p in PHASES},
            "runs": values,
        }
    scratch = run.data["scratch"]["first_step_s"]["median"]
    run.data["ratio_resume_vs_scratch"] = run.data["resume"]["first_step_s"]["median"] / scratch
    run.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
