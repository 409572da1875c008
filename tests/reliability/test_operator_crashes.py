"""Operator crashes: SIGKILL the operator at random moments while many FineTuneJobs live their lives.

Each lifecycle is a seeded plan: create, pods running, checkpoints reported through the progress
ConfigMap (with the trainer's own token), then per attempt one ending — a counted failure, a
preemption, a suspend and resume — until a final one: success, a non-retryable error, the restart
budget exhausted, or deletion. Pods are moved by the simulated kubelet; the Job controller and the
garbage collector are real. Meanwhile a chaos thread SIGKILLs the operator after a random 0.2-3 s of
life and starts it again.

Afterwards, for every job: exactly one Job per attempt was ever created (a watch sees every ADDED,
and the Job controller's events name every Job, even those deleted since), each attempt's Job says
it resumes from the newest checkpoint reported
before the failure, the phase and reason are the right final ones, the restart counters equal the
failures injected (counted and not counted), the status lists every checkpoint reported, and no
child is left without its owner.

Short form: 10 lifecycles, 5 at a time; ``make soak``: 50, 10 at a time.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from finetune_devenv.kubectl import Cluster
from finetune_operator import api
from finetune_operator import conditions as cond
from finetune_operator import constants as c
from tests.fixtures.operator import OperatorProcess, _release_finetunejobs
from tests.integration.test_operator_lifecycle import World, now, write_progress
from tests.support import faults
from tests.support.builders import make_job
from tests.support.waiting import wait_for

LIFECYCLES = faults.scale(10, 50)
CONCURRENCY = faults.scale(5, 10)
pytestmark = [
    pytest.mark.integration,
    pytest.mark.reliability,
    pytest.mark.timeout(faults.scale(900, 3600)),
]

RESTARTING_ENDINGS = ("fail", "preempt", "suspend")
REASONS = {"fail": cond.TRAINER_ERROR, "preempt": cond.PREEMPTED}


@dataclass
class Plan:
    """One FineTuneJob's life: an ending per attempt, drawn before it starts."""

    name: str
    nodes: int
    max_restarts: int
    endings: list[str]
    reported: list[int] = field(default_factory=list)
    """Checkpoint steps reported, in order (what the status must list at the end)."""
    resume: dict[int, str | None] = field(default_factory=dict)
    """Attempt -> the checkpoint URI its Job must resume from."""

    @property
    def exhausted(self) -> bool:
        return self.endings[-1] == "fail"

    @property
    def restarts(self) -> list[str]:
        """Endings that restarted the gang (the budget-exhausting last failure did not)."""
        done = self.endings[:-1]
        return [e for e in done if e in ("fail", "preempt")]

    @property
    def attempts(self) -> int:
        return 1 + sum(1 for e in self.endings[:-1] if e in RESTARTING_ENDINGS)

    def final(self) -> tuple[str, str] | None:
        """(phase, reason) at the end; None when the job was deleted."""
        if self.exhausted:
            return "Failed", cond.BACKOFF_LIMIT_EXCEEDED
        return {
            "succeed": ("Succeeded", cond.SUCCEEDED_REASON),
            "invalid": ("Failed", cond.INVALID_DATA),
            "delete": None,
        }[self.endings[-1]]

    def restart_status(self) -> dict[str, Any]:
        restarts = self.restarts
        expected: dict[str, Any] = {
            "total": len(restarts),
            "countedTowardsLimit": restarts.count("fail"),
        }
        if restarts:
            expected["lastReason"] = REASONS[restarts[-1]]
        return expected

    def checkpoint_uri(self, namespace: str, step: int) -> str:
        return f"s3://ckpt/{namespace}/{self.name}/step-{step:09d}/"


