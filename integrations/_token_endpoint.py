"""The token endpoint client of a provider: its client authentication, requests and answers.

Built once per provider (``Core.token_endpoint``) and shared by the tokens service
(renewals) and the authorization flow (code exchange, revocation).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from . import _telemetry as telemetry
from . import oauth
from ._client_auth import PRIVATE_KEY_JWT, Client, client_auth_method
from ._errors import NotConfigured, RequestFailed, TokenRequestFailed
from ._http import HttpClient, retry_after_seconds
from ._models import utcnow
from ._providers import Provider
from ._schemes import TokenGrant
from ._settings import BUDGET_MARGIN, TokenPolicy
from ._tls import context_for

__all__ = ["TokenEndpoint", "TokenRequest"]

log = logging.getLogger("integrations.oauth")

#: A request to the endpoint: URL, headers, form body.
TokenRequest = tuple[str, dict[str, str], str]

#: Statuses whose Retry-After the token endpoint means: wait that long before asking again.
_RETRY_AFTER_STATUSES = frozenset({429, 503})


@dataclass(frozen=True, slots=True, eq=False)
class TokenEndpoint:
    """One provider's token endpoint, as a client: how the client authenticates, and its
    token and revocation URLs (templates filled from a connection's data)."""

    provider: Provider = field(repr=False)

    @property
    def key(self) -> str:
        return self.provider.key

    def client(self, plain: Mapping[str, Any]) -> Client:
        """The connection's client: its saved ``client_id`` and ``client_secret``, proved
        by the provider's ``token_auth`` (``none`` when no secret is saved)."""
        client_id = plain.get("client_id")
        if not isinstance(client_id, str) or not client_id:
            raise NotConfigured("The connection has no 'client_id' saved.", field="client_id")
        if self.provider.token_auth == PRIVATE_KEY_JWT:
            key = _text(plain.get("client_private_key"))
            if key is None:
                raise NotConfigured(
                    "The connection has no 'client_private_key' saved: private_key_jwt signs "
                    "with it.",
                    field="client_private_key",
                )
            method = client_auth_method(PRIVATE_KEY_JWT)
            audience = self.provider.client_assertion_audience
            return Client(
                client_id,
                None,
                method,
                private_key=key,
                key_id=_text(plain.get("client_key_id")),
                audience=None if audience is None else self.provider.render_url(audience, plain),
            )
        secret = _text(plain.get("client_secret"))
        return Client(client_id, secret, client_auth_method(self._method_name(secret)))

    def _method_name(self, secret: str | None) -> str:
        return str(self.provider.token_auth) if secret else "none"

    def request(
        self,
        grant_type: str,
        plain: Mapping[str, Any],
        *,
        token_url: str | None = None,
        client_auth: bool = True,
        **params: str | Sequence[str] | None,
    ) -> TokenRequest:
        """A token request for ``grant_type`` with ``params``, from the connection's client
        (none when ``client_auth`` is False: the grant proves who asks), to ``token_url``
        or the provider's."""
        if token_url is None:
            assert self.provider.token_url is not None
            token_url = self.provider.render_url(self.provider.token_url, plain)
        if not client_auth:
            return oauth.unauthenticated_token_request(grant_type, token_url=token_url, **params)
        body = oauth.grant_body(
            grant_type,
            token_url=token_url,
            params=params,
            scope_separator=self.provider.scope_separator,
        )
        return self.client(plain).prepare(token_url, body)

    def revoke_request(self, plain: Mapping[str, Any], token: str, hint: str) -> TokenRequest:
        """An RFC 7009 revocation of ``token`` (``hint`` says which kind it is)."""
        assert self.provider.revoke_url is not None
        url = self.provider.render_url(self.provider.revoke_url, plain)
        body = oauth.revoke_body(url, token=token, token_type_hint=hint)  # type: ignore[arg-type]
        return self.client(plain).prepare(url, body)

    async def post(
        self,
        http: HttpClient,
        request: TokenRequest,
        *,
        request_timeout: float,
        requested_scopes: Sequence[str],
        previous_refresh_token: str | None,
        redact: Sequence[str | None] = (),
        plain: Mapping[str, Any] | None = None,
    ) -> oauth.TokenSet:
        """One call, in its own span: ReauthRequired or TokenRequestFailed on failure.
        ``plain``: the connection's data, for its client certificate (mutual TLS)."""
        context = None if plain is None else context_for(self.provider, plain)
        with telemetry.token_span(self.key, request[0], request[2]):
            return await post_once(
                http,
                request,
                request_timeout=request_timeout,
                requested_scopes=requested_scopes,
                previous_refresh_token=previous_refresh_token,
                redact=redact,
                tls=context,
            )

    async def renew(
        self,
        http: HttpClient,
        grant: TokenGrant,
        plain: Mapping[str, Any],
        policy: TokenPolicy,
        *,
        on_sending: Callable[[], None],
        resend: Callable[[TokenRequestFailed, int], Awaitable[None]],
    ) -> oauth.TokenSet:
        """Renew with ``grant``: up to ``policy.attempts`` calls with backoff (and the
        server's Retry-After), all within ``policy.budget``, in one span.

        ``on_sending`` is told before the first call leaves. Before a transient failure is
        retried, ``resend(failure, attempt)`` may raise instead (the request may have
        spent the grant's refresh token).
        """
        request = self.request(
            grant.grant_type,
            plain,
            token_url=grant.token_url,
            client_auth=grant.client_auth,
            **grant.params,
        )
        secret = _text(plain.get("client_secret"))
        context = context_for(self.provider, plain)
        loop = asyncio.get_running_loop()
        delays = oauth.backoff_delays(policy.attempts - 1, policy.backoff, policy.backoff_cap)
        on_sending()
        started = loop.time()
        # Every attempt and wait must fit in the budget: it is the lock's idle timeout too.
        deadline = started + policy.budget - BUDGET_MARGIN
        # A provider's error text may echo any secret of the connection back.
        redact = [secret, *_secret_values(self.provider, plain)]
        with telemetry.token_span(self.key, request[0], request[2]):
            for attempt in range(1, policy.attempts + 1):
                try:
                    return await post_once(
                        http,
                        request,
                        request_timeout=policy.timeout,
                        requested_scopes=grant.requested_scopes,
                        previous_refresh_token=grant.spends,
                        redact=redact,
                        tls=context,
                    )
                except TokenRequestFailed as exc:
                    if not exc.transient:
                        raise
                    await resend(exc, attempt)
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
                        extra=telemetry.fields("token_request_retry", provider=self.key),
                    )
                    await asyncio.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _secret_values(provider: Provider, plain: Mapping[str, Any]) -> list[str]:
    """Every secret the connection holds, as text (for masking what a server echoes)."""
    secret = provider.secret_keys
    return [v for k, v in plain.items() if k in secret and isinstance(v, str) and v]


async def post_once(
    http: HttpClient,
    request: TokenRequest,
    *,
    request_timeout: float,
    requested_scopes: Sequence[str],
    previous_refresh_token: str | None,
    redact: Sequence[str | None],
    tls: ssl.SSLContext | None = None,
) -> oauth.TokenSet:
    """One token endpoint call, parsed: ReauthRequired or TokenRequestFailed on failure.
    ``tls``: the SSL context that presents the connection's client certificate."""
    url, headers, body = request
    options: dict[str, Any] = {} if tls is None else {"ssl": tls}
    try:
        response = await http.request(
            "POST",
            url,
            headers=headers,
            data=body,
            max_attempts=1,
            timeout=request_timeout,
            allow_redirects=False,
            **options,
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
