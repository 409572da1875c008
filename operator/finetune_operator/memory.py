"""Per-GPU (or per-process, on CPU) memory of a LoRA/QLoRA training run, from the model's shape. Pure.

``ftjob plan`` uses this to say whether a FineTuneJob fits its GPUs before any GPU is spent, and
which is the smallest ``nodes x gpusPerNode`` layout that does. The estimate is the peak of one
training process, as the sum of these terms (bytes):

``base_weights``
    The frozen base. nf4: the decoder's linear layers take 0.5 byte per parameter plus the NF4 block
    constants (blocks of 64; with double quantisation one byte per block plus an fp32 per 256 blocks:
    :data:`NF4_BYTES_PER_PARAM`); embeddings, LM head and norms stay in the compute dtype. ``none``:
    every parameter in the compute dtype. ZeRO-3 shards it over the world size; offload ``all``
    moves it to host memory.
``zero3_gather``
    ZeRO-3 gathers one decoder layer's weights while the next is prefetched: two layers' weights.
``lora_params`` / ``lora_grads`` / ``optimizer``
    The adapter: ``r x (in + out)`` parameters per adapted linear layer (exact, from the shapes).
    Without DeepSpeed PEFT keeps them in fp32 (4 + 4 bytes of gradient + 8 of AdamW state); under
    DeepSpeed they are in the compute dtype with an fp32 master copy inside the optimizer state
    (2 + 2 + 12). ZeRO-1 shards the optimizer state, ZeRO-2 the gradients too, ZeRO-3 everything;
    offload ``optimizer`` moves the optimizer state to the host. Plain DDP (stage 0) over several
    ranks keeps a second copy of the gradients in its buckets.
``activations``
    With gradient checkpointing, every layer keeps its input (``layers x tokens x hidden``) and
    the layer being recomputed holds all its saved tensors plus the gradients flowing through it;
    without checkpointing every layer holds its saved tensors. The saved tensors of one Llama layer
    are counted tensor by tensor in :func:`layer_saved_bytes_per_token` (the derivation is there).
    DPO runs chosen and rejected through the model together: twice the sequences. The reference
    model is the base with the adapter switched off, run under ``no_grad`` before the policy
    forward, so it adds no weights and keeps no activations.
``logits``
    TRL 1.16 never materialises the ``tokens x vocab`` logits: its chunked log-prob kernel projects
    tiles of ``min(tokens, 4096) x min(vocab, 32768)``. On a GPU a Triton kernel works in the tile in
    place; on the CPU its torch fallback holds about eight tile-sized temporaries in the backward.
    Plus the fp32 gradient of the final hidden states.
``dequant``
    bitsandbytes dequantises one 4-bit weight to the compute dtype for each matmul: the largest
    linear layer, once.
``overhead``
    A fixed allowance (:data:`CUDA_OVERHEAD_BYTES` plus :data:`NCCL_OVERHEAD_BYTES` with more than
    one rank on a GPU; :data:`CPU_OVERHEAD_BYTES` on the CPU).

The activation and logits terms are the peak of two phases that do not overlap: the end of the
forward pass (logits and the LM head's backward) and the backward of the last decoder layer.

``device="cpu"`` describes a CPU run as the trainer does it: fp32 throughout (weights, activations,
adapter), no CUDA context, the torch fallback of TRL's logits kernel. Its estimate is checked against
measured peaks by ``tests/trainer/test_plan_accuracy.py``; the GPU constants are not measured yet
(see docs/cli.md, "How good is the estimate").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

GiB = 1024**3
MiB = 1024**2

NF4_BLOCK = 64
NF4_BYTES_PER_PARAM = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256)
"""4-bit values, one 8-bit absmax per block of 64, one fp32 constant per 256 blocks (double quant)."""

CUDA_OVERHEAD_BYTES = 1 * GiB
"""CUDA context, cuBLAS workspaces and caching-allocator slack of one training process (assumed)."""
NCCL_OVERHEAD_BYTES = GiB // 2
"""NCCL communicator buffers when there is more than one rank (assumed)."""
CPU_OVERHEAD_BYTES = 64 * MiB
"""Memory a CPU training process gains besides tensors (autograd graph, data loader, allocator)."""

TOKEN_TILE = 4096
VOCAB_TILE = 32768
"""TRL's chunked log-prob kernel: tokens per tile (TOKEN_CHUNK_SIZE) and vocab columns per tile."""
LOGIT_TILE_COPIES = {"cuda": 1.0, "cpu": 8.25}
"""Tile-sized buffers alive at the kernel's peak: the Triton kernel works in its one buffer; the
torch fallback's backward holds the buffer, y, z, log_p, p, grad, a bool mask (1/4) and two temporaries."""

