"""The agent: register the Node, keep it Ready, watch pods, and drive :class:`~.kubelet.Kubelet`.

Level-based like a controller: a watch thread keeps a cache of pods current (a full relist every
``resync_seconds``, so a missed event heals by itself) and queues the keys it saw change; the main
thread syncs each queued pod and polls the running processes. Only the main thread starts and
signals processes, so PR_SET_PDEATHSIG (tied to the thread that forked) holds for the agent's life.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from finetune_devenv.nodeagent import hostsfile, scheduling
from finetune_devenv.nodeagent.context import Layout, NodeContext, Obj, meta
from finetune_devenv.nodeagent.kube import Kube
from finetune_devenv.nodeagent.kubelet import Key, Kubelet, key_of
from finetune_devenv.nodeagent.runner import kill_tagged, now_iso

log = logging.getLogger("nodeagent")
BASE_ENV = ("HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER")
"""Passed from the agent's environment to every container, with PATH (the venv's bin first)."""


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    state_dir: Path
    gpus: int = 8
    gpu_resource: str = "nvidia.com/gpu"
    namespace: str | None = None
    """Only pods of this namespace are watched, scheduled and run (None: every namespace)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity: Mapping[str, str] = field(default_factory=dict)
    """Capacity to announce instead of the machine's (e.g. cpu=16 so that big CPU requests schedule)."""
    pass_env: tuple[str, ...] = ()
    """More names passed from the agent's environment to every container (e.g. OMP_NUM_THREADS)."""
    shutdown_grace: float = 30.0
    resync_seconds: int = 30
    heartbeat_seconds: float = 10.0
    shm_root: Path = Path("/dev/shm/ftj-nodeagent")


