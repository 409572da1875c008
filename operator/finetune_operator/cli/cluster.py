"""The CLI's access to the Kubernetes API: FineTuneJobs, their pods and the pods' logs.

Objects are plain dicts as the API server serialises them. Every failure a user can fix becomes a
:class:`~finetune_operator.cli.errors.CliError`: an unreachable server, refused credentials, a job
that does not exist, a CRD that is not installed, and a manifest the server refuses (its message
names the field).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from finetune_operator import api
from finetune_operator.cli.errors import CliError

T = TypeVar("T")
Obj = dict[str, Any]

FIELD_MANAGER = "ftjob"
"""Field manager of everything the CLI writes (``kubectl get -o yaml --show-managed-fields``)."""
REQUEST_TIMEOUT = 30.0


def add_cluster_options(parser: argparse.ArgumentParser, *, all_namespaces: bool = False) -> None:
    """``-n``, ``--kubeconfig``, ``--context`` (and ``-A`` for listing commands)."""
    group = parser.add_argument_group("cluster")
    group.add_argument(
        "-n", "--namespace", help="namespace of the job (default: the kube-context's namespace, else default)"
    )
    if all_namespaces:
        group.add_argument(
            "-A", "--all-namespaces", action="store_true", help="list the jobs of every namespace"
        )
    group.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
    group.add_argument("--context", help="kube-context to use (default: the kubeconfig's current context)")


class Cluster:
    """One API server, as reached through a kubeconfig and context, with a default namespace."""

    def __init__(self, api_client: Any, namespace: str, server: str) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.namespace = namespace
        self.server = server
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Cluster:
        """Connect as ``--kubeconfig``/``--context`` say; the namespace is ``-n`` or the context's."""
        try:
            from kubernetes import config
            from kubernetes.config.config_exception import ConfigException
        except ImportError:
            raise CliError(
                "the kubernetes client is not installed",
                "install the CLI with its extra: pip install 'finetune-operator[cli]'",
            ) from None
        path = args.kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        path = path.split(os.pathsep)[0]
        if not os.path.isfile(path):
            raise CliError(f"no kubeconfig at {path}", "pass --kubeconfig FILE or set KUBECONFIG")
        try:
            api_client = config.new_client_from_config(config_file=path, context=args.context)  # type: ignore[no-untyped-call]
            contexts, active = config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
        except (ConfigException, ValueError, OSError) as exc:
            raise CliError(
                f"cannot use kubeconfig {path}: {exc}", "check --kubeconfig and --context"
            ) from None
        chosen = next((c for c in contexts if c["name"] == args.context), active) if args.context else active
        namespace = args.namespace or (chosen or {}).get("context", {}).get("namespace") or "default"
        return cls(api_client, namespace, str(api_client.configuration.host))

    def close(self) -> None:
        self.api_client.close()

    # ------------------------------------------------------------------------------ FineTuneJobs

    def get_job(self, name: str, namespace: str | None = None) -> Obj:
        ns = namespace or self.namespace
        return self._json(
            lambda: self.custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, ns, api.PLURAL, name, **self._kw()
            ),
            job=(ns, name),
        )

    def find_job(self, name: str, namespace: str | None = None) -> Obj | None:
        """The job, or None when it does not exist (any other failure raises)."""
        from kubernetes.client.exceptions import ApiException

        ns = namespace or self.namespace
        try:
            response: Any = self._guard(
                lambda: self.custom.get_namespaced_custom_object(
                    api.GROUP, api.VERSION, ns, api.PLURAL, name, **self._kw()
                ),
                raw_api_errors=True,
            )
        except ApiException as err:
            if err.status == 404 and "could not find the requested resource" not in api_message(err):
                return None
            raise api_error(err, (ns, name)) from None
        data: Obj = json.loads(response.data or b"{}")
        return data

    def list_jobs(self, all_namespaces: bool = False) -> list[Obj]:
        if all_namespaces:
            listed = self._json(
                lambda: self.custom.list_cluster_custom_object(
                    api.GROUP, api.VERSION, api.PLURAL, **self._kw()
                )
            )
        else:
            listed = self._json(
                lambda: self.custom.list_namespaced_custom_object(
                    api.GROUP, api.VERSION, self.namespace, api.PLURAL, **self._kw()
                )
            )
        items: list[Obj] = listed.get("items", [])
        return sorted(items, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))

    def apply_job(self, manifest: Obj, *, dry_run: bool = False) -> Obj:
        """Server-side apply with field manager ``ftjob`` (creates or updates)."""
        meta = manifest["metadata"]
        extra: dict[str, Any] = {"dry_run": "All"} if dry_run else {}
        return self._json(
            lambda: self.custom.patch_namespaced_custom_object(
                api.GROUP,
                api.VERSION,
                meta["namespace"],
                api.PLURAL,
                meta["name"],
                manifest,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
                **extra,
                **self._kw(),
            )
        )

    def patch_job(self, name: str, patch: Obj) -> Obj:
        """JSON merge patch of the spec (suspend, resume)."""
        ns = self.namespace
        return self._json(
            lambda: self.custom.patch_namespaced_custom_object(
                api.GROUP,
                api.VERSION,
                ns,
                api.PLURAL,
                name,
                patch,
                field_manager=FIELD_MANAGER,
                _content_type="application/merge-patch+json",
                **self._kw(),
            ),
            job=(ns, name),
        )

    def delete_job(self, name: str) -> None:
        ns = self.namespace
        self._json(
            lambda: self.custom.delete_namespaced_custom_object(
                api.GROUP, api.VERSION, ns, api.PLURAL, name, propagation_policy="Background", **self._kw()
            ),
            job=(ns, name),
        )

    # ---------------------------------------------------------------------------------------- pods

    def list_pods(self, selector: str, namespace: str | None = None) -> list[Obj]:
        ns = namespace or self.namespace
        listed = self._json(lambda: self.core.list_namespaced_pod(ns, label_selector=selector, **self._kw()))
        items: list[Obj] = listed.get("items", [])
        return items

    def get_pod(self, name: str, namespace: str | None = None) -> Obj:
        ns = namespace or self.namespace
        return self._json(lambda: self.core.read_namespaced_pod(name, ns, **self._kw()))

    def pod_log(
        self, pod: str, container: str, *, namespace: str | None = None, follow: bool = False
    ) -> Iterator[bytes]:
        """The container's log as chunks of bytes; with ``follow`` until the container ends.

        Raises :class:`kubernetes.client.exceptions.ApiException` unchanged: the caller decides
        whether an answer like "no kubelet" has a fallback.
        """
        ns = namespace or self.namespace
        response: Any = self._guard(
            lambda: self.core.read_namespaced_pod_log(
                pod,
                ns,
                container=container,
                follow=follow,
                _preload_content=False,
                _request_timeout=None if follow else REQUEST_TIMEOUT,
            ),
            raw_api_errors=True,
        )
        try:
            yield from response.stream(64 * 1024)
        finally:
            response.release_conn()

    # ------------------------------------------------------------------------------------- errors

    def _kw(self) -> dict[str, Any]:
        return {"_preload_content": False, "_request_timeout": REQUEST_TIMEOUT}

    def _json(self, call: Callable[[], Any], job: tuple[str, str] | None = None) -> Obj:
        response = self._guard(call, job=job)
        data: Obj = json.loads(response.data or b"{}")
        return data

    def _guard(
        self, call: Callable[[], T], *, job: tuple[str, str] | None = None, raw_api_errors: bool = False
    ) -> T:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return call()
        except ApiException as err:
            if raw_api_errors:
                raise
            raise api_error(err, job) from None
        except (HTTPError, OSError) as exc:
            raise CliError(
                f"cannot reach the Kubernetes API server at {self.server} ({type(exc).__name__})",
                "check that the cluster is up and that --kubeconfig/--context point at it",
            ) from None


