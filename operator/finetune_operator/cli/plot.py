"""``ftjob plot NAME``: a PNG of train/eval loss and learning rate over steps, restarts marked.

The data is the trainer's TensorBoard log, uploaded to ``<checkpoints.uri>/<namespace>/<name>/
tensorboard/`` at every checkpoint and at the end. Every attempt writes its own event file, so
the attempts are the files: where a later attempt's first step lies, a restart is marked (a resumed
attempt repeats the steps after its checkpoint; the later attempt's values win).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_operator import api
from finetune_operator.cli import output
from finetune_operator.cli.cluster import Cluster, add_cluster_options
from finetune_operator.cli.errors import CliError
from finetune_operator.cli.storage import (
    add_s3_option,
    endpoint_for,
    object_store,
    started_checkpoint_prefix,
    storage_error,
)
from finetune_operator.cli.tbevents import Scalar, read_scalars
from finetune_trainer.s3 import StorageError

TRAIN_LOSS, EVAL_LOSS, LEARNING_RATE = "train/loss", "eval/loss", "train/learning_rate"
EVENT_MARK = "tfevents"


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "plot",
        help="write a PNG of train/eval loss and learning rate over steps (restarts marked)",
        description="Write a PNG of a job's train and eval loss and learning rate over steps, from "
        "the TensorBoard logs the trainer uploads next to the checkpoints in S3 "
        "(<checkpoints.uri>/<namespace>/<name>/tensorboard/). Restarts (attempt boundaries) are dashed "
        "vertical lines.",
    )
    parser.add_argument("name", help="FineTuneJob name")
    parser.add_argument("-f", "--file", help="PNG to write (default: <name>-curves.png)")
    parser.add_argument(
        "--width", type=int, default=1200, help="image width in pixels (default: %(default)s)"
    )
    parser.add_argument(
        "--height", type=int, default=800, help="image height in pixels (default: %(default)s)"
    )
    parser.add_argument(
        "--tensorboard-dir",
        help="read event files from this local folder instead of S3 (e.g. a run --local work folder); "
        "no cluster needed",
    )
    add_s3_option(parser)
    add_cluster_options(parser)
    output.add_output_option(parser)
    parser.set_defaults(run=run)


@dataclass
class Curves:
    """Per-step values by series, and the steps where a new attempt took over."""

    train_loss: dict[int, float] = field(default_factory=dict)
    eval_loss: dict[int, float] = field(default_factory=dict)
    learning_rate: dict[int, float] = field(default_factory=dict)
    restarts: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def pairs(series: dict[int, float]) -> list[list[float]]:
            return [[step, series[step]] for step in sorted(series)]

        return {
            "trainLoss": pairs(self.train_loss),
            "evalLoss": pairs(self.eval_loss),
            "learningRate": pairs(self.learning_rate),
            "restarts": self.restarts,
        }


def curves(files: list[list[Scalar]]) -> Curves:
    """Merge the scalars of every event file (one per attempt) into curves. Pure.

    Files are ordered by their first wall time; a later file's value for a step replaces an earlier
    one (the step was trained again after a restart), and each later file's first step is a restart.
    """
    ordered = sorted((f for f in files if f), key=lambda scalars: min(s.wall_time for s in scalars))
    out = Curves()
    series = {TRAIN_LOSS: out.train_loss, EVAL_LOSS: out.eval_loss, LEARNING_RATE: out.learning_rate}
    for index, scalars in enumerate(ordered):
        mine = [s for s in scalars if s.tag in series]
        if not mine:
            continue
        if index > 0 and any((out.train_loss, out.eval_loss, out.learning_rate)):
            out.restarts.append(min(s.step for s in mine))
        for scalar in sorted(mine, key=lambda s: s.wall_time):
            series[scalar.tag][scalar.step] = scalar.value
    return out


def draw(data: Curves, title: str, path: Path, width: int, height: int) -> None:
    """Loss (train, eval) above, learning rate below, restarts as dashed lines; a PNG at ``path``."""
    try:
        import matplotlib
    except ImportError:
        raise CliError(
            "ftjob plot needs matplotlib", "install the CLI's extra: pip install 'finetune-operator[cli]'"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, (loss_ax, lr_ax) = plt.subplots(
        2, 1, figsize=(width / dpi, height / dpi), dpi=dpi, sharex=True, height_ratios=(2, 1)
    )
    try:
        if data.train_loss:
            steps = sorted(data.train_loss)
            loss_ax.plot(steps, [data.train_loss[s] for s in steps], color="tab:blue", label="train loss")
        if data.eval_loss:
            steps = sorted(data.eval_loss)
            loss_ax.plot(
                steps, [data.eval_loss[s] for s in steps], color="tab:orange", marker="o", label="eval loss"
            )
        if data.learning_rate:
            steps = sorted(data.learning_rate)
            lr_ax.plot(
                steps, [data.learning_rate[s] for s in steps], color="tab:green", label="learning rate"
            )
        for number, step in enumerate(data.restarts, start=2):
            for ax in (loss_ax, lr_ax):
                ax.axvline(step, color="tab:red", linestyle="--", linewidth=1)
            loss_ax.annotate(
                f"attempt {number}",
                (step, 1),
                xycoords=("data", "axes fraction"),
                color="tab:red",
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
            )
        loss_ax.set_title(title)
        loss_ax.set_ylabel("loss")
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_xlabel("step")
        for ax in (loss_ax, lr_ax):
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper right")
        fig.savefig(path, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def _from_s3(args: argparse.Namespace) -> tuple[list[list[Scalar]], str]:
    cluster = Cluster.from_args(args)
    try:
        obj = cluster.get_job(args.name)
    finally:
        cluster.close()
    job = api.FineTuneJob.model_validate(obj)
    prefix = started_checkpoint_prefix(job) + "tensorboard/"
    store = object_store(endpoint_for(args, obj.get("spec")), job.spec.storage.region)
    try:
        keys = [uri for uri in store.list_keys(prefix) if EVENT_MARK in uri.rsplit("/", 1)[-1]]
        return [read_scalars(store.read_bytes(uri)) for uri in keys], prefix
    except StorageError as exc:
        raise storage_error(exc) from None


def _from_dir(folder: str) -> tuple[list[list[Scalar]], str]:
    root = Path(folder)
    if not root.is_dir():
        raise CliError(f"{folder} is not a folder", "pass the folder holding events.out.tfevents.* files")
    files = sorted(p for p in root.rglob(f"*{EVENT_MARK}*") if p.is_file())
    return [read_scalars(p.read_bytes()) for p in files], folder


def run(args: argparse.Namespace) -> int:
    files, where = _from_dir(args.tensorboard_dir) if args.tensorboard_dir else _from_s3(args)
    data = curves(files)
    if not (data.train_loss or data.eval_loss):
        raise CliError(
            f"no loss curves under {where} yet",
            "the trainer uploads them at every checkpoint and at the end: try again after the first one",
        )
    if args.width < 200 or args.height < 150:
        raise CliError(f"{args.width}x{args.height} pixels is too small for a plot", "use at least 200x150")
    path = Path(args.file or f"{args.name}-curves.png")
    with tempfile.NamedTemporaryFile(dir=path.parent.resolve(), suffix=".png", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        draw(data, f"{args.name}: loss and learning rate", partial, args.width, args.height)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    if args.output == "table":
        restarts = f", restarts at steps {', '.join(map(str, data.restarts))}" if data.restarts else ""
        print(f"wrote {path} ({len(data.train_loss)} train, {len(data.eval_loss)} eval points{restarts})")
    else:
        print(output.dump({"file": str(path), "source": where, **data.to_dict()}, args.output))
    return 0
