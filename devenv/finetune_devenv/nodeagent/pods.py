"""Pod spec to local processes: argv, environment, files to write, host names. Pure, no I/O.

A container here is a process on the host, so its absolute paths cannot be used as is. The dev-only
rewrites, applied to the pod's own env values, args and workingDir (never to the agent's base env):

- a value that equals a volumeMount's ``mountPath``, or starts with it followed by ``/``, gets the
  volume's folder in the pod's sandbox instead (longest mountPath first; ``subPath`` honoured);
  the container's ``terminationMessagePath`` (default ``/dev/termination-log``) counts as a mount
  of ``<sandbox>/containers/<c>/termination-log``;
- ``FTJ_SA_DIR`` is set to the folder mounted at /var/run/secrets/kubernetes.io/serviceaccount and
  ``FTJ_TERMINATION_LOG`` to the termination-log file, unless the pod sets them itself;
- ``workingDir`` outside every mount becomes ``<sandbox>/rootfs/<workingDir>`` (default: rootfs);
- a command ``python``, ``python3`` or ``python3.N`` (any folder) runs the agent's interpreter;
- only if /etc/hosts is not writable: a value that is exactly a pod DNS name of this pod's
  subdomain (``<host>.<subdomain>[.<ns>[.svc[.cluster.local]]]``) or its own hostname becomes
  ``127.0.0.1``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from finetune_devenv.nodeagent import env as envs
from finetune_devenv.nodeagent import volumes
from finetune_devenv.nodeagent.context import (
    HOST_IP,
    SA_MOUNT,
    TAG_CONTAINER,
    TAG_NODE,
    TAG_POD_UID,
    Layout,
    Needs,
    NodeContext,
    Obj,
    PodConfigError,
    PodData,
    meta,
    spec,
)
from finetune_devenv.nodeagent.volumes import FileSpec

SA_DIR_ENV = "FTJ_SA_DIR"
TERMINATION_LOG_ENV = "FTJ_TERMINATION_LOG"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
_PYTHON = re.compile(r"^(?:.*/)?python(?:3(?:\.\d+)?)?$")


@dataclass(frozen=True)
class ProcessSpec:
    container: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: Path
    log: Path
    termination_log: Path
    fallback_to_logs: bool
    dirs: tuple[Path, ...] = ()
    """Folders the container needs besides its volumes: working dir, termination-log dir, subPaths."""
    """terminationMessagePolicy FallbackToLogsOnError: on failure, an empty termination log gives way to the
    log's tail."""


@dataclass(frozen=True)
class PodPlan:
    dirs: tuple[Path, ...]
    files: tuple[FileSpec, ...]
    processes: tuple[ProcessSpec, ...]


Mount = tuple[str, Path]
"""(path inside the container, folder or file on this machine)."""


def unsupported(pod: Obj) -> str | None:
    """Why this agent refuses to run `pod` at all (the pod fails with this message), or None."""
    s = spec(pod)
    policy = s.get("restartPolicy", "Always")
    if policy != "Never":
        return (
            f"spec.restartPolicy is {policy}: the dev node agent runs only restartPolicy Never pods "
            "(Job pods); set restartPolicy: Never"
        )
    if s.get("initContainers"):
        return "spec.initContainers are not supported by the dev node agent"
    for i, container in enumerate(s.get("containers") or []):
        if not container.get("command"):
            return (
                f"spec.containers[{i}].command is empty: the dev node agent does not pull images, so it "
                "cannot know the image's ENTRYPOINT; set command"
            )
    return None


def hostnames(pod: Obj) -> list[str]:
    """Names that resolve to the pod: its hostname and, with a subdomain, its headless-Service names."""
    s = spec(pod)
    host = s.get("hostname") or meta(pod).get("name", "")
    names = [host]
    if subdomain := s.get("subdomain"):
        fqdn = f"{host}.{subdomain}"
        namespace = meta(pod).get("namespace", "default")
        names += [
            fqdn,
            f"{fqdn}.{namespace}",
            f"{fqdn}.{namespace}.svc",
            f"{fqdn}.{namespace}.svc.cluster.local",
        ]
    return names


def needs(pod: Obj) -> Needs:
    config_maps, secrets, tokens = volumes.needs(pod)
    return Needs(frozenset(config_maps), frozenset(secrets), frozenset(tokens))


def plan_pod(pod: Obj, data: PodData, ctx: NodeContext, layout: Layout) -> PodPlan:
    """Everything the runner needs to start `pod`'s containers; raises PodConfigError."""
    vols = volumes.plan_volumes(pod, data, layout, ctx)
    dirs = [layout.rootfs, *vols.dirs]
    processes = []
    files = {f.path for f in vols.files}
    for i, container in enumerate(spec(pod).get("containers") or []):
        process = _process(pod, container, f"spec.containers[{i}]", vols.paths, data, ctx, layout)
        dirs += [d for d in process.dirs if d not in files]  # a subPath may name a file of the volume
        processes.append(process)
    return PodPlan(tuple(dict.fromkeys(dirs)), vols.files, tuple(processes))


