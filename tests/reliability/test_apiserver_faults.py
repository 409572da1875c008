"""API server faults: the API server restarted under the operator, and conflicting writes.

- A control plane of the test's own has its kube-apiserver stopped and started again at every stage
  of a lifecycle (just created, running with a checkpoint, right after a rank failed, right after
  the pods succeeded). The same operator process must ride through every restart (kopf watches
  again), and the job must end exactly as without the restarts: one Job per attempt, exact
  counters, resume from the newest checkpoint.
- A concurrent writer bumps the FineTuneJob's resourceVersion (an annotation patch) every few
  milliseconds while the operator writes status with optimistic concurrency. Conflicts must happen
  and be retried; no update may be lost and the status must still converge.

Short form: 4 restarts of 2 s; ``make soak``: 8 restarts of 15 s and a longer conflict run.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_devenv.cluster import ControlPlane
from finetune_operator import api
from finetune_operator import conditions as cond
from finetune_operator import constants as c
from tests.fixtures.operator import OperatorProcess
from tests.integration.test_operator_lifecycle import World, report, write_progress
from tests.support import faults
from tests.support.builders import make_job
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.timeout(faults.scale(600, 1800))]

RESTART_DOWN_SECONDS = faults.scale(2, 15)
RECOVERY_SECONDS = 180
CONFLICT_REPORTS = faults.scale(10, 60)


@pytest.fixture
def private_world(cluster_private: ControlPlane) -> Iterator[tuple[ControlPlane, client.ApiClient, str]]:
    """A namespace on the test's own control plane (its API server may be restarted)."""
    namespace = "faults"
    cluster_private.kubectl("create", "namespace", namespace, check=True)
    api_client = cluster_private.api_client()
    core = client.CoreV1Api(api_client)
    wait_for(
        "the default ServiceAccount",
        lambda: any(
            sa.metadata.name == "default" for sa in core.list_namespaced_service_account(namespace).items
        ),
        60,
    )
    try:
        yield cluster_private, api_client, namespace
    finally:
        api_client.close()


def test_apiserver_restarted_at_every_stage(
    private_world: tuple[ControlPlane, client.ApiClient, str], tmp_path: Path
) -> None:
    plane, api_client, ns = private_world
    operator = OperatorProcess(plane, ns, tmp_path / "operator.log")
    operator.start(timeout=60)
    world = World(api_client, ns)
    restarts = 0

    def restart() -> None:
        nonlocal restarts
        plane.restart_apiserver(down_for=RESTART_DOWN_SECONDS)
        restarts += 1

    def running(job: str, count: int) -> list[dict[str, Any]]:
        # After a restart the Job controller may need a minute to trust its cache again ("read
        # version ... is not as new as written version"), and kopf retries a failed timer after 60 s.
        pods = world.kubelet.wait_pods(job, count, timeout=RECOVERY_SECONDS)
        world.kubelet.run(*pods)
        return pods

    try:
        assert operator.proc is not None
        pid = operator.proc.pid
        with faults.JobWatch(api_client, ns) as watch:
            world.create(make_job("a").nodes(2).gpus(0).max_restarts(2).manifest())
            restart()  # the operator may be in the middle of creating attempt 1
            pods = running("a-a1", 2)
            world.wait_phase("a", "Running", timeout=RECOVERY_SECONDS)
            write_progress(world.core, ns, "a", report(1, 12, [10], total_steps=1000))
            restart()
            wait_for(
                "the checkpoint in status", lambda: world.status("a").get("checkpoints"), RECOVERY_SECONDS
            )
            world.kubelet.fail(pods[1], 1, "RuntimeError: injected")
            restart()  # the operator may be in the middle of the gang restart
            pods = running("a-a2", 2)
            world.wait_phase("a", "Running", timeout=RECOVERY_SECONDS)
            write_progress(world.core, ns, "a", report(2, 25, [10, 20], total_steps=1000))
            world.kubelet.succeed(*pods)
            restart()
            world.wait_phase("a", "Succeeded", timeout=RECOVERY_SECONDS)

            def check_a() -> None:
                status = world.status("a")
                assert status["phase"] == "Succeeded"
                assert status["restarts"] == {
                    "total": 1,
                    "countedTowardsLimit": 1,
                    "lastReason": cond.TRAINER_ERROR,
                }
                assert [cp["step"] for cp in status["checkpoints"]] == [10, 20]
                assert status["progress"]["step"] == 25
                assert world.jobs("a") == ["a-a2"]
                assert (
                    world.job("a-a2")["metadata"]["annotations"][c.ANN_RESUME_FROM]
                    == "s3://ckpt/x/a/step-000000010/"
                )

            check_a()  # the restarts at every stage lost nothing
            assert operator.proc.poll() is None, "the operator exited during the restarts at every stage"
            for _ in range(faults.scale(0, 4)):  # soak: back-to-back restarts once it is done
                restart()
            world.create(make_job("b").gpus(0).manifest())  # and the operator still takes new work

            def b_started() -> bool:
                assert operator.proc is not None and operator.proc.poll() is None, (
                    f"the operator exited after {restarts} API server restarts (see its log below)"
                )
                return bool(world.status("b").get("phase") == "Initializing")

            wait_for("b phase Initializing", b_started, RECOVERY_SECONDS)
            # the status can be written before the watch delivers the Job's ADDED event
            wait_for("b-a1 seen by the Job watch", lambda: "b-a1" in watch.created(), 30)
            check_a()
            assert {n: len(u) for n, u in watch.created().items()} == {"a-a1": 1, "a-a2": 1, "b-a1": 1}
            gaps = watch.gaps
        assert operator.proc.pid == pid and operator.proc.poll() is None, "the operator had to be restarted"
        assert operator.starts == 1
        faults.assert_no_orphans(api_client, ns)
    finally:
        operator.kill()
        print(f"--- operator log ---\n{operator.logs()[-20000:]}")
    faults.record(
        "apiserver-restarts",
        apiserver_restarts=restarts,
        down_seconds=RESTART_DOWN_SECONDS,
        operator_restarts_needed=0,
        operator_error_lines_during_outages=len(operator.errors()),
        job_watch_relists=gaps,
        duplicates=0,
        lost_updates=0,
    )


