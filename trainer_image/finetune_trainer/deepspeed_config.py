"""Render the DeepSpeed config from the run config's ``distributed`` section.

Pure: a dict in, a dict out, no deepspeed import. Sizes that depend on the model or the trainer
arguments are ``"auto"``: the Hugging Face integration fills them in from the model's hidden size
and the TrainingArguments, so there is one source for batch size, accumulation and clipping.
"""

from __future__ import annotations

from typing import Any, Literal

from finetune_trainer.runconfig import DistributedConfig

MixedPrecision = Literal["bf16", "fp16", "no"]


def deepspeed_config(
    dist: DistributedConfig, *, mixed_precision: MixedPrecision, on_gpu: bool
) -> dict[str, Any] | None:
    """The DeepSpeed config for ``dist``, or ``None`` for stage 0 (plain data parallel, no DeepSpeed).

    ``mixed_precision`` is what the loader chose; on CPU it is ``"no"`` because DeepSpeed refuses
    bf16 there (see :mod:`finetune_trainer.loader`). Offloaded states live in pinned host memory on
    a GPU machine (faster copies); on CPU there is nothing to pin. ``offload: all`` below stage 3
    offloads the optimizer only: parameters are partitioned (and so offloadable) in stage 3 alone.
    """
    if dist.zero_stage == 0:
        return None
    zero: dict[str, Any] = {
        "stage": dist.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if dist.offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if dist.zero_stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                # save_model() gathers the (small) adapter from all ranks into one safetensors file.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
        if dist.offload == "all":
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config: dict[str, Any] = {
        "zero_optimization": zero,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 1_000_000,  # the trainer's own logging reports progress
        "wall_clock_breakdown": False,
    }
    if "offload_optimizer" in zero:
        # DeepSpeed refuses a torch optimizer with an offloaded optimizer state (too slow); naming one
        # here makes it use its fused CPU Adam. "auto" takes the values from the TrainingArguments.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    return config
