"""The docs site (mkdocs.yml + docs/) builds with `mkdocs build --strict`: no broken link or anchor,
no missing snippet, no page left out of the nav. `make docs` runs the same build."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def nav_pages(nav: list[object]) -> set[str]:
    pages: set[str] = set()
    for item in nav:
        if isinstance(item, str):
            pages.add(item)
        elif isinstance(item, dict):
            for value in item.values():
                pages |= nav_pages(value) if isinstance(value, list) else {str(value)}
    return pages


def test_site_builds_strict_without_warnings(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    for page in ("index", "concepts", "operations", "troubleshooting", "examples", "api-reference"):
        assert (tmp_path / "site" / f"{page}.html").is_file(), page
    examples = (tmp_path / "site" / "examples.html").read_text()
    assert "support-bot-70b" in examples, "the example files were not included in the page"
    assert "resource.customizations.health.finetune.dev_FineTuneJob" in examples


def test_every_page_is_in_the_nav() -> None:
    # mkdocs.yml uses no custom tags, so it loads with the safe loader
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert nav_pages(config["nav"]) == pages


def test_every_example_file_is_shown_in_the_docs() -> None:
    text = "\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    included = set(re.findall(r'--8<-- "([^"]+)"', text))
    for example in sorted(DOCS.glob("examples/**/*.yaml")):
        assert example.relative_to(DOCS).as_posix() in included, f"{example.name} is in no page"
