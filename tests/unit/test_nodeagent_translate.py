"""The node agent's pure core: pod spec to processes, status, scheduling fit, /etc/hosts block."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from finetune_devenv.nodeagent import hostsfile, pods, scheduling
from finetune_devenv.nodeagent import status as st
from finetune_devenv.nodeagent.context import Layout, NodeContext, PodConfigError, PodData
from finetune_devenv.nodeagent.env import container_env, expand, field_ref, resource_ref

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
SANDBOX = Path("/state/pods/ns1_p")
CTX = NodeContext(
    node_name="n1",
    api_host="127.0.0.1",
    api_port=6443,
    python="/venv/bin/python",
    base_env={"PATH": "/venv/bin:/usr/bin", "HOME": "/root"},
    allocatable={"cpu": "2", "memory": "4Gi"},
)
LAYOUT = Layout(Path("/state"), Path("/dev/shm/ftj-nodeagent/n1"), "ns1", "p", "uid-1")


def make_pod(container: Obj | None = None, **spec: Any) -> Obj:
    """A pod as the API server returns it (defaults filled in), with one container `c`."""
    c = {"name": "c", "image": "img", "command": ["python", "-c", "pass"]} | (container or {})
    return {
        "metadata": {
            "name": "p",
            "namespace": "ns1",
            "uid": "uid-1",
            "labels": {"batch.kubernetes.io/job-completion-index": "1", "app": "x"},
            "annotations": {"note": "hi"},
        },
        "spec": {
            "restartPolicy": "Never",
            "nodeName": "n1",
            "serviceAccountName": "trainer",
            "containers": [c],
        }
        | spec,
    }


DATA = PodData(
    config_maps={
        "cfg": {
            "data": {"run.json": "{}", "mode": "fast"},
            "binaryData": {"blob": base64.b64encode(b"\x00\x01").decode()},
        },
        "kube-root-ca.crt": {"data": {"ca.crt": "CA PEM"}},
    },
    secrets={
        "s3": {"data": {"AWS_ACCESS_KEY_ID": base64.b64encode(b"key").decode(), "bad-name!": "eA=="}},
        "missing": None,
    },
    tokens={("", 3607): "TOKEN", ("vault", 600): "VAULT-TOKEN"},
)


def plan(pod: Obj, data: PodData = DATA, ctx: NodeContext = CTX) -> pods.PodPlan:
    return pods.plan_pod(pod, data, ctx, LAYOUT)


# -- $(VAR) expansion and the downward API -------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("plain", "plain"),
        ("$(A)/x", "a/x"),
        ("$(A)$(B)", "ab"),
        ("$(UNDEFINED)", "$(UNDEFINED)"),
        ("$$(A)", "$(A)"),
        ("$$", "$"),
        ("cost $5", "cost $5"),
        ("$(A", "$(A"),
    ],
)
def test_expand(value: str, expected: str) -> None:
    assert expand(value, {"A": "a", "B": "b"}) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("metadata.name", "p"),
        ("metadata.namespace", "ns1"),
        ("metadata.uid", "uid-1"),
        ("metadata.labels['batch.kubernetes.io/job-completion-index']", "1"),
        ("metadata.annotations['note']", "hi"),
        ("metadata.labels['absent']", ""),
        ("metadata.labels", 'app="x"\nbatch.kubernetes.io/job-completion-index="1"'),
        ("spec.nodeName", "n1"),
        ("spec.serviceAccountName", "trainer"),
        ("status.podIP", "127.0.0.1"),
        ("status.hostIP", "127.0.0.1"),
    ],
)
def test_field_ref(path: str, expected: str) -> None:
    assert field_ref(make_pod(), path, "here") == expected


def test_field_ref_unknown_path_names_the_field() -> None:
    with pytest.raises(PodConfigError, match=r"env\[0\].valueFrom.fieldRef.fieldPath: 'spec.priority'"):
        field_ref(make_pod(), "spec.priority", "env[0].valueFrom.fieldRef")


@pytest.mark.parametrize(
    ("resources", "ref", "expected"),
    [
        ({"limits": {"cpu": "1500m"}}, {"resource": "limits.cpu"}, "2"),  # rounded up, like the kubelet
        ({"limits": {"cpu": "1500m"}}, {"resource": "limits.cpu", "divisor": "1m"}, "1500"),
        ({"requests": {"memory": "1Gi"}}, {"resource": "requests.memory", "divisor": "1Mi"}, "1024"),
        ({"limits": {"memory": "2Gi"}}, {"resource": "requests.memory", "divisor": "1Gi"}, "2"),
        ({}, {"resource": "limits.cpu"}, "2"),  # no limit: node allocatable
        ({}, {"resource": "limits.memory", "divisor": "1Gi"}, "4"),
    ],
)
def test_resource_ref(resources: Obj, ref: Obj, expected: str) -> None:
    pod = make_pod({"resources": resources})
    assert resource_ref(pod, ref, "c", CTX, "here") == expected


# -- environment -------------------------------------------------------------------------------------
def test_env_sources_in_kubernetes_order() -> None:
    container = {
        "envFrom": [{"secretRef": {"name": "s3"}}, {"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
        "env": [
            {"name": "CFG_mode", "value": "overridden"},
            {"name": "DIR", "value": "/data"},
            {"name": "FILE", "value": "$(DIR)/x.json"},
            {
                "name": "RANK",
                "valueFrom": {
                    "fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-completion-index']"}
                },
            },
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "mode"}}},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k", "optional": True}}},
        ],
    }
    pod = make_pod(container)
    env = container_env(pod, pod["spec"]["containers"][0], "spec.containers[0]", DATA, CTX)
    assert env["AWS_ACCESS_KEY_ID"] == "key"
    assert "bad-name!" not in env  # not a valid variable name: skipped, as the kubelet does
    assert env["CFG_mode"] == "overridden"
    assert env["CFG_run.json"] == "{}"
    assert env["FILE"] == "/data/x.json"
    assert (env["RANK"], env["KEY"], env["MODE"]) == ("1", "key", "fast")
    assert "OPT" not in env


@pytest.mark.parametrize(
    ("var", "error"),
    [
        (
            {"name": "K", "valueFrom": {"secretKeyRef": {"name": "missing", "key": "k"}}},
            r"spec.containers\[0\].env\[0\].valueFrom.secretKeyRef: secret 'missing' not found",
        ),
        (
            {"name": "K", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "nope"}}},
            r"secret 's3' has no key 'nope'",
        ),
        (
            {"name": "K", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "k"}}},
            r"configMapKeyRef: configMap 'absent' not found; create it or mark the reference optional",
        ),
    ],
)
def test_env_missing_reference_names_the_field(var: Obj, error: str) -> None:
    with pytest.raises(PodConfigError, match=error):
        plan(make_pod({"env": [var]}))


# -- one process per container ------------------------------------------------------------------------
TRAINER = {
    "command": ["python", "-m", "finetune_trainer", "run"],
    "args": ["--config", "$(FTJ_RUN_CONFIG)", "/etc/finetune-other/x", "/dev/termination-log"],
    "workingDir": "/workdir/sub",
    "env": [
        {"name": "FTJ_RUN_CONFIG", "value": "/etc/finetune/run.json"},
        {"name": "FTJ_WORKDIR", "value": "/workdir"},
        {"name": "SHM", "value": "/dev/shm"},
        {"name": "NOT_A_MOUNT", "value": "/etc/finetune-other/x"},
        {"name": "MASTER_ADDR", "value": "job-a1-0.job-a1.ns1.svc"},
    ],
    "volumeMounts": [
        {"name": "run-config", "mountPath": "/etc/finetune", "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "workdir", "mountPath": "/workdir"},
        {"name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"},
    ],
}
VOLUMES = [
    {"name": "run-config", "configMap": {"name": "cfg", "items": [{"key": "run.json", "path": "run.json"}]}},
    {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    {"name": "workdir", "emptyDir": {}},
    {
        "name": "kube-api-access-x",
        "projected": {
            "defaultMode": 420,
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                    }
                },
            ],
        },
    },
]


def trainer_plan(**ctx: Any) -> pods.ProcessSpec:
    pod = make_pod(TRAINER, volumes=VOLUMES, hostname="job-a1-0", subdomain="job-a1")
    return plan(pod, ctx=NodeContext(**{**CTX.__dict__, **ctx})).processes[0]


def test_trainer_pod_env_paths_point_into_the_sandbox() -> None:
    process = trainer_plan()
    env = process.env
    assert env["FTJ_RUN_CONFIG"] == f"{SANDBOX}/volumes/run-config/run.json"
    assert env["FTJ_WORKDIR"] == f"{SANDBOX}/volumes/workdir"
    assert env["SHM"] == "/dev/shm/ftj-nodeagent/n1/uid-1/dshm"
    assert env["NOT_A_MOUNT"] == "/etc/finetune-other/x"  # a shared prefix is not a mount
    assert env["FTJ_SA_DIR"] == f"{SANDBOX}/volumes/kube-api-access-x"
    assert env["FTJ_TERMINATION_LOG"] == f"{SANDBOX}/containers/c/termination-log"
    assert env["MASTER_ADDR"] == "job-a1-0.job-a1.ns1.svc"  # /etc/hosts resolves it
    assert process.cwd == Path(f"{SANDBOX}/volumes/workdir/sub")


def test_trainer_pod_argv_env_and_tags() -> None:
    process = trainer_plan()
    assert process.argv == (
        "/venv/bin/python",
        "-m",
        "finetune_trainer",
        "run",
        "--config",
        f"{SANDBOX}/volumes/run-config/run.json",
        "/etc/finetune-other/x",
        f"{SANDBOX}/containers/c/termination-log",
    )
    env = process.env
    assert env["PATH"] == "/venv/bin:/usr/bin"
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("127.0.0.1", "6443")
    assert env["HOSTNAME"] == "job-a1-0"
    tags = {k: v for k, v in env.items() if k.startswith("FTJ_NODEAGENT_")}
    assert tags == {
        "FTJ_NODEAGENT_NODE": "n1",
        "FTJ_NODEAGENT_POD_UID": "uid-1",
        "FTJ_NODEAGENT_CONTAINER": "c",
    }
    assert process.log == Path("/state/logs/ns1/p/c.log")


def test_without_hosts_file_pod_dns_names_become_loopback() -> None:
    assert trainer_plan(hosts_file=False).env["MASTER_ADDR"] == "127.0.0.1"


def test_trainer_pod_volume_files() -> None:
    pod = make_pod(TRAINER, volumes=VOLUMES)
    result = plan(pod)
    files = {str(f.path): (f.content, oct(f.mode)) for f in result.files}
    sa = f"{SANDBOX}/volumes/kube-api-access-x"
    assert files == {
        f"{SANDBOX}/volumes/run-config/run.json": (b"{}", "0o644"),
        f"{sa}/token": (b"TOKEN", "0o644"),
        f"{sa}/ca.crt": (b"CA PEM", "0o644"),
        f"{sa}/namespace": (b"ns1", "0o644"),
    }
    assert Path("/dev/shm/ftj-nodeagent/n1/uid-1/dshm") in result.dirs
    assert Path(f"{SANDBOX}/volumes/workdir") in result.dirs


@pytest.mark.parametrize(
    ("volume", "expected"),
    [
        (
            {
                "name": "v",
                "secret": {
                    "secretName": "s3",
                    "defaultMode": 0o400,
                    "items": [{"key": "AWS_ACCESS_KEY_ID", "path": "k/id"}],
                },
            },
            {"v/k/id": (b"key", 0o400)},
        ),
        (
            {
                "name": "v",
                "configMap": {"name": "cfg", "items": [{"key": "blob", "path": "b", "mode": 0o600}]},
            },
            {"v/b": (b"\x00\x01", 0o600)},
        ),
        ({"name": "v", "secret": {"secretName": "missing", "optional": True}}, {}),
        (
            {
                "name": "v",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"audience": "vault", "expirationSeconds": 600, "path": "t"}}
                    ]
                },
            },
            {"v/t": (b"VAULT-TOKEN", 0o644)},
        ),
        (
            {
                "name": "v",
                "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]},
            },
            {"v/labels": (b'app="x"\nbatch.kubernetes.io/job-completion-index="1"', 0o644)},
        ),
    ],
)
def test_volume_files(volume: Obj, expected: dict[str, tuple[bytes, int]]) -> None:
    files = plan(make_pod(volumes=[volume])).files
    assert {str(f.path.relative_to(SANDBOX / "volumes")): (f.content, f.mode) for f in files} == expected


@pytest.mark.parametrize(
    ("volume", "error"),
    [
        (
            {"name": "v", "secret": {"secretName": "missing"}},
            r"spec.volumes\[0\].secret: secret 'missing' not found",
        ),
        (
            {"name": "v", "configMap": {"name": "cfg", "items": [{"key": "nope", "path": "x"}]}},
            r"has no key 'nope'",
        ),
        (
            {"name": "v", "nfs": {"server": "x", "path": "/"}},
            r"spec.volumes\[0\] \(v\): volume type \['nfs'\] is not supported",
        ),
        (
            {"name": "v", "configMap": {"name": "cfg", "items": [{"key": "mode", "path": "../x"}]}},
            r"must be relative",
        ),
    ],
)
def test_volume_errors_name_the_field(volume: Obj, error: str) -> None:
    with pytest.raises(PodConfigError, match=error):
        plan(make_pod(volumes=[volume]))


def test_pvc_host_path_and_sub_paths() -> None:
    container: Obj = {
        "env": [
            {"name": "A", "value": "/models/llama"},
            {"name": "B", "value": "/host/x"},
            {"name": "C", "value": "/one/file"},
            {"name": "D", "value": "/scratch"},
        ],
        "volumeMounts": [
            {"name": "models", "mountPath": "/models"},
            {"name": "host", "mountPath": "/host"},
            {"name": "cfg", "mountPath": "/one/file", "subPath": "mode"},
            {"name": "work", "mountPath": "/scratch", "subPathExpr": "$(POD)"},
        ],
    }
    container["env"].insert(0, {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    volumes = [
        {"name": "models", "persistentVolumeClaim": {"claimName": "weights"}},
        {"name": "host", "hostPath": {"path": "/tmp/shared"}},
        {"name": "cfg", "configMap": {"name": "cfg"}},
        {"name": "work", "emptyDir": {}},
    ]
    result = plan(make_pod(container, volumes=volumes))
    env = result.processes[0].env
    assert env["A"] == "/state/pvcs/ns1/weights/llama"
    assert env["B"] == "/tmp/shared/x"
    assert env["C"] == f"{SANDBOX}/volumes/cfg/mode"
    assert env["D"] == f"{SANDBOX}/volumes/work/p"
    assert Path(f"{SANDBOX}/volumes/work/p") in result.dirs  # created, as the kubelet does
    assert Path(f"{SANDBOX}/volumes/cfg/mode") not in result.dirs  # a file of the volume


@pytest.mark.parametrize(
    ("command", "argv0"),
    [
        (["python"], "/venv/bin/python"),
        (["python3"], "/venv/bin/python"),
        (["/usr/local/bin/python3.11"], "/venv/bin/python"),
        (["torchrun"], "torchrun"),  # found on PATH: the venv's bin comes first
        (["/bin/sh"], "/bin/sh"),
        (["pythonic"], "pythonic"),
    ],
)
def test_python_runs_the_agents_interpreter(command: list[str], argv0: str) -> None:
    assert plan(make_pod({"command": command})).processes[0].argv[0] == argv0


@pytest.mark.parametrize(
    ("working_dir", "cwd"),
    [(None, f"{SANDBOX}/rootfs"), ("/app", f"{SANDBOX}/rootfs/app"), ("/", f"{SANDBOX}/rootfs")],
)
def test_working_dir(working_dir: str | None, cwd: str) -> None:
    container = {"workingDir": working_dir} if working_dir else {}
    process = plan(make_pod(container)).processes[0]
    assert process.cwd == Path(cwd)


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ({}, ["p"]),
        ({"hostname": "h"}, ["h"]),
        (
            {"hostname": "job-0", "subdomain": "svc"},
            ["job-0", "job-0.svc", "job-0.svc.ns1", "job-0.svc.ns1.svc", "job-0.svc.ns1.svc.cluster.local"],
        ),
    ],
)
def test_hostnames(spec: Obj, names: list[str]) -> None:
    assert pods.hostnames(make_pod(**spec)) == names


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("job-1.svc", "127.0.0.1"),  # a peer in the same subdomain
        ("job-0.svc.ns1.svc.cluster.local", "127.0.0.1"),
        ("job-0", "127.0.0.1"),  # its own hostname
        ("job-0.other", "job-0.other"),
        ("job-0.svc.ns2", "job-0.svc.ns2"),
        ("s3.example.com", "s3.example.com"),
    ],
)
def test_rewrite_hostname(value: str, expected: str) -> None:
    assert pods.rewrite_hostname(value, make_pod(hostname="job-0", subdomain="svc")) == expected


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, None),
        ({"restartPolicy": "OnFailure"}, "spec.restartPolicy is OnFailure"),
        ({"restartPolicy": "Always"}, "spec.restartPolicy is Always"),
        ({"initContainers": [{"name": "i"}]}, "spec.initContainers"),
        ({"containers": [{"name": "c", "image": "x"}]}, "spec.containers[0].command is empty"),
    ],
)
def test_unsupported(changes: Obj, reason: str | None) -> None:
    found = pods.unsupported(make_pod(**changes))
    assert (found is None) if reason is None else (found is not None and reason in found)


def test_needs_lists_every_reference() -> None:
    container = {
        "envFrom": [{"secretRef": {"name": "s3"}}],
        "env": [{"name": "M", "valueFrom": {"configMapKeyRef": {"name": "env-cfg", "key": "k"}}}],
    }
    needs = pods.needs(make_pod(container, volumes=VOLUMES))
    assert needs.config_maps == {"cfg", "kube-root-ca.crt", "env-cfg"}
    assert needs.secrets == {"s3"}
    assert needs.tokens == {("", 3607)}


# -- status ----------------------------------------------------------------------------------------------
RUN = st.Running("t0", "nodeagent://1")
OK = st.Terminated(0, "Completed", "t1", "", "t0")
BAD = st.Terminated(3, "Error", "t1", "boom", "t0")


@pytest.mark.parametrize(
    ("view", "phase"),
    [
        (st.PodView({}), "Pending"),
        (st.PodView({"a": st.Waiting("ContainerCreating")}), "Pending"),
        (st.PodView({"a": RUN, "b": OK}), "Running"),
        (st.PodView({"a": OK, "b": OK}), "Succeeded"),
        (st.PodView({"a": OK, "b": BAD}), "Failed"),
        (st.PodView({"a": RUN}, failed_reason="Terminated"), "Failed"),
    ],
)
def test_phase(view: st.PodView, phase: str) -> None:
    assert st.phase(view) == phase


def test_running_status() -> None:
    patch = st.status_patch(make_pod(), st.PodView({"c": RUN}, start_time="t0"), "now")["status"]
    assert patch["phase"] == "Running"
    assert (patch["podIP"], patch["hostIP"], patch["startTime"]) == ("127.0.0.1", "127.0.0.1", "t0")
    assert {c["type"]: c["status"] for c in patch["conditions"]} == {
        "PodScheduled": "True",
        "PodReadyToStartContainers": "True",
        "Initialized": "True",
        "ContainersReady": "True",
        "Ready": "True",
    }
    (container,) = patch["containerStatuses"]
    assert container["state"] == {"running": {"startedAt": "t0"}}
    assert (container["ready"], container["started"], container["restartCount"]) == (True, True, 0)


def test_failed_status_keeps_transition_times_and_adds_disruption() -> None:
    pod = make_pod()
    pod["status"] = {
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "early"}]
    }
    view = st.PodView(
        {"c": BAD},
        failed_reason="Terminated",
        failed_message="bye",
        disruption=("TerminationByKubelet", "bye"),
    )
    patch = st.status_patch(pod, view, "now")["status"]
    conditions = {c["type"]: c for c in patch["conditions"]}
    assert conditions["PodScheduled"]["lastTransitionTime"] == "early"
    assert conditions["Ready"] | {"lastTransitionTime": "x"} == {
        "type": "Ready",
        "status": "False",
        "reason": "PodCompleted",
        "lastProbeTime": None,
        "lastTransitionTime": "x",
    }
    assert conditions["DisruptionTarget"]["reason"] == "TerminationByKubelet"
    assert (patch["phase"], patch["reason"], patch["message"]) == ("Failed", "Terminated", "bye")
    terminated = patch["containerStatuses"][0]["state"]["terminated"]
    assert terminated == {
        "exitCode": 3,
        "reason": "Error",
        "message": "boom",
        "startedAt": "t0",
        "finishedAt": "t1",
    }


@pytest.mark.parametrize(
    ("returncode", "code", "reason"),
    [(0, 0, "Completed"), (3, 3, "Error"), (-15, 143, "Error"), (-9, 137, "Error")],
)
def test_exit_codes_like_a_container_runtime(returncode: int, code: int, reason: str) -> None:
    ended = st.terminated(returncode, started_at="a", finished_at="b", message="", container_id="x")
    assert (ended.exit_code, ended.reason) == (code, reason)


LOG = "\n".join(f"line {i}" for i in range(100))


@pytest.mark.parametrize(
    ("file_text", "code", "fallback", "expected"),
    [
        ("bad data in row 3", 3, True, "bad data in row 3"),
        ("", 0, True, ""),  # success: no fallback
        ("", 4, False, ""),  # policy File
        ("", 4, True, "\n".join(f"line {i}" for i in range(20, 100))),  # the last 80 lines
        ("x" * 5000, 1, False, "x" * 4096),
    ],
)
def test_termination_message(file_text: str, code: int, fallback: bool, expected: str) -> None:
    assert st.termination_message(file_text, LOG, code, fallback_to_logs=fallback) == expected


# -- scheduling -----------------------------------------------------------------------------------------
ALLOCATABLE = {"cpu": "2", "memory": "24Gi", "pods": "110", "nvidia.com/gpu": "8"}


def gpu_pod(gpus: int, cpu: str = "100m", **spec: Any) -> Obj:
    resources = {
        "limits": {"nvidia.com/gpu": str(gpus)},
        "requests": {"nvidia.com/gpu": str(gpus), "cpu": cpu},
    }
    return make_pod({"resources": resources}, **spec)


@pytest.mark.parametrize(
    ("pod", "bound", "reason"),
    [
        (gpu_pod(8), [], None),
        (gpu_pod(9), [], "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."),
        (gpu_pod(4), [gpu_pod(4)], None),
        (gpu_pod(4), [gpu_pod(4), gpu_pod(1)], "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."),
        (gpu_pod(1, cpu="3"), [], "0/1 nodes are available: 1 Insufficient cpu."),
        (
            make_pod({"resources": {"requests": {"example.com/fpga": "1"}}}),
            [],
            "1 Insufficient example.com/fpga.",
        ),
        (gpu_pod(1, nodeSelector={"gpu": "h100"}), [], "didn't match Pod's node affinity/selector"),
        (gpu_pod(1, nodeSelector={"kubernetes.io/hostname": "n1"}), [], None),
    ],
)
def test_unfit_reason(pod: Obj, bound: list[Obj], reason: str | None) -> None:
    found = scheduling.unfit_reason(pod, ALLOCATABLE, {"kubernetes.io/hostname": "n1"}, bound)
    assert (found is None) if reason is None else (found is not None and reason in found)


@pytest.mark.parametrize(
    ("changes", "namespace", "wanted"),
    [
        ({"nodeName": ""}, None, True),
        ({"nodeName": ""}, "ns1", True),
        ({"nodeName": ""}, "other", False),
        ({"nodeName": "n1"}, None, False),
        ({"nodeName": "", "schedulerName": "kueue-scheduler"}, None, False),
    ],
)
def test_wants_us(changes: Obj, namespace: str | None, wanted: bool) -> None:
    assert scheduling.wants_us(make_pod(**changes), namespace) is wanted


# -- /etc/hosts -------------------------------------------------------------------------------------------
BEGIN, END = hostsfile.markers("n1")
OTHER_BEGIN, OTHER_END = hostsfile.markers("n2")


@pytest.mark.parametrize(
    ("text", "names", "expected"),
    [
        (
            "127.0.0.1 localhost\n",
            ["b", "a"],
            f"127.0.0.1 localhost\n{BEGIN}\n127.0.0.1\ta\n127.0.0.1\tb\n{END}\n",
        ),
        (
            f"127.0.0.1 localhost\n{BEGIN}\n127.0.0.1\told\n{END}\n::1 x\n",
            ["new"],
            f"127.0.0.1 localhost\n::1 x\n{BEGIN}\n127.0.0.1\tnew\n{END}\n",
        ),
        (f"127.0.0.1 localhost\n{BEGIN}\n127.0.0.1\told\n{END}\n", [], "127.0.0.1 localhost\n"),
        (
            f"{OTHER_BEGIN}\n127.0.0.1\tkeep\n{OTHER_END}\n",
            [],
            f"{OTHER_BEGIN}\n127.0.0.1\tkeep\n{OTHER_END}\n",
        ),
    ],
)
def test_hosts_block(text: str, names: list[str], expected: str) -> None:
    assert hostsfile.render(text, "n1", names) == expected
