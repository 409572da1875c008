"""The one module that talks to the Kubernetes API (kubernetes python client, synchronous).

Objects travel as plain dicts exactly as the API server serialises them (camelCase, RFC 3339 times):
responses are read with ``_preload_content=False`` and manifests from :mod:`render` are sent as they
are. Every response body is read, even when the operator does not need it: urllib3 hands a
connection back to its pool only once its response has been read, and a connection never handed
back means a new TLS handshake for the next request (about half of the operator's CPU at scale
before this was done).

Creating is idempotent (AlreadyExists is success), deleting is idempotent (NotFound is success), and
the status is replaced with the resourceVersion it was computed from, so a concurrent writer
causes a :class:`Conflict` instead of a lost update.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from finetune_operator import api
from finetune_operator import constants as c

log = logging.getLogger(__name__)

Obj = dict[str, Any]


class Conflict(Exception):
    """The FineTuneJob changed since it was read; reconcile again from a fresh read."""


class Refused(Exception):
    """The API server refused to create a child (invalid): retrying the same manifest cannot help."""


def _api_message(err: ApiException) -> str:
    """The ``message`` of a Kubernetes Status response (it names the field), else the HTTP reason."""
    try:
        return str(json.loads(err.body or "")["message"])
    except (TypeError, ValueError, KeyError):
        return str(err.reason)


def load_api_client(connections: int) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig (``KUBECONFIG``).

    ``connections``: connections kept open to the API server; give every worker thread its own (the
    client's default, 5 per core, closes the surplus after each request when more threads call).
    """
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize, connections)
    return client.ApiClient(configuration)


def _json(response: Any) -> Obj:
    """The body of a ``_preload_content=False`` response (reading it releases the connection)."""
    data: Obj = json.loads(response.data)
    return data


def _release(response: Any) -> None:
    """Read a response the operator does not need, so that its connection goes back to the pool."""
    _ = response.data


class Kube:
    """Typed-client calls the operator needs, on dicts."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.rbac = client.RbacAuthorizationV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._create: dict[str, Callable[..., Any]] = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "Service": self.core.create_namespaced_service,
            "ServiceAccount": self.core.create_namespaced_service_account,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
            "Job": self.batch.create_namespaced_job,
        }

    # --------------------------------------------------------------------------------- FineTuneJob

    def get_finetunejob(self, namespace: str, name: str) -> Obj | None:
        try:
            return _json(
                self.custom.get_namespaced_custom_object(
                    api.GROUP, api.VERSION, namespace, api.PLURAL, name, _preload_content=False
                )
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def replace_status(self, obj: Mapping[str, Any], status: Obj) -> str | None:
        """Write ``status`` onto ``obj`` (as read), refusing if it changed meanwhile; the new
        resourceVersion (None when the FineTuneJob is gone)."""
        body = {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {
                "name": obj["metadata"]["name"],
                "namespace": obj["metadata"]["namespace"],
                "resourceVersion": obj["metadata"]["resourceVersion"],
            },
            "spec": obj.get("spec", {}),
            "status": status,
        }
        meta = obj["metadata"]
        try:
            response = self.custom.replace_namespaced_custom_object_status(
                api.GROUP,
                api.VERSION,
                meta["namespace"],
                api.PLURAL,
                meta["name"],
                body,
                field_manager=c.FIELD_MANAGER,
                _preload_content=False,
            )
        except ApiException as err:
            if err.status == 409:
                raise Conflict(f"{meta['namespace']}/{meta['name']} changed while reconciling") from err
            if err.status == 404:  # deleted meanwhile: nothing left to report on
                return None
            raise
        version = _json(response).get("metadata", {}).get("resourceVersion")
        return str(version) if version else None

    def delete_finetunejob(self, namespace: str, name: str) -> None:
        self._ignore_missing(
            lambda: self.custom.delete_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name, propagation_policy="Background"
            )
        )

    # ------------------------------------------------------------------------------------ children

    def create(self, manifest: Obj) -> Obj | None:
        """Create ``manifest``: the object created, or None when it already exists (success too)."""
        kind = manifest["kind"]
        namespace = manifest["metadata"]["namespace"]
        try:
            created = _json(
                self._create[kind](namespace, manifest, field_manager=c.FIELD_MANAGER, _preload_content=False)
            )
        except ApiException as err:
            if err.status == 409:
                return None
            if err.status in (400, 422):
                raise Refused(
                    f"the API server refused {kind} {manifest['metadata']['name']}: {_api_message(err)}"
                ) from err
            raise
        log.info("created %s %s/%s", kind, namespace, manifest["metadata"]["name"])
        return created

    def replace_config_map_data(self, manifest: Obj) -> None:
        meta = manifest["metadata"]
        response = self.core.patch_namespaced_config_map(
            meta["name"],
            meta["namespace"],
            {"data": manifest["data"]},
            field_manager=c.FIELD_MANAGER,
            _preload_content=False,
        )
        _release(response)

    def delete_attempt(self, namespace: str, name: str, attempt: int) -> None:
        """Delete an attempt's Service, run config and Job (pods follow by GC and get SIGTERM).

        The Job goes last: the operator watches Jobs but not Services or ConfigMaps of attempts, so
        an attempt whose deletion a crash interrupted is found again by its Job and deleted again.
        """
        job = c.attempt_name(name, attempt)
        self._ignore_missing(lambda: self.core.delete_namespaced_service(job, namespace))
        self._ignore_missing(
            lambda: self.core.delete_namespaced_config_map(c.run_config_name(name, attempt), namespace)
        )
        self._ignore_missing(
            lambda: self.batch.delete_namespaced_job(job, namespace, propagation_policy="Background")
        )

    # -------------------------------------------------------------------------------------- events

    def post_event(
        self, obj: Mapping[str, Any], type_: str, reason: str, message: str, now: datetime
    ) -> None:
        """A core/v1 Event on the FineTuneJob (best effort: an event lost is not worth a retry)."""
        meta = obj["metadata"]
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        body: Any = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": c.FIELD_MANAGER},
            "reportingComponent": c.FIELD_MANAGER,
            "reportingInstance": c.FIELD_MANAGER,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            _release(self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False))
        except ApiException as err:
            log.warning("could not post event %s on %s: %s", reason, meta["name"], err.reason)

    @staticmethod
    def _ignore_missing(call: Callable[[], Any]) -> None:
        try:
            call()
        except ApiException as err:
            if err.status != 404:
                raise
