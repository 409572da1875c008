"""The committed CRD on a real kube-apiserver: what it accepts, refuses, shows and explains.

Every manifest goes through kubectl, as a user's or a GitOps tool's would. The catalogue in
``invalid_manifests`` holds the refusals; each must name the field and say what is wrong, and the
object must not exist (or be unchanged) afterwards. The shipped examples are created for real and
read back: the API server's defaults must be the models' defaults.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_devenv.kubectl import Cluster
from finetune_operator import api, crdgen
from tests.fixtures.cluster import Kubectl
from tests.integration.invalid_manifests import CASES, EDITABLE_AFTER_START, Invalid, Manifest, base_manifest

pytestmark = pytest.mark.integration

EXAMPLES = sorted((crdgen.REPO_ROOT / "docs" / "examples").glob("*.yaml"))
STARTED = {"status": {"phase": "Running", "startTime": "2026-01-01T00:00:00Z", "attempt": 1}}


@pytest.fixture(scope="module", autouse=True)
def committed_crd(cluster: Cluster) -> None:
    """The committed CRD, applied again: a reused cluster (FTJ_TEST_KUBECONFIG) may hold an older one."""
    crd = str(crdgen.CRD_PATH)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", crd, check=True)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crd, check=True)


@pytest.fixture(scope="module")
def crd_namespace(cluster: Cluster) -> Iterator[str]:
    """One namespace for the whole catalogue (object names differ), cheaper than one per case."""
    name = f"crd-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name, check=True)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


def _apply(kubectl: Kubectl, namespace: str, manifest: Manifest, *flags: str) -> Any:
    """``kubectl apply`` with kubectl's default (and here explicit) strict field validation."""
    args = ("apply", "--validate=strict", *flags, "-n", namespace, "-f", "-")
    return kubectl(*args, input=yaml.safe_dump(manifest), check=False)


def _get(kubectl: Kubectl, namespace: str, name: str) -> dict[str, Any]:
    return dict(json.loads(kubectl("get", "ftj", name, "-n", namespace, "-o", "json").stdout))


