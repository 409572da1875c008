"""Markdown sections of docs/benchmarks.md, one function per benchmark. Pure: results in, text out.

Every figure is printed next to its ratio to the baseline measured in the same run; absolute times
are labelled as figures of the machine named in the "Where the figures come from" table.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

Result = dict[str, Any]
TIMES = "x"  # ratios read "1.25x"
DASH = "-"  # ranges read "91-100"
NONE = "n/a"


def num(value: float | None, digits: int = 1) -> str:
    return NONE if value is None else f"{value:,.{digits}f}"


def ratio(value: float | None) -> str:
    return NONE if value is None else f"{value:.2f}{TIMES}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def sources(results: Sequence[Result]) -> str:
    """Which run produced which file, on what machine, under what load."""
    rows = []
    for r in results:
        m = r["machine"]
        rows.append(
            [
                f"`{r['bench']}-{r['label']}`",
                r["started"][:16].replace("T", " "),
                f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']:g} GiB"
                + (f", {m['gpu']}" if m.get("gpu") else ""),
                f"{m['load_before']:.1f} → {m['load_after']:.1f}",
                num(r["duration_s"] / 60, 1),
                f"`{r['command']}`",
            ]
        )
    header = ["result", "started (UTC)", "machine", "load avg (1 min)", "minutes", "command"]
    return table(header, rows)


# --------------------------------------------------------------------------------------- operator


def ratio_to(phase: dict[str, Any], base: dict[str, Any], key: str = "jobs_s") -> float | None:
    """``phase[key] / base[key]``: the median of the per-round ratios when both ran the same rounds
    (each pair ran side by side), else the ratio of the two figures (results of a single round)."""
    pairs = [
        (a[key], b[key])
        for a, b in zip(phase.get("rounds", []), base.get("rounds", []), strict=False)
        if key in a and key in b
    ]
    if pairs and len(phase["rounds"]) == len(base["rounds"]):
        return float(statistics.median(a / b for a, b in pairs))
    if phase.get(key) and base.get(key):
        return float(phase[key]) / float(base[key])
    return None


def _per_round(phase: dict[str, Any], base: dict[str, Any]) -> str:
    """Each round's ratio to the baseline, in round order: how much the rounds agree."""
    pairs = list(zip(phase.get("rounds", []), base.get("rounds", []), strict=False))
    if len(pairs) < 2 or len(phase["rounds"]) != len(base["rounds"]):
        return NONE
    return ", ".join(ratio(a["jobs_s"] / b["jobs_s"]) for a, b in pairs)


def _operator_rows(r: Result) -> list[list[str]]:
    n = r["params"]["n"]
    data = r["data"]
    jobs_only = data.get("jobs-only", {})
    full = data.get("full", {})
    rows = []
    for phase, d in data.items():
        if phase.startswith("operator-traced"):
            continue  # tracemalloc slows it down: only its memory breakdown is of interest
        status = d.get("status_s")
        cpu = d.get("cpu_s", {})
        rows.append(
            [
                str(n),
                phase,
                num(d["jobs_s"], 2),
                ratio(ratio_to(d, jobs_only)),
                ratio(ratio_to(d, full)),
                _per_round(d, full),
                num(status, 2),
                ratio(ratio_to(d, full, "status_s")),
                f"{num(d['job_latency_s']['p50'], 2)} / {num(d['job_latency_s']['p99'], 2)}",
                f"{num(d['status_latency_s']['p50'], 2)} / {num(d['status_latency_s']['p99'], 2)}"
                if "status_latency_s" in d
                else NONE,
                num(d.get("operator_peak_rss_mib"), 0),
                " / ".join(num(cpu.get(k), 1) for k in ("operator", "kube-apiserver", "etcd")),
            ]
        )
    return rows


def operator_table(runs: Sequence[Result]) -> str:
    header = [
        "N",
        "phase",
        "all Jobs exist (s)",
        "\u00f7 jobs-only",
        "\u00f7 full",
        "\u00f7 full, each round",
        "all statuses (s)",
        "\u00f7 full",
        "Job latency p50 / p99 (s)",
        "status latency p50 / p99 (s)",
        "operator peak RSS (MiB)",
        "CPU s: operator / apiserver / etcd",
    ]
    rows = [row for r in sorted(runs, key=lambda r: r["params"]["n"]) for row in _operator_rows(r)]
    return table(header, rows)


