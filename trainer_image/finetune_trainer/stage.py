"""Prepare one node before any worker starts: check the data, fetch the model and the checkpoint.

Runs once per pod, in the launcher, so eight GPUs share one download, and a bad dataset fails in
seconds with exit code 3, before the model is downloaded or a GPU is touched:

1. the model's small files (config, tokenizer, chat template) are fetched;
2. the dataset is read and validated with a token counter built from that tokenizer and its chat
   template (every problem reported with its line number); on a resume whose checkpoint was written
   by a run with exactly this data and these settings, only the dataset's sha256 is computed
   (:func:`check_data` says why that is safe);
3. the run config is checked for combinations that cannot work;
4. the checkpoint to resume from is chosen (``checkpoints.resume_from``, else the newest complete
   one), compared with the current config (incompatible changes fail with INVALID_CONFIG), then
   downloaded and checked against its marker;
5. the model weights are fetched.

What the workers need is written to ``<workdir>/staged.json``, with the seconds each step took
(also logged: on a resume they say whether the checkpoint or the model dominated the start).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune_trainer import checkpoints
from finetune_trainer.data import DataSourceError, check_dataset, file_sha256, make_token_counter, read_file
from finetune_trainer.data_checks import DataValidationError
from finetune_trainer.errors import TrainerError
from finetune_trainer.runconfig import DatasetConfig, ExitCode, RunConfig
from finetune_trainer.s3 import ObjectStore, StorageError
from finetune_trainer.uris import parse_uri

log = logging.getLogger(__name__)

STAGED_FILE = "staged.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


@dataclass(frozen=True)
class Staged:
    """Local inputs of the workers of one node."""

    model_dir: str
    data_sha256: str
    resume_dir: str | None = None
    resume_step: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # step of :func:`stage` -> wall time

    def write(self, workdir: Path) -> None:
        (workdir / STAGED_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, workdir: Path) -> Staged:
        data: dict[str, Any] = json.loads((workdir / STAGED_FILE).read_text())
        return cls(**data)


def storage_error(exc: StorageError, what: str) -> TrainerError:
    """Map an S3 failure to the exit code the operator acts on."""
    code = ExitCode.ERROR if exc.retryable else ExitCode.INPUT_UNREADABLE
    return TrainerError(code, f"cannot read {what}: {exc}")


def check_config(config: RunConfig) -> None:
    """Combinations the schema cannot express but training cannot do."""
    if config.output.merge and config.model.quantization != "none":
        raise TrainerError(
            ExitCode.INVALID_CONFIG,
            "output.merge needs model.quantization none: an adapter trained on a 4-bit model cannot be "
            "merged into it losslessly. Merge offline into the full-precision model, or set merge false.",
        )
    for name, uri in (("checkpoints.uri", config.checkpoints.uri), ("output.uri", config.output.uri)):
        if parse_uri(uri).scheme != "s3":
            raise TrainerError(ExitCode.INVALID_CONFIG, f"{name} must be an s3:// URI, got {uri!r}")


def stage(config: RunConfig, workdir: Path, store: ObjectStore, *, world_size: int) -> Staged:
    """Run steps 1-5 of the module doc; raises :class:`TrainerError` with the exit code to use."""
    seconds: dict[str, float] = {}
    check_config(config)
    with _timer(seconds, "model_files"):
        model_dir = fetch_model(config.model.uri, workdir / "model", store, weights=False)
    with _timer(seconds, "dataset"):
        sha256 = check_data(config, model_dir, store, world_size=world_size)
    with _timer(seconds, "checkpoint"):
        resume_dir, resume_step = fetch_resume(
            config, workdir, store, world_size=world_size, data_sha256=sha256
        )
    with _timer(seconds, "model_weights"):
        fetch_model(config.model.uri, workdir / "model", store, weights=True)
    staged = Staged(str(model_dir), sha256, str(resume_dir) if resume_dir else None, resume_step, seconds)
    staged.write(workdir)
    log.info(
        "node staged in %.1fs (%s)",
        sum(seconds.values()),
        ", ".join(f"{name.replace('_', ' ')} {value:.1f}s" for name, value in seconds.items()),
    )
    return staged


@contextmanager
def _timer(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Record the block's wall time as ``seconds[name]``."""
    started = time.monotonic()
    try:
        yield
    finally:
        seconds[name] = round(time.monotonic() - started, 3)


