"""Database faults (cuts, terminated sessions, held locks): typed errors, no acknowledged loss."""

from __future__ import annotations

import asyncio
import os
import random
import uuid as uuid_mod
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from integrations import (
    Integrations,
    IntegrationsError,
    LockTimeout,
    StorageError,
)
from integrations._repository import _translate, describe

from .conftest import TEST_KEY
from .faultproxy import FaultProxy

WRITERS = 20
# More rounds for a longer soak: INTEGRATIONS_FAULT_ROUNDS=50 pytest tests/test_faults.py -s
ROUNDS = int(os.environ.get("INTEGRATIONS_FAULT_ROUNDS", "5"))
CUTS_PER_ROUND = 2
TIMEOUT = 10.0


@pytest.fixture
async def proxy(admin_dsn: str) -> AsyncIterator[FaultProxy]:
    """A proxy in front of the test server."""
    server = urlsplit(admin_dsn)
    async with FaultProxy(server.hostname or "127.0.0.1", server.port or 5432) as started:
        yield started


@pytest.fixture
async def faulty(fresh_db: str, proxy: FaultProxy) -> AsyncIterator[Integrations]:
    """An instance whose every database connection goes through the proxy."""
    async with Integrations(proxy.dsn(fresh_db), keys=TEST_KEY) as instance:
        yield instance


@pytest.fixture
async def direct(fresh_db: str) -> AsyncIterator[Integrations]:
    """An instance straight on the database, for reading back what was written."""
    async with Integrations(fresh_db, keys=TEST_KEY) as instance:
        yield instance


# -- a writing workload and its ledger -----------------------------------------------------


@dataclass
class Tracked:
    """One connection a writer owns: every value it tried to write, in order, acked or not."""

    uuid: str
    saves: list[tuple[str, bool]] = field(default_factory=list)
    names: list[tuple[str, bool]] = field(default_factory=list)


@dataclass
class Ledger:
    acknowledged: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    outside: list[BaseException] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    tracked: list[Tracked] = field(default_factory=list)

    def failed(self, exc: Exception) -> None:
        if isinstance(exc, IntegrationsError):
            cause = type(exc.__cause__).__name__ if exc.__cause__ is not None else "-"
            self.failures[f"{type(exc).__name__} <- {cause}"] += 1
        else:
            self.outside.append(exc)


async def writer(integ: Integrations, tag: str, ledger: Ledger, stop: asyncio.Event) -> None:
    """add_connection, save_setup and rename_connection in turn, each recorded; ``tag``
    makes the names this writer uses its own."""
    current: Tracked | None = None
    step = 0
    while not stop.is_set():
        step += 1
        try:
            if current is None or step % 3 == 0:
                name = f"{tag}-a{step}"
                added = await integ.add_connection("openai", name)
                ledger.acknowledged += 1
                ledger.added.append(added.uuid)
                current = Tracked(added.uuid, names=[(name, True)])
                ledger.tracked.append(current)
            elif step % 3 == 1:
                key = f"sk-{tag}-s{step}"
                current.saves.append((key, False))
                await integ.save_setup(current.uuid, {"api_key": key})
                current.saves[-1] = (key, True)
                ledger.acknowledged += 1
            else:
                name = f"{tag}-r{step}"
                current.names.append((name, False))
                await integ.rename_connection(current.uuid, name)
                current.names[-1] = (name, True)
                ledger.acknowledged += 1
        except Exception as exc:
            ledger.failed(exc)
            # While the database is unreachable, don't spin.
            await asyncio.sleep(0.005)


def lost_of(history: list[tuple[str, bool]], stored: str | None) -> int:
    """Acknowledged writes whose value is gone: neither it nor a later attempt is stored."""
    values = [value for value, _acked in history]
    return sum(1 for i, (_value, acked) in enumerate(history) if acked and stored not in values[i:])


