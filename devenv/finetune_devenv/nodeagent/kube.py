"""The agent's API calls, on plain JSON dicts (the typed client's models are not needed here)."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config, watch

from finetune_devenv.nodeagent.context import Obj
from finetune_devenv.nodeagent.scheduling import LEASE_SECONDS

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
LEASE_NAMESPACE = "kube-node-lease"
TIMEOUT = 15


def _json(response: Any) -> Obj:
    data: Obj = json.loads(response.data)
    return data


class Kube:
    """A thin wrapper over the kubernetes client; every call returns the API's JSON."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client
        # Any: bodies go in as JSON dicts and answers come back raw (`_preload_content=False`)
        self.core: Any = client.CoreV1Api(api_client)
        self.coordination: Any = client.CoordinationV1Api(api_client)

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str, context: str | None = None) -> Kube:
        return cls(config.new_client_from_config(config_file=kubeconfig, context=context))  # type: ignore[no-untyped-call]

    @property
    def server(self) -> tuple[str, int]:
        """The API server's host and port, as pods will reach it."""
        url = urllib.parse.urlsplit(self.api_client.configuration.host)
        return url.hostname or "127.0.0.1", url.port or 443

    @property
    def ca_file(self) -> str | None:
        ca: str | None = self.api_client.configuration.ssl_ca_cert
        return ca

    # -- pods ------------------------------------------------------------------------------------
    def list_pods(self, namespace: str | None) -> tuple[list[Obj], str]:
        if namespace:
            resp = self.core.list_namespaced_pod(namespace, _preload_content=False, _request_timeout=TIMEOUT)
        else:
            resp = self.core.list_pod_for_all_namespaces(_preload_content=False, _request_timeout=TIMEOUT)
        data = _json(resp)
        return list(data.get("items") or []), str(data["metadata"]["resourceVersion"])

    def watch_pods(
        self, namespace: str | None, resource_version: str, seconds: int
    ) -> Iterator[tuple[str, Obj]]:
        """Pod events after `resource_version` for up to `seconds`; raises ApiException 410 when expired."""
        w: Any = watch.Watch()  # type: ignore[no-untyped-call]
        func = self.core.list_namespaced_pod if namespace else self.core.list_pod_for_all_namespaces
        args = (namespace,) if namespace else ()
        stream = w.stream(
            func,
            *args,
            resource_version=resource_version,
            timeout_seconds=seconds,
            allow_watch_bookmarks=True,
            deserialize=False,
            _request_timeout=seconds + 10,
        )
        for event in stream:
            yield str(event["type"]), event["object"]

    def bind(self, namespace: str, name: str, node: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        # the typed response cannot be parsed (Status, not Binding): take it raw
        self.core.create_namespaced_pod_binding(name, namespace, body, _preload_content=False)

    def patch_pod_status(self, namespace: str, name: str, patch: Obj) -> Obj:
        resp = self.core.patch_namespaced_pod_status(
            name, namespace, patch, _content_type=STRATEGIC, _preload_content=False, _request_timeout=TIMEOUT
        )
        return _json(resp)

    def delete_pod_now(self, namespace: str, name: str, uid: str) -> None:
        """What the kubelet does once the containers are gone: grace 0, only this very pod (uid)."""
        options = client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid)
        )
        self.core.delete_namespaced_pod(name, namespace, body=options, _preload_content=False)

    # -- what pods reference -----------------------------------------------------------------------
    def get_config_map(self, namespace: str, name: str) -> Obj | None:
        return self._get_or_none(self.core.read_namespaced_config_map, name, namespace)

    def get_secret(self, namespace: str, name: str) -> Obj | None:
        return self._get_or_none(self.core.read_namespaced_secret, name, namespace)

    def request_token(self, pod: Obj, audience: str, seconds: int) -> str:
        """A service-account token bound to the pod (TokenRequest), as the kubelet asks for one."""
        meta, spec = pod["metadata"], pod["spec"]
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience] if audience else [],
                "expirationSeconds": seconds,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        account = spec.get("serviceAccountName") or "default"
        resp = self.core.create_namespaced_service_account_token(
            account, meta["namespace"], body, _preload_content=False, _request_timeout=TIMEOUT
        )
        return str(_json(resp)["status"]["token"])

    def _get_or_none(self, read: Any, *args: str) -> Obj | None:
        try:
            return _json(read(*args, _preload_content=False, _request_timeout=TIMEOUT))
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    # -- the node --------------------------------------------------------------------------------
    def ensure_node(self, node: Obj) -> None:
        """Create the Node, or bring an existing one's labels up to date."""
        try:
            self.core.create_node(node, _preload_content=False, _request_timeout=TIMEOUT)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
            patch = {"metadata": {"labels": node["metadata"]["labels"]}, "spec": {"unschedulable": None}}
            name = node["metadata"]["name"]
            self.core.patch_node(
                name, patch, _content_type=MERGE, _preload_content=False, _request_timeout=TIMEOUT
            )

    def patch_node_status(self, name: str, patch: Obj) -> None:
        self.core.patch_node_status(
            name, patch, _content_type=STRATEGIC, _preload_content=False, _request_timeout=TIMEOUT
        )

    def get_node(self, name: str) -> Obj | None:
        return self._get_or_none(self.core.read_node, name)

    def renew_lease(self, node: Obj) -> None:
        name = node["metadata"]["name"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease_spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now}
        try:
            self.coordination.patch_namespaced_lease(
                name,
                LEASE_NAMESPACE,
                {"spec": lease_spec},
                _content_type=MERGE,
                _preload_content=False,
                _request_timeout=TIMEOUT,
            )
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"]["uid"]}
            lease = {"metadata": {"name": name, "ownerReferences": [owner]}, "spec": lease_spec}
            self.coordination.create_namespaced_lease(
                LEASE_NAMESPACE, lease, _preload_content=False, _request_timeout=TIMEOUT
            )
