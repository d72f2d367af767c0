"""Status events through the facade: every kind, across instances and processes, bounded."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aioresponses import aioresponses

import integrations
from integrations import (
    ALL_OWNERS,
    AlreadyExists,
    Event,
    Integrations,
    InvalidInput,
    InvalidProviderKey,
    InvalidUUID,
    LifecycleError,
    StorageError,
    Subscription,
)
from integrations._repository import PAYLOAD_BUDGET, event_payload

from .conftest import TEST_KEY

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0
API_KEY = "sk-event-plaintext-0123456789abcdef"
LISTENERS_SQL = """
    SELECT pid FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE 'LISTEN %'
"""


async def next_event(sub: Subscription, within: float = TIMEOUT) -> Event:
    return await asyncio.wait_for(sub.get(), within)


async def take(sub: Subscription, count: int) -> list[Event]:
    return [await next_event(sub) for _ in range(count)]


async def marker(integ: Integrations, owner: str | None = None) -> str:
    """A write whose event closes a window: anything sent before it has arrived by then."""
    return (await integ.add_connection("slack", "marker", owner=owner)).uuid


async def until_marker(sub: Subscription, uuid: str) -> list[Event]:
    seen = []
    while (ev := await next_event(sub)).uuid != uuid:
        seen.append(ev)
    return seen


@pytest.fixture
async def other(fresh_db: str) -> AsyncIterator[Integrations]:
    """A second instance on the same database: its own pool, and a listener (opened by its
    first subscription, as no row cache needs it from the start)."""
    async with Integrations(fresh_db, keys=TEST_KEY, cache=False) as instance:
        yield instance


@pytest.fixture
async def raw_payloads(db: asyncpg.Connection) -> list[str]:
    received: list[str] = []
    await db.add_listener("integrations_events", lambda *args: received.append(args[3]))
    return received


# -- the public names --------------------------------------------------------------------


def test_event_api_is_exported_with_a_sorted_all() -> None:
    for name in ("ALL_OWNERS", "Event", "HubStats", "Subscription"):
        assert name in integrations.__all__
        assert hasattr(integrations, name)
    assert integrations.__all__ == sorted(integrations.__all__)


# -- every kind carries the connection -----------------------------------------------------


async def test_a_second_instance_receives_every_kind_with_the_connection_fields(
    integ: Integrations, other: Integrations, raw_payloads: list[str]
) -> None:
    async with other.subscribe(owner=ALL_OWNERS) as sub:
        conn = await integ.add_connection("openai", "default", owner="alice", actor="ui:alice")
        await integ.rename_connection(conn.uuid, "work", actor="ui:alice")
        await integ.save_setup(conn.uuid, {"api_key": API_KEY}, actor="ui:alice")
        await integ.record_validation(conn.uuid, (False, "Invalid credentials"))
        await integ.disconnect(conn.uuid, actor="ui:bob")
        await integ.remove_connection(conn.uuid, actor="admin")
        events = await take(sub, 6)

    got = [(e.kind, e.name, e.status, e.previous_status, e.actor, dict(e.detail)) for e in events]
    assert got == [
        ("connection_added", "default", "disconnected", None, "ui:alice", {}),
        (
            "connection_renamed",
            "work",
            "disconnected",
            "disconnected",
            "ui:alice",
            {"old_name": "default", "new_name": "work"},
        ),
        ("setup_saved", "work", "connected", "disconnected", "ui:alice", {"fields": ["api_key"]}),
        (
            "validated",
            "work",
            "error",
            "connected",
            None,
            {"ok": False, "validation_status": "Invalid credentials"},
        ),
        ("disconnected", "work", "disconnected", "error", "ui:bob", {}),
        ("connection_removed", "work", "disconnected", "disconnected", "admin", {}),
    ]
    for event in events:
        assert (event.uuid, event.provider, event.owner) == (conn.uuid, "openai", "alice")
        assert isinstance(event.at, datetime)
        assert event.at.tzinfo is not None
    # The raw listener is another connection: its copies may still be on the way. A
    # sentinel written last comes after them all (commit order): then none is missing or extra.
    await integ.add_connection("openai", "sentinel")
    async with asyncio.timeout(TIMEOUT):
        while not any('"sentinel"' in p for p in raw_payloads):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert len(raw_payloads) == 7 and '"sentinel"' in raw_payloads[-1]
    assert all(len(p.encode()) < 1000 for p in raw_payloads)
    assert not any(API_KEY in p or API_KEY[-12:] in p for p in raw_payloads)


async def test_events_never_carry_secrets(integ: Integrations, raw_payloads: list[str]) -> None:
    google = await integ.add_connection("google", "default")
    await integ.save_setup(google.uuid, {"client_id": "cid", "client_secret": "csecret-PLAIN"})
    bot = await integ.add_connection("telegram", "default")
    await integ.save_setup(bot.uuid, {"bot_token": "123456:BOT-PLAIN-TOKEN"})
    async with asyncio.timeout(TIMEOUT):
        while len(raw_payloads) < 4:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    text = "\n".join(raw_payloads)
    for plain in ("csecret-PLAIN", "BOT-PLAIN-TOKEN"):
        assert plain not in text


# -- delivery --------------------------------------------------------------------------------


async def test_delivery_to_another_process(integ: Integrations, fresh_db: str) -> None:
    child = textwrap.dedent(
        """
        import asyncio, json, sys
        from integrations import ALL_OWNERS, Integrations

        async def main():
            async with Integrations(sys.argv[1]) as integ:
                async with integ.subscribe(owner=ALL_OWNERS) as sub:
                    print("ready", flush=True)
                    async for ev in sub:
                        print(json.dumps({
                            "kind": ev.kind, "uuid": ev.uuid, "name": ev.name,
                            "owner": ev.owner, "status": ev.status, "actor": ev.actor,
                        }), flush=True)
                        if ev.kind == "connection_removed":
                            break

        asyncio.run(main())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "INTEGRATIONS_KEYS": TEST_KEY}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "error",
        "-c",
        child,
        fresh_db,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"ready\n"
        conn = await integ.add_connection("openai", "default", owner="carol", actor="cli")
        await integ.save_setup(conn.uuid, {"api_key": API_KEY}, actor="cli")
        await integ.remove_connection(conn.uuid, actor="cli")
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert API_KEY not in out.decode()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert lines == [
        {
            "kind": kind,
            "uuid": conn.uuid,
            "name": "default",
            "owner": "carol",
            "status": status,
            "actor": "cli",
        }
        for kind, status in [
            ("connection_added", "disconnected"),
            ("setup_saved", "connected"),
            ("connection_removed", "connected"),
        ]
    ]


