"""Direct preference optimisation: TRL's DPOTrainer with a LoRA/QLoRA adapter.

With an adapter, the reference policy is the base model with the adapter switched off
(``ref_model=None``): no second copy of the weights, and at step 1 the policy equals the
reference, so the loss starts at ln 2. Micro-batches hold pairs of similar length (both replies
of a pair are padded to the longer one, with the prompt), as SFT's do.
"""

from __future__ import annotations

from typing import Any

from trl.trainer.dpo_config import DPOConfig
from trl.trainer.dpo_trainer import DPOTrainer

from finetune_trainer.recipes import RecipeInputs
from finetune_trainer.recipes.sampling import EpochSeededGroups


def build_trainer(inputs: RecipeInputs) -> DPOTrainer:
    args = DPOConfig(
        **({"train_sampling_strategy": "group_by_length"} | inputs.arguments),
        beta=inputs.beta,
        max_length=inputs.max_length,
        precompute_ref_log_probs=False,
    )
    return _DPOTrainer(
        model=inputs.load_model(),
        ref_model=None,
        args=args,
        train_dataset=inputs.train_dataset,
        eval_dataset=inputs.eval_dataset,
        processing_class=inputs.tokenizer,
        peft_config=inputs.peft_config,
        callbacks=inputs.callbacks,
    )


class _DPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with length-grouped micro-batches (TRL's tokenised pairs have no ``input_ids``
    column for transformers' grouped sampler to measure, so the lengths are given)."""

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset: Any = self.train_dataset if train_dataset is None else train_dataset
        columns = ("prompt_ids", "chosen_ids", "rejected_ids")
        grouped = self.args.train_sampling_strategy == "group_by_length"
        if not grouped or not set(columns) <= set(getattr(dataset, "column_names", None) or ()):
            return super()._get_train_sampler(train_dataset)
        prompts, chosen, rejected = (dataset[column] for column in columns)
        lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
        return EpochSeededGroups.for_trainer(lengths, self.args)
