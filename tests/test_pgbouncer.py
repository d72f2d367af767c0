"""Behind PgBouncer in transaction mode: everything but LISTEN through it, one token request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from integrations import Integrations

from .oauth_server import ServerProcess
from .oauthkit import connect, open_integrations
from .pgbouncer import PgBouncer
from .test_refresh_processes import PER_WORKER, WORKERS, _expire_locally, _storm


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    from .conftest import _admin_dsn

    with PgBouncer(_admin_dsn()) as running:
        yield running


@pytest.fixture(scope="module")
def server_process() -> Iterator[ServerProcess]:
    with ServerProcess() as proc:
        yield proc


@pytest.fixture
def server(server_process: ServerProcess) -> ServerProcess:
    server_process.reset()
    return server_process


@pytest.fixture
def pooled_dsn(bouncer: PgBouncer, fresh_db: str) -> str:
    return bouncer.dsn_for(fresh_db)


@pytest.fixture
async def integ(
    pooled_dsn: str, fresh_db: str, server: ServerProcess
) -> AsyncIterator[Integrations]:
    async with open_integrations(
        pooled_dsn, server.base_url, statement_cache_size=0, listen_dsn=fresh_db
    ) as instance:
        yield instance


async def test_the_api_works_through_pgbouncer_and_events_come_through_the_direct_listener(
    integ: Integrations, server: ServerProcess
) -> None:
    async with integ.subscribe(owner=None) as events:
        uuid = await connect(integ)
        kinds = []
        while "connected" not in kinds:
            kinds.append((await asyncio.wait_for(events.get(), 10)).kind)
        before = await integ.access_token(uuid)
        token = await integ.refresh_access_token(uuid)
        assert token != before
        refreshed = await asyncio.wait_for(events.get(), 10)
        while refreshed.kind != "token_refreshed":
            refreshed = await asyncio.wait_for(events.get(), 10)
        assert refreshed.uuid == uuid
    await integ.rename_connection(uuid, "renamed")
    listed = await integ.list_connections("loopback")
    assert [c.name for c in listed] == ["renamed"]
    response = await integ.authenticated_request(uuid, "GET", f"{server.base_url}/api/resource")
    assert response.status == 200
    # Many statements at once, over a handful of server connections.
    results = await asyncio.gather(*(integ.get_credentials(uuid) for _ in range(50)))
    assert {r["access_token"] for r in results} == {token}


async def test_without_a_statement_cache_setting_pgbouncer_breaks_prepared_statements(
    pooled_dsn: str, server: ServerProcess
) -> None:
    """Why the setting exists: asyncpg's named statements do not survive transaction
    pooling, so repeated statements fail once they land on another server connection."""
    from integrations import StorageError

    failures = 0
    async with open_integrations(pooled_dsn, server.base_url) as integ:
        conn = await integ.add_connection("loopback", "x")
        for _ in range(30):
            try:
                await asyncio.gather(
                    *(integ.get_integration(conn.uuid, fresh=True) for _ in range(10))
                )
            except StorageError:
                failures += 1
    assert failures > 0


async def test_four_processes_behind_pgbouncer_make_one_token_request(
    integ: Integrations, server: ServerProcess, pooled_dsn: str, fresh_db: str
) -> None:
    import asyncpg

    uuid = await connect(integ)
    direct = await asyncpg.connect(fresh_db)
    try:
        await _expire_locally(direct, uuid)
    finally:
        await direct.close()
    server.configure(token_delay=0.3)
    extra = ("--statement-cache-size", "0", "--listen-dsn", fresh_db)
    results = await _storm(pooled_dsn, server, uuid, "request", extra)
    assert [r["status"] for r in results] == [200] * (WORKERS * PER_WORKER)
    stats = server.stats()
    assert stats["token_calls"].get("refresh_token") == 1
    assert stats["grants_revoked"] == 0
    assert stats["refresh_reuse_detected"] == 0
    print(
        f"\nbehind PgBouncer: {len(results)} of {WORKERS * PER_WORKER} succeeded, "
        f"{stats['token_calls'].get('refresh_token')} token request(s)"
    )


@pytest.fixture(scope="module")
def narrow_bouncer() -> Iterator[PgBouncer]:
    """One server connection per database: every client shares it between transactions."""
    from .conftest import _admin_dsn

    with PgBouncer(_admin_dsn(), pool_size=1) as running:
        yield running


async def test_one_instance_leads_the_health_sweeps_behind_pgbouncer_without_listen_dsn(
    narrow_bouncer: PgBouncer, fresh_db: str
) -> None:
    from .conftest import TEST_KEY

    pooled = narrow_bouncer.dsn_for(fresh_db)
    reports: dict[str, list[object]] = {"a": [], "b": []}

    async def sweeping(name: str) -> None:
        async with Integrations(pooled, keys=TEST_KEY, statement_cache_size=0) as integ:
            await integ.run_health_sweeps(
                interval=0.1, stale_after=3600, on_sweep=reports[name].append
            )

    tasks = [asyncio.create_task(sweeping(name)) for name in reports]
    try:
        await asyncio.sleep(2.0)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # A session lock taken through the pooler would sit on the shared server connection,
    # where the other instance's try-lock succeeds too: two leaders. The lease is a row.
    leaders = [name for name, got in reports.items() if got]
    assert len(leaders) == 1, {name: len(got) for name, got in reports.items()}
    assert len(reports[leaders[0]]) >= 5


async def test_without_listen_dsn_subscribe_raises_and_the_cache_is_off_naming_listen_dsn(
    pooled_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Through a transaction-mode pooler LISTEN runs but nothing arrives: open() logs
    (the cache is off), and subscribe() raises rather than deliver nothing."""
    from integrations import ConfigurationError, _events

    from .conftest import TEST_KEY

    monkeypatch.setattr(_events, "HEARTBEAT_TIMEOUT", 1.0)
    async with Integrations(pooled_dsn, keys=TEST_KEY, statement_cache_size=0) as integ:
        warned = [r for r in caplog.records if "listen_dsn" in r.getMessage()]
        assert [getattr(r, "integrations_event_kind", None) for r in warned] == ["cache_disabled"]
        assert integ.cache_stats.serving is False
        with pytest.raises(ConfigurationError) as caught:
            async with integ.subscribe(owner=None):
                pass
        assert "listen_dsn" in caught.value.message
        assert "did not receive its own notification" in caught.value.message
        assert integ.cache_stats.serving is False
