"""Observation + current status + now -> next status, actions and events. Pure.

One call decides everything for one FineTuneJob; :mod:`reconcile` carries the actions out (in
order), writes the status once and only then posts the events. Nothing here reads the clock or
the API server, so every transition is a table row in ``tests/unit/test_decide.py``.

Crash safety rests on three rules:

* the attempt number is ``max(status.attempt, newest attempt Job)``: a Job created just before a
  crash is found again, never created twice (its name is deterministic);
* restart counters are read from the newest attempt Job's annotations (written when it was
  created, the commit point of a restart), so they are exact even if the status write was lost;
* attempt n+1 is created before attempt n is deleted, and every older attempt's children are
  deleted on every reconcile, so a crash between the two steps is healed by the next reconcile.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

from finetune_operator import conditions as cond
from finetune_operator.api import FINAL_PHASES, Condition, FineTuneJob, FineTuneJobStatus, RestartStatus
from finetune_operator.observe import AttemptState, Observation, PodFacts
from finetune_operator.progress import apply_report, newest_complete
from finetune_operator.render import (
    AttemptIntent,
    default_adapter_uri,
    no_checkpoint_location_message,
    same_location,
)
from finetune_operator.settings import Settings
from finetune_trainer.runconfig import ExitCode

# ------------------------------------------------------------------------------------------ actions


@dataclass(frozen=True)
class CreateJobChildren:
    """Create the per-job children (progress ConfigMap, ServiceAccount, Role, RoleBinding)."""


@dataclass(frozen=True)
class CreateAttempt:
    intent: AttemptIntent


@dataclass(frozen=True)
class DeleteAttempt:
    """Delete attempt ``attempt``'s Job (its pods get SIGTERM), Service and run-config ConfigMap."""

    attempt: int


@dataclass(frozen=True)
class DeleteFineTuneJob:
    """``runPolicy.ttlSecondsAfterFinished`` has passed."""


Action = CreateJobChildren | CreateAttempt | DeleteAttempt | DeleteFineTuneJob


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    status: FineTuneJobStatus
    actions: tuple[Action, ...] = ()
    events: tuple[Event, ...] = ()


# ------------------------------------------------------------------------------ failure classification

START_FAILURES = {
    "ErrImagePull": cond.IMAGE_PULL_FAILED,
    "ImagePullBackOff": cond.IMAGE_PULL_FAILED,
    "InvalidImageName": cond.IMAGE_PULL_FAILED,
    "CreateContainerConfigError": cond.CONTAINER_CONFIG_ERROR,
    "CreateContainerError": cond.CONTAINER_CONFIG_ERROR,
}
"""Waiting reasons that will not heal by waiting (after a grace period, see Settings)."""

IMMEDIATE_START_FAILURES = frozenset({"InvalidImageName"})

DISRUPTIONS = {
    "PreemptionByScheduler": cond.PREEMPTED,
    "PreemptionByKubeScheduler": cond.PREEMPTED,
    "Preempting": cond.PREEMPTED,
    "Preempted": cond.PREEMPTED,
    "EvictionByEvictionAPI": cond.EVICTED,
    "TerminationByKubelet": cond.EVICTED,
    "Evicted": cond.EVICTED,
    "DeletionByTaintManager": cond.NODE_LOST,
    "DeletionByPodGC": cond.NODE_LOST,
    "NodeLost": cond.NODE_LOST,
    "NodeShutdown": cond.NODE_LOST,
    "Shutdown": cond.NODE_LOST,
}
"""Pod condition ``DisruptionTarget`` reasons and ``status.reason`` values -> restart reason."""

NON_RETRYABLE = {
    ExitCode.INVALID_DATA: cond.INVALID_DATA,
    ExitCode.INVALID_CONFIG: cond.INVALID_CONFIG,
    ExitCode.INPUT_UNREADABLE: cond.INPUT_UNREADABLE,
}

OOM_ADVICE = (
    "Lower hyperparameters.perDeviceBatchSize or dataset.maxSeqLength, raise resources.memory, "
    "spread the model over more GPUs (resources.nodes/gpusPerNode), or set distributed.offload."
)


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    fatal: bool = False
    counted: bool = True