async def lost_writes(ledger: Ledger, db: asyncpg.Connection, direct: Integrations) -> int:
    """Reads everything back straight from the database (not through the proxy)."""
    rows = {
        str(r["uuid"]): r["key"]
        for r in await db.fetch(
            "SELECT uuid, key FROM integrations.connections WHERE uuid = ANY($1::uuid[])",
            [uuid_mod.UUID(u) for u in ledger.added],
        )
    }
    lost = sum(1 for uuid in ledger.added if uuid not in rows)
    for tracked in ledger.tracked:
        if tracked.uuid not in rows:
            continue
        lost += lost_of(tracked.names, rows[tracked.uuid].rpartition(":")[2])
        if tracked.saves:
            stored = (await direct.get_integration(tracked.uuid)).get("api_key")
            lost += lost_of(tracked.saves, stored)
    return lost


async def run_round(
    integ: Integrations, fault: Callable[[], Awaitable[None]], *, faults: int
) -> Ledger:
    """WRITERS writers, ``faults`` faults injected while they run, then a quiet spell."""
    ledger = Ledger()
    stop = asyncio.Event()
    run = uuid_mod.uuid4().hex[:6]
    tasks = [
        asyncio.create_task(writer(integ, f"w{i}-{run}", ledger, stop)) for i in range(WRITERS)
    ]
    try:
        for _ in range(faults):
            await asyncio.sleep(random.uniform(0.1, 0.4))
            await fault()
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return ledger


async def still_works(integ: Integrations) -> None:
    """The instance serves a write and a read again, first time, without being reopened."""
    name = f"after-{uuid_mod.uuid4().hex[:8]}"
    added = await integ.add_connection("openai", name)
    await integ.save_setup(added.uuid, {"api_key": "sk-after-0123456789"})
    assert (await integ.get_integration(added.uuid))["api_key"] == "sk-after-0123456789"
    assert name in [c.name for c in await integ.list_connections("openai")]


def report(title: str, **figures: object) -> None:
    print(f"\n[{title}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# -- cuts during writes ----------------------------------------------------------------------


async def test_cuts_during_twenty_concurrent_writers_lose_no_acknowledged_write(
    faulty: Integrations, proxy: FaultProxy, db: asyncpg.Connection, direct: Integrations
) -> None:
    async def cut() -> None:
        proxy.cut()
        await asyncio.sleep(random.uniform(0.02, 0.15))
        proxy.restore()

    acknowledged = lost = 0
    failures: Counter[str] = Counter()
    for _ in range(ROUNDS):
        ledger = await run_round(faulty, cut, faults=CUTS_PER_ROUND)
        assert ledger.outside == [], [repr(e) for e in ledger.outside]
        acknowledged += ledger.acknowledged
        failures += ledger.failures
        lost += await lost_writes(ledger, db, direct)
        await still_works(faulty)
    report(
        "proxy cuts",
        cuts=proxy.cuts,
        acknowledged=acknowledged,
        lost=lost,
        failed=sum(failures.values()),
        outside=0,
        kinds=dict(failures),
    )
    assert proxy.cuts == ROUNDS * CUTS_PER_ROUND
    assert acknowledged > 0
    # The cuts hit writes in flight: otherwise this test proves nothing.
    assert sum(failures.values()) > 0
    assert lost == 0
    assert all(kind.startswith("StorageError") for kind in failures), failures


async def test_terminated_sessions_mid_transaction_raise_storage_errors_only(
    fresh_db: str, admin_dsn: str, db: asyncpg.Connection, direct: Integrations
) -> None:
    # What a server restart or failover does to each session: a FATAL message, then
    # the socket closes, at whatever point the session was. The driver then tends to
    # fail the connection's next step with InternalClientError ("cannot switch to
    # state ...") rather than a connection error.
    admin = await asyncpg.connect(admin_dsn)

    async def terminate() -> None:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'integrations-under-fault'"
        )

    acknowledged = lost = 0
    failures: Counter[str] = Counter()
    # Only this instance's sessions are terminated (asyncpg passes the query
    # parameter on as a server setting), not the ones that read back.
    dsn = f"{fresh_db}?application_name=integrations-under-fault"
    try:
        async with Integrations(dsn, keys=TEST_KEY) as integ:
            for _ in range(ROUNDS):
                ledger = await run_round(integ, terminate, faults=CUTS_PER_ROUND)
                assert ledger.outside == [], [repr(e) for e in ledger.outside]
                acknowledged += ledger.acknowledged
                failures += ledger.failures
                lost += await lost_writes(ledger, db, direct)
                await still_works(integ)
    finally:
        await admin.close()
    report(
        "terminated sessions",
        terminations=ROUNDS * CUTS_PER_ROUND,
        acknowledged=acknowledged,
        lost=lost,
        failed=sum(failures.values()),
        outside=0,
        kinds=dict(failures),
    )
    assert acknowledged > 0
    assert sum(failures.values()) > 0
    assert lost == 0
    assert all(kind.startswith("StorageError") for kind in failures), failures


