"""One pod at a time, what a kubelet (and, for unbound pods, the scheduler) does with it.

``sync`` is level-based: given the pod as the API last showed it (or None when it is gone), it binds
it, starts its containers, writes its status, stops it on deletion and finishes the deletion, and
cleans up after it. It is safe to call any number of times: status writes are skipped when nothing
the kubelet reports has changed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from kubernetes.client import ApiException

from finetune_devenv.nodeagent import hostsfile, pods, scheduling
from finetune_devenv.nodeagent.context import Layout, NodeContext, Obj, PodConfigError, PodData, meta, spec
from finetune_devenv.nodeagent.kube import Kube
from finetune_devenv.nodeagent.runner import PodRuntime, kill_tagged, materialise, now_iso
from finetune_devenv.nodeagent.status import (
    NODE_SHUTDOWN_MESSAGE,
    PodView,
    Terminated,
    Waiting,
    lost,
    phase,
    status_patch,
)

log = logging.getLogger("nodeagent")
Key = tuple[str, str]
TERMINAL = ("Succeeded", "Failed")
RETRY_SECONDS = 5.0


def key_of(pod: Obj) -> Key:
    return meta(pod).get("namespace", ""), meta(pod).get("name", "")


class Kubelet:
    def __init__(
        self,
        kube: Kube,
        ctx: NodeContext,
        layout: Callable[[Obj], Layout],
        state_dir: Path,
        *,
        namespace: str | None,
        labels: Mapping[str, str],
        cached_pods: Callable[[], list[Obj]],
        retry: Callable[[Key, float], None],
    ) -> None:
        self.kube, self.ctx, self.layout, self.state_dir = kube, ctx, layout, state_dir
        self.node = ctx.node_name
        self.namespace, self.labels = namespace, labels
        self.cached_pods, self.retry = cached_pods, retry
        self.runtimes: dict[str, tuple[Key, PodRuntime]] = {}
        self._written: dict[str, str] = {}
        self._finalized: set[str] = set()
        self._unschedulable: dict[str, str] = {}
        self._hosts: frozenset[str] | None = None

    # -- the loop's entry points -------------------------------------------------------------------
    def sync(self, key: Key, pod: Obj | None) -> None:
        for uid, (k, other) in list(self.runtimes.items()):
            if k == key and (pod is None or meta(pod).get("uid") != uid) and other.deadline is None:
                log.info("pod %s/%s is gone: stopping its processes", *key)
                other.terminate(other.grace)
        if pod is None:
            return
        if not spec(pod).get("nodeName"):
            if scheduling.wants_us(pod, self.namespace):
                self._schedule(pod)
            return
        if spec(pod)["nodeName"] != self.node:
            return
        uid = meta(pod).get("uid", "")
        runtime = self.runtimes[uid][1] if uid in self.runtimes else None
        if meta(pod).get("deletionTimestamp"):
            self._sync_deleting(pod, runtime)
        elif runtime is not None:
            self._write_status(pod, runtime.view())
        elif (pod.get("status") or {}).get("phase") in TERMINAL:
            return
        elif _started_before(pod):  # by an agent that stopped without seeing it end
            self._write_status(pod, PodView({c: lost(now_iso()) for c in _names(pod)}))
        elif reason := pods.unsupported(pod):
            refused = Terminated(128, "StartError", now_iso(), reason)
            view = PodView({c: refused for c in _names(pod)}, failed_reason="NodeAgentUnsupported")
            self._write_status(pod, replace(view, failed_message=reason))
        else:
            self._start(pod)

    def poll(self) -> list[Key]:
        """Keys of pods whose processes changed; pods already gone from the API are cleaned up."""
        changed = []
        for uid, (key, runtime) in list(self.runtimes.items()):
            if runtime.poll():
                changed.append(key)
            if runtime.finished and runtime.deadline is not None and self._cached(key, uid) is None:
                self._cleanup(uid, runtime.layout)
        return changed

    def sync_hosts(self) -> None:
        """The /etc/hosts block: names of every live pod bound to this node."""
        if not self.ctx.hosts_file:
            return
        live = [
            p for p in self.cached_pods() if spec(p).get("nodeName") == self.node and scheduling.active(p)
        ]
        names = frozenset(n for p in live for n in pods.hostnames(p))
        if names != self._hosts:
            hostsfile.update(self.node, names)
            self._hosts = names

    def shutdown(self, grace_cap: float) -> None:
        """A kubelet's graceful node shutdown: stop every pod, then mark each Failed (DisruptionTarget)."""
        stopped = {uid for uid, (_, runtime) in self.runtimes.items() if not runtime.finished}
        log.info("node shutdown: stopping %d pod(s) (grace at most %.0fs)", len(stopped), grace_cap)
        for uid in stopped:
            runtime = self.runtimes[uid][1]
            runtime.terminate(min(runtime.grace, grace_cap))
        give_up = time.monotonic() + grace_cap + 10
        while any(not r.finished for _, r in self.runtimes.values()) and time.monotonic() < give_up:
            for _, runtime in self.runtimes.values():
                runtime.poll()
            time.sleep(0.05)
        disruption = ("TerminationByKubelet", NODE_SHUTDOWN_MESSAGE)
        for uid, (key, runtime) in list(self.runtimes.items()):
            pod = self._cached(key, uid)
            try:
                if pod is not None and meta(pod).get("deletionTimestamp"):
                    self._sync_deleting(pod, runtime)
                elif pod is not None and uid in stopped:
                    view = replace(
                        runtime.view(), failed_reason="Terminated", failed_message=NODE_SHUTDOWN_MESSAGE
                    )
                    self._write_status(pod, replace(view, disruption=disruption))
            except Exception:
                log.exception("could not write the final status of pod %s/%s", *key)
        kill_tagged(self.node)
        if self.ctx.hosts_file:
            hostsfile.update(self.node, [])

    def collect_garbage(self, cached: list[Obj]) -> None:
        """Forget pods that no longer exist; remove their sandboxes (deleted while no agent watched)."""
        live = {meta(p).get("uid") for p in cached} | set(self.runtimes)
        self._finalized &= live
        self._unschedulable = {uid: r for uid, r in self._unschedulable.items() if uid in live}
        self._written = {uid: w for uid, w in self._written.items() if uid in live}
        prefix = f"{self.namespace}_" if self.namespace else ""
        for folder in (self.state_dir / "pods").glob(f"{prefix}*"):
            uid = _read_uid_file(folder / "uid")
            if uid is not None and uid not in live:
                shutil.rmtree(folder, ignore_errors=True)

    # -- steps ---------------------------------------------------------------------------------------
    def _schedule(self, pod: Obj) -> None:
        key, uid = key_of(pod), meta(pod).get("uid", "")
        bound = [
            p
            for p in self.cached_pods()
            if spec(p).get("nodeName") == self.node and scheduling.active(p) and key_of(p) != key
        ]
        reason = scheduling.unfit_reason(pod, self.ctx.allocatable, self.labels, bound)
        if reason is not None:
            if self._unschedulable.get(uid) != reason:
                condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
                condition |= {"message": reason, "lastTransitionTime": now_iso()}
                self.kube.patch_pod_status(key[0], key[1], {"status": {"conditions": [condition]}})
                self._unschedulable[uid] = reason
                log.info("pod %s/%s does not fit: %s", *key, reason)
            return
        try:
            self.kube.bind(key[0], key[1], self.node)
        except ApiException as exc:
            if exc.status in (404, 409):  # gone, or bound meanwhile by someone else
                return
            raise
        spec(pod)["nodeName"] = (
            self.node
        )  # assumed until the watch shows it (the scheduler's cache does this)
        self._unschedulable.pop(uid, None)
        log.info("bound pod %s/%s to %s", *key, self.node)

    def _start(self, pod: Obj) -> None:
        key, uid = key_of(pod), meta(pod)["uid"]
        layout = self.layout(pod)
        try:
            plan = pods.plan_pod(pod, self._fetch(pod), self.ctx, layout)
        except PodConfigError as exc:
            waiting = Waiting("CreateContainerConfigError", str(exc))
            if self._write_status(pod, PodView({c: waiting for c in _names(pod)})):
                log.warning("pod %s/%s cannot start yet: %s", *key, exc)
            self.retry(key, RETRY_SECONDS)
            return
        if layout.root.exists() and _read_uid(layout) != uid:  # a former pod of the same name
            shutil.rmtree(layout.root, ignore_errors=True)
        materialise(plan, layout)
        (layout.root / "uid").write_text(uid)
        self.sync_hosts()
        grace = float(spec(pod).get("terminationGracePeriodSeconds", 30))
        runtime = PodRuntime.start(self.node, uid, plan, layout, grace)
        self.runtimes[uid] = (key, runtime)
        log.info(
            "started pod %s/%s: %s",
            *key,
            ", ".join(f"{c.spec.container}={c.state}" for c in runtime.containers.values()),
        )
        self._write_status(pod, runtime.view())

    def _fetch(self, pod: Obj) -> PodData:
        ns, needs = meta(pod)["namespace"], pods.needs(pod)
        return PodData(
            config_maps={name: self.kube.get_config_map(ns, name) for name in needs.config_maps},
            secrets={name: self.kube.get_secret(ns, name) for name in needs.secrets},
            tokens={token: self.kube.request_token(pod, *token) for token in needs.tokens},
        )

    def _sync_deleting(self, pod: Obj, runtime: PodRuntime | None) -> None:
        (ns, name), uid = key_of(pod), meta(pod)["uid"]
        if uid in self._finalized:
            return
        if runtime is not None and not runtime.finished:
            if runtime.deadline is None:
                grace = float(meta(pod).get("deletionGracePeriodSeconds") or 0)
                log.info("pod %s/%s deleted: SIGTERM, SIGKILL after %.0fs", ns, name, grace)
                runtime.terminate(grace)
            return
        if runtime is not None:
            self._write_status(pod, runtime.view())
        elif (pod.get("status") or {}).get("phase") not in TERMINAL:
            self._write_status(pod, PodView({c: lost(now_iso()) for c in _names(pod)}))
        try:
            self.kube.delete_pod_now(ns, name, uid)
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone already, or replaced by a pod of the same name
                raise
        self._finalized.add(uid)
        self._cleanup(uid, self.layout(pod))
        log.info("pod %s/%s stopped and deleted", ns, name)

    def _write_status(self, pod: Obj, view: PodView) -> bool:
        """Patch the pod's status if it says something new; True when it did."""
        (ns, name), uid = key_of(pod), meta(pod)["uid"]
        if view.start_time is None:
            view = replace(view, start_time=(pod.get("status") or {}).get("startTime"))
        patch = status_patch(pod, view, now_iso())
        fingerprint = _fingerprint(patch)
        if self._written.get(uid) == fingerprint:
            return False
        try:
            self.kube.patch_pod_status(ns, name, patch)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        self._written[uid] = fingerprint
        log.info("pod %s/%s: %s", ns, name, phase(view))
        return True

    def _cleanup(self, uid: str, layout: Layout) -> None:
        self.runtimes.pop(uid, None)
        self._written.pop(uid, None)
        if _read_uid(layout) in (uid, None):
            shutil.rmtree(layout.root, ignore_errors=True)
        shutil.rmtree(layout.shm, ignore_errors=True)

    def _cached(self, key: Key, uid: str) -> Obj | None:
        return next((p for p in self.cached_pods() if key_of(p) == key and meta(p).get("uid") == uid), None)


def _names(pod: Obj) -> list[str]:
    return [c.get("name", "") for c in spec(pod).get("containers") or []]


def _started_before(pod: Obj) -> bool:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return any({"running", "terminated"} & set(s.get("state") or {}) for s in statuses)


def _read_uid(layout: Layout) -> str | None:
    return _read_uid_file(layout.root / "uid")


def _read_uid_file(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _fingerprint(patch: Obj) -> str:
    """The patch without its timestamps of 'now': equal fingerprints mean nothing new to report."""
    status = {k: v for k, v in patch["status"].items() if k != "startTime"}
    status["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions", [])
    ]
    return json.dumps(status, sort_keys=True)
