"""Fresh access tokens: single-flight per connection in a process, a row lock across processes."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from . import oauth
from ._errors import (
    Deleted,
    HostNotAllowed,
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
from ._http import HttpClient, Response, check_url, host_allowed
from ._models import Event, utcnow
from ._providers import Provider
from ._repository import LockedRow, StoredRow

if TYPE_CHECKING:
    from ._facade import Integrations

__all__ = ["OAUTH_TYPES", "Refresher", "TokenPolicy", "parse_time", "post_token_request"]

log = logging.getLogger("integrations.oauth")

OAUTH_TYPES = frozenset({"oauth2", "oauth2_client_credentials"})

#: Why a refresh is asked for: the token is due, a caller insists, or the API rejected it.
Mode = Literal["expiring", "force", "rejected"]


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """Timing of token requests and of the row lock that serialises them."""

    leeway: float = 60.0
    lock_timeout: float = 30.0
    timeout: float = 10.0
    attempts: int = 3
    backoff: float = 0.5

    def __post_init__(self) -> None:
        if self.leeway < 0 or self.lock_timeout <= 0 or self.timeout <= 0 or self.backoff < 0:
            raise ValueError("leeway and backoff must be >= 0; lock_timeout and timeout > 0")
        if self.attempts < 1:
            raise ValueError("token_attempts must be at least 1")

    @property
    def backoff_cap(self) -> float:
        return self.backoff * 8

    @property
    def budget(self) -> float:
        """The longest one refresh may hold the lock: every attempt times out, every wait maxed."""
        waits = sum(min(self.backoff_cap, self.backoff * 2.0**i) for i in range(self.attempts - 1))
        return self.attempts * self.timeout + waits + 5.0


@dataclass(frozen=True, slots=True)
class _Seen:
    """What a caller saw before asking: the access token and the last recorded failure."""

    token: str | None
    failure: str | None

    @classmethod
    def of(cls, token: str | None, row: StoredRow) -> _Seen:
        return cls(token, _failure_id(row.data))


def _failure_id(data: Mapping[str, Any]) -> str | None:
    failure = data.get("refresh_error")
    if isinstance(failure, Mapping) and isinstance(failure.get("id"), str):
        return str(failure["id"])
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_time(value: Any) -> datetime | None:
    """A stored ISO timestamp as an aware datetime; anything unreadable is None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


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
    return oauth.parse_token_response(
        response.status,
        response.body,
        now=utcnow(),
        requested_scopes=requested_scopes,
        previous_refresh_token=previous_refresh_token,
        redact=[s for s in redact if s],
    )


