"""The glue: read -> observe -> decide -> act -> write status once -> post events.

Every trigger (the FineTuneJob changed, one of its Jobs, pods or its progress ConfigMap changed, the
resync found it due) puts the FineTuneJob's key into one :class:`~finetune_operator.workqueue.WorkQueue`;
``max_workers`` threads take keys from it and reconcile them. What happens next depends only on
what is in the cluster, never on which trigger it was (level-based). The queue keeps a job from
being reconciled by two threads at once and coalesces the triggers that arrive meanwhile.

The children come from :class:`~finetune_operator.cache.ChildCache` (watches, no listing); only the
FineTuneJob itself is read from the API server, because its status is replaced with the
resourceVersion it was computed from.

One resync thread re-queues every FineTuneJob that time may change (not finished, or finished with
a TTL) when it was last reconciled ``resync_seconds`` ago: deadlines, start-failure grace periods
and TTLs pass without a watch event, a missed event heals, and a reconcile that failed on an API
error is retried after the same period.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pydantic
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from finetune_operator import constants as c
from finetune_operator import render
from finetune_operator.api import FINAL_PHASES, FineTuneJob, FineTuneJobStatus
from finetune_operator.cache import ChildCache
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
from finetune_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)

Key = tuple[str, str]
"""(namespace, FineTuneJob name)."""

MAX_CONFLICT_RETRIES = 5


def utcnow() -> datetime:
    return datetime.now(UTC)


def dump_status(status: FineTuneJobStatus) -> dict[str, Any]:
    """The status as the API server stores it (camelCase, no nulls)."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


