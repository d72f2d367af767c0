"""The ``Integrations`` facade: lifecycle, and delegation to the services built at ``open()``."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from . import _events
from . import _names as names
from ._audit import AuditLevel, AuditLog, AuditPage, Breach
from ._cache import CacheStats
from ._checkall import CheckReport, check_all
from ._core import Core, connect, storage, unwrap_keys
from ._doctor import Diagnosis, diagnose_core
from ._errors import ConfigurationError, InvalidArgument, LifecycleError, SchemaOutdated
from ._events import ALL_OWNERS, EventHub, HubStats, OwnerScope, Subscription
from ._http import HttpClient, Response
from ._legacy import LegacyMigrator, LegacyMigrators
from ._models import Connection, ConnectionList, DeviceAuthorization, Page, Validation
from ._names import shown
from ._owner import OwnerHandle, Ref, Scoped, request
from ._providers import Provider
from ._registry import ProviderRegistry, load_providers
from ._rotation import ProgressCallback, RotationProgress
from ._schemes import SCHEMES, AuthScheme, SchemeRegistry
from ._services import Services
from ._settings import MAXIMUM, Settings, Takeover, check_at_most
from ._sweep import HealthSweep, SweepCallback, check_sweep_options
from ._vault import Vault
from ._webhooks import RETRY_DELAYS, WebhookAttempt, WebhookDelivery, WebhookEndpoint

if TYPE_CHECKING:
    import aiohttp

    from ._repository import Pool

log = logging.getLogger("integrations")


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Integrations:
    """Stored integration credentials and authenticated calls, backed by PostgreSQL.

    Use ``async with Integrations(dsn) as integ:``, or ``await integ.open()`` /
    ``await integ.close()`` from a framework lifespan. This object is the system-wide
    administrator: it sees every owner's connections. Hand request handlers
    ``integ.for_owner(owner)`` instead.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: Pool | None = None,
        http: aiohttp.ClientSession | None = None,
        keys: str | Sequence[str] | None = None,
        providers: Iterable[Provider] | None = None,
        providers_file: str | os.PathLike[str] | None = None,
        auth_schemes: Iterable[AuthScheme] | None = None,
        override_providers: bool = False,
        leeway: float = 60.0,
        auto_migrate: bool = True,
        schema: str = "integrations",
        encryption: Literal["on", "off"] = "on",
        data_dir: str | os.PathLike[str] | None = None,
        pool_max_size: int = 10,
        check_timeout: float = 15.0,
        authorization_ttl: float = 600.0,
        lock_timeout: float = 30.0,
        token_timeout: float = 10.0,
        token_attempts: int = 3,
        token_backoff: float = 0.5,
        refresh_cooldown: float = 5.0,
        revoke_timeout: float = 5.0,
        max_attrs_bytes: int = 64 * 1024,
        cache: bool = True,
        cache_size: int = 10_000,
        refresh_lease: float = 15.0,
        refresh_takeover: Takeover = "refresh",
        token_write_retry: float = 60.0,
        statement_cache_size: int | None = None,
        listen_dsn: str | None = None,
        audit: AuditLevel = "reveal",
        audit_buffer: int = 10_000,
        listen_heartbeat: float = 1.0,
    ) -> None:
        if encryption not in ("on", "off"):
            raise ConfigurationError(f'encryption must be "on" or "off", got {shown(encryption)}.')
        if dsn is not None and pool is not None:
            raise ConfigurationError("Pass either dsn= or pool=, not both.")
        if (
            isinstance(pool_max_size, bool)
            or not isinstance(pool_max_size, int)
            or pool_max_size < 2
        ):
            # The event listener holds one pooled connection for as long as it listens.
            raise ConfigurationError(
                f"pool_max_size must be at least 2, got {shown(pool_max_size)}."
            )
        check_at_most("pool_max_size", pool_max_size)
        if (
            isinstance(listen_heartbeat, bool)
            or not isinstance(listen_heartbeat, int | float)
            or not 0 < listen_heartbeat < math.inf
        ):
            raise ConfigurationError(
                f"listen_heartbeat must be a positive number of seconds, got "
                f"{shown(listen_heartbeat)}."
            )
        check_at_most("listen_heartbeat", listen_heartbeat)
        self._listen_heartbeat = float(listen_heartbeat)
        self._dsn = dsn
        # Checked now: a bad level is a configuration error before anything connects.
        AuditLog(None, level=audit, buffer=audit_buffer)
        self._audit_level: str = audit
        self._audit_buffer = audit_buffer
        self._pool_arg = pool
        self._keys_arg = keys
        self._encryption = encryption
        self._auto_migrate = auto_migrate
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._pool_max_size = pool_max_size
        schema = names.check_identifier(schema, "schema")
        self.settings = Settings.build(
            schema=schema,
            check_timeout=check_timeout,
            authorization_ttl=authorization_ttl,
            revoke_timeout=revoke_timeout,
            max_attrs_bytes=max_attrs_bytes,
            leeway=leeway,
            lock_timeout=lock_timeout,
            token_timeout=token_timeout,
            token_attempts=token_attempts,
            token_backoff=token_backoff,
            refresh_cooldown=refresh_cooldown,
            refresh_lease=refresh_lease,
            refresh_takeover=refresh_takeover,
            token_write_retry=token_write_retry,
        )
        extra = list(providers or ())
        if providers_file is None and providers is None:
            # The environment counts only when the code names no providers itself; its
            # module:attribute form is the command line's.
            named = os.environ.get("INTEGRATIONS_PROVIDERS", "")
            if named.endswith((".toml", ".json")):
                providers_file = named
        if providers_file is not None:
            extra += load_providers(providers_file)
        self.providers = ProviderRegistry(
            extra,
            override=override_providers,
            schemes=SchemeRegistry(auth_schemes or (), parent=SCHEMES),
        )
        self._repo = storage(
            self.settings,
            cache=cache,
            cache_size=cache_size,
            statement_cache_size=statement_cache_size,
            listen_dsn=listen_dsn,
            pool=pool,
        )
        self._cache = self._repo.cache
        self._http = HttpClient(http)
        self._legacy = LegacyMigrators()
        self._services: Services | None = None
        # The scopes of the defaults: every owner's (no check) and the system's.
        self._everyone = Scoped(self._live, self.providers, ALL_OWNERS)
        self._system = Scoped(self._live, self.providers, None)
        self._state = _State.NEW
        self._teardown: asyncio.Task[None] | None = None
        self._sweeps: set[HealthSweep] = set()
        self.embedded_dsn: str | None = None

    def __repr__(self) -> str:
        return f"<Integrations schema={self.settings.schema!r} state={self._state.value}>"

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Integrations:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Connect, and migrate a schema that is behind (unless ``auto_migrate=False``)."""
        if self._state is not _State.NEW:
            raise LifecycleError(f"Integrations is already {self._state.value}; create a new one.")
        self._state = _State.OPEN
        try:
            vault = await self._connect()
            if await self._repo.schema_version() < self._repo.q.latest_version:
                if not self._auto_migrate:
                    raise SchemaOutdated()
                await self._repo.migrate()
            await unwrap_keys(vault, self._repo)
        except SchemaOutdated:
            # Left unopened so that ``await integ.migrate()`` then ``open()`` works.
            await self._repo.close()
            self._state = _State.NEW
            raise
        except BaseException:
            await self.close()
            raise
        hub = EventHub(
            self._repo.listen,
            self._repo.channel,
            watcher=self._cache,
            log=self._repo.events_after,
            heartbeat=(self._listen_heartbeat, _events.HEARTBEAT_TIMEOUT),
        )
        if self._cache.enabled:
            # The cache serves only while changes are being received: listen from the start.
            try:
                await hub.start()
            except BaseException:
                await hub.close()
                await self.close()
                raise
        # Without the cache the LISTEN connection waits for the first subscribe().
        core = Core(
            repo=self._repo,
            vault=vault,
            providers=self.providers,
            http=self._http,
            hub=hub,
            settings=self.settings,
            audit=AuditLog(self._repo, level=self._audit_level, buffer=self._audit_buffer),
        )
        self._services = Services(core)

    async def _connect(self) -> Vault:
        vault, self.embedded_dsn = await connect(
            self._repo,
            dsn=self._dsn,
            pool=self._pool_arg,
            keys=self._keys_arg,
            encryption=self._encryption,
            data_dir=self._data_dir,
            pool_max_size=self._pool_max_size,
        )
        return vault

    async def close(self) -> None:
        """Release what was opened, in reverse order; an injected pool or session stays open.

        Refreshes that have sent their token request, and disconnects, removals and code
        exchanges in flight, are let finish first. A close() that is cancelled meanwhile
        goes on in the background; calling close() again waits for it.
        """
        if self._teardown is None:
            self._state = _State.CLOSING
            self._teardown = asyncio.get_running_loop().create_task(
                self._close_parts(), name="integrations-close"
            )
        await asyncio.shield(self._teardown)

    async def _close_parts(self) -> None:
        try:
            # Each part is closed even when one before it fails; the pool last.
            async with contextlib.AsyncExitStack() as stack:
                stack.push_async_callback(self._repo.close)
                stack.push_async_callback(self._http.close)
                if self._services is not None:
                    # Before the HTTP client and the pool: revocations, refreshes and the
                    # event listener (a pooled connection) finish first.
                    stack.push_async_callback(self._services.close)
                # First of all: a sweep holds a pooled connection while it leads.
                stack.push_async_callback(self._stop_sweeps)
        finally:
            self._state = _State.CLOSED

    async def _stop_sweeps(self) -> None:
        await asyncio.gather(*(sweep.stop() for sweep in list(self._sweeps)))

    def _check_open(self) -> None:
        self._live()

    @property
    def _s(self) -> Services:
        return self._live()

    def _live(self) -> Services:
        """The services, while open; LifecycleError otherwise."""
        if self._state is not _State.OPEN or self._services is None:
            raise LifecycleError(
                "Integrations is not open: use 'async with Integrations(...)' or await open()."
                if self._state is _State.NEW
                else f"Integrations is {self._state.value}."
            )
        return self._services

    async def migrate(self) -> list[int]:
        """Apply pending schema migrations under an advisory lock; returns versions applied.

        Also works before ``open()`` (for ``auto_migrate=False`` deployments that migrate
        as a separate step): it then connects for the migration only.
        """
        if self._state is _State.NEW:
            await self._connect()
            try:
                return await self._repo.migrate()
            finally:
                await self._repo.close()
        self._check_open()
        return await self._repo.migrate()

    def for_owner(self, owner: str | None) -> OwnerHandle:
        """A handle on one owner's connections: another owner's look missing through it."""
        return OwnerHandle(self._live, self.providers, owner)

    def _in(self, owner: OwnerScope) -> Scoped:
        """The connection API in ``owner``'s scope, which the services check."""
        if owner is ALL_OWNERS:
            return self._everyone
        if owner is None:
            return self._system
        return Scoped(self._live, self.providers, owner)

    # -- events -------------------------------------------------------------------------

    def subscribe(
        self,
        *,
        provider: str | None = None,
        uuid: str | None = None,
        owner: OwnerScope | None = None,
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
        # The administrator's default only: an owner handle's stays its owner's.
        if uuid is not None and owner is None:
            owner = ALL_OWNERS
        return self._in(owner).subscribe(
            provider=provider, uuid=uuid, kinds=kinds, maxsize=maxsize, after=after
        )

    # -- webhooks -------------------------------------------------------------------------

    async def add_webhook(
        self,
        url: str,
        *,
        kinds: Iterable[str] | None = None,
        owner: str | None = None,
        description: str = "",
        allow_loopback: bool = False,
    ) -> WebhookEndpoint:
        """Register a webhook endpoint: ``owner=None`` is system-wide (every owner's events),
        an owner string that owner's only; ``kinds`` narrows to some event kinds. The
        signing secret is made here and returned once, in ``.secret``: it is stored
        encrypted and never shown again. ``url`` must be https; a loopback URL (http too)
        only with ``allow_loopback=True``, for tests and development."""
        return await self._in(owner).add_webhook(
            url, kinds=kinds, description=description, allow_loopback=allow_loopback
        )

    async def list_webhooks(self, *, owner: OwnerScope = ALL_OWNERS) -> list[WebhookEndpoint]:
        """The webhook endpoints in scope, without their secrets."""
        return await self._in(owner).list_webhooks()

    async def remove_webhook(self, endpoint_id: str, *, owner: OwnerScope = ALL_OWNERS) -> None:
        """Remove a webhook endpoint and its deliveries; NotFound when there is none."""
        await self._in(owner).remove_webhook(endpoint_id)

    async def webhook_deliveries(
        self,
        endpoint_id: str,
        *,
        state: str | None = None,
        limit: int = 50,
        owner: OwnerScope = ALL_OWNERS,
    ) -> list[WebhookDelivery]:
        """An endpoint's newest deliveries (``state``: pending, delivered or dead)."""
        return await self._in(owner).webhook_deliveries(endpoint_id, state=state, limit=limit)

    async def replay_webhook(self, delivery_id: str, *, owner: OwnerScope = ALL_OWNERS) -> None:
        """Send a delivery again from its first attempt, with the same ``webhook-id``
        (a dead one, or one the receiver lost)."""
        await self._in(owner).replay_webhook(delivery_id)

    async def test_webhook(
        self,
        endpoint_id: str,
        *,
        allow_loopback: bool = False,
        allow_private: bool = False,
        owner: OwnerScope = ALL_OWNERS,
    ) -> WebhookAttempt:
        """Send one signed ``webhook_test`` message to the endpoint now; not retried."""
        return await self._in(owner).test_webhook(
            endpoint_id, allow_loopback=allow_loopback, allow_private=allow_private
        )

    async def run_webhooks(
        self,
        *,
        allow_loopback: bool = False,
        allow_private: bool = False,
        concurrency: int = 8,
        retry_delays: Sequence[float] = RETRY_DELAYS,
        poll: float = 5.0,
    ) -> None:
        """Deliver webhooks from this process until it closes (or the task is cancelled).

        Every process may run it: each turns new logged events into deliveries (one at a
        time, under a row lock) and sends the due ones it claims, at most ``concurrency``
        at once; a delivery is claimed by one process at a time, and one connection's
        deliveries to an endpoint go out in order. Failed attempts are retried after
        ``retry_delays`` (default: over more than a day, see docs/webhooks.md), then the
        delivery is dead. Addresses that resolve to loopback or private networks are
        refused unless allowed here."""
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InvalidArgument("concurrency must be an int >= 1", field="concurrency")
        bad_delays = InvalidArgument(
            "retry_delays must be a non-empty sequence of at most 100 numbers of seconds from "
            f"0 to {int(MAXIMUM['interval'])}",
            field="retry_delays",
        )
        if not isinstance(retry_delays, Sequence) or isinstance(retry_delays, str | bytes):
            raise bad_delays
        delays = tuple(retry_delays[:101])
        if not 0 < len(delays) <= 100 or any(
            isinstance(d, bool)
            or not isinstance(d, int | float)
            or not 0 <= d <= MAXIMUM["interval"]
            for d in delays
        ):
            raise bad_delays
        if (
            isinstance(poll, bool)
            or not isinstance(poll, int | float)
            or not 0 < poll <= MAXIMUM["per_provider_interval"]
        ):
            raise InvalidArgument(
                f"poll must be a number of seconds more than 0 and at most "
                f"{int(MAXIMUM['per_provider_interval'])}",
                field="poll",
            )
        await self._s.webhooks.run(
            allow_loopback=allow_loopback,
            allow_private=allow_private,
            concurrency=concurrency,
            retry_delays=delays,
            poll=float(poll),
        )

    async def prune_events(
        self, *, max_age: float | timedelta | None = timedelta(days=7), max_count: int | None = None
    ) -> int:
        """Apply the event log's retention: delete events logged more than ``max_age`` ago
        (seconds or a timedelta; None keeps them whatever their age) and all but the
        newest ``max_count``; returns how many were deleted. Run it from one worker now
        and then (``integrations events prune`` does the same)."""
        return await self._s.prune_events(max_age=max_age, max_count=max_count)

    @property
    def cache_stats(self) -> CacheStats:
        """Counters of this instance's row cache: size, hits, misses, invalidations."""
        self._check_open()
        return self._cache.stats

    @property
    def event_stats(self) -> HubStats:
        """Counters of this instance's event listener: received, malformed, reconnects."""
        return self._s.core.hub.stats

    # -- connections: each is Scoped's method of the same name, in the scope of ``owner`` --

    async def add_connection(
        self,
        provider: str,
        name: str,
        *,
        actor: str | None = None,
        owner: str | None = None,
        uuid: str | None = None,
    ) -> Connection:
        """Create a named connection; the only place a storage key is built. ``uuid`` keeps
        an identity from elsewhere (a migration or an import); by default a new UUIDv7. An
        owner handle picks every uuid itself and refuses ``uuid``."""
        return await self._in(owner).add_connection(provider, name, actor=actor, uuid=uuid)

    async def rename_connection(
        self, uuid: str, new_name: str, *, actor: str | None = None, owner: OwnerScope = ALL_OWNERS
    ) -> dict[str, Any]:
        """Rename in place: the key's name part is rewritten, the uuid never changes."""
        return await self._in(owner).rename_connection(uuid, new_name, actor=actor)

    async def remove_connection(
        self, uuid: str, *, actor: str | None = None, owner: OwnerScope = ALL_OWNERS
    ) -> None:
        """Delete a connection (its grant revoked); readers pinned to its uuid get ``deleted``."""
        await self._in(owner).remove_connection(uuid, actor=actor)

    async def list_connections(
        self, provider: str, *, owner: str | None = None
    ) -> list[Connection]:
        """A provider's connections: "default" first, then by name (masked)."""
        return await self._in(owner).list_connections(provider)

    async def load_all_connections(
        self, providers: Iterable[str], *, owner: OwnerScope = None
    ) -> dict[str, list[Connection]]:
        """Connections of several providers in one SQL statement; every asked key is present.
        ``owner=ALL_OWNERS`` gives every owner's (system connections first in each list)."""
        return await self._in(owner).load_all_connections(providers)

    async def list_integrations(
        self, *, owner: str | None = None, limit: int | None = None, after: str | None = None
    ) -> ConnectionList:
        """Connections that have saved data (setup or credentials), by provider then name.

        With ``limit``, one page of at most that many in storage-key order: pass the
        result's ``next_after`` (or the uuid of its last connection) as ``after`` for the
        next page; ``next_after`` is None on the last one."""
        return await self._in(owner).list_integrations(limit=limit, after=after)

    async def list_page(
        self,
        *,
        owner: OwnerScope = None,
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
        return await self._in(owner).list_page(
            provider=provider, limit=limit, after=after, status=status, search=search
        )

    async def count_connections(self, *, owner: OwnerScope = None) -> dict[str, int]:
        """Connections per provider key of ``owner`` (every owner's with ``ALL_OWNERS``),
        providers without any left out; kept by the database, so the same cost at any
        table size."""
        return await self._in(owner).count_connections()

    def list_providers(self) -> list[Provider]:
        """Every known provider, built-in and registered, by key."""
        return self._system.list_providers()

    async def get_integration(
        self, ref: Ref, *, owner: OwnerScope = ALL_OWNERS, fresh: bool = False
    ) -> dict[str, Any]:
        """The whole decrypted data of a connection, by uuid or ref (see ``get_credentials``)."""
        return await self._in(owner).get_integration(ref, fresh=fresh)

    async def get_integration_by_uuid(
        self, uuid: str, *, owner: OwnerScope = ALL_OWNERS, fresh: bool = False
    ) -> Connection:
        """The connection (masked) by its row uuid."""
        return await self._in(owner).get_integration_by_uuid(uuid, fresh=fresh)

    async def find_uuid_by_provider_name(self, ref: Ref, *, owner: str | None = None) -> str:
        """``"p:n"``, ``"p"`` (= ``"p:default"``) or ``("p", "n")`` → uuid; never guesses."""
        return await self._in(owner).find_uuid_by_provider_name(ref)

    async def resolve_to_uuid(self, value: Ref, *, owner: OwnerScope = ALL_OWNERS) -> str:
        """A uuid that exists → itself; a provider ref → its uuid (see ``get_credentials``)."""
        return await self._in(owner).resolve_to_uuid(value)

    def settings_key(self, ref: str) -> str:
        """The storage key for ``"google"`` or ``"google:personal"``."""
        return names.settings_key(ref)

    async def get_credentials(
        self, ref: Ref, *, owner: OwnerScope = ALL_OWNERS, fresh: bool = False
    ) -> dict[str, Any]:
        """Decrypted credentials for API calls, by uuid or ``provider:name``.

        A ref is looked up in the owner's scope (on ``Integrations``, the system's when
        ``owner`` is left out). A uuid names its row whoever owns it, unless an owner is
        given (``None`` included): then a row of another owner counts as missing. The row
        comes from this process's cache when it holds it (see docs/cache.md);
        ``fresh=True`` reads the database.
        """
        return await self._in(owner).get_credentials(ref, fresh=fresh)

    async def is_connected(
        self, uuid: str, *, owner: OwnerScope = ALL_OWNERS, fresh: bool = False
    ) -> bool:
        """True when the connection is connected and holds runtime credentials."""
        return await self._in(owner).is_connected(uuid, fresh=fresh)

    async def save_setup(
        self,
        uuid: str,
        attrs: Mapping[str, Any],
        *,
        actor: str | None = None,
        owner: OwnerScope = ALL_OWNERS,
    ) -> dict[str, Any]:
        """Merge setup attributes into the connection; tokens already obtained are kept."""
        return await self._in(owner).save_setup(uuid, attrs, actor=actor)

    async def import_tokens(
        self,
        uuid: str,
        tokens: Mapping[str, Any],
        *,
        actor: str | None = None,
        owner: OwnerScope = ALL_OWNERS,
    ) -> Connection:
        """Store OAuth tokens obtained elsewhere (moving from another system), validated.

        ``tokens``: ``access_token`` (required), ``refresh_token``, ``token_type``,
        ``scope``, and ``expires_at`` (ISO 8601) or ``expires_in`` (seconds). The
        connection becomes ``connected`` as after an authorization; the only way to write
        token fields from outside (``save_setup`` refuses them).
        """
        return await self._in(owner).import_tokens(uuid, tokens, actor=actor)

    async def disconnect(
        self, uuid: str, *, actor: str | None = None, owner: OwnerScope = ALL_OWNERS
    ) -> None:
        """Drop runtime credentials (tokens, keys); OAuth client id/secret are kept."""
        await self._in(owner).disconnect(uuid, actor=actor)

    async def record_validation(
        self,
        uuid: str,
        result: Any,
        *,
        actor: str | None = None,
        owner: OwnerScope = ALL_OWNERS,
    ) -> None:
        """Store a check's outcome; an event only when status or validation_status changed."""
        await self._in(owner).record_validation(uuid, result, actor=actor)

    # -- checks -------------------------------------------------------------------------

    async def validate_credentials(self, provider: str, attrs: Mapping[str, Any]) -> Validation:
        """Probe the provider with in-memory credentials; nothing is stored."""
        return await self._system.validate_credentials(provider, attrs)

    async def validate_connection(
        self, uuid: str, *, actor: str | None = None, owner: OwnerScope = ALL_OWNERS
    ) -> Validation:
        """Probe the stored credentials and record the outcome on the connection."""
        return await self._in(owner).validate_connection(uuid, actor=actor)

    # -- requests and tokens ------------------------------------------------------------

    async def authenticated_request(
        self,
        uuid: Ref,
        method: str,
        url: str,
        *,
        allow_any_host: bool = False,
        max_attempts: int | None = None,
        owner: OwnerScope = ALL_OWNERS,
        fresh: bool = False,
        **opts: Any,
    ) -> Response:
        """Send a request with the connection's credentials, only to the provider's API hosts.

        ``uuid`` may also be a ref, looked up in the owner's scope (see ``get_credentials``).
        ``allow_any_host=True`` sends the credentials wherever ``url`` points: only for URLs
        you fully control. ``opts``: ``headers``, ``params``, ``json``, ``data``,
        ``timeout`` and other aiohttp request options.
        """
        return await request(
            self._in(owner), uuid, method, url, allow_any_host, max_attempts, fresh, opts
        )

    async def access_token(self, uuid: str, *, owner: OwnerScope = ALL_OWNERS) -> str:
        """A valid access token, refreshed first when it expires within the leeway."""
        return await self._in(owner).access_token(uuid)

    async def refresh_access_token(self, uuid: str, *, owner: OwnerScope = ALL_OWNERS) -> str:
        """Refresh now and return the new access token; concurrent calls share one request."""
        return await self._in(owner).refresh_access_token(uuid)

    # -- OAuth authorization -------------------------------------------------------------

    async def begin_authorization(
        self,
        uuid: str,
        redirect_uri: str,
        *,
        scopes: Sequence[str] | None = None,
        actor: str | None = None,
        owner: OwnerScope = ALL_OWNERS,
    ) -> tuple[str, str]:
        """Start an authorization: returns ``(url, state)``; redirect the user to ``url``.

        A single-use pending authorization (state hash, sealed PKCE verifier, redirect URI,
        scopes) is stored server-side and expires after ``authorization_ttl`` seconds.
        """
        return await self._in(owner).begin_authorization(
            uuid, redirect_uri, scopes=scopes, actor=actor
        )

    async def complete_authorization(
        self,
        state: str,
        *,
        code: str | None = None,
        error: str | None = None,
        error_description: str | None = None,
        owner: OwnerScope = ALL_OWNERS,
    ) -> Connection:
        """Finish an authorization from the callback's ``state`` and ``code`` (or ``error``).

        The state is consumed exactly once: an unknown, reused or expired one raises
        InvalidState and changes nothing. A provider ``error`` is recorded on the
        connection and raised as AuthorizationDenied.
        """
        return await self._in(owner).complete_authorization(
            state, code=code, error=error, error_description=error_description
        )

    async def start_device_authorization(
        self,
        uuid: str,
        *,
        scopes: Sequence[str] | None = None,
        actor: str | None = None,
        owner: OwnerScope = ALL_OWNERS,
    ) -> DeviceAuthorization:
        """Start a device authorization (RFC 8628) for a provider that offers it: returns the
        user code and the verification URI to show; no browser or redirect is needed here.

        The device code is kept server-side, sealed, until it is used or expires; then
        call :meth:`complete_device_authorization`.
        """
        return await self._in(owner).start_device_authorization(uuid, scopes=scopes, actor=actor)

    async def complete_device_authorization(
        self,
        uuid: str,
        *,
        actor: str | None = None,
        owner: OwnerScope = ALL_OWNERS,
    ) -> Connection:
        """Wait for the user to approve the device code, polling as the provider asks
        (``interval``, ``slow_down`` adds 5 s, ``authorization_pending`` waits on), then
        store the tokens as an authorization-code exchange does. ``access_denied`` raises
        AuthorizationDenied (recorded on the connection); an expired code raises
        AuthorizationTimeout. To stop waiting sooner, wrap the call in ``asyncio.timeout()``:
        the code stays pending, and another call goes on polling it.
        """
        return await self._in(owner).complete_device_authorization(uuid, actor=actor)

    async def authorization_url(
        self,
        uuid: str,
        redirect_uri: str,
        *,
        scopes: Sequence[str] | None = None,
        state: str | None = None,
        owner: OwnerScope = ALL_OWNERS,
    ) -> str:
        """The seed's authorization URL (PKCE included); a pending authorization is stored."""
        return await self._in(owner).authorization_url(
            uuid, redirect_uri, scopes=scopes, state=state
        )

    async def exchange_code(
        self,
        uuid: str,
        code: str,
        redirect_uri: str,
        *,
        actor: str | None = None,
        owner: OwnerScope = ALL_OWNERS,
    ) -> dict[str, Any]:
        """The seed's code exchange: stores the tokens and returns the (masked) data."""
        return await self._in(owner).exchange_code(uuid, code, redirect_uri, actor=actor)

    async def connect_interactive(
        self,
        uuid: str,
        *,
        scopes: Sequence[str] | None = None,
        open_browser: bool = False,
        timeout: float = 300.0,  # noqa: ASYNC109 - enforced inside with asyncio.timeout
        port: int = 0,
        actor: str | None = None,
        owner: OwnerScope = ALL_OWNERS,
    ) -> Connection:
        """Authorize from a script or notebook through a temporary server on 127.0.0.1.

        Prints the authorization URL (and opens it when ``open_browser``); the redirect
        URI is ``http://127.0.0.1:{port}/callback``. Raises AuthorizationTimeout (a
        TimeoutError) after ``timeout`` seconds.
        """
        return await self._in(owner).connect_interactive(
            uuid,
            scopes=scopes,
            open_browser=open_browser,
            timeout=timeout,
            port=port,
            actor=actor,
        )

    # -- legacy data ----------------------------------------------------------------------

    def register_legacy_migrator(self, name: str, migrator: LegacyMigrator) -> None:
        """Register an application's migrator of pre-uuid data (names must be unique)."""
        self._legacy.register(name, migrator)

    async def run_all_legacy_migrations(self) -> dict[str, bool]:
        """Run every registered legacy migrator; best-effort, never raises."""
        self._check_open()
        return await self._legacy.run_all(self)

    async def run_legacy_migrations(self) -> None:
        """Deprecated: use ``run_all_legacy_migrations()``."""
        warnings.warn(
            "run_legacy_migrations() is deprecated; use run_all_legacy_migrations()",
            DeprecationWarning,
            stacklevel=2,
        )
        await self.run_all_legacy_migrations()

    async def legacy_upsert(
        self, provider: str, name: str, data: Mapping[str, Any], *, owner: str | None = None
    ) -> Connection:
        """For legacy migrators: create or merge a connection from pre-uuid data."""
        return await self._s.connections.legacy_upsert(provider, name, data, owner=owner)

    # -- health sweeps --------------------------------------------------------------------

    async def run_health_sweeps(
        self,
        *,
        interval: float | timedelta,
        stale_after: float | timedelta,
        concurrency: int = 4,
        per_provider_interval: float | timedelta = 0.0,
        refresh_ahead: float | timedelta | None = None,
        on_sweep: SweepCallback | None = None,
    ) -> None:
        """Keep the fleet's connections checked, from a worker; runs until this instance
        closes (or the task running it is cancelled).

        Every process may run it: one at a time sweeps, the holder of a lease row in
        the database that lasts ``interval`` seconds (at least one) and that the leader
        renews three times a lease. The others try to take it as often, so a leader that
        dies, freezes or is cut off is replaced within two intervals; a leader whose
        lease ran out by its own clock, or that finds it taken, stops sweeping at once.
        It holds behind a transaction pooler too (no session lock). Every
        ``interval`` the leader checks each configured connection whose last check is
        older than ``stale_after`` (recorded as ``validate_connection`` does, with actor
        ``"health_sweep"``: an event only when the status changes) and renews OAuth
        tokens that expire within ``refresh_ahead`` (default: ``interval`` plus the
        refresh leeway) and that nobody used. At most ``concurrency`` jobs run at once,
        and one provider's jobs start at least ``per_provider_interval`` apart.
        Connections that need reauthorization are left for their user. ``on_sweep``
        (a function or coroutine function) gets a SweepReport after each sweep.
        """
        options = check_sweep_options(
            interval=interval,
            stale_after=stale_after,
            concurrency=concurrency,
            per_provider_interval=per_provider_interval,
            refresh_ahead=refresh_ahead,
            on_sweep=on_sweep,
        )
        services = self._s
        every, stale, jobs, pace, ahead = options
        sweep = HealthSweep(
            services,
            interval=every,
            stale_after=stale,
            concurrency=jobs,
            per_provider_interval=pace,
            refresh_ahead=ahead,
            on_sweep=on_sweep,
        )
        self._sweeps.add(sweep)
        try:
            await sweep.run()
        finally:
            self._sweeps.discard(sweep)

    # -- keys -----------------------------------------------------------------------------

    async def check_all(
        self,
        *,
        provider: str | None = None,
        concurrency: int = 8,
        record: bool = False,
        owner: OwnerScope = ALL_OWNERS,
        actor: str | None = None,
    ) -> CheckReport:
        """Check the credentials of every connection (of ``provider``, in ``owner``'s scope),
        ``concurrency`` at a time. With ``record=True`` each outcome is recorded as
        ``validate_connection`` does (``actor`` names who asked); otherwise nothing about
        the checks is written."""
        s = self._s
        return await check_all(
            s.core,
            s.checks,
            provider=provider,
            concurrency=concurrency,
            record=record,
            owner=owner,
            actor=names.check_actor(actor),
        )

    async def diagnose(self) -> Diagnosis:
        """Schema version, keys, connections the keys cannot decrypt, listener round trip."""
        return await diagnose_core(self._s.core)

    # -- audit trail ----------------------------------------------------------------------

    async def audit(
        self,
        *,
        uuid: str | None = None,
        owner: OwnerScope = ALL_OWNERS,
        actor: str | None = None,
        since: datetime | None = None,
        action: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> AuditPage:
        """A page of the audit trail, newest first; pass ``before=page.next_before`` for the
        next one. ``action`` is an action (``"credentials.revealed"``) or a family
        (``"credentials"``). See docs/audit.md."""
        return await self._in(owner).audit(
            uuid=uuid, actor=actor, since=since, action=action, limit=limit, before=before
        )

    async def verify_audit(self) -> list[Breach]:
        """Walk the hash chain; each changed, removed or reordered record is reported (an
        empty list: the chain holds)."""
        return await self._s.verify_audit()

    async def sweep_audit(self, *, older_than: timedelta) -> int:
        """Delete audit records older than ``older_than``, recording the sweep in the chain;
        returns how many were deleted."""
        return await self._s.sweep_audit(older_than=older_than)

    async def new_data_key(self) -> str:
        """Make a new data key wrapped by the primary key source (``aws-kms:`` or
        ``pkcs11:``) and return its key id. Processes opened from then on encrypt with it;
        ``rotate_keys()`` moves stored secrets to it once every process has reopened."""
        return await self._s.new_data_key()

    async def rotate_keys(
        self, *, batch_size: int = 500, progress: ProgressCallback | None = None
    ) -> RotationProgress:
        """Re-encrypt every stored secret not yet under the primary key, online.

        Batches of ``batch_size`` rows in uuid order, each in its own short transaction
        (rows another transaction holds are retried once the rest is done), so the
        application keeps working. Rows already under the primary key are skipped: after
        a crash, run it again to resume. ``progress`` (a function or coroutine function)
        gets a RotationProgress after each batch and once more at the end.
        """
        return await self._s.rotate_keys(batch_size=batch_size, progress=progress)
