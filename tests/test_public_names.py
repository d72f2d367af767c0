"""The package's public surface is exactly ``__all__``."""

from __future__ import annotations

import subprocess
import sys

import integrations


def test_public_names_are_exactly_all() -> None:
    public = {name for name in dir(integrations) if not name.startswith("_")}
    assert public == set(integrations.__all__)


def test_a_fresh_import_exposes_no_stray_names() -> None:
    # A fresh interpreter: no submodule imported by other tests can hide a leak.
    code = (
        "import integrations as i; "
        "print(sorted({n for n in dir(i) if not n.startswith('_')} - set(i.__all__)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
