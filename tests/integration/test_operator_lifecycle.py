"""The operator (a subprocess) against a real kube-apiserver + Job controller + garbage collector.

Pods are moved by :class:`tests.support.kubelet.Kubelet` (no kubelet, no scheduler in the test
cluster). Progress is written the way the trainer writes it: a merge patch of the per-job progress
ConfigMap with a token of the job's own ServiceAccount. Every wait is bounded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_operator import api
from finetune_operator import constants as c
from finetune_trainer.runconfig import PROGRESS_KEY, RUN_CONFIG_FILE, RunConfig
from tests.fixtures.operator import OperatorProcess
from tests.support.builders import make_job
from tests.support.kubelet import Kubelet
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class World:
    """The test's view of one namespace."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.api_client = api_client
        self.ns = namespace
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.rbac = client.RbacAuthorizationV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.kubelet = Kubelet(api_client, namespace)

    # FineTuneJobs
    def create(self, manifest: dict[str, Any]) -> None:
        manifest["metadata"]["namespace"] = self.ns
        self.custom.create_namespaced_custom_object(api.GROUP, api.VERSION, self.ns, api.PLURAL, manifest)

    def ftj(self, name: str) -> dict[str, Any] | None:
        try:
            response = self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, self.ns, api.PLURAL, name, _preload_content=False
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        data: dict[str, Any] = json.loads(response.data)
        return data

    def status(self, name: str) -> dict[str, Any]:
        obj = self.ftj(name)
        return (obj or {}).get("status") or {}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            api.GROUP,
            api.VERSION,
            self.ns,
            api.PLURAL,
            name,
            {"spec": spec},
            _content_type="application/merge-patch+json",
        )

    def wait_phase(self, name: str, phase: str, timeout: float = 20) -> dict[str, Any]:
        return wait_for(
            f"{name} phase {phase}",
            lambda: (s := self.status(name)).get("phase") == phase and s,
            timeout,
        )

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next(cond for cond in self.status(name).get("conditions", []) if cond["type"] == type_)

    # children
    def jobs(self, name: str, include_deleting: bool = False) -> list[str]:
        response = self.batch.list_namespaced_job(
            self.ns, label_selector=f"{c.LABEL_JOB_NAME}={name}", _preload_content=False
        )
        items = json.loads(response.data)["items"]
        return sorted(
            j["metadata"]["name"]
            for j in items
            if include_deleting or not j["metadata"].get("deletionTimestamp")
        )

    def job(self, job_name: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            self.batch.read_namespaced_job(job_name, self.ns, _preload_content=False).data
        )
        return data

    def run_config(self, name: str, attempt: int) -> RunConfig:
        cm = self.core.read_namespaced_config_map(c.run_config_name(name, attempt), self.ns)
        return RunConfig.model_validate_json(cm.data[RUN_CONFIG_FILE])

    def running_pods(self, job_name: str, count: int) -> list[dict[str, Any]]:
        pods = self.kubelet.wait_pods(job_name, count)
        self.kubelet.run(*pods)
        return pods

    def events(self, name: str) -> list[tuple[str, str]]:
        items = self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}").items
        return [(e.type, e.reason) for e in items]

    def token_client(self, service_account: str) -> client.ApiClient:
        """An API client authenticated as ``service_account`` (TokenRequest, as a projected token)."""
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 600},
        }
        token = self.core.create_namespaced_service_account_token(
            service_account, self.ns, request
        ).status.token
        config = client.Configuration()
        admin = self.api_client.configuration
        config.host = admin.host
        config.ssl_ca_cert = admin.ssl_ca_cert
        config.api_key = {"BearerToken": token}
        config.api_key_prefix = {"BearerToken": "Bearer"}
        return client.ApiClient(config)


