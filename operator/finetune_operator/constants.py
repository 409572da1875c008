"""Names the operator writes into the cluster: labels, annotations, child names, finalizer.

Everything the operator stamps on an object is spelled here once (JobSet's ``constants.go``), so a
reader can grep one file to learn what a label means and a test can assert on the same constant.
Child names are deterministic functions of the FineTuneJob's name and the attempt number: that is
what makes creating a child idempotent and lets a restarted operator find what it made before.
"""

from __future__ import annotations

import hashlib
import re

from finetune_operator import api

DOMAIN = api.GROUP
"""Prefix of every label, annotation and finalizer the operator owns."""

FIELD_MANAGER = "finetune-operator"
"""Field manager recorded on every write (shows up in managedFields)."""

FINALIZER = f"{DOMAIN}/finalizer"
"""The finalizer older versions put on FineTuneJobs for their per-job timers; kopf removes it now.
The children are removed by owner-reference garbage collection."""

# ------------------------------------------------------------------------------------------- labels

LABEL_JOB_NAME = f"{DOMAIN}/job-name"
"""On every child and every training pod: the owning FineTuneJob's name."""

LABEL_ATTEMPT = f"{DOMAIN}/attempt"
"""On per-attempt children (Job, pods, Service, run-config ConfigMap): the attempt number."""

LABEL_COMPONENT = f"{DOMAIN}/component"
"""What a child is for: one of the COMPONENT_* values."""

COMPONENT_TRAINER = "trainer"
COMPONENT_RUN_CONFIG = "run-config"
COMPONENT_RENDEZVOUS = "rendezvous"
COMPONENT_PROGRESS = "progress"
COMPONENT_IDENTITY = "identity"
"""The trainer's ServiceAccount, Role and RoleBinding."""

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "finetune-operator"

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
"""Kueue admits a suspended Job carrying this label as one gang."""

COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
"""Set by the Job controller on every pod of an Indexed Job: the pod's node rank."""

# -------------------------------------------------------------------------------------- annotations
# The intent recorded on an attempt's Job when the operator creates it. Creating the Job is the
# commit point of a restart: a restarted operator re-derives the counters from the newest Job.

ANN_RESTARTS_TOTAL = f"{DOMAIN}/restarts-total"
ANN_RESTARTS_COUNTED = f"{DOMAIN}/restarts-counted"
ANN_RESTART_REASON = f"{DOMAIN}/restart-reason"
ANN_CAUSE = f"{DOMAIN}/cause"
ANN_RESUME_FROM = f"{DOMAIN}/resume-from"
ANN_CHECKPOINTS_URI = f"{DOMAIN}/checkpoints-uri"
"""The checkpoint location the attempt writes to: status.checkpointsUri survives a lost status write."""

ANN_OWNER = f"{DOMAIN}/owner"
"""On training pods: the FineTuneJob's full name (labels are cut at 63 characters)."""

# ---------------------------------------------------------------------------------------- container

CONTAINER_NAME = "trainer"
RUN_CONFIG_DIR = "/etc/finetune"
WORKDIR = "/workdir"
SHM_DIR = "/dev/shm"

# -------------------------------------------------------------------------------------------- names

_MAX_BASE = 40
"""Longest base name: ``<base>-a<n>-<rank>`` must stay a 63-character DNS label (pod hostname)."""

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def child_base(name: str) -> str:
    """A short DNS-1035 label derived from the FineTuneJob's name, stable across restarts.

    FineTuneJob names may be 253 characters and may start with a digit; Service names and pod
    hostnames may not. Short, valid names are used as they are; others get a hash suffix.
    """
    if len(name) <= _MAX_BASE and _DNS_1035.match(name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    cleaned = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")
    return f"f-{cleaned[: _MAX_BASE - 11].rstrip('-')}-{digest}"


def job_label(name: str) -> str:
    """Value of :data:`LABEL_JOB_NAME` for a FineTuneJob (label values hold 63 characters)."""
    return name if len(name) <= 63 else child_base(name)


def attempt_name(name: str, attempt: int) -> str:
    """Name of attempt ``attempt``'s Job and headless Service (pods resolve as ``<this>-<rank>.<this>``)."""
    return f"{child_base(name)}-a{attempt}"


def run_config_name(name: str, attempt: int) -> str:
    """Name of the ConfigMap holding attempt ``attempt``'s RunConfig."""
    return f"{attempt_name(name, attempt)}-config"


def progress_name(name: str) -> str:
    """Name of the per-job progress ConfigMap (one per FineTuneJob, not per attempt)."""
    return f"{child_base(name)}-progress"


def trainer_identity_name(name: str) -> str:
    """Name of the trainer's ServiceAccount, Role and RoleBinding."""
    return f"{child_base(name)}-trainer"
