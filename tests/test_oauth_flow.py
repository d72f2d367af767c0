"""The authorization-code flow of ``Integrations`` against the strict loopback server."""

from __future__ import annotations

import asyncio
import json
import re
import uuid as uuid_mod
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest

from integrations import (
    AuthorizationDenied,
    AuthorizationTimeout,
    Connection,
    Integrations,
    IntegrationsError,
    InvalidInput,
    InvalidProviderKey,
    InvalidState,
    NotConfigured,
    oauth,
)

from .oauth_server import DEFAULT_USER, OAuthTestServer
from .oauthkit import (
    REDIRECT_URI,
    approve,
    connect,
    eventually,
    loopback_provider,
    new_connection,
    open_integrations,
)


@pytest.fixture
async def server() -> AsyncIterator[OAuthTestServer]:
    async with OAuthTestServer() as srv:
        yield srv


@pytest.fixture
async def integ(fresh_db: str, server: OAuthTestServer) -> AsyncIterator[Integrations]:
    async with open_integrations(fresh_db, server.base_url) as instance:
        yield instance


async def _rows(db: asyncpg.Connection) -> list[tuple[str, int]]:
    rows = await db.fetch(
        "SELECT value_json::text AS v, version FROM integrations.connections ORDER BY uuid"
    )
    return [(r["v"], r["version"]) for r in rows]


async def _pending(db: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await db.fetch("SELECT * FROM integrations.pending_authorizations"))


@pytest.fixture
async def events(db: asyncpg.Connection) -> AsyncIterator[list[dict[str, Any]]]:
    received: list[dict[str, Any]] = []

    def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        received.append(json.loads(payload))

    await db.add_listener("integrations_events", on_notify)
    yield received
    await db.remove_listener("integrations_events", on_notify)


# -- begin ----------------------------------------------------------------------------


async def test_begin_authorization_returns_a_pkce_url_and_stores_only_a_state_hash(
    integ: Integrations, db: asyncpg.Connection, server: OAuthTestServer
) -> None:
    uuid = await new_connection(integ)
    url, state = await integ.begin_authorization(uuid, REDIRECT_URI, actor="user:7")
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert url.startswith(server.authorize_url + "?")
    assert query["state"] == state
    assert query["code_challenge_method"] == "S256"
    assert query["redirect_uri"] == REDIRECT_URI
    assert query["scope"] == "read"
    [row] = await _pending(db)
    assert row["state_hash"] == oauth.hash_state(state)
    assert str(row["connection_uuid"]) == uuid
    assert row["redirect_uri"] == REDIRECT_URI
    assert list(row["scopes"]) == ["read"]
    assert row["actor"] == "user:7"
    ttl = row["expires_at"] - row["created_at"]
    assert timedelta(minutes=9) < ttl <= timedelta(minutes=10)
    assert state not in json.dumps(dict(row), default=str)
    sealed = json.loads(row["code_verifier"])
    assert sealed["$enc"] == 1, "the PKCE verifier is stored encrypted"