def _start(kubectl: Kubectl, namespace: str, name: str, status: dict[str, Any] = STARTED) -> None:
    """Write a status the way the operator does when the first attempt starts."""
    kubectl(
        "patch",
        "ftj",
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


def _names(stderr: str, field: str, fragment: str) -> bool:
    """Some line of the error names exactly ``field`` (not a longer path) and carries ``fragment``."""
    exact = re.compile(re.escape(field) + r"(?![\w.\[])")
    return any(exact.search(line) and fragment in line for line in stderr.splitlines())


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_api_server_refuses_with_the_field_named(kubectl: Kubectl, crd_namespace: str, case: Invalid) -> None:
    name = f"bad-{case.name}"
    if case.after_start:
        assert _apply(kubectl, crd_namespace, base_manifest(name)).returncode == 0
        _start(kubectl, crd_namespace, name)
        before = _get(kubectl, crd_namespace, name)

    refused = _apply(kubectl, crd_namespace, case.manifest(name))

    assert refused.returncode != 0, f"accepted: {refused.stdout}"
    assert _names(refused.stderr, case.field, case.message), refused.stderr
    if case.after_start:
        after = _get(kubectl, crd_namespace, name)
        assert after["spec"] == before["spec"]
        assert after["metadata"]["generation"] == before["metadata"]["generation"]
    else:
        missing = kubectl("get", "ftj", name, "-n", crd_namespace, check=False)
        assert missing.returncode != 0 and "NotFound" in missing.stderr


@pytest.mark.parametrize("change", EDITABLE_AFTER_START, ids=str)
def test_run_policy_and_retention_stay_editable_after_start(kubectl: Kubectl, crd_namespace: str,
                                                            change: str) -> None:  # fmt: skip
    name = f"edit-{change}"
    assert _apply(kubectl, crd_namespace, base_manifest(name)).returncode == 0
    _start(kubectl, crd_namespace, name)
    wanted = base_manifest(name)
    EDITABLE_AFTER_START[change](wanted)

    done = _apply(kubectl, crd_namespace, wanted)

    assert done.returncode == 0, done.stderr
    stored = api.FineTuneJobSpec.model_validate(_get(kubectl, crd_namespace, name)["spec"])
    assert stored == api.FineTuneJobSpec.model_validate(wanted["spec"])


def test_attempt_alone_marks_a_job_started(kubectl: Kubectl, namespace: str) -> None:
    """An operator that has set status.attempt but not yet startTime already fixed the spec."""
    manifest = base_manifest("attempt-only")
    assert _apply(kubectl, namespace, manifest).returncode == 0
    _start(kubectl, namespace, "attempt-only", {"status": {"phase": "Initializing", "attempt": 1}})
    manifest["spec"]["resources"]["nodes"] = 2

    refused = _apply(kubectl, namespace, manifest)

    assert _names(refused.stderr, "spec.resources", "cannot change once the job has started"), refused.stderr


def test_training_spec_is_editable_until_the_job_starts(kubectl: Kubectl, namespace: str) -> None:
    manifest = base_manifest("pending")
    assert _apply(kubectl, namespace, manifest).returncode == 0
    _start(kubectl, namespace, "pending", {"status": {"phase": "Queued", "attempt": 0}})
    manifest["spec"]["model"]["uri"] = "s3://models/other/"
    manifest["spec"]["resources"]["nodes"] = 2

    assert _apply(kubectl, namespace, manifest).returncode == 0
    assert _get(kubectl, namespace, "pending")["spec"]["resources"]["nodes"] == 2


def test_checkpoint_uri_may_be_left_to_the_platform_but_not_set_after_start(
    kubectl: Kubectl, namespace: str
) -> None:
    """Unset ``checkpoints.uri``: the operator's default applies; the other checkpoint fields still do."""
    manifest = base_manifest("platform-ckpt")
    del manifest["spec"]["checkpoints"]
    manifest["spec"]["output"]["uri"] = "s3://ckpt"  # the CEL rule compares only a uri the job sets
    assert _apply(kubectl, namespace, manifest).returncode == 0
    stored = _get(kubectl, namespace, "platform-ckpt")["spec"]["checkpoints"]
    assert stored == {"everySteps": 200, "keep": 3}, "the models' defaults, no uri"

    _start(kubectl, namespace, "platform-ckpt")
    manifest["spec"]["checkpoints"] = {"uri": "s3://ckpt2/"}
    refused = _apply(kubectl, namespace, manifest)

    assert _names(refused.stderr, "spec.checkpoints.uri", "cannot change once the job has started"), (
        refused.stderr
    )


def test_status_is_validated_and_cannot_change_the_spec(kubectl: Kubectl, namespace: str) -> None:
    assert _apply(kubectl, namespace, base_manifest("st")).returncode == 0
    patch = ["patch", "ftj", "st", "-n", namespace, "--subresource=status", "--type=merge", "-p"]

    bad_phase = kubectl(*patch, json.dumps({"status": {"phase": "Exploded"}}), check=False)
    bad_percent = kubectl(*patch, json.dumps({"status": {"progress": {"percent": 101}}}), check=False)
    kubectl(*patch, json.dumps({"spec": {"method": "dpo"}, "status": {"phase": "Running"}}))

    assert _names(bad_phase.stderr, "status.phase", "Unsupported value"), bad_phase.stderr
    assert _names(bad_percent.stderr, "status.progress.percent", "less than or equal to 100"), (
        bad_percent.stderr
    )
    stored = _get(kubectl, namespace, "st")
    assert (stored["spec"]["method"], stored["status"]["phase"]) == ("sft", "Running")


# ----------------------------------------------------------------------------- unknown fields


def test_unknown_fields_what_each_client_sees(kubectl: Kubectl, namespace: str) -> None:
    """Strict (kubectl's default) and server-side apply (Flux, Argo CD with SSA) refuse a misspelt
    field; a client that opts out of validation gets a warning and the field is pruned."""
    manifest = base_manifest("typo")
    manifest["spec"]["output"]["mergee"] = True

    strict = _apply(kubectl, namespace, manifest)
    server_side = _apply(kubectl, namespace, manifest, "--server-side")
    lenient = kubectl("apply", "--validate=warn", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest))

    assert 'unknown field "spec.output.mergee"' in strict.stderr and strict.returncode != 0
    assert ".spec.output.mergee: field not declared in schema" in server_side.stderr
    assert server_side.returncode != 0
    assert 'Warning: unknown field "spec.output.mergee"' in lenient.stderr
    assert "mergee" not in _get(kubectl, namespace, "typo")["spec"]["output"]


