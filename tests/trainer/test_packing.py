"""Packing is only correct if packed examples cannot attend to each other: check it on the model
exactly as the loader prepares it for training."""

from __future__ import annotations

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
