"""Progress reports from global rank 0 to wherever the operator (or a person) reads them.

One small protocol, :class:`Reporter`, and three transports chosen by ``progress.transport``:

- :class:`ConfigMapReporter` merge-patches the job's progress ConfigMap with the pod's own
  service-account token. The operator mirrors that ConfigMap into the FineTuneJob status, so pods
  never get write access to FineTuneJobs; the token may patch only that one ConfigMap (a Role with
  ``resourceNames``). stdlib ``urllib`` only: the trainer image carries no Kubernetes client.
- :class:`FileReporter` writes the same JSON to a file (local runs and tests).
- :class:`NullReporter` drops reports.

Progress must never kill training: every transport error is logged and swallowed, and
:class:`RateLimited` keeps a chatty training loop from patching more often than
``progress.min_interval_seconds`` (a report held back is sent with the next one or on ``flush``).
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from finetune_trainer.runconfig import PROGRESS_KEY, ProgressConfig, ProgressReport

log = logging.getLogger(__name__)

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SA_DIR_ENV = "FTJ_SA_DIR"
"""Overrides the service-account folder (``token``, ``ca.crt``, ``namespace``); the dev node agent
points it at a token of its own."""


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def to_json(report: ProgressReport) -> str:
    """The wire form: camelCase aliases, unset fields left out."""
    return report.model_dump_json(by_alias=True, exclude_none=True)


class Reporter(Protocol):
    def report(self, report: ProgressReport) -> None:
        """Deliver one snapshot; must not raise."""

    def close(self) -> None:
        """Deliver anything held back and release resources; must not raise."""


class NullReporter:
    def report(self, report: ProgressReport) -> None:
        pass

    def close(self) -> None:
        pass


class FileReporter:
    """Writes each snapshot to ``path`` atomically (a reader never sees half a report)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def report(self, report: ProgressReport) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(to_json(report))
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("progress: cannot write %s: %s", self.path, exc)

    def close(self) -> None:
        pass


class ConfigMapReporter:
    """JSON merge-patch of ``data[progress.json]`` in one ConfigMap, authenticated as the pod."""

    def __init__(
        self,
        *,
        api_url: str,
        namespace: str,
        name: str,
        token_path: Path,
        ca_path: Path | None,
        timeout_s: float = 5.0,
    ) -> None:
        self.url = f"{api_url.rstrip('/')}/api/v1/namespaces/{namespace}/configmaps/{name}"
        self.token_path = token_path
        self.timeout_s = timeout_s
        self._context = ssl.create_default_context(cafile=str(ca_path)) if ca_path else None
        self._failing: str | None = None  # the failure last logged; repeats of it are not

    @classmethod
    def from_environment(
        cls, config: ProgressConfig, env: Mapping[str, str] = os.environ
    ) -> ConfigMapReporter:
        """Build from the in-cluster service account (``KUBERNETES_SERVICE_HOST``/``_PORT`` and the
        mounted token, CA and namespace; ``$FTJ_SA_DIR`` overrides the folder)."""
        sa_dir = Path(env.get(SA_DIR_ENV) or SA_DIR)
        host = env.get("KUBERNETES_SERVICE_HOST", "")
        port = env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ValueError("progress.transport is configmap but KUBERNETES_SERVICE_HOST is not set")
        if ":" in host:
            host = f"[{host}]"  # IPv6 literal
        namespace = config.namespace
        if not namespace:
            namespace = (sa_dir / "namespace").read_text().strip()
        if not config.name:
            raise ValueError("progress.transport is configmap but progress.name is empty")
        ca = sa_dir / "ca.crt"
        return cls(
            api_url=f"https://{host}:{port}",
            namespace=namespace,
            name=config.name,
            token_path=sa_dir / "token",
            ca_path=ca if ca.is_file() else None,
        )

    def report(self, report: ProgressReport) -> None:
        body = json.dumps({"data": {PROGRESS_KEY: to_json(report)}}).encode()
        try:
            # Re-read every time: projected tokens are rotated by the kubelet.
            token = self.token_path.read_text().strip()
            request = urllib.request.Request(
                self.url,
                data=body,
                method="PATCH",
                headers={
                    "Content-Type": "application/merge-patch+json",
                    "Accept": "application/json",
                    "Authorization": f"Bearer {token}",
                },
            )
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._context) as reply:
                reply.read()
        except urllib.error.HTTPError as exc:
            self._failed(f"answered {exc.code}", exc.read()[:300].decode(errors="replace"))
        except (OSError, ValueError) as exc:  # URLError, timeouts, TLS errors, unreadable token
            self._failed(f"failed ({type(exc).__name__})", str(exc))
        else:
            if self._failing is not None:
                log.info("progress: PATCH %s works again", self.url)
            self._failing = None

    def _failed(self, what: str, detail: str) -> None:
        """Log a failure once, not on every report: after its FineTuneJob is deleted, a pod that is
        still shutting down gets 403 on each report until it ends."""
        if what != self._failing:
            log.warning("progress: PATCH %s %s: %s (repeats not logged)", self.url, what, detail)
        self._failing = what

    def close(self) -> None:
        pass


class RateLimited:
    """Send at most one report per ``interval_s``; state changes go out at once.

    The held-back report is the newest snapshot, so nothing is lost by dropping the ones before it.
    """

    def __init__(
        self, inner: Reporter, interval_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.inner = inner
        self.interval_s = interval_s
        self.clock = clock
        self._last_sent: float | None = None
        self._last_state: str | None = None
        self._pending: ProgressReport | None = None

    def report(self, report: ProgressReport) -> None:
        now = self.clock()
        due = self._last_sent is None or now - self._last_sent >= self.interval_s
        if due or report.state != self._last_state:
            self._send(report, now)
        else:
            self._pending = report

    def flush(self) -> None:
        if self._pending is not None:
            self._send(self._pending, self.clock())

    def close(self) -> None:
        self.flush()
        self.inner.close()

    def _send(self, report: ProgressReport, now: float) -> None:
        self._pending = None
        self._last_sent = now
        self._last_state = report.state
        try:
            self.inner.report(report)
        except Exception:  # a Reporter must not raise; if one does, training goes on regardless
            log.exception("progress: reporter failed")


def make_reporter(config: ProgressConfig, env: Mapping[str, str] = os.environ) -> RateLimited:
    """The reporter ``config`` asks for, rate-limited. A misconfigured transport degrades to none
    (with a warning): losing progress reports is better than losing the run."""
    inner: Reporter
    try:
        if config.transport == "configmap":
            inner = ConfigMapReporter.from_environment(config, env)
        elif config.transport == "file":
            if not config.path:
                raise ValueError("progress.transport is file but progress.path is empty")
            inner = FileReporter(config.path)
        else:
            inner = NullReporter()
    except (OSError, ValueError) as exc:
        log.warning("progress reports disabled: %s", exc)
        inner = NullReporter()
    return RateLimited(inner, config.min_interval_seconds)
