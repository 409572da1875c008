"""Security: no credential ever leaks, and every identity holds exactly the rights it needs.

- Secrets: a job trains with S3 credentials and a Hugging Face token from Secrets, another fails
  on a wrong secret key; afterwards every FineTuneJob, event, ConfigMap, Job and pod object, the
  operator's and node agent's logs, everything the trainer wrote in its pods, and every object in
  S3 (manifest.json, markers, checkpoints, TensorBoard files) is searched for the secret values,
  raw and base64-encoded.
- The operator, run exactly as the chart's Deployment runs it under the chart's ServiceAccount and
  RBAC, takes jobs through whole lives without one refused call, and cannot touch what it must not.
- Training pods are admitted by a namespace that enforces the restricted Pod Security Standard.
- A trainer's token may get and patch its own progress ConfigMap, nothing else; and one
  namespace's trainer can neither read another namespace's Secrets nor write its status.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from finetune_devenv.kubectl import Cluster
from finetune_operator import api
from finetune_operator import constants as c
from tests.fixtures.e2e import SECRET, Product
from tests.fixtures.operator import OperatorProcess, _release_finetunejobs
from tests.integration.test_helm import LocalOperator, Release
from tests.integration.test_operator_lifecycle import World, report, write_progress
from tests.support import faults
from tests.support.builders import make_job
from tests.support.helm import CHART
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def forms(value: str) -> list[bytes]:
    """A secret as it could leak: raw, or base64 as Kubernetes stores Secret data."""
    return [value.encode(), base64.b64encode(value.encode())]


def leaks(values: dict[str, str], places: dict[str, bytes]) -> list[str]:
    return [
        f"{what} found in {where}"
        for what, value in values.items()
        for form in forms(value)
        for where, content in places.items()
        if form in content
    ]


# ------------------------------------------------------------------------------------------ secrets


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_secrets_never_appear_in_status_events_configmaps_logs_or_s3(product: Product) -> None:
    hf_token = "hf_" + secrets.token_urlsafe(24)
    wrong_key = "wrong-" + secrets.token_urlsafe(24)
    hidden = {
        "the S3 access key id": product.s3.access_key,
        "the S3 secret key": product.s3.secret_key,
        "the Hugging Face token": hf_token,
        "a wrong S3 secret key": wrong_key,
    }
    core = product.core
    core.create_namespaced_secret(
        product.ns, {"metadata": {"name": "hf-token"}, "stringData": {"HF_TOKEN": hf_token}}
    )
    core.create_namespaced_secret(
        product.ns,
        {
            "metadata": {"name": "s3-wrong"},
            "stringData": {"AWS_ACCESS_KEY_ID": product.s3.access_key, "AWS_SECRET_ACCESS_KEY": wrong_key},
        },
    )
    good = product.tiny_job("leak-ok", max_steps=10, every_steps=5)
    good["spec"]["credentials"]["hfTokenSecretRef"] = "hf-token"
    bad = product.tiny_job("leak-bad", max_steps=10, every_steps=5)
    bad["spec"]["credentials"] = {"s3SecretRef": "s3-wrong", "hfTokenSecretRef": "hf-token"}
    product.apply(bad)
    product.apply(good)
    failed = product.wait_phase("leak-bad", "Failed", timeout=300)
    assert "access refused" in failed["message"], failed
    product.wait_phase("leak-ok", "Succeeded", timeout=600)

    places = cluster_objects(product)
    places[f"operator log {product.operator.log_path}"] = product.operator.logs().encode()
    for path in sorted(p for p in product.agent.state_dir.rglob("*") if p.is_file()):
        places[f"node agent file {path.relative_to(product.agent.state_dir)}"] = path.read_bytes()
    places.update(s3_objects(product))
    assert any("manifest.json" in where for where in places), sorted(places)
    assert any("/COMPLETE" in where for where in places), sorted(places)
    found = leaks(hidden, places)
    assert not found, "\n".join(found)
    # The search itself works: it finds the values where they do belong, in the Secrets.
    stored = core.read_namespaced_secret("s3-wrong", product.ns, _preload_content=False).data
    assert leaks({"a wrong S3 secret key": wrong_key}, {"Secret s3-wrong": stored})
    faults.record(
        "security-secrets",
        secrets_hidden=len(hidden),
        places_scanned=len(places),
        bytes_scanned=sum(len(v) for v in places.values()),
        s3_objects=sum(1 for where in places if where.startswith("s3://")),
        leaks=0,
    )


def cluster_objects(product: Product) -> dict[str, bytes]:
    """Every object of the namespace that is not a Secret, as JSON: the places a value could land."""
    kinds = "finetunejobs,events,configmaps,jobs,pods,services,serviceaccounts,roles,rolebindings"
    listed = product.cluster.kubectl("get", kinds, "-n", product.ns, "-o", "json", check=True)
    items = json.loads(listed.stdout)["items"]
    assert {item["kind"] for item in items} >= {"FineTuneJob", "Event", "ConfigMap", "Job", "Pod"}
    return {f"{item['kind']} {item['metadata']['name']}": json.dumps(item).encode() for item in items}


def s3_objects(product: Product) -> dict[str, bytes]:
    s3 = product.s3.client()
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=product.bucket):
        for obj in page.get("Contents", []):
            body = s3.get_object(Bucket=product.bucket, Key=obj["Key"])["Body"].read()
            found[f"s3://{product.bucket}/{obj['Key']}"] = body
    return found


# --------------------------------------------------------------------------------- operator RBAC

OPERATOR_MUST_NOT = [
    ("get", "", "secrets"),
    ("list", "", "secrets"),
    ("watch", "", "secrets"),
    ("create", "", "pods"),
    ("delete", "", "pods"),
    ("create", "", "pods/exec"),
    ("update", "", "pods/status"),
    ("create", "", "serviceaccounts/token"),
    ("update", "finetune.dev", "finetunejobs"),
    ("create", "finetune.dev", "finetunejobs"),
    ("update", "batch", "jobs"),
    ("patch", "batch", "jobs/status"),
    ("escalate", "rbac.authorization.k8s.io", "roles"),
    ("bind", "rbac.authorization.k8s.io", "roles"),
    ("update", "rbac.authorization.k8s.io", "roles"),
    ("create", "rbac.authorization.k8s.io", "clusterroles"),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings"),
    ("impersonate", "", "serviceaccounts"),
    ("delete", "", "namespaces"),
    ("get", "", "nodes"),
]


def can(
    authz: client.AuthorizationV1Api,
    user: str,
    verb: str,
    group: str,
    resource: str,
    namespace: str,
    name: str = "",
) -> bool:
    """A SubjectAccessReview: may ``user`` do ``verb`` on ``group/resource[/name]`` in ``namespace``?"""
    resource, _, sub = resource.partition("/")
    attributes = {"verb": verb, "group": group, "resource": resource, "namespace": namespace}
    attributes |= {"subresource": sub} if sub else {}
    attributes |= {"name": name} if name else {}
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": groups, "resourceAttributes": attributes},
    }
    return bool(authz.create_subject_access_review(review).status.allowed)


@pytest.fixture
def chart_release(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Release]:
    """The chart installed for the test's namespace (peering on, as in production), fast timings."""
    files = sorted((CHART / "crds").glob("*.yaml"))
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", *(f"--filename={f}" for f in files), check=True
    )
    for doc in (d for f in files for d in yaml.safe_load_all(f.read_text()) if d):
        crd = f"crd/{doc['metadata']['name']}"
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", crd, check=True)
    release_ns = f"ftj-sys-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", release_ns, check=True)
    settings = {"resyncSeconds": 2, "startFailureGraceSeconds": 3, "terminationGraceSeconds": 30}
    values = {"watchNamespaces": [namespace], "settings": settings, "metrics": {"enabled": False}}
    release = Release(cluster, release_ns, tmp_path, values)
    try:
        yield release
    finally:
        release.uninstall()
        _release_finetunejobs(cluster, namespace)
        cluster.kubectl("delete", "namespace", release_ns, "--wait=false", "--ignore-not-found")


