"""Fault injection and bookkeeping for the reliability suites (tests/reliability/).

- :func:`scale` picks the short count (``make test``) or the long one (``make soak``, ``FTJ_SOAK=1``).
- :func:`seeded` gives each suite a random generator whose seed is printed; ``FTJ_SEED=<n>``
  replays the same plans (the interleaving with the operator's threads is not replayable).
- :func:`record` appends a suite's figures to ``.local/reliability/figures.jsonl`` for
  docs/reliability.md, and prints them.
- :class:`S3FaultProxy` sits between a client and the real S3 server and answers a fraction of the
  requests with 503/500, holds chosen requests (so a test knows it is inside an upload or a
  download), and drops connections while the server behind it is down.
- :class:`JobWatch` records every batch/v1 Job ever ADDED in a namespace, so a Job that was created
  twice is caught even if it was deleted again before the test looked.
- :func:`orphans` lists the operator's children whose owner is gone.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import socket
import struct
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from finetune_operator import api
from finetune_operator import constants as c
from tests.support.waiting import wait_for

SOAK = os.environ.get("FTJ_SOAK", "") not in ("", "0")
"""True under ``make soak``: every suite runs its long form."""

FIGURES = Path(__file__).resolve().parents[2] / ".local" / "reliability" / "figures.jsonl"


def scale(short: int, soak: int) -> int:
    """The count for this run: ``soak`` under FTJ_SOAK=1, else ``short``."""
    return soak if SOAK else short


def seeded(suite: str) -> tuple[random.Random, int]:
    """A generator for ``suite`` and its seed (FTJ_SEED, else a fresh one); the seed is printed."""
    raw = os.environ.get("FTJ_SEED", "")
    seed = int(raw) if raw else random.SystemRandom().randrange(2**31)
    print(f"{suite}: seed {seed} (rerun with FTJ_SEED={seed})")
    return random.Random(seed), seed


def record(suite: str, **figures: Any) -> None:
    """Append ``figures`` of one suite run to FIGURES (the source of docs/reliability.md)."""
    entry = {"suite": suite, "form": "soak" if SOAK else "short", "time": _now(), **figures}
    line = json.dumps(entry, sort_keys=True)
    print(f"RELIABILITY {line}")
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    with FIGURES.open("a") as out:
        out.write(line + "\n")


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of ``pid`` in MiB."""
    return _status_mib(pid, "VmHWM")


def rss_mib(pid: int) -> float:
    """Resident memory (VmRSS) of ``pid`` in MiB now."""
    return _status_mib(pid, "VmRSS")


def _status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no {field} for pid {pid}")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------ S3 proxy

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade"}
_FAULTS = (
    (503, "SlowDown", "Please reduce your request rate."),
    (500, "InternalError", "We encountered an internal error. Please try again."),
)


class Hold:
    """Requests matching ``pattern`` (``"<METHOD> <path>"``) wait ``seconds`` before they are
    forwarded; ``started`` is set when the first one is held, and ``matched`` names it."""

    def __init__(self, pattern: str, seconds: float, times: int = 1) -> None:
        self.pattern = re.compile(pattern)
        self.seconds = seconds
        self.left = times
        self.started = threading.Event()
        self.matched = ""


