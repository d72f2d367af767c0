"""The connection API in one owner scope, written once: the owner handle and the facade use it."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, cast

from . import _names as names
from . import _record as record
from ._audit import AuditPage
from ._connections import check_scope
from ._errors import InvalidArgument
from ._events import ALL_OWNERS, OwnerScope, Subscription
from ._http import Response
from ._models import Connection, ConnectionList, DeviceAuthorization, Page, Validation
from ._providers import Provider
from ._registry import ProviderRegistry
from ._services import Services
from ._webhooks import WebhookAttempt, WebhookDelivery, WebhookEndpoint

__all__ = ["OwnerHandle", "Ref", "Scoped", "request"]

#: A connection reference: its uuid, ``"provider:name"``, bare ``"provider"`` (its
#: default connection) or a ``("provider", "name")`` pair.
Ref = str | tuple[str, str]


class Scoped:
    """The connection API acting in one owner scope: each public method's one implementation.

    ``Integrations`` forwards its method of the same name here, in the scope its ``owner=``
    names (``ALL_OWNERS`` included); ``OwnerHandle`` is this with one owner fixed. The
    scope reaches the services as given: they check it, once, with the other arguments.
    """

    __slots__ = ("_providers", "_scope", "_services")

    #: Whether a new connection may keep a uuid from elsewhere (the administrator's imports).
    _keeps_uuids = True

    def __init__(
        self, services: Callable[[], Services], providers: ProviderRegistry, scope: OwnerScope
    ) -> None:
        # Called on every use: it raises LifecycleError unless the Integrations is open.
        self._services = services
        self._providers = providers
        self._scope = scope

    @property
    def _one_owner(self) -> str | None:
        # Where the scope must be one owner (creating, listings), the service refuses
        # ALL_OWNERS with the error it gives any other value that is not an owner.
        return cast("str | None", self._scope)

    # -- connections --------------------------------------------------------------------

    async def add_connection(
        self, provider: str, name: str, *, actor: str | None = None, uuid: str | None = None
    ) -> Connection:
        """Create a named connection; the only place a storage key is built. ``uuid`` keeps
        an identity from elsewhere (a migration or an import); by default a new UUIDv7. An
        owner handle picks every uuid itself and refuses ``uuid``."""
        if uuid is not None and not self._keeps_uuids:
            # A chosen uuid would tell whether another owner's connection has it: the
            # handle picks every uuid itself, and refuses any given one the same way.
            raise InvalidArgument(
                "An owner handle picks the uuid of a new connection itself: call "
                "add_connection without uuid= (a kept uuid is for imports, through "
                "Integrations.add_connection(..., owner=..., uuid=...)).",
                field="uuid",
            )
        return await self._services().connections.add(
            provider, name, actor=actor, owner=self._one_owner, uuid=uuid
        )

    async def rename_connection(
        self, uuid: str, new_name: str, *, actor: str | None = None
    ) -> dict[str, Any]:
        """Rename in place: the key's name part is rewritten, the uuid never changes."""
        return await self._services().connections.rename(
            uuid, new_name, actor=actor, owner=self._scope
        )

    async def remove_connection(self, uuid: str, *, actor: str | None = None) -> None:
        """Delete a connection (its grant revoked); readers pinned to its uuid get ``deleted``."""
        await self._services().connections.remove(uuid, actor=actor, owner=self._scope)

    async def list_connections(self, provider: str) -> list[Connection]:
        """A provider's connections: "default" first, then by name (masked)."""
        return (await self._services().connections.load_all([provider], self._scope))[provider]

    async def load_all_connections(self, providers: Iterable[str]) -> dict[str, list[Connection]]:
        """Connections of several providers in one SQL statement; every asked key is present.
        ``owner=ALL_OWNERS`` gives every owner's (system connections first in each list)."""
        return await self._services().connections.load_all(providers, self._scope)

    async def list_integrations(
        self, *, limit: int | None = None, after: str | None = None
    ) -> ConnectionList:
        """Connections that have saved data (setup or credentials), by provider then name.

        With ``limit``, one page of at most that many in storage-key order: pass the
        result's ``next_after`` (or the uuid of its last connection) as ``after`` for the
        next page; ``next_after`` is None on the last one."""
        return await self._services().connections.list_integrations(
            self._one_owner, limit=limit, after=after
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
        """One page of ``owner``'s connections (of ``provider`` if given; every owner's
        with ``ALL_OWNERS``), masked, in storage-key order: pass the page's ``next_after``
        as ``after`` for the next one. Each page is one index range scan, however many
        rows the table holds.

        ``status`` (``connected``, ``error`` or ``disconnected``) alone reads only the
        matching rows, from an index: its pages are full. ``search`` (a part of the name,
        any case), with or without ``status``, filters a page that examines a bounded
        number of rows, so it may hold fewer than ``limit`` connections (even none) and
        still have a ``next_after``; the listing ends when ``next_after`` is None."""
        return await self._services().connections.page(
            owner=self._scope,
            provider=provider,
            limit=limit,
            after=after,
            status=status,
            search=search,
        )

    async def count_connections(self) -> dict[str, int]:
        """Connections per provider key of ``owner`` (every owner's with ``ALL_OWNERS``),
        providers without any left out; kept by the database, so the same cost at any
        table size."""
        return await self._services().connections.counts(self._scope)

    def list_providers(self) -> list[Provider]:
        """Every known provider, built-in and registered, by key."""
        return self._providers.all()

    async def get_integration(self, ref: Ref, *, fresh: bool = False) -> dict[str, Any]:
        """The whole decrypted data of a connection, by uuid or ref (see ``get_credentials``)."""
        return await self._services().connections.get_integration(ref, self._scope, fresh=fresh)

    async def get_integration_by_uuid(self, uuid: str, *, fresh: bool = False) -> Connection:
        """The connection (masked) by its row uuid."""
        return await self._services().connections.get_integration_by_uuid(
            uuid, self._scope, fresh=fresh
        )

    async def find_uuid_by_provider_name(self, ref: Ref) -> str:
        """``"p:n"``, ``"p"`` (= ``"p:default"``) or ``("p", "n")`` → uuid; never guesses."""
        return await self._services().connections.find_uuid(ref, self._scope)

    async def resolve_to_uuid(self, value: Ref) -> str:
        """A uuid that exists → itself; a provider ref → its uuid (see ``get_credentials``)."""
        return await self._services().connections.resolve(value, self._scope)

    async def get_credentials(self, ref: Ref, *, fresh: bool = False) -> dict[str, Any]:
        """Decrypted credentials for API calls, by uuid or ``provider:name``.

        A ref is looked up in the owner's scope (on ``Integrations``, the system's when
        ``owner`` is left out). A uuid names its row whoever owns it, unless an owner is
        given (``None`` included): then a row of another owner counts as missing. The row
        comes from this process's cache when it holds it (see docs/cache.md);
        ``fresh=True`` reads the database.
        """
        return await self._services().connections.get_credentials(ref, self._scope, fresh=fresh)

    async def audit(
        self,
        *,
        uuid: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
        action: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> AuditPage:
        """A page of the audit trail, newest first; pass ``before=page.next_before`` for the
        next one. ``action`` is an action (``"credentials.revealed"``) or a family
        (``"credentials"``). See docs/audit.md."""
        return await self._services().audit(
            uuid=uuid,
            owner=self._scope,
            actor=actor,
            since=since,
            action=action,
            limit=limit,
            before=before,
        )

    async def is_connected(self, uuid: str, *, fresh: bool = False) -> bool:
        """True when the connection is connected and holds runtime credentials."""
        return await self._services().connections.is_connected(uuid, self._scope, fresh=fresh)

    async def save_setup(
        self, uuid: str, attrs: Mapping[str, Any], *, actor: str | None = None
    ) -> dict[str, Any]:
        """Merge setup attributes into the connection; tokens already obtained are kept."""
        return await self._services().connections.save_setup(
            uuid, attrs, actor=actor, owner=self._scope
        )

    async def import_tokens(
        self, uuid: str, tokens: Mapping[str, Any], *, actor: str | None = None
    ) -> Connection:
        """Store OAuth tokens obtained elsewhere (moving from another system), validated.

        ``tokens``: ``access_token`` (required), ``refresh_token``, ``token_type``,
        ``scope``, and ``expires_at`` (ISO 8601) or ``expires_in`` (seconds). The
        connection becomes ``connected`` as after an authorization; the only way to write
        token fields from outside (``save_setup`` refuses them).
        """
        return await self._services().connections.import_tokens(
            uuid, tokens, actor=actor, owner=self._scope
        )

    async def disconnect(self, uuid: str, *, actor: str | None = None) -> None:
        """Drop runtime credentials (tokens, keys); OAuth client id/secret are kept."""
        await self._services().connections.disconnect(uuid, actor=actor, owner=self._scope)

    async def record_validation(self, uuid: str, result: Any, *, actor: str | None = None) -> None:
        """Store a check's outcome; an event only when status or validation_status changed."""
        # A uuid that resolves to nothing (or to another owner's row) is quietly left alone.
        target = names.require_uuid(uuid)
        ok, message = record.validation_outcome(result)
        await self._services().connections.record(
            target, ok, message, actor=names.check_actor(actor), owner=check_scope(self._scope)
        )

    # -- checks -------------------------------------------------------------------------

    async def validate_credentials(self, provider: str, attrs: Mapping[str, Any]) -> Validation:
        """Probe the provider with in-memory credentials; nothing is stored."""
        return await self._services().checks.validate_credentials(provider, attrs)

    async def validate_connection(self, uuid: str, *, actor: str | None = None) -> Validation:
        """Probe the stored credentials and record the outcome on the connection."""
        return await self._services().checks.validate_connection(
            uuid, actor=actor, owner=self._scope
        )

    # -- requests and tokens ------------------------------------------------------------

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
        """Send a request with the connection's credentials, only to the provider's API hosts.

        ``uuid`` may also be a ref, looked up in the owner's scope (see ``get_credentials``).
        ``allow_any_host=True`` sends the credentials wherever ``url`` points: only for URLs
        you fully control. ``opts``: ``headers``, ``params``, ``json``, ``data``,
        ``timeout`` and other aiohttp request options.
        """
        return await request(self, uuid, method, url, allow_any_host, max_attempts, fresh, opts)

    async def access_token(self, uuid: str) -> str:
        """A valid access token, refreshed first when it expires within the leeway."""
        return await self._services().access_token(uuid, self._scope)

    async def refresh_access_token(self, uuid: str) -> str:
        """Refresh now and return the new access token; concurrent calls share one request."""
        return await self._services().refresh_access_token(uuid, self._scope)

    # -- OAuth authorization -------------------------------------------------------------

    async def begin_authorization(
        self,
        uuid: str,
        redirect_uri: str,
        *,
        scopes: Sequence[str] | None = None,
        actor: str | None = None,
    ) -> tuple[str, str]:
        """Start an authorization: returns ``(url, state)``; redirect the user to ``url``.

        A single-use pending authorization (state hash, sealed PKCE verifier, redirect URI,
        scopes) is stored server-side and expires after ``authorization_ttl`` seconds.
        """
        return await self._begin(uuid, redirect_uri, scopes, actor, None)

    async def _begin(
        self,
        uuid: object,
        redirect_uri: str,
        scopes: Sequence[str] | None,
        actor: str | None,
        state: str | None,
    ) -> tuple[str, str]:
        return await self._services().authflow.begin(
            names.require_uuid(uuid),
            redirect_uri,
            scopes=scopes,
            actor=names.check_actor(actor),
            state=state,
            owner=check_scope(self._scope),
        )

    async def complete_authorization(
        self,
        state: str,
        *,
        code: str | None = None,
        error: str | None = None,
        error_description: str | None = None,
    ) -> Connection:
        """Finish an authorization from the callback's ``state`` and ``code`` (or ``error``).

        The state is consumed exactly once: an unknown, reused or expired one raises
        InvalidState and changes nothing. A provider ``error`` is recorded on the
        connection and raised as AuthorizationDenied.
        """
        services = self._services()
        row = await services.authflow.complete(
            state,
            code=code,
            error=error,
            error_description=error_description,
            owner=check_scope(self._scope),
        )
        return services.core.connection(row)

    async def start_device_authorization(
        self,
        uuid: str,
        *,
        scopes: Sequence[str] | None = None,
        actor: str | None = None,
    ) -> DeviceAuthorization:
        """Start a device authorization (RFC 8628) for a provider that offers it: returns the
        user code and the verification URI to show; no browser or redirect is needed here.

        The device code is kept server-side, sealed, until it is used or expires; then
        call :meth:`complete_device_authorization`.
        """
        return await self._services().device.start(
            names.require_uuid(uuid),
            scopes=_device_scopes(scopes),
            actor=names.check_actor(actor),
            owner=check_scope(self._scope),
        )

    async def complete_device_authorization(
        self,
        uuid: str,
        *,
        actor: str | None = None,
    ) -> Connection:
        """Wait for the user to approve the device code, polling as the provider asks
        (``interval``, ``slow_down`` adds 5 s, ``authorization_pending`` waits on), then
        store the tokens as an authorization-code exchange does. ``access_denied`` raises
        AuthorizationDenied (recorded on the connection); an expired code raises
        AuthorizationTimeout. To stop waiting sooner, wrap the call in ``asyncio.timeout()``:
        the code stays pending, and another call goes on polling it.
        """
        services = self._services()
        row = await services.device.complete(
            names.require_uuid(uuid),
            actor=names.check_actor(actor),
            owner=check_scope(self._scope),
        )
        return services.core.connection(row)

    async def authorization_url(
        self,
        uuid: str,
        redirect_uri: str,
        *,
        scopes: Sequence[str] | None = None,
        state: str | None = None,
    ) -> str:
        """The seed's authorization URL (PKCE included); a pending authorization is stored."""
        url, _ = await self._begin(uuid, redirect_uri, scopes, None, state)
        return url

    async def exchange_code(
        self, uuid: str, code: str, redirect_uri: str, *, actor: str | None = None
    ) -> dict[str, Any]:
        """The seed's code exchange: stores the tokens and returns the (masked) data."""
        services = self._services()
        row = await services.authflow.exchange(
            names.require_uuid(uuid),
            code,
            redirect_uri,
            names.check_actor(actor),
            check_scope(self._scope),
        )
        return services.core.masked(row)

    async def connect_interactive(
        self,
        uuid: str,
        *,
        scopes: Sequence[str] | None = None,
        open_browser: bool = False,
        timeout: float = 300.0,  # noqa: ASYNC109 - enforced inside with asyncio.timeout
        port: int = 0,
        actor: str | None = None,
    ) -> Connection:
        """Authorize from a script or notebook through a temporary server on 127.0.0.1.

        Prints the authorization URL (and opens it when ``open_browser``); the redirect
        URI is ``http://127.0.0.1:{port}/callback``. Raises AuthorizationTimeout (a
        TimeoutError) after ``timeout`` seconds.
        """
        from ._interactive import connect_interactive

        services = self._services()
        return await connect_interactive(
            services.authflow,
            services.core,
            names.require_uuid(uuid),
            owner=check_scope(self._scope),
            scopes=scopes,
            open_browser=open_browser,
            timeout=timeout,
            port=port,
            actor=names.check_actor(actor),
        )

    # -- events -------------------------------------------------------------------------

    def subscribe(
        self,
        *,
        provider: str | None = None,
        uuid: str | None = None,
        kinds: Iterable[str] | None = None,
        maxsize: int = 1000,
        after: int | None = None,
    ) -> AbstractAsyncContextManager[Subscription]:
        """Committed changes from every process on this database: ``async with integ.subscribe()``.

        ``provider`` and ``uuid`` narrow to one provider or connection, ``kinds`` to some
        event kinds. ``owner=None`` sees system connections only, an owner string that
        owner's, ``ALL_OWNERS`` all; with a ``uuid`` and no owner, that connection whoever
        owns it. Beyond ``maxsize`` unread events the oldest are dropped and counted in
        ``Subscription.dropped``. Arguments are checked here, before ``async with``.

        ``after`` resumes from the durable log: the events logged after that position
        (an earlier ``Event.position``; 0 for the oldest kept) come first, then live ones,
        with no gap and no repeat between them, and nothing dropped. A position that fell
        out of retention gets a ``resync`` event with ``detail["reason"] == "expired"``.
        """
        core = self._services().core
        if provider is not None:
            provider = core.providers.get(provider).key
        if uuid is not None:
            uuid = names.require_uuid(uuid)
        return core.hub.subscribe(
            provider=provider,
            uuid=uuid,
            owner=check_scope(self._scope),
            kinds=kinds,
            maxsize=maxsize,
            after=after,
        )

    # -- webhooks -------------------------------------------------------------------------

    async def add_webhook(
        self,
        url: str,
        *,
        kinds: Iterable[str] | None = None,
        description: str = "",
        allow_loopback: bool = False,
    ) -> WebhookEndpoint:
        """Register a webhook endpoint: ``owner=None`` is system-wide (every owner's events),
        an owner string that owner's only; ``kinds`` narrows to some event kinds. The
        signing secret is made here and returned once, in ``.secret``: it is stored
        encrypted and never shown again. ``url`` must be https; a loopback URL (http too)
        only with ``allow_loopback=True``, for tests and development."""
        return await self._services().webhooks.add(
            url,
            owner=None if self._scope is ALL_OWNERS else self._scope,
            kinds=kinds,
            description=description,
            allow_loopback=allow_loopback,
        )

    async def list_webhooks(self) -> list[WebhookEndpoint]:
        """The webhook endpoints in scope, without their secrets."""
        return await self._services().webhooks.endpoints(self._scope)

    async def remove_webhook(self, endpoint_id: str) -> None:
        """Remove a webhook endpoint and its deliveries; NotFound when there is none."""
        await self._services().webhooks.remove(endpoint_id, self._scope)

    async def webhook_deliveries(
        self, endpoint_id: str, *, state: str | None = None, limit: int = 50
    ) -> list[WebhookDelivery]:
        """An endpoint's newest deliveries (``state``: pending, delivered or dead)."""
        return await self._services().webhooks.deliveries(
            endpoint_id, self._scope, state=state, limit=limit
        )

    async def replay_webhook(self, delivery_id: str) -> None:
        """Send a delivery again from its first attempt, with the same ``webhook-id``
        (a dead one, or one the receiver lost)."""
        await self._services().webhooks.replay(delivery_id, self._scope)

    async def test_webhook(
        self, endpoint_id: str, *, allow_loopback: bool = False, allow_private: bool = False
    ) -> WebhookAttempt:
        """Send one signed ``webhook_test`` message to the endpoint now; not retried."""
        return await self._services().webhooks.test(
            endpoint_id, self._scope, allow_loopback=allow_loopback, allow_private=allow_private
        )


class OwnerHandle(Scoped):
    """What one owner may do: ``integ.for_owner("user:42")``.

    Every method is the ``Integrations`` method of the same name with ``owner`` fixed.
    A connection of another owner is indistinguishable from a missing one (the same
    error code and message as a random uuid) and nothing is read, written, revoked or
    emitted for it. Connections created through the handle belong to its owner.
    """

    __slots__ = ()
    _keeps_uuids = False

    def __init__(
        self, services: Callable[[], Services], providers: ProviderRegistry, owner: str | None
    ) -> None:
        # Never ALL_OWNERS: a handle's scope is exactly one owner's (or the system's).
        super().__init__(services, providers, names.check_owner(owner))

    @property
    def owner(self) -> str | None:
        """The owner whose connections this handle sees (``None``: the system's)."""
        return self._one_owner

    def __repr__(self) -> str:
        return f"<OwnerHandle owner={self.owner!r}>"


def request(
    api: Scoped,
    uuid: Ref,
    method: str,
    url: str,
    allow_any_host: bool,
    max_attempts: int | None,
    fresh: bool,
    opts: dict[str, Any],
) -> Coroutine[Any, Any, Response]:
    """``authenticated_request``'s coroutine in ``api``'s scope: a door awaits it with no
    frame of this layer around the request in flight."""
    return api._services().authenticated_request(
        uuid,
        method,
        url,
        allow_any_host=allow_any_host,
        max_attempts=max_attempts,
        owner=api._scope,
        opts=opts,
        fresh=fresh,
    )


def _device_scopes(scopes: Sequence[str] | None) -> list[str] | None:
    if scopes is None:
        return None
    if (
        isinstance(scopes, str | bytes)
        or not isinstance(scopes, Sequence)
        or not all(isinstance(s, str) and s for s in scopes)
    ):
        raise InvalidArgument(
            "scopes must be a sequence of non-empty strings, such as ['openid', 'email']",
            field="scopes",
        )
    return list(scopes)
