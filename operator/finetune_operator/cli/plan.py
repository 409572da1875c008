"""``ftjob plan``: will the job fit its GPUs, and what is the smallest layout that does?

The numbers come from :mod:`finetune_operator.memory` (pure, documented term by term) and the
model's ``config.json``; how close they are to measured peaks is in docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from finetune_operator import memory
from finetune_operator.cli import manifests, output
from finetune_operator.cli.errors import CliError
from finetune_operator.cli.storage import add_s3_option, endpoint_for, object_store, storage_error
from finetune_operator.defaults import resolve_hyperparameters
from finetune_trainer.s3 import StorageError
from finetune_trainer.uris import parse_uri

TERM_LABELS = {
    "base_weights": "base weights",
    "zero3_gather": "ZeRO-3 gathered layers",
    "lora_params": "LoRA parameters",
    "lora_grads": "LoRA gradients",
    "optimizer": "optimizer state",
    "activations": "activations",
    "logits": "logits tiles",
    "dequant": "4-bit dequantised weight",
    "overhead": "framework overhead",
}


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "plan",
        help="estimate per-GPU memory and the smallest nodes x GPUs layout that fits",
        description="Estimate the peak memory of one training process (per GPU) from the model's "
        "config.json: base weights (nf4 or bf16), LoRA parameters, gradients and optimizer state, "
        "activations with gradient checkpointing, logits, ZeRO sharding over the world size. Says whether "
        "the requested GPUs fit and which is the smallest layout that does. Takes a FineTuneJob manifest, "
        "flags, or both (flags win). Exits 1 when the requested layout does not fit.",
    )
    parser.add_argument(
        "manifest", nargs="?", help="FineTuneJob YAML to plan (optional: flags alone work too)"
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", metavar="URI", help="model folder with config.json: local, s3://, pvc:// or hf://"
    )
    model.add_argument(
        "--model-config", metavar="PATH", help="a local config.json (or its folder); wins over --model"
    )
    model.add_argument("--quantization", choices=("nf4", "none"), help="nf4 (QLoRA) or none (bf16 LoRA)")
    run = parser.add_argument_group("training")
    run.add_argument("--method", choices=("sft", "dpo"), help="dpo doubles the sequences per step")
    run.add_argument("--lora-r", type=int, help="LoRA rank (default: the manifest's, else 16)")
    run.add_argument("--targets", help="comma-separated adapted layers, or all-linear (default)")
    run.add_argument("--lora-dropout", type=float, help="LoRA dropout (keeps a mask per adapted layer)")
    run.add_argument(
        "--seq-length", type=int, help="tokens per sequence (dataset.maxSeqLength; default 2048)"
    )
    run.add_argument("--micro-batch", type=int, help="sequences per GPU per step (perDeviceBatchSize)")
    run.add_argument(
        "--no-gradient-checkpointing",
        dest="checkpointing",
        action="store_false",
        default=None,
        help="keep every layer's activations instead of recomputing them",
    )
    layout = parser.add_argument_group("layout")
    layout.add_argument("--nodes", type=int, help="nodes (resources.nodes; default 1)")
    layout.add_argument("--gpus-per-node", type=int, help="GPUs per node (resources.gpusPerNode; default 1)")
    layout.add_argument(
        "--zero-stage", type=int, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage (default 3)"
    )
    layout.add_argument("--offload", choices=("none", "optimizer", "all"), help="offload to host memory")
    layout.add_argument(
        "--gpu-memory",
        default="80GiB",
        help="memory of one GPU, e.g. 80GiB (H100), 141GiB (H200) (default: %(default)s)",
    )
    layout.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        help="cpu plans a CPU run (fp32, no CUDA context): per process, against resources.memory "
        "(default: cpu when gpusPerNode is 0)",
    )
    add_s3_option(parser)
    output.add_output_option(parser)
    parser.set_defaults(run=run_plan)


def setup_from(
    args: argparse.Namespace, manifest: manifests.Manifest | None
) -> tuple[memory.TrainingSetup, int, str]:
    """The training setup, the layout's nodes, and the model URI: manifest values, flags on top."""
    spec = manifest.job.spec if manifest else None
    hp = resolve_hyperparameters(spec) if spec else None
    targets = (
        tuple(args.targets.split(","))
        if args.targets
        else tuple(spec.adapter.target_modules if spec else ("all-linear",))
    )
    nodes = args.nodes or (spec.resources.nodes if spec else 1)
    gpus = (
        args.gpus_per_node
        if args.gpus_per_node is not None
        else (spec.resources.gpus_per_node if spec else 1)
    )
    device: Literal["cuda", "cpu"] = args.device or ("cpu" if gpus == 0 else "cuda")
    setup = memory.TrainingSetup(
        method=args.method or (spec.method if spec else "sft"),
        quantization=args.quantization or (spec.model.quantization if spec else "nf4"),
        lora_r=args.lora_r or (spec.adapter.r if spec else 16),
        lora_targets=targets,
        lora_dropout=args.lora_dropout
        if args.lora_dropout is not None
        else (spec.adapter.dropout if spec else 0.05),
        seq_length=args.seq_length or (spec.dataset.max_seq_length if spec else 2048),
        micro_batch=args.micro_batch or (hp.per_device_batch_size if hp else 1),
        gradient_checkpointing=args.checkpointing
        if args.checkpointing is not None
        else (hp.gradient_checkpointing if hp else True),
        zero_stage=args.zero_stage
        if args.zero_stage is not None
        else (spec.distributed.zero_stage if spec else 3),
        offload=args.offload or (spec.distributed.offload if spec else "none"),
        world_size=nodes * max(gpus, 1),
        device=device,
    )
    model_uri = args.model or (spec.model.uri if spec else "")
    return setup, nodes, model_uri


