"""Packing is only correct if packed examples cannot attend to each other: check it on the model
exactly as the loader prepares it for training."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from finetune_trainer.loader import Precision, load_model
from finetune_trainer.runconfig import RunConfig

pytestmark = pytest.mark.trainer


def test_packed_sequences_are_isolated_by_their_position_ids(tiny_model: Path) -> None:
    import torch

    config = RunConfig.model_validate(
        {
            "job": {"namespace": "ns", "name": "j"},
            "method": "sft",
            "model": {"uri": str(tiny_model), "quantization": "none"},
            "dataset": {"train": "x.jsonl", "packing": True},
            "checkpoints": {"uri": "s3://c/ns/j/"},
            "output": {"uri": "s3://o/j/"},
        }
    )
    model = load_model(config, tiny_model, Precision("cpu", "float32", "no"), local_rank=0)
    first, second = torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[11, 12, 13, 14]])
    packed = torch.cat([first, second], dim=1)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])  # what TRL's padding-free collator builds
    with torch.no_grad():
        alone = model(input_ids=second).logits
        together = model(input_ids=packed, position_ids=positions).logits[:, 6:]
        leaking = model(input_ids=packed).logits[:, 6:]  # no position ids: one long sequence
    assert torch.allclose(together, alone, atol=1e-4)
    assert not torch.allclose(leaking, alone, atol=1e-2), "the check can tell a leak from isolation"


@pytest.mark.parametrize(("packing", "grouped"), [(False, True), (True, False)])
def test_micro_batches_are_grouped_by_length_unless_packed(
    tiny_model: Path, tmp_path: Path, packing: bool, grouped: bool
) -> None:
    import datasets

    from finetune_trainer import loader
    from finetune_trainer.recipes import RecipeInputs, sft
    from finetune_trainer.recipes.sft import EpochSeededGroups
    from finetune_trainer.stage import load_tokenizer
    from finetune_trainer.train import common_arguments

    config = RunConfig.model_validate(
        {
            "job": {"namespace": "ns", "name": "j"},
            "method": "sft",
            "model": {"uri": str(tiny_model), "quantization": "none"},
            "dataset": {"train": "x.jsonl", "packing": packing, "max_seq_length": 64},
            "hyperparameters": {"per_device_batch_size": 4, "max_steps": 1},
            "distributed": {"zero_stage": 0},
            "checkpoints": {"uri": "s3://c/ns/j/"},
            "output": {"uri": "s3://o/j/"},
            "device": "cpu",
        }
    )
    precision = loader.plan_precision(config, cuda_available=False)
    lengths = [3, 40, 5, 38, 4, 41, 6, 39] * 25
    inputs = RecipeInputs(
        load_model=lambda: loader.load_model(config, tiny_model, precision, local_rank=0),
        tokenizer=load_tokenizer(tiny_model),
        train_dataset=datasets.Dataset.from_dict({"input_ids": [[7] * n for n in lengths]}),
        eval_dataset=None,
        peft_config=loader.lora_config(config),
        arguments={
            **common_arguments(config, tmp_path, False),
            "activation_checkpointing": False,
            "use_cpu": True,  # one process: no process group, unlike the trainer's CPU ranks
            "report_to": [],
        },
        max_length=64,
        packing=packing,
        beta=0.1,
        callbacks=[],
    )
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        trainer = sft.build_trainer(inputs)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, EpochSeededGroups) is grouped
    if grouped:
        # Sorted within megabatches of 48: at most one mixed micro-batch of 4 per megabatch. In random
        # order only 1 in 8 would hold only short or only long examples.
        order = [lengths[i] for i in sampler]
        batches = [order[i : i + 4] for i in range(0, len(order), 4)]
        mixed = sum(min(b) < 10 < 30 < max(b) for b in batches)
        assert mixed <= len(batches) // 8, order
        # the same order on every rank and after a resume; another one the next epoch
        assert list(sampler) == list(trainer._get_train_sampler())
        sampler.set_epoch(1)
        assert [lengths[i] for i in sampler] != order