# -- cuts while idle, and the event listener ---------------------------------------------------


async def test_a_cut_while_idle_fails_calls_with_storage_errors_then_they_work_again(
    faulty: Integrations, proxy: FaultProxy
) -> None:
    conn = await faulty.add_connection("openai", "default")
    proxy.cut()
    with pytest.raises(StorageError) as caught:
        await faulty.save_setup(conn.uuid, {"api_key": "sk-during-0123456789"})
    cause = caught.value.__cause__
    assert cause is not None
    # The cause's own words, not just its type.
    assert caught.value.message == describe(cause)
    assert type(cause).__name__ in caught.value.message
    proxy.restore()
    await faulty.save_setup(conn.uuid, {"api_key": "sk-after-0123456789"})
    assert (await faulty.get_integration(conn.uuid))["api_key"] == "sk-after-0123456789"
    await still_works(faulty)


async def test_a_cut_while_idle_and_restored_goes_unnoticed(
    faulty: Integrations, proxy: FaultProxy
) -> None:
    conn = await faulty.add_connection("openai", "default")
    links = proxy.open_links
    assert links >= 1
    proxy.cut()
    await asyncio.sleep(0.1)
    proxy.restore()
    # The pool saw its connections close and opens new ones: no call fails.
    for attempt in range(5):
        await faulty.save_setup(conn.uuid, {"api_key": f"sk-idle-{attempt}-0123456789"})
    assert (await faulty.get_integration(conn.uuid))["api_key"] == "sk-idle-4-0123456789"
    assert proxy.accepted > links


async def test_a_call_cancelled_on_a_stalled_network_returns_at_once(
    faulty: Integrations, proxy: FaultProxy
) -> None:
    conn = await faulty.add_connection("openai", "default")
    proxy.pause()
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                faulty.save_setup(conn.uuid, {"api_key": "sk-stalled-0123456789"}), 0.3
            )
        # Not held up by cancelling the statement over the stalled network.
        assert asyncio.get_running_loop().time() - started < 2.0
    finally:
        proxy.resume()
    await faulty.save_setup(conn.uuid, {"api_key": "sk-resumed-0123456789"})
    assert (await faulty.get_integration(conn.uuid))["api_key"] == "sk-resumed-0123456789"


async def test_a_subscription_gets_resync_after_a_cut_and_events_after_it(
    faulty: Integrations, proxy: FaultProxy, direct: Integrations
) -> None:
    async with faulty.subscribe() as sub:
        assert faulty.event_stats.listening
        proxy.cut()
        await asyncio.sleep(0.3)
        proxy.restore()
        resync = await asyncio.wait_for(sub.get(), TIMEOUT)
        assert resync.kind == "resync"
        assert faulty.event_stats.reconnects == 1
        added = await direct.add_connection("openai", "after-cut")
        event = await asyncio.wait_for(sub.get(), TIMEOUT)
        assert (event.kind, event.uuid) == ("connection_added", added.uuid)


