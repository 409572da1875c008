"""``ftjob``: the command line for people who fine-tune (also ``kubectl ftjob``, as a kubectl plugin).

One subcommand per step of the daily loop; each lives in its own module and registers its parser:

=============================================  =======================================
validate                                       :mod:`.validate`
plan                                           :mod:`.plan`
submit, get, list, suspend, resume, cancel,    :mod:`.jobs`
checkpoints
watch                                          :mod:`.watch`
logs                                           :mod:`.logs`
plot                                           :mod:`.plot`
run --local                                    :mod:`.local`
=============================================  =======================================

Expected failures are one line, ``error: <what> — <what to do>``, exit code 1 (2 for a usage
error); ``-o json`` gives scripts a stable document everywhere.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from finetune_operator.cli.errors import EXIT_USAGE, CliError

HELP_WIDTH = 100
"""Help is wrapped at a fixed width, so docs/cli.md (generated from it) is the same everywhere."""

COMMAND_MODULES = ("validate", "plan", "jobs", "watch", "logs", "plot", "local")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=HELP_WIDTH, max_help_position=30)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # Descriptions are paragraphs: wrap each (RawDescription would keep long lines as they are).
        import textwrap

        paragraphs = text.split("\n\n")
        return "\n\n".join(
            textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent) for p in paragraphs
        )


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``error: <problem> — see '<prog> --help'``, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} — see '{self.prog} --help'", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def program_name(argv0: str | None = None) -> str:
    """``kubectl ftjob`` when run as the kubectl plugin (``kubectl-ftjob``), else ``ftjob``."""
    base = os.path.basename(argv0 if argv0 is not None else sys.argv[0])
    return "kubectl ftjob" if base.startswith("kubectl-ftjob") else "ftjob"


def build_parser(prog: str = "ftjob") -> Parser:
    import importlib

    parser = Parser(
        prog=prog,
        formatter_class=_Formatter,
        description="Fine-tune LLMs on Kubernetes with FineTuneJobs: check data, plan GPUs, submit, "
        "follow, inspect and plot jobs, or run one on this machine.",
        epilog="Every command explains its options with --help. Errors are one line: what went wrong, "
        "then what to do; -o json prints a stable document for scripts.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"finetune_operator.cli.{name}").register(commands)
    for sub in commands.choices.values():
        sub.formatter_class = _Formatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The console script ``ftjob`` (and ``kubectl-ftjob``)."""
    args = build_parser(program_name()).parse_args(argv)
    try:
        code: int = args.run(args)
    except CliError as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ftjob list | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code
