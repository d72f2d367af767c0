"""A token response that arrived is never lost: the database cut between answer and commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys
import uuid as uuid_mod
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from integrations import Integrations

from .faultproxy import FaultProxy
from .oauth_server import OAuthTestServer
from .oauthkit import (
    client_credentials_provider,
    connect,
    eventually,
    open_integrations,
    set_stored_expiry,
)

RUNS = 5


@pytest.fixture
async def server() -> AsyncIterator[OAuthTestServer]:
    async with OAuthTestServer() as srv:
        yield srv


@pytest.fixture
async def proxy(fresh_db: str) -> AsyncIterator[FaultProxy]:
    parts = urlsplit(fresh_db)
    async with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as running:
        yield running


async def _stored_token(fresh_db: str, server: OAuthTestServer, uuid: str) -> str:
    """The access token in the row, read by another instance straight from the database."""
    async with open_integrations(fresh_db, server.base_url) as reader:
        token = (await reader.get_integration(uuid))["access_token"]
    assert isinstance(token, str)
    return token


async def _cut_during_refresh(
    integ: Integrations, server: OAuthTestServer, proxy: FaultProxy, uuid: str
) -> str:
    """A refresh whose token request is answered while the database is cut."""
    server.config.token_delay = 0.5
    calls = server.stats.token_calls["refresh_token"]
    # Enough open pool connections that every caller has read the row before the cut.
    await asyncio.gather(*(integ.get_integration(uuid) for _ in range(3)))
    refresh = asyncio.gather(*(integ.refresh_access_token(uuid) for _ in range(3)))
    await eventually(lambda: server.stats.token_calls["refresh_token"] > calls)
    proxy.cut()
    # Every caller waiting on the refresh is served, although its write failed.
    tokens = await asyncio.wait_for(refresh, 10)
    assert len(set(tokens)) == 1
    assert server.stats.token_calls["refresh_token"] == calls + 1
    server.config.token_delay = 0.0
    return tokens[0]


@contextlib.asynccontextmanager
async def _refresh_cut_with_bound(
    fresh_db: str,
    server: OAuthTestServer,
    proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
    bound: float,
) -> AsyncIterator[tuple[Integrations, str, str]]:
    """An instance that tries a token write again for ``bound`` seconds, its connection,
    and the token of a refresh answered while the database was cut (still cut); the
    library's records captured from INFO up."""
    caplog.set_level(logging.INFO, logger="integrations")
    async with open_integrations(
        proxy.dsn(fresh_db), server.base_url, token_write_retry=bound
    ) as integ:
        uuid = await connect(integ)
        yield integ, uuid, await _cut_during_refresh(integ, server, proxy, uuid)


def _gave_up(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "gave up storing" in r.getMessage()]


async def test_a_refresh_cut_between_answer_and_commit_keeps_the_grant(
    fresh_db: str, server: OAuthTestServer, proxy: FaultProxy
) -> None:
    kept = 0
    async with open_integrations(proxy.dsn(fresh_db), server.base_url) as integ:
        uuid = await connect(integ)
        for _ in range(RUNS):
            token = await _cut_during_refresh(integ, server, proxy, uuid)
            assert server.token_status(token) == "active"
            assert await _stored_token(fresh_db, server, uuid) != token
            await asyncio.sleep(0.3)
            proxy.restore()
            await eventually(partial(_stored_is, fresh_db, server, uuid, token))
            after = await integ.refresh_access_token(uuid)
            assert after != token
            response = await integ.authenticated_request(
                uuid, "GET", f"{server.base_url}/api/resource"
            )
            if (
                response.status == 200
                and server.stats.grants_revoked == 0
                and server.stats.refresh_reuse_detected == 0
            ):
                kept += 1
    print(f"\nrefreshes cut between answer and commit: {proxy.cuts}; grant kept: {kept}")
    assert proxy.cuts == RUNS
    assert kept == RUNS
    assert server.stats.refresh_reuse_detected == 0


