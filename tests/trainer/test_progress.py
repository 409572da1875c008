"""Progress transports against real endpoints: the ConfigMap patch over HTTPS with a service-account
token (a tiny local API server stand-in that checks what a real one checks), and the file."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import pytest

from finetune_trainer.progress import ConfigMapReporter, FileReporter, RateLimited, make_reporter
from finetune_trainer.runconfig import PROGRESS_KEY, ProgressConfig, ProgressReport

pytestmark = pytest.mark.trainer

TOKEN = "sa-token-1"
State = Literal["initializing", "training", "checkpointing", "finished", "failed"]


class FakeApiServer:
    """Accepts merge-patches of one ConfigMap with one bearer token, records the bodies."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.patches: list[dict[str, Any]] = []
        self.tokens: list[str] = []
        self.fail_next = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.tokens.append(self.headers.get("Authorization", ""))
                if outer.fail_next:
                    outer.fail_next -= 1
                    self._answer(500, {"message": "etcd unavailable"})
                elif self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._answer(401, {"message": "Unauthorized"})
                elif self.path != "/api/v1/namespaces/team-a/configmaps/job-progress":
                    self._answer(404, {"message": "not found"})
                elif self.headers.get("Content-Type") != "application/merge-patch+json":
                    self._answer(415, {"message": "unsupported media type"})
                else:
                    outer.patches.append(json.loads(body))
                    self._answer(200, {"kind": "ConfigMap"})

            def _answer(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def last_report(self) -> dict[str, Any]:
        report: dict[str, Any] = json.loads(self.patches[-1]["data"][PROGRESS_KEY])
        return report


@pytest.fixture
def sa_dir(tmp_path: Path) -> Path:
    """A service-account folder like the kubelet mounts: token, CA and namespace."""
    folder = tmp_path / "sa"
    folder.mkdir()
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(tmp_path / "server.key"),
            "-out",
            str(folder / "ca.crt"),
        ],
        check=True,
        capture_output=True,
    )
    (folder / "token").write_text(TOKEN + "\n")
    (folder / "namespace").write_text("team-a")
    return folder


@pytest.fixture
def api_server(sa_dir: Path) -> Iterator[FakeApiServer]:
    server = FakeApiServer(sa_dir / "ca.crt", sa_dir.parent / "server.key")
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def report(step: int, state: State = "training") -> ProgressReport:
    return ProgressReport(
        attempt=2, state=state, step=step, total_steps=100, train_loss=1.5, time="2026-01-01T00:00:00Z"
    )


def test_configmap_reporter_patches_with_the_pod_token(api_server: FakeApiServer, sa_dir: Path) -> None:
    env = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(api_server.port),
        "FTJ_SA_DIR": str(sa_dir),
    }
    reporter = make_reporter(
        ProgressConfig(transport="configmap", name="job-progress", min_interval_seconds=0), env
    )
    assert isinstance(reporter.inner, ConfigMapReporter)
    reporter.report(report(7))
    assert api_server.last_report() == {
        "attempt": 2,
        "state": "training",
        "step": 7,
        "totalSteps": 100,
        "trainLoss": 1.5,
        "checkpoints": [],
        "time": "2026-01-01T00:00:00Z",
    }
    (sa_dir / "token").write_text("rotated-token")  # the kubelet rotates projected tokens: re-read each time
    reporter.report(report(8))
    assert api_server.tokens[-1] == "Bearer rotated-token"
    assert len(api_server.patches) == 1, "a refused patch is not recorded"


def test_configmap_reporter_swallows_failures(api_server: FakeApiServer, sa_dir: Path, caplog: Any) -> None:
    reporter = ConfigMapReporter(
        api_url=f"https://127.0.0.1:{api_server.port}",
        namespace="team-a",
        name="job-progress",
        token_path=sa_dir / "token",
        ca_path=sa_dir / "ca.crt",
    )
    api_server.fail_next = 1
    reporter.report(report(1))  # 500: logged, not raised
    reporter.report(report(2))
    assert api_server.last_report()["step"] == 2
    unreachable = ConfigMapReporter(
        api_url="https://127.0.0.1:1",
        namespace="team-a",
        name="job-progress",
        token_path=sa_dir / "token",
        ca_path=sa_dir / "ca.crt",
        timeout_s=1,
    )
    unreachable.report(report(3))  # connection refused: logged, not raised
    untrusted = ConfigMapReporter(
        api_url=f"https://127.0.0.1:{api_server.port}",
        namespace="team-a",
        name="job-progress",
        token_path=sa_dir / "token",
        ca_path=None,
    )
    untrusted.report(report(4))  # the system CAs do not trust this server: refused, not raised
    assert api_server.last_report()["step"] == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("answered 500" in m for m in messages) and any("failed" in m for m in messages)
    assert not any(TOKEN in m for m in messages), "the token never appears in logs"


def test_a_failure_that_repeats_is_logged_once(api_server: FakeApiServer, sa_dir: Path, caplog: Any) -> None:
    """After its FineTuneJob is deleted a pod still shutting down gets 403 on every report: one
    warning, not one per report; and a word when it works again."""
    reporter = ConfigMapReporter(
        api_url=f"https://127.0.0.1:{api_server.port}",
        namespace="team-a",
        name="job-progress",
        token_path=sa_dir / "token",
        ca_path=sa_dir / "ca.crt",
    )
    caplog.set_level(logging.INFO, logger="finetune_trainer.progress")
    api_server.fail_next = 3
    for step in (1, 2, 3, 4):
        reporter.report(report(step))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("answered 500" in m for m in messages) == 1, messages
    assert sum("works again" in m for m in messages) == 1, messages
    assert api_server.last_report()["step"] == 4


def test_rate_limit_holds_back_the_newest_snapshot_only(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "progress.json"
    limited = RateLimited(FileReporter(path), interval_s=2.0, clock=lambda: now[0])

    def written() -> dict[str, Any]:
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    limited.report(report(1))
    limited.report(report(2))  # within 2 s: held back
    limited.report(report(3))  # replaces step 2
    assert written()["step"] == 1
    limited.report(report(3, state="checkpointing"))  # a state change goes out at once
    assert written()["state"] == "checkpointing"
    limited.report(report(4, state="checkpointing"))
    now[0] = 2.5
    limited.report(report(5, state="checkpointing"))
    assert written()["step"] == 5
    limited.report(report(6, state="checkpointing"))
    limited.close()  # flushes what was held back
    assert written()["step"] == 6


def test_misconfigured_transport_degrades_to_none(caplog: Any) -> None:
    reporter = make_reporter(ProgressConfig(transport="configmap", name="x"), env={})
    reporter.report(report(1))  # no API server in the environment: reports are dropped, training goes on
    assert "progress reports disabled" in caplog.text
