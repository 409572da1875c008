"""Everything the trainer knows about precision, quantisation (QLoRA) and DeepSpeed ZeRO, in one place.

The rules, each next to the code that applies it:

- GPU: compute in the configured dtype (bf16 by default) with mixed precision; CPU: fp32 throughout,
  because DeepSpeed refuses bf16 on CPU and fp32 is the one dtype every CPU kernel has.
- QLoRA: NF4 with double quantisation, compute dtype as above, and ``bnb_4bit_quant_storage`` equal
  to the compute dtype: ZeRO-3 partitions parameters by dtype, and 4-bit weights packed into uint8
  would be left out of (or break) the partitioning; stored as bf16 they are sharded like any weight.
- ZeRO-3: the DeepSpeed config must exist before ``from_pretrained`` so that transformers can
  partition a non-quantised model while loading (``zero.Init``); see :func:`training_arguments`.
  transformers 5 skips ``zero.Init`` for quantised models: each rank loads the whole 4-bit model
  and DeepSpeed partitions it afterwards.
- CPU + DeepSpeed: accelerate picks no backend without a GPU and counts one process while DeepSpeed
  counts all of them; :func:`init_distributed` pre-configures a gloo state (see there).
- Gradient checkpointing: non-reentrant, except PEFT + ZeRO-3, where TRL requires reentrant
  checkpointing (TRL issue 2514) and would otherwise override us with a warning.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from finetune_trainer.deepspeed_config import MixedPrecision, deepspeed_config
from finetune_trainer.runconfig import RunConfig

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, PreTrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """Where and in which dtype this run computes; decided once, from the config and the hardware."""

    device: Literal["cuda", "cpu"]
    dtype: Literal["bfloat16", "float16", "float32"]
    mixed_precision: MixedPrecision

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"


def plan_precision(config: RunConfig, *, cuda_available: bool) -> Precision:
    """``device: auto`` means the GPU when there is one. On CPU everything is fp32 (see module doc)."""
    device: Literal["cuda", "cpu"] = (
        "cuda" if config.device == "cuda" or (config.device == "auto" and cuda_available) else "cpu"
    )
    if device == "cpu":
        return Precision("cpu", "float32", "no")
    dtype = config.model.compute_dtype
    mixed: MixedPrecision = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}[dtype]  # type: ignore[assignment]
    return Precision("cuda", dtype, mixed)


def uses_deepspeed(config: RunConfig) -> bool:
    return config.distributed.zero_stage > 0


def init_distributed(config: RunConfig, precision: Precision) -> None:
    """Pre-configure accelerate's process state where its own detection goes wrong.

    With DeepSpeed and no GPU, accelerate chooses no backend and sees one process while DeepSpeed
    sees the whole world (``train_batch_size 4 != 4 * 1 * 2``). Creating ``PartialState`` with the
    gloo backend first, with ``ACCELERATE_USE_DEEPSPEED`` set so it is a DeepSpeed state, and letting
    the trainer reuse it (``accelerator_config.use_configured_state``, see :func:`training_arguments`)
    makes both agree. Must run before any TrainingArguments is created.
    """
    if precision.on_gpu or not uses_deepspeed(config):
        return
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo", timeout=timedelta(seconds=_ddp_timeout(config)))


def _ddp_timeout(config: RunConfig) -> int:
    # Collectives wait for the slowest node's checkpoint upload: allow at least the default 30 min.
    return max(1800, config.distributed.rdzv_timeout_seconds)


def training_arguments(config: RunConfig, precision: Precision) -> dict[str, Any]:
    """The precision/distribution part of the TrainingArguments (TRL's SFTConfig/DPOConfig)."""
    ds = deepspeed_config(
        config.distributed, mixed_precision=precision.mixed_precision, on_gpu=precision.on_gpu
    )
    peft_zero3 = ds is not None and config.distributed.zero_stage == 3
    args: dict[str, Any] = {
        "bf16": precision.mixed_precision == "bf16",
        "fp16": precision.mixed_precision == "fp16",
        "deepspeed": ds,
        "ddp_timeout": _ddp_timeout(config),
        "activation_checkpointing": config.hyperparameters.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": peft_zero3},
    }
    if not precision.on_gpu:
        args["ddp_backend"] = "gloo"
        if ds is None:
            args["use_cpu"] = True  # plain DDP over gloo
        else:
            args["accelerator_config"] = {"use_configured_state": True}  # see init_distributed
    return args


def quantization_config(config: RunConfig, precision: Precision) -> BitsAndBytesConfig | None:
    """NF4 (QLoRA) settings, or None for ``quantization: none``."""
    if config.model.quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, precision.dtype)
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        # = compute dtype so that ZeRO-3 can shard the packed 4-bit weights (see module doc).
        bnb_4bit_quant_storage=dtype,
    )


def load_model(
    config: RunConfig, model_dir: Path, precision: Precision, *, local_rank: int
) -> PreTrainedModel:
    """Load the base model for training. Call after the TrainingArguments exist (ZeRO-3, see above)."""
    import torch
    from transformers import AutoModelForCausalLM

    quant = quantization_config(config, precision)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, precision.dtype), "attn_implementation": "sdpa"}
    if quant is not None:
        kwargs["quantization_config"] = quant
        if precision.on_gpu and not uses_deepspeed(config):
            # Quantise straight onto this rank's GPU; DeepSpeed places the model itself.
            kwargs["device_map"] = {"": local_rank}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    # No KV cache in training: it is useless there, conflicts with checkpointing, and without one
    # transformers reads packed sequences from position_ids and keeps them from attending to each
    # other (tests/trainer/test_packing.py), which is what makes TRL's packing correct.
    model.config.use_cache = False
    log.info(
        "loaded %s: %.1fM parameters, weights in %s, computing in %s on %s",
        model_dir,
        model.num_parameters() / 1e6,
        "4-bit nf4" if getattr(model, "is_loaded_in_4bit", False) else precision.dtype,
        precision.dtype,
        precision.device,
    )
    return model


def lora_config(config: RunConfig) -> LoraConfig:
    from peft import LoraConfig

    adapter = config.adapter
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