async def test_without_the_cache_the_listener_opens_on_the_first_subscription(
    fresh_db: str, db: asyncpg.Connection
) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY, cache=False) as uncached:
        assert await db.fetch(LISTENERS_SQL) == []
        assert not uncached.event_stats.listening
        async with uncached.subscribe():
            assert len(await db.fetch(LISTENERS_SQL)) == 1


async def test_the_listener_opens_at_open_and_is_shared(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    # The row cache needs every change notice from the start.
    assert len(await db.fetch(LISTENERS_SQL)) == 1
    assert integ.event_stats.listening
    async with integ.subscribe() as first, integ.subscribe(owner=ALL_OWNERS) as second:
        assert len(await db.fetch(LISTENERS_SQL)) == 1
        assert integ.event_stats.listening
        assert integ.event_stats.subscriptions == 2
        conn = await integ.add_connection("openai", "default")
        assert (await next_event(first)).uuid == conn.uuid
        assert (await next_event(second)).uuid == conn.uuid


async def test_events_for_one_connection_arrive_in_commit_order(
    integ: Integrations, other: Integrations
) -> None:
    first = await integ.add_connection("openai", "first")
    second = await integ.add_connection("openai", "second")
    steps = 60

    async def write(uuid: str) -> None:
        for step in range(steps):
            await integ.record_validation(uuid, (False, f"step {step}"))

    async with other.subscribe(kinds=["validated"]) as sub:
        # Two writers at once interleave the connections on the wire.
        await asyncio.gather(write(first.uuid), write(second.uuid))
        events = await take(sub, 2 * steps)
    for conn in (first, second):
        seen = [e.detail["validation_status"] for e in events if e.uuid == conn.uuid]
        assert seen == [f"step {step}" for step in range(steps)]


# -- filters and scopes -------------------------------------------------------------------


async def test_owner_scopes_are_isolated(integ: Integrations) -> None:
    async with (
        integ.subscribe() as system,
        integ.subscribe(owner="alice") as alice,
        integ.subscribe(owner=ALL_OWNERS) as everyone,
    ):
        mine = await integ.add_connection("openai", "default")
        hers = await integ.add_connection("openai", "default", owner="alice")
        theirs = await integ.add_connection("openai", "default", owner="bob")
        system_end = await marker(integ)
        alice_end = await marker(integ, owner="alice")
        assert [e.uuid for e in await until_marker(system, system_end)] == [mine.uuid]
        assert [e.uuid for e in await until_marker(alice, alice_end)] == [hers.uuid]
        seen = await take(everyone, 5)
    assert [e.uuid for e in seen] == [mine.uuid, hers.uuid, theirs.uuid, system_end, alice_end]
    assert [e.owner for e in seen] == [None, "alice", "bob", None, "alice"]


async def test_provider_uuid_and_kind_filters(integ: Integrations) -> None:
    target = await integ.add_connection("openai", "default")
    async with (
        integ.subscribe(provider="openai") as by_provider,
        integ.subscribe(uuid=target.uuid.upper()) as by_uuid,
        integ.subscribe(kinds=["setup_saved"]) as by_kind,
    ):
        other = await integ.add_connection("openai", "other")
        await integ.save_setup(target.uuid, {"api_key": API_KEY})
        end = await marker(integ)
        await integ.save_setup(end, {"client_id": "cid", "client_secret": "csecret-2"})
        assert [e.uuid for e in await take(by_provider, 2)] == [other.uuid, target.uuid]
        assert [e.kind for e in await take(by_uuid, 1)] == ["setup_saved"]
        assert [e.uuid for e in await take(by_kind, 2)] == [target.uuid, end]
        assert by_provider.pending == by_uuid.pending == by_kind.pending == 0


async def test_subscribe_checks_its_arguments_before_async_with(other: Integrations) -> None:
    integ = other
    with pytest.raises(InvalidUUID):
        integ.subscribe(uuid="not-a-uuid")
    with pytest.raises(InvalidProviderKey):
        integ.subscribe(provider="no-such-provider")
    with pytest.raises(InvalidInput) as info:
        integ.subscribe(owner="  ")
    assert info.value.code == "invalid", info.value
    with pytest.raises(ValueError) as info:
        integ.subscribe(kinds=["exploded"])
    assert info.value.code == "invalid", info.value
    with pytest.raises(TypeError) as info:
        integ.subscribe(kinds="validated")
    assert info.value.code == "invalid", info.value
    with pytest.raises(ValueError) as info:
        integ.subscribe(maxsize=0)
    assert info.value.code == "invalid", info.value
    for bad_uuid in (123, "", "0" * 35):
        with pytest.raises(InvalidUUID):
            integ.subscribe(uuid=bad_uuid)  # type: ignore[arg-type]
    for bad_owner in (7, "", "x" * 256):
        with pytest.raises(InvalidInput) as info:
            integ.subscribe(owner=bad_owner)  # type: ignore[arg-type]
        assert info.value.code == "invalid", info.value
    with pytest.raises(InvalidProviderKey):
        integ.subscribe(provider=7)  # type: ignore[arg-type]
    assert integ.event_stats.subscriptions == 0
    assert not integ.event_stats.listening


async def test_subscribe_needs_an_open_instance(fresh_db: str) -> None:
    instance = Integrations(fresh_db, keys=TEST_KEY)
    with pytest.raises(LifecycleError):
        instance.subscribe()
    async with instance:
        pass
    with pytest.raises(LifecycleError):
        instance.subscribe()
    with pytest.raises(LifecycleError):
        _ = instance.event_stats


# -- gating ------------------------------------------------------------------------------------


async def test_validated_only_when_status_or_message_changed(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    async with integ.subscribe(kinds=["validated", "connection_added"]) as sub:
        for _ in range(3):
            await integ.record_validation(conn.uuid, (False, "Service error 500"))
        await integ.record_validation(conn.uuid, (False, "Invalid credentials"))
        for _ in range(2):
            await integ.record_validation(conn.uuid, True)
        end = await marker(integ)
        seen = await until_marker(sub, end)
    assert [(e.status, e.previous_status, e.detail["validation_status"]) for e in seen] == [
        ("error", "disconnected", "Service error 500"),
        ("error", "error", "Invalid credentials"),
        ("connected", "error", "ok"),
    ]


async def test_validate_connection_sends_validated_with_its_actor(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    await integ.save_setup(conn.uuid, {"api_key": API_KEY})
    probe = "https://api.openai.com/v1/models"
    async with integ.subscribe(kinds=["validated"]) as sub:
        with aioresponses() as mock:
            mock.get(probe, status=401, payload={"error": "bad key"}, repeat=True)
            first = await integ.validate_connection(conn.uuid, actor="ui:check")
            again = await integ.validate_connection(conn.uuid, actor="ui:check")
        event = await next_event(sub)
        end = await marker(integ)
        await integ.record_validation(end, True)
        assert (await next_event(sub)).uuid == end
    assert not first.ok and not again.ok
    assert (event.uuid, event.actor) == (conn.uuid, "ui:check")
    assert (event.previous_status, event.status) == ("connected", "error")
    assert event.detail == {"ok": False, "validation_status": first.message}


async def test_repeated_refresh_failures_are_sent_once(fresh_db: str) -> None:
    from .oauth_server import OAuthTestServer
    from .oauthkit import connect, open_integrations

    async with (
        OAuthTestServer() as server,
        open_integrations(fresh_db, server.base_url) as integ,
    ):
        uuid = await connect(integ)
        async with integ.subscribe(uuid=uuid) as sub:
            server.config.force_invalid_client = True
            for _ in range(4):
                with pytest.raises(integrations.ReauthRequired):
                    await integ.refresh_access_token(uuid)
            server.config.force_invalid_client = False
            await integ.refresh_access_token(uuid)
            seen = await take(sub, 3)
            await integ.remove_connection(uuid)
            assert (await next_event(sub)).kind == "connection_removed"
    assert [(e.kind, e.status, e.previous_status) for e in seen] == [
        ("refresh_failed", "error", "connected"),
        ("recovered", "connected", "error"),
        ("token_refreshed", "connected", "error"),
    ]
    assert seen[0].detail["reauth_required"] is True
    assert "invalid_client" in seen[0].detail["validation_status"]


# -- back-pressure -------------------------------------------------------------------------


async def test_overflow_drops_the_oldest_and_counts_them(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    async with integ.subscribe(maxsize=3) as small, integ.subscribe() as witness:
        for step in range(10):
            await integ.record_validation(conn.uuid, (False, f"step {step}"))
        await take(witness, 10)
        assert small.dropped == 7
        assert small.pending == 3
        kept = [(await small.get()).detail["validation_status"] for _ in range(3)]
        assert kept == ["step 7", "step 8", "step 9"]
        assert witness.dropped == 0


async def test_a_slow_subscriber_never_holds_up_writers(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    async with integ.subscribe(maxsize=1) as never_read:
        async with asyncio.timeout(TIMEOUT):
            for step in range(50):
                await integ.record_validation(conn.uuid, (False, f"step {step}"))
        end = await marker(integ)
        async with asyncio.timeout(TIMEOUT):
            while never_read.dropped < 50:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert (await never_read.get()).uuid == end


# -- payload size ------------------------------------------------------------------------------


async def test_a_huge_message_is_trimmed_and_the_write_still_succeeds(
    integ: Integrations, raw_payloads: list[str]
) -> None:
    conn = await integ.add_connection("openai", "default")
    message = "upstream said: " + "x" * 20_000
    async with integ.subscribe(kinds=["validated"]) as sub:
        await integ.record_validation(conn.uuid, (False, message))
        event = await next_event(sub)
    assert event.detail["truncated"] is True
    assert event.detail["ok"] is False
    assert event.detail["validation_status"].startswith("upstream said: xxx")
    assert len(event.detail["validation_status"]) <= 201
    async with asyncio.timeout(TIMEOUT):
        while len(raw_payloads) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert max(len(p.encode()) for p in raw_payloads) <= PAYLOAD_BUDGET
    assert (await integ.get_integration(conn.uuid))["validation_status"] == message


def test_payload_trimming_falls_back_to_a_bare_marker() -> None:
    crowded = Event(
        kind="setup_saved",
        uuid="018f0000-0000-7000-8000-000000000000",
        provider="custom",
        name="n" * 10_000,
        detail={f"field_{i}": i for i in range(2_000)},
    )
    payload = event_payload(crowded)
    assert len(payload.encode()) <= PAYLOAD_BUDGET
    parsed = Event.from_payload(payload)
    assert parsed.uuid == crowded.uuid
    assert dict(parsed.detail) == {"truncated": True}
    assert parsed.name is not None and parsed.name.startswith("nnn")
    small = Event(kind="validated", uuid=crowded.uuid, detail={"ok": True})
    assert event_payload(small) == small.to_payload()


# -- rolled-back writes ----------------------------------------------------------------------


async def test_a_rename_refused_as_already_exists_sends_nothing(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    await integ.add_connection("openai", "work")
    async with integ.subscribe() as sub:
        with pytest.raises(AlreadyExists):
            await integ.rename_connection(conn.uuid, "work")
        end = await marker(integ)
        assert await until_marker(sub, end) == []


async def test_a_write_rolled_back_at_commit_sends_nothing(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    # A deferred trigger fails the COMMIT itself, after pg_notify has already run.
    await db.execute(
        """
        CREATE FUNCTION integrations.refuse_forbidden() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.value_json->>'name' = 'forbidden' THEN
                RAISE EXCEPTION 'refused at commit';
            END IF;
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER refuse_forbidden
            AFTER UPDATE ON integrations.connections
            DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW EXECUTE FUNCTION integrations.refuse_forbidden();
        """
    )
    conn = await integ.add_connection("openai", "default")
    async with integ.subscribe() as sub:
        with pytest.raises(StorageError) as info:
            await integ.rename_connection(conn.uuid, "forbidden")
        assert info.value.code == "storage", info.value
        end = await marker(integ)
        assert await until_marker(sub, end) == []
    assert (await integ.get_integration_by_uuid(conn.uuid)).name == "default"


# -- self-healing and shutdown -----------------------------------------------------------------


async def test_terminated_listener_reconnects_and_subscribers_get_resync(
    integ: Integrations, other: Integrations, db: asyncpg.Connection
) -> None:
    async with (
        integ.subscribe() as system,
        integ.subscribe(owner="alice", kinds=["connection_added"]) as narrow,
    ):
        [old] = await db.fetch(LISTENERS_SQL)
        assert await db.fetchval("SELECT pg_terminate_backend($1)", old["pid"])
        for sub in (system, narrow):
            resync = await next_event(sub)
            assert (resync.kind, resync.uuid) == ("resync", None)
        assert integ.event_stats.reconnects == 1
        assert integ.event_stats.listening
        [new] = await db.fetch(LISTENERS_SQL)
        assert new["pid"] != old["pid"]

        conn = await other.add_connection("openai", "default", owner="alice")
        assert (await next_event(narrow)).uuid == conn.uuid
        end = await marker(other)
        assert await until_marker(system, end) == []


async def test_an_instance_gives_each_probe_of_its_listener_five_seconds(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bounds: list[float] = []
    real_wait_for = asyncio.wait_for

    async def recorded(awaitable: Any, bound: float | None) -> Any:
        if sys._getframe(1).f_code.co_name == "_probe_once":
            bounds.append(bound if bound is not None else math.inf)
        return await real_wait_for(awaitable, bound)

    monkeypatch.setattr(asyncio, "wait_for", recorded)
    # open() waits for the listener's first probe: a probe unheard for 5 seconds has the
    # connection treated as lost.
    async with Integrations(fresh_db, keys=TEST_KEY) as instance:
        assert instance.event_stats.listening
    assert bounds and bounds[0] == 5.0


async def test_closing_the_instance_ends_every_subscription(fresh_db: str) -> None:
    instance = Integrations(fresh_db, keys=TEST_KEY)
    await instance.open()
    received: list[str] = []
    entered = asyncio.Event()

    async def consume(owner: Any) -> None:
        async with instance.subscribe(owner=owner) as sub:
            entered.set()
            async for event in sub:
                received.append(event.kind)

    consumers = [asyncio.create_task(consume(owner)) for owner in (None, ALL_OWNERS)]
    await entered.wait()
    async with asyncio.timeout(TIMEOUT):
        while instance.event_stats.subscriptions < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await instance.add_connection("openai", "default")
        while len(received) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await instance.close()
        await asyncio.gather(*consumers)
    assert received == ["connection_added", "connection_added"]
