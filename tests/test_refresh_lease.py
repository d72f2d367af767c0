"""The refresh lease: forced refreshes coalesce, other instances wait for the holder, and a
frozen holder's lease runs out (what then happens is the takeover policy's)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from integrations import ConfigurationError, Integrations, ReauthRequired

from .oauth_server import OAuthTestServer, ServerProcess
from .oauthkit import (
    REDIRECT_URI,
    approve,
    connect,
    eventually,
    loopback_provider,
    open_integrations,
    set_stored_expiry,
)
from .test_refresh_processes import Worker


@pytest.fixture
async def server() -> AsyncIterator[OAuthTestServer]:
    async with OAuthTestServer() as srv:
        yield srv


@pytest.fixture
async def integ(fresh_db: str, server: OAuthTestServer) -> AsyncIterator[Integrations]:
    async with open_integrations(fresh_db, server.base_url) as instance:
        yield instance


def _refreshes(server: OAuthTestServer) -> int:
    return server.stats.token_calls["refresh_token"]


def _renews(decide: Any) -> bool:
    """Whether a decision handed to ``Refresher._in_row`` renews (or confirms) a lease."""
    return getattr(getattr(decide, "func", None), "__name__", "") == "_renewed"


def _stall_after_confirming(
    monkeypatch: pytest.MonkeyPatch, integ: Integrations, seconds: float
) -> list[float]:
    """Make ``integ``'s refresher freeze for ``seconds`` right after the database
    confirmed its lease, once; the returned list records the stall."""
    from integrations._tokens import Refresher

    in_row = Refresher._in_row
    stalled = integ._s.tokens
    stalls: list[float] = []

    async def in_row_then_stall(self: Refresher, uuid: str, decide: Any) -> Any:
        result = await in_row(self, uuid, decide)
        if self is stalled and _renews(decide) and not stalls:
            stalls.append(seconds)
            await asyncio.sleep(seconds)  # the lease runs out meanwhile
        return result

    monkeypatch.setattr(Refresher, "_in_row", in_row_then_stall)
    return stalls


def _fenced_out(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages of refresh answers whose write found the lease taken over."""
    return [
        r.getMessage() for r in caplog.records if "before its answer was stored" in r.getMessage()
    ]


