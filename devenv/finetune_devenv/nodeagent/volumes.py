"""Pod volumes as folders and files on this machine.

Each volume becomes a folder: ``emptyDir`` an empty one (``medium: Memory`` under /dev/shm),
``configMap``/``secret``/``downwardAPI``/``projected`` a folder of files written from the fetched
objects (``items``, ``defaultMode`` and per-item ``mode`` honoured), ``persistentVolumeClaim`` a
folder per claim that outlives the pod, ``hostPath`` the host path itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from finetune_devenv.nodeagent.context import (
    DEFAULT_TOKEN_SECONDS,
    Layout,
    NodeContext,
    Obj,
    PodConfigError,
    PodData,
    TokenKey,
    spec,
)
from finetune_devenv.nodeagent.env import field_ref, resource_ref

DEFAULT_MODE = 0o644


@dataclass(frozen=True)
class FileSpec:
    path: Path
    content: bytes
    mode: int


@dataclass(frozen=True)
class VolumePlan:
    paths: Mapping[str, Path]
    """Volume name to the folder that stands in for it."""
    dirs: tuple[Path, ...]
    files: tuple[FileSpec, ...]


def token_key(source: Obj) -> TokenKey:
    return (str(source.get("audience") or ""), int(source.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS))


def needs(pod: Obj) -> tuple[set[str], set[str], set[TokenKey]]:
    """ConfigMaps, Secrets and tokens the volumes and env of `pod` reference."""
    config_maps: set[str] = set()
    secrets: set[str] = set()
    tokens: set[TokenKey] = set()
    for volume in spec(pod).get("volumes") or []:
        sources = [volume, *((volume.get("projected") or {}).get("sources") or [])]
        for source in sources:
            if "configMap" in source:
                config_maps.add(source["configMap"].get("name", ""))
            if "secret" in source:
                secrets.add(source["secret"].get("secretName") or source["secret"].get("name", ""))
            if "serviceAccountToken" in source:
                tokens.add(token_key(source["serviceAccountToken"]))
    for container in spec(pod).get("containers") or []:
        for source in container.get("envFrom") or []:
            if "configMapRef" in source:
                config_maps.add(source["configMapRef"].get("name", ""))
            if "secretRef" in source:
                secrets.add(source["secretRef"].get("name", ""))
        for var in container.get("env") or []:
            value_from = var.get("valueFrom") or {}
            if "configMapKeyRef" in value_from:
                config_maps.add(value_from["configMapKeyRef"].get("name", ""))
            if "secretKeyRef" in value_from:
                secrets.add(value_from["secretKeyRef"].get("name", ""))
    return config_maps, secrets, tokens


def plan_volumes(pod: Obj, data: PodData, layout: Layout, ctx: NodeContext) -> VolumePlan:
    paths: dict[str, Path] = {}
    dirs: list[Path] = []
    files: list[FileSpec] = []
    for i, volume in enumerate(spec(pod).get("volumes") or []):
        name, where = volume.get("name", ""), f"spec.volumes[{i}]"
        if "hostPath" in volume:
            paths[name] = Path(volume["hostPath"].get("path", ""))
            if volume["hostPath"].get("type") == "DirectoryOrCreate":
                dirs.append(paths[name])
            continue
        if "persistentVolumeClaim" in volume:
            paths[name] = layout.pvc(volume["persistentVolumeClaim"].get("claimName", ""))
            dirs.append(paths[name])
            continue
        memory = (volume.get("emptyDir") or {}).get("medium") == "Memory"
        folder = paths[name] = layout.volume(name, memory=memory)
        dirs.append(folder)
        if "emptyDir" in volume:
            continue
        if "configMap" in volume or "secret" in volume or "downwardAPI" in volume:
            files += _source_files(pod, volume, folder, data, ctx, where, DEFAULT_MODE)
        elif "projected" in volume:
            projected = volume["projected"]
            mode = projected.get("defaultMode", DEFAULT_MODE)
            for j, source in enumerate(projected.get("sources") or []):
                files += _source_files(
                    pod, source, folder, data, ctx, f"{where}.projected.sources[{j}]", mode
                )
        else:
            kinds = sorted(k for k in volume if k != "name")
            raise PodConfigError(
                f"{where} ({name}): volume type {kinds} is not supported by the dev node agent (supported: "
                "emptyDir, configMap, secret, projected, downwardAPI, persistentVolumeClaim, hostPath)"
            )
    return VolumePlan(paths, tuple(dirs), tuple(files))


def _source_files(
    pod: Obj, source: Obj, folder: Path, data: PodData, ctx: NodeContext, where: str, mode: int
) -> list[FileSpec]:
    """Files of one volume source (a plain volume or one projected source)."""
    if "serviceAccountToken" in source:
        token = source["serviceAccountToken"]
        value = data.tokens.get(token_key(token))
        if value is None:
            raise PodConfigError(f"{where}.serviceAccountToken: no token could be requested")
        return [_file(folder, token.get("path", "token"), value.encode(), mode, where)]
    if "downwardAPI" in source:
        down = source["downwardAPI"]
        out = []
        for k, item in enumerate(down.get("items") or []):
            here = f"{where}.downwardAPI.items[{k}]"
            if "fieldRef" in item:
                value = field_ref(pod, item["fieldRef"].get("fieldPath", ""), f"{here}.fieldRef")
            else:
                container = (spec(pod).get("containers") or [{}])[0].get("name", "")
                value = resource_ref(pod, item.get("resourceFieldRef") or {}, container, ctx, here)
            item_mode = item.get("mode", down.get("defaultMode", mode))
            out.append(_file(folder, item.get("path", ""), value.encode(), item_mode, here))
        return out
    if "configMap" in source:
        ref, kind = source["configMap"], "configMap"
        name = ref.get("name", "")
        values = data.config_map(name)
    elif "secret" in source:
        ref, kind = source["secret"], "secret"
        name = ref.get("secretName") or ref.get("name", "")
        values = data.secret(name)
    else:
        raise PodConfigError(f"{where}: unsupported volume source {sorted(source)}")
    here = f"{where}.{kind}"
    if values is None:
        if ref.get("optional"):
            return []
        raise PodConfigError(f"{here}: {kind} {name!r} not found; create it or mark the volume optional")
    mode = ref.get("defaultMode", mode)
    items = ref.get("items") or [{"key": k, "path": k} for k in sorted(values)]
    out = []
    for k, item in enumerate(items):
        key = item.get("key", "")
        if key not in values:
            if ref.get("optional"):
                continue
            raise PodConfigError(f"{here}.items[{k}]: {kind} {name!r} has no key {key!r}")
        out.append(_file(folder, item.get("path", key), values[key], item.get("mode", mode), here))
    return out


def _file(folder: Path, relative: str, content: bytes, mode: int, where: str) -> FileSpec:
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise PodConfigError(f"{where}: path {relative!r} must be relative and stay inside the volume")
    return FileSpec(folder / rel, content, int(mode))