def operator_section(results: Sequence[Result]) -> str:
    runs = sorted(results, key=lambda r: r["params"]["n"])
    if not runs:
        return "Not measured yet: run `python -m bench.operator_scale`."
    return "\n".join([operator_table(runs), "", targets(runs), "", requests_per_job(runs[-1])])


def targets(runs: Sequence[Result]) -> str:
    """The issue's targets, checked against every N that has both the operator and a baseline."""
    lines = [
        f"Targets (issue 8): all Jobs within 1.5{TIMES} of the plain-client lower bound; operator peak "
        "memory under 250 MB at 1000 jobs."
    ]
    for r in runs:
        d = r["data"]
        op = d.get("operator")
        if not op:
            continue
        checks = []
        for base in ("jobs-only", "full"):
            value = ratio_to(op, d[base]) if base in d else None
            if value is not None:
                checks.append(f"{ratio(value)} of {base} ({'met' if value <= 1.5 else 'not met'})")
        rss_mb = op.get("operator_peak_rss_mib", 0) * 1.048576
        checks.append(f"peak RSS {num(rss_mb, 0)} MB ({'under' if rss_mb < 250 else 'over'} 250 MB)")
        lines.append(f"- N = {r['params']['n']}: " + "; ".join(checks))
    return "\n".join(lines)


def requests_per_job(r: Result) -> str:
    """API requests per FineTuneJob by verb and resource: where the operator's extra time goes."""
    n = r["params"]["n"] + 1  # the warm-up item is counted too
    phases = [p for p in ("operator", "full", "jobs-only") if p in r["data"]]
    keys = sorted({k for p in phases for k, v in r["data"][p].get("requests", {}).items() if v >= n / 2})
    rows = [[f"`{k}`", *(num(r["data"][p]["requests"].get(k, 0) / n, 2) for p in phases)] for k in keys]
    totals = [
        "**total**",
        *(num(sum(r["data"][p]["requests"].get(k, 0) for k in keys) / n, 1) for p in phases),
    ]
    title = (
        f"API requests per item at N = {r['params']['n']} (from the API server's `apiserver_request_total`, "
        "all clients: the Job controller's pod creations and Job status writes are in every phase):"
    )
    return title + "\n\n" + table(["request", *phases], [*rows, totals])


# ------------------------------------------------------------------------------------ checkpoints

_VARIANTS = [
    ("copy", "copy", "plain copy + fsync"),
    ("upload", "boto3-default", "boto3 defaults"),
    ("upload", "ours", "ObjectStore"),
    ("download", "boto3-default", "boto3 defaults"),
    ("download", "ours", "ObjectStore"),
]


def settings_text(settings: dict[str, int]) -> str:
    return (
        f"{settings['multipart_chunksize_mib']} MiB parts (threshold {settings['multipart_threshold_mib']} "
        f"MiB), {settings['max_concurrency']} threads per file, {settings['max_parallel_files']} files "
        "at once"
    )


def checkpoints_section(r: Result) -> str:
    p = r["params"]
    head = (
        f"**{r['label']}** ({p['reps']} repetitions; ObjectStore with {settings_text(p['settings'])}; "
        f"data on {p['disk']['device']} ({p['disk']['type']}), not tmpfs)"
    )
    rows = []
    for name, s in r["data"].items():
        res = s["results"]
        default = {d: res[f"{d}/boto3-default"]["mb_per_s"]["median"] for d in ("upload", "download")}
        copy = res["copy"]["mb_per_s"]["median"]
        for direction, variant, title in _VARIANTS:
            key = "copy" if direction == "copy" else f"{direction}/{variant}"
            rate = res[key]["mb_per_s"]
            rows.append(
                [
                    f"{name} ({s['files']} files, {num(s['bytes'] / 1e9, 2)} GB)",
                    direction,
                    title,
                    num(res[key]["seconds"]["median"], 2),
                    f"{num(rate['median'], 0)} ({num(rate['min'], 0)}{DASH}{num(rate['max'], 0)})",
                    ratio(rate["median"] / default[direction]) if direction != "copy" else NONE,
                    ratio(rate["median"] / copy),
                    f"{num(res[key].get('client_cpu_s'), 1)} / {num(res[key].get('server_cpu_s'), 1)}",
                ]
            )
    header = [
        "set",
        "direction",
        "how",
        "median s",
        f"MB/s median (min{DASH}max)",
        "÷ boto3 defaults",
        "÷ plain copy",
        "CPU s: client / server",
    ]
    return head + "\n\n" + table(header, rows)


