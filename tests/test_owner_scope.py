"""Owner handles: another owner's connection is indistinguishable from a missing one."""

from __future__ import annotations

import asyncio
import inspect
import re
import uuid as uuid_mod
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from integrations import (
    ALL_OWNERS,
    Integrations,
    IntegrationsError,
    InvalidArgument,
    InvalidState,
    OwnerHandle,
    Validation,
)

from .conftest import store_setup

BOB_KEY = "sk-bob-secret-0123456789"

# Every uuid-addressed method of the handle, called on a uuid.
Call = Callable[[OwnerHandle, str], Awaitable[Any]]
CALLS: dict[str, Call] = {
    "rename_connection": lambda h, u: h.rename_connection(u, "stolen"),
    "remove_connection": lambda h, u: h.remove_connection(u),
    "get_integration": lambda h, u: h.get_integration(u),
    "get_integration_by_uuid": lambda h, u: h.get_integration_by_uuid(u),
    "resolve_to_uuid": lambda h, u: h.resolve_to_uuid(u),
    "get_credentials": lambda h, u: h.get_credentials(u),
    # Another owner's connection has no records in this scope, as a missing one has none.
    "audit": lambda h, u: h.audit(uuid=u),
    "is_connected": lambda h, u: h.is_connected(u),
    "save_setup": lambda h, u: h.save_setup(u, {"api_key": "sk-alice-overwrite-0123"}),
    "import_tokens": lambda h, u: h.import_tokens(u, {"access_token": "x"}),
    "disconnect": lambda h, u: h.disconnect(u),
    "record_validation": lambda h, u: h.record_validation(u, (False, "hijacked")),
    "validate_connection": lambda h, u: h.validate_connection(u),
    "authenticated_request": lambda h, u: h.authenticated_request(
        u, "GET", "https://api.openai.com/v1/models"
    ),
    "access_token": lambda h, u: h.access_token(u),
    "refresh_access_token": lambda h, u: h.refresh_access_token(u),
    "begin_authorization": lambda h, u: h.begin_authorization(u, "https://app.example/cb"),
    "authorization_url": lambda h, u: h.authorization_url(u, "https://app.example/cb"),
    "exchange_code": lambda h, u: h.exchange_code(u, "code", "https://app.example/cb"),
    "connect_interactive": lambda h, u: h.connect_interactive(u, timeout=5),
    "start_device_authorization": lambda h, u: h.start_device_authorization(u),
    "complete_device_authorization": lambda h, u: h.complete_device_authorization(u),
}

# The administrator's methods that take an owner but are not offered to one.
ADMIN_ONLY = {"check_all", "legacy_upsert"}


def _methods(cls: type) -> dict[str, Any]:
    return {
        name: getattr(cls, name)
        for name in dir(cls)
        if not name.startswith("_") and inspect.isfunction(getattr(cls, name))
    }


def test_the_handle_is_the_facade_with_the_owner_fixed() -> None:
    handle, facade = _methods(OwnerHandle), _methods(Integrations)
    assert handle.keys() - facade.keys() == set()
    takes_owner = {
        name
        for name, method in facade.items()
        if (p := inspect.signature(method).parameters.get("owner")) and p.kind is p.KEYWORD_ONLY
    }
    assert takes_owner - handle.keys() == ADMIN_ONLY
    for name, method in handle.items():
        door = facade[name]
        signature = inspect.signature(door)
        fixed = [p for p in signature.parameters.values() if p.name != "owner"]
        assert signature.replace(parameters=fixed) == inspect.signature(method), name
        assert inspect.iscoroutinefunction(door) is inspect.iscoroutinefunction(method), name
        assert inspect.getdoc(method), name
        assert inspect.getdoc(door) == inspect.getdoc(method), name


def test_the_facade_forwards_each_scoped_method_to_its_one_implementation() -> None:
    for name in _methods(OwnerHandle):
        source = inspect.getsource(getattr(Integrations, name))
        body = source[source.index('"""', source.index('"""') + 3) :]
        forwards = rf"(self\._in\(owner\)|self\._system)\.{name}\(|request\(\s*self\._in\(owner\)"
        assert re.search(forwards, body), f"Integrations.{name} does not forward to Scoped.{name}"


