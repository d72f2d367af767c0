"""Every write transaction the library opens is bounded: when it commits, its session has a
local ``idle_in_transaction_session_timeout`` of at most the lock timeout, so a process
frozen between its statements never holds its locks longer than that (the server ends
the session). Checked on the commits themselves, whatever path opened the transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import asyncpg
import asyncpg.transaction
import pytest

from integrations import Integrations, generate_key

from .conftest import TEST_KEY
from .test_webhooks import settled

SETTING = "SELECT current_setting('idle_in_transaction_session_timeout')"


def _millis(value: str) -> float:
    """A PostgreSQL duration setting as milliseconds ('0' is no limit)."""
    units = {"ms": 1.0, "s": 1000.0, "min": 60_000.0, "h": 3_600_000.0}
    for unit in sorted(units, key=len, reverse=True):
        if value.endswith(unit) and value[: -len(unit)].isdigit():
            return float(value[: -len(unit)]) * units[unit]
    return float(value)


@pytest.fixture
def commits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The idle limit in force at each commit made in this test (milliseconds)."""
    seen: list[float] = []
    original_aexit = asyncpg.transaction.Transaction.__aexit__
    original_execute = asyncpg.connection.Connection.execute

    async def execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if query.strip().upper() == "COMMIT" and self.is_in_transaction():
            seen.append(_millis(await self.fetchval(SETTING)))
        return await original_execute(self, query, *args, **kwargs)

    async def aexit_checked(self: Any, extype: Any, ex: Any, tb: Any) -> Any:
        if extype is None and not self._nested:
            seen.append(_millis(await self._connection.fetchval(SETTING)))
        return await original_aexit(self, extype, ex, tb)

    monkeypatch.setattr(asyncpg.transaction.Transaction, "__aexit__", aexit_checked)
    monkeypatch.setattr(asyncpg.connection.Connection, "execute", execute)
    yield seen


async def test_every_write_transaction_commits_with_an_idle_limit_of_at_most_the_lock_timeout(
    empty_db: str, commits: list[float]
) -> None:
    lock_timeout = 4.0
    old_key, new_key = TEST_KEY, generate_key()
    async with Integrations(empty_db, keys=old_key, lock_timeout=lock_timeout) as integ:
        assert commits, "the migration's transaction was not seen"
        conn = await integ.add_connection("openai", "bounded")
        await integ.save_setup(conn.uuid, {"api_key": "sk-bounded-0123456789"})
        await integ.get_credentials(conn.uuid)  # an audit record
        await integ.rename_connection(conn.uuid, "bounded-2")
        endpoint = await integ.add_webhook("http://127.0.0.1:9/in", allow_loopback=True)
        await integ.save_setup(conn.uuid, {"api_key": "sk-bounded-9876543210"})
        worker = asyncio.create_task(
            integ.run_webhooks(allow_loopback=True, retry_delays=(3600,), poll=0.05)
        )
        try:
            await settled(integ, endpoint.id, 1, state="pending")
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        await integ.prune_events(max_age=None, max_count=1)
        await integ.sweep_audit(older_than=timedelta(microseconds=1))

        async def make() -> tuple[str, bytes]:
            return "kid-bounded", b"wrapped"

        await integ._s.core.repo.create_data_key("wrapper-bounded", make)
    async with Integrations(empty_db, keys=[new_key, old_key], lock_timeout=lock_timeout) as integ:
        await integ.rotate_keys()
    assert len(commits) >= 12, commits
    unbounded = [value for value in commits if not 0 < value <= lock_timeout * 1000]
    assert unbounded == [], commits
