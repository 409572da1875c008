"""The launcher's pure parts: the pod's place in the gang, the torchrun command, exit codes, CLI."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from finetune_trainer import cli, launch
from finetune_trainer.errors import TrainerError
from finetune_trainer.launch import (
    GangPlace,
    place_from_env,
    read_worker_exits,
    torchrun_command,
    worst_exit,
    write_termination_log,
    write_worker_exit,
)
from finetune_trainer.runconfig import ExitCode, RunConfig

pytestmark = pytest.mark.unit

CONFIG = RunConfig.model_validate(
    {
        "job": {"namespace": "ns", "name": "j"},
        "method": "sft",
        "model": {"uri": "s3://m/"},
        "dataset": {"train": "s3://d/t.jsonl"},
        "distributed": {"nodes": 4, "procs_per_node": 8, "master_port": 29400},
        "checkpoints": {"uri": "s3://c/ns/j/"},
        "output": {"uri": "s3://o/j/"},
    }
)


@pytest.mark.parametrize(
    ("env", "place"),
    [
        # what the operator renders into pod 2 of an Indexed Job
        (
            {
                "JOB_COMPLETION_INDEX": "2",
                "NNODES": "4",
                "NPROC_PER_NODE": "8",
                "MASTER_ADDR": "j-0.j",
                "MASTER_PORT": "29500",
            },
            GangPlace(2, 4, 8, "j-0.j", 29500),
        ),
        # NODE_RANK wins over JOB_COMPLETION_INDEX
        ({"NODE_RANK": "1", "JOB_COMPLETION_INDEX": "3", "MASTER_ADDR": "a"}, GangPlace(1, 4, 8, "a", 29400)),
        # the run config fills in what the environment leaves out
        ({"MASTER_ADDR": "a"}, GangPlace(0, 4, 8, "a", 29400)),
        # a local run: one node, rendezvous on the loopback
        ({"NNODES": "1", "NPROC_PER_NODE": "2"}, GangPlace(0, 1, 2, "127.0.0.1", 29400)),
        ({"NNODES": "1", "NODE_RANK": " "}, GangPlace(0, 1, 8, "127.0.0.1", 29400)),
    ],
)
def test_place_from_env(env: dict[str, str], place: GangPlace) -> None:
    assert place_from_env(env, CONFIG) == place


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NNODES": "2"}, "MASTER_ADDR is not set but the gang has 2 nodes"),
        (
            {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "a"},
            "node rank 2 (from NODE_RANK) is not below NNODES=2",
        ),
        ({"NNODES": "two"}, "NNODES='two' is not an integer"),
        ({"NNODES": "1", "NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0 must be >= 1"),
    ],
)
def test_bad_environment_is_an_invalid_config(env: dict[str, str], message: str) -> None:
    with pytest.raises(TrainerError) as error:
        place_from_env(env, CONFIG)
    assert error.value.code == ExitCode.INVALID_CONFIG
    assert message in str(error.value)


def test_torchrun_command_uses_a_static_rendezvous() -> None:
    cmd = torchrun_command(
        GangPlace(1, 2, 8, "j-0.j", 29500),
        Path("/cfg.json"),
        Path("/work"),
        rdzv_timeout_s=900,
        python="python3",
    )
    assert cmd == [
        "python3",
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--node-rank=1",
        "--nproc-per-node=8",
        "--master-addr=j-0.j",
        "--master-port=29500",
        "--rdzv-conf=timeout=900",
        "--max-restarts=0",
        "-m",
        "finetune_trainer",
        "worker",
        "--config=/cfg.json",
        "--workdir=/work",
    ]


@pytest.mark.parametrize(
    ("codes", "worst"),
    [
        ([], ExitCode.OK),
        ([0, 0], ExitCode.OK),
        ([143, 0], ExitCode.PREEMPTED),
        ([143, 1], ExitCode.ERROR),  # torchrun SIGTERMs the survivors of a failure: the failure wins
        ([143, 3, 1], ExitCode.INVALID_DATA),
        ([4, 3], ExitCode.INVALID_CONFIG),  # ties keep the first
        ([-9, 0], ExitCode.ERROR),  # killed by a signal: an error
        ([137], ExitCode.ERROR),
        ([5, 143], ExitCode.INPUT_UNREADABLE),
    ],
)
def test_worst_exit(codes: list[int], worst: ExitCode) -> None:
    assert worst_exit(codes) == worst


def test_worker_exits_round_trip(tmp_path: Path) -> None:
    write_worker_exit(tmp_path, 0, ExitCode.INVALID_DATA, "line 3: bad")
    write_worker_exit(tmp_path, 1, ExitCode.PREEMPTED, "")
    (tmp_path / "rank-2.json").write_text("{half")
    exits = read_worker_exits(tmp_path, 4, missing=ExitCode.ERROR)
    assert [(e.local_rank, e.code) for e in exits] == [
        (0, ExitCode.INVALID_DATA),
        (1, ExitCode.PREEMPTED),
        (2, ExitCode.ERROR),
        (3, ExitCode.ERROR),
    ]
    assert exits[0].reason == "line 3: bad"
    assert "ended without reporting" in exits[3].reason


def test_termination_log_is_one_paragraph_and_never_fails(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    write_termination_log(
        "dataset failed:\n  line 2: bad\n  line 5: worse", {"FTJ_TERMINATION_LOG": str(path)}
    )
    assert path.read_text() == "dataset failed: line 2: bad line 5: worse"
    write_termination_log("x" * 10_000, {"FTJ_TERMINATION_LOG": str(path)})
    assert len(path.read_text()) == 4000  # Kubernetes keeps at most 4096 bytes
    write_termination_log("ignored", {"FTJ_TERMINATION_LOG": str(tmp_path / "missing" / "log")})


def test_help_explains_every_option_and_the_environment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for word in (
        "run",
        "worker",
        "validate",
        "NODE_RANK",
        "JOB_COMPLETION_INDEX",
        "NNODES",
        "NPROC_PER_NODE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "FTJ_RUN_CONFIG",
        "FTJ_TERMINATION_LOG",
        "143 preempted",
    ):
        assert word in text
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = capsys.readouterr().out
    assert "--config" in text and "--workdir" in text


def test_missing_config_is_an_invalid_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FTJ_RUN_CONFIG", raising=False)
    assert cli.main([]) == ExitCode.INVALID_CONFIG


def test_only_build_locks_old_enough_to_be_leftovers_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / "py311_cu130" / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cu130" / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - launch.STALE_BUILD_LOCK_SECONDS - 60
    os.utime(stale, (old, old))
    removed = launch.clear_stale_build_locks({"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert removed == [stale] and not stale.exists() and fresh.exists()