def _process(
    pod: Obj,
    container: Obj,
    where: str,
    volume_paths: Mapping[str, Path],
    data: PodData,
    ctx: NodeContext,
    layout: Layout,
) -> ProcessSpec:
    name = container.get("name", "")
    own = envs.container_env(pod, container, where, data, ctx)
    view = envs.service_env(ctx) | {"HOSTNAME": hostnames(pod)[0]} | own  # what $(VAR) sees
    termination_log = layout.termination_log(name)
    mounts = _mounts(container, where, volume_paths, view)
    sub_paths = [
        local for (_, local), m in zip(mounts, container.get("volumeMounts") or [], strict=True) if _sub(m)
    ]
    mounts.append((container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH, termination_log))
    mounts.sort(key=lambda m: len(m[0]), reverse=True)

    def local(value: str) -> str:
        value = rewrite_path(value, mounts)
        return value if ctx.hosts_file else rewrite_hostname(value, pod)

    pod_env = {k: local(v) for k, v in own.items()}
    if SA_DIR_ENV not in pod_env and (sa_dir := rewrite_path(SA_MOUNT, mounts)) != SA_MOUNT:
        pod_env[SA_DIR_ENV] = sa_dir
    pod_env.setdefault(TERMINATION_LOG_ENV, str(termination_log))
    tags = {TAG_NODE: ctx.node_name, TAG_POD_UID: meta(pod).get("uid", ""), TAG_CONTAINER: name}
    full_env = {**ctx.base_env, **envs.service_env(ctx), "HOSTNAME": hostnames(pod)[0], **pod_env, **tags}

    argv = [local(envs.expand(a, view)) for a in [*container.get("command", []), *container.get("args", [])]]
    if not argv:
        raise PodConfigError(f"{where}.command is empty; set command (images are not pulled)")
    if _PYTHON.match(argv[0]):
        argv[0] = ctx.python
    working_dir = container.get("workingDir") or "/"
    rewritten = rewrite_path(working_dir, mounts)
    cwd = Path(rewritten) if rewritten != working_dir else layout.rootfs / working_dir.lstrip("/")
    return ProcessSpec(
        container=name,
        argv=tuple(argv),
        env=full_env,
        cwd=cwd,
        log=layout.log(name),
        termination_log=termination_log,
        fallback_to_logs=container.get("terminationMessagePolicy") == "FallbackToLogsOnError",
        dirs=(cwd, termination_log.parent, *sub_paths),
    )


def _mounts(
    container: Obj, where: str, volume_paths: Mapping[str, Path], env: Mapping[str, str]
) -> list[Mount]:
    mounts: list[Mount] = []
    for i, mount in enumerate(container.get("volumeMounts") or []):
        name = mount.get("name", "")
        if name not in volume_paths:
            raise PodConfigError(f"{where}.volumeMounts[{i}].name: no volume named {name!r} in spec.volumes")
        sub = mount.get("subPath") or envs.expand(mount.get("subPathExpr") or "", env)
        if PurePosixPath(sub).is_absolute() or ".." in PurePosixPath(sub).parts:
            raise PodConfigError(f"{where}.volumeMounts[{i}].subPath {sub!r} must be relative")
        mounts.append((mount.get("mountPath", ""), volume_paths[name] / sub if sub else volume_paths[name]))
    return mounts


def _sub(mount: Obj) -> str:
    return str(mount.get("subPath") or mount.get("subPathExpr") or "")


def rewrite_path(value: str, mounts: Sequence[Mount]) -> str:
    """Swap a leading container path for its folder on this machine (first matching mount wins)."""
    for container_path, local in mounts:
        root = container_path.rstrip("/")
        if root and (value == root or value.startswith(root + "/")):
            return str(local) + value[len(root) :]
    return value


def rewrite_hostname(value: str, pod: Obj) -> str:
    """Fallback when /etc/hosts cannot be written: this pod's DNS names (and its peers') to 127.0.0.1."""
    names = hostnames(pod)
    if value in names:
        return HOST_IP
    subdomain = spec(pod).get("subdomain")
    if subdomain:
        ns = re.escape(meta(pod).get("namespace", "default"))
        peer = rf"^[a-z0-9]([-a-z0-9]*[a-z0-9])?\.{re.escape(subdomain)}(\.{ns}(\.svc(\.cluster\.local)?)?)?$"
        if re.match(peer, value):
            return HOST_IP
    return value
