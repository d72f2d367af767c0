"""Tokens service: fresh access tokens, one request per need, a row lease across processes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from . import _record as record
from . import _telemetry as telemetry
from . import oauth
from ._core import Core
from ._errors import (
    Deleted,
    IntegrationsError,
    InvalidAttrs,
    InvalidInput,
    InvalidProviderKey,
    LifecycleError,
    LockTimeout,
    NotConfigured,
    NotConnected,
    OAuthError,
    ReauthRequired,
    RequestFailed,
    TokenRequestFailed,
)
from ._events import ALL_OWNERS, Subscription
from ._http import HttpClient, retry_after_seconds
from ._input import check_timestamp, parse_timestamp
from ._models import utcnow
from ._providers import Provider
from ._record import Change, StoredRow
from ._schemes import TokenScheme
from ._settings import BUDGET_MARGIN

__all__ = ["Refresher", "imported_token_set", "parse_time", "post_token_request"]

log = logging.getLogger("integrations.oauth")

T = TypeVar("T")


#: Longest wait between two looks at a row leased by another process (notifications
#: usually wake the waiter first).
_POLL = 0.5
#: First and longest wait between two tries to store tokens whose write failed.
_FIRST_RETRY, _LAST_RETRY = 0.1, 2.0

#: Statuses whose Retry-After the token endpoint means: wait that long before asking again.
_RETRY_AFTER_STATUSES = frozenset({429, 503})

#: Why a refresh is asked for: the token is due, a caller insists, or the API rejected it.
Mode = Literal["expiring", "force", "rejected"]


@dataclass(frozen=True, slots=True)
class _Seen:
    """What a caller saw before asking: the access token and the last recorded failure."""

    token: str | None
    failure: str | None

    @classmethod
    def of(cls, token: str | None, row: StoredRow) -> _Seen:
        return cls(token, _failure_id(row.data))


@dataclass(slots=True, eq=False)
class _Flight:
    """One refresh task in flight and what it was started for: ``since`` is when the
    latest forced caller sharing it began (a forced refresh wants a token obtained after
    that), ``requested_at`` when this task took the lease to ask (None until then), and
    ``sent_at`` when it first asked the token endpoint (None until then: only such a task
    may be cancelled without loss)."""

    seen: _Seen
    mode: Mode
    since: datetime
    task: asyncio.Task[str] = field(init=False, repr=False)
    requested_at: datetime | None = None
    sent_at: float | None = None
    decided: bool = False
    answered: bool = False
    callers: int = 1


@dataclass(frozen=True, slots=True)
class _Lease:
    """The refresh lease this process holds on a row: who, the fencing value (the row
    version that taking it wrote), and when its token request was decided on."""

    uuid: str
    holder: str
    fence: int
    requested_at: datetime

    def held_in(self, data: Mapping[str, Any]) -> bool:
        lease = data.get("refresh_lease")
        return (
            isinstance(lease, Mapping)
            and lease.get("holder") == self.holder
            and lease.get("fence") == self.fence
        )


@dataclass(frozen=True, slots=True)
class _Step:
    """What one look at the row decided: done (a token or an error), wait for another
    holder's lease (until the server time ``until``), or ask under a lease just taken."""

    outcome: str | OAuthError | None = None
    wait: float | None = None
    lease: _Lease | None = None
    plain: Mapping[str, Any] = field(default_factory=dict, repr=False)
    provider: Provider | None = None
    fallback: str | None = None
    taken_from: str | None = None
    owner: str | None = None


@dataclass(slots=True, eq=False)
class _Unstored:
    """New tokens whose write failed: served from here while the write is retried."""

    tokens: oauth.TokenSet
    task: asyncio.Task[None] = field(init=False, repr=False)


def _failure_id(data: Mapping[str, Any]) -> str | None:
    failure = data.get("refresh_error")
    if isinstance(failure, Mapping) and isinstance(failure.get("id"), str):
        return str(failure["id"])
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_time(value: Any) -> datetime | None:
    """A stored ISO timestamp as an aware UTC datetime; anything unreadable is None.

    Far-past and far-future values are clamped (``_input.parse_timestamp``), so year 1
    reads as long expired and no later arithmetic can overflow.
    """
    return parse_timestamp(value) if isinstance(value, str) else None


async def post_token_request(
    http: HttpClient,
    request: tuple[str, dict[str, str], str],
    *,
    request_timeout: float,
    requested_scopes: Sequence[str],
    previous_refresh_token: str | None,
    redact: Sequence[str | None] = (),
    provider: str | None = None,
) -> oauth.TokenSet:
    """One token endpoint call, parsed: ReauthRequired or TokenRequestFailed on failure."""
    with telemetry.token_span(provider, request[0], request[2]):
        return await _post_token_request(
            http,
            request,
            request_timeout=request_timeout,
            requested_scopes=requested_scopes,
            previous_refresh_token=previous_refresh_token,
            redact=redact,
        )