class Refresher:
    """Hands out valid access tokens, refreshing them at most once per need.

    Inside a process, concurrent callers for one connection share one task
    (awaited through ``asyncio.shield``, so a cancelled caller does not abandon a
    refresh whose new refresh token must be stored). Across processes the task
    takes the row lock, reads the row again and calls the token endpoint only
    if no other process refreshed, or failed, while it waited.
    """

    def __init__(self, host: Integrations, policy: TokenPolicy) -> None:
        self._host = host
        self.policy = policy
        self._inflight: dict[str, asyncio.Task[str]] = {}
        self._closed = False

    # -- entry points ---------------------------------------------------------------------

    def _plain(self, row: StoredRow, provider: Provider) -> dict[str, Any]:
        return self._host._vault.unseal(row.uuid, row.data, provider.secret_field_keys)

    def _due(self, plain: Mapping[str, Any]) -> bool:
        return oauth.expires_within(
            parse_time(plain.get("expires_at")), self.policy.leeway, utcnow()
        )

    async def access_token(self, row: StoredRow, provider: Provider) -> str:
        """A token valid for at least the leeway, refreshed (or fetched) first when needed."""
        _check_oauth(provider)
        plain = self._plain(row, provider)
        token = _text(plain.get("access_token"))
        if provider.auth_type == "oauth2":
            if token is None:
                raise NotConnected()
            # Without a refresh token nothing can be done ahead of time; the API will tell.
            if not self._due(plain) or _text(plain.get("refresh_token")) is None:
                return token
        elif token is not None and not self._due(plain):
            return token
        return await self._coalesced(row.uuid, _Seen.of(token, row), "expiring")

    async def refresh(self, row: StoredRow, provider: Provider) -> str:
        """A new access token, whatever the old one's expiry."""
        _check_oauth(provider)
        plain = self._plain(row, provider)
        token = _text(plain.get("access_token"))
        if (
            provider.auth_type == "oauth2"
            and token is None
            and _text(plain.get("refresh_token")) is None
        ):
            raise NotConnected()
        return await self._coalesced(row.uuid, _Seen.of(token, row), "force")

    async def after_rejection(self, row: StoredRow, rejected: str) -> str:
        """The token to retry with after the API answered 401 to ``rejected``."""
        return await self._coalesced(row.uuid, _Seen(rejected, _failure_id(row.data)), "rejected")

    async def request(
        self,
        row: StoredRow,
        provider: Provider,
        method: str,
        url: str,
        *,
        allow_any_host: bool,
        max_attempts: int | None,
        opts: Mapping[str, Any],
    ) -> Response:
        """An API call with a fresh token; on 401 one refresh (if still current) and one retry."""
        if not allow_any_host:
            target = check_url(url)
            # Checked before any refresh, so a stray URL cannot even cause a token request.
            if not host_allowed(target, provider.api_hosts):
                raise HostNotAllowed(
                    f"{target.raw_host} is not an API host of provider {provider.key!r}; "
                    "nothing was sent.",
                    provider=provider.key,
                    host=target.raw_host,
                )
        token = await self.access_token(row, provider)
        plain = self._plain(row, provider)
        http = self._host._http_client

        async def send(access_token: str) -> Response:
            return await http.request(
                method,
                url,
                provider=provider,
                credentials={**plain, "access_token": access_token},
                allow_any_host=allow_any_host,
                max_attempts=max_attempts,
                **opts,
            )

        response = await send(token)
        if response.status != 401:
            return response
        fresh = await self.after_rejection(row, token)
        if fresh == token:
            return response
        return await send(fresh)

    # -- single flight --------------------------------------------------------------------

    async def _coalesced(self, uuid: str, seen: _Seen, mode: Mode) -> str:
        if self._closed:
            raise LifecycleError("Integrations is closed")
        task = self._inflight.get(uuid)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._run(uuid, seen, mode), name=f"integrations-refresh-{uuid}"
            )
            self._inflight[uuid] = task
            task.add_done_callback(partial(self._finished, uuid))
        return await asyncio.shield(task)

    def _finished(self, uuid: str, task: asyncio.Task[str]) -> None:
        if self._inflight.get(uuid) is task:
            del self._inflight[uuid]
        if not task.cancelled():
            # Marks the outcome retrieved: every caller may have been cancelled meanwhile.
            task.exception()

    async def close(self) -> None:
        """Let refreshes in flight finish (their new refresh tokens must be stored), bounded."""
        self._closed = True
        tasks = list(self._inflight.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.policy.budget)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- under the row lock ---------------------------------------------------------------

    async def _run(self, uuid: str, seen: _Seen, mode: Mode) -> str:
        policy = self.policy
        try:
            async with self._host._repo.locked(
                uuid, lock_timeout=policy.lock_timeout, idle_timeout=policy.budget
            ) as locked:
                outcome = await self._under_lock(locked, seen, mode)
        except LockTimeout as exc:
            raise TokenRequestFailed(
                "Another process is refreshing this connection's token and did not finish "
                f"within the lock timeout ({policy.lock_timeout:g}s)",
                transient=True,
            ) from exc
        # A failure is raised only now, after it was committed with the lock released.
        if isinstance(outcome, OAuthError):
            raise outcome
        return outcome

    async def _under_lock(self, locked: LockedRow, seen: _Seen, mode: Mode) -> str | OAuthError:
        row = locked.row
        if row is None:
            raise Deleted()
        provider = self._host._provider_of(row)
        if provider is None:
            raise InvalidProviderKey("the connection's provider is not registered")
        _check_oauth(provider)
        plain = self._plain(row, provider)
        current = _text(plain.get("access_token"))
        if (
            provider.auth_type == "oauth2"
            and current is None
            and _text(plain.get("refresh_token")) is None
        ):
            # Disconnected while this caller waited: nothing to refresh, nothing to record.
            raise NotConnected()
        # Check again after the lock: another process may have refreshed, or failed, meanwhile.
        if current is not None and current != seen.token:
            return current
        failure = row.data.get("refresh_error")
        if isinstance(failure, Mapping) and _failure_id(row.data) != seen.failure:
            return _recorded_error(failure, row.data)
        if mode == "expiring" and current is not None and not self._due(plain):
            return current
        try:
            tokens = await self._token_call(provider, plain)
        except (ReauthRequired, TokenRequestFailed) as exc:
            data, events = self._failed(row, exc)
            await locked.write(data, events)
            return exc
        data, events = self._refreshed(row, plain, tokens)
        await locked.write(data, events)
        return tokens.access_token

    async def _token_call(self, provider: Provider, plain: Mapping[str, Any]) -> oauth.TokenSet:
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
        delays = oauth.backoff_delays(policy.attempts - 1, policy.backoff, policy.backoff_cap)
        for attempt in range(1, policy.attempts + 1):
            try:
                return await post_token_request(
                    self._host._http_client,
                    request,
                    request_timeout=policy.timeout,
                    requested_scopes=requested,
                    previous_refresh_token=refresh_token,
                    redact=[secret],
                )
            except TokenRequestFailed as exc:
                if not exc.transient:
                    raise
                if attempt == policy.attempts:
                    raise TokenRequestFailed(
                        f"{exc.message}; gave up after {attempt} attempt(s)",
                        transient=True,
                        status=exc.context.get("status"),
                        error=exc.context.get("error"),
                        attempts=attempt,
                    ) from exc
                log.debug(
                    "token request failed transiently (attempt %d of %d); retrying",
                    attempt,
                    policy.attempts,
                )
                await asyncio.sleep(delays[attempt - 1])
        raise AssertionError("unreachable")  # pragma: no cover

    # -- what gets written ----------------------------------------------------------------

    def _event(
        self, kind: str, row: StoredRow, data: dict[str, Any], previous: Any, detail: Any
    ) -> Event:
        updated = StoredRow(row.uuid, row.owner, row.key, data, row.version + 1)
        return self._host._event(kind, updated, previous_status=previous, detail=detail)

    def _refreshed(
        self, row: StoredRow, plain: Mapping[str, Any], tokens: oauth.TokenSet
    ) -> tuple[dict[str, Any], list[Event]]:
        vault = self._host._vault
        data = dict(row.data)
        data["access_token"] = vault.seal_value(row.uuid, "access_token", tokens.access_token)
        # A rotated refresh token is stored in the same commit as the access token it came with.
        if tokens.refresh_token is not None and tokens.refresh_token != plain.get("refresh_token"):
            data["refresh_token"] = vault.seal_value(
                row.uuid, "refresh_token", tokens.refresh_token
            )
        data["token_type"] = tokens.token_type
        if tokens.expires_at is None:
            data.pop("expires_at", None)
        else:
            data["expires_at"] = iso(tokens.expires_at)
        data["token_obtained_at"] = iso(tokens.obtained_at)
        if tokens.scope:
            data["granted_scopes"] = list(tokens.scope)
        previous = row.data.get("status")
        data["status"] = "connected"
        data["reauth_required"] = False
        data.pop("refresh_error", None)
        events = []
        if previous == "error":
            data.pop("validation_status", None)
            events.append(self._event("recovered", row, data, previous, {}))
        events.append(
            self._event(
                "token_refreshed",
                row,
                data,
                previous,
                {"expires_at": data.get("expires_at")},
            )
        )
        return data, events

    def _failed(self, row: StoredRow, exc: OAuthError) -> tuple[dict[str, Any], list[Event]]:
        terminal = isinstance(exc, ReauthRequired)
        transient = isinstance(exc, TokenRequestFailed) and exc.transient
        data = dict(row.data)
        previous = row.data.get("status")
        previous_message = row.data.get("validation_status")
        data["status"] = "error"
        data["reauth_required"] = terminal
        data["validation_status"] = exc.message
        data["refresh_error"] = {
            "id": secrets.token_hex(8),
            "at": iso(utcnow()),
            "code": exc.code,
            "error": exc.context.get("error"),
            "transient": transient,
        }
        events = []
        # Only a change is news: a dead connection polled in a loop stays quiet.
        if previous != "error" or previous_message != exc.message:
            events.append(
                self._event(
                    "refresh_failed",
                    row,
                    data,
                    previous,
                    {
                        "reauth_required": terminal,
                        "transient": transient,
                        "error": exc.context.get("error"),
                        "validation_status": exc.message,
                    },
                )
            )
        log.info("token refresh failed for connection %s (%s): %s", row.uuid, exc.code, exc.message)
        return data, events


def _check_oauth(provider: Provider) -> None:
    if provider.auth_type not in OAUTH_TYPES:
        raise InvalidProviderKey(
            f"Provider {provider.key!r} does not use OAuth access tokens.", provider=provider.key
        )


def _recorded_error(failure: Mapping[str, Any], data: Mapping[str, Any]) -> OAuthError:
    message = data.get("validation_status")
    text = message if isinstance(message, str) and message else "The token refresh failed"
    if failure.get("code") == ReauthRequired.code:
        return ReauthRequired(text, error=failure.get("error"))
    return TokenRequestFailed(
        text, transient=bool(failure.get("transient")), error=failure.get("error")
    )
