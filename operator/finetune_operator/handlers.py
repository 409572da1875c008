"""kopf wiring: watches feed the child cache and the reconciler's queue; every handler returns None.

The handlers are registered on a registry of their own (no import-time side effects, no global
registry), with the :class:`~finetune_operator.reconcile.Reconciler` captured in closures. They are
coroutines that only record and enqueue (no thread hop per event); the reconciler's own threads do
the work. There is no kopf timer (one resync thread instead) and no finalizer: children go by
owner-reference garbage collection. kopf removes the finalizer older versions of the operator put
on FineTuneJobs (their timers needed one), which is why it is still configured.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import kopf

from finetune_operator import api, cache
from finetune_operator import constants as c
from finetune_operator.observe import essentials
from finetune_operator.reconcile import Reconciler

log = logging.getLogger(__name__)


def owner_name(body: Mapping[str, Any]) -> str | None:
    """The FineTuneJob a child belongs to: its controller owner, or the annotation on training pods."""
    meta = body.get("metadata", {})
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == api.KIND and ref.get("apiVersion", "").startswith(f"{api.GROUP}/"):
            return str(ref["name"])
    owner = (meta.get("annotations") or {}).get(c.ANN_OWNER)
    return str(owner) if owner else None


class EndlessBackoffs:
    """kopf's delays between retries of one API request, without an end.

    kopf's default (1, 1, 2, 3, 5, 8, 13, 21 s) gives up after about a minute, and a watch that gives
    up stops the operator: an API server down for longer (an upgrade, a control-plane restart) would
    take the operator with it. kopf retries as long as the iterable yields and calls ``iter`` on it
    for every request, so each request starts again from 1 s, then waits 10 s at most.
    """

    def __iter__(self) -> Iterator[float]:
        return itertools.chain((1.0, 1.0, 2.0, 3.0, 5.0, 8.0), itertools.repeat(10.0))


def configure(kopf_settings: kopf.OperatorSettings) -> None:
    """Own prefix and finalizer, no kopf-posted events (the operator posts its own), quiet logs,
    API requests retried for as long as the API server is away."""
    kopf_settings.persistence.finalizer = c.FINALIZER
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.DOMAIN)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.DOMAIN, key="last-handled-configuration"
    )
    kopf_settings.posting.enabled = False
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.networking.error_backoffs = EndlessBackoffs()


def indexed(kind: str, body: Mapping[str, Any], namespace: str | None) -> dict[cache.Key, Any]:
    """A kopf index entry: the child's essentials under its FineTuneJob's key."""
    owner = owner_name(body)
    if owner is None or namespace is None:
        return {}
    return {(namespace, owner): essentials(kind, body)}


def build_registry(reconciler: Reconciler) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    managed = {c.LABEL_MANAGED_BY: c.MANAGED_BY}
    progress = {**managed, c.LABEL_COMPONENT: c.COMPONENT_PROGRESS}

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        configure(settings)
        reconciler.cache.attach({index: kwargs[index] for index in (cache.JOBS, cache.PODS, cache.PROGRESS)})
        reconciler.start()

    @kopf.on.cleanup(registry=registry)
    def cleanup(**_: Any) -> None:
        reconciler.stop()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    # kopf runs no handler before every index is filled from a full list.
    @kopf.index("batch", "v1", "jobs", labels=managed, id=cache.JOBS, registry=registry)
    async def finetune_jobs(body: kopf.Body, namespace: str | None, **_: Any) -> dict[cache.Key, Any]:
        return indexed("Job", body, namespace)

    @kopf.index("v1", "pods", labels=managed, id=cache.PODS, registry=registry)
    async def finetune_pods(body: kopf.Body, namespace: str | None, **_: Any) -> dict[cache.Key, Any]:
        return indexed("Pod", body, namespace)

    @kopf.index("v1", "configmaps", labels=progress, id=cache.PROGRESS, registry=registry)
    async def finetune_progress(body: kopf.Body, namespace: str | None, **_: Any) -> dict[cache.Key, Any]:
        return indexed("ConfigMap", body, namespace)

    @kopf.on.event(api.GROUP, api.VERSION, api.PLURAL, registry=registry)
    async def finetunejob_changed(
        name: str, namespace: str | None, type: str, body: kopf.Body, **_: Any
    ) -> None:
        if namespace is None:
            return
        if type == "DELETED":
            reconciler.forget(namespace, name)
        elif not reconciler.is_echo(namespace, name, body.get("metadata", {}).get("resourceVersion")):
            reconciler.enqueue(namespace, name)

    def child_changed(kind: str) -> Any:
        async def changed(body: kopf.Body, namespace: str | None, **_: Any) -> None:
            owner = owner_name(body)
            if owner and namespace is not None:
                reconciler.cache.seen(namespace, owner, kind, str(body.get("metadata", {}).get("name")))
                reconciler.enqueue(namespace, owner)

        return changed

    kopf.on.event("batch", "v1", "jobs", labels=managed, registry=registry, id="job-changed")(
        child_changed("Job")
    )
    kopf.on.event("v1", "pods", labels=managed, registry=registry, id="pod-changed")(child_changed("Pod"))
    kopf.on.event("v1", "configmaps", labels=progress, registry=registry, id="progress-changed")(
        child_changed("ConfigMap")
    )
    return registry
