"""``ftjob validate DATA``: check a dataset the way the trainer will, before any GPU is spent.

The checks are the trainer's own (:func:`finetune_trainer.data.check_dataset`: format detection,
counts, duplicates, missing assistant turns, role order, empty fields, over-long examples, all
with line numbers), so a file that passes here passes in the pod. With ``--model`` the token
counts use that model's tokenizer and chat template; without, they are an estimate (characters/4)
and the report says so. One check is the CLI's own because the trainer has no labels to train on:
the balance of a ``label`` field, where the records carry one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

from finetune_operator.cli import output
from finetune_operator.cli.errors import CliError
from finetune_operator.cli.storage import add_s3_option, object_store, storage_error
from finetune_trainer.data import DataSourceError, check_dataset, make_token_counter
from finetune_trainer.data_checks import DatasetReport, Method, TokenCounter, parse_jsonl, summarize
from finetune_trainer.runconfig import DatasetConfig, DatasetFormat
from finetune_trainer.s3 import StorageError
from finetune_trainer.uris import parse_uri

LABEL_KEY = "label"
IMBALANCE_RATIO = 3.0
"""Warn when the most frequent label is more than this many times as frequent as the rarest."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "config.json",
)
"""What a tokenizer needs from a model folder (never the weights)."""


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "validate",
        help="check a JSONL dataset the way the trainer will (format, counts, tokens, problems by line)",
        description="Check a JSONL dataset with the trainer's own checks before any GPU is spent: format "
        "detection, counts, token statistics (exact with --model, else estimated), duplicates, missing "
        "assistant turns, role order, empty fields, over-long examples and label balance, each with its "
        "line number. Exits 1 when the data has errors.",
    )
    parser.add_argument(
        "data", help="the dataset: a local path, s3://bucket/key.jsonl, pvc://claim/path or hf://org/name"
    )
    parser.add_argument(
        "--method",
        choices=("sft", "dpo"),
        help="what it will train (default: dpo for prompt/chosen/rejected data, else sft)",
    )
    parser.add_argument(
        "--model",
        metavar="URI",
        help="model whose tokenizer and chat template count the tokens (local folder, s3://, hf://); "
        "without it token counts are estimated as characters/4",
    )
    parser.add_argument(
        "--format", choices=get_args(DatasetFormat), default="auto", help="record format (default: auto)"
    )
    parser.add_argument(
        "--max-seq-length",
        type=int,
        default=DatasetConfig.model_fields["max_seq_length"].default,
        help="longest allowed example in tokens, as dataset.maxSeqLength (default: %(default)s)",
    )
    parser.add_argument("--eval", metavar="URI", help="a separate evaluation file, checked too")
    parser.add_argument(
        "--eval-fraction", type=float, help="hold this fraction out for evaluation (as the trainer would)"
    )
    add_s3_option(parser)
    output.add_output_option(parser)
    parser.set_defaults(run=run)


@dataclass
class LabelBalance:
    """How often each value of the records' ``label`` field occurs."""

    counts: dict[str, int]
    missing_lines: list[int] = field(default_factory=list)
    rare_lines: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def label_balance(records: Sequence[tuple[int, Any]], key: str = LABEL_KEY) -> LabelBalance | None:
    """The label distribution, or None when no record has a ``label``. Pure.

    Warns when one label is more than :data:`IMBALANCE_RATIO` times as frequent as another (naming
    the first lines of the rarest), when every record has the same label, and when some records
    have a label and others none.
    """
    labelled = [(line, rec[key]) for line, rec in records if isinstance(rec, dict) and key in rec]
    if not labelled:
        return None
    counts = Counter(str(value).lower() if isinstance(value, bool) else str(value) for _, value in labelled)
    balance = LabelBalance(counts=dict(counts.most_common()))
    balance.missing_lines = [line for line, rec in records if isinstance(rec, dict) and key not in rec]
    if balance.missing_lines:
        shown = ", ".join(map(str, balance.missing_lines[:10]))
        balance.warnings.append(
            f"{len(balance.missing_lines)} records have no {key!r} while others do (lines {shown}"
            f"{', ...' if len(balance.missing_lines) > 10 else ''})"
        )
    if len(counts) == 1:
        only = next(iter(counts))
        balance.warnings.append(f"every labelled record has {key} {only}: nothing to contrast it with")
        return balance
    (top, most), (rare, least) = counts.most_common()[0], counts.most_common()[-1]
    if most > IMBALANCE_RATIO * least:
        balance.rare_lines = [line for line, value in labelled if _label(value) == rare][:10]
        balance.warnings.append(
            f"label imbalance: {key} {top} occurs {most} times, {rare} only {least} "
            f"({most / least:.1f}x; rare examples on lines {', '.join(map(str, balance.rare_lines))}); "
            "add examples of the rare label or downsample the frequent one"
        )
    return balance


