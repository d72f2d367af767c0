"""Tokens service: fresh access tokens, one request per need, a row lease across processes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from . import _lease as lease_rules
from . import _telemetry as telemetry
from . import oauth
from ._core import Core
from ._errors import (
    Deleted,
    IntegrationsError,
    InvalidProviderKey,
    LifecycleError,
    LockTimeout,
    NotConnected,
    OAuthError,
    ReauthRequired,
    TokenRequestFailed,
)
from ._events import ALL_OWNERS, Subscription
from ._lease import Lease, Look, Mode, Need, Seen, Written, failure_id, held_back, text
from ._models import utcnow
from ._providers import Provider
from ._record import Change, StoredRow
from ._schemes import TokenScheme

__all__ = ["Mode", "Refresher"]

log = logging.getLogger("integrations.oauth")

T = TypeVar("T")


#: Longest wait between two looks at a row leased by another process (notifications
#: usually wake the waiter first).
_POLL = 0.5
#: First and longest wait between two tries to store tokens whose write failed.
_FIRST_RETRY, _LAST_RETRY = 0.1, 2.0


@dataclass(slots=True, eq=False)
class _Flight:
    """One refresh task in flight and what it was started for: ``since`` is when the
    latest forced caller sharing it began (a forced refresh wants a token obtained after
    that), ``requested_at`` when this task took the lease to ask (None until then), and
    ``sent_at`` when it first asked the token endpoint (None until then: only such a task
    may be cancelled without loss)."""

    seen: Seen
    mode: Mode
    since: datetime
    task: asyncio.Task[str] = field(init=False, repr=False)
    requested_at: datetime | None = None
    sent_at: float | None = None
    decided: bool = False
    answered: bool = False
    callers: int = 1


@dataclass(frozen=True, slots=True)
class _Step:
    """A look's decision, with what asking under a lease just taken needs."""

    look: Look
    plain: Mapping[str, Any] = field(default_factory=dict, repr=False)
    provider: Provider | None = None
    owner: str | None = None


@dataclass(slots=True, eq=False)
class _Unstored:
    """New tokens whose write failed: served from here while the write is retried."""

    tokens: oauth.TokenSet
    task: asyncio.Task[None] = field(init=False, repr=False)


