"""Refresh, authenticated requests, failures, revocation and client credentials in one process."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from integrations import (
    Deleted,
    HostNotAllowed,
    Integrations,
    InvalidProviderKey,
    LifecycleError,
    NotConnected,
    ReauthRequired,
    TokenRequestFailed,
    _settings,
    oauth,
)

from .conftest import TEST_KEY, settle
from .oauth_server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, OAuthTestServer, token_id
from .oauthkit import (
    REDIRECT_URI,
    approve,
    client_credentials_provider,
    connect,
    eventually,
    loopback_provider,
    machine_connection,
    open_integrations,
    set_stored_expiry,
)


@pytest.fixture
async def server() -> AsyncIterator[OAuthTestServer]:
    async with OAuthTestServer() as srv:
        yield srv


@pytest.fixture
async def integ(fresh_db: str, server: OAuthTestServer) -> AsyncIterator[Integrations]:
    async with open_integrations(fresh_db, server.base_url) as instance:
        yield instance


@pytest.fixture
async def events(db: asyncpg.Connection) -> AsyncIterator[list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []

    def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        received.append(json.loads(payload))

    await db.add_listener("integrations_events", on_notify)
    yield received
    await db.remove_listener("integrations_events", on_notify)


async def _expire_locally(db: asyncpg.Connection, uuid: str) -> None:
    """Make the stored token look expired (the server still accepts it)."""
    past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    await db.execute(
        "UPDATE integrations.connections "
        "SET value_json = jsonb_set(value_json, '{expires_at}', to_jsonb($2::text)) "
        "WHERE uuid = $1",
        uuid_mod.UUID(uuid),
        past,
    )
    await settle()


def _refreshes(server: OAuthTestServer) -> int:
    return server.stats.token_calls["refresh_token"]


async def _lock_row(db: asyncpg.Connection, uuid: str) -> None:
    """Take the connection's row lock, as another process's refresh or a long write would."""
    await db.execute(
        "SELECT 1 FROM integrations.connections WHERE uuid = $1 FOR UPDATE", uuid_mod.UUID(uuid)
    )


async def _refresh_error(integ: Integrations, uuid: str) -> dict[str, Any]:
    record = (await integ.get_integration(uuid))["refresh_error"]
    assert isinstance(record, dict)
    return record


def _seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


async def _spend_refresh_token_elsewhere(integ: Integrations, server: OAuthTestServer, uuid: str):
    """Use the stored refresh token behind the library's back, as a leaked copy would."""
    refresh_token = (await integ.get_integration(uuid))["refresh_token"]
    url, headers, body = oauth.token_request(
        "refresh_token",
        token_url=server.token_url,
        client_id=DEFAULT_CLIENT_ID,
        client_secret=DEFAULT_CLIENT_SECRET,
        auth_method="client_secret_post",
        refresh_token=refresh_token,
    )
    response = await integ._s.core.http.request("POST", url, headers=headers, data=body)
    assert response.status == 200


# -- access_token / refresh_access_token ------------------------------------------------