def machine_capacity(cfg: AgentConfig) -> dict[str, str]:
    """This machine's cpu and memory, 110 pods, the configured (fake) GPUs, then the overrides."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    cap = {
        "cpu": str(os.cpu_count() or 1),
        "memory": f"{mem_kib}Ki",
        "pods": str(scheduling.MAX_PODS),
        "ephemeral-storage": str(shutil.disk_usage(cfg.state_dir).total),
    }
    return cap | ({cfg.gpu_resource: str(cfg.gpus)} if cfg.gpus > 0 else {}) | dict(cfg.capacity)


class Agent:
    def __init__(self, kube: Kube, cfg: AgentConfig) -> None:
        self.kube, self.cfg = kube, cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.capacity = machine_capacity(cfg)
        self.node = scheduling.node_object(cfg.node_name, cfg.labels)
        host, port = kube.server
        base = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}"}
        base |= {n: os.environ[n] for n in (*BASE_ENV, *cfg.pass_env) if n in os.environ}
        self.ctx = NodeContext(
            cfg.node_name, host, port, sys.executable, base, self.capacity, hostsfile.writable()
        )
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._pods: dict[Key, Obj] = {}
        self._queue: queue.Queue[Key] = queue.Queue()
        self._retry: dict[Key, float] = {}
        self._relisted = threading.Event()
        self._ready_since = now_iso()
        self.kubelet = Kubelet(
            kube,
            self.ctx,
            self.layout,
            cfg.state_dir,
            namespace=cfg.namespace,
            labels=self.node["metadata"]["labels"],
            cached_pods=self.cached_pods,
            retry=self._retry_later,
        )

    def _retry_later(self, key: Key, seconds: float) -> None:
        self._retry[key] = time.monotonic() + seconds

    def layout(self, pod: Obj) -> Layout:
        m = meta(pod)
        shm = self.cfg.shm_root / self.cfg.node_name
        return Layout(self.cfg.state_dir, shm, m.get("namespace", ""), m.get("name", ""), m.get("uid", ""))

    # -- lifecycle -------------------------------------------------------------------------------
    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Register the node, then sync until `stop` is set; then stop every pod (graceful shutdown)."""
        if leftovers := kill_tagged(self.cfg.node_name):
            log.warning(
                "killed %d process(es) an earlier agent of node %s left behind", leftovers, self.cfg.node_name
            )
        if not self.ctx.hosts_file:
            log.warning("%s is not writable: pod DNS names in env become 127.0.0.1 instead", hostsfile.HOSTS)
        self.kube.ensure_node(self.node)
        self.node = self.kube.get_node(self.cfg.node_name) or self.node
        self.heartbeat()
        log.info("node %s registered and Ready: %s", self.cfg.node_name, self.capacity)
        for target in (self._watch_loop, self._heartbeat_loop):
            threading.Thread(target=target, name=target.__name__, daemon=True).start()
        if on_ready is not None:
            on_ready()
        try:
            while not self.stop.is_set():
                self._step()
        finally:
            self.kubelet.shutdown(self.cfg.shutdown_grace)
            shutil.rmtree(self.cfg.shm_root / self.cfg.node_name, ignore_errors=True)
            try:
                self.heartbeat(ready=False, message="dev node agent stopped")
            except Exception as exc:
                log.warning("could not mark node %s NotReady: %s", self.cfg.node_name, exc)
            log.info("node agent %s stopped", self.cfg.node_name)

    def _step(self) -> None:
        keys: set[Key] = set()
        try:
            keys.add(self._queue.get(timeout=0.2))
            while True:
                keys.add(self._queue.get_nowait())
        except queue.Empty:
            pass
        now = time.monotonic()
        due = {k for k, at in self._retry.items() if at <= now}
        for key in due:
            del self._retry[key]
        self.kubelet.sync_hosts()
        if self._relisted.is_set():
            self._relisted.clear()
            self.kubelet.collect_garbage(self.cached_pods())
        for key in sorted(keys | due):
            try:
                self.kubelet.sync(key, self.pod(key))
            except Exception:
                log.exception("sync of pod %s/%s failed; retrying", *key)
                self._retry_later(key, 5.0)
        for key in self.kubelet.poll():
            self._queue.put(key)
            for pod in self.cached_pods():  # resources were freed: pending pods may fit now
                if not pod.get("spec", {}).get("nodeName"):
                    self._queue.put(key_of(pod))

    def heartbeat(self, *, ready: bool = True, message: str = "dev node agent is running pods") -> None:
        status = scheduling.node_status(
            self.cfg.node_name,
            self.capacity,
            ready=ready,
            message=message,
            now=now_iso(),
            since=self._ready_since,
        )
        self.kube.patch_node_status(self.cfg.node_name, status)
        if ready:
            self.kube.renew_lease(self.node)

    # -- threads -----------------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        while not self.stop.is_set():
            try:
                items, version = self.kube.list_pods(self.cfg.namespace)
                fresh = {key_of(p): p for p in items}
                with self._lock:
                    gone, self._pods = set(self._pods) - set(fresh), fresh
                for key in {*fresh, *gone}:
                    self._queue.put(key)
                self._relisted.set()
                for kind, obj in self.kube.watch_pods(self.cfg.namespace, version, self.cfg.resync_seconds):
                    if self.stop.is_set():
                        return
                    if kind not in ("ADDED", "MODIFIED", "DELETED"):
                        continue
                    with self._lock:
                        if kind == "DELETED":
                            self._pods.pop(key_of(obj), None)
                        else:
                            self._pods[key_of(obj)] = obj
                    self._queue.put(key_of(obj))
            except Exception as exc:  # an API server restart, an expired resourceVersion: relist
                log.warning("pod watch interrupted (%s); relisting", exc)
                self.stop.wait(1.0)

    def _heartbeat_loop(self) -> None:
        while not self.stop.wait(self.cfg.heartbeat_seconds):
            try:
                self.heartbeat()
            except Exception as exc:
                log.warning("node heartbeat failed: %s", exc)

    # -- cache -------------------------------------------------------------------------------------
    def pod(self, key: Key) -> Obj | None:
        with self._lock:
            return self._pods.get(key)

    def cached_pods(self) -> list[Obj]:
        with self._lock:
            return list(self._pods.values())
