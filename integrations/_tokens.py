"""Tokens service: fresh access tokens, single-flight in a process, a row lock across processes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Literal

from . import _record as record
from . import oauth
from ._core import Core
from ._errors import (
    Deleted,
    InvalidAttrs,
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
from ._http import HttpClient, retry_after_seconds
from ._input import parse_timestamp
from ._models import utcnow
from ._providers import Provider
from ._record import StoredRow
from ._repository import LockedRow
from ._settings import BUDGET_MARGIN

__all__ = ["Refresher", "imported_token_set", "parse_time", "post_token_request"]

log = logging.getLogger("integrations.oauth")


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
    """One refresh task in flight, what it was started for, and when it first asked the
    token endpoint (None until then: only such a task may be cancelled without loss)."""

    seen: _Seen
    mode: Mode
    task: asyncio.Task[str] = field(init=False, repr=False)
    sent_at: float | None = None


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
) -> oauth.TokenSet:
    """One token endpoint call, parsed: ReauthRequired or TokenRequestFailed on failure."""
    url, headers, body = request
    try:
        response = await http.send(
            "POST",
            url,
            headers=headers,
            data=body,
            max_attempts=1,
            timeout=request_timeout,
            allow_redirects=False,
        )
    except RequestFailed as exc:
        raise TokenRequestFailed(
            f"Could not reach the token endpoint: {exc.message}", transient=True
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

    Inside a process, concurrent callers for one connection share one task
    (awaited through ``asyncio.shield``, so a cancelled caller does not abandon a
    refresh whose new refresh token must be stored). Across processes the task
    takes the row lock, reads the row again and calls the token endpoint only
    if no other process refreshed, or failed, while it waited. After a failure,
    automatic refreshes wait for a cool-down (a terminal failure: for a new
    authorization, new setup or an explicit refresh) and get the recorded error.
    """

    def __init__(self, core: Core) -> None:
        self._core = core
        self.policy = core.settings.token
        self._inflight: dict[str, _Flight] = {}
        self._closed = False

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
        if provider.auth_type == "oauth2":
            if token is None:
                raise NotConnected()
            # Without a refresh token nothing can be done ahead of time; the API will tell.
            if not self._due(plain, now) or _text(plain.get("refresh_token")) is None:
                return token
        elif token is not None and not self._due(plain, now):
            return token
        held = _held_back(row.data, now)
        if held is not None:
            if token is not None and _usable(token, plain, now):
                return token
            raise held
        return await self._coalesced(row.uuid, _Seen.of(token, row), "expiring")

    async def refresh(self, row: StoredRow, provider: Provider) -> str:
        """A new access token, whatever the old one's expiry or a recorded failure."""
        _check_oauth(provider)
        plain = self._plain(row, provider)
        token = _text(plain.get("access_token"))
        if _nothing_to_refresh(provider, plain):
            raise NotConnected()
        return await self._coalesced(row.uuid, _Seen.of(token, row), "force")

    async def after_rejection(self, row: StoredRow, rejected: str) -> str:
        """The token to retry with after the API answered 401 to ``rejected``."""
        held = _held_back(row.data, utcnow())
        if held is not None:
            raise held
        return await self._coalesced(row.uuid, _Seen(rejected, _failure_id(row.data)), "rejected")

    # -- single flight --------------------------------------------------------------------

    async def _coalesced(self, uuid: str, seen: _Seen, mode: Mode) -> str:
        flight = self._join(uuid, seen, mode)
        token = await self._outcome(flight)
        if (
            mode == "rejected"
            and token == seen.token
            and (flight.mode, flight.seen.token) != ("rejected", seen.token)
        ):
            # The shared task was started for another need (a caller that read an older
            # token, or a refresh ahead of expiry) and handed back the token the API has
            # just rejected: one more, for this caller's own.
            flight = self._join(uuid, seen, mode)
            token = await self._outcome(flight)
        return token

    def _join(self, uuid: str, seen: _Seen, mode: Mode) -> _Flight:
        if self._closed:
            raise LifecycleError("Integrations is closed")
        flight = self._inflight.get(uuid)
        if flight is None:
            flight = _Flight(seen, mode)
            flight.task = asyncio.get_running_loop().create_task(
                self._run(uuid, flight), name=f"integrations-refresh-{uuid}"
            )
            self._inflight[uuid] = flight
            flight.task.add_done_callback(partial(self._finished, uuid, flight))
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
        if not task.cancelled():
            # Marks the outcome retrieved: every caller may have been cancelled meanwhile.
            task.exception()

    async def close(self) -> None:
        """Stop refreshing: cancel what has not asked the token endpoint yet, and let each
        refresh that has finish (its new refresh token must be stored) within its budget
        counted from its first request."""
        self._closed = True
        flights = list(self._inflight.values())
        if flights:
            await asyncio.gather(*(self._settle(f) for f in flights))

    async def _settle(self, flight: _Flight) -> None:
        if flight.sent_at is not None:
            left = flight.sent_at + self.policy.budget - asyncio.get_running_loop().time()
            if left > 0:
                await asyncio.wait({flight.task}, timeout=left)
        flight.task.cancel()
        # The write of what a token request returned is not cancelled: wait for it.
        await asyncio.wait({flight.task})

    # -- under the row lock ---------------------------------------------------------------

    async def _run(self, uuid: str, flight: _Flight) -> str:
        policy = self.policy
        try:
            async with self._core.repo.locked(
                uuid, lock_timeout=policy.lock_timeout, idle_timeout=policy.budget
            ) as locked:
                outcome = await self._under_lock(locked, flight)
        except LockTimeout as exc:
            raise TokenRequestFailed(
                "The connection was locked by another transaction (a refresh, a write or a "
                f"key rotation batch) for longer than the lock timeout ({policy.lock_timeout:g}s)",
                transient=True,
            ) from exc
        # A failure is raised only now, after it was committed with the lock released.
        if isinstance(outcome, OAuthError):
            raise outcome
        return outcome

    async def _under_lock(self, locked: LockedRow, flight: _Flight) -> str | OAuthError:
        row = locked.row
        if row is None:
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
        # Check again after the lock: another process may have refreshed, or failed, meanwhile.
        if current is not None and current != seen.token:
            return current
        now = utcnow()
        if mode == "expiring" and current is not None and not self._due(plain, now):
            return current
        # Ahead of expiry, a failure does not take away a token that still works.
        fallback = current if mode == "expiring" and _usable(current, plain, now) else None
        failure = row.data.get("refresh_error")
        if isinstance(failure, Mapping):
            recorded = _recorded_error(failure, row.data)
            fresh = _failure_id(row.data) != seen.failure
            if fresh or (mode != "force" and _held_back(row.data, now) is not None):
                return fallback or recorded
        try:
            tokens = await self._token_call(provider, plain, flight)
        except (ReauthRequired, TokenRequestFailed) as exc:
            failed = record.refresh_failed(row, exc, utcnow(), cooldown=self.policy.cooldown_after)
            log.info(
                "token refresh failed for connection %s (%s): %s", row.uuid, exc.code, exc.message
            )
            await locked.write(failed.change.data or {}, failed.change.events)
            return fallback or exc
        done = record.refreshed(
            row,
            tokens,
            seal=partial(self._core.vault.seal_value, row.uuid),
            previous_refresh_token=plain.get("refresh_token"),
        )
        await locked.write(done.change.data or {}, done.change.events)
        return tokens.access_token

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
        refresh_token: str | None = None
        if provider.auth_type == "oauth2":
            refresh_token = _text(plain.get("refresh_token"))
            if refresh_token is None:
                raise ReauthRequired(
                    "The access token was rejected and there is no refresh token; "
                    "the connection must be authorized again"
                )
            request = oauth.token_request(
                "refresh_token",
                token_url=url,
                client_id=client_id,
                client_secret=secret,
                auth_method=auth_method,
                refresh_token=refresh_token,
            )
            granted = plain.get("granted_scopes")
            requested: Sequence[str] = (
                [str(s) for s in granted] if isinstance(granted, list) else provider.scopes
            )
        else:
            request = oauth.token_request(
                "client_credentials",
                token_url=url,
                client_id=client_id,
                client_secret=secret,
                auth_method=auth_method,
                scope_separator=provider.scope_separator,
                scope=list(provider.scopes) or None,
            )
            requested = provider.scopes
        policy = self.policy
        loop = asyncio.get_running_loop()
        delays = oauth.backoff_delays(policy.attempts - 1, policy.backoff, policy.backoff_cap)
        flight.sent_at = loop.time()
        # Every attempt and wait must fit in the budget: it is the lock's idle timeout too.
        deadline = flight.sent_at + policy.budget - BUDGET_MARGIN
        for attempt in range(1, policy.attempts + 1):
            try:
                return await post_token_request(
                    self._core.http,
                    request,
                    request_timeout=policy.timeout,
                    requested_scopes=requested,
                    previous_refresh_token=refresh_token,
                    redact=[secret],
                )
            except TokenRequestFailed as exc:
                if not exc.transient:
                    raise
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
                )
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


