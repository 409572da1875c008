"""The Helm chart against the real API server: dry run, Pod Security, install, reconcile, HA.

The local control plane has no kubelet, so the Deployment's pods never start. Instead, the operator
runs as a local process exactly as the Deployment would run it: the live Deployment's args and
environment, authenticated with a token of the chart's ServiceAccount (TokenRequest API). If the
chart's RBAC lacks anything the operator does, the API server answers 403 and the test fails.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_devenv import _proc
from finetune_devenv.kubectl import Cluster
from finetune_trainer.runconfig import RUN_CONFIG_FILE, RunConfig
from tests.fixtures.external_crds import install_external_crds
from tests.support.builders import make_job
from tests.support.helm import CHART, CI_VALUES, helm, install_crds, value_args
from tests.support.kubelet import Kubelet
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


RBAC_DENIED = re.compile(r'is forbidden: User "system:serviceaccount:|Not enough permissions')
"""An RBAC refusal (the API server's message) or kopf's warning when a list/watch was refused."""


def kube_json(cluster: Cluster, *args: str) -> Any:
    done = cluster.kubectl(*args, "-o", "json")
    return json.loads(done.stdout) if done.returncode == 0 else None


def kubeconfig_env(cluster: Cluster) -> dict[str, str]:
    return {**os.environ, **cluster.env(), "HELM_KUBECONTEXT": cluster.context}


# -------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chart_crds(cluster: Cluster) -> None:
    install_crds(cluster)


@pytest.fixture(scope="module")
def integration_crds(cluster: Cluster) -> None:
    """The Prometheus Operator's CRDs (and Kueue's, Argo CD's): the optional ServiceMonitor is checked too."""
    install_external_crds(cluster)


@pytest.fixture
def new_namespace(cluster: Cluster) -> Iterator[Callable[..., str]]:
    """Makes extra namespaces (``labels`` optional), deleted after the test."""
    made: list[str] = []

    def make(prefix: str = "t", labels: dict[str, str] | None = None) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        cluster.kubectl("create", "namespace", name, check=True)
        if labels:
            cluster.kubectl("label", "namespace", name, *(f"{k}={v}" for k, v in labels.items()), check=True)
        made.append(name)
        return name

    yield make
    for name in made:
        cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


class Release:
    """One `helm install` of the chart; uninstalled at the end of the test."""

    def __init__(self, cluster: Cluster, namespace: str, tmp: Path, values: dict[str, Any]) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.name = f"ftj-{uuid.uuid4().hex[:6]}"
        self.fullname = f"{self.name}-finetune-operator"
        args = value_args(values, [], tmp)
        done = helm(
            "install", self.name, str(CHART), f"--namespace={namespace}", *args, env=kubeconfig_env(cluster)
        )
        self.install_output = done.stdout + done.stderr
        self.tmp = tmp

    def upgrade(self, values: dict[str, Any]) -> None:
        """``helm upgrade`` with these values (not reusing the old ones)."""
        args = value_args(values, [], self.tmp)
        helm("upgrade", self.name, str(CHART), f"--namespace={self.namespace}", *args,
             env=kubeconfig_env(self.cluster))  # fmt: skip

    def deployment(self) -> dict[str, Any]:
        found: dict[str, Any] = kube_json(
            self.cluster, "get", "deployment", self.fullname, "-n", self.namespace
        )
        return found

    def uninstall(self) -> None:
        helm(
            "uninstall",
            self.name,
            f"--namespace={self.namespace}",
            env=kubeconfig_env(self.cluster),
            check=False,
        )


@pytest.fixture
def install(cluster: Cluster, chart_crds: None, tmp_path: Path) -> Iterator[Callable[..., Release]]:
    releases: list[Release] = []

    def run(namespace: str, values: dict[str, Any] | None = None) -> Release:
        release = Release(cluster, namespace, tmp_path, values or {})
        releases.append(release)
        return release

    yield run
    for release in releases:
        release.uninstall()


class LocalOperator:
    """The chart's Deployment run as a local process under the chart's ServiceAccount."""

    def __init__(self, cluster: Cluster, release: Release, tmp: Path, pod_id: str) -> None:
        self.pod_id = pod_id
        self.log_path = tmp / f"operator-{pod_id}.log"
        self.kubeconfig = tmp / f"kubeconfig-{pod_id}"
        self.health_port, self.metrics_port = _proc.free_ports(2)
        deployment = release.deployment()
        pod = deployment["spec"]["template"]["spec"]
        (spec,) = pod["containers"]
        self.argv = [sys.executable, "-m", "finetune_operator", *(self._local(a) for a in spec["args"])]
        chart_env = {e["name"]: e["value"] for e in spec["env"] if "value" in e}
        token = cluster.kubectl(
            "create",
            "token",
            pod["serviceAccountName"],
            "-n",
            release.namespace,
            "--duration=3600s",
            check=True,
        ).stdout.strip()
        self._write_kubeconfig(cluster, token)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FTJ_")},
            **chart_env,
            "POD_ID": pod_id,  # what the Deployment's fieldRef gives: kopf's identity in the peering
            "KUBECONFIG": str(self.kubeconfig),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def _local(self, arg: str) -> str:
        if arg.startswith("--liveness="):
            return f"--liveness=http://127.0.0.1:{self.health_port}/healthz"
        if arg.startswith("--metrics-port="):
            return f"--metrics-port={self.metrics_port}"
        return arg

    def _write_kubeconfig(self, cluster: Cluster, token: str) -> None:
        admin = yaml.safe_load(cluster.kubeconfig.read_text())
        context = next(c for c in admin["contexts"] if c["name"] == cluster.context)["context"]
        server = next(c for c in admin["clusters"] if c["name"] == context["cluster"])["cluster"]
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": server}],
            "users": [{"name": "operator", "user": {"token": token}}],
            "contexts": [{"name": "operator", "context": {"cluster": "local", "user": "operator"}}],
            "current-context": "operator",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)

    def start(self) -> LocalOperator:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        wait_for(f"operator {self.pod_id} live", self._live, timeout=60)
        return self

    def _live(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}/healthz", timeout=1
            ) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def stop(self) -> None:
        """SIGTERM, as the kubelet sends it: kopf leaves the peering on its way out."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def denied(self) -> list[str]:
        return [line for line in self.logs().splitlines() if RBAC_DENIED.search(line)]

    def errors(self) -> list[str]:
        out = []
        for line in self.logs().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("level") in ("ERROR", "CRITICAL"):
                out.append(line)
        return out


@pytest.fixture
def local_operators(cluster: Cluster, tmp_path: Path) -> Iterator[Callable[[Release, str], LocalOperator]]:
    started: list[LocalOperator] = []

    def make(release: Release, pod_id: str) -> LocalOperator:
        operator = LocalOperator(cluster, release, tmp_path, pod_id)
        started.append(operator)
        return operator

    yield make
    for operator in started:
        operator.stop()
        print(f"--- {operator.pod_id} log ---\n{operator.logs()[-12000:]}")
    _release_finetunejobs(cluster)


def _release_finetunejobs(cluster: Cluster) -> None:
    """Drop the operator's finalizer wherever a stopped operator left it, so namespaces can go."""
    listed = kube_json(cluster, "get", "finetunejobs", "--all-namespaces") or {"items": []}
    for item in listed["items"]:
        meta = item["metadata"]
        if "finetune.dev/finalizer" in (meta.get("finalizers") or []):
            patch = json.dumps({"metadata": {"finalizers": None}})
            cluster.kubectl(
                "patch", "finetunejob", meta["name"], "-n", meta["namespace"], "--type=merge", "-p", patch
            )