def classify(attempt: AttemptState) -> Failure:
    """Why a failed attempt failed, judged from its pods (worst first).

    A non-retryable exit code or an OOM kill is fatal whatever the other ranks did. A disruption
    (preemption, eviction, node loss) explains the other ranks' errors, so it is not counted. An
    exit code 143 is the trainer's own answer to SIGTERM, and the Job controller SIGTERMs every
    surviving rank when one fails, so 143 is the root cause only when nothing else failed.
    """
    pods = attempt.pods
    for pod in pods:
        if pod.exit_code in NON_RETRYABLE:
            reason = NON_RETRYABLE[ExitCode(pod.exit_code)]
            text = pod.message or f"exit code {pod.exit_code}"
            return Failure(reason, f"{_who(pod)} failed: {text}", fatal=True, counted=True)
    for pod in pods:
        if pod.terminated_reason == "OOMKilled":
            return Failure(
                cond.OUT_OF_MEMORY, f"{_who(pod)} ran out of memory (OOMKilled). {OOM_ADVICE}", True
            )
    for pod in pods:
        kind = DISRUPTIONS.get(pod.disruption or "") or DISRUPTIONS.get(pod.status_reason or "")
        if kind is None and pod.disruption:
            kind = cond.EVICTED
        if kind is not None:
            detail = pod.disruption or pod.status_reason
            return Failure(kind, f"{_who(pod)} was disrupted ({detail})", counted=False)
    for pod in pods:
        if pod.exit_code not in (None, 0, ExitCode.PREEMPTED):
            text = pod.message or pod.terminated_reason or "no message"
            return Failure(cond.TRAINER_ERROR, f"{_who(pod)} exited with code {pod.exit_code}: {text}")
    for pod in pods:
        if pod.exit_code == ExitCode.PREEMPTED:
            return Failure(
                cond.PREEMPTED, f"{_who(pod)} stopped on SIGTERM after a checkpoint", counted=False
            )
    detail = attempt.failure_message or attempt.failure_reason or "no pod reported why"
    return Failure(cond.TRAINER_ERROR, f"attempt {attempt.attempt} failed: {detail}")


def start_failure(attempt: AttemptState, now: datetime, grace_seconds: float, image: str) -> Failure | None:
    """A pod that cannot start (bad image, missing secret) for longer than the grace period."""
    for pod in attempt.live_pods:
        reason = START_FAILURES.get(pod.waiting_reason or "")
        if reason is None:
            continue
        waited = (now - pod.since).total_seconds() if pod.since else 0.0
        if pod.waiting_reason in IMMEDIATE_START_FAILURES or waited >= grace_seconds:
            hint = (
                f"check that image {image!r} exists and the node can pull it"
                if reason == cond.IMAGE_PULL_FAILED
                else "check that the Secrets named in spec.credentials exist and hold the expected keys"
            )
            detail = f"{pod.waiting_reason}: {pod.waiting_message}".rstrip(": ")
            return Failure(reason, f"{_who(pod)} cannot start ({detail}); {hint}", fatal=True)
    return None


def _who(pod: PodFacts) -> str:
    return f"rank {pod.rank} (pod {pod.name})" if pod.rank is not None else f"pod {pod.name}"


# -------------------------------------------------------------------------------------------- decide


@dataclass
class _Draft:
    """The decision being built; turned into a frozen :class:`Decision` at the end."""

    status: FineTuneJobStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def phase(self, phase: str, reason: str, message: str) -> None:
        self.status.phase = phase  # type: ignore[assignment]
        self.status.reason = reason
        self.status.message = message


def decide(job: FineTuneJob, obs: Observation, now: datetime, settings: Settings) -> Decision:
    """The next status of ``job`` and what to do to get there."""
    now = now.replace(microsecond=0)
    before = job.status
    attempt_no = max(before.attempt, max(obs.attempts, default=0))
    newest = obs.attempts.get(attempt_no)
    live = newest if newest is not None and not newest.deleting else None

    status = apply_report(before, obs.progress, attempt_no)
    status.attempt = attempt_no
    status.observed_generation = job.metadata.get("generation")
    if newest is not None:
        status.restarts = RestartStatus(
            total=newest.intent.restarts_total,
            counted_towards_limit=newest.intent.restarts_counted,
            last_reason=newest.intent.last_restart_reason,
        )
    if status.checkpoints_uri is None and attempt_no > 0:
        # Lost with a status write, or a job started before the field existed: the Job knows.
        recorded = newest.intent.checkpoints_uri if newest is not None else None
        status.checkpoints_uri = recorded or job.spec.checkpoints.uri
    if status.start_time is None:
        started = [a.start_time for a in obs.attempts.values() if a.start_time is not None]
        status.start_time = min(started) if started else None

    draft = _Draft(status)
    if job.metadata.get("deletionTimestamp"):
        _cancel(draft, live)
    elif before.phase in FINAL_PHASES:
        _finished(job, draft, now)
    else:
        _active(job, obs, draft, live, now, settings)

    if status.phase in FINAL_PHASES and status.completion_time is None:
        status.completion_time = now
    # Old attempts never linger: a crash between "create n+1" and "delete n" heals here.
    current = draft.status.attempt
    for old in sorted(obs.leftovers):
        if old < current and DeleteAttempt(old) not in draft.actions:
            draft.actions.append(DeleteAttempt(old))

    draft.status.conditions = _conditions(draft.status, now)
    _transition_events(before, draft)
    return Decision(status=draft.status, actions=tuple(draft.actions), events=tuple(draft.events))


