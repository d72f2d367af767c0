"""rotate_keys(): online re-encryption under the primary key, on the real database."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from integrations import (
    DecryptionFailed,
    EncryptionNotConfigured,
    Integrations,
    RotationProgress,
    TokenRequestFailed,
    UnknownKey,
    generate_key,
)
from integrations._names import storage_key, uuid7
from integrations._rotation import PKCE_FIELD
from integrations._vault import Keyring, Vault

from .conftest import store_setup
from .oauth_server import OAuthTestServer
from .oauthkit import connect, eventually, open_integrations

OLD_KEY = generate_key()
NEW_KEY = generate_key()
OLD_KID = OLD_KEY.split(":")[1]
NEW_KID = NEW_KEY.split(":")[1]

# One connection per kind of secret: top-level fields, OAuth tokens, a credentials map.
SETUPS: dict[str, dict[str, Any]] = {
    "openai": {"api_key": "sk-rotate-0123456789abcdef"},
    "google": {
        "client_id": "cid.apps.example.com",
        "client_secret": "GOCSPX-rotate-client-secret",
        "access_token": "ya29.rotate-access-token",
        "refresh_token": "1//rotate-refresh-token",
    },
    "telegram": {"bot_token": "123456:rotate-bot-token-ABCDEF"},
    "smtp": {"host": "127.0.0.1", "port": 25, "username": "u", "password": "rotate-password-1"},
    "aws": {"access_key": "AKIAROTATE", "secret_key": "rotate-secret-key-0123456789"},
}


@pytest.fixture
async def old(fresh_db: str) -> AsyncIterator[Integrations]:
    async with Integrations(fresh_db, keys=OLD_KEY) as instance:
        yield instance


@pytest.fixture
async def both(fresh_db: str) -> AsyncIterator[Integrations]:
    async with Integrations(fresh_db, keys=[NEW_KEY, OLD_KEY], pool_max_size=12) as instance:
        yield instance


@pytest.fixture
async def new_only(fresh_db: str) -> AsyncIterator[Integrations]:
    async with Integrations(fresh_db, keys=NEW_KEY) as instance:
        yield instance


async def add_all(integ: Integrations, name: str = "default") -> dict[str, str]:
    """One connection per provider in SETUPS; returns uuid by provider."""
    uuids = {}
    for provider, attrs in SETUPS.items():
        conn = await integ.add_connection(provider, name)
        await store_setup(integ, conn.uuid, attrs)
        uuids[provider] = conn.uuid
    return uuids


async def add_pending(
    db: asyncpg.Connection, connection_uuid: str, verifier: Any, *, key: str = OLD_KEY
) -> str:
    state_hash = hashlib.sha256(uuid_mod.uuid4().bytes).hexdigest()
    sealed = Vault(Keyring.parse(key)).seal_value(state_hash, PKCE_FIELD, verifier)
    await db.execute(
        """INSERT INTO integrations.pending_authorizations
               (state_hash, connection_uuid, redirect_uri, code_verifier, expires_at)
           VALUES ($1, $2, 'https://app.example.com/cb', $3::text::jsonb,
                   now() + interval '10 minutes')""",
        state_hash,
        uuid_mod.UUID(connection_uuid),
        json.dumps(sealed),
    )
    return state_hash


async def edit_api_key(db: asyncpg.Connection, uuid: str, edit: Any) -> str:
    """Store ``edit(envelope)`` as the row's api_key, as someone editing the database by
    hand would; the row's JSON text afterwards."""
    envelope = Vault(Keyring.parse(OLD_KEY)).seal_value(uuid, "api_key", "x" * 20)
    await db.execute(
        """UPDATE integrations.connections
           SET value_json = value_json || jsonb_build_object('api_key', $2::text::jsonb)
           WHERE uuid = $1""",
        uuid_mod.UUID(uuid),
        json.dumps(edit(envelope)),
    )
    text: str = await db.fetchval(
        "SELECT value_json::text FROM integrations.connections WHERE uuid = $1",
        uuid_mod.UUID(uuid),
    )
    return text


async def stored_texts(db: asyncpg.Connection) -> list[str]:
    rows = await db.fetch("SELECT value_json::text AS t FROM integrations.connections")
    pending = await db.fetch(
        "SELECT code_verifier::text AS t FROM integrations.pending_authorizations"
    )
    return [r["t"] for r in [*rows, *pending]]


