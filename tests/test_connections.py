"""The connection API against a real PostgreSQL: one test per documented behaviour."""

from __future__ import annotations

import asyncio
import json
import uuid as uuid_mod
from typing import Any

import asyncpg
import pytest

import integrations
from integrations import (
    AlreadyExists,
    Connection,
    Deleted,
    EmptyName,
    Integrations,
    InvalidInput,
    InvalidName,
    InvalidProviderKey,
    InvalidUUID,
    NotConfigured,
    NotFound,
    Validation,
)
from integrations._vault import Keyring, Vault

from .conftest import TEST_KEY

API_KEY = "sk-test-0123456789abcdef"


# -- add ------------------------------------------------------------------------------


async def test_add_connection_returns_a_connection_with_a_uuid7(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    assert isinstance(conn, Connection)
    assert uuid_mod.UUID(conn.uuid).version == 7
    assert (conn.provider, conn.name, conn.owner) == ("openai", "default", None)
    assert conn.data["status"] == "disconnected"


async def test_add_connection_trims_the_name(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "  work  ")
    assert conn.name == "work"


async def test_add_connection_stores_the_seed_storage_key(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    conn = await integ.add_connection("openai", "company-drive_2")
    key = await db.fetchval(
        "SELECT key FROM integrations.connections WHERE uuid = $1", uuid_mod.UUID(conn.uuid)
    )
    assert key == "integration:openai:company-drive_2"


@pytest.mark.parametrize("name", ["", "   "])
async def test_empty_name_is_refused(integ: Integrations, name: str) -> None:
    with pytest.raises(EmptyName) as info:
        await integ.add_connection("openai", name)
    assert info.value.code == "empty_name"


@pytest.mark.parametrize("name", ["-work", "_x", "a b", "a:b", "naïve", "a/b", "a.b", "x" * 101])
async def test_invalid_name_is_refused(integ: Integrations, name: str) -> None:
    with pytest.raises(InvalidName) as info:
        await integ.add_connection("openai", name)
    assert info.value.code == "invalid_name"


async def test_taken_name_is_already_exists(integ: Integrations) -> None:
    await integ.add_connection("openai", "work")
    with pytest.raises(AlreadyExists) as info:
        await integ.add_connection("openai", "work")
    assert info.value.code == "already_exists"


async def test_same_name_is_free_for_another_provider_or_owner(integ: Integrations) -> None:
    added = [
        await integ.add_connection("openai", "work"),
        await integ.add_connection("mistral", "work"),
        await integ.add_connection("openai", "work", owner="user:42"),
    ]
    assert len({c.uuid for c in added}) == 3
    assert [(c.provider, c.name, c.owner) for c in added] == [
        ("openai", "work", None),
        ("mistral", "work", None),
        ("openai", "work", "user:42"),
    ]


async def test_unknown_provider_is_refused(integ: Integrations, db: asyncpg.Connection) -> None:
    with pytest.raises(InvalidProviderKey) as info:
        await integ.add_connection("no-such-provider", "default")
    assert info.value.code == "invalid_provider_key"
    assert await db.fetchval("SELECT count(*) FROM integrations.connections") == 0


# -- rename / remove --------------------------------------------------------------------


async def test_rename_keeps_the_uuid_and_rewrites_key_and_name(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    conn = await integ.add_connection("openai", "default")
    data = await integ.rename_connection(conn.uuid, "work")
    assert data["name"] == "work"
    again = await integ.get_integration_by_uuid(conn.uuid)
    assert (again.uuid, again.name) == (conn.uuid, "work")
    key = await db.fetchval(
        "SELECT key FROM integrations.connections WHERE uuid = $1", uuid_mod.UUID(conn.uuid)
    )
    assert key == "integration:openai:work"


async def test_rename_to_the_same_name_is_a_no_op(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "work")
    data = await integ.rename_connection(conn.uuid, "work")
    assert data["name"] == "work"


async def test_rename_to_a_taken_name_is_already_exists(integ: Integrations) -> None:
    await integ.add_connection("openai", "default")
    work = await integ.add_connection("openai", "work")
    with pytest.raises(AlreadyExists):
        await integ.rename_connection(work.uuid, "default")
    assert (await integ.get_integration_by_uuid(work.uuid)).name == "work"


async def test_rename_of_a_missing_connection_is_not_configured(integ: Integrations) -> None:
    with pytest.raises(NotConfigured) as info:
        await integ.rename_connection(str(uuid_mod.uuid4()), "work")
    assert info.value.code == "not_configured"


async def test_default_can_be_renamed_and_removed(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    await integ.rename_connection(conn.uuid, "old")
    other = await integ.add_connection("openai", "default")
    await integ.remove_connection(other.uuid)
    assert [c.name for c in await integ.list_connections("openai")] == ["old"]


async def test_rename_validates_the_new_name(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "work")
    with pytest.raises(EmptyName):
        await integ.rename_connection(conn.uuid, " ")
    with pytest.raises(InvalidName):
        await integ.rename_connection(conn.uuid, "bad name")


async def test_rename_takes_the_provider_from_the_key_not_the_json(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    conn = await integ.add_connection("openai", "work")
    await db.execute(
        """UPDATE integrations.connections
           SET value_json = value_json || '{"provider": "evil:x", "name": "../../pwn"}'
           WHERE uuid = $1""",
        uuid_mod.UUID(conn.uuid),
    )
    await integ.rename_connection(conn.uuid, "renamed")
    key = await db.fetchval(
        "SELECT key FROM integrations.connections WHERE uuid = $1", uuid_mod.UUID(conn.uuid)
    )
    assert key == "integration:openai:renamed"
    listed = await integ.list_connections("openai")
    assert [(c.provider, c.name) for c in listed] == [("openai", "renamed")]


async def test_remove_connection_deletes_the_row(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "work")
    await integ.remove_connection(conn.uuid)
    assert await integ.list_connections("openai") == []
    with pytest.raises(Deleted):
        await integ.get_credentials(conn.uuid)


async def test_remove_of_a_missing_connection_is_not_configured(integ: Integrations) -> None:
    with pytest.raises(NotConfigured) as info:
        await integ.remove_connection(str(uuid_mod.uuid4()))
    # A NotFound too, for callers that catch the broader class.
    assert isinstance(info.value, NotFound)
    assert info.value.code == "not_configured"


# -- listing ---------------------------------------------------------------------------


async def test_list_connections_puts_default_first_then_by_name(integ: Integrations) -> None:
    for name in ["zeta", "alpha", "default", "Beta"]:
        await integ.add_connection("openai", name)
    await integ.add_connection("mistral", "aaa")
    names = [c.name for c in await integ.list_connections("openai")]
    assert names == ["default", "Beta", "alpha", "zeta"]


async def test_list_connections_does_not_match_providers_sharing_a_prefix(
    integ: Integrations,
) -> None:
    await integ.add_connection("openai", "default")
    await integ.add_connection("openrouter", "default")
    assert [c.provider for c in await integ.list_connections("openai")] == ["openai"]


async def test_owners_do_not_see_each_other(integ: Integrations) -> None:
    mine = await integ.add_connection("openai", "work", owner="user:1")
    await integ.add_connection("openai", "work", owner="user:2")
    await integ.add_connection("openai", "work")
    assert [c.uuid for c in await integ.list_connections("openai", owner="user:1")] == [mine.uuid]
    assert [c.owner for c in await integ.list_connections("openai")] == [None]
    assert await integ.find_uuid_by_provider_name("openai:work", owner="user:1") == mine.uuid
    with pytest.raises(NotFound) as info:
        await integ.find_uuid_by_provider_name("openai:work", owner="user:3")
    assert info.value.code == "not_found", info.value


async def test_load_all_connections_has_every_asked_key(integ: Integrations) -> None:
    await integ.add_connection("openai", "work")
    await integ.add_connection("openai", "default")
    await integ.add_connection("mistral", "x")
    loaded = await integ.load_all_connections(["openai", "mistral", "google"])
    assert set(loaded) == {"openai", "mistral", "google"}
    assert [c.name for c in loaded["openai"]] == ["default", "work"]
    assert [c.name for c in loaded["mistral"]] == ["x"]
    assert loaded["google"] == []


async def test_load_all_connections_runs_one_statement(fresh_db: str) -> None:
    statements: list[str] = []

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda record: statements.append(record.query))

    pool = await asyncpg.create_pool(fresh_db, min_size=1, max_size=2, init=init)
    try:
        async with Integrations(pool=pool, keys=TEST_KEY) as integ:
            for provider in ["openai", "mistral", "google", "slack", "github"]:
                await integ.add_connection(provider, "default")
            statements.clear()
            loaded = await integ.load_all_connections(
                ["openai", "mistral", "google", "slack", "github", "stripe"]
            )
            assert sum(len(v) for v in loaded.values()) == 5
            # The pool's own reset on release is not ours; count statements on our table.
            ours = [q for q in statements if "integrations.connections" in q]
            assert len(ours) == 1
    finally:
        await pool.close()


async def test_list_integrations_only_lists_connections_with_saved_data(
    integ: Integrations,
) -> None:
    await integ.add_connection("openai", "empty")
    saved = await integ.add_connection("openai", "saved")
    await integ.save_setup(saved.uuid, {"api_key": API_KEY})
    assert [c.uuid for c in await integ.list_integrations()] == [saved.uuid]


def test_list_providers_is_sync_and_has_the_catalogue() -> None:
    keys = {p.key for p in Integrations("postgresql://unused").list_providers()}
    assert {"google", "openai", "telegram", "smtp"} <= keys


# -- lookups ---------------------------------------------------------------------------


async def test_get_integration_by_uuid_and_by_ref(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "work")
    await integ.save_setup(conn.uuid, {"api_key": API_KEY})
    by_uuid = await integ.get_integration(conn.uuid)
    by_ref = await integ.get_integration("openai:work")
    assert by_uuid == by_ref
    assert by_uuid["api_key"] == API_KEY


async def test_get_integration_misses(integ: Integrations) -> None:
    with pytest.raises(Deleted):
        await integ.get_integration(str(uuid_mod.uuid4()))
    with pytest.raises(NotConfigured):
        await integ.get_integration("openai:nothing")
    with pytest.raises(InvalidInput) as info:
        await integ.get_integration("not a ref!")
    assert info.value.code == "invalid", info.value


async def test_get_integration_by_uuid_errors(integ: Integrations) -> None:
    with pytest.raises(InvalidUUID) as info:
        await integ.get_integration_by_uuid("not-a-uuid")
    assert info.value.code == "invalid_uuid"
    with pytest.raises(NotConfigured):
        await integ.get_integration_by_uuid(str(uuid_mod.uuid4()))


async def test_find_uuid_by_provider_name_shapes(integ: Integrations) -> None:
    default = await integ.add_connection("openai", "default")
    work = await integ.add_connection("openai", "work")
    assert await integ.find_uuid_by_provider_name("openai:work") == work.uuid
    assert await integ.find_uuid_by_provider_name("openai") == default.uuid
    assert await integ.find_uuid_by_provider_name(("openai", "work")) == work.uuid


async def test_find_uuid_never_picks_an_arbitrary_row(integ: Integrations) -> None:
    await integ.add_connection("openai", "work")
    await integ.add_connection("openai", "home")
    with pytest.raises(NotFound) as info:
        await integ.find_uuid_by_provider_name("openai")
    assert info.value.code == "not_found"


@pytest.mark.parametrize("ref", ["", ":", "openai:", ":work", "a:b:c", None, 42, ("openai",)])
async def test_find_uuid_malformed_is_invalid(integ: Integrations, ref: Any) -> None:
    with pytest.raises(InvalidInput) as info:
        await integ.find_uuid_by_provider_name(ref)
    assert info.value.code == "invalid"


async def test_resolve_to_uuid(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    assert await integ.resolve_to_uuid(conn.uuid) == conn.uuid
    assert await integ.resolve_to_uuid("openai:default") == conn.uuid
    assert await integ.resolve_to_uuid("openai") == conn.uuid
    with pytest.raises(NotFound) as raised:
        await integ.resolve_to_uuid(str(uuid_mod.uuid4()))
    assert raised.value.code == "not_found", raised.value
    with pytest.raises(NotFound) as raised:
        await integ.resolve_to_uuid("openai:other")
    assert raised.value.code == "not_found", raised.value
    for bad in ["", None, 7, b"x"]:
        with pytest.raises(InvalidInput) as info:
            await integ.resolve_to_uuid(bad)
        assert info.value.code == "invalid"


def test_settings_key_module_level_and_method() -> None:
    assert integrations.settings_key("google") == "integration:google:default"
    assert integrations.settings_key("google:personal") == "integration:google:personal"
    assert Integrations("postgresql://unused").settings_key("x:y") == "integration:x:y"


# -- credentials -----------------------------------------------------------------------


async def test_get_credentials_returns_plaintext(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    await integ.save_setup(conn.uuid, {"api_key": API_KEY})
    assert (await integ.get_credentials(conn.uuid))["api_key"] == API_KEY
    assert (await integ.get_credentials("openai"))["api_key"] == API_KEY


async def test_get_credentials_deleted_vs_not_configured(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    with pytest.raises(NotConfigured) as info:
        await integ.get_credentials(conn.uuid)
    assert info.value.code == "not_configured"
    with pytest.raises(NotConfigured):
        await integ.get_credentials("openai:missing")
    with pytest.raises(Deleted) as deleted:
        await integ.get_credentials(str(uuid_mod.uuid4()))
    assert deleted.value.code == "deleted"


async def test_is_connected(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    assert await integ.is_connected(conn.uuid) is False
    await integ.save_setup(conn.uuid, {"api_key": API_KEY})
    assert await integ.is_connected(conn.uuid) is True
    await integ.disconnect(conn.uuid)
    assert await integ.is_connected(conn.uuid) is False
    assert await integ.is_connected(str(uuid_mod.uuid4())) is False


# -- save_setup / disconnect / record_validation ------------------------------------------


async def test_save_setup_merges_and_keeps_tokens(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    conn = await integ.add_connection("google", "default")
    data = await integ.save_setup(
        conn.uuid, {"client_id": "cid", "client_secret": "csecret-123456"}
    )
    assert data["status"] == "disconnected"
    # Tokens obtained by an earlier OAuth flow must survive a later setup change.
    row = await db.fetchrow(
        "SELECT value_json::text FROM integrations.connections WHERE uuid = $1",
        uuid_mod.UUID(conn.uuid),
    )
    assert row is not None
    token = Vault(Keyring.parse(TEST_KEY)).seal_value(conn.uuid, "access_token", "tok")
    await db.execute(
        """UPDATE integrations.connections
           SET value_json = value_json || jsonb_build_object('access_token', $2::jsonb)
                            || '{"status": "connected"}'
           WHERE uuid = $1""",
        uuid_mod.UUID(conn.uuid),
        json.dumps(token),
    )
    await integ.save_setup(conn.uuid, {"client_id": "cid2"})
    creds = await integ.get_credentials(conn.uuid)
    assert creds["client_id"] == "cid2"
    assert creds["client_secret"] == "csecret-123456"
    assert creds["access_token"] == "tok"
    assert creds["status"] == "connected"


async def test_save_setup_on_a_missing_connection_is_not_configured(integ: Integrations) -> None:
    with pytest.raises(NotConfigured):
        await integ.save_setup(str(uuid_mod.uuid4()), {"api_key": API_KEY})


async def test_disconnect_oauth_keeps_client_credentials(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    conn = await integ.add_connection("google", "default")
    await integ.save_setup(conn.uuid, {"client_id": "cid", "client_secret": "csecret-123456"})
    await db.execute(
        """UPDATE integrations.connections
           SET value_json = value_json || '{"access_token": "a", "refresh_token": "r",
                                            "status": "connected"}'
           WHERE uuid = $1""",
        uuid_mod.UUID(conn.uuid),
    )
    await integ.disconnect(conn.uuid)
    creds = await integ.get_credentials(conn.uuid)
    assert creds["client_id"] == "cid"
    assert creds["client_secret"] == "csecret-123456"
    assert "access_token" not in creds and "refresh_token" not in creds
    assert creds["status"] == "disconnected"


async def test_disconnect_api_key_drops_the_key(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    await integ.save_setup(conn.uuid, {"api_key": API_KEY})
    await integ.disconnect(conn.uuid)
    data = await integ.get_integration(conn.uuid)
    assert "api_key" not in data
    assert data["status"] == "disconnected"


async def test_disconnect_bot_token_drops_the_token(integ: Integrations) -> None:
    conn = await integ.add_connection("telegram", "default")
    await integ.save_setup(conn.uuid, {"bot_token": "123456:ABCDEFGHIJKLMNOP"})
    await integ.disconnect(conn.uuid)
    assert "bot_token" not in await integ.get_integration(conn.uuid)


async def test_disconnect_of_an_unknown_uuid_is_a_no_op(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    conn = await integ.add_connection("openai", "default")
    await integ.save_setup(conn.uuid, {"api_key": "sk-0123456789abcdef"})
    rows = "SELECT uuid, version, value_json::text FROM integrations.connections ORDER BY uuid"
    before = await db.fetch(rows)
    assert await integ.disconnect(str(uuid_mod.uuid4())) is None
    assert await db.fetch(rows) == before
    assert await integ.is_connected(conn.uuid)


async def test_record_validation_always_rewrites_last_validated_at(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    await integ.record_validation(conn.uuid, Validation(False, "Invalid credentials"))
    first = (await integ.get_integration(conn.uuid))["last_validated_at"]
    await asyncio.sleep(0.01)
    await integ.record_validation(conn.uuid, Validation(False, "Invalid credentials"))
    data = await integ.get_integration(conn.uuid)
    assert data["last_validated_at"] > first
    assert data["status"] == "error"
    assert data["validation_status"] == "Invalid credentials"
    await integ.record_validation(conn.uuid, True)
    assert (await integ.get_integration(conn.uuid))["status"] == "connected"
    await integ.record_validation(conn.uuid, ("error", "Access denied"))
    data = await integ.get_integration(conn.uuid)
    assert (data["status"], data["validation_status"]) == ("error", "Access denied")
    await integ.record_validation(conn.uuid, ("ok", None))
    assert (await integ.get_integration(conn.uuid))["status"] == "connected"


async def test_record_validation_notifies_only_on_change(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    received: list[str] = []
    await db.add_listener("integrations_events", lambda *args: received.append(args[3]))
    conn = await integ.add_connection("openai", "default")
    for _ in range(3):
        await integ.record_validation(conn.uuid, (False, "Service error 500"))
    await integ.record_validation(conn.uuid, (False, "Invalid credentials"))
    # A sentinel written last: notifications arrive in commit order, so once its has come,
    # any the unchanged validations had sent would have come before it.
    await integ.rename_connection(conn.uuid, "sentinel")
    for _ in range(1500):
        kinds = [integrations.Event.from_payload(p).kind for p in received]
        if "connection_renamed" in kinds:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the sentinel's notification did not arrive")
    assert kinds == ["connection_added", "validated", "validated", "connection_renamed"]


# -- concurrency -----------------------------------------------------------------------


async def test_concurrent_writes_to_one_row_are_all_kept(fresh_db: str) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY, pool_max_size=20) as integ:
        conn = await integ.add_connection("smtp", "default")
        base = {"host": "127.0.0.1", "port": 25, "username": "u", "security": "none"}
        await integ.save_setup(conn.uuid, {**base, "password": "pw"})

        async def setup(i: int) -> None:
            await integ.save_setup(conn.uuid, {f"extra_{i}": f"value-{i}"})

        async def validate(i: int) -> None:
            await integ.record_validation(conn.uuid, (i % 2 == 0, f"check {i}"))

        jobs = [setup(i) for i in range(50)] + [validate(i) for i in range(10)]
        await asyncio.gather(*jobs)
        data = await integ.get_credentials(conn.uuid)
        # Flat keys of a credentials provider land in its credential map.
        assert all(data["credentials"][f"extra_{i}"] == f"value-{i}" for i in range(50))
        assert data["credentials"]["password"] == "pw"
        assert "last_validated_at" in data


# -- lifecycle -------------------------------------------------------------------------


async def test_second_open_and_use_after_close_are_refused(fresh_db: str) -> None:
    instance = Integrations(fresh_db, keys=TEST_KEY)
    with pytest.raises(integrations.LifecycleError):
        await instance.list_connections("openai")
    await instance.open()
    with pytest.raises(integrations.LifecycleError):
        await instance.open()
    await instance.close()
    with pytest.raises(integrations.LifecycleError) as info:
        await instance.list_connections("openai")
    assert "closed" in str(info.value)
    await instance.close()


async def test_an_injected_pool_is_never_closed(fresh_db: str) -> None:
    pool = await asyncpg.create_pool(fresh_db, min_size=1, max_size=2)
    try:
        async with Integrations(pool=pool, keys=TEST_KEY) as integ:
            await integ.add_connection("openai", "default")
        assert await pool.fetchval("SELECT count(*) FROM integrations.connections") == 1
    finally:
        await pool.close()


async def test_repr_shows_no_dsn(fresh_db: str) -> None:
    instance = Integrations("postgresql://user:hunter2-secret@127.0.0.1/x", keys=TEST_KEY)
    assert "hunter2" not in repr(instance)


async def test_a_connection_may_keep_a_uuid_from_elsewhere(
    integ: integrations.Integrations,
) -> None:
    kept = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
    conn = await integ.add_connection("openai", "moved", uuid=kept.upper())
    assert conn.uuid == kept
    assert (await integ.get_integration_by_uuid(kept)).name == "moved"
    with pytest.raises(integrations.AlreadyExists):
        await integ.add_connection("openai", "other", uuid=kept)
    with pytest.raises(integrations.InvalidUUID):
        await integ.add_connection("openai", "third", uuid="openai:default")
    names = sorted(c.name for c in await integ.list_connections("openai"))
    assert names == ["moved"]


async def test_load_all_connections_of_every_owner(integ: integrations.Integrations) -> None:
    await integ.add_connection("openai", "default", owner="bob")
    await integ.add_connection("openai", "default")
    await integ.add_connection("openai", "work", owner="alice")
    every = await integ.load_all_connections(["openai", "github"], owner=integrations.ALL_OWNERS)
    assert [(c.owner, c.name) for c in every["openai"]] == [
        (None, "default"),
        ("alice", "work"),
        ("bob", "default"),
    ]
    assert every["github"] == []
    system = await integ.load_all_connections(["openai"])
    assert [(c.owner, c.name) for c in system["openai"]] == [(None, "default")]


async def test_an_undeclared_field_named_like_a_secret_is_refused_not_stored_in_clear(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    from integrations import InvalidField

    conn = await integ.add_connection("openai", "default")
    before = await db.fetchval(
        "SELECT value_json::text FROM integrations.connections WHERE uuid = $1",
        uuid_mod.UUID(conn.uuid),
    )
    for typo in ("apikey", "api-key", "secret", "access_key", "auth_token", "password2"):
        with pytest.raises(InvalidField) as info:
            await integ.save_setup(conn.uuid, {"api_key": "sk-good-0123456789", typo: "sk-oops"})
        assert info.value.code == "invalid_field" and "sk-oops" not in info.value.message
        assert info.value.context["field"] == typo
    with pytest.raises(InvalidField, match="Did you mean 'api_key'"):
        await integ.save_setup(conn.uuid, {"apikey": "sk-oops"})
    after = await db.fetchval(
        "SELECT value_json::text FROM integrations.connections WHERE uuid = $1",
        uuid_mod.UUID(conn.uuid),
    )
    assert after == before
    # Undeclared fields that are not secrets are kept, as before.
    saved = await integ.save_setup(conn.uuid, {"api_key": "sk-good-0123456789", "region": "eu"})
    assert saved["region"] == "eu"
