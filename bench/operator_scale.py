"""N FineTuneJobs at once: the operator against the same objects created by a plain client.

    python -m bench.operator_scale [--n 100,500] [--concurrency 16] [--rounds 2]

Three phases per N, each on a fresh local control plane (etcd, kube-apiserver, Job controller,
garbage collector; no kubelet, so pods stay Pending), each with ``concurrency`` client threads:

- ``operator``: ``python -m finetune_operator`` (production settings) watches the namespace; the
  benchmark creates N FineTuneJobs and waits until every attempt Job exists and every FineTuneJob has
  a status phase.
- ``jobs-only``: the same N batch Jobs (rendered by the operator's own code: same pod template)
  created directly: the lower bound the issue names.
- ``full``: per item, what the operator's first reconcile writes, without its reads: the
  FineTuneJob, its ServiceAccount, Role, RoleBinding, progress ConfigMap, Service, run-config
  ConfigMap, Job, then the status the operator would write (computed by its own ``decide``).

With ``--rounds R`` every phase runs R times, rounds alternating the order of the phases (forward,
then backward), so that a change in the machine's load during the run falls on every phase alike.
Each phase's figures are those of its median round; the ratio to a baseline is the median of the
ratios of the same round (``ratio_to`` below), which is what the report prints.

Times are taken on this process's clock when watch events arrive (API timestamps are 1 s granular).
Per-job latency: from the item's first create call to its Job (status) being seen. Before the clock
starts, one warm-up item goes through end to end in every phase.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import WORK, Run, env_ints, log, percentile, proc_stats
from bench.kube import Arrivals, api_client, counts_delta, request_counts, wait_for
from finetune_devenv import _proc
from finetune_devenv.cluster import ControlPlane
from finetune_operator import api
from finetune_operator import constants as c
from finetune_operator import settings as settings_mod
from finetune_operator.api import FineTuneJob
from finetune_operator.decide import decide
from finetune_operator.k8s import Kube
from finetune_operator.observe import Children, observe
from finetune_operator.reconcile import dump_status
from finetune_operator.render import AttemptIntent, attempt_children, job_children, training_job

NAMESPACE = "bench"
WARM_UP = "warm-up"
SETTINGS = settings_mod.from_env({})  # the operator runs with production defaults too


def finetunejob(name: str) -> dict[str, Any]:
    """A typical single-node FineTuneJob (the operator's defaults fill in the rest)."""
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "method": "sft",
            "model": {"uri": "s3://models/llama-3.1-8b-instruct/", "quantization": "nf4"},
            "dataset": {"train": f"s3://data/{name}/train.jsonl"},
            "resources": {"nodes": 1, "gpusPerNode": 1},
            "checkpoints": {"uri": "s3://ckpt/"},
            "output": {"uri": f"s3://out/{name}/"},
        },
    }


def names(n: int) -> list[str]:
    return [f"ftj-{i:05d}" for i in range(n)]


def has_phase(_: str, obj: dict[str, Any]) -> bool:
    return bool((obj.get("status") or {}).get("phase"))


def by_job_label(obj: dict[str, Any]) -> str:
    return str(obj["metadata"].get("labels", {}).get(c.LABEL_JOB_NAME, obj["metadata"]["name"]))


# ------------------------------------------------------------------------------------------ phases


def create_ftj(kube: Kube, name: str) -> dict[str, Any]:
    response: Any = kube.custom.create_namespaced_custom_object(
        api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, finetunejob(name), _preload_content=False
    )
    created: dict[str, Any] = json.loads(response.data)
    return created


def create(kube: Kube, manifest: dict[str, Any]) -> None:
    """A plain client's create: send, read the reply (which hands the connection back to the pool)."""
    calls: dict[str, Callable[..., Any]] = {
        "ConfigMap": kube.core.create_namespaced_config_map,
        "Service": kube.core.create_namespaced_service,
        "ServiceAccount": kube.core.create_namespaced_service_account,
        "Job": kube.batch.create_namespaced_job,
        "Role": kube.rbac.create_namespaced_role,
        "RoleBinding": kube.rbac.create_namespaced_role_binding,
    }
    _ = calls[manifest["kind"]](NAMESPACE, manifest, _preload_content=False).data