class Bumper:
    """Patches an annotation of one FineTuneJob as fast as it can: every patch moves resourceVersion."""

    def __init__(self, api_client: client.ApiClient, namespace: str, name: str, seed: int) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.namespace, self.name = namespace, name
        self.rng = random.Random(seed)
        self.patches = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bumper", daemon=True)

    def __enter__(self) -> Bumper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.rng.uniform(0.0, 0.02)):
            body = {"metadata": {"annotations": {"test.finetune.dev/bump": str(self.patches)}}}
            try:
                self.custom.patch_namespaced_custom_object(
                    api.GROUP, api.VERSION, self.namespace, api.PLURAL, self.name, body,
                    _content_type="application/merge-patch+json",
                )  # fmt: skip
                self.patches += 1
            except ApiException as err:
                if err.status != 404:
                    raise


def test_status_writes_survive_a_concurrent_writer(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    rng, seed = faults.seeded("status-conflicts")
    world = World(kube_api, namespace)
    world.create(make_job("a").nodes(2).gpus(0).max_restarts(1).manifest())
    reported: list[int] = []
    step = 0
    with Bumper(kube_api, namespace, "a", seed) as bumper:
        pods = world.running_pods("a-a1", 2)
        world.wait_phase("a", "Running", timeout=60)
        for attempt in (1, 2):
            for _ in range(CONFLICT_REPORTS // 2):
                step += rng.randint(1, 5)
                reported.append(step)
                latest = report(attempt, step, reported[-10:], total_steps=1000)
                write_progress(world.core, namespace, "a", latest)
                time.sleep(rng.uniform(0.05, 0.3))
            if attempt == 1:
                world.kubelet.fail(pods[0], 1, "RuntimeError: injected")
                pods = world.running_pods("a-a2", 2)
                world.wait_phase("a", "Running", timeout=60)
        wait_for(
            "the last report in status", lambda: world.status("a").get("progress", {}).get("step") == step, 30
        )
        world.kubelet.succeed(*pods)
        status = world.wait_phase("a", "Succeeded", timeout=60)
    assert status["restarts"] == {"total": 1, "countedTowardsLimit": 1, "lastReason": cond.TRAINER_ERROR}
    assert [cp["step"] for cp in status["checkpoints"]] == reported[-10:]
    assert status["progress"]["step"] == step
    assert world.jobs("a") == ["a-a2"]
    resume = world.job("a-a2")["metadata"]["annotations"][c.ANN_RESUME_FROM]
    log = operator.logs()
    conflicts = log.count("changed while reconciling")
    gave_up = log.count("gave up after")
    assert conflicts > 0, f"{bumper.patches} patches caused no conflict: the test tested nothing"
    assert resume.endswith(f"step-{reported[CONFLICT_REPORTS // 2 - 1]:09d}/")
    faults.record(
        "status-conflicts",
        seed=seed,
        concurrent_patches=bumper.patches,
        progress_reports=len(reported),
        conflicts_retried=conflicts,
        reconciles_given_up_then_retried=gave_up,
        lost_updates=0,
    )
