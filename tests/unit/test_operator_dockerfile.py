"""The operator image (operator/Dockerfile) against the project's pinned dependency sets.

No Docker engine here, so the image is checked as text and against the code it will run:
it installs exactly pyproject's ``operator`` extra, every third-party module reachable from its
entrypoint (``python -m finetune_operator``) comes from a distribution pinned in that set, it runs
unprivileged with the uid and ports the Helm chart expects, and it bakes in no credentials.
The same import check is made for the trainer image's entrypoint and the ``trainer`` extra.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "operator" / "Dockerfile"
PACKAGES = {
    "finetune_operator": ROOT / "operator" / "finetune_operator",
    "finetune_trainer": ROOT / "trainer_image" / "finetune_trainer",
    "finetune_devenv": ROOT / "devenv" / "finetune_devenv",
}


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


def pyproject() -> dict[str, list[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {"base": project["dependencies"], **project["optional-dependencies"]}


def requirement_name(requirement: str) -> str:
    name = re.split(r"[\s\[=<>~!;]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


# ------------------------------------------------------------------------------- import closure


def module_file(module: str) -> Path | None:
    """The source file of a first-party module (package __init__ or module), else None."""
    top, *rest = module.split(".")
    base = PACKAGES.get(top)
    if base is None:
        return None
    path = base.joinpath(*rest)
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def imports_of(module: str, source: Path) -> Iterator[str]:
    """Absolute names imported anywhere in ``source`` (module level and inside functions)."""
    is_package = source.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                prefix = f"{base}.{node.module}" if node.module else base
            else:
                prefix = node.module or ""
            yield prefix
            yield from (f"{prefix}.{alias.name}" for alias in node.names)  # submodules imported by name


def third_party_imports(entry: str) -> dict[str, str]:
    """Top-level third-party modules reachable from first-party module ``entry`` -> who imports them."""
    seen: set[str] = set()
    todo = [entry]
    found: dict[str, str] = {}
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        source = module_file(module)
        if source is None:
            continue
        for name in imports_of(module, source):
            top = name.split(".")[0]
            if top in PACKAGES:
                # the module and each parent package run on import
                parts = name.split(".")
                todo.extend(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.setdefault(top, module)
    return found


@functools.cache
def _top_level_to_distributions() -> dict[str, set[str]]:
    return {
        top: {requirement_name(name) for name in names}
        for top, names in importlib.metadata.packages_distributions().items()
    }


def distributions_of(top_level: str) -> set[str]:
    return _top_level_to_distributions().get(top_level, set())


def installed_by(pinned: set[str]) -> set[str]:
    """The pinned distributions and what they require (their metadata), as installed here."""
    out = set(pinned)
    for name in pinned:
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" not in requirement:
                out.add(requirement_name(requirement))
    return out


@pytest.mark.parametrize(
    ("entry", "extra"),
    [("finetune_operator.__main__", "operator"), ("finetune_trainer.__main__", "trainer")],
)
def test_every_library_the_image_runs_comes_with_its_pinned_set(entry: str, extra: str) -> None:
    """Each import is pinned in base + extra, or required by a pinned distribution (boto3 -> botocore)."""
    sets = pyproject()
    available = installed_by({requirement_name(r) for r in sets["base"] + sets[extra]})
    modules = third_party_imports(entry)
    assert modules, f"no third-party import found from {entry}: the scan is broken"
    missing = {
        module: f"imported by {importer}; distribution {sorted(distributions_of(module)) or 'unknown'}"
        for module, importer in modules.items()
        if not distributions_of(module) & available
    }
    assert not missing, f"the {extra} image would lack these (pin them in its extra): {missing}"


def test_operator_image_has_no_ml_libraries() -> None:
    modules = third_party_imports("finetune_operator.__main__")
    heavy = {"torch", "transformers", "peft", "trl", "deepspeed", "bitsandbytes", "datasets", "accelerate"}
    assert not heavy & modules.keys(), {m: modules[m] for m in heavy & modules.keys()}


def test_every_pin_of_the_operator_set_is_exact() -> None:
    sets = pyproject()
    for requirement in sets["base"] + sets["operator"]:
        assert re.search(r"==\d", requirement), f"not an exact pin: {requirement}"


# ------------------------------------------------------------------------------------ dockerfile


def test_operator_image_installs_the_pyproject_operator_extra_only() -> None:
    runs = [args for word, args in instructions(DOCKERFILE) if word == "RUN"]
    installs = [m.group(1) for run in runs for m in re.finditer(r"pip3? install ([^&;|]+)", run)]
    assert len(installs) == 1, installs
    assert re.search(r"""["']?/src\[operator\]["']?""", installs[0]), installs
    assert not re.search(r"[A-Za-z0-9_.\-]+\s*(==|>=|<=|~=)", installs[0]), f"hand-written pin: {installs}"
    assert "-r " not in installs[0] and "requirements" not in installs[0]
    copies = [args for word, args in instructions(DOCKERFILE) if word == "COPY"]
    assert any(c.startswith("pyproject.toml") for c in copies)
    assert any(c.startswith("operator/finetune_operator") for c in copies)


def test_operator_image_base_is_slim_and_pinned() -> None:
    steps = instructions(DOCKERFILE)
    args = dict(a.split("=", 1) for word, a in steps if word == "ARG" and "=" in a)
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0]) for w, a in steps if w == "FROM"
    ]
    assert bases, "no FROM"
    for base in bases:
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
        version = tuple(int(x) for x in base.split(":")[1].split("-")[0].split(".")[:2])
        assert version == sys.version_info[:2], (
            f"{base}: the project is tested on Python {sys.version_info[:2]}"
        )


def test_operator_image_runs_unprivileged_with_the_charts_uid_and_ports() -> None:
    steps = instructions(DOCKERFILE)
    users = [a for word, a in steps if word == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: use a numeric non-root uid (runAsNonRoot)"
    values = yaml.safe_load((ROOT / "helm" / "values.yaml").read_text())
    assert int(uid) == values["runAsUser"], "the chart's runAsUser and the image's USER differ"
    exposed = {int(p) for word, a in steps if word == "EXPOSE" for p in a.split()}
    assert exposed == {values["health"]["port"], values["metrics"]["port"]}
    assert ("ENTRYPOINT", '["python", "-m", "finetune_operator"]') in steps
    env = " ".join(a for word, a in steps if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "the root filesystem is read-only: no .pyc writes"


def test_operator_image_bakes_in_no_credentials() -> None:
    text = DOCKERFILE.read_text()
    for secret in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "KUBECONFIG", "token"):
        assert secret not in text
    assert not [a for word, a in instructions(DOCKERFILE) if word in ("ADD", "COPY") and ".kube" in a]