def make_plan(rng: random.Random, index: int) -> Plan:
    """Up to three restarts of random kinds, then an end; the first four plans cover every end."""
    max_restarts = rng.choice((0, 1, 2, 3))
    ends = ("succeed", "invalid", "delete", "exhaust")
    end = ends[index] if index < len(ends) else rng.choices(ends, (4, 1, 1, 1))[0]
    middle = rng.choices(RESTARTING_ENDINGS, (3, 3, 1), k=rng.randint(1, 3))
    if index == 0:
        middle.insert(rng.randint(0, len(middle)), "suspend")
    tail = ["fail"] * (max_restarts + 1) if end == "exhaust" else [end]
    endings: list[str] = []
    for ending in middle + tail:
        if ending == "suspend" and "suspend" in endings:
            continue
        endings.append(ending)
        if endings.count("fail") > max_restarts:
            break  # the restart budget is spent: the job fails here, whatever came next
    return Plan(f"life-{index:03d}", rng.choice((1, 2)), max_restarts, endings)


class Chaos:
    """Starts the operator, then SIGKILLs it after a random lifetime and starts it again, until stopped.

    A start can fail because the free port picked for the liveness probe (tests/fixtures/operator.py
    picks it in the ephemeral range) was taken by an outgoing connection before the operator bound
    it, or the probe connected to itself: that start is tried again and its log lines are left out
    of :meth:`errors`. Any other failed start is an error.
    """

    def __init__(self, operator: OperatorProcess, rng: random.Random) -> None:
        self.operator, self.rng = operator, rng
        self.kills = 0
        self.port_clashes = 0
        self.start_failures: list[str] = []
        self._skipped: list[tuple[int, int]] = []  # log byte ranges of starts that lost their port
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def __enter__(self) -> Chaos:
        self.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)
        if self.operator.proc is None or self.operator.proc.poll() is not None:
            self.start()

    def start(self) -> None:
        while True:
            log = self.operator.log_path
            offset = log.stat().st_size if log.exists() else 0
            try:
                self.operator.start(timeout=60)
                return
            except Exception as err:  # RuntimeError, TimeoutError, or an HTTP error of the probe
                self.operator.kill()
                if not _lost_its_port(err, log.read_bytes()[offset:]):
                    self.start_failures.append(f"{type(err).__name__}: {str(err)[-2000:]}")
                    if len(self.start_failures) > 3:
                        raise
                    continue
                self.port_clashes += 1
                self._skipped.append((offset, log.stat().st_size))

    def errors(self) -> list[dict[str, Any]]:
        """The operator's ERROR records, without those of starts that lost their port."""
        data = self.operator.log_path.read_bytes()
        for begin, end in reversed(self._skipped):
            data = data[:begin] + data[end:]
        records = []
        for line in data.decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("level") in ("ERROR", "CRITICAL"):
                    records.append(record)
        return records

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.rng.uniform(0.2, 3.0)):
                self.operator.kill()
                self.kills += 1
                time.sleep(self.rng.uniform(0.0, 1.0))
                if not self._stop.is_set():
                    self.start()
        except Exception as err:  # reported by the test, not lost in a thread
            self.start_failures.append(f"chaos stopped: {type(err).__name__}: {err}")


def _lost_its_port(err: Exception, log: bytes) -> bool:
    """The liveness port, picked free, was taken before the operator bound it (an outgoing
    connection got it), or the probe connected to itself (a port in the ephemeral range)."""
    return b"address already in use" in log or isinstance(err, http.client.HTTPException)