def test_every_uuid_method_of_the_handle_is_tried_on_another_owners_connection() -> None:
    by_uuid = {
        name
        for name, method in _methods(OwnerHandle).items()
        if list(inspect.signature(method).parameters)[1:2] == ["uuid"]
    }
    assert by_uuid - CALLS.keys() == set()


async def _outcome(call: Awaitable[Any], uuid: str) -> tuple[str, Any]:
    """What the caller can observe, with the uuid it passed in (echoed back) blanked."""
    try:
        value = await call
    except IntegrationsError as exc:
        return "error", (type(exc).__name__, exc.code, exc.message.replace(uuid, "<uuid>"))
    if isinstance(value, Validation):
        return "value", (value.ok, value.message)
    return "value", value


async def _table(db: asyncpg.Connection) -> list[Any]:
    return [
        tuple(r)
        for r in await db.fetch(
            "SELECT uuid, owner, key, value_json::text, version FROM integrations.connections "
            "ORDER BY uuid"
        )
    ]


async def _no_event_so_far(integ: Integrations, events: Any) -> None:
    """No event was emitted before now: the next to arrive is a sentinel's, made now (a
    subscription gets the events in the order they were made)."""
    name = "sentinel-" + uuid_mod.uuid4().hex[:8]
    sentinel = await integ.add_connection("openai", name, owner="user:sentinel")
    first = await asyncio.wait_for(events.get(), 5)
    assert first.uuid == sentinel.uuid, f"an event was emitted: {first.kind}"


@pytest.mark.parametrize("method", sorted(CALLS))
async def test_another_owners_connection_looks_missing(
    integ: Integrations, db: asyncpg.Connection, method: str
) -> None:
    bob = await integ.add_connection("openai", "default", owner="user:bob")
    await store_setup(integ, bob.uuid, {"api_key": BOB_KEY})
    google = await integ.add_connection("google", "default", owner="user:bob")
    await integ.save_setup(google.uuid, {"client_id": "cid", "client_secret": "cs-0123456789"})
    alice = integ.for_owner("user:alice")
    target = google.uuid if "authorization" in method or method == "exchange_code" else bob.uuid
    before = await _table(db)
    async with integ.subscribe(owner=ALL_OWNERS) as events:
        crossed = await _outcome(CALLS[method](alice, target), target)
        nobody = str(uuid_mod.uuid4())
        missing = await _outcome(CALLS[method](alice, nobody), nobody)
        assert await _table(db) == before
        await _no_event_so_far(integ, events)
    assert crossed == missing
    assert BOB_KEY not in repr(crossed)


async def test_an_owner_handles_subscriptions_stay_in_its_owners_scope(
    integ: Integrations,
) -> None:
    bob = await integ.add_connection("openai", "default", owner="user:bob")
    system, alice = integ.for_owner(None), integ.for_owner("user:alice")
    async with (
        system.subscribe(uuid=bob.uuid) as system_by_uuid,
        system.subscribe() as system_all,
        alice.subscribe(uuid=bob.uuid) as alice_by_uuid,
        alice.subscribe() as alice_all,
        integ.for_owner("user:bob").subscribe(uuid=bob.uuid) as bobs,
        integ.subscribe(uuid=bob.uuid) as administrators,
    ):
        await integ.save_setup(bob.uuid, {"api_key": BOB_KEY})
        assert (await asyncio.wait_for(bobs.get(), 5)).uuid == bob.uuid
        # The administrator watching a uuid sees it whoever owns it; a handle never does.
        assert (await asyncio.wait_for(administrators.get(), 5)).uuid == bob.uuid
        # Later changes in the foreign scopes: each one's first event must be its own.
        alices = await alice.add_connection("openai", "default")
        systems = await system.add_connection("openai", "default")
        assert (await asyncio.wait_for(alice_all.get(), 5)).uuid == alices.uuid
        assert (await asyncio.wait_for(system_all.get(), 5)).uuid == systems.uuid
        # The hub hands each event to every subscription at once: bob's came before these.
        assert (system_by_uuid.pending, alice_by_uuid.pending) == (0, 0)


