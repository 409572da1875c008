"""From `kubectl apply` to an adapter in S3: SFT on two "nodes" (two pods that rendezvous), DPO on one.

Real control plane, real S3, the operator as a process, and the node agent running the operator's
pods as local trainer processes (see tests/fixtures/e2e.py).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from finetune_operator import constants as c
from tests.fixtures.e2e import Product

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def assert_trained(product: Product, name: str, status: dict[str, Any], steps: int) -> dict[str, Any]:
    """What every finished job shows: progress at the end, metrics, checkpoints, the adapter in S3.

    Returns the run's manifest.json.
    """
    assert status["attempt"] == 1 and status["restarts"]["total"] == 0, status
    progress = status["progress"]
    assert (progress["step"], progress["totalSteps"], progress["percent"]) == (steps, steps, 100)
    assert isinstance(status["metrics"]["trainLoss"], float)
    prefix = f"s3://{product.bucket}/ckpt/{product.ns}/{name}/step-"
    checkpoints = [ckpt for ckpt in status["checkpoints"] if ckpt["complete"]]
    assert checkpoints and all(ckpt["uri"].startswith(prefix) for ckpt in checkpoints), checkpoints
    assert max(ckpt["step"] for ckpt in checkpoints) == steps
    conditions = {cond["type"]: cond["status"] for cond in status["conditions"]}
    assert conditions["Succeeded"] == "True" and conditions["Ready"] == "True", conditions

    output = f"s3://{product.bucket}/out/{name}/"
    assert status["output"]["adapterUri"] == output + "adapter/"
    assert product.s3_keys(output + "adapter/") >= ADAPTER_FILES
    body = product.s3.client().get_object(Bucket=product.bucket, Key=f"out/{name}/manifest.json")["Body"]
    manifest: dict[str, Any] = json.loads(body.read())
    assert manifest["step"] == steps and manifest["adapter_uri"] == output + "adapter/"
    return manifest


@pytest.mark.timeout(480)
def test_sft_on_two_nodes_rendezvous_and_succeeds(product: Product) -> None:
    name = "sft-2n"
    assert "created" in product.apply(product.tiny_job(name, nodes=2, max_steps=20, every_steps=10))
    status = product.wait_phase(name, "Succeeded", timeout=420)

    manifest = assert_trained(product, name, status, steps=20)
    assert manifest["method"] == "sft"
    config = product.run_config(name, 1)
    assert (config.distributed.nodes, config.distributed.procs_per_node) == (2, 1)
    # Two pods, each told its node rank and rank 0's address by the operator, formed one gang.
    job = c.attempt_name(name, 1)
    logs = product.trainer_logs(name, 1)
    assert len(logs) == 2, sorted(logs)
    for rank in (0, 1):
        line = f"node {rank}/2: starting 1 worker(s), rendezvous {job}-0.{job}.{product.ns}.svc:"
        assert any(line in log for log in logs.values()), f"no pod logged {line!r}"
    exit_codes = product.agent.state_dir / "logs" / product.ns
    assert [p.read_text().strip() for p in sorted(exit_codes.glob(f"{job}-*/*.exitcode"))] == ["0", "0"]


@pytest.mark.timeout(420)
def test_dpo_on_one_node_succeeds(product: Product) -> None:
    name = "dpo-1n"
    manifest = product.tiny_job(
        name, method="dpo", train="preference_small.jsonl", max_steps=10, every_steps=5
    )
    assert "created" in product.apply(manifest)
    status = product.wait_phase(name, "Succeeded", timeout=360)

    trained = assert_trained(product, name, status, steps=10)
    assert trained["method"] == "dpo"
    assert product.run_config(name, 1).method == "dpo"
