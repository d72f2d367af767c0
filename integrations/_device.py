"""Device authorization grant (RFC 8628): a code the user enters on another device, polled
until approved, then stored exactly as an authorization-code grant is."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from . import _telemetry as telemetry
from . import oauth
from ._authflow import VERIFIER_FIELD, AuthFlow, _scopes, denial_message, error_code
from ._core import Core
from ._errors import (
    AuthorizationDenied,
    AuthorizationTimeout,
    InvalidProviderKey,
    InvalidState,
    NotConfigured,
    OAuthError,
    TokenRequestFailed,
)
from ._events import ALL_OWNERS, OwnerScope
from ._models import DeviceAuthorization, utcnow
from ._providers import Provider
from ._record import StoredRow

__all__ = ["DEVICE_GRANT", "DeviceFlow"]

log = logging.getLogger("integrations.oauth")

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Pending device authorizations share the pending table; this marks them apart from
# redirect-based ones (no redirect URI is a URN).
_PENDING_MARK = DEVICE_GRANT
#: RFC 8628 §3.2: without an ``interval`` the client waits 5 s between polls; ``slow_down``
#: adds 5 s for good.
DEFAULT_INTERVAL = 5
SLOW_DOWN = 5
_LONGEST_CODE_LIFE = 24 * 3600


class DeviceFlow:
    """Starts device authorizations and polls them to the end."""

    def __init__(self, core: Core, authflow: AuthFlow) -> None:
        self._core = core
        self._authflow = authflow

    async def _device_row(
        self, uuid: str, owner: OwnerScope
    ) -> tuple[StoredRow, Provider, dict[str, Any]]:
        row = await self._core.repo.get(uuid)
        if row is None or (owner is not ALL_OWNERS and row.owner != owner):
            raise NotConfigured()
        provider = self._core.provider_of(row)
        if provider is None or not provider.scheme.authorizes_user:
            raise InvalidProviderKey(
                f"The connection's provider {row.provider!r} does not use OAuth with a user's "
                "grant, so there is nothing to authorize."
            )
        if not provider.device_authorization_url:
            raise InvalidProviderKey(
                f"Provider {provider.key!r} has no device_authorization_url: it does not offer "
                "the device flow; use begin_authorization with a redirect instead.",
                provider=provider.key,
            )
        plain = self._core.vault.unseal(row.uuid, row.data, provider.secret_field_keys)
        return row, provider, plain

    async def start(
        self,
        uuid: str,
        *,
        scopes: Sequence[str] | None,
        actor: str | None,
        owner: OwnerScope,
    ) -> DeviceAuthorization:
        """Ask the provider for a device code; keep it, sealed, for :meth:`complete`."""
        core = self._core
        row, provider, plain = await self._device_row(uuid, owner)
        requested = list(provider.scopes if scopes is None else _scopes(scopes) or [])
        endpoint = core.token_endpoint(provider)
        client = endpoint.client(plain)
        assert provider.device_authorization_url is not None
        url = provider.render_url(provider.device_authorization_url, plain)
        form = {"scope": provider.scope_separator.join(requested)} if requested else {}
        prepared = client.prepare(url, urlencode(form))
        timeout = core.settings.token.timeout
        try:
            response = await core.http.request(
                "POST",
                prepared[0],
                headers=prepared[1],
                data=prepared[2],
                max_attempts=1,
                timeout=timeout,
                allow_redirects=False,
            )
        except OAuthError:
            raise
        except Exception as exc:  # RequestFailed and the like: typed, named
            raise TokenRequestFailed(
                f"Could not reach the device authorization endpoint: {exc}", transient=True
            ) from exc
        answer = _answer(response.status, response.body, [client.client_secret])
        code = answer["device_code"]
        expires_in = answer["expires_in"]
        interval = answer["interval"]
        state_hash = oauth.hash_state(code)
        secret = json.dumps({"device_code": code, "interval": interval})
        sealed = core.vault.seal_value(state_hash, VERIFIER_FIELD, secret)
        await core.repo.insert_pending(
            state_hash, row.uuid, row.owner, _PENDING_MARK, requested, sealed, actor, expires_in
        )
        return DeviceAuthorization(
            user_code=answer["user_code"],
            verification_uri=answer["verification_uri"],
            verification_uri_complete=answer["verification_uri_complete"],
            expires_in=expires_in,
            interval=interval,
            expires_at=utcnow() + timedelta(seconds=expires_in),
        )

    async def complete(
        self,
        uuid: str,
        *,
        actor: str | None,
        owner: OwnerScope,
    ) -> StoredRow:
        """Poll until the user approves (the grant is stored as an authorization code's
        is), refuses (AuthorizationDenied, recorded) or the code expires
        (AuthorizationTimeout). Cancelled, it leaves the code pending for a later call."""
        core = self._core
        row, provider, plain = await self._device_row(uuid, owner)
        pending = await core.repo.take_latest_pending(row.uuid, _PENDING_MARK)
        if pending is None or not pending.live:
            raise InvalidState(
                "No device authorization is pending for this connection (none was started, "
                "it was completed, or it expired): call start_device_authorization first."
            )
        kept = json.loads(
            core.vault.unseal_value(pending.state_hash, VERIFIER_FIELD, pending.code_verifier)
        )
        code: str = kept["device_code"]
        interval: float = kept["interval"]
        endpoint = core.token_endpoint(provider)
        ends = pending.expires_at.timestamp() if pending.expires_at else time.time() + 600
        actor = actor or pending.actor
        done = False
        try:
            while True:
                wait = interval
                if time.time() + wait > ends + interval:
                    done = True
                    raise AuthorizationTimeout(
                        "The device code expired before the user approved it; start again."
                    )
                await asyncio.sleep(wait)
                request = endpoint.request(DEVICE_GRANT, plain, device_code=code)
                try:
                    tokens = await endpoint.post(
                        core.http,
                        request,
                        request_timeout=core.settings.token.timeout,
                        requested_scopes=pending.scopes,
                        previous_refresh_token=None,
                        redact=[plain.get("client_secret"), code],
                    )
                except OAuthError as exc:
                    error = exc.context.get("error")
                    if error == "authorization_pending":
                        continue
                    if error == "slow_down":
                        interval += SLOW_DOWN
                        continue
                    if isinstance(exc, TokenRequestFailed) and exc.context.get("transient"):
                        continue
                    done = True
                    if error == "access_denied":
                        message = denial_message(
                            "access_denied", exc.context.get("description") or None
                        )
                        await self._authflow.record_failure(row.uuid, message, actor)
                        raise AuthorizationDenied(message, error="access_denied") from None
                    if error == "expired_token":
                        raise AuthorizationTimeout(
                            "The device code expired before the user approved it; start again."
                        ) from None
                    raise
                done = True
                return await self._authflow.grant_issued(row, provider, plain, tokens, actor)
        finally:
            if not done:
                # Interrupted (a timeout of the caller's, a cancellation): the code is still
                # good until it expires, so a later call may go on polling it.
                left = max(1.0, ends - time.time())
                await asyncio.shield(
                    core.repo.insert_pending(
                        pending.state_hash,
                        row.uuid,
                        row.owner,
                        _PENDING_MARK,
                        list(pending.scopes),
                        pending.code_verifier,
                        pending.actor,
                        left,
                    )
                )
                log.debug(
                    "device authorization kept pending for %.0fs",
                    left,
                    extra=telemetry.fields("device_pending_kept", uuid=row.uuid),
                )


def _answer(status: int, body: bytes, redact: list[str | None]) -> dict[str, Any]:
    """The device authorization response, checked (RFC 8628 §3.2)."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        payload = None
    if not 200 <= status < 300 or not isinstance(payload, Mapping):
        error = error_code(str(payload.get("error"))) if isinstance(payload, Mapping) else None
        raise TokenRequestFailed(
            f"The device authorization endpoint answered HTTP {status}"
            + (f" with {error}" if error else ""),
            transient=status >= 500,
            status=status,
            error=error,
        )
    text = {k: payload.get(k) for k in ("device_code", "user_code")}
    # Some providers spell it verification_url (before the RFC settled).
    uri = payload.get("verification_uri") or payload.get("verification_url")
    if not all(isinstance(v, str) and v for v in (*text.values(), uri)):
        raise TokenRequestFailed(
            "The device authorization endpoint's answer lacks device_code, user_code or "
            "verification_uri",
            transient=False,
            status=status,
        )
    complete = payload.get("verification_uri_complete")
    return {
        "device_code": text["device_code"],
        "user_code": text["user_code"],
        "verification_uri": uri,
        "verification_uri_complete": complete if isinstance(complete, str) else None,
        "expires_in": _seconds(payload.get("expires_in"), 600, _LONGEST_CODE_LIFE),
        "interval": _seconds(payload.get("interval"), DEFAULT_INTERVAL, 300),
    }


def _seconds(value: Any, default: int, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return default
    try:
        number = float(value)
    except ValueError:
        return default
    if not math.isfinite(number) or number <= 0:
        return default
    return int(min(number, most))
