"""Client-side instruments for the operator benchmark: an API client, a watch clock, request counts.

API timestamps have one-second resolution, so every time here is taken on the benchmark's own clock
(``time.monotonic``) when a watch event *arrives*: the same clock, the same watch code and the same
cost for the operator run and for the plain-client baselines.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, config
from kubernetes.watch.watch import iter_resp_lines

from finetune_devenv.kubectl import Cluster

Obj = dict[str, Any]


def api_client(cluster: Cluster, pool: int) -> client.ApiClient:
    """An ApiClient whose connection pool fits ``pool`` threads (the default is 5 per core)."""
    configuration = client.Configuration()
    config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(cluster.kubeconfig), context=cluster.context, client_configuration=configuration
    )
    configuration.connection_pool_maxsize = pool
    return client.ApiClient(configuration)


class Arrivals:
    """Watches one resource in one namespace and notes when each object first matched ``seen``
    (keyed by ``key``, the object's name unless given).

    ``list_call(namespace, **kw)`` is a ``list_namespaced_*`` function of the Kubernetes client; the
    watch resumes from the last resourceVersion when the server ends it.
    """

    def __init__(
        self,
        list_call: Callable[..., Any],
        namespace: str,
        seen: Callable[[str, Obj], bool],
        key: Callable[[Obj], str] | None = None,
    ) -> None:
        self.list_call = list_call
        self.namespace = namespace
        self.seen = seen
        self.key = key or (lambda obj: str(obj["metadata"]["name"]))
        self.first: dict[str, float] = {}
        self.objects: dict[str, Obj] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="watch")

    def start(self) -> Arrivals:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError(f"watch of {self.list_call.__name__} did not start in 30 s")
        return self

    def count(self) -> int:
        return len(self.first)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        listed = json.loads(self.list_call(self.namespace, _preload_content=False, limit=1).data)
        version = listed["metadata"]["resourceVersion"]
        self._ready.set()
        while not self._stop.is_set():
            try:
                response = self.list_call(
                    self.namespace,
                    watch=True,
                    resource_version=version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=300,
                    _preload_content=False,
                    _request_timeout=(10, 1),  # an idle second ends the read, so `stop` is noticed
                )
                for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                    now = time.monotonic()
                    event = json.loads(line)
                    obj = event["object"]
                    version = obj["metadata"].get("resourceVersion", version)
                    if event["type"] in ("ADDED", "MODIFIED"):
                        name = self.key(obj)
                        if name not in self.first and self.seen(event["type"], obj):
                            self.first[name] = now
                            self.objects[name] = obj
            except Exception:  # idle read timeout, or the server ended the watch: resume from `version`
                if self._stop.is_set():
                    return
                time.sleep(0.05)


def wait_for(what: str, done: Callable[[], bool], timeout: float, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


_REQUEST = re.compile(r"^apiserver_request_total\{([^}]*)\} ([0-9.e+]+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def request_counts(metrics_text: str) -> dict[str, float]:
    """``apiserver_request_total`` summed by ``VERB resource[/subresource]`` (from /metrics)."""
    counts: dict[str, float] = {}
    for line in metrics_text.splitlines():
        match = _REQUEST.match(line)
        if not match:
            continue
        labels = dict(_LABEL.findall(match.group(1)))
        if labels.get("verb") == "WATCH":
            continue
        resource = labels.get("resource", "")
        if labels.get("subresource"):
            resource += "/" + labels["subresource"]
        key = f"{labels.get('verb', '?')} {resource}"
        counts[key] = counts.get(key, 0.0) + float(match.group(2))
    return counts


def counts_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    keys = sorted(set(before) | set(after))
    delta = {key: int(after.get(key, 0) - before.get(key, 0)) for key in keys}
    return {key: value for key, value in delta.items() if value}
