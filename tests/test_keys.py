"""Keys on the normal paths: a key missing from the ring, no keys at all, the embedded key file."""

from __future__ import annotations

import json
import logging
import os
import stat
import uuid as uuid_mod
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from integrations import (
    ConfigurationError,
    EncryptionNotConfigured,
    Integrations,
    UnknownKey,
    generate_key,
)
from integrations._embedded import ensure_key_file
from integrations._vault import Keyring

LOST_KEY = generate_key()
LOST_KID = LOST_KEY.split(":")[1]
CURRENT_KEY = generate_key()
API_KEY = "sk-keys-0123456789abcdef"
PASSWORD = "smtp-password-0123456789"


@pytest.fixture(autouse=True)
def no_keys_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTEGRATIONS_KEYS", raising=False)


@pytest.fixture
async def lost(fresh_db: str) -> AsyncIterator[Integrations]:
    """Stands for the deployment that wrote the rows, with the key later lost."""
    async with Integrations(fresh_db, keys=LOST_KEY) as instance:
        yield instance


@pytest.fixture
async def current(fresh_db: str) -> AsyncIterator[Integrations]:
    async with Integrations(fresh_db, keys=CURRENT_KEY) as instance:
        yield instance


@pytest.fixture
async def found(fresh_db: str) -> AsyncIterator[Integrations]:
    """The lost key back in the ring, behind the current primary."""
    async with Integrations(fresh_db, keys=[CURRENT_KEY, LOST_KEY]) as instance:
        yield instance


async def value_of(db: asyncpg.Connection, row_uuid: str) -> dict[str, object]:
    text = await db.fetchval(
        "SELECT value_json::text FROM integrations.connections WHERE uuid = $1",
        uuid_mod.UUID(row_uuid),
    )
    result: dict[str, object] = json.loads(text)
    return result


# -- a key missing from the ring ---------------------------------------------------------


async def test_get_credentials_with_a_key_missing_from_the_ring_raises_unknown_key(
    lost: Integrations, current: Integrations
) -> None:
    conn = await lost.add_connection("openai", "default")
    await lost.save_setup(conn.uuid, {"api_key": API_KEY})
    for read in (current.get_credentials, current.get_integration):
        with pytest.raises(UnknownKey) as info:
            await read(conn.uuid)
        assert info.value.code == "unknown_key"
        assert info.value.context["kid"] == LOST_KID
        assert LOST_KID in str(info.value)
        assert API_KEY not in repr(info.value) and API_KEY[:-4] not in str(info.value)


async def test_listings_still_work_when_a_key_is_missing(
    lost: Integrations, current: Integrations
) -> None:
    conn = await lost.add_connection("openai", "default")
    await lost.save_setup(conn.uuid, {"api_key": API_KEY})
    listed = await current.list_connections("openai")
    assert listed[0].data["api_key"] == "••••" + API_KEY[-4:]
    assert (await current.get_integration_by_uuid(conn.uuid)).uuid == conn.uuid


async def test_save_setup_of_other_fields_keeps_an_undecryptable_secret(
    lost: Integrations, current: Integrations, found: Integrations, db: asyncpg.Connection
) -> None:
    conn = await lost.add_connection("openai", "default")
    await lost.save_setup(conn.uuid, {"api_key": API_KEY})
    envelope = (await value_of(db, conn.uuid))["api_key"]

    shown = await current.save_setup(conn.uuid, {"organization": "org-42"})

    assert shown["api_key"] == "••••" + API_KEY[-4:]
    assert (await value_of(db, conn.uuid))["api_key"] == envelope
    with pytest.raises(UnknownKey):
        await current.get_credentials(conn.uuid)
    # Once the key is found again, the secret is intact and the later write is there.
    creds = await found.get_credentials(conn.uuid)
    assert (creds["api_key"], creds["organization"]) == (API_KEY, "org-42")


