"""The chart in helm/ through the project's pinned helm binary (hack/helm.sh builds it once).

A missing helm is built, never skipped: a chart test that cannot run fails with the build's error.
"""

from __future__ import annotations

import functools
import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from finetune_devenv.kubectl import Cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
"""Values files every chart test renders (helm's chart-testing convention: ci/*-values.yaml)."""


@functools.cache
def helm_binary() -> str:
    done = subprocess.run(
        ["bash", str(ROOT / "hack" / "helm.sh")], capture_output=True, text=True, timeout=1200
    )
    if done.returncode != 0:
        raise RuntimeError(f"hack/helm.sh could not provide helm:\n{done.stderr[-4000:]}")
    return done.stdout.strip()


def helm(
    *args: str, check: bool = True, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run helm; with check=True a failure raises with its stderr."""
    done = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=300, env=env)
    if check and done.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def value_args(values: Mapping[str, Any] | None, files: Sequence[Path], tmp: Path) -> list[str]:
    """``--values`` arguments for files and an inline mapping (written to a file under ``tmp``)."""
    args = [f"--values={f}" for f in files]
    if values:
        inline = tmp / "inline-values.yaml"
        inline.write_text(yaml.safe_dump(dict(values)))
        args.append(f"--values={inline}")
    return args


def render(
    tmp: Path,
    values: Mapping[str, Any] | None = None,
    files: Sequence[Path] = (),
    namespace: str = "ftj-system",
    release: str = "ftj",
) -> list[dict[str, Any]]:
    """``helm template`` of the chart: the manifests (CRDs excluded) as dicts."""
    out = helm("template", release, str(CHART), f"--namespace={namespace}", *value_args(values, files, tmp))
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(docs: Sequence[Mapping[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [dict(d) for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: Sequence[Mapping[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def install_crds(cluster: Cluster, timeout: float = 60) -> None:
    """Apply the chart's CRDs (FineTuneJob, kopf peering) as `helm install` would; wait until served."""
    apply_crds(cluster, sorted((CHART / "crds").glob("*.yaml")), timeout)


def apply_crds(cluster: Cluster, files: Sequence[Path], timeout: float = 60) -> None:
    """Apply CRD files server-side (some are too big for the last-applied annotation) and wait until
    each is Established. Idempotent."""
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", *(f"--filename={f}" for f in files), check=True
    )
    names = [d["metadata"]["name"] for f in files for d in yaml.safe_load_all(f.read_text()) if d]
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            done = cluster.kubectl("get", "crd", name, "-o", "json")
            conditions = json.loads(done.stdout or "{}").get("status", {}).get("conditions", [])
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not established after {timeout}s")
            time.sleep(0.1)
