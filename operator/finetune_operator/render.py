"""FineTuneJob spec -> Kubernetes manifests, as plain dicts. Pure: no I/O, no clock.

Two groups of children:

* once per FineTuneJob: the progress ConfigMap, the trainer's ServiceAccount, a Role that may only
  ``get``/``patch`` that one ConfigMap, and its RoleBinding (:func:`job_children`);
* once per attempt: a headless Service (rank 0's DNS name), a ConfigMap with the RunConfig and the
  Indexed Job (:func:`attempt_children`). The Job is returned last: creating it is the commit point
  of an attempt, and it carries the attempt's intent (restart counters, reason, resume checkpoint)
  as annotations so a restarted operator can re-derive the status from it.

Every child has a controller owner reference to the FineTuneJob, so deleting the FineTuneJob
garbage-collects everything. Secrets appear only as references (``secretKeyRef``/``secretRef``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from finetune_operator import constants as c
from finetune_operator.api import API_VERSION, KIND, FineTuneJob
from finetune_operator.defaults import resolve_hyperparameters
from finetune_operator.settings import Settings
from finetune_trainer import runconfig as rc

Manifest = dict[str, Any]

NON_RETRYABLE_EXIT_CODES = (
    rc.ExitCode.INVALID_DATA,
    rc.ExitCode.INVALID_CONFIG,
    rc.ExitCode.INPUT_UNREADABLE,
)


@dataclass(frozen=True)
class AttemptIntent:
    """Why an attempt exists, written on its Job as annotations and read back by :mod:`observe`.

    The counters are the totals *including* the restart that created this attempt, so the newest
    Job alone tells a restarted operator how many restarts happened and which ones counted.
    """

    attempt: int
    restarts_total: int = 0
    restarts_counted: int = 0
    last_restart_reason: str | None = None
    cause: str | None = None
    """Why this attempt was created: None for the first, else a restart reason or ``Resumed``."""
    resume_from: str | None = None
    checkpoints_uri: str | None = None
    """The checkpoint location (``status.checkpointsUri``) this attempt writes to."""

    def annotations(self) -> dict[str, str]:
        out = {
            c.ANN_RESTARTS_TOTAL: str(self.restarts_total),
            c.ANN_RESTARTS_COUNTED: str(self.restarts_counted),
        }
        optional = {
            c.ANN_RESTART_REASON: self.last_restart_reason,
            c.ANN_CAUSE: self.cause,
            c.ANN_RESUME_FROM: self.resume_from,
            c.ANN_CHECKPOINTS_URI: self.checkpoints_uri,
        }
        out.update({key: value for key, value in optional.items() if value})
        return out

    @classmethod
    def from_annotations(cls, attempt: int, annotations: dict[str, str]) -> AttemptIntent:
        def number(key: str) -> int:
            try:
                return max(0, int(annotations.get(key, "0")))
            except ValueError:
                return 0

        return cls(
            attempt=attempt,
            restarts_total=number(c.ANN_RESTARTS_TOTAL),
            restarts_counted=number(c.ANN_RESTARTS_COUNTED),
            last_restart_reason=annotations.get(c.ANN_RESTART_REASON),
            cause=annotations.get(c.ANN_CAUSE),
            resume_from=annotations.get(c.ANN_RESUME_FROM),
            checkpoints_uri=annotations.get(c.ANN_CHECKPOINTS_URI),
        )


# ------------------------------------------------------------------------------------------ helpers


def identity(job: FineTuneJob) -> tuple[str, str, str]:
    """``(namespace, name, uid)`` of a FineTuneJob read from the API server."""
    meta = job.metadata
    return str(meta.get("namespace", "")), str(meta["name"]), str(meta.get("uid", ""))


def owner_reference(job: FineTuneJob) -> Manifest:
    _, name, uid = identity(job)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(
    job: FineTuneJob,
    name: str,
    component: str,
    attempt: int | None = None,
    annotations: dict[str, str] | None = None,
) -> Manifest:
    namespace, owner, _ = identity(job)
    meta: Manifest = {
        "name": name,
        "namespace": namespace,
        "labels": _labels(owner, component, attempt),
        "ownerReferences": [owner_reference(job)],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


def _labels(owner: str, component: str, attempt: int | None) -> dict[str, str]:
    labels = {
        c.LABEL_JOB_NAME: c.job_label(owner),
        c.LABEL_COMPONENT: component,
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
    }
    if attempt is not None:
        labels[c.LABEL_ATTEMPT] = str(attempt)
    return labels


# ------------------------------------------------------------------------------------- run config


def run_config(
    job: FineTuneJob,
    attempt: int,
    resume_from: str | None,
    settings: Settings,
    checkpoints_uri: str | None = None,
) -> rc.RunConfig:
    """The trainer's contract for one attempt (checkpoints under ``checkpoints_uri``, by default the
    job's :func:`checkpoints_uri`). The hyperparameters are complete: the effective values, visible
    in the attempt's run-config ConfigMap."""
    namespace, name, uid = identity(job)
    spec = job.spec
    base = checkpoints_uri or effective_checkpoints_uri(job, settings)
    if base is None:
        raise NoCheckpointLocation(no_checkpoint_location_message())
    targets = spec.adapter.target_modules
    return rc.RunConfig(
        job=rc.JobRef(namespace=namespace, name=name, uid=uid, attempt=attempt),
        method=spec.method,
        model=rc.ModelConfig(uri=spec.model.uri, quantization=spec.model.quantization),
        adapter=rc.AdapterConfig(
            r=spec.adapter.r,
            alpha=spec.adapter.alpha,
            dropout=spec.adapter.dropout,
            target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        ),
        dataset=rc.DatasetConfig(
            train=spec.dataset.train,
            eval=spec.dataset.eval,
            eval_fraction=spec.dataset.eval_fraction,
            format=spec.dataset.format,
            max_seq_length=spec.dataset.max_seq_length,
            packing=spec.dataset.packing,
        ),
        hyperparameters=resolve_hyperparameters(spec, settings.method_defaults(spec.method)),
        distributed=rc.DistributedConfig(
            nodes=spec.resources.nodes,
            procs_per_node=procs_per_node(job),
            zero_stage=spec.distributed.zero_stage,
            offload=spec.distributed.offload,
            master_port=settings.master_port,
        ),
        checkpoints=rc.CheckpointConfig(
            uri=checkpoint_prefix(job, base),
            every_steps=spec.checkpoints.every_steps,
            keep=spec.checkpoints.keep,
            resume_from=resume_from,
        ),
        output=rc.OutputConfig(uri=spec.output.uri, merge=spec.output.merge),
        s3=_s3_config(job, settings),
        progress=rc.ProgressConfig(
            transport="configmap",
            namespace=namespace,
            name=c.progress_name(name),
            min_interval_seconds=settings.progress_min_interval_seconds,
        ),
    )


