"""``ftjob logs NAME``: the trainer's log of one rank of the current (or a given) attempt.

Pods are found by labels: ``finetune.dev/job-name`` and ``finetune.dev/attempt`` (the job's
``status.attempt`` unless ``--attempt``), the rank by the Indexed Job's completion index. The log
comes from the API server (the kubelet, really). The development node agent has no kubelet
endpoint: when the API server answers that it cannot reach one, the log is read from the agent's
files (``<state-dir>/logs/<namespace>/<pod>/<container>.log``) with a note saying so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune_operator import constants as c
from finetune_operator.cli.cluster import Cluster, add_cluster_options, api_error, api_message
from finetune_operator.cli.errors import CliError

NODE_AGENT_DIR_ENV = "FTJ_NODEAGENT_DIR"
DEFAULT_NODE_AGENT_DIR = ".local/nodeagent"
_NO_KUBELET = ("dial tcp", "connection refused", "no such host", "kubelet", "i/o timeout", "no route to host")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "logs",
        help="print (or follow) the trainer log of one rank",
        description="Print the trainer's log of one rank (node) of a job's current attempt. Falls back to "
        "the development node agent's log files when the cluster has no kubelet to ask.",
    )
    parser.add_argument("name", help="FineTuneJob name")
    parser.add_argument(
        "--rank", type=int, default=0, help="node rank (completion index) (default: %(default)s)"
    )
    parser.add_argument(
        "--attempt", type=int, help="attempt number (default: the current one, status.attempt)"
    )
    parser.add_argument("-f", "--follow", action="store_true", help="keep printing until the container ends")
    parser.add_argument(
        "--node-agent-dir",
        default=os.environ.get(NODE_AGENT_DIR_ENV, DEFAULT_NODE_AGENT_DIR),
        help=f"state folder of the dev node agent, for the fallback (default: ${NODE_AGENT_DIR_ENV} or "
        f"{DEFAULT_NODE_AGENT_DIR})",
    )
    add_cluster_options(parser)
    parser.set_defaults(run=run)


def find_pod(pods: list[dict[str, Any]], rank: int) -> dict[str, Any] | None:
    """The pod of ``rank`` (newest first if a rank was recreated). Pure."""
    mine = [p for p in pods if p["metadata"].get("labels", {}).get(c.COMPLETION_INDEX_LABEL) == str(rank)]
    mine.sort(key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True)
    return mine[0] if mine else None


def run(args: argparse.Namespace) -> int:
    cluster = Cluster.from_args(args)
    try:
        pod = _pod(cluster, args)
        name = pod["metadata"]["name"]
        for chunk in _log(cluster, args, name):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
    finally:
        cluster.close()
    return 0


def _pod(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    job = cluster.get_job(args.name)
    attempt = args.attempt or int((job.get("status") or {}).get("attempt") or 0)
    if attempt < 1:
        raise CliError(
            f"finetunejob {args.name} has not started an attempt yet", f"wait, or: ftjob watch {args.name}"
        )
    selector = f"{c.LABEL_JOB_NAME}={c.job_label(args.name)},{c.LABEL_ATTEMPT}={attempt}"
    pods = cluster.list_pods(selector)
    pod = find_pod(pods, args.rank)
    if pod is None:
        ranks = sorted({p["metadata"].get("labels", {}).get(c.COMPLETION_INDEX_LABEL, "?") for p in pods})
        found = f"ranks with pods: {', '.join(ranks)}" if ranks else "no pods yet"
        raise CliError(
            f"no pod for rank {args.rank} of attempt {attempt} of {args.name} ({found})",
            "pick another --rank or --attempt, or wait for the pods to be created",
        )
    return pod


def _log(cluster: Cluster, args: argparse.Namespace, pod: str) -> Iterator[bytes]:
    """From the API server; from the node agent's file when there is no kubelet to ask."""
    from kubernetes.client.exceptions import ApiException

    stream = cluster.pod_log(pod, c.CONTAINER_NAME, follow=args.follow)
    try:
        first = next(stream, b"")
    except ApiException as err:
        message = api_message(err)
        if err.status == 400 and ("ContainerCreating" in message or "waiting to start" in message):
            raise CliError(
                f"pod {pod} has not started yet: {message}", "try again in a moment, or add --follow"
            ) from None
        if err.status >= 500 and any(s in message.lower() for s in _NO_KUBELET):
            yield from _node_agent_log(cluster, args, pod)
            return
        raise api_error(err) from None
    yield first
    yield from stream


def _node_agent_log(cluster: Cluster, args: argparse.Namespace, pod: str) -> Iterator[bytes]:
    path = Path(args.node_agent_dir) / "logs" / cluster.namespace / pod / f"{c.CONTAINER_NAME}.log"
    if not path.is_file():
        raise CliError(
            f"the API server cannot reach a kubelet for pod {pod}, and there is no node agent log at {path}",
            "on a real cluster check the node; with the dev node agent pass --node-agent-dir",
        )
    print(f"note: no kubelet answered; reading the node agent's log file {path}", file=sys.stderr)
    with path.open("rb") as log:
        while True:
            chunk = log.read(64 * 1024)
            if chunk:
                yield chunk
                continue
            if not args.follow or _finished(cluster, pod):
                tail = log.read()
                if tail:
                    yield tail
                return
            time.sleep(0.5)


def _finished(cluster: Cluster, pod: str) -> bool:
    try:
        phase = (cluster.get_pod(pod).get("status") or {}).get("phase")
    except CliError:
        return True  # the pod is gone: its log is complete
    return phase in ("Succeeded", "Failed")