def read_model_config(
    args: argparse.Namespace, model_uri: str, spec: dict[str, Any] | None
) -> dict[str, Any]:
    """The model's config.json: ``--model-config``, else from the model URI."""
    if args.model_config:
        path = Path(args.model_config)
        path = path / "config.json" if path.is_dir() else path
        return _json(_read_local(path), str(path))
    if not model_uri:
        raise CliError("no model to plan for", "give a manifest, --model URI or --model-config config.json")
    try:
        parsed = parse_uri(model_uri)
    except ValueError as exc:
        raise CliError(str(exc), "fix --model") from None
    where = f"{model_uri.rstrip('/')}/config.json"
    if parsed.scheme == "s3":
        try:
            return _json(object_store(endpoint_for(args, spec)).read_bytes(where), where)
        except StorageError as exc:
            raise storage_error(exc) from None
    if parsed.scheme == "hf":
        return _json(_read_hub(parsed.repo_id, parsed.revision, model_uri), where)
    path = parsed.local_path()
    return _json(_read_local(path / "config.json" if path.suffix != ".json" else path), where)


def _read_local(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(
            f"cannot read {path}: {exc.strerror or exc}", "pass --model-config with the model's config.json"
        ) from None


def _read_hub(repo: str, revision: str | None, uri: str) -> bytes:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, "config.json", revision=revision)).read_bytes()
    except Exception as exc:  # no package, offline, no such repo: the way out is the same
        raise CliError(
            f"cannot read config.json of {uri} ({type(exc).__name__})",
            "pass --model-config with a local copy of the model's config.json",
        ) from None


