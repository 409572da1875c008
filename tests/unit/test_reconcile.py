"""The glue (finetune_operator.reconcile): what the reconciler asks of the API, in which order, what
it remembers in the child cache, and which FineTuneJobs the resync visits.

The API is a recording fake (a unit test of the glue, not of the API); the children come from a
:class:`ChildCache` attached to plain dicts shaped like kopf's indices.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest

from finetune_operator import cache as cache_mod
from finetune_operator import conditions as cond
from finetune_operator.cache import ChildCache
from finetune_operator.k8s import Conflict, Refused
from finetune_operator.observe import essentials
from finetune_operator.reconcile import Reconciler
from finetune_operator.settings import Settings
from tests.support.builders import at, attempt_job, make_job, pod, progress_config_map, ts

pytestmark = pytest.mark.unit

SETTINGS = Settings(start_failure_grace_seconds=120, resync_seconds=20)
KEY = ("default", "a")


@dataclass
class FakeKube:
    """Records what the reconciler asks of the API."""

    obj: dict[str, Any]
    conflicts: int = 0
    existing: set[str] = field(default_factory=set)
    """``Kind/name`` that already exist: creating them answers AlreadyExists."""
    calls: list[tuple[str, Any]] = field(default_factory=list)
    version: int = 10

    def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", name))
        return self.obj

    def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        what = f"{manifest['kind']}/{manifest['metadata']['name']}"
        self.calls.append(("create", what))
        return None if what in self.existing else manifest

    def delete_attempt(self, namespace: str, name: str, attempt: int) -> None:
        self.calls.append(("delete", attempt))

    def replace_status(self, obj: dict[str, Any], status: dict[str, Any]) -> str:
        if self.conflicts:
            self.conflicts -= 1
            self.calls.append(("conflict", None))
            raise Conflict("changed")
        self.calls.append(("status", status["phase"]))
        self.version += 1
        self.obj = {**obj, "status": status}
        self.obj["metadata"] = {**obj["metadata"], "resourceVersion": str(self.version)}
        return str(self.version)

    def post_event(self, obj: Any, type_: str, reason: str, message: str, now: datetime) -> None:
        self.calls.append(("event", reason))


def indices(
    jobs: list[dict[str, Any]] = (),  # type: ignore[assignment]
    pods: list[dict[str, Any]] = (),  # type: ignore[assignment]
    config_maps: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> dict[str, dict[tuple[str, str], list[Any]]]:
    """kopf's indices as the handlers fill them: essentials under the FineTuneJob's key."""
    return {
        cache_mod.JOBS: {KEY: [essentials("Job", j) for j in jobs]},
        cache_mod.PODS: {KEY: [essentials("Pod", p) for p in pods]},
        cache_mod.PROGRESS: {KEY: [essentials("ConfigMap", m) for m in config_maps]},
    }


def reconciler(kube: FakeKube, child_cache: ChildCache | None = None) -> Reconciler:
    return Reconciler(kube, SETTINGS, clock=lambda: at(0), cache=child_cache)  # type: ignore[arg-type]


def test_acts_then_writes_status_then_posts_events() -> None:
    kube = FakeKube(make_job("a").raw())
    reconciler(kube).reconcile(*KEY)
    assert kube.calls == [
        ("get", "a"),
        ("create", "ConfigMap/a-progress"),
        ("create", "ServiceAccount/a-trainer"),
        ("create", "Role/a-trainer"),
        ("create", "RoleBinding/a-trainer"),
        ("create", "Service/a-a1"),
        ("create", "ConfigMap/a-a1-config"),
        ("create", "Job/a-a1"),
        ("status", "Initializing"),
        ("event", cond.INITIALIZING),
    ]


def test_a_second_reconcile_before_any_watch_event_creates_nothing() -> None:
    """The cache remembers what this process created: the Job of attempt 1 is not taken for lost
    when the status write's event arrives before the Job's."""
    kube = FakeKube(make_job("a").raw())
    rec = reconciler(kube)
    rec.reconcile(*KEY)
    kube.calls.clear()
    rec.reconcile(*KEY)
    assert [call for call, _ in kube.calls if call in ("create", "delete")] == []
    assert kube.obj["status"]["attempt"] == 1
    assert kube.obj["status"]["message"] == "attempt 1: 0/1 pod(s) running"


def test_job_children_that_exist_count_as_created() -> None:
    """After a restart the cache is empty: the identity is created again, AlreadyExists is fine,
    and the Job found in the index is the running attempt."""
    job = make_job("a").build()
    kube = FakeKube(make_job("a").status(phase="Running", attempt=1, startTime=ts(0)).raw())
    kube.existing = {
        "ConfigMap/a-progress",
        "ServiceAccount/a-trainer",
        "Role/a-trainer",
        "RoleBinding/a-trainer",
    }
    child_cache = ChildCache()
    child_cache.attach(
        indices(
            jobs=[attempt_job(job, 1).build()],
            pods=[pod(job, 1).running().build()],
            config_maps=[progress_config_map(job)],
        )
    )
    rec = reconciler(kube, child_cache)
    rec.reconcile(*KEY)
    assert [what for call, what in kube.calls if call == "create"] == [
        "ConfigMap/a-progress",
        "ServiceAccount/a-trainer",
        "Role/a-trainer",
        "RoleBinding/a-trainer",
    ]
    assert ("status", "Running") in kube.calls
    kube.calls.clear()
    rec.reconcile(*KEY)
    assert kube.calls == [("get", "a")]  # created once per process, not per reconcile


def test_a_job_that_already_exists_is_not_taken_for_this_jobs() -> None:
    """AlreadyExists for a Job the cache does not show: it belongs to an older FineTuneJob of the
    same name (garbage collection removes it); nothing is remembered for this one."""
    kube = FakeKube(make_job("a").raw(), existing={"Job/a-a1"})
    child_cache = ChildCache()
    reconciler(kube, child_cache).reconcile(*KEY)
    assert ("create", "Job/a-a1") in kube.calls
    assert child_cache.children("default", "a", "uid-a").jobs == []


def test_writes_nothing_when_the_status_is_unchanged() -> None:
    job = make_job("a").build()
    kube = FakeKube(make_job("a").status(phase="Running", attempt=1, startTime=ts(0)).raw())
    child_cache = ChildCache()
    child_cache.attach(
        indices(
            jobs=[attempt_job(job, 1).build()],
            pods=[pod(job, 1).running().build()],
            config_maps=[progress_config_map(job)],
        )
    )
    rec = reconciler(kube, child_cache)
    rec.reconcile(*KEY)
    assert [c for c, _ in kube.calls if c in ("status", "event")] == ["status", "event"]
    kube.calls.clear()
    rec.reconcile(*KEY)
    assert kube.calls == [("get", "a")]


def test_retries_on_conflict_and_posts_events_once() -> None:
    kube = FakeKube(make_job("a").raw(), conflicts=2)
    reconciler(kube).reconcile(*KEY)
    kinds = [c for c, _ in kube.calls]
    assert kinds.count("conflict") == 2
    assert kinds.count("status") == 1
    assert kinds.count("event") == 1
    assert kinds.index("event") > kinds.index("status")


def test_fails_the_job_when_the_api_server_refuses_a_child() -> None:
    class Refusing(FakeKube):
        def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
            if manifest["kind"] == "Job":
                raise Refused(
                    "the API server refused Job a-a1: spec.template.spec.nodeSelector: Invalid value"
                )
            return super().create(manifest)

    kube = Refusing(make_job("a").raw())
    reconciler(kube).reconcile(*KEY)
    assert kube.obj["status"]["phase"] == "Failed"
    assert kube.obj["status"]["reason"] == cond.INVALID_SPEC
    assert "nodeSelector" in kube.obj["status"]["message"]
    assert kube.calls[-1] == ("event", cond.INVALID_SPEC)


def test_an_api_error_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    from kubernetes.client.exceptions import ApiException

    class Down(FakeKube):
        def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
            raise ApiException(status=503, reason="Service Unavailable")

    reconciler(Down(make_job("a").raw())).reconcile(*KEY)
    assert "503 Service Unavailable" in caplog.text
    assert "retrying in 20s" in caplog.text


def test_its_own_status_write_is_an_echo() -> None:
    kube = FakeKube(make_job("a").raw())
    rec = reconciler(kube)
    rec.reconcile(*KEY)
    written = kube.obj["metadata"]["resourceVersion"]
    assert rec.is_echo("default", "a", written)
    assert not rec.is_echo("default", "a", "999")
    assert not rec.is_echo("default", "b", written)


def test_resync_visits_jobs_time_may_change_once_a_period() -> None:
    kube = FakeKube(make_job("a").raw())
    rec = reconciler(kube)
    rec.reconcile(*KEY)
    last = rec._seen[KEY].last
    assert rec.due(now=last + 19) == []
    assert rec.due(now=last + 20) == [KEY]

    finished = FakeKube(make_job("a").status(phase="Succeeded", attempt=1).raw())
    rec = reconciler(finished)
    rec.reconcile(*KEY)
    assert rec.due(now=rec._seen[KEY].last + 1000) == []  # nothing left to happen

    with_ttl = FakeKube(make_job("a").ttl(60).status(phase="Succeeded", attempt=1).raw())
    rec = reconciler(with_ttl)
    rec.reconcile(*KEY)
    assert rec.due(now=rec._seen[KEY].last + 20) == [KEY]  # its TTL will pass


def test_a_deleted_job_is_forgotten() -> None:
    class Gone(FakeKube):
        def get_finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
            return None

    rec = reconciler(FakeKube(make_job("a").raw()))
    rec.reconcile(*KEY)
    rec.kube = Gone({})  # type: ignore[assignment]
    rec.reconcile(*KEY)
    assert rec.due(now=float("inf")) == []


def test_workers_reconcile_what_is_queued_and_stop() -> None:
    kube = FakeKube(make_job("a").raw())
    rec = reconciler(kube)
    done = threading.Event()
    original = rec.reconcile

    def reconcile(namespace: str, name: str) -> None:
        original(namespace, name)
        done.set()

    rec.reconcile = reconcile  # type: ignore[method-assign]
    rec.start()
    try:
        rec.enqueue(*KEY)
        assert done.wait(5)
    finally:
        rec.stop(timeout=5)
    assert kube.obj["status"]["phase"] == "Initializing"
    assert not any(thread.is_alive() for thread in rec._threads)
