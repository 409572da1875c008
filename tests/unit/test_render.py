"""Rendering a FineTuneJob into its children (finetune_operator.render)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from finetune_operator import constants as c
from finetune_operator.render import AttemptIntent, attempt_children, job_children, run_config
from finetune_operator.settings import Settings
from finetune_trainer.runconfig import RUN_CONFIG_ENV, RUN_CONFIG_FILE, RunConfig
from tests.support.builders import make_job

pytestmark = pytest.mark.unit

SETTINGS = Settings(
    trainer_image="registry.local/trainer:1", master_port=29500, termination_grace_seconds=900
)


def render(builder: Any, intent: AttemptIntent | None = None) -> dict[str, dict[str, Any]]:
    job = builder.build()
    objs = attempt_children(job, intent or AttemptIntent(attempt=1), SETTINGS)
    return {o["kind"]: o for o in objs}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_indexed_job_is_a_gang_with_no_retries_of_its_own() -> None:
    job = render(make_job("llm").nodes(4).gpus(8))["Job"]
    spec = job["spec"]
    assert job["metadata"]["name"] == "llm-a1"
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimit"] == 0
    assert spec["suspend"] is False
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == "llm-a1"
    assert pod["terminationGracePeriodSeconds"] == 900
    assert pod["serviceAccountName"] == "llm-trainer"


def test_pod_failure_policy_marks_disruptions_and_non_retryable_exit_codes() -> None:
    rules = render(make_job())["Job"]["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    exit_rule = next(r for r in rules if "onExitCodes" in r)
    assert exit_rule["action"] == "FailJob"
    assert exit_rule["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [3, 4, 5]}


def test_rendezvous_environment() -> None:
    objs = render(make_job("llm", "team").nodes(2).gpus(8), AttemptIntent(attempt=3))
    container = objs["Job"]["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    assert env[RUN_CONFIG_ENV] == f"/etc/finetune/{RUN_CONFIG_FILE}"
    assert env["NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-completion-index']"}
    }
    assert env["NNODES"] == "2"
    assert env["NPROC_PER_NODE"] == "8"
    assert env["WORLD_SIZE_HINT"] == "16"
    assert env["MASTER_ADDR"] == "llm-a3-0.llm-a3.team.svc"
    assert env["MASTER_PORT"] == "29500"
    service = objs["Service"]
    assert service["metadata"]["name"] == "llm-a3"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {c.LABEL_JOB_NAME: "llm", c.LABEL_ATTEMPT: "3"}
    pod_labels = objs["Job"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_cpu_only_pods_run_one_process_and_request_no_gpu() -> None:
    container = render(make_job().gpus(0))["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert env_of(container)["NPROC_PER_NODE"] == "1"
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])


def test_resources_shm_and_placement() -> None:
    builder = (
        make_job()
        .gpus(8)
        .resources(
            gpuResource="amd.com/gpu",
            cpu="32",
            memory="512Gi",
            shmSize="64Gi",
            nodeSelector={"pool": "h100"},
            tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            priorityClassName="training",
        )
    )
    pod = render(builder)["Job"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"amd.com/gpu": "8", "cpu": "32", "memory": "512Gi"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["nodeSelector"] == {"pool": "h100"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "training"


def test_pod_security() -> None:
    pod = render(make_job())["Job"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["image"] == "registry.local/trainer:1"
    assert container["command"] == ["python", "-m", "finetune_trainer", "run"]


def test_image_in_spec_overrides_the_operator_default() -> None:
    container = render(make_job().resources(image="my/trainer:dev"))["Job"]["spec"]["template"]["spec"]
    assert container["containers"][0]["image"] == "my/trainer:dev"


def test_secrets_only_by_reference() -> None:
    objs = render(make_job().secrets(s3="s3-creds", hf="hf-token"))
    container = objs["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert env_of(container)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}
    everything = json.dumps(list(objs.values()))
    for forbidden in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", '"HF_TOKEN", "value"'):
        assert forbidden not in everything
    assert '"kind": "Secret"' not in everything


def test_kueue_queue_label_and_suspend() -> None:
    job = render(make_job().queue("team-a"))["Job"]
    assert job["metadata"]["labels"][c.KUEUE_QUEUE_LABEL] == "team-a"
    assert job["spec"]["suspend"] is True
    plain = render(make_job())["Job"]
    assert c.KUEUE_QUEUE_LABEL not in plain["metadata"]["labels"]


def test_every_child_is_owned_and_labelled() -> None:
    job = make_job("llm").build()
    children = [*job_children(job), *attempt_children(job, AttemptIntent(attempt=2), SETTINGS)]
    assert [o["kind"] for o in children] == [
        "ConfigMap",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Service",
        "ConfigMap",
        "Job",
    ]
    for obj in children:
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "name": "llm",
            "uid": "uid-llm",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert obj["metadata"]["labels"][c.LABEL_JOB_NAME] == "llm"
        assert obj["metadata"]["namespace"] == "default"
    for obj in children[4:]:
        assert obj["metadata"]["labels"][c.LABEL_ATTEMPT] == "2"


def test_role_may_only_get_and_patch_the_progress_config_map() -> None:
    cm, sa, role, binding = job_children(make_job("llm").build())
    assert cm["metadata"]["name"] == "llm-progress"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["llm-progress"],
            "verbs": ["get", "patch"],
        }
    ]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "llm-trainer",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "default"}
    ]


def test_intent_is_recorded_on_the_job() -> None:
    intent = AttemptIntent(
        attempt=3,
        restarts_total=2,
        restarts_counted=1,
        last_restart_reason="Preempted",
        cause="Preempted",
        resume_from="s3://ckpt/default/a/step-000000200/",
    )
    annotations = render(make_job(), intent)["Job"]["metadata"]["annotations"]
    assert AttemptIntent.from_annotations(3, annotations) == intent


def test_run_config_content() -> None:
    builder = make_job("llm", "team").dpo().nodes(2).gpus(4).endpoint("http://s3.local:9000")
    intent = AttemptIntent(attempt=2, resume_from="s3://ckpt/team/llm/step-000000400/")
    cm = render(builder, intent)["ConfigMap"]
    assert cm["metadata"]["name"] == "llm-a2-config"
    config = RunConfig.model_validate_json(cm["data"][RUN_CONFIG_FILE])
    assert config.job.namespace == "team"
    assert config.job.name == "llm"
    assert config.job.attempt == 2
    assert config.method == "dpo"
    assert config.checkpoints.uri == "s3://ckpt/team/llm/"
    assert config.checkpoints.resume_from == "s3://ckpt/team/llm/step-000000400/"
    assert config.distributed.nodes == 2
    assert config.distributed.procs_per_node == 4
    assert config.distributed.master_port == 29500
    assert config.hyperparameters.learning_rate == 5e-6
    assert config.s3.endpoint_url == "http://s3.local:9000"
    assert config.s3.addressing_style == "path"
    assert (config.progress.transport, config.progress.namespace, config.progress.name) == (
        "configmap",
        "team",
        "llm-progress",
    )
    assert config.adapter.target_modules == "all-linear"


def test_run_config_uses_operator_s3_defaults_and_no_resume_on_first_attempt() -> None:
    settings = Settings(default_s3_endpoint="http://minio:9000", default_s3_region="eu-1")
    config = run_config(make_job().build(), 1, None, settings)
    assert config.checkpoints.resume_from is None
    assert config.s3.endpoint_url == "http://minio:9000"
    assert config.s3.region == "eu-1"


def test_long_names_still_give_valid_dns_labels() -> None:
    name = "x" * 30 + "-" + "y" * 60
    objs = render(make_job(name).nodes(512))
    job_name = objs["Job"]["metadata"]["name"]
    assert len(f"{job_name}-511") <= 63
    assert objs["Service"]["metadata"]["name"] == job_name
    assert len(objs["Job"]["metadata"]["labels"][c.LABEL_JOB_NAME]) <= 63
    assert objs["Job"]["spec"]["template"]["metadata"]["annotations"][c.ANN_OWNER] == name
    assert c.attempt_name("0abc", 1)[0].isalpha()  # Service names must start with a letter
