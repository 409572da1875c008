"""Pod host names in a clearly marked block of /etc/hosts, one block per node agent.

Pods reach each other by DNS name (``MASTER_ADDR=<job>-0.<service>``); with no cluster DNS the
agent writes those names, all 127.0.0.1, between two marker lines that name the node. It rewrites
only its own block, in place (the file may be a bind mount that cannot be replaced), under a lock
shared with other agents on the machine, and removes the block when it stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from finetune_devenv.nodeagent.context import HOST_IP

HOSTS = Path("/etc/hosts")
_LOCK = Path(tempfile.gettempdir()) / "ftj-nodeagent-hosts.lock"


def markers(node: str) -> tuple[str, str]:
    return (
        f"# BEGIN finetune-devenv node agent {node} (managed: edits here are overwritten)",
        f"# END finetune-devenv node agent {node}",
    )


def render(text: str, node: str, names: Iterable[str]) -> str:
    """`text` with this node's block replaced by `names` (no block at all when there are none)."""
    begin, end = markers(node)
    kept: list[str] = []
    inside = False
    for line in text.splitlines():
        if line == begin:
            inside = True
        elif line == end and inside:
            inside = False
        elif not inside:
            kept.append(line)
    unique = sorted(set(names))
    if unique:
        kept += [begin, *(f"{HOST_IP}\t{name}" for name in unique), end]
    return "\n".join(kept) + "\n"


def writable(path: Path = HOSTS) -> bool:
    return os.access(path, os.W_OK)


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with open(_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update(node: str, names: Iterable[str], path: Path = HOSTS) -> None:
    """Make this node's block hold exactly `names` (an empty list removes the block)."""
    with _locked(), open(path, "r+", encoding="utf-8") as f:
        text = f.read()
        new = render(text, node, names)
        if new != text:
            f.seek(0)
            f.write(new)
            f.truncate()