def sweep_section(r: Result) -> str:
    rows_in = r["data"]["rows"]
    base = {(row["set"]): row for row in rows_in if row["axis"] == "baseline"}
    rows = []
    for row in rows_in:
        if row["axis"] == "baseline":
            continue
        b = base[row["set"]]
        s = row["settings"]
        rows.append(
            [
                row["set"],
                row["axis"],
                str(s["multipart_chunksize_mib"]),
                str(s["max_concurrency"]),
                str(s["max_parallel_files"]),
                num(row["upload_mb_s"], 0),
                ratio(row["upload_mb_s"] / b["upload_mb_s"]),
                num(row["download_mb_s"], 0),
                ratio(row["download_mb_s"] / b["download_mb_s"]),
            ]
        )
    header = [
        "set",
        "varied",
        "part MiB",
        "threads/file",
        "files at once",
        "upload MB/s",
        "÷ boto3",
        "download MB/s",
        "÷ boto3",
    ]
    reps = r["params"].get("reps", 1)
    lines = [
        f"**Sweep, {r['label']}** ({reps} repetition(s) per point, medians; boto3 defaults: "
        + ", ".join(
            f"{k} up {num(v['upload_mb_s'], 0)} / down {num(v['download_mb_s'], 0)} MB/s"
            for k, v in base.items()
        )
        + ")",
        "",
        table(header, rows),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- resume


def resume_section(r: Result, download_mb_s: float | None) -> str:
    d = r["data"]
    scratch = d["scratch"]["first_step_s"]
    rows = []
    for kind, title in (("scratch", "from scratch"), ("resume", "resumed from S3")):
        s = d[kind]["first_step_s"]
        rows.append(
            [
                title,
                f"{d[kind]['first_logged_step']:.0f}",
                f"{num(s['median'], 1)} ({num(s['min'], 1)}{DASH}{num(s['max'], 1)})",
                ratio(s["median"] / scratch["median"]),
            ]
        )
    text = (
        f"{r['params']['model']}; checkpoint of {num(d['checkpoint_bytes'] / 1e3, 0)} kB; "
        f"{r['params']['reps']} runs of each, alternating.\n\n"
    )
    text += table(
        ["start", "first step", f"process start \u2192 first step, s median (min{DASH}max)", "÷ scratch"],
        rows,
    )
    if all("phases_s" in d[kind] for kind in ("scratch", "resume")):
        what = r["params"].get("phases", {})
        text += "\n\n" + resume_phases(d["scratch"]["phases_s"], d["resume"]["phases_s"], what)
    if download_mb_s:
        extra = 2.7e9 / 1e6 / download_mb_s
        resumed = d["resume"]["first_step_s"]["median"] + extra
        text += (
            f"\n\nDerived, not measured: a 70B r=16 checkpoint (2.7 GB) adds about {num(extra, 0)} s of "
            f"download at the {num(download_mb_s, 0)} MB/s ObjectStore reached above, so on this machine "
            f"a resume would reach its first step after about {num(resumed, 0)} s "
            f"({ratio(resumed / scratch['median'])} of a start from scratch with the tiny model)."
        )
    return text


def resume_phases(scratch: dict[str, float], resume: dict[str, float], what: dict[str, str]) -> str:
    """Where the time to the first step goes, phase by phase (medians), scratch next to resume."""

    def row(name: str, a: float, b: float, note: str) -> list[str]:
        return [name, num(a, 2), num(b, 2), num(round(b - a, 2) + 0.0, 2), note]  # + 0.0: no -0.00

    rows = [row(name, scratch.get(name, 0.0), value, what.get(name, "")) for name, value in resume.items()]
    rows.append(row("**sum**", sum(scratch.values()), sum(resume.values()), ""))
    header = ["phase", "from scratch", "resumed", "resumed \u2212 scratch", "what"]
    return "Phases, s (medians over the runs of each kind, this machine):\n\n" + table(header, rows)


# ---------------------------------------------------------------------------------- plan accuracy


def plan_section(r: Result) -> str:
    rows = []
    for row in r["data"]["rows"]:
        spec = row["spec"]
        terms = sorted(row["terms_mib"].items(), key=lambda kv: -kv[1])[:2]
        rows.append(
            [
                row["case"],
                f"h {spec['h']}, {spec['L']} layers, vocab {spec['vocab']}",
                spec["quantization"],
                f"{spec['batch']} {TIMES} {spec['seq']}",
                "yes" if spec["ckpt"] else "no",
                num(row["estimate_mib"], 0),
                num(row["measured_mib"], 0),
                ratio(row["estimate_mib"] / row["measured_mib"]),
                ", ".join(f"{k} {num(v, 0)}" for k, v in terms),
            ]
        )
    header = [
        "case",
        "model",
        "quantization",
        "batch x tokens",
        "grad. checkpointing",
        "estimate (MiB)",
        "measured peak (MiB)",
        "estimate \u00f7 measured",
        "largest terms (MiB)",
    ]
    return f"{r['params'].get('what', '')}\n\n" + table(header, rows)


# --------------------------------------------------------------------------------------- training

TRAINING_BASELINE = "trl-defaults"


def _training_row(method: str, name: str, p: Result, base: Result, ours: Result, on_gpu: bool) -> list[str]:
    if "tokens_per_s" not in p:
        why = f"not run ({p['not_run']})" if "not_run" in p else f"failed ({_last_line(p.get('failed', ''))})"
        return [method, name, why, *[""] * 8]
    tps, peak = p["tokens_per_s"], p["peak_mib"]
    base_tps, base_peak = base.get("tokens_per_s"), base.get("peak_mib")
    ours_tps = ours.get("tokens_per_s") if name.startswith("ours+") else None
    return [
        method,
        name,
        num(tps, 0),
        ratio(tps / base_tps) if base_tps else NONE,
        ratio(tps / ours_tps) if ours_tps else "",
        f"{num(p['all_tokens_per_s'], 0)} ({num(100 * p['padding_share'], 0)} %)",
        num(p["step_s_p50"], 2),
        f"{p['micro_batch']} {TIMES} {p['accumulation']}",
        f"{num(peak, 0)} ({ratio(peak / base_peak) if base_peak else NONE})",
        (f"{num(100 * p['mfu'], 1)} %" if "mfu" in p else NONE)
        if on_gpu
        else _per_cpu_second(p.get("tokens_per_cpu_s"), base.get("tokens_per_cpu_s")),
    ]


def _per_cpu_second(value: float | None, base: float | None) -> str:
    return f"{num(value, 0)} ({ratio(value / base) if value and base else NONE})"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:160].replace("|", "/")


