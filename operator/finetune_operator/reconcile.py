"""The glue: read -> observe -> decide -> act -> write status once -> post events.

Every trigger (the FineTuneJob changed, one of its Jobs, pods or its progress ConfigMap changed, the
resync timer fired) calls :meth:`Reconciler.reconcile` with the FineTuneJob's name; what happens
next depends only on what is in the cluster, never on which trigger it was (level-based). A lock
per FineTuneJob keeps two threads from reconciling the same job at once, and triggers that arrive
while one reconcile already waits for the running one coalesce into it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pydantic

from finetune_operator import render
from finetune_operator.api import FineTuneJob, FineTuneJobStatus
from finetune_operator.decide import (
    Action,
    CreateAttempt,
    CreateJobChildren,
    Decision,
    DeleteAttempt,
    DeleteFineTuneJob,
    decide,
    refused,
)
from finetune_operator.k8s import Conflict, Kube, Refused
from finetune_operator.metrics import Metrics
from finetune_operator.observe import observe
from finetune_operator.settings import Settings

log = logging.getLogger(__name__)

MAX_CONFLICT_RETRIES = 5


def utcnow() -> datetime:
    return datetime.now(UTC)


def dump_status(status: FineTuneJobStatus) -> dict[str, Any]:
    """The status as the API server stores it (camelCase, no nulls)."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


class _Slot:
    """Per-FineTuneJob serialisation: one reconcile at a time, at most one more waiting."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting = False


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        clock: Callable[[], datetime] = utcnow,
        metrics: Metrics | None = None,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.clock = clock
        self.metrics = metrics or Metrics()
        self._slots: dict[tuple[str, str], _Slot] = {}
        self._guard = threading.Lock()

    def reconcile(self, namespace: str, name: str) -> None:
        """Bring FineTuneJob ``namespace/name`` one step closer to its spec; safe to call any time.

        Triggers coalesce: when a reconcile of this job is already waiting for the running one, a
        new trigger returns at once, because the waiting reconcile will read the newer state anyway
        (a gang of 64 pods changing at once costs two reconciles, not 64).
        """
        with self._guard:
            slot = self._slots.setdefault((namespace, name), _Slot())
            if slot.waiting:
                return
            slot.waiting = True
        with slot.lock:
            with self._guard:
                slot.waiting = False
            for _ in range(MAX_CONFLICT_RETRIES):
                with self.metrics.reconcile_timer() as timer:
                    try:
                        self._once(namespace, name)
                        return
                    except Conflict as err:
                        timer.outcome = "conflict"
                        log.info("retrying: %s", err)
            log.warning(
                "%s/%s: gave up after %d conflicts; the next trigger retries",
                namespace,
                name,
                MAX_CONFLICT_RETRIES,
            )

    def forget(self, namespace: str, name: str) -> None:
        with self._guard:
            self._slots.pop((namespace, name), None)
        self.metrics.job_deleted(namespace, name)

    def _once(self, namespace: str, name: str) -> None:
        raw = self.kube.get_finetunejob(namespace, name)
        if raw is None:
            self.forget(namespace, name)
            return
        try:
            job = FineTuneJob.model_validate(raw)
        except pydantic.ValidationError as err:
            # The CRD schema should make this impossible; an old object may still hit it.
            log.error("%s/%s cannot be read: %s", namespace, name, err)
            return
        children = self.kube.list_children(namespace, name, str(raw["metadata"].get("uid", "")))
        now = self.clock()
        decision = decide(job, observe(children, name), now, self.settings)
        if decision.events or decision.actions:
            log.info(
                "%s/%s: phase %s (%s), actions %s",
                namespace,
                name,
                decision.status.phase,
                decision.status.reason,
                [type(a).__name__ for a in decision.actions],
            )
        for action in decision.actions:
            if isinstance(action, DeleteFineTuneJob):
                log.info("%s/%s: ttlSecondsAfterFinished passed, deleting", namespace, name)
                self.kube.delete_finetunejob(namespace, name)
                return
            try:
                self._act(job, action)
            except Refused as err:
                decision = refused(job, str(err), now)
                break
        self._write(raw, job, decision, now)

    def _act(self, job: FineTuneJob, action: Action) -> None:
        namespace, name, _ = render.identity(job)
        if isinstance(action, CreateJobChildren):
            for manifest in render.job_children(job):
                self.kube.create(manifest)
        elif isinstance(action, CreateAttempt):
            service, config_map, training_job = render.attempt_children(job, action.intent, self.settings)
            self.kube.create(service)
            if not self.kube.create(config_map):
                # Left by a crash before its Job was created: bring it up to date first.
                self.kube.replace_config_map_data(config_map)
            self.kube.create(training_job)  # the commit point of the attempt
        elif isinstance(action, DeleteAttempt):
            self.kube.delete_attempt(namespace, name, action.attempt)

    def _write(self, raw: dict[str, Any], job: FineTuneJob, decision: Decision, now: datetime) -> None:
        new, old = dump_status(decision.status), dump_status(job.status)
        if new != old:
            self.kube.replace_status(raw, new)
            for event in decision.events:
                self.kube.post_event(raw, event.type, event.reason, event.message, now)
        meta = raw["metadata"]
        self.metrics.job_observed(meta["namespace"], meta["name"], meta.get("creationTimestamp"), old, new)