@dataclass
class _Seen:
    """What the reconciler remembers of one FineTuneJob between reconciles."""

    last: float = float("-inf")
    """When its last reconcile began (``time.monotonic``)."""
    timed: bool = True
    """Time alone may change it (not finished, or finished with a TTL): the resync visits it."""
    written: str | None = None
    """resourceVersion of this process's last status write: the watch event it causes is an echo."""


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        clock: Callable[[], datetime] = utcnow,
        metrics: Metrics | None = None,
        cache: ChildCache | None = None,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.cache = cache or ChildCache()
        self.queue: WorkQueue[Key] = WorkQueue()
        self._seen: dict[Key, _Seen] = {}
        self._guard = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------------ triggers

    def enqueue(self, namespace: str, name: str) -> None:
        """Reconcile FineTuneJob ``namespace/name`` soon (at once if a worker is free)."""
        self.queue.add((namespace, name))

    def is_echo(self, namespace: str, name: str, resource_version: str | None) -> bool:
        """The FineTuneJob is exactly as this process's last status write left it: nothing to do."""
        with self._guard:
            seen = self._seen.get((namespace, name))
            return resource_version is not None and seen is not None and seen.written == resource_version

    def forget(self, namespace: str, name: str) -> None:
        """The FineTuneJob is gone."""
        with self._guard:
            self._seen.pop((namespace, name), None)
        self.cache.forget(namespace, name)
        self.metrics.job_deleted(namespace, name)

    def due(self, now: float | None = None) -> list[Key]:
        """FineTuneJobs that time may change, last reconciled at least ``resync_seconds`` ago."""
        now = time.monotonic() if now is None else now
        period = self.settings.resync_seconds
        with self._guard:
            return [key for key, seen in self._seen.items() if seen.timed and now - seen.last >= period]

    # ------------------------------------------------------------------------------------- threads

    def start(self) -> None:
        """``max_workers`` reconciling threads and the resync thread."""
        workers = [
            threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True)
            for i in range(self.settings.max_workers)
        ]
        self._threads = [*workers, threading.Thread(target=self._resync, name="resync", daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 10) -> None:
        """Let running reconciles finish (up to ``timeout``), start no new one."""
        self._stopping.set()
        self.queue.close()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        while (key := self.queue.get()) is not None:
            try:
                self.reconcile(*key)
            finally:
                self.queue.done(key)

    def _resync(self) -> None:
        tick = min(5.0, self.settings.resync_seconds / 4)
        while not self._stopping.wait(tick):
            for key in self.due():
                self.enqueue(*key)

    # ------------------------------------------------------------------------------- one reconcile

    def reconcile(self, namespace: str, name: str) -> None:
        """Bring FineTuneJob ``namespace/name`` one step closer to its spec; safe to call any time.

        Never raises: an API error is logged and the resync retries ``resync_seconds`` later.
        Callers other than the workers must not reconcile a job a worker may hold (tests do).
        """
        with self._guard:
            seen = self._seen.get((namespace, name))
            if seen is not None:
                seen.last = time.monotonic()
        for _ in range(MAX_CONFLICT_RETRIES):
            with self.metrics.reconcile_timer() as timer:
                try:
                    self._once(namespace, name)
                    return
                except Conflict as err:
                    timer.outcome = "conflict"
                    log.info("retrying: %s", err)
                except (ApiException, HTTPError, OSError) as err:
                    timer.outcome = "error"
                    log.warning(
                        "%s/%s: the API server failed (%s); retrying in %gs",
                        namespace,
                        name,
                        _why(err),
                        self.settings.resync_seconds,
                    )
                    return
                except Exception:
                    timer.outcome = "error"
                    log.exception(
                        "%s/%s: reconcile failed; retrying in %gs",
                        namespace,
                        name,
                        self.settings.resync_seconds,
                    )
                    return
        log.warning(
            "%s/%s: gave up after %d conflicts; the next trigger retries",
            namespace,
            name,
            MAX_CONFLICT_RETRIES,
        )

    def _once(self, namespace: str, name: str) -> None:
        raw = self.kube.get_finetunejob(namespace, name)
        if raw is None:
            self.forget(namespace, name)
            return
        with self._guard:
            self._seen.setdefault((namespace, name), _Seen(last=time.monotonic()))
        try:
            job = FineTuneJob.model_validate(raw)
        except pydantic.ValidationError as err:
            # The CRD schema should make this impossible; an old object may still hit it.
            log.error("%s/%s cannot be read: %s", namespace, name, err)
            return
        children = self.cache.children(namespace, name, str(raw["metadata"].get("uid", "")))
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
                created = self.kube.create(manifest)
                self.cache.written(namespace, name, manifest["kind"], created or manifest)
        elif isinstance(action, CreateAttempt):
            service, config_map, training_job = render.attempt_children(job, action.intent, self.settings)
            self.kube.create(service)
            if self.kube.create(config_map) is None:
                # Left by a crash before its Job was created: bring it up to date first.
                self.kube.replace_config_map_data(config_map)
            # The commit point of the attempt. Remembered at once: the next reconcile may run before
            # the Job's watch event arrives, and must not take the attempt for lost. (AlreadyExists:
            # a Job of this name the cache does not show as this FineTuneJob's, i.e. one of an older
            # FineTuneJob of the same name that garbage collection has not removed yet.)
            created = self.kube.create(training_job)
            if created is not None:
                self.cache.written(namespace, name, "Job", created)
        elif isinstance(action, DeleteAttempt):
            self.kube.delete_attempt(namespace, name, action.attempt)
            self.cache.deleted(namespace, name, "Job", c.attempt_name(name, action.attempt))

    def _write(self, raw: dict[str, Any], job: FineTuneJob, decision: Decision, now: datetime) -> None:
        new, old = dump_status(decision.status), dump_status(job.status)
        meta = raw["metadata"]
        written = None
        if new != old:
            written = self.kube.replace_status(raw, new)
            for event in decision.events:
                self.kube.post_event(raw, event.type, event.reason, event.message, now)
        with self._guard:
            seen = self._seen.get((meta["namespace"], meta["name"]))
            if seen is not None:
                seen.written = written or seen.written
                seen.timed = decision.status.phase not in FINAL_PHASES or bool(
                    job.spec.run_policy.ttl_seconds_after_finished
                )
        self.metrics.job_observed(meta["namespace"], meta["name"], meta.get("creationTimestamp"), old, new)


def _why(err: Exception) -> str:
    if isinstance(err, ApiException):
        return f"{err.status} {err.reason}"
    return f"{type(err).__name__}: {err}"
