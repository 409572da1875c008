"""When a resume may skip the dataset check (stage.fingerprint_covers_data, stage.validated_before),
and that the bytes hashed for the decision are the bytes validated (data.read_file, file_sha256)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.checkpoints import Marker, fingerprint, fingerprint_sha256
from finetune_trainer.data import DataSourceError, check_dataset, file_sha256, read_file, read_records
from finetune_trainer.data_checks import DatasetReport
from finetune_trainer.runconfig import DatasetConfig
from finetune_trainer.stage import fingerprint_covers_data, validated_before
from tests.support.builders import run_config as config

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "data"


def marker(facts: dict[str, Any], sha: str | None = None) -> Marker:
    return Marker(
        step=10,
        files=[],
        fingerprint=facts,
        fingerprint_sha256=fingerprint_sha256(facts) if sha is None else sha,
        time="2025-01-01T00:00:00Z",
    )


@pytest.mark.parametrize(
    ("dataset", "covered"),
    [
        ({"train": "s3://data/train.jsonl"}, True),
        ({"train": "s3://data/train.jsonl.gz"}, True),
        ({"train": "pvc://claim/train.jsonl"}, True),
        ({"train": "/data/train.jsonl"}, True),
        ({"train": "s3://data/train.jsonl", "eval_fraction": 0.1}, True),  # split from train bytes + seed
        ({"train": "s3://data/train.jsonl", "eval": "s3://data/eval.jsonl"}, False),  # eval bytes not hashed
        ({"train": "hf://org/chat"}, False),  # hashed from its rows: as dear as the check
        ({"train": "hf://org/chat@v2"}, False),
    ],
)
def test_fingerprint_covers_data(dataset: dict[str, Any], covered: bool) -> None:
    assert fingerprint_covers_data(DatasetConfig.model_validate(dataset)) is covered


@pytest.mark.parametrize(
    ("changes", "world_size", "sha", "same"),
    [
        ({}, 8, "aaa", True),
        (
            {"job": {"attempt": 3}, "checkpoints": {"resume_from": "s3://ckpt/ns/j/step-000000010/"}},
            8,
            "aaa",
            True,
        ),
        ({}, 8, "bbb", False),  # other bytes at the same URI
        ({"hyperparameters": {"learning_rate": 1e-3}}, 8, "aaa", False),  # a warning on resume: still checked
        ({"hyperparameters": {"seed": 7}}, 8, "aaa", False),  # another eval split
        ({"dataset": {"max_seq_length": 512}}, 8, "aaa", False),
        ({"model": {"uri": "s3://models/other/"}}, 8, "aaa", False),  # another tokenizer
        ({}, 4, "aaa", False),
    ],
)
def test_validated_before_needs_the_exact_fingerprint(
    changes: dict[str, Any], world_size: int, sha: str, same: bool
) -> None:
    saved = marker(fingerprint(config(), world_size=8, data_sha256="aaa"))
    current = fingerprint(config(**changes), world_size=world_size, data_sha256=sha)
    assert validated_before(saved, current) is same


def test_validated_before_refuses_a_marker_whose_hash_does_not_match_its_facts() -> None:
    facts = fingerprint(config(), world_size=8, data_sha256="aaa")
    assert not validated_before(marker(facts, sha="0" * 64), facts)


def test_validated_before_refuses_a_marker_that_lacks_a_fact() -> None:
    current = fingerprint(config(), world_size=8, data_sha256="aaa")
    older = {k: v for k, v in current.items() if k != "dataset.train_sha256"}
    assert not validated_before(marker(older), current)


@pytest.mark.parametrize("gzipped", [False, True])
def test_read_file_hashes_like_the_check(tmp_path: Path, gzipped: bool) -> None:
    raw = (DATA / "chat_small.jsonl").read_bytes()
    path = tmp_path / ("train.jsonl.gz" if gzipped else "train.jsonl")
    path.write_bytes(gzip.compress(raw) if gzipped else raw)
    report = DatasetReport(source=str(path), method="sft")
    read_records(str(path), report)
    data = read_file(str(path))
    assert file_sha256(data) == report.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_file_refuses_a_hub_dataset() -> None:
    with pytest.raises(DataSourceError, match="Hub dataset, not a file"):
        read_file("hf://org/chat")


def test_check_dataset_validates_the_bytes_it_is_given(tmp_path: Path) -> None:
    """The bytes already read are validated, not read again (the URI here names no file at all)."""
    bad = (DATA / "invalid" / "chat_errors.jsonl").read_bytes()
    dataset = DatasetConfig(train=str(tmp_path / "gone.jsonl"))
    given = check_dataset(dataset, "sft", train_bytes=bad)
    dataset_on_disk = DatasetConfig(train=str(DATA / "invalid" / "chat_errors.jsonl"))
    read = check_dataset(dataset_on_disk, "sft")
    assert given.report.sha256 == read.report.sha256 == file_sha256(bad)
    assert [str(i) for i in given.report.issues] == [str(i) for i in read.report.issues]
    assert str(given.report.errors()[0]).startswith("line 2: messages[1].role is 'bot'")
