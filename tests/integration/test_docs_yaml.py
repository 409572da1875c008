"""Every YAML in the docs (docs/**/*.yaml, ```yaml blocks in docs/**/*.md and README.md) against the
real API server.

- Kubernetes manifests are applied for real in a fresh namespace (their own namespace replaced) and
  read back: what the docs wrote is what the API server stored.
- Blocks whose first line is ``# helm values`` are rendered with the chart and the result goes
  through the API server's dry run.
- Kueue, Argo CD and Prometheus Operator objects too: their projects' CRDs, at pinned versions, are
  installed first (tests/fixtures/external_crds.py). Cluster-scoped objects (Kueue's ResourceFlavor
  and ClusterQueue) keep their names and are deleted after the test.
- Anything else fails: a YAML block in the docs must be one of the above.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_devenv.kubectl import Cluster
from tests.fixtures.external_crds import KINDS, install_external_crds
from tests.support.helm import CHART, helm, install_crds, value_args

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
HELM_VALUES_MARK = "# helm values"

CLUSTER_SCOPED = {"ResourceFlavor", "ClusterQueue"}
"""Kinds of docs objects that live outside namespaces (a test asserts the API server agrees)."""


@dataclass(frozen=True)
class Source:
    """One YAML text in the docs: a file, or a fenced block of a Markdown page."""

    where: str
    text: str

    def documents(self) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all(self.text) if d is not None]


def _blocks(page: Path) -> list[Source]:
    out = []
    fence = re.compile(r"^```ya?ml[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
    for match in fence.finditer(page.read_text()):
        body = match.group(1)
        if re.fullmatch(r'--8<-- "[^"]+"\s*', body):
            continue  # a snippet: the file itself is a source of its own
        line = page.read_text()[: match.start()].count("\n") + 1
        out.append(Source(f"{page.relative_to(ROOT)}:{line}", body))
    return out


def sources() -> list[Source]:
    files = [Source(str(p.relative_to(ROOT)), p.read_text()) for p in sorted(DOCS.rglob("*.yaml"))]
    pages = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]
    return files + [block for page in pages for block in _blocks(page)]


SOURCES = sources()


def contains(stored: Any, written: Any) -> bool:
    """``written`` is part of ``stored`` (the API server may add defaults, never change a value)."""
    if isinstance(written, dict):
        return isinstance(stored, dict) and all(
            k in stored and contains(stored[k], v) for k, v in written.items()
        )
    if isinstance(written, list):
        return (
            isinstance(stored, list) and len(stored) == len(written) and all(map(contains, stored, written))
        )
    if isinstance(written, float) or isinstance(stored, float):
        return isinstance(stored, int | float) and float(stored) == float(written)
    return bool(stored == written)


def apply_for_real(cluster: Cluster, namespace: str, docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["kind"] in CLUSTER_SCOPED:
            doc["metadata"].pop("namespace", None)
        else:
            doc["metadata"]["namespace"] = namespace
    done = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))
    assert done.returncode == 0, done.stderr
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        where = () if kind in CLUSTER_SCOPED else ("-n", namespace)
        stored = json.loads(cluster.kubectl("get", kind, name, *where, "-o", "json", check=True).stdout)
        for field in ("spec", "data", "type"):  # a Secret's stringData is stored as data, encoded
            if field in doc:
                assert contains(stored.get(field), doc[field]), f"{kind} {name}: {field} stored differently"


def dry_run_chart(
    cluster: Cluster, namespace: str, values: dict[str, Any], tmp: Path, extra: list[str]
) -> None:
    if values.get("watchNamespaces"):
        values = {**values, "watchNamespaces": extra}
    done = helm("template", "docs", str(CHART), f"--namespace={namespace}", *value_args(values, [], tmp))
    docs = [d for d in yaml.safe_load_all(done.stdout) if d]
    applied = cluster.kubectl(
        "apply", "--dry-run=server", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs)
    )
    assert applied.returncode == 0, applied.stderr


def test_the_docs_have_the_promised_examples() -> None:
    names = {Path(s.where).name for s in SOURCES}
    for wanted in (
        "sft-qlora-8b-1gpu.yaml",
        "sft-qlora-70b-2x8.yaml",
        "dpo-lora.yaml",
        "kueue-queued.yaml",
        "kueue-setup.yaml",
        "argocd-application.yaml",
        "argocd-health-check.yaml",
        "s3-credentials.yaml",
    ):
        assert wanted in names, wanted
    assert any(s.text.startswith(HELM_VALUES_MARK) for s in SOURCES), "no helm values block found"


def test_argocd_config_map_carries_the_tested_health_check() -> None:
    (config_map,) = yaml.safe_load_all(
        (DOCS / "examples" / "platform" / "argocd-health-check.yaml").read_text()
    )
    lua = config_map["data"]["resource.customizations.health.finetune.dev_FineTuneJob"]
    assert lua == (DOCS / "argocd-health.lua").read_text(), (
        "copy docs/argocd-health.lua into the ConfigMap again"
    )


@pytest.fixture(scope="module")
def chart_crds(cluster: Cluster) -> None:
    install_crds(cluster)
    install_external_crds(cluster)


def test_the_cluster_scoped_kinds_are_the_api_servers(cluster: Cluster, chart_crds: None) -> None:
    listed = cluster.kubectl("api-resources", "--namespaced=false", "--no-headers", check=True).stdout
    cluster_scoped = {line.split()[-1] for line in listed.splitlines() if line.strip()}
    used = {d["kind"] for s in SOURCES if not s.text.startswith(HELM_VALUES_MARK) for d in s.documents()}
    assert used & cluster_scoped == CLUSTER_SCOPED


def external_objects() -> list[tuple[str, dict[str, Any]]]:
    return [
        (s.where, d)
        for s in SOURCES
        if not s.text.startswith(HELM_VALUES_MARK)
        for d in s.documents()
        if (d.get("apiVersion"), d.get("kind")) in KINDS
    ]


@pytest.mark.parametrize(
    ("where", "doc"), external_objects(), ids=lambda v: v if isinstance(v, str) else v["kind"]
)
def test_integration_objects_meet_their_real_schemas(
    where: str, doc: dict[str, Any], cluster: Cluster, chart_crds: None, namespace: str
) -> None:
    """Kueue's and Argo CD's schemas are really checked: the docs' object with a misspelt field is refused."""
    broken = copy.deepcopy(doc)
    if doc["kind"] in CLUSTER_SCOPED:
        broken["metadata"].pop("namespace", None)
    else:
        broken["metadata"]["namespace"] = namespace
    broken["spec"]["notAField"] = 1
    refused = cluster.kubectl(
        "create", "--dry-run=server", "--validate=strict", "-f", "-", input=json.dumps(broken)
    )
    assert refused.returncode != 0 and "notAField" in refused.stderr, f"{where}: {refused.stderr}"


