"""The row cache: served from memory, never stale once a change's notice has arrived."""

from __future__ import annotations

import asyncio
import math
import sys
import time
import uuid as uuid_mod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from integrations import ConfigurationError, Deleted, Integrations, _cache, generate_key
from integrations._cache import CachedRepository, RowCache
from integrations._record import StoredRow
from integrations._repository import Repository

from .conftest import TEST_KEY
from .oauth_server import OAuthTestServer
from .oauthkit import connect, open_integrations

WRITER = Path(__file__).resolve().parent / "cache_writer.py"
TIMEOUT = 10.0
LISTENER_SQL = """
    SELECT pid FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE 'LISTEN %'
"""


async def write_elsewhere(dsn: str, uuid: str, *values: str) -> None:
    """Save each value as ``api_key`` from another OS process, one commit each."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(WRITER), dsn, TEST_KEY, uuid, *values
    )
    assert await asyncio.wait_for(proc.wait(), 60) == 0


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` (state the library changes from its listener callback)."""
    async with asyncio.timeout(TIMEOUT):
        while not predicate():  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.005)


async def api_key(integ: Integrations, ref: str, **kwargs: object) -> str:
    return str((await integ.get_credentials(ref, **kwargs))["api_key"])  # type: ignore[arg-type]


@pytest.fixture
async def saved(integ: Integrations) -> str:
    conn = await integ.add_connection("openai", "default")
    await integ.save_setup(conn.uuid, {"api_key": "sk-first"})
    return conn.uuid


# -- the cache itself ---------------------------------------------------------------------


def row(uuid: str, key: str = "integration:openai:default", owner: str | None = None) -> StoredRow:
    return StoredRow(uuid=uuid, owner=owner, key=key, data={}, version=1)


def test_a_read_that_started_before_a_change_is_not_kept() -> None:
    cache = RowCache(capacity=10)
    cache.listening(True)
    ticket = cache.ticket()
    cache.rows_changed(["other"])  # any notice meanwhile: the read may predate it
    cache.fill(ticket, row("a"))
    assert cache.get("a") is None
    ticket = cache.ticket()
    cache.fill(ticket, row("a"))
    assert cache.get("a") is not None


def test_nothing_is_kept_or_served_while_the_listener_is_down() -> None:
    cache = RowCache(capacity=10)
    assert cache.ticket() is None
    cache.listening(True)
    cache.fill(cache.ticket(), row("a"))
    ticket = cache.ticket()
    cache.listening(False)
    assert not cache.serving and cache.stats.size == 0
    cache.fill(ticket, row("b"))
    cache.listening(True)
    # A read from before the gap stays out even once listening again.
    cache.fill(ticket, row("b"))
    assert cache.stats.size == 0


def test_served_only_until_the_listeners_proof_runs_out_and_kept_meanwhile() -> None:
    cache = RowCache(capacity=10)
    cache.listening(True)
    cache.proven(-math.inf)  # a probing listener: nothing served before its first proof
    assert not cache.serving and cache.ticket() is None
    cache.proven(time.monotonic() + 60)
    cache.fill(cache.ticket(), row("a"))
    ticket = cache.ticket()
    assert cache.serving
    cache.proven(time.monotonic() - 0.001)  # the proof ran out: a frozen link
    assert not cache.serving and cache.ticket() is None
    cache.fill(ticket, row("b"))  # a read that ends meanwhile is not kept
    # What is held stays: notices arrive in commit order, so the next proof means every
    # change committed before its probe was heard (and dropped its row).
    cache.rows_changed(["a"])
    cache.proven(time.monotonic() + 60)
    assert cache.serving and cache.get("a") is None and cache.get("b") is None


def test_lru_bound_and_refs_follow_their_rows() -> None:
    cache = RowCache(capacity=2)
    cache.listening(True)
    cache.fill(cache.ticket(), row("a", "integration:openai:a"))
    cache.fill(cache.ticket(), row("b", "integration:openai:b"))
    assert cache.get("a") is not None  # a is now the most recent
    cache.fill(cache.ticket(), row("c", "integration:openai:c"))
    assert cache.get("b") is None
    assert cache.get_ref(None, "integration:openai:b") is None
    assert cache.get_ref(None, "integration:openai:a") is not None
    # A rename: the new row replaces the old one and its old ref.
    cache.fill(cache.ticket(), row("a", "integration:openai:renamed"))
    assert cache.get_ref(None, "integration:openai:a") is None
    assert cache.get_ref(None, "integration:openai:renamed") is not None
    assert cache.get_ref("alice", "integration:openai:renamed") is None
    cache.rows_changed(None)
    assert cache.stats.size == 0


