"""``ftjob plan``'s estimate against measured peaks of real CPU training (finetune_operator.memory).

Each config trains for two optimizer steps with the trainer's own SFT recipe (TRL's SFTTrainer,
the trainer's loader, LoRA config and TrainingArguments) on a Llama built from a config with random
weights, in a fresh process. What is measured, and why:

- the peak resident memory of that process (``VmHWM``), reset with ``/proc/self/clear_refs`` once the
  model is loaded (loading has peaks of its own that training does not have), minus the resident
  memory after every import and before the model is loaded. That is everything training adds on
  top of an idle trainer: weights, adapter, optimizer state, activations, temporaries and allocator
  overhead, which is what a pod's memory limit sees;
- with ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc serves tensors from mmap and returns them when
  they are freed (its default threshold grows after the first large free, and freed memory would then
  stay in the heap and hide the next peak);
- with the model files in bf16, so loading converts (copies) every weight: fp32 files would be mapped
  and their pages, though clean page cache, would count as resident.

A second check counts, with torch's saved-tensor hooks, what one real decoder layer keeps for its
backward and compares it with :func:`finetune_operator.memory.layer_saved_bytes_per_token`.

Run as a script, this file is the measuring process: ``python test_plan_accuracy.py MODE SPEC_JSON``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune_operator.memory import MiB, ModelShape, TrainingSetup, estimate, layer_saved_bytes_per_token

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 0.15

CONFIGS: dict[str, dict[str, Any]] = {
    # LoRA, fp32 base; the peak is at the LM head: the logits term and the weights dominate
    "lora-fp32-logits": {
        "h": 1024,
        "i": 2816,
        "L": 8,
        "a": 16,
        "kv": 4,
        "vocab": 32000,
        "quantization": "none",
        "seq": 256,
        "batch": 2,
        "ckpt": True,
    },
    # no gradient checkpointing: every layer's saved activations dominate
    "lora-fp32-activations": {
        "h": 768,
        "i": 2048,
        "L": 12,
        "a": 12,
        "kv": 4,
        "vocab": 8192,
        "quantization": "none",
        "seq": 512,
        "batch": 2,
        "ckpt": False,
    },
    # QLoRA: the 4-bit weights (bitsandbytes' CPU backend), checkpointed activations, logits
    "qlora-nf4": {
        "h": 1024,
        "i": 2816,
        "L": 8,
        "a": 16,
        "kv": 4,
        "vocab": 8192,
        "quantization": "nf4",
        "seq": 512,
        "batch": 2,
        "ckpt": True,
    },
}
COMMON = {"r": 16, "dropout": 0.05, "steps": 2}


def shape_of(spec: dict[str, Any]) -> ModelShape:
    return ModelShape(spec["h"], spec["i"], spec["L"], spec["a"], spec["kv"], spec["vocab"])


def setup_of(spec: dict[str, Any]) -> TrainingSetup:
    return TrainingSetup(
        quantization=spec["quantization"],
        lora_r=spec["r"],
        lora_dropout=spec["dropout"],
        seq_length=spec["seq"],
        micro_batch=spec["batch"],
        gradient_checkpointing=spec["ckpt"],
        zero_stage=0,
        device="cpu",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_script(mode: str, spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """This file as a fresh process (one torchrun-like rank) in ``mode``; returns its RESULT."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
        # one rank, as torchrun would start it: the trainer's arguments expect a process group
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    done = subprocess.run(
        [sys.executable, __file__, mode, json.dumps(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"{mode} failed ({done.returncode}):\n{done.stderr[-6000:]}"
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result


@pytest.mark.trainer
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_layer_saved_tensors_match_the_count(dropout: float) -> None:
    spec: dict[str, Any] = {
        "h": 768,
        "i": 2048,
        "a": 12,
        "kv": 4,
        "r": 16,
        "dropout": dropout,
        "seq": 512,
        "batch": 2,
    }
    measured = run_script("saved", spec)["bytes_per_token"]
    shape = ModelShape(spec["h"], spec["i"], 1, spec["a"], spec["kv"], 512)
    counted = layer_saved_bytes_per_token(shape, TrainingSetup(lora_r=16, lora_dropout=dropout, device="cpu"))
    # measured also holds RoPE's cos/sin and the norms' per-token rsqrt (about 1%)
    assert counted == pytest.approx(measured, rel=0.02), (counted, measured)


@pytest.mark.trainer
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_estimate_is_within_15_percent_of_the_measured_peak(name: str, tmp_path: Path) -> None:
    spec = {
        **CONFIGS[name],
        **COMMON,
        "model_dir": str(tmp_path / "model"),
        "workdir": str(tmp_path / "work"),
    }
    run_script("prepare", spec)
    result = run_script("measure", spec)
    measured = result["peak"] - result["baseline"]
    predicted = estimate(shape_of(spec), setup_of(spec))
    error = (predicted.total - measured) / measured
    terms = {k: round(v / MiB, 1) for k, v in predicted.terms.items()}
    print(
        f"\n{name}: measured {measured / MiB:.0f} MiB, estimated {predicted.total / MiB:.0f} MiB, "
        f"error {100 * error:+.1f}%, terms (MiB) {terms}"
    )
    assert result["trainable"] == predicted.lora_parameters
    assert abs(error) <= TOLERANCE, (
        f"estimate {predicted.total / MiB:.0f} MiB vs measured {measured / MiB:.0f} MiB"
    )


# ----------------------------------------------------------------------- the measuring process


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokenizer and a random-weight Llama of the config's shape, saved in bf16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.support.tiny_model import build_tokenizer

    out = Path(spec["model_dir"])
    build_tokenizer(out)
    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["h"],
        intermediate_size=spec["i"],
        num_hidden_layers=spec["L"],
        num_attention_heads=spec["a"],
        num_key_value_heads=spec["kv"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)
    return {"saved": str(out)}


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Two optimizer steps of the trainer's SFT recipe; peak resident memory over the baseline."""
    import gc

    import datasets
    import torch

    from finetune_trainer import loader
    from finetune_trainer.recipes import RecipeInputs, sft
    from finetune_trainer.runconfig import RunConfig
    from finetune_trainer.stage import load_tokenizer
    from finetune_trainer.train import common_arguments

    model_dir = Path(spec["model_dir"])
    config = RunConfig.model_validate(
        {
            "job": {"namespace": "plan", "name": "measure"},
            "method": "sft",
            "model": {"uri": str(model_dir), "quantization": spec["quantization"]},
            "adapter": {"r": spec["r"], "alpha": 2 * spec["r"], "dropout": spec["dropout"]},
            "dataset": {"train": "unused.jsonl", "max_seq_length": spec["seq"]},
            "hyperparameters": {
                "max_steps": spec["steps"],
                "per_device_batch_size": spec["batch"],
                "gradient_checkpointing": spec["ckpt"],
                "logging_steps": 1,
            },
            "distributed": {"zero_stage": 0},
            "checkpoints": {"uri": "s3://unused/ckpt/", "every_steps": 1_000_000},
            "output": {"uri": "s3://unused/out/"},
            "device": "cpu",
        }
    )
    precision = loader.plan_precision(config, cuda_available=False)
    tokenizer = load_tokenizer(model_dir)
    generator = torch.Generator().manual_seed(0)
    rows = spec["steps"] * spec["batch"]
    # Token ids of exactly seq length: no padding, no truncation, every position trained on.
    ids = torch.randint(3, spec["vocab"], (rows, spec["seq"]), generator=generator).tolist()
    arguments = {
        **common_arguments(config, Path(spec["workdir"]), False),
        **loader.training_arguments(config, precision),
        "report_to": [],
    }
    inputs = RecipeInputs(
        load_model=lambda: loader.load_model(config, model_dir, precision, local_rank=0),
        tokenizer=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"input_ids": ids}),
        eval_dataset=None,
        peft_config=loader.lora_config(config),
        arguments=arguments,
        max_length=spec["seq"],
        packing=False,
        beta=0.1,
        callbacks=[],
    )
    gc.collect()
    baseline = _status("VmRSS")
    trainer = sft.build_trainer(inputs)
    gc.collect()
    loaded = {"rss": _status("VmRSS"), "hwm": _status("VmHWM"), "file": _status("RssFile")}
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS now (Linux >= 4.0)
    trainer.train()
    model: Any = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"baseline": baseline, "loaded": loaded, "peak": _status("VmHWM"), "trainable": trainable}


