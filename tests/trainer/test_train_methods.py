"""Each method trains for real on CPU through the real entrypoint and lowers its loss.

One run per method also checks what that run published: checkpoints without base weights, an
adapter that PEFT loads, the manifest, and the progress reports.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from finetune_devenv.s3server import S3Server
from finetune_trainer.runconfig import CHECKPOINT_MARKER
from tests.trainer.conftest import NewRun, s3_keys

pytestmark = pytest.mark.trainer


def assert_learns(losses: dict[int, float], steps: int, *, drop: float) -> None:
    """The mean loss of the last three steps is at least ``drop`` below that of the first three
    (means, because each step sees other examples: one step's loss is noisy)."""
    assert sorted(losses) == list(range(1, steps + 1)), f"logged steps: {sorted(losses)}"
    first = sum(losses[s] for s in (1, 2, 3)) / 3
    last = sum(losses[s] for s in range(steps - 2, steps + 1)) / 3
    assert last < first - drop, f"loss did not go down enough: first steps {first:.4f}, last steps {last:.4f}"


def watch_progress(read: Any, stop: threading.Event, seen: list[dict[str, Any]]) -> None:
    while not stop.is_set():
        report = read()
        if report and (not seen or report != seen[-1]):
            seen.append(report)
        time.sleep(0.05)


# peft 0.21 still reads transformers' deprecated alias when it loads an adapter
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_sft_lora_learns_and_publishes(
    new_run: NewRun, s3_server: S3Server, s3_bucket: str, tiny_model: Path, tmp_path: Path
) -> None:
    run = new_run("sft-lora", output={"merge": True})
    seen: list[dict[str, Any]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch_progress, args=(run.progress, stop, seen), daemon=True)
    watcher.start()
    try:
        assert run.run() == 0, run.log_tail()
    finally:
        stop.set()
        watcher.join()
    assert_learns(run.losses(), 30, drop=1.0)

    # progress: the steps go up, checkpoints are listed (bounded by keep=2), the run ends finished
    steps = [r["step"] for r in seen if r["state"] == "training"]
    assert steps == sorted(steps) and len(set(steps)) >= 3, steps
    final = run.progress()
    assert final is not None
    assert final["state"] == "finished" and final["step"] == 30 and final["totalSteps"] == 30
    assert [c["step"] for c in final["checkpoints"]] == [30, 20]
    assert final["adapterUri"] == f"s3://{s3_bucket}/out/test/sft-lora/adapter/"
    assert final["tokensPerSecond"] > 0 and final["learningRate"] == pytest.approx(5e-3)

    # checkpoints: complete, retention applied, and no frozen base weight inside
    ckpt = s3_keys(s3_server, s3_bucket, "ckpt/test/sft-lora/")
    steps_in_s3 = sorted({k.split("/")[3] for k in ckpt if k.split("/")[3].startswith("step-")})
    assert steps_in_s3 == ["step-000000020", "step-000000030"]
    assert any(k.startswith("ckpt/test/sft-lora/tensorboard/events.out.tfevents") for k in ckpt)
    step30 = {k.split("/", 4)[4]: size for k, size in ckpt.items() if "/step-000000030/" in k}
    assert CHECKPOINT_MARKER in step30
    assert {
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
    } <= set(step30)
    base_size = (tiny_model / "model.safetensors").stat().st_size
    assert step30["adapter_model.safetensors"] < base_size / 4
    assert sum(step30.values()) < base_size, "a checkpoint must be smaller than the frozen base model"
    marker = json.loads(
        s3_server.client()
        .get_object(Bucket=s3_bucket, Key=f"ckpt/test/sft-lora/step-000000030/{CHECKPOINT_MARKER}")["Body"]
        .read()
    )
    assert marker["step"] == 30
    assert {f["path"]: f["size"] for f in marker["files"]} == {
        p: s for p, s in step30.items() if p != CHECKPOINT_MARKER
    }
    assert marker["fingerprint"]["adapter.r"] == 8 and marker["fingerprint"]["world_size"] == 1

    download = tmp_path / "download"
    client = s3_server.client()
    for key in step30:
        if key.endswith((".safetensors", ".pt", ".pth")):
            target = download / "ckpt" / key
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(s3_bucket, f"ckpt/test/sft-lora/step-000000030/{key}", str(target))
    assert_no_base_weights(download / "ckpt")

    # output: PEFT loads the adapter onto the base model; the manifest says what was trained on what
    out = s3_keys(s3_server, s3_bucket, "out/test/sft-lora/")
    for key in out:
        target = download / "out" / key.removeprefix("out/test/sft-lora/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(s3_bucket, key, str(target))
    manifest = json.loads((download / "out" / "manifest.json").read_text())
    assert manifest["method"] == "sft" and manifest["step"] == 30
    assert manifest["base_model"]["uri"] == str(tiny_model)
    assert len(manifest["data"]["train"]["sha256"]) == 64
    assert manifest["metrics"]["last_loss"] == pytest.approx(run.losses()[30])
    assert {"torch", "transformers", "peft", "trl"} <= set(manifest["versions"])
    assert manifest["merged_uri"] == f"s3://{s3_bucket}/out/test/sft-lora/merged/"
    assert_adapter_loads(tiny_model, download / "out" / "adapter", merged=download / "out" / "merged")


def assert_no_base_weights(folder: Path) -> None:
    """Every tensor in every checkpoint file belongs to the adapter (or is optimizer state of it)."""
    import torch
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for path in folder.rglob("*.safetensors"):
        tensors.update(load_file(path))
    assert tensors and all("lora_" in name for name in tensors), sorted(tensors)[:5]
    for path in folder.rglob("*.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)
        for name in _tensor_names(state):
            assert "lora_" in name or not name.endswith(".weight"), f"{path.name}: {name}"


def _tensor_names(state: Any, prefix: str = "") -> list[str]:
    if isinstance(state, dict):
        return [n for k, v in state.items() for n in _tensor_names(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if hasattr(state, "shape") else []


def assert_adapter_loads(base_dir: Path, adapter_dir: Path, *, merged: Path | None = None) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    ids: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        tuned = model(**ids).logits
        with model.disable_adapter():
            plain = model(**ids).logits
    assert not torch.allclose(tuned, plain), "the adapter changes nothing"
    if merged is not None:  # base + adapter folded into one model computes the same
        with torch.no_grad():
            folded = AutoModelForCausalLM.from_pretrained(merged)(**ids).logits
        assert torch.allclose(folded, tuned, atol=1e-4)


def test_sft_qlora_with_packing_learns(new_run: NewRun) -> None:
    run = new_run("sft-qlora", model={"quantization": "nf4"}, dataset={"packing": True})
    assert run.run() == 0, run.log_tail()
    assert "weights in 4-bit nf4" in run.log_text()
    assert_learns(run.losses(), 30, drop=1.0)
    # 42 short conversations fill a few 128-token rows: an epoch is 2 steps, not 6 as without packing
    assert run.progress()["epoch"] > 10  # type: ignore[index]


def test_dpo_learns_from_ln2(new_run: NewRun) -> None:
    run = new_run(
        "dpo",
        method="dpo",
        dataset={"train": str(Path(__file__).parents[1] / "data" / "preference_small.jsonl")},
        hyperparameters={"beta": 0.1},
    )
    assert run.run() == 0, run.log_tail()
    losses = run.losses()
    # The adapter starts at zero, so the policy equals the reference (the base, adapter disabled).
    assert losses[1] == pytest.approx(math.log(2), abs=1e-3)
    assert_learns(losses, 30, drop=0.3)
    assert run.progress()["state"] == "finished"  # type: ignore[index]