async def test_save_setup_of_other_credentials_keeps_an_undecryptable_password(
    lost: Integrations, current: Integrations, found: Integrations, db: asyncpg.Connection
) -> None:
    conn = await lost.add_connection("smtp", "default")
    await lost.save_setup(conn.uuid, {"host": "mail.example.com", "password": PASSWORD})
    stored = await value_of(db, conn.uuid)
    envelope = stored["credentials"]["password"]  # type: ignore[index]

    await current.save_setup(conn.uuid, {"host": "smtp.example.com", "port": 2525})

    stored = await value_of(db, conn.uuid)
    assert stored["credentials"]["password"] == envelope  # type: ignore[index]
    creds = (await found.get_credentials(conn.uuid))["credentials"]
    assert (creds["password"], creds["host"], creds["port"]) == (
        PASSWORD,
        "smtp.example.com",
        2525,
    )


async def test_replacing_an_undecryptable_secret_through_save_setup(
    lost: Integrations, current: Integrations
) -> None:
    conn = await lost.add_connection("openai", "default")
    await lost.save_setup(conn.uuid, {"api_key": API_KEY})
    await current.save_setup(conn.uuid, {"api_key": "sk-re-entered-0123456789"})
    assert (await current.get_credentials(conn.uuid))["api_key"] == "sk-re-entered-0123456789"


# -- no keys ---------------------------------------------------------------------------------


async def test_a_dsn_without_keys_refuses_to_store_a_secret(
    fresh_db: str, db: asyncpg.Connection
) -> None:
    async with Integrations(fresh_db) as integ:
        conn = await integ.add_connection("openai", "default")
        before = await value_of(db, conn.uuid)
        with pytest.raises(EncryptionNotConfigured) as info:
            await integ.save_setup(conn.uuid, {"api_key": API_KEY})
        assert info.value.code == "encryption_not_configured"
        assert "keys=" in str(info.value) and 'encryption="off"' in str(info.value)
        assert API_KEY not in str(info.value)
        assert await value_of(db, conn.uuid) == before
        # Writes that hold no secret still work.
        await integ.rename_connection(conn.uuid, "renamed")
        await integ.record_validation(conn.uuid, (False, "Not configured"))
        assert (await value_of(db, conn.uuid))["name"] == "renamed"


async def test_encryption_off_stores_plaintext_and_warns_once(
    fresh_db: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="integrations")
    async with Integrations(fresh_db, encryption="off") as integ:
        first = await integ.add_connection("openai", "default")
        second = await integ.add_connection("openai", "other")
        await integ.save_setup(first.uuid, {"api_key": API_KEY})
        await integ.save_setup(second.uuid, {"api_key": API_KEY + "-2"})
        assert (await integ.get_credentials(first.uuid))["api_key"] == API_KEY
    assert (await value_of(db, first.uuid))["api_key"] == API_KEY
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert 'encryption="off"' in warnings[0].getMessage()
    assert all(API_KEY not in r.getMessage() for r in caplog.records)


async def test_keys_come_from_integrations_keys(
    fresh_db: str, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTEGRATIONS_KEYS", f"{CURRENT_KEY},{LOST_KEY}")
    async with Integrations(fresh_db) as integ:
        conn = await integ.add_connection("openai", "default")
        await integ.save_setup(conn.uuid, {"api_key": API_KEY})
    envelope = (await value_of(db, conn.uuid))["api_key"]
    assert isinstance(envelope, dict) and envelope["kid"] == CURRENT_KEY.split(":")[1]


# -- the embedded key file -------------------------------------------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    # The file must be 0600 whatever the umask, even a permissive one.
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.usefixtures("open_umask")
def test_embedded_key_file_is_created_with_mode_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "integrations"
    keys = ensure_key_file(data_dir)
    path = data_dir / "keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(Keyring.parse(keys)) == 1
    # Later starts read the same key back.
    assert ensure_key_file(data_dir) == keys
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_embedded_key_file_keeps_keys_added_by_the_operator(tmp_path: Path) -> None:
    first = ensure_key_file(tmp_path)
    added = generate_key()
    (tmp_path / "keys").write_text(f"{added}\n{first}\n", encoding="utf-8")
    ring = Keyring.parse(ensure_key_file(tmp_path))
    assert ring.ids == (added.split(":")[1], first.split(":")[1])


def test_an_empty_embedded_key_file_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigurationError) as info:
        ensure_key_file(tmp_path)
    assert info.value.code == "configuration", info.value
