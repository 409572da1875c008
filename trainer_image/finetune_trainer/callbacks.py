"""The trainer's hooks into the Hugging Face training loop: stop on SIGTERM, publish checkpoints,
report progress. Both TRL trainers take the same callbacks, so every recipe gets all three."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer import signals
from finetune_trainer.checkpoints import CheckpointStore, FileEntry
from finetune_trainer.errors import TrainerError
from finetune_trainer.progress import RateLimited, now_iso
from finetune_trainer.runconfig import CheckpointEvent, ExitCode, ProgressReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the world, as torchrun put it in the environment."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (a collective)."""
    if not _distributed():
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class StopOnSignal(TrainerCallback):
    """Save at the end of the step in which SIGTERM arrived (on any rank), then stop."""

    def __init__(self) -> None:
        self.stopped = False

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if signals.agreed():
            log.warning("stopping at step %d for a final checkpoint", state.global_step)
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True


class MetricsFile(TrainerCallback):
    """Every log line of global rank 0, full precision, as JSONL in the workdir (for people and tests;
    the printed logs are rounded)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")


class ProgressCallback(TrainerCallback):
    """Global rank 0's view of training, sent through the reporter as whole snapshots."""

    def __init__(self, reporter: RateLimited, attempt: int, checkpoints: list[CheckpointEvent]) -> None:
        self.reporter = reporter
        self.snapshot = ProgressReport(
            attempt=attempt, state="initializing", checkpoints=checkpoints, time=now_iso()
        )
        self._mark: tuple[float, int] | None = None  # (time, tokens) at the previous log

    def send(self, **changes: Any) -> None:
        self.snapshot = self.snapshot.model_copy(update={**changes, "time": now_iso()})
        self.reporter.report(self.snapshot)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._mark = (time.monotonic(), state.num_input_tokens_seen)
        self.send(state="training", step=state.global_step, total_steps=state.max_steps, epoch=state.epoch)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        update: dict[str, Any] = {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": state.epoch,
        }
        if "loss" in logs:
            update["train_loss"] = float(logs["loss"])
        if "eval_loss" in logs:
            update["eval_loss"] = float(logs["eval_loss"])
        if "learning_rate" in logs:
            update["learning_rate"] = float(logs["learning_rate"])
        tokens = logs.get("num_input_tokens_seen")
        if tokens is not None and self._mark is not None and "loss" in logs:
            then, seen = self._mark
            now = time.monotonic()
            if now > then and tokens > seen:
                update["tokens_per_second"] = round((tokens - seen) / (now - then), 1)
            self._mark = (now, int(tokens))
        self.send(**update)

    def checkpoint_started(self) -> None:
        self.send(state="checkpointing")

    def checkpoint_committed(self, events: list[CheckpointEvent]) -> None:
        self.send(state="training", checkpoints=events)


class CheckpointPublisher(TrainerCallback):
    """After Hugging Face saved ``checkpoint-N`` locally: upload every node's part, then commit.

    Order (see :mod:`finetune_trainer.checkpoints`): rank 0 clears leftovers at step N, barrier;
    local rank 0 of each node uploads; all ranks exchange results; rank 0 writes the marker, prunes,
    uploads TensorBoard logs; barrier, so no rank leaves before the marker exists.
    """

    def __init__(
        self,
        ckpts: CheckpointStore,
        ranks: Ranks,
        *,
        keep: int,
        fingerprint: dict[str, Any],
        attempt: int,
        tensorboard_dir: Path,
        progress: ProgressCallback | None,
    ) -> None:
        self.ckpts = ckpts
        self.ranks = ranks
        self.keep = keep
        self.fingerprint = fingerprint
        self.attempt = attempt
        self.tensorboard_dir = tensorboard_dir
        self.progress = progress
        self.flush_tensorboard: Any = None  # set by the worker once the trainer (and its writer) exists

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        step = state.global_step
        local = Path(args.output_dir or ".") / f"checkpoint-{step}"
        started = time.monotonic()
        if self.ranks.rank == 0:
            if self.progress is not None:
                self.progress.checkpoint_started()
            self.ckpts.clear(step)
        barrier()  # every rank has written its files, and step N is empty in S3
        files: list[FileEntry] = []
        error = ""
        if self.ranks.local_rank == 0:
            try:
                files = self.ckpts.upload_part(local, step)
            except Exception as exc:  # reported to every rank below, so that all fail together
                log.exception("upload of checkpoint %d failed", step)
                error = f"node of rank {self.ranks.rank}: {type(exc).__name__}: {exc}"
        results = all_gather((files, error))
        errors = [e for _, e in results if e]
        if errors:
            raise TrainerError(ExitCode.ERROR, f"checkpoint {step} upload failed: {'; '.join(errors)}")
        if self.ranks.rank == 0:
            _fault_pause_before_commit(step)
            every = [f for part, _ in results for f in part]
            self.ckpts.commit(step, every, self.fingerprint, attempt=self.attempt, time=now_iso())
            remaining = self.ckpts.prune(self.keep)
            self.upload_tensorboard()
            if self.progress is not None:
                self.progress.checkpoint_committed(self.ckpts.events(remaining))
            log.info(
                "checkpoint %d committed to %s in %.1fs",
                step,
                self.ckpts.step_uri(step),
                time.monotonic() - started,
            )
        barrier()
        if self.ranks.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)  # in S3 now; keep local disk bounded

    def upload_tensorboard(self) -> None:
        if self.flush_tensorboard is not None:
            self.flush_tensorboard()
        if self.tensorboard_dir.is_dir() and any(self.tensorboard_dir.iterdir()):
            self.ckpts.store.upload_dir(self.tensorboard_dir, self.ckpts.root + "tensorboard/")


FAULT_PAUSE_ENV = "FTJ_FAULT_PAUSE_BEFORE_COMMIT"
"""Fault injection for tests, ``<step>:<seconds>``: once every node has uploaded checkpoint ``step``,
rank 0 waits that long before writing its marker, so a test can kill the trainer at the worst moment
(every file in S3, no marker). Never set in production."""


def _fault_pause_before_commit(step: int) -> None:
    wanted, _, seconds = os.environ.get(FAULT_PAUSE_ENV, "").partition(":")
    if wanted and int(wanted) == step:
        log.warning("fault injection: pausing %ss before writing the marker of checkpoint %d", seconds, step)
        time.sleep(float(seconds))