def _json(data: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        raise CliError(f"{where} is not JSON", "point --model-config at the model's config.json") from None
    if not isinstance(value, dict):
        raise CliError(f"{where} is not a JSON object", "point --model-config at the model's config.json")
    return value


def capacity_for(
    args: argparse.Namespace, setup: memory.TrainingSetup, manifest: manifests.Manifest | None
) -> int | None:
    """Bytes one process may use: a GPU's memory, or on the CPU the pod's memory limit (if set)."""
    try:
        if setup.device == "cuda":
            return memory.parse_size(args.gpu_memory)
        limit = manifest.job.spec.resources.memory if manifest else None
        return memory.parse_size(limit) if limit else None
    except ValueError as exc:
        raise CliError(str(exc), "e.g. --gpu-memory 80GiB") from None


def run_plan(args: argparse.Namespace) -> int:
    manifest = manifests.load_one(args.manifest) if args.manifest else None
    setup, nodes, model_uri = setup_from(args, manifest)
    raw_spec = manifest.raw.get("spec") if manifest else None
    try:
        shape = memory.ModelShape.from_config(read_model_config(args, model_uri, raw_spec))
        result = memory.estimate(shape, setup)
        capacity = capacity_for(args, setup, manifest)
        smallest = (
            memory.smallest_layout(shape, setup, capacity) if capacity and setup.device == "cuda" else None
        )
    except ValueError as exc:
        raise CliError(str(exc), "check the flags and the model's config.json") from None
    gpus = setup.world_size // nodes
    fits = capacity is None or result.fits(capacity)
    report = _report(model_uri or args.model_config, result, nodes, gpus, capacity, smallest)
    print(_table(report, result) if args.output == "table" else output.dump(report, args.output))
    if fits:
        return 0
    hint = (
        f"use {smallest.nodes} node(s) x {smallest.gpus_per_node} GPU(s) (resources.nodes/gpusPerNode)"
        if smallest
        else "no layout up to 64 nodes x 8 GPUs fits: use nf4, ZeRO-3, offload, a shorter maxSeqLength "
        "or a smaller perDeviceBatchSize"
    )
    unit = "GPU" if setup.device == "cuda" else "process"
    raise CliError(
        f"does not fit: {output.gib(result.total)} per {unit} needed, {output.gib(capacity or 0)} available",
        hint,
    )


def _report(
    model: str,
    result: memory.Estimate,
    nodes: int,
    gpus: int,
    capacity: int | None,
    smallest: memory.Layout | None,
) -> dict[str, Any]:
    return {
        "model": model,
        "parameters": result.shape.parameters(),
        "loraParameters": result.lora_parameters,
        "setup": asdict(result.setup),
        "layout": {"nodes": nodes, "gpusPerNode": gpus, "worldSize": result.setup.world_size},
        "bytes": result.terms,
        "totalBytes": result.total,
        "hostOffloadBytes": result.host_offload,
        "capacityBytes": capacity,
        "fits": None if capacity is None else result.fits(capacity),
        "smallestLayout": None
        if smallest is None
        else {
            "nodes": smallest.nodes,
            "gpusPerNode": smallest.gpus_per_node,
            "totalBytes": smallest.estimate.total,
        },
        "peakPhase": result.peak_phase,
        "notes": result.notes,
    }


def _table(report: dict[str, Any], result: memory.Estimate) -> str:
    s = result.setup
    unit = "GPU" if s.device == "cuda" else "process"
    targets = ",".join(s.lora_targets)
    lines = [
        f"model:   {report['model']} ({report['parameters'] / 1e9:.2f}B parameters, "
        f"{report['loraParameters'] / 1e6:.1f}M LoRA parameters)",
        f"setup:   {s.method}, {s.quantization}, LoRA r={s.lora_r} {targets}, {s.seq_length} tokens x "
        f"{s.micro_batch} sequence(s), gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}, "
        f"ZeRO-{s.zero_stage}, offload {s.offload}, {s.device}",
        f"layout:  {report['layout']['nodes']} node(s) x {report['layout']['gpusPerNode']} GPU(s) "
        f"(world size {s.world_size})",
        "",
        output.table(
            ("term", f"per {unit}"), [(TERM_LABELS[k], output.gib(v)) for k, v in result.terms.items() if v]
        ),
        f"{'total':<26}{output.gib(result.total)}",
    ]
    peak = (
        "the LM head's logits tiles" if result.peak_phase == "head" else "the last decoder layer's backward"
    )
    lines.append(f"(activations at the peak, during {peak})")
    if result.host_offload:
        lines.append(f"{'in host memory (offload)':<26}{output.gib(result.host_offload)} per rank")
    capacity = report["capacityBytes"]
    lines.append("")
    if capacity is None:
        lines.append("fits:    unknown (no memory limit to compare with: set resources.memory)")
    else:
        share = 100 * result.total / capacity
        verdict = "yes" if report["fits"] else "NO"
        used = f"{output.gib(result.total)} of {output.gib(capacity)} per {unit}"
        lines.append(f"fits:    {verdict}, {used} ({share:.0f}%)")
    smallest = report["smallestLayout"]
    if smallest:
        lines.append(
            f"smallest layout that fits: {smallest['nodes']} node(s) x {smallest['gpusPerNode']} GPU(s) "
            f"({output.gib(smallest['totalBytes'])} per GPU)"
        )
    elif capacity is not None and s.device == "cuda":
        lines.append("smallest layout that fits: none up to 64 nodes x 8 GPUs")
    lines += [f"note:    {n}" for n in result.notes]
    return "\n".join(lines)
