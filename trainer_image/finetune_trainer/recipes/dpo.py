"""Direct preference optimisation: TRL's DPOTrainer with a LoRA/QLoRA adapter.

With an adapter, the reference policy is the base model with the adapter switched off
(``ref_model=None``): no second copy of the weights, and at step 1 the policy equals the
reference, so the loss starts at ln 2.
"""

from __future__ import annotations

from trl.trainer.dpo_config import DPOConfig
from trl.trainer.dpo_trainer import DPOTrainer

from finetune_trainer.recipes import RecipeInputs


def build_trainer(inputs: RecipeInputs) -> DPOTrainer:
    args = DPOConfig(
        **inputs.arguments,
        beta=inputs.beta,
        max_length=inputs.max_length,
        precompute_ref_log_probs=False,
    )
    return DPOTrainer(
        model=inputs.load_model(),
        ref_model=None,
        args=args,
        train_dataset=inputs.train_dataset,
        eval_dataset=inputs.eval_dataset,
        processing_class=inputs.tokenizer,
        peft_config=inputs.peft_config,
        callbacks=inputs.callbacks,
    )