# ---------------------------------------------------------------------------------- examples


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_accepted_and_reads_back_with_the_models_defaults(kubectl: Kubectl, namespace: str,
                                                                    path: Path) -> None:  # fmt: skip
    example = yaml.safe_load(path.read_text())
    file = ["-n", namespace, "-f", str(path), "--validate=strict"]

    dry = kubectl("apply", "--dry-run=server", *file)
    kubectl("create", *file)
    stored = _get(kubectl, namespace, example["metadata"]["name"])

    assert "(server dry run)" in dry.stdout
    assert _contains(stored["spec"], example["spec"])
    assert api.FineTuneJobSpec.model_validate(stored["spec"]) == api.FineTuneJobSpec.model_validate(
        example["spec"]
    )
    assert stored["spec"]["runPolicy"]["maxRestarts"] == example["spec"].get("runPolicy", {}).get(
        "maxRestarts", 3
    )


def _contains(stored: Any, written: Any) -> bool:
    """Everything written is stored unchanged (the server may add defaults, nothing else)."""
    if isinstance(written, dict):
        return isinstance(stored, dict) and all(
            k in stored and _contains(stored[k], v) for k, v in written.items()
        )
    return bool(stored == written)


# ------------------------------------------------------------------------ what kubectl shows


def test_get_shows_phase_progress_step_loss_restarts(kubectl: Kubectl, namespace: str) -> None:
    assert _apply(kubectl, namespace, base_manifest("shown")).returncode == 0
    assert _apply(kubectl, namespace, base_manifest("quiet")).returncode == 0
    status = {
        "phase": "Running",
        "startTime": "2026-01-01T00:00:00Z",
        "attempt": 3,
        "restarts": {"total": 2, "countedTowardsLimit": 1, "lastReason": "Preempted"},
        "progress": {"step": 1200, "totalSteps": 3000, "percent": 40},
        "metrics": {"trainLoss": 1.21},
    }
    _start(kubectl, namespace, "shown", {"status": status})

    table = kubectl("get", "ftj", "shown", "-n", namespace).stdout.splitlines()
    wide = kubectl("get", "finetune", "-n", namespace, "-o", "wide").stdout
    running = kubectl("get", "ftj", "-n", namespace, "--field-selector", "status.phase=Running", "-o", "name")

    assert table[0].split() == ["NAME", "PHASE", "PROGRESS%", "STEP", "LOSS", "RESTARTS", "AGE"]
    assert table[1].split()[:6] == ["shown", "Running", "40", "1200", "1.21", "2"]
    assert "METHOD" in wide and "s3://models/llama-3.1-8b-instruct/" in wide and "quiet" in wide
    assert running.stdout.split() == ["finetunejob.finetune.dev/shown"]


def test_explain_prints_the_models_descriptions(kubectl: Kubectl) -> None:
    explained = kubectl("explain", "finetunejob.spec.model.quantization").stdout
    spec = kubectl("explain", "ftj.spec").stdout

    description = api.ModelSpec.model_fields["quantization"].description
    assert description and " ".join(description.split()) in " ".join(explained.split())
    assert re.search(r"ENUM:\s+nf4\s+none", explained), explained
    assert re.search(r"model\s+<Object> -required-\s+The base model to fine-tune.", spec), spec
