"""Mirror the trainer's progress report into the FineTuneJob's status. Pure.

The trainer (rank 0) patches one key of the per-job progress ConfigMap with a whole snapshot
(:class:`~finetune_trainer.runconfig.ProgressReport`); the operator watches those ConfigMaps and
copies the snapshot here. Step, metrics and ETA come only from a report of the current attempt (an
older attempt's last words must not move the progress bar). Checkpoints are facts about storage, so
complete checkpoints are merged from any report: the final checkpoint a preempted attempt uploads
may be reported after the next attempt started.

``status.checkpoints`` lists complete checkpoints oldest first, newest last (by step), at most
:data:`~finetune_operator.api.MAX_STATUS_CHECKPOINTS` (the newest ones).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from finetune_operator.api import (
    MAX_STATUS_CHECKPOINTS,
    CheckpointStatus,
    FineTuneJobStatus,
    MetricsStatus,
    ProgressStatus,
)
from finetune_operator.observe import parse_time
from finetune_trainer.runconfig import ProgressReport


def apply_report(status: FineTuneJobStatus, report: ProgressReport | None, attempt: int) -> FineTuneJobStatus:
    """``status`` updated from ``report`` (a copy; ``status`` itself is not changed)."""
    out = status.model_copy(deep=True)
    if report is None:
        return out
    out.checkpoints = merge_checkpoints(out.checkpoints, _complete(report))
    if report.attempt < attempt:
        return out
    out.progress = _progress(status.progress, report)
    old = status.metrics
    out.metrics = MetricsStatus(
        train_loss=_significant(_first(report.train_loss, old.train_loss)),
        eval_loss=_significant(_first(report.eval_loss, old.eval_loss)),
        learning_rate=_significant(_first(report.learning_rate, old.learning_rate)),
        tokens_per_second=_significant(_first(report.tokens_per_second, old.tokens_per_second)),
    )
    if report.adapter_uri:
        out.output.adapter_uri = report.adapter_uri
    return out


def _significant(value: float | None, digits: int = 4) -> float | None:
    """Four significant digits: what `kubectl get ftj` prints (a printer column cannot format)."""
    return None if value is None else float(f"{value:.{digits}g}")


def merge_checkpoints(
    known: Iterable[CheckpointStatus], new: Iterable[CheckpointStatus]
) -> list[CheckpointStatus]:
    """Union by step (a newer report wins), newest last, bounded to the newest ones."""
    by_step = {cp.step: cp for cp in known}
    by_step.update({cp.step: cp for cp in new})
    by_age = sorted(by_step.values(), key=lambda cp: cp.step)
    return by_age[-MAX_STATUS_CHECKPOINTS:]


def newest_complete(checkpoints: Iterable[CheckpointStatus]) -> CheckpointStatus | None:
    complete = [cp for cp in checkpoints if cp.complete]
    return max(complete, key=lambda cp: cp.step) if complete else None


def _complete(report: ProgressReport) -> list[CheckpointStatus]:
    return [
        CheckpointStatus(step=cp.step, uri=cp.uri, complete=True, time=parse_time(cp.time))
        for cp in report.checkpoints
        if cp.complete
    ]


def _progress(old: ProgressStatus, report: ProgressReport) -> ProgressStatus:
    when = parse_time(report.time)
    total = report.total_steps
    percent = min(100, int(100 * report.step / total)) if total else None
    eta = _eta(old, report, when)
    return ProgressStatus(
        step=report.step,
        total_steps=total,
        percent=percent,
        epoch=report.epoch,
        eta_seconds=eta,
        last_update_time=when,
    )


def _eta(old: ProgressStatus, report: ProgressReport, when: datetime | None) -> int | None:
    """The trainer's estimate; else the pace since the previous report; else the previous estimate."""
    total = report.total_steps
    if total is None:
        return None
    if report.step >= total:
        return 0
    if report.eta_seconds is not None:
        trainers: int = round(report.eta_seconds)
        return max(0, trainers)
    if when and old.last_update_time and report.step > old.step and when > old.last_update_time:
        per_step = (when - old.last_update_time).total_seconds() / (report.step - old.step)
        paced: int = round(per_step * (total - report.step))
        return max(0, paced)
    return old.eta_seconds if report.step == old.step else None


def _first(value: float | None, fallback: float | None) -> float | None:
    return value if value is not None else fallback