class _FencedOut(Exception):
    """The lease was taken over before the token request went out: nothing was sent."""


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
        return lease_rules.due(plain, now, self.policy.leeway)

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
        token = text(plain.get("access_token"))
        now = utcnow()
        usable = _scheme(provider).usable_token(plain, due=self._due(plain, now))
        if usable is not None:
            return usable
        held = held_back(row.data, now)
        if held is not None:
            if token is not None and lease_rules.usable(token, plain, now):
                return token
            raise held
        return await self._coalesced(row.uuid, Seen.of(token, row), "expiring")

    async def refresh(
        self, row: StoredRow, provider: Provider, *, began: datetime | None = None
    ) -> str:
        """A new access token, whatever the old one's expiry or a recorded failure: one
        obtained after ``began`` (when the caller's call began, before it read ``row``;
        now by default), so that calls overlapping a token request share it."""
        _check_oauth(provider)
        plain = self._plain(row, provider)
        token = text(plain.get("access_token"))
        if _nothing_to_refresh(provider, plain):
            raise NotConnected()
        return await self._coalesced(row.uuid, Seen.of(token, row), "force", began)

    async def after_rejection(self, row: StoredRow, rejected: str) -> str:
        """The token to retry with after the API answered 401 to ``rejected``."""
        held = held_back(row.data, utcnow())
        if held is not None:
            raise held
        return await self._coalesced(row.uuid, Seen(rejected, failure_id(row.data)), "rejected")

    # -- single flight --------------------------------------------------------------------

    async def _coalesced(
        self, uuid: str, seen: Seen, mode: Mode, since: datetime | None = None
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

    def _join(self, uuid: str, seen: Seen, mode: Mode, since: datetime) -> _Flight:
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
                look = step.look
                if look.lease is not None:
                    break
                if look.wait is None:
                    if look.taken_from is not None:
                        log.warning(
                            "the refresh lease of connection %s ran out without a write from "
                            "its holder (%s), which had sent the refresh token; %s, so it is "
                            "not sent again: the connection must be authorized again",
                            uuid,
                            look.taken_from,
                            "refresh_takeover is 'reauthorize'"
                            if self.policy.takeover == "reauthorize"
                            else "the provider rotates refresh tokens",
                            extra=telemetry.fields("refresh_lease_taken_over", uuid=uuid),
                        )
                    # A failure is raised only now, after it was committed.
                    if isinstance(look.outcome, OAuthError):
                        raise look.outcome
                    assert isinstance(look.outcome, str)
                    return look.outcome
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
                wait = min(max(look.wait, 0.02), _POLL)
                if subscription is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(subscription.get(), wait)
                else:
                    await asyncio.sleep(wait)
        return await self._ask(uuid, flight, step)

    def _look(
        self, flight: _Flight, holder: str, row: StoredRow | None, now: datetime | None
    ) -> tuple[Change, _Step]:
        """Under the row lock: the checks that need the provider, then the lease rules."""
        flight.decided = True
        if row is None or now is None:
            raise Deleted()
        provider = self._core.provider_of(row)
        if provider is None:
            raise InvalidProviderKey("the connection's provider is not registered")
        _check_oauth(provider)
        plain = self._plain(row, provider)
        if _nothing_to_refresh(provider, plain):
            # Disconnected while this caller waited: nothing to refresh, nothing to record.
            raise NotConnected()
        need = Need(flight.seen, flight.mode, flight.since)
        clock = utcnow()
        change, look = lease_rules.look(
            row,
            plain,
            need,
            holder=holder,
            now=now,
            clock=clock,
            policy=self.policy,
            rotates=provider.rotates_refresh_tokens,
        )
        if look.wait is not None:
            flight.decided = False
        if look.lease is None:
            return change, _Step(look)
        flight.requested_at = clock
        return change, _Step(look, plain=plain, provider=provider, owner=row.owner)

    async def _ask(self, uuid: str, flight: _Flight, step: _Step) -> str:
        """Under the lease, with no database connection held: ask, then store the answer."""
        lease, provider, plain = step.look.lease, step.provider, step.plain
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
        if step.look.taken_from is not None:
            log.warning(
                "took over the refresh lease of connection %s: its holder (%s) did not write "
                "within %gs; it had sent nothing, or the provider does not rotate refresh "
                "tokens, so asking again is safe",
                uuid,
                step.look.taken_from,
                self.policy.lease,
                extra=telemetry.fields(
                    "refresh_lease_taken_over", uuid=uuid, provider=provider.key, owner=step.owner
                ),
            )
        renewing = asyncio.get_running_loop().create_task(
            self._renew(lease), name=f"integrations-lease-{uuid}"
        )
        try:
            tokens = await self._token_call(provider, plain, flight, lease)
            flight.answered = True
        except _FencedOut:
            renewing.cancel()
            log.info(
                "the refresh lease of connection %s was taken over before its request "
                "went out; using what the process that took it stores",
                uuid,
                extra=telemetry.fields("refresh_lease_fenced_out", uuid=uuid),
            )
            return await self._run(uuid, flight)
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
            previous = text(plain.get("refresh_token"))
            await _to_the_end(self._in_row(uuid, partial(self._failed, lease, previous, exc)))
            if step.look.fallback is not None:
                return step.look.fallback
            raise
        except BaseException:
            renewing.cancel()
            if flight.sent_at is None:
                # Cancelled before asking: free the lease rather than make others wait it
                # out. Once a request went out its refresh token may be spent: the lease
                # is left to run out, and the takeover policy decides what comes next.
                with contextlib.suppress(Exception):
                    await _to_the_end(self._in_row(uuid, partial(self._released, lease)))
            raise
        finally:
            renewing.cancel()
        return await self._store(uuid, lease, tokens, text(plain.get("refresh_token")))

    async def _renew(self, lease: Lease) -> None:
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
        """A refresh request that may have arrived (it timed out, or the connection dropped
        after it was sent) at a provider that rotates refresh tokens (or under
        ``refresh_takeover="reauthorize"``) is not sent again: the connection must be
        authorized again. A provider that does not rotate is asked again, as after any
        other transient failure."""
        return ReauthRequired(
            _spent_message(exc, attempt) + "; the connection must be authorized again"
        )

    def _renewed(
        self, lease: Lease, row: StoredRow | None, now: datetime | None
    ) -> tuple[Change, bool]:
        return lease_rules.renewed(lease, row, now, self.policy.lease)

    def _sending(
        self, lease: Lease, row: StoredRow | None, now: datetime | None
    ) -> tuple[Change, bool]:
        return lease_rules.sending(lease, row, now, self.policy.lease)

    @staticmethod
    def _released(
        lease: Lease, row: StoredRow | None, _now: datetime | None
    ) -> tuple[Change, None]:
        return lease_rules.released(lease, row), None

    def _failed(
        self,
        lease: Lease,
        previous: str | None,
        exc: OAuthError,
        row: StoredRow | None,
        _now: datetime | None,
    ) -> tuple[Change, None]:
        if row is None:
            return Change(), None
        plain = self._core.vault.unseal(row.uuid, row.data, self._core.secret_fields(row))
        seal = partial(self._core.vault.seal_value, row.uuid)
        change = lease_rules.failed(lease, row, plain, previous, exc, utcnow(), self.policy, seal)
        return change, None

    # -- storing what the token endpoint answered ------------------------------------------

    async def _store(
        self, uuid: str, lease: Lease, tokens: oauth.TokenSet, previous: str | None
    ) -> str:
        write = partial(self._written, lease, tokens, previous)
        try:
            access = (await _to_the_end(self._in_row(uuid, write))).token
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
            self._persist(uuid, unstored, write, previous, reason),
            name=f"integrations-store-{uuid}",
        )
        self._unstored[uuid] = unstored
        return tokens.access_token

    def _written(
        self,
        lease: Lease,
        tokens: oauth.TokenSet,
        previous: str | None,
        row: StoredRow | None,
        _now: datetime | None,
    ) -> tuple[Change, Written]:
        """Compare and set (see ``lease_rules.written``); a fenced-out write says so."""
        if row is None:
            return Change(), Written(False, tokens.access_token, gone=True)
        plain = self._core.vault.unseal(row.uuid, row.data, self._core.secret_fields(row))
        seal = partial(self._core.vault.seal_value, row.uuid)
        change, done = lease_rules.written(lease, row, plain, tokens, previous, seal)
        if not done.stored:
            log.info(
                "the refresh lease of connection %s was taken over before its answer was "
                "stored; %s",
                row.uuid,
                "the stored tokens are newer"
                if done.newer
                else "its answer serves this process only",
                extra=telemetry.fields(
                    "refresh_lease_fenced_out",
                    uuid=row.uuid,
                    provider=row.provider,
                    owner=row.owner,
                ),
            )
        return change, done

    async def _persist(
        self,
        uuid: str,
        unstored: _Unstored,
        write: Callable[[StoredRow | None, datetime | None], tuple[Change, Written]],
        previous: str | None,
        reason: str,
    ) -> None:
        """Try ``write`` again until it is done or ``write_retry`` runs out; ``reason`` is
        why the first try failed (what the log gives if no later try is made)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.write_retry
        delay, attempts = _FIRST_RETRY, 1
        try:
            while loop.time() + delay <= deadline:
                await asyncio.sleep(delay)
                attempts += 1
                try:
                    done = await self._in_row(uuid, write)
                except Exception as exc:
                    reason = _why(exc)
                    delay = min(delay * 2, _LAST_RETRY)
                    continue
                if done.stored:
                    log.info(
                        "stored the tokens of connection %s's refresh at attempt %d",
                        uuid,
                        attempts,
                        extra=telemetry.fields("token_write_recovered", uuid=uuid),
                    )
                elif done.gone:
                    log.info(
                        "connection %s was deleted before the tokens of its refresh were "
                        "stored (attempt %d): they are dropped",
                        uuid,
                        attempts,
                        extra=telemetry.fields("token_write_deleted", uuid=uuid),
                    )
                else:
                    log.warning(
                        "the tokens of connection %s's refresh were not stored (attempt %d): "
                        "its lease was taken over meanwhile, and %s",
                        uuid,
                        attempts,
                        "the stored tokens are newer"
                        if done.newer
                        else "the process that took it decides what is stored",
                        extra=telemetry.fields("token_write_fenced_out", uuid=uuid),
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
            reason,
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
        plain = self._core.vault.unseal(row.uuid, row.data, self._core.secret_fields(row))
        return lease_rules.spent(row, plain, previous, utcnow(), self.policy), None

    async def _token_call(
        self, provider: Provider, plain: Mapping[str, Any], flight: _Flight, lease: Lease
    ) -> oauth.TokenSet:
        endpoint = self._core.token_endpoint(provider)
        grant = _scheme(provider).grant(provider, plain)
        if grant.client_auth:
            endpoint.client(plain)  # NotConfigured before anything is sent
        loop = asyncio.get_running_loop()
        if grant.spends is not None and not await self._in_row(
            lease.uuid, partial(self._sending, lease)
        ):
            raise _FencedOut
        # Another process that finds the lease run out now knows the refresh token may
        # be spent; one whose answer is lost must not be sent again to a rotating provider.
        rotates = provider.rotates_refresh_tokens or self.policy.takeover == "reauthorize"

        def sending() -> None:
            flight.sent_at = loop.time()

        async def resend(exc: TokenRequestFailed, attempt: int) -> None:
            if grant.spends is not None and rotates and exc.context.get("maybe_received"):
                raise self._maybe_spent(exc, attempt) from exc

        return await endpoint.renew(
            self._core.http, grant, plain, self.policy, on_sending=sending, resend=resend
        )


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
