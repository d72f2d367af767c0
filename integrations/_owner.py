"""The owner handle: the connection API with one owner fixed, for request handlers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from ._errors import InvalidArgument
from ._events import Subscription
from ._http import Response
from ._models import Connection, ConnectionList, Page, Validation
from ._providers import Provider
from ._services import Services

__all__ = ["OwnerHandle", "Ref"]

#: A connection reference: its uuid, ``"provider:name"``, bare ``"provider"`` (its
#: default connection) or a ``("provider", "name")`` pair.
Ref = str | tuple[str, str]


class OwnerHandle:
    """What one owner may do: ``integ.for_owner("user:42")``.

    Every method is the ``Integrations`` method of the same name with ``owner`` fixed.
    A connection of another owner is indistinguishable from a missing one (the same
    error code and message as a random uuid) and nothing is read, written, revoked or
    emitted for it. Connections created through the handle belong to its owner.
    """

    __slots__ = ("_services", "owner")

    def __init__(self, services: Callable[[], Services], owner: str | None) -> None:
        # Called on every use: it raises LifecycleError once the Integrations is closed.
        self._services = services
        self.owner = owner

    def __repr__(self) -> str:
        return f"<OwnerHandle owner={self.owner!r}>"

    async def add_connection(
        self, provider: str, name: str, *, actor: str | None = None, uuid: str | None = None
    ) -> Connection:
        if uuid is not None:
            # A chosen uuid would tell whether another owner's connection has it: the
            # handle picks every uuid itself, and refuses any given one the same way.
            raise InvalidArgument(
                "An owner handle picks the uuid of a new connection itself: call "
                "add_connection without uuid= (a kept uuid is for imports, through "
                "Integrations.add_connection(..., owner=..., uuid=...)).",
                field="uuid",
            )
        return await self._services().connections.add(provider, name, actor=actor, owner=self.owner)

    async def rename_connection(
        self, uuid: str, new_name: str, *, actor: str | None = None
    ) -> dict[str, Any]:
        return await self._services().connections.rename(
            uuid, new_name, actor=actor, owner=self.owner
        )

    async def remove_connection(self, uuid: str, *, actor: str | None = None) -> None:
        await self._services().connections.remove(uuid, actor=actor, owner=self.owner)

    async def list_connections(self, provider: str) -> list[Connection]:
        return (await self._services().connections.load_all([provider], self.owner))[provider]

    async def load_all_connections(self, providers: Iterable[str]) -> dict[str, list[Connection]]:
        return await self._services().connections.load_all(providers, self.owner)

    async def list_integrations(
        self, *, limit: int | None = None, after: str | None = None
    ) -> ConnectionList:
        return await self._services().connections.list_integrations(
            self.owner, limit=limit, after=after
        )

    async def list_page(
        self,
        *,
        provider: str | None = None,
        limit: int = 50,
        after: str | None = None,
        status: str | None = None,
        search: str | None = None,
    ) -> Page:
        return await self._services().connections.page(
            owner=self.owner,
            provider=provider,
            limit=limit,
            after=after,
            status=status,
            search=search,
        )

    async def count_connections(self) -> dict[str, int]:
        return await self._services().connections.counts(self.owner)

    def list_providers(self) -> list[Provider]:
        return self._services().core.providers.all()

    async def get_integration(self, ref: Ref, *, fresh: bool = False) -> dict[str, Any]:
        return await self._services().connections.get_integration(ref, self.owner, fresh=fresh)

    async def get_integration_by_uuid(self, uuid: str, *, fresh: bool = False) -> Connection:
        return await self._services().connections.get_integration_by_uuid(
            uuid, self.owner, fresh=fresh
        )

    async def find_uuid_by_provider_name(self, ref: Ref) -> str:
        return await self._services().connections.find_uuid(ref, self.owner)

    async def resolve_to_uuid(self, value: Ref) -> str:
        return await self._services().connections.resolve(value, self.owner)

    async def get_credentials(self, ref: Ref, *, fresh: bool = False) -> dict[str, Any]:
        return await self._services().connections.get_credentials(ref, self.owner, fresh=fresh)

    async def is_connected(self, uuid: str, *, fresh: bool = False) -> bool:
        return await self._services().connections.is_connected(uuid, self.owner, fresh=fresh)

    async def save_setup(
        self, uuid: str, attrs: Mapping[str, Any], *, actor: str | None = None
    ) -> dict[str, Any]:
        return await self._services().connections.save_setup(
            uuid, attrs, actor=actor, owner=self.owner
        )

    async def import_tokens(
        self, uuid: str, tokens: Mapping[str, Any], *, actor: str | None = None
    ) -> Connection:
        return await self._services().connections.import_tokens(
            uuid, tokens, actor=actor, owner=self.owner
        )

    async def disconnect(self, uuid: str, *, actor: str | None = None) -> None:
        await self._services().connections.disconnect(uuid, actor=actor, owner=self.owner)

    async def record_validation(self, uuid: str, result: Any) -> None:
        await self._services().record_validation(uuid, result, self.owner)

    async def validate_credentials(self, provider: str, attrs: Mapping[str, Any]) -> Validation:
        return await self._services().checks.validate_credentials(provider, attrs)

    async def validate_connection(self, uuid: str, *, actor: str | None = None) -> Validation:
        return await self._services().checks.validate_connection(
            uuid, actor=actor, owner=self.owner
        )

    async def authenticated_request(
        self,
        uuid: Ref,
        method: str,
        url: str,
        *,
        allow_any_host: bool = False,
        max_attempts: int | None = None,
        fresh: bool = False,
        **opts: Any,
    ) -> Response:
        return await self._services().authenticated_request(
            uuid,
            method,
            url,
            allow_any_host=allow_any_host,
            max_attempts=max_attempts,
            owner=self.owner,
            opts=opts,
            fresh=fresh,
        )

    async def access_token(self, uuid: str) -> str:
        return await self._services().access_token(uuid, self.owner)

    async def refresh_access_token(self, uuid: str) -> str:
        return await self._services().refresh_access_token(uuid, self.owner)

    async def begin_authorization(
        self,
        uuid: str,
        redirect_uri: str,
        *,
        scopes: Sequence[str] | None = None,
        actor: str | None = None,
    ) -> tuple[str, str]:
        return await self._services().begin_authorization(
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
        return await self._services().complete_authorization(
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
        url, _ = await self._services().begin_authorization(
            uuid, redirect_uri, scopes=scopes, actor=None, state=state, owner=self.owner
        )
        return url

    async def exchange_code(
        self, uuid: str, code: str, redirect_uri: str, *, actor: str | None = None
    ) -> dict[str, Any]:
        return await self._services().exchange_code(
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
        return await self._services().connect_interactive(
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
        return self._services().subscribe(provider, uuid, self.owner, kinds, maxsize)