def refused(job: FineTuneJob, message: str, now: datetime) -> Decision:
    """The API server refused a child rendered from this spec: retrying cannot help, so fail."""
    now = now.replace(microsecond=0)
    draft = _Draft(job.status.model_copy(deep=True))
    draft.phase("Failed", cond.INVALID_SPEC, message)
    draft.status.completion_time = draft.status.completion_time or now
    draft.status.observed_generation = job.metadata.get("generation")
    draft.status.conditions = _conditions(draft.status, now)
    _transition_events(job.status, draft)
    return Decision(status=draft.status, events=tuple(draft.events))


def _cancel(draft: _Draft, live: AttemptState | None) -> None:
    if draft.status.phase not in FINAL_PHASES:
        draft.phase("Cancelled", cond.CANCELLED, "the FineTuneJob was deleted; its pods are being stopped")
    if live is not None and live.live_pods:
        draft.actions.append(DeleteAttempt(live.attempt))


def _finished(job: FineTuneJob, draft: _Draft, now: datetime) -> None:
    ttl = job.spec.run_policy.ttl_seconds_after_finished
    done = draft.status.completion_time
    if ttl is not None and done is not None and now >= done + timedelta(seconds=ttl):
        draft.actions.append(DeleteFineTuneJob())


def _active(
    job: FineTuneJob,
    obs: Observation,
    draft: _Draft,
    live: AttemptState | None,
    now: datetime,
    settings: Settings,
) -> None:
    spec = job.spec
    policy = spec.run_policy
    status = draft.status
    if obs.missing_job_children:
        draft.actions.append(CreateJobChildren())

    deadline = policy.active_deadline_seconds
    if deadline and status.start_time and not policy.suspend:
        ran = (now - status.start_time).total_seconds()
        if ran >= deadline:
            if live is not None:
                draft.actions.append(DeleteAttempt(live.attempt))
            draft.phase(
                "Failed",
                cond.DEADLINE_EXCEEDED,
                f"ran {int(ran)}s, longer than runPolicy.activeDeadlineSeconds={deadline}",
            )
            return

    if policy.suspend:
        if live is not None:
            draft.actions.append(DeleteAttempt(live.attempt))
        draft.phase(
            "Suspended",
            cond.SUSPENDED_REASON,
            "runPolicy.suspend is true: pods stopped after a final checkpoint; "
            "set it to false to resume from the newest checkpoint",
        )
        return

    if live is None:
        problem = _choose_checkpoint_location(job, status, settings)
        if problem:
            draft.phase("Failed", cond.INVALID_SPEC, problem)
            return
        _start_next(job, draft, now)
        return

    image = spec.resources.image or settings.trainer_image
    stuck = start_failure(live, now, settings.start_failure_grace_seconds, image)
    if live.complete:
        adapter = status.output.adapter_uri or default_adapter_uri(job)
        status.output.adapter_uri = adapter
        draft.phase("Succeeded", cond.SUCCEEDED_REASON, f"training finished; adapter at {adapter}")
    elif live.failed:
        _after_failure(job, draft, live, classify(live))
    elif live.failing:
        failure = classify(live)
        if failure.fatal:  # Failed follows once the pods stopped; never announce a restart first
            status.message = f"attempt {live.attempt} failed ({failure.reason}); waiting for its pods to stop"
        else:
            draft.phase(
                "Restarting",
                cond.RESTARTING,
                f"attempt {live.attempt} failed; waiting for its pods to stop (they save a checkpoint first)",
            )
    elif stuck is not None:
        draft.actions.append(DeleteAttempt(live.attempt))
        draft.phase("Failed", stuck.reason, stuck.message)
    elif live.suspended:
        queue = spec.run_policy.queue_name
        draft.phase(
            "Queued", cond.QUEUED, f"attempt {live.attempt} waits for Kueue to admit it (queue {queue})"
        )
    else:
        if status.start_time is None:
            status.start_time = live.start_time or now
        nodes = spec.resources.nodes
        running = live.running_pods
        if running >= nodes:
            draft.phase("Running", cond.RUNNING, f"attempt {live.attempt}: all {nodes} pod(s) running")
        else:
            draft.phase(
                "Initializing",
                cond.INITIALIZING,
                f"attempt {live.attempt}: {running}/{nodes} pod(s) running",
            )


