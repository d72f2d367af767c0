"""Request pipeline: resolve, decrypt once, check the host once, authenticate, send, retry."""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from . import _telemetry as telemetry
from ._core import Core
from ._http import Response, auth_for, auth_kind
from ._input import check_method
from ._providers import Provider
from ._record import StoredRow
from ._tokens import Refresher

if TYPE_CHECKING:
    from yarl import URL

__all__ = ["Requests"]

# The row cache's extra under which a row's built auth headers are kept.
_HEADERS = "auth_headers"


class Requests:
    """Authenticated calls: one pass of the pipeline per call.

    The row is decrypted once and the URL checked against the provider's API hosts once,
    before any token request. For OAuth providers a token due for renewal is refreshed
    first; an answer whose status is in ``provider.refresh_on`` (401 by default) means
    the token was rejected: it is refreshed once (only if still the stored one) and the
    request sent once more.
    """

    def __init__(self, core: Core, tokens: Refresher) -> None:
        self._core = core
        self._tokens = tokens

    def request(
        self,
        row: StoredRow,
        method: str,
        url: str,
        *,
        allow_any_host: bool,
        max_attempts: int | None,
        opts: dict[str, Any],
    ) -> Coroutine[Any, Any, Response]:
        """Check the call and return the coroutine that makes it. The URL, method and
        options are checked here, before anything is awaited; for a header or basic
        scheme on a cached row, untraced, the coroutine is the HTTP client's own (no frame
        of ours in between on every resumption while the request is in flight)."""
        method = check_method(method).upper()
        if telemetry.live():
            return self._traced(row, method, url, allow_any_host, max_attempts, opts)
        return self._start(row, method, url, allow_any_host, max_attempts, opts)

    async def _traced(
        self,
        row: StoredRow,
        method: str,
        url: str,
        allow_any_host: bool,
        max_attempts: int | None,
        opts: dict[str, Any],
    ) -> Response:
        with telemetry.request_span(row, method, url) as outcome:
            response = await self._start(
                row, method, url, allow_any_host, max_attempts, opts, traced=True
            )
            outcome.status = response.status
            return response

    def _start(
        self,
        row: StoredRow,
        method: str,
        url: str,
        allow_any_host: bool,
        max_attempts: int | None,
        opts: dict[str, Any],
        *,
        traced: bool = False,
    ) -> Coroutine[Any, Any, Response]:
        """Check the URL and return the coroutine that sends the request, naming ``row``
        in the log records made while it runs (a traced call's span already does)."""
        core = self._core
        provider = core.require_provider(row)
        target = core.http.target(
            url, params=opts.pop("params", None), provider=provider, allow_any_host=allow_any_host
        )
        scope = None if traced else row
        kind = auth_kind(provider)
        if not provider.is_oauth and kind is not None and kind.reusable:
            # Built once per cached row version: no decrypt or rendering on later calls.
            cache = core.repo.cache
            added: dict[str, str] | None = cache.extra(row, _HEADERS)
            if added is None:
                plain = core.vault.unseal(row.uuid, row.data, provider.secret_field_keys)
                added, _ = auth_for(provider, plain, target)
                cache.keep_extra(row, _HEADERS, added)
            return core.http.send_prepared(
                method, target, provider, added, max_attempts=max_attempts, opts=opts, scope=scope
            )
        plain = core.vault.unseal(row.uuid, row.data, provider.secret_field_keys)
        if not provider.is_oauth:
            sending = core.http.send_authenticated(
                method, target, provider, plain, max_attempts=max_attempts, opts=opts
            )
        else:
            sending = self._oauth(row, provider, plain, method, target, max_attempts, opts)
        return sending if scope is None else telemetry.in_log_scope(scope, sending)

    async def _oauth(
        self,
        row: StoredRow,
        provider: Provider,
        plain: Mapping[str, Any],
        method: str,
        target: URL,
        max_attempts: int | None,
        opts: dict[str, Any],
    ) -> Response:
        core = self._core
        token = await self._tokens.access_token(row, provider, plain)

        async def send(access_token: str) -> Response:
            credentials: Mapping[str, Any] = {**plain, "access_token": access_token}
            return await core.http.send_authenticated(
                method, target, provider, credentials, max_attempts=max_attempts, opts=opts
            )

        response = await send(token)
        if response.status not in provider.refresh_on:
            return response
        fresh = await self._tokens.after_rejection(row, token)
        if fresh == token:
            return response
        return await send(fresh)
