"""``python -m finetune_devenv.nodeagent run|up|down|logs``: the node agent in the foreground or detached.

run   --kubeconfig K [--node-name N] [--gpus 8] [--state-dir D] [--namespace NS]   (foreground)
up    (same options)  start `run` detached; state, pidfile and log under the state dir
down  [--state-dir D] stop it: its pods are stopped and marked Failed like on a node shutdown
logs  [-n NS] POD [-c CONTAINER] [-f]   what `kubectl logs` would print (it needs a real kubelet)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from finetune_devenv import _proc

STATE_DIR = _proc.REPO_ROOT / ".local" / "nodeagent"
CLUSTER_KUBECONFIG = _proc.REPO_ROOT / ".local" / "cluster" / "kubeconfig"
DEFAULT_NODE = "ftj-dev-node"


def _state_file(state_dir: Path) -> Path:
    return state_dir / "agent.json"


def _running(state_dir: Path) -> dict[str, object] | None:
    state = _proc.read_state(_state_file(state_dir))
    return state if state is not None and _proc.pid_alive(int(state["pid"])) else None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_devenv.nodeagent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "up"):
        p = sub.add_parser(
            name, help="run the agent in the foreground" if name == "run" else "run it detached"
        )
        default_kubeconfig = os.environ.get("KUBECONFIG") or str(CLUSTER_KUBECONFIG)
        p.add_argument(
            "--kubeconfig", default=default_kubeconfig, help="default: $KUBECONFIG, else `make cluster`'s"
        )
        p.add_argument("--context", default=None)
        p.add_argument("--node-name", default=DEFAULT_NODE)
        p.add_argument(
            "--gpus", type=int, default=8, help="fake GPU capacity so GPU requests schedule (0: none)"
        )
        p.add_argument("--gpu-resource", default="nvidia.com/gpu")
        p.add_argument("--namespace", default=None, help="only run pods of this namespace")
        p.add_argument("--label", action="append", default=[], metavar="K=V", help="extra node label")
        p.add_argument(
            "--capacity",
            action="append",
            default=[],
            metavar="RESOURCE=QUANTITY",
            help="announce this capacity instead of the machine's (e.g. cpu=16); not enforced",
        )
        p.add_argument(
            "--pass-env",
            action="append",
            default=[],
            metavar="NAME",
            help="pass this variable from the agent's environment to every container",
        )
        p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds pods get to stop on exit")
        p.add_argument("--resync-seconds", type=int, default=30)
        p.add_argument("--state-dir", type=Path, default=STATE_DIR)
    down = sub.add_parser("down", help="stop the detached agent")
    down.add_argument("--state-dir", type=Path, default=STATE_DIR)
    logs = sub.add_parser("logs", help="print a container's log (stdout and stderr)")
    logs.add_argument("pod")
    logs.add_argument("-n", "--namespace", default="default")
    logs.add_argument("-c", "--container", default=None)
    logs.add_argument("-f", "--follow", action="store_true", help="until the container ends (or Ctrl-C)")
    logs.add_argument("--state-dir", type=Path, default=STATE_DIR)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.state_dir = args.state_dir.resolve()
    if args.cmd == "run":
        return _run(args)
    if args.cmd == "up":
        return _up(args, argv if argv is not None else sys.argv[1:])
    if args.cmd == "down":
        return _down(args.state_dir)
    return _logs(args)


def _run(args: argparse.Namespace) -> int:
    from finetune_devenv.nodeagent.agent import Agent, AgentConfig
    from finetune_devenv.nodeagent.kube import Kube

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if (other := _running(args.state_dir)) is not None and other["pid"] != os.getpid():
        print(
            f"another node agent (pid {other['pid']}) uses {args.state_dir}; stop it first", file=sys.stderr
        )
        return 1
    labels = dict(item.split("=", 1) for item in args.label)
    capacity = dict(item.split("=", 1) for item in args.capacity)
    cfg = AgentConfig(
        node_name=args.node_name,
        state_dir=args.state_dir,
        gpus=args.gpus,
        gpu_resource=args.gpu_resource,
        namespace=args.namespace,
        labels=labels,
        capacity=capacity,
        pass_env=tuple(args.pass_env),
        shutdown_grace=args.shutdown_grace,
        resync_seconds=args.resync_seconds,
    )
    agent = Agent(Kube.from_kubeconfig(args.kubeconfig, args.context), cfg)

    def stop(signum: int, frame: FrameType | None) -> None:
        agent.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    state = {"pid": os.getpid(), "node": args.node_name, "kubeconfig": str(args.kubeconfig)}
    try:
        agent.run(on_ready=lambda: _proc.write_state(_state_file(args.state_dir), state))
    finally:
        if (_proc.read_state(_state_file(args.state_dir)) or {}).get("pid") == os.getpid():
            _state_file(args.state_dir).unlink(missing_ok=True)
    return 0


def _up(args: argparse.Namespace, argv: list[str]) -> int:
    if (state := _running(args.state_dir)) is not None:
        print(f"# node agent already running (pid {state['pid']}, node {state['node']})", file=sys.stderr)
        return 0
    log = args.state_dir / "agent.log"
    run_argv = [sys.executable, "-m", "finetune_devenv.nodeagent", "run", *argv[argv.index("up") + 1 :]]
    if "--state-dir" not in argv:
        run_argv += ["--state-dir", str(args.state_dir)]
    proc = _proc.spawn(
        run_argv, log=log, env={**os.environ, "PYTHONUNBUFFERED": "1"}, die_with_parent=False
    )  # detached: it outlives this command
    started = time.monotonic()

    def ready() -> bool:
        state = _proc.read_state(_state_file(args.state_dir))
        return state is not None and state.get("pid") == proc.pid

    _proc.wait_until(ready, timeout=60, what="node agent", proc=proc, log=log)
    took = time.monotonic() - started
    print(
        f"# node agent up in {took:.1f}s (pid {proc.pid}, node {args.node_name}), log {log}", file=sys.stderr
    )
    print(f"# logs: {sys.executable} -m finetune_devenv.nodeagent logs -n NS POD [-f]", file=sys.stderr)
    print(f"# stop with: {sys.executable} -m finetune_devenv.nodeagent down", file=sys.stderr)
    return 0


def _down(state_dir: Path) -> int:
    state = _running(state_dir)
    if state is None:
        print("# no node agent is running", file=sys.stderr)
        _state_file(state_dir).unlink(missing_ok=True)
        return 0
    pid = int(str(state["pid"]))
    _proc.stop_group(pid, timeout=60)  # the agent gives its pods their grace period, then exits
    _state_file(state_dir).unlink(missing_ok=True)
    print(f"# node agent stopped (pid {pid}); its pods were stopped and marked Failed", file=sys.stderr)
    return 0


def _logs(args: argparse.Namespace) -> int:
    folder = args.state_dir / "logs" / args.namespace / args.pod
    logs = sorted(folder.glob("*.log"))
    if args.container is not None:
        logs = [p for p in logs if p.stem == args.container]
    if len(logs) != 1:
        names = ", ".join(p.stem for p in sorted(folder.glob("*.log"))) or "none"
        print(
            f"pod {args.namespace}/{args.pod}: choose one container with -c (logs found: {names})",
            file=sys.stderr,
        )
        return 1
    path, out = logs[0], sys.stdout.buffer
    with open(path, "rb") as f:
        while True:
            chunk = f.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not args.follow or path.with_suffix(".exitcode").exists():
                return 0
            try:
                time.sleep(0.2)
            except KeyboardInterrupt:
                return 0
