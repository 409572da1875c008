"""``python -m bench.checkpoints sweep``: which TransferSettings move checkpoints fastest.

Every point is timed like ``bench.checkpoints`` times ObjectStore (fresh server per upload, then the
download from it), next to boto3's defaults in the same run; repetitions go round all points in
turn, so a change in the machine's load spreads over every point instead of favouring one.
Without ``--points`` it varies one setting at a time around the current defaults, then tries a few
combinations; ``--points 64/8/4,32/4/8`` (part MiB / threads per file / files at once) measures
only those.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench import ckpt_sets
from bench.checkpoints import Bench, prepare_sets, settings_dict
from bench.common import MB, WORK, MiB, Run, filesystem, log
from finetune_trainer.s3 import TransferSettings


def sweep_points(base: TransferSettings) -> list[tuple[str, TransferSettings]]:
    """The current defaults, one setting varied at a time around them, then a few combinations."""

    def with_(**changes: int) -> TransferSettings:
        values = {**settings_dict(base), **changes}
        return settings_of(
            values["multipart_chunksize_mib"], values["max_concurrency"], values["max_parallel_files"]
        )

    points = [("current defaults", base)]
    points += [("part size", with_(multipart_chunksize_mib=part)) for part in (8, 16, 32, 64, 128)]
    points += [("threads per file", with_(max_concurrency=threads)) for threads in (4, 8, 16)]
    points += [("files at once", with_(max_parallel_files=files)) for files in (1, 2, 4, 8, 16)]
    points += [("combination", settings_of(*combination)) for combination in COMBINATIONS]
    unique: dict[TransferSettings, str] = {}
    for axis, settings in points:
        unique.setdefault(settings, axis)  # the base point lies on every axis: measure it once
    return [(axis, settings) for settings, axis in unique.items()]


def settings_of(part_mib: int, threads: int, files: int) -> TransferSettings:
    return TransferSettings(part_mib * MiB, part_mib * MiB, threads, files)


def parse_points(text: str) -> list[tuple[str, TransferSettings]]:
    """``"64/8/4,32/4/8"`` (part MiB / threads per file / files at once) -> candidate points."""
    if not text:
        return []
    try:
        return [("candidate", settings_of(*map(int, item.split("/")))) for item in text.split(",")]
    except (TypeError, ValueError):
        raise SystemExit(f"--points {text!r}: expected PART_MIB/THREADS/FILES[,...]") from None


COMBINATIONS = [(32, 4, 8), (16, 4, 16), (32, 8, 16)]
"""(part MiB, threads per file, files at once) tried together after the one-at-a-time sweep."""


def run_sweep(
    gb: float, small_files: int, reps: int, base: TransferSettings, chosen: list[tuple[str, TransferSettings]]
) -> None:
    sets = prepare_sets(gb, small_files)
    label = f"{gb:g}gb" + ("-candidates" if chosen else "")
    run = Run("checkpoint-sweep", label, {"gb": gb, "small_files": small_files, "reps": reps})
    run.params["base"] = settings_dict(base)
    run.params["disk"] = filesystem(WORK)
    bench = Bench(WORK)
    all_points: list[tuple[str, TransferSettings | None]] = [
        ("baseline", None),
        *(chosen or sweep_points(base)),
    ]
    rows: list[dict[str, Any]] = []
    for name, (root, layout) in sets.items():
        size = ckpt_sets.total_bytes(layout)
        points = all_points
        if max(layout.values()) < min(s.multipart_threshold for _, s in all_points if s is not None):
            # every file is one PUT/GET: part size and threads per file cannot matter
            points = [p for p in all_points if p[0] not in ("part size", "threads per file")]
        times: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(points))}
        for _ in range(reps):
            for i, (_, settings) in enumerate(points):
                variant = "boto3-default" if settings is None else "ours"
                sample, server = bench.time_upload(variant, root, settings)
                up = sample.seconds
                try:
                    down = bench.time_download(variant, server, root, settings).seconds
                finally:
                    bench.dispose(server)
                times[i].append((up, down))
                log(
                    f"  {name} {points[i][0]} {settings_dict(settings) if settings else 'boto3'}: "
                    f"up {size / MB / up:.0f} MB/s, down {size / MB / down:.0f} MB/s"
                )
        for i, (axis, settings) in enumerate(points):
            up = statistics.median(t[0] for t in times[i])
            down = statistics.median(t[1] for t in times[i])
            rows.append(
                {
                    "set": name,
                    "axis": axis,
                    "settings": settings_dict(settings) if settings else None,
                    "upload_mb_s": size / MB / up,
                    "download_mb_s": size / MB / down,
                }
            )
    run.data["rows"] = rows
    run.save()
