"""Training throughput: the trainer's own recipe against a plain TRL script, in the same run.

    python -m bench.training                                   # CPU, tiny Llama: ratios only
    python -m bench.training --device cuda --shape llama-3.1-8b [--method sft] [--phases ...] [--resume]
    python -m bench.training --device cuda --shape llama-3.1-70b --layers 4,8 --method sft --resume

The result (``bench/results/training-<label>.json``) is written after every phase; ``--resume`` keeps
what an earlier, cut-short invocation with the same label measured and runs the rest.

Phases (per method, SFT and DPO; each in its own process, so each has its own peak memory):

- ``trl-defaults``: what a user writes with TRL alone, as TRL's own ``trl sft``/``trl dpo`` scripts do
  it: ``SFTTrainer``/``DPOTrainer`` given the model's path, ``ModelConfig`` with LoRA r=16 on all
  linear layers (TRL's LoRA defaults otherwise) and, on a GPU, 4-bit NF4 with bf16 compute through
  TRL's ``get_quantization_config``; every ``SFTConfig``/``DPOConfig`` field at its default except
  ``output_dir`` and ``max_steps`` (and, on CPU only, ``bf16=False``: the trainer computes in fp32
  there, and the comparison should not be one of number formats);
- ``ours``: the trainer's code path: a FineTuneJob rendered by the operator (``render.run_config``,
  size-aware micro-batch and accumulation), the trainer's data loading and checks, ``loader``,
  ``train.common_arguments`` and the method's recipe (``recipes/sft.py``, ``recipes/dpo.py``);
- ``ours+packing`` (SFT): ``dataset.packing: true`` (TRL's best-fit-decreasing packing with
  per-sequence position ids: packed examples do not attend to each other, tests/trainer/test_packing.py);
- ``ours+packing+mb1`` (SFT): the same with micro-batch 1 and the accumulation that keeps the rows per
  step. TRL's padding-free collator flattens a micro-batch into one sequence, and with sdpa
  transformers then materialises a block-diagonal (rows x max length)^2 mask and computes all of it;
  one packed row per micro-batch keeps that at max length^2;
- ``ours-random``: ``train_sampling_strategy="random"``, the trainer before it grouped
  micro-batches by length (``recipes/sampling.py``; ``ours`` groups them): how much padding that saves;
- GPU only, when importable: ``ours+liger`` (``liger_kernel`` through ``use_liger_kernel``) and
  attention kernels (``+fa2``: flash_attention_2, ``+fa3``: flash_attention_3; the loader loads
  ``sdpa``, the model is switched after loading). A phase that cannot run says why.

Data: synthetic chat examples, lengths log-normal (median :attr:`Scale.median`, sigma 0.6) truncated
to [median/8, max length], fixed seed; DPO pairs with prompt and each reply log-normal around half
that median. Each phase trains warm-up steps (not timed) and then about the same number of real
tokens (:func:`plan_steps`). A forward pre-hook on the decoder counts, in the forward passes that
train (gradients on: DPO's reference pass is not counted), the real tokens (attention mask),
all tokens including padding, and the attended context of every real token.

FLOPs per real token (model FLOPs, for MFU; recomputation under gradient checkpointing is not
counted, nor is the dequantisation of 4-bit weights), with N_f the frozen matmul parameters (all
linear layers and the LM head, not the embedding lookup), N_l the LoRA parameters, L layers, d the
attention width (heads x head dim) and c the mean attended context of a token (causal: position + 1)::

    forward                   2 N_f + 2 N_l + 4 L d c     (QK^T and AV: 2 L d c each)
    backward, frozen base     2 N_f                       (activation gradients only, no weight gradients)
    backward, LoRA            4 N_l                       (activation and weight gradients)
    backward, attention       8 L d c
    SFT                       4 N_f + 6 N_l + 12 L d c
    DPO                       SFT + reference forward (adapter off, no gradients): 6 N_f + 6 N_l + 16 L d c

MFU = real tokens/s x FLOPs per token / the dense bf16 peak of the GPU (``training_workload.PEAK_TFLOPS``).
Only GPU figures are absolute; on CPU the ratios to ``trl-defaults`` of the same run are the result.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, astuple, dataclass, replace
from pathlib import Path
from typing import Any

from bench.common import REPO, RESULTS, WORK, Run, env_float, log, machine
from bench.training_workload import (
    PACKED_FILL,
    SCALES,
    SHAPES,
    SIGMA,
    WORDS,
    Plan,
    Scale,
    Shape,
    Template,
    dpo_examples,
    extrapolated,
    flops_per_token,
    frozen_params,
    lora_params,
    peak_tflops,
    plan_steps,
    row_tokens,
    sft_examples,
)

BASELINE = "trl-defaults"
CPU_THREADS = 1  # two shared cores: one thread gives steadier ratios (see the environment notes)


@dataclass(frozen=True)
class Phase:
    method: str  # sft or dpo
    name: str
    ours: bool = True
    packing: bool = False
    liger: bool = False
    attention: str = "sdpa"
    micro_batch: int | None = None  # set in the FineTuneJob, accumulation keeping the rows per step
    sampler: str | None = None  # TrainingArguments.train_sampling_strategy, instead of the recipe's


ATTENTION = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
PHASES = [
    Phase("sft", BASELINE, ours=False),
    Phase("sft", "ours"),
    Phase("sft", "ours-random", sampler="random"),
    Phase("sft", "ours+packing", packing=True),
    Phase("sft", "ours+packing+mb1", packing=True, micro_batch=1),
    Phase("sft", "ours+liger", liger=True),
    Phase("sft", "ours+fa2", attention="flash_attention_2"),
    Phase("sft", "ours+packing+fa2", packing=True, attention="flash_attention_2"),
    Phase("sft", "ours+packing+fa3", packing=True, attention="flash_attention_3"),
    Phase("dpo", BASELINE, ours=False),
    Phase("dpo", "ours"),
    Phase("dpo", "ours-random", sampler="random"),
    Phase("dpo", "ours+liger", liger=True),
    Phase("dpo", "ours+fa2", attention="flash_attention_2"),
]


def why_not(phase: Phase, device: str) -> str | None:
    """Why ``phase`` cannot run here, or None."""
    if phase.liger:
        if device != "cuda":
            return "GPU only: Liger's kernels are Triton kernels"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed (a proposal: not a dependency of the trainer)"
    if phase.attention != "sdpa":
        if device != "cuda":
            return f"GPU only: {phase.attention} has no CPU kernel"
        if importlib.util.find_spec(ATTENTION[phase.attention]) is None:
            return f"{ATTENTION[phase.attention]} is not installed"
    return None


TRL_BATCH = 8  # per_device_train_batch_size and gradient_accumulation_steps=1: TrainingArguments' defaults


def rendered_config(phase: Phase, shape_name: str, device: str, data: Path, max_steps: int | None) -> Any:
    """The RunConfig the operator renders for a one-GPU (or, on CPU, one-process) FineTuneJob."""
    from finetune_operator.api import FineTuneJob
    from finetune_operator.render import run_config
    from finetune_operator.settings import Settings

    on_gpu, scale = device == "cuda", SCALES[device]
    hyperparameters: dict[str, Any] = {"maxSteps": max_steps} if max_steps else {}
    if phase.micro_batch:
        default = rendered_config(replace(phase, micro_batch=None), shape_name, device, data, None)
        rows = default.hyperparameters.per_device_batch_size * default.hyperparameters.gradient_accumulation
        hyperparameters |= {
            "perDeviceBatchSize": phase.micro_batch,
            "gradientAccumulation": rows // phase.micro_batch,
        }
    spec: dict[str, Any] = {
        "method": phase.method,
        "model": {"uri": f"s3://bench/models/{shape_name}/", "quantization": "nf4" if on_gpu else "none"},
        "dataset": {"train": "s3://bench/data/train.jsonl", "maxSeqLength": scale.max_len},
        "hyperparameters": hyperparameters,
        "resources": {"nodes": 1, "gpusPerNode": 1 if on_gpu else 0},
        "distributed": {"zeroStage": 0},  # one process: nothing to shard
        "checkpoints": {"uri": "s3://bench/ckpt/"},
        "output": {"uri": "s3://bench/out/"},
    }
    if phase.packing:
        spec["dataset"]["packing"] = True
    job = FineTuneJob.model_validate({"metadata": {"name": "bench", "namespace": "bench"}, "spec": spec})
    config = run_config(job, 1, None, Settings())
    # Staging is not measured: the data is read where it lies, as the worker reads staged files.
    return config.model_copy(update={"dataset": config.dataset.model_copy(update={"train": str(data)})})


def phase_plan(phase: Phase, shape_name: str, device: str) -> Plan:
    scale = SCALES[device]
    per_row = row_tokens(scale, phase.method)
    if not phase.ours:
        return plan_steps(TRL_BATCH, 1, per_row, scale)
    hp = rendered_config(phase, shape_name, device, Path("x.jsonl"), None).hyperparameters
    if phase.packing:
        per_row = scale.max_len * PACKED_FILL
    return plan_steps(hp.per_device_batch_size, hp.gradient_accumulation, per_row, scale)


# ------------------------------------------------------------------- the measuring process


class Meter:
    """Counts tokens in the forward passes that train and stamps the end of every optimizer step.

    Counters stay on the device (no synchronisation per micro-batch); every step end synchronises
    the GPU once, so a step's time is its own.
    """

    def __init__(self, warmup_steps: int, on_gpu: bool) -> None:
        self.warmup_steps = warmup_steps
        self.on_gpu = on_gpu
        self.counters: Any = None  # on the device: [real tokens, attended context]
        self.all_tokens = 0  # with padding: known on the host, no copy to the device
        self.at_warmup: Any = None
        self.all_at_warmup = 0
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []  # this process's CPU time: steadier than wall time on shared cores
        self.memory: dict[str, float] = {}

    def hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        if not (torch.is_grad_enabled() and module.training):
            return  # DPO's reference pass, evaluation
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        real = mask.bool() if mask is not None and mask.dim() == 2 else torch.ones_like(ids, dtype=torch.bool)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = real.long().cumsum(-1) - 1
        sums = torch.stack([real.sum(), ((positions + 1) * real).sum()]).double()
        self.counters = sums if self.counters is None else self.counters + sums
        self.all_tokens += ids.numel()

    def train_begin(self) -> None:
        import torch

        if self.on_gpu:
            self.memory["load_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            self.memory["rss_at_start_mib"] = _status_mib("VmRSS")
            try:  # reset VmHWM: loading has peaks of its own
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.memory["hwm_not_reset"] = 1.0

    def step_end(self, step: int) -> None:
        import torch

        if self.on_gpu:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        self.cpu_stamps.append(time.process_time())
        if step == self.warmup_steps and self.counters is not None:
            self.at_warmup, self.all_at_warmup = self.counters.clone(), self.all_tokens

    def result(self) -> dict[str, Any]:
        import torch

        if self.at_warmup is None or len(self.stamps) <= self.warmup_steps:
            raise RuntimeError("training ended before the warm-up did: nothing was timed")
        real, context = (self.counters - self.at_warmup).tolist()
        timed = self.stamps[self.warmup_steps - 1 :]
        out = {
            "real_tokens": real,
            "all_tokens": self.all_tokens - self.all_at_warmup,
            "context_sum": context,
            "seconds": timed[-1] - timed[0],
            "cpu_seconds": self.cpu_stamps[-1] - self.cpu_stamps[self.warmup_steps - 1],
            "step_s": [b - a for a, b in itertools.pairwise(timed)],
            **self.memory,
        }
        if self.on_gpu:
            out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            out["reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
            out["gpu"] = torch.cuda.get_device_name()
        else:
            out["peak_mib"] = _status_mib("VmHWM")
        return out


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _callback(meter: Meter) -> Any:
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.train_begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            meter.step_end(state.global_step)

    return Timing()


def build_trl_defaults(job: dict[str, Any], meter: Meter) -> Any:
    """TRL's own ``trl sft``/``trl dpo`` script with LoRA on all linear layers (and QLoRA on a GPU)."""
    import datasets
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.model_config import ModelConfig
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer
    from trl.trainer.utils import get_peft_config, get_quantization_config

    on_gpu = job["device"] == "cuda"
    dtype = "bfloat16" if on_gpu else "float32"
    model_args = ModelConfig(
        model_name_or_path=job["model_dir"],
        dtype=dtype,
        load_in_4bit=on_gpu,
        use_peft=True,
        lora_target_modules=["all-linear"],
    )
    sft = job["method"] == "sft"
    Config: Any = SFTConfig if sft else DPOConfig
    Trainer: Any = SFTTrainer if sft else DPOTrainer
    args = Config(
        output_dir=job["workdir"],
        max_steps=job["max_steps"],
        model_init_kwargs={"dtype": dtype},  # `trl sft --dtype ...` puts it here
        bf16=None if on_gpu else False,  # None: TRL's default (bf16 unless fp16)
    )
    dataset = datasets.load_dataset("json", data_files=job["data"], split="train")
    return Trainer(
        model=job["model_dir"],
        args=args,
        train_dataset=dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        callbacks=[_callback(meter)],
    )


