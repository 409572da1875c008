"""Realistic checkpoint folders on disk, filled with random bytes (compression or dedup cannot help).

``adapter``: what one checkpoint of a 70B, r=16, all-linear LoRA run under ZeRO-3 on 16 ranks holds,
scaled to ``gb`` (2.7 GB is the real size): the adapter (about 30 %), one optimizer-state shard per
rank (about 65 %), one small model-state file per rank, and the small files Hugging Face writes
(trainer state, scheduler, RNG states, configs).

``small``: many small shard files (``files`` of 64-512 KiB), the other extreme: per-request
overhead instead of bandwidth.

A set is generated once per size and reused (its manifest records what is there).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

KiB = 1024
CHUNK = 64 * 1024 * 1024
RANKS = 16


def _write_random(path: Path, size: int, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        left = size
        while left > 0:
            n = min(CHUNK, left)
            out.write(rng.bytes(n))
            left -= n


def adapter_layout(gb: float) -> dict[str, int]:
    """Relative path -> size of a ZeRO-3 LoRA checkpoint of ``gb`` GB (10^9 bytes)."""
    total = int(gb * 1e9)
    step = "global_step1200"
    layout = {
        "adapter_model.safetensors": int(total * 0.30),
        "adapter_config.json": 900,
        "trainer_state.json": 48 * KiB,
        "training_args.bin": 7 * KiB,
        "scheduler.pt": 1 * KiB,
        "latest": 15,
        "tokenizer.json": 9 * 1024 * KiB,
        "tokenizer_config.json": 50 * KiB,
        "special_tokens_map.json": 500,
    }
    optimizer = int(total * 0.65) // RANKS
    for rank in range(RANKS):
        layout[f"rng_state_{rank}.pth"] = 15 * KiB
        layout[f"{step}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] = optimizer
    model_states = max(0, total - sum(layout.values())) // RANKS
    for rank in range(RANKS):
        layout[f"{step}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt"] = model_states
    return layout


def small_layout(files: int, seed: int = 1) -> dict[str, int]:
    """``files`` shard files of 64-512 KiB in 20 folders (sizes fixed by ``seed``)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(64 * KiB, 512 * KiB, size=files, endpoint=True)
    return {f"shard-{i % 20:02d}/part-{i:05d}.bin": int(size) for i, size in enumerate(sizes)}


def materialise(root: Path, layout: dict[str, int], seed: int = 0) -> Path:
    """Write ``layout`` under ``root`` (reused if an identical set is already there); returns root."""
    manifest = root.parent / f"{root.name}.manifest.json"
    if root.is_dir() and manifest.is_file() and json.loads(manifest.read_text()) == layout:
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for relative, size in sorted(layout.items()):
        _write_random(root / relative, size, rng)
    manifest.write_text(json.dumps(layout))
    return root


def total_bytes(layout: dict[str, int]) -> int:
    return sum(layout.values())