async def _stored_is(fresh_db: str, server: OAuthTestServer, uuid: str, token: str) -> bool:
    return await _stored_token(fresh_db, server, uuid) == token


async def test_close_waits_for_a_write_being_retried(
    fresh_db: str, server: OAuthTestServer, proxy: FaultProxy
) -> None:
    integ = Integrations(
        proxy.dsn(fresh_db),
        keys=_key(),
        providers=[_loopback(server)],
        token_backoff=0.01,
        token_write_retry=30,
    )
    await integ.open()
    uuid = await connect(integ)
    token = await _cut_during_refresh(integ, server, proxy, uuid)
    closing = asyncio.create_task(integ.close())
    await asyncio.sleep(0.5)
    assert not closing.done(), "close() waits for the tokens to be stored"
    proxy.restore()
    await asyncio.wait_for(closing, 10)
    assert await _stored_token(fresh_db, server, uuid) == token
    assert server.stats.refresh_reuse_detected == 0


async def test_a_failed_write_is_tried_again_after_waits_that_double(
    fresh_db: str,
    server: OAuthTestServer,
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="integrations")
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded(delay: float, *args: Any) -> Any:
        if sys._getframe(1).f_code.co_name == "_persist":
            waits.append(delay)
        return await real_sleep(delay, *args)

    async with open_integrations(
        proxy.dsn(fresh_db), server.base_url, token_write_retry=30
    ) as integ:
        uuid = await connect(integ)
        monkeypatch.setattr(asyncio, "sleep", recorded)
        token = await _cut_during_refresh(integ, server, proxy, uuid)
        await eventually(lambda: len(waits) >= 6, within=30)
        proxy.restore()
        await eventually(partial(_stored_is, fresh_db, server, uuid, token), within=30)
        monkeypatch.undo()
    assert waits[:6] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
    # The write in the refresh itself was the first attempt; each wait came before another.
    stored = [r.getMessage() for r in caplog.records if "stored the tokens of" in r.getMessage()]
    assert stored == [
        f"stored the tokens of connection {uuid}'s refresh at attempt {len(waits) + 1}"
    ]


async def _refuse_new_expiry(db: asyncpg.Connection, uuid: str) -> None:
    """Make PostgreSQL refuse any write of new tokens to the row (a later expiry than the
    stored one), while writes that leave the tokens alone still succeed."""
    stored = await db.fetchval(
        "SELECT value_json->>'expires_at' FROM integrations.connections WHERE uuid = $1",
        uuid_mod.UUID(uuid),
    )
    assert isinstance(stored, str) and "'" not in stored
    await db.execute(
        "ALTER TABLE integrations.connections ADD CONSTRAINT no_new_tokens CHECK "
        f"(value_json->>'expires_at' IS NULL OR value_json->>'expires_at' <= '{stored}') "
        "NOT VALID"
    )


def provider_of(integ: Integrations, row: Any) -> Any:
    return integ._s.core.provider_of(row)


