"""The CLI's parsers, errors and the commands that need neither a cluster nor S3."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator import constants as c
from finetune_operator.cli import build_parser, main, program_name
from finetune_operator.cli import docs as cli_docs
from finetune_operator.cli.cluster import api_error
from finetune_operator.cli.errors import CliError
from finetune_operator.cli.local import local_config
from finetune_operator.cli.logs import find_pod
from finetune_operator.cli.manifests import load_one, parse
from finetune_operator.render import run_config
from finetune_operator.settings import Settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"
LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_and_option_explains_itself() -> None:
    commands = subparsers(build_parser())
    assert set(commands) >= {
        "validate",
        "plan",
        "submit",
        "get",
        "list",
        "watch",
        "logs",
        "suspend",
        "resume",
        "cancel",
        "checkpoints",
        "plot",
        "run",
    }
    for name, sub in commands.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help and action.help.strip(), f"ftjob {name} {action.option_strings or action.dest}"


def test_cluster_commands_take_the_cluster_and_output_options() -> None:
    for name, sub in subparsers(build_parser()).items():
        options = {o for a in sub._actions for o in a.option_strings}
        if "--kubeconfig" in options:
            assert {"-n", "--namespace", "--context"} <= options, name
        if name not in ("logs",):
            assert "--output" in options, name


def test_usage_errors_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["plan", "--zero-stage", "7"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert (
        err.startswith("error: argument --zero-stage: invalid choice: 7") and "see 'ftjob plan --help'" in err
    )
    with pytest.raises(SystemExit):
        main(["run", str(EXAMPLES / "cpu-tiny-local.yaml")])
    assert "the following arguments are required: --local" in capsys.readouterr().err


def test_kubectl_plugin_name() -> None:
    assert program_name("/usr/local/bin/kubectl-ftjob") == "kubectl ftjob"
    assert program_name("/venv/bin/ftjob") == "ftjob"


def test_docs_page_is_generated_from_the_help() -> None:
    assert cli_docs.DOC.read_text() == cli_docs.generate(), (
        "docs/cli.md is stale: run python -m finetune_operator.cli.docs --write"
    )


# --------------------------------------------------------------------------------------- manifests


def manifest(**spec_changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / "cpu-tiny-local.yaml").read_text())
    doc["spec"].update(spec_changes)
    return doc


def test_every_example_finetunejob_parses() -> None:
    found = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "FineTuneJob":
                found.append(parse(doc, str(path)).name)
    assert len(found) >= 5, found


def test_invalid_manifest_names_the_fields() -> None:
    bad = manifest(dataset={"maxSeqLength": 4}, adapter={"r": 0})
    with pytest.raises(CliError) as refused:
        parse(bad, "job.yaml")
    message = str(refused.value)
    assert message.startswith("job.yaml: FineTuneJob tiny-demo is invalid: ")
    assert "spec.adapter.r: Input should be greater than or equal to 1" in message
    assert "spec.dataset.train: Field required" in message
    assert "spec.dataset.maxSeqLength: Input should be greater than or equal to 16" in message
    with pytest.raises(CliError, match="apiVersion is 'v1'"):
        parse({**manifest(), "apiVersion": "v1"}, "job.yaml")


def test_submit_refuses_a_file_without_a_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cm.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\n: [\n")
    assert main(["submit", str(path)]) == 1
    assert "is not valid YAML (line 5)" in capsys.readouterr().err
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert main(["submit", str(path)]) == 1
    assert "holds no FineTuneJob" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- plan


def test_plan_a_manifest_with_a_local_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_8B))
    args = ["plan", str(EXAMPLES / "sft-qlora-8b-1gpu.yaml"), "--model-config", str(config)]
    assert main([*args, "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == 8_030_261_248
    assert report["loraParameters"] == 32 * 16 * (
        4096 * 2 + (4096 + 1024) * 2 + 4096 * 2 + 3 * (4096 + 14336)
    )
    assert report["fits"] is True and report["setup"]["quantization"] == "nf4"
    assert report["totalBytes"] == sum(report["bytes"].values())
    assert (
        main([*args, "--gpu-memory", "14GiB"]) == 1
    )  # 16 GiB on one GPU; ZeRO-3 over two halves the weights
    captured = capsys.readouterr()
    assert "fits:    NO" in captured.out and "smallest layout that fits: 1 node(s) x 2 GPU(s)" in captured.out
    assert captured.err.startswith(
        "error: does not fit: 15.96 GiB per GPU needed, 14.00 GiB available — use 1 node(s) x 2 GPU(s)"
    )
    assert main([*args, "--gpu-memory", "8GiB"]) == 1  # the activations alone need 8.9 GiB: nothing helps
    assert "no layout up to 64 nodes x 8 GPUs fits" in capsys.readouterr().err


def test_plan_flags_override_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    argv = [
        "plan",
        str(EXAMPLES / "dpo-lora.yaml"),
        "--model-config",
        str(tmp_path),
        "--seq-length",
        "1024",
        "--micro-batch",
        "3",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--lora-r",
        "8",
        "-o",
        "json",
    ]
    assert main(argv) == 0
    setup = json.loads(capsys.readouterr().out)["setup"]
    assert (setup["method"], setup["seq_length"], setup["micro_batch"]) == ("dpo", 1024, 3)
    assert (setup["world_size"], setup["lora_r"]) == (8, 8)


def test_plan_without_a_model_says_what_to_give(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: no model to plan for — give a manifest, --model URI or --model-config config.json"
    )


# ------------------------------------------------------------------------------------- run --local


def test_local_run_config_is_the_operators_rendering(tmp_path: Path) -> None:
    parsed = load_one(str(EXAMPLES / "cpu-tiny-local.yaml"))
    local = local_config(parsed, namespace="dev", workdir=tmp_path, nproc=None, cpu=False, s3_endpoint=None)
    job = parsed.job.model_copy(update={"metadata": {**parsed.job.metadata, "namespace": "dev"}})
    cluster = run_config(job, 1, None, Settings())
    same = {"job", "method", "model", "adapter", "dataset", "hyperparameters", "checkpoints", "output", "s3"}
    assert {k: v for k, v in local.model_dump().items() if k in same} == {
        k: v for k, v in cluster.model_dump().items() if k in same
    }
    assert local.checkpoints.uri == "s3://ckpt/dev/tiny-demo/"
    assert (local.distributed.nodes, local.distributed.procs_per_node) == (1, 1)
    assert (local.progress.transport, local.progress.path) == ("file", str(tmp_path / "progress.json"))
    assert local.device == "cpu"  # gpusPerNode: 0
    moved = local_config(
        parsed, namespace="dev", workdir=tmp_path, nproc=2, cpu=True, s3_endpoint="http://s3:9000"
    )
    assert moved.s3.endpoint_url == "http://s3:9000" and moved.distributed.procs_per_node == 2


def test_local_run_without_a_checkpoint_location_names_the_fix(tmp_path: Path) -> None:
    parsed = load_one(str(EXAMPLES / "cpu-tiny-local.yaml"))
    del parsed.raw["spec"]["checkpoints"]["uri"]
    unset = parse(parsed.raw, parsed.source)
    with pytest.raises(CliError, match="--checkpoints-uri"):
        local_config(unset, namespace="dev", workdir=tmp_path, nproc=None, cpu=False, s3_endpoint=None)
    given = local_config(
        unset,
        namespace="dev",
        workdir=tmp_path,
        nproc=None,
        cpu=False,
        s3_endpoint=None,
        checkpoints_uri="s3://elsewhere/",
    )
    assert given.checkpoints.uri == "s3://elsewhere/dev/tiny-demo/"


# ----------------------------------------------------------------------------------- small helpers


class FakeApiException:
    def __init__(self, status: int, message: str | None) -> None:
        self.status = status
        self.reason = "Reason"
        self.body = json.dumps({"message": message}) if message is not None else None


def test_api_errors_say_what_to_do() -> None:
    missing = api_error(FakeApiException(404, 'finetunejobs.finetune.dev "x" not found'), ("ns", "x"))
    assert (
        str(missing) == "finetunejob 'x' not found in namespace 'ns' — list the jobs with: ftjob list -n ns"
    )
    no_crd = api_error(FakeApiException(404, "the server could not find the requested resource"), ("ns", "x"))
    assert "resource type is not installed" in str(no_crd)
    invalid = api_error(FakeApiException(422, 'FineTuneJob.finetune.dev "x" is invalid: spec.adapter.r: ...'))
    assert str(invalid).startswith(
        'the API server refused the FineTuneJob: FineTuneJob.finetune.dev "x" is invalid: spec.adapter.r'
    )
    assert "credentials" in str(api_error(FakeApiException(401, None)))


def test_find_pod_by_rank() -> None:
    def pod(name: str, rank: int, created: str) -> dict[str, Any]:
        labels = {c.COMPLETION_INDEX_LABEL: str(rank)}
        return {"metadata": {"name": name, "labels": labels, "creationTimestamp": created}}

    pods = [
        pod("a-0-old", 0, "2026-01-01T00:00:00Z"),
        pod("a-1", 1, "2026-01-01T00:00:01Z"),
        pod("a-0-new", 0, "2026-01-01T00:00:02Z"),
    ]
    assert find_pod(pods, 0)["metadata"]["name"] == "a-0-new"  # type: ignore[index]
    assert find_pod(pods, 2) is None


def test_cancel_needs_yes_when_not_at_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["cancel", "x"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: cancel deletes finetunejob 'x' and stops its pods — run again with --yes to confirm"
    )