# -- lock timeouts ---------------------------------------------------------------------------------


@pytest.fixture
async def impatient(fresh_db: str) -> AsyncIterator[Integrations]:
    async with Integrations(fresh_db, keys=TEST_KEY, lock_timeout=0.3) as instance:
        yield instance


async def test_a_write_waits_no_longer_than_the_lock_timeout(
    impatient: Integrations, db: asyncpg.Connection
) -> None:
    conn = await impatient.add_connection("openai", "default")
    await impatient.save_setup(conn.uuid, {"api_key": "sk-before-0123456789"})
    holder = db.transaction()
    await holder.start()
    await db.execute(
        "SELECT 1 FROM integrations.connections WHERE uuid = $1 FOR UPDATE",
        uuid_mod.UUID(conn.uuid),
    )
    writes: list[Callable[[], Awaitable[Any]]] = [
        lambda: impatient.save_setup(conn.uuid, {"api_key": "sk-held-0123456789"}),
        lambda: impatient.rename_connection(conn.uuid, "renamed"),
        lambda: impatient.disconnect(conn.uuid),
        lambda: impatient.remove_connection(conn.uuid),
    ]
    try:
        for write in writes:
            started = asyncio.get_running_loop().time()
            with pytest.raises(LockTimeout) as caught:
                await write()
            waited = asyncio.get_running_loop().time() - started
            assert caught.value.code == "lock_timeout"
            assert "0.3s" in caught.value.message
            assert 0.25 <= waited < 3.0
    finally:
        await holder.rollback()
    # Nothing was written meanwhile, and the lock released, writes go through.
    assert (await impatient.get_integration(conn.uuid))["api_key"] == "sk-before-0123456789"
    await impatient.rename_connection(conn.uuid, "renamed")
    assert (await impatient.get_integration_by_uuid(conn.uuid)).name == "renamed"


async def test_adding_behind_an_uncommitted_add_of_the_same_name_times_out(
    impatient: Integrations, db: asyncpg.Connection
) -> None:
    holder = db.transaction()
    await holder.start()
    await db.execute(
        """INSERT INTO integrations.connections (uuid, owner, key, value_json)
           VALUES ($1, '', 'integration:openai:default', '{}'::jsonb)""",
        uuid_mod.uuid4(),
    )
    try:
        with pytest.raises(LockTimeout):
            await impatient.add_connection("openai", "default")
    finally:
        await holder.rollback()
    added = await impatient.add_connection("openai", "default")
    assert added.name == "default"


def test_lock_timeout_must_be_a_positive_number() -> None:
    from integrations import ConfigurationError

    for bad in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(ConfigurationError) as info:
            Integrations("postgresql://127.0.0.1/x", lock_timeout=bad)
        assert info.value.code == "configuration", info.value


# -- faults around the pool: acquire and release -----------------------------------------------