def fetch_model(uri: str, target: Path, store: ObjectStore, *, weights: bool) -> Path:
    """The local folder of the model at ``uri``; downloads ``s3://`` and ``hf://`` models into
    ``target``. ``weights=False`` fetches only the small files (tokenizer, config)."""
    parsed = parse_uri(uri)
    if parsed.is_local:
        path = parsed.local_path()
        if not (path / "config.json").is_file():
            raise TrainerError(ExitCode.INPUT_UNREADABLE, f"model.uri {uri}: no config.json in {path}")
        return path
    done = target / (".complete" if weights else ".small-files")
    if done.is_file():
        return target
    if parsed.scheme == "s3":
        try:
            keys = store.list_keys(uri)
            if not keys:
                raise TrainerError(
                    ExitCode.INPUT_UNREADABLE, f"model.uri {uri}: no objects under this prefix"
                )
            if weights:
                store.download_prefix(uri, target)
            else:
                base = uri if uri.endswith("/") else uri + "/"
                for key in keys:
                    if not key.endswith(_WEIGHT_SUFFIXES):
                        store.download_file(key, target / key[len(base) :])
        except StorageError as exc:
            raise storage_error(exc, f"model.uri {uri}") from exc
    else:
        _fetch_hub(parsed.repo_id, parsed.revision, target, weights=weights)
    done.touch()
    return target


def _fetch_hub(repo_id: str, revision: str | None, target: Path, *, weights: bool) -> None:
    from huggingface_hub import snapshot_download

    ignore = None if weights else [f"*{suffix}" for suffix in _WEIGHT_SUFFIXES]
    try:
        snapshot_download(repo_id, revision=revision, local_dir=target, ignore_patterns=ignore)
    except Exception as exc:  # offline, no such repo, gated: all mean the model cannot be read
        raise TrainerError(
            ExitCode.INPUT_UNREADABLE,
            f"cannot download hf://{repo_id} ({type(exc).__name__}: {exc}); check the name, the token "
            "secret (credentials.hfTokenSecretRef) and network access, or copy the model to s3://",
        ) from exc


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_data(config: RunConfig, model_dir: Path, store: ObjectStore, *, world_size: int) -> str:
    """Step 2: validate the dataset (:func:`validate_data`), unless a resume proves it valid already;
    returns the train data's sha256.

    The marker of the checkpoint to resume from holds the fingerprint of the run that wrote it: the
    dataset's sha256 and every dataset, hyperparameter, adapter and model setting. That run's
    launcher checked exactly that data with exactly those settings before training (or skipped the
    check for this same reason, which leads back to a run that checked it). So when the current
    fingerprint equals the saved one, only the train file is read and hashed, and the tokenizer load
    and the token counts (seconds, mostly importing transformers; minutes for a large dataset) are
    skipped. Anything else is checked as on a first start: no checkpoint, any difference from the
    fingerprint (even one that only warrants a warning), an older marker without a fingerprint, a
    dataset the fingerprint does not cover (:func:`fingerprint_covers_data`). The file read for the
    hash is the one validated, not downloaded again. The workers still check the data as they load
    it (``data.load_datasets``), so a change the fingerprint cannot see (new files at the same
    ``model.uri``, a stricter trainer version) still fails with INVALID_DATA, only later.
    """
    saved = _marker_to_resume_from(config, store) if fingerprint_covers_data(config.dataset) else None
    if saved is None:
        return validate_data(config, model_dir, store)
    with _reading_data():
        raw = read_file(config.dataset.train, store=store)
    sha256 = file_sha256(raw)
    current = checkpoints.fingerprint(config, world_size=world_size, data_sha256=sha256)
    if not validated_before(saved, current):
        return validate_data(config, model_dir, store, train_bytes=raw)
    log.info(
        "dataset check skipped: the checkpoint at step %d was written by a run with this exact "
        "fingerprint (dataset sha256 %s, same dataset, hyperparameter and model settings), whose "
        "start checked this data; the workers check it again as they load it",
        saved.step,
        sha256[:12],
    )
    return sha256


def fingerprint_covers_data(dataset: DatasetConfig) -> bool:
    """Whether ``dataset.train_sha256`` in a fingerprint stands for every byte the check reads.

    Not for a separate eval file (its bytes are not in the fingerprint, only its URI), nor for a Hub
    dataset (its sha256 is computed from its rows, so hashing it means loading it: no cheaper than
    the check). An ``evalFraction`` split is covered: it depends on the train bytes and the seed.
    """
    try:
        scheme = parse_uri(dataset.train).scheme
    except ValueError:  # validate_data says what is wrong with it
        return False
    return dataset.eval is None and scheme != "hf"


def validated_before(saved: checkpoints.Marker, current: dict[str, Any]) -> bool:
    """Whether the run that wrote ``saved`` had exactly the fingerprint ``current``."""
    same_facts = saved.fingerprint == current
    return same_facts and saved.fingerprint_sha256 == checkpoints.fingerprint_sha256(current)


def _marker_to_resume_from(config: RunConfig, store: ObjectStore) -> checkpoints.Marker | None:
    """The marker of the checkpoint :func:`fetch_resume` will try first, or None: no checkpoint, or
    one this cannot read (a ``resumeFrom`` that cannot be honoured, an older marker, S3 trouble),
    all of which :func:`fetch_resume` reports as before, after the data check."""
    ckpts = checkpoints.CheckpointStore(store, config.checkpoints.uri)
    try:
        candidates = _resume_candidates(config, ckpts)
        return ckpts.read_marker(candidates[0]) if candidates else None
    except (TrainerError, StorageError, ValueError):  # pydantic's ValidationError is a ValueError
        return None