def _takeover_reasons(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Why each lease taken over was not sent again, as its warning says."""
    found = []
    for record in caplog.records:
        message = record.getMessage()
        if "ran out without a write from its holder" in message:
            found.append(message.split("the refresh token; ")[1].split(", so it is not")[0])
    return found


async def test_five_simultaneous_forced_refreshes_make_one_token_request(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await connect(integ)
    before = await integ.access_token(uuid)
    server.config.token_delay = 0.2
    began = datetime.now().astimezone()
    tokens = await asyncio.gather(*(integ.refresh_access_token(uuid) for _ in range(5)))
    assert len(set(tokens)) == 1 and tokens[0] != before
    assert _refreshes(server) == 1
    stored = await integ.get_integration(uuid)
    assert datetime.fromisoformat(stored["token_obtained_at"]) >= began


async def test_a_forced_refresh_joins_a_request_not_answered_yet_and_not_a_finished_one(
    integ: Integrations, server: OAuthTestServer
) -> None:
    uuid = await connect(integ)
    server.config.token_delay = 0.5
    first = asyncio.create_task(integ.refresh_access_token(uuid))
    await eventually(lambda: _refreshes(server) == 1)
    # Its answer will be obtained after this call began: share it.
    second = await integ.refresh_access_token(uuid)
    assert second == await first
    assert _refreshes(server) == 1
    # That token was obtained before this call began: ask again.
    server.config.token_delay = 0.0
    third = await integ.refresh_access_token(uuid)
    assert third != second
    assert _refreshes(server) == 2


async def test_a_forced_refresh_does_not_share_an_answer_obtained_before_it_began(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    uuid = await connect(integ)
    server.config.token_delay, server.config.delay_next = 0.5, 1
    first = asyncio.create_task(integ.refresh_access_token(uuid))
    await eventually(lambda: _refreshes(server) == 1)
    flight = integ._s.tokens._inflight[uuid]
    # The row held: the first answer arrives, but its write waits, and its task goes on.
    async with db.transaction():
        await db.execute(
            "SELECT 1 FROM integrations.connections WHERE uuid = $1 FOR UPDATE",
            uuid_mod.UUID(uuid),
        )
        await eventually(lambda: flight.answered)
        second = asyncio.create_task(integ.refresh_access_token(uuid))
        await eventually(lambda: flight.callers == 2)  # the forced caller met the flight
        assert not first.done()
    earlier, later = await first, await second
    assert later != earlier
    assert _refreshes(server) == 2


async def _join_a_refresh_ahead_of_expiry(
    integ: Integrations, db: asyncpg.Connection, uuid: str, join: Any
) -> tuple[asyncio.Task[str], asyncio.Task[str]]:
    """Start a refresh ahead of expiry that waits for the row's lock, let ``join()`` join
    it, then (as if another process had refreshed before ``join()`` was called) make the
    stored token one that is good for an hour; the two callers' tasks."""
    await set_stored_expiry(db, uuid, 30)  # within the leeway: due, still valid
    async with db.transaction():
        await db.execute(
            "SELECT 1 FROM integrations.connections WHERE uuid = $1 FOR UPDATE",
            uuid_mod.UUID(uuid),
        )
        expiring = asyncio.create_task(integ.access_token(uuid))
        await eventually(lambda: uuid in integ._s.tokens._inflight)
        flight = integ._s.tokens._inflight[uuid]
        joined = asyncio.create_task(join())
        await eventually(lambda: flight.callers == 2)
        await db.execute(
            "UPDATE integrations.connections SET value_json = value_json || "
            "jsonb_build_object('expires_at', $2::text) WHERE uuid = $1",
            uuid_mod.UUID(uuid),
            (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        )
    return expiring, joined


async def test_a_forced_refresh_joining_a_refresh_ahead_of_expiry_still_gets_a_new_token(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    """A forced caller joins a refresh ahead of expiry that has not looked at the row yet;
    meanwhile the stored token becomes one that is not due, obtained before the forced
    call began. The shared refresh asks for the forced caller all the same."""
    uuid = await connect(integ)
    before = (await integ.get_credentials(uuid))["access_token"]
    expiring, forced = await _join_a_refresh_ahead_of_expiry(
        integ, db, uuid, lambda: integ.refresh_access_token(uuid)
    )
    new = await forced
    assert new != before
    assert await expiring == new
    assert _refreshes(server) == 1


@pytest.mark.parametrize("joiner", ["expiring", "rejected"])
async def test_an_automatic_refresh_joining_one_ahead_of_expiry_takes_a_token_stored_meanwhile(
    integ: Integrations, server: OAuthTestServer, db: asyncpg.Connection, joiner: str
) -> None:
    """A caller whose token is due, or whose older token the API rejected, joins a refresh
    ahead of expiry that has not looked at the row yet; meanwhile the stored token becomes
    one that is not due. Neither caller forced a refresh: both take that token, and
    nothing is asked."""
    uuid = await connect(integ)
    before = (await integ.get_credentials(uuid))["access_token"]
    row = await integ._s.core.repo.get(uuid)
    assert row is not None

    def join() -> Any:
        if joiner == "expiring":
            return integ.access_token(uuid)
        return integ._s.tokens.after_rejection(row, "at_an_older_token")

    expiring, joined = await _join_a_refresh_ahead_of_expiry(integ, db, uuid, join)
    assert await expiring == await joined == before
    assert _refreshes(server) == 0


async def test_a_forced_refresh_does_not_share_a_flight_that_decided_to_ask_nothing(
    integ: Integrations, server: OAuthTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh for a 401 to an older token decides to hand back the stored token; a
    forced caller that comes before that refresh ended does not take the stored token
    (obtained before it began): it waits, then asks."""
    from integrations._tokens import Refresher

    uuid = await connect(integ)
    stored = (await integ.get_credentials(uuid))["access_token"]
    row = await integ._s.core.repo.get(uuid)
    assert row is not None
    in_row = Refresher._in_row
    decided, release = asyncio.Event(), asyncio.Event()

    async def in_row_then_pause(self: Refresher, uuid: str, decide: Any) -> Any:
        result = await in_row(self, uuid, decide)
        if (
            getattr(getattr(decide, "func", None), "__name__", "") == "_look"
            and not decided.is_set()
        ):
            decided.set()
            await release.wait()
        return result

    monkeypatch.setattr(Refresher, "_in_row", in_row_then_pause)
    rejected = asyncio.create_task(integ._s.tokens.after_rejection(row, "at_an_older_token"))
    await decided.wait()
    forced = asyncio.create_task(integ.refresh_access_token(uuid))
    await eventually(lambda: integ._s.tokens._inflight[uuid].callers == 2)
    release.set()
    assert await rejected == stored
    assert await forced != stored
    assert _refreshes(server) == 1


async def test_another_instance_waits_for_the_lease_and_reuses_the_new_token(
    fresh_db: str,
    integ: Integrations,
    server: OAuthTestServer,
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Looks far apart: only the holder's notification can wake the waiter soon.
    monkeypatch.setattr("integrations._tokens._POLL", 30.0)
    uuid = await connect(integ)
    server.config.token_delay = 1.0
    async with open_integrations(fresh_db, server.base_url) as other:
        first = asyncio.create_task(integ.refresh_access_token(uuid))
        await eventually(lambda: _refreshes(server) == 1)
        lease = json.loads(
            await db.fetchval(
                "SELECT value_json -> 'refresh_lease' FROM integrations.connections "
                "WHERE uuid = $1",
                uuid_mod.UUID(uuid),
            )
        )
        # Marked as sending before the request left, in its own commit.
        assert set(lease) == {"holder", "fence", "until", "requested_at", "sending"}
        version = await db.fetchval(
            "SELECT version FROM integrations.connections WHERE uuid = $1", uuid_mod.UUID(uuid)
        )
        assert lease["fence"] <= version
        answered: list[float] = []
        first.add_done_callback(lambda _: answered.append(time.monotonic()))
        shared = await other.refresh_access_token(uuid)
        woken = time.monotonic()
        assert shared == await first
        assert _refreshes(server) == 1
        # Woken by the holder's notification (through its event listener), not by the
        # next look or the lease's end (both more than 10 s away).
        assert other.event_stats.received >= 1
        # (It may even be woken before the holder's task has handed its token out.)
        assert woken - (answered[0] if answered else woken) < 5
    stored = await integ.get_integration(uuid)
    assert "refresh_lease" not in stored


async def _lease_in_row(db: asyncpg.Connection, uuid: str) -> object:
    return await db.fetchval(
        "SELECT value_json -> 'refresh_lease' FROM integrations.connections WHERE uuid = $1",
        uuid_mod.UUID(uuid),
    )


@pytest.mark.parametrize("takeover", ["refresh", "reauthorize"])
@pytest.mark.parametrize("answer", ["tokens", "failure"])
async def test_a_new_grant_while_a_refresh_is_out_ends_its_lease_and_keeps_the_grant(
    fresh_db: str,
    server: OAuthTestServer,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    takeover: str,
    answer: str,
) -> None:
    caplog.set_level(logging.INFO, logger="integrations")
    async with open_integrations(fresh_db, server.base_url, refresh_takeover=takeover) as integ:
        uuid = await connect(integ)
        # Only the refresh's request waits: the new grant's code exchange answers at once.
        server.config.token_delay, server.config.delay_next = 3.0, 1
        refreshing = asyncio.create_task(integ.refresh_access_token(uuid))
        await eventually(lambda: _refreshes(server) == 1)
        url, _ = await integ.begin_authorization(uuid, REDIRECT_URI)
        query = await approve(url)
        await integ.complete_authorization(query["state"], code=query["code"])
        granted = (await integ.get_integration(uuid))["access_token"]
        assert not refreshing.done(), "the refresh answered before the new grant landed"
        if answer == "failure":
            # Refused for good: were it recorded, the new grant would read as needing one.
            server.config.force_invalid_client = True
            with pytest.raises(ReauthRequired) as failure:
                await refreshing
            assert failure.value.code == "reauth_required"
            server.config.force_invalid_client = False
        else:
            # The grant is newer than the refresh's answer: the grant's token is handed out.
            assert await refreshing == granted
            assert _fenced_out(caplog) == [
                f"the refresh lease of connection {uuid} was taken over before its answer "
                "was stored; the stored tokens are newer"
            ]
        assert await _lease_in_row(db, uuid) is None
        stored = await integ.get_integration(uuid)
        assert stored["access_token"] == granted and "refresh_error" not in stored
        assert (await integ.get_integration_by_uuid(uuid)).status == "connected"
        # The next refresh asks at once, with the grant's refresh token.
        server.config.token_delay = 0.0
        fresh = await integ.refresh_access_token(uuid)
        assert fresh != granted and _refreshes(server) == 2
        assert server.stats.refresh_reuse_detected == 0
        assert (await integ.get_integration_by_uuid(uuid)).status == "connected"


async def test_an_answer_whose_lease_was_ended_meanwhile_serves_this_process_only(
    integ: Integrations,
    server: OAuthTestServer,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The lease of a refresh whose request is out ends without a newer grant (as a lease
    taken over by a process that then sent nothing): the answer is not stored, the caller
    gets it, and the log says which connection and why."""
    caplog.set_level(logging.INFO, logger="integrations")
    uuid = await connect(integ)
    before = await integ.get_integration(uuid)
    server.config.token_delay = 0.5
    refreshing = asyncio.create_task(integ.refresh_access_token(uuid))
    await eventually(lambda: _refreshes(server) == 1)
    await db.execute(
        "UPDATE integrations.connections SET value_json = value_json - 'refresh_lease' "
        "WHERE uuid = $1",
        uuid_mod.UUID(uuid),
    )
    new = await refreshing
    assert new != before["access_token"]
    assert (await integ.get_integration(uuid))["access_token"] == before["access_token"]
    assert _fenced_out(caplog) == [
        f"the refresh lease of connection {uuid} was taken over before its answer was "
        "stored; its answer serves this process only"
    ]


@pytest.fixture(scope="module")
def server_process() -> Iterator[ServerProcess]:
    with ServerProcess() as proc:
        yield proc


@pytest.fixture
def strict(server_process: ServerProcess) -> ServerProcess:
    server_process.reset()
    return server_process


async def _frozen_holder(
    fresh_db: str, server: ServerProcess, uuid: str, db: asyncpg.Connection
) -> Worker:
    """A worker process that took the lease, sent its token request and was stopped."""
    server.configure(token_delay=2.0)
    victim = await Worker.start(
        fresh_db, server.base_url, uuid, mode="refresh", count=1, extra=("--lease", "1")
    )
    victim.go()
    deadline = time.monotonic() + 20
    while server.stats()["token_calls"].get("refresh_token", 0) < 1:
        assert time.monotonic() < deadline, "the worker never reached the token endpoint"
        await asyncio.sleep(0.01)
    victim.proc.send_signal(signal.SIGSTOP)
    # Its lease runs out (it renews no more) while the answer waits in its socket.
    await asyncio.sleep(2.5)
    return victim


async def test_a_frozen_holder_is_taken_over_and_its_late_answer_does_not_overwrite(
    fresh_db: str, strict: ServerProcess, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="integrations")
    # A provider that does not rotate (so declared): the refresh token the frozen holder
    # sent is good, and is sent again once the holder had its time to write.
    provider = loopback_provider(strict.base_url, rotates_refresh_tokens=False)
    async with open_integrations(
        fresh_db, strict.base_url, providers=[provider], token_write_retry=0.5
    ) as integ:
        uuid = await connect(integ)
        strict.configure(rotate_refresh_tokens=False)
        victim = await _frozen_holder(fresh_db, strict, uuid, db)
        strict.configure(token_delay=0.0)
        taken = await integ.refresh_access_token(uuid)
        assert strict.stats()["token_calls"]["refresh_token"] == 2
        took = [
            r.getMessage()
            for r in caplog.records
            if "took over the refresh lease" in r.getMessage()
        ]
        assert len(took) == 1 and f"connection {uuid}: its holder (" in took[0], took
        victim.proc.send_signal(signal.SIGCONT)
        outcome = await victim.result()
        assert outcome["results"] == [{"status": 200}]
        # The late holder's fence was gone: the taker's tokens stay.
        assert (await integ.get_integration(uuid))["access_token"] == taken
        assert (await integ.get_integration_by_uuid(uuid)).status == "connected"


async def test_with_reauthorize_a_frozen_holder_is_not_taken_over_and_its_answer_is_stored(
    fresh_db: str, strict: ServerProcess, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="integrations")
    async with open_integrations(
        fresh_db, strict.base_url, refresh_takeover="reauthorize", token_write_retry=0.5
    ) as integ:
        uuid = await connect(integ)
        victim = await _frozen_holder(fresh_db, strict, uuid, db)
        strict.configure(token_delay=0.0)
        # The stored refresh token may be spent (it is: the server rotated it), so it is
        # not sent again: a strict provider would revoke the whole grant on its reuse.
        with pytest.raises(ReauthRequired):
            await integ.refresh_access_token(uuid)
        assert _takeover_reasons(caplog) == ["refresh_takeover is 'reauthorize'"]
        assert (await integ.get_integration_by_uuid(uuid)).status == "error"
        assert strict.stats()["token_calls"]["refresh_token"] == 1
        victim.proc.send_signal(signal.SIGCONT)
        assert (await victim.result())["results"] == [{"status": 200}]
        # The holder came back: its answer is stored and the connection recovers.
        assert (await integ.get_integration_by_uuid(uuid)).status == "connected"
        response = await integ.authenticated_request(uuid, "GET", f"{strict.base_url}/api/resource")
        assert response.status == 200
        stats = strict.stats()
        assert stats["refresh_reuse_detected"] == 0 and stats["grants_revoked"] == 0


async def test_by_default_a_rotating_providers_spent_refresh_token_is_never_sent_again(
    fresh_db: str, strict: ServerProcess, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """The frozen holder sent the refresh token (its lease says so): once it had its time
    to store the answer, the connection is marked, and the grant survives the holder."""
    caplog.set_level(logging.WARNING, logger="integrations")
    async with open_integrations(fresh_db, strict.base_url, token_write_retry=0.5) as integ:
        uuid = await connect(integ)
        victim = await _frozen_holder(fresh_db, strict, uuid, db)
        strict.configure(token_delay=0.0)
        with pytest.raises(ReauthRequired, match="authorized again"):
            await integ.refresh_access_token(uuid)
        assert _takeover_reasons(caplog) == ["the provider rotates refresh tokens"]
        assert strict.stats()["token_calls"]["refresh_token"] == 1
        victim.proc.send_signal(signal.SIGCONT)
        assert (await victim.result())["results"] == [{"status": 200}]
        assert (await integ.get_integration_by_uuid(uuid)).status == "connected"
        stats = strict.stats()
        assert stats["refresh_reuse_detected"] == 0 and stats["grants_revoked"] == 0


@pytest.mark.parametrize(
    "options",
    [
        {"refresh_lease": 0.5},
        {"refresh_takeover": "never"},
        {"token_write_retry": -1},
        {"statement_cache_size": -1},
        {"statement_cache_size": True},
        {"listen_dsn": ""},
    ],
)
def test_lease_and_pooler_settings_are_checked(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError) as info:
        Integrations("postgresql://localhost/x", **options)  # type: ignore[arg-type]
    assert info.value.code == "configuration", info.value


async def test_statement_cache_size_goes_with_the_pool_the_library_creates(
    fresh_db: str,
) -> None:
    pool = await asyncpg.create_pool(fresh_db, min_size=1, max_size=2)
    try:
        with pytest.raises(ConfigurationError, match="statement_cache_size"):
            Integrations(pool=pool, statement_cache_size=0)
    finally:
        await pool.close()


async def test_a_holder_that_stopped_before_sending_is_fenced_out_and_sends_nothing(
    fresh_db: str, server: OAuthTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from integrations._tokens import Refresher

    async with (
        open_integrations(fresh_db, server.base_url, refresh_lease=1) as holder,
        open_integrations(fresh_db, server.base_url, refresh_lease=1) as taker,
    ):
        uuid = await connect(holder)
        ask = Refresher._ask
        stopped = holder._s.tokens

        leased = asyncio.Event()

        async def ask_late(self: Refresher, *args: object) -> str:
            if self is stopped:
                leased.set()
                await asyncio.sleep(2.0)  # stopped between taking the lease and sending
            return await ask(self, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(Refresher, "_ask", ask_late)
        late = asyncio.create_task(holder.refresh_access_token(uuid))
        await asyncio.wait_for(leased.wait(), 10)
        # The lease runs out; the taker refreshes, and the holder, once it runs again,
        # takes the taker's tokens instead of sending its now spent refresh token.
        fresh = await taker.refresh_access_token(uuid)
        assert await late == fresh
        assert _refreshes(server) == 1
        assert server.stats.refresh_reuse_detected == 0
        assert (await taker.get_integration_by_uuid(uuid)).status == "connected"


async def test_with_reauthorize_a_token_request_that_timed_out_is_not_sent_again(
    fresh_db: str, server: OAuthTestServer
) -> None:
    async with open_integrations(
        fresh_db, server.base_url, token_timeout=0.3, refresh_takeover="reauthorize"
    ) as integ:
        uuid = await connect(integ)
        server.config.token_delay = 1.0
        with pytest.raises(ReauthRequired) as info:
            await integ.refresh_access_token(uuid)
        assert "not sent again" in info.value.message
        await asyncio.sleep(1.0)  # the server's answer to the one request
        assert _refreshes(server) == 1
        stored = await integ.get_integration_by_uuid(uuid)
        assert stored.reauth_required is True


@pytest.mark.parametrize(("rotates", "takeover"), [(True, "refresh"), (False, "reauthorize")])
async def test_a_timed_out_token_request_that_may_have_spent_the_grant_is_not_sent_again(
    fresh_db: str, server: OAuthTestServer, rotates: bool, takeover: str
) -> None:
    """Either the provider rotates refresh tokens, or the takeover policy treats every
    refresh token as spent once sent: a request that may have arrived is not repeated."""
    server.config.rotate_refresh_tokens = rotates
    provider = loopback_provider(server.base_url, rotates_refresh_tokens=rotates)
    async with open_integrations(
        fresh_db,
        server.base_url,
        token_timeout=0.3,
        refresh_takeover=takeover,
        providers=[provider],
    ) as integ:
        uuid = await connect(integ)
        server.config.update({"token_delay": 1.0, "delay_next": 1})
        with pytest.raises(ReauthRequired) as info:
            await integ.refresh_access_token(uuid)
        assert "not sent again" in info.value.message
        assert _refreshes(server) == 1


async def test_by_default_a_token_request_that_timed_out_is_retried(
    fresh_db: str, server: OAuthTestServer
) -> None:
    # A provider that keeps its refresh tokens valid (and says so): the retry simply works.
    server.config.rotate_refresh_tokens = False
    provider = loopback_provider(server.base_url, rotates_refresh_tokens=False)
    async with open_integrations(
        fresh_db, server.base_url, token_timeout=0.3, providers=[provider]
    ) as integ:
        uuid = await connect(integ)
        before = await integ.get_credentials(uuid)
        server.config.update({"token_delay": 1.0, "delay_next": 1})
        token = await integ.refresh_access_token(uuid)
        assert token != before["access_token"]
        assert _refreshes(server) == 2
        stored = await integ.get_integration_by_uuid(uuid)
        assert (stored.status, stored.reauth_required) == ("connected", False)


async def test_a_forced_refresh_whose_read_overlaps_another_processs_refresh_shares_it(
    fresh_db: str, server: OAuthTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call begins, then its row read is slow; meanwhile another process refreshes.
    That token was obtained after the call began: the call takes it, sending nothing."""
    from integrations._connections import Connections

    async with (
        open_integrations(fresh_db, server.base_url) as slow,
        open_integrations(fresh_db, server.base_url) as other,
    ):
        uuid = await connect(slow)
        before = await slow.get_credentials(uuid)
        reading, release = asyncio.Event(), asyncio.Event()
        require = Connections.require
        slow_connections = slow._s.connections

        async def slow_read(self: Connections, *args: object, **kwargs: object) -> object:
            if self is slow_connections:
                reading.set()
                await release.wait()
            return await require(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Connections, "require", slow_read)
        call = asyncio.create_task(slow.refresh_access_token(uuid))
        await reading.wait()
        fresh = await other.refresh_access_token(uuid)
        release.set()
        assert await call == fresh != before["access_token"]
        assert _refreshes(server) == 1


async def test_a_holder_that_stalls_while_confirming_its_lease_looks_again_before_sending(
    fresh_db: str, server: OAuthTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frozen right after the database confirmed the lease, before the request went out:
    on resuming, the long pause makes it look again, and it finds itself taken over."""

    async with (
        open_integrations(fresh_db, server.base_url, refresh_lease=1) as holder,
        open_integrations(fresh_db, server.base_url, refresh_lease=1) as taker,
    ):
        uuid = await connect(holder)
        stalls = _stall_after_confirming(monkeypatch, holder, 2.0)
        late = asyncio.create_task(holder.refresh_access_token(uuid))
        await asyncio.sleep(1.3)
        fresh = await taker.refresh_access_token(uuid)
        assert await late == fresh
        assert stalls == [2.0]
        assert _refreshes(server) == 1
        assert server.stats.refresh_reuse_detected == 0


async def test_a_lease_transaction_left_idle_is_ended_by_the_server(
    fresh_db: str, server: OAuthTestServer
) -> None:
    """A holder frozen inside one of its short transactions does not keep the row lock:
    the server ends the idle session after ``stall_after`` (the lease or 5 s)."""
    from integrations import StorageError
    from integrations._record import Change

    async with open_integrations(fresh_db, server.base_url, refresh_lease=1) as integ:
        uuid = await connect(integ)
        tokens = integ._s.tokens
        assert tokens.policy.stall_after == 1.0

        def frozen(row: Any, now: Any) -> tuple[Change, None]:
            time.sleep(1.6)  # the whole process stalls inside the transaction
            return Change({**row.data, "note": "written"}), None

        with pytest.raises(StorageError) as info:
            await tokens._in_row(uuid, frozen)
        assert info.value.code == "storage", info.value
        stored = await integ.get_integration(uuid, fresh=True)
        assert "note" not in stored


async def test_a_renewal_that_fails_is_tried_again_and_the_lease_is_kept(
    fresh_db: str, server: OAuthTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One renewal of the lease fails (the database did not answer in time): the holder
    renews again at its next turn, so another instance asking meanwhile still finds the
    lease held and waits for the holder's answer instead of sending a second request."""
    from integrations import StorageError
    from integrations._cache import CachedRepository

    # A provider that keeps refresh tokens valid (and says so): a lease that ran out would
    # be taken over and the refresh sent again.
    server.config.rotate_refresh_tokens = False
    provider = loopback_provider(server.base_url, rotates_refresh_tokens=False)
    # A holder's lease that ran out after its request went out is waited for 0.5 s more.
    options: dict[str, Any] = {
        "refresh_lease": 1,
        "token_write_retry": 0.5,
        "providers": [provider],
    }
    async with (
        open_integrations(fresh_db, server.base_url, **options) as holder,
        open_integrations(fresh_db, server.base_url, **options) as taker,
    ):
        uuid = await connect(holder)
        before = await holder.access_token(uuid)
        modify_clocked = CachedRepository.modify_clocked
        holder_repo = holder._repo
        renewals: list[str] = []
        failed: list[str] = []

        async def first_renewal_fails(self: Any, row: str, decide: Any, **kw: Any) -> Any:
            # The first call renewing (its lease confirmed before the request) goes
            # through; the next, the first of the renewals while the request is pending,
            # fails.
            renewal = _renews(decide)
            if self is holder_repo and renewal:
                renewals.append(row)
                if len(renewals) == 2:
                    failed.append(row)
                    raise StorageError("the database did not answer in time")
            return await modify_clocked(self, row, decide, **kw)

        monkeypatch.setattr(CachedRepository, "modify_clocked", first_renewal_fails)
        server.config.update({"token_delay": 4.0, "delay_next": 1})
        held = asyncio.create_task(holder.refresh_access_token(uuid))
        # Past the lease (1 s) that the failed renewal would have extended, and the 0.5 s
        # after it.
        await asyncio.sleep(2.0)
        assert failed == [uuid]
        fresh = await taker.refresh_access_token(uuid)
        assert await held == fresh != before
        assert _refreshes(server) == 1
        # A renewal a third of the lease apart while the request (4 s) was out: about a
        # dozen, not a loop.
        assert 4 <= len(renewals) <= 30, len(renewals)


async def test_a_refresh_cancelled_before_it_asks_frees_its_lease_at_once(
    fresh_db: str, server: OAuthTestServer, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() cancels a refresh that holds the lease but has sent nothing: nothing can be
    spent, so the lease is given back rather than left for others to wait out."""
    from integrations import LifecycleError
    from integrations._tokens import Refresher

    reached = asyncio.Event()

    async def never_sends(self: Refresher, *args: Any) -> Any:
        reached.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(Refresher, "_token_call", never_sends)
    async with open_integrations(fresh_db, server.base_url, refresh_lease=30) as integ:
        uuid = await connect(integ)
        refreshing = asyncio.create_task(integ.refresh_access_token(uuid))
        await reached.wait()
        held = await db.fetchval(
            "SELECT value_json ? 'refresh_lease' FROM integrations.connections WHERE uuid = $1",
            uuid_mod.UUID(uuid),
        )
        assert held is True
    with pytest.raises(LifecycleError):
        await refreshing
    lease = await db.fetchval(
        "SELECT value_json -> 'refresh_lease' FROM integrations.connections WHERE uuid = $1",
        uuid_mod.UUID(uuid),
    )
    assert lease is None
    assert _refreshes(server) == 0


@pytest.mark.parametrize("notified", [True, False])
async def test_a_caller_waiting_for_another_processs_lease_does_not_spin(
    fresh_db: str, server: OAuthTestServer, monkeypatch: pytest.MonkeyPatch, notified: bool
) -> None:
    """Waiting for the holder's answer (1.5 s here), a caller looks at the row when told
    of a change or every half second at most often: a handful of looks, not a loop. So
    does one that cannot listen for changes (the database refused): it polls."""
    from integrations._tokens import Refresher

    async with (
        open_integrations(fresh_db, server.base_url) as holder,
        open_integrations(fresh_db, server.base_url) as waiter,
    ):
        uuid = await connect(holder)
        if not notified:

            def refused(*_args: Any, **_kwargs: Any) -> Any:
                raise ConnectionError("LISTEN refused")

            monkeypatch.setattr(waiter._s.core.hub, "subscribe", refused)
        in_row = Refresher._in_row
        waiting = waiter._s.tokens
        looks: list[str] = []

        async def counted(self: Refresher, row: str, decide: Any) -> Any:
            if self is waiting:
                looks.append(row)
            return await in_row(self, row, decide)

        monkeypatch.setattr(Refresher, "_in_row", counted)
        server.config.update({"token_delay": 1.5, "delay_next": 1})
        first = asyncio.create_task(holder.refresh_access_token(uuid))
        await eventually(lambda: _refreshes(server) == 1)
        assert await waiter.refresh_access_token(uuid) == await first
        assert _refreshes(server) == 1
        assert 1 <= len(looks) <= 12, looks


async def test_a_client_credentials_holder_that_stalls_while_confirming_asks_nothing(
    fresh_db: str, server: OAuthTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client-credentials fetch spends nothing, so no sending mark fences it: frozen
    right after its lease was confirmed, past the lease's end, the holder looks again on
    resuming, finds the lease taken over, and takes that token instead of asking for a
    second one."""

    from .oauthkit import client_credentials_provider, machine_connection

    provider = client_credentials_provider(server.base_url)
    async with (
        open_integrations(
            fresh_db, server.base_url, refresh_lease=2, providers=[provider]
        ) as holder,
        open_integrations(
            fresh_db, server.base_url, refresh_lease=2, providers=[provider]
        ) as taker,
    ):
        uuid = await machine_connection(holder)
        stalls = _stall_after_confirming(monkeypatch, holder, 3.0)  # past the lease (2 s)
        late = asyncio.create_task(holder.refresh_access_token(uuid))
        await asyncio.sleep(2.5)
        fresh = await taker.refresh_access_token(uuid)
        assert await late == fresh
        assert stalls == [3.0]
        assert server.stats.token_calls["client_credentials"] == 1
