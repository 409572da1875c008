"""ObjectStore's one-request path for objects below the multipart threshold, against real S3.

The store talks to SeaweedFS through a small HTTP proxy that records every request and can cut the
body of chosen GETs half way (headers promise the whole object, then the connection closes): what a
reset connection or a dying server does to a download in the middle of an object.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from finetune_devenv.s3server import S3Server
from finetune_trainer.runconfig import S3Config
from finetune_trainer.s3 import MiB, ObjectStore, RetryPolicy, StorageError, TransferSettings

pytestmark = pytest.mark.trainer

THRESHOLD = 5 * MiB
SETTINGS = TransferSettings(multipart_threshold=THRESHOLD, multipart_chunksize=THRESHOLD, max_concurrency=2)
FAST_GIVE_UP = RetryPolicy(max_attempts=1, base_delay_s=0.05, max_delay_s=0.1, deadline_s=0.5)
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class CuttingProxy:
    """Relays HTTP/1.1 requests to ``upstream``; the first ``times`` GETs whose request line matches
    ``cut`` get the real status and headers but only half the body before the connection closes."""

    def __init__(self, upstream: str, cut: str = "(?!)", times: int = 0) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.cut = re.compile(cut)
        self.cuts_left = times
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def count(self, method: str) -> int:
        with self.lock:
            return sum(line.startswith(method + " ") for line in self.lines)

    def _should_cut(self, line: str) -> bool:
        with self.lock:
            self.lines.append(line)
            if line.startswith("GET ") and self.cuts_left > 0 and self.cut.search(line):
                self.cuts_left -= 1
                return True
            return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def relay(self) -> None:
                if self.headers.get("Transfer-Encoding"):
                    raise AssertionError("the proxy relays Content-Length bodies only")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                cut = proxy._should_cut(f"{self.command} {self.path}")
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    if key.lower() not in _HOP_BY_HOP:
                        upstream.putheader(key, value)
                upstream.putheader("Content-Length", str(len(body)))
                upstream.endheaders(body)
                response = upstream.getresponse()
                payload = response.read()
                upstream.close()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP:
                        self.send_header(key, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(payload)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if cut:
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                else:
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay

        return Handler

    def __enter__(self) -> CuttingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def proxy(s3_server: S3Server) -> Iterator[CuttingProxy]:
    with CuttingProxy(s3_server.endpoint_url) as running:
        yield running


def store_via(endpoint: str, server: S3Server, retry: RetryPolicy | None = None) -> ObjectStore:
    return ObjectStore(S3Config(endpoint_url=endpoint), env=server.env(), transfer=SETTINGS, retry=retry)


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.part"))


def test_small_objects_move_with_one_request_each(
    proxy: CuttingProxy, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    files = {
        "empty": b"",
        "latest": b"global_step3",
        "rng_state_0.pth": os.urandom(15 * 1024),
        "shards/part-00001.bin": os.urandom(300 * 1024),
        "just-below.bin": os.urandom(THRESHOLD - 1),
        "at-threshold.bin": os.urandom(THRESHOLD + 1),  # two parts: the transfer manager's path
    }
    write_files(tmp_path / "src", files)
    store = store_via(proxy.endpoint_url, s3_server)
    prefix = f"s3://{s3_bucket}/ckpt/step-000000003"

    store.upload_dir(tmp_path / "src", prefix)

    assert proxy.count("PUT") == 5 + 2  # one PUT per small file; two parts of the large one
    assert proxy.count("POST") == 2  # create and complete: only the large file went multipart
    head = s3_server.client().head_object(Bucket=s3_bucket, Key="ckpt/step-000000003/at-threshold.bin")
    assert head["ETag"].strip('"').endswith("-2")

    before = len(proxy.lines)
    paths = store.download_prefix(prefix, tmp_path / "dst")

    assert sorted(p.relative_to(tmp_path / "dst").as_posix() for p in paths) == sorted(files)
    for name, data in files.items():
        assert (tmp_path / "dst" / name).read_bytes() == data
    assert leftovers(tmp_path / "dst") == []
    downloads = proxy.lines[before:]
    heads = [line for line in downloads if line.startswith("HEAD ")]
    assert heads == [f"HEAD /{s3_bucket}/ckpt/step-000000003/at-threshold.bin"]  # none for small objects
    gets = {line for line in downloads if line.startswith("GET ") and "list-type" not in line}
    assert gets == {f"GET /{s3_bucket}/ckpt/step-000000003/{name}" for name in files}


def test_a_download_cut_half_way_leaves_no_file_under_its_name(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    files = {f"shard-{i}.bin": os.urandom(256 * 1024) for i in range(4)}
    write_files(tmp_path / "src", files)
    prefix = f"s3://{s3_bucket}/ckpt/step-000000007"
    store_via(s3_server.endpoint_url, s3_server).upload_dir(tmp_path / "src", prefix)

    with CuttingProxy(s3_server.endpoint_url, cut=r"/shard-2\.bin", times=100) as proxy:
        store = store_via(proxy.endpoint_url, s3_server, retry=FAST_GIVE_UP)
        with pytest.raises(StorageError) as info:
            store.download_prefix(prefix, tmp_path / "dst")
        with pytest.raises(StorageError):
            store.download_file(f"{prefix}/shard-2.bin", tmp_path / "one" / "shard-2.bin", size=256 * 1024)

    assert info.value.retryable is True
    assert "shard-2.bin" in str(info.value)
    assert proxy.count("GET") >= 3  # listing, then the object, cut each time until the deadline
    assert not (tmp_path / "dst" / "shard-2.bin").exists()
    assert not (tmp_path / "one" / "shard-2.bin").exists()
    assert leftovers(tmp_path) == []
    for name in ("shard-0.bin", "shard-1.bin", "shard-3.bin"):  # fetched whole, or not at all
        path = tmp_path / "dst" / name
        assert not path.exists() or path.read_bytes() == files[name]


def test_a_cut_download_is_retried_and_arrives_whole(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB + 17)
    (tmp_path / "adapter_model.safetensors").write_bytes(data)
    uri = f"s3://{s3_bucket}/ckpt/adapter_model.safetensors"
    store_via(s3_server.endpoint_url, s3_server).upload_file(tmp_path / "adapter_model.safetensors", uri)

    with CuttingProxy(s3_server.endpoint_url, cut="adapter_model", times=2) as proxy:
        store = store_via(proxy.endpoint_url, s3_server)
        got = store.download_prefix(f"s3://{s3_bucket}/ckpt/", tmp_path / "dst")

    assert got == [tmp_path / "dst" / "adapter_model.safetensors"]
    assert got[0].read_bytes() == data
    assert proxy.cuts_left == 0  # both cuts happened, and the third GET brought the object
    assert leftovers(tmp_path / "dst") == []
