"""What every benchmark shares: the machine it ran on, its results file, and small statistics.

A result is one JSON file ``bench/results/<bench>-<label>.json``::

    {"bench": "checkpoints", "label": "2.7gb", "machine": {...}, "started": "...", "duration_s": 812.4,
     "command": "python -m bench.checkpoints --gb 2.7", "params": {...}, "data": {...}}

``machine`` names the CPU, cores, memory and the load average before and after the run: the
development machines are shared, and a ratio measured under load says so next to it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORK = Path(os.environ.get("FTJ_BENCH_DIR", REPO / ".local" / "bench"))
MB = 1_000_000  # throughput is in MB/s (10^6 bytes), as disks and networks are quoted
MiB = 1024 * 1024


def env_float(name: str, default: float) -> float:
    """A numeric knob from the environment, with the variable named when it is not a number."""
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: expected a number") from None


def env_ints(name: str, default: Sequence[int]) -> list[int]:
    """A comma-separated list of integers from the environment (e.g. FTJ_BENCH_OPERATOR_N=100,500)."""
    raw = os.environ.get(name, "")
    if not raw:
        return list(default)
    try:
        return [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: expected comma-separated integers") from None


def filesystem(path: Path) -> dict[str, str]:
    """Device and type of the filesystem holding ``path`` (from /proc/mounts: longest mount prefix)."""
    target = str(path.resolve())
    best = {"mount": "/", "device": "?", "type": "?"}
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount, fstype, *_ = line.split()
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best["mount"]):
            best = {"mount": mount, "device": device, "type": fstype}
    return best


def loadavg() -> float:
    """1-minute load average: other work on a shared machine shows up here."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def proc_stats(pid: int) -> dict[str, float]:
    """CPU seconds (user + system), current and peak resident memory (VmRSS, VmHWM) in MiB."""
    ticks = 100.0  # os.sysconf("SC_CLK_TCK") is 100 on Linux
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out = {"cpu_s": (int(fields[11]) + int(fields[12])) / ticks}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[f"{key.lower()}_mib"] = int(value.split()[0]) / 1024
    return out


def machine() -> dict[str, Any]:
    """What a reader needs to weigh an absolute figure: CPU, cores, memory, OS, Python."""
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "hostname": platform.node(),
        "cpu": model,
        "cores": os.cpu_count() or 0,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gpu": gpu_name(),
    }


def gpu_name() -> str | None:
    """The first GPU's name and how many there are (``nvidia-smi``), or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or not names:
        return None
    return names[0] if len(names) == 1 else f"{len(names)} x {names[0]}"


def git_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=False
    )
    return done.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


@dataclass
class Run:
    """One benchmark run; ``save`` writes it under bench/results/ with the machine and timings."""

    bench: str
    label: str
    params: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    load_before: float = field(default_factory=loadavg)

    def save(self, folder: Path = RESULTS) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        out = {
            "bench": self.bench,
            "label": self.label,
            "machine": {**machine(), "load_before": self.load_before, "load_after": loadavg()},
            "started": datetime.fromtimestamp(self.started, UTC).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.started, 1),
            "commit": git_commit(),
            "command": " ".join([*knobs(), "python", "-m", *map(shlex.quote, _module_argv())]),
            "params": self.params,
            "data": self.data,
        }
        path = folder / f"{self.bench}-{self.label}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}", file=sys.stderr)
        return path


def knobs() -> list[str]:
    """The FTJ_BENCH_* size knobs that were set, as ``NAME=value`` words of the command (not the
    scratch folder: it changes nothing measured, and the checkpoint results record its disk)."""
    return [
        f"{k}={shlex.quote(v)}"
        for k, v in sorted(os.environ.items())
        if k.startswith("FTJ_BENCH_") and k != "FTJ_BENCH_DIR"
    ]


def _module_argv() -> list[str]:
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    name = spec.name if spec is not None else Path(sys.argv[0]).stem
    name = name.removesuffix(".__main__")  # `python -m bench`, as `make bench` runs it
    return [name, *sys.argv[1:]]


def load_results(folder: Path = RESULTS) -> list[dict[str, Any]]:
    """Every result file, sorted by bench and label."""
    found = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return sorted(found, key=lambda r: (r["bench"], r["label"]))


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max) of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank: with 100 values p99 is the 99th smallest."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """``with stopwatch() as t: ...`` then ``t[0]`` is the elapsed wall time in seconds."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