def training_table(phases: dict[str, dict[str, Result]], on_gpu: bool) -> str:
    header = [
        "method",
        "phase",
        "real tokens/s",
        f"\u00f7 {TRAINING_BASELINE}",
        "\u00f7 ours",
        "all tokens/s (padding)",
        "step p50 (s)",
        "rows/step (micro-batch x accumulation)",
        "peak GPU memory allocated, MiB (\u00f7 baseline)" if on_gpu else "peak RSS, MiB (\u00f7 baseline)",
        "MFU" if on_gpu else "real tokens per CPU-s (\u00f7 baseline)",
    ]
    rows = []
    for method, by_name in phases.items():
        base, ours = by_name.get(TRAINING_BASELINE, {}), by_name.get("ours", {})
        rows += [_training_row(method, name, p, base, ours, on_gpu) for name, p in by_name.items()]
    return table(header, rows)


def training_result(r: Result) -> str:
    """One run of bench.training: what ran where, a table per layer count, the extrapolation."""
    p, d = r["params"], r["data"]
    on_gpu = p["device"] == "cuda"
    s = p["shape"]
    where = p["gpu"] if on_gpu else f"CPU ({r['machine']['cpu']}, {p['cpu_threads']} thread)"
    lines = [
        f"**{r['label']}** on {where}: {p['shape_name']} shape (hidden {s['hidden']}, {s['layers']} "
        f"layers, {s['heads']} heads, {s['kv_heads']} KV heads, intermediate {s['intermediate']}, "
        f"vocab {s['vocab']}), "
        f"random weights; {p['precision']}; LoRA r={p['lora_r']} on all linear layers; {p['data']}; "
        f"{p['reps']} repetition(s), the phase order reversed on every other one (medians).",
    ]
    if p.get("resumed"):
        lines[0] += (
            f" Continued (`--resume`) from invocations started {', '.join(p['resumed'])} on this machine."
        )
    if not on_gpu:
        lines += [
            "",
            "CPU figures are **ratios only**: a tiny model on shared cores says which code path "
            "processes more tokens per second here, not what a GPU does, and no absolute figure of it "
            "stands for one. The last column divides by the training process's CPU time instead of wall "
            "time: other work on shared cores slows the wall clock, much less the CPU time.",
        ]
    workload = d.get("workload", {})
    if workload:
        lines += [
            "",
            "Data: "
            + "; ".join(
                f"{m} {w['examples']} examples, tokens median {num(w['tokens_median'], 0)}, p90 "
                f"{num(w['tokens_p90'], 0)}, max {num(w['tokens_max'], 0)}"
                + (" (both sequences of a pair)" if m == "dpo" else "")
                for m, w in workload.items()
            )
            + ".",
        ]
    full = d.get("full_layers")
    for layers, phases in d["depths"].items():
        if full:
            lines += ["", f"With {layers} of {full} layers:"]
        lines += ["", training_table(phases, on_gpu)]
    extra = d.get("extrapolated")
    if full and extra:
        rows = []
        for method, by_name in extra.items():
            base = by_name.get(TRAINING_BASELINE, {}).get("tokens_per_s")
            for name, e in by_name.items():
                rows.append(
                    [
                        method,
                        name,
                        num(e["tokens_per_s"], 0),
                        ratio(e["tokens_per_s"] / base) if base else NONE,
                        num(e["peak_mib"], 0),
                        ", ".join(map(str, e["from_layers"])),
                    ]
                )
        header = [
            "method",
            "phase",
            "real tokens/s",
            f"\u00f7 {TRAINING_BASELINE}",
            "peak MiB",
            "fit from layers",
        ]
        lines += [
            "",
            f"Extrapolated to all {full} layers (not measured: seconds per token and peak memory fitted "
            "linearly in the layer count):",
            "",
            table(header, rows),
        ]
    elif full:
        lines += ["", f"Not extrapolated to {full} layers: that needs two layer counts (`--layers 4,8`)."]
    return "\n".join(lines)