async def test_access_token_returns_a_fresh_token_without_a_token_request(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await connect(integ)
    stored = (await integ.get_integration(uuid))["access_token"]
    assert await integ.access_token(uuid) == stored
    assert _refreshes(server) == 0


async def test_access_token_refreshes_ahead_of_expiry_within_the_leeway(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    uuid = await connect(integ)
    await set_stored_expiry(db, uuid, 30)  # an hour-long token inside the 60 s leeway
    old = await integ.get_integration(uuid)
    token = await integ.access_token(uuid)
    new = await integ.get_integration(uuid)
    assert token == new["access_token"] != old["access_token"]
    assert _refreshes(server) == 1
    assert server.token_status(old["refresh_token"]) == "spent"
    assert server.token_status(new["refresh_token"]) == "active"
    assert datetime.fromisoformat(new["expires_at"]) > datetime.now(UTC) + timedelta(minutes=59)
    assert await integ.access_token(uuid) == token
    assert _refreshes(server) == 1


async def test_the_leeway_is_configurable(fresh_db: str, server: OAuthTestServer) -> None:
    server.config.expires_in = 30
    async with open_integrations(fresh_db, server.base_url, leeway=5) as integ:
        uuid = await connect(integ)
        await integ.access_token(uuid)
        assert _refreshes(server) == 0


async def test_a_token_shorter_lived_than_the_leeway_is_not_refreshed_on_every_call(
    integ: Integrations, server: OAuthTestServer
) -> None:
    """With 45-second tokens and the 60-second leeway, a token is due after half its life,
    not the moment it is stored."""
    server.config.expires_in = 45
    uuid = await connect(integ)
    for _ in range(5):
        await integ.access_token(uuid)
    # Due only in the last half of its life: five calls at once ask for nothing.
    assert _refreshes(server) == 0, f"{_refreshes(server)} token requests for 5 calls"


async def test_refresh_access_token_returns_a_new_token_and_emits_token_refreshed(
    integ: Integrations, server: OAuthTestServer, events: list[dict[str, Any]]
) -> None:
    uuid = await connect(integ)
    old = (await integ.get_integration(uuid))["access_token"]
    token = await integ.refresh_access_token(uuid)
    assert token != old
    assert server.token_status(token) == "active"
    await eventually(lambda: any(e["kind"] == "token_refreshed" for e in events))
    assert all(token not in json.dumps(e) for e in events)


async def test_fifty_concurrent_refreshes_make_one_token_request(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    uuid = await connect(integ)
    await _expire_locally(db, uuid)
    server.config.token_delay = 0.1
    tokens = await asyncio.gather(*(integ.access_token(uuid) for _ in range(50)))
    assert len(set(tokens)) == 1
    assert _refreshes(server) == 1
    assert server.stats.grants_revoked == 0
    tokens = await asyncio.gather(*(integ.refresh_access_token(uuid) for _ in range(50)))
    assert len(set(tokens)) == 1
    assert _refreshes(server) == 2


async def test_two_instances_on_one_database_coalesce_through_the_row_lock(
    fresh_db: str, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    async with (
        open_integrations(fresh_db, server.base_url) as first,
        open_integrations(fresh_db, server.base_url) as second,
    ):
        uuid = await connect(first)
        await _expire_locally(db, uuid)
        server.config.token_delay = 0.2
        tokens = await asyncio.gather(
            *(first.access_token(uuid) for _ in range(25)),
            *(second.access_token(uuid) for _ in range(25)),
        )
        assert len(set(tokens)) == 1
        assert _refreshes(server) == 1
        assert server.stats.grants_revoked == 0


async def test_a_refresh_response_without_a_refresh_token_keeps_the_old_one(
    integ: Integrations, server: OAuthTestServer
) -> None:
    server.config.rotate_refresh_tokens = False
    uuid = await connect(integ)
    before = (await integ.get_integration(uuid))["refresh_token"]
    await integ.refresh_access_token(uuid)
    after = await integ.get_integration(uuid)
    assert after["refresh_token"] == before
    assert server.token_status(before) == "active"


async def test_access_token_needs_a_connected_oauth_connection(integ: Integrations) -> None:
    api = await integ.add_connection("openai", "default")
    with pytest.raises(InvalidProviderKey):
        await integ.access_token(api.uuid)
    bare = await integ.add_connection("loopback", "bare")
    with pytest.raises(NotConnected):
        await integ.access_token(bare.uuid)
    with pytest.raises(NotConnected):
        await integ.refresh_access_token(bare.uuid)


async def test_a_cancelled_caller_does_not_abandon_the_refresh(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await connect(integ)
    old = await integ.get_integration(uuid)
    server.config.token_delay = 0.3
    caller = asyncio.create_task(integ.refresh_access_token(uuid))
    await eventually(lambda: _refreshes(server) == 1)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await eventually(lambda: _stored_token_differs(integ, uuid, old["access_token"]), within=5)
    new = await integ.get_integration(uuid)
    assert server.token_status(new["refresh_token"]) == "active"
    assert server.token_status(old["refresh_token"]) == "spent"
    assert await integ.access_token(uuid) == new["access_token"]
    assert _refreshes(server) == 1


async def _stored_token_differs(integ: Integrations, uuid: str, old: str) -> bool:
    return bool((await integ.get_integration(uuid))["access_token"] != old)


async def test_close_waits_for_a_refresh_in_flight(fresh_db: str, server: OAuthTestServer) -> None:
    async with open_integrations(fresh_db, server.base_url) as integ:
        uuid = await connect(integ)
        old = await integ.get_integration(uuid)
        server.config.token_delay = 0.3
        caller = asyncio.create_task(integ.refresh_access_token(uuid))
        await eventually(lambda: _refreshes(server) == 1)
        caller.cancel()
    async with open_integrations(fresh_db, server.base_url) as integ:
        new = await integ.get_integration(uuid)
        assert new["refresh_token"] != old["refresh_token"]
        assert server.token_status(new["refresh_token"]) == "active"


def test_a_refresh_step_never_shows_the_credentials_it_carries() -> None:
    from integrations._lease import Look
    from integrations._tokens import _Step

    step = _Step(Look(wait=0.5), plain={"refresh_token": "rt_never_shown"}, owner="user:1")
    assert "rt_never_shown" not in repr(step)
    assert "user:1" in repr(step)


async def test_a_refresh_waiting_for_a_connection_removed_meanwhile_says_it_was_removed(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    uuid = await connect(integ)
    async with db.transaction():
        await _lock_row(db, uuid)  # another process's refresh or a long write holds it
        waiting = asyncio.create_task(integ.refresh_access_token(uuid))
        await eventually(lambda: uuid in integ._s.tokens._inflight)
        await db.execute(
            "DELETE FROM integrations.connections WHERE uuid = $1", uuid_mod.UUID(uuid)
        )
    with pytest.raises(Deleted):
        await waiting
    assert _refreshes(server) == 0


async def test_a_refresh_asked_for_while_closing_is_refused(
    integ: Integrations, server: OAuthTestServer
) -> None:
    """Once close() began, a refresh asked for by a call that was under way before it (a
    401 coming back, say) is refused rather than started or joined."""
    uuid = await connect(integ)
    tokens = integ._s.tokens
    row = await integ._s.core.repo.get(uuid)
    assert row is not None
    provider = integ._s.core.provider_of(row)
    assert provider is not None
    server.config.token_delay = 0.5
    first = asyncio.create_task(integ.refresh_access_token(uuid))
    await eventually(lambda: _refreshes(server) == 1)
    closing = asyncio.create_task(integ.close())
    await eventually(lambda: tokens._closed)
    with pytest.raises(LifecycleError):
        await tokens.refresh(row, provider)
    with pytest.raises(LifecycleError):
        await tokens.after_rejection(row, "at_rejected")
    await closing
    await first  # the refresh that was out finished and was stored
    assert _refreshes(server) == 1


async def test_close_waits_for_a_refresh_whose_token_request_was_sent(
    fresh_db: str, server: OAuthTestServer, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """close() cancels at once a refresh still waiting for the row lock (nothing was asked,
    nothing is lost) and lets one whose token request is out finish, within that refresh's
    own budget counted from the request: the rotated refresh token is stored. The event
    loop reports no error about either task."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    async with open_integrations(
        fresh_db, server.base_url, token_timeout=1.0, token_attempts=1
    ) as integ:
        waiting = await connect(integ, "waiting")
        uuid = await connect(integ, "sent")
        assert integ._s.tokens.policy.budget == pytest.approx(6.0)
        unsent = (await integ.get_integration(waiting))["refresh_token"]
        tx = db.transaction()
        await tx.start()
        await _lock_row(db, waiting)
        blocked = asyncio.create_task(integ.refresh_access_token(waiting))
        await eventually(lambda: waiting in integ._s.tokens._inflight)
        server.config.token_delay = 0.9
        caller = asyncio.create_task(integ.refresh_access_token(uuid))
        await eventually(lambda: _refreshes(server) == 1)
        started = time.monotonic()
        await integ.close()
        closed_in = time.monotonic() - started
        await tx.commit()
        refreshed, cancelled = await asyncio.gather(caller, blocked, return_exceptions=True)
    assert isinstance(refreshed, str)
    assert isinstance(cancelled, LifecycleError)
    assert closed_in < 3, "close() waited for the other lock holder"
    assert [r for r in caplog.records if r.name == "asyncio"] == []
    async with open_integrations(fresh_db, server.base_url) as integ:
        stored = (await integ.get_integration(uuid))["refresh_token"]
        assert (await integ.get_integration(waiting))["refresh_token"] == unsent
    assert _refreshes(server) == 1
    assert server.token_status(stored) == "active", (
        f"the stored refresh token is {server.token_status(stored)}: the rotated one was "
        "lost when close() cancelled the refresh mid-request"
    )
    assert server.token_status(unsent) == "active"


async def test_a_caller_cancelled_as_close_cancels_its_refresh_ends_cancelled(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    """close() cancels a refresh that asked nothing yet; a caller that is cancelled itself
    at that moment ends with its own cancellation, not the error that says the library
    closed (that one is for callers that were not cancelled)."""
    uuid = await connect(integ)
    tokens = integ._s.tokens
    async with db.transaction():
        await _lock_row(db, uuid)  # the refresh waits for the row: it asked nothing
        cancelled = asyncio.create_task(integ.refresh_access_token(uuid))
        waiting = asyncio.create_task(integ.refresh_access_token(uuid))
        await eventually(lambda: uuid in tokens._inflight and tokens._inflight[uuid].callers == 2)
        # Cancel the first caller as the refresh ends cancelled, before the caller runs.
        tokens._inflight[uuid].task.add_done_callback(lambda _: cancelled.cancel())
        await integ.close()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    with pytest.raises(LifecycleError):
        await waiting


async def test_close_waits_out_the_last_second_of_a_refresh_budget(
    fresh_db: str, server: OAuthTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However little of a refresh's budget is left when close() comes, close() waits it
    out: an answer that arrives within it is stored."""
    monkeypatch.setattr(_settings, "BUDGET_MARGIN", 0.0)  # the budget is the one attempt
    async with open_integrations(
        fresh_db, server.base_url, token_timeout=1.0, token_attempts=1
    ) as integ:
        assert integ._s.tokens.policy.budget == pytest.approx(1.0)
        uuid = await connect(integ)
        old = (await integ.get_integration(uuid))["refresh_token"]
        server.config.token_delay = 0.5
        caller = asyncio.create_task(integ.refresh_access_token(uuid))
        await eventually(lambda: _refreshes(server) == 1)
        await integ.close()
        refreshed = (await asyncio.gather(caller, return_exceptions=True))[0]
    assert isinstance(refreshed, str), f"close() cut the refresh short: {refreshed!r}"
    async with open_integrations(fresh_db, server.base_url) as integ:
        stored = (await integ.get_integration(uuid))["refresh_token"]
    assert stored != old
    assert server.token_status(stored) == "active"


@pytest.mark.parametrize("write", ["stored", "failed"])
async def test_close_past_a_refreshs_budget_lets_the_write_of_its_answer_end(
    fresh_db: str,
    server: OAuthTestServer,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    write: str,
) -> None:
    """The answer came within the budget, but its write waits for the row (locked
    elsewhere) when the budget runs out and close() cancels the refresh: the write goes
    on. Stored, the cancellation follows (its caller is told the library closed); failed,
    the tokens are kept and written again, and close() waits for that."""
    monkeypatch.setattr(_settings, "BUDGET_MARGIN", 0.0)  # the budget is the one attempt
    async with open_integrations(
        fresh_db, server.base_url, token_timeout=1.0, token_attempts=1, lock_timeout=2.0
    ) as integ:
        uuid = await connect(integ)
        old = (await integ.get_integration(uuid))["refresh_token"]
        tokens = integ._s.tokens
        server.config.token_delay = 0.3
        caller = asyncio.create_task(integ.refresh_access_token(uuid))
        await eventually(lambda: _refreshes(server) == 1)
        flight = tokens._inflight[uuid]
        async with db.transaction():
            await _lock_row(db, uuid)
            closing = asyncio.create_task(integ.close())
            await eventually(lambda: flight.task.cancelling() > 0)  # the budget ran out
            if write == "failed":
                await eventually(lambda: uuid in tokens._unstored)  # after the lock timeout
        await asyncio.wait_for(closing, 20)
        outcome = (await asyncio.gather(caller, return_exceptions=True))[0]
    if write == "stored":
        assert isinstance(outcome, LifecycleError)
    else:
        assert isinstance(outcome, str)
    async with open_integrations(fresh_db, server.base_url) as integ:
        stored = (await integ.get_integration(uuid))["refresh_token"]
    assert stored != old
    assert server.token_status(stored) == "active"


async def test_close_gives_up_on_a_token_request_that_outlives_its_budget(
    fresh_db: str, server: OAuthTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token request that does not end when its timeouts say it should (a transport that
    hangs) holds close() up no longer than the refresh's budget: then it is cancelled, and
    its caller is told that the library closed."""
    from integrations._token_endpoint import TokenEndpoint

    monkeypatch.setattr(_settings, "BUDGET_MARGIN", 0.0)  # the budget is the one attempt
    sent = asyncio.Event()
    released = asyncio.Event()

    async def hangs(*_args: Any, on_sending: Any, **_kwargs: Any) -> oauth.TokenSet:
        on_sending()
        sent.set()
        await released.wait()
        raise AssertionError("the request was let run past its budget")

    async with open_integrations(
        fresh_db, server.base_url, token_timeout=0.5, token_attempts=1
    ) as integ:
        uuid = await connect(integ)
        monkeypatch.setattr(TokenEndpoint, "renew", hangs)
        caller = asyncio.create_task(integ.refresh_access_token(uuid))
        await sent.wait()
        try:
            await asyncio.wait_for(integ.close(), 15)
        finally:
            released.set()
        with pytest.raises(LifecycleError):
            await caller


async def test_a_cancelled_close_is_completed_by_closing_again(
    fresh_db: str, server: OAuthTestServer
) -> None:
    """A close() cancelled while it waits for a refresh in flight (a lifespan shutdown
    timeout, a second Ctrl-C) goes on in the background; close() again waits for it, and
    the pool and the HTTP session end up closed."""
    integ = Integrations(
        fresh_db,
        keys=TEST_KEY,
        providers=[loopback_provider(server.base_url)],
        token_backoff=0.01,
    )
    await integ.open()
    uuid = await connect(integ)
    server.config.token_delay = 1.5
    refreshing = asyncio.create_task(integ.refresh_access_token(uuid))
    await eventually(lambda: _refreshes(server) == 1)
    closing = asyncio.create_task(integ.close())
    await eventually(lambda: "state=closing" in repr(integ))
    closing.cancel()
    await asyncio.gather(closing, return_exceptions=True)
    await integ.close()
    pool_open = integ._repo._pool is not None
    session = integ._http._session
    await asyncio.gather(refreshing, return_exceptions=True)
    leaked = []
    if pool_open:
        leaked.append("pool")
        await integ._repo.close()
    if session is not None and not session.closed:
        leaked.append("HTTP session")
        await session.close()
    assert not leaked, f"still open after close(): {', '.join(leaked)}"
    assert isinstance(refreshing.result(), str), "the refresh in flight was let finish"


async def test_a_refresh_waits_no_longer_than_the_lock_timeout(
    fresh_db: str, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    async with open_integrations(fresh_db, server.base_url, lock_timeout=0.3) as integ:
        uuid = await connect(integ)
        async with db.transaction():
            await db.execute(
                "SELECT 1 FROM integrations.connections WHERE uuid = $1 FOR UPDATE",
                uuid_mod.UUID(uuid),
            )
            started = time.monotonic()
            with pytest.raises(TokenRequestFailed) as info:
                await integ.refresh_access_token(uuid)
            assert time.monotonic() - started < 3
        assert info.value.transient
        assert "lock" in info.value.message
        assert _refreshes(server) == 0
        assert (await integ.get_integration_by_uuid(uuid)).status == "connected"


# -- authenticated_request --------------------------------------------------------------


async def test_authenticated_request_refreshes_an_expiring_token_first(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    uuid = await connect(integ)
    await _expire_locally(db, uuid)
    response = await integ.authenticated_request(uuid, "GET", server.api_url)
    assert response.status == 200
    stored = (await integ.get_integration(uuid))["access_token"]
    assert response.json()["token_id"] == token_id(stored)
    assert _refreshes(server) == 1
    assert server.stats.api_rejected == 0


async def test_authenticated_request_refreshes_once_on_401_and_retries(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await connect(integ)
    server.expire_access_tokens()
    response = await integ.authenticated_request(uuid, "GET", server.api_url)
    assert response.status == 200
    assert _refreshes(server) == 1
    assert server.stats.api_rejected == 1


async def test_fifty_concurrent_requests_on_the_401_path_make_one_token_request(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await connect(integ)
    server.expire_access_tokens()
    server.config.token_delay = 0.1
    responses = await asyncio.gather(
        *(integ.authenticated_request(uuid, "GET", server.api_url) for _ in range(50))
    )
    assert [r.status for r in responses] == [200] * 50
    assert _refreshes(server) == 1
    assert server.stats.grants_revoked == 0


async def test_a_401_for_a_token_that_is_no_longer_stored_does_not_refresh(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await connect(integ)
    stale_row = await integ._s.core.repo.get(uuid)
    assert stale_row is not None
    stale = (await integ.get_integration(uuid))["access_token"]
    fresh = await integ.refresh_access_token(uuid)
    assert _refreshes(server) == 1
    assert await integ._s.tokens.after_rejection(stale_row, stale) == fresh
    assert _refreshes(server) == 1


async def test_a_401_without_a_new_token_returns_the_response(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await connect(integ)
    server.config.rotate_refresh_tokens = False
    server.config.expires_in = 0
    server.expire_access_tokens()
    # Every token the server hands out is already expired: one refresh, one retry, then 401.
    response = await integ.authenticated_request(uuid, "GET", server.api_url)
    assert response.status == 401
    assert _refreshes(server) == 1


async def test_a_401_that_joins_a_refresh_started_for_an_older_token_still_gets_a_new_token(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    """A refresh in flight for a caller that read an older token hands back the stored
    token; a 401 for that very token that joined it refreshes once more."""
    uuid = await connect(integ)
    stale_row = await integ._s.core.repo.get(uuid)
    assert stale_row is not None
    await integ.refresh_access_token(uuid)  # another caller refreshed meanwhile
    assert _refreshes(server) == 1
    provider = integ._s.core.provider_of(stale_row)
    assert provider is not None
    async with db.transaction():
        await _lock_row(db, uuid)  # a save_setup, rotation batch or other process holds it
        early = asyncio.create_task(integ._s.tokens.refresh(stale_row, provider))
        await eventually(lambda: bool(integ._s.tokens._inflight))
        server.expire_access_tokens()  # the provider now rejects the stored token
        request = asyncio.create_task(integ.authenticated_request(uuid, "GET", server.api_url))
        await eventually(lambda: server.stats.api_rejected == 1)
        await asyncio.sleep(0.1)
    response = await request
    await early
    assert response.status == 200, (
        f"got {response.status} after {_refreshes(server) - 1} refresh(es): the rejected "
        "token was handed back by a task started for an older token"
    )
    assert _refreshes(server) == 2


@pytest.mark.parametrize("older", ["at_!sorts_first", "at_~sorts_last"])
async def test_a_401_that_joins_a_refresh_for_another_401_handing_back_that_token_refreshes(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection, older: str
) -> None:
    """A refresh in flight for a 401 to an older token hands back the stored token; a 401
    for that very token that joined it gets a new one, whichever way the two tokens sort."""
    uuid = await connect(integ)
    row = await integ._s.core.repo.get(uuid)
    assert row is not None
    stored = (await integ.get_integration(uuid))["access_token"]
    tokens = integ._s.tokens
    async with db.transaction():
        await _lock_row(db, uuid)  # a save_setup, rotation batch or other process holds it
        first = asyncio.create_task(tokens.after_rejection(row, older))
        await eventually(lambda: uuid in tokens._inflight)
        second = asyncio.create_task(tokens.after_rejection(row, stored))
        await eventually(lambda: tokens._inflight[uuid].callers == 2)
    assert await first == stored
    new = await second
    assert new != stored
    assert _refreshes(server) == 1


async def test_a_401_refresh_answered_with_the_rejected_token_asks_once(
    integ: Integrations, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider may answer a refresh with the very access token the API rejected (some
    hand out the current token until it expires): the 401's caller gets that answer, and
    the token endpoint is asked once, not again for the same caller."""
    from integrations._token_endpoint import TokenEndpoint

    uuid = await connect(integ)
    row = await integ._s.core.repo.get(uuid)
    assert row is not None
    stored = (await integ.get_integration(uuid))["access_token"]
    asked: list[str] = []

    async def same_token(*_args: Any, on_sending: Any, **_kwargs: Any) -> oauth.TokenSet:
        on_sending()
        asked.append(stored)
        now = datetime.now(UTC)
        return oauth.TokenSet(
            access_token=stored, expires_at=now + timedelta(hours=1), obtained_at=now
        )

    monkeypatch.setattr(TokenEndpoint, "renew", same_token)
    assert await integ._s.tokens.after_rejection(row, stored) == stored
    assert len(asked) == 1


async def test_a_401_that_joins_a_refresh_ahead_of_expiry_handing_back_that_token_refreshes(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    """A caller that read an expired token starts a refresh ahead of expiry, which finds a
    newer token stored and hands it back without asking; a 401 for that very token that
    joined it gets a new one (one more token request), not the token just rejected."""
    uuid = await connect(integ)
    await _expire_locally(db, uuid)
    stale_row = await integ._s.core.repo.get(uuid)
    assert stale_row is not None
    await integ.refresh_access_token(uuid)  # another caller refreshed meanwhile
    assert _refreshes(server) == 1
    provider = integ._s.core.provider_of(stale_row)
    assert provider is not None
    async with db.transaction():
        await _lock_row(db, uuid)  # a save_setup, rotation batch or other process holds it
        early = asyncio.create_task(integ._s.tokens.access_token(stale_row, provider))
        await eventually(lambda: bool(integ._s.tokens._inflight))
        assert integ._s.tokens._inflight[uuid].mode == "expiring"
        server.expire_access_tokens()  # the provider now rejects the stored token
        request = asyncio.create_task(integ.authenticated_request(uuid, "GET", server.api_url))
        await eventually(lambda: server.stats.api_rejected == 1)
        await eventually(lambda: integ._s.tokens._inflight[uuid].callers == 2)
    response = await request
    stored = await early
    assert response.status == 200
    assert _refreshes(server) == 2
    assert stored != (await integ.get_integration(uuid))["access_token"]


async def test_tokens_are_never_sent_to_a_host_outside_api_hosts(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    uuid = await connect(integ)
    await _expire_locally(db, uuid)
    elsewhere = server.api_url.replace("127.0.0.1", "localhost")
    with pytest.raises(HostNotAllowed) as info:
        await integ.authenticated_request(uuid, "GET", elsewhere)
    assert info.value.code == "host_not_allowed"
    assert server.stats.api_calls == 0
    assert _refreshes(server) == 0, "no token is even refreshed for a refused host"


async def test_a_connection_ref_works_for_oauth_requests(
    integ: Integrations, server: OAuthTestServer
) -> None:
    await connect(integ)
    response = await integ.authenticated_request("loopback:default", "GET", server.api_url)
    assert response.status == 200


# -- failures -------------------------------------------------------------------------


async def test_invalid_grant_marks_the_connection_for_reauthorization(
    integ: Integrations, server: OAuthTestServer, events: list[dict[str, Any]]
) -> None:
    uuid = await connect(integ)
    await _spend_refresh_token_elsewhere(integ, server, uuid)
    with pytest.raises(ReauthRequired) as info:
        await integ.refresh_access_token(uuid)
    assert info.value.code == "reauth_required"
    connection = await integ.get_integration_by_uuid(uuid)
    assert connection.status == "error"
    assert connection.data["reauth_required"] is True
    assert "invalid_grant" in connection.data["validation_status"]
    await eventually(lambda: any(e["kind"] == "refresh_failed" for e in events))
    [failed] = [e for e in events if e["kind"] == "refresh_failed"]
    assert failed["uuid"] == uuid
    assert failed["status"] == "error"
    assert failed["previous_status"] == "connected"
    assert failed["detail"]["reauth_required"] is True

    for _ in range(3):
        with pytest.raises(ReauthRequired):
            await integ.refresh_access_token(uuid)
    # A later change is the sentinel: notifications arrive in commit order.
    await integ.rename_connection(uuid, "sentinel")
    await eventually(lambda: any(e["kind"] == "connection_renamed" for e in events))
    # The second failure reads differently (the grant is now revoked); later ones repeat it.
    assert [e["kind"] for e in events].count("refresh_failed") == 2, "no event flood"


async def test_invalid_client_is_terminal_too(integ: Integrations, server: OAuthTestServer) -> None:
    uuid = await connect(integ)
    server.config.force_invalid_client = True
    with pytest.raises(ReauthRequired):
        await integ.refresh_access_token(uuid)
    data = await integ.get_integration(uuid)
    assert (data["status"], data["reauth_required"]) == ("error", True)
    assert "invalid_client" in data["validation_status"]
    assert DEFAULT_CLIENT_SECRET not in data["validation_status"]


async def test_concurrent_failing_callers_make_one_token_request(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    uuid = await connect(integ)
    await _expire_locally(db, uuid)
    server.config.force_invalid_client = True
    server.config.token_delay = 0.1
    results = await asyncio.gather(
        *(integ.access_token(uuid) for _ in range(50)), return_exceptions=True
    )
    assert all(isinstance(r, ReauthRequired) for r in results)
    assert _refreshes(server) == 1


async def test_failing_callers_of_two_instances_do_not_stampede(
    fresh_db: str, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    async with (
        open_integrations(fresh_db, server.base_url) as first,
        open_integrations(fresh_db, server.base_url) as second,
    ):
        uuid = await connect(first)
        await _expire_locally(db, uuid)
        server.config.force_invalid_client = True
        server.config.token_delay = 0.2
        results = await asyncio.gather(
            *(first.access_token(uuid) for _ in range(20)),
            *(second.access_token(uuid) for _ in range(20)),
            return_exceptions=True,
        )
        assert all(isinstance(r, ReauthRequired) for r in results)
        assert _refreshes(server) == 1


async def test_transient_failures_are_retried_then_recorded_then_recovered(
    integ: Integrations, server: OAuthTestServer, events: list[dict[str, Any]]
) -> None:
    uuid = await connect(integ)
    server.config.fail_next = 3
    server.config.fail_status = 503
    with pytest.raises(TokenRequestFailed) as info:
        await integ.refresh_access_token(uuid)
    assert info.value.transient
    assert info.value.code == "token_request_failed"
    assert _refreshes(server) == 3, "three attempts with backoff"
    data = await integ.get_integration(uuid)
    assert (data["status"], data["reauth_required"]) == ("error", False)
    assert "503" in data["validation_status"]

    token = await integ.refresh_access_token(uuid)
    data = await integ.get_integration(uuid)
    assert data["access_token"] == token
    assert (data["status"], data["reauth_required"]) == ("connected", False)
    assert "validation_status" not in data
    await eventually(lambda: any(e["kind"] == "recovered" for e in events))
    kinds = [e["kind"] for e in events if e["uuid"] == uuid]
    assert kinds.index("refresh_failed") < kinds.index("recovered")
    assert kinds.index("recovered") < len(kinds) - 1 - kinds[::-1].index("token_refreshed") + 1


async def test_a_transient_failure_within_the_retries_is_invisible(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await connect(integ)
    server.config.fail_next = 2
    server.config.fail_status = 429
    await integ.refresh_access_token(uuid)
    assert _refreshes(server) == 3
    assert (await integ.get_integration_by_uuid(uuid)).status == "connected"


async def test_an_unreachable_token_endpoint_is_transient(
    fresh_db: str, server: OAuthTestServer
) -> None:
    async with open_integrations(fresh_db, server.base_url) as integ:
        uuid = await connect(integ)
    unreachable = loopback_provider(server.base_url, token_url="http://127.0.0.1:9/token")
    async with open_integrations(fresh_db, server.base_url, providers=[unreachable]) as integ:
        with pytest.raises(TokenRequestFailed) as info:
            await integ.refresh_access_token(uuid)
        assert info.value.transient
        data = await integ.get_integration(uuid)
        assert (data["status"], data["reauth_required"]) == ("error", False)
        assert server.token_status(data["refresh_token"]) == "active"


async def test_a_failed_refresh_ahead_of_expiry_keeps_using_the_still_valid_token(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    """Inside the leeway the token still works: when the refresh ahead of time fails, the
    failure is recorded and the request goes out with the current token."""
    uuid = await connect(integ)
    await set_stored_expiry(db, uuid, 30)  # valid for 30 s, inside the 60 s leeway
    server.config.fail_next = 1000
    server.config.fail_status = 500
    try:
        response = await integ.authenticated_request(uuid, "GET", server.api_url)
    except TokenRequestFailed as exc:
        pytest.fail(f"a valid token was not used: {exc.message}")
    assert response.status == 200
    assert _refreshes(server) == 3
    data = await integ.get_integration(uuid)
    assert (data["status"], data["reauth_required"]) == ("error", False)
    # Within the cool-down the next call uses the token without asking again.
    assert (await integ.authenticated_request(uuid, "GET", server.api_url)).status == 200
    assert await integ.access_token(uuid) == data["access_token"]
    assert _refreshes(server) == 3


async def test_after_a_terminal_failure_automatic_refreshes_raise_it_without_a_token_request(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    """Once invalid_grant is recorded, access_token and authenticated_request raise the
    recorded ReauthRequired without sending the dead refresh token again; an explicit
    refresh_access_token still asks, and a new authorization clears the failure."""
    uuid = await connect(integ)
    await _spend_refresh_token_elsewhere(integ, server, uuid)
    await _expire_locally(db, uuid)
    with pytest.raises(ReauthRequired):
        await integ.access_token(uuid)
    after_failure = _refreshes(server)
    for _ in range(5):
        with pytest.raises(ReauthRequired):
            await integ.authenticated_request(uuid, "GET", server.api_url)
    assert _refreshes(server) == after_failure, (
        f"{_refreshes(server) - after_failure} more token requests for a connection already "
        "marked reauth_required"
    )
    with pytest.raises(ReauthRequired):
        await integ.refresh_access_token(uuid)
    assert _refreshes(server) == after_failure + 1

    url, _ = await integ.begin_authorization(uuid, REDIRECT_URI)
    callback = await approve(url)
    await integ.complete_authorization(callback["state"], code=callback["code"])
    await _expire_locally(db, uuid)
    await integ.access_token(uuid)
    assert _refreshes(server) == after_failure + 2
    assert (await integ.get_integration_by_uuid(uuid)).status == "connected"


async def test_after_a_transient_failure_automatic_refreshes_wait_for_a_cool_down(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    """Once a transient failure is recorded (retries exhausted), callers before its
    ``retry_at`` get the recorded error instead of another round of token requests."""
    uuid = await connect(integ)
    await _expire_locally(db, uuid)
    server.config.fail_next = 1000
    server.config.fail_status = 503
    with pytest.raises(TokenRequestFailed):
        await integ.access_token(uuid)
    after_failure = _refreshes(server)
    assert after_failure == 3
    for _ in range(5):
        with pytest.raises(TokenRequestFailed):
            await integ.access_token(uuid)
    assert _refreshes(server) == after_failure, (
        f"{_refreshes(server) - after_failure} token requests within a second of a recorded "
        "transient failure"
    )
    record = await _refresh_error(integ, uuid)
    assert record["failures"] == 1
    assert _seconds_between(record["at"], record["retry_at"]) == pytest.approx(5, abs=0.1)


async def test_the_cool_down_grows_with_consecutive_failures_and_then_lets_a_refresh_through(
    fresh_db: str, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    async with open_integrations(fresh_db, server.base_url, refresh_cooldown=0.2) as integ:
        uuid = await connect(integ)
        await _expire_locally(db, uuid)
        server.config.fail_next = 1000
        server.config.fail_status = 500
        cool_downs = []
        for failures in (1, 2, 3):
            with pytest.raises(TokenRequestFailed):
                await integ.access_token(uuid)
            record = await _refresh_error(integ, uuid)
            assert record["failures"] == failures
            cool_downs.append(_seconds_between(record["at"], record["retry_at"]))
            await asyncio.sleep(cool_downs[-1] + 0.05)
        assert cool_downs == pytest.approx([0.2, 0.4, 0.8], abs=0.05)
        assert _refreshes(server) == 9
        server.config.fail_next = 0
        token = await integ.access_token(uuid)
        data = await integ.get_integration(uuid)
        assert data["access_token"] == token
        assert "refresh_error" not in data
        assert data["status"] == "connected"


async def test_the_token_endpoints_retry_after_is_honoured(
    integ: Integrations, server: OAuthTestServer
) -> None:
    """A 429 or 503 with Retry-After: 1 is retried after a second, not after
    ``token_backoff``."""
    uuid = await connect(integ)
    server.config.fail_next = 1
    server.config.fail_status = 429
    started = time.monotonic()
    await integ.refresh_access_token(uuid)
    assert time.monotonic() - started >= 0.9, "retried before the server's Retry-After"
    assert _refreshes(server) == 2


async def test_a_retry_after_beyond_the_budget_ends_the_attempts_and_sets_the_cool_down(
    fresh_db: str, server: OAuthTestServer
) -> None:
    async with open_integrations(
        fresh_db, server.base_url, token_timeout=0.3, refresh_cooldown=0.1
    ) as integ:
        uuid = await connect(integ)
        server.config.fail_next = 1000
        server.config.fail_status = 503
        with pytest.raises(TokenRequestFailed) as info:
            await integ.refresh_access_token(uuid)
        assert _refreshes(server) == 1
        assert "asked to wait 1s" in info.value.message
        record = await _refresh_error(integ, uuid)
        assert _seconds_between(record["at"], record["retry_at"]) == pytest.approx(1, abs=0.1)


async def test_without_a_refresh_token_a_forced_refresh_needs_reauthorization(
    integ: Integrations, server: OAuthTestServer
) -> None:
    server.config.issue_refresh_tokens = False
    server.config.expires_in = 0
    uuid = await connect(integ)
    stored = (await integ.get_integration(uuid))["access_token"]
    assert await integ.access_token(uuid) == stored, "nothing to refresh with; the API will tell"
    with pytest.raises(ReauthRequired):
        await integ.refresh_access_token(uuid)
    assert _refreshes(server) == 0
    assert (await integ.get_integration(uuid))["reauth_required"] is True


# -- revocation -----------------------------------------------------------------------


async def test_disconnect_revokes_the_grant_in_the_background(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await connect(integ)
    data = await integ.get_integration(uuid)
    await integ.disconnect(uuid)
    after = await integ.get_integration(uuid)
    assert "access_token" not in after and "refresh_token" not in after
    assert after["client_id"] == DEFAULT_CLIENT_ID
    await eventually(lambda: server.stats.revocations == 1)
    assert server.token_status(data["refresh_token"]) == "revoked"
    assert server.token_status(data["access_token"]) == "revoked"


async def test_remove_connection_revokes_the_grant(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await connect(integ)
    data = await integ.get_integration(uuid)
    await integ.remove_connection(uuid)
    await eventually(lambda: server.stats.revocations == 1)
    assert server.token_status(data["refresh_token"]) == "revoked"


async def test_revocation_never_blocks_or_fails_the_local_change(
    fresh_db: str, server: OAuthTestServer
) -> None:
    hanging = web.Application()
    release = asyncio.Event()

    async def never(_request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    hanging.router.add_post("/revoke", never)
    runner = web.AppRunner(hanging)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    provider = loopback_provider(server.base_url, revoke_url=f"http://127.0.0.1:{port}/revoke")
    try:
        async with open_integrations(
            fresh_db, server.base_url, providers=[provider], revoke_timeout=5.0
        ) as integ:
            first = await connect(integ, "first")
            second = await connect(integ, "second")
            started = time.monotonic()
            await integ.disconnect(first)
            await integ.remove_connection(second)
            # Waiting for either revocation would take its whole timeout (the server never
            # answers); both changes are back well before one would end.
            assert time.monotonic() - started < 4.0
            assert (await integ.get_integration_by_uuid(first)).status == "disconnected"
        assert time.monotonic() - started < 20, "close() bounds the revocations too"
    finally:
        release.set()
        await runner.cleanup()


async def test_a_disconnect_committing_during_close_still_revokes_the_grant(
    fresh_db: str, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    """A disconnect waiting for the row lock when close() starts commits during it; close()
    lets it finish and revokes its grant before closing the HTTP client."""
    async with open_integrations(fresh_db, server.base_url) as integ:
        uuid = await connect(integ)
        tx = db.transaction()
        await tx.start()
        await _lock_row(db, uuid)
        disconnecting = asyncio.create_task(integ.disconnect(uuid))
        me = await db.fetchval("SELECT pg_backend_pid()")
        blocked = "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"
        await eventually(lambda: db.fetchval(blocked, me))  # the disconnect waits on the lock
        closing = asyncio.create_task(integ.close())
        await eventually(lambda: "state=closing" in repr(integ))
        await tx.commit()
        await closing
        await asyncio.gather(disconnecting, return_exceptions=True)
    # close() returned after the revocation, which the server counts before answering.
    assert disconnecting.exception() is None
    assert server.stats.revocations == 1, "the disconnected grant was never revoked"


async def test_an_unreachable_revocation_endpoint_is_ignored(
    fresh_db: str, server: OAuthTestServer
) -> None:
    provider = loopback_provider(server.base_url, revoke_url="http://127.0.0.1:9/revoke")
    async with open_integrations(fresh_db, server.base_url, providers=[provider]) as integ:
        uuid = await connect(integ)
        await integ.disconnect(uuid)
        assert (await integ.get_integration_by_uuid(uuid)).status == "disconnected"


async def test_no_revocation_without_a_revoke_url(fresh_db: str, server: OAuthTestServer) -> None:
    provider = loopback_provider(server.base_url, revoke_url=None)
    async with open_integrations(fresh_db, server.base_url, providers=[provider]) as integ:
        uuid = await connect(integ)
        await integ.disconnect(uuid)
    assert server.stats.revocations == 0


# -- client credentials ---------------------------------------------------------------


async def test_client_credentials_tokens_are_fetched_on_demand_and_cached(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await machine_connection(integ)
    token = await integ.access_token(uuid)
    assert server.token_status(token) == "active"
    assert await integ.access_token(uuid) == token
    assert server.stats.token_calls["client_credentials"] == 1
    data = await integ.get_integration(uuid)
    assert data["access_token"] == token
    assert datetime.fromisoformat(data["expires_at"]) > datetime.now(UTC)
    response = await integ.authenticated_request(uuid, "GET", server.api_url)
    assert response.status == 200
    assert response.json()["client_id"] == DEFAULT_CLIENT_ID
    assert server.stats.token_calls["client_credentials"] == 1


async def test_validating_a_client_credentials_connection_fetches_a_token(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await machine_connection(integ)
    result = await integ.validate_connection(uuid)
    assert (result.ok, result.message) == (True, "Connected")
    assert server.stats.token_calls["client_credentials"] == 1
    server.config.force_invalid_client = True
    await integ.save_setup(uuid, {"client_secret": "rotated-secret"})
    failed = await integ.validate_connection(uuid)
    assert not failed.ok
    assert (await integ.get_integration_by_uuid(uuid)).status == "error"


async def test_client_credentials_fetches_coalesce(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await machine_connection(integ)
    server.config.token_delay = 0.1
    tokens = await asyncio.gather(*(integ.access_token(uuid) for _ in range(50)))
    assert len(set(tokens)) == 1
    assert server.stats.token_calls["client_credentials"] == 1


async def test_client_credentials_refetch_when_expiring_or_rejected(
    integ: Integrations, server: OAuthTestServer
) -> None:
    server.config.expires_in = 0
    uuid = await machine_connection(integ)
    first = await integ.access_token(uuid)
    second = await integ.access_token(uuid)
    assert first != second
    assert server.stats.token_calls["client_credentials"] == 2
    server.config.expires_in = 3600
    await integ.access_token(uuid)
    server.expire_access_tokens()
    response = await integ.authenticated_request(uuid, "GET", server.api_url)
    assert response.status == 200
    assert server.stats.token_calls["client_credentials"] == 4


async def test_client_credentials_failures_are_recorded(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await machine_connection(integ)
    server.config.force_invalid_client = True
    with pytest.raises(ReauthRequired):
        await integ.access_token(uuid)
    data = await integ.get_integration(uuid)
    assert (data["status"], data["reauth_required"]) == ("error", True)
    server.config.force_invalid_client = False
    # A terminal failure holds automatic fetches back until the setup changes.
    with pytest.raises(ReauthRequired):
        await integ.access_token(uuid)
    assert server.stats.token_calls["client_credentials"] == 1
    await integ.save_setup(uuid, {"client_secret": DEFAULT_CLIENT_SECRET})
    await integ.access_token(uuid)
    assert (await integ.get_integration_by_uuid(uuid)).status == "connected"


async def test_client_credentials_provider_needs_its_setup(
    fresh_db: str, server: OAuthTestServer
) -> None:
    provider = client_credentials_provider(server.base_url)
    async with open_integrations(fresh_db, server.base_url, providers=[provider]) as integ:
        conn = await integ.add_connection("machine", "default")
        with pytest.raises(Exception) as info:
            await integ.access_token(conn.uuid)
        assert getattr(info.value, "code", None) == "not_configured"


async def test_a_refresh_after_disconnect_records_nothing(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await connect(integ)
    row = await integ._s.core.repo.get(uuid)
    assert row is not None
    token = (await integ.get_integration(uuid))["access_token"]
    await integ.disconnect(uuid)
    # A 401 handled after the disconnect committed: the row has no tokens any more.
    with pytest.raises(NotConnected):
        await integ._s.tokens.after_rejection(row, token)
    data = await integ.get_integration(uuid)
    assert data["status"] == "disconnected"
    assert "reauth_required" not in data
    assert _refreshes(server) == 0


async def test_tokens_never_reach_logs_or_errors(
    integ: Integrations, server: OAuthTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    uuid = await connect(integ)
    secrets = await integ.get_integration(uuid)
    await integ.refresh_access_token(uuid)
    fresh = await integ.get_integration(uuid)
    server.config.fail_next = 3
    with pytest.raises(TokenRequestFailed) as transient:
        await integ.refresh_access_token(uuid)
    server.config.force_invalid_client = True
    with pytest.raises(ReauthRequired) as terminal:
        await integ.refresh_access_token(uuid)
    connection = await integ.get_integration_by_uuid(uuid)
    errors = (transient.value, terminal.value)
    shown = " ".join([caplog.text, repr(connection), *map(repr, errors), *map(str, errors)])
    for value in (
        secrets["access_token"],
        secrets["refresh_token"],
        fresh["access_token"],
        fresh["refresh_token"],
        DEFAULT_CLIENT_SECRET,
    ):
        assert value not in shown


async def test_validate_connection_renews_an_expired_token_before_checking(
    fresh_db: str, server: OAuthTestServer
) -> None:
    from integrations import ValidationRequest

    provider = loopback_provider(
        server.base_url, validation=ValidationRequest(url=server.userinfo_url)
    )
    async with open_integrations(fresh_db, server.base_url, providers=[provider]) as integ:
        server.config.expires_in = 0
        uuid = await connect(integ)
        server.config.expires_in = 3600
        before = sum(server.stats.token_calls.values())
        result = await integ.validate_connection(uuid)
        assert result.ok, result.message
        assert sum(server.stats.token_calls.values()) == before + 1
        assert (await integ.get_integration_by_uuid(uuid)).status == "connected"


class _SlowCheck:
    """A loopback endpoint that answers 200 after ``delay`` seconds and counts hits."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.hits = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        await asyncio.sleep(self.delay)
        return web.json_response({"ok": True})

    async def __aenter__(self) -> _SlowCheck:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/check"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def test_a_check_does_not_undo_a_disconnect_made_while_it_ran(
    fresh_db: str, server: OAuthTestServer
) -> None:
    from integrations import ValidationRequest

    async with _SlowCheck(delay=0.5) as slow:
        provider = loopback_provider(server.base_url, validation=ValidationRequest(url=slow.url))
        async with open_integrations(fresh_db, server.base_url, providers=[provider]) as integ:
            uuid = await connect(integ)
            validating = asyncio.create_task(integ.validate_connection(uuid))
            await eventually(lambda: slow.hits == 1)
            await integ.disconnect(uuid)
            assert (await validating).ok
            connection = await integ.get_integration_by_uuid(uuid)
            assert "access_token" not in connection.data
            assert connection.status == "disconnected"
            assert "last_validated_at" in connection.data
