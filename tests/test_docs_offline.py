"""The docs site renders without the internet: no web fonts, mermaid served by the site."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = (ROOT / "mkdocs.yml").read_text()


def listed(key: str) -> list[str]:
    """The items of a top-level list in mkdocs.yml (read as text: the dev extra has no YAML)."""
    found = re.search(rf"^{key}:\n((?:  - .*\n)+)", CONFIG, flags=re.MULTILINE)
    return [] if found is None else re.findall(r"^  - (.*)$", found.group(1), flags=re.M)


def test_the_theme_fetches_no_web_fonts() -> None:
    theme = re.search(r"^theme:\n((?:  .*\n|\s*#.*\n)+)", CONFIG, flags=re.MULTILINE)
    assert theme is not None
    assert re.search(r"^  font: false$", theme.group(1), flags=re.MULTILINE)


def test_mermaid_is_served_by_the_site_itself() -> None:
    diagrams = [p for p in (ROOT / "docs").rglob("*.md") if "```mermaid" in p.read_text()]
    assert diagrams, "no diagram left: this test and the hook can go"
    # The hook is an mkdocs plugin: it needs the docs extra, which `pip install -e '.[dev]'`
    # (the README's test command) does not bring; CI installs both and runs it.
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    path = ROOT / "scripts" / "docs_offline.py"
    spec = importlib.util.spec_from_file_location("docs_offline", path)
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    assert "scripts/docs_offline.py" in listed("hooks")
    # The theme loads mermaid from a CDN only when the page has none: the hook's file is
    # among the page's scripts, at the place the hook writes it.
    served = hook.TARGET.relative_to(ROOT / "docs").as_posix()
    assert served in listed("extra_javascript")
    assert re.fullmatch(r"mermaid@\d+\.\d+\.\d+", hook.MERMAID), "pin a version"
    for entry in [*listed("extra_javascript"), *listed("extra_css")]:
        assert not entry.startswith(("http:", "https:", "//")), entry