def _label(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass
class Validation:
    report: DatasetReport
    labels: LabelBalance | None

    def to_dict(self) -> dict[str, Any]:
        return {**self.report.to_dict(), "labels": asdict(self.labels) if self.labels else None}


def validate(
    data: str,
    *,
    method: Method | None,
    fmt: DatasetFormat = "auto",
    max_seq_length: int | None = None,
    eval_uri: str | None = None,
    eval_fraction: float | None = None,
    endpoint: str | None = None,
    counter: TokenCounter | None = None,
) -> Validation:
    """Check ``data`` (and ``eval_uri``) with the trainer's checks; raises CliError if unreadable."""
    with _local_copy(data, endpoint) as local, _local_copy(eval_uri, endpoint) as local_eval:
        config = DatasetConfig(
            train=local or data,
            eval=local_eval,
            eval_fraction=eval_fraction,
            format=fmt,
            max_seq_length=max_seq_length or DatasetConfig.model_fields["max_seq_length"].default,
        )
        report = _check(config, method or "sft", counter)
        if method is None and report.format == "preference":
            report = _check(config, "dpo", counter)  # DPO data: check it as such
        report.source = data
        if report.eval is not None and eval_uri:
            report.eval.source = eval_uri
        labels = None
        if local is not None:
            labels = label_balance(parse_jsonl(Path(local).read_bytes(), DatasetReport(data, "sft")))
    return Validation(report, labels)


def _check(config: DatasetConfig, method: Method, counter: TokenCounter | None) -> DatasetReport:
    try:
        return check_dataset(config, method, token_counter=counter).report
    except DataSourceError as exc:
        raise CliError(str(exc), "check the path or URI") from None
    except StorageError as exc:
        raise storage_error(exc) from None


@contextmanager
def _local_copy(uri: str | None, endpoint: str | None) -> Iterator[str | None]:
    """A local path with the data of ``uri`` (downloaded once from S3); None for hf:// or no URI."""
    if uri is None or uri.startswith("hf://"):
        yield None
        return
    try:
        parsed = parse_uri(uri)
    except ValueError as exc:
        raise CliError(str(exc), "fix the URI") from None
    if parsed.scheme != "s3":
        yield str(parsed.local_path())
        return
    if not parsed.key or parsed.key.endswith("/"):
        raise CliError(f"{uri} names a folder", "name the JSONL object itself")
    suffix = ".jsonl.gz" if uri.endswith(".gz") else ".jsonl"
    with tempfile.TemporaryDirectory(prefix="ftjob-data-") as tmp:
        try:
            path = object_store(endpoint).download_file(uri, Path(tmp) / f"data{suffix}")
        except StorageError as exc:
            raise storage_error(exc) from None
        yield str(path)


def load_token_counter(model: str, endpoint: str | None) -> TokenCounter:
    """Exact token counts with ``model``'s tokenizer and chat template (needs transformers)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CliError(
            "exact token counts need the transformers package",
            "install finetune-operator[trainer], or leave out --model for an estimate",
        ) from None
    try:
        parsed = parse_uri(model)
    except ValueError as exc:
        raise CliError(str(exc), "fix --model") from None
    try:
        if parsed.scheme == "hf":
            return make_token_counter(AutoTokenizer.from_pretrained(parsed.repo_id, revision=parsed.revision))
        if parsed.scheme != "s3":
            return make_token_counter(AutoTokenizer.from_pretrained(str(parsed.local_path())))
        with tempfile.TemporaryDirectory(prefix="ftjob-tokenizer-") as tmp:
            store = object_store(endpoint)
            prefix = model if model.endswith("/") else model + "/"
            try:
                for uri in store.list_keys(prefix):
                    name = uri[len(prefix) :]
                    if name in TOKENIZER_FILES:
                        store.download_file(uri, Path(tmp) / name)
            except StorageError as exc:
                raise storage_error(exc) from None
            return make_token_counter(AutoTokenizer.from_pretrained(tmp))
    except (OSError, ValueError) as exc:
        raise CliError(
            f"cannot load the tokenizer of {model}: {exc}", "check --model (a folder with tokenizer.json)"
        ) from None


def render(result: Validation) -> str:
    """The trainer's summary, then the label balance (where the data has labels)."""
    text: str = summarize(result.report)
    labels = result.labels
    if labels is not None:
        counts = ", ".join(f"{k} {v}" for k, v in labels.counts.items())
        text += f"\n  labels ({LABEL_KEY}): {counts}"
        text += "".join(f"\n  warning: {w}" for w in labels.warnings)
    return text


def run(args: argparse.Namespace) -> int:
    counter = load_token_counter(args.model, args.s3_endpoint) if args.model else None
    result = validate(
        args.data,
        method=args.method,
        fmt=args.format,
        max_seq_length=args.max_seq_length,
        eval_uri=args.eval,
        eval_fraction=args.eval_fraction,
        endpoint=args.s3_endpoint,
        counter=counter,
    )
    report = result.report
    print(render(result) if args.output == "table" else output.dump(result.to_dict(), args.output))
    if report.ok:
        return 0
    errors = report.n_errors + (report.eval.n_errors if report.eval else 0)
    sys.stdout.flush()
    raise CliError(
        f"{args.data} is not valid for {report.method}: {errors} error{'s' if errors != 1 else ''}",
        "fix the listed lines (numbered from 1, blank lines included) and run ftjob validate again",
    )