def write_jobs_only(kube: Kube, name: str) -> None:
    """The Job the operator would create, without owner (nothing to own it) and the default SA."""
    meta = {**finetunejob(name)["metadata"], "uid": "0"}
    job = FineTuneJob.model_validate({**finetunejob(name), "metadata": meta})
    manifest = training_job(job, AttemptIntent(attempt=1), SETTINGS)
    del manifest["metadata"]["ownerReferences"]
    manifest["spec"]["template"]["spec"]["serviceAccountName"] = "default"
    create(kube, manifest)


def write_full(kube: Kube, name: str) -> None:
    """The writes of the operator's first reconcile of ``name``, issued directly."""
    raw = create_ftj(kube, name)
    job = FineTuneJob.model_validate(raw)
    for manifest in [*job_children(job), *attempt_children(job, AttemptIntent(attempt=1), SETTINGS)]:
        create(kube, manifest)
    decision = decide(job, observe(Children(), name), datetime.now(UTC), SETTINGS)
    body = {**raw, "status": dump_status(decision.status)}
    response: Any = kube.custom.replace_namespaced_custom_object_status(
        api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, name, body, _preload_content=False
    )
    _ = response.data


class Operator:
    """``python -m finetune_operator`` as a subprocess, as the Deployment runs it."""

    def __init__(self, plane: ControlPlane, log_path: Path, module: str, env: dict[str, str]) -> None:
        (port,) = _proc.free_ports(1)
        self.liveness = f"http://127.0.0.1:{port}/healthz"
        argv = [
            sys.executable,
            "-m",
            module,
            "--namespace",
            NAMESPACE,
            "--standalone",
            "--liveness",
            self.liveness,
        ]
        self.log_path = log_path
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                env={**os.environ, **plane.env(), **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for("the operator's liveness probe", self._live, timeout=60, every=0.2)

    def _live(self) -> bool:
        import urllib.request

        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited: {self.log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(self.liveness, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def log_counts(self) -> dict[str, int]:
        counts = {"lines": 0, "errors": 0, "conflicts": 0, "reconciles_with_actions": 0, "creates": 0}
        for line in self.log_path.read_text(errors="replace").splitlines():
            counts["lines"] += 1
            try:
                record = json.loads(line)
            except ValueError:
                continue
            message = str(record.get("message", ""))
            counts["errors"] += record.get("level") in ("ERROR", "CRITICAL")
            counts["conflicts"] += message.startswith("retrying")
            counts["reconciles_with_actions"] += ", actions [" in message
            counts["creates"] += message.startswith("created ")
        return counts

    def tracemalloc(self, out: Path) -> Any:
        """Ask :mod:`bench.operator_traced` for its allocation sites (or :mod:`bench.operator_sampled`
        for its profile) with SIGUSR1 and read them."""
        self.proc.send_signal(signal.SIGUSR1)
        wait_for("the tracemalloc snapshot", out.exists, timeout=300, every=0.5)
        return json.loads(out.read_text())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


OPERATOR_MODULES = {
    "operator": "finetune_operator",
    "operator-patched": "bench.operator_patched",
    "operator-traced": "bench.operator_traced",
    "operator-sampled": "bench.operator_sampled",
}


def operator_phase(phase: str) -> tuple[str, dict[str, str]] | None:
    """``operator[FTJ_MAX_WORKERS=32]`` -> ("finetune_operator", {"FTJ_MAX_WORKERS": "32"}); None
    for the plain-client phases. ``operator-patched`` runs :mod:`bench.operator_patched`,
    ``operator-traced`` :mod:`bench.operator_traced`."""
    base, _, rest = phase.partition("[")
    if base not in OPERATOR_MODULES:
        return None
    pairs = [item.split("=", 1) for item in rest.rstrip("]").split(",") if item.strip()]
    return OPERATOR_MODULES[base], {key.strip(): value.strip() for key, value in pairs}


def run_phase(phase: str, n: int, concurrency: int, work: Path) -> dict[str, Any]:
    """One phase on a fresh control plane; times in seconds from the first create call."""
    root = work / f"{phase.replace('[', '-').replace(']', '').replace('=', '-')}-{n}"
    how = operator_phase(phase)
    shutil.rmtree(root, ignore_errors=True)
    with ControlPlane(root) as plane, ExitStack() as stack:
        plane.kubectl("create", "namespace", NAMESPACE, check=True)
        default_sa = f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/default"
        wait_for("the default ServiceAccount", lambda: bool(plane.api_get(default_sa)), timeout=60)
        operator = None
        if how is not None:
            module, env = how
            if module in (OPERATOR_MODULES["operator-traced"], OPERATOR_MODULES["operator-sampled"]):
                env = {**env, "FTJ_BENCH_TRACEMALLOC_OUT": str(root / "tracemalloc.json")}
            operator = Operator(plane, root / "operator.log", module, env)
            stack.callback(operator.stop)
        api_ = api_client(plane, concurrency + 4)
        stack.callback(api_.close)
        kube = Kube(api_)
        jobs = Arrivals(kube.batch.list_namespaced_job, NAMESPACE, lambda *_: True, by_job_label).start()
        stack.callback(jobs.stop)
        statuses = None
        if phase != "jobs-only":
            statuses = Arrivals(partial(list_finetunejobs, kube), NAMESPACE, has_phase).start()
            stack.callback(statuses.stop)
        before = Usage.now(plane, operator)
        write = create_ftj if operator else {"jobs-only": write_jobs_only, "full": write_full}[phase]
        warm_up(write, kube, jobs, statuses)

        begun: dict[str, float] = {}
        started = time.monotonic()

        def item(name: str) -> None:
            begun[name] = time.monotonic()
            write(kube, name)

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(item, names(n)))
        applied = time.monotonic()
        wait_for(f"{n} Jobs", lambda: jobs.count() >= n + 1, timeout=120 + n)
        if statuses is not None:
            wait_for(f"{n} statuses", lambda: statuses.count() >= n + 1, timeout=120 + n)

        out: dict[str, Any] = {
            "applied_s": applied - started,
            "jobs_s": max(jobs.first[name] for name in begun) - started,
            "job_latency_s": latency(jobs.first, begun),
        }
        if statuses is not None:
            out["status_s"] = max(statuses.first[name] for name in begun) - started
            out["status_latency_s"] = latency(statuses.first, begun)
            out["phases"] = sorted({obj["status"]["phase"] for obj in statuses.objects.values()})
        out |= Usage.now(plane, operator).since(before)
        if operator is not None:
            out["operator_log"] = operator.log_counts()
            if how is not None and how[0] == OPERATOR_MODULES["operator-traced"]:
                out["tracemalloc"] = operator.tracemalloc(root / "tracemalloc.json")
            if how is not None and how[0] == OPERATOR_MODULES["operator-sampled"]:
                out["profile"] = operator.tracemalloc(root / "tracemalloc.json")
    return out


def list_finetunejobs(kube: Kube, namespace: str, **kw: Any) -> Any:
    return kube.custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, **kw)


@dataclass(frozen=True)
class Usage:
    """API requests served so far, CPU seconds of every process, the operator's memory."""

    requests: dict[str, float]
    cpu_s: dict[str, float]
    operator: dict[str, float]

    @classmethod
    def now(cls, plane: ControlPlane, operator: Operator | None) -> Usage:
        cpu = {name: proc_stats(pid)["cpu_s"] for name, pid in plane.pids.items()}
        stats = proc_stats(operator.proc.pid) if operator else {}
        if stats:
            cpu["operator"] = stats["cpu_s"]
        return cls(request_counts(plane.api_get("/metrics")), cpu, stats)

    def since(self, before: Usage) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": counts_delta(before.requests, self.requests),
            "cpu_s": {name: value - before.cpu_s.get(name, 0.0) for name, value in self.cpu_s.items()},
        }
        if self.operator:
            out["operator_peak_rss_mib"] = self.operator["vmhwm_mib"]
            out["operator_rss_mib"] = self.operator["vmrss_mib"]
        return out