async def _post_token_request(
    http: HttpClient,
    request: tuple[str, dict[str, str], str],
    *,
    request_timeout: float,
    requested_scopes: Sequence[str],
    previous_refresh_token: str | None,
    redact: Sequence[str | None],
) -> oauth.TokenSet:
    url, headers, body = request
    try:
        response = await http.request(
            "POST",
            url,
            headers=headers,
            data=body,
            max_attempts=1,
            timeout=request_timeout,
            allow_redirects=False,
        )
    except RequestFailed as exc:
        # Refused before a connection was made, the request surely did not arrive; after
        # that (a timeout, a dropped connection) the server may have acted on it.
        raise TokenRequestFailed(
            f"Could not reach the token endpoint at {urlsplit(url).hostname}: "
            f"{exc.context.get('reason') or exc.message}",
            transient=True,
            maybe_received=exc.context.get("maybe_sent", True),
        ) from exc
    try:
        return oauth.parse_token_response(
            response.status,
            response.body,
            now=utcnow(),
            requested_scopes=requested_scopes,
            previous_refresh_token=previous_refresh_token,
            redact=[s for s in redact if s],
        )
    except TokenRequestFailed as exc:
        header = response.headers.get("Retry-After")
        if exc.transient and response.status in _RETRY_AFTER_STATUSES and header:
            wait = retry_after_seconds(header)
            if wait is not None:
                exc.context["retry_after"] = wait
        raise


