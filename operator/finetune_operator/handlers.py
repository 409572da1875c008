"""kopf wiring: every handler maps its trigger to "reconcile this FineTuneJob" and returns None.

The handlers are registered on a registry of their own (no import-time side effects, no global
registry), with the :class:`~finetune_operator.reconcile.Reconciler` captured in closures. kopf runs
synchronous handlers in its thread pool; the reconciler locks per FineTuneJob.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from finetune_operator import api
from finetune_operator import constants as c
from finetune_operator.reconcile import Reconciler
from finetune_operator.settings import Settings

log = logging.getLogger(__name__)


def owner_name(body: Mapping[str, Any]) -> str | None:
    """The FineTuneJob a child belongs to: its controller owner, or the annotation on training pods."""
    meta = body.get("metadata", {})
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == api.KIND and ref.get("apiVersion", "").startswith(f"{api.GROUP}/"):
            return str(ref["name"])
    owner = (meta.get("annotations") or {}).get(c.ANN_OWNER)
    return str(owner) if owner else None


def configure(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    """Own prefix and finalizer, no kopf-posted events (the operator posts its own), quiet logs."""
    kopf_settings.persistence.finalizer = c.FINALIZER
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.DOMAIN)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.DOMAIN, key="last-handled-configuration"
    )
    kopf_settings.posting.enabled = False
    kopf_settings.execution.max_workers = settings.max_workers
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.batching.batch_window = 0.1


def build_registry(reconciler: Reconciler, settings: Settings) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    managed = {c.LABEL_MANAGED_BY: c.MANAGED_BY}

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, reconciler.settings)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
    def finetunejob_changed(name: str, namespace: str | None, type: str, **_: Any) -> None:
        if namespace is None:
            return
        if type == "DELETED":
            reconciler.forget(namespace, name)
            return
        reconciler.reconcile(namespace, name)

    @kopf.timer(
        api.GROUP,
        api.VERSION,
        api.PLURAL,
        interval=settings.resync_seconds,
        idle=settings.resync_seconds / 2,
        registry=registry,
    )
    def resync(name: str, namespace: str | None, **_: Any) -> None:
        if namespace is not None:
            reconciler.reconcile(namespace, name)

    def child_changed(body: kopf.Body, namespace: str | None, **_: Any) -> None:
        owner = owner_name(body)
        if owner and namespace is not None:
            reconciler.reconcile(namespace, owner)

    kopf.on.event("batch", "v1", "jobs", labels=managed, registry=registry, id="job-changed")(child_changed)
    kopf.on.event("v1", "pods", labels=managed, registry=registry, id="pod-changed")(child_changed)
    kopf.on.event(
        "v1",
        "configmaps",
        labels={**managed, c.LABEL_COMPONENT: c.COMPONENT_PROGRESS},
        registry=registry,
        id="progress-changed",
    )(child_changed)
    return registry
