"""The ``integrations`` operator command line (also ``python -m integrations``)."""

from __future__ import annotations

from ._app import cli

__all__ = ["cli", "main"]


def main() -> None:
    """Entry point of the ``integrations`` console script."""
    cli(prog_name="integrations")
