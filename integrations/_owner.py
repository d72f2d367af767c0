"""The owner handle: the connection API with one owner fixed, for request handlers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from ._events import Subscription
from ._http import Response
from ._models import Connection, Validation
from ._providers import Provider

if TYPE_CHECKING:
    from ._integrations import Integrations, Ref

__all__ = ["OwnerHandle"]


class OwnerHandle:
    """What one owner may do: ``integ.for_owner("user:42")``.

    Every method is the ``Integrations`` method of the same name with ``owner`` fixed.
    A connection of another owner is indistinguishable from a missing one (the same
    error code and message as a random uuid) and nothing is read, written, revoked or
    emitted for it. Connections created through the handle belong to its owner.
    """

    __slots__ = ("_integ", "owner")

    def __init__(self, integ: Integrations, owner: str | None) -> None:
        self._integ = integ
        self.owner = owner

    def __repr__(self) -> str:
        return f"<OwnerHandle owner={self.owner!r}>"

    async def add_connection(
        self, provider: str, name: str, *, actor: str | None = None
    ) -> Connection:
        return await self._integ.add_connection(provider, name, actor=actor, owner=self.owner)

    async def rename_connection(
        self, uuid: str, new_name: str, *, actor: str | None = None
    ) -> dict[str, Any]:
        return await self._integ.rename_connection(uuid, new_name, actor=actor, owner=self.owner)

    async def remove_connection(self, uuid: str, *, actor: str | None = None) -> None:
        await self._integ.remove_connection(uuid, actor=actor, owner=self.owner)

    async def list_connections(self, provider: str) -> list[Connection]:
        return await self._integ.list_connections(provider, owner=self.owner)

    async def load_all_connections(self, providers: Iterable[str]) -> dict[str, list[Connection]]:
        return await self._integ.load_all_connections(providers, owner=self.owner)

    async def list_integrations(self) -> list[Connection]:
        return await self._integ.list_integrations(owner=self.owner)

    def list_providers(self) -> list[Provider]:
        return self._integ.list_providers()

    async def get_integration(self, ref: Ref) -> dict[str, Any]:
        return await self._integ.get_integration(ref, owner=self.owner)

    async def get_integration_by_uuid(self, uuid: str) -> Connection:
        return await self._integ.get_integration_by_uuid(uuid, owner=self.owner)

    async def find_uuid_by_provider_name(self, ref: Ref) -> str:
        return await self._integ.find_uuid_by_provider_name(ref, owner=self.owner)

    async def resolve_to_uuid(self, value: Ref) -> str:
        return await self._integ.resolve_to_uuid(value, owner=self.owner)

    async def get_credentials(self, ref: Ref) -> dict[str, Any]:
        return await self._integ.get_credentials(ref, owner=self.owner)

    async def is_connected(self, uuid: str) -> bool:
        return await self._integ.is_connected(uuid, owner=self.owner)

    async def save_setup(
        self, uuid: str, attrs: Mapping[str, Any], *, actor: str | None = None
    ) -> dict[str, Any]:
        return await self._integ.save_setup(uuid, attrs, actor=actor, owner=self.owner)

    async def import_tokens(
        self, uuid: str, tokens: Mapping[str, Any], *, actor: str | None = None
    ) -> Connection:
        return await self._integ.import_tokens(uuid, tokens, actor=actor, owner=self.owner)

    async def disconnect(self, uuid: str, *, actor: str | None = None) -> None:
        await self._integ.disconnect(uuid, actor=actor, owner=self.owner)

    async def record_validation(self, uuid: str, result: Any) -> None:
        await self._integ.record_validation(uuid, result, owner=self.owner)

    async def validate_credentials(self, provider: str, attrs: Mapping[str, Any]) -> Validation:
        return await self._integ.validate_credentials(provider, attrs)

    async def validate_connection(self, uuid: str, *, actor: str | None = None) -> Validation:
        return await self._integ.validate_connection(uuid, actor=actor, owner=self.owner)

    async def authenticated_request(
        self,
        uuid: Ref,
        method: str,
        url: str,
        *,
        allow_any_host: bool = False,
        max_attempts: int | None = None,
        **opts: Any,
    ) -> Response:
        return await self._integ.authenticated_request(
            uuid,
            method,
            url,
            allow_any_host=allow_any_host,
            max_attempts=max_attempts,
            owner=self.owner,
            **opts,
        )

    async def access_token(self, uuid: str) -> str:
        return await self._integ.access_token(uuid, owner=self.owner)

    async def refresh_access_token(self, uuid: str) -> str:
        return await self._integ.refresh_access_token(uuid, owner=self.owner)

    async def begin_authorization(
        self,
        uuid: str,
        redirect_uri: str,
        *,
        scopes: Sequence[str] | None = None,
        actor: str | None = None,
    ) -> tuple[str, str]:
        return await self._integ.begin_authorization(
            uuid, redirect_uri, scopes=scopes, actor=actor, owner=self.owner
        )

    async def complete_authorization(
        self,
        state: str,
        *,
        code: str | None = None,
        error: str | None = None,
        error_description: str | None = None,
    ) -> Connection:
        return await self._integ.complete_authorization(
            state, code=code, error=error, error_description=error_description, owner=self.owner
        )

    async def authorization_url(
        self,
        uuid: str,
        redirect_uri: str,
        *,
        scopes: Sequence[str] | None = None,
        state: str | None = None,
    ) -> str:
        return await self._integ.authorization_url(
            uuid, redirect_uri, scopes=scopes, state=state, owner=self.owner
        )

    async def exchange_code(
        self, uuid: str, code: str, redirect_uri: str, *, actor: str | None = None
    ) -> dict[str, Any]:
        return await self._integ.exchange_code(
            uuid, code, redirect_uri, actor=actor, owner=self.owner
        )

    async def connect_interactive(
        self,
        uuid: str,
        *,
        scopes: Sequence[str] | None = None,
        open_browser: bool = False,
        timeout: float = 300.0,  # noqa: ASYNC109 - passed on
        port: int = 0,
    ) -> Connection:
        return await self._integ.connect_interactive(
            uuid,
            scopes=scopes,
            open_browser=open_browser,
            timeout=timeout,
            port=port,
            owner=self.owner,
        )

    def subscribe(
        self,
        *,
        provider: str | None = None,
        uuid: str | None = None,
        kinds: Iterable[str] | None = None,
        maxsize: int = 1000,
    ) -> AbstractAsyncContextManager[Subscription]:
        # The exact scope: the facade reads a uuid with no owner as "whoever owns it".
        return self._integ._subscribe(provider, uuid, self.owner, kinds, maxsize)