async def test_the_owner_sees_and_changes_its_own(integ: Integrations) -> None:
    alice = integ.for_owner("user:alice")
    mine = await alice.add_connection("openai", "default")
    assert mine.owner == "user:alice"
    await alice.save_setup(mine.uuid, {"api_key": "sk-alice-0123456789"})
    assert (await alice.get_credentials("openai"))["api_key"] == "sk-alice-0123456789"
    assert (await alice.get_credentials(mine.uuid))["api_key"] == "sk-alice-0123456789"
    assert [c.uuid for c in await alice.list_connections("openai")] == [mine.uuid]
    assert await integ.for_owner("user:bob").list_connections("openai") == []
    # The root object is the administrator: it sees every owner's rows.
    assert (await integ.get_integration_by_uuid(mine.uuid)).owner == "user:alice"


async def test_an_owner_cannot_complete_anothers_authorization(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    google = await integ.add_connection("google", "default", owner="user:bob")
    await integ.save_setup(google.uuid, {"client_id": "cid", "client_secret": "cs-0123456789"})
    bob = integ.for_owner("user:bob")
    _, state = await bob.begin_authorization(google.uuid, "https://app.example/cb")
    pending = await db.fetchval("SELECT count(*) FROM integrations.pending_authorizations")
    with pytest.raises(InvalidState):
        await integ.for_owner("user:alice").complete_authorization(state, code="abc")
    # Alice's attempt consumed nothing: the state is still bob's to use.
    assert await db.fetchval("SELECT count(*) FROM integrations.pending_authorizations") == pending


async def test_uuid_methods_of_the_root_enforce_an_explicit_owner(integ: Integrations) -> None:
    bob = await integ.add_connection("openai", "default", owner="user:bob")
    await integ.save_setup(bob.uuid, {"api_key": BOB_KEY})
    crossed = await _outcome(integ.get_credentials(bob.uuid, owner="user:alice"), bob.uuid)
    nobody = str(uuid_mod.uuid4())
    missing = await _outcome(integ.get_credentials(nobody, owner="user:alice"), nobody)
    assert crossed == missing
    assert (await integ.get_credentials(bob.uuid, owner="user:bob"))["api_key"] == BOB_KEY
    assert (await integ.get_credentials(bob.uuid))["api_key"] == BOB_KEY


async def test_legacy_upsert_with_invalid_data_leaves_nothing_behind(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    from integrations import MissingField

    before = await _table(db)
    async with integ.subscribe(owner=ALL_OWNERS) as events:
        with pytest.raises(MissingField):
            await integ.legacy_upsert("openai", "legacy", {"organization": "org-1"})
        with pytest.raises(IntegrationsError) as info:
            await integ.legacy_upsert("openai", "legacy", {"api_key": "k", "access_token": "t"})
        assert info.value.code == "invalid_attrs", info.value
        assert await _table(db) == before
        await _no_event_so_far(integ, events)
    made = await integ.legacy_upsert("openai", "legacy", {"api_key": "sk-legacy-0123456789"})
    assert made.status == "connected"


@pytest.mark.parametrize(
    "tokens",
    [
        {},
        {"access_token": ""},
        {"access_token": "at\x00"},
        {"access_token": "at", "refresh_token": "rt\n"},
        {"access_token": "at", "expires_at": "0001-01-01T00:00:00+00:00"},
        {"access_token": "at", "expires_at": "2030-01-01T00:00:00"},
        {"access_token": "at", "expires_at": "2030-01-01T00:00:00+00:00", "expires_in": 60},
        {"access_token": "at", "expires_in": -1},
        {"access_token": "at", "scope": ["a b"]},
        {"access_token": "at", "id_token": "x"},
    ],
)
async def test_import_tokens_refuses_what_a_token_cannot_be_and_writes_nothing(
    integ: Integrations, db: asyncpg.Connection, tokens: dict[str, Any]
) -> None:
    from integrations import InvalidAttrs

    google = await integ.add_connection("google", "default")
    await integ.save_setup(google.uuid, {"client_id": "cid", "client_secret": "cs-0123456789"})
    before = await _table(db)
    with pytest.raises(InvalidAttrs) as info:
        await integ.import_tokens(google.uuid, tokens)
    assert info.value.code == "invalid_attrs", info.value
    assert await _table(db) == before


async def test_import_tokens_connects_and_refuses_key_providers(integ: Integrations) -> None:
    from integrations import InvalidProviderKey

    google = await integ.add_connection("google", "default")
    await integ.save_setup(google.uuid, {"client_id": "cid", "client_secret": "cs-0123456789"})
    imported = await integ.import_tokens(
        google.uuid,
        {"access_token": "at-1", "refresh_token": "rt-1", "expires_in": 3600, "scope": "a b"},
    )
    assert imported.status == "connected"
    assert imported.data["granted_scopes"] == ["a", "b"]
    assert (await integ.access_token(google.uuid)) == "at-1"
    openai = await integ.add_connection("openai", "default")
    with pytest.raises(InvalidProviderKey):
        await integ.import_tokens(openai.uuid, {"access_token": "at"})


async def test_an_owner_handle_cannot_probe_uuids_through_add_connection(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    bob = await integ.for_owner("user:bob").add_connection("openai", "default")
    alice = integ.for_owner("user:alice")
    mine = await alice.add_connection("openai", "mine")
    before = await _table(db)
    outcomes = set()
    for chosen in (bob.uuid, mine.uuid, str(uuid_mod.uuid4()), "not-a-uuid"):
        outcomes.add(await _outcome(alice.add_connection("openai", "probe", uuid=chosen), chosen))
    # Bob's uuid, her own, a free one and a malformed one: one answer, nothing written.
    assert len(outcomes) == 1
    kind, (error, code, _message) = outcomes.pop()
    assert (kind, error, code) == ("error", "InvalidArgument", "invalid")
    assert await _table(db) == before


async def test_legacy_upsert_without_keys_leaves_no_empty_connection(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from integrations import EncryptionNotConfigured

    monkeypatch.delenv("INTEGRATIONS_KEYS", raising=False)
    async with Integrations(fresh_db) as keyless:
        db = await asyncpg.connect(fresh_db)
        try:
            before = await _table(db)
            async with keyless.subscribe(owner=ALL_OWNERS) as events:
                with pytest.raises(EncryptionNotConfigured):
                    await keyless.legacy_upsert(
                        "openai", "legacy", {"api_key": "sk-legacy-0123456789"}
                    )
                assert await _table(db) == before
                await _no_event_so_far(keyless, events)
        finally:
            await db.close()


async def test_legacy_upsert_creates_with_its_setup_in_one_write(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    async with integ.subscribe(owner=ALL_OWNERS) as events:
        made = await integ.legacy_upsert(
            "openai", "legacy", {"api_key": "sk-legacy-0123456789"}, owner="user:old"
        )
        kinds = [(await events.get()).kind for _ in range(2)]
    assert kinds == ["connection_added", "setup_saved"]
    assert (made.owner, made.status) == ("user:old", "connected")
    assert (await integ.get_credentials(made.uuid))["api_key"] == "sk-legacy-0123456789"
    version = await db.fetchval(
        "SELECT version FROM integrations.connections WHERE uuid = $1", uuid_mod.UUID(made.uuid)
    )
    assert version == 1


async def test_an_owner_handles_webhook_is_that_owners_and_the_administrators_system_wide(
    integ: Integrations,
) -> None:
    url = "http://127.0.0.1:9/hook"
    alices = await integ.for_owner("user:alice").add_webhook(url, allow_loopback=True)
    # An owner whose name reads like the sentinel is still only an owner.
    lookalike = await integ.for_owner("ALL_OWNERS").add_webhook(url, allow_loopback=True)
    systems = await integ.add_webhook(url, allow_loopback=True)
    assert (alices.owner, lookalike.owner, systems.owner) == ("user:alice", "ALL_OWNERS", None)
    assert [e.id for e in await integ.for_owner("user:alice").list_webhooks()] == [alices.id]


@pytest.mark.parametrize("scopes", ["openid", b"openid", 42, ["openid", ""], ["openid", 7]])
async def test_device_authorization_refuses_scopes_that_are_not_a_list_of_strings(
    integ: Integrations, scopes: Any
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await integ.for_owner("user:alice").start_device_authorization(
            str(uuid_mod.uuid4()), scopes=scopes
        )
    assert caught.value.code == "invalid"
    assert str(caught.value).startswith("scopes must be a sequence of non-empty strings")


async def test_the_administrator_may_give_a_new_connection_its_uuid(integ: Integrations) -> None:
    chosen = str(uuid_mod.uuid4())
    made = await integ.add_connection("openai", "imported", uuid=chosen, owner="user:bob")
    assert made.uuid == chosen
    assert (await integ.for_owner("user:bob").get_integration_by_uuid(chosen)).name == "imported"