def expected_plain(provider: str) -> dict[str, Any]:
    attrs = dict(SETUPS[provider])
    if provider == "smtp":
        return {"credentials": attrs}
    return attrs


def assert_contains(creds: dict[str, Any], expected: dict[str, Any]) -> None:
    for field, value in expected.items():
        if isinstance(value, dict):
            assert_contains(creds[field], value)
        else:
            assert creds[field] == value, field


# -- the happy path ----------------------------------------------------------------------


async def test_rotate_keys_moves_every_secret_to_the_new_primary(
    old: Integrations, both: Integrations, new_only: Integrations, db: asyncpg.Connection
) -> None:
    uuids = await add_all(old)
    state_hash = await add_pending(db, uuids["google"], "pkce-verifier-0123456789abcdef")
    assert all(OLD_KID in text for text in await stored_texts(db))

    result = await both.rotate_keys()

    assert result.done and result.remaining == 0
    assert (result.rotated, result.scanned, result.total) == (6, 6, 6)
    assert result.primary_kid == NEW_KID
    for text in await stored_texts(db):
        assert OLD_KID not in text
    for provider, row_uuid in uuids.items():
        assert_contains(await new_only.get_credentials(row_uuid), expected_plain(provider))
    stored = await db.fetchval(
        "SELECT code_verifier::text FROM integrations.pending_authorizations WHERE state_hash = $1",
        state_hash,
    )
    verifier = Vault(Keyring.parse(NEW_KEY)).unseal_value(
        state_hash, PKCE_FIELD, json.loads(stored)
    )
    assert verifier == "pkce-verifier-0123456789abcdef"


async def test_rotate_keys_keeps_the_rest_of_the_row(
    old: Integrations, both: Integrations, db: asyncpg.Connection
) -> None:
    uuids = await add_all(old)
    before = await both.get_credentials(uuids["google"])
    query = "SELECT uuid::text, version, updated_at FROM integrations.connections"
    before_rows = {row["uuid"]: row for row in await db.fetch(query)}
    await both.rotate_keys()
    assert await both.get_credentials(uuids["google"]) == before
    # The version moves on (writers comparing versions re-read); updated_at does not,
    # since the stored values are the same.
    for row in await db.fetch(query):
        assert row["version"] == before_rows[row["uuid"]]["version"] + 1
        assert row["updated_at"] == before_rows[row["uuid"]]["updated_at"]


async def test_rotate_keys_with_nothing_to_do(both: Integrations) -> None:
    await add_all(both)
    result = await both.rotate_keys()
    assert (result.rotated, result.scanned, result.total, result.batches) == (0, 0, 0, 0)
    assert result.done


async def test_rotate_keys_sends_no_events(
    old: Integrations, both: Integrations, db: asyncpg.Connection
) -> None:
    await add_all(old)
    received: list[str] = []
    arrived = asyncio.Event()

    def on_notification(*args: Any) -> None:
        received.append(args[3])
        arrived.set()

    await db.add_listener("integrations_events", on_notification)
    await both.rotate_keys()
    # Notifications arrive in commit order: a sentinel's, sent after, is the first to come.
    sentinel = await both.add_connection("openai", "sentinel")
    await asyncio.wait_for(arrived.wait(), 10)
    assert len(received) == 1
    assert sentinel.uuid in received[0]


# -- progress and resuming ----------------------------------------------------------------


async def test_rotate_keys_reports_progress_after_each_batch(
    old: Integrations, both: Integrations
) -> None:
    for i in range(7):
        conn = await old.add_connection("openai", f"c{i}")
        await old.save_setup(conn.uuid, {"api_key": f"sk-progress-{i:04d}-abcdefgh"})
    reports: list[RotationProgress] = []
    result = await both.rotate_keys(batch_size=3, progress=reports.append)
    assert [(r.rotated, r.scanned, r.batches, r.done) for r in reports] == [
        (3, 3, 1, False),
        (6, 6, 2, False),
        (7, 7, 3, False),
        (7, 7, 3, True),
    ]
    assert [r.remaining for r in reports] == [4, 1, 0, 0]
    assert all(r.total == 7 for r in reports)
    assert result == reports[-1]
    assert result.elapsed > 0 and result.rows_per_second > 0


