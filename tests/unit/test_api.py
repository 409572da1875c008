"""The FineTuneJob models: parsing, defaults, formats, and the CEL rules' Python side."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from finetune_operator import api
from tests.integration.invalid_manifests import base_manifest

pytestmark = pytest.mark.unit

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "docs" / "examples").glob("*.yaml"))


def _spec(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = base_manifest("x")["spec"]
    spec.update(changes)
    return spec


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_parses(path: Path) -> None:
    job = api.FineTuneJob.model_validate(yaml.safe_load(path.read_text()))

    assert job.api_version == api.API_VERSION and job.kind == api.KIND
    assert job.metadata["name"] == job.metadata["name"].lower()
    assert job.spec.checkpoints.uri != job.spec.output.uri


def test_the_catalogue_base_parses() -> None:
    api.FineTuneJob.model_validate(base_manifest("base"))


def test_a_minimal_spec_gets_the_documented_defaults() -> None:
    spec = api.FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "s3://models/m/"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "checkpoints": {"uri": "s3://ckpt/"},
            "output": {"uri": "s3://out/x/"},
        }
    )

    assert spec.method == "sft" and spec.model.quantization == "nf4"
    assert (spec.adapter.r, spec.adapter.alpha, spec.adapter.target_modules) == (16, 32, ["all-linear"])
    assert (spec.resources.nodes, spec.resources.gpus_per_node, spec.resources.shm_size) == (1, 1, "16Gi")
    assert (spec.distributed.zero_stage, spec.distributed.offload) == (3, "none")
    assert (spec.run_policy.max_restarts, spec.run_policy.suspend) == (3, False)
    assert spec.hyperparameters == api.HyperparametersSpec()  # resolved later by defaults.py
    assert all(v is None for v in spec.hyperparameters.model_dump().values())


def test_wire_names_are_camel_case_and_python_names_work_too() -> None:
    by_wire = api.RunPolicySpec.model_validate({"maxRestarts": 5, "queueName": "q"})
    by_python = api.RunPolicySpec(max_restarts=5, queue_name="q")

    assert by_wire == by_python
    assert by_wire.model_dump(by_alias=True, exclude_defaults=True) == {"maxRestarts": 5, "queueName": "q"}


def test_unknown_spec_fields_are_refused_but_unknown_status_fields_ignored() -> None:
    with pytest.raises(pydantic.ValidationError, match="modle"):
        api.FineTuneJobSpec.model_validate(_spec(modle={"uri": "s3://m/x/"}))

    status = api.FineTuneJobStatus.model_validate({"phase": "Running", "addedByANewerOperator": 1})
    assert status.phase == "Running"


@pytest.mark.parametrize(("given", "stored"), [(8, "8"), ("500m", "500m"), ("64Gi", "64Gi")])
def test_quantities_accept_int_or_string(given: object, stored: str) -> None:
    resources = api.ResourcesSpec.model_validate({"cpu": given, "memory": given, "shmSize": given})

    assert (resources.cpu, resources.memory, resources.shm_size) == (stored, stored, stored)


@pytest.mark.parametrize("bad", [True, "eight", "64 Gi", "1" * 65])
def test_python_side_refuses_what_is_no_quantity(bad: object) -> None:
    with pytest.raises(pydantic.ValidationError, match="cpu"):
        api.ResourcesSpec.model_validate({"cpu": bad})


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("s3://models/llama-3.1-8b/", True),
        ("s3://models", True),
        ("hf://meta-llama/Llama-3.1-8B", True),
        ("pvc://models-pvc/llama/", True),
        ("s3://My_Bucket/x", False),
        ("s3://a/x", False),  # a bucket name has at least 3 characters
        ("hf://just-a-name", False),
        ("http://example.com/m", False),
        ("/models/llama", False),
        ("pvc://Claim/x", False),
    ],
)
def test_model_uri_format(uri: str, ok: bool) -> None:
    assert (re.fullmatch(api.MODEL_URI, uri) is not None) is ok


@pytest.mark.parametrize(
    ("pattern", "value", "ok"),
    [
        (api.DNS_SUBDOMAIN, "s3-creds", True),
        (api.DNS_SUBDOMAIN, "team.s3-creds", True),
        (api.DNS_SUBDOMAIN, "S3_Creds", False),
        (api.DNS_SUBDOMAIN, "-creds", False),
        (api.LABEL_KEY, "nvidia.com/gpu.product", True),
        (api.LABEL_KEY, "zone", True),
        (api.LABEL_KEY, "bad key", False),
        (api.LABEL_KEY, "Example.com/x", False),
        (api.LABEL_VALUE, "", True),
        (api.LABEL_VALUE, "NVIDIA-H100-80GB-HBM3", True),
        (api.LABEL_VALUE, "eu west", False),
        (api.EXTENDED_RESOURCE, "nvidia.com/gpu", True),
        (api.EXTENDED_RESOURCE, "nvidia.com/mig-1g.10gb", True),
        (api.EXTENDED_RESOURCE, "gpu", False),
        (api.EXTENDED_RESOURCE, "example/gpu", False),
        (api.QUANTITY, "500m", True),
        (api.QUANTITY, "64Gi", True),
        (api.QUANTITY, "eight", False),
    ],
)
def test_name_and_quantity_formats(pattern: str, value: str, ok: bool) -> None:
    assert (re.fullmatch(pattern, value) is not None) is ok


def test_patterns_are_re2_compatible() -> None:
    """The API server matches patterns with Go's RE2: no lookaround, no backreferences."""
    for name in ("S3_OR_PVC", "MODEL_URI", "DNS_LABEL", "DNS_SUBDOMAIN", "QUANTITY", "EXTENDED_RESOURCE",
                 "LABEL_KEY", "LABEL_VALUE"):  # fmt: skip
        pattern = getattr(api, name)
        assert not re.search(r"\(\?[=!<]|\\[1-9]", pattern), name
        re.compile(pattern)


def test_cel_builds_rules_with_optional_field_path_and_reason() -> None:
    extra = api.cel(("a", "m"), ("b", "n", ".x"), ("c", "o", ".y", "FieldValueForbidden"))

    assert extra == {
        api.CEL_KEY: [
            {"rule": "a", "message": "m"},
            {"rule": "b", "message": "n", "fieldPath": ".x"},
            {"rule": "c", "message": "o", "fieldPath": ".y", "reason": "FieldValueForbidden"},
        ]
    }


def test_immutability_rules_guard_every_optional_parent() -> None:
    """``has()`` on every level, or a job whose runPolicy is unset could not be updated at all."""
    rules = {r["fieldPath"]: r["rule"] for r in api.FineTuneJob.model_json_schema()[api.CEL_KEY]}

    assert (
        "has(self.spec.runPolicy) && has(self.spec.runPolicy.queueName)" in rules[".spec.runPolicy.queueName"]
    )
    assert "has(oldSelf.spec.hyperparameters)" in rules[".spec.hyperparameters"]
    assert all(rule.startswith("!(has(oldSelf.status) && ") for rule in rules.values())


def test_status_percent_is_bounded() -> None:
    assert api.ProgressStatus(percent=100).percent == 100
    with pytest.raises(pydantic.ValidationError):
        api.ProgressStatus(percent=101)
