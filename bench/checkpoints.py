"""Checkpoint upload and download: the trainer's ObjectStore against boto3's defaults and a plain copy.

    python -m bench.checkpoints [--gb 2.7] [--small-files 2000] [--reps 3]
    python -m bench.checkpoints sweep [--gb 1.0] [--points 64/8/4,32/4/8]   (see bench.ckpt_sweep)

Three ways to move the same bytes, in the same run, on the same disk, to the same kind of server:

- ``copy``: ``shutil.copytree`` to another folder on the same disk, then fsync of every file: the
  lower bound a disk allows (a transfer to S3 reads the same files and writes them again).
- ``boto3-default``: one ``client.upload_file``/``download_file`` per file, one file after the other,
  with boto3's default ``TransferConfig`` (8 MiB parts, 10 threads) and client settings.
- ``ours``: :class:`finetune_trainer.s3.ObjectStore` ``upload_dir``/``download_prefix`` with its
  default :class:`~finetune_trainer.s3.TransferSettings` (or the sweep's candidates).

Every upload goes to a fresh SeaweedFS server in a fresh data folder (it never frees deleted data,
and a server that already holds a copy would favour whichever variant ran second); both downloads
read the same objects from one server. Variants alternate their order between repetitions. A
transfer's time is what its caller waits for: the server's acknowledgement for an upload, the files
written (page cache) for a download, as when the trainer resumes.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import ckpt_sets
from bench.common import MB, WORK, MiB, Run, env_float, filesystem, log, proc_stats, stopwatch, summary
from finetune_devenv.s3server import S3Server
from finetune_trainer.runconfig import S3Config
from finetune_trainer.s3 import ObjectStore, TransferSettings

BUCKET = "bench"


def copy_fsync(src: Path, dst: Path) -> None:
    """A durable local copy: copytree, then fsync every file and the folders."""
    shutil.copytree(src, dst)
    for folder, _, files in os.walk(dst):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def default_upload(server: S3Server, root: Path, prefix: str) -> None:
    client = server.client()
    for path in files_of(root):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(root).as_posix()}")


def default_download(server: S3Server, prefix: str, dst: Path) -> None:
    client = server.client()
    keys = [
        obj["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
        for obj in page.get("Contents", [])
    ]
    for key in keys:
        target = dst / key[len(prefix) + 1 :]
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(target))


def store_for(server: S3Server, settings: TransferSettings | None) -> ObjectStore:
    return ObjectStore(S3Config(endpoint_url=server.endpoint_url), transfer=settings, env=server.env())


def check_same(src: Path, dst: Path) -> None:
    """The copy holds every file with its size, and the largest file's bytes are equal."""
    want = {p.relative_to(src): p.stat().st_size for p in files_of(src)}
    got = {p.relative_to(dst): p.stat().st_size for p in files_of(dst)}
    if want != got:
        raise AssertionError(f"{dst} differs from {src}: {len(want)} files vs {len(got)}")
    largest = max(want, key=lambda k: want[k])
    if (src / largest).read_bytes() != (dst / largest).read_bytes():
        raise AssertionError(f"{dst / largest} differs from {src / largest}")


