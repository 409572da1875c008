"""The Helm chart (helm/) rendered with `helm template`: lint, CRD drift, RBAC, security, settings, schema.

The API server's view of the same manifests (dry run, Pod Security admission, a real install and a
reconcile under the chart's ServiceAccount) is in tests/integration/test_helm.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator import settings as settings_mod
from finetune_operator.__main__ import parse_args
from finetune_operator.api import HyperparametersSpec
from tests.support.helm import CHART, CI_VALUES, ROOT, find, helm, one, render, value_args

pytestmark = pytest.mark.unit

Rule = tuple[str, str, frozenset[str]]
"""(apiGroup, resource, verbs): one rendered RBAC rule per resource."""

# What the operator does, call by call (operator/finetune_operator/k8s.py, handlers.py) and what
# kopf does for it. A new API call in the operator needs a line here and a rule in the chart.
NAMESPACED_RULES: set[Rule] = {
    ("finetune.dev", "finetunejobs", frozenset({"get", "list", "watch", "patch", "delete"})),
    ("finetune.dev", "finetunejobs/status", frozenset({"update"})),
    ("finetune.dev", "finetunejobs/finalizers", frozenset({"update"})),
    ("batch", "jobs", frozenset({"list", "watch", "create", "delete"})),
    ("", "pods", frozenset({"list", "watch"})),
    ("", "services", frozenset({"create", "delete"})),
    ("", "configmaps", frozenset({"get", "list", "watch", "create", "patch", "delete"})),
    ("", "serviceaccounts", frozenset({"create"})),
    ("rbac.authorization.k8s.io", "roles", frozenset({"create"})),
    ("rbac.authorization.k8s.io", "rolebindings", frozenset({"create"})),
    ("", "events", frozenset({"create"})),
}
OPERATOR_ROLE = "ftj-finetune-operator"
KOPF_CRDS: Rule = ("apiextensions.k8s.io", "customresourcedefinitions", frozenset({"list", "watch"}))
KOPF_NAMESPACES: Rule = ("", "namespaces", frozenset({"list", "watch"}))
CLUSTER_PEERING: Rule = ("kopf.dev", "clusterkopfpeerings", frozenset({"list", "watch", "patch"}))
NAMESPACED_PEERING: Rule = ("kopf.dev", "kopfpeerings", frozenset({"list", "watch", "patch"}))


def rules(role: dict[str, Any]) -> set[Rule]:
    out: set[Rule] = set()
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.add((group, resource, frozenset(rule["verbs"])))
    assert len(out) == sum(len(r["apiGroups"]) * len(r["resources"]) for r in role["rules"]), "duplicates"
    return out


def ci(name: str) -> Path:
    return CHART / "ci" / f"{name}-values.yaml"


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


# ------------------------------------------------------------------------------------- lint, CRDs


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_helm_lint_strict(values: Path) -> None:
    done = helm("lint", "--strict", str(CHART), f"--values={values}")
    assert "0 chart(s) failed" in done.stdout


def test_ci_values_files_exist() -> None:
    assert {p.name for p in CI_VALUES} >= {
        "default-values.yaml",
        "namespaced-values.yaml",
        "single-values.yaml",
        "full-values.yaml",
    }


def test_chart_crds_are_the_generated_crds() -> None:
    """helm/crds/ carries crds/ byte for byte (crds/ is generated from api.py: `make crds`)."""
    for generated in sorted((ROOT / "crds").glob("*.yaml")):
        copy = CHART / "crds" / generated.name
        assert copy.is_file(), f"{copy} is missing: cp {generated} {copy}"
        assert copy.read_bytes() == generated.read_bytes(), f"{copy} drifted from {generated}: copy it again"


def test_chart_crds_include_kopf_peering() -> None:
    docs = [
        d for f in sorted((CHART / "crds").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d
    ]
    names = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert {
        "finetunejobs.finetune.dev",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    } <= names.keys()
    assert names["clusterkopfpeerings.kopf.dev"]["spec"]["scope"] == "Cluster"
    assert names["kopfpeerings.kopf.dev"]["spec"]["scope"] == "Namespaced"


# ------------------------------------------------------------------------------------------- RBAC


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(tmp_path: Path) -> None:
    docs = render(tmp_path)
    assert rules(one(docs, "ClusterRole", "ftj-finetune-operator")) == NAMESPACED_RULES
    assert rules(one(docs, "ClusterRole", "ftj-finetune-operator-cluster")) == {KOPF_CRDS, CLUSTER_PEERING}
    bindings = find(docs, "ClusterRoleBinding")
    assert {b["roleRef"]["name"] for b in bindings} == {
        "ftj-finetune-operator",
        "ftj-finetune-operator-cluster",
    }
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "ftj-finetune-operator", "namespace": "ftj-system"}
        ]
    assert not find(docs, "RoleBinding") and not find(docs, "Role")


def test_namespaced_rbac_binds_only_the_watched_namespaces(tmp_path: Path) -> None:
    docs = render(tmp_path, files=[ci("namespaced")])
    assert rules(one(docs, "ClusterRole", "ftj-finetune-operator")) == NAMESPACED_RULES | {NAMESPACED_PEERING}
    assert rules(one(docs, "ClusterRole", "ftj-finetune-operator-cluster")) == {KOPF_CRDS, KOPF_NAMESPACES}
    assert [b["roleRef"]["name"] for b in find(docs, "ClusterRoleBinding")] == [
        "ftj-finetune-operator-cluster"
    ]
    bindings = find(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "ftj-finetune-operator",
        }


def test_no_peering_rules_without_peering(tmp_path: Path) -> None:
    docs = render(tmp_path, files=[ci("single")])
    assert rules(one(docs, "ClusterRole", "ftj-finetune-operator")) == NAMESPACED_RULES
    assert rules(one(docs, "ClusterRole", "ftj-finetune-operator-cluster")) == {KOPF_CRDS}
    assert not find(docs, "ClusterKopfPeering") and not find(docs, "KopfPeering")


def test_namespace_users_get_finetunejob_rights_by_aggregation(tmp_path: Path) -> None:
    docs = render(tmp_path)
    edit = one(docs, "ClusterRole", f"{OPERATOR_ROLE}-edit")
    view = one(docs, "ClusterRole", f"{OPERATOR_ROLE}-view")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert ("finetune.dev", "finetunejobs/status", frozenset({"get", "list", "watch"})) in rules(view)
    assert not any(resource.endswith("/status") for _, resource, _ in rules(edit)), "users never write status"
    off = render(tmp_path, values={"rbac": {"aggregateToDefaultRoles": False}})
    assert not find(off, "ClusterRole", f"{OPERATOR_ROLE}-edit")


def test_rbac_can_be_left_to_the_platform(tmp_path: Path) -> None:
    docs = render(
        tmp_path, values={"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "x"}}
    )
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "RoleBinding")]
    assert not find(docs, "ServiceAccount")
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "x"


# ------------------------------------------------------------------------------- the Deployment


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_deployment_is_restricted_and_probed(values: Path, tmp_path: Path) -> None:
    docs = render(tmp_path, files=[values])
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    main = container(docs)
    assert main["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert main["resources"]["requests"]["cpu"] and main["resources"]["limits"]["memory"]
    assert not any(v.get("hostPath") for v in pod.get("volumes", []))


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_deployment_args_are_understood_by_the_operator(values: Path, tmp_path: Path) -> None:
    """The chart passes only flags `python -m finetune_operator` accepts, with the values it needs."""
    docs = render(tmp_path, files=[values])
    settings = yaml.safe_load(values.read_text()) or {}
    args = parse_args(container(docs)["args"])
    assert args.all_namespaces == (not settings.get("watchNamespaces"))
    assert (args.namespace or []) == settings.get("watchNamespaces", [])
    peering = settings.get("peering", {}).get("enabled", True)
    assert args.standalone is (not peering)
    if peering:
        name = settings.get("peering", {}).get("name") or "ftj-finetune-operator"
        assert args.peering == name
        kind = "KopfPeering" if settings.get("watchNamespaces") else "ClusterKopfPeering"
        objects = find(docs, kind, name)
        assert len(objects) == max(1, len(settings.get("watchNamespaces", [])))
    assert args.liveness.endswith(":8080/healthz")


def test_ha_defaults_two_replicas_with_a_disruption_budget(tmp_path: Path) -> None:
    docs = render(tmp_path)
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    anti = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] == (
        "kubernetes.io/hostname"
    )
    assert not find(render(tmp_path, files=[ci("single")]), "PodDisruptionBudget"), "a PDB would block drains"


def test_image_tag_defaults_to_app_version_and_digest_wins(tmp_path: Path) -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert container(render(tmp_path))["image"] == f"ghcr.io/finetune-operator/operator:{app_version}"
    full = container(render(tmp_path, files=[ci("full")]))
    assert full["image"].startswith("registry.example.com/ml/finetune-operator@sha256:")


# ------------------------------------------------------------------------------------- settings


def chart_value_paths(values: Any, prefix: str = "") -> set[str]:
    """Dotted paths of the leaves of ``values`` (a map of method defaults counts as one leaf)."""
    if not isinstance(values, dict) or (prefix.startswith("defaults.methods.") and prefix.count(".") == 3):
        return {prefix}
    return {p for key, value in values.items() for p in chart_value_paths(value, f"{prefix}{key}.")}


def test_every_operator_setting_is_a_chart_value_and_back(tmp_path: Path) -> None:
    """values.settings + values.defaults <-> Settings: no setting missing, none invented."""
    fields = {f.name for f in dataclasses.fields(settings_mod.Settings)}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    in_chart = {p.rstrip(".") for p in chart_value_paths({k: values[k] for k in ("settings", "defaults")})}
    in_operator = {settings_mod.chart_value(f) for f in fields}
    assert in_chart == in_operator, (
        f"chart only: {in_chart - in_operator}; operator only: {in_operator - in_chart}"
    )

    env = {
        e["name"]: e["value"] for e in container(render(tmp_path, files=[ci("full")]))["env"] if "value" in e
    }
    rendered = {name: value for name, value in env.items() if name.startswith("FTJ_")}
    assert {f"FTJ_{field.upper()}" for field in fields} == rendered.keys()
    parsed = settings_mod.from_env(rendered)  # the operator accepts every value the chart renders
    assert parsed.trainer_image == "registry.example.com/ml/finetune-trainer:0.1.0"
    assert parsed.default_s3_endpoint == "https://minio.storage.svc:9000"
    assert parsed.progress_min_interval_seconds == 5.0
    assert parsed.trainer_command == ("python", "-m", "finetune_trainer", "run")
    assert parsed.default_checkpoint_uri == "s3://platform-checkpoints/finetune/"
    assert parsed.method_defaults("sft") == HyperparametersSpec(
        learning_rate=1e-4, epochs=2, lr_scheduler="linear"
    )
    assert parsed.method_defaults("dpo") == HyperparametersSpec(beta=0.2, max_steps=500)


def test_operations_docs_list_every_setting_with_its_chart_value() -> None:
    """docs/operations.md's settings table: one row per Settings field, chart value -> variable."""
    page = (ROOT / "docs" / "operations.md").read_text()
    rows = re.findall(r"^\| `([a-zA-Z0-9.]+)` \| `(FTJ_[A-Z0-9_]+)` \|", page, re.MULTILINE)
    fields = [f.name for f in dataclasses.fields(settings_mod.Settings)]
    assert sorted(rows) == sorted((settings_mod.chart_value(f), settings_mod.env_var(f)) for f in fields)