def build_ours(job: dict[str, Any], phase: Phase, meter: Meter) -> Any:
    """The trainer's worker path (train._train without staging, S3, checkpoints and progress)."""
    import torch

    from finetune_trainer import loader
    from finetune_trainer.data import load_datasets, make_token_counter
    from finetune_trainer.recipes import RecipeInputs, recipe_for
    from finetune_trainer.stage import load_tokenizer
    from finetune_trainer.train import common_arguments

    workdir, model_dir = Path(job["workdir"]), Path(job["model_dir"])
    config = rendered_config(phase, job["shape"], job["device"], Path(job["data"]), job["max_steps"])
    precision = loader.plan_precision(config, cuda_available=torch.cuda.is_available())
    if precision.on_gpu:
        torch.cuda.set_device(0)
    tokenizer = load_tokenizer(model_dir)
    data = load_datasets(
        config.dataset,
        config.method,
        seed=config.hyperparameters.seed,
        token_counter=make_token_counter(tokenizer),
    )
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(workdir / "tensorboard")
    arguments = {**common_arguments(config, workdir, False), **loader.training_arguments(config, precision)}
    if phase.liger:
        arguments["use_liger_kernel"] = True
    if phase.sampler:
        arguments["train_sampling_strategy"] = phase.sampler

    def load_model() -> Any:
        model = loader.load_model(config, model_dir, precision, local_rank=0)
        if phase.attention != "sdpa":
            model.set_attn_implementation(phase.attention)
        return model

    inputs = RecipeInputs(
        load_model=load_model,
        tokenizer=tokenizer,
        train_dataset=data.train,
        eval_dataset=None,
        peft_config=loader.lora_config(config),
        arguments=arguments,
        max_length=config.dataset.max_seq_length,
        packing=config.dataset.packing,
        beta=config.hyperparameters.beta,
        callbacks=[_callback(meter)],
    )
    return recipe_for(config.method).build_trainer(inputs)


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One phase, in this process: build the trainer, hook the decoder, train, read the meter."""
    import torch

    if job["device"] == "cpu":
        torch.set_num_threads(CPU_THREADS)
    phase = next(p for p in PHASES if p.method == job["method"] and p.name == job["phase"])
    meter = Meter(job["warmup_steps"], job["device"] == "cuda")
    trainer = build_ours(job, phase, meter) if phase.ours else build_trl_defaults(job, meter)
    decoder = next(m for m in trainer.model.modules() if hasattr(m, "embed_tokens") and hasattr(m, "layers"))
    decoder.register_forward_pre_hook(meter.hook, with_kwargs=True)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    args = trainer.args
    return {
        **meter.result(),
        "steps": trainer.state.global_step,
        "micro_batch": args.per_device_train_batch_size,
        "accumulation": args.gradient_accumulation_steps,
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "bf16": bool(args.bf16),
        "learning_rate": args.learning_rate,
        "max_length": getattr(args, "max_length", None),
        "attention": trainer.model.config._attn_implementation,
        "loss_last": losses[-1] if losses else None,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


def prepare(job: dict[str, Any]) -> dict[str, Any]:
    """The random-initialised model (reused when present) and both datasets, written to disk."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune_devenv.tiny_model import build_tokenizer
    from finetune_trainer.data import make_token_counter

    shape, scale = Shape(**job["shape"]), SCALES[job["device"]]
    model_dir = Path(job["model_dir"])
    if not _model_matches(model_dir, shape):
        shutil.rmtree(model_dir, ignore_errors=True)
        tmp = model_dir.with_name(model_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        build_tokenizer(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        tokenizer.model_max_length = scale.max_len
        tokenizer.save_pretrained(tmp)
        config = LlamaConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            max_position_embeddings=8192,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        dtype = torch.bfloat16 if job["device"] == "cuda" else torch.float32
        with torch.device(job["device"]):
            model = LlamaForCausalLM._from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
        model.save_pretrained(tmp)
        del model
        tmp.rename(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    count = make_token_counter(tokenizer)
    words = {f" {w}": len(tokenizer(f" {w}")["input_ids"]) for w in WORDS.split()}
    user, both = (
        count([{"role": "user", "content": ""}]),
        count([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]),
    )
    template = Template(sft=both, prompt=user, reply=both - user)
    stats = {}
    for method, n in job["examples"].items():
        make = sft_examples if method == "sft" else dpo_examples
        rows = make(n, scale, template, words)
        Path(job["data"][method]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        sequences = [_sequence_tokens(r, count) for r in rows]
        too_long = sum(max(seqs) > scale.max_len for seqs in sequences)
        if too_long:
            raise RuntimeError(
                f"{too_long} {method} examples longer than {scale.max_len} tokens: lower longest"
            )
        lengths = sorted(sum(seqs) for seqs in sequences)
        stats[method] = {
            "examples": n,
            "tokens_median": statistics.median(lengths),
            "tokens_mean": statistics.fmean(lengths),
            "tokens_p90": lengths[int(0.9 * (len(lengths) - 1))],
            "tokens_max": lengths[-1],
        }
    return stats


def _model_matches(model_dir: Path, shape: Shape) -> bool:
    """A model saved by an earlier run has this shape (a changed shape is built anew)."""
    path = model_dir / "config.json"
    if not path.is_file():
        return False
    c = json.loads(path.read_text())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return tuple(c.get(k) for k in (*keys, "intermediate_size", "vocab_size")) == astuple(shape)


def _sequence_tokens(row: dict[str, Any], count: Any) -> list[int]:
    """Tokens of the sequences an example trains: a conversation, or a pair's chosen and rejected."""
    if "messages" in row:
        return [int(count(row["messages"]))]
    return [int(count(row["prompt"] + row[key])) for key in ("chosen", "rejected")]


# ------------------------------------------------------------------------------ orchestration


def run_child(job: dict[str, Any], folder: Path, timeout: float = 3600) -> dict[str, Any]:
    """``job`` in a fresh process (own peak memory); raises with its output's tail when it fails."""
    folder.mkdir(parents=True, exist_ok=True)
    spec, out = folder / "job.json", folder / "result.json"
    out.unlink(missing_ok=True)
    spec.write_text(json.dumps(job))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    if job["device"] == "cpu":
        env["OMP_NUM_THREADS"] = str(CPU_THREADS)
        env["CUDA_VISIBLE_DEVICES"] = ""
    if job.get("torchrun"):  # the trainer's workers run under torchrun: one rank of a process group
        env |= {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    argv = [sys.executable, "-m", "bench.training", "--child", str(spec), "--child-out", str(out)]
    done = subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    (folder / "output.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"exit {done.returncode}: {(done.stdout + done.stderr)[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def summarise(runs: list[dict[str, Any]], shape: Shape, method: str) -> dict[str, Any]:
    """Medians over the repetitions of one phase; MFU on a GPU with a known peak."""
    tps = [r["real_tokens"] / r["seconds"] for r in runs]
    first = runs[0]
    context = sum(r["context_sum"] for r in runs) / sum(r["real_tokens"] for r in runs)
    flops = flops_per_token(shape, 16, context, method)
    out: dict[str, Any] = {
        "tokens_per_s": statistics.median(tps),
        "all_tokens_per_s": statistics.median(r["all_tokens"] / r["seconds"] for r in runs),
        "tokens_per_cpu_s": statistics.median(r["real_tokens"] / r["cpu_seconds"] for r in runs),
        "padding_share": 1 - sum(r["real_tokens"] for r in runs) / sum(r["all_tokens"] for r in runs),
        "step_s_p50": statistics.median(s for r in runs for s in r["step_s"]),
        "peak_mib": statistics.median(r["peak_mib"] for r in runs),
        "mean_context": context,
        "flops_per_token": flops,
        "reps": len(runs),
        **{
            k: first[k]
            for k in ("micro_batch", "accumulation", "gradient_checkpointing", "bf16", "attention")
        },
        "runs": runs,
    }
    peak = peak_tflops(first["gpu"]) if "gpu" in first else None
    if peak:
        out["gpu"], out["peak_tflops"] = first["gpu"], peak
        out["mfu"] = out["tokens_per_s"] * flops / (peak * 1e12)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shape", choices=list(SHAPES), help="default: tiny on cpu, llama-3.1-8b on cuda")
    parser.add_argument("--layers", default="", help="comma-separated layer counts (fewer than the shape's)")
    parser.add_argument("--method", choices=["sft", "dpo", "both"], default="both")
    parser.add_argument("--phases", default="", help=f"comma-separated phase names ({BASELINE} always runs)")
    parser.add_argument(
        "--reps",
        type=int,
        default=int(env_float("FTJ_BENCH_TRAINING_REPS", 0)) or None,
        help="repetitions of every phase (FTJ_BENCH_TRAINING_REPS; default 2 on CPU, 1 on a GPU)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the phases already in this label's result"
    )
    parser.add_argument("--label", default="")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(args.child.read_text())
        result = prepare(job) if job.get("task") == "prepare" else measure(job)
        args.child_out.write_text(json.dumps(result))
        return 0
    return orchestrate(args)


def orchestrate(args: argparse.Namespace) -> int:
    shape_name = args.shape or ("tiny" if args.device == "cpu" else "llama-3.1-8b")
    shape, scale = SHAPES[shape_name], SCALES[args.device]
    layers = [int(k) for k in args.layers.split(",") if k.strip()] or [shape.layers]
    if any(k < 1 or k > shape.layers for k in layers):
        raise SystemExit(f"--layers {args.layers}: each must be between 1 and {shape.layers}")
    methods = ["sft", "dpo"] if args.method == "both" else [args.method]
    wanted = {p.strip() for p in args.phases.split(",") if p.strip()}
    unknown = wanted - {p.name for p in PHASES}
    if unknown:
        raise SystemExit(f"--phases: unknown {sorted(unknown)}; known: {sorted({p.name for p in PHASES})}")
    phases = [p for p in PHASES if p.method in methods and (not wanted or p.name in wanted or not p.ours)]
    gpu = machine()["gpu"] if args.device == "cuda" else None
    args.reps = args.reps or (1 if gpu else 2)
    label = args.label or _label(gpu, shape_name, layers, args.method)
    run = Run("training", label, _params(args, shape_name, shape, scale, layers, phases, gpu))
    if args.resume:
        _carry_over(run)
    if layers != [shape.layers]:
        run.data["full_layers"] = shape.layers
    work = WORK / "training"
    for k in layers:
        model_dir = work / "models" / f"{shape_name}-{k}l-{args.device}"
        data = {m: str(work / f"{m}-{args.device}.jsonl") for m in methods}
        plans = {(p.method, p.name): phase_plan(p, shape_name, args.device) for p in phases}
        examples = {m: _examples_needed(plans, m, scale) for m in methods}
        log(f"{shape_name} with {k} layers: preparing model and data ({examples})")
        prep = {"task": "prepare", "device": args.device, "shape": asdict(replace(shape, layers=k))}
        stats = run_child(
            {**prep, "model_dir": str(model_dir), "data": data, "examples": examples}, work / "prep"
        )
        run.data.setdefault("workload", {}).update(stats)
        depth = run.data.setdefault("depths", {}).setdefault(str(k), {})
        for rep in range(args.reps):
            for phase in phases if rep % 2 == 0 else phases[::-1]:
                job = {
                    "device": args.device,
                    "shape": shape_name,
                    "layers": k,
                    "method": phase.method,
                    "phase": phase.name,
                    "model_dir": str(model_dir),
                    "data": data[phase.method],
                    "workdir": str(work / "runs" / f"{phase.method}-{phase.name}"),
                    "max_steps": plans[(phase.method, phase.name)].max_steps,
                    "warmup_steps": plans[(phase.method, phase.name)].warmup_steps,
                    "torchrun": phase.ours,
                }
                if measure_phase(job, phase, rep, depth.setdefault(phase.method, {})):
                    if "full_layers" in run.data:
                        run.data["extrapolated"] = extrapolated(run.data["depths"], shape.layers)
                    run.save()  # after every phase: a run cut short keeps what it measured
    run.save()
    return 0


def measure_phase(job: dict[str, Any], phase: Phase, rep: int, results: dict[str, Any]) -> bool:
    """Repetition ``rep`` of ``phase`` into ``results`` (its summary, or why it did not run);
    False when it was measured already (``--resume``)."""
    before = results.get(phase.name, {})
    if len(before.get("runs", [])) > rep:
        return False
    reason = why_not(phase, job["device"])
    if reason:
        results[phase.name] = {"not_run": reason}
        return True
    shutil.rmtree(job["workdir"], ignore_errors=True)
    try:
        got = run_child(job, Path(job["workdir"]))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        log(f"  {phase.method}/{phase.name}: failed: {str(exc)[-300:]}")
        results[phase.name] = before if "runs" in before else {"failed": str(exc)[-2000:]}
        return True
    log(
        f"  {phase.method}/{phase.name}: {got['real_tokens'] / got['seconds']:,.0f} real tokens/s, "
        f"peak {got['peak_mib']:,.0f} MiB, {got['steps']} steps"
    )
    shape = replace(SHAPES[job["shape"]], layers=job["layers"])
    results[phase.name] = summarise([*before.get("runs", []), got], shape, phase.method)
    return True


def _carry_over(run: Run) -> None:
    """``--resume``: the phases an earlier invocation with this label measured are kept, not rerun."""
    path = RESULTS / f"training-{run.label}.json"
    if path.is_file():
        earlier = json.loads(path.read_text())
        run.data = earlier["data"]
        run.params["resumed"] = [*earlier["params"].get("resumed", []), earlier["started"]]
        log(f"resuming {path.name} (started {earlier['started']})")


def _label(gpu: str | None, shape_name: str, layers: list[int], method: str) -> str:
    """``cpu-tiny``, ``h100-llama-3.1-8b``, ``h200-llama-3.1-70b-4l-8l-sft``."""
    model = next((w for w in (gpu or "").split(" x ")[-1].split() if any(c.isdigit() for c in w)), "gpu")
    where = "cpu" if gpu is None else model.split("-")[0].lower()
    depth = "" if layers == [SHAPES[shape_name].layers] else "-" + "-".join(f"{k}l" for k in layers)
    return f"{where}-{shape_name}{depth}" + ("" if method == "both" else f"-{method}")


def _examples_needed(plans: dict[tuple[str, str], Plan], method: str, scale: Scale) -> int:
    """Enough examples that no phase trains a second epoch (packed rows hold several examples)."""
    mean = row_tokens(scale, "sft")
    need = 0.0
    for (m, name), plan in plans.items():
        if m == method:
            rows = plan.max_steps * plan.micro_batch * plan.accumulation
            need = max(need, rows * (scale.max_len / mean if "packing" in name else 1.0))
    return math.ceil(need * 1.1) + 16


def _params(
    args: argparse.Namespace,
    shape_name: str,
    shape: Shape,
    scale: Scale,
    layers: list[int],
    phases: list[Phase],
    gpu: str | None,
) -> dict[str, Any]:
    on_gpu = args.device == "cuda"
    return {
        "device": args.device,
        "gpu": gpu,
        "shape_name": shape_name,
        "shape": asdict(shape),
        "layers": layers,
        "scale": asdict(scale),
        "reps": args.reps,
        "phases": [f"{p.method}/{p.name}" for p in phases],
        "precision": "QLoRA: NF4 base, bf16 compute" if on_gpu else "LoRA, fp32 (no 4-bit on CPU)",
        "cpu_threads": None if on_gpu else CPU_THREADS,
        "lora_r": 16,
        "frozen_params": frozen_params(shape),
        "lora_params": lora_params(shape, 16),
        "peak_tflops": peak_tflops(gpu) if gpu else None,
        "flops_formula": "SFT 4 N_f + 6 N_l + 12 L d c; DPO 6 N_f + 6 N_l + 16 L d c (per real token)",
        "data": f"log-normal lengths, median {scale.median} tokens, sigma {SIGMA}, at most {scale.longest}",
    }


if __name__ == "__main__":
    raise SystemExit(main())