class NoCheckpointLocation(ValueError):
    """Neither the job nor the platform says where checkpoints go."""


def no_checkpoint_location_message() -> str:
    return (
        "spec.checkpoints.uri is unset and the operator has no default checkpoint location: set "
        "spec.checkpoints.uri (for example s3://bucket/checkpoints/), or ask the platform team to set "
        "the chart value defaults.checkpointUri (environment variable FTJ_DEFAULT_CHECKPOINT_URI)"
    )


def effective_checkpoints_uri(job: FineTuneJob, settings: Settings | None = None) -> str | None:
    """Where this job's checkpoints go (``status.checkpointsUri``): the location recorded at its first
    start, else ``spec.checkpoints.uri``, else the platform's default; None when there is none."""
    recorded = job.status.checkpoints_uri or job.spec.checkpoints.uri
    return recorded or (settings.default_checkpoint_uri if settings else None)


def checkpoint_prefix(job: FineTuneJob, base: str | None = None) -> str:
    """``<base>/<namespace>/<name>/``; ``base`` defaults to the job's recorded or spec location."""
    namespace, name, _ = identity(job)
    base = base or effective_checkpoints_uri(job)
    if base is None:
        raise NoCheckpointLocation(no_checkpoint_location_message())
    return f"{base.rstrip('/')}/{namespace}/{name}/"


def same_location(a: str, b: str) -> bool:
    """Two URI prefixes name the same place (a trailing slash aside), as the API's CEL rule judges."""
    return a.rstrip("/") == b.rstrip("/")


def default_adapter_uri(job: FineTuneJob) -> str:
    return f"{job.spec.output.uri.rstrip('/')}/adapter/"


def procs_per_node(job: FineTuneJob) -> int:
    return max(job.spec.resources.gpus_per_node, 1)


def _s3_config(job: FineTuneJob, settings: Settings) -> rc.S3Config:
    endpoint = job.spec.storage.endpoint_url or settings.default_s3_endpoint
    return rc.S3Config(
        endpoint_url=endpoint,
        region=job.spec.storage.region or settings.default_s3_region,
        addressing_style="path" if endpoint else "auto",
    )


# --------------------------------------------------------------------------------- per-job children


def job_children(job: FineTuneJob) -> list[Manifest]:
    """Progress ConfigMap, ServiceAccount, Role and RoleBinding: created once per FineTuneJob."""
    _, name, _ = identity(job)
    progress = c.progress_name(name)
    trainer = c.trainer_identity_name(name)
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _metadata(job, progress, c.COMPONENT_PROGRESS),
            "data": {},
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _metadata(job, trainer, c.COMPONENT_IDENTITY),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(job, trainer, c.COMPONENT_IDENTITY),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": [progress],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(job, trainer, c.COMPONENT_IDENTITY),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": trainer},
            "subjects": [{"kind": "ServiceAccount", "name": trainer, "namespace": identity(job)[0]}],
        },
    ]