def _choose_checkpoint_location(
    job: FineTuneJob, status: FineTuneJobStatus, settings: Settings
) -> str | None:
    """Fix ``status.checkpointsUri`` before the first attempt; what is wrong with it, if anything.

    The API server checks ``spec.checkpoints.uri`` itself, but cannot see the platform default.
    """
    if status.checkpoints_uri is None:
        status.checkpoints_uri = job.spec.checkpoints.uri or settings.default_checkpoint_uri
    location = status.checkpoints_uri
    if location is None:
        return no_checkpoint_location_message()
    if job.spec.checkpoints.uri is None and same_location(location, job.spec.output.uri):
        return (
            f"output.uri must differ from the platform's default checkpoint location {location} "
            "(spec.checkpoints.uri is unset): keep the trained adapter apart from checkpoints that get "
            "pruned; choose another output.uri or set spec.checkpoints.uri"
        )
    return None


def _start_next(job: FineTuneJob, draft: _Draft, now: datetime) -> None:
    """No attempt is running: start the first one, or resume after suspension or a lost Job."""
    status = draft.status
    restarts = status.restarts
    resume = newest_complete(status.checkpoints)
    if status.attempt == 0:
        intent = AttemptIntent(attempt=1)
        message = "attempt 1 created"
    elif status.phase == "Suspended":
        intent = AttemptIntent(
            attempt=status.attempt + 1,
            restarts_total=restarts.total,
            restarts_counted=restarts.counted_towards_limit,
            last_restart_reason=restarts.last_reason,
            cause=cond.RESUMED,
            resume_from=resume.uri if resume else None,
        )
        message = f"resumed as attempt {intent.attempt}{_from(resume)}"
    else:
        intent = AttemptIntent(
            attempt=status.attempt + 1,
            restarts_total=restarts.total + 1,
            restarts_counted=restarts.counted_towards_limit,
            last_restart_reason=cond.ATTEMPT_MISSING,
            cause=cond.ATTEMPT_MISSING,
            resume_from=resume.uri if resume else None,
        )
        message = (
            f"the Job of attempt {status.attempt} disappeared; "
            f"attempt {intent.attempt} started{_from(resume)}"
        )
    _create(job, draft, intent)
    queued = job.spec.run_policy.queue_name
    if queued:
        draft.phase("Queued", cond.QUEUED, f"{message}; waiting for Kueue (queue {queued})")
    else:
        status.start_time = status.start_time or now
        draft.phase("Initializing", cond.INITIALIZING if status.attempt == 1 else cond.RESUMED, message)


def _after_failure(job: FineTuneJob, draft: _Draft, live: AttemptState, failure: Failure) -> None:
    status = draft.status
    restarts = status.restarts
    limit = job.spec.run_policy.max_restarts
    if failure.fatal:
        draft.phase("Failed", failure.reason, failure.message)
        return
    counted = restarts.counted_towards_limit + (1 if failure.counted else 0)
    if counted > limit:
        draft.phase(
            "Failed",
            cond.BACKOFF_LIMIT_EXCEEDED,
            f"{failure.message}; {counted} counted failures exceed runPolicy.maxRestarts={limit}",
        )
        return
    resume = newest_complete(status.checkpoints)
    intent = AttemptIntent(
        attempt=live.attempt + 1,
        restarts_total=restarts.total + 1,
        restarts_counted=counted,
        last_restart_reason=failure.reason,
        cause=failure.reason,
        resume_from=resume.uri if resume else None,
    )
    _create(job, draft, intent)
    draft.actions.append(DeleteAttempt(live.attempt))
    note = "counted" if failure.counted else "not counted"
    draft.phase(
        "Restarting",
        failure.reason,
        f"{failure.message}; restart {intent.restarts_total} ({note}, {counted}/{limit}) "
        f"as attempt {intent.attempt}{_from(resume)}",
    )


