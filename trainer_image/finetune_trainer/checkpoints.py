"""Checkpoints in S3: layout, the completion marker, retention, and what may change on resume.

Layout under ``checkpoints.uri`` (which already names the job: ``<root>/<namespace>/<name>/``)::

    step-000000200/                 one Hugging Face checkpoint folder, the union of every node's files
    step-000000200/COMPLETE         the marker (runconfig.CHECKPOINT_MARKER), written last by global rank 0
    tensorboard/                    training curves, uploaded at each checkpoint and at the end

Writing one checkpoint (see :mod:`finetune_trainer.callbacks`): Hugging Face saves ``checkpoint-N``
on local disk (under ZeRO-3 every rank writes its own optimizer shards); local rank 0 of each node
uploads that node's files; all ranks exchange what they uploaded (a collective, so also a barrier);
only if every node succeeded does global rank 0 write the marker listing every file with its size,
then prune. A checkpoint without a marker is torn and is never resumed from; one whose files do not
match its marker's list is treated the same way.

A LoRA checkpoint holds the adapter, optimizer/scheduler/RNG state and trainer state: never the
frozen base weights (HF saves only the adapter for a PEFT model, and DeepSpeed is asked to exclude
frozen parameters).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from finetune_trainer.runconfig import CHECKPOINT_MARKER, CheckpointEvent, RunConfig
from finetune_trainer.s3 import NotFound, ObjectStore
from finetune_trainer.uris import join

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"(?:^|/)step-(\d{9})/?$")


def step_dir(step: int) -> str:
    """``step-000000123``: nine digits, so names sort in step order."""
    return f"step-{step:09d}"


def parse_step(uri: str) -> int | None:
    """The step of a ``.../step-<9 digits>/`` URI, or None for anything else."""
    match = _STEP_DIR.search(uri)
    return int(match.group(1)) if match else None


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    path: str  # relative to the checkpoint folder, '/'-separated
    size: int


class Marker(BaseModel):
    """Content of the completion marker: what a resume needs to trust and check a checkpoint."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    step: int
    files: list[FileEntry]
    fingerprint: dict[str, Any]
    fingerprint_sha256: str
    time: str
    attempt: int = 1


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    uri: str  # ends with '/'
    complete: bool


# ----------------------------------------------------------------------------- pure rules


def fingerprint(config: RunConfig, *, world_size: int, data_sha256: str = "") -> dict[str, Any]:
    """The training-relevant facts of a run, flattened to ``section.field`` keys.

    Stored in each marker so that a resume can say exactly what changed since the checkpoint.
    """
    facts: dict[str, Any] = {
        "method": config.method,
        "model.uri": config.model.uri,
        "model.quantization": config.model.quantization,
        "model.compute_dtype": config.model.compute_dtype,
        "distributed.zero_stage": config.distributed.zero_stage,
        "world_size": world_size,
        "dataset.train_sha256": data_sha256,
    }
    for section in ("adapter", "dataset", "hyperparameters"):
        for key, value in getattr(config, section).model_dump(mode="json").items():
            facts[f"{section}.{key}"] = value
    return facts