LAYOUT_GPUS_PER_NODE = (1, 2, 4, 8)
MAX_NODES = 64

Device = Literal["cuda", "cpu"]
Quantization = Literal["nf4", "none"]
Offload = Literal["none", "optimizer", "all"]

# The linear layers of one Llama-style decoder layer, and which saved tensor feeds each.
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEAR_NAMES = ATTENTION + MLP
_INPUT_OF = {
    "q_proj": "attn_norm_out",
    "k_proj": "attn_norm_out",
    "v_proj": "attn_norm_out",
    "o_proj": "attn_out",
    "gate_proj": "mlp_norm_out",
    "up_proj": "mlp_norm_out",
    "down_proj": "mlp_product",
}


class ShapeError(ValueError):
    """The model's config.json lacks something the estimate needs."""


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-style decoder (Llama, Mistral, Qwen2 and friends) from its config.json."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """Read the fields of a Hugging Face ``config.json`` (``text_config`` for multimodal ones)."""
        text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
        assert isinstance(text, Mapping)
        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [key for key in required if not isinstance(text.get(key), int)]
        if missing:
            raise ShapeError(
                f"config.json has no integer {', '.join(missing)}: only Llama-style decoders "
                "(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size) "
                "can be planned"
            )
        heads = int(text["num_attention_heads"])
        return cls(
            hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]),
            num_hidden_layers=int(text["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            vocab_size=int(text["vocab_size"]),
            tie_word_embeddings=bool(
                config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
            ),
            head_dim=int(text["head_dim"]) if isinstance(text.get("head_dim"), int) else None,
        )

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_size

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_size

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``(in_features, out_features)`` of each linear layer of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_width),
            "k_proj": (h, self.kv_width),
            "v_proj": (h, self.kv_width),
            "o_proj": (self.q_width, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_linear_parameters(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    def linear_parameters(self) -> int:
        """Parameters in the decoder's linear layers (what nf4 quantises)."""
        return self.num_hidden_layers * self.layer_linear_parameters()

    def other_parameters(self) -> int:
        """Embeddings, LM head (unless tied) and norms: kept in the compute dtype even under nf4."""
        h = self.hidden_size
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.vocab_size * h + (2 * self.num_hidden_layers + 1) * h

    def parameters(self) -> int:
        return self.linear_parameters() + self.other_parameters()

    def lora_parameters(self, r: int, targets: Iterable[str]) -> int:
        """Exact adapter size: ``r x (in + out)`` for every adapted linear layer of every layer."""
        shapes = self.linear_shapes()
        return self.num_hidden_layers * sum(r * sum(shapes[name]) for name in resolve_targets(targets))


def resolve_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """The adapted linear layers: ``all-linear`` means all seven (the LM head is never adapted).

    Names may be given with a module path (``self_attn.q_proj``); unknown names are refused.
    """
    names = list(targets)
    if "all-linear" in names:
        return LINEAR_NAMES
    resolved = []
    for name in names:
        short = name.rsplit(".", 1)[-1]
        if short not in LINEAR_NAMES:
            raise ShapeError(
                f"adapter target {name!r} is not a linear layer of a Llama-style decoder; "
                f"use all-linear or some of {', '.join(LINEAR_NAMES)}"
            )
        resolved.append(short)
    return tuple(n for n in LINEAR_NAMES if n in resolved)


@dataclass(frozen=True)
class TrainingSetup:
    """What a FineTuneJob asks for, as far as memory is concerned."""

    method: Literal["sft", "dpo"] = "sft"
    quantization: Quantization = "nf4"
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("all-linear",)
    lora_dropout: float = 0.05
    seq_length: int = 2048
    micro_batch: int = 1
    gradient_checkpointing: bool = True
    zero_stage: int = 3
    offload: Offload = "none"
    world_size: int = 1
    device: Device = "cuda"

    @property
    def sequences(self) -> int:
        """Sequences in one forward pass: DPO puts chosen and rejected in one batch."""
        return self.micro_batch * (2 if self.method == "dpo" else 1)

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq_length

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage > 0


