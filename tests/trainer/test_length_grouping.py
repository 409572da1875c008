"""Micro-batches of similar length (less padding), in an order a resumed run repeats exactly."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.runconfig import RunConfig

pytestmark = pytest.mark.trainer


def build(tiny_model: Path, tmp_path: Path, method: str, packing: bool, dataset: Any) -> Any:
    """The recipe's trainer for ``dataset`` (one process, CPU, no process group)."""
    from finetune_trainer import loader
    from finetune_trainer.recipes import RecipeInputs, recipe_for
    from finetune_trainer.stage import load_tokenizer
    from finetune_trainer.train import common_arguments

    config = RunConfig.model_validate(
        {
            "job": {"namespace": "ns", "name": "j"},
            "method": method,
            "model": {"uri": str(tiny_model), "quantization": "none"},
            "dataset": {"train": "x.jsonl", "packing": packing, "max_seq_length": 128},
            "hyperparameters": {"per_device_batch_size": 4, "max_steps": 1},
            "distributed": {"zero_stage": 0},
            "checkpoints": {"uri": "s3://c/ns/j/"},
            "output": {"uri": "s3://o/j/"},
            "device": "cpu",
        }
    )
    precision = loader.plan_precision(config, cuda_available=False)
    inputs = RecipeInputs(
        load_model=lambda: loader.load_model(config, tiny_model, precision, local_rank=0),
        tokenizer=load_tokenizer(tiny_model),
        train_dataset=dataset,
        eval_dataset=None,
        peft_config=loader.lora_config(config),
        arguments={
            **common_arguments(config, tmp_path, False),
            "activation_checkpointing": False,
            "use_cpu": True,  # one process: no process group, unlike the trainer's CPU ranks
            "report_to": [],
        },
        max_length=128,
        packing=packing,
        beta=0.1,
        callbacks=[],
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return recipe_for(method).build_trainer(inputs)


def assert_grouped(trainer: Any, lengths: list[int]) -> None:
    """Sorted within megabatches of 48: at most one mixed micro-batch of 4 per megabatch (in random
    order only 1 in 8 would hold only short or only long examples); the same order again (every rank,
    every resume), another one the next epoch."""
    from finetune_trainer.recipes.sampling import EpochSeededGroups

    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, EpochSeededGroups)
    order = [lengths[i] for i in sampler]
    batches = [order[i : i + 4] for i in range(0, len(order), 4)]
    middle = (min(lengths) + max(lengths)) / 2  # the lengths are short or long, nothing between
    mixed = sum(min(b) < middle < max(b) for b in batches)
    assert mixed <= len(batches) // 8, order
    assert list(sampler) == list(trainer._get_train_sampler())
    sampler.set_epoch(1)
    assert [lengths[i] for i in sampler] != order


LENGTHS = [3, 40, 5, 38, 4, 41, 6, 39] * 25


@pytest.mark.parametrize("packing", [False, True])
def test_sft_micro_batches_are_grouped_by_length_unless_packed(
    tiny_model: Path, tmp_path: Path, packing: bool
) -> None:
    import datasets

    from finetune_trainer.recipes.sampling import EpochSeededGroups

    dataset = datasets.Dataset.from_dict({"input_ids": [[7] * n for n in LENGTHS]})
    trainer = build(tiny_model, tmp_path, "sft", packing, dataset)
    if packing:  # packed rows have no padding to save
        assert not isinstance(trainer._get_train_sampler(), EpochSeededGroups)
    else:
        assert_grouped(trainer, LENGTHS)


def test_dpo_pairs_are_grouped_by_length(tiny_model: Path, tmp_path: Path) -> None:
    import datasets

    rows = [{"prompt": "a " * 2, "chosen": "b " * (n // 2), "rejected": "c " * (n - n // 2)} for n in LENGTHS]
    trainer = build(tiny_model, tmp_path, "dpo", False, datasets.Dataset.from_list(rows))
    data = trainer.train_dataset
    lengths = [
        len(p) + max(len(c), len(r))
        for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True)
    ]
    assert_grouped(trainer, lengths)
