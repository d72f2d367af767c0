"""A pytest plugin for ``scripts/mutants.py``: under coverage, each test's lines are recorded
in a context named by its node id (setup, call and teardown alike), whichever task or thread
runs them; a session-scoped fixture's setup in one named ``session:<fixture>`` (the template
database is made there, and kept across the mutant runs unless a mutant changes its lines)."""

from __future__ import annotations

from collections.abc import Iterator

import coverage
import pytest

_current = [""]


def _switch(context: str) -> None:
    cov = coverage.Coverage.current()
    if cov is not None:
        cov.switch_context(context)
    _current[0] = context


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    _switch(item.nodeid)
    try:
        return (yield)
    finally:
        _switch("")


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[object]) -> Iterator[object]:
    if fixturedef.scope != "session":
        return (yield)
    outer = _current[0]
    _switch(f"session:{fixturedef.argname}")
    try:
        return (yield)
    finally:
        _switch(outer)