def training_section(results: Sequence[Result], img: str = "img") -> str:
    """Every bench.training result (its plot, then its tables), GPU results first; says plainly
    when no GPU has run it. ``img`` is the plots' folder relative to the page."""
    runs = sorted(results, key=lambda r: (r["params"]["device"] != "cuda", r["label"]))
    parts = [
        f"![training {r['label']}]({img}/bench-training-{r['label']}.png)\n\n{training_result(r)}"
        for r in runs
    ]
    if not any(r["params"]["device"] == "cuda" for r in runs):
        parts.append(
            "**No GPU figures yet.** No GPU was lent to the sessions that ran this benchmark, so there "
            "are no absolute throughputs, MFU or GPU memory figures. On a GPU machine, run:\n\n"
            "```bash\n"
            "python -m bench.training --device cuda --shape llama-3.1-8b --method sft --resume\n"
            "python -m bench.training --device cuda --shape llama-3.1-8b --method dpo --resume\n"
            "python -m bench.training --device cuda --shape llama-3.1-70b --layers 4,8 --method sft "
            "--resume\n"
            "```\n\n"
            "then `python -m bench.report`. Each writes "
            "`bench/results/training-<gpu>-<shape>[-<layers>]-<method>.json` after every phase; a command "
            "cut short continues where it stopped when run again with `--resume`, and `--phases` picks "
            "phases (trl-defaults always runs)."
        )
    return "\n\n".join(parts)
