"""The Argo CD health check (docs/argocd-health.lua) on FineTuneJobs read back from the API server.

Argo CD runs resource health checks in gopher-lua (Lua 5.1) with the live object as ``obj``; here
the same script runs in Lua 5.1 (lupa) on objects whose status was written by the operator itself or
through the status subresource (so the CRD schema accepted it), then read back as JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lupa.lua51 as lua51
import pytest

from finetune_devenv.kubectl import Cluster
from finetune_operator.api import FineTuneJobStatus
from tests.fixtures.operator import OperatorProcess
from tests.support.builders import make_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "argocd-health.lua"
NOW = "2026-11-21T12:00:00Z"


def health(obj: dict[str, Any]) -> tuple[str, str]:
    """Run the health script as Argo CD does: a fresh Lua state, ``obj`` global, a table returned."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals()["obj"] = runtime.table_from(obj, recursive=True)
    result = runtime.execute(SCRIPT.read_text())
    assert result is not None, "the script returned nothing"
    return str(result["status"]), str(result["message"])


def condition(type_: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": NOW}


def apply_job(cluster: Cluster, namespace: str, name: str) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(make_job(name, namespace).manifest()), check=True)


def write_status(cluster: Cluster, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
    """Write ``status`` through the status subresource (as the operator does) and read the object back."""
    body = FineTuneJobStatus.model_validate(status).model_dump(mode="json", by_alias=True, exclude_none=True)
    patch = json.dumps({"status": body})
    cluster.kubectl(
        "patch",
        "finetunejob",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        patch,
        check=True,
    )
    return read(cluster, namespace, name)


def read(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(
        cluster.kubectl("get", "finetunejob", name, "-n", namespace, "-o", "json", check=True).stdout
    )
    return obj


RUNNING = {
    "phase": "Running",
    "reason": "Running",
    "message": "all 2 pods run",
    "observedGeneration": 1,
    "attempt": 2,
    "restarts": {"total": 1, "countedTowardsLimit": 0, "lastReason": "Preempted"},
    "progress": {"step": 1200, "totalSteps": 3000, "percent": 40, "lastUpdateTime": NOW},
    "conditions": [condition("Reconciling", "True", "Running"), condition("PodsReady", "True", "Running")],
}
CASES: list[tuple[str, dict[str, Any], str, list[str]]] = [
    ("running", RUNNING, "Progressing", ["Running", "step 1200/3000", "1 restart(s)", "all 2 pods run"]),
    (
        "queued",
        {"phase": "Queued", "reason": "Queued", "message": "waiting for Kueue to admit the gang"},
        "Progressing",
        ["Queued", "waiting for Kueue"],
    ),
    (
        "succeeded",
        {
            "phase": "Succeeded",
            "reason": "Succeeded",
            "observedGeneration": 1,
            "output": {"adapterUri": "s3://out/support-bot/adapter/"},
            "conditions": [condition("Ready", "True", "Succeeded")],
        },
        "Healthy",
        ["succeeded", "s3://out/support-bot/adapter/"],
    ),
    (
        "failed",
        {
            "phase": "Failed",
            "reason": "OutOfMemory",
            "message": "rank 0 ran out of GPU memory: lower perDeviceBatchSize or maxSeqLength",
            "observedGeneration": 1,
            "restarts": {"total": 2, "countedTowardsLimit": 2, "lastReason": "TrainerError"},
            "conditions": [condition("Stalled", "True", "OutOfMemory")],
        },
        "Degraded",
        ["OutOfMemory: rank 0 ran out of GPU memory", "2 restart(s)"],
    ),
    (
        "cancelled",
        {"phase": "Cancelled", "reason": "Cancelled", "message": "the FineTuneJob was deleted"},
        "Degraded",
        ["Cancelled: the FineTuneJob was deleted"],
    ),
    (
        "suspended",
        {"phase": "Suspended", "reason": "Suspended", "progress": {"step": 600, "totalSteps": 3000}},
        "Suspended",
        ["Suspended", "step 600/3000"],
    ),
    (
        "stalled-while-running",
        {**RUNNING, "conditions": [condition("Stalled", "True", "DeadlineExceeded", "over the deadline")]},
        "Degraded",
        ["Running: all 2 pods run"],
    ),
]


@pytest.mark.parametrize(("case", "status", "expected", "mentions"), CASES, ids=[c[0] for c in CASES])
def test_health_of_statuses_read_back_from_the_api_server(
    case: str,
    status: dict[str, Any],
    expected: str,
    mentions: list[str],
    cluster: Cluster,
    namespace: str,
) -> None:
    apply_job(cluster, namespace, case)
    obj = write_status(cluster, namespace, case, status)
    assert obj["status"]["phase"] == status["phase"], "the API server dropped the status"
    got, message = health(obj)
    assert got == expected, message
    for text in mentions:
        assert text in message, message


def test_a_spec_change_not_yet_observed_is_progressing(cluster: Cluster, namespace: str) -> None:
    apply_job(cluster, namespace, "changed")
    write_status(cluster, namespace, "changed", {**RUNNING, "observedGeneration": 1})
    patch = json.dumps({"spec": {"runPolicy": {"maxRestarts": 5}}})
    cluster.kubectl(
        "patch", "finetunejob", "changed", "-n", namespace, "--type=merge", "-p", patch, check=True
    )
    obj = read(cluster, namespace, "changed")
    assert obj["metadata"]["generation"] == 2
    assert health(obj) == (
        "Progressing",
        "Waiting for the operator to act on the latest spec (generation 2)",
    )


def test_a_new_job_without_status_is_progressing(cluster: Cluster, namespace: str) -> None:
    apply_job(cluster, namespace, "new")
    assert health(read(cluster, namespace, "new"))[0] == "Progressing"


def test_health_of_the_status_the_operator_wrote(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    apply_job(cluster, namespace, "live")
    deadline = time.monotonic() + 30
    while not (read(cluster, namespace, "live").get("status") or {}).get("phase"):
        assert time.monotonic() < deadline, f"the operator wrote no status:\n{operator.logs()[-4000:]}"
        time.sleep(0.1)
    obj = read(cluster, namespace, "live")
    phase = obj["status"]["phase"]
    assert phase in ("Pending", "Initializing"), obj["status"]
    status, message = health(obj)
    assert status == "Progressing" and message.startswith(phase), message