@pytest.fixture
def world(kube_api: client.ApiClient, namespace: str, operator: OperatorProcess) -> World:
    return World(kube_api, namespace)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def report(
    attempt: int,
    step: int,
    checkpoints: Sequence[int] = (),
    *,
    name: str = "a",
    total_steps: int = 100,
    **extra: Any,
) -> dict[str, Any]:
    """A training progress report of job ``name`` as the trainer writes it."""
    return {
        "attempt": attempt,
        "state": "training",
        "step": step,
        "totalSteps": total_steps,
        "time": now(),
        "checkpoints": [
            {"step": s, "uri": f"s3://ckpt/x/{name}/step-{s:09d}/", "complete": True, "time": now()}
            for s in checkpoints
        ],
        **extra,
    }


def write_progress(core: client.CoreV1Api, namespace: str, name: str, body: dict[str, Any]) -> None:
    """What the trainer's rank 0 does: merge-patch one key of the progress ConfigMap."""
    core.patch_namespaced_config_map(
        c.progress_name(name),
        namespace,
        {"data": {PROGRESS_KEY: json.dumps(body)}},
        _content_type="application/merge-patch+json",
    )


# --------------------------------------------------------------------------------------------- tests


def test_create_run_report_progress_and_succeed(world: World) -> None:
    world.create(make_job("a").nodes(2).gpus(0).manifest())
    world.wait_phase("a", "Initializing")
    assert world.jobs("a") == ["a-a1"]
    job = world.job("a-a1")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    pods = world.running_pods("a-a1", 2)
    status = world.wait_phase("a", "Running")
    assert status["attempt"] == 1
    assert world.condition("a", "PodsReady")["status"] == "True"
    assert world.condition("a", "Reconciling")["status"] == "True"

    # Progress through the least-privilege transport, as the trainer would.
    trainer = client.CoreV1Api(world.token_client(c.trainer_identity_name("a")))
    write_progress(trainer, world.ns, "a", report(1, 40, (20, 40), trainLoss=1.5, tokensPerSecond=900.0))
    status = wait_for(
        "progress in status", lambda: (s := world.status("a")).get("progress", {}).get("step") == 40 and s, 5
    )
    assert status["progress"]["percent"] == 40
    assert status["metrics"]["trainLoss"] == 1.5
    assert [cp["step"] for cp in status["checkpoints"]] == [20, 40]
    assert world.condition("a", "CheckpointAvailable")["status"] == "True"

    # The same token may do nothing else.
    custom = client.CustomObjectsApi(trainer.api_client)
    with pytest.raises(ApiException) as denied:
        custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, world.ns, api.PLURAL, "a", {"status": {"phase": "Succeeded"}},
            _content_type="application/merge-patch+json",
        )  # fmt: skip
    assert denied.value.status == 403
    world.core.create_namespaced_config_map(world.ns, {"metadata": {"name": "other"}, "data": {"k": "v"}})
    for attempt_call in (
        lambda: trainer.patch_namespaced_config_map(
            "other", world.ns, {"data": {"k": "x"}}, _content_type="application/merge-patch+json"
        ),
        lambda: trainer.read_namespaced_config_map("other", world.ns),
        lambda: trainer.delete_namespaced_config_map(c.progress_name("a"), world.ns),
        lambda: trainer.list_namespaced_secret(world.ns),
    ):
        with pytest.raises(ApiException) as denied:
            attempt_call()
        assert denied.value.status == 403

    world.kubelet.succeed(*pods)
    status = world.wait_phase("a", "Succeeded")
    assert status["output"]["adapterUri"] == "s3://out/a/adapter/"
    assert status["completionTime"]
    assert world.condition("a", "Ready")["status"] == "True"
    assert world.condition("a", "Reconciling")["status"] == "False"
    assert world.condition("a", "Stalled")["status"] == "False"
    events = wait_for("events", lambda: (e := world.events("a")) and ("Normal", "Succeeded") in e and e, 5)
    assert ("Normal", "Running") in events
    assert world.jobs("a") == ["a-a1"]  # kept for its logs


