"""Containers as local processes: start, watch, stop, and find every descendant to leave none behind.

Each container's process starts in a session of its own (its own process group), with stdout and
stderr in the container's log file. A container runtime kills everything in a container when its
main process ends or the pod is deleted; here "everything" is found through the environment: every
process started for a container carries FTJ_NODEAGENT_NODE/_POD_UID/_CONTAINER, and its children
inherit them even when they start their own session (torchrun does), so /proc tells which processes
belong to which container. The main process also dies with the agent (PR_SET_PDEATHSIG), and an
agent that starts kills what an agent of the same node name left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from finetune_devenv.nodeagent.context import TAG_CONTAINER, TAG_NODE, TAG_POD_UID, Layout
from finetune_devenv.nodeagent.pods import PodPlan, ProcessSpec
from finetune_devenv.nodeagent.status import (
    PodView,
    Running,
    State,
    Terminated,
    Waiting,
    exit_code,
    terminated,
    termination_message,
)

LOG_TAIL_BYTES = 64 * 1024
"""Enough of a log for FallbackToLogsOnError (80 lines, 2048 bytes) without reading a whole run's log."""
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_agent() -> None:  # runs in the child between fork and exec: nothing but one syscall
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def tagged_pids(node: str, uid: str | None = None, container: str | None = None) -> list[int]:
    """Processes started for `node` (and pod `uid`, and `container`), found by their environment."""
    wanted = {f"{TAG_NODE}={node}".encode()}
    if uid is not None:
        wanted.add(f"{TAG_POD_UID}={uid}".encode())
    if container is not None:
        wanted.add(f"{TAG_CONTAINER}={container}".encode())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if wanted <= set((entry / "environ").read_bytes().split(b"\0")):
                found.append(int(entry.name))
    return found


def kill_tagged(node: str, uid: str | None = None, container: str | None = None) -> int:
    """SIGKILL every process tagged for node/pod/container; returns how many were signalled."""
    pids = tagged_pids(node, uid, container)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def materialise(plan: PodPlan, layout: Layout) -> None:
    """Write the pod's sandbox: folders, volume files (with their modes), log folder."""
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.root.chmod(0o700)  # secrets live in here
    layout.logs.mkdir(parents=True, exist_ok=True)
    for folder in plan.dirs:
        folder.mkdir(parents=True, exist_ok=True)
    for file in plan.files:
        file.path.parent.mkdir(parents=True, exist_ok=True)
        file.path.write_bytes(file.content)
        file.path.chmod(file.mode)


@dataclass
class Container:
    spec: ProcessSpec
    proc: subprocess.Popen[bytes] | None = None
    state: State = field(default_factory=lambda: Waiting("ContainerCreating"))


@dataclass
class PodRuntime:
    """One pod's processes on this node, and what the agent knows about them."""

    node: str
    uid: str
    layout: Layout
    containers: dict[str, Container]
    grace: float = 30.0
    """The pod's terminationGracePeriodSeconds: how long a stop without a deletion waits."""
    start_time: str = field(default_factory=now_iso)
    deadline: float | None = None
    """When termination escalates to SIGKILL (monotonic clock); None while not terminating."""

    @classmethod
    def start(cls, node: str, uid: str, plan: PodPlan, layout: Layout, grace: float) -> PodRuntime:
        runtime = cls(node, uid, layout, {p.container: Container(p) for p in plan.processes}, grace)
        for container in runtime.containers.values():
            runtime._spawn(container)
        return runtime

    def _spawn(self, container: Container) -> None:
        process, started = container.spec, now_iso()
        process.log.parent.mkdir(parents=True, exist_ok=True)
        process.log.with_suffix(".exitcode").unlink(missing_ok=True)
        try:
            with open(process.log, "wb") as log:
                container.proc = subprocess.Popen(
                    process.argv,
                    env=dict(process.env),
                    cwd=process.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_agent,  # one async-signal-safe syscall, nothing else
                )
        except OSError as exc:  # the runtime's StartError: command not found, not executable
            reason = f"failed to start {process.argv[0]!r}: {exc.strerror or exc}"
            container.state = Terminated(128, "StartError", now_iso(), reason, started)
            return
        container.state = Running(started, f"nodeagent://{container.proc.pid}")

    @property
    def running(self) -> list[Container]:
        return [c for c in self.containers.values() if c.proc is not None and c.proc.returncode is None]

    @property
    def finished(self) -> bool:
        return all(isinstance(c.state, Terminated) for c in self.containers.values())

    def poll(self) -> bool:
        """Notice containers that ended; returns True if any state changed."""
        changed = False
        for name, container in self.containers.items():
            if container.proc is None or container.proc.returncode is not None:
                continue
            code = container.proc.poll()
            if code is None:
                continue
            kill_tagged(self.node, self.uid, name)  # the container ends with its main process
            container.state = self._terminated(container, code)
            container.spec.log.with_suffix(".exitcode").write_text(f"{container.state.exit_code}\n")
            changed = True
        if self.deadline is not None and self.running and time.monotonic() >= self.deadline:
            self.kill()
        return changed

    def _terminated(self, container: Container, code: int) -> Terminated:
        spec, state = container.spec, container.state
        started = state.started_at if isinstance(state, Running | Terminated) else None
        file_text = _read(spec.termination_log)
        log_text = _read(spec.log, tail=LOG_TAIL_BYTES) if spec.fallback_to_logs else ""
        fallback = spec.fallback_to_logs
        message = termination_message(file_text, log_text, exit_code(code), fallback_to_logs=fallback)
        container_id = f"nodeagent://{container.proc.pid}" if container.proc else ""
        return terminated(
            code,
            started_at=started or now_iso(),
            finished_at=now_iso(),
            message=message,
            container_id=container_id,
        )

    def terminate(self, grace_seconds: float) -> None:
        """SIGTERM every container's process group; SIGKILL follows after `grace_seconds` (see poll)."""
        deadline = time.monotonic() + max(grace_seconds, 0)
        self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)
        for container in self.running:
            assert container.proc is not None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(container.proc.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL every process of the pod, whatever session it runs in."""
        for container in self.running:
            assert container.proc is not None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(container.proc.pid, signal.SIGKILL)
        kill_tagged(self.node, self.uid)

    def view(self) -> PodView:
        return PodView({n: c.state for n, c in self.containers.items()}, start_time=self.start_time)


def _read(path: Path, *, tail: int | None = None) -> str:
    """The file's text (its last `tail` bytes only, if given); "" when it cannot be read."""
    try:
        with open(path, "rb") as f:
            if tail is not None and f.seek(0, os.SEEK_END) > tail:
                f.seek(-tail, os.SEEK_END)
            else:
                f.seek(0)
            return f.read().decode(errors="replace")
    except OSError:
        return ""