class Driver:
    """Plays one plan against the cluster, as the users, the kubelet and the trainer would."""

    TIMEOUT = 180.0  # the operator may be down or starting for a while

    def __init__(self, cluster: Cluster, namespace: str, plan: Plan, seed: int) -> None:
        self.api_client = cluster.api_client()
        self.world = World(self.api_client, namespace)
        self.ns = namespace
        self.plan = plan
        self.rng = random.Random(seed)
        self.step = 0

    def run(self) -> None:
        try:
            self._run()
        finally:
            self.api_client.close()

    def _run(self) -> None:
        plan, world = self.plan, self.world
        world.create(make_job(plan.name).nodes(plan.nodes).gpus(0).max_restarts(plan.max_restarts).manifest())
        trainer: client.CoreV1Api | None = None
        for attempt, ending in enumerate(plan.endings, start=1):
            job_name = c.attempt_name(plan.name, attempt)
            wait_for(f"{job_name} created", lambda jn=job_name: jn in world.jobs(plan.name), self.TIMEOUT)
            pods = world.kubelet.wait_pods(job_name, plan.nodes, timeout=self.TIMEOUT)
            world.kubelet.run(*pods)
            for _ in range(self.rng.randint(0, 2)):
                if trainer is None:
                    trainer = client.CoreV1Api(world.token_client(c.trainer_identity_name(plan.name)))
                self.step += self.rng.randint(3, 15)
                plan.reported.append(self.step)
                write_progress(trainer, self.ns, plan.name, self._report(attempt))
            last = plan.reported[-1] if plan.reported else None
            plan.resume[attempt + 1] = plan.checkpoint_uri(self.ns, last) if last else None
            time.sleep(self.rng.uniform(0.0, 0.5))
            self._end(attempt, ending, pods)

    def _report(self, attempt: int) -> dict[str, Any]:
        return {
            "attempt": attempt,
            "state": "training",
            "step": self.step,
            "totalSteps": 1000,
            "time": now(),
            "checkpoints": [
                {"step": s, "uri": self.plan.checkpoint_uri(self.ns, s), "complete": True, "time": now()}
                for s in self.plan.reported
            ],
        }

    def _end(self, attempt: int, ending: str, pods: list[dict[str, Any]]) -> None:
        world, kubelet, name = self.world, self.world.kubelet, self.plan.name
        if ending == "fail":
            kubelet.fail(self.rng.choice(pods), 1, f"RuntimeError: injected failure of attempt {attempt}")
        elif ending == "preempt":
            kubelet.preempt(self.rng.choice(pods))
        elif ending == "succeed":
            kubelet.succeed(*pods)
        elif ending == "invalid":
            kubelet.fail(self.rng.choice(pods), 3, "train.jsonl line 7: 'messages' is empty")
        elif ending == "delete":
            world.custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, self.ns, api.PLURAL, name)
        elif ending == "suspend":
            world.patch_spec(name, {"runPolicy": {"suspend": True}})
            wait_for(
                f"{name} suspended",
                lambda: (
                    world.status(name).get("phase") == "Suspended"
                    and not world.jobs(name, include_deleting=True)
                ),
                self.TIMEOUT,
            )
            world.patch_spec(name, {"runPolicy": {"suspend": False}})


def check(plan: Plan, world: World, watch: faults.JobWatch, jobs: dict[str, set[str]]) -> list[str]:
    """Every invariant of one finished lifecycle (``jobs``: every Job ever created); what is wrong."""
    problems: list[str] = []
    name = plan.name
    created = {n: uids for n, uids in jobs.items() if n.startswith(f"{c.child_base(name)}-a")}
    wanted = {c.attempt_name(name, a) for a in range(1, plan.attempts + 1)}
    if set(created) != wanted:
        problems.append(f"attempt Jobs created {sorted(created)}, expected {sorted(wanted)}")
    problems += [f"{job} was created {len(uids)} times" for job, uids in created.items() if len(uids) != 1]
    for attempt in range(2, plan.attempts + 1):
        seen = watch.annotations.get(c.attempt_name(name, attempt), {}).get(c.ANN_RESUME_FROM)
        if seen != plan.resume.get(attempt):
            problems.append(f"attempt {attempt} resumes from {seen}, expected {plan.resume.get(attempt)}")
    final = plan.final()
    obj = world.ftj(name)
    if final is None:
        if obj is not None:
            problems.append("deleted, but the FineTuneJob is still there")
        return problems
    status = (obj or {}).get("status") or {}
    if (status.get("phase"), status.get("reason")) != final:
        problems.append(f"phase/reason {status.get('phase')}/{status.get('reason')}, expected {final}")
    if status.get("attempt") != plan.attempts:
        problems.append(f"status.attempt {status.get('attempt')}, expected {plan.attempts}")
    if status.get("restarts") != plan.restart_status():
        problems.append(f"restarts {status.get('restarts')}, expected {plan.restart_status()}")
    listed = [cp["step"] for cp in status.get("checkpoints", [])]
    if listed != plan.reported:
        problems.append(f"status.checkpoints {listed}, reported {plan.reported}")
    if world.jobs(name) != [c.attempt_name(name, plan.attempts)]:
        problems.append(f"Jobs left {world.jobs(name)}, expected only the last attempt's")
    return problems


