"""Reading FineTuneJob manifests from files: YAML (several documents allowed), checked against the
API's own models so that a typo is reported with its field path before anything is sent."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import yaml

from finetune_operator.api import API_VERSION, KIND, FineTuneJob
from finetune_operator.cli.errors import CliError


@dataclass(frozen=True)
class Manifest:
    """One FineTuneJob document: as written (what gets applied) and parsed (what gets checked)."""

    raw: dict[str, Any]
    job: FineTuneJob
    source: str

    @property
    def name(self) -> str:
        return str(self.raw["metadata"]["name"])


def read_documents(path: str) -> list[Any]:
    """The YAML documents of ``path`` (``-`` reads stdin)."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", "check the file name") from None
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise CliError(
            f"{path} is not valid YAML{line}: {getattr(exc, 'problem', exc)}", "fix the YAML syntax"
        ) from None


def load(path: str) -> list[Manifest]:
    """Every FineTuneJob in ``path``, validated; CliError naming the fields otherwise."""
    docs = read_documents(path)
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if not found:
        raise CliError(f"{path} holds no FineTuneJob (kind: {KIND})", "see docs/examples/ for manifests")
    return [parse(doc, path) for doc in found]


def load_one(path: str) -> Manifest:
    manifests = load(path)
    if len(manifests) > 1:
        raise CliError(f"{path} holds {len(manifests)} FineTuneJobs", "give a file with one job")
    return manifests[0]


def parse(doc: dict[str, Any], source: str) -> Manifest:
    """Check ``doc`` against the API models; errors name each field as ``spec.dataset.train``."""
    if doc.get("apiVersion") != API_VERSION:
        raise CliError(
            f"{source}: apiVersion is {doc.get('apiVersion')!r}",
            f"a FineTuneJob has apiVersion: {API_VERSION}",
        )
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise CliError(f"{source}: metadata.name is missing", "give the job a name (metadata.name)")
    try:
        job = FineTuneJob.model_validate({k: v for k, v in doc.items() if k != "status"})
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{_path(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise CliError(
            f"{source}: FineTuneJob {meta['name']} is invalid: {problems}",
            "fix the named fields (reference: docs/api-reference.md)",
        ) from None
    return Manifest(doc, job, source)


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