def fingerprint_sha256(facts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


# Changes that make the saved state unusable: different weights/shapes, or optimizer shards laid
# out for another number of ranks or another ZeRO stage.
_INCOMPATIBLE = {
    "method": "the training method",
    "model.uri": "the base model",
    "model.quantization": "the quantization of the base model",
    "adapter.r": "the LoRA rank (adapter shapes)",
    "adapter.target_modules": "the LoRA target modules (which adapters exist)",
    "distributed.zero_stage": "the ZeRO stage (layout of the optimizer state)",
}


@dataclass(frozen=True)
class ResumeCheck:
    errors: list[str]
    warnings: list[str]


def compare_fingerprints(saved: dict[str, Any], current: dict[str, Any]) -> ResumeCheck:
    """What differs between the checkpoint's fingerprint and the current run's, sorted into
    errors (cannot resume) and warnings (resumes, but results differ from an uninterrupted run)."""
    errors: list[str] = []
    warnings: list[str] = []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        what = f"{key} changed from {old!r} to {new!r}"
        if key in _INCOMPATIBLE:
            errors.append(f"{what}: {_INCOMPATIBLE[key]} differs from the checkpoint's")
        elif key == "world_size" and current.get("distributed.zero_stage", 0) > 0:
            errors.append(
                f"{what}: ZeRO optimizer shards are saved per rank, so nodes x procsPerNode must stay "
                "the same"
            )
        else:
            warnings.append(what)
    return ResumeCheck(errors, warnings)


def retention(checkpoints: list[CheckpointInfo], keep: int) -> list[CheckpointInfo]:
    """Which checkpoints to delete: complete ones beyond the newest ``keep``, and incomplete ones
    older than the newest complete one (torn uploads that nothing will ever resume from).

    Incomplete ones newer than the newest complete checkpoint are kept: one may be in flight.
    """
    complete = sorted((c for c in checkpoints if c.complete), key=lambda c: c.step, reverse=True)
    doomed = complete[keep:]
    if complete:
        newest = complete[0].step
        doomed += [c for c in checkpoints if not c.complete and c.step < newest]
    return sorted(doomed, key=lambda c: c.step)


def local_files(folder: Path) -> list[FileEntry]:
    """Every file under ``folder`` with its size, sorted by path."""
    return [
        FileEntry(path=p.relative_to(folder).as_posix(), size=p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]


# ----------------------------------------------------------------------------- S3 I/O


class CheckpointStore:
    """The checkpoints of one job under ``root`` (an ``s3://`` folder URI)."""

    def __init__(self, store: ObjectStore, root: str) -> None:
        self.store = store
        self.root = root if root.endswith("/") else root + "/"

    def step_uri(self, step: int) -> str:
        return join(self.root, step_dir(step) + "/")

    def marker_uri(self, step: int) -> str:
        return join(self.step_uri(step), CHECKPOINT_MARKER)

    def scan(self) -> list[CheckpointInfo]:
        """Every ``step-*`` folder, oldest first, with whether its marker exists."""
        found = []
        for prefix in self.store.list_prefixes(self.root):
            step = parse_step(prefix)
            if step is not None:
                found.append(
                    CheckpointInfo(step, self.step_uri(step), self.store.exists(self.marker_uri(step)))
                )
        return sorted(found, key=lambda c: c.step)

    def read_marker(self, step: int) -> Marker:
        return Marker.model_validate_json(self.store.read_bytes(self.marker_uri(step)))

    def latest_complete(self) -> CheckpointInfo | None:
        complete = [c for c in self.scan() if c.complete]
        return complete[-1] if complete else None

    def clear(self, step: int) -> None:
        """Remove whatever lies at ``step`` (a torn upload, or a checkpoint about to be rewritten):
        marker first, so a half-deleted folder never looks complete."""
        uri = self.step_uri(step)
        if self.store.exists(uri):
            log.info("removing earlier files at %s before writing it again", uri)
            self.store.delete(self.marker_uri(step))
            self.store.delete_prefix(uri)

    def upload_part(self, local_dir: Path, step: int) -> list[FileEntry]:
        """Upload one node's part of checkpoint ``step``; returns what it uploaded."""
        files = local_files(local_dir)
        self.store.upload_dir(local_dir, self.step_uri(step))
        return files

    def commit(
        self, step: int, files: list[FileEntry], facts: dict[str, Any], *, attempt: int, time: str
    ) -> Marker:
        """Write the marker: from now on this checkpoint may be resumed from."""
        unique = {f.path: f for f in files}  # a file written by every node (e.g. 'latest') once
        marker = Marker(
            step=step,
            files=sorted(unique.values(), key=lambda f: f.path),
            fingerprint=facts,
            fingerprint_sha256=fingerprint_sha256(facts),
            time=time,
            attempt=attempt,
        )
        self.store.put_bytes(self.marker_uri(step), marker.model_dump_json(indent=1).encode())
        return marker

    def prune(self, keep: int) -> list[CheckpointInfo]:
        """Apply :func:`retention`; returns the complete checkpoints that remain, newest first."""
        checkpoints = self.scan()
        doomed = retention(checkpoints, keep)
        for info in doomed:
            log.info("deleting old checkpoint %s", info.uri)
            if info.complete:
                self.store.delete(self.marker_uri(info.step))
            self.store.delete_prefix(info.uri)
        gone = {c.step for c in doomed}
        return [c for c in reversed(checkpoints) if c.complete and c.step not in gone]

    def events(self, infos: list[CheckpointInfo]) -> list[CheckpointEvent]:
        """Progress events for complete checkpoints (time from their markers)."""
        events = []
        for info in infos:
            try:
                when = self.read_marker(info.step).time
            except (NotFound, ValueError):
                continue
            events.append(CheckpointEvent(step=info.step, uri=info.uri, complete=True, time=when))
        return events

    def download(self, step: int, local_dir: Path) -> Marker:
        """Download checkpoint ``step`` and check every file its marker lists (present, same size).

        Raises ValueError when the files do not match the marker.
        """
        marker = self.read_marker(step)
        self.store.download_prefix(self.step_uri(step), local_dir)
        problems = []
        for entry in marker.files:
            path = local_dir / entry.path
            if not path.is_file():
                problems.append(f"{entry.path} is missing")
            elif path.stat().st_size != entry.size:
                problems.append(f"{entry.path} has {path.stat().st_size} bytes, the marker says {entry.size}")
        if problems:
            raise ValueError(
                f"checkpoint {self.step_uri(step)} does not match its marker: {'; '.join(problems[:5])}"
            )
        (local_dir / CHECKPOINT_MARKER).unlink(missing_ok=True)
        return marker