# -------------------------------------------------------------------------------- per-attempt children


def attempt_children(job: FineTuneJob, intent: AttemptIntent, settings: Settings) -> list[Manifest]:
    """Service, run-config ConfigMap and Indexed Job of one attempt; the Job comes last."""
    _, name, _ = identity(job)
    attempt = intent.attempt
    config = run_config(job, attempt, intent.resume_from, settings, intent.checkpoints_uri)
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, c.attempt_name(name, attempt), c.COMPONENT_RENDEZVOUS, attempt),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {c.LABEL_JOB_NAME: c.job_label(name), c.LABEL_ATTEMPT: str(attempt)},
            "ports": [{"name": "rendezvous", "port": settings.master_port, "protocol": "TCP"}],
        },
    }
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, c.run_config_name(name, attempt), c.COMPONENT_RUN_CONFIG, attempt),
        "data": {rc.RUN_CONFIG_FILE: json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True)},
    }
    return [service, config_map, training_job(job, intent, settings)]


def training_job(job: FineTuneJob, intent: AttemptIntent, settings: Settings) -> Manifest:
    """The Indexed Job: one pod per node, any failure fails the whole attempt (gang semantics)."""
    _, name, _ = identity(job)
    nodes = job.spec.resources.nodes
    queue = job.spec.run_policy.queue_name
    meta = _metadata(
        job, c.attempt_name(name, intent.attempt), c.COMPONENT_TRAINER, intent.attempt, intent.annotations()
    )
    if queue:
        meta["labels"][c.KUEUE_QUEUE_LABEL] = queue
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": 0,
            "suspend": bool(queue),
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": c.CONTAINER_NAME,
                            "operator": "In",
                            "values": [int(code) for code in NON_RETRYABLE_EXIT_CODES],
                        },
                    },
                ]
            },
            "template": _pod_template(job, intent.attempt, settings),
        },
    }


def _pod_template(job: FineTuneJob, attempt: int, settings: Settings) -> Manifest:
    _, name, _ = identity(job)
    res = job.spec.resources
    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "subdomain": c.attempt_name(name, attempt),
        "serviceAccountName": c.trainer_identity_name(name),
        "automountServiceAccountToken": True,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.run_as_user,
            "runAsGroup": settings.run_as_user,
            "fsGroup": settings.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(job, attempt, settings)],
        "volumes": [
            {"name": "run-config", "configMap": {"name": c.run_config_name(name, attempt)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
            {"name": "workdir", "emptyDir": {}},
        ],
    }
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations]
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    labels = _labels(name, c.COMPONENT_TRAINER, attempt)
    return {"metadata": {"labels": labels, "annotations": {c.ANN_OWNER: name}}, "spec": pod_spec}


def _container(job: FineTuneJob, attempt: int, settings: Settings) -> Manifest:
    _, name, _ = identity(job)
    namespace = identity(job)[0]
    res = job.spec.resources
    nodes = res.nodes
    procs = procs_per_node(job)
    job_name = c.attempt_name(name, attempt)
    env: list[Manifest] = [
        {"name": rc.RUN_CONFIG_ENV, "value": f"{c.RUN_CONFIG_DIR}/{rc.RUN_CONFIG_FILE}"},
        {
            "name": "NODE_RANK",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{c.COMPLETION_INDEX_LABEL}']"}},
        },
        {"name": "NNODES", "value": str(nodes)},
        {"name": "NPROC_PER_NODE", "value": str(procs)},
        {"name": "WORLD_SIZE_HINT", "value": str(nodes * procs)},
        {"name": "MASTER_ADDR", "value": f"{job_name}-0.{job_name}.{namespace}.svc"},
        {"name": "MASTER_PORT", "value": str(settings.master_port)},
        {"name": "FTJ_WORKDIR", "value": c.WORKDIR},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    creds = job.spec.credentials
    if creds.hf_token_secret_ref:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": creds.hf_token_secret_ref, "key": "HF_TOKEN"}},
            }
        )
    resources: Manifest = {}
    limits: dict[str, str] = {}
    if res.gpus_per_node > 0:
        limits[res.gpu_resource] = str(res.gpus_per_node)
    if res.cpu:
        limits["cpu"] = res.cpu
    if res.memory:
        limits["memory"] = res.memory
    if limits:
        resources = {"limits": limits, "requests": dict(limits)}
    container: Manifest = {
        "name": c.CONTAINER_NAME,
        "image": res.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(settings.trainer_command),
        "env": env,
        "resources": resources,
        "ports": [{"name": "rendezvous", "containerPort": settings.master_port, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "run-config", "mountPath": c.RUN_CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": c.SHM_DIR},
            {"name": "workdir", "mountPath": c.WORKDIR},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if creds.s3_secret_ref:
        container["envFrom"] = [{"secretRef": {"name": creds.s3_secret_ref}}]
    return container
