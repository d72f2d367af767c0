"""The durable event log: written with the change, read back by resuming subscriptions."""

from __future__ import annotations

import asyncio
import json
import random
from datetime import timedelta

import asyncpg
import pytest

from integrations import (
    ALL_OWNERS,
    Event,
    Integrations,
    InvalidArgument,
    StorageError,
    Subscription,
)

from .conftest import TEST_KEY

TIMEOUT = 10.0


async def next_event(sub: Subscription, within: float = TIMEOUT) -> Event:
    return await asyncio.wait_for(sub.get(), within)


async def logged(db: asyncpg.Connection) -> list[tuple[int, str, str | None, str]]:
    rows = await db.fetch("SELECT position, kind, uuid, owner FROM integrations.events")
    return sorted((r["position"], r["kind"], r["uuid"], r["owner"]) for r in rows)


async def test_an_event_is_logged_with_its_change_and_carries_its_position(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    async with integ.subscribe(owner=ALL_OWNERS) as live:
        added = await integ.add_connection("openai", "main")
        await integ.save_setup(added.uuid, {"api_key": "sk-logged-0123456789"})
        events = [await next_event(live) for _ in range(2)]
    rows = await logged(db)
    assert [(r[1], r[2]) for r in rows] == [
        ("connection_added", added.uuid),
        ("setup_saved", added.uuid),
    ]
    assert [e.position for e in events] == [r[0] for r in rows]
    assert rows[0][0] < rows[1][0]


async def test_a_change_that_rolls_back_logs_nothing(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    added = await integ.add_connection("openai", "main")
    before = await logged(db)
    await db.execute(
        "ALTER TABLE integrations.connections ADD CONSTRAINT no_trip "
        "CHECK (NOT value_json ? 'trip') NOT VALID"
    )
    with pytest.raises(StorageError) as info:
        await integ.save_setup(added.uuid, {"api_key": "sk-x-0123456789", "trip": 1})
    assert info.value.code == "storage", info.value
    assert await logged(db) == before


async def test_a_resuming_subscription_replays_then_goes_on_live_without_gap_or_repeat(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    first = await integ.add_connection("openai", "main")
    async with integ.subscribe(owner=ALL_OWNERS) as live:
        await integ.add_connection("openai", "second")
        cursor = (await next_event(live)).position
    assert cursor is not None

    # Writers keep going while the subscription starts, replays and turns live.
    stop = asyncio.Event()

    async def write(tag: str) -> None:
        i = 0
        while not stop.is_set():
            await integ.save_setup(first.uuid, {"api_key": f"sk-{tag}-{i:04d}-0123456789"})
            i += 1

    writers = [asyncio.create_task(write(t)) for t in "ab"]
    await asyncio.sleep(0.2)
    got: list[int] = []
    async with integ.subscribe(owner=ALL_OWNERS, after=cursor) as resumed:
        while len(got) < 60:
            event = await next_event(resumed)
            assert event.position is not None
            got.append(event.position)
        stop.set()
        await asyncio.gather(*writers)
        last = (await logged(db))[-1][0]
        while got[-1] < last:
            event = await next_event(resumed)
            assert event.position is not None
            got.append(event.position)
        assert resumed.position == last
    expected = [r[0] for r in await logged(db) if r[0] > cursor]
    assert got == expected


async def test_an_owner_handle_resumes_with_its_own_events_only(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    mine = integ.for_owner("user:1")
    theirs = integ.for_owner("user:2")
    await theirs.add_connection("openai", "main")
    await integ.add_connection("openai", "main")
    own = await mine.add_connection("openai", "main")
    await theirs.add_connection("slack", "main")
    await mine.save_setup(own.uuid, {"api_key": "sk-mine-0123456789"})
    async with mine.subscribe(after=0) as replay:
        events = [await next_event(replay) for _ in range(2)]
        await theirs.add_connection("slack", "other")
        systems_other = await integ.add_connection("slack", "other")
        await mine.add_connection("slack", "other")
        events.append(await next_event(replay))
        assert replay.pending == 0
    assert [(e.kind, e.owner) for e in events] == [
        ("connection_added", "user:1"),
        ("setup_saved", "user:1"),
        ("connection_added", "user:1"),
    ]
    # The system scope replays system connections only.
    async with integ.subscribe(after=0) as system:
        event = await next_event(system)
        assert event.owner is None
        # Then "slack:other", the system's own, and nothing else before a sentinel made now.
        other = await next_event(system)
        sentinel = await integ.add_connection("slack", "sentinel")
        assert [other.uuid, (await next_event(system)).uuid] == [systems_other.uuid, sentinel.uuid]


async def test_filters_apply_to_the_replay_as_to_live_events(integ: Integrations) -> None:
    a = await integ.add_connection("openai", "a")
    await integ.add_connection("slack", "b")
    await integ.save_setup(a.uuid, {"api_key": "sk-filter-0123456789"})
    async with integ.subscribe(provider="openai", kinds=["setup_saved"], after=0) as sub:
        event = await next_event(sub)
        assert (event.kind, event.uuid) == ("setup_saved", a.uuid)
        # Nothing else passed the filters: the next to arrive is a sentinel made now.
        await integ.save_setup(a.uuid, {"api_key": "sk-filter-sentinel-0123"})
        sentinel = await next_event(sub)
        assert (sentinel.kind, sentinel.uuid) == ("setup_saved", a.uuid)
        assert sentinel.position is not None and event.position is not None
        assert sentinel.position > event.position
    async with integ.subscribe(uuid=a.uuid, after=0) as sub:
        kinds = [(await next_event(sub)).kind for _ in range(2)]
    assert kinds == ["connection_added", "setup_saved"]


async def test_one_connections_events_are_read_through_their_index(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    a = await integ.add_connection("openai", "a")
    b = await integ.for_owner("user:1").add_connection("openai", "b")
    await integ.save_setup(a.uuid, {"api_key": "sk-index-0123456789"})
    body = await db.fetchval("SELECT body FROM integrations.events ORDER BY position LIMIT 1")
    # A large log of other connections' events, numbered directly (no commit trigger).
    async with db.transaction():
        await db.execute("SET LOCAL session_replication_role = replica")
        await db.execute(
            "INSERT INTO integrations.events (position, kind, uuid, owner, provider, body) "
            "SELECT 1000 + i, 'setup_saved', 'other-' || (i % 500), '', 'openai', $1 "
            "FROM generate_series(1, 50000) AS i",
            body,
        )
    await db.execute("ANALYZE integrations.events")
    # Prepared statements settle on a generic plan: it must use the index all the same.
    await db.execute("SET plan_cache_mode = force_generic_plan")
    await db.execute(
        "PREPARE one_uuid (text, int8, bool, text, text, text[], int) AS "
        + integ._repo.q.events_after_uuid
    )
    rows = await db.fetch(
        "EXPLAIN (FORMAT JSON) EXECUTE one_uuid('x', 0, true, '', NULL, NULL, 500)"
    )
    found = json.dumps(json.loads(rows[0][0]))
    assert "events_uuid_position" in found
    assert "Seq Scan" not in found and '"Sort"' not in found
    events, _ = await integ._repo.events_after(
        0, owner=None, any_owner=True, provider=None, uuid=a.uuid, kinds=None, limit=500
    )
    assert [(e.kind, e.uuid) for e in events] == [
        ("connection_added", a.uuid),
        ("setup_saved", a.uuid),
    ]
    # An owner's reading sees its own connection's events, not another owner's.
    mine, _ = await integ._repo.events_after(
        0, owner="user:1", any_owner=False, provider=None, uuid=b.uuid, kinds=None, limit=500
    )
    theirs, _ = await integ._repo.events_after(
        0, owner="user:1", any_owner=False, provider=None, uuid=a.uuid, kinds=None, limit=500
    )
    assert [(e.kind, e.uuid) for e in mine] == [("connection_added", b.uuid)]
    assert theirs == []


async def test_pending_counts_replayed_and_live_events_not_read_yet(integ: Integrations) -> None:
    for name in ("a", "b", "c", "d"):
        await integ.add_connection("openai", name)
    async with integ.subscribe(owner=ALL_OWNERS, after=0) as sub:
        await next_event(sub)  # one page of four read from the log, one handed out
        assert sub.pending == 3
        await integ.add_connection("openai", "e")  # live, queued behind the replay
        for _ in range(int(TIMEOUT / 0.01)):
            if sub.pending != 3:
                break
            await asyncio.sleep(0.01)
        assert sub.pending == 4


async def test_a_full_queue_is_read_again_from_the_log_not_dropped(integ: Integrations) -> None:
    added = await integ.add_connection("openai", "main")
    async with integ.subscribe(owner=ALL_OWNERS, after=0, maxsize=2) as sub:
        assert (await next_event(sub)).uuid == added.uuid
        received = integ.event_stats.received
        for i in range(12):
            await integ.save_setup(added.uuid, {"api_key": f"sk-burst-{i:02d}-0123456789"})
        # All twelve reach the listener before one is read: the queue of two overflows.
        for _ in range(1000):
            if integ.event_stats.received >= received + 12:
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the burst's notifications did not arrive")
        events = [await next_event(sub) for _ in range(12)]
        assert sub.dropped == 0
    positions = [e.position for e in events]
    assert positions == sorted(positions) and len(set(positions)) == 12
    assert all(e.kind == "setup_saved" for e in events)


async def test_a_lost_listener_is_caught_up_from_the_log_without_a_resync(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    added = await integ.add_connection("openai", "main")
    async with integ.subscribe(owner=ALL_OWNERS, after=0) as sub:
        assert (await next_event(sub)).kind == "connection_added"
        await db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN %'"
        )
        for i in range(5):
            await integ.save_setup(added.uuid, {"api_key": f"sk-lost-{i}-0123456789"})
        events = [await next_event(sub) for _ in range(5)]
    assert [e.kind for e in events] == ["setup_saved"] * 5
    assert integ.event_stats.reconnects >= 1


async def test_a_live_event_after_one_whose_notification_was_lost_brings_the_lost_one_first(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    added = await integ.add_connection("openai", "main")
    async with integ.subscribe(owner=ALL_OWNERS, after=0) as sub:
        first = await next_event(sub)
        assert first.kind == "connection_added"
        # The same event logged once more, numbered but never notified (as when its NOTIFY
        # is lost): the subscription can learn of it only from the log.
        async with db.transaction():
            await db.execute("SET LOCAL session_replication_role = replica")
            lost = await db.fetchval(
                "INSERT INTO integrations.events (position, kind, uuid, owner, provider, body) "
                "SELECT nextval('integrations.events_position'), kind, uuid, owner, provider, "
                "body FROM integrations.events WHERE position = $1 RETURNING position",
                first.position,
            )
        await integ.save_setup(added.uuid, {"api_key": "sk-after-the-hole-0123456789"})
        events = [await next_event(sub) for _ in range(2)]
    assert [(e.position, e.kind) for e in events] == [
        (lost, "connection_added"),
        (lost + 1, "setup_saved"),
    ]


async def test_positions_follow_commit_order_not_the_order_of_the_writes(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    added = await integ.add_connection("openai", "main")
    held = db.transaction()
    await held.start()
    await db.execute(
        "INSERT INTO integrations.events (kind, owner, body) VALUES ('validated', '', "
        """'{"kind":"validated","uuid":null,"at":"2024-01-01T00:00:00+00:00"}')"""
    )
    # Written after the held one, committed before it: numbered first.
    await integ.save_setup(added.uuid, {"api_key": "sk-order-0123456789"})
    await held.commit()
    rows = await logged(db)
    assert [r[1] for r in rows[-2:]] == ["setup_saved", "validated"]


async def test_a_commit_waits_while_an_earlier_one_holds_the_numbering_lock(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    added = await integ.add_connection("openai", "main")
    held = db.transaction()
    await held.start()
    await db.execute(
        "INSERT INTO integrations.events (kind, owner, body) VALUES ('validated', '', "
        """'{"kind":"validated","uuid":null,"at":"2024-01-01T00:00:00+00:00"}')"""
    )
    # Numbered now rather than at commit: the lock is held until this transaction ends.
    await db.execute("SET CONSTRAINTS integrations.events_number IMMEDIATE")
    early = await db.fetchval("SELECT max(position) FROM integrations.events")
    saving = asyncio.create_task(integ.save_setup(added.uuid, {"api_key": "sk-wait-0123456789"}))
    # The save's commit is seen waiting for the lock this transaction holds.
    me = await db.fetchval("SELECT pg_backend_pid()")
    blocked = "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
    for _ in range(1000):
        if await db.fetchval(blocked, me):
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the save never waited for the held lock")
    # The later commit cannot draw a position while the earlier one is not visible, so a
    # reader that sees the later position sees the earlier one too.
    assert not saving.done()
    await held.commit()
    await asyncio.wait_for(saving, TIMEOUT)
    rows = await logged(db)
    assert rows[-2][0] == early
    assert rows[-1][1] == "setup_saved" and rows[-1][0] > early


async def test_a_cursor_that_fell_out_of_retention_gets_an_expired_resync(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    added = await integ.add_connection("openai", "main")
    for i in range(4):
        await integ.save_setup(added.uuid, {"api_key": f"sk-old-{i}-0123456789"})
    rows = await logged(db)
    assert await integ.prune_events(max_age=None, max_count=2) == 3
    kept = [r[0] for r in await logged(db)]
    assert kept == [r[0] for r in rows[-2:]]
    async with integ.subscribe(owner=ALL_OWNERS, after=rows[0][0]) as sub:
        signal = await next_event(sub)
        assert signal.kind == "resync"
        assert signal.detail["reason"] == "expired"
        assert signal.detail["oldest"] == rows[2][0] + 1
        after = [await next_event(sub) for _ in range(2)]
    assert [e.position for e in after] == kept
    # A cursor at or past the pruned ones is not expired.
    async with integ.subscribe(owner=ALL_OWNERS, after=rows[2][0]) as sub:
        assert (await next_event(sub)).position == kept[0]


async def test_pruning_by_age_keeps_what_is_younger(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    added = await integ.add_connection("openai", "main")
    await integ.save_setup(added.uuid, {"api_key": "sk-age-0123456789"})
    await db.execute(
        "UPDATE integrations.events SET logged_at = now() - interval '8 days' "
        "WHERE kind = 'connection_added'"
    )
    assert await integ.prune_events() == 1
    assert await integ.prune_events(max_age=timedelta(days=7)) == 0
    assert [r[1] for r in await logged(db)] == ["setup_saved"]
    assert await integ.prune_events(max_age=0) == 1
    assert await logged(db) == []


@pytest.mark.parametrize("after", [-1, "3", 1.5, True])
async def test_a_bad_after_is_refused_before_subscribing(
    integ: Integrations, after: object
) -> None:
    with pytest.raises(InvalidArgument) as info:
        integ.subscribe(after=after)  # type: ignore[arg-type]
    assert info.value.context["field"] == "after"


async def test_the_largest_position_is_a_cursor_to_resume_from(integ: Integrations) -> None:
    # Positions are PostgreSQL bigints: the largest one is accepted, one more is not.
    async with integ.subscribe(owner=ALL_OWNERS, after=2**63 - 1) as sub:
        assert sub.position == 2**63 - 1
    with pytest.raises(InvalidArgument):
        integ.subscribe(owner=ALL_OWNERS, after=2**63)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_age": -1}, "max_age"),
        ({"max_count": -2}, "max_count"),
        ({"max_age": "7d"}, "max_age"),
    ],
)
async def test_bad_retention_options_are_refused(
    integ: Integrations, db: asyncpg.Connection, options: dict[str, object], field: str
) -> None:
    await integ.add_connection("openai", "main")
    with pytest.raises(InvalidArgument) as info:
        await integ.prune_events(**options)  # type: ignore[arg-type]
    assert info.value.context["field"] == field
    assert len(await logged(db)) == 1


async def test_a_resuming_subscriber_in_another_instance_sees_every_write_in_order(
    fresh_db: str, integ: Integrations, db: asyncpg.Connection
) -> None:
    uuids = [(await integ.add_connection("openai", f"c{i}")).uuid for i in range(4)]
    start = (await logged(db))[-1][0]
    async with Integrations(fresh_db, keys=TEST_KEY) as reader:

        async def write(uuid: str) -> None:
            for i in range(15):
                await integ.save_setup(uuid, {"api_key": f"sk-{i:03d}-{uuid[-6:]}-0123456789"})
                await asyncio.sleep(random.random() * 0.01)

        async with reader.subscribe(owner=ALL_OWNERS, after=start) as sub:
            await asyncio.gather(*(write(u) for u in uuids))
            events = [await next_event(sub) for _ in range(60)]
    per_connection: dict[str, list[str]] = {}
    for event in events:
        assert event.uuid is not None
        per_connection.setdefault(event.uuid, []).append(event.detail.get("fields", ""))
    assert sorted(per_connection) == sorted(uuids)
    positions = [e.position for e in events]
    assert positions == [r[0] for r in await logged(db) if r[0] > start]