@dataclass(frozen=True)
class _Bytes:
    """Bytes per element of one run: the compute dtype, and the adapter's parameter/gradient/state."""

    compute: int
    lora_param: int
    lora_grad: int
    optimizer: int

    @classmethod
    def of(cls, setup: TrainingSetup) -> _Bytes:
        compute = 4 if setup.device == "cpu" else 2
        if setup.deepspeed:
            # DeepSpeed casts the adapter to the compute dtype and keeps fp32 master + Adam m, v.
            return cls(compute, compute, compute, 12)
        # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype) and torch's AdamW has m and v.
        return cls(compute, 4, 4, 8)


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one training process, by term (bytes), and what went to host memory."""

    terms: dict[str, int]
    host_offload: int
    shape: ModelShape
    setup: TrainingSetup
    lora_parameters: int
    peak_phase: Literal["layers", "head"] = "layers"
    """Where the peak is: the backward of the last decoder layer, or the LM head (logits)."""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def fits(self, capacity: int) -> bool:
        return self.total <= capacity


def layer_saved_bytes_per_token(shape: ModelShape, setup: TrainingSetup) -> float:
    """Bytes autograd keeps for one token while one Llama decoder layer awaits its backward.

    Counted from what each op saves for its backward (transformers 5 Llama, SDPA attention, PEFT
    LoRA), with frozen base weights. A frozen linear layer saves no activation (its input gradient
    needs only the weight), so what is saved is

    - RMSNorm: its fp32 input, twice (attention and MLP norm). On the GPU that is an fp32 copy of
      the bf16 residual stream; on the CPU the fp32 tensor itself (for the attention norm: the
      layer's input);
    - SDPA (flash kernel, also on the CPU): q and k after RoPE, v, its output and an fp32
      log-sum-exp per head. GQA runs natively (no repeated k/v) when there is no padding mask. The
      output is laid out so that o_proj's input is a view of it, not a copy;
    - SwiGLU MLP: the gate (SiLU's input), SiLU's output and the up projection (the product's
      factors);
    - each adapted layer's LoRA A saves its input: shared by the layers reading one tensor when
      dropout is 0 (the norm outputs, the attention output, the MLP product); with dropout every
      adapted layer has its own dropped-out copy plus the mask (a bool on the GPU's fused kernel,
      a float in the compute dtype on the CPU). LoRA B saves A's output (r values).

    ``tests/trainer/test_plan_accuracy.py`` checks this count against torch's saved-tensor hooks.
    """
    act = _Bytes.of(setup).compute
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv, heads = shape.q_width, shape.kv_width, shape.num_attention_heads
    saved = 2 * 4.0 * h  # the two norms' fp32 inputs
    saved += act * (q + 2 * kv + q) + 4 * heads  # SDPA: q, k, v, output, log-sum-exp
    saved += act * 3 * i  # gate, SiLU(gate), up
    inputs = {"attn_norm_out": h, "attn_out": q, "mlp_norm_out": h, "mlp_product": i}
    targets = resolve_targets(setup.lora_targets)
    if setup.lora_dropout > 0:
        mask = 1 if setup.device == "cuda" else act
        saved += sum((act + mask) * inputs[_INPUT_OF[name]] for name in targets)
    else:
        shared = {_INPUT_OF[name] for name in targets} - {"attn_out"}  # SDPA's output, counted above
        saved += sum(act * inputs[tensor] for tensor in shared)
    saved += len(targets) * setup.lora_r * act
    return saved


def _layer_backward_bytes_per_token(shape: ModelShape, setup: TrainingSetup) -> float:
    """Gradients alive while the MLP's backward runs: two intermediate-sized ones and the residual's."""
    return _Bytes.of(setup).compute * (2 * shape.intermediate_size + shape.hidden_size)


def _activation_and_logits(shape: ModelShape, setup: TrainingSetup) -> tuple[int, int]:
    """(activations, logits) at the larger of the two phases that do not overlap."""
    act = _Bytes.of(setup).compute
    h, tokens = shape.hidden_size, setup.tokens
    layer = layer_saved_bytes_per_token(shape, setup) * tokens
    working = _layer_backward_bytes_per_token(shape, setup) * tokens
    if setup.gradient_checkpointing:
        kept: float = shape.num_hidden_layers * act * h * tokens  # each layer's input
        if act == 4:
            layer -= 4 * h * tokens  # the attention norm saves the (fp32) checkpoint itself
        layers_phase = kept + layer + working
    else:
        kept = shape.num_hidden_layers * layer
        layers_phase = kept + working
    # Forward end: the final norm's fp32 input, its output, and the LM head's fp32 input gradient.
    head_tensors = (4 + act + 4) * h * tokens
    tile = min(tokens, TOKEN_TILE) * min(shape.vocab_size, VOCAB_TILE) * act
    logits = math.ceil(LOGIT_TILE_COPIES[setup.device] * tile)
    head_phase = kept + head_tensors + logits
    if head_phase > layers_phase:
        return math.ceil(kept + head_tensors), logits
    return math.ceil(layers_phase), 0


def estimate(shape: ModelShape, setup: TrainingSetup) -> Estimate:
    """The peak memory of one training process of ``setup`` on a model of ``shape``."""
    if setup.world_size < 1 or setup.micro_batch < 1 or setup.seq_length < 1 or setup.lora_r < 1:
        raise ValueError("world size, micro batch, sequence length and LoRA r must be at least 1")
    if setup.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, not {setup.zero_stage}")
    b = _Bytes.of(setup)
    world = setup.world_size
    stage = setup.zero_stage
    notes: list[str] = []
    host = 0

    if setup.quantization == "nf4":
        base = shape.linear_parameters() * NF4_BYTES_PER_PARAM + shape.other_parameters() * b.compute
        layer_weights = shape.layer_linear_parameters() * NF4_BYTES_PER_PARAM
    else:
        base = shape.parameters() * b.compute
        layer_weights = shape.layer_linear_parameters() * b.compute
    gather = 0.0
    if stage == 3:
        base /= world
        if world > 1:
            gather = 2 * layer_weights
    if stage == 3 and setup.offload == "all":
        host += math.ceil(base)
        base = 0.0

    lora = shape.lora_parameters(setup.lora_r, setup.lora_targets)
    params = lora * b.lora_param / (world if stage == 3 else 1)
    grads = lora * b.lora_grad / (world if stage >= 2 else 1)
    optimizer = lora * b.optimizer / (world if stage >= 1 else 1)
    if stage == 0 and world > 1:
        grads *= 2  # DDP's gradient buckets
    if setup.offload in ("optimizer", "all") and setup.deepspeed:
        host += math.ceil(optimizer)
        optimizer = 0.0
    if stage == 3 and setup.offload == "all":
        host += math.ceil(params)
        params = 0.0

    activations, logits = _activation_and_logits(shape, setup)
    peak_phase: Literal["layers", "head"] = "head" if logits else "layers"
    dequant = 0
    if setup.quantization == "nf4":
        dequant = max(a * o for a, o in shape.linear_shapes().values()) * b.compute
    if setup.device == "cuda":
        overhead = CUDA_OVERHEAD_BYTES + (NCCL_OVERHEAD_BYTES if world > 1 else 0)
    else:
        overhead = CPU_OVERHEAD_BYTES
    if setup.method == "dpo":
        notes.append(
            "DPO: chosen and rejected share a batch (2x sequences); the reference is the base "
            "with the adapter off (no extra weights)"
        )
    if setup.quantization == "nf4" and stage == 3:
        notes.append("nf4 under ZeRO-3: every rank first loads the whole 4-bit model into host memory")
    terms = {
        "base_weights": math.ceil(base),
        "zero3_gather": math.ceil(gather),
        "lora_params": math.ceil(params),
        "lora_grads": math.ceil(grads),
        "optimizer": math.ceil(optimizer),
        "activations": math.ceil(activations),
        "logits": logits,
        "dequant": dequant,
        "overhead": overhead,
    }
    return Estimate(terms, host, shape, setup, lora, peak_phase, notes)


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int
    estimate: Estimate

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def layouts(max_nodes: int = MAX_NODES) -> list[tuple[int, int]]:
    """Candidate ``(nodes, gpus_per_node)`` from the smallest world up: one node of 1, 2, 4, 8 GPUs,
    then more nodes of 8 GPUs each."""
    single = [(1, g) for g in LAYOUT_GPUS_PER_NODE]
    return single + [(n, LAYOUT_GPUS_PER_NODE[-1]) for n in range(2, max_nodes + 1)]


def smallest_layout(
    shape: ModelShape, setup: TrainingSetup, capacity: int, max_nodes: int = MAX_NODES
) -> Layout | None:
    """The first layout (fewest GPUs) whose per-GPU estimate fits ``capacity`` bytes, or None."""
    for nodes, gpus in layouts(max_nodes):
        candidate = estimate(shape, replace(setup, world_size=nodes * gpus))
        if candidate.fits(capacity):
            return Layout(nodes, gpus, candidate)
    return None


def parse_size(text: str) -> int:
    """``80GiB``, ``80G``, ``141GB``, ``512MiB`` or a plain byte count, as bytes (G and GiB are 2^30)."""
    units = {"": 1, "k": 1024, "m": MiB, "g": GiB, "t": 1024 * GiB}
    raw = text.strip().lower().replace(" ", "")
    for suffix in ("ib", "b", "i"):
        if raw.endswith(suffix) and raw[: -len(suffix)][-1:].isalpha():
            raw = raw[: -len(suffix)]
            break
    number, unit = raw.rstrip("kmgt"), raw[len(raw.rstrip("kmgt")) :]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a memory size; write it like 80GiB or 512MiB") from None
    if unit not in units or value <= 0:
        raise ValueError(f"cannot read {text!r} as a memory size; write it like 80GiB or 512MiB")
    return int(value * units[unit])