@pytest.mark.parametrize("kwargs", [{"cache_size": 0}, {"cache_size": "big"}, {"cache": "yes"}])
def test_bad_cache_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError) as info:
        Integrations("postgresql://localhost/x", **kwargs)  # type: ignore[arg-type]
    assert info.value.code == "configuration", info.value


# -- in one process -----------------------------------------------------------------------


async def test_repeated_reads_are_served_from_memory(integ: Integrations, saved: str) -> None:
    assert await api_key(integ, saved) == "sk-first"
    before = integ.cache_stats
    for ref in (saved, saved, "openai:default", "openai"):
        assert await api_key(integ, ref) == "sk-first"
    after = integ.cache_stats
    assert after.hits - before.hits >= 3
    assert after.serving and after.size == 1
    # The plaintext is not what is kept.
    kept = integ._repo.cache.get(saved)
    assert kept is not None and "sk-first" not in repr(kept.data)


class HeldBack:
    """Stands between the event hub and the row cache: change notices are kept here, so
    only a process's own invalidation of what it wrote can make a change seen."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.notices: list[Sequence[str] | None] = []

    def rows_changed(self, uuids: Sequence[str] | None) -> None:
        self.notices.append(uuids)

    def listening(self, up: bool) -> None:
        self.cache.listening(up)


def hold_notifications(integ: Integrations, monkeypatch: pytest.MonkeyPatch) -> HeldBack:
    hub = integ._s.core.hub
    held = HeldBack(hub._watcher)
    monkeypatch.setattr(hub, "_watcher", held)
    return held


async def test_own_writes_are_seen_at_once(
    integ: Integrations, saved: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert await api_key(integ, saved) == "sk-first"
    assert await api_key(integ, saved) == "sk-first"
    assert integ.cache_stats.hits >= 1
    hold_notifications(integ, monkeypatch)
    await integ.save_setup(saved, {"api_key": "sk-second"})
    assert await api_key(integ, saved) == "sk-second"
    await integ.rename_connection(saved, "renamed")
    assert await api_key(integ, "openai:renamed") == "sk-second"
    with pytest.raises(integrations_errors().NotConfigured):
        await integ.get_credentials("openai:default")
    await integ.remove_connection(saved)
    with pytest.raises(integrations_errors().Deleted):
        await integ.get_credentials(saved)


async def test_whether_a_cached_row_holds_credentials_follows_its_writes(
    integ: Integrations, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = await integ.add_connection("openai", "default")
    for _ in range(2):  # the second read is served from the cache
        with pytest.raises(integrations_errors().NotConfigured):
            await integ.get_credentials(conn.uuid)
    hold_notifications(integ, monkeypatch)
    await integ.save_setup(conn.uuid, {"api_key": "sk-first"})
    assert await api_key(integ, conn.uuid) == "sk-first"
    hits = integ.cache_stats.hits
    assert await api_key(integ, conn.uuid) == "sk-first"
    assert integ.cache_stats.hits == hits + 1
    await integ.disconnect(conn.uuid)
    for _ in range(2):
        with pytest.raises(integrations_errors().NotConfigured):
            await integ.get_credentials(conn.uuid)
    await integ.save_setup(conn.uuid, {"api_key": "sk-second"})
    assert await api_key(integ, conn.uuid) == "sk-second"


async def test_a_token_write_is_seen_at_once(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        OAuthTestServer() as server,
        open_integrations(fresh_db, server.base_url) as integ,
    ):
        uuid = await connect(integ)
        first = await integ.access_token(uuid)
        assert await integ.access_token(uuid) == first
        hold_notifications(integ, monkeypatch)
        renewed = await integ.refresh_access_token(uuid)
        assert renewed != first
        # Not due: handed out from the (cached) row, which must be the one just written.
        assert await integ.access_token(uuid) == renewed
        assert server.stats.token_calls["refresh_token"] == 1


def integrations_errors():  # type: ignore[no-untyped-def]
    import integrations

    return integrations


async def test_fresh_reads_the_database(
    integ: Integrations, saved: str, db: asyncpg.Connection
) -> None:
    assert await api_key(integ, saved) == "sk-first"
    plain = await db.fetchval(
        "SELECT value_json::text FROM integrations.connections WHERE uuid = $1",
        uuid_mod.UUID(saved),
    )
    await db.execute(
        "UPDATE integrations.connections SET value_json = value_json || '{\"note\": 1}' "
        "WHERE uuid = $1",
        uuid_mod.UUID(saved),
    )
    assert plain is not None
    assert (await integ.get_integration(saved, fresh=True))["note"] == 1
    assert (await integ.get_integration_by_uuid(saved, fresh=True)).data["note"] == 1


async def test_without_the_cache_every_read_goes_to_the_database(fresh_db: str) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY, cache=False) as integ:
        conn = await integ.add_connection("openai", "default")
        await integ.save_setup(conn.uuid, {"api_key": "sk-1"})
        for _ in range(3):
            assert await api_key(integ, conn.uuid) == "sk-1"
        stats = integ.cache_stats
        assert (stats.enabled, stats.serving, stats.size, stats.hits) == (False, False, 0, 0)


async def test_a_raw_sql_write_and_a_key_rotation_drop_the_row(
    integ: Integrations, saved: str, db: asyncpg.Connection, fresh_db: str
) -> None:
    assert await api_key(integ, saved) == "sk-first"
    await db.execute(
        "UPDATE integrations.connections SET value_json = value_json || '{\"note\": 2}' "
        "WHERE uuid = $1",
        uuid_mod.UUID(saved),
    )
    await until(lambda: integ.cache_stats.size == 0, "the notice of a raw write")
    assert (await integ.get_integration(saved))["note"] == 2

    new_key = generate_key()
    async with Integrations(fresh_db, keys=[new_key, TEST_KEY], cache=False) as rotating:
        assert await api_key(integ, saved) == "sk-first"
        assert integ.cache_stats.size == 1
        assert (await rotating.rotate_keys()).rotated == 1
    # Rotation sends no event, but the row's change is announced all the same.
    await until(lambda: integ.cache_stats.size == 0, "the notice of a rotation batch")


async def test_a_truncate_by_hand_empties_the_cache(
    integ: Integrations, saved: str, db: asyncpg.Connection
) -> None:
    assert await api_key(integ, saved) == "sk-first"
    assert integ.cache_stats.size == 1
    await db.execute("TRUNCATE integrations.connections CASCADE")
    await until(lambda: integ.cache_stats.size == 0, "the notice of a truncate")
    with pytest.raises(Deleted):
        await integ.get_credentials(saved)


# -- across processes ---------------------------------------------------------------------


async def test_a_write_in_another_process_is_seen_once_its_notice_arrived(
    integ: Integrations, saved: str, fresh_db: str
) -> None:
    async with integ.subscribe(kinds=["setup_saved"]) as sub:
        for step in range(3):
            assert await api_key(integ, saved) == ("sk-first" if step == 0 else f"sk-{step}")
            assert await api_key(integ, "openai:default") == await api_key(integ, saved)
            await write_elsewhere(fresh_db, saved, f"sk-{step + 1}")
            # The event is sent after the row's change notice, in the same commit.
            event = await asyncio.wait_for(sub.get(), TIMEOUT)
            assert event.uuid == saved
            assert await api_key(integ, saved) == f"sk-{step + 1}"
            assert await api_key(integ, "openai:default") == f"sk-{step + 1}"


async def test_reads_during_a_stream_of_writes_never_go_back(
    integ: Integrations, saved: str, fresh_db: str
) -> None:
    """Reader and writer race; once a value has been read, no older one is ever served."""
    count = 40
    writer = asyncio.ensure_future(
        write_elsewhere(fresh_db, saved, *(f"sk-{i:03d}" for i in range(count)))
    )
    seen: list[str] = []
    while not writer.done():
        seen.append(await api_key(integ, saved))
        await asyncio.sleep(0)
    await writer
    # All values have the same length: text order is write order.
    assert seen == sorted(seen, key=lambda v: (v != "sk-first", v))
    last = f"sk-{count - 1:03d}"
    async with asyncio.timeout(TIMEOUT):
        while (value := await api_key(integ, saved)) != last:
            assert value <= last
            await asyncio.sleep(0.005)
    assert await api_key(integ, saved, fresh=True) == last


async def test_listener_loss_empties_and_bypasses_the_cache_until_resync(
    integ: Integrations, saved: str, fresh_db: str, db: asyncpg.Connection
) -> None:
    assert await api_key(integ, saved) == "sk-first"
    async with integ.subscribe() as sub:
        [listener] = await db.fetch(LISTENER_SQL)
        assert await db.fetchval("SELECT pg_terminate_backend($1)", listener["pid"])
        # A change committed while nobody listens: its notice is lost for good.
        await db.execute(
            "UPDATE integrations.connections SET value_json = value_json || '{\"note\": 3}' "
            "WHERE uuid = $1",
            uuid_mod.UUID(saved),
        )
        resync = await asyncio.wait_for(sub.get(), TIMEOUT)
        assert resync.kind == "resync"
    assert integ.event_stats.reconnects == 1
    assert (await integ.get_integration(saved))["note"] == 3
    await write_elsewhere(fresh_db, saved, "sk-after")
    await until(lambda: integ.cache_stats.size == 0, "the notice after the resync")
    assert await api_key(integ, saved) == "sk-after"
    assert integ.cache_stats.serving


async def test_while_the_listener_is_down_reads_go_to_the_database(
    integ: Integrations, saved: str, admin_dsn: str, db: asyncpg.Connection
) -> None:
    assert await api_key(integ, saved) == "sk-first"
    admin = await asyncpg.connect(admin_dsn)
    database = db._params.database
    hub = integ._s.core.hub
    [listener] = await db.fetch(LISTENER_SQL)
    # Keep it down: every reconnect attempt fails until the database lets it in again.
    await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    try:
        assert await db.fetchval("SELECT pg_terminate_backend($1)", listener["pid"])
        await until(lambda: not hub.listening, "the loss to be seen")
        assert not integ.cache_stats.serving and integ.cache_stats.size == 0
        await db.execute(
            "UPDATE integrations.connections SET value_json = value_json || '{\"note\": 4}' "
            "WHERE uuid = $1",
            uuid_mod.UUID(saved),
        )
        for _ in range(3):
            assert (await integ.get_integration(saved))["note"] == 4
        assert integ.cache_stats.size == 0
    finally:
        await admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await admin.close()
    # Served again once the new connection's first probe was heard.
    await until(lambda: integ.cache_stats.serving, "the listener to come back")
    assert (await integ.get_integration(saved))["note"] == 4
    assert integ.cache_stats.size == 1


# -- built auth headers ---------------------------------------------------------------------


async def test_built_auth_headers_follow_the_row(fresh_db: str) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from integrations import Provider

    seen: list[str] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v1/echo", echo)
    provider = Provider(key="echo", name="Echo", auth_type="api_key", api_hosts=("127.0.0.1",))
    async with (
        TestServer(app, host="127.0.0.1") as server,
        Integrations(fresh_db, keys=TEST_KEY, providers=[provider]) as integ,
        Integrations(fresh_db, keys=TEST_KEY, providers=[provider], cache=False) as other,
    ):
        url = str(server.make_url("/v1/echo"))
        conn = await integ.add_connection("echo", "default")
        await integ.save_setup(conn.uuid, {"api_key": "sk-one"})
        for _ in range(3):
            await integ.authenticated_request(conn.uuid, "GET", url)
        await other.save_setup(conn.uuid, {"api_key": "sk-two"})
        await until(lambda: integ.cache_stats.size == 0, "the other instance's write")
        await integ.authenticated_request("echo:default", "GET", url)
        await other.authenticated_request(conn.uuid, "GET", url)
        await integ.save_setup(conn.uuid, {"api_key": "sk-three"})
        await integ.authenticated_request(conn.uuid, "GET", url)
        await integ.disconnect(conn.uuid)
        with pytest.raises(integrations_errors().NotConfigured):
            await integ.authenticated_request(conn.uuid, "GET", url)
    assert seen == [
        *["Bearer sk-one"] * 3,
        "Bearer sk-two",
        "Bearer sk-two",
        "Bearer sk-three",
    ]


async def test_an_uncached_read_is_one_statement_with_no_reset_after_it(
    fresh_db: str, db: asyncpg.Connection
) -> None:
    # audit="admin": a reveal's own audit record is a write, measured in benchmarks/.
    async with Integrations(
        fresh_db, keys=TEST_KEY, cache=False, pool_max_size=2, audit="admin"
    ) as integ:
        conn = await integ.add_connection("openai", "default")
        await integ.save_setup(conn.uuid, {"api_key": "sk-1"})
        assert await api_key(integ, conn.uuid) == "sk-1"
        last = await db.fetch(
            """SELECT query FROM pg_stat_activity
               WHERE datname = current_database() AND pid <> pg_backend_pid()
                 AND query NOT LIKE 'LISTEN %'"""
        )
    # The pool's connection last ran the read itself: no reset query on release.
    [query] = [r["query"] for r in last]
    assert "FROM integrations.connections WHERE uuid = $1" in query
    assert "RESET" not in query and "UNLISTEN" not in query


def test_counters_count_each_hit_miss_and_invalidation_once() -> None:
    cache = RowCache()
    assert (cache.capacity, cache.hits, cache.misses, cache.invalidations) == (10_000, 0, 0, 0)
    cache.listening(True)
    cache.fill(cache.ticket(), row("a"))
    cache.get("a")
    cache.get("b")
    cache.rows_changed(["a"])
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.invalidations) == (1, 1, 1)


def test_a_cache_of_one_row_is_allowed() -> None:
    cache = RowCache(capacity=1)
    cache.listening(True)
    cache.fill(cache.ticket(), row("a"))
    assert cache.get("a") is not None


def test_extras_are_kept_and_served_only_beside_the_very_row_held() -> None:
    cache = RowCache()
    cache.listening(True)
    held = row("a")
    cache.fill(cache.ticket(), held)
    equal = row("a")  # the same data, another read: not the row the value was built from
    cache.keep_extra(equal, "auth", "no")
    assert cache.extra(held, "auth") is None
    cache.keep_extra(held, "auth", "yes")
    assert cache.extra(held, "auth") == "yes"
    assert cache.extra(equal, "auth") is None
    assert cache.extra(held, "other") is None
    cache.rows_changed(["a"])
    assert cache.extra(held, "auth") is None


def test_cache_stats_are_immutable_and_slotted() -> None:
    stats = RowCache().stats
    assert not hasattr(stats, "__dict__")
    with pytest.raises(AttributeError):
        stats.hits = 5  # type: ignore[misc]


def test_each_lookup_is_reported_to_telemetry_as_a_hit_or_a_miss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reported: list[bool] = []
    monkeypatch.setattr(_cache.telemetry, "record_cache", reported.append)
    cache = RowCache()
    cache.listening(True)
    cache.fill(cache.ticket(), row("a"))
    assert cache.get("a") is not None
    assert cache.get("b") is None  # not held: its miss is the database read's ticket
    assert reported == [False, True]


def test_a_cached_repository_waits_for_locks_as_long_as_the_repository() -> None:
    cached = CachedRepository("integrations", channel="c", cache=RowCache())
    assert cached.lock_timeout == Repository("integrations", channel="c").lock_timeout == 30.0


async def test_reads_by_uuid_and_by_key_are_served_from_memory_unless_fresh(
    integ: Integrations, saved: str, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = integ._repo
    held = await repo.get(saved)
    assert held is not None
    assert await repo.get(saved) is held
    assert await repo.get_by_key(held.owner, held.key) is held
    # A write behind the cache's back whose notice never arrives: only a fresh read sees it.
    hold_notifications(integ, monkeypatch)
    await db.execute(
        "UPDATE integrations.connections SET value_json = value_json || '{\"note\": 5}' "
        "WHERE uuid = $1",
        uuid_mod.UUID(saved),
    )
    assert "note" not in (await integ.get_integration("openai:default"))
    assert (await integ.get_integration("openai:default", fresh=True))["note"] == 5


def test_a_peek_sees_a_held_row_only_while_the_cache_serves() -> None:
    cache = RowCache()
    repo = CachedRepository("integrations", channel="c", cache=cache)
    cache.listening(True)
    held = row("a")
    cache.fill(cache.ticket(), held)
    assert repo.peek("a") is held
    assert repo.peek("b") is None
    cache.proven(time.monotonic() - 0.001)  # the listener's proof ran out: the row stays
    assert cache.stats.size == 1 and repo.peek("a") is None


def test_nothing_is_served_from_the_instant_the_listeners_proof_runs_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = RowCache()
    cache.listening(True)
    cache.proven(100.0)
    with monkeypatch.context() as patch:
        patch.setattr(_cache.time, "monotonic", lambda: 99.999)
        assert cache.serving
        patch.setattr(_cache.time, "monotonic", lambda: 100.0)
        assert not cache.serving and cache.ticket() is None
