"""bench.report: docs/benchmarks.md and its plots from a small fixture of results (no benchmark runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import report, tables
from bench.common import percentile, summary

pytestmark = pytest.mark.unit

MACHINE = {
    "cpu": "Test CPU",
    "cores": 2,
    "memory_gib": 24.0,
    "gpu": None,
    "load_before": 1.0,
    "load_after": 2.0,
}


def result(bench: str, label: str, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    return {
        "bench": bench,
        "label": label,
        "machine": MACHINE,
        "started": "2026-11-21T20:00:00+00:00",
        "duration_s": 90.0,
        "commit": "abc1234",
        "command": f"python -m bench.{bench} --x",
        "params": params,
        "data": data,
    }


def phase(jobs_s: float, status_s: float | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"jobs_s": jobs_s, "job_latency_s": {"p50": 1.0, "p99": 2.0, "max": 2.5}}
    out["requests"] = {"POST jobs": 11, "LIST pods": 22 if "operator_peak_rss_mib" in extra else 0}
    if status_s is not None:
        out |= {"status_s": status_s, "status_latency_s": {"p50": 1.5, "p99": 3.0, "max": 3.0}}
    return out | extra


def operator_result(n: int = 10, rss: float = 120.0) -> dict[str, Any]:
    data = {
        "operator": phase(10.0, 12.0, operator_peak_rss_mib=rss, cpu_s={"operator": 3.0}),
        "jobs-only": phase(2.0),
        "full": phase(5.0, 6.0),
    }
    return result("operator-scale", f"n{n}", {"n": n, "concurrency": 4}, data)


def rates(seconds: list[float], size: float) -> dict[str, Any]:
    return {
        "seconds": summary(seconds),
        "mb_per_s": summary([size / 1e6 / s for s in seconds]),
        "client_cpu_s": 1.5,
        "server_cpu_s": 4.0,
    }


def checkpoint_result() -> dict[str, Any]:
    size = 1e9
    results = {
        "copy": rates([1.0, 1.0, 1.0], size),
        "upload/boto3-default": rates([20.0, 20.0, 22.0], size),
        "upload/ours": rates([10.0, 10.0, 11.0], size),
        "download/boto3-default": rates([8.0, 8.0, 8.0], size),
        "download/ours": rates([4.0, 4.0, 5.0], size),
    }
    settings = {
        "multipart_threshold_mib": 32,
        "multipart_chunksize_mib": 32,
        "max_concurrency": 4,
        "max_parallel_files": 8,
    }
    params = {
        "gb": 1.0,
        "small_files": 10,
        "reps": 3,
        "settings": settings,
        "disk": {"device": "/dev/vda", "type": "ext4", "mount": "/"},
    }
    return result("checkpoints", "1gb", params, {"adapter": {"files": 50, "bytes": size, "results": results}})


def sweep_result() -> dict[str, Any]:
    base = {
        "set": "adapter",
        "axis": "baseline",
        "settings": None,
        "upload_mb_s": 50.0,
        "download_mb_s": 100.0,
    }
    settings = {
        "multipart_threshold_mib": 8,
        "multipart_chunksize_mib": 8,
        "max_concurrency": 4,
        "max_parallel_files": 8,
    }
    point = {
        "set": "adapter",
        "axis": "files at once",
        "settings": settings,
        "upload_mb_s": 75.0,
        "download_mb_s": 300.0,
    }
    combination = {**point, "axis": "combination", "upload_mb_s": 60.0}
    return result("checkpoint-sweep", "1gb", {"gb": 1.0, "reps": 1}, {"rows": [base, point, combination]})


def resume_result() -> dict[str, Any]:
    def kind(seconds: list[float], step: float, checkpoint: float) -> dict[str, Any]:
        phases = {
            "launcher start": 1.0,
            "checkpoint": checkpoint,
            "model load": seconds[0] - 1.0 - checkpoint,
        }
        return {"first_step_s": summary(seconds), "first_logged_step": step, "phases_s": phases, "runs": []}

    data = {
        "checkpoint_bytes": 270_000,
        "scratch": kind([20.0, 20.0], 1, 0.0),
        "resume": kind([25.0, 25.0], 11, 1.5),
    }
    params = {"reps": 2, "model": "tiny", "phases": {"checkpoint": "download and check it"}}
    return result("resume", "tiny", params, data)


def plan_result() -> dict[str, Any]:
    spec = {"h": 64, "L": 2, "vocab": 384, "quantization": "nf4", "seq": 128, "batch": 2, "ckpt": True}
    row = {
        "case": "qlora",
        "spec": spec,
        "estimate_mib": 110.0,
        "measured_mib": 100.0,
        "terms_mib": {"activations": 60.0, "base_weights": 30.0, "overhead": 20.0},
    }
    return result("plan-accuracy", "cpu", {"what": "CPU runs"}, {"rows": [row]})


def training_phase(
    tps: float, peak: float, micro: int = 8, accumulation: int = 1, **extra: Any
) -> dict[str, Any]:
    return {
        "tokens_per_s": tps,
        "all_tokens_per_s": 2 * tps,
        "padding_share": 0.5,
        "step_s_p50": 0.25,
        "peak_mib": peak,
        "micro_batch": micro,
        "accumulation": accumulation,
        **extra,
    }


def training_result(device: str = "cpu", layers: tuple[int, ...] = (4,)) -> dict[str, Any]:
    on_gpu = device == "cuda"
    params = {
        "device": device,
        "gpu": "NVIDIA H100 80GB HBM3" if on_gpu else None,
        "shape_name": "llama-3.1-70b" if on_gpu else "tiny",
        "shape": {"hidden": 128, "layers": 80 if on_gpu else 4, "heads": 4, "kv_heads": 2},
        "precision": "QLoRA: NF4 base, bf16 compute" if on_gpu else "LoRA, fp32 (no 4-bit on CPU)",
        "cpu_threads": None if on_gpu else 1,
        "lora_r": 16,
        "reps": 2,
        "data": "log-normal lengths",
    }
    params["shape"] |= {"intermediate": 384, "vocab": 512}
    mfu = {"mfu": 0.4} if on_gpu else {"tokens_per_cpu_s": 2000.0}
    depths = {
        str(k): {
            "sft": {
                "trl-defaults": training_phase(1000.0 / k, 1000.0 * k, **mfu),
                "ours": training_phase(1500.0 / k, 1100.0 * k, 16, 4, **mfu),
                "ours+packing": training_phase(3000.0 / k, 1200.0 * k, 16, 4, **mfu) | {"padding_share": 0.0},
                "ours+liger": {"not_run": "GPU only: Liger's kernels are Triton kernels"},
            },
            "dpo": {
                "trl-defaults": training_phase(800.0 / k, 900.0 * k, **mfu),
                "ours": {"failed": "Traceback ...\nRuntimeError: boom | here"},
            },
        }
        for k in layers
    }
    data: dict[str, Any] = {
        "workload": {"sft": {"examples": 900, "tokens_median": 31, "tokens_p90": 67, "tokens_max": 125}},
        "depths": depths,
    }
    if on_gpu:
        extra = {"tokens_per_s": 20.0, "peak_mib": 50_000.0, "from_layers": list(layers)}
        data |= {
            "full_layers": 80,
            "extrapolated": {"sft": {"trl-defaults": extra, "ours": extra | {"tokens_per_s": 30.0}}},
        }
    label = "h100-llama-3.1-70b-4l-8l" if on_gpu else "cpu-tiny"
    return result("training", label, params, data)


def all_results() -> list[dict[str, Any]]:
    return [
        checkpoint_result(),
        sweep_result(),
        operator_result(),
        plan_result(),
        resume_result(),
        training_result(),
    ]


def test_every_figure_comes_with_its_ratio_to_the_baseline() -> None:
    page = report.render(all_results())
    # operator: 10 s against 2 s (jobs only) and 5 s (full); statuses 12 s against 6 s
    assert "| 10 | operator | 10.00 | 5.00x | 2.00x | n/a | 12.00 | 2.00x |" in page
    assert "| 10 | full | 5.00 | 2.50x | 1.00x | n/a | 6.00 | 1.00x |" in page
    # checkpoints: ObjectStore uploads at 100 MB/s, boto3 at 50, a plain copy at 1000
    assert (
        "| adapter (50 files, 1.00 GB) | upload | ObjectStore | 10.00 | 100 (91-100) | 2.00x | 0.10x "
        "| 1.5 / 4.0 |" in page
    )
    assert (
        "| adapter (50 files, 1.00 GB) | download | boto3 defaults | 8.00 | 125 (125-125) | 1.00x | 0.12x |"
        in page
    )
    assert "32 MiB parts (threshold 32 MiB), 4 threads per file, 8 files at once" in page
    # sweep rows against boto3's defaults of the same run
    assert "| adapter | files at once | 8 | 4 | 8 | 75 | 1.50x | 300 | 3.00x |" in page
    # resume against scratch, and the derived 2.7 GB figure at the measured 250 MB/s download
    assert "| resumed from S3 | 11 | 25.0 (25.0-25.0) | 1.25x |" in page
    assert "adds about 11 s of download at the 250 MB/s" in page
    # the resume's phases next to scratch's, with the difference
    assert "| checkpoint | 0.00 | 1.50 | 1.50 | download and check it |" in page
    assert "| **sum** | 20.00 | 25.00 | 5.00 |  |" in page
    assert "| qlora | h 64, 2 layers, vocab 384 | nf4 | 2 x 128 | yes | 110 | 100 | 1.10x |" in page


def test_targets_and_machines_are_stated() -> None:
    page = report.render([operator_result(n=1000, rss=260.0)])
    assert (
        "N = 1000: 5.00x of jobs-only (not met); 2.00x of full (not met); peak RSS 273 MB (over 250 MB)"
        in page
    )
    assert (
        "| `operator-scale-n1000` | 2026-11-21 20:00 | Test CPU, 2 cores, 24 GiB | 1.0 → 2.0 | 1.5 |" in page
    )
    assert "`python -m bench.operator-scale --x`" in page
    # requests per item count the warm-up item: 22 LISTs over 10 + 1 items
    assert "| `LIST pods` | 2.00 | 0.00 | 0.00 |" in report.render([operator_result(n=10)])


def test_tagged_operator_runs_are_reported_as_experiments() -> None:
    experiment = operator_result()
    experiment["label"], experiment["params"]["tag"] = "n10-fix", "fix"
    experiment["data"]["operator-patched"] = experiment["data"].pop("operator")
    page = report.render([operator_result(), experiment])
    main, experiments = page.split("### Experiments: proposed operator changes")
    assert "| 10 | operator-patched | 10.00 | 5.00x | 2.00x |" in experiments
    assert "operator-patched" not in main.split("## 1. Operator")[1].split("| N |")[1]


def test_missing_benchmarks_are_marked_todo() -> None:
    page = report.render([])
    assert "Not measured yet: run `python -m bench.checkpoints`." in page
    assert "**No GPU figures yet.**" in page
    assert "python -m bench.training --device cuda --shape llama-3.1-8b --method sft" in page
    assert "**TODO**: `ftjob plan`'s CPU estimate" in page


def test_findings_are_copied_below_the_tables() -> None:
    page = report.render([operator_result()], findings="## Findings\n\nThe operator lists too much.\n")
    assert page.rstrip().endswith("The operator lists too much.")


def test_main_writes_the_page_and_plots_and_drops_stale_plots(tmp_path: Path) -> None:
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    for r in all_results():
        (results / f"{r['bench']}-{r['label']}.json").write_text(json.dumps(r))
    stale = docs / "img" / "bench-checkpoints-9gb.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")

    assert report.main(["--results", str(results), "--docs", str(docs)]) == 0

    page = (docs / "benchmarks.md").read_text()
    images = sorted(p.name for p in (docs / "img").glob("*.png"))
    assert images == [
        "bench-checkpoint-sweep-1gb.png",
        "bench-checkpoints-1gb.png",
        "bench-operator.png",
        "bench-resume.png",
        "bench-training-cpu-tiny.png",
    ]
    for name in images:
        assert f"](img/{name})" in page
        assert (docs / "img" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([1.0, 2.0, 3.0, 4.0], 50, 2.0), (list(map(float, range(1, 101))), 99, 99.0), ([5.0], 99, 5.0)],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == expected


def test_ratio_and_number_formatting() -> None:
    assert tables.ratio(1.234) == "1.23x"
    assert tables.ratio(None) == "n/a"
    assert tables.num(1234.5, 0) == "1,234"


def test_training_rows_are_ratios_to_trl_defaults_and_skipped_phases_say_why() -> None:
    page = report.render([training_result()])
    section = page.split("## 3. Training on a GPU")[1].split("## 4.")[0]
    assert "| sft | trl-defaults | 250 | 1.00x |  | 500 (50 %) | 0.25 | 8 x 1 | 4,000 (1.00x) |" in section
    assert (
        "| sft | ours | 375 | 1.50x |  | 750 (50 %) | 0.25 | 16 x 4 | 4,400 (1.10x) | 2,000 (1.00x) |"
        in section
    )
    assert (
        "| sft | ours+packing | 750 | 3.00x | 2.00x | 1,500 (0 %) |" in section
    )  # the gain of packing alone
    assert "| sft | ours+liger | not run (GPU only: Liger's kernels are Triton kernels) |" in section
    assert "| dpo | ours | failed (RuntimeError: boom / here) |" in section
    assert "MFU" not in section.split("| method |")[1].split("\n")[0]  # no MFU column on a CPU
    assert "real tokens per CPU-s" in section
    assert "CPU figures are **ratios only**" in section
    assert "**No GPU figures yet.**" in section
    assert "![training cpu-tiny](img/bench-training-cpu-tiny.png)" in section


def test_gpu_training_results_show_mfu_and_the_per_layer_extrapolation() -> None:
    page = report.render([training_result("cuda", (4, 8)), training_result()])
    section = page.split("## 3. Training on a GPU")[1].split("## 4.")[0]
    assert section.index("h100-llama-3.1-70b-4l-8l") < section.index("**cpu-tiny**")  # GPU first
    assert "on NVIDIA H100 80GB HBM3: llama-3.1-70b shape" in section
    assert "With 4 of 80 layers:" in section and "With 8 of 80 layers:" in section
    assert "| sft | ours | 188 | 1.50x |  | 375 (50 %) | 0.25 | 16 x 4 | 8,800 (1.10x) | 40.0 % |" in section
    assert "Extrapolated to all 80 layers" in section
    assert "| sft | ours | 30 | 1.50x | 50,000 | 4, 8 |" in section
    assert "**No GPU figures yet.**" not in section
