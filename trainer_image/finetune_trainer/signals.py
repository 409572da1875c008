"""SIGTERM in a worker: remember it, and let the training loop stop at a step boundary.

Kubernetes sends SIGTERM before it evicts or preempts a pod, then waits the grace period. The
launcher forwards it to every worker; each worker only sets a flag here (a signal handler must not
do collective work). At the end of each step the ranks agree on the flag with one all-reduce, so
every rank saves the same step, and the trainer stops; the worker then exits with
``ExitCode.PREEMPTED`` once the final checkpoint is committed.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

_requested = threading.Event()


def install() -> None:
    """Route SIGTERM and SIGINT to the flag (call first thing in a worker)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _handle)


def _handle(signum: int, frame: FrameType | None) -> None:
    if not _requested.is_set():
        log.warning("signal %d received: will checkpoint at the end of this step and stop", signum)
    _requested.set()


def requested_locally() -> bool:
    return _requested.is_set()


def request() -> None:
    """Ask for a stop as if a signal had arrived (tests, and a peer's request)."""
    _requested.set()


def agreed() -> bool:
    """True when any rank received a stop signal. A collective: every rank must call it together."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _requested.is_set()
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([1 if _requested.is_set() else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        _requested.set()
    return bool(flag.item())
