"""The memory estimator (finetune_operator.memory): hand-computed values, term by term."""

from __future__ import annotations

from dataclasses import replace

import pytest

from finetune_operator.memory import (
    CPU_OVERHEAD_BYTES,
    CUDA_OVERHEAD_BYTES,
    NCCL_OVERHEAD_BYTES,
    NF4_BYTES_PER_PARAM,
    GiB,
    ModelShape,
    ShapeError,
    TrainingSetup,
    estimate,
    layer_saved_bytes_per_token,
    layouts,
    parse_size,
    resolve_targets,
    smallest_layout,
)

pytestmark = pytest.mark.unit

LLAMA_70B = ModelShape(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
)
LLAMA_8B = ModelShape(4096, 14336, 32, 32, 8, 128256)
TINY = ModelShape(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
)


def test_70b_all_linear_r16_adapter_is_about_207m_parameters() -> None:
    # per layer r * (in + out): q 16*(8192+8192), k and v 16*(8192+1024), o like q,
    # gate, up and down 16*(8192+28672)
    per_layer = 16 * (16384 + 9216 + 9216 + 16384 + 3 * 36864)
    assert per_layer == 2_588_672
    assert LLAMA_70B.lora_parameters(16, ["all-linear"]) == 80 * per_layer == 207_093_760


def test_parameter_counts_match_the_published_sizes() -> None:
    assert LLAMA_8B.parameters() == 8_030_261_248  # Llama-3.1-8B
    assert round(LLAMA_70B.parameters() / 1e9, 2) == 70.55  # Llama-3.1-70B
    assert TINY.linear_parameters() == 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)
    assert TINY.other_parameters() == 2 * 100 * 64 + 5 * 64
    tied = replace(TINY, tie_word_embeddings=True)
    assert tied.other_parameters() == 100 * 64 + 5 * 64


def test_lora_targets_by_name_and_path() -> None:
    assert resolve_targets(["all-linear"]) == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    assert resolve_targets(["v_proj", "self_attn.q_proj"]) == ("q_proj", "v_proj")
    assert TINY.lora_parameters(4, ["q_proj", "v_proj"]) == 2 * (4 * 128 + 4 * 96)
    with pytest.raises(ShapeError, match="'lm_head' is not a linear layer"):
        resolve_targets(["lm_head"])