class Bench:
    """Fresh servers and scratch folders under one work folder; cleans up after itself."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.scratch = work / "scratch"

    def server(self) -> S3Server:
        root = self.work / f"s3-{uuid.uuid4().hex[:8]}"
        server = S3Server(root)
        server.start()
        server.make_bucket(BUCKET)
        return server

    def dispose(self, server: S3Server) -> None:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)

    def target(self) -> Path:
        shutil.rmtree(self.scratch, ignore_errors=True)
        return self.scratch

    def time_upload(self, name: str, src: Path, settings: TransferSettings | None) -> tuple[Sample, S3Server]:
        """Upload ``src`` to a fresh server with variant ``name``; returns the sample and the server."""
        server = self.server()
        try:
            with metered(server) as sample:
                if name == "boto3-default":
                    default_upload(server, src, "set")
                else:
                    store_for(server, settings).upload_dir(src, f"s3://{BUCKET}/set")
        except BaseException:
            self.dispose(server)
            raise
        return sample, server

    def time_download(
        self, name: str, server: S3Server, src: Path, settings: TransferSettings | None
    ) -> Sample:
        dst = self.target()
        with metered(server) as sample:
            if name == "boto3-default":
                default_download(server, "set", dst)
            else:
                store_for(server, settings).download_prefix(f"s3://{BUCKET}/set", dst)
        check_same(src, dst)
        shutil.rmtree(dst)
        return sample

    def time_copy(self, src: Path) -> Sample:
        dst = self.target()
        with metered(None) as sample:
            copy_fsync(src, dst)
        shutil.rmtree(dst)
        return sample


@dataclass
class Sample:
    """One transfer: wall seconds, CPU seconds of this process (the client) and of the server."""

    seconds: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def metered(server: S3Server | None) -> Iterator[Sample]:
    """Wall and CPU time of the block; where the bound is when client and server share the cores."""
    sample = Sample()
    server_before = proc_stats(server.pid)["cpu_s"] if server and server.pid else 0.0
    client_before = _own_cpu()
    with stopwatch() as t:
        yield sample
    sample.seconds = t[0]
    sample.client_cpu_s = _own_cpu() - client_before
    if server and server.pid:
        sample.server_cpu_s = proc_stats(server.pid)["cpu_s"] - server_before


KEYS = ("copy", "upload/boto3-default", "upload/ours", "download/boto3-default", "download/ours")


def measure_set(bench: Bench, src: Path, size: int, reps: int) -> dict[str, Any]:
    """Upload and download ``src`` ``reps`` times with each variant; seconds and MB/s per variant."""
    samples: dict[str, list[Sample]] = {key: [] for key in KEYS}
    for rep in range(reps):
        order = ["boto3-default", "ours"] if rep % 2 == 0 else ["ours", "boto3-default"]
        samples["copy"].append(bench.time_copy(src))
        for name in order:
            sample, server = bench.time_upload(name, src, None)
            samples[f"upload/{name}"].append(sample)
            if name == "ours":  # both downloads read what ObjectStore wrote
                try:
                    for down in order:
                        samples[f"download/{down}"].append(bench.time_download(down, server, src, None))
                finally:
                    bench.dispose(server)
            else:
                bench.dispose(server)
        log(f"  rep {rep + 1}/{reps}: " + ", ".join(f"{k} {v[-1].seconds:.1f}s" for k, v in samples.items()))
    return {
        key: {
            "seconds": summary([v.seconds for v in values]),
            "mb_per_s": summary([size / MB / v.seconds for v in values]),
            "client_cpu_s": statistics.median(v.client_cpu_s for v in values),
            "server_cpu_s": statistics.median(v.server_cpu_s for v in values),
        }
        for key, values in samples.items()
    }


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """ours/default and ours/copy, as throughput ratios of the medians (higher is better for ours)."""

    def rate(key: str) -> float:
        value: float = results[key]["mb_per_s"]["median"]
        return value

    return {
        "upload_ours_vs_default": rate("upload/ours") / rate("upload/boto3-default"),
        "download_ours_vs_default": rate("download/ours") / rate("download/boto3-default"),
        "upload_ours_vs_copy": rate("upload/ours") / rate("copy"),
        "download_ours_vs_copy": rate("download/ours") / rate("copy"),
    }


def settings_dict(settings: TransferSettings) -> dict[str, int]:
    return {
        "multipart_threshold_mib": settings.multipart_threshold // MiB,
        "multipart_chunksize_mib": settings.multipart_chunksize // MiB,
        "max_concurrency": settings.max_concurrency,
        "max_parallel_files": settings.max_parallel_files,
    }


def prepare_sets(gb: float, small_files: int) -> dict[str, tuple[Path, dict[str, int]]]:
    sets = WORK / "sets"
    adapter = ckpt_sets.adapter_layout(gb)
    small = ckpt_sets.small_layout(small_files)
    log(f"generating checkpoint sets under {sets} (reused when present)")
    return {
        "adapter": (ckpt_sets.materialise(sets / f"adapter-{gb:g}gb", adapter), adapter),
        "small": (ckpt_sets.materialise(sets / f"small-{small_files}", small, seed=1), small),
    }


def run_compare(gb: float, small_files: int, reps: int) -> None:
    sets = prepare_sets(gb, small_files)
    run = Run("checkpoints", f"{gb:g}gb", {"gb": gb, "small_files": small_files, "reps": reps})
    run.params["settings"] = settings_dict(TransferSettings())
    run.params["disk"] = filesystem(WORK)
    bench = Bench(WORK)
    for name, (root, layout) in sets.items():
        size = ckpt_sets.total_bytes(layout)
        log(f"set {name}: {len(layout)} files, {size / MB:.0f} MB")
        results = measure_set(bench, root, size, reps)
        run.data[name] = {"files": len(layout), "bytes": size, "results": results, "ratios": ratios(results)}
    run.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.checkpoints",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("mode", nargs="?", choices=["compare", "sweep"], default="compare")
    parser.add_argument(
        "--gb",
        type=float,
        default=env_float("FTJ_BENCH_CKPT_GB", 1.0),
        help="size of the adapter set in GB (FTJ_BENCH_CKPT_GB; 2.7 = 70B r=16)",
    )
    parser.add_argument("--small-files", type=int, default=int(env_float("FTJ_BENCH_SMALL_FILES", 1000)))
    parser.add_argument(
        "--points", default="", help="sweep only these, e.g. 64/8/4,32/4/8 (part MiB/threads per file/files)"
    )
    parser.add_argument("--reps", type=int, default=int(env_float("FTJ_BENCH_REPS", 3)))
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    fs = filesystem(WORK)
    log(f"work folder {WORK} on {fs['device']} ({fs['type']})")
    if fs["type"] in ("tmpfs", "ramfs"):
        raise SystemExit(f"{WORK} is on {fs['type']}: set FTJ_BENCH_DIR to a folder on disk")

    from bench import ckpt_sweep  # it builds on this module

    actions: dict[str, Callable[[], None]] = {
        "compare": lambda: run_compare(args.gb, args.small_files, args.reps),
        "sweep": lambda: ckpt_sweep.run_sweep(
            args.gb, args.small_files, args.reps, TransferSettings(), ckpt_sweep.parse_points(args.points)
        ),
    }
    actions[args.mode]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
