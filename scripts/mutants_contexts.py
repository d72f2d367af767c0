"""A pytest plugin for ``scripts/mutants.py``: under coverage, each test's lines are recorded
in a context named by its node id (setup, call and teardown alike), whichever task or thread
runs them."""

from __future__ import annotations

from collections.abc import Iterator

import coverage
import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    cov = coverage.Coverage.current()
    if cov is not None:
        cov.switch_context(item.nodeid)
    try:
        return (yield)
    finally:
        if cov is not None:
            cov.switch_context("")
