"""The per-pod launcher: find this pod's place in the gang, prepare the node, start torchrun.

Every pod of an attempt runs ``python -m finetune_trainer run``. The operator renders these
environment variables into each pod (all optional for a local run on one machine):

``NODE_RANK``
    This pod's node rank, ``0..NNODES-1``. When unset, ``JOB_COMPLETION_INDEX`` (set by Kubernetes
    in every pod of an Indexed Job) is used; when both are unset, 0.
``NNODES``
    Number of pods (nodes) in the gang; default ``distributed.nodes`` from the run config.
``NPROC_PER_NODE``
    Worker processes on this pod, one per GPU; default ``distributed.procs_per_node``.
``MASTER_ADDR``
    Address of node 0 (the headless Service's DNS name for pod 0); default ``127.0.0.1``,
    required when ``NNODES`` > 1.
``MASTER_PORT``
    Rendezvous port on node 0; default ``distributed.master_port``.
``FTJ_RUN_CONFIG``
    Path of the run config JSON (the mounted ConfigMap); ``--config`` overrides it.
``FTJ_WORKDIR``
    Local scratch folder for staged inputs and checkpoints (an emptyDir); ``--workdir`` overrides it.
``FTJ_TERMINATION_LOG``
    Where the reason for a non-retryable failure goes; default ``/dev/termination-log``.

The launcher stages the node (data validated first, then model and resume checkpoint downloaded
once per node, see :mod:`finetune_trainer.stage`), then runs ``python -m torch.distributed.run``
with a static rendezvous (``--nnodes --node-rank --master-addr --master-port``: no SSH, no MPI),
which starts ``python -m finetune_trainer worker`` once per local process. Workers write their
exit code and pid under ``<workdir>/exit/``; the launcher forwards SIGTERM to them (not to torchrun,
whose own shutdown would SIGKILL them after 30 s, before a large checkpoint is uploaded) and exits
with the worst code of its workers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from finetune_trainer.errors import TrainerError
from finetune_trainer.runconfig import ExitCode, RunConfig

log = logging.getLogger(__name__)

EXIT_DIR_ENV = "FTJ_EXIT_DIR"
"""Set for workers: the folder where each local rank writes ``rank-<local>.json`` and ``.pid``."""

DEFAULT_WORKDIR = "/tmp/finetune-trainer"


@dataclass(frozen=True)
class GangPlace:
    """Where this pod sits in the gang, worked out from its environment."""

    node_rank: int
    nnodes: int
    nproc_per_node: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def _int_env(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise TrainerError(
            ExitCode.INVALID_CONFIG, f"environment variable {name}={raw!r} is not an integer"
        ) from None
    if value < minimum:
        raise TrainerError(
            ExitCode.INVALID_CONFIG, f"environment variable {name}={value} must be >= {minimum}"
        )
    return value


def place_from_env(env: Mapping[str, str], config: RunConfig) -> GangPlace:
    """This pod's :class:`GangPlace`; the environment wins over the run config's defaults."""
    dist = config.distributed
    rank_var = "NODE_RANK" if env.get("NODE_RANK", "").strip() else "JOB_COMPLETION_INDEX"
    node_rank = _int_env(env, rank_var, 0, 0)
    nnodes = _int_env(env, "NNODES", dist.nodes, 1)
    nproc = _int_env(env, "NPROC_PER_NODE", dist.procs_per_node, 1)
    port = _int_env(env, "MASTER_PORT", dist.master_port, 1)
    addr = env.get("MASTER_ADDR", "").strip()
    if node_rank >= nnodes:
        raise TrainerError(
            ExitCode.INVALID_CONFIG, f"node rank {node_rank} (from {rank_var}) is not below NNODES={nnodes}"
        )
    if not addr:
        if nnodes > 1:
            raise TrainerError(
                ExitCode.INVALID_CONFIG,
                f"MASTER_ADDR is not set but the gang has {nnodes} nodes: set it to node 0's address",
            )
        addr = "127.0.0.1"
    return GangPlace(node_rank, nnodes, nproc, addr, port)


def torchrun_command(
    place: GangPlace, config_path: Path, workdir: Path, *, rdzv_timeout_s: int, python: str = sys.executable
) -> list[str]:
    """The torchrun command line that starts this node's workers (static rendezvous, no restarts:
    the operator restarts the whole gang from the newest checkpoint instead)."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={place.nnodes}",
        f"--node-rank={place.node_rank}",
        f"--nproc-per-node={place.nproc_per_node}",
        f"--master-addr={place.master_addr}",
        f"--master-port={place.master_port}",
        f"--rdzv-conf=timeout={rdzv_timeout_s}",
        "--max-restarts=0",
        "-m",
        "finetune_trainer",
        "worker",
        f"--config={config_path}",
        f"--workdir={workdir}",
    ]


