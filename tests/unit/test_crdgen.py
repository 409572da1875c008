"""The generated CRD: committed and current, structural, bounded for CEL, documented."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator import api, crdgen
from tests.integration.invalid_manifests import CASES

pytestmark = pytest.mark.unit

ALLOWED_KEYS = {
    "type", "description", "properties", "items", "additionalProperties", "required", "enum", "format",
    "default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
    "pattern", "minItems", "maxItems", "minProperties", "maxProperties", "anyOf",
    "x-kubernetes-int-or-string", "x-kubernetes-list-type", "x-kubernetes-list-map-keys", api.CEL_KEY,
}  # fmt: skip


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return crdgen.openapi_schema()


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def _at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema
    for part in dotted.strip(".").split("."):
        node = node["properties"][part]
    return node


# ------------------------------------------------------------------------ committed = generated


def test_committed_files_match_the_models() -> None:
    assert crdgen.main(["--check"]) == 0, "run `make crds` (python -m finetune_operator.crdgen --write)"


def test_check_reports_drift_as_a_diff(tmp_path: Path) -> None:
    crd, docs = tmp_path / "crd.yaml", tmp_path / "api.md"
    crd.write_text(crdgen.render_crd().replace("maxRestarts", "maxRetries"))
    docs.write_text(crdgen.render_docs())

    diff = crdgen.check(crd, docs)

    assert any(line.startswith("-") and "maxRetries" in line for line in diff)
    assert any(line.startswith("+") and "maxRestarts" in line for line in diff)
    assert crdgen.check(crd.with_name("missing.yaml"), docs)  # a missing file is drift too


def test_main_check_fails_with_the_diff_on_stdout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    stale = tmp_path / "crd.yaml"
    stale.write_text("# stale\n")
    monkeypatch.setattr(crdgen, "CRD_PATH", stale)

    assert crdgen.main(["--check"]) == 1
    out, err = capsys.readouterr()
    assert "-# stale" in out and "make crds" in err


def test_output_is_deterministic() -> None:
    first = crdgen.render_crd()

    assert crdgen.render_crd() == first
    assert yaml.safe_load(first) == crdgen.crd()
    assert crdgen.render_docs() == crdgen.render_docs()


# ------------------------------------------------------------------------------- structural


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in _nodes(schema):
        assert set(node) <= ALLOWED_KEYS, (path, set(node) - ALLOWED_KEYS)
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}] and "type" not in node, path
        else:
            assert "type" in node and "anyOf" not in node, path
        assert "nullable" not in node and "$ref" not in node, path


def test_optional_fields_are_just_not_required(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]

    assert schema["required"] == ["spec"]
    assert spec["required"] == ["model", "dataset", "output"]  # checkpoints.uri: the platform's default
    assert "required" not in spec["properties"]["hyperparameters"]
    assert spec["properties"]["dataset"]["required"] == ["train"]


def test_root_metadata_is_left_to_the_api_server(schema: dict[str, Any]) -> None:
    assert schema["properties"]["metadata"] == {"type": "object"}


def test_draft_2020_exclusive_bounds_become_openapi_booleans(schema: dict[str, Any]) -> None:
    dropout = _at(schema, "spec.adapter.dropout")
    fraction = _at(schema, "spec.dataset.evalFraction")

    assert (dropout["minimum"], dropout["maximum"], dropout["exclusiveMaximum"]) == (0, 1, True)
    assert (fraction["minimum"], fraction["exclusiveMinimum"], fraction["maximum"]) == (0, True, 0.5)


def test_enums_keep_their_type(schema: dict[str, Any]) -> None:
    assert _at(schema, "spec.distributed.zeroStage") == {
        "type": "integer",
        "enum": [0, 1, 2, 3],
        "default": 3,
        "description": api.DistributedSpec.model_fields["zero_stage"].description,
    }
    assert _at(schema, "status.phase")["enum"][0] == "Pending"


def test_string_maps_are_additional_properties(schema: dict[str, Any]) -> None:
    selector = _at(schema, "spec.resources.nodeSelector")

    assert selector["type"] == "object" and selector["additionalProperties"]["type"] == "string"
    assert selector["maxProperties"] == 32 and "default" not in selector


def test_conversion_refuses_what_it_cannot_express() -> None:
    converter = crdgen._Converter({})
    with pytest.raises(crdgen.CrdGenError, match="union"):
        converter.convert({"anyOf": [{"type": "integer"}, {"type": "string"}]}, defaults=False, where=".x")
    with pytest.raises(crdgen.CrdGenError, match="'not'"):
        converter.convert({"type": "string", "not": {"const": "a"}}, defaults=False, where=".x")
    with pytest.raises(crdgen.CrdGenError, match="free-form"):
        converter.convert({"type": "object", "additionalProperties": True}, defaults=False, where=".x")


# --------------------------------------------------------------------------------- defaults


@pytest.mark.parametrize(
    ("path", "default"),
    [
        ("spec.method", "sft"),
        ("spec.model.quantization", "nf4"),
        ("spec.adapter.targetModules", ["all-linear"]),
        ("spec.runPolicy.maxRestarts", 3),
        ("spec.distributed.offload", "none"),
        ("spec.adapter", {}),
        ("spec.runPolicy", {}),
    ],
)
def test_fixed_defaults_are_in_the_schema(schema: dict[str, Any], path: str, default: object) -> None:
    assert _at(schema, path)["default"] == default


def test_no_default_where_defaults_py_decides_or_nothing_to_fill(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    for path, node in _nodes(spec["properties"]["hyperparameters"], ".spec.hyperparameters"):
        assert "default" not in node, path
    for name in ("hyperparameters", "storage", "credentials", "model", "dataset"):
        assert "default" not in spec["properties"][name], name
    for path in ("spec.resources.tolerations", "spec.resources.cpu", "spec.dataset.eval"):
        assert "default" not in _at(schema, path), path


def test_status_has_no_defaults(schema: dict[str, Any]) -> None:
    assert all("default" not in node for _, node in _nodes(schema["properties"]["status"]))


def test_schema_defaults_equal_pydantic_defaults(schema: dict[str, Any]) -> None:
    """What the API server fills in is what the operator would assume: one default, two readers."""

    def fill(node: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
        for name, child in node.get("properties", {}).items():
            if name not in value and "default" in child:
                value[name] = child["default"]
            if isinstance(value.get(name), dict) and child.get("type") == "object":
                fill(child, value[name])
        return value

    minimal = {
        "model": {"uri": "s3://models/m/"},
        "dataset": {"train": "s3://data/t.jsonl"},
        "checkpoints": {"uri": "s3://ckpt/"},
        "output": {"uri": "s3://out/x/"},
    }
    defaulted = fill(schema["properties"]["spec"], {k: dict(v) for k, v in minimal.items()})

    assert api.FineTuneJobSpec.model_validate(defaulted) == api.FineTuneJobSpec.model_validate(minimal)
    assert defaulted["runPolicy"] == {"maxRestarts": 3, "suspend": False}


# ------------------------------------------------------------------------- CEL cost bounds


def test_every_spec_string_list_and_map_is_bounded(schema: dict[str, Any]) -> None:
    """The API server estimates CEL cost from these bounds; unbounded ones make root rules too costly."""
    for path, node in _nodes(schema["properties"]["spec"], ".spec"):
        kind = node.get("type")
        if kind == "string" or node.get("x-kubernetes-int-or-string"):
            assert "maxLength" in node or "enum" in node, path
        elif kind == "array":
            assert "maxItems" in node, path
        elif kind == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, path


def test_immutable_paths_exist(schema: dict[str, Any]) -> None:
    for path in api.IMMUTABLE_AFTER_START:
        assert _at(schema, f"spec.{path}"), path
    rules = schema[api.CEL_KEY]
    assert [r["fieldPath"] for r in rules][: len(api.IMMUTABLE_AFTER_START)] == [
        f".spec.{p}" for p in api.IMMUTABLE_AFTER_START
    ]
    assert all("oldSelf" in r["rule"] for r in rules)


def _rules(schema: dict[str, Any]) -> list[dict[str, str]]:
    return [rule for _, node in _nodes(schema) for rule in node.get(api.CEL_KEY, [])]


def test_every_cel_rule_is_exercised_by_the_catalogue(schema: dict[str, Any]) -> None:
    """Each rule's message appears in some invalid manifest's expectation (run for real in integration)."""
    fragments = [case.message for case in CASES]
    for rule in _rules(schema):
        assert any(f in rule["message"] for f in fragments), rule["message"]


def test_catalogue_is_large_and_names_unique() -> None:
    names = [case.name for case in CASES]
    assert len(names) >= 40 and len(set(names)) == len(names)
    assert all(len(n) <= 50 and n == n.lower() for n in names)  # used in object names


# ------------------------------------------------------------------------- the CRD document


def test_crd_names_scope_and_subresources() -> None:
    doc = crdgen.crd()
    spec = doc["spec"]
    (version,) = spec["versions"]

    assert doc["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["ftj"] and spec["names"]["categories"] == ["finetune"]
    assert spec["names"]["plural"] == "finetunejobs" and spec["names"]["kind"] == "FineTuneJob"
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert "x-kubernetes-preserve-unknown-fields" not in status and "phase" in status["properties"]


def test_conditions_merge_by_type(schema: dict[str, Any]) -> None:
    conditions = _at(schema, "status.conditions")

    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


_JSON_TYPE: dict[str, set[str]] = {
    "string": {"string"},
    "integer": {"integer"},
    "number": {"number", "integer"},
    "date": {"string"},
}


@pytest.mark.parametrize("column", crdgen.PRINTER_COLUMNS, ids=lambda c: c["name"])
def test_printer_columns_point_at_fields_of_their_type(
    schema: dict[str, Any], column: dict[str, Any]
) -> None:
    if column["jsonPath"] == ".metadata.creationTimestamp":
        return
    node = _at(schema, column["jsonPath"])
    assert node["type"] in _JSON_TYPE[column["type"]], column


def test_printer_columns_show_what_the_issue_asks_for() -> None:
    always = {c["jsonPath"] for c in crdgen.PRINTER_COLUMNS if not c.get("priority")}

    assert always == {
        ".status.phase",
        ".status.progress.percent",
        ".status.progress.step",
        ".status.metrics.trainLoss",
        ".status.restarts.total",
        ".metadata.creationTimestamp",
    }


def test_selectable_fields_exist(schema: dict[str, Any]) -> None:
    for field in crdgen.SELECTABLE_FIELDS:
        assert _at(schema, field["jsonPath"])["type"] in ("string", "integer", "boolean")


# ------------------------------------------------------------------------------ descriptions


def test_every_field_has_a_description(schema: dict[str, Any]) -> None:
    """`kubectl explain` prints these; a field without one leaves the user guessing."""
    for path, node in _nodes(schema):
        if path.startswith((".apiVersion", ".kind", ".metadata")) or path.endswith(("[]", "{}")):
            continue
        assert node.get("description"), path


def test_docs_cover_every_field_and_rule(schema: dict[str, Any]) -> None:
    docs = crdgen.render_docs()

    for path, _ in _nodes(schema["properties"]["spec"], "spec"):
        if not path.endswith(("[]", "{}")) and path != "spec":
            assert f"`{path.rsplit('.', 1)[-1]}`" in docs, path
    for rule in _rules(schema):
        assert rule["message"] in docs, rule["message"]
    assert "## `spec.resources.tolerations[]`" in docs
