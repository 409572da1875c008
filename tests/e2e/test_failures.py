"""What goes wrong, end to end: a rank dies, a user deletes a running job, the data is invalid.

Same real parts as test_training.py. Trainer processes are found the way the node agent finds
them: by the FTJ_NODEAGENT_* markers in their environment, which every descendant inherits.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from finetune_devenv import _proc
from finetune_devenv.nodeagent.runner import tagged_pids
from finetune_operator import constants as c
from tests.fixtures.e2e import Product
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RESUMED = re.compile(r"resuming from (s3://\S+)")


def worker_pids(product: Product, name: str, rank: int) -> list[int]:
    """The training worker of node `rank` (not its launcher or torchrun), by the agent's env markers."""
    pods = [
        p for p in product.pods(name, 1) if p["metadata"]["labels"].get(c.COMPLETION_INDEX_LABEL) == str(rank)
    ]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    found = []
    for pid in tagged_pids(product.agent.node_name, pods[0]["metadata"]["uid"]):
        argv = _proc.cmdline(pid)
        if "finetune_trainer" in argv and "worker" in argv and "torch.distributed.run" not in argv:
            found.append(pid)
    return found


def step_of(checkpoint_uri: str) -> int:
    return int(checkpoint_uri.rstrip("/").rsplit("step-", 1)[1])


@pytest.mark.timeout(600)
def test_killed_rank_restarts_the_gang_from_the_last_checkpoint(product: Product) -> None:
    name = "kill-r1"
    # 100 steps: room to land the kill mid-run however quickly the status shows the first checkpoint
    product.apply(product.tiny_job(name, nodes=2, max_steps=100, every_steps=10))
    status = product.wait_status(
        name, "a complete checkpoint", lambda s: any(k["complete"] for k in s.get("checkpoints") or []), 300
    )
    first = min(k["step"] for k in status["checkpoints"] if k["complete"])
    (worker,) = worker_pids(product, name, rank=1)
    os.kill(worker, signal.SIGKILL)

    status = product.wait_status(name, "attempt 2", lambda s: s.get("attempt") == 2, timeout=120)
    assert status["restarts"]["total"] == 1 and status["restarts"]["countedTowardsLimit"] == 1, status
    resume = product.run_config(name, 2).checkpoints.resume_from
    prefix = f"s3://{product.bucket}/ckpt/{product.ns}/{name}/step-"
    assert resume is not None and resume.startswith(prefix), resume
    assert first <= step_of(resume) < 100

    status = product.wait_phase(name, "Succeeded", timeout=360)
    assert status["attempt"] == 2 and status["restarts"]["total"] == 1, status
    assert status["progress"]["step"] == 100
    # Each node of attempt 2 staged the same checkpoint: the one named, or a newer complete one that
    # was committed after the operator rendered the attempt (the trainer never takes an older one).
    logs = product.trainer_logs(name, 2)
    resumed = {pod: RESUMED.findall(log) for pod, log in logs.items()}
    assert len(resumed) == 2 and all(len(found) == 1 for found in resumed.values()), resumed
    (used,) = {found[0] for found in resumed.values()}
    assert used.startswith(prefix) and step_of(resume) <= step_of(used) < 100, (resume, used)
    assert not any(RESUMED.search(log) for log in product.trainer_logs(name, 1).values())


@pytest.mark.timeout(420)
def test_deleting_a_running_job_leaves_no_child_and_no_process(product: Product) -> None:
    name = "deleted"
    product.apply(product.tiny_job(name, nodes=2, max_steps=400, every_steps=100))
    product.wait_status(name, "training steps", lambda s: (s.get("progress") or {}).get("step", 0) >= 2, 300)
    uids = [p["metadata"]["uid"] for p in product.pods(name)]
    assert len(uids) == 2 and all(tagged_pids(product.agent.node_name, uid) for uid in uids)

    product.cluster.kubectl("delete", "finetunejob", name, "-n", product.ns, "--timeout=60s", check=True)
    wait_for("every child of the FineTuneJob to go", lambda: not product.children(name), timeout=120)
    # Every process the pods started, found by the markers their environment carries (/proc scan).
    wait_for("no trainer process", lambda: not any(tagged_pids(product.agent.node_name, u) for u in uids), 60)
    assert product.agent.processes() == []


@pytest.mark.timeout(300)
def test_invalid_data_fails_fast_with_the_trainers_message(product: Product) -> None:
    name = "bad-data"
    started = time.monotonic()
    product.apply(product.tiny_job(name, train="invalid/chat_errors.jsonl"))
    status = product.wait_phase(name, "Failed", timeout=180)
    took = time.monotonic() - started

    assert status["reason"] == "InvalidData", status
    assert status["attempt"] == 1 and status["restarts"]["total"] == 0, status
    message = status["message"]
    assert "line 2: messages[1].role is 'bot'" in message, message
    assert "line 8: invalid JSON" in message, message
    assert took < 120, f"failing on invalid data took {took:.0f}s"