def warm_up(
    write: Callable[[Kube, str], object], kube: Kube, jobs: Arrivals, statuses: Arrivals | None
) -> None:
    """One item end to end before the clock starts: the operator's watches are running, the API
    server has served each kind once, and the client's connections are open."""
    write(kube, WARM_UP)
    wait_for("the warm-up Job", lambda: WARM_UP in jobs.first, timeout=120)
    if statuses is not None:
        wait_for("the warm-up status", lambda: WARM_UP in statuses.first, timeout=120)


def latency(seen: dict[str, float], begun: dict[str, float]) -> dict[str, float]:
    """From an item's first create call to its object being seen: p50, p99, max."""
    values = [seen[name] - begun[name] for name in begun if name in seen]
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.operator_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--n",
        default=",".join(map(str, env_ints("FTJ_BENCH_OPERATOR_N", [100, 500]))),
        help="comma-separated job counts (FTJ_BENCH_OPERATOR_N, default 100,500)",
    )
    parser.add_argument("--concurrency", type=int, default=16, help="client threads (default 16)")
    parser.add_argument(
        "--phases",
        default="operator;jobs-only;full",
        help="semicolon-separated: operator, operator[FTJ_X=v,...] (settings changed), "
        "operator-patched[...] (bench.operator_patched), operator-traced, operator-sampled (profiled), "
        "jobs-only, full",
    )
    parser.add_argument(
        "--tag", default="", help="label suffix for experiments: their results are reported apart"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=env_ints("FTJ_BENCH_OPERATOR_ROUNDS", [2])[0],
        help="runs of every phase, in alternating order (FTJ_BENCH_OPERATOR_ROUNDS, default 2)",
    )
    args = parser.parse_args(argv)
    work = WORK / "operator"
    work.mkdir(parents=True, exist_ok=True)
    phases = args.phases.split(";")
    for n in [int(x) for x in args.n.split(",")]:
        params = {
            "n": n,
            "concurrency": args.concurrency,
            "max_workers": SETTINGS.max_workers,
            "tag": args.tag,
            "rounds": args.rounds,
        }
        run = Run("operator-scale", f"n{n}" + (f"-{args.tag}" if args.tag else ""), params)
        rounds: dict[str, list[dict[str, Any]]] = {phase: [] for phase in phases}
        for i in range(args.rounds):
            for phase in phases if i % 2 == 0 else phases[::-1]:
                log(f"N={n}, round {i + 1}/{args.rounds}: {phase}")
                rounds[phase].append(run_phase(phase, n, args.concurrency, work))
                times = {
                    k: round(v, 2)
                    for k, v in rounds[phase][-1].items()
                    if k.endswith("_s") and isinstance(v, float)
                }
                log(f"N={n}, round {i + 1}/{args.rounds}: {phase}: {json.dumps(times)}")
        run.data = {phase: median_round(results) for phase, results in rounds.items()}
        run.save()
    return 0


def median_round(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median time until all Jobs exist (the lower one of an even count), with
    every round's times beside it (``rounds``, in round order) for the paired ratios."""
    median = sorted(results, key=lambda d: d["jobs_s"])[(len(results) - 1) // 2]
    times = [{k: d[k] for k in ("jobs_s", "status_s") if k in d} for d in results]
    return {**median, "rounds": times}


if __name__ == "__main__":
    raise SystemExit(main())