def test_empty_settings_leave_the_operators_defaults(tmp_path: Path) -> None:
    env = container(render(tmp_path))["env"]
    names = {e["name"] for e in env}
    assert "FTJ_DEFAULT_S3_ENDPOINT" not in names and "FTJ_TRAINER_COMMAND" not in names
    assert not names & {"FTJ_DEFAULT_CHECKPOINT_URI", "FTJ_DEFAULTS_SFT", "FTJ_DEFAULTS_DPO"}
    assert {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in env


# ------------------------------------------------------------------------ metrics, network policy


def test_service_monitor_scrapes_the_metrics_service(tmp_path: Path) -> None:
    docs = render(tmp_path, files=[ci("full")])
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    labels = service["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    assert (
        ports["metrics"]
        == service["spec"]["ports"][0]["port"]
        == parse_args(container(docs)["args"]).metrics_port
    )
    assert not find(render(tmp_path), "ServiceMonitor"), "off by default (needs the Prometheus Operator)"


def test_network_policy_allows_metrics_dns_and_the_api_server_only(tmp_path: Path) -> None:
    policy = one(render(tmp_path, files=[ci("full")]), "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"][0]["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    egress_ports = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {(53, "UDP"), (53, "TCP"), (443, "TCP"), (6443, "TCP")}
    assert [b["ipBlock"]["cidr"] for b in policy["egress"][1]["to"]] == ["10.96.0.1/32", "172.18.0.0/16"]
    closed = one(render(tmp_path, values={"networkPolicy": {"enabled": True}}), "NetworkPolicy")["spec"]
    assert closed["ingress"] == []


# -------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicaCount": 0}, "replicaCount"),
        ({"replicaCount": 2, "peering": {"enabled": False}}, "peering"),
        ({"image": {"tag": "latest"}}, "tag"),
        ({"image": {"digest": "sha256:short"}}, "digest"),
        ({"settings": {"imagePullPolicy": "Sometimes"}}, "imagePullPolicy"),
        ({"settings": {"trainerImage": ""}}, "trainerImage"),
        ({"settings": {"runAsUser": 0}}, "runAsUser"),
        ({"settings": {"resyncSeconds": 0}}, "resyncSeconds"),
        ({"settings": {"defaultS3Endpoint": "minio:9000"}}, "defaultS3Endpoint"),
        ({"settings": {"unknownSetting": 1}}, "unknownSetting"),
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces"),
        ({"metrics": {"port": 70000}}, "port"),
        ({"logLevel": "TRACE"}, "logLevel"),
        ({"runAsUser": 0}, "runAsUser"),
        ({"networkPolicy": {"apiServer": {"cidrs": ["kubernetes.default"]}}}, "cidrs"),
        ({"resources": {"limits": {"memory": "lots"}}}, "memory"),
        ({"replicas": 3}, "replicas"),
        ({"defaults": {"checkpointUri": "gs://bucket/"}}, "checkpointUri"),
        ({"defaults": {"checkpointUri": "pvc://claim/ckpt/"}}, "checkpointUri"),
        ({"defaults": {"methods": {"sft": "learningRate=1e-4"}}}, "/defaults/methods/sft"),
        ({"defaults": {"methods": {"sft": {"learningRate": "high"}}}}, "learningRate"),
        ({"defaults": {"methods": {"sft": {"learningRate": 2}}}}, "learningRate"),
        ({"defaults": {"methods": {"sft": {"learning_rate": 1e-4}}}}, "learning_rate"),
        ({"defaults": {"methods": {"sft": {"beta": 0.1}}}}, "/defaults/methods/sft"),
        ({"defaults": {"methods": {"dpo": {"epochs": 1, "maxSteps": 5}}}}, "/defaults/methods/dpo"),
        ({"defaults": {"methods": {"orpo": {}}}}, "orpo"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], complaint: str, tmp_path: Path) -> None:
    done = helm("template", "ftj", str(CHART), *value_args(values, [], tmp_path), check=False)
    assert done.returncode != 0, f"accepted {values}"
    assert "values don't meet the specifications of the schema" in done.stderr, done.stderr
    assert complaint in done.stderr, done.stderr


def test_method_defaults_schema_is_the_apis_hyperparameters_schema() -> None:
    """values.schema.json's definitions.hyperparameters = the CRD's spec.hyperparameters (draft-07 bounds)."""
    crd = yaml.safe_load((ROOT / "crds" / "finetunejobs.finetune.dev.yaml").read_text())
    api_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    expected = {}
    for name, node in api_schema["hyperparameters"]["properties"].items():
        node = dict(node)
        for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if node.pop(bound, False):
                node[bound] = node.pop(limit)
        expected[name] = node
    chart = json.loads((CHART / "values.schema.json").read_text())["definitions"]["hyperparameters"]
    assert chart["properties"] == expected, "copy the CRD's hyperparameters into values.schema.json:\n" + (
        json.dumps(expected, indent=2)
    )
    assert chart["additionalProperties"] is False


def test_peering_priority_prefers_the_oldest_replica() -> None:
    """kopf freezes every replica when two share the top priority: each gets its own, oldest highest."""
    from finetune_operator.__main__ import peering_priority

    older, newer = (
        peering_priority(None, 1_800_000_000_000_000_000),
        peering_priority(None, 1_800_000_000_000_001_000),
    )
    assert older > newer > 0
    assert peering_priority(None, 4_000_000_000 * 10**9) > 0, "still positive in the year 2096"
    assert peering_priority(7) == 7
