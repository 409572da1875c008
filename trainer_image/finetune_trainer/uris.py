"""Parse the URIs a FineTuneJob may name for models, data, checkpoints and outputs.

Pure string handling, no I/O: the operator, the trainer and the CLI all validate URIs with this one
module, so a typo is refused the same way everywhere. Accepted forms:

- ``s3://bucket/key`` (a trailing ``/`` names a prefix, i.e. a folder),
- ``hf://org/name`` or ``hf://org/name@revision`` (a Hugging Face Hub repository),
- ``pvc://claim/path`` (a PersistentVolumeClaim; the operator mounts claims under
  ``$FTJ_PVC_ROOT``, default ``/mnt/pvc``, so this is the local path ``<root>/claim/path``),
- ``file:///absolute/path`` and plain local paths.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PVC_ROOT_ENV = "FTJ_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"

ACCEPTED_FORMS = "s3://bucket/key, hf://org/name[@revision], pvc://claim/path, file:///path or a local path"

Scheme = Literal["s3", "hf", "pvc", "file"]

# S3 bucket naming rules (3-63 characters, lowercase letters, digits, dots and hyphens).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
# Hub repository ids: "name" or "org/name"; letters, digits, "-", "_", ".".
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
# Kubernetes object names (DNS-1123 subdomain) for claims.
_CLAIM = re.compile(r"^[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


@dataclass(frozen=True)
class Uri:
    """A parsed URI. Which fields are set depends on :attr:`scheme`.

    ``s3``: :attr:`bucket` and :attr:`key` (``""`` for the bucket root).
    ``hf``: :attr:`repo_id` and optionally :attr:`revision`.
    ``pvc`` and ``file``: :attr:`path`, the local path to read or write.
    """

    scheme: Scheme
    raw: str
    bucket: str = ""
    key: str = ""
    repo_id: str = ""
    revision: str | None = None
    path: Path | None = None

    @property
    def is_local(self) -> bool:
        """True when the data is reachable as a local path (``pvc://``, ``file://`` or plain)."""
        return self.path is not None

    def local_path(self) -> Path:
        """The local path, or a ValueError for ``s3://`` and ``hf://`` URIs."""
        if self.path is None:
            raise ValueError(f"{self.raw!r} is a {self.scheme}:// URI, not a local path")
        return self.path


def _invalid(uri: str, why: str) -> ValueError:
    return ValueError(f"invalid URI {uri!r}: {why}; accepted forms: {ACCEPTED_FORMS}")


def parse_uri(uri: str, *, pvc_root: str | None = None) -> Uri:
    """Parse ``uri`` into a :class:`Uri`, or raise a ValueError naming it and the accepted forms.

    ``pvc_root`` defaults to ``$FTJ_PVC_ROOT`` or ``/mnt/pvc``.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise _invalid(str(uri), "it is empty")
    if uri != uri.strip():
        raise _invalid(uri, "it has leading or trailing whitespace")
    match = _SCHEME.match(uri)
    if match is None:
        return Uri(scheme="file", raw=uri, path=Path(uri))
    scheme = match.group(1).lower()
    rest = uri[match.end() :]
    if scheme == "s3":
        return _parse_s3(uri, rest)
    if scheme == "hf":
        return _parse_hf(uri, rest)
    if scheme == "pvc":
        return _parse_pvc(uri, rest, pvc_root)
    if scheme == "file":
        if not rest:
            raise _invalid(uri, "the path is empty")
        return Uri(scheme="file", raw=uri, path=Path(rest))
    raise _invalid(uri, f"unsupported scheme {scheme!r}")


def _parse_s3(uri: str, rest: str) -> Uri:
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise _invalid(uri, "the bucket name is missing")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise _invalid(
            uri, f"{bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, '.' or '-')"
        )
    if "//" in key or key.startswith("/"):
        raise _invalid(uri, "the key contains an empty path segment ('//')")
    return Uri(scheme="s3", raw=uri, bucket=bucket, key=key)


def _parse_hf(uri: str, rest: str) -> Uri:
    repo_id, at, revision = rest.partition("@")
    parts = repo_id.split("/")
    if not repo_id or len(parts) > 2 or not all(_HF_PART.match(p) for p in parts):
        raise _invalid(uri, "a Hub repository is 'org/name' (letters, digits, '-', '_', '.')")
    if at and not revision:
        raise _invalid(uri, "the revision after '@' is empty")
    return Uri(scheme="hf", raw=uri, repo_id=repo_id, revision=revision or None)


def _parse_pvc(uri: str, rest: str, pvc_root: str | None) -> Uri:
    claim, _, sub = rest.partition("/")
    if not _CLAIM.match(claim):
        raise _invalid(uri, f"{claim!r} is not a valid PersistentVolumeClaim name")
    if ".." in Path(sub).parts:
        raise _invalid(uri, "'..' may not leave the claim's volume")
    root = Path(pvc_root or os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT)
    path = root / claim / sub if sub else root / claim
    return Uri(scheme="pvc", raw=uri, path=path)


def join(prefix: str, *parts: str) -> str:
    """Join path segments onto a URI or local path with exactly one ``/`` between them.

    Empty segments are skipped; a trailing ``/`` on the last segment is kept (it marks a folder),
    e.g. ``join("s3://b/ckpt/", "/ns/", "job", "step-1/") == "s3://b/ckpt/ns/job/step-1/"``.
    """
    segments = [p.strip("/") for p in parts if p.strip("/")]
    if not segments:
        return prefix
    tail = "/".join(segments)
    if parts[-1].endswith("/"):
        tail += "/"
    if not prefix:
        return tail
    return (prefix if prefix.endswith("/") else prefix + "/") + tail


def s3_uri(bucket: str, key: str) -> str:
    """The ``s3://`` URI of ``key`` in ``bucket``."""
    return f"s3://{bucket}/{key}"
