"""Fluent builders for FineTuneJobs and the children the operator observes.

    job = make_job("a").dpo().nodes(2).build()          # parsed FineTuneJob (as read from the API)
    manifest = make_job("a").queue("team-a").manifest()  # dict to create with the API
    jobs = [attempt_job(job, 1).failed()]                # the attempt's batch/v1 Job, with status
    pods = [pod(job, 1, rank=0).exited(3, "bad row 7")]  # a training pod, with status

Children are rendered by the operator's own :mod:`render` (so they carry the real labels, owner
references and annotations) and then given the status a Job controller or kubelet would write.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any, Self

from finetune_operator import constants as c
from finetune_operator.api import FineTuneJob
from finetune_operator.render import AttemptIntent, job_children, training_job
from finetune_operator.settings import Settings
from finetune_trainer.runconfig import PROGRESS_KEY, RunConfig

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
"""The unit tests' clock starts here."""


def ts(seconds: float = 0) -> str:
    """RFC 3339 time ``seconds`` after :data:`T0`, as the API server writes it."""
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def at(seconds: float = 0) -> datetime:
    return T0 + timedelta(seconds=seconds)


class JobBuilder:
    def __init__(self, name: str, namespace: str = "default") -> None:
        self._meta: dict[str, Any] = {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "generation": 1,
            "resourceVersion": "1",
        }
        self._spec: dict[str, Any] = {
            "method": "sft",
            "model": {"uri": "s3://models/llama-3.1-8b-instruct/"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "resources": {"nodes": 1, "gpusPerNode": 1},
            "checkpoints": {"uri": "s3://ckpt/"},
            "output": {"uri": f"s3://out/{name}/"},
        }
        self._status: dict[str, Any] | None = None

    def _set(self, path: str, value: Any) -> Self:
        node = self._spec
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
        return self

    def sft(self) -> Self:
        return self._set("method", "sft")

    def dpo(self) -> Self:
        return self._set("method", "dpo")

    def model(self, uri: str, billions: float | None = None, quantization: str | None = None) -> Self:
        self._set("model.uri", uri)
        if billions is not None:
            self._set("model.parametersBillions", billions)
        if quantization is not None:
            self._set("model.quantization", quantization)
        return self

    def nodes(self, n: int) -> Self:
        return self._set("resources.nodes", n)

    def gpus(self, n: int) -> Self:
        return self._set("resources.gpusPerNode", n)

    def resources(self, **values: Any) -> Self:
        for key, value in values.items():
            self._set(f"resources.{key}", value)
        return self

    def hyper(self, **values: Any) -> Self:
        for key, value in values.items():
            self._set(f"hyperparameters.{key}", value)
        return self

    def seq_len(self, n: int) -> Self:
        return self._set("dataset.maxSeqLength", n)

    def secrets(self, s3: str | None = None, hf: str | None = None) -> Self:
        if s3:
            self._set("credentials.s3SecretRef", s3)
        if hf:
            self._set("credentials.hfTokenSecretRef", hf)
        return self

    def endpoint(self, url: str) -> Self:
        return self._set("storage.endpointUrl", url)

    def queue(self, name: str) -> Self:
        return self._set("runPolicy.queueName", name)

    def suspend(self, value: bool = True) -> Self:
        return self._set("runPolicy.suspend", value)

    def max_restarts(self, n: int) -> Self:
        return self._set("runPolicy.maxRestarts", n)

    def deadline(self, seconds: int) -> Self:
        return self._set("runPolicy.activeDeadlineSeconds", seconds)

    def ttl(self, seconds: int) -> Self:
        return self._set("runPolicy.ttlSecondsAfterFinished", seconds)

    def generation(self, n: int) -> Self:
        self._meta["generation"] = n
        return self

    def deleting(self) -> Self:
        self._meta["deletionTimestamp"] = ts(0)
        return self

    def status(self, **values: Any) -> Self:
        """camelCase status fields, e.g. ``status(phase="Running", attempt=1)``."""
        self._status = {**(self._status or {}), **values}
        return self

    def manifest(self) -> dict[str, Any]:
        """The object to create (no uid, resourceVersion or status)."""
        meta = {k: v for k, v in self._meta.items() if k in ("name", "namespace")}
        return {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": meta,
            "spec": copy.deepcopy(self._spec),
        }

    def raw(self) -> dict[str, Any]:
        """The object as the API server would return it."""
        out = self.manifest()
        out["metadata"] = copy.deepcopy(self._meta)
        if self._status is not None:
            out["status"] = copy.deepcopy(self._status)
        return out

    def build(self) -> FineTuneJob:
        return FineTuneJob.model_validate(self.raw())


def make_job(name: str = "a", namespace: str = "default") -> JobBuilder:
    return JobBuilder(name, namespace)


# ------------------------------------------------------------------------------------------ children


class ChildBuilder:
    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj

    def build(self) -> dict[str, Any]:
        return self.obj

    def _status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.obj.setdefault("status", {})
        return status


class AttemptJobBuilder(ChildBuilder):
    def _condition(self, type_: str, reason: str = "", message: str = "") -> Self:
        conds = self._status().setdefault("conditions", [])
        conds.append({"type": type_, "status": "True", "reason": reason, "message": message})
        return self

    def started(self, seconds: float = 0) -> Self:
        self._status()["startTime"] = ts(seconds)
        return self

    def complete(self) -> Self:
        return self._condition("SuccessCriteriaMet")._condition("Complete")

    def failing(self, reason: str = "BackoffLimitExceeded") -> Self:
        return self._condition("FailureTarget", reason, "Job has reached the specified backoff limit")

    def failed(self, reason: str = "BackoffLimitExceeded", message: str = "") -> Self:
        return self._condition("FailureTarget", reason, message)._condition("Failed", reason, message)

    def suspended(self, value: bool = True) -> Self:
        self.obj["spec"]["suspend"] = value
        return self

    def deleting(self) -> Self:
        self.obj["metadata"]["deletionTimestamp"] = ts(0)
        return self


def attempt_job(
    job: FineTuneJob, attempt: int, intent: AttemptIntent | None = None, settings: Settings | None = None
) -> AttemptJobBuilder:
    """The batch/v1 Job of an attempt, rendered by the operator."""
    manifest = training_job(job, intent or AttemptIntent(attempt=attempt), settings or Settings())
    manifest["metadata"]["creationTimestamp"] = ts(0)
    return AttemptJobBuilder(manifest)


class PodBuilder(ChildBuilder):
    def _container(self, state: dict[str, Any], ready: bool = False) -> None:
        self._status()["containerStatuses"] = [
            {"name": c.CONTAINER_NAME, "ready": ready, "restartCount": 0, "state": state}
        ]

    def started(self, seconds: float = 0) -> Self:
        self._status()["startTime"] = ts(seconds)
        return self

    def running(self) -> Self:
        self._status()["phase"] = "Running"
        self._status()["conditions"] = [{"type": "Ready", "status": "True"}]
        self._container({"running": {"startedAt": ts(0)}}, ready=True)
        return self

    def succeeded(self) -> Self:
        self._status()["phase"] = "Succeeded"
        self._container({"terminated": {"exitCode": 0, "reason": "Completed"}})
        return self

    def exited(self, code: int, message: str = "", reason: str = "Error") -> Self:
        self._status()["phase"] = "Failed"
        self._container({"terminated": {"exitCode": code, "reason": reason, "message": message}})
        return self

    def oom(self) -> Self:
        return self.exited(137, "", reason="OOMKilled")

    def disrupted(self, reason: str = "PreemptionByScheduler", exit_code: int = 143) -> Self:
        self.exited(exit_code, "")
        self._status()["conditions"] = [
            {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": "preempted"}
        ]
        return self

    def evicted(self) -> Self:
        self._status()["phase"] = "Failed"
        self._status()["reason"] = "Evicted"
        self._status()["message"] = "The node was low on resource: memory."
        return self

    def waiting(self, reason: str, message: str = "") -> Self:
        self._status()["phase"] = "Pending"
        self._container({"waiting": {"reason": reason, "message": message}})
        return self

    def deleting(self) -> Self:
        self.obj["metadata"]["deletionTimestamp"] = ts(0)
        return self


def pod(job: FineTuneJob, attempt: int, rank: int = 0, settings: Settings | None = None) -> PodBuilder:
    """A training pod of ``attempt`` as the Job controller creates it (labels, owner), Pending."""
    parent = training_job(job, AttemptIntent(attempt=attempt), settings or Settings())
    template = parent["spec"]["template"]
    name = parent["metadata"]["name"]
    meta = copy.deepcopy(template["metadata"])
    meta["labels"][c.COMPLETION_INDEX_LABEL] = str(rank)
    meta.update(
        name=f"{name}-{rank}-x{rank}",
        namespace=parent["metadata"]["namespace"],
        creationTimestamp=ts(0),
        ownerReferences=[{"apiVersion": "batch/v1", "kind": "Job", "name": name, "controller": True}],
    )
    return PodBuilder(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": copy.deepcopy(template["spec"]),
            "status": {"phase": "Pending"},
        }
    )


def progress_config_map(job: FineTuneJob, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """The per-job progress ConfigMap, holding ``report`` (camelCase ProgressReport) if given."""
    cm = copy.deepcopy(job_children(job)[0])
    if report is not None:
        cm["data"] = {PROGRESS_KEY: json.dumps(report)}
    return cm


def identity_objects(job: FineTuneJob) -> list[dict[str, Any]]:
    """The trainer's ServiceAccount, Role and RoleBinding as rendered."""
    return copy.deepcopy(job_children(job)[1:])


def run_config(**changes: Any) -> RunConfig:
    """A valid trainer RunConfig; each keyword replaces a top-level field, or updates it if both are dicts."""
    base: dict[str, Any] = {
        "job": {"namespace": "ns", "name": "j"},
        "method": "sft",
        "model": {"uri": "s3://models/llama/"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "checkpoints": {"uri": "s3://ckpt/ns/j/"},
        "output": {"uri": "s3://out/j/"},
    }
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        base[key] = {**base[key], **value} if both else value
    return RunConfig.model_validate(base)