@contextmanager
def _reading_data() -> Iterator[None]:
    """Map a failure to read the dataset to the exit code the operator acts on."""
    try:
        yield
    except DataSourceError as exc:
        raise TrainerError(ExitCode.INPUT_UNREADABLE, str(exc)) from exc
    except StorageError as exc:
        raise storage_error(exc, "the dataset") from exc


def validate_data(
    config: RunConfig, model_dir: Path, store: ObjectStore, *, train_bytes: bytes | None = None
) -> str:
    """Check the dataset with exact token counts; returns the train data's sha256.

    ``train_bytes``: the train file, when :func:`check_data` has read it already.
    """
    tokenizer = load_tokenizer(model_dir)
    if getattr(tokenizer, "chat_template", None) is None:
        raise TrainerError(
            ExitCode.INVALID_CONFIG,
            f"the tokenizer of {config.model.uri} has no chat template; use an instruct/chat model or add "
            "a chat_template.jinja next to its tokenizer files",
        )
    with _reading_data():
        checked = check_dataset(
            config.dataset,
            config.method,
            seed=config.hyperparameters.seed,
            store=store,
            token_counter=make_token_counter(tokenizer),
            train_bytes=train_bytes,
        )
    if not checked.report.ok:
        raise TrainerError(ExitCode.INVALID_DATA, str(DataValidationError(checked.report)))
    report = checked.report
    log.info(
        "dataset OK: %s format, %d train / %d eval examples, sha256 %s",
        report.format,
        report.n_train,
        report.n_eval,
        report.sha256[:12],
    )
    return report.sha256


def fetch_resume(
    config: RunConfig, workdir: Path, store: ObjectStore, *, world_size: int, data_sha256: str
) -> tuple[Path | None, int | None]:
    """Choose, check and download the checkpoint to resume from; (None, None) to start fresh."""
    ckpts = checkpoints.CheckpointStore(store, config.checkpoints.uri)
    current = checkpoints.fingerprint(config, world_size=world_size, data_sha256=data_sha256)
    try:
        candidates = _resume_candidates(config, ckpts)
        for step in candidates:
            marker = ckpts.read_marker(step)
            verdict = checkpoints.compare_fingerprints(marker.fingerprint, current)
            if verdict.errors:
                raise TrainerError(
                    ExitCode.INVALID_CONFIG,
                    f"cannot resume from checkpoint {ckpts.step_uri(step)}: {'; '.join(verdict.errors)}. "
                    "Undo the change, or start a new job (another name) to train from scratch.",
                )
            for warning in verdict.warnings:
                log.warning("resuming from step %d although %s", step, warning)
            local = workdir / "resume" / f"checkpoint-{step}"
            try:
                ckpts.download(step, local)
            except ValueError as exc:
                if config.checkpoints.resume_from:
                    raise TrainerError(ExitCode.INVALID_CONFIG, str(exc)) from exc
                log.warning("%s; trying an older checkpoint", exc)
                continue
            log.info("resuming from %s", ckpts.step_uri(step))
            return local, step
    except StorageError as exc:
        raise storage_error(exc, f"checkpoints under {config.checkpoints.uri}") from exc
    return None, None


def _resume_candidates(config: RunConfig, ckpts: checkpoints.CheckpointStore) -> list[int]:
    """Complete checkpoints, newest first; with ``resume_from``, only those at or after its step.

    ``resume_from`` is the newest checkpoint the operator knew of when it rendered the attempt. A
    newer complete one can exist by the time the pods start (the final checkpoint of a preempted
    attempt, or pods of the same attempt suspended and readmitted by Kueue), and ``keep`` may have
    pruned the one named: newer is always better, older than named never happens.
    """
    complete = [c.step for c in reversed(ckpts.scan()) if c.complete]
    wanted = config.checkpoints.resume_from
    if not wanted:
        return complete
    folder = wanted if wanted.endswith("/") else wanted + "/"
    step = checkpoints.parse_step(folder)
    if step is None or ckpts.step_uri(step) != folder:
        raise TrainerError(
            ExitCode.INVALID_CONFIG,
            f"checkpoints.resumeFrom {wanted!r} is not a step-<9 digits>/ folder under {ckpts.root}",
        )
    candidates = [s for s in complete if s >= step]
    if not candidates:
        raise TrainerError(
            ExitCode.INVALID_CONFIG,
            f"checkpoints.resumeFrom {wanted} has no completion marker (and no newer checkpoint is "
            "complete): it is a torn upload and cannot be resumed from",
        )
    return candidates