# ------------------------------------------------------------------------------------- helpers


def create_job(cluster: Cluster, namespace: str, name: str) -> None:
    manifest = make_job(name, namespace).manifest()
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=True)


def reconciled(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    """Wait until the operator created the job's children and wrote its status; return the status."""

    def written() -> dict[str, Any] | None:
        obj = kube_json(cluster, "get", "finetunejob", name, "-n", namespace) or {}
        found: dict[str, Any] = obj.get("status") or {}
        return found if found.get("phase") else None

    status = wait_for(f"{namespace}/{name} status", written)
    trainer = f"{name}-trainer"
    for kind, child in [
        ("serviceaccount", trainer),
        ("role", trainer),
        ("rolebinding", trainer),
        ("configmap", f"{name}-progress"),
        ("service", f"{name}-a1"),
        ("configmap", f"{name}-a1-config"),
        ("job", f"{name}-a1"),
    ]:
        wait_for(
            f"{kind} {child}", functools.partial(kube_json, cluster, "get", kind, child, "-n", namespace)
        )
    return status


def chart_docs(release_ns: str, tmp: Path, values_file: Path, values: dict[str, Any]) -> list[dict[str, Any]]:
    done = helm(
        "template",
        "ftj-dry",
        str(CHART),
        f"--namespace={release_ns}",
        *value_args(values, [values_file], tmp),
    )
    return [d for d in yaml.safe_load_all(done.stdout) if d]


# --------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_every_rendered_manifest_passes_the_api_servers_dry_run(
    values_file: Path,
    cluster: Cluster,
    chart_crds: None,
    integration_crds: None,
    new_namespace: Callable[..., str],
    tmp_path: Path,
) -> None:
    release_ns = new_namespace("ftj-sys")
    values: dict[str, Any] = {}
    if (yaml.safe_load(values_file.read_text()) or {}).get("watchNamespaces"):
        values["watchNamespaces"] = [new_namespace("team-a"), new_namespace("team-b")]
    docs = chart_docs(release_ns, tmp_path, values_file, values)
    done = cluster.kubectl(
        "apply", "--dry-run=server", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs)
    )
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr
    assert len([line for line in done.stdout.splitlines() if "(server dry run)" in line]) == len(docs)


