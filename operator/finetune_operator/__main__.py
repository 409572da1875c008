"""``python -m finetune_operator``: run the operator (kopf) with JSON logs.

Settings come from ``FTJ_*`` environment variables (see :mod:`finetune_operator.settings`); the
command line only says where to watch and how to run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import kopf

from finetune_operator import settings as settings_mod
from finetune_operator.handlers import build_registry
from finetune_operator.k8s import Kube, load_api_client
from finetune_operator.metrics import Metrics
from finetune_operator.reconcile import Reconciler


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the object it is about, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ref = getattr(record, "k8s_ref", None)  # kopf's per-object loggers set it
        if isinstance(ref, dict):
            out["object"] = f"{ref.get('kind')} {ref.get('namespace')}/{ref.get('name')}"
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kopf logs every handler run at INFO ("Handler ... succeeded"); its warnings and errors stay.
    for noisy in ("kubernetes", "urllib3", "aiohttp", "kopf.objects"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_operator",
        description="Run the FineTuneJob operator; settings are FTJ_* environment variables.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("-n", "--namespace", action="append", help="watch this namespace (repeatable)")
    where.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument("--standalone", action="store_true", help="no peering (one operator replica)")
    peering.add_argument(
        "--peering",
        metavar="NAME",
        help="kopf peering object shared by the replicas (it must exist): the replica with the highest "
        "priority works, the others stand by",
    )
    parser.add_argument(
        "--priority",
        type=int,
        help="peering priority (default: earlier start = higher, so the oldest live replica works and "
        "a new one never takes over from a working one)",
    )
    parser.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="serve Prometheus /metrics on this port"
    )
    parser.add_argument(
        "--liveness", metavar="URL", help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz"
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        settings = settings_mod.from_env()
    except settings_mod.SettingsError as err:
        logging.getLogger(__name__).error("invalid setting: %s", err)
        return 2
    metrics = Metrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    reconciler = Reconciler(Kube(load_api_client(settings.max_workers + 4)), settings, metrics=metrics)
    kopf.run(
        registry=build_registry(reconciler),
        standalone=args.standalone,
        peering_name=args.peering,
        priority=peering_priority(args.priority) if args.peering else None,
        clusterwide=args.all_namespaces,
        namespaces=args.namespace or (),
        liveness_endpoint=args.liveness,
    )
    return 0


def peering_priority(given: int | None, now_ns: int | None = None) -> int:
    """``given``, else a priority that falls with the start time (microseconds; positive until 2112).

    kopf pauses every replica but the one with the highest priority, and pauses all of them if two
    share the highest one, so each replica needs its own: the earliest started wins, and a restarted
    or added replica joins as a standby instead of taking over from the one at work.
    """
    if given is not None:
        return given
    started = time.time_ns() if now_ns is None else now_ns
    return 2**52 - started // 1000


if __name__ == "__main__":
    sys.exit(main())