async def test_rotate_keys_awaits_an_async_progress_callback(
    old: Integrations, both: Integrations
) -> None:
    await add_all(old)
    seen: list[int] = []

    async def progress(report: RotationProgress) -> None:
        await asyncio.sleep(0)
        seen.append(report.rotated)

    await both.rotate_keys(batch_size=2, progress=progress)
    assert seen == [2, 4, 5, 5]


async def test_rotate_keys_resumes_after_a_crash(
    old: Integrations, both: Integrations, new_only: Integrations
) -> None:
    uuids = []
    for i in range(10):
        conn = await old.add_connection("openai", f"c{i}")
        await old.save_setup(conn.uuid, {"api_key": f"sk-resume-{i:04d}-abcdefgh"})
        uuids.append(conn.uuid)

    class Crash(Exception):
        pass

    def crash(report: RotationProgress) -> None:
        if report.batches == 2:
            raise Crash

    with pytest.raises(Crash):
        await both.rotate_keys(batch_size=4, progress=crash)
    # The batches that committed before the crash are not done again.
    result = await both.rotate_keys(batch_size=4)
    assert (result.total, result.rotated) == (2, 2)
    for i, row_uuid in enumerate(uuids):
        assert (await new_only.get_credentials(row_uuid))["api_key"].startswith(
            f"sk-resume-{i:04d}"
        )


@pytest.mark.parametrize("batch_size", [0, -1, True, 2.5, "10"])
async def test_rotate_keys_batch_size_must_be_a_positive_integer(
    both: Integrations, batch_size: Any
) -> None:
    with pytest.raises(ValueError) as info:
        await both.rotate_keys(batch_size=batch_size)
    assert info.value.code == "invalid", info.value


# -- rows held by other transactions ---------------------------------------------------------


async def test_rotate_keys_skips_a_held_row_and_reseals_it_once_released(
    old: Integrations, fresh_db: str, db: asyncpg.Connection
) -> None:
    uuids = []
    for i in range(7):
        conn = await old.add_connection("openai", f"c{i}")
        await old.save_setup(conn.uuid, {"api_key": f"sk-held-{i:04d}-abcdefgh"})
        uuids.append(conn.uuid)
    held = sorted(uuids, key=uuid_mod.UUID)[1]
    reports: list[RotationProgress] = []
    async with Integrations(fresh_db, keys=[NEW_KEY, OLD_KEY]) as both:
        tx = db.transaction()
        await tx.start()
        await db.execute(
            "SELECT 1 FROM integrations.connections WHERE uuid = $1 FOR UPDATE",
            uuid_mod.UUID(held),
        )
        rotating = asyncio.create_task(both.rotate_keys(batch_size=3, progress=reports.append))
        # Every other row is done while the held one is waited for, alone.
        await eventually(lambda: bool(reports) and reports[-1].rotated == 6)
        assert not rotating.done()
        await tx.commit()
        result = await rotating
    assert (result.total, result.scanned, result.rotated, result.done) == (7, 7, 7, True)
    assert [r.scanned for r in reports] == sorted(r.scanned for r in reports)
    async with Integrations(fresh_db, keys=NEW_KEY) as new_only:
        for i, row_uuid in enumerate(uuids):
            assert (await new_only.get_credentials(row_uuid))["api_key"] == (
                f"sk-held-{i:04d}-abcdefgh"
            )


async def test_a_slow_refresh_does_not_make_key_rotation_cause_lock_timeouts(
    fresh_db: str,
) -> None:
    """A rotation batch does not wait behind a row whose refresh waits on the token
    endpoint while holding the rows it locked before it: a refresh of one of those
    rows goes through within its lock timeout."""
    async with OAuthTestServer() as server:
        async with open_integrations(fresh_db, server.base_url, keys=OLD_KEY) as old:
            first = await connect(old, "first")
            second = await connect(old, "second")
        assert uuid_mod.UUID(first) < uuid_mod.UUID(second)
        async with open_integrations(
            fresh_db, server.base_url, keys=[NEW_KEY, OLD_KEY], lock_timeout=1.0
        ) as integ:
            server.config.token_delay = 2.5
            slow = asyncio.create_task(integ.refresh_access_token(second))
            await eventually(lambda: server.stats.token_calls["refresh_token"] == 1)
            rotating = asyncio.create_task(integ.rotate_keys())
            # The rotation has gone through its batch, or waits on a row lock in it.
            waiting = (
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND cardinality(pg_blocking_pids(pid)) > 0"
            )
            watcher = await asyncpg.connect(fresh_db)
            try:
                await eventually(lambda: rotating.done() or watcher.fetchval(waiting))
            finally:
                await watcher.close()
            server.config.token_delay = 0.0
            try:
                await integ.refresh_access_token(first)
            except TokenRequestFailed as exc:
                pytest.fail(f"refresh of an idle connection failed during rotation: {exc.message}")
            finally:
                await asyncio.gather(slow, rotating, return_exceptions=True)
            result = rotating.result()
            assert result.rotated == result.total == 2
        async with open_integrations(fresh_db, server.base_url, keys=NEW_KEY) as new_only:
            assert (await new_only.get_integration(second))["refresh_token"]