def test_the_service_monitor_meets_the_prometheus_operators_schema(
    cluster: Cluster, integration_crds: None, new_namespace: Callable[..., str], tmp_path: Path
) -> None:
    """The real CRD checks the chart's ServiceMonitor, and would refuse a broken one."""
    release_ns = new_namespace("ftj-sys")
    values = {"metrics": {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "p"}}}}
    (monitor,) = [
        d
        for d in chart_docs(release_ns, tmp_path, CHART / "values.yaml", values)
        if d["kind"] == "ServiceMonitor"
    ]
    done = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(monitor))
    assert done.returncode == 0, done.stderr

    monitor["spec"]["endpoints"][0]["interval"] = "every 15 seconds"  # not a Prometheus duration
    refused = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(monitor))
    assert refused.returncode != 0 and "spec.endpoints[0].interval" in refused.stderr, refused.stderr


def test_deployment_meets_restricted_pod_security(
    cluster: Cluster, install: Callable[..., Release], new_namespace: Callable[..., str]
) -> None:
    restricted = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}
    namespace = new_namespace("ftj-sys", labels=restricted)
    release = install(namespace)
    assert "PodSecurity" not in release.install_output and "would violate" not in release.install_output
    template = release.deployment()["spec"]["template"]
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "operator-pod", "namespace": namespace},
        "spec": template["spec"],
    }
    done = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod))
    assert done.returncode == 0, done.stderr

    # The namespace really enforces: the same pod with one setting loosened is refused.
    pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    refused = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(pod))
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused.stderr


@pytest.mark.parametrize("mode", ["default-values", "namespaced"])
def test_install_then_the_operator_reconciles_under_the_charts_service_account(
    mode: str,
    cluster: Cluster,
    namespace: str,
    install: Callable[..., Release],
    local_operators: Callable[[Release, str], LocalOperator],
    new_namespace: Callable[..., str],
) -> None:
    release_ns = new_namespace("ftj-sys")
    release = install(release_ns, {"watchNamespaces": [namespace]} if mode == "namespaced" else {})
    deployment = release.deployment()
    assert deployment["spec"]["replicas"] == 2
    assert kube_json(cluster, "get", "serviceaccount", release.fullname, "-n", release_ns)
    assert kube_json(cluster, "get", "clusterrole", release.fullname)
    assert kube_json(cluster, "get", "poddisruptionbudget", release.fullname, "-n", release_ns)
    if mode == "namespaced":
        assert kube_json(cluster, "get", "kopfpeering", release.fullname, "-n", namespace)
        assert kube_json(cluster, "get", "rolebinding", release.fullname, "-n", namespace)
    else:
        assert kube_json(cluster, "get", "clusterkopfpeering", release.fullname)

    operator = local_operators(release, f"{release.fullname}-0").start()
    create_job(cluster, namespace, "helm-smoke")
    status = reconciled(cluster, namespace, "helm-smoke")
    assert status["phase"] in ("Pending", "Initializing"), status
    assert status.get("attempt") == 1

    wait_for(
        "the job in the operator's metrics",
        lambda: (
            f'finetune_jobs{{namespace="{namespace}",phase="{status["phase"]}"}} 1.0' in operator.metrics()
        ),
    )
    assert "finetune_reconcile_duration_seconds_count" in operator.metrics()

    cluster.kubectl("delete", "finetunejob", "helm-smoke", "-n", namespace, "--wait=false", check=True)
    wait_for("the FineTuneJob gone (finalizer released)", lambda: not kube_json(
        cluster, "get", "finetunejob", "helm-smoke", "-n", namespace
    ))  # fmt: skip
    operator.stop()
    assert not operator.denied(), "RBAC refused the operator:\n" + "\n".join(operator.denied())
    assert not operator.errors(), operator.errors()


