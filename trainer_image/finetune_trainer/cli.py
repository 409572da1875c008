"""Command line of the trainer image (its ENTRYPOINT). Thin: heavy imports happen in the commands.

python -m finetune_trainer [run] [--config PATH] [--workdir DIR]   the pod's program (launcher)
python -m finetune_trainer worker --config PATH --workdir DIR      one process, started by torchrun
python -m finetune_trainer validate DATA [--method sft|dpo] ...    check a dataset, no GPU needed
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from finetune_trainer.launch import DEFAULT_WORKDIR
from finetune_trainer.runconfig import RUN_CONFIG_ENV

COMMANDS = ("run", "worker", "validate")

_EPILOG = f"""\
environment (set by the operator in every pod; all optional for a local run):
  NODE_RANK / JOB_COMPLETION_INDEX   this pod's node rank (default 0)
  NNODES, NPROC_PER_NODE             gang shape (default: the run config's distributed section)
  MASTER_ADDR, MASTER_PORT           node 0's rendezvous address (default 127.0.0.1, distributed.masterPort)
  {RUN_CONFIG_ENV:<34} default for --config
  FTJ_WORKDIR                        default for --workdir ({DEFAULT_WORKDIR})
  FTJ_TERMINATION_LOG                where a non-retryable failure's reason goes (/dev/termination-log)
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3   S3 access (never logged)

exit codes: 0 ok, 1 error (retry), 3 invalid data, 4 invalid config, 5 model or data not found,
143 preempted (final checkpoint written, retry)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_trainer",
        description="Fine-tune a causal LM with a LoRA/QLoRA adapter (SFT or DPO), checkpointing to S3. "
        "Without a command, 'run' is assumed.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="{run,worker,validate}")
    for name, help_text in (
        ("run", "prepare this node (validate data, fetch model and checkpoint) and start its workers"),
        ("worker", "one training process; started by 'run' through torchrun, not by hand"),
    ):
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument(
            "--config",
            type=Path,
            default=os.environ.get(RUN_CONFIG_ENV),
            help=f"run config JSON rendered by the operator (default ${RUN_CONFIG_ENV})",
        )
        sub.add_argument(
            "--workdir",
            type=Path,
            default=Path(os.environ.get("FTJ_WORKDIR") or DEFAULT_WORKDIR),
            help="local scratch folder for the model, the checkpoint and logs (default $FTJ_WORKDIR "
            f"or {DEFAULT_WORKDIR}); one per node",
        )
    commands.add_parser(
        "validate",
        help="check a dataset the way the trainer will (see 'validate --help')",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("-h", "--help")):
        args.insert(0, "run")
    if args[0] == "validate":
        from finetune_trainer.data import validate_main

        return validate_main(args[1:])
    parsed = _parser().parse_args(args)
    if parsed.config is None:
        print(f"error: no run config: pass --config or set {RUN_CONFIG_ENV}", file=sys.stderr)
        return 4
    if parsed.command == "worker":
        from finetune_trainer.train import worker_main

        _exit_at_once(worker_main(parsed.config, parsed.workdir))
    from finetune_trainer.launch import launcher_main

    return launcher_main(parsed.config, parsed.workdir)


def _exit_at_once(code: int) -> NoReturn:
    """End a worker without the interpreter's teardown.

    By the time ``worker_main`` returns, the checkpoint is committed, the exit file and the last
    progress report are written and the process group is gone; what is left is torch's and the
    tokenizers' native teardown, which took 5-10 s on a preempted CPU worker: time taken from the
    pod's grace period (and from every restart). Flush what Python buffered, then leave.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
