"""The pod status a kubelet would write, from what the agent knows about the pod's processes. Pure.

Written with a strategic merge patch of the status subresource: conditions merge by type, so a
condition someone else added (DisruptionTarget from a preemption) survives; containerStatuses is an
atomic list and is replaced whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from finetune_devenv.nodeagent.context import HOST_IP, Obj, spec

MAX_MESSAGE_BYTES = 4096
"""The kubelet reads at most this much of a termination-message file."""
FALLBACK_LINES, FALLBACK_BYTES = 80, 2048
"""FallbackToLogsOnError: the kubelet's log tail (lines, then bytes)."""

NODE_SHUTDOWN_MESSAGE = "Pod was terminated in response to imminent node shutdown."


@dataclass(frozen=True)
class Waiting:
    reason: str
    message: str = ""


@dataclass(frozen=True)
class Running:
    started_at: str
    container_id: str


@dataclass(frozen=True)
class Terminated:
    exit_code: int
    reason: str
    finished_at: str
    message: str = ""
    started_at: str | None = None
    container_id: str = ""


State = Waiting | Running | Terminated


@dataclass(frozen=True)
class PodView:
    """What the agent knows about one pod: per container state, and pod-level failure if any."""

    containers: Mapping[str, State] = field(default_factory=dict)
    start_time: str | None = None
    failed_reason: str = ""
    """Set when the pod failed as a whole: refused by the agent, or stopped by a node shutdown."""
    failed_message: str = ""
    disruption: tuple[str, str] | None = None
    """(reason, message) of a DisruptionTarget condition the agent itself adds (node shutdown)."""


def exit_code(returncode: int) -> int:
    """Popen's returncode (negative: killed by that signal) as a container runtime reports it."""
    return returncode if returncode >= 0 else 128 - returncode


def terminated(
    returncode: int, *, started_at: str, finished_at: str, message: str, container_id: str
) -> Terminated:
    code = exit_code(returncode)
    reason = "Completed" if code == 0 else "Error"
    return Terminated(code, reason, finished_at, message, started_at, container_id)


def lost(finished_at: str) -> Terminated:
    """A container whose process is gone without the agent seeing it end (the kubelet's wording)."""
    message = "The container could not be located when the pod was terminated"
    return Terminated(137, "ContainerStatusUnknown", finished_at, message)


def termination_message(file_text: str, log_text: str, code: int, *, fallback_to_logs: bool) -> str:
    """The termination-log file's content; with FallbackToLogsOnError and a failure, else the log tail."""
    message = file_text.encode()[:MAX_MESSAGE_BYTES].decode(errors="ignore")
    if not message and fallback_to_logs and code != 0:
        tail = "\n".join(log_text.splitlines()[-FALLBACK_LINES:])
        message = tail.encode()[-FALLBACK_BYTES:].decode(errors="ignore")
    return message


def phase(view: PodView) -> str:
    """The kubelet's getPhase for restartPolicy Never."""
    if view.failed_reason:
        return "Failed"
    states = list(view.containers.values())
    if states and all(isinstance(s, Terminated) for s in states):
        return "Succeeded" if all(s.exit_code == 0 for s in states if isinstance(s, Terminated)) else "Failed"
    if any(isinstance(s, Running | Terminated) for s in states):
        return "Running"
    return "Pending"


def status_patch(pod: Obj, view: PodView, now: str) -> Obj:
    """The strategic-merge patch body for the pod's status subresource."""
    current = phase(view)
    terminal = current in ("Succeeded", "Failed")
    names = [c.get("name", "") for c in spec(pod).get("containers") or []]
    states = {n: view.containers.get(n, Waiting("ContainerCreating")) for n in names}
    unready = [n for n in names if not isinstance(states[n], Running)]
    started = any(isinstance(s, Running | Terminated) for s in states.values())

    if terminal:
        ready: tuple[str, str, str] = ("False", "PodCompleted", "")
    elif unready:
        ready = ("False", "ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]")
    else:
        ready = ("True", "", "")
    wanted = {
        "PodScheduled": ("True", "", ""),
        "PodReadyToStartContainers": ("True" if started and not terminal else "False", "", ""),
        "Initialized": ("True", "PodCompleted" if terminal else "", ""),
        "ContainersReady": ready,
        "Ready": ready,
    }
    if view.disruption is not None:
        wanted["DisruptionTarget"] = ("True", *view.disruption)
    existing = {c.get("type"): c for c in (pod.get("status") or {}).get("conditions") or []}
    conditions = [_condition(t, *v, existing.get(t), now) for t, v in wanted.items()]

    status: Obj = {
        "phase": current,
        "conditions": conditions,
        "hostIP": HOST_IP,
        "hostIPs": [{"ip": HOST_IP}],
        "startTime": view.start_time or now,
        "containerStatuses": [_container_status(pod, n, states[n]) for n in names],
    }
    if started:
        status |= {"podIP": HOST_IP, "podIPs": [{"ip": HOST_IP}]}
    if view.failed_reason:
        status |= {"reason": view.failed_reason, "message": view.failed_message}
    return {"status": status}


def _condition(kind: str, status: str, reason: str, message: str, old: Obj | None, now: str) -> Obj:
    same = old is not None and old.get("status") == status
    changed_at = old.get("lastTransitionTime") if same and old else now
    condition: Obj = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": changed_at}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


def _container_status(pod: Obj, name: str, state: State) -> Obj:
    image = next((c.get("image", "") for c in spec(pod).get("containers") or [] if c.get("name") == name), "")
    out: Obj = {"name": name, "image": image, "imageID": "", "restartCount": 0}
    if isinstance(state, Waiting):
        waiting: Obj = {"reason": state.reason} | ({"message": state.message} if state.message else {})
        return out | {"ready": False, "started": False, "state": {"waiting": waiting}}
    if isinstance(state, Running):
        running = {"startedAt": state.started_at}
        return out | {
            "containerID": state.container_id,
            "ready": True,
            "started": True,
            "state": {"running": running},
        }
    ended: Obj = {"exitCode": state.exit_code, "reason": state.reason, "finishedAt": state.finished_at}
    if state.message:
        ended["message"] = state.message
    if state.started_at:
        ended["startedAt"] = state.started_at
    if state.container_id:
        ended["containerID"] = state.container_id
        out["containerID"] = state.container_id
    return out | {"ready": False, "started": False, "state": {"terminated": ended}}
