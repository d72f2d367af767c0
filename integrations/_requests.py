"""Request pipeline: resolve, decrypt once, check the host once, authenticate, send, retry."""

from __future__ import annotations

from collections.abc import Awaitable, Coroutine, Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from . import _telemetry as telemetry
from ._audit import AuditLog
from ._core import Core
from ._errors import IntegrationsError
from ._http import Request, Response, Signer
from ._input import check_method
from ._providers import Provider
from ._record import StoredRow
from ._schemes import Answer
from ._tls import context_for
from ._tokens import Refresher

__all__ = ["Requests"]

# The row cache's extra under which a row's signer (its auth headers, built ahead) is kept.
_SIGNER = "signer"
_TLS = "tls"


class Requests:
    """Authenticated calls: one pass of the pipeline per call.

    The request is built once (URL checked against the provider's API hosts, options and
    headers checked, body encoded) before any token request; the row is decrypted once.
    Headers that depend on the credentials alone are built once per cached row version;
    otherwise the provider's auth scheme runs its flow: OAuth schemes renew a token that is
    due first, and an answer that ``provider.rejects`` (a ``refresh_on`` status, 401 by
    default, or a ``rejected_answers`` rule) makes them renew once (only if the rejected
    token is still the stored one) and send the request once more.
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
            sending = self._traced(row, method, url, allow_any_host, max_attempts, opts)
        else:
            sending = self._start(row, method, url, allow_any_host, max_attempts, opts)
        audit = self._core.audit
        if audit.records_use:
            return _audited(audit, row, method, url, sending)
        return sending

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
        """Build the request and return the coroutine that sends it, naming ``row`` in the
        log records made while it runs (a traced call's span already does)."""
        core = self._core
        provider = core.require_provider(row)
        scheme = provider.scheme
        request = core.http.prepare(
            method,
            url,
            provider=provider,
            allow_any_host=allow_any_host,
            max_attempts=max_attempts,
            opts=opts,
        )
        scope = None if traced else row
        cache = core.repo.cache
        if provider.presents_certificate or provider.ca_bundle is not None:
            request = self._with_tls(row, provider, request)
        signer: Signer | None = cache.extra(row, _SIGNER)
        if signer is not None:
            return core.http.send(request, signer, scope=scope)
        plain = core.vault.unseal(row.uuid, row.data, provider.secret_field_keys)
        added = scheme.prepared_headers(provider, plain)
        if added is not None:
            # Built once per cached row version: no decrypt or rendering on later calls.
            signer = Signer.prepared(provider, added)
            cache.keep_extra(row, _SIGNER, signer)
            return core.http.send(request, signer, scope=scope)
        sending = self._flow(row, provider, plain, request)
        return sending if scope is None else telemetry.in_log_scope(scope, sending)

    def _with_tls(self, row: StoredRow, provider: Provider, request: Request) -> Request:
        """``request`` over the connection's TLS context (its client certificate, the
        provider's CA), built once per cached row version."""
        core = self._core
        context = core.repo.cache.extra(row, _TLS)
        if context is None:
            plain = core.vault.unseal(row.uuid, row.data, provider.secret_field_keys)
            context = context_for(provider, plain)
            core.repo.cache.keep_extra(row, _TLS, context)
        return replace(request, options={**request.options, "ssl": context})

    async def _flow(
        self, row: StoredRow, provider: Provider, plain: Mapping[str, Any], request: Request
    ) -> Response:
        """Run the scheme's auth flow: send what it yields, hand it the answer; a flow may
        yield the request once more (after renewing its credentials), never more."""
        http = self._core.http
        flow = provider.scheme.auth_flow(request, _Context(self._tokens, row, provider, plain))
        try:
            signed = await anext(flow)
            response = await http.send(signed, Signer.of(provider, _signing(signed, plain)))
            try:
                again = await flow.asend(response)
            except StopAsyncIteration:
                return response
            return await http.send(again, Signer.of(provider, _signing(again, plain)))
        finally:
            await flow.aclose()


async def _audited(
    audit: AuditLog, row: StoredRow, method: str, url: str, sending: Awaitable[Response]
) -> Response:
    """Send, then buffer a use record: method, host and status; never the path or query,
    which may carry secrets."""
    status: int | None = None
    outcome = "error"
    try:
        response = await sending
        status = response.status
        outcome = "ok" if status < 400 else f"http_{status}"
        return response
    except IntegrationsError as exc:
        outcome = exc.code
        raise
    finally:
        audit.use(
            owner=row.owner,
            uuid=row.uuid,
            provider=row.provider,
            outcome=outcome,
            detail={"method": method, "host": urlsplit(url).hostname, "status": status},
        )


def _signing(request: Request, plain: Mapping[str, Any]) -> Mapping[str, Any]:
    return request.credentials if request.credentials is not None else plain


class _Context:
    """What a scheme's auth flow may ask of the connection (see ``AuthContext``)."""

    __slots__ = ("_row", "_tokens", "credentials", "provider")

    def __init__(
        self, tokens: Refresher, row: StoredRow, provider: Provider, plain: Mapping[str, Any]
    ) -> None:
        self._tokens = tokens
        self._row = row
        self.provider = provider
        self.credentials = plain

    async def access_token(self) -> str:
        return await self._tokens.access_token(self._row, self.provider, self.credentials)

    async def renew(self, rejected: str) -> str:
        return await self._tokens.after_rejection(self._row, rejected)

    def rejected(self, response: Answer) -> bool:
        return self.provider.rejects(response.status, response.body)
