"""Authorization service: pending states with PKCE, code exchange, userinfo, revocation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from yarl import URL

from . import _record as record
from . import _telemetry as telemetry
from . import oauth
from ._core import Core
from ._errors import (
    AuthorizationDenied,
    CryptoError,
    Deleted,
    IntegrationsError,
    InvalidInput,
    InvalidProviderKey,
    InvalidState,
    NotConfigured,
    TokenRequestFailed,
)
from ._events import ALL_OWNERS, OwnerScope
from ._input import check_text, scrub_text
from ._models import utcnow
from ._names import shown
from ._providers import Provider
from ._record import Change, StoredRow
from ._repository import PendingAuthorization
from ._rotation import PKCE_FIELD
from ._schemes import oauth1
from ._tls import context_for

__all__ = ["VERIFIER_FIELD", "AuthFlow", "denial_message", "error_code"]

log = logging.getLogger("integrations.oauth")

# The pending verifier is sealed with the state hash as its row id, under the field name
# that key rotation reseals.
VERIFIER_FIELD = PKCE_FIELD
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")


class AuthFlow:
    """Begins and completes authorizations, stores the tokens, revokes on disconnect."""

    def __init__(
        self,
        core: Core,
        *,
        record_failure: Callable[[str, str, str | None], Awaitable[None]],
    ) -> None:
        self._core = core
        self.record_failure = record_failure
        self.ttl = core.settings.authorization_ttl
        self._token_timeout = core.settings.token.timeout
        self._revoke_timeout = core.settings.revoke_timeout
        self._revocations: set[asyncio.Task[None]] = set()
        self._operations = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def operation(self) -> Iterator[None]:
        """Mark a change that may revoke a grant as in flight: ``close()`` waits for it.

        Entered right after the open check, with no await in between, so that every
        operation the facade let in is counted before ``close()`` looks.
        """
        self._operations += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._operations -= 1
            if not self._operations:
                self._idle.set()

    # -- begin ----------------------------------------------------------------------------

    async def _oauth_row(
        self, uuid: str, owner: OwnerScope
    ) -> tuple[StoredRow, Provider, dict[str, Any]]:
        row = await self._core.repo.get(uuid)
        if row is None or (owner is not ALL_OWNERS and row.owner != owner):
            raise NotConfigured()
        provider = self._core.provider_of(row)
        if provider is None or not provider.scheme.authorizes_user or not provider.authorize_url:
            raise InvalidProviderKey(
                f"The connection's provider {row.provider!r} does not use the OAuth "
                "authorization-code flow, so there is nothing to authorize: an API-key or "
                "token connection takes its credentials through save_setup."
            )
        plain = self._core.vault.unseal(row.uuid, row.data, provider.secret_field_keys)
        if provider.scheme.uses_request_token:
            # OAuth 1.0a signs with the consumer's credentials: checked when signing.
            return row, provider, plain
        if not isinstance(plain.get("client_id"), str) or not plain["client_id"]:
            raise NotConfigured(
                "The connection has no 'client_id' saved; call save_setup first.",
                field="client_id",
            )
        return row, provider, plain

    async def begin(
        self,
        uuid: str,
        redirect_uri: str,
        *,
        scopes: Sequence[str] | None,
        actor: str | None,
        state: str | None = None,
        owner: OwnerScope = ALL_OWNERS,
    ) -> tuple[str, str]:
        """The authorization URL and its state; a pending authorization is stored for it."""
        if not isinstance(redirect_uri, str) or not redirect_uri:
            raise InvalidInput(
                f"redirect_uri must be an absolute http(s) URL such as "
                f"'https://app.example/oauth/callback', not {shown(redirect_uri)}."
            )
        check_text(redirect_uri, "redirect_uri")
        wanted = _scopes(scopes)
        if state is not None and (not isinstance(state, str) or not state):
            raise InvalidInput("state must be a non-empty string")
        if state is not None:
            check_text(state, "state")
        row, provider, plain = await self._oauth_row(uuid, owner)
        if provider.scheme.uses_request_token:
            return await self._begin_oauth1(row, provider, plain, redirect_uri, actor)
        requested = list(provider.scopes if wanted is None else wanted)
        state = state or oauth.generate_state()
        verifier = oauth.generate_code_verifier() if provider.pkce else None
        assert provider.authorize_url is not None
        url = oauth.authorization_url(
            provider.render_url(provider.authorize_url, plain),
            client_id=plain["client_id"],
            redirect_uri=redirect_uri,
            scopes=requested,
            scope_separator=provider.scope_separator,
            state=state,
            code_challenge=None if verifier is None else oauth.code_challenge(verifier),
            extra_params=provider.authorize_params,
        )
        state_hash = oauth.hash_state(state)
        sealed = (
            None
            if verifier is None
            else self._core.vault.seal_value(state_hash, VERIFIER_FIELD, verifier)
        )
        repo = self._core.repo
        # Opportunistic cleanup: every begin sweeps what expired (an indexed delete).
        await repo.delete_expired_pending()
        stored = await repo.insert_pending(
            state_hash, row.uuid, row.owner, redirect_uri, requested, sealed, actor, self.ttl
        )
        if not stored:
            raise InvalidState("This state is already pending; use a fresh one.")
        return url, state

    async def _begin_oauth1(
        self,
        row: StoredRow,
        provider: Provider,
        plain: Mapping[str, Any],
        redirect_uri: str,
        actor: str | None,
    ) -> tuple[str, str]:
        """OAuth 1.0a: temporary credentials first (RFC 5849 §2.1); their token is the
        state, their secret is sealed in the pending authorization."""
        assert provider.request_token_url is not None and provider.authorize_url is not None
        values = provider.template_values(plain)
        url = provider.render_url(provider.request_token_url, plain)
        headers = oauth1.signed_headers(values, "POST", url, None, callback=redirect_uri)
        answer = await self._credentials_request(provider, plain, url, headers, "request_token_url")
        if answer.get("oauth_callback_confirmed") != "true":
            raise TokenRequestFailed(
                "The provider's temporary credentials do not confirm the callback "
                "(oauth_callback_confirmed); it does not speak OAuth 1.0a.",
                provider=provider.key,
            )
        state = answer["oauth_token"]
        check_text(state, "oauth_token")
        authorize = URL(provider.render_url(provider.authorize_url, plain)).update_query(
            oauth_token=state
        )
        state_hash = oauth.hash_state(state)
        sealed = self._core.vault.seal_value(
            state_hash, VERIFIER_FIELD, answer["oauth_token_secret"]
        )
        repo = self._core.repo
        await repo.delete_expired_pending()
        stored = await repo.insert_pending(
            state_hash, row.uuid, row.owner, redirect_uri, [], sealed, actor, self.ttl
        )
        if not stored:
            raise InvalidState("This state is already pending; use a fresh one.")
        return str(authorize), state

    async def _credentials_request(
        self,
        provider: Provider,
        plain: Mapping[str, Any],
        url: str,
        headers: Mapping[str, str],
        name: str,
    ) -> dict[str, str]:
        """POST to an OAuth 1.0a credentials endpoint; its form-encoded answer."""
        context = context_for(provider, plain)
        response = await self._core.http.request(
            "POST",
            url,
            headers=dict(headers),
            timeout=self._token_timeout,
            max_attempts=1,
            allow_redirects=False,
            ssl=True if context is None else context,
        )
        answer = oauth1.parse_credentials(response.body) if response.ok else None
        if answer is None:
            raise TokenRequestFailed(
                f"The provider's {name} answered HTTP {response.status} without OAuth 1.0a "
                "credentials.",
                transient=response.status >= 500 or response.status == 429,
                provider=provider.key,
                status=response.status,
            )
        return answer

    async def discard(self, state: str) -> None:
        """Drop a pending authorization that will never complete."""
        await self._core.repo.take_pending(oauth.hash_state(state))

    # -- complete -------------------------------------------------------------------------

    async def complete(
        self,
        state: str,
        *,
        code: str | None,
        error: str | None,
        error_description: str | None,
        owner: OwnerScope = ALL_OWNERS,
    ) -> StoredRow:
        """Consume the state once, then record a refusal or exchange the code."""
        if not isinstance(state, str) or not state:
            raise InvalidState()
        if code is not None and not isinstance(code, str):
            raise InvalidInput("code must be a string")
        if error is not None and not isinstance(error, str):
            raise InvalidInput("error must be a string")
        if not code and not error:
            raise InvalidInput(
                "The callback carries neither a code nor an error: pass the code= (or error=) "
                "query parameter the provider sent to the redirect URI."
            )
        for name, value in (("state", state), ("code", code), ("error", error)):
            if value is not None:
                check_text(value, name)
        with self.operation():
            return await self._complete(state, code, error, error_description, owner)

    async def _complete(
        self,
        state: str,
        code: str | None,
        error: str | None,
        error_description: str | None,
        owner: OwnerScope,
    ) -> StoredRow:
        scoped = owner is not ALL_OWNERS
        pending = await self._core.repo.take_pending(
            oauth.hash_state(state),
            owner=owner if isinstance(owner, str) else None,
            any_owner=not scoped,
        )
        if pending is None or not pending.live:
            raise InvalidState()
        row = await self._core.repo.get(pending.connection_uuid)
        if row is None or row.owner != pending.owner:
            raise InvalidState()
        if error:
            message = denial_message(error, error_description)
            await self.record_failure(row.uuid, message, pending.actor)
            raise AuthorizationDenied(message, error=error_code(error))
        assert code is not None
        provider = self._core.provider_of(row)
        if provider is not None and provider.scheme.uses_request_token:
            return await self._exchange_oauth1(row, provider, pending, state, code)
        return await self._exchange(row, pending, code, pending.redirect_uri, pending.actor)

    async def _exchange_oauth1(
        self,
        row: StoredRow,
        provider: Provider,
        pending: PendingAuthorization,
        temporary: str,
        verifier: str,
    ) -> StoredRow:
        """OAuth 1.0a: the verifier and temporary credentials exchanged for the token
        and token secret (RFC 5849 §2.3), stored sealed."""
        core = self._core
        if provider.token_url is None or pending.code_verifier is None:
            raise InvalidState()
        plain = core.vault.unseal(row.uuid, row.data, provider.secret_field_keys)
        temporary_secret = core.vault.unseal_value(
            pending.state_hash, VERIFIER_FIELD, pending.code_verifier
        )
        url = provider.render_url(provider.token_url, plain)
        headers = oauth1.signed_headers(
            provider.template_values(plain),
            "POST",
            url,
            None,
            token=temporary,
            token_secret=temporary_secret,
            verifier=verifier,
        )
        answer = await self._credentials_request(provider, plain, url, headers, "token_url")
        tokens = oauth.TokenSet(
            access_token=answer["oauth_token"], token_type="OAuth", obtained_at=utcnow()
        )
        secret = answer["oauth_token_secret"]
        now = utcnow()

        def decide(current: StoredRow | None) -> tuple[Change, StoredRow]:
            if current is None:
                raise Deleted()
            seal = partial(core.vault.seal_value, current.uuid)
            data = {**current.data, "token_secret": seal("token_secret", secret)}
            issued = record.tokens_issued(
                replace(current, data=data),
                tokens,
                seal=seal,
                account=None,
                now=now,
                actor=pending.actor,
            )
            return issued.change, issued.row

        return await core.repo.modify(row.uuid, decide)

    async def exchange(
        self,
        uuid: str,
        code: str,
        redirect_uri: str,
        actor: str | None,
        owner: OwnerScope = ALL_OWNERS,
    ) -> StoredRow:
        """The seed's exchange: the newest pending authorization supplies the PKCE verifier."""
        if not isinstance(code, str) or not code:
            raise InvalidInput("code must be a non-empty string")
        if not isinstance(redirect_uri, str) or not redirect_uri:
            raise InvalidInput(
                f"redirect_uri must be an absolute http(s) URL such as "
                f"'https://app.example/oauth/callback', not {shown(redirect_uri)}."
            )
        check_text(code, "code")
        check_text(redirect_uri, "redirect_uri")
        with self.operation():
            row, provider, _ = await self._oauth_row(uuid, owner)
            if provider.scheme.uses_request_token:
                raise InvalidProviderKey(
                    "An OAuth 1.0a connection completes with "
                    "complete_authorization(oauth_token, code=oauth_verifier): the exchange "
                    "needs the temporary token the callback carries."
                )
            pending = await self._core.repo.take_latest_pending(row.uuid, redirect_uri)
            return await self._exchange(
                row, pending, code, redirect_uri, actor or (pending.actor if pending else None)
            )

    async def _exchange(
        self,
        row: StoredRow,
        pending: PendingAuthorization | None,
        code: str,
        redirect_uri: str,
        actor: str | None,
    ) -> StoredRow:
        core = self._core
        provider = core.provider_of(row)
        if provider is None or provider.token_url is None:
            raise InvalidProviderKey("the connection's provider is not registered")
        plain = core.vault.unseal(row.uuid, row.data, provider.secret_field_keys)
        endpoint = core.token_endpoint(provider)
        client = endpoint.client(plain)
        verifier = None
        if pending is not None and pending.code_verifier is not None:
            verifier = core.vault.unseal_value(
                pending.state_hash, VERIFIER_FIELD, pending.code_verifier
            )
        requested = list(pending.scopes) if pending is not None else list(provider.scopes)
        request = endpoint.request(
            "authorization_code",
            plain,
            code=code,
            redirect_uri=redirect_uri,
            code_verifier=verifier,
        )
        # One attempt: a code is single-use, so a retry after a lost answer would fail anyway.
        tokens = await endpoint.post(
            core.http,
            request,
            request_timeout=self._token_timeout,
            requested_scopes=requested,
            previous_refresh_token=None,
            redact=[client.client_secret, code, verifier],
            plain=plain,
        )
        return await self.grant_issued(row, provider, plain, tokens, actor)

    async def grant_issued(
        self,
        row: StoredRow,
        provider: Provider,
        plain: Mapping[str, Any],
        tokens: oauth.TokenSet,
        actor: str | None,
    ) -> StoredRow:
        """Store a grant a user just gave (a code exchanged, a device code approved): the
        account from userinfo, the tokens, status events; revoked if the row is gone."""
        account = await self._userinfo(provider, plain, tokens)
        try:
            return await self._store(row.uuid, tokens, account, actor)
        except Deleted:
            # Removed during the exchange: the grant just issued is nobody's, so end it.
            issued = {
                **plain,
                "access_token": tokens.access_token,
                "refresh_token": tokens.refresh_token,
            }
            self._revoke_plain(provider, row.uuid, issued)
            raise

    async def _userinfo(
        self, provider: Provider, plain: Mapping[str, Any], tokens: oauth.TokenSet
    ) -> dict[str, Any] | None:
        if provider.userinfo_url is None:
            return None
        try:
            url = provider.render_url(provider.userinfo_url, plain)
            # The provider's own declared URL, not caller input; Bearer is what userinfo takes.
            response = await self._core.http.request(
                "GET",
                url,
                headers={
                    "Authorization": f"Bearer {tokens.access_token}",
                    "Accept": "application/json",
                },
                timeout=self._token_timeout,
                max_attempts=2,
            )
            if not response.ok:
                log.info(
                    "userinfo answered HTTP %d; no account details stored",
                    response.status,
                    extra=telemetry.fields("userinfo_failed", provider=provider.key),
                )
                return None
            info = response.json()
        except (IntegrationsError, ValueError) as exc:
            log.info(
                "userinfo failed (%s); no account details stored",
                type(exc).__name__,
                extra=telemetry.fields("userinfo_failed", provider=provider.key),
            )
            return None
        if not isinstance(info, Mapping):
            return None
        account = provider.map_userinfo(info)
        return account

    async def _store(
        self,
        uuid: str,
        tokens: oauth.TokenSet,
        account: dict[str, Any] | None,
        actor: str | None,
    ) -> StoredRow:
        core = self._core
        now = utcnow()

        def decide(row: StoredRow | None) -> tuple[Change, StoredRow]:
            if row is None:
                raise Deleted()
            issued = record.tokens_issued(
                row,
                tokens,
                seal=partial(core.vault.seal_value, row.uuid),
                account=account,
                now=now,
                actor=actor,
            )
            return issued.change, issued.row

        stored = await core.repo.modify(uuid, decide)
        await core.audit.record(
            "token.issued",
            actor=actor,
            owner=stored.owner,
            uuid=stored.uuid,
            provider=stored.provider,
        )
        return stored

    # -- revocation -----------------------------------------------------------------------

    def revoke_later(self, provider: Provider | None, row: StoredRow | None) -> None:
        """Revoke the row's grant (RFC 7009) in the background; best-effort, never raises."""
        if provider is None or row is None or provider.revoke_url is None:
            return
        if not provider.is_oauth:
            return
        try:
            plain = self._core.vault.unseal(row.uuid, row.data, provider.secret_field_keys)
        except CryptoError:
            log.info(
                "connection %s: tokens unreadable, nothing revoked",
                row.uuid,
                extra=telemetry.fields(
                    "revoke_skipped", uuid=row.uuid, provider=row.provider, owner=row.owner
                ),
            )
            return
        self._revoke_plain(provider, row.uuid, plain)

    def _revoke_plain(self, provider: Provider, uuid: str, plain: Mapping[str, Any]) -> None:
        if provider.revoke_url is None:
            return
        token = plain.get("refresh_token")
        hint = "refresh_token"
        if not isinstance(token, str) or not token:
            token, hint = plain.get("access_token"), "access_token"
        client_id = plain.get("client_id")
        if not isinstance(token, str) or not token or not isinstance(client_id, str):
            return
        try:
            request = self._core.token_endpoint(provider).revoke_request(plain, token, hint)
        except (IntegrationsError, ValueError) as exc:
            log.info(
                "connection %s: revocation not possible (%s)",
                uuid,
                type(exc).__name__,
                extra=telemetry.fields("revoke_skipped", uuid=uuid, provider=provider.key),
            )
            return
        task = asyncio.get_running_loop().create_task(
            self._revoke(uuid, request, provider.key), name=f"integrations-revoke-{uuid}"
        )
        self._revocations.add(task)
        task.add_done_callback(self._revocations.discard)

    async def _revoke(
        self, uuid: str, request: tuple[str, dict[str, str], str], provider: str
    ) -> None:
        url, headers, body = request
        extra = telemetry.fields("revoke_failed", uuid=uuid, provider=provider)
        try:
            async with asyncio.timeout(self._revoke_timeout):
                response = await self._core.http.request(
                    "POST",
                    url,
                    headers=headers,
                    data=body,
                    max_attempts=1,
                    timeout=self._revoke_timeout,
                    allow_redirects=False,
                )
        except (IntegrationsError, TimeoutError) as exc:
            log.info("connection %s: revocation failed (%s)", uuid, type(exc).__name__, extra=extra)
            return
        if response.ok:
            log.debug(
                "connection %s: grant revoked",
                uuid,
                extra={**extra, "integrations_event_kind": "revoked"},
            )
        else:
            log.info(
                "connection %s: revocation answered HTTP %d", uuid, response.status, extra=extra
            )

    async def close(self) -> None:
        """Let operations in flight finish (they may still revoke), then give revocations
        their short timeout and drop them."""
        await self._idle.wait()
        tasks = list(self._revocations)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self._revoke_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def callback_parameters(query: Mapping[str, str]) -> dict[str, str | None]:
    """The state, code and error of an authorization callback's query: OAuth 2.0's
    ``state`` and ``code``, or OAuth 1.0a's ``oauth_token`` and ``oauth_verifier`` (and
    ``denied``, which some providers send with the temporary token when the user refuses)."""
    state = query.get("state") or query.get("oauth_token")
    error = query.get("error")
    if not state and query.get("denied"):
        state, error = query.get("denied"), error or "access_denied"
    return {
        "state": state or None,
        "code": query.get("code") or query.get("oauth_verifier"),
        "error": error,
        "error_description": query.get("error_description"),
    }


def _scopes(scopes: Sequence[str] | None) -> list[str] | None:
    if scopes is None:
        return None
    if isinstance(scopes, str | bytes) or not isinstance(scopes, Sequence):
        raise InvalidInput(
            f"scopes must be a list of strings such as ['openid', 'email'], not {shown(scopes)}."
        )
    if not all(isinstance(s, str) and s and not any(c.isspace() for c in s) for s in scopes):
        raise InvalidInput(
            f"Each scope must be a non-empty string without spaces; got {shown(list(scopes))}: "
            "pass ['a', 'b'] rather than ['a b']."
        )
    return [check_text(s, "scope") for s in scopes]


def error_code(error: str) -> str:
    return oauth.error_code(error) or "unknown_error"


def denial_message(error: str, description: str | None) -> str:
    text = f"Authorization refused by the provider ({error_code(error)}"
    if isinstance(description, str) and description.strip():
        clean = scrub_text(_CONTROL_RE.sub(" ", description)).strip()[:200]
        text += f": {clean}"
    return text + ")"
