"""The result of a finished run, in S3 under ``output.uri``::

    adapter/         PEFT adapter (adapter_config.json + adapter_model.safetensors) and the tokenizer:
                     PeftModel.from_pretrained(base, "<output.uri>/adapter/") after a download
    merged/          only with output.merge (unquantised runs): base + adapter as one model
    manifest.json    written last: base model, method, data sha256s, final metrics, step, versions

A consumer that finds ``manifest.json`` finds everything it lists.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Any

from finetune_trainer.callbacks import Ranks, barrier
from finetune_trainer.data_checks import DatasetReport
from finetune_trainer.progress import now_iso
from finetune_trainer.runconfig import RunConfig
from finetune_trainer.s3 import ObjectStore
from finetune_trainer.uris import join

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "deepspeed", "bitsandbytes", "datasets")


def versions() -> dict[str, str]:
    found = {}
    for name in (*_PACKAGES, "finetune-operator"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def manifest(
    config: RunConfig,
    report: DatasetReport,
    *,
    step: int,
    epoch: float | None,
    metrics: dict[str, float],
    adapter_uri: str,
    merged_uri: str | None,
    files: list[str],
) -> dict[str, Any]:
    data: dict[str, Any] = {"train": {"uri": config.dataset.train, "sha256": report.sha256}}
    if report.eval is not None:
        data["eval"] = {"uri": report.eval.source, "sha256": report.eval.sha256}
    elif config.dataset.eval_fraction:
        data["eval"] = {"fraction": config.dataset.eval_fraction, "of": "train"}
    return {
        "job": config.job.model_dump(mode="json"),
        "method": config.method,
        "base_model": {"uri": config.model.uri, "quantization": config.model.quantization},
        "adapter": config.adapter.model_dump(mode="json"),
        "adapter_uri": adapter_uri,
        "adapter_files": files,
        "merged_uri": merged_uri,
        "data": data,
        "step": step,
        "epoch": epoch,
        "metrics": metrics,
        "hyperparameters": config.hyperparameters.model_dump(mode="json"),
        "versions": versions(),
        "time": now_iso(),
    }


def publish(
    trainer: Any,
    config: RunConfig,
    report: DatasetReport,
    store: ObjectStore,
    ranks: Ranks,
    *,
    workdir: Path,
    metrics: dict[str, float],
) -> str:
    """Save the adapter (all ranks: ZeRO-3 gathers it), then rank 0 uploads; returns the adapter URI."""
    local = workdir / "output" / "adapter"
    trainer.save_model(str(local))  # the PEFT adapter (frozen base excluded) and the tokenizer
    barrier()
    adapter_uri = join(config.output.uri, "adapter/")
    if ranks.rank == 0:
        store.upload_dir(local, adapter_uri)
        merged_uri = None
        if config.output.merge:
            merged_uri = join(config.output.uri, "merged/")
            store.upload_dir(merge(local, workdir), merged_uri)
        body = manifest(
            config,
            report,
            step=trainer.state.global_step,
            epoch=trainer.state.epoch,
            metrics=metrics,
            adapter_uri=adapter_uri,
            merged_uri=merged_uri,
            files=sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()),
        )
        store.put_bytes(join(config.output.uri, MANIFEST), json.dumps(body, indent=1).encode())
        log.info("adapter published to %s", adapter_uri)
    barrier()
    return adapter_uri


def merge(adapter_dir: Path, workdir: Path) -> Path:
    """Base + adapter as one model in the base model's own dtype, on the CPU (needs the model's size
    in host memory)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer.stage import Staged

    model_dir = Staged.read(workdir).model_dir
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    target = workdir / "output" / "merged"
    merged.save_pretrained(target)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(target)
    return target
