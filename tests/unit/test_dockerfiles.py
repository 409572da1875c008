"""The trainer image installs exactly the pinned extra of pyproject.toml, runs unprivileged and
carries no credentials (a text check: no Docker engine is needed to run it)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TRAINER = ROOT / "trainer_image" / "Dockerfile"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def pip_installs(dockerfile: Path) -> list[str]:
    runs = [args for word, args in instructions(dockerfile) if word == "RUN"]
    return [m.group(1) for run in runs for m in re.finditer(r"pip3? install ([^&;|]+)", run)]


def test_trainer_image_installs_the_pyproject_trainer_extra() -> None:
    installs = pip_installs(TRAINER)
    assert installs, "the Dockerfile installs nothing with pip"
    assert any(re.search(r"""["']?/src\[trainer\]["']?""", args) for args in installs), installs
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "trainer" in extras
    for args in installs:
        assert not re.search(r"[A-Za-z0-9_.\-]+\s*(==|>=|<=|~=)", args), f"hand-written pin: {args}"
        assert "-r " not in args and "requirements" not in args, f"a second list of versions: {args}"


def test_trainer_image_copies_the_pyproject_it_installs() -> None:
    copies = [args for word, args in instructions(TRAINER) if word == "COPY"]
    assert any("pyproject.toml" in c for c in copies)
    assert any(c.startswith("trainer_image/finetune_trainer") for c in copies)


def test_trainer_image_is_cuda_based_unprivileged_and_runs_the_trainer() -> None:
    steps = instructions(TRAINER)
    args = dict(a.split("=", 1) for word, a in steps if word == "ARG" and "=" in a)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], next(a for word, a in steps if word == "FROM"))
    assert base.startswith(("nvidia/cuda:", "nvcr.io/nvidia/cuda:")), base
    users = [a for word, a in steps if word == "USER"]
    assert users and not users[-1].startswith(("root", "0")), "the trainer must not run as root"
    assert ("ENTRYPOINT", '["python", "-m", "finetune_trainer"]') in steps


def test_trainer_image_bakes_in_no_credentials() -> None:
    text = TRAINER.read_text()
    for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        assert secret not in text
    assert not [a for word, a in instructions(TRAINER) if word in ("ADD", "COPY") and ".aws" in a]
