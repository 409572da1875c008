"""What the operator knows of every FineTuneJob's children, without asking the API server.

Listing seven kinds of children per reconcile made the API server's work grow with the square of
the number of FineTuneJobs (each LIST by label is filtered over every object of its kind). Instead,
kopf indices fed by the watches the operator runs anyway keep the essentials
(:func:`finetune_operator.observe.essentials`) of every Job, Pod and progress ConfigMap, keyed by
their FineTuneJob; kopf fills them from a full list before any handler runs, so even the first
reconcile after a restart sees every Job that exists.

The watches lag behind the operator's own writes, so what this process created is remembered
(*written here*) until its watch event arrives: a reconcile that runs before the Job it just made
shows up in the index still sees that Job, and cannot start the same attempt under a new number.
The ServiceAccount, Role and RoleBinding are not watched at all: they are created once per
FineTuneJob and process (AlreadyExists counts as created), and remembered until the job is gone.

kopf's indices are read from the reconciler's threads while kopf's event loop updates them:
``list()`` of a store copies it in one C call, which no other Python thread interleaves with.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from finetune_operator.observe import Children, essentials

Obj = Mapping[str, Any]
Key = tuple[str, str]
"""(namespace, FineTuneJob name)."""

JOBS = "finetune_jobs"
PODS = "finetune_pods"
PROGRESS = "finetune_progress"
"""Ids of the kopf indices (the names of their handler functions in :mod:`handlers`)."""

_INDEXED = {"Job": JOBS, "Pod": PODS, "ConfigMap": PROGRESS}
_UNWATCHED = ("ServiceAccount", "Role", "RoleBinding")


class ChildCache:
    def __init__(self) -> None:
        self._indices: Mapping[str, Mapping[Key, Iterable[Obj]]] = {}
        self._written: dict[Key, dict[tuple[str, str], Obj]] = {}
        self._lock = threading.Lock()

    def attach(self, indices: Mapping[str, Mapping[Key, Iterable[Obj]]]) -> None:
        """kopf's indices (given to the startup handler); empty until they are attached."""
        self._indices = indices

    def children(self, namespace: str, name: str, uid: str) -> Children:
        """The children of FineTuneJob ``namespace/name`` with owner ``uid`` (as a LIST would show)."""
        key = (namespace, name)
        found = {kind: self._indexed(index, key) for kind, index in _INDEXED.items()}
        with self._lock:
            written = list(self._written.get(key, {}).values())
        for obj in written:
            kind = str(obj["kind"])
            if kind in found and all(_name(o) != _name(obj) for o in found[kind]):
                found[kind].append(obj)

        def owned(items: Iterable[Obj]) -> list[Obj]:
            return [o for o in items if any(ref.get("uid") == uid for ref in _owners(o))]

        jobs = owned(found["Job"])
        job_names = {_name(job) for job in jobs}
        return Children(
            jobs=jobs,
            pods=[p for p in found["Pod"] if any(ref.get("name") in job_names for ref in _owners(p))],
            config_maps=owned(found["ConfigMap"]),
            identity=owned(o for o in written if o["kind"] in _UNWATCHED),
        )

    def written(self, namespace: str, name: str, kind: str, obj: Obj) -> None:
        """This process created ``obj`` (or found it existing) for FineTuneJob ``namespace/name``."""
        with self._lock:
            self._written.setdefault((namespace, name), {})[(kind, _name(obj))] = essentials(kind, obj)

    def seen(self, namespace: str, name: str, kind: str, child: str) -> None:
        """A watch event of ``kind`` ``child`` arrived: from now on its index speaks for it."""
        with self._lock:
            written = self._written.get((namespace, name))
            if written is not None:
                written.pop((kind, child), None)

    def deleted(self, namespace: str, name: str, kind: str, child: str) -> None:
        """This process deleted ``child`` (its watch event may come later)."""
        self.seen(namespace, name, kind, child)

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._written.pop((namespace, name), None)

    def _indexed(self, index_id: str, key: Key) -> list[Obj]:
        index = self._indices.get(index_id)
        if index is None:
            return []
        for _ in range(10):
            try:
                return list(index.get(key, ()))
            except RuntimeError:  # changed while copied (see the module's docstring): copy again
                continue
        return list(index.get(key, ()))


def _name(obj: Obj) -> str:
    return str(obj.get("metadata", {}).get("name", ""))


def _owners(obj: Obj) -> list[Mapping[str, Any]]:
    return list(obj.get("metadata", {}).get("ownerReferences") or [])
