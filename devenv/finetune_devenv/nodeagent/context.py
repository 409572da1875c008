"""What the pure translation needs besides the pod: the node, the fetched objects, the sandbox layout."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from kubernetes.utils.quantity import parse_quantity

Obj = dict[str, Any]
"""A Kubernetes object as the API serves it in JSON (camelCase keys)."""

DEFAULT_TOKEN_SECONDS = 3600
TokenKey = tuple[str, int]
"""(audience, expirationSeconds) of a projected service-account token; "" means the API's audience."""

HOST_IP = "127.0.0.1"
"""Pod IP and host IP alike: every pod shares this machine's network."""

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"

# Set in every container's environment. Descendants inherit them (even ones that start a session of
# their own, as torchrun does), which is how the agent finds every process of a container to kill it.
TAG_NODE = "FTJ_NODEAGENT_NODE"
TAG_POD_UID = "FTJ_NODEAGENT_POD_UID"
TAG_CONTAINER = "FTJ_NODEAGENT_CONTAINER"


class PodConfigError(Exception):
    """The pod cannot be started as specified (kubelet: CreateContainerConfigError); the message names
    the field and what to do. Retried: a missing ConfigMap or Secret may appear later."""


@dataclass(frozen=True)
class NodeContext:
    """Facts about this node that end up in a container's environment."""

    node_name: str
    api_host: str
    api_port: int
    python: str
    """The agent's interpreter: `python`/`python3` commands run with it, so the venv's packages are used."""
    base_env: Mapping[str, str] = field(default_factory=dict)
    """What every container starts from before the pod's env (PATH, HOME, LANG: the image's ENV stand-in)."""
    allocatable: Mapping[str, str] = field(default_factory=dict)
    """Node allocatable: the value of a resourceFieldRef whose container sets no limit."""
    hosts_file: bool = True
    """False when /etc/hosts is not writable: pod DNS names in env are rewritten to 127.0.0.1 instead."""


@dataclass(frozen=True)
class PodData:
    """The objects a pod references, fetched by the agent; None marks one that does not exist."""

    config_maps: Mapping[str, Obj | None] = field(default_factory=dict)
    secrets: Mapping[str, Obj | None] = field(default_factory=dict)
    tokens: Mapping[TokenKey, str] = field(default_factory=dict)

    def config_map(self, name: str) -> dict[str, bytes] | None:
        obj = self.config_maps.get(name)
        if obj is None:
            return None
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        return data | {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}

    def secret(self, name: str) -> dict[str, bytes] | None:
        obj = self.secrets.get(name)
        if obj is None:
            return None
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}


@dataclass(frozen=True)
class Needs:
    """The objects :class:`PodData` must hold to translate a pod."""

    config_maps: frozenset[str] = frozenset()
    secrets: frozenset[str] = frozenset()
    tokens: frozenset[TokenKey] = frozenset()


@dataclass(frozen=True)
class Layout:
    """Where one pod's files live on this machine.

    ``<state>/pods/<ns>_<pod>/``: ``volumes/<volume>/``, ``containers/<c>/termination-log``,
    ``rootfs/<workingDir>``; ``<state>/logs/<ns>/<pod>/<c>.log``; memory-backed emptyDirs under
    ``/dev/shm/ftj-nodeagent/<node>/<pod uid>/``; PVCs under ``<state>/pvcs/<ns>/<claim>/``.
    """

    state_dir: Path
    shm_dir: Path
    namespace: str
    name: str
    uid: str

    @property
    def root(self) -> Path:
        return self.state_dir / "pods" / f"{self.namespace}_{self.name}"

    @property
    def shm(self) -> Path:
        return self.shm_dir / self.uid

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs" / self.namespace / self.name

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    def volume(self, name: str, *, memory: bool = False) -> Path:
        return (self.shm if memory else self.root / "volumes") / name

    def pvc(self, claim: str) -> Path:
        return self.state_dir / "pvcs" / self.namespace / claim

    def termination_log(self, container: str) -> Path:
        return self.root / "containers" / container / "termination-log"

    def log(self, container: str) -> Path:
        return self.logs / f"{container}.log"


def meta(pod: Obj) -> Obj:
    m: Obj = pod.get("metadata") or {}
    return m


def spec(pod: Obj) -> Obj:
    s: Obj = pod.get("spec") or {}
    return s


def quantity(value: str | int) -> Decimal:
    """A resource quantity ("500m", "4Gi", 8) as a number."""
    return Decimal(parse_quantity(value))  # type: ignore[no-untyped-call]
