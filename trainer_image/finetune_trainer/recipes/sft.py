"""Supervised fine-tuning: TRL's SFTTrainer with a LoRA/QLoRA adapter.

Loss is on what the model should learn to say: the assistant turns of conversations (TRL's
``assistant_only_loss``, which needs ``{% generation %}`` markers in the chat template; TRL patches
known templates that lack them) and the completion of prompt/completion pairs (completion-only
loss, TRL's default for that format). Packing, when asked for, is TRL's best-fit-decreasing packing
with per-sequence position ids, which keeps packed examples from attending to each other; without
it, micro-batches are grouped by length.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers.trainer_pt_utils import LengthGroupedSampler
from trl.trainer.sft_config import SFTConfig
from trl.trainer.sft_trainer import SFTTrainer

from finetune_trainer.recipes import RecipeInputs
from finetune_trainer.recipes.sampling import EpochSeededGroups

log = logging.getLogger(__name__)


def assistant_only_loss_possible(tokenizer: Any) -> bool:
    """Whether TRL can mask everything but the assistant turns with this tokenizer's template."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return True
    try:
        return get_training_chat_template(tokenizer) is not None
    except Exception as exc:  # TRL knows a fixed list of templates and raises for the rest
        log.warning(
            "the chat template has no {%% generation %%} markers and TRL cannot add them (%s): "
            "training on whole conversations, not only on the assistant turns",
            exc,
        )
        return False


def build_trainer(inputs: RecipeInputs) -> SFTTrainer:
    conversational = "messages" in inputs.train_dataset.column_names
    # Without packing, micro-batches of examples of similar length (transformers' length-grouped
    # sampler: random megabatches, sorted within) pad far less than random ones: 2.1x the real tokens
    # per second on the CPU benchmark (docs/benchmarks.md, section 3). Packed rows have no padding.
    sampling = {"train_sampling_strategy": "random" if inputs.packing else "group_by_length"}
    args = SFTConfig(
        **(sampling | inputs.arguments),
        max_length=inputs.max_length,
        packing=inputs.packing,
        packing_strategy="bfd",
        assistant_only_loss=conversational and assistant_only_loss_possible(inputs.tokenizer),
        completion_only_loss=None,  # TRL: True for prompt/completion data, off otherwise
        dataset_num_proc=None,
    )
    return _SFTTrainer(
        model=inputs.load_model(),
        args=args,
        train_dataset=inputs.train_dataset,
        eval_dataset=inputs.eval_dataset,
        processing_class=inputs.tokenizer,
        peft_config=inputs.peft_config,
        callbacks=inputs.callbacks,
    )


class _SFTTrainer(SFTTrainer):
    """TRL's SFTTrainer whose length-grouped sampler resumes exactly (see :class:`.EpochSeededGroups`)."""

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            return EpochSeededGroups.for_trainer(sampler.lengths, self.args)
        return sampler
