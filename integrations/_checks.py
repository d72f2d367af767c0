"""Checks service: probe stored or in-memory credentials and record the outcome."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from . import _names as names
from . import _telemetry as telemetry
from ._connections import Connections, check_scope
from ._core import Core
from ._errors import IntegrationsError, InvalidAttrs
from ._events import OwnerScope
from ._models import Validation
from ._probes import CONNECTED, check_credentials
from ._providers import Provider
from ._record import StoredRow
from ._schemes import TokenScheme
from ._tokens import Refresher

__all__ = ["Checks"]

log = logging.getLogger("integrations")


NOT_CONNECTED_YET = (
    "Not connected yet: there is no token to check; connect it first (nothing was recorded)"
)


def unregistered_message(provider: str) -> str:
    return (
        f"Provider {provider!r} is not registered in this process, so its connection was not "
        "checked and nothing was recorded; register the provider where the check runs"
    )


class Checks:
    """Checks service: probe stored or in-memory credentials and record the outcome."""

    def __init__(self, core: Core, tokens: Refresher, connections: Connections) -> None:
        self._core = core
        self._tokens = tokens
        self._connections = connections

    async def check(self, provider: Provider, credentials: Mapping[str, Any]) -> Validation:
        return await check_credentials(
            provider, credentials, http=self._core.http, timeout=self._core.settings.check_timeout
        )

    async def validate_credentials(self, provider: str, attrs: Mapping[str, Any]) -> Validation:
        """Probe the provider with in-memory credentials; nothing is stored."""
        definition = self._core.providers.get(provider)
        if not isinstance(attrs, Mapping):
            raise InvalidAttrs(
                f"attrs must be a mapping of setup fields, got {type(attrs).__name__}."
            )
        limit = self._core.settings.max_attrs_bytes
        return await self.check(definition, definition.normalize_attrs(attrs, max_bytes=limit))

    async def probe(self, row: StoredRow) -> Validation:
        """Check a stored connection without recording anything (tokens may be renewed)."""
        return (await self._probe_recordable(row))[0]

    async def _probe_recordable(self, row: StoredRow) -> tuple[Validation, bool]:
        """The check's outcome, and whether it says anything about the connection itself.
        An outcome caused by this process (a provider it does not know) or by a connection
        that was never connected (nothing to check yet) is reported, never recorded: it
        would overwrite, for everyone, what the connection's status truly is."""
        provider = self._core.provider_of(row)
        if provider is None:
            return Validation(False, unregistered_message(row.provider)), False
        scheme = provider.scheme
        if isinstance(scheme, TokenScheme) and scheme.not_connected(self._core.plain(row)):
            return Validation(False, NOT_CONNECTED_YET), False
        with telemetry.check_span(row) as outcome:
            result = await self._probe(row)
            outcome.ok = result.ok
        log.debug(
            "check of connection %s: %s",
            row.uuid,
            "ok" if result.ok else "failed",
            extra=telemetry.fields(
                "check_finished", uuid=row.uuid, provider=row.provider, owner=row.owner
            ),
        )
        return result, True

    async def _probe(self, row: StoredRow) -> Validation:
        provider = self._core.provider_of(row)
        if provider is None:
            return Validation(False, f"Unknown provider {row.provider!r}")
        credentials = self._core.plain(row)
        scheme = provider.scheme
        if isinstance(scheme, TokenScheme) and scheme.renew_before_check(credentials):
            # An expiring token would make a healthy connection look broken: renew first.
            try:
                if scheme.renewal_is_check:
                    # A fresh token is what proves the client credentials still work.
                    token = await self._tokens.refresh(row, provider)
                else:
                    token = await self._tokens.access_token(row, provider)
            except IntegrationsError as exc:
                return Validation(False, exc.message)
            credentials["access_token"] = token
            if scheme.renewal_is_check and provider.validation is None:
                # Getting a token with the client credentials was the check.
                return Validation(True, CONNECTED)
        return await self.check(provider, credentials)

    async def validate_connection(
        self, uuid: object, *, actor: str | None, owner: OwnerScope
    ) -> Validation:
        """Probe the stored credentials and record the outcome on the connection."""
        uuid = names.require_uuid(uuid)
        actor = names.check_actor(actor)
        row = await self._connections.row(uuid, check_scope(owner))
        if row is None:
            return Validation(False, "Not configured")
        checked = self._connections.fingerprint(row)
        result, recordable = await self._probe_recordable(row)
        if not recordable:
            return result
        await self._connections.record(
            uuid, result.ok, result.message, actor=actor, checked=checked
        )
        return result
