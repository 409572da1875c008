"""What a person wants to see of a job, from either source: a FineTuneJob's status (``get``,
``list``, ``watch``) or the trainer's own progress report (``run --local``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from finetune_operator.api import FINAL_PHASES, FineTuneJobStatus
from finetune_operator.cli import output
from finetune_trainer.runconfig import ProgressReport

_PHASE_OF_STATE = {
    "initializing": "Initializing",
    "training": "Running",
    "checkpointing": "Running",
    "finished": "Succeeded",
    "failed": "Failed",
}


@dataclass
class JobView:
    name: str
    namespace: str = ""
    phase: str = "Pending"
    reason: str | None = None
    message: str | None = None
    attempt: int = 0
    restarts: int = 0
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    eta_seconds: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    checkpoints: list[tuple[int, str]] = field(default_factory=list)
    adapter_uri: str | None = None
    created: str | None = None

    @classmethod
    def from_object(cls, obj: dict[str, Any]) -> JobView:
        """From a FineTuneJob as the API server returns it."""
        meta = obj.get("metadata", {})
        status = FineTuneJobStatus.model_validate(obj.get("status") or {})
        return cls(
            name=str(meta.get("name", "")),
            namespace=str(meta.get("namespace", "")),
            phase=status.phase,
            reason=status.reason,
            message=status.message,
            attempt=status.attempt,
            restarts=status.restarts.total,
            step=status.progress.step,
            total_steps=status.progress.total_steps,
            epoch=status.progress.epoch,
            eta_seconds=status.progress.eta_seconds,
            train_loss=status.metrics.train_loss,
            eval_loss=status.metrics.eval_loss,
            learning_rate=status.metrics.learning_rate,
            tokens_per_second=status.metrics.tokens_per_second,
            checkpoints=[(cp.step, cp.uri) for cp in status.checkpoints if cp.complete],
            adapter_uri=status.output.adapter_uri,
            created=meta.get("creationTimestamp"),
        )

    @classmethod
    def from_report(cls, name: str, report: ProgressReport) -> JobView:
        """From the trainer's progress report (a local run has no operator to write a status)."""
        return cls(
            name=name,
            phase=_PHASE_OF_STATE[report.state],
            message=report.message,
            attempt=report.attempt,
            step=report.step,
            total_steps=report.total_steps,
            epoch=report.epoch,
            eta_seconds=report.eta_seconds,
            train_loss=report.train_loss,
            eval_loss=report.eval_loss,
            learning_rate=report.learning_rate,
            tokens_per_second=report.tokens_per_second,
            checkpoints=sorted((cp.step, cp.uri) for cp in report.checkpoints if cp.complete),
            adapter_uri=report.adapter_uri,
        )

    @property
    def final(self) -> bool:
        return self.phase in FINAL_PHASES

    @property
    def percent(self) -> float | None:
        if not self.total_steps:
            return None
        return min(100.0, 100.0 * self.step / self.total_steps)

    @property
    def latest_checkpoint(self) -> tuple[int, str] | None:
        return max(self.checkpoints) if self.checkpoints else None

    def progress_text(self) -> str:
        """``1200/3000 (40%)``; ``-`` before the first report."""
        if not self.total_steps:
            return str(self.step) if self.step else "-"
        return f"{self.step}/{self.total_steps} ({self.percent:.0f}%)"


LIST_HEADERS = ("name", "phase", "progress", "loss", "eval loss", "tokens/s", "attempt", "restarts", "age")


def list_row(view: JobView, now: datetime) -> list[str]:
    return [
        view.name,
        view.phase,
        view.progress_text(),
        output.number(view.train_loss),
        output.number(view.eval_loss),
        output.number(view.tokens_per_second, 5),
        str(view.attempt),
        str(view.restarts),
        output.age(view.created, now),
    ]