def _saved(spec: dict[str, Any]) -> dict[str, Any]:
    """Bytes per token one LoRA-adapted decoder layer saves for backward (parameters excluded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    sdpa: dict[str, Any] = {"attn_implementation": "sdpa"}  # what the trainer's loader asks for
    config: Any = LlamaConfig(
        vocab_size=512,
        hidden_size=spec["h"],
        intermediate_size=spec["i"],
        num_hidden_layers=1,
        num_attention_heads=spec["a"],
        num_key_value_heads=spec["kv"],
        **sdpa,
    )
    lora = LoraConfig(
        r=spec["r"],
        lora_alpha=2 * spec["r"],
        lora_dropout=spec["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model: Any = get_peft_model(LlamaForCausalLM(config), lora)
    model.train()
    inner = model.base_model.model.model
    batch, seq = spec["batch"], spec["seq"]
    hidden = torch.randn(batch, seq, spec["h"], requires_grad=True)
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    embeddings = inner.rotary_emb(hidden, positions)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        inner.layers[0](hidden, attention_mask=None, position_embeddings=embeddings, position_ids=positions)
    return {"bytes_per_token": sum(seen.values()) / (batch * seq)}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    mode, raw = sys.argv[1], sys.argv[2]
    run = {"prepare": _prepare, "measure": _measure, "saved": _saved}[mode]
    print("RESULT " + json.dumps(run(json.loads(raw))), flush=True)
