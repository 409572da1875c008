"""``ftjob watch NAME``: a live progress bar of one job until it ends.

At a terminal the screen is redrawn in place (rich Live): phase, attempt and restarts; a bar of
step/totalSteps with percent and ETA; loss, eval loss, learning rate, tokens/s; a sparkline of the
train losses seen while watching; the newest checkpoint. Piped, it prints one plain line per change;
with ``-o json`` one JSON object per change. The exit code says how the job ended: 0 Succeeded,
1 Failed or Cancelled (with the status message).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from finetune_operator.cli import output
from finetune_operator.cli.cluster import Cluster, add_cluster_options
from finetune_operator.cli.errors import CliError
from finetune_operator.cli.view import JobView

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 60
"""Train losses kept for the sparkline (the newest ones)."""
PHASE_STYLE = {
    "Succeeded": "bold green",
    "Failed": "bold red",
    "Cancelled": "bold red",
    "Running": "bold cyan",
}


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "watch",
        help="follow a job live: progress bar, loss, tokens/s, ETA, restarts, checkpoints",
        description="Follow one FineTuneJob until it ends: a live progress bar with step, loss, tokens/s "
        "and ETA, restarts, the newest checkpoint and a sparkline of the train loss. Exits 0 when the job "
        "succeeded, 1 when it failed or was cancelled.",
    )
    parser.add_argument("name", help="FineTuneJob name")
    parser.add_argument("--once", action="store_true", help="print one frame and exit")
    parser.add_argument(
        "--interval", type=float, default=1.0, help="seconds between polls (default: %(default)s)"
    )
    parser.add_argument("--timeout", type=float, help="give up after this many seconds (exit 1)")
    add_cluster_options(parser)
    output.add_output_option(parser)
    parser.set_defaults(run=run)


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """The last ``width`` values as block characters, lowest to highest. Pure."""
    shown = list(values)[-width:]
    if not shown:
        return ""
    low, high = min(shown), max(shown)
    if high == low:
        return SPARK[len(SPARK) // 2] * len(shown)
    scale = (len(SPARK) - 1) / (high - low)
    return "".join(SPARK[round((v - low) * scale)] for v in shown)


class LossHistory:
    """Train losses by step as seen while watching (a restart may report a step again: latest wins)."""

    def __init__(self, keep: int = HISTORY) -> None:
        self.keep = keep
        self.by_step: dict[int, float] = {}

    def add(self, view: JobView) -> None:
        if view.train_loss is not None and view.step > 0:
            self.by_step[view.step] = view.train_loss
            for step in sorted(self.by_step)[: -self.keep]:
                del self.by_step[step]

    def values(self) -> list[float]:
        return [self.by_step[s] for s in sorted(self.by_step)]


def frame(view: JobView, losses: Sequence[float]) -> RenderableType:
    """One screen of ``view``: header, progress bar, metrics, sparkline, checkpoint, message."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    header = Text.assemble(
        (view.name, "bold"),
        "  ",
        (view.phase, PHASE_STYLE.get(view.phase, "bold yellow")),
        f"  attempt {view.attempt}  restarts {view.restarts}",
    )
    bar = Table.grid(padding=(0, 2))
    bar.add_row(
        ProgressBar(
            total=float(view.total_steps or 1),
            completed=float(view.step if view.total_steps else 0),
            width=40,
        ),
        f"step {view.progress_text()}",
        f"ETA {output.duration(view.eta_seconds)}",
    )
    lr = f"{view.learning_rate:.2e}" if view.learning_rate is not None else "-"
    metrics = (
        f"loss {output.number(view.train_loss)}  eval loss {output.number(view.eval_loss)}  lr {lr}  "
        f"tokens/s {output.number(view.tokens_per_second, 5)}"
        + (f"  epoch {view.epoch:.2f}" if view.epoch is not None else "")
    )
    parts: list[RenderableType] = [header, bar, Text(metrics)]
    if losses:
        parts.append(Text(f"loss {sparkline(losses)}  (last {min(len(losses), 40)} logged steps)"))
    latest = view.latest_checkpoint
    parts.append(Text(f"checkpoint step {latest[0]}  {latest[1]}" if latest else "checkpoint none yet"))
    if view.adapter_uri:
        parts.append(Text(f"adapter {view.adapter_uri}", style="green"))
    if view.message:
        parts.append(Text(f"{view.reason + ': ' if view.reason else ''}{view.message}", style="dim"))
    return Group(*parts)


