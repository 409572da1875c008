"""Several processes and several "nodes" on one machine, over gloo: the operator's pod contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_devenv.s3server import S3Server
from finetune_trainer.runconfig import CHECKPOINT_MARKER
from tests.trainer.conftest import NewRun, make_run_factory, s3_keys
from tests.trainer.harness import free_port
from tests.trainer.test_train_methods import assert_no_base_weights

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def read_marker(server: S3Server, bucket: str, key: str) -> dict[str, int]:
    body = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return {f["path"]: f["size"] for f in json.loads(body)["files"]}


def test_zero3_qlora_two_processes_checkpoint_to_s3(
    new_run: NewRun, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    run = new_run(
        "zero3",
        model={"quantization": "nf4"},
        distributed={"zero_stage": 3, "procs_per_node": 2},
        hyperparameters={"max_steps": 10},
        checkpoints={"every_steps": 5},
    )
    assert run.run() == 0, run.log_tail()
    assert "weights in 4-bit nf4" in run.log_text()
    files = read_marker(s3_server, s3_bucket, f"ckpt/test/zero3/step-000000010/{CHECKPOINT_MARKER}")
    for rank in (0, 1):  # both ranks' optimizer shards and RNG states are in the one checkpoint
        assert f"global_step10/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
        assert f"rng_state_{rank}.pth" in files
    keys = s3_keys(s3_server, s3_bucket, "ckpt/test/zero3/step-000000010/")
    assert {k.removeprefix("ckpt/test/zero3/step-000000010/") for k in keys} == {*files, CHECKPOINT_MARKER}
    client = s3_server.client()
    for key in keys:
        if key.endswith((".pt", ".safetensors")):
            target = tmp_path / "ckpt" / key.rsplit("/", 1)[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(s3_bucket, key, str(target))
    assert_no_base_weights(tmp_path / "ckpt")
    assert run.progress()["state"] == "finished"  # type: ignore[index]


def test_two_nodes_one_process_each(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, tiny_model_s3: str
) -> None:
    """Two launchers, as two pods of an Indexed Job: same MASTER_ADDR/PORT, NODE_RANK 0 and 1."""
    new_run = make_run_factory(tmp_path, s3_server, s3_bucket, tiny_model_s3)
    gang = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    changes = {
        "model": {"quantization": "none"},
        "distributed": {"nodes": 2, "zero_stage": 3},
        "hyperparameters": {"max_steps": 10},
        "checkpoints": {"every_steps": 5},
    }
    node0 = new_run("gang", pod="node-0", env={**gang, "JOB_COMPLETION_INDEX": "0"}, **changes)
    node1 = new_run("gang", pod="node-1", env={**gang, "NODE_RANK": "1"}, **changes)
    node0.start()
    node1.start()
    try:
        assert node0.wait() == 0, node0.log_tail()
        assert node1.wait() == 0, node1.log_tail()
    finally:
        node0.kill_tree()
        node1.kill_tree()
    files = read_marker(s3_server, s3_bucket, f"ckpt/test/gang/step-000000010/{CHECKPOINT_MARKER}")
    for rank in (0, 1):  # each node uploaded its own part
        assert f"rng_state_{rank}.pth" in files
        assert f"global_step10/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
    assert not (node1.workdir / "metrics.jsonl").exists(), "only global rank 0 logs metrics"
    assert sorted(node0.losses()) == list(range(1, 11))
    assert (node0.workdir / "model" / "model.safetensors").is_file()  # each node fetched the model
    assert (node1.workdir / "model" / "model.safetensors").is_file()