class FaultyPool:
    """A real pool whose acquire or release fails on demand, as asyncpg's do mid-restart."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.fail_acquire = False
        self.fail_release = False

    async def acquire(self) -> Any:
        if self.fail_acquire:
            raise asyncpg.exceptions.InternalClientError(
                "cannot switch to state 12; another operation (2) is in progress"
            )
        return await self._pool.acquire()

    async def release(self, conn: Any) -> None:
        await self._pool.release(conn)
        if self.fail_release:
            raise asyncpg.exceptions.InternalClientError(
                "cannot switch to state 15; another operation (2) is in progress"
            )


@pytest.fixture
async def faulty_pool(fresh_db: str) -> AsyncIterator[FaultyPool]:
    pool = await asyncpg.create_pool(fresh_db, min_size=1, max_size=4)
    try:
        yield FaultyPool(pool)
    finally:
        await pool.close()


async def test_a_failed_acquire_is_a_storage_error_quoting_the_driver(
    faulty_pool: FaultyPool,
) -> None:
    async with Integrations(pool=faulty_pool, keys=TEST_KEY) as integ:
        faulty_pool.fail_acquire = True
        with pytest.raises(StorageError) as caught:
            await integ.add_connection("openai", "default")
        assert "InternalClientError" in caught.value.message
        assert "cannot switch to state 12" in caught.value.message
        assert isinstance(caught.value.__cause__, asyncpg.exceptions.InternalClientError)
        faulty_pool.fail_acquire = False
        await still_works(integ)


async def test_a_release_failing_after_a_commit_does_not_fail_the_write(
    faulty_pool: FaultyPool, db: asyncpg.Connection
) -> None:
    async with Integrations(pool=faulty_pool, keys=TEST_KEY) as integ:
        faulty_pool.fail_release = True
        added = await integ.add_connection("openai", "default")
        await integ.save_setup(added.uuid, {"api_key": "sk-released-0123456789"})
        assert (await integ.get_integration_by_uuid(added.uuid)).name == "default"
        faulty_pool.fail_release = False
    assert await db.fetchval("SELECT count(*) FROM integrations.connections") == 1


async def test_a_release_failing_after_a_failed_body_reports_the_body_error(
    faulty_pool: FaultyPool,
) -> None:
    from integrations import NotConfigured

    async with Integrations(pool=faulty_pool, keys=TEST_KEY) as integ:
        faulty_pool.fail_release = True
        with pytest.raises(NotConfigured):
            await integ.rename_connection(str(uuid_mod.uuid4()), "x")
        faulty_pool.fail_release = False


# -- translation and message text, without a database -------------------------------------------


@pytest.mark.parametrize(
    "raised",
    [
        asyncpg.exceptions.InternalClientError("cannot switch to state 15; protocol failed"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle"),
        ConnectionResetError(104, "Connection reset by peer"),
        OSError(111, "Connect call failed"),
        TimeoutError(),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to admin command"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_every_driver_fault_becomes_a_storage_error_with_its_text(raised: Exception) -> None:
    with pytest.raises(StorageError) as caught, _translate():
        raise raised
    assert caught.value.__cause__ is raised
    assert caught.value.code == "storage"
    assert type(raised).__name__ in caught.value.message
    if str(raised):
        assert (raised.args[0] if not isinstance(raised, OSError) else str(raised)) in (
            caught.value.message
        )


def test_lock_not_available_becomes_lock_timeout() -> None:
    with pytest.raises(LockTimeout) as caught, _translate(1.5):
        raise asyncpg.exceptions.LockNotAvailableError("canceling statement due to lock timeout")
    assert caught.value.code == "lock_timeout"
    assert "1.5s" in caught.value.message


def test_library_errors_and_bugs_outside_the_driver_pass_through() -> None:
    with pytest.raises(LockTimeout), _translate():
        raise LockTimeout()
    with pytest.raises(KeyError, match="a bug of ours stays a bug"), _translate():
        raise KeyError("a bug of ours stays a bug")


async def test_an_error_raised_inside_driver_code_is_the_drivers() -> None:
    # A plain Python error out of the driver's own code (a protocol state it did not
    # expect, say) is still a storage fault.
    with pytest.raises(StorageError) as caught, _translate():
        asyncpg.create_pool("postgresql://127.0.0.1/x", min_size=-1)
    assert isinstance(caught.value.__cause__, ValueError)
    assert "min_size" in caught.value.message


async def test_a_frozen_listener_link_stops_the_cache_within_two_heartbeats(
    fresh_db: str, proxy: FaultProxy, direct: Integrations
) -> None:
    """The LISTEN connection goes through a proxy that stops forwarding and never closes:
    no close arrives, yet with the default heartbeat (1 s) the cache stops serving within
    2 s (its last probe heard was sent before the freeze), and a write made meanwhile is
    read back; after the reconnect the cache serves again."""
    conn = await direct.add_connection("openai", "default")
    await direct.save_setup(conn.uuid, {"api_key": "sk-before-0123456789"})
    async with Integrations(fresh_db, keys=TEST_KEY, listen_dsn=proxy.dsn(fresh_db)) as reader:
        # open() waited for the listener's first probe: the cache serves from the start.
        assert reader.cache_stats.serving is True
        assert (await reader.get_credentials(conn.uuid))["api_key"] == "sk-before-0123456789"
        assert (await reader.get_credentials(conn.uuid))["api_key"] == "sk-before-0123456789"
        assert reader.cache_stats.hits >= 1
        proxy.pause()
        await direct.save_setup(conn.uuid, {"api_key": "sk-after-0123456789"})
        # By construction, not by luck: serving ends two heartbeats after the last probe
        # heard was sent, and that was before the freeze.
        await asyncio.sleep(2.0)
        assert reader.cache_stats.serving is False
        assert (await reader.get_credentials(conn.uuid))["api_key"] == "sk-after-0123456789"
        proxy.cut()  # what was held is dropped; new connections go through again
        proxy.restore()
        proxy.resume()
        deadline = asyncio.get_running_loop().time() + 10
        while not reader.cache_stats.serving:
            assert asyncio.get_running_loop().time() < deadline, "the listener never came back"
            await asyncio.sleep(0.05)
        assert reader.event_stats.reconnects >= 1


# -- every transaction bounded ----------------------------------------------------------------


async def test_a_writer_frozen_mid_transaction_frees_its_row_locks_within_the_idle_limit(
    impatient: Integrations, fresh_db: str, db: asyncpg.Connection
) -> None:
    """A write transaction left idle (its process frozen between statements) is ended by
    the server after min(lock_timeout, 5 s): the row lock goes with it."""
    conn = await impatient.add_connection("openai", "frozen-writer")
    async with Integrations(fresh_db, keys=TEST_KEY, lock_timeout=1.0) as frozen:
        repo = frozen._s.core.repo
        assert repo.idle_timeout == 1.0
        with pytest.raises(StorageError) as info:
            async with repo._write() as held:
                await held.execute(
                    "SELECT 1 FROM integrations.connections WHERE uuid = $1 FOR UPDATE",
                    uuid_mod.UUID(conn.uuid),
                )
                started = asyncio.get_running_loop().time()
                # Frozen while holding the lock: idle in transaction.
                await asyncio.sleep(2.5)
                await held.execute("SELECT 1")
        assert info.value.code == "storage", info.value
        # The server had ended it well before the freeze was over.
        ended = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
            "AND datname = current_database()"
        )
        assert ended == 0
    # Meanwhile others were not held up past the idle limit plus their own lock timeout.
    await impatient.save_setup(conn.uuid, {"api_key": "sk-after-freeze-0123456789"})
    assert asyncio.get_running_loop().time() - started < 10


async def test_a_call_over_a_frozen_link_fails_typed_within_its_client_side_deadline(
    fresh_db: str, proxy: FaultProxy
) -> None:
    async with Integrations(proxy.dsn(fresh_db), keys=TEST_KEY, lock_timeout=0.5) as integ:
        repo = integ._s.core.repo
        assert repo.command_timeout == 0.5 + 10.0
        conn = await integ.add_connection("openai", "frozen-link")
        proxy.pause()
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(StorageError) as info:
                await integ.save_setup(conn.uuid, {"api_key": "sk-frozen-link-0123456789"})
            assert info.value.code == "storage", info.value
            waited = asyncio.get_running_loop().time() - started
            assert waited < repo.command_timeout + 3
        finally:
            proxy.resume()
        await integ.save_setup(conn.uuid, {"api_key": "sk-link-back-0123456789"})
        assert (await integ.get_integration(conn.uuid))["api_key"] == "sk-link-back-0123456789"