_SEVERITY = {
    ExitCode.OK: 0,
    ExitCode.PREEMPTED: 1,
    ExitCode.ERROR: 2,
    ExitCode.INPUT_UNREADABLE: 3,
    ExitCode.INVALID_CONFIG: 3,
    ExitCode.INVALID_DATA: 3,
}


def as_exit_code(code: int) -> ExitCode:
    """Map any process exit status to an :class:`ExitCode` (unknown statuses are ``ERROR``)."""
    try:
        return ExitCode(code)
    except ValueError:
        return ExitCode.ERROR


def worst_exit(codes: Iterable[int]) -> ExitCode:
    """The code the pod exits with: a non-retryable failure beats an error, which beats a preemption.

    When one worker fails, torchrun SIGTERMs the others and they report PREEMPTED; the operator must
    see the real cause, so PREEMPTED only wins when nothing worse happened. Ties keep the first.
    """
    worst = ExitCode.OK
    for code in map(as_exit_code, codes):
        if _SEVERITY[code] > _SEVERITY[worst]:
            worst = code
    return worst


@dataclass(frozen=True)
class WorkerExit:
    """What one worker wrote under the exit folder before it ended."""

    local_rank: int
    code: ExitCode
    reason: str = ""


def write_worker_exit(exit_dir: Path, local_rank: int, code: ExitCode, reason: str) -> None:
    """Record this worker's outcome for the launcher (atomic rename: a reader never sees half)."""
    exit_dir.mkdir(parents=True, exist_ok=True)
    tmp = exit_dir / f".rank-{local_rank}.json.tmp"
    tmp.write_text(json.dumps({"code": int(code), "reason": reason}))
    tmp.replace(exit_dir / f"rank-{local_rank}.json")


def write_worker_pid(exit_dir: Path, local_rank: int) -> None:
    exit_dir.mkdir(parents=True, exist_ok=True)
    (exit_dir / f"rank-{local_rank}.pid").write_text(str(os.getpid()))


def read_worker_exits(exit_dir: Path, nproc: int, *, missing: ExitCode) -> list[WorkerExit]:
    """One :class:`WorkerExit` per local rank; a worker that wrote nothing (killed, crashed in C)
    counts as ``missing``."""
    exits = []
    for rank in range(nproc):
        path = exit_dir / f"rank-{rank}.json"
        try:
            data = json.loads(path.read_text())
            exits.append(WorkerExit(rank, as_exit_code(int(data["code"])), str(data.get("reason", ""))))
        except (OSError, ValueError, KeyError, TypeError):
            exits.append(WorkerExit(rank, missing, f"worker {rank} ended without reporting an exit code"))
    return exits


def write_termination_log(reason: str, env: Mapping[str, str] = os.environ) -> None:
    """Write the one-paragraph reason Kubernetes shows in the pod status; never fails."""
    path = env.get("FTJ_TERMINATION_LOG") or "/dev/termination-log"
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(" ".join(reason.split())[:4000])
    except OSError as exc:
        log.debug("termination log %s not writable: %s", path, exc)


class _Forwarder:
    """SIGTERM/SIGINT handler of the launcher: remember the signal, pass SIGTERM to the workers."""

    def __init__(self, exit_dir: Path) -> None:
        self.exit_dir = exit_dir
        self.received: int | None = None
        self.torchrun: subprocess.Popen[bytes] | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = signum
        if first:
            log.warning("received signal %d: asking the workers to checkpoint and stop", signum)
        pids = [p for p in self.exit_dir.glob("rank-*.pid") if p.is_file()]
        if not pids and self.torchrun is not None and self.torchrun.poll() is None:
            self.torchrun.send_signal(signal.SIGTERM)  # workers not started yet: nothing to save
        for pid_file in pids:
            with contextlib.suppress(OSError, ValueError):  # already gone
                os.kill(int(pid_file.read_text()), signal.SIGTERM)


STALE_BUILD_LOCK_SECONDS = 300.0


