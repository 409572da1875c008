"""The development node agent against the real local control plane: pods really run, as processes.

Each test gets its own agent (`node_agent`, only the test's namespace) and checks what a kubelet
would be held to: status written as a kubelet writes it, the Job controller completing an Indexed
Job from that status, SIGTERM within the grace period on deletion, a usable service-account token,
and no process left behind (the fixture checks that after every test).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client

from finetune_devenv import _proc
from finetune_devenv.nodeagent import hostsfile
from tests.fixtures.cluster import Kubectl
from tests.fixtures.nodeagent import NodeAgentProcess

pytestmark = pytest.mark.integration

Obj = dict[str, Any]
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], *, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")


class Api:
    """Raw JSON reads and writes in the test namespace."""

    def __init__(self, kube_api: Any, namespace: str, kubectl: Kubectl) -> None:
        # Any: answers are read raw (`_preload_content=False`), as JSON
        self.core: Any = client.CoreV1Api(kube_api)
        self.batch: Any = client.BatchV1Api(kube_api)
        self.ns, self.kubectl = namespace, kubectl

    def apply(self, *objs: Obj) -> None:
        self.kubectl(
            "apply",
            "-n",
            self.ns,
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}),
        )

    def pod(self, name: str) -> Obj | None:
        try:
            data: Obj = json.loads(self.core.read_namespaced_pod(name, self.ns, _preload_content=False).data)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return data

    def pods(self, selector: str) -> list[Obj]:
        resp = self.core.list_namespaced_pod(self.ns, label_selector=selector, _preload_content=False)
        items: list[Obj] = json.loads(resp.data)["items"]
        return items

    def finished(self, name: str, timeout: float = 30) -> Obj:
        def done() -> Obj | None:
            pod = self.pod(name)
            return pod if pod and pod["status"].get("phase") in ("Succeeded", "Failed") else None

        return wait_for(done, timeout=timeout, what=f"pod {name} finished")

    def running(self, name: str, timeout: float = 30) -> Obj:
        def running() -> Obj | None:
            pod = self.pod(name)
            return pod if pod and pod["status"].get("phase") == "Running" else None

        return wait_for(running, timeout=timeout, what=f"pod {name} Running")

    def delete(self, name: str, grace: int) -> None:
        self.core.delete_namespaced_pod(name, self.ns, grace_period_seconds=grace, _preload_content=False)


@pytest.fixture
def api(kube_api: Any, namespace: str, kubectl: Kubectl) -> Api:
    return Api(kube_api, namespace, kubectl)


def python_pod(name: str, code: str, **spec: Any) -> Obj:
    container = {
        "name": "main",
        "image": "python:3.11-slim",
        "command": ["python", "-c", textwrap.dedent(code)],
    }
    container |= spec.pop("container", {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], "terminationGracePeriodSeconds": 10}
        | spec,
    }


def terminated(pod: Obj, container: str = "main") -> Obj:
    status = next(s for s in pod["status"]["containerStatuses"] if s["name"] == container)
    state: Obj = status["state"]["terminated"]
    return state


def run_cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "finetune_devenv.nodeagent", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


# -- a pod runs as the spec says --------------------------------------------------------------------
def test_pod_sees_its_env_configmap_and_secret(api: Api, node_agent: NodeAgentProcess) -> None:
    api.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "app-config"},
            "data": {"greeting": "hello from a ConfigMap"},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "app-secret"},
            "stringData": {"password": "s3cret-value"},
        },
    )
    code = """
        import os, sys
        for name in ("LITERAL", "POD_NAME", "NODE", "POD_IP", "PASSWORD", "CFG_greeting", "EXPANDED"):
            print(f"{name}={os.environ[name]}")
        print("configmap-file=" + open(sys.argv[1]).read())
        print("secret-file=" + open(sys.argv[2]).read())
        print("cwd=" + os.getcwd())
        print("api=" + os.environ["KUBERNETES_SERVICE_HOST"])
    """
    container = {
        "args": ["/etc/app/greeting", "/etc/creds/password"],
        "workingDir": "/app",
        "env": [
            {"name": "LITERAL", "value": "plain"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "app-secret", "key": "password"}}},
            {"name": "EXPANDED", "value": "$(LITERAL)-$(POD_NAME)"},
        ],
        "envFrom": [{"configMapRef": {"name": "app-config"}, "prefix": "CFG_"}],
        "volumeMounts": [
            {"name": "cfg", "mountPath": "/etc/app"},
            {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
        ],
    }
    volumes = [
        {"name": "cfg", "configMap": {"name": "app-config"}},
        {"name": "creds", "secret": {"secretName": "app-secret"}},
    ]
    api.apply(python_pod("env-and-files", code, container=container, volumes=volumes))

    pod = api.finished("env-and-files")

    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    assert pod["spec"]["nodeName"] == node_agent.node_name
    assert (pod["status"]["podIP"], pod["status"]["hostIP"]) == ("127.0.0.1", "127.0.0.1")
    ended = terminated(pod)
    assert (ended["exitCode"], ended["reason"]) == (0, "Completed")
    assert ended["startedAt"] <= ended["finishedAt"]
    log = node_agent.log("env-and-files", "main")
    for line in (
        "LITERAL=plain",
        "POD_NAME=env-and-files",
        f"NODE={node_agent.node_name}",
        "POD_IP=127.0.0.1",
        "PASSWORD=s3cret-value",
        "CFG_greeting=hello from a ConfigMap",
        "EXPANDED=plain-env-and-files",
        "configmap-file=hello from a ConfigMap",
        "secret-file=s3cret-value",
        "api=127.0.0.1",
    ):
        assert line in log.splitlines(), log
    assert f"cwd={node_agent.state_dir}/pods/{api.ns}_env-and-files/rootfs/app" in log
    assert "s3cret" not in json.dumps(pod["status"])
    cli = run_cli("logs", "-n", api.ns, "env-and-files", "--state-dir", str(node_agent.state_dir))
    assert cli == log


def test_exit_code_and_termination_messages(api: Api, node_agent: NodeAgentProcess) -> None:
    writer = {
        "name": "writer",
        "image": "trainer",
        "command": [
            "python",
            "-c",
            "import sys; open(sys.argv[1], 'w').write('row 7 is not valid JSON'); sys.exit(3)",
        ],
        "args": ["/dev/termination-log"],
    }
    crasher = {
        "name": "crasher",
        "image": "trainer",
        "command": [
            "python",
            "-c",
            "[print(f'step {i}') for i in range(200)]; raise SystemExit('boom: out of patience')",
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],  # else stdout lands after stderr's last words
    }
    fine = {
        "name": "fine",
        "image": "trainer",
        "command": ["python", "-c", "print('ok')"],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod = python_pod("exits", "")
    pod["spec"]["containers"] = [writer, crasher, fine]
    api.apply(pod)

    done = api.finished("exits")

    assert done["status"]["phase"] == "Failed"
    assert terminated(done, "writer") | {"startedAt": "", "finishedAt": "", "containerID": ""} == {
        "exitCode": 3,
        "reason": "Error",
        "message": "row 7 is not valid JSON",
        "startedAt": "",
        "finishedAt": "",
        "containerID": "",
    }
    crashed = terminated(done, "crasher")
    assert (crashed["exitCode"], crashed["reason"]) == (1, "Error")
    assert crashed["message"].endswith("boom: out of patience")  # the log's tail stands in
    assert "step 199" in crashed["message"] and "step 0\n" not in crashed["message"]
    assert "message" not in terminated(done, "fine")  # a success never falls back to the log


def test_missing_secret_waits_then_runs(api: Api, node_agent: NodeAgentProcess) -> None:
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "late", "key": "token"}}}]
    api.apply(python_pod("waits", "import os; print(len(os.environ['TOKEN']))", container={"env": env}))

    def waiting() -> Obj | None:
        pod = api.pod("waits")
        statuses = (pod or {}).get("status", {}).get("containerStatuses") or [{}]
        state: Obj = statuses[0].get("state", {})
        return state.get("waiting")

    waiting_state = wait_for(waiting, timeout=20, what="CreateContainerConfigError")
    assert waiting_state["reason"] == "CreateContainerConfigError"
    assert (
        "spec.containers[0].env[0].valueFrom.secretKeyRef: secret 'late' not found"
        in waiting_state["message"]
    )
    api.apply(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late"}, "stringData": {"token": "abc"}}
    )
    assert api.finished("waits")["status"]["phase"] == "Succeeded"


# -- the scheduler's part -----------------------------------------------------------------------------
def gpu_container(gpus: int) -> Obj:
    return {"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}


def test_gpu_requests_are_scheduled_against_the_fake_capacity(api: Api, node_agent: NodeAgentProcess) -> None:
    api.apply(
        python_pod("too-big", "print(1)", container=gpu_container(9)),
        python_pod("fits", "print(1)", container=gpu_container(8)),
    )

    assert api.finished("fits")["status"]["phase"] == "Succeeded"

    def unschedulable() -> Obj | None:
        pod = api.pod("too-big") or {}
        conditions = {c["type"]: c for c in pod.get("status", {}).get("conditions", [])}
        return (
            conditions.get("PodScheduled")
            if conditions.get("PodScheduled", {}).get("status") == "False"
            else None
        )

    condition = wait_for(unschedulable, timeout=15, what="PodScheduled=False")
    assert condition["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in condition["message"]
    assert not (api.pod("too-big") or {})["spec"].get("nodeName")


def test_restart_policy_other_than_never_is_refused_clearly(api: Api, node_agent: NodeAgentProcess) -> None:
    api.apply(python_pod("on-failure", "print(1)", restartPolicy="OnFailure"))

    pod = api.finished("on-failure")

    assert (pod["status"]["phase"], pod["status"]["reason"]) == ("Failed", "NodeAgentUnsupported")
    assert "restartPolicy is OnFailure" in pod["status"]["message"]
    assert "set restartPolicy: Never" in pod["status"]["message"]


# -- an Indexed Job finds its rank 0 the way torch's rendezvous will ---------------------------------------
RANK = """
    import os, socket, sys, time
    rank, index = os.environ["NODE_RANK"], os.environ["JOB_COMPLETION_INDEX"]
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    print(f"index={index} rank={rank} hostname={os.environ['HOSTNAME']}", flush=True)
    if rank == "0":
        server = socket.create_server(("", port))
        server.settimeout(60)
        conn, _ = server.accept()
        print("rank 0 got:", conn.recv(100).decode(), flush=True)
        conn.sendall(b"welcome")
    else:
        short = ".".join(addr.split(".")[:2])  # <job>-0.<service>
        print("short name resolves to", socket.gethostbyname(short), flush=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = socket.create_connection((addr, port), timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        conn.sendall(f"hello from rank {rank}".encode())
        print("rank 1 got:", conn.recv(100).decode(), flush=True)
"""


def test_indexed_job_rank1_reaches_rank0_by_dns_name(api: Api, node_agent: NodeAgentProcess) -> None:
    job, service, port = "train", "train-rdzv", _proc.free_ports(1)[0]
    selector = {"batch.kubernetes.io/job-name": job}
    env = [
        {
            "name": "NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-completion-index']"}
            },
        },
        {"name": "MASTER_ADDR", "value": f"{job}-0.{service}.{api.ns}.svc"},  # as the operator renders it
        {"name": "MASTER_PORT", "value": str(port)},
    ]
    template = python_pod("x", RANK, subdomain=service, container={"env": env, **gpu_container(4)})
    api.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service},
            "spec": {"clusterIP": "None", "selector": selector, "ports": [{"name": "rdzv", "port": port}]},
        },
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": job},
            "spec": {
                "completionMode": "Indexed",
                "completions": 2,
                "parallelism": 2,
                "backoffLimit": 0,
                "template": {"spec": template["spec"]},
            },
        },
    )

    def complete() -> Obj | None:
        data: Obj = json.loads(api.batch.read_namespaced_job(job, api.ns, _preload_content=False).data)
        types = {c["type"] for c in data["status"].get("conditions", []) if c["status"] == "True"}
        assert "Failed" not in types, data["status"]
        return data if "Complete" in types else None

    wait_for(complete, timeout=90, what=f"Job {job} Complete")
    logs = {}
    for pod in api.pods(f"batch.kubernetes.io/job-name={job}"):
        assert pod["status"]["phase"] == "Succeeded"
        index = pod["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"]
        logs[index] = node_agent.log(pod["metadata"]["name"], "main")
    assert f"index=0 rank=0 hostname={job}-0" in logs["0"]
    assert "rank 0 got: hello from rank 1" in logs["0"]
    assert f"index=1 rank=1 hostname={job}-1" in logs["1"]
    assert "short name resolves to 127.0.0.1" in logs["1"]
    assert "rank 1 got: welcome" in logs["1"]

    def hosts_cleaned() -> bool | None:
        return True if f"{job}-0.{service}" not in hostsfile.HOSTS.read_text() else None

    wait_for(hosts_cleaned, timeout=5, what="finished pods' names removed from /etc/hosts")


# -- deletion and shutdown -------------------------------------------------------------------------------
STOPPABLE = """
    import os, signal, subprocess, sys, time
    markers = os.environ["MARKERS"]
    def on_term(signum, frame):
        open(f"{markers}/sigterm", "w").write(str(time.time()))
        sys.exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ["ON_TERM"] == "ignore" else on_term)
    # a grandchild in a session of its own, like torchrun: the agent must still find and kill it
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    open(f"{markers}/pids", "w").write(f"{os.getpid()} {child.pid}")
    while True:
        time.sleep(0.1)
"""


def stoppable_pod(name: str, markers: Path, on_term: str) -> Obj:
    container = {
        "env": [{"name": "MARKERS", "value": "/markers"}, {"name": "ON_TERM", "value": on_term}],
        "volumeMounts": [{"name": "markers", "mountPath": "/markers"}],
    }
    volumes = [{"name": "markers", "hostPath": {"path": str(markers), "type": "DirectoryOrCreate"}}]
    return python_pod(name, STOPPABLE, container=container, volumes=volumes)


def started_pids(markers: Path) -> list[int]:
    text = wait_for(
        lambda: (markers / "pids").read_text() or None if (markers / "pids").exists() else None,
        timeout=30,
        what="pids",
    )
    return [int(p) for p in text.split()]


@pytest.mark.parametrize(
    ("on_term", "grace", "at_least", "at_most"),
    [("exit", 10, 0.0, 8.0), ("ignore", 2, 1.9, 10.0)],
    ids=["exits-on-sigterm", "ignores-sigterm-then-sigkill"],
)
def test_deleting_a_running_pod(
    api: Api,
    node_agent: NodeAgentProcess,
    tmp_path: Path,
    on_term: str,
    grace: int,
    at_least: float,
    at_most: float,
) -> None:
    markers = tmp_path / "markers"
    api.apply(stoppable_pod("victim", markers, on_term))
    api.running("victim")
    pids = started_pids(markers)

    started = time.monotonic()
    api.delete("victim", grace)
    wait_for(lambda: True if api.pod("victim") is None else None, timeout=at_most + 5, what="pod gone")
    took = time.monotonic() - started

    assert at_least <= took <= at_most, took
    assert (markers / "sigterm").exists() == (on_term == "exit")
    assert not [p for p in pids if _proc.pid_alive(p)]
    assert node_agent.processes() == []


def test_agent_shutdown_fails_running_pods_as_disrupted(
    api: Api, node_agent: NodeAgentProcess, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    api.apply(stoppable_pod("interrupted", markers, "exit"))
    api.running("interrupted")
    pids = started_pids(markers)

    assert node_agent.stop() == 0

    pod = api.pod("interrupted")
    assert pod is not None
    assert (pod["status"]["phase"], pod["status"]["reason"]) == (
        "Failed",
        "Terminated",
    )  # exit 0, yet not Succeeded
    conditions = {c["type"]: c for c in pod["status"]["conditions"]}
    assert (conditions["DisruptionTarget"]["status"], conditions["DisruptionTarget"]["reason"]) == (
        "True",
        "TerminationByKubelet",
    )
    assert (markers / "sigterm").exists()
    assert not [p for p in pids if _proc.pid_alive(p)]
    node = json.loads(api.core.read_node(node_agent.node_name, _preload_content=False).data)
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"


def test_a_restarted_agent_cleans_up_after_a_crashed_one(
    api: Api, node_agent: NodeAgentProcess, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    api.apply(stoppable_pod("orphaned", markers, "exit"))
    api.running("orphaned")
    main_pid, grandchild = started_pids(markers)

    node_agent.kill()
    wait_for(
        lambda: True if not _proc.pid_alive(main_pid) else None,
        timeout=5,
        what="main process dies with the agent",
    )
    assert _proc.pid_alive(grandchild)  # escaped into its own session: only a new agent can find it
    node_agent.start()

    wait_for(lambda: True if not _proc.pid_alive(grandchild) else None, timeout=10, what="leftover killed")
    pod = api.finished("orphaned")
    assert pod["status"]["phase"] == "Failed"
    assert terminated(pod)["reason"] == "ContainerStatusUnknown"


# -- the pod's own identity --------------------------------------------------------------------------------
TOKEN_CLIENT = """
    import base64, json, os, ssl, urllib.error, urllib.request
    sa = os.environ["FTJ_SA_DIR"]
    token, namespace = open(f"{sa}/token").read(), open(f"{sa}/namespace").read()
    context = ssl.create_default_context(cafile=f"{sa}/ca.crt")
    base = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
    def get(path):
        request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, None
    code, body = get(f"/api/v1/namespaces/{namespace}/configmaps/allowed")
    print("allowed", code, body["data"]["k"])
    print("secrets", get(f"/api/v1/namespaces/{namespace}/secrets")[0])
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    print("bound-to", claims["kubernetes.io"]["pod"]["name"], claims["sub"])
"""


def test_projected_service_account_token_calls_the_api(api: Api, node_agent: NodeAgentProcess) -> None:
    api.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reader"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "allowed"}, "data": {"k": "v"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "read-one"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": ["allowed"],
                    "verbs": ["get"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "read-one"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-one"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": api.ns}],
        },
    )
    api.apply(python_pod("identity", TOKEN_CLIENT, serviceAccountName="reader"))

    pod = api.finished("identity")

    log = node_agent.log("identity", "main")
    assert pod["status"]["phase"] == "Succeeded", log
    assert "allowed 200 v" in log
    assert "secrets 403" in log  # the pod's own identity, not the agent's
    assert f"bound-to identity system:serviceaccount:{api.ns}:reader" in log