def _nothing_to_refresh(provider: Provider, plain: Mapping[str, Any]) -> bool:
    """An authorization-code connection with neither token has not been connected (or was
    disconnected); client-credentials connections can always fetch a token."""
    return (
        provider.auth_type == "oauth2"
        and _text(plain.get("access_token")) is None
        and _text(plain.get("refresh_token")) is None
    )


def _check_oauth(provider: Provider) -> None:
    if not provider.is_oauth:
        raise InvalidProviderKey(
            f"Provider {provider.key!r} does not use OAuth access tokens.", provider=provider.key
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
#: Far enough from both ends of ``datetime`` that leeway arithmetic cannot overflow.
_EARLIEST, _LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC)


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
        expires_at = raw_at if isinstance(raw_at, datetime) else parse_time(raw_at)
        if expires_at is None or expires_at.tzinfo is None:
            raise InvalidAttrs(
                "expires_at must be an ISO 8601 time with a timezone, such as "
                "'2030-01-01T00:00:00+00:00'.",
                field="expires_at",
            )
    elif raw_in is not None:
        if isinstance(raw_in, bool) or not isinstance(raw_in, int | float) or raw_in != raw_in:
            raise InvalidAttrs("expires_in must be a number of seconds.", field="expires_in")
        if not 0 <= raw_in <= 10 * 365 * 86400:
            raise InvalidAttrs("expires_in must be between 0 and ten years.", field="expires_in")
        expires_at = now + timedelta(seconds=float(raw_in))
    if expires_at is not None and not _EARLIEST <= expires_at <= _LATEST:
        raise InvalidAttrs("expires_at is out of range.", field="expires_at")
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