# -- refusals -------------------------------------------------------------------------------


async def test_rotate_keys_skips_and_reports_rows_under_a_key_missing_from_the_ring(
    old: Integrations,
    new_only: Integrations,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uuids = await add_all(old)
    before = await stored_texts(db)
    with caplog.at_level(logging.WARNING, logger="integrations"):
        result = await new_only.rotate_keys()
    assert result.done
    assert result.rotated == 0
    assert sorted(result.undecryptable) == sorted(uuids.values())
    assert result.undecryptable_pending == ()
    logged = caplog.text
    assert OLD_KID in logged
    assert all(row_uuid in logged for row_uuid in uuids.values())
    # Nothing dropped: every row still decrypts with the old key.
    assert await stored_texts(db) == before
    for provider, row_uuid in uuids.items():
        assert_contains(await old.get_credentials(row_uuid), expected_plain(provider))


async def test_rotate_keys_rotates_the_rest_around_a_forged_row(
    old: Integrations, both: Integrations, db: asyncpg.Connection, fresh_db: str
) -> None:
    good = []
    for index in range(5):
        conn = await old.add_connection("openai", f"good-{index}")
        await old.save_setup(conn.uuid, {"api_key": f"sk-good-{index}-0123456789abcdef"})
        good.append(conn.uuid)
    forged = await old.add_connection("openai", "forged")
    forged_before = await edit_api_key(
        db, forged.uuid, lambda envelope: {**envelope, "kid": "deadbeef"}
    )
    seen: list[RotationProgress] = []
    result = await both.rotate_keys(progress=seen.append)
    assert result.done
    assert result.rotated == 5
    assert result.undecryptable == (forged.uuid,)
    assert seen[-1].undecryptable == (forged.uuid,)
    assert all(OLD_KID not in t for t in await stored_texts(db) if "deadbeef" not in t)
    async with Integrations(fresh_db, keys=NEW_KEY) as new_only:
        for index, row_uuid in enumerate(good):
            creds = await new_only.get_credentials(row_uuid)
            assert creds["api_key"] == f"sk-good-{index}-0123456789abcdef"
        with pytest.raises(UnknownKey):
            await new_only.get_credentials(forged.uuid)
    assert forged_before == await db.fetchval(
        "SELECT value_json::text FROM integrations.connections WHERE uuid = $1",
        uuid_mod.UUID(forged.uuid),
    )


async def test_rotate_keys_skips_and_reports_an_unknown_pkce_verifier_key(
    both: Integrations, db: asyncpg.Connection
) -> None:
    conn = await both.add_connection("google", "default")
    lost = generate_key()
    state_hash = await add_pending(db, conn.uuid, "pkce-verifier-lost-key", key=lost)
    kept = await add_pending(db, conn.uuid, "pkce-verifier-old-key")
    result = await both.rotate_keys()
    assert result.undecryptable_pending == (state_hash,)
    assert result.undecryptable == ()
    assert result.rotated == 1
    texts = await stored_texts(db)
    assert any(lost.split(":")[1] in t for t in texts)
    assert not any(OLD_KID in t for t in texts), kept


async def test_rotate_keys_skips_a_tampered_envelope(
    old: Integrations, both: Integrations, db: asyncpg.Connection
) -> None:
    conn = await old.add_connection("openai", "default")
    await old.save_setup(conn.uuid, {"api_key": "sk-tamper-0123456789abcdef"})
    other = await old.add_connection("openai", "other")
    await old.save_setup(other.uuid, {"api_key": "sk-tamper-other-0123456789"})
    # A ciphertext moved from another row must not decrypt, so it cannot be re-encrypted.
    await db.execute(
        """UPDATE integrations.connections
           SET value_json = jsonb_set(value_json, '{api_key}',
               (SELECT value_json -> 'api_key' FROM integrations.connections WHERE uuid = $2))
           WHERE uuid = $1""",
        uuid_mod.UUID(conn.uuid),
        uuid_mod.UUID(other.uuid),
    )
    result = await both.rotate_keys()
    assert result.undecryptable == (conn.uuid,)
    assert result.rotated == 1
    with pytest.raises(DecryptionFailed):
        await both.get_credentials(conn.uuid)
    assert (await both.get_credentials(other.uuid))["api_key"] == "sk-tamper-other-0123456789"


async def test_rotate_keys_without_keys_is_encryption_not_configured(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INTEGRATIONS_KEYS", raising=False)
    async with Integrations(fresh_db) as integ:
        with pytest.raises(EncryptionNotConfigured):
            await integ.rotate_keys()


async def test_rotate_keys_seals_plaintext_left_by_encryption_off(
    fresh_db: str,
    new_only: Integrations,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("INTEGRATIONS_KEYS", raising=False)
    async with Integrations(fresh_db, encryption="off") as plain:
        uuids = await add_all(plain)
    assert any("sk-rotate-0123456789abcdef" in t for t in await stored_texts(db))
    result = await new_only.rotate_keys()
    assert result.rotated == len(SETUPS)
    texts = await stored_texts(db)
    for attrs in SETUPS.values():
        for field, value in attrs.items():
            if field in {"api_key", "client_secret", "access_token", "refresh_token"} | {
                "bot_token",
                "password",
                "secret_key",
            }:
                assert all(str(value) not in t for t in texts), field
    for provider, row_uuid in uuids.items():
        assert_contains(await new_only.get_credentials(row_uuid), expected_plain(provider))
    assert (await new_only.rotate_keys()).total == 0


async def test_rotate_keys_with_encryption_off_still_moves_envelopes(
    old: Integrations, fresh_db: str, db: asyncpg.Connection
) -> None:
    uuids = await add_all(old)
    async with Integrations(fresh_db, keys=[NEW_KEY, OLD_KEY], encryption="off") as integ:
        result = await integ.rotate_keys()
    assert result.rotated == len(SETUPS)
    assert all(OLD_KID not in t for t in await stored_texts(db))
    async with Integrations(fresh_db, keys=NEW_KEY) as integ:
        for provider, row_uuid in uuids.items():
            assert_contains(await integ.get_credentials(row_uuid), expected_plain(provider))


# -- online: 5,000 rows under concurrent writers -------------------------------------------

ROWS = 5_000
WRITERS = 4


async def bulk_insert_sealed(db: asyncpg.Connection, rows: int, key: str) -> list[str]:
    """Connections as save_setup would store them under ``key``, inserted in one COPY."""
    vault = Vault(Keyring.parse(key))
    records = []
    uuids = []
    for i in range(rows):
        row_uuid = uuid7()
        data = {
            "provider": "aws",
            "name": f"r{i}",
            "auth_type": "key_secret",
            "status": "connected",
            "access_key": f"AKIA{i:08d}",
            "region": "us-east-1",
        }
        secrets = {
            "secret_key": f"secret-key-{i:06d}-initial",
            "session_token": f"session-token-{i:06d}-static",
        }
        data.update(vault.seal(row_uuid, secrets, ["session_token"]))
        records.append((uuid_mod.UUID(row_uuid), "", storage_key("aws", f"r{i}"), json.dumps(data)))
        uuids.append(row_uuid)
    await db.copy_records_to_table(
        "connections",
        schema_name="integrations",
        columns=["uuid", "owner", "key", "value_json"],
        records=records,
    )
    return uuids


async def test_rotate_keys_under_concurrent_writers_loses_nothing(
    fresh_db: str, db: asyncpg.Connection
) -> None:
    uuids = await bulk_insert_sealed(db, ROWS, OLD_KEY)
    index = {row_uuid: i for i, row_uuid in enumerate(uuids)}
    # Per row: the last secret_key its owning writer saved, and each writer's last note.
    last_secret: dict[str, str] = {}
    last_note: dict[tuple[str, int], int] = {}
    stop = asyncio.Event()
    warmed_up = asyncio.Event()
    writes = 0
    writes_during_rotation = 0
    rotating = False

    async with Integrations(fresh_db, keys=[NEW_KEY, OLD_KEY], pool_max_size=WRITERS + 2) as integ:

        async def writer(k: int) -> None:
            nonlocal writes, writes_during_rotation
            order = list(uuids)
            random.Random(k).shuffle(order)
            seq = 0
            while not stop.is_set():
                for row_uuid in order:
                    if stop.is_set():
                        break
                    seq += 1
                    attrs: dict[str, Any] = {f"note_{k}": seq}
                    # Each row's secret has one owning writer, so its final value is known;
                    # every writer touches every row, so all of them race the rotation.
                    if index[row_uuid] % WRITERS == k:
                        attrs["secret_key"] = f"secret-key-{index[row_uuid]:06d}-w{k}-{seq}"
                    await store_setup(integ, row_uuid, attrs)
                    last_note[(row_uuid, k)] = seq
                    if "secret_key" in attrs:
                        last_secret[row_uuid] = attrs["secret_key"]
                    writes += 1
                    if writes >= 50:
                        warmed_up.set()
                    if rotating:
                        writes_during_rotation += 1

        tasks = [asyncio.create_task(writer(k)) for k in range(WRITERS)]
        await warmed_up.wait()
        rotating = True
        started = time.monotonic()
        result = await integ.rotate_keys(batch_size=500)
        elapsed = time.monotonic() - started
        rotating = False
        stop.set()
        await asyncio.gather(*tasks)

    assert writes_during_rotation > 20, writes_during_rotation
    assert result.scanned >= result.rotated > ROWS * 0.9
    assert elapsed < 45

    # Every secret decrypts with the new key alone, and no write was lost.
    assert (
        await db.fetchval(
            "SELECT count(*) FROM integrations.connections WHERE value_json::text LIKE $1",
            f"%{OLD_KID}%",
        )
        == 0
    )
    new_vault = Vault(Keyring.parse(NEW_KEY))
    records = await db.fetch("SELECT uuid::text, value_json::text FROM integrations.connections")
    assert len(records) == ROWS
    for record in records:
        row_uuid = record["uuid"]
        i = index[row_uuid]
        data = new_vault.unseal(row_uuid, json.loads(record["value_json"]))
        assert data["session_token"] == f"session-token-{i:06d}-static"
        assert data["secret_key"] == last_secret.get(row_uuid, f"secret-key-{i:06d}-initial")
        for k in range(WRITERS):
            assert data.get(f"note_{k}") == last_note.get((row_uuid, k))
    async with Integrations(fresh_db, keys=NEW_KEY) as integ:
        for row_uuid in random.Random(0).sample(uuids, 200):
            creds = await integ.get_credentials(row_uuid)
            assert creds["secret_key"] == last_secret.get(
                row_uuid, f"secret-key-{index[row_uuid]:06d}-initial"
            )


@pytest.mark.parametrize(
    "edit",
    [
        lambda envelope: {**envelope, "kid": 5},  # a key id that is not text
        lambda envelope: {k: v for k, v in envelope.items() if k != "kid"},  # none at all
        lambda envelope: [envelope],  # an envelope wrapped in a list
        lambda envelope: {"inner": envelope},  # or in a map
    ],
)
async def test_rotate_keys_reports_an_envelope_edited_by_hand_and_leaves_it(
    old: Integrations, both: Integrations, db: asyncpg.Connection, edit: Any
) -> None:
    conn = await old.add_connection("openai", "edited")
    before = await edit_api_key(db, conn.uuid, edit)
    result = await both.rotate_keys()
    assert result.undecryptable == (conn.uuid,)
    after = await db.fetchval(
        "SELECT value_json::text FROM integrations.connections WHERE uuid = $1",
        uuid_mod.UUID(conn.uuid),
    )
    assert after == before
    with pytest.raises(DecryptionFailed):
        await both.get_credentials(conn.uuid)


# -- counting what is left, a step at a time -----------------------------------------------


def key_sorting(kid_test: Any) -> str:
    while True:
        key = generate_key()
        if kid_test(key.split(":")[1]):
            return key


@pytest.mark.parametrize("step", [1, 2, 3, 5, 50_000])
async def test_the_count_of_rows_left_is_exact_whatever_its_step(
    fresh_db: str,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    step: int,
) -> None:
    """Rows under a key id sorting before the primary's, after it, plaintext, and one both
    under an old key and holding plaintext: counted once each, read in steps of ``step``."""
    from integrations import _repository

    monkeypatch.delenv("INTEGRATIONS_KEYS", raising=False)
    primary = generate_key()
    pkid = primary.split(":")[1]
    below = key_sorting(lambda kid: kid < pkid)
    above = key_sorting(lambda kid: kid > pkid)
    async with Integrations(fresh_db, keys=below) as integ:
        under_below = [await integ.add_connection("openai", f"b{i}") for i in range(7)]
        for conn in under_below:
            await integ.save_setup(conn.uuid, {"api_key": f"sk-below-{conn.name}-0123456789"})
    async with Integrations(fresh_db, keys=above) as integ:
        for i in range(5):
            conn = await integ.add_connection("openai", f"a{i}")
            await integ.save_setup(conn.uuid, {"api_key": f"sk-above-a{i}-0123456789"})
    async with Integrations(fresh_db, encryption="off") as integ:
        for i in range(4):
            conn = await integ.add_connection("telegram", f"p{i}")
            await integ.save_setup(conn.uuid, {"bot_token": f"123:plain-bot-token-{i}"})
    # A row under the older key that also holds a plaintext secret is one row to visit.
    await db.execute(
        """UPDATE integrations.connections
           SET value_json = value_json || '{"bot_token": "123:plain-beside-an-envelope"}'
           WHERE uuid = $1""",
        uuid_mod.UUID(under_below[0].uuid),
    )
    monkeypatch.setattr(_repository, "RESEAL_COUNT_STEP", step)
    async with Integrations(fresh_db, keys=[primary, below, above]) as integ:
        count = await integ._repo.count_to_reseal(pkid, ["api_key", "bot_token"], True)
        assert count == 7 + 5 + 4
        reports: list[RotationProgress] = []
        done = await integ.rotate_keys(batch_size=4, progress=reports.append)
        assert (done.total, done.rotated, done.undecryptable) == (16, 16, ())
        assert {r.total for r in reports} == {16}
        assert (await integ.rotate_keys()).total == 0
        assert (await integ.get_credentials(under_below[0].uuid))["bot_token"] == (
            "123:plain-beside-an-envelope"
        )
    assert all("123:plain" not in t for t in await stored_texts(db))


async def test_a_rotation_plans_no_parallel_workers_and_no_compilation(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rotation's statements read index ranges of what is left. A planner that
    misjudges those ranges (stale statistics after a big rotation; here, costs that make
    workers and JIT compilation look free) must not start workers or compile: at a million
    rows that cost a pass with nothing left ten times the pass at a thousand. Every
    statement of two passes (one with work, one with none) is explained where it runs,
    inside the rotation's own transaction."""
    from asyncpg.connection import Connection

    monkeypatch.delenv("INTEGRATIONS_KEYS", raising=False)
    async with Integrations(fresh_db, keys=OLD_KEY) as integ:
        for i in range(6):
            conn = await integ.add_connection("openai", f"r{i}")
            await integ.save_setup(conn.uuid, {"api_key": f"sk-rotate-{i}-0123456789"})
    plans: list[str] = []
    favour_workers_and_jit = (
        "SET LOCAL jit_above_cost = 0; SET LOCAL parallel_setup_cost = 0; "
        "SET LOCAL parallel_tuple_cost = 0; SET LOCAL min_parallel_table_scan_size = 0; "
        "SET LOCAL min_parallel_index_scan_size = 0"
    )

    original_fetch = Connection.fetch

    def explaining(name: str) -> Any:
        run = getattr(Connection, name)

        async def call(self: Connection, query: str, *args: Any, **kwargs: Any) -> Any:
            if self.is_in_transaction() and ("envelope_kids(" in query or "plain_fields(" in query):
                await self.execute(favour_workers_and_jit)
                plan = await original_fetch(self, "EXPLAIN " + query, *args)
                plans.append("\n".join(r[0] for r in plan))
            return await run(self, query, *args, **kwargs)

        return call

    for name in ("fetch", "fetchrow", "fetchval"):
        monkeypatch.setattr(Connection, name, explaining(name))
    async with Integrations(fresh_db, keys=[NEW_KEY, OLD_KEY]) as integ:
        assert (await integ.rotate_keys(batch_size=4)).rotated == 6
        assert (await integ.rotate_keys()).total == 0
    # Counts, batches and the plaintext look-up, in both passes.
    assert len(plans) >= 10
    assert [p for p in plans if "Gather" in p or "JIT" in p] == []
