"""mkdocs hook: the site works without the internet. Mermaid is served from the site
itself (the page's diagram is drawn by it), fetched once from the npm registry with npm."""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

# The version is pinned: the same diagram code on every build.
MERMAID = "mermaid@11.17.2"
TARGET = Path(__file__).resolve().parent.parent / "docs" / "assets" / "vendor" / "mermaid.min.js"


def fetch_mermaid(target: Path = TARGET) -> Path:
    """``target``, fetched with ``npm pack`` when it is not there yet."""
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory() as scratch:
        try:
            done = subprocess.run(
                ["npm", "pack", "--silent", MERMAID],
                cwd=scratch,
                capture_output=True,
                text=True,
                timeout=300,
                check=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PluginError(
                f"the docs serve mermaid themselves: fetching {MERMAID} with npm failed "
                f"({exc}); install npm, or put mermaid.min.js at {target}"
            ) from exc
        archive = Path(scratch) / done.stdout.strip().splitlines()[-1]
        with tarfile.open(archive) as tar:
            member = tar.extractfile("package/dist/mermaid.min.js")
            if member is None:
                raise PluginError(f"{archive.name} holds no dist/mermaid.min.js")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(member.read())
    return target


def on_pre_build(config: Any, **kwargs: Any) -> None:
    fetch_mermaid()
