"""Children of a FineTuneJob (plain dicts as the API server returns them) -> a summary. Pure.

The summary keeps facts, not judgements: which attempts exist, what each pod's containers said when
they stopped or why they cannot start, and the latest progress report. Classifying a failure
(counted, not counted, fatal) is policy and lives in :mod:`decide`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pydantic

from finetune_operator import constants as c
from finetune_operator.render import AttemptIntent
from finetune_trainer.runconfig import PROGRESS_KEY, ProgressReport

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Children:
    """Everything the operator knows of one FineTuneJob's children (whole objects, or the parts of
    them that :func:`essentials` keeps: both read the same)."""

    jobs: Sequence[Obj] = field(default_factory=list)
    pods: Sequence[Obj] = field(default_factory=list)
    services: Sequence[Obj] = field(default_factory=list)
    config_maps: Sequence[Obj] = field(default_factory=list)
    identity: Sequence[Obj] = field(default_factory=list)
    """ServiceAccount, Role and RoleBinding (each dict has ``kind``)."""


@dataclass(frozen=True)
class PodFacts:
    name: str
    rank: int | None
    phase: str
    ready: bool
    deleting: bool
    disruption: str | None
    """Reason of a ``DisruptionTarget=True`` condition (preemption, eviction, node loss)."""
    status_reason: str | None
    """``status.reason`` (the kubelet sets Evicted, Preempting, ...)."""
    exit_code: int | None
    terminated_reason: str | None
    message: str
    """The trainer's termination message (or its last log lines) or the pod's status message."""
    waiting_reason: str | None
    waiting_message: str
    since: datetime | None
    """When the kubelet started the pod (``status.startTime``), else when it was created."""


@dataclass(frozen=True)
class AttemptState:
    attempt: int
    job_name: str
    intent: AttemptIntent
    deleting: bool
    suspended: bool
    complete: bool
    failed: bool
    """The Job failed and all its pods have stopped (condition ``Failed``)."""
    failing: bool
    """The Job will fail (``FailureTarget``) but some pods are still stopping (saving a checkpoint)."""
    failure_reason: str
    failure_message: str
    start_time: datetime | None
    pods: tuple[PodFacts, ...]

    @property
    def live_pods(self) -> tuple[PodFacts, ...]:
        return tuple(p for p in self.pods if not p.deleting and p.phase in ("Pending", "Running"))

    @property
    def running_pods(self) -> int:
        """Pods running or already finished successfully (a rank may finish before the others)."""
        return sum(1 for p in self.pods if p.phase in ("Running", "Succeeded") and not p.deleting)


@dataclass(frozen=True)
class Observation:
    attempts: dict[int, AttemptState]
    """Attempt number -> its Job's state, for every attempt Job that exists."""
    leftovers: frozenset[int]
    """Attempt numbers of any per-attempt child (Job, Service, run-config ConfigMap) that exists."""
    missing_job_children: tuple[str, ...]
    """Kinds of the per-job children not there yet (ConfigMap, ServiceAccount, Role, RoleBinding)."""
    progress: ProgressReport | None
    progress_error: str | None = None

    @property
    def newest(self) -> AttemptState | None:
        return self.attempts[max(self.attempts)] if self.attempts else None


def observe(children: Children, name: str) -> Observation:
    """Summarise the children of FineTuneJob ``name``."""
    pods_by_attempt: dict[int, list[PodFacts]] = {}
    for pod in children.pods:
        attempt = _attempt_of(pod)
        if attempt is not None:
            pods_by_attempt.setdefault(attempt, []).append(pod_facts(pod))

    attempts: dict[int, AttemptState] = {}
    for job in children.jobs:
        attempt = _attempt_of(job)
        if attempt is not None:
            pods = sorted(pods_by_attempt.get(attempt, []), key=lambda p: (p.rank is None, p.rank, p.name))
            attempts[attempt] = attempt_state(job, attempt, tuple(pods))

    leftovers = {
        a
        for obj in (*children.jobs, *children.services, *children.config_maps)
        if (a := _attempt_of(obj)) is not None
    }
    progress_cm = next((cm for cm in children.config_maps if _name(cm) == c.progress_name(name)), None)
    present = {str(obj.get("kind")) for obj in children.identity}
    missing = [kind for kind in ("ServiceAccount", "Role", "RoleBinding") if kind not in present]
    if progress_cm is None:
        missing.insert(0, "ConfigMap")
    report, error = parse_progress(progress_cm)
    return Observation(
        attempts=attempts,
        leftovers=frozenset(leftovers),
        missing_job_children=tuple(missing),
        progress=report,
        progress_error=error,
    )


# ------------------------------------------------------------------------------------- essentials
# The operator keeps every child it watches in memory (a cache instead of listing them per
# reconcile); these keep only what :func:`observe` reads, in the same shape, so that a thousand
# FineTuneJobs cost a few MiB and not whole bodies (managedFields, pod specs, volumes).