def _create(job: FineTuneJob, draft: _Draft, intent: AttemptIntent) -> None:
    location = draft.status.checkpoints_uri or job.spec.checkpoints.uri
    intent = replace(intent, checkpoints_uri=location)
    draft.actions.append(CreateAttempt(intent))
    draft.status.attempt = intent.attempt
    draft.status.restarts = RestartStatus(
        total=intent.restarts_total,
        counted_towards_limit=intent.restarts_counted,
        last_reason=intent.last_restart_reason,
    )


def _from(resume: object) -> str:
    uri = getattr(resume, "uri", None)
    return f" from checkpoint {uri}" if uri else " (no complete checkpoint yet)"


# ---------------------------------------------------------------------------------------- conditions

_IN_PROGRESS = frozenset({"Pending", "Queued", "Initializing", "Running", "Restarting"})


def _conditions(status: FineTuneJobStatus, now: datetime) -> list[Condition]:
    phase = status.phase
    reason = status.reason or phase
    message = status.message or ""
    gen = status.observed_generation
    newest = newest_complete(status.checkpoints)
    table: list[tuple[str, bool, str, str]] = [
        (cond.READY, phase == "Succeeded", reason, message),
        (cond.RECONCILING, phase in _IN_PROGRESS, reason, message),
        (cond.STALLED, phase == "Failed", reason, message),
        (
            cond.ADMITTED,
            phase not in ("Pending", "Queued", "Suspended"),
            cond.ADMITTED_REASON if phase not in ("Pending", "Queued", "Suspended") else reason,
            "",
        ),
        (cond.PODS_READY, phase == "Running", reason, message),
        (cond.PROGRESSING, phase in ("Initializing", "Running", "Restarting"), reason, message),
        (
            cond.CHECKPOINT_AVAILABLE,
            newest is not None,
            cond.CHECKPOINT_SAVED if newest else cond.NO_CHECKPOINT,
            f"step {newest.step}: {newest.uri}" if newest else "no complete checkpoint yet",
        ),
        (cond.SUCCEEDED, phase == "Succeeded", reason, message if phase == "Succeeded" else ""),
        (cond.FAILED, phase == "Failed", reason, message if phase == "Failed" else ""),
        (cond.SUSPENDED, phase == "Suspended", reason, message if phase == "Suspended" else ""),
    ]
    conditions = list(status.conditions)
    for type_, is_true, why, text in table:
        conditions = cond.set_condition(conditions, type_, is_true, why, text, now, gen)
    return conditions


def _restart_event(before: FineTuneJobStatus, draft: _Draft) -> None:
    """A restart the status has not announced yet: its reason as a Warning event.

    Usually the phase change to Restarting carries it. But when the status write of that decision
    loses a race (the spec changed meanwhile, say to suspend), the next reconcile finds the new
    attempt already created and goes straight to the next phase: the counters say a restart
    happened, and this is its only event.
    """
    after = draft.status.restarts
    reason = after.last_reason
    if after.total <= before.restarts.total or not reason:
        return
    if any(event.reason == reason for event in draft.events):
        return
    draft.events.append(
        Event(
            "Warning",
            reason,
            f"attempt {draft.status.attempt - 1} ended ({reason}); restart {after.total} "
            f"({after.counted_towards_limit} counted) as attempt {draft.status.attempt}",
        )
    )


def _transition_events(before: FineTuneJobStatus, draft: _Draft) -> None:
    after = draft.status
    if (after.phase, after.reason, after.attempt) != (before.phase, before.reason, before.attempt):
        warning = after.phase in ("Failed", "Restarting") or after.reason in (
            cond.IMAGE_PULL_FAILED,
            cond.CONTAINER_CONFIG_ERROR,
        )
        draft.events.append(
            Event("Warning" if warning else "Normal", after.reason or after.phase, after.message or "")
        )
    _restart_event(before, draft)
    old = newest_complete(before.checkpoints)
    new = newest_complete(after.checkpoints)
    if new is not None and (old is None or new.step > old.step):
        draft.events.append(
            Event("Normal", cond.CHECKPOINT_SAVED, f"checkpoint at step {new.step}: {new.uri}")
        )