def play(drivers: list[Driver]) -> list[str]:
    """Run every driver, CONCURRENCY at a time; returns how the ones that failed failed."""
    failures = []
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(d.run) for d in drivers]
        for driver, future in zip(drivers, futures, strict=True):
            try:
                future.result()
            except Exception as err:  # collected: one stuck plan should not hide the others
                plan = driver.plan
                failures.append(f"{plan.name} {plan.endings}: {type(err).__name__}: {err}")
    return failures


@pytest.fixture
def stopped_operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    """An operator for :class:`Chaos` to start and kill (the ``operator`` fixture starts its own and
    fails on any error line, which a start that lost its port writes); cleaned up afterwards."""
    process = OperatorProcess(cluster, namespace, tmp_path / "operator.log")
    try:
        yield process
    finally:
        process.kill()
        _release_finetunejobs(cluster, namespace)
        print(f"--- operator log ({process.log_path}) ---\n{process.logs()[-20000:]}")


def test_operator_killed_at_random_moments_loses_and_duplicates_nothing(
    cluster: Cluster, kube_api: client.ApiClient, namespace: str, stopped_operator: OperatorProcess
) -> None:
    operator = stopped_operator
    rng, seed = faults.seeded("operator-crashes")
    plans = [make_plan(rng, i) for i in range(LIFECYCLES)]
    world = World(kube_api, namespace)
    drivers = [Driver(cluster, namespace, p, rng.randrange(2**31)) for p in plans]
    with faults.JobWatch(kube_api, namespace) as watch:
        started = time.monotonic()
        with Chaos(operator, random.Random(rng.random())) as chaos:
            failures = play(drivers)
        took = time.monotonic() - started
        assert not failures, "\n".join(failures)
        assert not chaos.start_failures, chaos.start_failures

        def settled() -> bool:
            return all(
                (world.ftj(p.name) is None)
                if p.final() is None
                else world.status(p.name).get("phase") in ("Succeeded", "Failed")
                for p in plans
            )

        with contextlib.suppress(AssertionError):  # a job stuck short of its end is reported below
            wait_for("every lifecycle to end", settled, 120, every=0.5)
        time.sleep(3)  # a resync or two, in case something still moves
        jobs = watch.created()
        problems = {p.name: check(p, world, watch, jobs) for p in plans}
        faults.assert_no_orphans(kube_api, namespace)
        assert watch.gaps == 0, "the Job watch lost events: the duplicate check is incomplete"
    wrong = [f"{p.name} {p.endings}: {problems[p.name]}" for p in plans if problems[p.name]]
    assert not wrong, "\n".join(wrong)
    assert chaos.errors() == []
    endings = Counter(e for p in plans for e in p.endings)
    faults.record(
        "operator-crashes",
        seed=seed,
        lifecycles=len(plans),
        concurrency=CONCURRENCY,
        operator_kills=chaos.kills,
        operator_starts=operator.starts,
        liveness_port_clashes_retried=chaos.port_clashes,
        attempt_jobs=sum(p.attempts for p in plans),
        endings=dict(endings),
        checkpoints_reported=sum(len(p.reported) for p in plans),
        duplicates=sum(len(uids) - 1 for uids in jobs.values()),
        orphans=0,
        wrong_final_states=0,
        seconds=round(took),
    )