class S3FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of a real S3 server (stdlib only, thread per connection).

    SigV4 signs the Host header, so the proxy forwards every header unchanged and clients sign for
    the proxy's address. Use :attr:`endpoint_url` as the S3 endpoint.
    """

    def __init__(self, upstream: str, *, error_rate: float = 0.0, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.error_rate = error_rate
        self.rng = random.Random(seed)
        self.holds: list[Hold] = []
        self.lock = threading.Lock()
        self.requests = 0
        self.injected = 0
        self.dropped = 0
        self.in_flight = 0
        self.statuses: dict[int, int] = {}
        self.log: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy", daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def hold(self, pattern: str, seconds: float, times: int = 1) -> Hold:
        held = Hold(pattern, seconds, times)
        with self.lock:
            self.holds.append(held)
        return held

    def quiet(self, timeout: float = 60) -> None:
        """Wait until no request is in flight (a held request may still reach the server)."""
        wait_for("S3 proxy to drain", lambda: self.in_flight == 0, timeout)

    def figures(self) -> dict[str, Any]:
        with self.lock:
            return {
                "s3_requests": self.requests,
                "s3_errors_injected": self.injected,
                "s3_connections_dropped": self.dropped,
                "s3_statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            }

    # -- per request ---------------------------------------------------------------------------
    def _decide(self, line: str) -> tuple[str, Any]:
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            for held in self.holds:
                if held.left > 0 and held.pattern.search(line):
                    held.left -= 1
                    held.matched = line
                    return "hold", held
            if self.error_rate and self.rng.random() < self.error_rate:
                self.injected += 1
                return "fail", self.rng.choice(_FAULTS)
        return "forward", None

    def _done(self, status: int | None) -> None:
        with self.lock:
            self.in_flight -= 1
            if status is None:
                self.dropped += 1
            else:
                self.statuses[status] = self.statuses.get(status, 0) + 1

    def _forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> Any:
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for key, value in headers:
            if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                conn.putheader(key, value)
        if body or method in ("PUT", "POST"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        return response, payload

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet: counted instead
                return

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _drop(self) -> None:
                """Reset the connection without an answer, as a server that died would."""
                self.close_connection = True
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                proxy._done(None)

            def _relay(self) -> None:
                body = self._body()
                line = f"{self.command} {self.path}"
                action, detail = proxy._decide(line)
                if action == "fail":
                    status, code, message = detail
                    xml = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>{message}</Message><RequestId>injected</RequestId></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    proxy._done(status)
                    return
                if action == "hold":
                    detail.started.set()
                    time.sleep(detail.seconds)
                try:
                    response, payload = proxy._forward(self.command, self.path, self.headers.items(), body)
                except OSError:
                    self._drop()
                    return
                try:
                    self.send_response(response.status, response.reason)
                    for key, value in response.getheaders():
                        if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                            self.send_header(key, value)
                    length = response.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                except OSError:  # the client went away (killed): the request still reached S3
                    self.close_connection = True
                proxy._done(response.status)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Handler


# ----------------------------------------------------------------------------------- Kubernetes


class JobWatch:
    """Every batch/v1 Job ADDED in ``namespace`` while the watch runs: name -> uids, in order, and
    each Job's annotations as they were when it was created (the attempt's recorded intent).

    The watch resumes from the last resourceVersion after a dropped connection; if the server says
    that version is gone (410, as after an API server restart), the Jobs are listed again and
    :attr:`gaps` counts it. :meth:`created` adds a second record that has no gaps: the events the
    Job controller posts about every Job it worked on (kept an hour, even after the Job is deleted).
    """

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.added: dict[str, list[str]] = {}
        self.annotations: dict[str, dict[str, str]] = {}
        """Job name -> its annotations when first seen."""
        self.gaps = 0
        self.reconnects = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._version = self._relist()
        self._thread = threading.Thread(target=self._run, name=f"job-watch-{namespace}", daemon=True)

    def __enter__(self) -> JobWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def created(self) -> dict[str, set[str]]:
        """Job name -> every uid a Job of that name had: from the watch and from events about Jobs."""
        with self._lock:
            found = {name: set(uids) for name, uids in self.added.items()}
        events: Any = self.core.list_namespaced_event(
            self.namespace, field_selector="involvedObject.kind=Job"
        )
        for event in events.items:
            found.setdefault(event.involved_object.name, set()).add(event.involved_object.uid)
        return found

    def _note(self, job: Any) -> None:
        meta = job.metadata
        with self._lock:
            uids = self.added.setdefault(meta.name, [])
            if meta.uid not in uids:
                uids.append(meta.uid)
            self.annotations.setdefault(meta.name, dict(meta.annotations or {}))

    def _relist(self) -> str:
        listed: Any = self.batch.list_namespaced_job(self.namespace)
        for job in listed.items:
            self._note(job)
        return str(listed.metadata.resource_version)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                    self.batch.list_namespaced_job,
                    self.namespace,
                    resource_version=self._version,
                    timeout_seconds=5,
                    allow_watch_bookmarks=True,
                )
                for event in stream:
                    obj = event["object"]
                    self._version = obj.metadata.resource_version or self._version
                    if event["type"] == "ADDED":
                        self._note(obj)
                    if self._stop.is_set():
                        return
            except ApiException as err:
                if err.status == 410:
                    self.gaps += 1
                    self._version = self._relist()
                else:
                    self.reconnects += 1
                    time.sleep(0.5)
            except Exception:  # connection refused or reset while the API server restarts
                self.reconnects += 1
                time.sleep(0.5)


def orphans(api_client: client.ApiClient, namespace: str) -> list[str]:
    """The operator's children (and training pods) in ``namespace`` whose owner no longer exists."""
    core = client.CoreV1Api(api_client)
    batch = client.BatchV1Api(api_client)
    rbac = client.RbacAuthorizationV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    selector = f"{c.LABEL_MANAGED_BY}={c.MANAGED_BY}"
    listed: Any = custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL)
    owners = {item["metadata"]["uid"] for item in listed["items"]}
    jobs: list[Any] = batch.list_namespaced_job(namespace, label_selector=selector).items
    children: list[Any] = [
        *jobs,
        *core.list_namespaced_service(namespace, label_selector=selector).items,
        *core.list_namespaced_config_map(namespace, label_selector=selector).items,
        *core.list_namespaced_service_account(namespace, label_selector=selector).items,
        *rbac.list_namespaced_role(namespace, label_selector=selector).items,
        *rbac.list_namespaced_role_binding(namespace, label_selector=selector).items,
    ]
    found = []
    for child in children:
        refs = [r for r in child.metadata.owner_references or [] if r.kind == api.KIND and r.controller]
        if len(refs) != 1 or refs[0].uid not in owners:
            found.append(f"{type(child).__name__} {child.metadata.name}")
    job_uids = {job.metadata.uid for job in jobs}
    pods: list[Any] = core.list_namespaced_pod(namespace, label_selector=selector).items
    for pod in pods:
        refs = [r for r in pod.metadata.owner_references or [] if r.kind == "Job"]
        if len(refs) != 1 or refs[0].uid not in job_uids:
            found.append(f"V1Pod {pod.metadata.name}")
    return found


def assert_no_orphans(api_client: client.ApiClient, namespace: str, timeout: float = 60) -> None:
    """Fail unless every child has its owner within ``timeout`` (garbage collection takes a moment)."""
    deadline = time.monotonic() + timeout
    while found := orphans(api_client, namespace):
        if time.monotonic() > deadline:
            raise AssertionError(f"children left without their owner after {timeout:.0f}s: {found}")
        time.sleep(0.5)
