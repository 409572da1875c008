"""The daily loop against the cluster: submit, get, list, suspend, resume, cancel, checkpoints."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from finetune_operator import api
from finetune_operator.cli import manifests, output
from finetune_operator.cli.cluster import Cluster, add_cluster_options
from finetune_operator.cli.errors import CliError
from finetune_operator.cli.storage import (
    add_s3_option,
    endpoint_for,
    object_store,
    started_checkpoint_prefix,
    storage_error,
)
from finetune_operator.cli.view import LIST_HEADERS, JobView, list_row
from finetune_trainer.checkpoints import CheckpointStore
from finetune_trainer.s3 import StorageError

RESOURCE = f"{api.PLURAL}.{api.GROUP}"


def register(commands: Any) -> None:
    submit = commands.add_parser(
        "submit",
        help="check a FineTuneJob manifest locally, then apply it (server-side apply)",
        description="Check the manifest against the FineTuneJob schema (errors name the field), optionally "
        "check its dataset (--check-data), then create or update it with server-side apply (field "
        "manager ftjob). The API server's own validation runs too; its message names the field.",
    )
    submit.add_argument("manifest", help="YAML file with one or more FineTuneJobs ('-' reads stdin)")
    submit.add_argument(
        "--check-data", action="store_true", help="run ftjob validate on dataset.train (and eval) first"
    )
    submit.add_argument("--dry-run", action="store_true", help="let the API server check it without saving")
    add_s3_option(submit)
    _common(submit, submit_jobs)

    get = commands.add_parser(
        "get", help="show one job (phase, progress, loss, attempt)", description="Show one FineTuneJob."
    )
    get.add_argument("name", help="FineTuneJob name")
    _common(get, get_job)

    listing = commands.add_parser(
        "list", help="list jobs in a table like kubectl's", description="List FineTuneJobs."
    )
    _common(listing, list_jobs, all_namespaces=True)

    for verb, what in (("suspend", True), ("resume", False)):
        sub = commands.add_parser(
            verb,
            help="stop the pods after a final checkpoint" if what else "continue from the newest checkpoint",
            description=f"Set spec.runPolicy.suspend to {str(what).lower()}: "
            + (
                "the pods stop after writing a final checkpoint; nothing is lost."
                if what
                else "a new attempt starts from the newest complete checkpoint."
            ),
        )
        sub.add_argument("name", help="FineTuneJob name")
        _common(sub, suspend_job if what else resume_job)

    cancel = commands.add_parser(
        "cancel",
        help="delete a job: its pods stop (needs --yes when not at a terminal)",
        description="Delete the FineTuneJob. Its pods get SIGTERM and everything it created is removed; "
        "checkpoints and outputs in S3 stay. Asks for confirmation at a terminal; elsewhere pass --yes.",
    )
    cancel.add_argument("name", help="FineTuneJob name")
    cancel.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    _common(cancel, cancel_job)

    ckpts = commands.add_parser(
        "checkpoints",
        help="list a job's checkpoints (from its status, or from S3 with --from-s3)",
        description="List a job's checkpoints: the complete ones its status records, or with --from-s3 "
        "every step folder in S3, complete (with its marker) or not.",
    )
    ckpts.add_argument("name", help="FineTuneJob name")
    ckpts.add_argument("--from-s3", action="store_true", help="list S3 itself (needs S3 credentials)")
    add_s3_option(ckpts)
    _common(ckpts, list_checkpoints)


def _common(parser: argparse.ArgumentParser, handler: Any, *, all_namespaces: bool = False) -> None:
    add_cluster_options(parser, all_namespaces=all_namespaces)
    output.add_output_option(parser)
    parser.set_defaults(run=handler)


def _print_objects(objs: list[dict[str, Any]], fmt: str) -> None:
    print(
        output.dump(objs[0] if len(objs) == 1 else {"apiVersion": "v1", "kind": "List", "items": objs}, fmt)
    )


# ------------------------------------------------------------------------------------------- submit


def submit_jobs(args: argparse.Namespace) -> int:
    found = manifests.load(args.manifest)
    if args.check_data:
        for manifest in found:
            _check_data(manifest, args)
    cluster = Cluster.from_args(args)
    try:
        bodies = [_body(manifest, args.namespace, cluster.namespace) for manifest in found]
        applied = []
        for body in bodies:
            meta = body["metadata"]
            existed = cluster.find_job(meta["name"], meta["namespace"]) is not None
            applied.append(cluster.apply_job(body, dry_run=args.dry_run))
            if args.output == "table":
                verb = "configured" if existed else "created"
                print(f"{RESOURCE}/{meta['name']} {verb}{' (server dry run)' if args.dry_run else ''}")
    finally:
        cluster.close()
    if args.output != "table":
        _print_objects(applied, args.output)
    return 0


def _body(manifest: manifests.Manifest, flag: str | None, default: str) -> dict[str, Any]:
    """The manifest as written (so that server-side apply owns only the fields it sets), namespaced."""
    meta = dict(manifest.raw["metadata"])
    if flag and meta.get("namespace") not in (None, flag):
        raise CliError(
            f"{manifest.source}: {manifest.name} names namespace {meta['namespace']!r}, -n says {flag!r}",
            "remove one of them",
        )
    meta["namespace"] = meta.get("namespace") or default
    body = {key: value for key, value in manifest.raw.items() if key != "status"}
    body["metadata"] = meta
    return body


def _check_data(manifest: manifests.Manifest, args: argparse.Namespace) -> None:
    from finetune_operator.cli.validate import render, validate

    spec = manifest.job.spec
    result = validate(
        spec.dataset.train,
        method=spec.method,
        fmt=spec.dataset.format,
        max_seq_length=spec.dataset.max_seq_length,
        eval_uri=spec.dataset.eval,
        eval_fraction=spec.dataset.eval_fraction,
        endpoint=endpoint_for(args, manifest.raw.get("spec")),
    )
    if not result.report.ok:
        print(render(result), file=sys.stderr)
        raise CliError(
            f"the dataset of {manifest.name} is not valid for {spec.method}: {result.report.n_errors} errors",
            "fix the listed lines, or submit without --check-data",
        )


# ---------------------------------------------------------------------------------------- get, list


def get_job(args: argparse.Namespace) -> int:
    cluster = Cluster.from_args(args)
    try:
        obj = cluster.get_job(args.name)
    finally:
        cluster.close()
    if args.output != "table":
        print(output.dump(obj, args.output))
        return 0
    view = JobView.from_object(obj)
    print(output.table(LIST_HEADERS, [list_row(view, datetime.now(UTC))]))
    if view.message and view.phase not in ("Running", "Succeeded"):
        print(f"\n{view.phase}: {view.reason or ''}{': ' if view.reason else ''}{view.message}")
    return 0


def list_jobs(args: argparse.Namespace) -> int:
    cluster = Cluster.from_args(args)
    try:
        items = cluster.list_jobs(all_namespaces=args.all_namespaces)
    finally:
        cluster.close()
    if args.output != "table":
        print(output.dump({"apiVersion": "v1", "kind": "List", "items": items}, args.output))
        return 0
    if not items:
        where = "any namespace" if args.all_namespaces else f"namespace {cluster.namespace}"
        print(f"No FineTuneJobs found in {where}.", file=sys.stderr)
        return 0
    now = datetime.now(UTC)
    views = [JobView.from_object(item) for item in items]
    if args.all_namespaces:
        print(output.table(("namespace", *LIST_HEADERS), [[v.namespace, *list_row(v, now)] for v in views]))
    else:
        print(output.table(LIST_HEADERS, [list_row(v, now) for v in views]))
    return 0


# ------------------------------------------------------------------------------ suspend, resume, cancel


def suspend_job(args: argparse.Namespace) -> int:
    return _set_suspend(args, True)


def resume_job(args: argparse.Namespace) -> int:
    return _set_suspend(args, False)


def _set_suspend(args: argparse.Namespace, suspend: bool) -> int:
    cluster = Cluster.from_args(args)
    try:
        obj = cluster.patch_job(args.name, {"spec": {"runPolicy": {"suspend": suspend}}})
    finally:
        cluster.close()
    if args.output != "table":
        print(output.dump(obj, args.output))
    elif suspend:
        print(
            f"{RESOURCE}/{args.name} suspended: its pods stop after a final checkpoint "
            f"(continue with: ftjob resume {args.name})"
        )
    else:
        print(f"{RESOURCE}/{args.name} resumed: a new attempt starts from the newest checkpoint")
    return 0


def cancel_job(args: argparse.Namespace) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise CliError(
                f"cancel deletes finetunejob {args.name!r} and stops its pods",
                "run again with --yes to confirm",
            )
        answer = input(f"Cancel finetunejob {args.name}? Its pods stop; S3 data stays. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not cancelled", file=sys.stderr)
            return 1
    cluster = Cluster.from_args(args)
    try:
        cluster.delete_job(args.name)
        namespace = cluster.namespace
    finally:
        cluster.close()
    if args.output != "table":
        print(output.dump({"name": args.name, "namespace": namespace, "cancelled": True}, args.output))
    else:
        print(f"{RESOURCE}/{args.name} cancelled: deleted, its pods are stopping")
    return 0


# ------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(args: argparse.Namespace) -> int:
    cluster = Cluster.from_args(args)
    try:
        obj = cluster.get_job(args.name)
    finally:
        cluster.close()
    if args.from_s3:
        rows = _s3_checkpoints(obj, args)
    else:
        status = api.FineTuneJobStatus.model_validate(obj.get("status") or {})
        rows = [
            {"step": cp.step, "complete": cp.complete, "time": _iso(cp.time), "uri": cp.uri}
            for cp in status.checkpoints
        ]
    if args.output != "table":
        print(output.dump(rows, args.output))
        return 0
    if not rows:
        print(f"No checkpoints of {args.name} yet.", file=sys.stderr)
        return 0
    print(
        output.table(
            ("step", "complete", "time", "uri"),
            [[r["step"], r["complete"], r["time"] or "-", r["uri"]] for r in rows],
        )
    )
    return 0


def _s3_checkpoints(obj: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    job = api.FineTuneJob.model_validate(obj)
    spec = obj.get("spec") or {}
    store = CheckpointStore(
        object_store(endpoint_for(args, spec), job.spec.storage.region), started_checkpoint_prefix(job)
    )
    try:
        rows = []
        for info in store.scan():
            when = None
            if info.complete:
                try:
                    when = store.read_marker(info.step).time
                except (StorageError, ValueError):
                    when = None
            rows.append({"step": info.step, "complete": info.complete, "time": when, "uri": info.uri})
        return rows
    except StorageError as exc:
        raise storage_error(exc) from None


def _iso(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None
