"""Checkpoint naming, retention and the resume compatibility rules (pure functions)."""

from __future__ import annotations

import pytest

from finetune_trainer.checkpoints import (
    CheckpointInfo,
    compare_fingerprints,
    fingerprint,
    fingerprint_sha256,
    parse_step,
    retention,
    step_dir,
)
from tests.support.builders import run_config as config

pytestmark = pytest.mark.unit


def test_step_folders_have_nine_digits_and_sort_in_step_order() -> None:
    assert step_dir(123) == "step-000000123"
    names = [step_dir(s) for s in (5, 40, 1000, 200)]
    assert sorted(names) == [step_dir(s) for s in (5, 40, 200, 1000)]


@pytest.mark.parametrize(
    ("uri", "step"),
    [
        ("s3://ckpt/ns/j/step-000000123/", 123),
        ("s3://ckpt/ns/j/step-000000123", 123),
        ("step-000000007/", 7),
        ("s3://ckpt/ns/j/step-123/", None),  # not nine digits
        ("s3://ckpt/ns/j/tensorboard/", None),
        ("s3://ckpt/ns/j/step-000000123/COMPLETE", None),
        ("s3://ckpt/ns/j/xstep-000000123/", None),
    ],
)
def test_parse_step(uri: str, step: int | None) -> None:
    assert parse_step(uri) == step


def info(step: int, complete: bool = True) -> CheckpointInfo:
    return CheckpointInfo(step, step_dir(step) + "/", complete)


@pytest.mark.parametrize(
    ("existing", "keep", "deleted"),
    [
        ([info(10), info(20), info(30)], 3, []),
        ([info(10), info(20), info(30), info(40)], 3, [10]),
        ([info(10), info(20), info(30)], 1, [10, 20]),
        # torn uploads older than the newest complete checkpoint go; a newer one may be in flight
        ([info(10), info(15, False), info(20), info(25, False)], 3, [15]),
        ([info(10, False), info(20, False)], 2, []),  # nothing complete: nothing is safe to delete
        ([info(30), info(10), info(20)], 2, [10]),  # listing order does not matter
    ],
)
def test_retention(existing: list[CheckpointInfo], keep: int, deleted: list[int]) -> None:
    assert [c.step for c in retention(existing, keep)] == deleted


def test_identical_configs_resume_silently() -> None:
    facts = fingerprint(config(), world_size=8, data_sha256="abc")
    verdict = compare_fingerprints(facts, dict(facts))
    assert verdict.errors == [] and verdict.warnings == []
    assert fingerprint_sha256(facts) == fingerprint_sha256(dict(reversed(list(facts.items()))))


@pytest.mark.parametrize(
    ("changes", "world_size", "error"),
    [
        (
            {"method": "dpo", "dataset": {"train": "s3://data/train.jsonl"}},
            8,
            "method changed from 'sft' to 'dpo'",
        ),
        ({"model": {"uri": "s3://models/other/"}}, 8, "model.uri changed"),
        ({"model": {"uri": "s3://models/llama/", "quantization": "none"}}, 8, "model.quantization changed"),
        ({"adapter": {"r": 32}}, 8, "adapter.r changed from 16 to 32"),
        ({"adapter": {"target_modules": ["q_proj"]}}, 8, "adapter.target_modules changed"),
        ({"distributed": {"zero_stage": 2}}, 8, "distributed.zero_stage changed from 3 to 2"),
        ({}, 16, "world_size changed from 8 to 16"),
    ],
)
def test_incompatible_changes_are_errors(changes: dict[str, object], world_size: int, error: str) -> None:
    saved = fingerprint(config(), world_size=8)
    verdict = compare_fingerprints(saved, fingerprint(config(**changes), world_size=world_size))
    assert any(error in e for e in verdict.errors), verdict


@pytest.mark.parametrize(
    ("changes", "warning"),
    [
        (
            {"hyperparameters": {"learning_rate": 1e-5}},
            "hyperparameters.learning_rate changed from 0.0002 to 1e-05",
        ),
        ({"hyperparameters": {"epochs": 3}}, "hyperparameters.epochs changed from 1.0 to 3.0"),
        ({"adapter": {"dropout": 0.1}}, "adapter.dropout changed from 0.05 to 0.1"),
        ({"adapter": {"alpha": 64}}, "adapter.alpha changed from 32 to 64"),
        (
            {"dataset": {"train": "s3://data/v2.jsonl"}},
            "dataset.train changed from 's3://data/train.jsonl' to 's3://data/v2.jsonl'",
        ),
        ({"checkpoints": {"uri": "s3://ckpt/ns/j/", "every_steps": 50}}, None),  # not in the fingerprint
    ],
)
def test_harmless_changes_are_warnings(changes: dict[str, object], warning: str | None) -> None:
    verdict = compare_fingerprints(
        fingerprint(config(), world_size=8), fingerprint(config(**changes), world_size=8)
    )
    assert verdict.errors == []
    assert verdict.warnings == ([warning] if warning else [])


def test_world_size_may_change_without_zero_sharding() -> None:
    saved = fingerprint(config(distributed={"zero_stage": 0}), world_size=8)
    verdict = compare_fingerprints(saved, fingerprint(config(distributed={"zero_stage": 0}), world_size=4))
    assert verdict.errors == [] and verdict.warnings == ["world_size changed from 8 to 4"]


def test_changed_data_is_a_warning() -> None:
    saved = fingerprint(config(), world_size=8, data_sha256="aaa")
    verdict = compare_fingerprints(saved, fingerprint(config(), world_size=8, data_sha256="bbb"))
    assert verdict.errors == [] and verdict.warnings == ["dataset.train_sha256 changed from 'aaa' to 'bbb'"]