@pytest.mark.timeout(600)
def test_operator_needs_nothing_beyond_the_charts_rbac(
    cluster: Cluster, kube_api: client.ApiClient, namespace: str, chart_release: Release, tmp_path: Path
) -> None:
    operator = LocalOperator(cluster, chart_release, tmp_path, f"{chart_release.fullname}-0").start()
    world = World(kube_api, namespace)
    try:
        world.create(make_job("life").nodes(2).gpus(0).max_restarts(1).manifest())
        world.create(make_job("bad-data").gpus(0).manifest())
        world.create(make_job("ttl").gpus(0).ttl(2).manifest())
        world.create(make_job("cancel").gpus(0).manifest())
        pods = world.running_pods("life-a1", 2)
        trainer = client.CoreV1Api(world.token_client(c.trainer_identity_name("life")))
        write_progress(trainer, namespace, "life", report(1, 10, [10], name="life"))
        world.kubelet.fail(pods[0], 1, "RuntimeError: injected")
        pods = world.running_pods("life-a2", 2)
        world.patch_spec("life", {"runPolicy": {"suspend": True}})
        world.wait_phase("life", "Suspended", timeout=60)
        world.patch_spec("life", {"runPolicy": {"suspend": False}})
        pods = world.running_pods("life-a3", 2)
        write_progress(trainer, namespace, "life", report(3, 20, [10, 20], name="life"))
        world.kubelet.succeed(*pods)
        (pod,) = world.running_pods("bad-data-a1", 1)
        world.kubelet.fail(pod, 3, "train.jsonl line 3: invalid JSON")
        (pod,) = world.running_pods("ttl-a1", 1)
        world.kubelet.succeed(pod)
        world.running_pods("cancel-a1", 1)
        world.wait_phase("cancel", "Running", timeout=60)  # its pod runs: cancel it in the middle
        world.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, "cancel")

        status = world.wait_phase("life", "Succeeded", timeout=60)
        assert status["restarts"] == {"total": 1, "countedTowardsLimit": 1, "lastReason": "TrainerError"}
        assert world.wait_phase("bad-data", "Failed", timeout=60)["reason"] == "InvalidData"
        wait_for("the ttl job deleted by the operator", lambda: world.ftj("ttl") is None, 60)
        wait_for("the cancelled job gone", lambda: world.ftj("cancel") is None, 60)
        events = {reason for _, reason in world.events("life")}
        assert {"Running", "TrainerError", "Suspended", "Succeeded"} <= events, events
        faults.assert_no_orphans(kube_api, namespace)
    finally:
        operator.stop()
        print(f"--- operator log ---\n{operator.logs()[-20000:]}")
    assert operator.denied() == [], "the chart's RBAC refused calls:\n" + "\n".join(operator.denied())
    assert operator.errors() == []

    authz = client.AuthorizationV1Api(kube_api)
    identity = f"system:serviceaccount:{chart_release.namespace}:{chart_release.fullname}"
    allowed = [rule for rule in OPERATOR_MUST_NOT if can(authz, identity, *rule, namespace)]
    assert allowed == [], f"the operator's ServiceAccount may {allowed}"
    assert can(authz, identity, "update", "finetune.dev", "finetunejobs/status", namespace)  # the check works
    assert not can(authz, identity, "list", "finetune.dev", "finetunejobs", "default"), (
        "beyond its namespaces"
    )
    rendered = json.loads(cluster.kubectl("get", "clusterrole", chart_release.fullname, "-o", "json").stdout)
    wildcards = [r for r in rendered["rules"] if "*" in [*r.get("verbs", []), *r.get("resources", [])]]
    assert wildcards == []
    faults.record(
        "security-operator-rbac",
        lifecycles=4,
        refused_calls=0,
        forbidden_rights_checked=len(OPERATOR_MUST_NOT),
        forbidden_rights_held=0,
    )