def test_two_replicas_one_works_the_other_takes_over(
    cluster: Cluster,
    namespace: str,
    install: Callable[..., Release],
    local_operators: Callable[[Release, str], LocalOperator],
    new_namespace: Callable[..., str],
) -> None:
    release = install(new_namespace("ftj-sys"), {"watchNamespaces": [namespace]})
    first = local_operators(release, f"{release.fullname}-a").start()
    create_job(cluster, namespace, "first")
    reconciled(cluster, namespace, "first")
    second = local_operators(release, f"{release.fullname}-b").start()

    def both_in_peering() -> dict[str, Any] | None:
        peering = kube_json(cluster, "get", "kopfpeering", release.fullname, "-n", namespace) or {}
        peers: dict[str, Any] = peering.get("status") or {}
        return peers if {first.pod_id, second.pod_id} <= peers.keys() else None

    peers = wait_for("both replicas in the peering object", both_in_peering)
    assert peers[first.pod_id]["priority"] > peers[second.pod_id]["priority"], "the older replica leads"

    create_job(cluster, namespace, "while-standing-by")
    reconciled(cluster, namespace, "while-standing-by")
    assert f"{namespace}/while-standing-by" in first.logs()
    assert f"{namespace}/while-standing-by" not in second.logs(), "the standby replica reconciled"

    started = time.monotonic()
    first.stop()
    wait_for("the standby resuming", lambda: "Resuming operations after the pause" in second.logs())
    create_job(cluster, namespace, "after-takeover")
    reconciled(cluster, namespace, "after-takeover")
    assert time.monotonic() - started < 30, "a clean handover should take seconds, not the peering lifetime"
    assert f"{namespace}/after-takeover" in second.logs()
    for operator in (first, second):
        assert not operator.denied(), operator.denied()
        assert not operator.errors(), operator.errors()


# ------------------------------------------------------------------------ defaults for jobs


PLATFORM_DEFAULTS = {
    "checkpointUri": "s3://platform-checkpoints/",
    "methods": {"sft": {"learningRate": 1.0e-4, "epochs": 2}, "dpo": {"beta": 0.25}},
}


def create_job_without_checkpoint_uri(cluster: Cluster, namespace: str, name: str) -> None:
    manifest = make_job(name, namespace).manifest()
    del manifest["spec"]["checkpoints"]
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest), check=True)


def run_config_of(cluster: Cluster, namespace: str, name: str, attempt: int) -> RunConfig:
    config_map = wait_for(
        f"{name} attempt {attempt} run config",
        functools.partial(
            kube_json, cluster, "get", "configmap", f"{name}-a{attempt}-config", "-n", namespace
        ),
    )
    return RunConfig.model_validate_json(config_map["data"][RUN_CONFIG_FILE])


