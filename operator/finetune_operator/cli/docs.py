"""Generate docs/cli.md from the parsers' own --help, so the page cannot drift from the code.

python -m finetune_operator.cli.docs --write   # regenerate docs/cli.md
python -m finetune_operator.cli.docs --check   # exit 1 if docs/cli.md is stale (a unit test does this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune_operator.cli import build_parser

DOC = Path(__file__).resolve().parents[3] / "docs" / "cli.md"

INTRO = """\
# The `ftjob` command line

`ftjob` covers the daily loop of fine-tuning without raw YAML or `kubectl describe`: check the data,
plan the GPUs, submit, follow, inspect, plot, or run the job on this machine first.

```sh
pip install 'finetune-operator[cli]'     # ftjob and kubectl-ftjob (so `kubectl ftjob ...` works too)
ftjob validate train.jsonl --model s3://models/llama-3.1-8b-instruct/
ftjob plan job.yaml
ftjob submit job.yaml --check-data
ftjob watch support-bot
ftjob plot support-bot -f curves.png
```

Conventions, for every command:

- Errors are one line on stderr, `error: <what went wrong> — <what to do>`, exit code 1; a usage
  error exits 2. `validate` exits 1 when the data has errors, `plan` when the job does not fit, `watch`
  when the job failed or was cancelled.
- `-o json` (or `yaml`) prints a stable document instead of a table, for scripts.
- Commands that talk to the cluster take `-n/--namespace`, `--kubeconfig` and `--context`, as kubectl
  does. Commands that read S3 take `--s3-endpoint` (default: the job's `spec.storage.endpointUrl`) and
  use the `AWS_*` credentials of your environment.
- `ftjob logs` reads logs through the API server; against the development node agent, which has no
  kubelet endpoint, it falls back to the agent's log files (`--node-agent-dir`) and says so.
- `ftjob plot` reads the TensorBoard event files the trainer uploads next to the checkpoints
  (`<checkpoints.uri>/<namespace>/<name>/tensorboard/`); each attempt writes its own file, so restarts are
  marked where a later attempt's steps begin.
"""

ACCURACY = """\
## How good is the `plan` estimate

`ftjob plan` adds up the terms of `finetune_operator/memory.py` (each documented there): the base
weights (nf4: 0.516 byte per parameter of the decoder's linear layers with double quantisation;
embeddings, LM head and norms in the compute dtype), ZeRO-3 sharding over the world size and the two
gathered layers, the adapter's parameters, gradients and AdamW state, the activations (each layer's
input kept by gradient checkpointing, plus every tensor the recomputed layer saves, counted op by
op), TRL's chunked logits tiles, bitsandbytes' dequantised weight and a fixed framework overhead.

`device=cpu` describes a CPU run as the trainer makes it: fp32 weights, activations and adapter; no
CUDA context (a 64 MiB allowance instead); dropout masks as fp32 tensors (the GPU's fused kernel keeps
a bool mask); and TRL's torch fallback for the logits, which holds about eight tile-sized temporaries
(the GPU's Triton kernel works in one tile).

**Measured on the CPU** (`tests/trainer/test_plan_accuracy.py`, marker `trainer`): real training
steps of the trainer's own SFT recipe (TRL SFTTrainer, the trainer's loader and arguments) on Llama
models built from a config with random weights, LoRA r=16 on all linear layers, dropout 0.05,
batch 2, one process, two optimizer steps. The measure is the peak resident memory of a fresh
process (`VmHWM` in `/proc/self/status`, reset through `/proc/self/clear_refs` once the model is
loaded) minus its resident memory after the imports and before the model is loaded, with
`MALLOC_MMAP_THRESHOLD_=65536` so freed tensors go back to the system instead of staying in the
allocator's heap. The model files are stored in bf16, so that loading copies (and converts) every
weight instead of mapping the file: file-backed pages would otherwise count in the resident memory.
This counts everything the training adds (weights, adapter, optimizer state, activations,
temporaries, allocator overhead), which is what a memory limit sees. The test fails when the
estimate is more than 15% off.

{table}

The same test checks the per-layer activation count against torch's saved-tensor hooks on a real
decoder layer (with and without dropout).

**On GPUs the constants are not measured yet**: the 1 GiB CUDA allowance (context, cuBLAS workspaces,
caching-allocator slack), the 0.5 GiB for NCCL with several ranks, bf16 activations with fp32 norm
inputs, a bool dropout mask, one logits tile, and DeepSpeed's adapter bytes (bf16 parameter and
gradient, fp32 master and Adam state) are taken from how those libraries allocate, not from a run.
Compare with `torch.cuda.max_memory_allocated()` plus the context when a GPU is at hand.
"""

ACCURACY_TABLE = """\
| config | hidden, mlp, layers, heads/kv, vocab | params | tokens | ckpt | measured | estimate | error |
|---|---|---|---|---|---|---|---|
| lora-fp32-logits | 1024, 2816, 8, 16/4, 32000 | 156M | 256 x 2 | on | 1237 MiB | 1231 MiB | -0.5% |
| lora-fp32-activations | 768, 2048, 12, 12/4, 8192 | 88M | 512 x 2 | off | 1773 MiB | 1799 MiB | +1.5% |
| qlora-nf4 (4-bit base) | 1024, 2816, 8, 16/4, 8192 | 107M | 512 x 2 | on | 508 MiB | 527 MiB | +3.7% |

Measured on the development machine (2 cores, x86-64, no GPU; torch 2.13.0 (CUDA build, run on the
CPU), transformers 5.23.0, peft 0.21.2, trl 1.16.0, bitsandbytes 0.50.2), 2026-11-21. Repeated runs
of the same config differ by about 1%."""


def generate() -> str:
    parser = build_parser("ftjob")
    parts = [
        INTRO,
        ACCURACY.format(table=ACCURACY_TABLE),
        "## Commands\n",
        "```text\n" + parser.format_help() + "```\n",
    ]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        parts.append(f"### ftjob {name}\n\n```text\n{sub.format_help()}```\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_operator.cli.docs", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help=f"write {DOC}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 if {DOC} is not up to date")
    args = parser.parse_args(argv)
    text = generate()
    if args.write:
        DOC.write_text(text)
        print(f"wrote {DOC}")
        return 0
    if not DOC.is_file() or DOC.read_text() != text:
        print(f"{DOC} is stale: run python -m finetune_operator.cli.docs --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