def test_rank_failure_restarts_the_gang_from_the_newest_checkpoint(
    world: World, operator: OperatorProcess
) -> None:
    world.create(make_job("a").nodes(2).gpus(0).max_restarts(2).manifest())
    pods = world.running_pods("a-a1", 2)
    world.wait_phase("a", "Running")
    write_progress(world.core, world.ns, "a", report(1, 60, (30, 60)))
    wait_for("checkpoint in status", lambda: len(world.status("a").get("checkpoints", [])) == 2, 5)

    world.kubelet.fail(pods[1], 1, "RuntimeError: NCCL watchdog timeout")
    wait_for("attempt 2", lambda: world.jobs("a") == ["a-a2"])
    status = wait_for("status of attempt 2", lambda: (s := world.status("a")).get("attempt") == 2 and s)
    assert status["restarts"] == {"total": 1, "countedTowardsLimit": 1, "lastReason": "TrainerError"}
    config = world.run_config("a", 2)
    assert config.checkpoints.resume_from == "s3://ckpt/x/a/step-000000060/"
    assert config.job.attempt == 2
    annotations = world.job("a-a2")["metadata"]["annotations"]
    assert annotations[c.ANN_RESUME_FROM] == "s3://ckpt/x/a/step-000000060/"
    assert annotations[c.ANN_RESTARTS_COUNTED] == "1"
    # Attempt 1's children are gone; attempt 2 has its own Service and run config.
    wait_for("attempt 1 cleaned up", lambda: not _attempt_children_left(world, "a", 1))
    world.core.read_namespaced_service(c.attempt_name("a", 2), world.ns)

    # A late report of attempt 1 does not move the progress of attempt 2.
    write_progress(world.core, world.ns, "a", report(1, 99))
    world.running_pods("a-a2", 2)
    world.wait_phase("a", "Running")
    time.sleep(1)
    assert world.status("a")["progress"]["step"] == 60
    assert operator.errors() == []


def _attempt_children_left(world: World, name: str, attempt: int) -> list[str]:
    selector = f"{c.LABEL_JOB_NAME}={name},{c.LABEL_ATTEMPT}={attempt}"
    left = [j.metadata.name for j in world.batch.list_namespaced_job(world.ns, label_selector=selector).items]
    left += [
        s.metadata.name for s in world.core.list_namespaced_service(world.ns, label_selector=selector).items
    ]
    left += [
        m.metadata.name
        for m in world.core.list_namespaced_config_map(world.ns, label_selector=selector).items
    ]
    return left


def test_preemption_restarts_without_counting(world: World) -> None:
    world.create(make_job("a").nodes(2).gpus(0).max_restarts(0).manifest())
    pods = world.running_pods("a-a1", 2)
    world.wait_phase("a", "Running")
    world.kubelet.preempt(pods[0])
    wait_for("attempt 2", lambda: world.jobs("a") == ["a-a2"])
    status = wait_for("restart recorded", lambda: (s := world.status("a")).get("attempt") == 2 and s)
    assert status["restarts"] == {"total": 1, "countedTowardsLimit": 0, "lastReason": "Preempted"}
    assert world.run_config("a", 2).checkpoints.resume_from is None  # none known: the trainer searches


def test_max_restarts_exhausted_fails(world: World) -> None:
    world.create(make_job("a").gpus(0).max_restarts(1).manifest())
    (pod,) = world.running_pods("a-a1", 1)
    world.kubelet.fail(pod, 1, "boom 1")
    wait_for("attempt 2", lambda: world.jobs("a") == ["a-a2"])
    (pod,) = world.running_pods("a-a2", 1)
    world.kubelet.fail(pod, 1, "boom 2")
    status = world.wait_phase("a", "Failed")
    assert status["reason"] == "BackoffLimitExceeded"
    assert "boom 2" in status["message"] and "maxRestarts=1" in status["message"]
    assert status["restarts"]["countedTowardsLimit"] == 1
    assert world.condition("a", "Stalled")["status"] == "True"
    time.sleep(1)
    assert world.jobs("a") == ["a-a2"]  # no third attempt


