"""The pure parts of bench.training: model shapes and their FLOPs, the synthetic data, step plans
and the per-layer extrapolation. No torch here: unit-tested on their own (tests/unit/test_bench_training.py).

The FLOPs per token are derived in bench.training's docstring.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Any

SIGMA = 0.6
SEED = 1234


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linear layers of one decoder layer: q, k, v, o, gate, up, down."""
        h, q, kv, i = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


SHAPES = {
    # CPU: twice as wide as the tests' tiny model and with twice the layers; a few minutes on 2 cores
    "tiny": Shape(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, vocab=512),
    "llama-3.1-8b": Shape(4096, 32, 32, 8, 14336, 128256),
    "llama-3.1-70b": Shape(8192, 80, 64, 8, 28672, 128256),
}

PEAK_TFLOPS = [  # dense bf16, by a substring of torch.cuda.get_device_name(); first match wins
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
]


@dataclass(frozen=True)
class Scale:
    """The workload per device: sequence lengths and how much each phase trains."""

    max_len: int  # dataset.maxSeqLength (and TRL's default max_length, 1024, on the GPU)
    median: int  # median tokens of an SFT example
    timed_tokens: int  # real tokens each phase trains after warm-up (at least MIN_TIMED_STEPS)
    warmup_micro: int  # micro-batches of warm-up (at least one optimizer step)

    @property
    def longest(self) -> int:
        """The longest example drawn: a margin below max_len, because text built to a token count
        can come out a token or two longer in the chat template, and longer examples fail the
        trainer's data checks (TRL would truncate them)."""
        return self.max_len - max(2, self.max_len // 64)


SCALES = {"cpu": Scale(128, 32, 12_000, 4), "cuda": Scale(1024, 300, 100_000, 4)}
MIN_TIMED_STEPS = 3
PACKED_FILL = 0.95  # share of a packed row that best-fit-decreasing fills (for planning only)


# ------------------------------------------------------------------------------------- FLOPs


def frozen_params(shape: Shape) -> int:
    """N_f: parameters of the frozen matmuls, every decoder linear layer and the LM head."""
    return shape.layers * sum(i * o for i, o in shape.linears()) + shape.hidden * shape.vocab


def lora_params(shape: Shape, r: int) -> int:
    """N_l: LoRA on all linear layers of the decoder (PEFT's all-linear leaves the LM head out)."""
    return shape.layers * sum(r * (i + o) for i, o in shape.linears())


def flops_per_token(shape: Shape, r: int, context: float, method: str) -> float:
    """Model FLOPs per real token of one training step (see the module docstring)."""
    n_f, n_l = frozen_params(shape), lora_params(shape, r)
    attention = shape.layers * shape.heads * shape.head_dim * context  # L d c
    total = 4 * n_f + 6 * n_l + 12 * attention
    if method == "dpo":
        total += 2 * n_f + 4 * attention  # the reference forward pass
    return float(total)


def peak_tflops(gpu_name: str) -> float | None:
    return next((peak for key, peak in PEAK_TFLOPS if key in gpu_name), None)


# -------------------------------------------------------------------------------------- data


def sample_lengths(n: int, median: float, sigma: float, low: int, high: int, seed: int) -> list[int]:
    """``n`` lengths, log-normal with this median and sigma, truncated (redrawn) to [low, high]."""
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < n:
        value = round(rng.lognormvariate(math.log(median), sigma))
        if low <= value <= high:
            out.append(value)
    return out


WORDS = (
    "the model learns to answer short questions about kubernetes pods nodes checkpoints and "
    "adapters , while the optimizer keeps its state ; a job restarts from the newest complete "
    "checkpoint . please summarise translate explain 0 1 2 3 4 5 6 7 8 9 42 100 step by step"
)


def fill_text(tokens: int, word_tokens: dict[str, int], rng: random.Random) -> str:
    """Words whose tokens add up to about ``tokens`` (byte-level BPE: a word with its leading
    space tokenises the same wherever it stands)."""
    words: list[str] = []
    used = 0
    choices = sorted(word_tokens)
    smallest = min(word_tokens.values())
    while used + smallest <= tokens:
        word = rng.choice(choices)
        if used + word_tokens[word] <= tokens:
            words.append(word)
            used += word_tokens[word]
    return "".join(words).strip() or "ok"


@dataclass(frozen=True)
class Template:
    """Tokens the chat template adds around the contents (measured with the real tokenizer)."""

    sft: int  # user + assistant turn
    prompt: int  # the user turn of a DPO prompt, with the generation prompt
    reply: int  # an assistant reply


def sft_examples(n: int, scale: Scale, template: Template, words: dict[str, int]) -> list[dict[str, Any]]:
    rng = random.Random(SEED)
    lengths = sample_lengths(n, scale.median, SIGMA, max(8, scale.median // 8), scale.longest, SEED)
    out = []
    for total in lengths:
        content = max(2, total - template.sft)
        user = max(1, round(content * rng.uniform(0.2, 0.5)))
        out.append(
            {
                "messages": [
                    {"role": "user", "content": fill_text(user, words, rng)},
                    {"role": "assistant", "content": fill_text(content - user, words, rng)},
                ]
            }
        )
    return out


def dpo_examples(n: int, scale: Scale, template: Template, words: dict[str, int]) -> list[dict[str, Any]]:
    rng = random.Random(SEED + 1)
    half, low = scale.median // 2, max(4, scale.median // 16)
    draws = iter(sample_lengths(6 * n, half, SIGMA, low, scale.longest, SEED + 1))
    out: list[dict[str, Any]] = []
    while len(out) < n:
        prompt, chosen, rejected = next(draws), next(draws), next(draws)
        if prompt + max(chosen, rejected) > scale.longest:
            continue
        out.append(
            {
                "prompt": [{"role": "user", "content": fill_text(prompt - template.prompt, words, rng)}],
                "chosen": [{"role": "assistant", "content": fill_text(chosen - template.reply, words, rng)}],
                "rejected": [
                    {"role": "assistant", "content": fill_text(rejected - template.reply, words, rng)}
                ],
            }
        )
    return out


# ------------------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Plan:
    micro_batch: int
    accumulation: int
    warmup_steps: int
    timed_steps: int

    @property
    def max_steps(self) -> int:
        return self.warmup_steps + self.timed_steps


def plan_steps(micro_batch: int, accumulation: int, tokens_per_row: float, scale: Scale) -> Plan:
    """Warm-up of at least ``scale.warmup_micro`` micro-batches (and one optimizer step: it creates
    the optimizer state), then enough steps for about ``scale.timed_tokens`` real tokens (at least
    :data:`MIN_TIMED_STEPS`)."""
    warmup = max(1, math.ceil(scale.warmup_micro / accumulation))
    per_step = micro_batch * accumulation * tokens_per_row
    timed = max(MIN_TIMED_STEPS, math.ceil(scale.timed_tokens / per_step))
    return Plan(micro_batch, accumulation, warmup, timed)


def row_tokens(scale: Scale, method: str) -> float:
    """Mean real tokens of a row of a batch, for planning: an SFT example (log-normal mean = median
    x exp(sigma^2 / 2)), or a DPO pair, chosen and rejected, each about as long as an SFT example."""
    mean = scale.median * math.exp(SIGMA**2 / 2)
    return 2 * mean if method == "dpo" else mean


def extrapolate(points: dict[int, float], target: int) -> float:
    """Least-squares line through (layers, value), read at ``target`` layers."""
    xs, ys = list(points), list(points.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my + slope * (target - mx)


def extrapolated(depths: dict[str, dict[str, Any]], full: int) -> dict[str, Any]:
    """Per method and phase: seconds per token and peak memory, linear in the layer count."""
    out: dict[str, Any] = {}
    for method in ("sft", "dpo"):
        names = {n for d in depths.values() for n, p in d.get(method, {}).items() if "tokens_per_s" in p}
        for name in sorted(names):
            got = {
                int(k): d[method][name]
                for k, d in depths.items()
                if "tokens_per_s" in d.get(method, {}).get(name, {})
            }
            if len(got) < 2:
                continue
            seconds = extrapolate({k: 1 / p["tokens_per_s"] for k, p in got.items()}, full)
            out.setdefault(method, {})[name] = {
                "tokens_per_s": 1 / seconds,
                "peak_mib": extrapolate({k: p["peak_mib"] for k, p in got.items()}, full),
                "from_layers": sorted(got),
            }
    return out