def api_message(err: Any) -> str:
    """The ``message`` of a Kubernetes Status response (it names the field), else the HTTP reason."""
    try:
        return str(json.loads(err.body or "")["message"])
    except (TypeError, ValueError, KeyError):
        return str(err.reason or f"HTTP {err.status}")


def api_error(err: Any, job: tuple[str, str] | None = None) -> CliError:
    """A CliError for an API server's answer ``err`` (an ApiException)."""
    message = api_message(err)
    if err.status == 404:
        if "could not find the requested resource" in message or "the server could not find" in message:
            return CliError(
                "the FineTuneJob resource type is not installed in this cluster",
                "install the chart (helm install finetune-operator ...) or kubectl apply -f crds/",
            )
        if job is not None:
            namespace, name = job
            return CliError(
                f"finetunejob {name!r} not found in namespace {namespace!r}",
                f"list the jobs with: ftjob list -n {namespace}",
            )
        return CliError(f"not found: {message}", "check the name and the namespace (-n)")
    if err.status == 401:
        return CliError("the API server refused these credentials", "log in again or pick another --context")
    if err.status == 403:
        return CliError(f"forbidden: {message}", "ask your cluster admin for access to finetunejobs in it")
    if err.status in (400, 422):
        return CliError(
            f"the API server refused the FineTuneJob: {message}", "fix the manifest and submit again"
        )
    if err.status == 409:
        return CliError(f"conflict: {message}", "someone changed the job meanwhile; run the command again")
    return CliError(
        f"the API server answered {err.status}: {message}", "try again; if it persists, check the cluster"
    )