def test_non_retryable_exit_code_fails_with_the_trainers_message(world: World) -> None:
    world.create(make_job("a").nodes(2).gpus(0).ttl(3).manifest())
    pods = world.running_pods("a-a1", 2)
    world.kubelet.fail(pods[0], 3, "train.jsonl line 12: record has neither 'messages' nor 'prompt'")
    status = world.wait_phase("a", "Failed")
    assert status["reason"] == "InvalidData"
    assert "train.jsonl line 12" in status["message"]
    assert world.jobs("a") == ["a-a1"]
    # ttlSecondsAfterFinished: the FineTuneJob goes away, and its children with it.
    wait_for("FineTuneJob deleted after its TTL", lambda: world.ftj("a") is None, 15)


def test_image_that_cannot_be_pulled_fails_fast(world: World) -> None:
    world.create(make_job("a").gpus(0).resources(image="registry.invalid/nope:1").manifest())
    (pod,) = world.kubelet.wait_pods("a-a1", 1)
    world.kubelet.waiting(pod, "ErrImagePull", 'failed to pull image "registry.invalid/nope:1": not found')
    status = world.wait_phase("a", "Failed", timeout=15)
    assert status["reason"] == "ImagePullFailed"
    assert "registry.invalid/nope:1" in status["message"]
    wait_for("stuck attempt deleted", lambda: world.jobs("a") == [])


def test_suspend_and_resume(world: World) -> None:
    world.create(make_job("a").gpus(0).manifest())
    world.running_pods("a-a1", 1)
    world.wait_phase("a", "Running")
    write_progress(world.core, world.ns, "a", report(1, 50, (50,)))
    wait_for("checkpoint", lambda: world.status("a").get("checkpoints"), 5)

    world.patch_spec("a", {"runPolicy": {"suspend": True}})
    world.wait_phase("a", "Suspended")
    wait_for("attempt Job deleted", lambda: world.jobs("a", include_deleting=True) == [])
    assert world.condition("a", "Suspended")["status"] == "True"
    assert world.condition("a", "Reconciling")["status"] == "False"

    world.patch_spec("a", {"runPolicy": {"suspend": False}})
    wait_for("attempt 2", lambda: world.jobs("a") == ["a-a2"])
    status = wait_for("resumed", lambda: (s := world.status("a")).get("attempt") == 2 and s)
    assert status["restarts"]["total"] == 0
    assert world.run_config("a", 2).checkpoints.resume_from == "s3://ckpt/x/a/step-000000050/"
    assert world.job("a-a2")["metadata"]["annotations"][c.ANN_CAUSE] == "Resumed"


def test_kueue_queue_waits_for_admission(world: World) -> None:
    world.create(make_job("a").gpus(0).queue("team-a").manifest())
    world.wait_phase("a", "Queued")
    job = world.job("a-a1")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][c.KUEUE_QUEUE_LABEL] == "team-a"
    assert world.condition("a", "Admitted")["status"] == "False"
    # Kueue admits the gang by un-suspending the Job.
    world.batch.patch_namespaced_job(
        "a-a1", world.ns, {"spec": {"suspend": False}}, _content_type="application/merge-patch+json"
    )
    world.running_pods("a-a1", 1)
    world.wait_phase("a", "Running")
    assert world.condition("a", "Admitted")["status"] == "True"


def test_delete_removes_every_child(world: World) -> None:
    world.create(make_job("a").nodes(2).gpus(0).manifest())
    world.running_pods("a-a1", 2)
    world.wait_phase("a", "Running")

    def leftovers() -> list[str]:
        selector = f"{c.LABEL_JOB_NAME}=a"
        found = [
            f"job/{j.metadata.name}"
            for j in world.batch.list_namespaced_job(world.ns, label_selector=selector).items
        ]
        found += [
            f"pod/{p.metadata.name}"
            for p in world.core.list_namespaced_pod(world.ns, label_selector=selector).items
        ]
        found += [
            f"svc/{s.metadata.name}"
            for s in world.core.list_namespaced_service(world.ns, label_selector=selector).items
        ]
        found += [
            f"cm/{m.metadata.name}"
            for m in world.core.list_namespaced_config_map(world.ns, label_selector=selector).items
        ]
        found += [
            f"sa/{s.metadata.name}"
            for s in world.core.list_namespaced_service_account(world.ns, label_selector=selector).items
        ]
        found += [
            f"role/{r.metadata.name}"
            for r in world.rbac.list_namespaced_role(world.ns, label_selector=selector).items
        ]
        found += [
            f"rb/{r.metadata.name}"
            for r in world.rbac.list_namespaced_role_binding(world.ns, label_selector=selector).items
        ]
        if world.ftj("a") is not None:
            found.append("finetunejob/a")
        return found

    before = {item.split("/")[0] for item in leftovers()}
    assert before == {"job", "pod", "svc", "cm", "sa", "role", "rb", "finetunejob"}
    world.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, world.ns, api.PLURAL, "a")
    deadline = time.monotonic() + 20
    while leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers() == []