@pytest.mark.parametrize("source", SOURCES, ids=[s.where for s in SOURCES])
def test_docs_yaml_is_accepted_by_the_api_server(
    source: Source, cluster: Cluster, chart_crds: None, namespace: str, tmp_path: Path
) -> None:
    if source.text.startswith(HELM_VALUES_MARK):
        (values,) = source.documents()
        extra = []
        for suffix in ("a", "b"):
            name = f"{namespace}-{suffix}"
            cluster.kubectl("create", "namespace", name, check=True)
            extra.append(name)
        try:
            dry_run_chart(cluster, namespace, values, tmp_path, extra)
        finally:
            for name in extra:
                cluster.kubectl("delete", "namespace", name, "--wait=false")
        return

    docs = source.documents()
    assert docs, f"{source.where}: empty"
    for doc in docs:
        assert isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc, (
            f"{source.where}: neither a Kubernetes manifest nor marked '{HELM_VALUES_MARK}'"
        )
        assert doc.get("metadata", {}).get("name"), f"{source.where}: {doc['kind']} has no name"
    try:
        apply_for_real(cluster, namespace, docs)
    finally:
        for doc in docs:
            if doc["kind"] in CLUSTER_SCOPED:
                cluster.kubectl(
                    "delete", doc["kind"], doc["metadata"]["name"], "--ignore-not-found", "--wait=false"
                )
