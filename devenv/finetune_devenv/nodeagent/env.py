"""A container's environment, resolved the way the kubelet does it.

Order (kubelet ``makeEnvironmentVariables``): the service variables for the API server, then
``envFrom`` sources in order, then ``env`` in order, later names winning; ``$(VAR)`` in a value is
expanded from what is defined before it, ``$$`` escapes a ``$``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from finetune_devenv.nodeagent.context import (
    HOST_IP,
    NodeContext,
    Obj,
    PodConfigError,
    PodData,
    meta,
    quantity,
    spec,
)

_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: a defined name is replaced, an undefined one left as is."""
    out: list[str] = []
    i = 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if value.startswith("$(", i) and (end := value.find(")", i + 2)) != -1:
            name = value[i + 2 : end]
            out.append(env[name] if name in env else value[i : end + 1])
            i = end + 1
            continue
        out.append(value[i])
        i += 1
    return "".join(out)


def field_ref(pod: Obj, path: str, where: str) -> str:
    """The downward API's fieldRef values (env and downwardAPI volumes)."""
    m, s = meta(pod), spec(pod)
    simple: dict[str, Any] = {
        "metadata.name": m.get("name"),
        "metadata.namespace": m.get("namespace"),
        "metadata.uid": m.get("uid"),
        "spec.nodeName": s.get("nodeName"),
        "spec.serviceAccountName": s.get("serviceAccountName"),
        "status.podIP": HOST_IP,
        "status.podIPs": HOST_IP,
        "status.hostIP": HOST_IP,
        "status.hostIPs": HOST_IP,
    }
    if path in simple:
        return str(simple[path] or "")
    if path in ("metadata.labels", "metadata.annotations"):
        values = m.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
    if match := _SUBSCRIPT.match(path):
        return str((m.get(match[1]) or {}).get(match[2], ""))
    raise PodConfigError(f"{where}.fieldPath: {path!r} is not supported by the dev node agent")


def resource_ref(pod: Obj, ref: Obj, default_container: str, ctx: NodeContext, where: str) -> str:
    """A resourceFieldRef: the container's limit or request (or node allocatable), over the divisor."""
    name = ref.get("containerName") or default_container
    container = next((c for c in spec(pod).get("containers") or [] if c.get("name") == name), None)
    if container is None:
        raise PodConfigError(f"{where}.containerName: no container named {name!r} in the pod")
    kind, _, resource = str(ref.get("resource", "")).partition(".")
    if kind not in ("limits", "requests") or not resource:
        raise PodConfigError(f"{where}.resource: {ref.get('resource')!r} is not limits.X or requests.X")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(resource)
    if raw is None and kind == "requests":
        raw = (resources.get("limits") or {}).get(resource)
    if raw is None:
        raw = ctx.allocatable.get(resource, "0")
    divisor = quantity(ref.get("divisor") or "1")
    if divisor == 0:
        raise PodConfigError(f"{where}.divisor must not be 0")
    return str(math.ceil(quantity(raw) / divisor))


def _key(
    data: Mapping[str, bytes] | None, kind: str, ref: Obj, where: str
) -> str | None:  # None: optional and missing
    name, key = ref.get("name", ""), ref.get("key", "")
    if data is None or key not in data:
        if ref.get("optional"):
            return None
        missing = f"{kind} {name!r} not found" if data is None else f"{kind} {name!r} has no key {key!r}"
        raise PodConfigError(f"{where}: {missing}; create it or mark the reference optional")
    return data[key].decode(errors="surrogateescape")


def service_env(ctx: NodeContext) -> dict[str, str]:
    """What Kubernetes injects for the `kubernetes` Service: here, the local API server's address."""
    host, port = ctx.api_host, str(ctx.api_port)
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": port,
        "KUBERNETES_SERVICE_PORT_HTTPS": port,
        "KUBERNETES_PORT": f"tcp://{host}:{port}",
    }


def container_env(pod: Obj, container: Obj, where: str, data: PodData, ctx: NodeContext) -> dict[str, str]:
    """The container's environment as Kubernetes would compute it (before dev-only path rewrites)."""
    env: dict[str, str] = {}
    for i, source in enumerate(container.get("envFrom") or []):
        env |= _env_from(source, data, f"{where}.envFrom[{i}]")
    for i, var in enumerate(container.get("env") or []):
        here = f"{where}.env[{i}]"
        name = var.get("name", "")
        if "valueFrom" not in var:
            env[name] = expand(str(var.get("value") or ""), env)
            continue
        value = _value_from(pod, container, var["valueFrom"], data, ctx, f"{here}.valueFrom")
        if value is not None:
            env[name] = value
    return env


def _env_from(source: Obj, data: PodData, where: str) -> dict[str, str]:
    prefix = source.get("prefix") or ""
    if "configMapRef" in source:
        ref, kind, values = (
            source["configMapRef"],
            "configMap",
            data.config_map(source["configMapRef"]["name"]),
        )
    elif "secretRef" in source:
        ref, kind, values = source["secretRef"], "secret", data.secret(source["secretRef"]["name"])
    else:
        raise PodConfigError(f"{where}: only configMapRef and secretRef are supported")
    if values is None:
        if ref.get("optional"):
            return {}
        raise PodConfigError(f"{where}.{kind}Ref: {kind} {ref.get('name')!r} not found; create it")
    # the kubelet skips keys that are not valid variable names (and emits an event)
    return {
        prefix + k: v.decode(errors="surrogateescape")
        for k, v in values.items()
        if _ENV_NAME.match(prefix + k)
    }


def _value_from(
    pod: Obj, container: Obj, source: Obj, data: PodData, ctx: NodeContext, where: str
) -> str | None:
    if "fieldRef" in source:
        return field_ref(pod, source["fieldRef"].get("fieldPath", ""), f"{where}.fieldRef")
    if "resourceFieldRef" in source:
        return resource_ref(
            pod, source["resourceFieldRef"], container["name"], ctx, f"{where}.resourceFieldRef"
        )
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        return _key(data.secret(ref.get("name", "")), "secret", ref, f"{where}.secretKeyRef")
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        return _key(data.config_map(ref.get("name", "")), "configMap", ref, f"{where}.configMapKeyRef")
    raise PodConfigError(f"{where}: unsupported source {sorted(source)}")
