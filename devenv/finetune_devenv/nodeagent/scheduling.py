"""The scheduler's part, for one node: does a pending pod fit, and the Node object itself. Pure.

Fit is simple accounting, like the scheduler's NodeResourcesFit filter: the requests of the pods
bound to this node and not finished, plus this pod's, must not exceed allocatable, for every
resource the pod requests (cpu, memory, nvidia.com/gpu, ...) and for the pod count; the pod's
nodeSelector must match the node's labels. Node affinity, taints and topology spread are not checked.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Mapping
from decimal import Decimal

from finetune_devenv.nodeagent.context import HOST_IP, Obj, meta, quantity, spec

SCHEDULER_NAME = "default-scheduler"
MAX_PODS = 110
KUBELET_VERSION = "v1.36.3"
LEASE_SECONDS = 40
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def requests(pod: Obj) -> dict[str, Decimal]:
    """The pod's effective requests (the API server already copied limits into missing requests)."""
    total: dict[str, Decimal] = {"pods": Decimal(1)}
    for container in spec(pod).get("containers") or []:
        resources = container.get("resources") or {}
        wanted = (resources.get("limits") or {}) | (resources.get("requests") or {})
        for name, amount in wanted.items():
            total[name] = total.get(name, Decimal(0)) + quantity(amount)
    for name, amount in (spec(pod).get("overhead") or {}).items():
        total[name] = total.get(name, Decimal(0)) + quantity(amount)
    return total


def active(pod: Obj) -> bool:
    """Still holds its resources: not finished (a deleting pod holds them until it is gone)."""
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def unfit_reason(
    pod: Obj, allocatable: Mapping[str, str], labels: Mapping[str, str], bound: Iterable[Obj]
) -> str | None:
    """Why `pod` does not fit this node (the scheduler's message), or None when it fits."""
    selector = spec(pod).get("nodeSelector") or {}
    if any(labels.get(k) != v for k, v in selector.items()):
        return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    used: dict[str, Decimal] = {}
    for other in bound:
        for name, value in requests(other).items():
            used[name] = used.get(name, Decimal(0)) + value
    short = [
        name
        for name, value in requests(pod).items()
        if used.get(name, Decimal(0)) + value > quantity(allocatable.get(name, "0"))
    ]
    if short:
        reasons = ", ".join(f"1 Insufficient {name}" for name in sorted(short))
        return f"0/1 nodes are available: {reasons}."
    return None


def wants_us(pod: Obj, namespace: str | None) -> bool:
    """An unbound, live pod for the default scheduler (in our namespace, when the agent has one)."""
    s, m = spec(pod), meta(pod)
    return (
        not s.get("nodeName")
        and s.get("schedulerName", SCHEDULER_NAME) == SCHEDULER_NAME
        and not m.get("deletionTimestamp")
        and (namespace is None or m.get("namespace") == namespace)
        and (pod.get("status") or {}).get("phase", "Pending") == "Pending"
    )


def node_object(name: str, labels: Mapping[str, str]) -> Obj:
    base = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": ARCH,
        "node.kubernetes.io/instance-type": "ftj-dev-node",
    }
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": base | dict(labels)}}


def node_status(
    name: str, capacity: Mapping[str, str], *, ready: bool, message: str, now: str, since: str
) -> Obj:
    """The Node status patch: capacity = allocatable, Ready (or not) since `since`, no pressure."""

    def condition(kind: str, status: str, reason: str, text: str) -> Obj:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": text,
            "lastHeartbeatTime": now,
            "lastTransitionTime": since,
        }

    return {
        "status": {
            "capacity": dict(capacity),
            "allocatable": dict(capacity),
            "conditions": [
                condition(
                    "Ready",
                    "True" if ready else "False",
                    "KubeletReady" if ready else "KubeletNotReady",
                    message,
                ),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "dev node agent"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "dev node agent"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "dev node agent"),
            ],
            "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": name}],
            "nodeInfo": {
                "kubeletVersion": KUBELET_VERSION,
                "containerRuntimeVersion": "ftj-nodeagent://processes",
                "operatingSystem": "linux",
                "architecture": ARCH,
                "kernelVersion": platform.release(),
                "osImage": "dev machine (no container runtime)",
            },
        }
    }