class Refresher:
    """Hands out valid access tokens, refreshing them at most once per need.

    Inside a process, concurrent callers for one connection share one task (awaited
    through ``asyncio.shield``, so a cancelled caller does not abandon a refresh whose
    new refresh token must be stored). Across processes a refresh lease in the row
    decides who asks: taken, renewed and ended in short transactions, so no database
    connection is held while the token endpoint answers. Callers elsewhere wait for the
    lease to end (woken by the notification of the holder's write, polling as a
    fallback) and reuse what it wrote. The holder writes only while its fence (the row
    version it took the lease at) is still in the row. New tokens whose write fails stay
    in the process, serve its callers, and are written again for ``write_retry`` seconds.
    After a failure, automatic refreshes wait for a cool-down (a terminal failure: for a
    new authorization, new setup or an explicit refresh) and get the recorded error.
    """

    def __init__(self, core: Core) -> None:
        self._core = core
        self.policy = core.settings.token
        self._inflight: dict[str, _Flight] = {}
        self._unstored: dict[str, _Unstored] = {}
        self._closed = False
        # Holder ids: this process (host, pid, a random part against pid reuse), then a
        # counter per flight.
        self._holder_prefix = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._flights = itertools.count(1)

    # -- entry points ---------------------------------------------------------------------

    def _plain(self, row: StoredRow, provider: Provider) -> dict[str, Any]:
        return self._core.vault.unseal(row.uuid, row.data, provider.secret_field_keys)

    def _due(self, plain: Mapping[str, Any], now: datetime) -> bool:
        return oauth.refresh_due(
            parse_time(plain.get("expires_at")),
            parse_time(plain.get("token_obtained_at")),
            self.policy.leeway,
            now,
        )

    async def access_token(
        self, row: StoredRow, provider: Provider, plain: Mapping[str, Any] | None = None
    ) -> str:
        """A token that is not due, refreshed (or fetched) first when needed.

        When the refresh fails, or a recent failure holds automatic refreshes back, a
        token that has not expired yet is still handed out.
        """
        _check_oauth(provider)
        if plain is None:
            plain = self._plain(row, provider)
        token = _text(plain.get("access_token"))
        now = utcnow()
        usable = _scheme(provider).usable_token(plain, due=self._due(plain, now))
        if usable is not None:
            return usable
        held = _held_back(row.data, now)
        if held is not None:
            if token is not None and _usable(token, plain, now):
                return token
            raise held
        return await self._coalesced(row.uuid, _Seen.of(token, row), "expiring")

    async def refresh(
        self, row: StoredRow, provider: Provider, *, began: datetime | None = None
    ) -> str:
        """A new access token, whatever the old one's expiry or a recorded failure: one
        obtained after ``began`` (when the caller's call began, before it read ``row``;
        now by default), so that calls overlapping a token request share it."""
        _check_oauth(provider)
        plain = self._plain(row, provider)
        token = _text(plain.get("access_token"))
        if _nothing_to_refresh(provider, plain):
            raise NotConnected()
        return await self._coalesced(row.uuid, _Seen.of(token, row), "force", began)

    async def after_rejection(self, row: StoredRow, rejected: str) -> str:
        """The token to retry with after the API answered 401 to ``rejected``."""
        held = _held_back(row.data, utcnow())
        if held is not None:
            raise held
        return await self._coalesced(row.uuid, _Seen(rejected, _failure_id(row.data)), "rejected")

    # -- single flight --------------------------------------------------------------------

    async def _coalesced(
        self, uuid: str, seen: _Seen, mode: Mode, since: datetime | None = None
    ) -> str:
        if since is None:
            since = utcnow()
        unstored = self._unstored.get(uuid)
        while unstored is not None:
            # Newer than the row: its write is still being retried.
            if mode == "expiring" or (
                mode == "rejected" and seen.token != unstored.tokens.access_token
            ):
                return unstored.tokens.access_token
            await asyncio.wait({unstored.task})
            unstored = self._unstored.get(uuid)
        flight = self._join(uuid, seen, mode, since)
        while mode == "force" and not _serves(flight):
            # It hands out a token obtained before this call began: wait, then ask.
            await asyncio.wait({flight.task})
            flight = self._join(uuid, seen, mode, since)
        token = await self._outcome(flight)
        if (
            mode == "rejected"
            and token == seen.token
            and (flight.mode, flight.seen.token) != ("rejected", seen.token)
        ):
            # The shared task was started for another need (a caller that read an older
            # token, or a refresh ahead of expiry) and handed back the token the API has
            # just rejected: one more, for this caller's own.
            flight = self._join(uuid, seen, mode, since)
            token = await self._outcome(flight)
        return token

    def _join(self, uuid: str, seen: _Seen, mode: Mode, since: datetime) -> _Flight:
        if self._closed:
            raise LifecycleError("Integrations is closed")
        flight = self._inflight.get(uuid)
        if flight is not None and mode == "force" and not flight.decided:
            # Not decided yet: it will ask for a token after this call began.
            flight.mode = "force"
            flight.since = max(flight.since, since)
        if flight is None:
            flight = _Flight(seen, mode, since)
            flight.task = asyncio.get_running_loop().create_task(
                self._run(uuid, flight), name=f"integrations-refresh-{uuid}"
            )
            self._inflight[uuid] = flight
            flight.task.add_done_callback(partial(self._finished, uuid, flight))
        else:
            flight.callers += 1
        return flight

    @staticmethod
    async def _outcome(flight: _Flight) -> str:
        try:
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if flight.task.cancelled() and (current is None or not current.cancelling()):
                # Cancelled by close(), not this caller: say so instead of a bare cancellation.
                raise LifecycleError(
                    "Integrations was closed before the token refresh finished"
                ) from None
            raise

    def _finished(self, uuid: str, flight: _Flight, task: asyncio.Task[str]) -> None:
        if self._inflight.get(uuid) is flight:
            del self._inflight[uuid]
        if flight.sent_at is not None:
            telemetry.record_callers(flight.callers)
        if not task.cancelled():
            # Marks the outcome retrieved: every caller may have been cancelled meanwhile.
            task.exception()

    async def close(self) -> None:
        """Stop refreshing: cancel what has not asked the token endpoint yet, let each
        refresh that has finish (its new refresh token must be stored) within its budget
        counted from its first request, and let writes being retried end (within
        ``write_retry``)."""
        self._closed = True
        flights = list(self._inflight.values())
        if flights:
            await asyncio.gather(*(self._settle(f) for f in flights))
        writes = {u.task for u in self._unstored.values()}
        if writes:
            await asyncio.wait(writes)

    async def _settle(self, flight: _Flight) -> None:
        if flight.sent_at is not None:
            left = flight.sent_at + self.policy.budget - asyncio.get_running_loop().time()
            if left > 0:
                await asyncio.wait({flight.task}, timeout=left)
        flight.task.cancel()
        # The write of what a token request returned is not cancelled: wait for it.
        await asyncio.wait({flight.task})

    # -- the lease ------------------------------------------------------------------------

    async def _in_row(
        self, uuid: str, decide: Callable[[StoredRow | None, datetime | None], tuple[Change, T]]
    ) -> T:
        policy = self.policy
        try:
            return await self._core.repo.modify_clocked(
                uuid, decide, lock_timeout=policy.lock_timeout, idle_timeout=policy.stall_after
            )
        except LockTimeout as exc:
            raise TokenRequestFailed(
                "The connection was locked by another transaction (a write or a key rotation "
                f"batch) for longer than the lock timeout ({policy.lock_timeout:g}s)",
                transient=True,
            ) from exc

    async def _run(self, uuid: str, flight: _Flight) -> str:
        holder = f"{self._holder_prefix}:{next(self._flights)}"
        async with contextlib.AsyncExitStack() as stack:
            subscription: Subscription | None = None
            listen = True
            while True:
                step = await self._in_row(uuid, partial(self._look, flight, holder))
                if step.lease is not None:
                    break
                if step.wait is None:
                    if step.taken_from is not None:
                        log.warning(
                            "the refresh lease of connection %s ran out without a write from "
                            "its holder (%s); with refresh_takeover='reauthorize' the "
                            "connection must be authorized again",
                            uuid,
                            step.taken_from,
                            extra=telemetry.fields("refresh_lease_taken_over", uuid=uuid),
                        )
                    # A failure is raised only now, after it was committed.
                    if isinstance(step.outcome, OAuthError):
                        raise step.outcome
                    assert isinstance(step.outcome, str)
                    return step.outcome
                if subscription is None and listen:
                    try:
                        subscription = await stack.enter_async_context(
                            self._core.hub.subscribe(uuid=uuid, owner=ALL_OWNERS, maxsize=10)
                        )
                    except Exception as exc:
                        # No LISTEN (the hub is closed, or the database refused): poll.
                        log.debug(
                            "refresh of %s waits by polling: %s",
                            uuid,
                            type(exc).__name__,
                            extra=telemetry.fields("refresh_lease_polling", uuid=uuid),
                        )
                        listen = False
                    # Subscribed after that look: look again before waiting, lest the
                    # holder's notification fell in between.
                    continue
                wait = min(max(step.wait, 0.02), _POLL)
                if subscription is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(subscription.get(), wait)
                else:
                    await asyncio.sleep(wait)
        return await self._ask(uuid, flight, step)

    def _look(
        self, flight: _Flight, holder: str, row: StoredRow | None, now: datetime | None
    ) -> tuple[Change, _Step]:
        """Under the row lock: use what is stored, wait for another holder's lease, or take
        the lease (written with the same commit)."""
        flight.decided = True
        if row is None or now is None:
            raise Deleted()
        provider = self._core.provider_of(row)
        if provider is None:
            raise InvalidProviderKey("the connection's provider is not registered")
        _check_oauth(provider)
        plain = self._plain(row, provider)
        current = _text(plain.get("access_token"))
        if _nothing_to_refresh(provider, plain):
            # Disconnected while this caller waited: nothing to refresh, nothing to record.
            raise NotConnected()
        seen, mode = flight.seen, flight.mode
        if mode == "force":
            # A token obtained after the call began (here or in another process) will do.
            obtained = parse_time(row.data.get("token_obtained_at"))
            if current is not None and obtained is not None and obtained >= flight.since:
                return Change(), _Step(outcome=current)
        elif current is not None and current != seen.token:
            # Another process refreshed, or failed, while this caller waited.
            return Change(), _Step(outcome=current)
        clock = utcnow()
        if mode == "expiring" and current is not None and not self._due(plain, clock):
            return Change(), _Step(outcome=current)
        # Ahead of expiry, a failure does not take away a token that still works.
        fallback = current if mode == "expiring" and _usable(current, plain, clock) else None
        failure = row.data.get("refresh_error")
        if isinstance(failure, Mapping):
            recorded = _recorded_error(failure, row.data)
            fresh = _failure_id(row.data) != seen.failure
            if fresh or (mode != "force" and _held_back(row.data, clock) is not None):
                return Change(), _Step(outcome=fallback or recorded)
        lease = row.data.get("refresh_lease")
        taken_from: str | None = None
        if isinstance(lease, Mapping):
            until = parse_time(lease.get("until"))
            if until is not None and until > now and not lease.get("abandoned"):
                flight.decided = False
                return Change(), _Step(wait=(until - now).total_seconds())
            if not lease.get("abandoned"):
                taken_from = str(lease.get("holder"))
                if self.policy.takeover == "reauthorize":
                    exc = ReauthRequired(
                        "A token refresh by another process did not finish within its lease; "
                        "the refresh token it sent may be spent, so the connection must be "
                        "authorized again"
                    )
                    failed = record.refresh_failed(
                        row, exc, clock, cooldown=self.policy.cooldown_after
                    )
                    data = dict(failed.change.data or {})
                    # Kept, marked: a holder that comes back may still store its answer.
                    data["refresh_lease"] = {**lease, "abandoned": True}
                    return Change(data, events=failed.change.events), _Step(
                        outcome=fallback or exc, taken_from=taken_from
                    )
        taken = _Lease(row.uuid, holder, row.version + 1, clock)
        data = {
            **row.data,
            "refresh_lease": {
                "holder": holder,
                "fence": taken.fence,
                "until": (now + timedelta(seconds=self.policy.lease)).isoformat(),
                "requested_at": clock.isoformat(),
            },
        }
        flight.requested_at = clock
        return Change(data), _Step(
            lease=taken,
            plain=plain,
            provider=provider,
            fallback=fallback,
            taken_from=taken_from,
            owner=row.owner,
        )

    async def _ask(self, uuid: str, flight: _Flight, step: _Step) -> str:
        """Under the lease, with no database connection held: ask, then store the answer."""
        lease, provider, plain = step.lease, step.provider, step.plain
        assert lease is not None and provider is not None
        # Still ours (renewed by the same look)? A process that stopped between taking the
        # lease and sending may have been taken over: the refresh token it holds may be
        # spent by now, and sending it would cost the grant at a strict provider.
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            if not await self._in_row(uuid, partial(self._renewed, lease)):
                log.info(
                    "the refresh lease of connection %s was taken over before its request "
                    "went out; using what the process that took it stores",
                    uuid,
                    extra=telemetry.fields("refresh_lease_fenced_out", uuid=uuid),
                )
                return await self._run(uuid, flight)
            if loop.time() - started < self.policy.lease / 3:
                break
            # The process stalled (frozen, paused) while confirming: the answer may be
            # stale by now, and the request would go out right after it. Look again.
        if step.taken_from is not None:
            log.warning(
                "took over the refresh lease of connection %s: its holder (%s) did not write "
                "within %gs, and the refresh token it sent may be spent",
                uuid,
                step.taken_from,
                self.policy.lease,
                extra=telemetry.fields(
                    "refresh_lease_taken_over", uuid=uuid, provider=provider.key, owner=step.owner
                ),
            )
        renewing = asyncio.get_running_loop().create_task(
            self._renew(lease), name=f"integrations-lease-{uuid}"
        )
        try:
            tokens = await self._token_call(provider, plain, flight)
            flight.answered = True
        except (ReauthRequired, TokenRequestFailed) as exc:
            flight.answered = True
            log.info(
                "token refresh failed for connection %s (%s): %s",
                uuid,
                exc.code,
                exc.message,
                extra=telemetry.fields(
                    "token_refresh_failed", uuid=uuid, provider=provider.key, owner=step.owner
                ),
            )
            renewing.cancel()
            await _to_the_end(self._in_row(uuid, partial(self._failed, lease, exc)))
            if step.fallback is not None:
                return step.fallback
            raise
        except BaseException:
            renewing.cancel()
            if flight.sent_at is None:
                # Cancelled before asking: free the lease rather than make others wait it
                # out. Once a request went out its refresh token may be spent: the lease
                # is left to run out, and the takeover policy decides what comes next.
                with contextlib.suppress(Exception):
                    await _to_the_end(self._in_row(uuid, partial(_released, lease)))
            raise
        finally:
            renewing.cancel()
        return await self._store(uuid, lease, tokens, _text(plain.get("refresh_token")))

    async def _renew(self, lease: _Lease) -> None:
        """Keep the lease while the token request is pending: a holder that freezes or dies
        stops renewing, and the lease runs out within ``policy.lease``."""
        every = self.policy.lease / 3
        while True:
            await asyncio.sleep(every)
            try:
                kept = await self._core.repo.modify_clocked(
                    lease.uuid,
                    partial(self._renewed, lease),
                    lock_timeout=every,
                    idle_timeout=self.policy.stall_after,
                )
            except IntegrationsError as exc:
                log.debug(
                    "renewing the refresh lease of %s failed: %s",
                    lease.uuid,
                    exc.code,
                    extra=telemetry.fields("refresh_lease_renewal_failed", uuid=lease.uuid),
                )
                continue
            if not kept:
                return

    def _maybe_spent(self, exc: TokenRequestFailed, attempt: int) -> OAuthError:
        """With ``refresh_takeover="reauthorize"``, a refresh request that may have arrived
        (it timed out, or the connection dropped after it was sent) is not sent again: the
        connection must be authorized again. (The default policy retries it, as any other
        transient failure.)"""
        return ReauthRequired(
            _spent_message(exc, attempt) + "; the connection must be authorized again"
        )

    def _renewed(
        self, lease: _Lease, row: StoredRow | None, now: datetime | None
    ) -> tuple[Change, bool]:
        if row is None or now is None or not lease.held_in(row.data):
            return Change(), False
        held = dict(row.data["refresh_lease"])
        held["until"] = (now + timedelta(seconds=self.policy.lease)).isoformat()
        return Change({**row.data, "refresh_lease": held}), True

    def _failed(
        self, lease: _Lease, exc: OAuthError, row: StoredRow | None, _now: datetime | None
    ) -> tuple[Change, None]:
        if row is None or not lease.held_in(row.data):
            # Taken over meanwhile: this failure is not the newest news.
            return Change(), None
        failed = record.refresh_failed(row, exc, utcnow(), cooldown=self.policy.cooldown_after)
        # The message may quote the server's error description.
        data = record.storable(failed.change.data or {})
        data.pop("refresh_lease", None)
        rotated = oauth.rotated_refresh_token(exc)
        if rotated:
            # The old one may be spent: the next refresh must send this one.
            data["refresh_token"] = self._core.vault.seal_value(row.uuid, "refresh_token", rotated)
        return Change(data, events=failed.change.events), None

    # -- storing what the token endpoint answered ------------------------------------------

    async def _store(
        self, uuid: str, lease: _Lease, tokens: oauth.TokenSet, previous: str | None
    ) -> str:
        write = partial(self._written, lease, tokens, previous)
        try:
            access = await _to_the_end(self._in_row(uuid, write))
        except Exception as exc:
            # Whatever the driver raised: these tokens must not be dropped with it.
            reason = _why(exc)
        else:
            await self._core.audit.record("token.refreshed", uuid=uuid)
            return access
        # The provider issued these (and may have spent ``previous``): they exist nowhere
        # else, so they serve this process while the write is tried again.
        log.warning(
            "storing the tokens a refresh of connection %s obtained failed (%s); keeping "
            "them in this process and trying again for up to %gs",
            uuid,
            reason,
            self.policy.write_retry,
            extra=telemetry.fields("token_write_retrying", uuid=uuid),
        )
        unstored = _Unstored(tokens)
        unstored.task = asyncio.get_running_loop().create_task(
            self._persist(uuid, unstored, write, previous), name=f"integrations-store-{uuid}"
        )
        self._unstored[uuid] = unstored
        return tokens.access_token

    def _written(
        self,
        lease: _Lease,
        tokens: oauth.TokenSet,
        previous: str | None,
        row: StoredRow | None,
        _now: datetime | None,
    ) -> tuple[Change, str]:
        """Compare and set: write while the lease is still ours and the refresh token it
        was asked with is still the stored one; else keep the row, and hand out ours only
        if it is still the newest."""
        if row is None:
            return Change(), tokens.access_token
        provider = self._core.provider_of(row)
        secret_fields = provider.secret_field_keys if provider is not None else frozenset()
        plain = self._core.vault.unseal(row.uuid, row.data, secret_fields)
        stored_refresh = _text(plain.get("refresh_token"))
        if lease.held_in(row.data) and stored_refresh == previous:
            done = record.refreshed(
                row,
                tokens,
                seal=partial(self._core.vault.seal_value, row.uuid),
                previous_refresh_token=previous,
            )
            data = record.storable(done.change.data or {})
            data.pop("refresh_lease", None)
            return Change(data, events=done.change.events), tokens.access_token
        current = _text(plain.get("access_token"))
        obtained = parse_time(row.data.get("token_obtained_at"))
        newer = stored_refresh != previous or (
            obtained is not None and obtained > tokens.obtained_at
        )
        log.info(
            "the refresh lease of connection %s was taken over before its answer was stored; %s",
            row.uuid,
            "the stored tokens are newer" if newer else "its answer serves this process only",
            extra=telemetry.fields(
                "refresh_lease_fenced_out", uuid=row.uuid, provider=row.provider, owner=row.owner
            ),
        )
        if newer and current is not None:
            return Change(), current
        return Change(), tokens.access_token

    async def _persist(
        self,
        uuid: str,
        unstored: _Unstored,
        write: Callable[[StoredRow | None, datetime | None], tuple[Change, str]],
        previous: str | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.write_retry
        delay, attempts = _FIRST_RETRY, 1
        reason = ""
        try:
            while loop.time() + delay <= deadline:
                await asyncio.sleep(delay)
                attempts += 1
                try:
                    await self._in_row(uuid, write)
                except Exception as exc:
                    reason = _why(exc)
                    delay = min(delay * 2, _LAST_RETRY)
                    continue
                log.info(
                    "stored the tokens of connection %s's refresh at attempt %d",
                    uuid,
                    attempts,
                    extra=telemetry.fields("token_write_recovered", uuid=uuid),
                )
                return
            self._lost(uuid, unstored.tokens, previous, attempts, reason)
            rotated = unstored.tokens.refresh_token not in (None, previous)
            if rotated:
                try:
                    await self._in_row(uuid, partial(self._spent, previous))
                except Exception as exc:
                    log.error(
                        "could not mark connection %s for a new authorization either (%s)",
                        uuid,
                        _why(exc),
                        extra=telemetry.fields("token_write_mark_failed", uuid=uuid),
                    )
        finally:
            if self._unstored.get(uuid) is unstored:
                del self._unstored[uuid]

    def _lost(
        self,
        uuid: str,
        tokens: oauth.TokenSet,
        previous: str | None,
        attempts: int,
        reason: str,
    ) -> None:
        rotated = tokens.refresh_token not in (None, previous)
        log.error(
            "gave up storing the tokens a refresh of connection %s obtained at %s, after %d "
            "attempts in %gs (%s): lost are its access token (expiring %s)%s",
            uuid,
            tokens.obtained_at.isoformat(),
            attempts,
            self.policy.write_retry,
            reason or "no reason given",
            tokens.expires_at.isoformat() if tokens.expires_at else "at an unknown time",
            " and the rotated refresh token that replaced the stored one, which the "
            "provider may now refuse: marking the connection for a new authorization"
            if rotated
            else "; the stored refresh token is still the current one",
            extra=telemetry.fields("token_write_lost", uuid=uuid),
        )

    def _spent(
        self, previous: str | None, row: StoredRow | None, _now: datetime | None
    ) -> tuple[Change, None]:
        """After new tokens were lost: the stored refresh token was rotated away."""
        if row is None:
            return Change(), None
        provider = self._core.provider_of(row)
        secret_fields = provider.secret_field_keys if provider is not None else frozenset()
        plain = self._core.vault.unseal(row.uuid, row.data, secret_fields)
        if _text(plain.get("refresh_token")) != previous:
            return Change(), None
        exc = ReauthRequired(
            "The tokens of a refresh could not be stored, and the refresh token they replaced "
            "may no longer be accepted; the connection must be authorized again"
        )
        failed = record.refresh_failed(row, exc, utcnow(), cooldown=self.policy.cooldown_after)
        data = dict(failed.change.data or {})
        data.pop("refresh_lease", None)
        return Change(data, events=failed.change.events), None

    async def _token_call(
        self, provider: Provider, plain: Mapping[str, Any], flight: _Flight
    ) -> oauth.TokenSet:
        client_id = _text(plain.get("client_id"))
        if client_id is None:
            raise NotConfigured("The connection has no 'client_id' saved.", field="client_id")
        secret = _text(plain.get("client_secret"))
        auth_method: oauth.AuthMethod = provider.token_auth if secret else "none"
        assert provider.token_url is not None
        url = provider.render_url(provider.token_url, plain)
        grant = _scheme(provider).grant(provider, plain)
        refresh_token = grant.spends
        request = oauth.token_request(
            grant.grant_type,
            token_url=url,
            client_id=client_id,
            client_secret=secret,
            auth_method=auth_method,
            scope_separator=provider.scope_separator,
            **grant.params,
        )
        requested = grant.requested_scopes
        policy = self.policy
        loop = asyncio.get_running_loop()
        delays = oauth.backoff_delays(policy.attempts - 1, policy.backoff, policy.backoff_cap)
        flight.sent_at = loop.time()
        # Every attempt and wait must fit in the budget: it is the lock's idle timeout too.
        deadline = flight.sent_at + policy.budget - BUDGET_MARGIN
        # One span and one count for the refresh, however many attempts it took.
        with telemetry.token_span(provider.key, request[0], request[2]):
            for attempt in range(1, policy.attempts + 1):
                try:
                    return await _post_token_request(
                        self._core.http,
                        request,
                        request_timeout=policy.timeout,
                        requested_scopes=requested,
                        previous_refresh_token=refresh_token,
                        # A provider's error text may echo any of them back.
                        redact=[secret, *_secret_values(provider, plain)],
                    )
                except TokenRequestFailed as exc:
                    if not exc.transient:
                        raise
                    if (
                        refresh_token is not None
                        and policy.takeover == "reauthorize"
                        and exc.context.get("maybe_received")
                    ):
                        raise self._maybe_spent(exc, attempt) from exc
                    retry_after = exc.context.get("retry_after")
                    wait = delays[attempt - 1] if attempt < policy.attempts else None
                    if wait is not None and retry_after is not None:
                        room = (
                            deadline
                            - loop.time()
                            - (policy.attempts - attempt) * policy.timeout
                            - sum(delays[attempt:])
                        )
                        # Asking again before the server's Retry-After only earns another 429.
                        wait = max(wait, retry_after) if retry_after <= room else None
                    if wait is None:
                        why = f"gave up after {attempt} attempt(s)"
                        if retry_after is not None and attempt < policy.attempts:
                            why += f": the server asked to wait {retry_after:g}s"
                        raise TokenRequestFailed(
                            f"{exc.message}; {why}",
                            transient=True,
                            status=exc.context.get("status"),
                            error=exc.context.get("error"),
                            attempts=attempt,
                            retry_after=retry_after,
                        ) from exc
                    log.debug(
                        "token request failed transiently (attempt %d of %d); retrying in %.2fs",
                        attempt,
                        policy.attempts,
                        wait,
                        extra=telemetry.fields("token_request_retry", provider=provider.key),
                    )
                    await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


def _secret_values(provider: Provider, plain: Mapping[str, Any]) -> list[str]:
    """Every secret the connection holds, as text (for masking what a server echoes)."""
    secret = provider.secret_keys
    return [v for k, v in plain.items() if k in secret and isinstance(v, str) and v]


def _spent_message(exc: TokenRequestFailed, attempt: int) -> str:
    return (
        f"{exc.message}; not sent again (attempt {attempt}): the token endpoint may have "
        "received it and replaced the refresh token, and a strict provider revokes the "
        "grant of a refresh token used twice"
    )


def _why(exc: BaseException) -> str:
    return exc.message if isinstance(exc, IntegrationsError) else type(exc).__name__


def _serves(flight: _Flight) -> bool:
    """Whether ``flight`` hands a forced caller that joins it now a token obtained after
    that: it has not decided yet, or it asks and has no answer yet."""
    if not flight.decided:
        return True
    return flight.requested_at is not None and not flight.answered


def _released(lease: _Lease, row: StoredRow | None, _now: datetime | None) -> tuple[Change, None]:
    if row is None or not lease.held_in(row.data):
        return Change(), None
    data = dict(row.data)
    data.pop("refresh_lease", None)
    return Change(data), None


async def _to_the_end(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` to its end even when cancelled meanwhile; the cancellation follows.
    What it writes may be tokens the provider already issued, which exist nowhere else."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result


def _nothing_to_refresh(provider: Provider, plain: Mapping[str, Any]) -> bool:
    """Whether nothing can be renewed until a user connects (an authorization-code
    connection with neither token); client-credentials connections can always fetch one."""
    return _scheme(provider).not_connected(plain)


def _scheme(provider: Provider) -> TokenScheme:
    scheme = provider.scheme
    if not isinstance(scheme, TokenScheme):
        _check_oauth(provider)
        raise AssertionError("unreachable")  # pragma: no cover
    return scheme


def _check_oauth(provider: Provider) -> None:
    if not isinstance(provider.scheme, TokenScheme):
        raise InvalidProviderKey(
            f"Provider {provider.key!r} does not use OAuth access tokens: read its credentials "
            "with get_credentials(), or call its API with authenticated_request().",
            provider=provider.key,
        )


def _recorded_error(failure: Mapping[str, Any], data: Mapping[str, Any]) -> OAuthError:
    message = failure.get("message")
    if not isinstance(message, str) or not message:
        message = data.get("validation_status")
    text = message if isinstance(message, str) and message else "The token refresh failed"
    if failure.get("code") == ReauthRequired.code:
        return ReauthRequired(text, error=failure.get("error"))
    return TokenRequestFailed(
        text, transient=bool(failure.get("transient")), error=failure.get("error")
    )


def _held_back(data: Mapping[str, Any], now: datetime) -> OAuthError | None:
    """The recorded failure that keeps automatic refreshes from asking the token endpoint:
    a terminal one until something changes, any other until its ``retry_at``."""
    failure = data.get("refresh_error")
    if not isinstance(failure, Mapping):
        return None
    if failure.get("code") != ReauthRequired.code:
        retry_at = parse_time(failure.get("retry_at"))
        if retry_at is None or retry_at <= now:
            return None
    return _recorded_error(failure, data)


def _usable(token: str | None, plain: Mapping[str, Any], now: datetime) -> bool:
    """Whether ``token`` has not expired yet (a token of unknown lifetime counts as usable)."""
    if token is None:
        return False
    expires_at = parse_time(plain.get("expires_at"))
    return expires_at is None or expires_at > now


_IMPORT_FIELDS = frozenset(
    {"access_token", "refresh_token", "token_type", "expires_at", "expires_in", "scope"}
)


def imported_token_set(tokens: Mapping[str, Any], now: datetime) -> oauth.TokenSet:
    """Tokens brought in from another system, checked: InvalidAttrs names the bad field.

    ``access_token`` is required; ``refresh_token``, ``token_type`` (default Bearer),
    ``scope`` (a space-separated string or a list) and one of ``expires_at`` (ISO 8601
    with a timezone, or a datetime) or ``expires_in`` (seconds from now) are optional.
    """
    if not isinstance(tokens, Mapping):
        raise InvalidAttrs(f"tokens must be a mapping, got {type(tokens).__name__}.")
    unknown = sorted(str(k) for k in tokens if k not in _IMPORT_FIELDS)
    if unknown:
        raise InvalidAttrs(
            f"Unknown token fields: {', '.join(unknown)[:200]}; expected some of "
            f"{', '.join(sorted(_IMPORT_FIELDS))}.",
            fields=unknown,
        )

    def text(name: str, required: bool = False) -> str | None:
        value = tokens.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise InvalidAttrs(f"Token field {name!r} must be a non-empty string.", field=name)
        if not value.isprintable() or not value.isascii():
            raise InvalidAttrs(
                f"Token field {name!r} holds characters a token cannot have "
                "(control or non-ASCII characters).",
                field=name,
            )
        return value.strip()

    access = text("access_token", required=True)
    assert access is not None
    expires_at: datetime | None = None
    if tokens.get("expires_at") is not None and tokens.get("expires_in") is not None:
        raise InvalidAttrs("Give expires_at or expires_in, not both.", field="expires_at")
    raw_at, raw_in = tokens.get("expires_at"), tokens.get("expires_in")
    if raw_at is not None:
        try:
            # Unlike a stored value read back, an out-of-range one is refused, not clamped.
            expires_at = check_timestamp(raw_at, "expires_at")
        except InvalidInput as exc:
            raise InvalidAttrs(
                f"{exc.message}, such as '2030-01-01T00:00:00+00:00'.", field="expires_at"
            ) from None
    elif raw_in is not None:
        if isinstance(raw_in, bool) or not isinstance(raw_in, int | float) or raw_in != raw_in:
            raise InvalidAttrs("expires_in must be a number of seconds.", field="expires_in")
        if not 0 <= raw_in <= 10 * 365 * 86400:
            raise InvalidAttrs("expires_in must be between 0 and ten years.", field="expires_in")
        expires_at = now + timedelta(seconds=float(raw_in))
    scope = tokens.get("scope")
    if isinstance(scope, str):
        scopes = tuple(scope.split())
    elif scope is None:
        scopes = ()
    elif isinstance(scope, list | tuple) and all(isinstance(s, str) and s for s in scope):
        scopes = tuple(scope)
    else:
        raise InvalidAttrs("scope must be a string or a list of strings.", field="scope")
    if any(not s.isprintable() or any(c.isspace() for c in s) for s in scopes):
        raise InvalidAttrs("Each scope must be printable and have no spaces.", field="scope")
    return oauth.TokenSet(
        access_token=access,
        refresh_token=text("refresh_token"),
        token_type=text("token_type") or "Bearer",
        expires_at=expires_at,
        scope=scopes,
        obtained_at=now,
    )