def test_no_finalizer_and_an_old_one_does_not_block_deletion(world: World) -> None:
    """Children go by owner-reference garbage collection, so the operator adds no finalizer; the one
    older versions added (for their per-job timers) is removed, so such a job can still be deleted."""
    world.create(make_job("a").gpus(0).manifest())
    old = make_job("b").gpus(0).manifest()
    old["metadata"]["finalizers"] = [c.FINALIZER]
    world.create(old)
    world.wait_phase("a", "Initializing")
    world.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, world.ns, api.PLURAL, "b")
    wait_for("b deleted (its old finalizer released)", lambda: world.ftj("b") is None, 20)
    assert not (world.ftj("a") or {})["metadata"].get("finalizers")


# ----------------------------------------------------------------------------------------- crashes


def test_operator_killed_right_after_create(world: World, operator: OperatorProcess) -> None:
    operator.kill()
    world.create(make_job("a").nodes(2).gpus(0).manifest())
    for _ in range(3):  # start, let it act a little, kill: three times
        operator.start()
        wait_for("attempt 1", lambda: world.jobs("a"), 10, every=0.02)
        operator.kill()
    operator.start()
    status = world.wait_phase("a", "Initializing")
    assert status["attempt"] == 1
    assert world.jobs("a") == ["a-a1"]
    assert len(world.kubelet.pods("a-a1")) == 2
    assert [sa.metadata.name for sa in world.core.list_namespaced_service_account(world.ns).items].count(
        "a-trainer"
    ) == 1


def test_operator_killed_mid_restart_keeps_counters_exact(world: World, operator: OperatorProcess) -> None:
    world.create(make_job("a").nodes(2).gpus(0).max_restarts(3).manifest())
    pods = world.running_pods("a-a1", 2)
    world.wait_phase("a", "Running")

    for attempt in (1, 2):
        operator.kill()
        world.kubelet.fail(pods[1], 1, f"boom {attempt}")
        job_name = c.attempt_name("a", attempt)
        wait_for(
            f"{job_name} failed",
            lambda jn=job_name: any(
                cond["type"] == "Failed" and cond["status"] == "True"
                for cond in world.job(jn).get("status", {}).get("conditions", [])
            ),
        )
        operator.start()
        # Kill it the moment the next attempt exists: before it deleted the old one or wrote status.
        next_name = c.attempt_name("a", attempt + 1)
        wait_for(next_name, lambda nn=next_name: nn in world.jobs("a", include_deleting=True), 10, every=0.01)
        operator.kill()
        operator.start()
        wait_for(f"only {next_name}", lambda nn=next_name: world.jobs("a", include_deleting=True) == [nn])
        status = wait_for(
            f"status of attempt {attempt + 1}",
            lambda a=attempt: (s := world.status("a")).get("attempt") == a + 1 and s,
        )
        assert status["restarts"] == {
            "total": attempt,
            "countedTowardsLimit": attempt,
            "lastReason": "TrainerError",
        }
        pods = world.running_pods(next_name, 2)
        world.wait_phase("a", "Running")

    world.kubelet.succeed(*pods)
    status = world.wait_phase("a", "Succeeded")
    assert status["attempt"] == 3
    assert status["restarts"]["total"] == 2
    assert world.jobs("a") == ["a-a3"]
    assert operator.starts == 5
