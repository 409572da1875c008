"""Load: hundreds of FineTuneJobs created at once, each taken through a whole life, by one operator.

All jobs are created in a burst; every one must get its status and exactly one attempt Job. Then
every pod runs and every job reports its own distinct progress (a lost or crossed update would show
as a wrong step), every pod succeeds, and every job is deleted with all its children. Two equal
rounds: the operator must log no error, its resident memory after the second round must be about
what it was after the first (bounded by the jobs alive, not by history), and its peak (VmHWM) is
reported and capped. Speed is measured by the benchmarks (bench/); this suite is about correctness
and memory under load.

Short form: 100 jobs; ``make soak``: 500.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_operator import api
from finetune_operator import constants as c
from tests.fixtures.operator import OperatorProcess
from tests.integration.test_operator_lifecycle import now, write_progress
from tests.support import faults
from tests.support.builders import make_job
from tests.support.kubelet import Kubelet
from tests.support.waiting import wait_for

JOBS = faults.scale(100, 500)
THREADS = 8
PEAK_RSS_LIMIT_MIB = faults.scale(400, 1024)
pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.timeout(faults.scale(900, 5400))]


def parallel(work: Callable[[Any], None], items: Iterable[Any]) -> None:
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(work, items))


def statuses(custom: client.CustomObjectsApi, namespace: str) -> dict[str, dict[str, Any]]:
    response = custom.list_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, _preload_content=False
    )
    items = json.loads(response.data)["items"]
    return {item["metadata"]["name"]: item.get("status") or {} for item in items}


def jobs_by_owner(batch: client.BatchV1Api, namespace: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for job in batch.list_namespaced_job(namespace).items:
        if not job.metadata.deletion_timestamp:
            found.setdefault(job.metadata.labels[c.LABEL_JOB_NAME], []).append(job.metadata.name)
    return found


def pods_by_owner(core: client.CoreV1Api, namespace: str) -> dict[str, dict[str, Any]]:
    response = core.list_namespaced_pod(
        namespace, label_selector=f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}", _preload_content=False
    )
    return {pod["metadata"]["labels"][c.LABEL_JOB_NAME]: pod for pod in json.loads(response.data)["items"]}


def wait_all(what: str, check: Callable[[], list[str]], timeout: float) -> float:
    """Wait until ``check`` returns no laggards; returns the seconds it took."""
    started = time.monotonic()
    laggards = check()
    while laggards:
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"{what}: {len(laggards)} of {JOBS} not there after {timeout:.0f}s: {laggards[:10]}"
            )
        time.sleep(1)
        laggards = check()
    return time.monotonic() - started


class Round:
    """One burst of JOBS FineTuneJobs taken through create, run, report, succeed and delete."""

    def __init__(self, kube_api: client.ApiClient, namespace: str, prefix: str, timeout: float) -> None:
        self.kube_api, self.ns, self.timeout = kube_api, namespace, timeout
        self.custom = client.CustomObjectsApi(kube_api)
        self.batch = client.BatchV1Api(kube_api)
        self.core = client.CoreV1Api(kube_api)
        self.kubelet = Kubelet(kube_api, namespace)
        self.names = [f"{prefix}-{i:04d}" for i in range(JOBS)]
        self.steps = {name: 10 + i for i, name in enumerate(self.names)}  # distinct: a crossed update shows
        self.took: dict[str, float] = {}

    def run(self) -> dict[str, float]:
        self._time("created", lambda: parallel(self._create, self.names))
        self._time(
            "all_reconciled", lambda: wait_all("status and one Job each", self._not_started, self.timeout)
        )
        pods = wait_for("a pod per job", self._pods, self.timeout)
        parallel(self.kubelet.run, pods.values())
        self._time("progress_mirrored", lambda: self._report_all())
        parallel(self.kubelet.succeed, pods.values())
        self._time("all_succeeded", lambda: wait_all("succeeded", self._not_succeeded, self.timeout))
        self._time("all_deleted", lambda: self._delete_all())
        return self.took

    def _time(self, what: str, step: Callable[[], Any]) -> None:
        started = time.monotonic()
        step()
        self.took[f"{what}_seconds"] = round(time.monotonic() - started, 1)

    def _create(self, name: str) -> None:
        manifest = make_job(name, self.ns).gpus(0).manifest()
        self.custom.create_namespaced_custom_object(api.GROUP, api.VERSION, self.ns, api.PLURAL, manifest)

    def _not_started(self) -> list[str]:
        found, jobs = statuses(self.custom, self.ns), jobs_by_owner(self.batch, self.ns)
        return [
            n
            for n in self.names
            if found.get(n, {}).get("phase") != "Initializing" or jobs.get(n) != [f"{n}-a1"]
        ]

    def _pods(self) -> dict[str, dict[str, Any]] | None:
        pods = pods_by_owner(self.core, self.ns)
        return pods if len(pods) == JOBS else None

    def _report(self, name: str) -> None:
        step = self.steps[name]
        body = {
            "attempt": 1,
            "state": "training",
            "step": step,
            "totalSteps": 10_000,
            "time": now(),
            "checkpoints": [{"step": step, "uri": f"s3://ckpt/{name}/", "complete": True, "time": now()}],
        }
        write_progress(self.core, self.ns, name, body)

    def _report_all(self) -> None:
        parallel(self._report, self.names)

        def not_reported() -> list[str]:
            found = statuses(self.custom, self.ns)
            return [
                n
                for n in self.names
                if found[n].get("phase") != "Running"
                or found[n].get("progress", {}).get("step") != self.steps[n]
                or [cp["step"] for cp in found[n].get("checkpoints", [])] != [self.steps[n]]
            ]

        wait_all("running with their own progress", not_reported, self.timeout)

    def _not_succeeded(self) -> list[str]:
        return [n for n, s in statuses(self.custom, self.ns).items() if s.get("phase") != "Succeeded"]

    def _delete(self, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, self.ns, api.PLURAL, name)
        except ApiException as err:
            if err.status != 404:
                raise

    def _delete_all(self) -> None:
        """Until every FineTuneJob and every child is gone (the garbage collector's pace)."""
        parallel(self._delete, self.names)
        wait_all("deleted", lambda: sorted(statuses(self.custom, self.ns)), self.timeout)
        faults.assert_no_orphans(self.kube_api, self.ns, timeout=self.timeout)


def test_hundreds_of_jobs_at_once_twice_in_bounded_memory(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    """Two rounds: the operator's memory after the second (every job deleted again) must be about
    what it was after the first, so what it holds is bounded by the jobs alive, not by history."""
    assert operator.proc is not None
    pid = operator.proc.pid
    idle_mib = faults.rss_mib(pid)
    rounds = []
    for number in (1, 2):
        took = Round(kube_api, namespace, f"load{number}", faults.scale(600, 1800)).run()
        rounds.append({**took, "rss_after_mib": round(faults.rss_mib(pid), 1)})
    peak_mib = faults.peak_rss_mib(pid)
    assert operator.proc.pid == pid and operator.proc.poll() is None
    assert operator.errors() == []
    first, second = rounds[0]["rss_after_mib"], rounds[1]["rss_after_mib"]
    assert second <= first * 1.1 + 16, f"RSS grew from {first} to {second} MiB between two equal rounds"
    assert peak_mib < PEAK_RSS_LIMIT_MIB, f"operator peak RSS {peak_mib:.0f} MiB for {JOBS} jobs"
    faults.record(
        "load",
        jobs=JOBS,
        rounds=rounds,
        operator_rss_idle_mib=round(idle_mib, 1),
        operator_peak_rss_mib=round(peak_mib, 1),
        error_lines=0,
        lost_updates=0,
    )