def test_shape_from_config_json() -> None:
    config = {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    }
    assert ModelShape.from_config(config) == LLAMA_8B
    no_gqa = ModelShape.from_config({**config, "num_key_value_heads": None})
    assert no_gqa.num_key_value_heads == 32
    assert ModelShape.from_config({**config, "head_dim": 256}).q_width == 32 * 256
    assert ModelShape.from_config({"text_config": config, "tie_word_embeddings": True}).tie_word_embeddings
    with pytest.raises(ShapeError, match="no integer intermediate_size, vocab_size"):
        ModelShape.from_config({"hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1})


def test_cpu_lora_estimate_term_by_term() -> None:
    setup = TrainingSetup(
        quantization="none",
        lora_r=4,
        lora_dropout=0.0,
        seq_length=10,
        micro_batch=1,
        zero_stage=0,
        device="cpu",
    )
    # One layer, per token (fp32): two norm inputs 2*4*64, SDPA q,k,v,out 4*(64+32+32+64) + lse 4*4,
    # MLP 4*3*128, LoRA inputs (attention norm out 64, MLP norm out 64, product 128; o_proj reads
    # SDPA's output) 4*256, LoRA A outputs 7*4*4.
    per_token = 512 + 768 + 16 + 1536 + 1024 + 112
    assert layer_saved_bytes_per_token(TINY, setup) == per_token
    tokens = 10
    recomputed = per_token * tokens - 4 * 64 * tokens  # the attention norm's input is the checkpoint
    working = 4 * (2 * 128 + 64) * tokens
    kept = 2 * 4 * 64 * tokens
    activations = kept + recomputed + working
    head = kept + (4 + 4 + 4) * 64 * tokens + int(8.25 * 10 * 100 * 4)
    assert head < activations  # so the peak is in the layers' backward, no logits term
    result = estimate(TINY, setup)
    assert result.terms == {
        "base_weights": 4 * (73728 + 13120),
        "zero3_gather": 0,
        "lora_params": 4 * 8192,
        "lora_grads": 4 * 8192,
        "optimizer": 8 * 8192,
        "activations": activations,
        "logits": 0,
        "dequant": 0,
        "overhead": CPU_OVERHEAD_BYTES,
    }
    assert result.peak_phase == "layers"
    assert result.total == sum(result.terms.values())


def test_logits_phase_wins_with_a_large_vocabulary() -> None:
    shape = replace(TINY, vocab_size=50_000)
    setup = TrainingSetup(quantization="none", seq_length=10, zero_stage=0, device="cpu")
    result = estimate(shape, setup)
    assert result.peak_phase == "head"
    assert result.terms["logits"] == int(8.25 * 10 * 32768 * 4)  # one tile is at most 32768 columns
    gpu = estimate(shape, replace(setup, device="cuda"))
    assert gpu.terms["logits"] == 10 * 32768 * 2  # the Triton kernel works in its one bf16 tile


def test_dropout_keeps_a_copy_and_a_mask_per_adapted_layer() -> None:
    base = TrainingSetup(lora_targets=("q_proj", "k_proj"), lora_r=1, device="cuda")
    without = layer_saved_bytes_per_token(TINY, replace(base, lora_dropout=0.0))
    with_dropout = layer_saved_bytes_per_token(TINY, replace(base, lora_dropout=0.1))
    # GPU: the shared norm output (2 bytes) becomes one copy per layer (2 bytes) + a bool mask each
    assert with_dropout - without == 2 * (2 + 1) * 64 - 2 * 64
    cpu = replace(base, device="cpu")
    cpu_delta = layer_saved_bytes_per_token(
        TINY, replace(cpu, lora_dropout=0.1)
    ) - layer_saved_bytes_per_token(TINY, replace(cpu, lora_dropout=0.0))
    assert cpu_delta == 2 * (4 + 4) * 64 - 4 * 64  # the CPU's mask is an fp32 tensor


def test_qlora_70b_on_one_h100() -> None:
    setup = TrainingSetup(seq_length=4096)
    result = estimate(LLAMA_70B, setup)
    linear = 80 * (8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672)
    assert result.terms["base_weights"] == pytest.approx(
        linear * NF4_BYTES_PER_PARAM + (2 * 128256 * 8192 + 161 * 8192) * 2, abs=1
    )
    assert NF4_BYTES_PER_PARAM == 0.5 + 1 / 64 + 4 / (64 * 256)
    lora = 207_093_760
    # DeepSpeed ZeRO-3 on one rank: bf16 adapter and gradient, fp32 master + Adam (12 bytes), unsharded
    assert (result.terms["lora_params"], result.terms["lora_grads"], result.terms["optimizer"]) == (
        2 * lora,
        2 * lora,
        12 * lora,
    )
    assert result.terms["dequant"] == 8192 * 28672 * 2
    assert result.terms["overhead"] == CUDA_OVERHEAD_BYTES
    assert 40 * GiB < result.total < 55 * GiB
    assert result.fits(80 * GiB) and not result.fits(40 * GiB)


def test_zero_stages_shard_what_they_promise() -> None:
    lora = LLAMA_70B.lora_parameters(16, ["all-linear"])
    one = estimate(LLAMA_70B, TrainingSetup(world_size=1))
    cases = {0: (4, 8, 8), 1: (2, 2, 12 / 8), 2: (2, 2 / 8, 12 / 8), 3: (2 / 8, 2 / 8, 12 / 8)}
    for stage, (param, grad, opt) in cases.items():
        terms = estimate(LLAMA_70B, TrainingSetup(world_size=8, zero_stage=stage)).terms
        expected_grad = grad if stage else 2 * 4  # DDP keeps its buckets besides the gradients
        assert terms["lora_params"] == pytest.approx(param * lora, abs=1), stage
        assert terms["lora_grads"] == pytest.approx(expected_grad * lora, abs=1), stage
        assert terms["optimizer"] == pytest.approx(opt * lora, abs=1), stage
        sharded = stage == 3
        assert terms["base_weights"] == pytest.approx(
            one.terms["base_weights"] / (8 if sharded else 1), abs=1
        )
        layer = LLAMA_70B.layer_linear_parameters() * NF4_BYTES_PER_PARAM
        assert terms["zero3_gather"] == (pytest.approx(2 * layer, abs=1) if sharded else 0)
        assert terms["overhead"] == CUDA_OVERHEAD_BYTES + NCCL_OVERHEAD_BYTES


def test_offload_moves_state_to_host_memory() -> None:
    setup = TrainingSetup(world_size=16)
    plain = estimate(LLAMA_70B, setup)
    optimizer = estimate(LLAMA_70B, replace(setup, offload="optimizer"))
    everything = estimate(LLAMA_70B, replace(setup, offload="all"))
    assert optimizer.terms["optimizer"] == 0 and optimizer.host_offload == plain.terms["optimizer"]
    assert everything.terms["base_weights"] == everything.terms["lora_params"] == 0
    assert (
        everything.host_offload
        == plain.terms["base_weights"] + plain.terms["optimizer"] + plain.terms["lora_params"]
    )
    assert everything.terms["zero3_gather"] == plain.terms["zero3_gather"]  # layers still come to the GPU


def test_dpo_runs_twice_the_sequences() -> None:
    sft = TrainingSetup(seq_length=2048, micro_batch=2)
    dpo = replace(sft, method="dpo")
    assert dpo.tokens == 2 * sft.tokens == 8192
    assert estimate(LLAMA_8B, dpo).terms["activations"] == pytest.approx(
        2 * estimate(LLAMA_8B, sft).terms["activations"], rel=1e-9
    )
    assert estimate(LLAMA_8B, dpo).terms["base_weights"] == estimate(LLAMA_8B, sft).terms["base_weights"]


def test_no_checkpointing_keeps_every_layer() -> None:
    on = TrainingSetup(seq_length=1024)
    off = replace(on, gradient_checkpointing=False)
    per_layer = layer_saved_bytes_per_token(LLAMA_8B, on) * 1024
    assert (
        estimate(LLAMA_8B, off).terms["activations"]
        > 32 * per_layer
        > estimate(LLAMA_8B, on).terms["activations"]
    )


def test_smallest_layout_is_the_first_that_fits() -> None:
    assert layouts(3) == [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (3, 8)]
    bf16 = TrainingSetup(quantization="none", seq_length=4096, world_size=16)
    layout = smallest_layout(LLAMA_70B, bf16, 80 * GiB)
    assert layout is not None
    # 131 GiB of bf16 weights: half of them and the rest fit on an 80 GiB GPU, all of them do not
    assert (layout.nodes, layout.gpus_per_node) == (1, 2)
    assert layout.estimate.fits(80 * GiB) and layout.estimate.setup.world_size == 2
    assert not estimate(LLAMA_70B, replace(bf16, world_size=1)).fits(80 * GiB)
    assert smallest_layout(LLAMA_70B, replace(bf16, zero_stage=0), 80 * GiB) is None  # nothing shards


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80GiB", 80 * GiB),
        ("80G", 80 * GiB),
        ("141GB", 141 * GiB),
        ("512Mi", 512 * 2**20),
        ("4Gi", 4 * GiB),
        ("1024", 1024),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "eighty", "80XB", "-1G"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="80GiB"):
        parse_size(text)


def test_estimate_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        estimate(TINY, TrainingSetup(world_size=0))
