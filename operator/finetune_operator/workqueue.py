"""The keys waiting to be reconciled (client-go's workqueue, reduced to what the operator needs).

A key is in the queue at most once, however often it is added, and is never handed to two workers
at once: a key added while a worker has it goes back into the queue when that worker is done. So a
gang of 64 pods changing at once costs one or two reconciles of their FineTuneJob, not 64, and no
thread ever blocks waiting for another one's reconcile of the same job.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(self) -> None:
        self._queue: deque[K] = deque()
        self._dirty: set[K] = set()
        """Keys waiting: in the queue, or to be queued again once their worker is done."""
        self._processing: set[K] = set()
        self._closed = False
        self._cond = threading.Condition()

    def add(self, key: K) -> None:
        with self._cond:
            if self._closed or key in self._dirty:
                return
            self._dirty.add(key)
            if key not in self._processing:
                self._queue.append(key)
                self._cond.notify()

    def get(self) -> K | None:
        """The next key (the caller must call :meth:`done` with it); None once the queue is closed."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            key = self._queue.popleft()
            self._dirty.discard(key)
            self._processing.add(key)
            return key

    def done(self, key: K) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty and not self._closed:
                self._queue.append(key)
                self._cond.notify()

    def close(self) -> None:
        """Wake every waiting worker with None; later adds are ignored."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)