async def test_a_401_while_new_tokens_wait_for_their_write_gets_them_at_once(
    fresh_db: str, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    async with open_integrations(fresh_db, server.base_url, token_write_retry=30) as integ:
        uuid = await connect(integ)
        row = await integ._s.core.repo.get(uuid)
        assert row is not None
        stored = (await integ.get_integration(uuid))["access_token"]
        await _refuse_new_expiry(db, uuid)
        unstored = await integ.refresh_access_token(uuid)
        assert integ._s.tokens._unstored  # its write is being tried again
        # A 401 for any other token (the one stored, or older ones) is answered with the
        # tokens not stored yet, without waiting for their write.
        for rejected in (stored, "at_!", "at_~"):
            retry_with = integ._s.tokens.after_rejection(row, rejected)
            assert await asyncio.wait_for(retry_with, 5) == unstored
        # So is a caller whose stored token is due.
        await db.execute(
            "UPDATE integrations.connections SET value_json = jsonb_set(value_json, "
            "'{expires_at}', to_jsonb('2000-01-01T00:00:00+00:00'::text)) WHERE uuid = $1",
            uuid_mod.UUID(uuid),
        )
        expired = await integ._s.core.repo.get(uuid)
        assert expired is not None and provider_of(integ, expired) is not None
        fetched = integ._s.tokens.access_token(expired, provider_of(integ, expired))
        assert await asyncio.wait_for(fetched, 5) == unstored
        await db.execute("ALTER TABLE integrations.connections DROP CONSTRAINT no_new_tokens")


async def test_tokens_lost_after_a_rotation_mark_the_connection_for_a_new_authorization(
    fresh_db: str, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    async with open_integrations(fresh_db, server.base_url, token_write_retry=0.3) as integ:
        uuid = await connect(integ)
        await _refuse_new_expiry(db, uuid)
        await integ.refresh_access_token(uuid)  # rotates the refresh token at the provider

        async def marked() -> bool:
            error = (await integ.get_integration(uuid)).get("refresh_error")
            return isinstance(error, dict) and error.get("code") == "reauth_required"

        await eventually(marked)


async def test_when_the_bound_runs_out_the_log_says_what_was_lost(
    fresh_db: str,
    server: OAuthTestServer,
    proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cut = _refresh_cut_with_bound(fresh_db, server, proxy, caplog, 0.5)
    async with cut as (integ, uuid, token):
        await eventually(partial(_gave_up, caplog), within=10)
        [record] = _gave_up(caplog)
        assert record.levelno == logging.ERROR
        message = record.getMessage()
        assert uuid in message and "rotated refresh token" in message
        # Tried again within the bound (after 0.1 s, then 0.2 s more) and not after it.
        attempts = re.search(r"after (\d+) attempts", message)
        assert attempts is not None and 2 <= int(attempts.group(1)) <= 3
        # Why the last try failed, and until when the lost access token was good.
        lost = re.search(
            r" in 0\.5s \((.+)\): lost are its access token \(expiring (.+?)\)", message
        )
        assert lost is not None, message
        assert lost.group(1) != "no reason given" and "Database" in lost.group(1)
        expiry = datetime.fromisoformat(lost.group(2))
        assert timedelta(minutes=50) < expiry - datetime.now(UTC) <= timedelta(hours=1)
        assert token not in caplog.text

        def unmarked() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.ERROR and "could not mark" in r.getMessage()
            ]

        # The database is still cut: marking the connection for a new authorization fails
        # too, and says so.
        await eventually(unmarked)
        [why] = unmarked()
        assert why.startswith(f"could not mark connection {uuid} for a new authorization either (")
        proxy.restore()
        # The instance goes on working once the database is back.
        assert (await integ.get_integration_by_uuid(uuid)).uuid == uuid


async def test_a_bound_too_short_for_a_retry_still_says_why_the_write_failed(
    fresh_db: str,
    server: OAuthTestServer,
    proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The first retry would come 0.1 s after the failed write: past this bound.
    async with _refresh_cut_with_bound(fresh_db, server, proxy, caplog, 0.05) as (_, uuid, _):
        await eventually(partial(_gave_up, caplog), within=10)
        [record] = _gave_up(caplog)
        message = record.getMessage()
        found = re.search(r"after (\d+) attempts in 0\.05s \((.+)\): lost are", message)
        assert found is not None, message
        assert found.group(1) == "1" and "Database" in found.group(2), message
        assert uuid in message
        proxy.restore()


async def test_a_token_response_postgresql_cannot_store_is_cleaned_before_the_write(
    fresh_db: str, server: OAuthTestServer
) -> None:
    server.config.granted_scope = "read\x00write \ud800odd"
    async with open_integrations(
        fresh_db, server.base_url, providers=[client_credentials_provider(server.base_url)]
    ) as integ:
        conn = await integ.add_connection("machine", "default")
        from .oauth_server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

        await integ.save_setup(
            conn.uuid, {"client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET}
        )
        token = await integ.access_token(conn.uuid)
        assert server.token_status(token) == "active"
        stored = await integ.get_integration(conn.uuid)
        assert stored["access_token"] == token
        assert stored["granted_scopes"] == ["read\ufffdwrite", "\ufffdodd"]


def _key() -> str:
    from .conftest import TEST_KEY

    return TEST_KEY


def _loopback(server: OAuthTestServer) -> object:
    from .oauthkit import loopback_provider

    return loopback_provider(server.base_url)


@pytest.mark.parametrize("asked", ["forced", "rejected"])
async def test_tokens_waiting_for_their_write_are_not_handed_to_a_caller_they_do_not_serve(
    fresh_db: str, server: OAuthTestServer, db: asyncpg.Connection, asked: str
) -> None:
    """New tokens whose write is still being tried serve callers that need any token newer
    than theirs, not a forced refresh (it wants a token obtained after it began) nor a
    401 for those very tokens: those wait for the write, then refresh once more."""
    async with open_integrations(fresh_db, server.base_url, token_write_retry=30) as integ:
        uuid = await connect(integ)
        row = await integ._s.core.repo.get(uuid)
        assert row is not None
        await _refuse_new_expiry(db, uuid)
        unstored = await integ.refresh_access_token(uuid)
        assert integ._s.tokens._unstored  # its write is being tried again
        calls = server.stats.token_calls["refresh_token"]
        if asked == "forced":
            call = asyncio.create_task(integ.refresh_access_token(uuid))
        else:
            # The rejected token as a caller holds it: equal, not the same object.
            rejected = "".join([unstored[:1], unstored[1:]])
            assert rejected == unstored and rejected is not unstored
            call = asyncio.create_task(integ._s.tokens.after_rejection(row, rejected))
        for _ in range(20):
            await asyncio.sleep(0)
        await db.execute("ALTER TABLE integrations.connections DROP CONSTRAINT no_new_tokens")
        token = await asyncio.wait_for(call, 20)
        assert token != unstored
        assert server.stats.token_calls["refresh_token"] == calls + 1


@pytest.mark.parametrize("meanwhile", ["ended", "newer", "deleted"])
async def test_a_write_tried_again_that_stores_nothing_says_why(
    fresh_db: str,
    server: OAuthTestServer,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    meanwhile: str,
) -> None:
    """While new tokens wait for their write, the refresh's lease ends (taken over by a
    process that sent nothing), the row gets newer tokens, or the connection is removed:
    the write tried again stores nothing, and the record names the connection and why (a
    warning for a lease taken over, an INFO record for a deleted connection)."""
    caplog.set_level(logging.INFO, logger="integrations")
    async with open_integrations(fresh_db, server.base_url, token_write_retry=30) as integ:
        uuid = await connect(integ)
        await _refuse_new_expiry(db, uuid)
        await integ.refresh_access_token(uuid)
        [unstored] = integ._s.tokens._unstored.values()
        async with db.transaction():
            await db.execute("ALTER TABLE integrations.connections DROP CONSTRAINT no_new_tokens")
            if meanwhile == "deleted":
                await db.execute(
                    "DELETE FROM integrations.connections WHERE uuid = $1", uuid_mod.UUID(uuid)
                )
            else:
                later = "2999-01-01T00:00:00+00:00" if meanwhile == "newer" else None
                await db.execute(
                    "UPDATE integrations.connections SET value_json = (value_json - "
                    "'refresh_lease') || jsonb_strip_nulls(jsonb_build_object("
                    "'token_obtained_at', $2::text)) WHERE uuid = $1",
                    uuid_mod.UUID(uuid),
                    later,
                )
        await asyncio.wait_for(asyncio.wait({unstored.task}), 20)
    assert not [r for r in caplog.records if "stored the tokens of" in r.getMessage()]
    not_stored = [r for r in caplog.records if "were not stored" in r.getMessage()]
    deleted = [r for r in caplog.records if "was deleted before" in r.getMessage()]
    if meanwhile == "deleted":
        # Not a lease taken over: the connection is gone, and so is the need to store.
        assert not not_stored
        [record] = deleted
        assert record.levelno == logging.INFO
        assert getattr(record, "integrations_event_kind", None) == "token_write_deleted"
        assert record.getMessage() == (
            f"connection {uuid} was deleted before the tokens of its refresh were stored "
            "(attempt 2): they are dropped"
        )
        return
    assert not deleted
    [record] = not_stored
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert message.startswith(f"the tokens of connection {uuid}'s refresh were not stored")
    why = {
        "ended": "the process that took it decides what is stored",
        "newer": "the stored tokens are newer",
    }[meanwhile]
    assert message.endswith(f"its lease was taken over meanwhile, and {why}")


async def test_an_expired_token_whose_refresh_could_not_be_stored_is_replaced_at_once(
    fresh_db: str, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    """A caller whose stored token has expired gets the new tokens of its refresh at once,
    although their write failed and is being tried again under the refresh's lease."""
    async with open_integrations(fresh_db, server.base_url, token_write_retry=30) as integ:
        uuid = await connect(integ)
        before = (await integ.get_integration(uuid))["access_token"]
        await db.execute(
            "UPDATE integrations.connections SET value_json = jsonb_set(value_json, "
            "'{expires_at}', to_jsonb('2000-01-01T00:00:00+00:00'::text)) WHERE uuid = $1",
            uuid_mod.UUID(uuid),
        )
        await _refuse_new_expiry(db, uuid)
        token = await asyncio.wait_for(integ.access_token(uuid), 15)
        assert token != before
        assert integ._s.tokens._unstored  # its write is being tried again
        assert server.stats.token_calls["refresh_token"] == 1
        await db.execute("ALTER TABLE integrations.connections DROP CONSTRAINT no_new_tokens")


@pytest.mark.parametrize("joiner", ["expired", "rejected", "at_!sorts_first", "at_~sorts_last"])
async def test_a_caller_joining_a_refresh_whose_answer_is_being_written_shares_it(
    fresh_db: str, server: OAuthTestServer, db: asyncpg.Connection, joiner: str
) -> None:
    """A caller whose stored token has expired, or whose token (the stored one, or an
    older one, whichever way it sorts) was rejected by the API, joins a refresh whose
    answer came and waits for its write (the row is locked elsewhere); the write then
    fails. Both callers get the new tokens at once, kept while their write is tried
    again."""
    async with open_integrations(fresh_db, server.base_url, token_write_retry=30) as integ:
        uuid = await connect(integ)
        before = (await integ.get_integration(uuid))["access_token"]
        row = await integ._s.core.repo.get(uuid)
        assert row is not None
        await set_stored_expiry(db, uuid, -60)
        await _refuse_new_expiry(db, uuid)
        tokens = integ._s.tokens
        server.config.token_delay = 0.3
        first = asyncio.create_task(integ.access_token(uuid))
        await eventually(lambda: server.stats.token_calls["refresh_token"] == 1)
        flight = tokens._inflight[uuid]
        async with db.transaction():
            await db.execute(
                "SELECT 1 FROM integrations.connections WHERE uuid = $1 FOR UPDATE",
                uuid_mod.UUID(uuid),
            )
            await eventually(lambda: flight.answered)
            if joiner == "expired":
                second = asyncio.create_task(integ.access_token(uuid))
            else:
                rejected = before if joiner == "rejected" else joiner
                second = asyncio.create_task(tokens.after_rejection(row, rejected))
            await eventually(lambda: flight.callers == 2)
        new = await asyncio.wait_for(first, 10)
        assert new != before
        assert await asyncio.wait_for(second, 10) == new
        assert server.stats.token_calls["refresh_token"] == 1
        await db.execute("ALTER TABLE integrations.connections DROP CONSTRAINT no_new_tokens")
