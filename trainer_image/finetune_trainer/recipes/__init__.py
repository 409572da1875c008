"""One recipe per method. Each composes a TRL trainer from the same inputs; recipes may repeat each
other rather than share a base class (torchtune's rule), so each reads top to bottom on its own.

A recipe module provides ``build_trainer(inputs: RecipeInputs) -> transformers.Trainer``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import TrainerCallback


@dataclass
class RecipeInputs:
    """Everything a recipe composes; built by :mod:`finetune_trainer.train`."""

    # Loads the base model (transformers.PreTrainedModel). Call it after the TrainingArguments
    # exist: their DeepSpeed config lets transformers partition the model while loading (ZeRO-3).
    load_model: Callable[[], Any]
    tokenizer: Any
    train_dataset: Any  # datasets.Dataset in TRL's format (see finetune_trainer.data_checks)
    eval_dataset: Any | None
    peft_config: Any  # peft.LoraConfig
    arguments: dict[str, Any]  # TrainingArguments fields shared by every method
    max_length: int
    packing: bool
    beta: float
    callbacks: list[TrainerCallback]


def recipe_for(method: str) -> ModuleType:
    """The recipe module of ``method`` (``sft`` or ``dpo``)."""
    if method == "sft":
        from finetune_trainer.recipes import sft

        return sft
    if method == "dpo":
        from finetune_trainer.recipes import dpo

        return dpo
    raise ValueError(f"unknown method {method!r}; expected sft or dpo")