async def test_begin_authorization_takes_requested_scopes(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    uuid = await new_connection(integ)
    url, _ = await integ.begin_authorization(uuid, REDIRECT_URI, scopes=["read", "write"])
    assert parse_qs(urlsplit(url).query)["scope"] == ["read write"]
    [row] = await _pending(db)
    assert list(row["scopes"]) == ["read", "write"]


async def test_begin_authorization_refuses_what_cannot_start_a_flow(
    integ: Integrations,
) -> None:
    api = await integ.add_connection("openai", "default")
    with pytest.raises(InvalidProviderKey):
        await integ.begin_authorization(api.uuid, REDIRECT_URI)
    bare = await integ.add_connection("loopback", "bare")
    with pytest.raises(NotConfigured):
        await integ.begin_authorization(bare.uuid, REDIRECT_URI)
    uuid = await new_connection(integ)
    with pytest.raises(InvalidInput) as info:
        await integ.begin_authorization(uuid, "not a url")
    assert info.value.code == "invalid_url", info.value
    with pytest.raises(InvalidInput) as info:
        await integ.begin_authorization(uuid, REDIRECT_URI, scopes="read")  # type: ignore[arg-type]
    assert info.value.code == "invalid", info.value
    with pytest.raises(NotConfigured):
        await integ.begin_authorization(str(uuid_mod.uuid4()), REDIRECT_URI)


async def test_expired_pending_authorizations_are_swept_by_the_next_begin(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    uuid = await new_connection(integ)
    await integ.begin_authorization(uuid, REDIRECT_URI)
    await db.execute(
        "UPDATE integrations.pending_authorizations SET expires_at = now() - interval '1 s'"
    )
    _, state = await integ.begin_authorization(uuid, REDIRECT_URI)
    assert [r["state_hash"] for r in await _pending(db)] == [oauth.hash_state(state)]


async def test_begin_authorization_is_not_blocked_by_a_refresh_in_flight(
    integ: Integrations, server: OAuthTestServer
) -> None:
    """A refresh holds the row lock for its token request; the pending authorization's
    foreign key check does not wait for it."""
    uuid = await connect(integ)
    server.config.token_delay, server.config.delay_next = 3.0, 1
    refreshing = asyncio.create_task(integ.refresh_access_token(uuid))
    await eventually(lambda: server.stats.token_calls["refresh_token"] == 1)
    flight = integ._s.tokens._inflight[uuid]
    await integ.begin_authorization(uuid, REDIRECT_URI)
    # Done while the token request is still out: it did not wait for the refresh.
    assert not flight.answered and not refreshing.done()
    await refreshing
    assert flight.answered


# -- complete -------------------------------------------------------------------------


async def test_full_flow_stores_tokens_account_and_status(
    integ: Integrations,
    server: OAuthTestServer,
    db: asyncpg.Connection,
    events: list[dict[str, Any]],
) -> None:
    uuid = await new_connection(integ)
    url, _ = await integ.begin_authorization(uuid, REDIRECT_URI, actor="user:7")
    callback = await approve(url)
    before = datetime.now(UTC)
    connection = await integ.complete_authorization(callback["state"], code=callback["code"])

    assert isinstance(connection, Connection)
    assert connection.uuid == uuid
    assert connection.status == "connected"
    assert connection.data["access_token"] != "" and "at_" not in str(connection.data)
    data = await integ.get_integration(uuid)
    assert server.token_status(data["access_token"]) == "active"
    assert server.token_status(data["refresh_token"]) == "active"
    assert data["token_type"] == "Bearer"
    assert data["granted_scopes"] == ["read"]
    assert data["reauth_required"] is False
    expires_at = datetime.fromisoformat(data["expires_at"])
    assert expires_at.tzinfo is not None
    assert timedelta(seconds=3590) < expires_at - before < timedelta(seconds=3610)
    for stamp in ("token_obtained_at", "connected_at"):
        assert abs(datetime.fromisoformat(data[stamp]) - before) < timedelta(seconds=30)
    assert data["account"] == {
        "email": DEFAULT_USER["email"],
        "name": DEFAULT_USER["name"],
        "picture": DEFAULT_USER["picture"],
        "account_id": DEFAULT_USER["sub"],
    }
    assert await integ.is_connected(uuid)
    assert await _pending(db) == []
    assert server.stats.token_calls["authorization_code"] == 1
    await eventually(lambda: any(e["kind"] == "connected" for e in events))
    [connected] = [e for e in events if e["kind"] == "connected"]
    assert connected["uuid"] == uuid
    assert connected["actor"] == "user:7"
    assert connected["status"] == "connected"
    assert connected["previous_status"] == "disconnected"
    for event in events:
        assert data["access_token"] not in json.dumps(event)
        assert data["refresh_token"] not in json.dumps(event)


async def test_tokens_are_encrypted_at_rest(integ: Integrations, db: asyncpg.Connection) -> None:
    uuid = await connect(integ)
    data = await integ.get_integration(uuid)
    raw = await db.fetchval(
        "SELECT value_json::text FROM integrations.connections WHERE uuid = $1",
        uuid_mod.UUID(uuid),
    )
    assert data["access_token"] not in raw
    assert data["refresh_token"] not in raw
    listed = await integ.list_connections("loopback")
    assert data["access_token"] not in repr(listed)


async def test_granted_scopes_come_from_the_token_response(
    integ: Integrations, server: OAuthTestServer
) -> None:
    server.config.granted_scope = "read profile"
    uuid = await new_connection(integ)
    url, _ = await integ.begin_authorization(uuid, REDIRECT_URI, scopes=["read", "write"])
    callback = await approve(url)
    await integ.complete_authorization(callback["state"], code=callback["code"])
    assert (await integ.get_integration(uuid))["granted_scopes"] == ["read", "profile"]


async def test_a_reused_state_is_refused_and_changes_nothing(
    integ: Integrations, db: asyncpg.Connection, server: OAuthTestServer
) -> None:
    uuid = await new_connection(integ)
    url, _ = await integ.begin_authorization(uuid, REDIRECT_URI)
    callback = await approve(url)
    await integ.complete_authorization(callback["state"], code=callback["code"])
    before = await _rows(db)
    with pytest.raises(InvalidState) as info:
        await integ.complete_authorization(callback["state"], code=callback["code"])
    assert info.value.code == "invalid_state"
    assert await _rows(db) == before
    assert server.stats.token_calls["authorization_code"] == 1


async def test_a_forged_state_is_refused_and_changes_nothing(
    integ: Integrations, db: asyncpg.Connection, server: OAuthTestServer
) -> None:
    uuid = await new_connection(integ)
    url, _ = await integ.begin_authorization(uuid, REDIRECT_URI)
    callback = await approve(url)
    before = await _rows(db)
    pending = await _pending(db)
    for forged in (oauth.generate_state(), callback["state"] + "x", ""):
        with pytest.raises(InvalidState):
            await integ.complete_authorization(forged, code=callback["code"])
    assert await _rows(db) == before
    assert await _pending(db) == pending
    assert server.stats.token_calls["authorization_code"] == 0


async def test_an_expired_state_is_refused_and_changes_nothing(
    fresh_db: str, db: asyncpg.Connection, server: OAuthTestServer
) -> None:
    async with open_integrations(fresh_db, server.base_url, authorization_ttl=0.2) as integ:
        uuid = await new_connection(integ)
        url, _ = await integ.begin_authorization(uuid, REDIRECT_URI)
        callback = await approve(url)
        await asyncio.sleep(0.3)
        before = await _rows(db)
        with pytest.raises(InvalidState):
            await integ.complete_authorization(callback["state"], code=callback["code"])
        assert await _rows(db) == before
        assert server.stats.token_calls["authorization_code"] == 0
        assert await _pending(db) == []


async def test_a_provider_error_is_recorded_and_raised(
    integ: Integrations,
    server: OAuthTestServer,
    db: asyncpg.Connection,
    events: list[dict[str, Any]],
) -> None:
    server.config.deny = True
    uuid = await new_connection(integ)
    url, _ = await integ.begin_authorization(uuid, REDIRECT_URI)
    callback = await approve(url)
    assert callback["error"] == "access_denied"
    with pytest.raises(AuthorizationDenied) as info:
        await integ.complete_authorization(
            callback["state"],
            error=callback["error"],
            error_description=callback["error_description"],
        )
    assert info.value.code == "authorization_denied"
    connection = await integ.get_integration_by_uuid(uuid)
    assert connection.status == "error"
    assert "access_denied" in connection.data["validation_status"]
    assert await _pending(db) == []
    with pytest.raises(InvalidState):
        await integ.complete_authorization(callback["state"], error="access_denied")
    await eventually(lambda: any(e["uuid"] == uuid and e["status"] == "error" for e in events))


async def test_a_callback_without_code_or_error_is_refused_before_the_state_is_used(
    integ: Integrations, db: asyncpg.Connection
) -> None:
    uuid = await new_connection(integ)
    _, state = await integ.begin_authorization(uuid, REDIRECT_URI)
    with pytest.raises(InvalidInput) as info:
        await integ.complete_authorization(state)
    assert info.value.code == "invalid", info.value
    assert len(await _pending(db)) == 1


async def test_a_reconnect_clears_a_previous_error(
    integ: Integrations, server: OAuthTestServer
) -> None:
    server.config.deny = True
    uuid = await new_connection(integ)
    url, _ = await integ.begin_authorization(uuid, REDIRECT_URI)
    callback = await approve(url)
    with pytest.raises(AuthorizationDenied):
        await integ.complete_authorization(callback["state"], error=callback["error"])
    server.config.deny = False
    url, _ = await integ.begin_authorization(uuid, REDIRECT_URI)
    callback = await approve(url)
    connection = await integ.complete_authorization(callback["state"], code=callback["code"])
    assert connection.status == "connected"
    assert "validation_status" not in connection.data


async def test_a_removed_connection_cannot_complete(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await new_connection(integ)
    url, _ = await integ.begin_authorization(uuid, REDIRECT_URI)
    callback = await approve(url)
    await integ.remove_connection(uuid)
    with pytest.raises(InvalidState):
        await integ.complete_authorization(callback["state"], code=callback["code"])
    assert server.stats.token_calls["authorization_code"] == 0


async def test_removing_a_connection_during_the_code_exchange_revokes_the_new_grant(
    integ: Integrations, server: OAuthTestServer
) -> None:
    """The code is exchanged outside the row lock; when the connection is removed meanwhile
    the tokens cannot be stored, and the grant just issued is revoked."""
    uuid = await new_connection(integ)
    url, _ = await integ.begin_authorization(uuid, REDIRECT_URI)
    query = await approve(url)
    server.config.token_delay = 0.5
    completing = asyncio.create_task(
        integ.complete_authorization(query["state"], code=query["code"])
    )
    await eventually(lambda: server.stats.token_calls["authorization_code"] == 1)
    await integ.remove_connection(uuid)
    with pytest.raises(IntegrationsError) as info:
        await completing
    assert info.value.code == "deleted", info.value
    # The revocation runs in the background: wait for it to reach the provider.
    await eventually(lambda: server.stats.grants_revoked == 1)
    live = [g for g in server._grants.values() if not g.revoked]
    assert live == [], "a grant issued for a removed connection is left live"
    assert server.stats.grants_revoked == 1


# -- the seed's authorization_url / exchange_code ---------------------------------------


async def test_authorization_url_and_exchange_code_use_pkce(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await new_connection(integ)
    state = oauth.generate_state()
    url = await integ.authorization_url(uuid, REDIRECT_URI, state=state)
    query = parse_qs(urlsplit(url).query)
    assert query["state"] == [state]
    assert query["code_challenge_method"] == ["S256"]
    callback = await approve(url)
    assert callback["state"] == state
    data = await integ.exchange_code(uuid, callback["code"], REDIRECT_URI, actor="user:1")
    assert data["status"] == "connected"
    assert not str(data["access_token"]).startswith("at_"), "exchange_code returns masked data"
    plain = await integ.get_integration(uuid)
    assert server.token_status(plain["access_token"]) == "active"


async def test_authorization_url_without_state_still_works_with_exchange_code(
    integ: Integrations,
) -> None:
    uuid = await new_connection(integ)
    url = await integ.authorization_url(uuid, REDIRECT_URI, scopes=["read"])
    callback = await approve(url)
    data = await integ.exchange_code(uuid, callback["code"], REDIRECT_URI)
    assert data["status"] == "connected"


async def test_a_state_given_to_authorization_url_completes_too(integ: Integrations) -> None:
    uuid = await new_connection(integ)
    state = oauth.generate_state()
    url = await integ.authorization_url(uuid, REDIRECT_URI, state=state)
    callback = await approve(url)
    connection = await integ.complete_authorization(state, code=callback["code"])
    assert connection.status == "connected"


async def test_exchange_code_without_pkce_for_providers_that_do_not_use_it(
    fresh_db: str,
) -> None:
    server = OAuthTestServer()
    async with server:
        provider = loopback_provider(server.base_url, pkce=False)
        async with open_integrations(fresh_db, server.base_url, providers=[provider]) as integ:
            uuid = await new_connection(integ)
            url = await integ.authorization_url(uuid, REDIRECT_URI, state="s" * 20)
            assert "code_challenge" not in url
            # The strict server insists on PKCE, which is what a no-PKCE provider skips.
            callback = await approve(url)
            assert callback["error"] == "invalid_request"


# -- connect_interactive ----------------------------------------------------------------


async def _printed_url(capsys: pytest.CaptureFixture[str], within: float = 10.0) -> str:
    seen = ""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        seen += capsys.readouterr().out
        match = re.search(r"(http://\S+/authorize\?\S+)", seen)
        if match:
            return match.group(1)
        await asyncio.sleep(0.02)
    raise AssertionError(f"no authorization URL printed: {seen!r}")


async def test_connect_interactive_completes_on_the_loopback_callback(
    integ: Integrations, server: OAuthTestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    uuid = await new_connection(integ)
    task = asyncio.create_task(integ.connect_interactive(uuid, timeout=30))
    url = await _printed_url(capsys)
    redirect_uri = parse_qs(urlsplit(url).query)["redirect_uri"][0]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/callback", redirect_uri)
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        # The authorization server redirects the "browser" to the temporary callback server.
        assert resp.status == 200
        assert "Connected" in await resp.text()
    connection = await task
    assert connection.status == "connected"
    assert await integ.is_connected(uuid)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as http, http.get(redirect_uri):
            pass


async def test_connect_interactive_ignores_callbacks_for_other_states(
    integ: Integrations, capsys: pytest.CaptureFixture[str]
) -> None:
    uuid = await new_connection(integ)
    task = asyncio.create_task(integ.connect_interactive(uuid, timeout=30))
    url = await _printed_url(capsys)
    redirect_uri = parse_qs(urlsplit(url).query)["redirect_uri"][0]
    async with aiohttp.ClientSession() as http:
        async with http.get(redirect_uri, params={"state": "forged", "code": "x"}) as resp:
            assert resp.status == 400
        assert not task.done()
        async with http.get(url) as resp:
            assert resp.status == 200
    assert (await task).status == "connected"


async def test_a_repeated_callback_does_not_fail_connect_interactive(
    integ: Integrations, server: OAuthTestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second hit of the callback URL (a reload, a browser retry) while the first is still
    exchanging the code is answered 409 and leaves the flow alone."""
    uuid = await new_connection(integ)
    task = asyncio.create_task(integ.connect_interactive(uuid, timeout=30))
    url = await _printed_url(capsys)
    async with aiohttp.ClientSession() as http:
        async with http.get(url, allow_redirects=False) as resp:
            callback = resp.headers["Location"]
        assert parse_qs(urlsplit(callback).query)["code"]
        server.config.token_delay = 0.5

        async def hit() -> int:
            async with http.get(callback) as resp:
                return resp.status

        first = asyncio.create_task(hit())
        await eventually(lambda: server.stats.token_calls["authorization_code"] == 1)
        statuses = await asyncio.gather(first, hit(), return_exceptions=True)
    try:
        connection = await task
    except IntegrationsError as exc:
        pytest.fail(
            f"connect_interactive raised {exc.code} (callback statuses {statuses}); "
            f"stored status: {(await integ.get_integration_by_uuid(uuid)).status}"
        )
    assert connection.status == "connected"
    assert statuses == [200, 409]


async def test_connect_interactive_raises_a_denial(
    integ: Integrations, server: OAuthTestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.config.deny = True
    uuid = await new_connection(integ)
    task = asyncio.create_task(integ.connect_interactive(uuid, timeout=30))
    url = await _printed_url(capsys)
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        assert resp.status == 400
    with pytest.raises(AuthorizationDenied):
        await task


async def test_connect_interactive_times_out_cleanly(
    integ: Integrations, db: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    uuid = await new_connection(integ)
    with pytest.raises(AuthorizationTimeout) as info:
        await integ.connect_interactive(uuid, timeout=0.3)
    assert isinstance(info.value, TimeoutError)
    assert info.value.code == "authorization_timeout"
    url = await _printed_url(capsys)
    redirect_uri = parse_qs(urlsplit(url).query)["redirect_uri"][0]
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as http, http.get(redirect_uri):
            pass
    assert await _pending(db) == []
    assert (await integ.get_integration_by_uuid(uuid)).status == "disconnected"


@pytest.mark.parametrize("bad", [None, 42, "", "not-a-uuid", ["x"]])
async def test_oauth_methods_refuse_bad_uuids(
    integ: Integrations, db: asyncpg.Connection, bad: Any
) -> None:
    before = await _rows(db)
    for call in (
        lambda: integ.begin_authorization(bad, REDIRECT_URI),
        lambda: integ.authorization_url(bad, REDIRECT_URI),
        lambda: integ.exchange_code(bad, "code", REDIRECT_URI),
        lambda: integ.access_token(bad),
        lambda: integ.refresh_access_token(bad),
        lambda: integ.connect_interactive(bad, timeout=1),
    ):
        with pytest.raises(InvalidInput) as info:
            await call()
        assert info.value.code == "invalid_uuid", info.value
    assert await _rows(db) == before


@pytest.mark.parametrize("bad", [None, 42, b"state", ""])
async def test_complete_authorization_refuses_malformed_states(
    integ: Integrations, bad: Any
) -> None:
    with pytest.raises(InvalidState):
        await integ.complete_authorization(bad, code="code")


async def test_a_pending_authorization_survives_key_rotation(
    fresh_db: str, server: OAuthTestServer
) -> None:
    from integrations import generate_key

    from .conftest import TEST_KEY

    new_key = generate_key()
    async with open_integrations(fresh_db, server.base_url) as old:
        uuid = await new_connection(old)
        url, _state = await old.begin_authorization(uuid, REDIRECT_URI)
    async with open_integrations(fresh_db, server.base_url, keys=[new_key, TEST_KEY]) as both:
        assert (await both.rotate_keys()).rotated >= 2
    query = await approve(url)
    async with open_integrations(fresh_db, server.base_url, keys=new_key) as only_new:
        connection = await only_new.complete_authorization(query["state"], code=query["code"])
        assert connection.status == "connected"
