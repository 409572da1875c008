"""The child cache (finetune_operator.cache), the essentials it keeps (observe.essentials) and the
work queue (finetune_operator.workqueue)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from finetune_operator import cache as cache_mod
from finetune_operator.cache import ChildCache
from finetune_operator.observe import Children, essentials, observe
from finetune_operator.workqueue import WorkQueue
from tests.support.builders import attempt_job, identity_objects, make_job, pod, progress_config_map, ts

pytestmark = pytest.mark.unit

JOB = make_job("a").build()
KEY = ("default", "a")


def full_children() -> Children:
    """A bit of everything observe reads: a failed attempt, a running one, pods in several states."""
    return Children(
        jobs=[
            attempt_job(JOB, 1).failed("PodFailurePolicy", "Container trainer failed").build(),
            attempt_job(JOB, 2).started(5).build(),
        ],
        pods=[
            pod(JOB, 1, 0).exited(3, "line 7: no assistant turn").build(),
            pod(JOB, 1, 1).disrupted().build(),
            pod(JOB, 2, 0).running().started(6).build(),
            pod(JOB, 2, 1).waiting("ImagePullBackOff", "pull failed").build(),
        ],
        config_maps=[
            progress_config_map(
                JOB, {"attempt": 2, "state": "training", "step": 7, "trainLoss": 1.5, "time": ts(9)}
            )
        ],
        identity=identity_objects(JOB),
    )


def test_observe_reads_the_same_from_essentials_as_from_whole_objects() -> None:
    whole = full_children()
    slim = Children(
        jobs=[essentials("Job", j) for j in whole.jobs],
        pods=[essentials("Pod", p) for p in whole.pods],
        config_maps=[essentials("ConfigMap", m) for m in whole.config_maps],
        identity=whole.identity,
    )
    assert observe(slim, "a") == observe(whole, "a")


def test_essentials_drop_what_observe_does_not_read() -> None:
    whole = pod(JOB, 2, 0).running().build()
    whole["metadata"]["managedFields"] = [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
    slim = essentials("Pod", whole)
    assert "spec" not in slim
    assert "managedFields" not in slim["metadata"]
    assert len(repr(slim)) < len(repr(whole)) / 3


def attached(**found: list[dict[str, Any]]) -> ChildCache:
    child_cache = ChildCache()
    child_cache.attach(
        {
            cache_mod.JOBS: {KEY: [essentials("Job", j) for j in found.get("jobs", [])]},
            cache_mod.PODS: {KEY: [essentials("Pod", p) for p in found.get("pods", [])]},
            cache_mod.PROGRESS: {KEY: [essentials("ConfigMap", m) for m in found.get("config_maps", [])]},
        }
    )
    return child_cache


def names(objs: Any) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objs)


def test_children_are_the_indexed_ones_of_this_owner() -> None:
    other = make_job("a").build()
    other.metadata["uid"] = "uid-old"  # a FineTuneJob of the same name, deleted and created again
    child_cache = attached(
        jobs=[attempt_job(JOB, 1).build(), attempt_job(other, 7).build()],
        pods=[pod(JOB, 1).build(), pod(other, 7).build()],
        config_maps=[progress_config_map(JOB)],
    )
    children = child_cache.children("default", "a", "uid-a")
    assert names(children.jobs) == ["a-a1"]
    assert [p["metadata"]["name"].rsplit("-", 2)[0] for p in children.pods] == ["a-a1"]
    assert names(children.config_maps) == ["a-progress"]
    assert children.identity == []
    assert child_cache.children("default", "b", "uid-b") == Children()


def test_what_this_process_wrote_counts_until_its_watch_event_arrives() -> None:
    child_cache = attached()
    job = attempt_job(JOB, 1).build()
    child_cache.written("default", "a", "Job", job)
    for obj in identity_objects(JOB):
        child_cache.written("default", "a", obj["kind"], obj)
    children = child_cache.children("default", "a", "uid-a")
    assert names(children.jobs) == ["a-a1"]
    assert sorted(o["kind"] for o in children.identity) == ["Role", "RoleBinding", "ServiceAccount"]

    child_cache.seen("default", "a", "Job", "a-a1")  # the index speaks for it now (here: empty)
    assert child_cache.children("default", "a", "uid-a").jobs == []
    assert len(child_cache.children("default", "a", "uid-a").identity) == 3  # never watched: kept

    child_cache.forget("default", "a")
    assert child_cache.children("default", "a", "uid-a") == Children()


def test_an_indexed_child_is_not_counted_twice() -> None:
    child_cache = attached(jobs=[attempt_job(JOB, 1).started(3).build()])
    child_cache.written("default", "a", "Job", attempt_job(JOB, 1).build())
    (job,) = child_cache.children("default", "a", "uid-a").jobs
    assert job["status"]["startTime"] == ts(3)  # the index's (newer) copy wins


def test_work_queue_coalesces_and_never_hands_a_key_to_two_workers() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for _ in range(5):
        queue.add("a")
    queue.add("b")
    assert len(queue) == 2
    assert queue.get() == "a"
    queue.add("a")  # while a worker has it: queued again only once it is done
    assert queue.get() == "b"
    queue.done("b")
    assert len(queue) == 0
    queue.done("a")
    assert queue.get() == "a"
    queue.done("a")
    assert len(queue) == 0


def test_work_queue_close_wakes_waiting_workers() -> None:
    queue: WorkQueue[str] = WorkQueue()
    got: list[str | None] = []
    worker = threading.Thread(target=lambda: got.append(queue.get()))
    worker.start()
    queue.close()
    worker.join(5)
    assert got == [None]
    queue.add("a")
    assert len(queue) == 0
