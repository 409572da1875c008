"""Load the training data named by a run config, validate it, and hand TRL-ready datasets over.

Reading is here (S3 through :class:`~finetune_trainer.s3.ObjectStore`, local and ``pvc://`` paths,
``hf://`` through ``datasets``); the checks and the normalisation are in
:mod:`finetune_trainer.data_checks`. Validation runs before any GPU work and reports every problem at
once. The module imports no torch: ``datasets`` and ``transformers`` are imported inside the functions
that need them, so ``python -m finetune_trainer validate`` (and the ``ftjob`` CLI) stay cheap.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import pydantic

from finetune_trainer.data_checks import (
    DatasetReport,
    DataValidationError,
    Method,
    Text,
    TokenCounter,
    advice,
    check_examples,
    parse_jsonl,
    summarize,
)
from finetune_trainer.runconfig import DatasetConfig, DatasetFormat, ExitCode, S3Config
from finetune_trainer.s3 import ObjectStore, StorageError
from finetune_trainer.uris import Uri, parse_uri

__all__ = [
    "CheckedData",
    "DataSourceError",
    "DataValidationError",
    "DatasetReport",
    "LoadedData",
    "check_dataset",
    "file_sha256",
    "load_datasets",
    "make_token_counter",
    "read_file",
    "read_records",
    "split_examples",
    "summarize",
    "validate_main",
]


class DataSourceError(Exception):
    """The data URI cannot be read (missing file, unknown bucket or key, Hub unreachable). Not retryable."""


@dataclass
class CheckedData:
    """Normalised examples (TRL's dict form) and the report; ``eval`` is None without an eval set."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]] | None
    report: DatasetReport


@dataclass
class LoadedData:
    """``datasets.Dataset`` objects ready for ``SFTTrainer``/``DPOTrainer``."""

    train: Any
    eval: Any | None
    report: DatasetReport


def read_records(
    uri: str, report: DatasetReport, *, store: ObjectStore | None = None, data: bytes | None = None
) -> list[tuple[int, Any]]:
    """Read the records behind ``uri`` as ``(line_or_row_number, value)`` pairs, filling ``report``.

    ``data``: the file's bytes when the caller has read them already (:func:`read_file`), so a large
    dataset is not downloaded twice. Raises :class:`DataSourceError` when the source cannot be read;
    a retryable :class:`~finetune_trainer.s3.StorageError` (S3 unreachable for too long) propagates.
    """
    parsed = _parse(uri)
    if parsed.scheme == "hf":
        return _read_hub(parsed, report)
    if data is None:
        data = _read_file(parsed, store)
    report.sha256 = file_sha256(data)
    if uri.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataSourceError(f"cannot read {uri}: not a valid gzip file ({exc})") from exc
    return parse_jsonl(data, report)


def read_file(uri: str, *, store: ObjectStore | None = None) -> bytes:
    """The bytes of the dataset file at ``uri`` as stored (before any gunzip), read the way
    :func:`read_records` reads them; their :func:`file_sha256` is the report's ``sha256``.

    Raises :class:`DataSourceError` for a Hub dataset (``hf://`` names no file) and for what
    :func:`read_records` refuses.
    """
    parsed = _parse(uri)
    if parsed.scheme == "hf":
        raise DataSourceError(f"{uri} is a Hugging Face Hub dataset, not a file")
    return _read_file(parsed, store)


def file_sha256(data: bytes) -> str:
    """The sha256 of a dataset file (hex), as in :attr:`DatasetReport.sha256` and checkpoint markers."""
    return hashlib.sha256(data).hexdigest()


def _parse(uri: str) -> Uri:
    try:
        return parse_uri(uri)
    except ValueError as exc:
        raise DataSourceError(str(exc)) from exc


def _read_file(parsed: Uri, store: ObjectStore | None) -> bytes:
    return _read_s3(parsed, store) if parsed.scheme == "s3" else _read_local(parsed)


def _read_local(parsed: Uri) -> bytes:
    path = parsed.local_path()
    if path.is_dir():
        raise DataSourceError(f"{parsed.raw} is a directory ({path}); name the JSONL file itself")
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        hint = " (pvc:// paths live under $FTJ_PVC_ROOT)" if parsed.scheme == "pvc" else ""
        raise DataSourceError(f"dataset file {parsed.raw} not found: {path}{hint}") from exc
    except OSError as exc:
        raise DataSourceError(f"cannot read dataset file {parsed.raw} ({path}): {exc}") from exc


def _read_s3(parsed: Uri, store: ObjectStore | None) -> bytes:
    if not parsed.key or parsed.key.endswith("/"):
        raise DataSourceError(f"{parsed.raw} names a prefix; name the JSONL object itself")
    store = store or ObjectStore()
    try:
        with tempfile.TemporaryDirectory(prefix="ftj-data-") as tmp:
            # A file download uses parallel ranged GETs, which matters for multi-GB datasets.
            return store.download_file(parsed.raw, Path(tmp) / "data").read_bytes()
    except StorageError as exc:
        if exc.retryable:
            raise
        raise DataSourceError(f"cannot read the dataset: {exc}") from exc


def _read_hub(parsed: Uri, report: DatasetReport) -> list[tuple[int, Any]]:
    import datasets  # heavy: only when a Hub dataset is named

    try:
        rows = datasets.load_dataset(parsed.repo_id, revision=parsed.revision, split="train")
    except Exception as exc:  # offline mode, no network, no such repo: all end the same way
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        state = (
            "HF_HUB_OFFLINE is set, so only datasets in the local cache load"
            if offline
            else ("if the Hub is unreachable from the cluster, set HF_HUB_OFFLINE=1 to fail fast")
        )
        raise DataSourceError(
            f"cannot load {parsed.raw} from the Hugging Face Hub ({type(exc).__name__}: {exc}); {state}. "
            "Copy the data to s3:// or a PVC as JSONL and point dataset.train at it."
        ) from exc
    records = [(i, dict(row)) for i, row in enumerate(rows, start=1)]
    digest = hashlib.sha256()
    for _, row in records:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode() + b"\n")
    report.sha256 = digest.hexdigest()
    return records


