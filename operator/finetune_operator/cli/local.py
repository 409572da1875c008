"""``ftjob run --local MANIFEST``: the same job on this machine, without a cluster.

For trying a config before spending GPUs. The run config is rendered by the operator's own
:func:`finetune_operator.render.run_config` (exactly what a pod would get), then adjusted for one
machine: one node, ``--nproc`` processes (default ``gpusPerNode``, at least 1), progress to a local
file instead of the ConfigMap, and the CPU when ``gpusPerNode`` is 0. The trainer runs as the pod's
command does (``python -m finetune_trainer run``), its log goes to ``<workdir>/trainer.log``, and its
progress is shown live. S3 is whatever the manifest names (``spec.storage.endpointUrl``, or
``--s3-endpoint``), with the AWS_* credentials of this environment.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pydantic

from finetune_operator.cli import manifests, output
from finetune_operator.cli.errors import CliError
from finetune_operator.cli.storage import add_s3_option
from finetune_operator.cli.view import JobView
from finetune_operator.cli.watch import follow
from finetune_operator.render import NoCheckpointLocation, run_config
from finetune_operator.settings import Settings
from finetune_trainer.runconfig import ExitCode, ProgressConfig, ProgressReport, RunConfig

PROGRESS_FILE = "progress.json"
LOG_FILE = "trainer.log"
STOP_GRACE_SECONDS = 120.0


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        help="run a FineTuneJob on this machine (--local), without a cluster",
        description="Run the job on this machine, without a cluster, for trying a config before spending "
        "GPUs: the operator's own run-config rendering, the trainer as a local process (one node, --nproc "
        "processes), real S3 (the manifest's endpoint or --s3-endpoint, AWS_* credentials from the "
        "environment). Progress is shown live; the trainer's log goes to <workdir>/trainer.log.",
    )
    parser.add_argument("manifest", help="FineTuneJob YAML")
    parser.add_argument(
        "--local",
        action="store_true",
        required=True,
        help="run here (required: the cluster way is ftjob submit)",
    )
    parser.add_argument(
        "--nproc", type=int, help="training processes (default: resources.gpusPerNode, at least 1)"
    )
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if there is a GPU")
    parser.add_argument("--workdir", help="work folder (default: a new temporary folder, kept afterwards)")
    parser.add_argument(
        "--namespace",
        help="namespace part of the checkpoint path (default: the manifest's metadata.namespace, else local)",
    )
    parser.add_argument(
        "--checkpoints-uri",
        help="where checkpoints go when the manifest sets no spec.checkpoints.uri "
        "(the operator would use the platform's defaults.checkpointUri)",
    )
    add_s3_option(parser)
    output.add_output_option(parser)
    parser.set_defaults(run=run)


def local_config(
    manifest: manifests.Manifest,
    *,
    namespace: str,
    workdir: Path,
    nproc: int | None,
    cpu: bool,
    s3_endpoint: str | None,
    checkpoints_uri: str | None = None,
) -> RunConfig:
    """The operator's run config for attempt 1 of the job, adjusted for one local machine. Pure."""
    job = manifest.job.model_copy(update={"metadata": {**manifest.job.metadata, "namespace": namespace}})
    try:
        config = run_config(job, 1, None, Settings(default_checkpoint_uri=checkpoints_uri))
    except NoCheckpointLocation:
        raise CliError(
            "spec.checkpoints.uri is unset: a local run has no platform default",
            "set it in the manifest or pass --checkpoints-uri s3://bucket/prefix/",
        ) from None
    procs = nproc or max(job.spec.resources.gpus_per_node, 1)
    s3 = config.s3
    if s3_endpoint:
        s3 = s3.model_copy(update={"endpoint_url": s3_endpoint, "addressing_style": "path"})
    try:
        return RunConfig.model_validate(
            {
                **config.model_dump(),
                "distributed": {**config.distributed.model_dump(), "nodes": 1, "procs_per_node": procs},
                "progress": ProgressConfig(
                    transport="file", path=str(workdir / PROGRESS_FILE), min_interval_seconds=0.5
                ).model_dump(),
                "s3": s3.model_dump(),
                "device": "cpu" if cpu or job.spec.resources.gpus_per_node == 0 else "auto",
            }
        )
    except pydantic.ValidationError as exc:
        raise CliError(f"cannot run this job locally: {exc.errors()[0]['msg']}", "check --nproc") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalRun:
    """The trainer as one local "pod": its process, its progress file and its log."""

    def __init__(self, name: str, config: RunConfig, workdir: Path) -> None:
        self.name = name
        self.config = config
        self.workdir = workdir
        self.config_path = workdir / "run-config.json"
        self.log_path = workdir / LOG_FILE
        self.termination_log = workdir / "termination-log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config.model_dump(mode="json"), indent=1))
        env = {
            **os.environ,
            "NODE_RANK": "0",
            "NNODES": "1",
            "NPROC_PER_NODE": str(self.config.distributed.procs_per_node),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "FTJ_TERMINATION_LOG": str(self.termination_log),
            "PYTHONUNBUFFERED": "1",
        }
        argv = [sys.executable, "-m", "finetune_trainer", "run", "--config", str(self.config_path)]
        argv += ["--workdir", str(self.workdir / "work")]
        with self.log_path.open("ab") as log:
            # A session of its own: Ctrl-C reaches ftjob, which asks the trainer to stop once.
            self.proc = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def view(self) -> JobView:
        """The latest progress report; once the process ended, its outcome."""
        assert self.proc is not None
        try:
            report = ProgressReport.model_validate_json((self.workdir / PROGRESS_FILE).read_text())
            view = JobView.from_report(self.name, report)
        except (OSError, ValueError):
            view = JobView(self.name, phase="Initializing")
        code = self.proc.poll()
        if code is None:
            if view.final:
                view.phase = "Running"  # the report says finished: the process is still uploading
            return view
        if code == 0:
            view.phase = "Succeeded"
        else:
            view.phase = "Failed"
            view.reason = _exit_name(code)
            view.message = self._reason() or view.message or "no reason reported"
        return view

    def _reason(self) -> str:
        try:
            return self.termination_log.read_text().strip()[-2000:]
        except OSError:
            return ""

    def stop(self) -> int:
        """SIGTERM as a preemption would (a final checkpoint is written), then wait; SIGKILL if stuck."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()


def _exit_name(code: int) -> str:
    try:
        return f"{ExitCode(code).name} (exit {code})"
    except ValueError:
        return f"exit {code}"


def run(args: argparse.Namespace) -> int:
    manifest = manifests.load_one(args.manifest)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix=f"ftjob-{manifest.name}-"))
    config = local_config(
        manifest,
        namespace=args.namespace or manifest.job.metadata.get("namespace") or "local",
        workdir=workdir.resolve(),
        nproc=args.nproc,
        cpu=args.cpu,
        s3_endpoint=args.s3_endpoint,
        checkpoints_uri=args.checkpoints_uri,
    )
    local = LocalRun(manifest.name, config, workdir.resolve())
    local.start()
    print(
        f"running {manifest.name} locally: work folder {local.workdir}, log {local.log_path}", file=sys.stderr
    )
    mode = "json" if args.output != "table" else ("live" if sys.stdout.isatty() else "plain")
    try:
        code = follow(
            local.view, mode=mode, interval=0.5, failure_hint=f"see the trainer log: {local.log_path}"
        )
    except KeyboardInterrupt:
        print("stopping: the trainer writes a final checkpoint first...", file=sys.stderr)
        local.stop()
        raise CliError("interrupted", f"the checkpoints stay in {config.checkpoints.uri}", code=130) from None
    finally:
        if local.proc is not None and local.proc.poll() is None:
            local.stop()
    view = local.view()
    if view.adapter_uri and args.output == "table":
        print(f"adapter: {view.adapter_uri}")
    return code
