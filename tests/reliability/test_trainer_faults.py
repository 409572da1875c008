"""Trainer faults: SIGKILL a rank (or the whole pod) during training, during a checkpoint upload and
during the resume download, at random moments, then start the next attempt as the operator would.

Real trainer (``python -m finetune_trainer run``, two worker processes over gloo), tiny model on the
CPU, real S3 behind :class:`~tests.support.faults.S3FaultProxy`, which holds one checkpoint upload
or one resume download for a few seconds so the kill lands inside that window. After every kill:
the next attempt resumes from the newest checkpoint with a completion marker (never a torn one),
and it loses at most one checkpoint interval of steps. Every chain of attempts ends with a run that
finishes and publishes the adapter.

Short form: 4 kills; ``make soak``: 20.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from finetune_devenv.s3server import S3Server
from finetune_trainer.runconfig import CHECKPOINT_MARKER
from tests.support import faults
from tests.support.tiny_model import build_tiny_model
from tests.support.waiting import wait_for
from tests.trainer.conftest import s3_keys
from tests.trainer.harness import TrainerProcess, make_config

pytestmark = [pytest.mark.trainer, pytest.mark.slow, pytest.mark.reliability, pytest.mark.timeout(3600)]

KILLS = faults.scale(4, 20)
EVERY = 5
STEPS = 60
HOLD_SECONDS = 4.0
WINDOWS = ("training", "upload", "download")
FIRST_WINDOWS = ("training", "download", "upload")
"""The first kills cover every window (the training kill leaves a checkpoint for the download);
later windows are drawn at random."""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


def complete_steps(server: S3Server, bucket: str, job: str) -> tuple[list[int], list[int]]:
    """(steps with a completion marker, steps with files but no marker) under the job's prefix."""
    folders: dict[int, set[str]] = {}
    for key in s3_keys(server, bucket, f"ckpt/test/{job}/"):
        match = re.search(r"/step-(\d{9})/(.+)$", key)
        if match:
            folders.setdefault(int(match.group(1)), set()).add(match.group(2))
    complete = sorted(step for step, files in folders.items() if CHECKPOINT_MARKER in files)
    torn = sorted(step for step, files in folders.items() if CHECKPOINT_MARKER not in files)
    return complete, torn


def resumed_step(run: TrainerProcess) -> int | None:
    match = re.search(r"resuming from s3://\S+/step-(\d{9})/", run.log_text())
    return int(match.group(1)) if match else None


def last_step(run: TrainerProcess) -> int | None:
    steps = run.losses()
    return max(steps) if steps else None


@dataclass
class Chain:
    """One job's attempts: each attempt but the last is killed."""

    name: str
    attempts: int = 0


class Harness:
    """Starts attempts of one job through the proxy and kills them inside a chosen window."""

    def __init__(self, root: Path, server: S3Server, bucket: str, model: Path, proxy: faults.S3FaultProxy):
        self.root, self.server, self.bucket, self.model, self.proxy = root, server, bucket, model, proxy

    def attempt(self, chain: Chain) -> TrainerProcess:
        chain.attempts += 1
        config = make_config(
            name=chain.name,
            model_uri=str(self.model),
            bucket=self.bucket,
            endpoint_url=self.proxy.endpoint_url,
            progress_path=self.root / chain.name / f"progress-{chain.attempts}.json",
            job={"attempt": chain.attempts},
            distributed={"procs_per_node": 2},
            hyperparameters={"max_steps": STEPS},
            checkpoints={"every_steps": EVERY, "keep": 2},
        )
        env = {**self.server.env(), "AWS_ENDPOINT_URL_S3": self.proxy.endpoint_url}
        return TrainerProcess(self.root / chain.name / f"attempt-{chain.attempts}", config, env=env).start()

    def kill_in_window(
        self, run: TrainerProcess, window: str, rng: random.Random, start: int | None, first: bool = False
    ) -> tuple[str, str]:
        """Wait for ``window`` in ``run`` and SIGKILL at a random moment in it.

        Returns what was killed ("" when the attempt finished before the window came) and, for the
        upload and download windows, the S3 request that was held when it happened.
        """
        assert run.proc is not None
        proc = run.proc
        held = None
        start = start or 0
        if window == "training":  # a random step within two checkpoint intervals (the second, first)
            target = start + rng.randint(EVERY + 1 if first else 1, 2 * EVERY)
            wait_for(
                f"step {target}", lambda: proc.poll() is not None or (last_step(run) or 0) >= target, 400
            )
            time.sleep(rng.uniform(0.0, 0.5))
        else:  # the upload of one of the next two checkpoints, or the download of the resume one
            step = start + EVERY * rng.randint(1, 2) if window == "upload" else start
            method = "PUT" if window == "upload" else "GET"
            files = rf"/{self.bucket}/ckpt/test/[^/]+/step-{step:09d}/(?!{CHECKPOINT_MARKER})"
            held = self.proxy.hold(rf"^{method} {files}", HOLD_SECONDS)
            try:
                wait_for(
                    f"{window} of checkpoint {step}",
                    lambda: proc.poll() is not None or held.started.is_set(),
                    400,
                )
            finally:
                held.left = 0
            time.sleep(rng.uniform(0.0, HOLD_SECONDS * 0.9))
        if proc.poll() is not None:
            return "", ""
        killed = self._kill(run, rng)
        with contextlib.suppress(AssertionError):
            run.wait(timeout=120)  # torchrun tears the other rank down
        run.kill_tree()
        self.proxy.quiet()
        return killed, held.matched if held else ""

    @staticmethod
    def _kill(run: TrainerProcess, rng: random.Random) -> str:
        pids = sorted((run.workdir / "exit").glob("rank-*.pid"))
        if pids and rng.random() < 0.6:
            pid_file = rng.choice(pids)
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                return pid_file.stem  # "rank-0" / "rank-1"
        run.kill_tree()
        return "pod"


