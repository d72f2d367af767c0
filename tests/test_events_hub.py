"""Event hub: delivery, filters, back-pressure and self-healing over real LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from uuid import uuid4

import asyncpg
import pytest

from integrations._errors import (
    ConfigurationError,
    InvalidArgument,
    LifecycleError,
    StorageError,
)
from integrations._events import ALL_OWNERS, REPLAY_PAGE, EventHub, HubStats, Subscription
from integrations._models import EVENT_KINDS, Event
from integrations._settings import MAXIMUM

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0


class PgListener:
    """A dedicated asyncpg connection LISTENing on one channel."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.pid: int = conn.get_server_pid()

    async def close(self) -> None:
        await self.conn.close()


class PgListen:
    """The ListenFn the repository provides, plus hooks to watch and break it."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.calls = 0
        self.fail_next = 0
        self.listeners: list[PgListener] = []

    async def __call__(
        self, channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> PgListener:
        self.calls += 1
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("connection refused")
        conn = await asyncpg.connect(self.dsn)

        def payload_cb(_conn: Any, _pid: int, _channel: str, payload: object) -> None:
            on_payload(cast(str, payload))

        def lost_cb(_conn: Any) -> None:
            on_lost()

        conn.add_termination_listener(lost_cb)
        await conn.add_listener(channel, payload_cb)
        listener = PgListener(conn)
        self.listeners.append(listener)
        return listener


class FakeListener:
    def __init__(self, on_payload: Callable[[str], None], on_lost: Callable[[], None]) -> None:
        self.on_payload = on_payload
        self.on_lost = on_lost
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        # asyncpg calls termination listeners on a deliberate close too.
        self.on_lost()


class FakeListen:
    """A ListenFn with no database, for the hub's own state machine."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_next = 0
        self.listeners: list[FakeListener] = []
        self.gate: asyncio.Event | None = None
        self.lose_on_open = 0

    async def __call__(
        self, channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> FakeListener:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("connection refused")
        listener = FakeListener(on_payload, on_lost)
        self.listeners.append(listener)
        if self.lose_on_open:
            self.lose_on_open -= 1
            on_lost()
        return listener


def event(kind: str = "connected", **fields: Any) -> Event:
    values: dict[str, Any] = {"uuid": str(uuid4()), "provider": "github", "owner": None}
    values.update(fields)
    return Event(kind=kind, **values)


async def notify(conn: asyncpg.Connection, channel: str, payload: Event | str) -> None:
    text = payload.to_payload() if isinstance(payload, Event) else payload
    await conn.execute("SELECT pg_notify($1, $2)", channel, text)


async def next_event(sub: Subscription, within: float = TIMEOUT) -> Event:
    return await asyncio.wait_for(sub.get(), within)


async def until_resync(sub: Subscription) -> list[Event]:
    """Everything before the next resync, which passes every filter and so marks the end."""
    seen = []
    while (ev := await next_event(sub)).kind != "resync":
        seen.append(ev)
    return seen


async def eventually(predicate: Callable[[], bool], within: float = TIMEOUT) -> None:
    async with asyncio.timeout(within):
        # Polling: the states checked here (listening, counters) have no event to await.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.fixture
def channel() -> str:
    return f"integrations_test_{uuid4().hex}"


@pytest.fixture
async def pg(admin_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(admin_dsn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def listen(admin_dsn: str) -> PgListen:
    return PgListen(admin_dsn)


@pytest.fixture
async def hub(listen: PgListen, channel: str) -> AsyncIterator[EventHub]:
    hub = EventHub(listen, channel, reconnect_initial=0.01, reconnect_max=0.2)
    try:
        yield hub
    finally:
        await hub.close()


# Delivery


async def test_notification_is_delivered_as_an_equal_event(
    hub: EventHub, pg: asyncpg.Connection, channel: str
) -> None:
    sent = event("token_refreshed", name="work", status="connected", actor="worker-1")
    async with hub.subscribe() as sub:
        await notify(pg, channel, sent)
        assert await next_event(sub) == sent


async def test_first_subscription_opens_the_one_listener_lazily(
    hub: EventHub, listen: PgListen
) -> None:
    assert not hub.listening
    assert listen.calls == 0
    async with hub.subscribe(), hub.subscribe(owner=ALL_OWNERS):
        assert hub.listening
        assert listen.calls == 1


async def test_concurrent_first_subscriptions_share_one_listener(channel: str) -> None:
    listen = FakeListen()
    listen.gate = asyncio.Event()
    hub = EventHub(listen, channel)

    async def enter() -> None:
        async with hub.subscribe():
            pass

    tasks = [asyncio.create_task(enter()) for _ in range(5)]
    await asyncio.sleep(0.05)
    listen.gate.set()
    await asyncio.gather(*tasks)
    assert listen.calls == 1
    await hub.close()


async def test_listener_stays_open_after_the_last_subscription_ends(
    hub: EventHub, listen: PgListen, pg: asyncpg.Connection, channel: str
) -> None:
    async with hub.subscribe():
        pass
    assert hub.listening
    async with hub.subscribe() as sub:
        await notify(pg, channel, sent := event())
        assert await next_event(sub) == sent
    assert listen.calls == 1


async def test_two_hubs_on_one_channel_both_receive(
    hub: EventHub, pg: asyncpg.Connection, channel: str, admin_dsn: str
) -> None:
    other = EventHub(PgListen(admin_dsn), channel)
    try:
        async with hub.subscribe() as first, other.subscribe() as second:
            await notify(pg, channel, sent := event())
            assert await next_event(first) == sent
            assert await next_event(second) == sent
    finally:
        await other.close()


async def test_delivery_to_another_process(
    pg: asyncpg.Connection, channel: str, admin_dsn: str
) -> None:
    child = textwrap.dedent(
        """
        import asyncio, sys
        import asyncpg
        from integrations._events import ALL_OWNERS, EventHub

        DSN, CHANNEL = sys.argv[1], sys.argv[2]

        class Listener:
            def __init__(self, conn):
                self.conn = conn

            async def close(self):
                await self.conn.close()

        async def listen(channel, on_payload, on_lost):
            conn = await asyncpg.connect(DSN)
            conn.add_termination_listener(lambda _c: on_lost())
            await conn.add_listener(channel, lambda _c, _p, _ch, payload: on_payload(payload))
            return Listener(conn)

        async def main():
            hub = EventHub(listen, CHANNEL)
            try:
                async with hub.subscribe(owner=ALL_OWNERS) as sub:
                    print("ready", flush=True)
                    async for ev in sub:
                        print(ev.kind, ev.owner, flush=True)
                        if ev.kind == "connection_removed":
                            break
            finally:
                await hub.close()

        asyncio.run(main())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "error",
        "-c",
        child,
        admin_dsn,
        channel,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert ready == b"ready\n"
        for kind, owner in [
            ("connection_added", "alice"),
            ("connected", None),
            ("connection_removed", "bob"),
        ]:
            await notify(pg, channel, event(kind, owner=owner))
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert out.decode().splitlines() == [
        "connection_added alice",
        "connected None",
        "connection_removed bob",
    ]


# Filters and scopes


async def test_provider_uuid_and_kind_filters(
    hub: EventHub, pg: asyncpg.Connection, channel: str
) -> None:
    target = str(uuid4())
    sent = [
        event("connected", provider="github", uuid=target),
        event("connected", provider="slack"),
        event("validated", provider="github"),
        event("disconnected", provider="slack", uuid=target),
    ]
    async with (
        hub.subscribe(provider="github") as by_provider,
        hub.subscribe(uuid=target) as by_uuid,
        hub.subscribe(kinds=["connected", "disconnected"]) as by_kind,
        hub.subscribe(provider="slack", kinds={"disconnected"}) as combined,
    ):
        for ev in [*sent, event("resync", uuid=None)]:
            await notify(pg, channel, ev)
        assert await until_resync(by_provider) == [sent[0], sent[2]]
        assert await until_resync(by_uuid) == [sent[0], sent[3]]
        assert await until_resync(by_kind) == [sent[0], sent[1], sent[3]]
        assert await until_resync(combined) == [sent[3]]


async def test_owner_scopes_isolate_owners(
    hub: EventHub, pg: asyncpg.Connection, channel: str
) -> None:
    system, alice, bob = event(owner=None), event(owner="alice"), event(owner="bob")
    async with (
        hub.subscribe() as default,
        hub.subscribe(owner=None) as explicit_system,
        hub.subscribe(owner="alice") as alice_only,
        hub.subscribe(owner=ALL_OWNERS) as everything,
    ):
        for ev in [system, alice, bob, event("resync", uuid=None)]:
            await notify(pg, channel, ev)
        assert await until_resync(default) == [system]
        assert await until_resync(explicit_system) == [system]
        assert await until_resync(alice_only) == [alice]
        assert await until_resync(everything) == [system, alice, bob]


async def test_resync_passes_every_filter(hub: EventHub) -> None:
    async with (
        hub.subscribe(
            provider="github", uuid=str(uuid4()), owner="alice", kinds=["connected"]
        ) as a,
        hub.subscribe(owner=None, kinds=["refresh_failed"]) as b,
    ):
        hub.publish_local(Event(kind="resync", uuid=None))
        assert (await next_event(a)).kind == "resync"
        assert (await next_event(b)).kind == "resync"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"kinds": ["connected", "exploded"]}, ValueError),
        ({"kinds": []}, ValueError),
        ({"kinds": "connected"}, TypeError),
        ({"maxsize": 0}, ValueError),
        ({"maxsize": -5}, ValueError),
        ({"maxsize": 1.5}, TypeError),
        ({"owner": 7}, TypeError),
        ({"provider": 7}, TypeError),
        ({"uuid": 7}, TypeError),
        ({"kinds": b"connected"}, TypeError),
        ({"kinds": {"connected": 1}}, TypeError),
        ({"kinds": 5}, TypeError),
        ({"kinds": ["connected", 5]}, TypeError),
        ({"kinds": ["connected"] * 1001}, ValueError),
        ({"after": 0}, InvalidArgument),  # this hub has no log to resume from
    ],
)
def test_subscribe_rejects_bad_arguments_at_call_time(
    kwargs: dict[str, Any], error: type[Exception], channel: str
) -> None:
    hub = EventHub(FakeListen(), channel)
    with pytest.raises(error):
        hub.subscribe(**kwargs)


def test_subscribe_takes_its_filters_by_keyword_only(channel: str) -> None:
    hub = EventHub(FakeListen(), channel)
    with pytest.raises(TypeError):
        hub.subscribe("github")  # type: ignore[call-arg]


def test_hub_stats_are_a_snapshot_that_compares_and_hashes_and_cannot_be_changed(
    channel: str,
) -> None:
    hub = EventHub(FakeListen(), channel)
    stats = hub.stats
    assert stats == hub.stats
    assert len({stats, hub.stats}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.received = 1  # type: ignore[misc]
    assert hub.stats.received == 0
    assert stats == HubStats(
        received=0,
        malformed=0,
        reconnects=0,
        reconnect_attempts=0,
        subscriptions=0,
        listening=False,
    )


async def test_a_provider_filter_lets_through_that_provider_alone(hub: EventHub) -> None:
    async with hub.subscribe(provider="github") as sub:
        for provider in ("aardvark", "zebra", "github"):
            hub.publish_local(event(provider=provider))
        assert (await next_event(sub)).provider == "github"
        assert sub.pending == 0


async def test_a_kind_filter_lets_through_that_kind_alone(channel: str) -> None:
    hub = EventHub(FakeListen(), channel)
    async with hub.subscribe(kinds=["connected"]) as sub:
        # Every other kind, whichever way it sorts against "resync", then the one wanted.
        for kind in sorted(EVENT_KINDS - {"connected", "resync"}):
            hub.publish_local(event(kind))
        hub.publish_local(wanted := event("connected"))
        assert await next_event(sub) == wanted
        assert sub.pending == 0
    await hub.close()


async def test_subscribe_takes_up_to_a_thousand_kind_names(channel: str) -> None:
    hub = EventHub(FakeListen(), channel)
    async with hub.subscribe(kinds=["connected"] * 1000) as sub:
        assert "kinds=['connected']" in repr(sub)
    await hub.close()


def test_subscribe_takes_a_maxsize_from_one_up_to_the_settings_maximum(channel: str) -> None:
    hub = EventHub(FakeListen(), channel)
    for maxsize in (1, MAXIMUM["maxsize"]):
        hub.subscribe(maxsize=maxsize)
    with pytest.raises(InvalidArgument) as info:
        hub.subscribe(maxsize=MAXIMUM["maxsize"] + 1)
    assert info.value.context["field"] == "maxsize"


def test_kinds_from_an_endless_iterator_are_refused_after_one_past_the_limit(
    channel: str,
) -> None:
    read = 0

    def endless() -> Iterator[str]:
        nonlocal read
        while True:
            read += 1
            yield "connected"

    hub = EventHub(FakeListen(), channel)
    with pytest.raises(InvalidArgument, match="up to a thousand"):
        hub.subscribe(kinds=endless())
    assert read == 1001


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("",), {}),
        ((7,), {}),
        (("c",), {"reconnect_initial": 0}),
        (("c",), {"reconnect_initial": -0.1}),
        (("c",), {"reconnect_initial": 0.2, "reconnect_max": 0.1}),
    ],
)
def test_a_hub_refuses_a_bad_channel_or_backoff(args: tuple[Any, ...], kwargs: Any) -> None:
    with pytest.raises(ValueError, match=r"channel must be|reconnect_initial <= reconnect_max"):
        EventHub(FakeListen(), *args, **kwargs)


async def test_a_hub_says_its_channel_and_whether_it_is_closed(channel: str) -> None:
    hub = EventHub(FakeListen(), channel, reconnect_initial=0.1, reconnect_max=0.1)
    assert (hub.channel, hub.closed) == (channel, False)
    await hub.close()
    assert hub.closed


def test_a_subscription_shows_its_filters_and_counts() -> None:
    sub = Subscription(
        provider="github", uuid=None, owner="user:1", kinds=frozenset({"connected"}), maxsize=5
    )
    assert repr(sub) == (
        "Subscription(provider='github', uuid=None, owner='user:1', kinds=['connected'], "
        "pending=0, dropped=0, closed=False)"
    )


async def test_publish_local_takes_only_events(hub: EventHub) -> None:
    with pytest.raises(TypeError, match=r"publish_local\(\) takes an Event"):
        hub.publish_local("connected")  # type: ignore[arg-type]


async def test_a_subscribe_whose_probe_never_arrives_is_refused_naming_the_remedy(
    channel: str,
) -> None:
    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> UnheardListener:
        return UnheardListener(on_payload, on_lost)

    hub = EventHub(listen, channel, heartbeat=(0.05, 0.1))
    with pytest.raises(ConfigurationError) as info:
        async with hub.subscribe():
            pass
    await hub.close()
    assert "listen_dsn" in info.value.message and channel in info.value.message
    assert "within 0.1s" in info.value.message


# Positions beyond the small ints CPython keeps one object for, too.
@pytest.mark.parametrize("cursor", [0, 100_000])
async def test_live_events_that_follow_on_from_the_cursor_are_not_read_from_the_log(
    channel: str, cursor: int
) -> None:
    reads: list[int] = []

    async def log(after: int, **_filters: Any) -> tuple[list[Event], int]:
        reads.append(after)
        await asyncio.sleep(0)
        return [], 0

    hub = EventHub(FakeListen(), channel, log=log)
    async with hub.subscribe(after=cursor) as sub:
        # Events of every kind, whichever way they sort against "resync".
        kinds = sorted(EVENT_KINDS - {"resync"})
        live = [event(kind, position=cursor + n) for n, kind in enumerate(kinds, 1)]
        for sent in live:
            hub.publish_local(sent)
        assert [await next_event(sub) for _ in live] == live
    assert reads == [cursor]
    await hub.close()


@pytest.mark.parametrize("cursor", [0, 100_000])
async def test_a_live_event_after_a_hole_brings_the_missing_ones_from_the_log_first(
    channel: str, cursor: int
) -> None:
    first, second, third = (event(position=cursor + n) for n in (1, 2, 3))
    logged = [first]

    hub = EventHub(FakeListen(), channel, log=log_of(logged))
    async with hub.subscribe(after=cursor) as sub:
        hub.publish_local(first)
        assert await next_event(sub) == first
        logged += [second, third]
        # The second one's notification never came: the third's shows the hole.
        hub.publish_local(third)
        assert [await next_event(sub) for _ in range(2)] == [second, third]
        assert sub.pending == 0
    await hub.close()


async def test_a_live_event_the_log_already_handed_over_is_skipped(channel: str) -> None:
    first, second, third = (event(position=n) for n in (1, 2, 3))

    async def log(after: int, **_filters: Any) -> tuple[list[Event], int]:
        await asyncio.sleep(0)
        return ([first, second], 0) if after == 0 else ([], 0)

    hub = EventHub(FakeListen(), channel, log=log)
    async with hub.subscribe(after=0) as sub:
        assert await next_event(sub) == first  # a page of two read from the log
        hub.publish_local(second)  # its notification arrives after the log had it
        assert await next_event(sub) == second
        hub.publish_local(third)
        assert await next_event(sub) == third
        assert sub.pending == 0
    await hub.close()


def log_of(logged: list[Event]) -> Callable[..., Awaitable[tuple[list[Event], int]]]:
    """An event log holding ``logged`` (positions 1, 2, ...) and nothing pruned: each
    read yields to the loop once, then answers the events after its cursor."""

    async def log(after: int, **_filters: Any) -> tuple[list[Event], int]:
        await asyncio.sleep(0)
        return [e for e in logged if (e.position or 0) > after], 0

    return log


async def test_a_notification_arriving_after_the_log_handed_its_event_over_is_not_repeated(
    channel: str,
) -> None:
    logged = [event(position=n) for n in (1, 2, 3)]

    hub = EventHub(FakeListen(), channel, log=log_of(logged))
    async with hub.subscribe(after=0) as sub:
        assert await next_event(sub) == logged[0]  # a page of three read from the log
        # The first event's notification comes in late: the reader is past it by the
        # time it reaches the head of the queue.
        hub.publish_local(logged[0])
        assert await next_event(sub) == logged[1]
        assert await next_event(sub) == logged[2]
        hub.publish_local(later := event(position=4))
        assert await next_event(sub) == later
        assert sub.pending == 0
    await hub.close()


async def test_an_unlogged_local_event_queued_behind_a_logged_one_survives_the_log_read(
    channel: str,
) -> None:
    logged = [event(position=n) for n in (1, 2, 3)]

    hub = EventHub(FakeListen(), channel, log=log_of(logged))
    async with hub.subscribe(after=0) as sub:
        # Queued before the log is read: one logged after the page, one published here
        # and never logged (no position).
        hub.publish_local(live := event(position=4))
        hub.publish_local(local := event())
        got = [await next_event(sub) for _ in range(5)]
        assert got == [*logged, live, local]
    await hub.close()


async def test_a_cursor_behind_the_pruned_events_gets_a_resync_naming_the_oldest_kept(
    channel: str,
) -> None:
    kept = [event(position=n) for n in (4, 5)]

    async def log(after: int, **_filters: Any) -> tuple[list[Event], int]:
        await asyncio.sleep(0)
        return [e for e in kept if (e.position or 0) > after], 3  # 1 to 3 pruned

    hub = EventHub(FakeListen(), channel, log=log)
    async with hub.subscribe(after=1) as sub:
        signal = await next_event(sub)
        assert (signal.kind, signal.detail) == (
            "resync",
            {"reason": "expired", "after": 1, "oldest": 4},
        )
        assert [await next_event(sub) for _ in kept] == kept
        assert sub.position == 5
    await hub.close()


async def test_a_resync_notification_is_passed_on_live_and_read_as_a_gap_when_resuming(
    channel: str,
) -> None:
    logged = [first := event(position=1)]
    hub = EventHub(FakeListen(), channel, log=log_of(logged))
    async with hub.subscribe(kinds=["connected"]) as live, hub.subscribe(after=0) as resuming:
        hub.publish_local(first)
        assert await next_event(resuming) == first
        assert await next_event(live) == first
        # A resync that came as a notification, parsed like any payload.
        hub._on_payload(Event(kind="resync", uuid=None).to_payload())
        logged.append(second := event(position=2))
        assert (await next_event(live)).kind == "resync"
        assert await next_event(resuming) == second
    await hub.close()


async def test_a_log_longer_than_a_page_is_read_page_by_page(channel: str) -> None:
    logged = [event(position=n) for n in range(1, REPLAY_PAGE + 2)]
    reads: list[int] = []

    async def log(after: int, *, limit: int, **_filters: Any) -> tuple[list[Event], int]:
        reads.append(after)
        await asyncio.sleep(0)
        return [e for e in logged if (e.position or 0) > after][:limit], 0

    hub = EventHub(FakeListen(), channel, log=log)
    async with hub.subscribe(after=0) as sub:
        got = [await next_event(sub) for _ in logged]
        assert got == logged
        assert sub.pending == 0
    # A full page, then the one event after it (a page that is not full ends the reading).
    assert reads == [0, REPLAY_PAGE]
    await hub.close()


async def test_pending_counts_once_the_live_events_a_log_read_handed_over(channel: str) -> None:
    logged = [event(position=n) for n in (1, 2, 3)]

    hub = EventHub(FakeListen(), channel, log=log_of(logged))
    async with hub.subscribe(after=0) as sub:
        # Their notifications are queued before the log is read, which hands them over.
        for sent in logged:
            hub.publish_local(sent)
        assert await next_event(sub) == logged[0]
        assert sub.pending == 2
        assert [await next_event(sub) for _ in range(2)] == logged[1:]
        assert sub.pending == 0
    await hub.close()


async def test_a_resuming_subscription_keeps_at_most_maxsize_live_events_then_reads_the_log(
    channel: str,
) -> None:
    logged: list[Event] = []

    hub = EventHub(FakeListen(), channel, log=log_of(logged))
    async with hub.subscribe(after=0, maxsize=2) as sub:
        logged.append(first := event(position=1))
        hub.publish_local(first)
        assert await next_event(sub) == first
        for n in (2, 3, 4):
            logged.append(sent := event(position=n))
            hub.publish_local(sent)
            assert sub.pending <= 2
        assert [await next_event(sub) for _ in range(3)] == logged[1:]
        assert sub.dropped == 0
    await hub.close()


async def test_a_large_queue_is_bounded_by_its_maxsize_too(channel: str) -> None:
    # A maxsize beyond the small ints CPython keeps one object for.
    logged = [event(position=n) for n in range(1, 302)]
    hub = EventHub(FakeListen(), channel, log=log_of(logged))
    async with hub.subscribe(maxsize=300) as live, hub.subscribe(after=0, maxsize=300) as resuming:
        for sent in logged:
            hub.publish_local(sent)
        assert (live.pending, live.dropped) == (300, 1)
        assert resuming.pending <= 300
        assert [await next_event(resuming) for _ in logged] == logged
        assert [await next_event(live) for _ in range(300)] == logged[1:]
    await hub.close()


async def test_a_log_that_cannot_be_read_is_read_again_after_waits_that_double(
    channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    logged = event(position=1)
    calls: list[int] = []

    async def log(after: int, **_filters: Any) -> tuple[list[Event], int]:
        calls.append(after)
        if len(calls) <= 7:
            raise StorageError("the database cannot be reached")
        return [logged], 0

    waits: list[float] = []

    def no_jitter(ceiling: float) -> float:
        waits.append(ceiling)
        return 0.001

    monkeypatch.setattr("integrations._events.equal_jitter", no_jitter)
    hub = EventHub(FakeListen(), channel, log=log)
    async with hub.subscribe(after=0) as sub:
        assert await next_event(sub) == logged
    assert calls == [0] * 8
    assert waits == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0])
    await hub.close()


# Ordering and back-pressure


async def test_events_for_one_connection_keep_their_order(
    hub: EventHub, pg: asyncpg.Connection, channel: str, admin_dsn: str
) -> None:
    first, second = str(uuid4()), str(uuid4())
    count = 200
    other = await asyncpg.connect(admin_dsn)
    try:
        async with hub.subscribe(uuid=first) as a, hub.subscribe(uuid=second) as b:

            async def write(conn: asyncpg.Connection, uuid: str) -> None:
                for seq in range(count):
                    await notify(conn, channel, event(uuid=uuid, detail={"seq": seq}))

            # Two writers at once interleave the uuids on the wire.
            await asyncio.gather(write(pg, first), write(other, second))
            for sub in (a, b):
                got = [(await next_event(sub)).detail["seq"] for _ in range(count)]
                assert got == list(range(count))
    finally:
        await other.close()


async def test_overflow_drops_oldest_and_counts(
    hub: EventHub, pg: asyncpg.Connection, channel: str
) -> None:
    async with hub.subscribe(maxsize=3) as small, hub.subscribe() as witness:
        for seq in range(10):
            await notify(pg, channel, event(detail={"seq": seq}))
        for _ in range(10):
            await next_event(witness)
        assert small.dropped == 7
        assert small.pending == 3
        assert [(await small.get()).detail["seq"] for _ in range(3)] == [7, 8, 9]
        assert witness.dropped == 0


async def test_slow_subscriber_does_not_block_a_fast_one(
    hub: EventHub, pg: asyncpg.Connection, channel: str
) -> None:
    async with hub.subscribe(maxsize=2) as slow, hub.subscribe() as fast:
        for seq in range(50):
            await notify(pg, channel, event(detail={"seq": seq}))
            assert (await next_event(fast, within=2)).detail["seq"] == seq
        assert slow.dropped == 48


# Bad payloads


async def test_malformed_payload_is_logged_without_its_body_and_dropped(
    hub: EventHub, pg: asyncpg.Connection, channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    marker = "SECRETISH" * 700
    bad = [
        "not json " + marker,
        '{"kind": "exploded", "x": "' + marker + '"}',
        '{"kind": "connected"}',
        '{"kind": "connected", "uuid": 5, "at": "2024-01-01T00:00:00+00:00"}',
        '{"kind": "connected", "uuid": null, "at": 12}',
        "[1, 2]",
    ]
    caplog.set_level(logging.WARNING, logger="integrations.events")
    async with hub.subscribe() as sub:
        for payload in bad:
            await notify(pg, channel, payload)
        await notify(pg, channel, good := event())
        assert await next_event(sub) == good
        assert sub.pending == 0
    assert hub.stats.malformed == len(bad)
    records = [r for r in caplog.records if r.name == "integrations.events"]
    assert len(records) == len(bad)
    assert all(r.levelno == logging.WARNING for r in records)
    assert "SECRETISH" not in caplog.text


def test_payload_callback_never_raises(channel: str) -> None:
    hub = EventHub(FakeListen(), channel)
    for payload in ["", "{", "null", '{"kind": "connected", "at": []}', "\x00"]:
        hub._on_payload(payload)
    assert hub.stats.malformed == 5
    # Row-change notices, well formed or not, with no row cache to tell: not events.
    for payload in ['{"rows": ["0190a0b0-0000-7000-8000-000000000001"]}', '{"rows": 5}']:
        hub._on_payload(payload)
    assert (hub.stats.received, hub.stats.malformed) == (5, 5)
    # One cut short is not JSON: malformed, like any payload that cannot be read.
    hub._on_payload('{"rows": ["0190a0b0-0000-7000-8000-0000000')
    assert (hub.stats.received, hub.stats.malformed) == (6, 6)


class RecordingWatcher:
    """A row cache stand-in: what the hub tells it."""

    def __init__(self) -> None:
        self.changed: list[tuple[str, ...] | None] = []

    def rows_changed(self, uuids: Any) -> None:
        self.changed.append(None if uuids is None else tuple(uuids))

    def listening(self, up: bool) -> None:
        pass

    def proven(self, until: float) -> None:
        pass


def test_the_row_cache_is_told_of_every_notice_that_may_change_a_row(
    channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    watcher = RecordingWatcher()
    hub = EventHub(FakeListen(), channel, watcher=watcher)
    row = "0190a0b0-0000-7000-8000-000000000001"
    caplog.set_level(logging.WARNING, logger="integrations.events")
    hub._on_payload(json.dumps({"rows": [row]}))
    # A row notice whose rows cannot be read, or an event that cannot be: any row may
    # have changed.
    hub._on_payload('{"rows": [5]}')
    hub._on_payload('{"kind": "connected", "at": []}')
    hub._on_payload((added := event("connection_added", uuid=row)).to_payload())
    assert watcher.changed == [(row,), None, None, (row,)]
    assert (hub.stats.received, hub.stats.malformed) == (2, 1)
    [record] = [r for r in caplog.records if r.name == "integrations.events"]
    assert record.getMessage() == (
        f"dropped a malformed event payload on channel {channel!r} (31 chars): ValueError"
    ), record.getMessage()
    assert added.uuid == row


async def test_an_event_that_carries_a_rows_field_is_still_an_event(channel: str) -> None:
    # Only a payload written as a row notice (it begins '{"rows":') is one; an event may
    # carry fields this version does not know.
    watcher = RecordingWatcher()
    hub = EventHub(FakeListen(), channel, watcher=watcher)
    row = "0190a0b0-0000-7000-8000-000000000001"
    sent = event("connection_added", uuid=row)
    async with hub.subscribe() as sub:
        hub._on_payload(json.dumps({**json.loads(sent.to_payload()), "rows": ["other"]}))
        assert await next_event(sub) == sent
    assert watcher.changed == [(row,)]
    assert hub.stats.received == 1
    await hub.close()


# Transactions


async def test_rolled_back_notify_delivers_nothing(
    hub: EventHub, pg: asyncpg.Connection, channel: str
) -> None:
    async with hub.subscribe() as sub:
        with pytest.raises(RuntimeError, match="roll back"):
            async with pg.transaction():
                await notify(pg, channel, event("connection_added"))
                raise RuntimeError("roll back")
        await notify(pg, channel, after := event("connection_removed"))
        assert await next_event(sub) == after
        assert sub.pending == 0


async def test_notify_in_a_transaction_arrives_only_after_commit(
    hub: EventHub, pg: asyncpg.Connection, channel: str, admin_dsn: str
) -> None:
    other = await asyncpg.connect(admin_dsn)
    try:
        async with hub.subscribe() as sub:
            async with pg.transaction():
                await notify(pg, channel, sent := event("setup_saved"))
                # A sentinel sent and committed after it arrives, and arrives first.
                await notify(other, channel, sentinel := event("validated"))
                assert await next_event(sub) == sentinel
            assert await next_event(sub) == sent
    finally:
        await other.close()


# Self-healing


async def test_lost_listener_reconnects_and_every_subscriber_gets_resync(
    hub: EventHub, listen: PgListen, pg: asyncpg.Connection, channel: str
) -> None:
    async with (
        hub.subscribe() as system,
        hub.subscribe(owner="alice", provider="github", kinds=["connected"]) as narrow,
        hub.subscribe(owner=ALL_OWNERS) as everything,
    ):
        old_pid = listen.listeners[0].pid
        assert await pg.fetchval("SELECT pg_terminate_backend($1)", old_pid)
        for sub in (system, narrow, everything):
            resync = await next_event(sub)
            assert resync.kind == "resync"
            assert resync.uuid is None
        assert hub.listening
        assert hub.stats.reconnects == 1
        assert listen.listeners[-1].pid != old_pid

        await notify(pg, channel, later := event(owner="alice"))
        assert await next_event(narrow) == later
        assert await next_event(everything) == later
        assert system.pending == 0


async def test_reconnect_backs_off_until_listen_succeeds(
    hub: EventHub, listen: PgListen, pg: asyncpg.Connection, channel: str
) -> None:
    async with hub.subscribe() as sub:
        listen.fail_next = 3
        await pg.fetchval("SELECT pg_terminate_backend($1)", listen.listeners[0].pid)
        assert (await next_event(sub)).kind == "resync"
        assert listen.calls == 1 + 4
        assert hub.stats.reconnect_attempts == 4
        assert hub.stats.reconnects == 1
        await notify(pg, channel, sent := event())
        assert await next_event(sub) == sent


async def test_backoff_doubles_with_jitter_up_to_the_cap(
    channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    listen = FakeListen()
    hub = EventHub(listen, channel, reconnect_initial=0.1, reconnect_max=0.5)
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)

    async with hub.subscribe() as sub:
        monkeypatch.setattr(asyncio, "sleep", record)
        monkeypatch.setattr("integrations._events.equal_jitter", lambda ceiling: ceiling)
        listen.fail_next = 5
        listen.listeners[0].on_lost()
        assert not hub.listening
        assert (await next_event(sub)).kind == "resync"
        monkeypatch.undo()
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    await hub.close()


async def test_a_hub_made_without_backoff_options_waits_a_tenth_of_a_second_doubling_to_five(
    channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    listen = FakeListen()
    hub = EventHub(listen, channel)
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)

    async with hub.subscribe() as sub:
        monkeypatch.setattr(asyncio, "sleep", record)
        monkeypatch.setattr("integrations._events.equal_jitter", lambda ceiling: ceiling)
        listen.fail_next = 8
        listen.listeners[0].on_lost()
        assert (await next_event(sub)).kind == "resync"
        monkeypatch.undo()
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    await hub.close()


async def test_jitter_keeps_each_delay_between_half_and_full(
    channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    listen = FakeListen()
    hub = EventHub(listen, channel, reconnect_initial=0.1, reconnect_max=0.1)
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)

    async with hub.subscribe() as sub:
        monkeypatch.setattr(asyncio, "sleep", record)
        listen.fail_next = 50
        listen.listeners[0].on_lost()
        assert (await next_event(sub)).kind == "resync"
        monkeypatch.undo()
    assert len(delays) == 50
    assert all(0.05 <= d <= 0.1 for d in delays)
    assert len(set(delays)) > 1
    await hub.close()


class UnprobedListener(FakeListener):
    """A listener that can be probed, but whose probes cannot be sent (the pool that
    sends the NOTIFY cannot reach the database): no news of it either way."""

    can_probe = True

    async def probe(self) -> asyncio.Future[None]:
        raise OSError("connection refused")


def clock_reads(monkeypatch: pytest.MonkeyPatch, start: float | None) -> None:
    """Make the running loop's clock read ``start`` from now on, as on a machine just
    booted (its monotonic clock counts from boot); None leaves it as it is."""
    if start is None:
        return
    loop = asyncio.get_running_loop()
    real = loop.time
    offset = real() - start
    monkeypatch.setattr(loop, "time", lambda: real() - offset)


@pytest.mark.parametrize("clock", [None, 0.001], ids=["clock_as_is", "just_booted"])
async def test_a_subscribe_whose_probe_cannot_be_sent_goes_on_after_the_probe_bound(
    channel: str, monkeypatch: pytest.MonkeyPatch, clock: float | None
) -> None:
    clock_reads(monkeypatch, clock)

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> UnprobedListener:
        return UnprobedListener(on_payload, on_lost)

    bounds: list[float] = []
    real_wait_for = asyncio.wait_for

    async def recorded(awaitable: Any, bound: float | None) -> Any:
        if sys._getframe(1).f_code.co_name == "_proof":
            bounds.append(cast(float, bound))
        return await real_wait_for(awaitable, bound)

    monkeypatch.setattr(asyncio, "wait_for", recorded)
    # Probes every 0.05 s, each allowed 0.1 s: subscribe() waits at most 0.25 s for news.
    hub = EventHub(listen, channel, heartbeat=(0.05, 0.1))
    async with asyncio.timeout(TIMEOUT), hub.subscribe() as sub:
        sent = event()
        hub.publish_local(sent)
        assert await next_event(sub) == sent
    await hub.close()
    assert bounds and bounds[0] == pytest.approx(0.25, abs=0.01)


class HeardListener(FakeListener):
    """A listener whose probes arrive at once; it notes when each was sent."""

    can_probe = True

    def __init__(self, on_payload: Callable[[str], None], on_lost: Callable[[], None]) -> None:
        super().__init__(on_payload, on_lost)
        self.sent: list[float] = []

    async def probe(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        self.sent.append(loop.time())
        arrived = loop.create_future()
        arrived.set_result(None)
        return arrived


class ProofWatcher:
    """A row cache's side of the hub: notes until when changes are proven heard."""

    def __init__(self) -> None:
        self.until: list[float] = []

    def rows_changed(self, uuids: Any) -> None:
        pass

    def listening(self, up: bool) -> None:
        pass

    def proven(self, until: float) -> None:
        self.until.append(until)


async def test_a_heard_probe_lets_the_cache_serve_for_two_heartbeats_from_its_sending(
    channel: str,
) -> None:
    opened: list[HeardListener] = []

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> HeardListener:
        opened.append(HeardListener(on_payload, on_lost))
        return opened[-1]

    watcher = ProofWatcher()
    hub = EventHub(listen, channel, heartbeat=(0.5, 1.0), watcher=watcher)
    await hub.start()
    await hub.close()
    # The first proof: until -inf when the connection opens, then two heartbeats (1.0 s)
    # from when the probe was sent (a few milliseconds after the heartbeat noted it).
    assert watcher.until[0] == -math.inf
    assert 0.8 <= watcher.until[1] - opened[0].sent[0] <= 1.0


@pytest.mark.parametrize("kind", [HeardListener, FakeListener], ids=["heard", "unprobed"])
async def test_start_logs_nothing_when_the_connection_is_heard_or_cannot_be_probed(
    channel: str, kind: type[FakeListener], caplog: pytest.LogCaptureFixture
) -> None:
    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> FakeListener:
        return kind(on_payload, on_lost)

    caplog.set_level(logging.WARNING, logger="integrations.events")
    hub = EventHub(listen, channel, heartbeat=(3600.0, 1.0))
    await hub.start()
    assert hub.listening
    await hub.close()
    assert [r.getMessage() for r in caplog.records if r.name == "integrations.events"] == []


async def test_a_subscribe_on_a_listener_that_cannot_be_probed_waits_for_no_probe(
    channel: str,
) -> None:
    hub = EventHub(FakeListen(), channel, heartbeat=(3600.0, 3600.0))
    async with asyncio.timeout(TIMEOUT), hub.subscribe() as sub:
        hub.publish_local(sent := event())
        assert await next_event(sub) == sent
    await hub.close()


class SyncCountingListener(HeardListener):
    """A heard listener that counts the times it is synced."""

    def __init__(self, on_payload: Callable[[str], None], on_lost: Callable[[], None]) -> None:
        super().__init__(on_payload, on_lost)
        self.syncs = 0

    async def sync(self) -> None:
        self.syncs += 1


async def test_a_subscribe_syncs_the_listener_only_when_it_was_open_already(
    channel: str,
) -> None:
    opened: list[SyncCountingListener] = []

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> SyncCountingListener:
        opened.append(SyncCountingListener(on_payload, on_lost))
        return opened[-1]

    hub = EventHub(listen, channel, heartbeat=(3600.0, 1.0))
    async with hub.subscribe():
        # Just opened: no notification can be pending on it, so no round trip for one.
        assert opened[0].syncs == 0
        async with hub.subscribe():
            assert opened[0].syncs == 1
    await hub.close()


class YieldingCloseListener(SyncCountingListener):
    """A counting listener whose close takes a turn of the loop, as a connection's does."""

    async def close(self) -> None:
        await asyncio.sleep(0)
        await super().close()


async def test_a_subscribe_whose_listener_was_lost_while_opening_does_not_sync_its_replacement(
    channel: str,
) -> None:
    opened: list[YieldingCloseListener] = []

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> YieldingCloseListener:
        opened.append(YieldingCloseListener(on_payload, on_lost))
        if len(opened) == 1:
            on_lost()  # lost as it opens
        return opened[-1]

    hub = EventHub(listen, channel, heartbeat=(3600.0, 1.0), reconnect_initial=0.01)
    async with hub.subscribe():
        # The reconnect opened the replacement while the lost one was being closed.
        assert len(opened) == 2 and opened[0].closed
        # It was opened for this subscribe, not open already: nothing to sync.
        assert opened[1].syncs == 0
    await hub.close()


class ListeningWatcher(ProofWatcher):
    """A row cache's side of the hub that also notes each up and down of the listener."""

    def __init__(self) -> None:
        super().__init__()
        self.ups: list[bool] = []

    def listening(self, up: bool) -> None:
        self.ups.append(up)


async def test_close_tells_the_row_cache_the_listener_is_down(channel: str) -> None:
    watcher = ListeningWatcher()
    hub = EventHub(FakeListen(), channel, watcher=watcher)
    await hub.start()
    await hub.close()
    assert watcher.ups == [True, False]


async def test_a_reconnect_tells_the_row_cache_the_listener_is_up_again(channel: str) -> None:
    watcher = ListeningWatcher()
    listen = FakeListen()
    hub = EventHub(listen, channel, watcher=watcher, reconnect_initial=0.01)
    async with hub.subscribe() as sub:
        listen.listeners[0].on_lost()
        assert (await next_event(sub)).kind == "resync"
        assert watcher.ups == [True, False, True]
    await hub.close()


class SlowlyHeardListener(FakeListener):
    """A listener whose probes arrive a moment after they are sent."""

    can_probe = True

    async def probe(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        arrived = loop.create_future()
        loop.call_later(0.1, arrived.set_result, None)
        return arrived


@pytest.mark.parametrize("clock", [None, 0.001], ids=["clock_as_is", "just_booted"])
async def test_a_probe_that_arrives_within_its_time_is_heard(
    channel: str, monkeypatch: pytest.MonkeyPatch, clock: float | None
) -> None:
    clock_reads(monkeypatch, clock)

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> SlowlyHeardListener:
        return SlowlyHeardListener(on_payload, on_lost)

    watcher = ProofWatcher()
    hub = EventHub(listen, channel, heartbeat=(0.05, 0.5), watcher=watcher)
    try:
        async with hub.subscribe() as sub:
            hub.publish_local(sent := event())
            assert await next_event(sub) == sent
    finally:
        await hub.close()
    assert watcher.until[0] == -math.inf
    assert watcher.until[1] > -math.inf


class LateListener(FakeListener):
    """A listener whose probes arrive, but half a second after they are sent."""

    can_probe = True

    async def probe(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        arrived = loop.create_future()
        loop.call_later(0.5, lambda: arrived.done() or arrived.set_result(None))
        return arrived


async def test_a_probe_that_arrives_after_its_time_is_not_heard(channel: str) -> None:
    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> LateListener:
        return LateListener(on_payload, on_lost)

    # Each probe is allowed 0.1 s: one arriving 0.5 s after it was sent is not heard.
    hub = EventHub(listen, channel, heartbeat=(0.05, 0.1))
    try:
        with pytest.raises(ConfigurationError):
            async with hub.subscribe():
                pass
    finally:
        await hub.close()


class GatedProbeListener(FakeListener):
    """A listener whose probes arrive when the test resolves them (``arrivals``)."""

    can_probe = True

    def __init__(self, on_payload: Callable[[str], None], on_lost: Callable[[], None]) -> None:
        super().__init__(on_payload, on_lost)
        self.arrivals: list[asyncio.Future[None]] = []

    async def probe(self) -> asyncio.Future[None]:
        self.arrivals.append(asyncio.get_running_loop().create_future())
        return self.arrivals[-1]


async def test_a_subscribe_on_a_replacing_connection_waits_for_that_connections_probe(
    channel: str,
) -> None:
    opened: list[FakeListener] = []

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> FakeListener:
        kind = GatedProbeListener if opened else HeardListener
        opened.append(kind(on_payload, on_lost))
        return opened[-1]

    hub = EventHub(
        listen, channel, heartbeat=(3600.0, 5.0), reconnect_initial=0.01, reconnect_max=0.01
    )
    await hub.start()  # the first connection is heard
    opened[0].on_lost()
    await eventually(
        lambda: len(opened) == 2 and bool(cast(GatedProbeListener, opened[1]).arrivals)
    )
    # The replacing connection's probe is out and has not arrived: the subscribe waits
    # for it (the first connection's probes say nothing of this one), then goes on.
    sent = event()

    async def enter() -> Event:
        async with hub.subscribe() as sub:
            hub.publish_local(sent)
            return await next_event(sub)

    entering = asyncio.create_task(enter())
    # Runs after the subscribe's first step, which waits for the probe's news.
    asyncio.get_running_loop().call_soon(
        cast(GatedProbeListener, opened[1]).arrivals[0].set_result, None
    )
    assert await asyncio.wait_for(entering, TIMEOUT) == sent
    await hub.close()


async def test_a_connection_lost_while_its_probe_is_out_is_replaced_and_the_new_one_probed(
    channel: str,
) -> None:
    opened: list[FakeListener] = []

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> FakeListener:
        kind = HeardListener if opened else GatedProbeListener
        opened.append(kind(on_payload, on_lost))
        return opened[-1]

    hub = EventHub(
        listen, channel, heartbeat=(3600.0, 30.0), reconnect_initial=0.01, reconnect_max=0.01
    )
    try:
        # start() waits for a probe to be heard.
        starting = asyncio.create_task(hub.start())
        await eventually(
            lambda: bool(opened) and bool(cast(GatedProbeListener, opened[0]).arrivals)
        )
        first = cast(GatedProbeListener, opened[0])
        first.on_lost()
        await eventually(lambda: hub.listening and len(opened) == 2)
        # The lost connection's probe arrives late; the new connection is probed all the same.
        first.arrivals[0].set_result(None)
        await asyncio.wait_for(starting, TIMEOUT)
        assert cast(HeardListener, opened[1]).sent
    finally:
        await hub.close()


class UndeclaredProbeListener(FakeListener):
    """A listener with a ``probe`` that does not say it can be probed (no ``can_probe``)."""

    def __init__(self, on_payload: Callable[[str], None], on_lost: Callable[[], None]) -> None:
        super().__init__(on_payload, on_lost)
        self.probes = 0
        self.synced = asyncio.Event()

    async def probe(self) -> asyncio.Future[None]:
        self.probes += 1
        return asyncio.get_running_loop().create_future()

    async def sync(self) -> None:
        self.synced.set()


async def test_a_listener_that_does_not_say_it_can_be_probed_is_synced_instead(
    channel: str,
) -> None:
    opened: list[UndeclaredProbeListener] = []

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> UndeclaredProbeListener:
        opened.append(UndeclaredProbeListener(on_payload, on_lost))
        return opened[-1]

    watcher = ProofWatcher()
    hub = EventHub(listen, channel, heartbeat=(3600.0, 0.05), watcher=watcher)
    await hub.start()
    await asyncio.wait_for(opened[0].synced.wait(), TIMEOUT)  # the first heartbeat
    assert opened[0].probes == 0
    assert hub.listening and len(opened) == 1
    # Nor does the row cache wait for a proof that would never come.
    assert watcher.until == []
    await hub.close()


class UnheardListener(FakeListener):
    """A listener whose probes go out and never arrive (as behind a transaction pooler)."""

    can_probe = True

    async def probe(self) -> asyncio.Future[None]:
        return asyncio.get_running_loop().create_future()


async def test_a_connection_never_heard_is_named_as_such_not_as_unresponsive(
    channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    opened: list[UnheardListener] = []
    fourth = asyncio.Event()

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> UnheardListener:
        opened.append(UnheardListener(on_payload, on_lost))
        if len(opened) == 4:
            fourth.set()
        return opened[-1]

    caplog.set_level(logging.INFO, logger="integrations.events")
    hub = EventHub(
        listen, channel, heartbeat=(0.05, 0.1), reconnect_initial=0.01, reconnect_max=0.01
    )
    await hub.start()
    # Each connection is found unheard, dropped and opened anew.
    await asyncio.wait_for(fourth.wait(), TIMEOUT)
    await hub.close()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    unheard = [level for level, text in messages if "did not receive its own" in text]
    # An error for the first, a warning for each reopened one.
    assert unheard[:3] == [logging.ERROR, logging.WARNING, logging.WARNING]
    assert not [text for _, text in messages if "did not answer" in text]


async def test_each_connection_never_heard_is_logged_once(
    channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    opened: list[UnheardListener] = []
    third, gate = asyncio.Event(), asyncio.Event()

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> UnheardListener:
        if len(opened) == 2:
            third.set()
            await gate.wait()  # never set: the third connection is not opened
        opened.append(UnheardListener(on_payload, on_lost))
        return opened[-1]

    caplog.set_level(logging.INFO, logger="integrations.events")
    hub = EventHub(
        listen, channel, heartbeat=(3600.0, 0.1), reconnect_initial=0.01, reconnect_max=0.01
    )
    await hub.start()
    # Two connections found unheard and dropped; the third waits to open.
    await asyncio.wait_for(third.wait(), TIMEOUT)
    await hub.close()
    unheard = [r.levelno for r in caplog.records if "did not receive its own" in r.getMessage()]
    assert unheard == [logging.ERROR, logging.WARNING]


class FadingListener(FakeListener):
    """A listener whose first probe arrives and whose later ones never do."""

    can_probe = True

    def __init__(self, on_payload: Callable[[str], None], on_lost: Callable[[], None]) -> None:
        super().__init__(on_payload, on_lost)
        self.probes = 0

    async def probe(self) -> asyncio.Future[None]:
        self.probes += 1
        arrived = asyncio.get_running_loop().create_future()
        if self.probes == 1:
            arrived.set_result(None)
        return arrived


async def test_a_connection_heard_before_that_stops_hearing_is_named_unresponsive(
    channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    opened: list[FadingListener] = []
    second = asyncio.Event()

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> FadingListener:
        opened.append(FadingListener(on_payload, on_lost))
        if len(opened) == 2:
            second.set()
        return opened[-1]

    caplog.set_level(logging.INFO, logger="integrations.events")
    hub = EventHub(
        listen, channel, heartbeat=(0.05, 0.1), reconnect_initial=0.01, reconnect_max=0.01
    )
    await hub.start()
    await asyncio.wait_for(second.wait(), TIMEOUT)
    await hub.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "integrations.events"]
    assert [m for m in messages if "did not answer within 0.1s" in m]
    assert not [m for m in messages if "did not receive its own" in m]


async def test_probes_go_on_on_the_connection_that_replaces_a_lost_one(
    channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[HeardListener] = []
    gate = asyncio.Event()

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> HeardListener:
        if opened:
            await gate.wait()
        opened.append(HeardListener(on_payload, on_lost))
        return opened[-1]

    beats: list[float | None] = []
    real_wait_for = asyncio.wait_for

    async def recorded(awaitable: Any, bound: float | None) -> Any:
        if sys._getframe(1).f_code.co_name == "_beat":
            beats.append(bound)
        return await real_wait_for(awaitable, bound)

    monkeypatch.setattr(asyncio, "wait_for", recorded)
    hub = EventHub(
        listen, channel, heartbeat=(0.01, 1.0), reconnect_initial=0.01, reconnect_max=0.01
    )
    await hub.start()
    assert opened[0].sent
    opened[0].on_lost()
    # Heartbeats come round while no connection is open (the reconnect waits at the gate).
    seen = len(beats)
    await eventually(lambda: len(beats) >= seen + 2)
    assert not hub.listening
    gate.set()
    await eventually(lambda: len(opened) == 2 and bool(opened[1].sent))
    await hub.close()


class SilentListener(FakeListener):
    """A listener that cannot be probed, whose connection stopped answering: a statement
    sent on it (``sync``) never returns."""

    async def sync(self) -> None:
        await asyncio.get_running_loop().create_future()


async def test_a_connection_that_stops_answering_is_replaced_though_it_cannot_be_probed(
    channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    opened: list[FakeListener] = []

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> FakeListener:
        kind = SilentListener if not opened else FakeListener
        opened.append(kind(on_payload, on_lost))
        return opened[-1]

    caplog.set_level(logging.WARNING, logger="integrations.events")
    hub = EventHub(listen, channel, heartbeat=(0.05, 0.05), reconnect_initial=0.01)
    async with hub.subscribe() as sub:
        assert (await next_event(sub)).kind == "resync"
        assert opened[0].closed and len(opened) == 2
        assert hub.listening
    await hub.close()
    assert "did not answer within 0.05s" in caplog.text


class FlakyListener(FakeListener):
    """A listener that cannot be probed, whose ``sync`` fails once ``broken`` is set."""

    def __init__(self, on_payload: Callable[[str], None], on_lost: Callable[[], None]) -> None:
        super().__init__(on_payload, on_lost)
        self.synced = asyncio.Event()
        self.broken = False

    async def sync(self) -> None:
        if self.broken:
            raise OSError("connection reset by peer")
        self.synced.set()


async def test_a_subscribe_goes_on_when_syncing_the_listener_fails(channel: str) -> None:
    opened: list[FlakyListener] = []

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> FlakyListener:
        opened.append(FlakyListener(on_payload, on_lost))
        return opened[-1]

    hub = EventHub(listen, channel, heartbeat=(3600.0, 1.0))
    await hub.start()
    await asyncio.wait_for(opened[0].synced.wait(), TIMEOUT)  # the first heartbeat
    opened[0].broken = True
    async with hub.subscribe() as sub:
        hub.publish_local(sent := event())
        assert await next_event(sub) == sent
    await hub.close()


async def test_a_listener_lost_again_after_a_reconnect_is_reconnected_again(
    channel: str,
) -> None:
    listen = FakeListen()
    hub = EventHub(listen, channel, reconnect_initial=0.01, reconnect_max=0.01)
    async with hub.subscribe() as sub:
        for _ in range(2):
            listen.listeners[-1].on_lost()
            assert (await next_event(sub)).kind == "resync"
            assert hub.listening
    assert listen.calls == 3
    await hub.close()


async def test_received_counts_the_event_notifications(
    hub: EventHub, pg: asyncpg.Connection, channel: str
) -> None:
    async with hub.subscribe() as sub:
        before = hub.stats.received
        for _ in range(3):
            await notify(pg, channel, event())
        for _ in range(3):
            await next_event(sub)
        assert hub.stats.received == before + 3


async def test_a_listener_lost_while_reconnecting_is_replaced_again(channel: str) -> None:
    listen = FakeListen()
    hub = EventHub(listen, channel, reconnect_initial=0.01, reconnect_max=0.01)
    async with hub.subscribe() as sub:
        listen.lose_on_open = 1  # the first reconnect's connection is lost as it opens
        listen.listeners[0].on_lost()
        assert (await next_event(sub)).kind == "resync"
        assert hub.listening
        assert len(listen.listeners) == 3
        assert listen.listeners[0].closed and listen.listeners[1].closed
        assert not listen.listeners[2].closed
        assert hub.stats.reconnects == 1
        hub.publish_local(sent := event())
        assert await next_event(sub) == sent
    await hub.close()


class FirstProbeUnsentListener(HeardListener):
    """A listener whose first probe cannot be sent (the database was out of reach for a
    moment); later ones arrive."""

    async def probe(self) -> asyncio.Future[None]:
        if not self.sent:
            self.sent.append(-math.inf)
            raise OSError("connection refused")
        return await super().probe()


async def test_heartbeats_go_on_after_a_probe_that_could_not_be_sent(channel: str) -> None:
    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> FirstProbeUnsentListener:
        return FirstProbeUnsentListener(on_payload, on_lost)

    watcher = ProofWatcher()
    hub = EventHub(listen, channel, heartbeat=(0.01, 1.0), watcher=watcher)
    await hub.start()
    await eventually(lambda: any(until > -math.inf for until in watcher.until))
    await hub.close()


async def test_close_leaves_no_task_of_the_hub_running_after_reconnects(channel: str) -> None:
    opened: list[HeardListener] = []

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> HeardListener:
        opened.append(HeardListener(on_payload, on_lost))
        return opened[-1]

    hub = EventHub(
        listen, channel, heartbeat=(3600.0, 1.0), reconnect_initial=0.01, reconnect_max=0.01
    )
    async with hub.subscribe() as sub:
        for _ in range(2):
            opened[-1].on_lost()
            assert (await next_event(sub)).kind == "resync"
        # One heartbeat, however many times the connection was replaced.
        beating = [
            task
            for task in asyncio.all_tasks()
            if task.get_name() == f"integrations-events-heartbeat:{channel}" and not task.done()
        ]
        assert len(beating) == 1
    await hub.close()
    left = [
        task.get_name()
        for task in asyncio.all_tasks()
        if channel in task.get_name() and not task.done()
    ]
    assert left == []


class FailingCloseListener(FakeListener):
    """A listener whose close fails (its connection had already gone)."""

    async def close(self) -> None:
        await super().close()
        raise OSError("connection already closed")


async def test_a_listener_whose_close_fails_is_still_replaced_and_the_hub_still_closes(
    channel: str,
) -> None:
    opened: list[FailingCloseListener] = []

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> FailingCloseListener:
        opened.append(FailingCloseListener(on_payload, on_lost))
        return opened[-1]

    hub = EventHub(listen, channel, reconnect_initial=0.01, reconnect_max=0.01)
    async with hub.subscribe() as sub:
        opened[0].on_lost()
        assert (await next_event(sub)).kind == "resync"
        assert opened[0].closed and len(opened) == 2
    await hub.close()
    assert opened[1].closed and hub.closed


async def test_listener_lost_while_opening_is_replaced(channel: str) -> None:
    listen = FakeListen()
    listen.lose_on_open = 1
    hub = EventHub(listen, channel, reconnect_initial=0.01)
    async with hub.subscribe():
        await eventually(lambda: hub.listening)
        assert len(listen.listeners) == 2
        assert listen.listeners[0].closed
        assert not listen.listeners[1].closed
        assert hub.stats.reconnects == 1
    await hub.close()
    assert listen.listeners[1].closed


async def test_callback_from_a_replaced_listener_is_ignored(channel: str) -> None:
    listen = FakeListen()
    hub = EventHub(listen, channel, reconnect_initial=0.01)
    async with hub.subscribe() as sub:
        first = listen.listeners[0]
        first.on_lost()
        assert (await next_event(sub)).kind == "resync"
        assert first.closed
        first.on_lost()
        first.on_lost()
        await asyncio.sleep(0.05)
        assert hub.listening
        assert hub.stats.reconnects == 1
        assert listen.calls == 2
        assert sub.pending == 0
    await hub.close()
    assert all(listener.closed for listener in listen.listeners)


async def test_first_listen_failure_propagates_and_the_next_subscribe_retries(
    channel: str,
) -> None:
    listen = FakeListen()
    listen.fail_next = 1
    hub = EventHub(listen, channel)
    with pytest.raises(OSError, match="connection refused"):
        async with hub.subscribe():
            pass
    assert not hub.listening
    assert hub.stats.subscriptions == 0
    async with hub.subscribe():
        assert hub.listening
    await hub.close()


async def test_subscribing_during_a_reconnect_does_not_wait_for_it(channel: str) -> None:
    listen = FakeListen()
    hub = EventHub(listen, channel, reconnect_initial=0.01)
    async with hub.subscribe() as early:
        listen.gate = asyncio.Event()
        listen.listeners[0].on_lost()
        async with asyncio.timeout(1):
            late_cm = hub.subscribe()
            late = await late_cm.__aenter__()
        try:
            assert not hub.listening
            listen.gate.set()
            assert (await next_event(early)).kind == "resync"
            assert (await next_event(late)).kind == "resync"
            assert hub.listening
        finally:
            await late_cm.__aexit__(None, None, None)
    await hub.close()


# Closing


async def test_close_ends_async_for_loops(
    hub: EventHub, listen: PgListen, pg: asyncpg.Connection, channel: str
) -> None:
    received: list[str] = []
    entered = asyncio.Event()

    async def consume() -> None:
        async with hub.subscribe(owner=ALL_OWNERS) as sub:
            entered.set()
            async for ev in sub:
                received.append(ev.kind)

    consumers = [asyncio.create_task(consume()) for _ in range(3)]
    async with hub.subscribe() as waiter:
        await entered.wait()
        await eventually(lambda: hub.stats.subscriptions == 4)
        await notify(pg, channel, event("connected"))
        await next_event(waiter)
        await eventually(lambda: len(received) == 3)
        await hub.close()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*consumers)
        assert waiter.closed
        with pytest.raises(LifecycleError):
            await waiter.get()
    assert received == ["connected"] * 3
    assert not hub.listening
    assert listen.listeners[0].conn.is_closed()


async def test_hub_refuses_use_after_close(hub: EventHub) -> None:
    await hub.close()
    await hub.close()
    with pytest.raises(LifecycleError):
        async with hub.subscribe():
            pass
    with pytest.raises(LifecycleError):
        hub.publish_local(event())


async def test_leaving_the_block_closes_only_that_subscription(hub: EventHub) -> None:
    async with hub.subscribe() as kept:
        async with hub.subscribe() as left:
            pass
        assert left.closed is True
        assert kept.closed is False
        assert kept.position is None  # a live-only subscription has no cursor
        with pytest.raises(LifecycleError):
            await left.get()
        assert [ev async for ev in left] == []
        hub.publish_local(sent := event())
        assert await next_event(kept) == sent
        assert hub.stats.subscriptions == 1


async def test_close_does_not_wait_for_the_next_heartbeat(channel: str) -> None:
    opened: list[FlakyListener] = []

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> FlakyListener:
        opened.append(FlakyListener(on_payload, on_lost))
        return opened[-1]

    hub = EventHub(listen, channel, heartbeat=(3600.0, 1.0))
    await hub.start()
    # The first heartbeat is done; the next is an hour away.
    await asyncio.wait_for(opened[0].synced.wait(), TIMEOUT)
    async with asyncio.timeout(TIMEOUT):
        await hub.close()
    assert opened[0].closed


async def test_close_during_reconnect_stops_retrying(channel: str) -> None:
    listen = FakeListen()
    hub = EventHub(listen, channel, reconnect_initial=0.01, reconnect_max=0.02)
    async with hub.subscribe() as sub:
        listen.fail_next = 10**6
        listen.listeners[0].on_lost()
        await eventually(lambda: listen.calls > 3)
        await hub.close()
        calls = listen.calls
        await asyncio.sleep(0.1)
        assert listen.calls == calls
        assert [ev async for ev in sub] == []
    assert listen.listeners[0].closed


async def test_close_while_the_first_listener_opens(channel: str) -> None:
    listen = FakeListen()
    listen.gate = asyncio.Event()
    hub = EventHub(listen, channel)

    async def enter() -> None:
        async with hub.subscribe():
            pass

    task = asyncio.create_task(enter())
    await asyncio.sleep(0.02)
    await hub.close()
    listen.gate.set()
    with pytest.raises(LifecycleError):
        await task
    assert listen.listeners[0].closed
    assert not hub.listening


# Payload size


def test_realistic_payload_stays_far_below_the_notify_limit() -> None:
    realistic = Event(
        kind="refresh_failed",
        uuid=str(uuid4()),
        provider="google_workspace",
        name="finance-team-shared-mailbox",
        owner="tenant-4f1c2a/user-8812",
        status="error",
        previous_status="connected",
        actor="worker:refresh-scheduler@host-17",
        at=datetime.now(UTC),
        detail={
            "error": "invalid_grant",
            "message": "Token has been expired or revoked.",
            "attempt": 3,
            "scopes": ["openid", "email", "https://www.googleapis.com/auth/gmail.readonly"],
        },
    )
    payload = realistic.to_payload()
    assert len(payload.encode()) < 1000
    assert Event.from_payload(payload) == realistic