def plain_line(view: JobView) -> str:
    """One line per change, for logs and pipes."""
    latest = view.latest_checkpoint
    tokens = output.number(view.tokens_per_second, 5)
    return (
        f"{view.name} {view.phase} attempt {view.attempt} restarts {view.restarts} "
        f"step {view.progress_text()} loss {output.number(view.train_loss)} tokens/s {tokens} "
        f"ETA {output.duration(view.eta_seconds)} checkpoint {latest[0] if latest else '-'}"
    )


def outcome(view: JobView, hint: str | None = None) -> int:
    """Exit code for a job that ended: 0 Succeeded; 1 otherwise, with the reason as an error line."""
    if view.phase == "Succeeded":
        return 0
    why = ": ".join(p for p in (view.reason, view.message) if p) or "no message"
    raise CliError(
        f"finetunejob {view.name} {view.phase.lower()}: {why}",
        hint or f"see its logs: ftjob logs {view.name}",
    )


def follow(
    fetch: Callable[[], JobView],
    *,
    mode: str,
    interval: float,
    once: bool = False,
    timeout: float | None = None,
    console: Console | None = None,
    failure_hint: str | None = None,
) -> int:
    """Poll ``fetch`` and show each change until the job ends; returns the exit code.

    ``mode``: ``live`` (rich, redrawn in place), ``plain`` (a line per change) or ``json``.
    """
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        raise CliError(
            "the rich package is missing", "install the CLI's extra: pip install 'finetune-operator[cli]'"
        ) from None
    console = console or Console()
    history = LossHistory()
    view = fetch()
    history.add(view)
    if once:
        _show_static(view, history, mode, console)
        return outcome(view, failure_hint) if view.final else 0
    deadline = None if timeout is None else time.monotonic() + timeout
    if mode == "live":
        with Live(
            frame(view, history.values()), console=console, refresh_per_second=4, transient=False
        ) as live:
            while not view.final:
                _wait(interval, deadline, view)
                view = fetch()
                history.add(view)
                live.update(frame(view, history.values()))
        return outcome(view, failure_hint)
    last = None
    while True:
        shown = _static_text(view, mode)
        if shown != last:
            print(shown, flush=True)
            last = shown
        if view.final:
            return outcome(view, failure_hint)
        _wait(interval, deadline, view)
        view = fetch()


def _show_static(view: JobView, history: LossHistory, mode: str, console: Console) -> None:
    if mode == "live":
        console.print(frame(view, history.values()))
    else:
        print(_static_text(view, mode), flush=True)


def _static_text(view: JobView, mode: str) -> str:
    return json.dumps(asdict(view)) if mode == "json" else plain_line(view)


def _wait(interval: float, deadline: float | None, view: JobView) -> None:
    if deadline is not None and time.monotonic() + interval > deadline:
        raise CliError(
            f"finetunejob {view.name} is still {view.phase} after the --timeout", "watch it again later"
        )
    time.sleep(interval)


def run(args: argparse.Namespace) -> int:
    cluster = Cluster.from_args(args)
    live = "live" if sys.stdout.isatty() else "plain"
    mode = "json" if args.output in ("json", "yaml") else live

    def fetch() -> JobView:
        return JobView.from_object(cluster.get_job(args.name))

    try:
        return follow(fetch, mode=mode, interval=args.interval, once=args.once, timeout=args.timeout)
    finally:
        cluster.close()
