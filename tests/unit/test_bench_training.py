"""bench.training and its pure parts (bench.training_workload): parameter and FLOPs counts, the data
sampler, step plans, the token meter's counting, extrapolation, and the operator's rendering of the
``ours`` phases."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest

from bench import training
from bench import training_workload as workload
from bench.training import Phase
from bench.training_workload import SHAPES, Scale

pytestmark = pytest.mark.unit

LLAMA_8B, LLAMA_70B = SHAPES["llama-3.1-8b"], SHAPES["llama-3.1-70b"]


def total_params(shape: workload.Shape) -> int:
    """Frozen matmuls + the input embedding + the RMSNorm weights (2 per layer and a final one)."""
    return workload.frozen_params(shape) + shape.vocab * shape.hidden + (2 * shape.layers + 1) * shape.hidden


def test_the_shapes_have_the_published_parameter_counts() -> None:
    assert total_params(LLAMA_8B) == 8_030_261_248
    assert total_params(LLAMA_70B) == 70_553_706_496


def test_lora_on_all_linear_layers_of_llama_8b() -> None:
    assert workload.lora_params(LLAMA_8B, 16) == 41_943_040  # what PEFT reports for r=16, all-linear


def test_flops_per_token_follow_the_stated_formula() -> None:
    n_f, n_l = workload.frozen_params(LLAMA_8B), workload.lora_params(LLAMA_8B, 16)
    assert n_f == 7_504_658_432
    assert workload.flops_per_token(LLAMA_8B, 16, 0.0, "sft") == 4 * n_f + 6 * n_l
    attention = 32 * 4096 * 150.0  # L d c at a mean context of 150 tokens
    assert workload.flops_per_token(LLAMA_8B, 16, 150.0, "sft") == 4 * n_f + 6 * n_l + 12 * attention
    # DPO adds the reference forward pass (adapter off): 2 N_f + 4 L d c
    dpo = workload.flops_per_token(LLAMA_8B, 16, 150.0, "dpo")
    assert dpo == 6 * n_f + 6 * n_l + 16 * attention
    assert 30e9 < workload.flops_per_token(LLAMA_8B, 16, 0.0, "sft") < 30.5e9


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla T4", None),
    ],
)
def test_peak_flops_by_device_name(name: str, peak: float | None) -> None:
    assert workload.peak_tflops(name) == peak


def test_lengths_are_log_normal_around_the_median_within_bounds_and_repeatable() -> None:
    lengths = workload.sample_lengths(4000, 300, 0.6, 37, 1024, seed=7)
    assert lengths == workload.sample_lengths(4000, 300, 0.6, 37, 1024, seed=7)
    assert min(lengths) >= 37 and max(lengths) <= 1024
    assert 285 <= statistics.median(lengths) <= 315
    assert lengths != workload.sample_lengths(4000, 300, 0.6, 37, 1024, seed=8)


def test_text_is_filled_to_the_token_target() -> None:
    words = {" a": 1, " bb": 2, " ccc": 3}
    rng = random.Random(0)
    for target in (1, 5, 40):
        text = workload.fill_text(target, words, rng)
        assert sum(words[f" {w}"] for w in text.split()) == target


def test_steps_cover_the_warm_up_and_about_the_timed_tokens() -> None:
    scale = Scale(max_len=128, median=32, timed_tokens=12_000, warmup_micro=4)
    trl = workload.plan_steps(8, 1, 40.0, scale)  # 320 tokens a step
    assert (trl.warmup_steps, trl.timed_steps, trl.max_steps) == (4, 38, 42)
    ours = workload.plan_steps(16, 4, 40.0, scale)  # 2560 tokens a step
    assert (ours.warmup_steps, ours.timed_steps) == (1, 5)
    packed = workload.plan_steps(16, 4, 120.0, scale)
    assert packed.timed_steps == workload.MIN_TIMED_STEPS


def test_the_operator_renders_the_ours_phases(tmp_path: Path) -> None:
    data = tmp_path / "sft.jsonl"
    config = training.rendered_config(Phase("sft", "ours"), "tiny", "cpu", data, 7)
    hp = config.hyperparameters
    # size-aware defaults: 16k tokens per micro-batch (capped at 16 rows), 64 rows per step
    assert (hp.per_device_batch_size, hp.gradient_accumulation, hp.max_steps) == (16, 4, 7)
    assert config.dataset.train == str(data) and config.model.quantization == "none"
    mb1 = training.rendered_config(
        Phase("sft", "ours+packing+mb1", packing=True, micro_batch=1), "tiny", "cpu", data, 7
    )
    assert (mb1.hyperparameters.per_device_batch_size, mb1.hyperparameters.gradient_accumulation) == (1, 64)
    assert mb1.dataset.packing
    gpu = training.rendered_config(Phase("dpo", "ours"), "llama-3.1-8b", "cuda", data, 3)
    assert gpu.model.quantization == "nf4" and gpu.distributed.zero_stage == 0
    assert (gpu.hyperparameters.per_device_batch_size, gpu.hyperparameters.gradient_accumulation) == (8, 4)


def test_phases_that_cannot_run_on_a_cpu_say_why() -> None:
    by_name = {(p.method, p.name): p for p in training.PHASES}
    assert training.why_not(by_name[("sft", "trl-defaults")], "cpu") is None
    assert training.why_not(by_name[("sft", "ours+packing")], "cpu") is None
    assert "GPU only" in (training.why_not(by_name[("sft", "ours+liger")], "cpu") or "")
    assert "GPU only" in (training.why_not(by_name[("dpo", "ours+fa2")], "cpu") or "")


def test_the_meter_counts_real_tokens_padding_and_context_of_training_passes_only() -> None:
    import torch

    meter = training.Meter(warmup_steps=1, on_gpu=False)
    module = torch.nn.Module()  # in training mode
    padded = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    meter.hook(module, (), {"input_ids": padded, "attention_mask": mask})
    assert (meter.counters.tolist(), meter.all_tokens) == ([5, (1 + 2 + 3) + (1 + 2)], 8)
    # packed (padding-free): one row, position ids restart per example, no mask
    packed = torch.tensor([[5, 6, 7, 8, 9]])
    meter.hook(module, (), {"input_ids": packed, "position_ids": torch.tensor([[0, 1, 2, 0, 1]])})
    assert (meter.counters.tolist(), meter.all_tokens) == ([10, 18], 13)
    with torch.no_grad():  # DPO's reference pass
        meter.hook(module, (), {"input_ids": packed})
    module.eval()
    meter.hook(module, (), {"input_ids": packed})
    assert (meter.counters.tolist(), meter.all_tokens) == ([10, 18], 13)


def test_extrapolation_is_linear_in_the_layer_count() -> None:
    assert workload.extrapolate({4: 10.0, 8: 18.0}, 80) == pytest.approx(162.0)
    depths = {
        "4": {"sft": {"ours": {"tokens_per_s": 1 / 0.4, "peak_mib": 100.0}}},
        "8": {"sft": {"ours": {"tokens_per_s": 1 / 0.8, "peak_mib": 140.0}, "x": {"not_run": "why"}}},
    }
    out = workload.extrapolated(depths, 80)
    assert out["sft"]["ours"]["tokens_per_s"] == pytest.approx(1 / 8.0)
    assert out["sft"]["ours"]["peak_mib"] == pytest.approx(860.0)  # 60 MiB + 10 MiB per layer
    assert "x" not in out["sft"]


def test_labels_name_the_gpu_model_shape_layers_and_method() -> None:
    assert training._label(None, "tiny", [4], "both") == "cpu-tiny"
    assert training._label("NVIDIA H100 80GB HBM3", "llama-3.1-8b", [32], "sft") == "h100-llama-3.1-8b-sft"
    assert training._label("NVIDIA H200", "llama-3.1-70b", [4, 8], "both") == "h200-llama-3.1-70b-4l-8l"
