"""The ``integrations`` operator command line (also ``python -m integrations``)."""

from __future__ import annotations

import click

from ._app import cli
from ._support import FAILED, USAGE

__all__ = ["cli", "main"]

# click 8.2 and later signal a group called without a command with this error.
_NoArgsIsHelp: type[click.UsageError] = getattr(
    click.exceptions, "NoArgsIsHelpError", type("_Never", (click.UsageError,), {})
)


def main() -> None:
    """Entry point of the ``integrations`` console script. A usage error is one line on
    standard error (exit 2), as every other error is."""
    try:
        code = cli.main(prog_name="integrations", standalone_mode=False)
    except _NoArgsIsHelp as exc:
        # A command group given no command: its help, as --help prints it.
        click.echo(exc.ctx.get_help() if exc.ctx is not None else exc.format_message())
        raise SystemExit(0) from None
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "integrations"
        click.echo(f"error: {exc.format_message()} (see: {where} --help)", err=True)
        raise SystemExit(USAGE) from None
    except click.Abort:
        click.echo("error: aborted", err=True)
        raise SystemExit(FAILED) from None
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        raise SystemExit(exc.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)