def clear_stale_build_locks(
    env: Mapping[str, str] = os.environ, max_age_s: float = STALE_BUILD_LOCK_SECONDS
) -> list[Path]:
    """Remove torch extension build locks that a killed process left behind; returns them.

    Each process that loads a JIT-built op (DeepSpeed's shared-memory all-reduce on the CPU, for
    one) takes ``<extensions dir>/<op>/lock`` for a moment, even when nothing needs building, and
    deletes it after. A worker SIGKILLed in that moment leaves it, and every later worker on the
    machine waits for it forever. A build takes a minute or two: an older lock is a leftover.
    """
    root = Path(env.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
                log.warning("removed %s: a build lock left by a killed process", lock)
        except FileNotFoundError:
            pass
    return removed


def run_workers(place: GangPlace, config_path: Path, workdir: Path, config: RunConfig) -> ExitCode:
    """Start torchrun, forward SIGTERM to the workers, and return the worst worker outcome.

    The reason of a non-retryable outcome goes to the termination log.
    """
    exit_dir = workdir / "exit"
    shutil.rmtree(exit_dir, ignore_errors=True)
    shutil.rmtree(workdir / "run", ignore_errors=True)  # local checkpoints of an earlier run
    exit_dir.mkdir(parents=True)
    clear_stale_build_locks()
    forwarder = _Forwarder(exit_dir)
    previous = {s: signal.signal(s, forwarder) for s in (signal.SIGTERM, signal.SIGINT)}
    cmd = torchrun_command(
        place, config_path, workdir, rdzv_timeout_s=config.distributed.rdzv_timeout_seconds
    )
    env = {**os.environ, EXIT_DIR_ENV: str(exit_dir), "NODE_RANK": str(place.node_rank)}
    log.info(
        "node %d/%d: starting %d worker(s), rendezvous %s:%d",
        place.node_rank,
        place.nnodes,
        place.nproc_per_node,
        place.master_addr,
        place.master_port,
    )
    started = time.monotonic()
    try:
        # A new session: a terminal's Ctrl-C reaches only the launcher, which forwards it once.
        forwarder.torchrun = subprocess.Popen(cmd, env=env, start_new_session=True)
        if forwarder.received is not None:
            forwarder(forwarder.received, None)
        rc = forwarder.torchrun.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    preempted = forwarder.received is not None
    if rc == 0:
        return ExitCode.OK
    exits = read_worker_exits(
        exit_dir, place.nproc_per_node, missing=ExitCode.PREEMPTED if preempted else ExitCode.ERROR
    )
    code = worst_exit(e.code for e in exits)
    reason = next((e.reason for e in exits if e.code == code and e.reason), "")
    log.info(
        "workers ended after %.0fs: torchrun %d, exit %s (%d)",
        time.monotonic() - started,
        rc,
        code.name,
        code,
    )
    if code == ExitCode.OK:
        code = ExitCode.ERROR  # torchrun itself failed (rendezvous timeout, bad flag)
        reason = f"torchrun exited with {rc} while every worker reported success"
    if not code.retryable:
        write_termination_log(reason or f"trainer failed: {code.name}")
    return code


class _Preempted(Exception):
    """SIGTERM while the node was still being prepared: nothing to save yet."""


def _raise_preempted(signum: int, frame: FrameType | None) -> None:
    raise _Preempted(f"signal {signum} while preparing the node")


def launcher_main(config_path: Path, workdir: Path) -> int:
    """``python -m finetune_trainer run``: prepare this node, run its workers, return the pod's exit code."""
    from finetune_trainer.progress import NullReporter, RateLimited, make_reporter, now_iso
    from finetune_trainer.runconfig import ProgressReport
    from finetune_trainer.train import classify, load_run_config

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s [launcher] %(name)s: %(message)s"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    reporter: RateLimited = RateLimited(NullReporter(), 0)
    attempt = 1
    previous = {s: signal.signal(s, _raise_preempted) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        config = load_run_config(config_path)
        attempt = config.job.attempt
        place = place_from_env(os.environ, config)
        if place.node_rank == 0:
            reporter = make_reporter(config.progress)
            reporter.report(ProgressReport(attempt=attempt, state="initializing", time=now_iso()))
        from finetune_trainer.s3 import ObjectStore
        from finetune_trainer.stage import stage

        stage(config, workdir, ObjectStore(config.s3), world_size=place.world_size)
    except _Preempted as exc:
        log.warning("%s: exiting", exc)
        return int(ExitCode.PREEMPTED)
    except Exception as exc:
        code, reason = classify(exc)
        log.error("%s", reason, exc_info=code == ExitCode.ERROR)
        if not code.retryable:
            write_termination_log(reason)
        reporter.report(
            ProgressReport(attempt=attempt, state="failed", message=reason[:1000], time=now_iso())
        )
        reporter.close()
        return int(code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    reporter.close()
    return int(run_workers(place, config_path, workdir, config))