def test_a_job_without_checkpoint_uri_trains_under_the_platform_default_which_stays_put(
    cluster: Cluster,
    kube_api: Any,
    namespace: str,
    install: Callable[..., Release],
    local_operators: Callable[[Release, str], LocalOperator],
    new_namespace: Callable[..., str],
) -> None:
    """defaults.* in the chart -> FTJ_* on the Deployment -> the operator -> the job's run config.

    Then the platform moves its default (helm upgrade, a new operator replica): the started job keeps
    its location across a restart, a new job gets the new one.
    """
    values: dict[str, Any] = {
        "watchNamespaces": [namespace],
        "replicaCount": 1,
        "defaults": PLATFORM_DEFAULTS,
    }
    release = install(new_namespace("ftj-sys"), values)
    operator = local_operators(release, f"{release.fullname}-0").start()
    create_job_without_checkpoint_uri(cluster, namespace, "old")

    status = reconciled(cluster, namespace, "old")
    assert status["checkpointsUri"] == "s3://platform-checkpoints/"
    config = run_config_of(cluster, namespace, "old", 1)
    assert config.checkpoints.uri == f"s3://platform-checkpoints/{namespace}/old/"
    assert (config.hyperparameters.learning_rate, config.hyperparameters.epochs) == (1e-4, 2.0)
    assert config.hyperparameters.lr_scheduler == "cosine", "unset by job and platform: built-in"
    kubelet = Kubelet(kube_api, namespace)
    (pod,) = kubelet.wait_pods("old-a1", 1)
    kubelet.run(pod)

    operator.stop()
    release.upgrade({**values, "defaults": {**PLATFORM_DEFAULTS, "checkpointUri": "s3://new-bucket/"}})
    upgraded = local_operators(release, f"{release.fullname}-1").start()
    assert upgraded.env["FTJ_DEFAULT_CHECKPOINT_URI"] == "s3://new-bucket/"
    kubelet.fail(pod, 1, "NCCL timeout")  # a counted restart: attempt 2 resumes where attempt 1 wrote

    assert (
        run_config_of(cluster, namespace, "old", 2).checkpoints.uri
        == f"s3://platform-checkpoints/{namespace}/old/"
    )
    (pod,) = kubelet.wait_pods("old-a2", 1)
    kubelet.run(pod)
    kubelet.succeed(pod)
    wait_for("old Succeeded", lambda: (kube_json(cluster, "get", "finetunejob", "old", "-n", namespace) or {})
             .get("status", {}).get("phase") == "Succeeded")  # fmt: skip
    final = kube_json(cluster, "get", "finetunejob", "old", "-n", namespace)["status"]
    assert final["checkpointsUri"] == "s3://platform-checkpoints/"

    create_job_without_checkpoint_uri(cluster, namespace, "new")
    assert reconciled(cluster, namespace, "new")["checkpointsUri"] == "s3://new-bucket/"
    assert run_config_of(cluster, namespace, "new", 1).checkpoints.uri == f"s3://new-bucket/{namespace}/new/"
    upgraded.stop()
    for replica in (operator, upgraded):
        assert not replica.denied() and not replica.errors(), replica.errors()


def test_without_a_platform_default_a_job_without_checkpoint_uri_fails_saying_what_to_set(
    cluster: Cluster,
    namespace: str,
    install: Callable[..., Release],
    local_operators: Callable[[Release, str], LocalOperator],
    new_namespace: Callable[..., str],
) -> None:
    release = install(new_namespace("ftj-sys"), {"watchNamespaces": [namespace], "replicaCount": 1})
    operator = local_operators(release, f"{release.fullname}-0").start()
    create_job_without_checkpoint_uri(cluster, namespace, "nowhere")

    def failed() -> dict[str, Any] | None:
        found: dict[str, Any] = (
            kube_json(cluster, "get", "finetunejob", "nowhere", "-n", namespace) or {}
        ).get("status") or {}
        return found if found.get("phase") == "Failed" else None

    status = wait_for("nowhere Failed", failed)
    assert status["reason"] == "InvalidSpec"
    assert "spec.checkpoints.uri" in status["message"] and "defaults.checkpointUri" in status["message"]
    assert not kube_json(cluster, "get", "job", "nowhere-a1", "-n", namespace), "no attempt may start"
    events = kube_json(
        cluster, "get", "events", "-n", namespace, "--field-selector=involvedObject.name=nowhere"
    )
    assert any(e["reason"] == "InvalidSpec" and e["type"] == "Warning" for e in events["items"])
    operator.stop()
    assert not operator.denied() and not operator.errors(), operator.errors()