def essentials(kind: str, obj: Obj) -> dict[str, Any]:
    """The parts of a Job, Pod or ConfigMap that :func:`observe` and the cache read, same shape."""
    meta = obj.get("metadata", {})
    labels = meta.get("labels") or {}
    kept_meta: dict[str, Any] = {
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "labels": {k: labels[k] for k in (c.LABEL_ATTEMPT, c.COMPLETION_INDEX_LABEL) if k in labels},
        "ownerReferences": [
            {"name": ref.get("name"), "uid": ref.get("uid")} for ref in meta.get("ownerReferences") or []
        ],
    }
    for key in ("deletionTimestamp", "creationTimestamp", "resourceVersion"):
        if meta.get(key):
            kept_meta[key] = meta[key]
    out: dict[str, Any] = {"kind": kind, "metadata": kept_meta}
    status = obj.get("status") or {}
    if kind == "Job":
        annotations = meta.get("annotations") or {}
        kept_meta["annotations"] = {k: v for k, v in annotations.items() if k.startswith(f"{c.DOMAIN}/")}
        out["spec"] = {"suspend": bool((obj.get("spec") or {}).get("suspend"))}
        out["status"] = {
            "startTime": status.get("startTime"),
            "conditions": [
                _keep(cond, "type", "status", "reason", "message") for cond in _list(status, "conditions")
            ],
        }
    elif kind == "Pod":
        out["status"] = {
            **_keep(status, "phase", "reason", "message", "startTime"),
            "conditions": [_keep(cond, "type", "status", "reason") for cond in _list(status, "conditions")],
            "containerStatuses": [
                _keep(container, "name", "state")
                for container in _list(status, "containerStatuses")
                if container.get("name") == c.CONTAINER_NAME
            ],
        }
    elif kind == "ConfigMap":
        data = obj.get("data") or {}
        out["data"] = {PROGRESS_KEY: data[PROGRESS_KEY]} if PROGRESS_KEY in data else {}
    return out


def _keep(obj: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {key: obj[key] for key in keys if obj.get(key) is not None}


def _list(obj: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    return list(obj.get(key) or [])


# -------------------------------------------------------------------------------------- summaries


def attempt_state(job: Obj, attempt: int, pods: tuple[PodFacts, ...]) -> AttemptState:
    meta = job.get("metadata", {})
    spec = job.get("spec", {})
    status = job.get("status", {}) or {}
    conditions = {cond.get("type"): cond for cond in status.get("conditions", []) or []}

    def true(kind: str) -> Mapping[str, Any] | None:
        cond = conditions.get(kind)
        return cond if cond is not None and cond.get("status") == "True" else None

    failed = true("Failed") or true("FailureTarget")
    # Older Job controllers set only Failed; newer ones set FailureTarget first, Failed once pods stop.
    return AttemptState(
        attempt=attempt,
        job_name=str(meta.get("name", "")),
        intent=AttemptIntent.from_annotations(attempt, dict(meta.get("annotations") or {})),
        deleting=bool(meta.get("deletionTimestamp")),
        suspended=bool(spec.get("suspend")),
        complete=true("Complete") is not None,
        failed=true("Failed") is not None,
        failing=failed is not None and true("Failed") is None,
        failure_reason=str(failed.get("reason", "")) if failed else "",
        failure_message=str(failed.get("message", "")) if failed else "",
        start_time=parse_time(status.get("startTime")),
        pods=pods,
    )


def pod_facts(pod: Obj) -> PodFacts:
    meta = pod.get("metadata", {})
    status = pod.get("status", {}) or {}
    labels = meta.get("labels") or {}
    conditions = status.get("conditions", []) or []
    disruption = next(
        (str(cond.get("reason") or "Disrupted") for cond in conditions if _is_true(cond, "DisruptionTarget")),
        None,
    )
    container = _trainer_status(status)
    state = container.get("state", {}) or {}
    terminated = state.get("terminated") or {}
    waiting = state.get("waiting") or {}
    rank_label = labels.get(c.COMPLETION_INDEX_LABEL)
    return PodFacts(
        name=str(meta.get("name", "")),
        rank=int(rank_label) if rank_label is not None and str(rank_label).isdigit() else None,
        phase=str(status.get("phase") or "Pending"),
        ready=any(_is_true(cond, "Ready") for cond in conditions),
        deleting=bool(meta.get("deletionTimestamp")),
        disruption=disruption,
        status_reason=status.get("reason"),
        exit_code=terminated.get("exitCode") if terminated else None,
        terminated_reason=terminated.get("reason") if terminated else None,
        message=str(terminated.get("message") or status.get("message") or "").strip(),
        waiting_reason=waiting.get("reason") if waiting else None,
        waiting_message=str(waiting.get("message") or "") if waiting else "",
        since=parse_time(status.get("startTime")) or parse_time(meta.get("creationTimestamp")),
    )


def parse_progress(config_map: Obj | None) -> tuple[ProgressReport | None, str | None]:
    """The latest report in the progress ConfigMap, or why it cannot be read."""
    if config_map is None:
        return None, None
    raw = (config_map.get("data") or {}).get(PROGRESS_KEY)
    if not raw:
        return None, None
    try:
        return ProgressReport.model_validate(json.loads(raw)), None
    except (ValueError, pydantic.ValidationError) as err:
        return None, f"unreadable {PROGRESS_KEY}: {str(err).splitlines()[0]}"


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _trainer_status(status: Mapping[str, Any]) -> Mapping[str, Any]:
    statuses: Iterable[Mapping[str, Any]] = status.get("containerStatuses", []) or []
    for container in statuses:
        if container.get("name") == c.CONTAINER_NAME:
            return container
    return {}


def _is_true(cond: Mapping[str, Any], kind: str) -> bool:
    return cond.get("type") == kind and cond.get("status") == "True"


def _attempt_of(obj: Obj) -> int | None:
    value = (obj.get("metadata", {}).get("labels") or {}).get(c.LABEL_ATTEMPT)
    return int(value) if value is not None and str(value).isdigit() else None


def _name(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("name", ""))