def split_examples(
    examples: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out ``fraction`` of the examples (at least one) for evaluation, the same way for a seed.

    The split is done here, not by ``datasets``, so it depends on nothing but the data and the seed.
    """
    n_eval = max(1, round(len(examples) * fraction)) if examples else 0
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    return train, [examples[i] for i in sorted(held)]


def check_dataset(
    config: DatasetConfig,
    method: Method,
    *,
    seed: int = 42,
    store: ObjectStore | None = None,
    token_counter: TokenCounter | None = None,
    train_bytes: bytes | None = None,
) -> CheckedData:
    """Read and check the train (and eval) data of ``config``; never raises for bad data: see the report.

    ``train_bytes``: the train file as :func:`read_file` returned it, when the caller has it already.
    """
    report = DatasetReport(source=config.train, method=method)
    train = _check_file(config.train, report, config, store, token_counter, train_bytes)
    eval_examples: list[dict[str, Any]] | None = None
    if config.eval is not None:
        report.eval = DatasetReport(source=config.eval, method=method)
        eval_examples = _check_file(config.eval, report.eval, config, store, token_counter, None)
        if report.eval.format and report.format and report.eval.format != report.format:
            report.eval.add(
                "error",
                f"the eval data is in {report.eval.format} format but the training data in "
                f"{report.format}; use one format for both",
            )
        if config.eval_fraction is not None:
            report.add("error", "set either dataset.eval or dataset.evalFraction, not both")
    elif config.eval_fraction is not None and train:
        train, eval_examples = split_examples(train, config.eval_fraction, seed)
    report.n_train = len(train)
    report.n_eval = len(eval_examples or [])
    held = (
        f" after holding out {report.n_eval} for evaluation" if config.eval_fraction and report.n_eval else ""
    )
    if report.n_errors:
        pass  # how many examples remain means little until the errors are fixed
    elif report.n_records == 0:
        report.add("error", "the data holds no examples")
    elif report.n_train == 0:
        report.add("error", f"no training examples left{held}; lower dataset.evalFraction or add examples")
    elif report.n_train < config.min_examples:
        report.add(
            "error",
            f"only {report.n_train} valid training examples{held}; dataset.minExamples is "
            f"{config.min_examples}",
        )
    return CheckedData(train, eval_examples, report)


def _check_file(
    uri: str,
    report: DatasetReport,
    config: DatasetConfig,
    store: ObjectStore | None,
    token_counter: TokenCounter | None,
    data: bytes | None,
) -> list[dict[str, Any]]:
    records = read_records(uri, report, store=store, data=data)
    unit = "row" if uri.startswith("hf://") else "line"
    return check_examples(
        records,
        report,
        fmt=config.format,
        max_seq_length=config.max_seq_length,
        token_counter=token_counter,
        unit=unit,
    )


def load_datasets(
    config: DatasetConfig,
    method: Method,
    *,
    seed: int = 42,
    store: ObjectStore | None = None,
    token_counter: TokenCounter | None = None,
) -> LoadedData:
    """Check the data and build ``datasets.Dataset`` objects; raises :class:`DataValidationError`."""
    checked = check_dataset(config, method, seed=seed, store=store, token_counter=token_counter)
    if not checked.report.ok:
        raise DataValidationError(checked.report)
    import datasets  # heavy: only once the data is known to be good

    train = datasets.Dataset.from_list(checked.train)
    evaluation = datasets.Dataset.from_list(checked.eval) if checked.eval else None
    return LoadedData(train, evaluation, checked.report)


def make_token_counter(tokenizer: Any) -> TokenCounter:
    """A :data:`TokenCounter` from a Hugging Face tokenizer: the chat template for message lists,
    plain tokenisation plus the EOS token TRL appends for strings."""

    def count(text: Text) -> int:
        if isinstance(text, str):
            return len(tokenizer(text)["input_ids"]) + 1
        ids = tokenizer.apply_chat_template(text, tokenize=True)
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding by default
            ids = ids["input_ids"]
        return len(ids)

    return count


def validate_main(argv: Sequence[str] | None = None) -> int:
    """``python -m finetune_trainer validate DATA --method sft|dpo ...``: check a dataset, print a report.

    Returns :class:`ExitCode` ``OK``, ``INVALID_DATA`` (errors found) or ``INPUT_UNREADABLE`` (unreadable).
    """
    args = _parser().parse_args(argv)
    try:
        config = DatasetConfig(
            train=args.data,
            eval=args.eval,
            eval_fraction=args.eval_fraction,
            format=args.format,
            max_seq_length=args.max_seq_length,
            min_examples=args.min_examples,
        )
    except pydantic.ValidationError as exc:
        print(f"error: invalid options: {exc}", file=sys.stderr)
        return int(ExitCode.INVALID_CONFIG)
    counter = None
    if args.tokenizer:
        from transformers import AutoTokenizer  # heavy: only for exact token counts

        counter = make_token_counter(AutoTokenizer.from_pretrained(args.tokenizer))
    store = (
        ObjectStore(S3Config(endpoint_url=args.endpoint_url))
        if args.data.startswith("s3://") or (args.eval or "").startswith("s3://")
        else None
    )
    try:
        checked = check_dataset(config, args.method, seed=args.seed, store=store, token_counter=counter)
    except (DataSourceError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(ExitCode.INPUT_UNREADABLE)
    report = checked.report
    print(json.dumps(report.to_dict(), indent=2) if args.json else summarize(report))
    if not report.ok:
        print(f"\nThe data is not valid for {report.method}. {advice(report.method)}", file=sys.stderr)
        return int(ExitCode.INVALID_DATA)
    return int(ExitCode.OK)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_trainer validate",
        description="Check a fine-tuning dataset (JSONL) the way the trainer will, before any GPU is used.",
    )
    parser.add_argument("data", help="s3://bucket/key.jsonl, pvc://claim/path, hf://org/name or a local path")
    parser.add_argument("--method", choices=["sft", "dpo"], default="sft")
    parser.add_argument("--format", choices=get_args(DatasetFormat), default="auto")
    parser.add_argument(
        "--max-seq-length",
        type=int,
        default=DatasetConfig.model_fields["max_seq_length"].default,
        help="longest allowed example in tokens (default %(default)s)",
    )
    parser.add_argument("--eval", help="separate eval data URI")
    parser.add_argument("--eval-fraction", type=float, help="hold out this fraction for evaluation")
    parser.add_argument("--min-examples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42, help="seed of the eval split")
    parser.add_argument("--tokenizer", help="local tokenizer folder for exact token counts (else chars/4)")
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser
