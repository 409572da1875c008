"""The development environment really works: a real S3 server and a real control plane on 127.0.0.1.

Every other integration, trainer and e2e test stands on these fixtures, so these tests check the
behaviour the others rely on (conditional writes, data surviving restarts, Job and garbage
collection controllers running, the kube-context guard).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.exceptions import ClientError

from finetune_devenv.cluster import Cluster, ControlPlane, NotATestContext, assert_test_context
from finetune_devenv.s3server import S3Server
from tests.fixtures.cluster import Kubectl

pytestmark = pytest.mark.integration


# -- S3 ---------------------------------------------------------------------------------------
def test_s3_put_get_list(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    for key in ("ckpt/step-1/a.bin", "ckpt/step-1/b.bin", "ckpt/step-2/a.bin", "top.txt"):
        client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())

    assert client.get_object(Bucket=s3_bucket, Key="top.txt")["Body"].read() == b"top.txt"
    listing = client.list_objects_v2(Bucket=s3_bucket, Prefix="ckpt/", Delimiter="/")
    assert [p["Prefix"] for p in listing["CommonPrefixes"]] == ["ckpt/step-1/", "ckpt/step-2/"]
    page = client.list_objects_v2(Bucket=s3_bucket, Prefix="ckpt/step-1/", MaxKeys=1)
    assert page["IsTruncated"] and [o["Key"] for o in page["Contents"]] == ["ckpt/step-1/a.bin"]


def test_s3_conditional_put_refuses_existing_key(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="marker", Body=b"first", IfNoneMatch="*")

    with pytest.raises(ClientError) as refused:
        client.put_object(Bucket=s3_bucket, Key="marker", Body=b"second", IfNoneMatch="*")

    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=s3_bucket, Key="marker")["Body"].read() == b"first"


def test_s3_env_reaches_a_child_process(s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="k", Body=b"from the parent")
    code = f"import boto3; print(boto3.client('s3').get_object(Bucket='{s3_bucket}', Key='k')['Body'].read())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | s3_server.env()

    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "b'from the parent'"


@pytest.mark.parametrize("hard", [False, True], ids=["stop", "kill"])
def test_s3_restart_keeps_data(s3_server_private: S3Server, hard: bool) -> None:
    s3 = s3_server_private
    bucket = s3.make_bucket(f"t-{uuid.uuid4().hex[:12]}")
    s3.client().put_object(Bucket=bucket, Key="survives", Body=b"still here")
    endpoint = s3.endpoint_url

    s3.restart(hard=hard)

    assert s3.endpoint_url == endpoint
    assert s3.client().get_object(Bucket=bucket, Key="survives")["Body"].read() == b"still here"


def test_s3_down_refuses_connections(s3_server_private: S3Server) -> None:
    s3 = s3_server_private
    s3.kill()
    client = s3.client(connect_timeout=1, retries={"max_attempts": 1})

    with pytest.raises(Exception, match="Could not connect"):
        client.list_buckets()

    s3.start()
    assert any(b["Name"] for b in s3.client().list_buckets()["Buckets"])


# -- control plane ----------------------------------------------------------------------------
def eventually(check: Callable[[], Any], *, timeout: float = 30.0, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what}: not true after {timeout:.0f}s")


def get_json(kubectl: Kubectl, *args: str) -> Any:
    return json.loads(kubectl("get", *args, "-o", "json").stdout)


def apply(kubectl: Kubectl, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = json.loads(
        kubectl("apply", "-n", namespace, "-f", "-", "-o", "json", input=json.dumps(manifest)).stdout
    )
    return created


def configmap(name: str, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if owner is not None:
        ref = {k: owner[k] for k in ("apiVersion", "kind")} | {
            k: owner["metadata"][k] for k in ("name", "uid")
        }
        metadata["ownerReferences"] = [ref]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {"k": "v"}}


def test_namespace_and_configmap(kubectl: Kubectl, namespace: str, kube_api: Any) -> None:
    from kubernetes import client

    apply(kubectl, namespace, configmap("settings"))

    read = client.CoreV1Api(kube_api).read_namespaced_config_map("settings", namespace)
    assert read.data == {"k": "v"}
    assert get_json(kubectl, "namespace", namespace)["status"]["phase"] == "Active"


def test_job_controller_creates_pods_and_completes_the_job(kubectl: Kubectl, namespace: str) -> None:
    container = {"name": "main", "image": "busybox", "command": ["true"]}
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "hello"},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
        },
    }
    apply(kubectl, namespace, job)

    def pods() -> list[dict[str, Any]]:
        found = get_json(kubectl, "pods", "-n", namespace, "-l", "job-name=hello")
        items: list[dict[str, Any]] = found["items"]
        return items if len(items) == 2 else []

    # no kubelet: finish each pod the way a kubelet would, through the status subresource
    for pod in eventually(pods, what="job controller creates 2 pods"):
        status = {"status": {"phase": "Succeeded"}}
        kubectl("patch", "pod", "-n", namespace, pod["metadata"]["name"], "--subresource=status",
                "--type=merge", "-p", json.dumps(status))  # fmt: skip

    def complete() -> bool:
        conditions = get_json(kubectl, "job", "-n", namespace, "hello")["status"].get("conditions", [])
        return any(c["type"] == "Complete" and c["status"] == "True" for c in conditions)

    eventually(complete, what="job controller marks the Job Complete")


def test_garbage_collector_deletes_dependents(kubectl: Kubectl, namespace: str) -> None:
    owner = apply(kubectl, namespace, configmap("owner"))
    apply(kubectl, namespace, configmap("child", owner=owner))

    kubectl("delete", "configmap", "-n", namespace, "owner")

    gone = lambda: kubectl("get", "configmap", "-n", namespace, "child", check=False).returncode != 0  # noqa: E731
    eventually(gone, what="garbage collector deletes the owned ConfigMap")


def test_service_account_tokens_authenticate(kubectl: Kubectl, namespace: str) -> None:
    token = kubectl("create", "token", "default", "-n", namespace, "--duration=10m").stdout.strip()
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}

    result = json.loads(kubectl("create", "-f", "-", "-o", "json", input=json.dumps(review)).stdout)

    assert result["status"]["authenticated"] is True
    assert result["status"]["user"]["username"] == f"system:serviceaccount:{namespace}:default"


def test_context_guard(cluster: Cluster, tmp_path: Path) -> None:
    assert assert_test_context(cluster.kubeconfig).startswith("ftj-local")
    prod = yaml.safe_load(cluster.kubeconfig.read_text())
    prod["contexts"][0]["name"] = prod["current-context"] = "prod"
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(prod))

    with pytest.raises(NotATestContext, match="'prod'"):
        assert_test_context(path)


ANY_OBJECT = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.finetune.dev"},
    "spec": {
        "group": "test.finetune.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": ANY_OBJECT},
            }
        ],
    },
}


def test_crds_applied_before_controllers_so_gc_of_custom_owners_is_prompt(tmp_path: Path) -> None:
    crds = tmp_path / "crds"
    crds.mkdir()
    (crds / "widgets.yaml").write_text(yaml.safe_dump(WIDGET_CRD))
    with ControlPlane(tmp_path / "cluster", crd_dir=crds) as plane:

        def kubectl(*args: str, check: bool = True, input: str | None = None) -> Any:
            return plane.kubectl(*args, check=check, input=input)

        widget = {"apiVersion": "test.finetune.dev/v1", "kind": "Widget", "metadata": {"name": "w"}}
        owner = apply(kubectl, "default", widget)
        apply(kubectl, "default", configmap("widget-child", owner=owner))

        kubectl("delete", "widget", "-n", "default", "w")

        gone = lambda: kubectl("get", "cm", "widget-child", check=False).returncode != 0  # noqa: E731
        eventually(gone, timeout=10, what="GC deletes a child of a custom resource within 10 s")


def test_apiserver_restart(cluster_private: ControlPlane) -> None:
    cluster_private.kubectl("create", "configmap", "kept", "--from-literal=a=b", check=True)

    cluster_private.restart_apiserver(down_for=0.5)

    kept = cluster_private.kubectl("get", "configmap", "kept", "-o", "json", check=True)
    assert json.loads(kept.stdout)["data"] == {"a": "b"}
