"""Sessions: tests, lint, typecheck, docs, benchmarks, mutants."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict", "integrations")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site; any warning fails the build."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Run every benchmark (the million-row one included) and rewrite docs/benchmarks.md
    from their output. The ``bench`` extra brings pgqueuer, which one of them compares
    the webhook delivery table with."""
    session.install("-e", ".[dev,web,bench]")
    session.run("python", "benchmarks/report.py", *session.posargs)


@nox.session
def benchmarks(session: nox.Session) -> None:
    """The same as ``bench``."""
    bench(session)


@nox.session
def mutants(session: nox.Session) -> None:
    """Mutation testing of the security and concurrency modules (mutants/modules.toml);
    a survivor that is not listed there as equivalent fails. Slow: not part of CI.
    ``nox -s mutants -- integrations/_lease.py`` runs one module."""
    session.install("-e", ".[dev,web]", "cosmic-ray==8.7.0", "coverage>=7.10")
    session.run("python", "scripts/mutants.py", *session.posargs)
