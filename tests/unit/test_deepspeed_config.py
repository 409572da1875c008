"""The DeepSpeed config rendered from the run config's distributed section."""

from __future__ import annotations

from typing import Any

import pytest

from finetune_trainer.deepspeed_config import deepspeed_config
from finetune_trainer.loader import Precision, plan_precision, quantization_config, training_arguments
from finetune_trainer.runconfig import DistributedConfig, RunConfig

pytestmark = pytest.mark.unit


def render(stage: int, offload: str = "none", precision: str = "bf16", on_gpu: bool = True) -> dict[str, Any]:
    config = deepspeed_config(
        DistributedConfig(zero_stage=stage, offload=offload),
        mixed_precision=precision,  # type: ignore[arg-type]
        on_gpu=on_gpu,
    )
    assert config is not None
    return config


def test_stage_zero_means_no_deepspeed() -> None:
    assert deepspeed_config(DistributedConfig(zero_stage=0), mixed_precision="bf16", on_gpu=True) is None


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sizes_come_from_the_training_arguments(stage: int) -> None:
    config = render(stage)
    assert config["zero_optimization"]["stage"] == stage
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert config[key] == "auto"
    assert "optimizer" not in config, "without offload the trainer's own AdamW is used"


def test_stage3_gathers_the_adapter_on_save_and_sizes_buckets_automatically() -> None:
    zero = render(3)["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["stage3_prefetch_bucket_size"] == "auto"
    assert zero["stage3_param_persistence_threshold"] == "auto"
    assert "stage3_prefetch_bucket_size" not in render(2)["zero_optimization"]


@pytest.mark.parametrize(
    ("stage", "offload", "optimizer_offloaded", "params_offloaded"),
    [
        (3, "none", False, False),
        (3, "optimizer", True, False),
        (3, "all", True, True),
        (2, "all", True, False),  # parameters are partitioned (and so offloadable) in stage 3 only
        (1, "optimizer", True, False),
    ],
)
def test_offload(stage: int, offload: str, optimizer_offloaded: bool, params_offloaded: bool) -> None:
    config = render(stage, offload)
    zero = config["zero_optimization"]
    assert ("offload_optimizer" in zero) is optimizer_offloaded
    assert ("offload_param" in zero) is params_offloaded
    if optimizer_offloaded:
        assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
        assert config["optimizer"]["type"] == "AdamW"
        assert set(config["optimizer"]["params"].values()) == {"auto"}


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16"), [("bf16", True, False), ("fp16", False, True), ("no", False, False)]
)
def test_precision_follows_the_loader(precision: str, bf16: bool, fp16: bool) -> None:
    config = render(3, precision=precision)
    assert config["bf16"] == {"enabled": bf16}
    assert config["fp16"] == {"enabled": fp16}


def test_nothing_to_pin_on_cpu() -> None:
    zero = render(3, "all", precision="no", on_gpu=False)["zero_optimization"]
    assert zero["offload_optimizer"]["pin_memory"] is False
    assert zero["offload_param"]["pin_memory"] is False


# -- the loader's precision rules, which decide what the DeepSpeed config gets -------------------------


def run_config(stage: int = 3, device: str = "auto", dtype: str = "bfloat16") -> RunConfig:
    return RunConfig.model_validate(
        {
            "job": {"namespace": "ns", "name": "j"},
            "method": "sft",
            "model": {"uri": "s3://m/", "compute_dtype": dtype},
            "dataset": {"train": "s3://d/t.jsonl"},
            "distributed": {"zero_stage": stage},
            "checkpoints": {"uri": "s3://c/ns/j/"},
            "output": {"uri": "s3://o/j/"},
            "device": device,
        }
    )


@pytest.mark.parametrize(
    ("device", "dtype", "cuda", "expected"),
    [
        ("auto", "bfloat16", True, Precision("cuda", "bfloat16", "bf16")),
        ("auto", "float16", True, Precision("cuda", "float16", "fp16")),
        ("auto", "bfloat16", False, Precision("cpu", "float32", "no")),  # DeepSpeed refuses bf16 on CPU
        ("cpu", "bfloat16", True, Precision("cpu", "float32", "no")),
        ("cuda", "float32", False, Precision("cuda", "float32", "no")),
    ],
)
def test_precision_plan(device: str, dtype: str, cuda: bool, expected: Precision) -> None:
    assert plan_precision(run_config(device=device, dtype=dtype), cuda_available=cuda) == expected


def test_cpu_deepspeed_reuses_a_gloo_state() -> None:
    args = training_arguments(run_config(3), Precision("cpu", "float32", "no"))
    assert args["accelerator_config"] == {"use_configured_state": True}
    assert args["ddp_backend"] == "gloo" and "use_cpu" not in args
    assert args["deepspeed"]["bf16"] == {"enabled": False} and args["bf16"] is False


def test_cpu_without_deepspeed_is_plain_ddp_over_gloo() -> None:
    args = training_arguments(run_config(0), Precision("cpu", "float32", "no"))
    assert args["deepspeed"] is None and args["use_cpu"] is True and args["ddp_backend"] == "gloo"
    assert args["activation_checkpointing_kwargs"] == {"use_reentrant": False}


def test_gpu_zero3_uses_bf16_and_reentrant_checkpointing_for_peft() -> None:
    args = training_arguments(run_config(3), Precision("cuda", "bfloat16", "bf16"))
    assert args["bf16"] is True and args["fp16"] is False
    assert args["deepspeed"]["bf16"] == {"enabled": True}
    assert "ddp_backend" not in args and "accelerator_config" not in args
    assert args["activation_checkpointing"] is True
    assert args["activation_checkpointing_kwargs"] == {"use_reentrant": True}  # TRL's rule for PEFT + ZeRO-3
    assert training_arguments(run_config(2), Precision("cuda", "bfloat16", "bf16"))[
        "activation_checkpointing_kwargs"
    ] == {"use_reentrant": False}


def test_qlora_stores_4bit_weights_in_the_compute_dtype() -> None:
    import torch

    quant = quantization_config(run_config(3), Precision("cuda", "bfloat16", "bf16"))
    assert quant is not None
    assert quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant is True
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert quant.bnb_4bit_quant_storage == torch.bfloat16  # so ZeRO-3 can shard the packed weights
    cpu = quantization_config(run_config(3), Precision("cpu", "float32", "no"))
    assert cpu is not None and cpu.bnb_4bit_quant_storage == torch.float32