def choose_window(rng: random.Random, kill: int, resume: int | None) -> str:
    """FIRST_WINDOWS in order, then at random; a download needs a checkpoint to resume from."""
    possible = [w for w in WINDOWS if w != "download" or resume is not None]
    planned = FIRST_WINDOWS[kill] if kill < len(FIRST_WINDOWS) else None
    return planned if planned in possible else rng.choice(possible)


def test_killed_ranks_resume_from_the_newest_complete_checkpoint(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, tiny_model: Path
) -> None:
    rng, seed = faults.seeded("trainer-faults")
    kills: list[dict[str, object]] = []
    torn_seen = 0
    chains: list[Chain] = []
    with faults.S3FaultProxy(s3_server.endpoint_url) as proxy:
        harness = Harness(tmp_path, s3_server, s3_bucket, tiny_model, proxy)
        while len(kills) < KILLS:
            chain = Chain(f"chain-{len(chains)}")
            chains.append(chain)
            trained_to: int | None = None  # highest step any attempt of this chain trained
            expected: int | None = None  # newest complete checkpoint: where the next attempt resumes
            while len(kills) < KILLS:
                run = harness.attempt(chain)
                window = choose_window(rng, len(kills), expected)
                target, request = harness.kill_in_window(run, window, rng, expected, first=not kills)
                if window == "download":  # killed before it could log where it resumed from
                    assert expected is not None and f"/step-{expected:09d}/" in request, request
                else:
                    assert resumed_step(run) == expected, f"{chain.name} #{chain.attempts}:\n{run.log_tail()}"
                if not target:  # it finished before the window came: this chain is done
                    assert run.proc is not None and run.proc.returncode == 0, run.log_tail()
                    break
                reached = max(filter(None, [last_step(run), trained_to, expected]), default=0)
                trained_to = reached
                complete, torn = complete_steps(s3_server, s3_bucket, chain.name)
                torn_seen += len([s for s in torn if not complete or s > complete[-1]])
                newest = complete[-1] if complete else None
                lost = reached - (newest or 0)
                kills.append(
                    {
                        "chain": chain.name,
                        "attempt": chain.attempts,
                        "window": window,
                        "killed": target,
                        "request": request,
                        "step": reached,
                        "resume": newest,
                        "lost": lost,
                    }
                )
                assert 0 <= lost <= EVERY, f"kill {kills[-1]} lost {lost} steps (> everySteps={EVERY})"
                expected = newest
            else:
                run = harness.attempt(chain)
                assert run.wait(timeout=900) == 0, run.log_tail()
                assert resumed_step(run) == expected, run.log_tail()
            assert sorted(run.losses())[0] == (expected or 0) + 1, "training went on from the checkpoint"
            assert max(run.losses()) == STEPS
            complete, torn = complete_steps(s3_server, s3_bucket, chain.name)
            assert complete[-1] == STEPS and torn == [], f"left behind: torn {torn}"
            assert f"out/test/{chain.name}/manifest.json" in s3_keys(s3_server, s3_bucket, "out/")
        figures = proxy.figures()
    print("\n".join(str(k) for k in kills))
    faults.record(
        "trainer-faults",
        seed=seed,
        jobs=len(chains),
        attempts=sum(c.attempts for c in chains),
        kills=len(kills),
        kills_by_window=dict(Counter(str(k["window"]) for k in kills)),
        kills_by_target=dict(Counter(str(k["killed"]) for k in kills)),
        torn_checkpoints_left_by_kills=torn_seen,
        max_steps_lost=max(int(str(k["lost"])) for k in kills),
        every_steps=EVERY,
        jobs_finished=len(chains),
        s3_requests=figures["s3_requests"],
    )
