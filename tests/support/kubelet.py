"""A simulated kubelet: writes pod status through the status subresource, as a kubelet would.

The test control plane has no kubelet and no scheduler, so pods stay Pending. Tests move them on:

    kubelet = Kubelet(kube_api, namespace)
    pods = kubelet.wait_pods("a-a1", 2)        # the Job controller created them
    kubelet.run(*pods)                         # phase Running, container running and ready
    kubelet.fail(pods[1], 1, "NCCL timeout")   # phase Failed, terminated with exit code and message
    kubelet.preempt(pods[0])                   # DisruptionTarget=True, then Failed (exit 143)

The Job controller, garbage collector and the operator react exactly as in a real cluster.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_operator import constants as c

Pod = dict[str, Any]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Kubelet:
    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace

    # ------------------------------------------------------------------------------------- reading

    def pods(self, job_name: str) -> list[Pod]:
        """Pods of a batch/v1 Job that are not being deleted, by completion index."""
        response = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}", _preload_content=False
        )
        pods = [p for p in json.loads(response.data)["items"] if not p["metadata"].get("deletionTimestamp")]
        return sorted(pods, key=lambda p: int(p["metadata"]["labels"].get(c.COMPLETION_INDEX_LABEL, "0")))

    def wait_pods(self, job_name: str, count: int, timeout: float = 30) -> list[Pod]:
        deadline = time.monotonic() + timeout
        while True:
            pods = self.pods(job_name)
            if len(pods) >= count:
                return pods
            if time.monotonic() > deadline:
                raise TimeoutError(f"Job {job_name}: {len(pods)}/{count} pods after {timeout}s")
            time.sleep(0.1)

    # ------------------------------------------------------------------------------------- writing

    def run(self, *pods: Pod) -> None:
        for pod in pods:
            self._write(pod, self._running)

    def succeed(self, *pods: Pod) -> None:
        for pod in pods:
            self._write(pod, lambda status: self._terminated(status, 0, "Completed", ""))

    def fail(self, pod: Pod, exit_code: int, message: str = "", reason: str = "Error") -> None:
        """The trainer exited with ``exit_code``; ``message`` is what it wrote to the termination log."""
        self._write(pod, lambda status: self._terminated(status, exit_code, reason, message))

    def oom(self, pod: Pod) -> None:
        self.fail(pod, 137, reason="OOMKilled")

    def preempt(self, pod: Pod, reason: str = "PreemptionByScheduler", exit_code: int = 143) -> None:
        """A disruption: the DisruptionTarget condition first, then the trainer's exit on SIGTERM."""

        def change(status: dict[str, Any]) -> None:
            self._condition(status, "DisruptionTarget", "True", reason, "the pod was preempted")
            self._terminated(status, exit_code, "Error", "")

        self._write(pod, change)

    def waiting(self, pod: Pod, reason: str, message: str = "") -> None:
        """The container cannot start (ErrImagePull, CreateContainerConfigError, ...)."""

        def change(status: dict[str, Any]) -> None:
            status["phase"] = "Pending"
            status.setdefault("startTime", _now())
            status["containerStatuses"] = [
                self._container({"waiting": {"reason": reason, "message": message}})
            ]

        self._write(pod, change)

    # ------------------------------------------------------------------------------------- details

    def _running(self, status: dict[str, Any]) -> None:
        now = _now()
        status["phase"] = "Running"
        status.setdefault("startTime", now)
        for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready"):
            self._condition(status, kind, "True", "", "")
        status["containerStatuses"] = [self._container({"running": {"startedAt": now}}, ready=True)]

    def _terminated(self, status: dict[str, Any], code: int, reason: str, message: str) -> None:
        now = _now()
        status["phase"] = "Succeeded" if code == 0 else "Failed"
        status.setdefault("startTime", now)
        for kind in ("ContainersReady", "Ready"):
            self._condition(status, kind, "False", "PodCompleted" if code == 0 else "PodFailed", "")
        terminated = {"exitCode": code, "reason": reason, "startedAt": now, "finishedAt": now}
        if message:
            terminated["message"] = message
        status["containerStatuses"] = [self._container({"terminated": terminated})]

    @staticmethod
    def _container(state: dict[str, Any], ready: bool = False) -> dict[str, Any]:
        return {
            "name": c.CONTAINER_NAME,
            "image": "trainer",
            "imageID": "",
            "ready": ready,
            "started": "running" in state,
            "restartCount": 0,
            "state": state,
        }

    @staticmethod
    def _condition(status: dict[str, Any], kind: str, value: str, reason: str, message: str) -> None:
        conditions = [cond for cond in status.get("conditions", []) if cond["type"] != kind]
        entry = {"type": kind, "status": value, "lastTransitionTime": _now()}
        if reason:
            entry["reason"] = reason
        if message:
            entry["message"] = message
        status["conditions"] = [*conditions, entry]

    def _write(self, pod: Pod, change: Any) -> None:
        """Read the pod, change its status, replace it; retry when the Job controller got there first."""
        name = pod["metadata"]["name"]
        for _ in range(20):
            fresh = json.loads(
                self.core.read_namespaced_pod(name, self.namespace, _preload_content=False).data
            )
            status = fresh.setdefault("status", {})
            change(status)
            try:
                self.core.replace_namespaced_pod_status(name, self.namespace, fresh, _preload_content=False)
                return
            except ApiException as err:
                if err.status != 409:
                    raise
            time.sleep(0.05)
        raise RuntimeError(f"pod {name}: status kept conflicting")