# ----------------------------------------------------------------------------------- pod security

RESTRICTED = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}


@pytest.mark.timeout(180)
def test_training_pods_are_admitted_under_restricted_pod_security(
    cluster: Cluster, kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    cluster.kubectl("label", "namespace", namespace, *(f"{k}={v}" for k, v in RESTRICTED.items()), check=True)
    world = World(kube_api, namespace)
    # The namespace really enforces: a pod that may run as root is refused.
    rootful = {"metadata": {"name": "rootful"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    with pytest.raises(ApiException) as refused:
        world.core.create_namespaced_pod(namespace, rootful)
    assert refused.value.status == 403 and "violates PodSecurity" in str(refused.value.body)

    world.create(make_job("gpu").nodes(2).gpus(8).manifest())
    world.create(make_job("cpu").gpus(0).manifest())
    pods = world.kubelet.wait_pods("gpu-a1", 2, timeout=60) + world.kubelet.wait_pods("cpu-a1", 1, timeout=60)
    for pod in pods:
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        (container,) = spec["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    failed = [
        e.message for e in world.core.list_namespaced_event(namespace).items if e.reason == "FailedCreate"
    ]
    assert failed == []
    faults.record("security-pod-security", pods_admitted=len(pods), standard="restricted", refused=0)


# ----------------------------------------------------------------------------- trainer identities

VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")
RESOURCES = [
    ("", "configmaps"),
    ("", "secrets"),
    ("", "pods"),
    ("", "pods/log"),
    ("", "pods/exec"),
    ("", "services"),
    ("", "serviceaccounts"),
    ("", "serviceaccounts/token"),
    ("", "events"),
    ("batch", "jobs"),
    ("finetune.dev", "finetunejobs"),
    ("finetune.dev", "finetunejobs/status"),
    ("rbac.authorization.k8s.io", "roles"),
    ("rbac.authorization.k8s.io", "rolebindings"),
]


@pytest.mark.timeout(180)
def test_trainer_token_may_only_get_and_patch_its_own_progress(
    kube_api: client.ApiClient, namespace: str, operator: OperatorProcess
) -> None:
    world = World(kube_api, namespace)
    world.create(make_job("a").gpus(0).manifest())
    world.create(make_job("b").gpus(0).manifest())
    wait_for("the trainer's Role", lambda: world.rbac.list_namespaced_role(namespace).items, 60)
    wait_for("b's progress ConfigMap", lambda: _exists(world, c.progress_name("b")), 60)
    authz = client.AuthorizationV1Api(kube_api)
    user = f"system:serviceaccount:{namespace}:{c.trainer_identity_name('a')}"
    names = ["", c.progress_name("a"), c.progress_name("b"), c.run_config_name("a", 1), "a", SECRET]
    granted = {
        (verb, f"{group}/{resource}" if group else resource, name)
        for verb in VERBS
        for group, resource in RESOURCES
        for name in names
        if can(authz, user, verb, group, resource, namespace, name)
    }
    assert granted == {("get", "configmaps", "a-progress"), ("patch", "configmaps", "a-progress")}
    faults.record(
        "security-trainer-rbac",
        rights_checked=len(VERBS) * len(RESOURCES) * len(names),
        rights_granted=sorted(" ".join(g) for g in granted),
    )


def _exists(world: World, config_map: str) -> bool:
    try:
        world.core.read_namespaced_config_map(config_map, world.ns)
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


def assert_refused(token: client.ApiClient, namespace: str, name: str) -> int:
    """Every way a trainer token could reach FineTuneJob ``namespace/name`` and its Secrets is refused."""
    core, custom = client.CoreV1Api(token), client.CustomObjectsApi(token)
    status = {"status": {"phase": "Succeeded"}}
    calls: list[Callable[[], Any]] = [
        lambda: core.list_namespaced_secret(namespace),
        lambda: core.read_namespaced_secret(SECRET, namespace),
        lambda: core.read_namespaced_config_map(c.progress_name(name), namespace),
        lambda: write_progress(core, namespace, name, report(1, 99, [], name="life")),
        lambda: custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, name),
        lambda: custom.patch_namespaced_custom_object_status(
            api.GROUP, api.VERSION, namespace, api.PLURAL, name, status,
            _content_type="application/merge-patch+json",
        ),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(ApiException) as denied:
            call()
        assert denied.value.status == 403, denied.value
    return len(calls)


@pytest.fixture
def other_namespace(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[str, OperatorProcess]]:
    """A second namespace with an operator of its own."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name, check=True)
    operator = OperatorProcess(cluster, name, tmp_path / "operator-other.log")
    try:
        operator.start(timeout=60)
        yield name, operator
    finally:
        operator.kill()
        _release_finetunejobs(cluster, name)
        cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


@pytest.mark.timeout(180)
def test_a_job_cannot_read_or_write_another_namespace(
    kube_api: client.ApiClient,
    namespace: str,
    operator: OperatorProcess,
    other_namespace: tuple[str, OperatorProcess],
) -> None:
    other, _ = other_namespace
    mine, theirs = World(kube_api, namespace), World(kube_api, other)
    mine.create(make_job("a").gpus(0).manifest())
    theirs.create(make_job("b").gpus(0).manifest())
    theirs.core.create_namespaced_secret(other, {"metadata": {"name": SECRET}, "stringData": {"k": "v"}})
    for world, name in ((mine, "a"), (theirs, "b")):
        wait_for(f"{name}'s trainer identity", lambda w=world, n=name: _exists(w, c.progress_name(n)), 60)
        wait_for(f"{name}'s RoleBinding", lambda w=world: w.rbac.list_namespaced_role_binding(w.ns).items, 60)
    attempts = 0
    for world, name, target, target_name in ((mine, "a", theirs, "b"), (theirs, "b", mine, "a")):
        token = world.token_client(c.trainer_identity_name(name))
        # its own: allowed
        write_progress(client.CoreV1Api(token), world.ns, name, report(1, 1, [], name="life"))
        attempts += assert_refused(token, target.ns, target_name)
        token.close()
    assert theirs.status("b").get("phase") != "Succeeded"
    faults.record("security-namespaces", cross_namespace_calls=attempts, allowed=0)
