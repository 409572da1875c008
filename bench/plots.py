"""PNG plots of docs/benchmarks.md (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Result = dict[str, Any]
COLORS = {
    "operator": "#d62728",
    "jobs-only": "#7f7f7f",
    "full": "#1f77b4",
    "copy": "#7f7f7f",
    "boto3-default": "#ff7f0e",
    "ours": "#2ca02c",
}


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: stable files
    plt.close(fig)
    return path


def operator_plot(results: list[Result], path: Path) -> Path:
    """Time until every Job exists (and every status is written) per N, operator against baselines."""
    runs = sorted(results, key=lambda r: r["params"]["n"])
    phases = ["operator", "full", "jobs-only"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(phases)
    for i, phase in enumerate(phases):
        xs = [j + i * width for j, r in enumerate(runs) if phase in r["data"]]
        ys = [r["data"][phase]["jobs_s"] for r in runs if phase in r["data"]]
        ax.bar(xs, ys, width, label=f"{phase}: all Jobs exist", color=COLORS[phase])
    ax.set_xticks([j + width for j in range(len(runs))], [f"N = {r['params']['n']}" for r in runs])
    ax.set_ylabel("seconds (this machine)")
    ax.set_title("N FineTuneJobs at once: operator vs. the same objects from a plain client")
    ax.legend(fontsize=8)
    return _save(fig, path)


def checkpoints_plot(result: Result, path: Path) -> Path:
    """MB/s per set and direction: plain copy, boto3 defaults, ObjectStore (bars: median, whiskers: range)."""
    sets = list(result["data"])
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.6), squeeze=False)
    for ax, name in zip(axes[0], sets, strict=True):
        res = result["data"][name]["results"]
        groups = [
            ("copy", ["copy"]),
            ("upload", ["upload/boto3-default", "upload/ours"]),
            ("download", ["download/boto3-default", "download/ours"]),
        ]
        x = 0.0
        ticks = []
        for group, keys in groups:
            start = x
            for key in keys:
                rate = res[key]["mb_per_s"]
                variant = key.split("/")[-1]
                err = [[rate["median"] - rate["min"]], [rate["max"] - rate["median"]]]
                ax.bar(
                    x,
                    rate["median"],
                    0.8,
                    yerr=err,
                    color=COLORS[variant],
                    capsize=3,
                    label=variant if group != "copy" or name == sets[0] else None,
                )
                x += 1
            ticks.append(((start + x - 1) / 2, group))
            x += 0.6
        ax.set_xticks([t for t, _ in ticks], [label for _, label in ticks])
        ax.set_title(
            f"{name}: {result['data'][name]['files']} files, {result['data'][name]['bytes'] / 1e9:.2f} GB"
        )
        ax.set_ylabel("MB/s (this machine)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes[0][0].legend(unique.values(), unique.keys(), loc="upper right", fontsize=8)
    fig.suptitle(f"Checkpoint transfers, {result['label']} set", fontsize=10)
    return _save(fig, path)


def sweep_plot(result: Result, path: Path) -> Path:
    """One panel per set: upload and download MB/s of every point, boto3's defaults as lines."""
    rows = result["data"]["rows"]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    fig, axes = plt.subplots(len(sets), 1, figsize=(9, 3.2 * len(sets)), squeeze=False)
    for ax, name in zip(axes[:, 0], sets, strict=True):
        points = [r for r in rows if r["set"] == name and r["axis"] != "baseline"]
        base = next(r for r in rows if r["set"] == name and r["axis"] == "baseline")
        xs = range(len(points))
        for offset, (direction, color) in ((-0.2, ("upload", "#2ca02c")), (0.2, ("download", "#1f77b4"))):
            ax.bar(
                [x + offset for x in xs],
                [r[f"{direction}_mb_s"] for r in points],
                0.4,
                color=color,
                label=f"ObjectStore {direction}",
            )
            ax.axhline(
                base[f"{direction}_mb_s"],
                color=color,
                linestyle="--",
                alpha=0.6,
                label=f"boto3 defaults {direction}",
            )
        labels = [
            "{multipart_chunksize_mib}/{max_concurrency}/{max_parallel_files}".format(**r["settings"])
            for r in points
        ]
        ax.set_xticks(list(xs), labels, rotation=45, fontsize=7)
        ax.set_title(f"{name}: part MiB / threads per file / files at once", fontsize=9)
        ax.set_ylabel("MB/s (this machine)")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"ObjectStore settings sweep, {result['label']}", fontsize=10)
    return _save(fig, path)


def resume_plot(result: Result, path: Path) -> Path:
    """Process start to first step, scratch against resume; stacked by phase where recorded."""
    fig, ax = plt.subplots(figsize=(7, 2.8))
    kinds = [("scratch", "from scratch"), ("resume", "resumed from S3")]
    data = result["data"]
    labels = [label for _, label in kinds]
    if all("phases_s" in data[k] for k, _ in kinds):
        names = list(data["resume"]["phases_s"])
        left = [0.0 for _ in kinds]
        cmap = plt.get_cmap("tab10")
        for i, name in enumerate(names):
            widths = [data[k]["phases_s"].get(name, 0.0) for k, _ in kinds]
            ax.barh(labels, widths, left=left, color=cmap(i), label=name)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    else:
        values = [data[k]["first_step_s"] for k, _ in kinds]
        ax.barh(
            labels,
            [v["median"] for v in values],
            xerr=[[v["median"] - v["min"] for v in values], [v["max"] - v["median"] for v in values]],
            color=["#7f7f7f", "#2ca02c"],
            capsize=3,
        )
    ax.set_xlabel("process start \u2192 first training step, s (this machine)")
    return _save(fig, path)


def training_plot(result: Result, path: Path) -> Path:
    """Real tokens/s of every phase that ran, as a ratio to trl-defaults of the same run; one panel
    per method (the deepest layer count measured)."""
    depths = result["data"]["depths"]
    phases = depths[max(depths, key=int)]
    methods = [m for m, by_name in phases.items() if any("tokens_per_s" in p for p in by_name.values())]
    fig, axes = plt.subplots(
        1, max(1, len(methods)), figsize=(4.6 * max(1, len(methods)), 3.4), squeeze=False
    )
    for ax, method in zip(axes[0], methods, strict=False):
        ran = {n: p for n, p in phases[method].items() if "tokens_per_s" in p}
        base = ran.get("trl-defaults", {}).get("tokens_per_s")
        if not base:
            continue
        names = list(ran)
        values = [ran[n]["tokens_per_s"] / base for n in names]
        colors = [COLORS["boto3-default"] if n == "trl-defaults" else COLORS["ours"] for n in names]
        ax.barh(names[::-1], values[::-1], color=colors[::-1])
        ax.axvline(1.0, color="#7f7f7f", linestyle="--", linewidth=1)
        for y, value in enumerate(values[::-1]):
            ax.text(value, y, f" {value:.2f}x", va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.25)
        ax.set_title(f"{method.upper()}: real tokens/s \u00f7 trl-defaults", fontsize=9)
    fig.suptitle(f"Training throughput, {result['label']} (same run, same machine)", fontsize=10)
    return _save(fig, path)
