"""The package's public surface is exactly ``__all__``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import integrations

# Subpackages loaded on demand (the command line, the console): attributes once imported.
ON_DEMAND = {"cli", "web"}


def test_public_names_are_exactly_all() -> None:
    public = {name for name in dir(integrations) if not name.startswith("_")}
    assert public - ON_DEMAND == set(integrations.__all__)


def test_a_fresh_import_exposes_no_stray_names() -> None:
    # A fresh interpreter: no submodule imported by other tests can hide a leak.
    code = (
        "import integrations as i; "
        "print(sorted({n for n in dir(i) if not n.startswith('_')} - set(i.__all__)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_api_reference_documents_every_public_name() -> None:
    reference = (Path(__file__).resolve().parent.parent / "docs" / "reference.md").read_text()
    documented = set(re.findall(r"^::: integrations\.(\w+)$", reference, flags=re.MULTILINE))
    assert documented == set(integrations.__all__)
