"""Condition types and reasons, and the one function that sets a condition.

Three conditions follow kstatus so Argo CD, Flux and ``kubectl wait`` read health without custom
code: ``Reconciling`` (True while work is in progress), ``Stalled`` (True once the job failed) and
``Ready`` (True once it succeeded). The others are domain conditions. Reasons are CamelCase constants;
the same strings are used as event reasons and as ``status.reason``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from finetune_operator.api import Condition

# ------------------------------------------------------------------------------------------- types

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
ADMITTED = "Admitted"
PODS_READY = "PodsReady"
PROGRESSING = "Progressing"
CHECKPOINT_AVAILABLE = "CheckpointAvailable"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"

ORDER = (
    READY,
    RECONCILING,
    STALLED,
    ADMITTED,
    PODS_READY,
    PROGRESSING,
    CHECKPOINT_AVAILABLE,
    SUCCEEDED,
    FAILED,
    SUSPENDED,
)
"""Conditions are listed in this order so that the status is stable between reconciles."""

# ----------------------------------------------------------------------------------------- reasons
# Lifecycle.
CREATED = "Created"
QUEUED = "Queued"
ADMITTED_REASON = "Admitted"
INITIALIZING = "Initializing"
PODS_PENDING = "PodsPending"
RUNNING = "Running"
RESTARTING = "Restarting"
RESUMED = "Resumed"
SUSPENDED_REASON = "Suspended"
SUCCEEDED_REASON = "Succeeded"
CANCELLED = "Cancelled"
CHECKPOINT_SAVED = "CheckpointSaved"
NO_CHECKPOINT = "NoCheckpoint"
ATTEMPT_MISSING = "AttemptMissing"

# Failures that restart the gang without counting towards runPolicy.maxRestarts.
PREEMPTED = "Preempted"
EVICTED = "Evicted"
NODE_LOST = "NodeLost"

# Failures that restart the gang and count.
TRAINER_ERROR = "TrainerError"

# Failures that fail the FineTuneJob at once: the next attempt would fail the same way.
INVALID_DATA = "InvalidData"
INVALID_CONFIG = "InvalidConfig"
INPUT_UNREADABLE = "InputUnreadable"
OUT_OF_MEMORY = "OutOfMemory"
IMAGE_PULL_FAILED = "ImagePullFailed"
CONTAINER_CONFIG_ERROR = "ContainerConfigError"
INVALID_SPEC = "InvalidSpec"
"""The API server refused a child rendered from the spec (a bad nodeSelector, image name, ...)."""

# Policy.
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
DEADLINE_EXCEEDED = "DeadlineExceeded"

NOT_COUNTED = frozenset({PREEMPTED, EVICTED, NODE_LOST, RESUMED, ATTEMPT_MISSING})
"""Restart reasons that do not count towards ``runPolicy.maxRestarts``."""


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[Condition]:
    """Return ``conditions`` with ``type_`` set; ``lastTransitionTime`` moves only when status flips."""
    wanted = "True" if status else "False"
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == wanted else now
    new = Condition(
        type=type_,
        status=wanted,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )
    merged = [c for c in conditions if c.type != type_] + [new]
    rank = {t: i for i, t in enumerate(ORDER)}
    return sorted(merged, key=lambda c: rank.get(c.type, len(ORDER)))


def get_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)
