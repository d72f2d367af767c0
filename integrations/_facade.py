"""The ``Integrations`` facade: lifecycle, the connection API and the wiring of the parts."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from . import _names as names
from ._authflow import AuthFlow
from ._checks import check_credentials
from ._errors import (
    AlreadyExists,
    ConfigurationError,
    Deleted,
    IntegrationsError,
    InvalidAttrs,
    InvalidInput,
    InvalidProviderKey,
    LifecycleError,
    NotConfigured,
    NotFound,
    SchemaOutdated,
)
from ._events import ALL_OWNERS, EventHub, HubStats, OwnerScope, Subscription
from ._http import HttpClient, Response
from ._legacy import LegacyMigrator, LegacyMigrators
from ._models import Connection, Event, Validation, utcnow
from ._providers import Provider, ProviderRegistry
from ._refresher import OAUTH_TYPES, Refresher, TokenPolicy
from ._repository import Change, Repository, StoredRow
from ._rotation import ProgressCallback, RotationProgress, rotate
from ._vault import SECRET_FIELDS, Keyring, Vault, mask_data

log = logging.getLogger("integrations")

# Keys every row carries from birth; a row with nothing else has no saved data.
_BOOKKEEPING = frozenset({"provider", "name", "auth_type", "status", "created_at", "owner"})
# Fields only the library writes; save_setup refuses them.
_RESERVED = _BOOKKEEPING | {
    "validation_status",
    "last_validated_at",
    "reauth_required",
    "connected_at",
}
_SECRETS = frozenset({"access_token", "refresh_token"})
# What disconnect drops for OAuth connections, beyond the secrets.
_TOKEN_FIELDS = (
    "access_token",
    "refresh_token",
    "token_type",
    "expires_at",
    "token_obtained_at",
    "connected_at",
    "granted_scopes",
    "reauth_required",
    "account",
    "token_extras",
    "refresh_error",
)


# Everything the library writes on its own; what remains is what someone saved.
_LIBRARY_WRITTEN = (
    _RESERVED | {"refresh_error", "token_extras", "account"} | (set(_TOKEN_FIELDS) - _SECRETS)
)


class _Unset(enum.Enum):
    """The type of ``_UNSET``: an argument that was left out (``None`` means the system)."""

    UNSET = "unset"


_UNSET = _Unset.UNSET


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Integrations:
    """Stored integration credentials and authenticated calls, backed by PostgreSQL.

    Use ``async with Integrations(dsn) as integ:``, or ``await integ.open()`` /
    ``await integ.close()`` from a framework lifespan.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: Any | None = None,
        http: Any | None = None,
        keys: str | Sequence[str] | None = None,
        providers: Iterable[Provider] | None = None,
        override_providers: bool = False,
        leeway: float = 60.0,
        auto_migrate: bool = True,
        schema: str = "integrations",
        encryption: str = "on",
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
    ) -> None:
        if encryption not in ("on", "off"):
            raise ConfigurationError('encryption must be "on" or "off"')
        if dsn is not None and pool is not None:
            raise ConfigurationError("pass either dsn= or pool=, not both")
        if not isinstance(pool_max_size, int) or pool_max_size < 2:
            # The event listener holds one pooled connection for as long as it listens.
            raise ConfigurationError("pool_max_size must be at least 2")
        self._dsn = dsn
        self._pool_arg = pool
        self._http_arg = http
        self._keys_arg = keys
        self._encryption = encryption
        self._leeway = float(leeway)
        self._auto_migrate = auto_migrate
        self._schema = names.check_identifier(schema, "schema")
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._pool_max_size = pool_max_size
        self._check_timeout = check_timeout
        self.providers = ProviderRegistry(providers or (), override=override_providers)
        self._repo = Repository(
            self._schema, channel=f"{self._schema}_events", lock_timeout=lock_timeout
        )
        self._vault = Vault(None, encryption=encryption)
        self._legacy = LegacyMigrators()
        self._http_client = HttpClient(http)
        self._hub: EventHub | None = None
        self._state = _State.NEW
        self._teardown: asyncio.Task[None] | None = None
        self.embedded_dsn: str | None = None
        policy = TokenPolicy(
            leeway=self._leeway,
            lock_timeout=lock_timeout,
            timeout=token_timeout,
            attempts=token_attempts,
            backoff=token_backoff,
            cooldown=refresh_cooldown,
        )
        self._refresher = Refresher(self, policy)
        self._authflow = AuthFlow(
            self, ttl=authorization_ttl, token_timeout=token_timeout, revoke_timeout=revoke_timeout
        )

    def __repr__(self) -> str:
        return f"<Integrations schema={self._schema!r} state={self._state.value}>"

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
            raise LifecycleError(f"Integrations is already {self._state.value}; create a new one")
        self._state = _State.OPEN
        try:
            await self._open()
        except SchemaOutdated:
            # Left unopened so that ``await integ.migrate()`` then ``open()`` works.
            await self._repo.close()
            self._state = _State.NEW
            raise
        except BaseException:
            await self.close()
            raise

    async def _connect(self) -> None:
        """Resolve the DSN and keys (starting the embedded server if need be) and connect."""
        dsn = self._dsn
        keys: str | Sequence[str] | None = self._keys_arg
        if dsn is None and self._pool_arg is None:
            dsn = os.environ.get("INTEGRATIONS_DSN") or None
            if dsn is None:
                from ._embedded import default_data_dir, ensure_key_file, start_embedded

                data_dir = self._data_dir or default_data_dir()
                dsn = await start_embedded(data_dir)
                self.embedded_dsn = dsn
                if keys is None and not os.environ.get("INTEGRATIONS_KEYS"):
                    keys = ensure_key_file(data_dir)
        keyring = Keyring.parse(keys) if keys is not None else Keyring.from_env()
        self._vault = Vault(keyring, encryption=self._encryption)
        await self._repo.open(dsn=dsn, pool=self._pool_arg, max_size=self._pool_max_size)

    async def _open(self) -> None:
        await self._connect()
        if await self._repo.schema_version() < self._repo.q.latest_version:
            if not self._auto_migrate:
                raise SchemaOutdated()
            await self._repo.migrate()
        # Opens no connection: the LISTEN connection waits for the first subscribe().
        self._hub = EventHub(self._repo.listen, self._repo.channel)

    async def close(self) -> None:
        """Release what was opened, in reverse order; injected pool and session stay open.

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
                stack.push_async_callback(self._http_client.close)
                # Before the HTTP client: a disconnect in flight still revokes its grant.
                stack.push_async_callback(self._authflow.close)
                stack.push_async_callback(self._refresher.close)
                # Before the pool: the hub's listener is a pooled connection, and ending the
                # subscriptions first lets every ``async for`` finish cleanly.
                if self._hub is not None:
                    stack.push_async_callback(self._hub.close)
        finally:
            self._state = _State.CLOSED

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            raise LifecycleError(
                "Integrations is not open: use 'async with Integrations(...)' or await open()"
                if self._state is _State.NEW
                else f"Integrations is {self._state.value}"
            )

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

    # -- events -------------------------------------------------------------------------

    def subscribe(
        self,
        *,
        provider: str | None = None,
        uuid: str | None = None,
        owner: OwnerScope | _Unset = _UNSET,
        kinds: Iterable[str] | None = None,
        maxsize: int = 1000,
    ) -> AbstractAsyncContextManager[Subscription]:
        """Committed changes from every process on this database: ``async with integ.subscribe()``.

        Filters combine: ``provider`` and ``uuid`` narrow to one provider or connection,
        ``kinds`` to some event kinds. ``owner=None`` sees system connections only, an
        owner string sees that owner's, ``ALL_OWNERS`` sees all; left out, it is ``None``
        unless ``uuid`` is given (a uuid names one connection, whoever owns it). When more than
        ``maxsize`` events wait unread the oldest are dropped and counted in
        ``Subscription.dropped``. Arguments are checked here, before ``async with``.
        """
        hub = self._event_hub()
        if provider is not None:
            provider = self.providers.get(provider).key
        if uuid is not None:
            uuid = names.require_uuid(uuid)
        if isinstance(owner, _Unset):
            owner = ALL_OWNERS if uuid is not None else None
        elif owner is not ALL_OWNERS:
            owner = names.check_owner(owner)
        return hub.subscribe(
            provider=provider, uuid=uuid, owner=owner, kinds=kinds, maxsize=maxsize
        )

    @property
    def event_stats(self) -> HubStats:
        """Counters of this instance's event listener: received, malformed, reconnects."""
        return self._event_hub().stats

    def _event_hub(self) -> EventHub:
        self._check_open()
        if self._hub is None:
            raise LifecycleError("Integrations is still opening")
        return self._hub

    # -- helpers ----------------------------------------------------------------------

    def _provider_of(self, row: StoredRow) -> Provider | None:
        key = names.provider_of_key(row.key)
        return self.providers.get(key) if key in self.providers else None

    def _secret_fields(self, provider: Provider | None) -> frozenset[str]:
        return provider.secret_field_keys if provider is not None else frozenset()

    def _masked(self, row: StoredRow) -> dict[str, Any]:
        return mask_data(row.data, self._secret_fields(self._provider_of(row)))

    def _connection(self, row: StoredRow) -> Connection:
        return Connection(
            uuid=row.uuid,
            provider=names.provider_of_key(row.key),
            name=names.name_of_key(row.key),
            owner=row.owner,
            data=self._masked(row),
        )

    def _plain(self, row: StoredRow) -> dict[str, Any]:
        return self._vault.unseal(row.uuid, row.data, self._secret_fields(self._provider_of(row)))

    def _event(
        self,
        kind: str,
        row: StoredRow,
        *,
        key: str | None = None,
        status: str | None = None,
        previous_status: str | None = None,
        actor: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> Event:
        stored_key = key or row.key
        return Event(
            kind=kind,
            uuid=row.uuid,
            provider=names.provider_of_key(stored_key),
            name=names.name_of_key(stored_key),
            owner=row.owner,
            status=status if status is not None else row.data.get("status"),
            previous_status=previous_status,
            actor=actor,
            detail=dict(detail or {}),
        )

    async def _row_by_ref(
        self, ref: object, owner: str | _Unset | None
    ) -> tuple[StoredRow | None, bool]:
        """Resolve a uuid or provider ref; the flag says whether the input was a uuid.

        A provider ref is looked up in ``owner``'s scope (the system scope when left out).
        A uuid names its row directly, unless an owner is given: then another owner's row
        is as good as missing.
        """
        scope = None if isinstance(owner, _Unset) else names.check_owner(owner)
        as_uuid = names.parse_uuid(ref)
        if as_uuid is not None:
            row = await self._repo.get(as_uuid)
            if row is not None and not isinstance(owner, _Unset) and row.owner != scope:
                row = None
            return row, True
        provider, name = names.parse_ref(ref)
        return await self._repo.get_by_key(scope, names.storage_key(provider, name)), False

    # -- connections --------------------------------------------------------------------

    async def add_connection(
        self, provider: str, name: str, *, actor: str | None = None, owner: str | None = None
    ) -> Connection:
        """Create a named connection; the only place a storage key is built."""
        self._check_open()
        definition = self.providers.get(provider)
        clean = names.normalize_name(name)
        owner = names.check_owner(owner)
        actor = names.check_actor(actor)
        uuid = names.uuid7()
        data: dict[str, Any] = {
            "provider": definition.key,
            "name": clean,
            "auth_type": definition.auth_type,
            "status": "disconnected",
        }
        key = names.storage_key(definition.key, clean)
        stub = StoredRow(uuid=uuid, owner=owner, key=key, data=data, version=1)
        row = await self._repo.insert(
            uuid, owner, key, data, [self._event("connection_added", stub, actor=actor)]
        )
        if row is None:
            raise AlreadyExists(f"a {definition.key} connection named {clean!r} already exists")
        return self._connection(row)

    async def rename_connection(
        self, uuid: str, new_name: str, *, actor: str | None = None
    ) -> dict[str, Any]:
        """Rename in place: the key's name part is rewritten, the uuid never changes."""
        self._check_open()
        uuid = names.require_uuid(uuid)
        clean = names.normalize_name(new_name)
        actor = names.check_actor(actor)

        def decide(row: StoredRow | None) -> tuple[Change, StoredRow]:
            if row is None:
                raise NotConfigured()
            if names.name_of_key(row.key) == clean:
                return Change(), row
            old_name = names.name_of_key(row.key)
            new_key = names.renamed_key(row.key, clean)
            data = {**row.data, "name": clean}
            renamed = StoredRow(row.uuid, row.owner, new_key, data, row.version + 1)
            event = self._event(
                "connection_renamed",
                renamed,
                previous_status=row.data.get("status"),
                actor=actor,
                detail={"old_name": old_name, "new_name": clean},
            )
            return Change(data=data, key=new_key, events=[event]), renamed

        row = await self._repo.modify(uuid, decide)
        return self._masked(row)

    async def remove_connection(self, uuid: str, *, actor: str | None = None) -> None:
        """Delete a connection; consumers pinned to its uuid then get ``deleted``."""
        self._check_open()
        uuid = names.require_uuid(uuid)
        actor = names.check_actor(actor)

        def decide(row: StoredRow | None) -> tuple[Change, StoredRow]:
            if row is None:
                # As rename_connection: a uuid that resolves to nothing is not configured.
                raise NotConfigured()
            event = self._event(
                "connection_removed", row, previous_status=row.data.get("status"), actor=actor
            )
            return Change(delete=True, events=[event]), row

        with self._authflow.operation():
            removed = await self._repo.modify(uuid, decide)
            self._authflow.revoke_later(self._provider_of(removed), removed)

    async def list_connections(
        self, provider: str, *, owner: str | None = None
    ) -> list[Connection]:
        """A provider's connections: "default" first, then by name."""
        self._check_open()
        return (await self.load_all_connections([provider], owner=owner))[provider]

    async def load_all_connections(
        self, providers: Iterable[str], *, owner: str | None = None
    ) -> dict[str, list[Connection]]:
        """Connections of several providers in one SQL statement; every asked key is present."""
        self._check_open()
        if isinstance(providers, str) or not isinstance(providers, Iterable):
            raise InvalidProviderKey("providers must be a list of provider keys")
        keys = [self.providers.get(p).key for p in providers]
        owner = names.check_owner(owner)
        result: dict[str, list[Connection]] = {key: [] for key in keys}
        if not keys:
            return result
        rows = await self._repo.list_by_prefixes(
            owner, [names.storage_key(key, "") for key in dict.fromkeys(keys)]
        )
        for row in rows:
            connection = self._connection(row)
            if connection.provider in result:
                result[connection.provider].append(connection)
        for connections in result.values():
            connections.sort(key=lambda c: (c.name != names.DEFAULT_NAME, c.name))
        return result

    async def list_integrations(self, *, owner: str | None = None) -> list[Connection]:
        """Connections that have saved data (setup or credentials), by provider then name."""
        self._check_open()
        owner = names.check_owner(owner)
        rows = await self._repo.list_by_prefixes(owner, [names.KEY_PREFIX])
        found = [self._connection(row) for row in rows if _has_saved_data(row.data)]
        found.sort(key=lambda c: (c.provider, c.name != names.DEFAULT_NAME, c.name))
        return found

    def list_providers(self) -> list[Provider]:
        """Every known provider, built-in and registered, by key."""
        return self.providers.all()

    # -- lookups ------------------------------------------------------------------------

    async def get_integration(
        self, ref: str, *, owner: str | _Unset | None = _UNSET
    ) -> dict[str, Any]:
        """The whole decrypted data of a connection, by uuid or ``provider:name``.

        ``owner`` scopes the lookup (see ``get_credentials``).
        """
        self._check_open()
        if not isinstance(owner, _Unset):
            names.check_owner(owner)
        try:
            row, by_uuid = await self._row_by_ref(ref, owner)
        except InvalidInput as exc:
            raise InvalidProviderKey("malformed provider:name reference") from exc
        if row is None:
            raise Deleted() if by_uuid else NotConfigured()
        return self._plain(row)

    async def get_integration_by_uuid(self, uuid: str) -> Connection:
        """The connection (masked) by its row uuid."""
        self._check_open()
        row = await self._repo.get(names.require_uuid(uuid))
        if row is None:
            raise NotConfigured()
        return self._connection(row)

    async def find_uuid_by_provider_name(self, ref: Any, *, owner: str | None = None) -> str:
        """``"p:n"``, ``"p"`` (= ``"p:default"``) or ``("p", "n")`` → uuid; never guesses."""
        self._check_open()
        provider, name = names.parse_ref(ref)
        owner = names.check_owner(owner)
        found = await self._repo.uuid_by_key(owner, names.storage_key(provider, name))
        if found is None:
            raise NotFound()
        return found

    async def resolve_to_uuid(self, value: Any, *, owner: str | _Unset | None = _UNSET) -> str:
        """A uuid that exists → itself; a provider ref → its uuid.

        ``owner`` scopes the lookup (see ``get_credentials``).
        """
        self._check_open()
        if not isinstance(value, str) or not value.strip():
            raise InvalidInput("expected a uuid or a provider:name reference")
        row, _by_uuid = await self._row_by_ref(value.strip(), owner)
        if row is None:
            raise NotFound()
        return row.uuid

    def settings_key(self, ref: str) -> str:
        """The storage key for ``"google"`` or ``"google:personal"``."""
        return names.settings_key(ref)

    async def get_credentials(
        self, ref: str, *, owner: str | _Unset | None = _UNSET
    ) -> dict[str, Any]:
        """Decrypted credentials for API calls, by uuid or ``provider:name``.

        A ``provider:name`` ref is looked up in ``owner``'s scope, the system scope when
        ``owner`` is left out. A uuid names its row directly; with an explicit ``owner``
        (``None`` included) a row of another owner counts as missing.
        """
        self._check_open()
        row, by_uuid = await self._row_by_ref(ref, owner)
        if row is None:
            raise Deleted() if by_uuid else NotConfigured()
        provider = self._provider_of(row)
        if not self._has_credentials(provider, row.data):
            raise NotConfigured("the connection has no saved credentials")
        return self._vault.unseal(row.uuid, row.data, self._secret_fields(provider))

    def _has_credentials(self, provider: Provider | None, data: Mapping[str, Any]) -> bool:
        if provider is not None and (
            provider.has_runtime_credentials(data) or provider.is_configured(data)
        ):
            return True
        return _has_saved_data(data)

    async def is_connected(self, uuid: str) -> bool:
        """True when the connection is connected and holds runtime credentials."""
        self._check_open()
        row = await self._repo.get(names.require_uuid(uuid))
        if row is None or row.data.get("status") != "connected":
            return False
        provider = self._provider_of(row)
        return provider is not None and provider.has_runtime_credentials(row.data)

    # -- writes ------------------------------------------------------------------------

    async def save_setup(
        self, uuid: str, attrs: Mapping[str, Any], *, actor: str | None = None
    ) -> dict[str, Any]:
        """Merge setup attributes into the connection; tokens already obtained are kept."""
        self._check_open()
        uuid = names.require_uuid(uuid)
        actor = names.check_actor(actor)
        if not isinstance(attrs, Mapping):
            raise InvalidAttrs("attrs must be a mapping of setup fields")
        if any(not isinstance(k, str) for k in attrs):
            raise InvalidAttrs("setup field names must be strings")
        current = await self._repo.get(uuid)
        if current is None:
            raise NotConfigured()
        provider = self.providers.get(names.provider_of_key(current.key))
        patch = provider.normalize_attrs(attrs)
        reserved = sorted(set(patch) & _RESERVED)
        if reserved:
            raise InvalidAttrs(f"these fields are managed by the library: {', '.join(reserved)}")
        sealed = self._vault.seal(uuid, patch, provider.secret_field_keys)

        def decide(row: StoredRow | None) -> tuple[Change, StoredRow]:
            if row is None:
                raise NotConfigured()
            data = dict(row.data)
            for field, value in sealed.items():
                old = data.get(field)
                if field == "credentials" and isinstance(old, dict) and isinstance(value, dict):
                    data[field] = {**old, **value}
                else:
                    data[field] = value
            missing = provider.missing_required(data)
            if missing:
                from ._errors import MissingField

                raise MissingField(f"required setup field missing: {', '.join(missing)}")
            # New setup (a corrected client secret, say) is worth another refresh at once.
            data.pop("refresh_error", None)
            previous = row.data.get("status")
            if not provider.has_runtime_credentials(data):
                data["status"] = "disconnected"
            elif provider.auth_type not in ("oauth2",) and previous != "error":
                data["status"] = "connected"
            updated = StoredRow(row.uuid, row.owner, row.key, data, row.version + 1)
            event = self._event(
                "setup_saved",
                updated,
                status=data.get("status"),
                previous_status=previous,
                actor=actor,
                detail={"fields": sorted(patch)},
            )
            return Change(data=data, events=[event]), updated

        row = await self._repo.modify(uuid, decide)
        return self._masked(row)

    async def disconnect(self, uuid: str, *, actor: str | None = None) -> None:
        """Drop runtime credentials (tokens, keys); OAuth client id/secret are kept."""
        self._check_open()
        uuid = names.require_uuid(uuid)
        actor = names.check_actor(actor)

        def decide(row: StoredRow | None) -> tuple[Change, StoredRow | None]:
            if row is None:
                return Change(), None
            provider = self._provider_of(row)
            drop = set(_TOKEN_FIELDS)
            if provider is not None and not provider.auth_type.startswith("oauth2"):
                drop.update(provider.runtime_fields)
            data = {k: v for k, v in row.data.items() if k not in drop}
            previous = row.data.get("status")
            data["status"] = "disconnected"
            updated = StoredRow(row.uuid, row.owner, row.key, data, row.version + 1)
            event = self._event("disconnected", updated, previous_status=previous, actor=actor)
            return Change(data=data, events=[event]), row

        # The tokens are taken under the row lock, revoked only once the change committed.
        with self._authflow.operation():
            dropped = await self._repo.modify(uuid, decide)
            if dropped is not None:
                self._authflow.revoke_later(self._provider_of(dropped), dropped)

    async def record_validation(self, uuid: str, result: Any) -> None:
        """Store a check's outcome; an event only when status or validation_status changed."""
        self._check_open()
        uuid = names.require_uuid(uuid)
        ok, message = _validation_outcome(result)
        await self._record(uuid, ok, message, actor=None)

    def _fingerprint(self, row: StoredRow) -> str:
        """What a check depends on: the sealed credentials (OAuth tokens: only their presence,
        since a refresh during the check replaces them legitimately)."""
        provider = self._provider_of(row)
        fields = sorted(SECRET_FIELDS | self._secret_fields(provider) | {"credentials"})
        return json.dumps(
            {
                field: bool(row.data.get(field))
                if field in ("access_token", "refresh_token")
                else row.data.get(field)
                for field in fields
            },
            sort_keys=True,
            default=str,
        )

    async def _record(
        self,
        uuid: str,
        ok: bool,
        message: str,
        *,
        actor: str | None,
        checked: str | None = None,
    ) -> None:
        now = utcnow().isoformat()

        def decide(row: StoredRow | None) -> tuple[Change, None]:
            if row is None:
                # A check that raced a removal has nothing left to record on.
                return Change(), None
            if checked is not None and self._fingerprint(row) != checked:
                # The credentials changed while they were checked (a disconnect, a new key):
                # the outcome is about what is gone, so it must not set the status.
                return Change(data={**row.data, "last_validated_at": now}), None
            previous = row.data.get("status")
            previous_message = row.data.get("validation_status")
            status = "connected" if ok else "error"
            data = {
                **row.data,
                "status": status,
                "validation_status": message,
                "last_validated_at": now,
            }
            events = []
            if status != previous or message != previous_message:
                updated = StoredRow(row.uuid, row.owner, row.key, data, row.version)
                events.append(
                    self._event(
                        "validated",
                        updated,
                        previous_status=previous,
                        actor=actor,
                        detail={"ok": ok, "validation_status": message},
                    )
                )
            return Change(data=data, events=events), None

        await self._repo.modify(uuid, decide)

    # -- checks -------------------------------------------------------------------------

    async def validate_credentials(self, provider: str, attrs: Mapping[str, Any]) -> Validation:
        """Probe the provider with in-memory credentials; nothing is stored."""
        self._check_open()
        definition = self.providers.get(provider)
        if not isinstance(attrs, Mapping):
            raise InvalidAttrs("attrs must be a mapping of setup fields")
        patch = definition.normalize_attrs(attrs)
        return await self._check(definition, patch)

    async def validate_connection(self, uuid: str, *, actor: str | None = None) -> Validation:
        """Probe the stored credentials and record the outcome on the connection."""
        self._check_open()
        uuid = names.require_uuid(uuid)
        actor = names.check_actor(actor)
        row = await self._repo.get(uuid)
        if row is None:
            return Validation(False, "Not configured")
        provider = self._provider_of(row)
        checked = self._fingerprint(row)
        if provider is None:
            result = Validation(False, "Unknown provider")
        else:
            credentials = self._plain(row)
            if provider.auth_type.startswith("oauth2") and (
                credentials.get("refresh_token") or provider.auth_type != "oauth2"
            ):
                # An expiring token would make a healthy connection look broken: renew first.
                try:
                    if provider.auth_type == "oauth2_client_credentials":
                        # A fresh token is what proves the client credentials still work.
                        token = await self._refresher.refresh(row, provider)
                    else:
                        token = await self._refresher.access_token(row, provider)
                    credentials["access_token"] = token
                except IntegrationsError as exc:
                    result = Validation(False, exc.message)
                    await self._record(
                        uuid, result.ok, result.message, actor=actor, checked=checked
                    )
                    return result
            if provider.auth_type == "oauth2_client_credentials" and provider.validation is None:
                # Getting a token with the client credentials was the check.
                result = Validation(True, "Connected")
            else:
                result = await self._check(provider, credentials)
        await self._record(uuid, result.ok, result.message, actor=actor, checked=checked)
        return result

    async def _check(self, provider: Provider, credentials: Mapping[str, Any]) -> Validation:
        return await check_credentials(
            provider, credentials, http=self._http_client, timeout=self._check_timeout
        )

    # -- authenticated requests -----------------------------------------------------------

    async def authenticated_request(
        self,
        uuid: str,
        method: str,
        url: str,
        *,
        allow_any_host: bool = False,
        max_attempts: int | None = None,
        owner: str | _Unset | None = _UNSET,
        **opts: Any,
    ) -> Response:
        """Send a request with the connection's credentials, only to the provider's API hosts.

        ``uuid`` may also be a ``provider:name`` ref, looked up in ``owner``'s scope (see
        ``get_credentials``). ``allow_any_host=True`` sends the
        credentials wherever ``url`` points: dangerous, only for URLs you fully control.
        ``opts`` are ``headers``, ``params``, ``json``, ``data``, ``timeout`` and other
        aiohttp request options.
        """
        self._check_open()
        if not isinstance(method, str) or not method.isalpha():
            raise InvalidInput("method must be an HTTP method name such as 'GET'")
        row, by_uuid = await self._row_by_ref(uuid, owner)
        if row is None:
            raise Deleted() if by_uuid else NotConfigured()
        provider = self._provider_of(row)
        if provider is None:
            raise InvalidProviderKey("the connection's provider is not registered")
        if provider.auth_type in OAUTH_TYPES:
            return await self._refresher.request(
                row,
                provider,
                method.upper(),
                url,
                allow_any_host=allow_any_host,
                max_attempts=max_attempts,
                opts=opts,
            )
        credentials = self._vault.unseal(row.uuid, row.data, provider.secret_field_keys)
        return await self._http_client.request(
            method.upper(),
            url,
            provider=provider,
            credentials=credentials,
            allow_any_host=allow_any_host,
            max_attempts=max_attempts,
            **opts,
        )

    # -- OAuth --------------------------------------------------------------------------

    async def begin_authorization(
        self,
        uuid: str,
        redirect_uri: str,
        *,
        scopes: Sequence[str] | None = None,
        actor: str | None = None,
    ) -> tuple[str, str]:
        """Start an authorization: returns ``(url, state)``; redirect the user to ``url``.

        A single-use pending authorization (a hash of the state, the sealed PKCE
        verifier, the redirect URI and scopes) is stored server-side and expires
        after ``authorization_ttl`` seconds.
        """
        self._check_open()
        uuid = names.require_uuid(uuid)
        actor = names.check_actor(actor)
        return await self._authflow.begin(uuid, redirect_uri, scopes=scopes, actor=actor)

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
        self._check_open()
        row = await self._authflow.complete(
            state, code=code, error=error, error_description=error_description
        )
        return self._connection(row)

    async def authorization_url(
        self,
        uuid: str,
        redirect_uri: str,
        *,
        scopes: Sequence[str] | None = None,
        state: str | None = None,
    ) -> str:
        """The seed's authorization URL; PKCE included when the provider uses it.

        A pending authorization is stored (a fresh state is made when none is given)
        so that ``exchange_code``, or ``complete_authorization`` with the state, finds
        the PKCE verifier.
        """
        self._check_open()
        uuid = names.require_uuid(uuid)
        url, _ = await self._authflow.begin(
            uuid, redirect_uri, scopes=scopes, actor=None, state=state
        )
        return url

    async def exchange_code(
        self, uuid: str, code: str, redirect_uri: str, *, actor: str | None = None
    ) -> dict[str, Any]:
        """The seed's code exchange: stores the tokens and returns the (masked) data."""
        self._check_open()
        uuid = names.require_uuid(uuid)
        actor = names.check_actor(actor)
        row = await self._authflow.exchange(uuid, code, redirect_uri, actor)
        return self._masked(row)

    async def access_token(self, uuid: str) -> str:
        """A valid access token, refreshed first when it expires within the leeway.

        For ``oauth2_client_credentials`` providers the token is fetched on demand
        and cached on the connection.
        """
        self._check_open()
        row, provider = await self._oauth_row(uuid)
        return await self._refresher.access_token(row, provider)

    async def refresh_access_token(self, uuid: str) -> str:
        """Refresh now and return the new access token; concurrent calls share one request."""
        self._check_open()
        row, provider = await self._oauth_row(uuid)
        return await self._refresher.refresh(row, provider)

    async def connect_interactive(
        self,
        uuid: str,
        *,
        scopes: Sequence[str] | None = None,
        open_browser: bool = False,
        timeout: float = 300.0,  # noqa: ASYNC109 - enforced inside with asyncio.timeout
        port: int = 0,
    ) -> Connection:
        """Authorize from a script or notebook through a temporary server on 127.0.0.1.

        Prints the authorization URL (and opens it when ``open_browser``); the
        redirect URI is ``http://127.0.0.1:{port}/callback``, register it with the
        provider. Raises AuthorizationTimeout (a TimeoutError) after ``timeout`` seconds.
        """
        self._check_open()
        uuid = names.require_uuid(uuid)
        from ._interactive import connect_interactive

        return await connect_interactive(
            self, uuid, scopes=scopes, open_browser=open_browser, timeout=timeout, port=port
        )

    async def _require_row(self, uuid: str) -> StoredRow:
        row = await self._repo.get(uuid)
        if row is None:
            raise NotConfigured()
        return row

    async def _oauth_row(self, uuid: str) -> tuple[StoredRow, Provider]:
        row = await self._require_row(names.require_uuid(uuid))
        provider = self._provider_of(row)
        if provider is None:
            raise InvalidProviderKey("the connection's provider is not registered")
        return row, provider

    # -- legacy -------------------------------------------------------------------------

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
        self._check_open()
        try:
            connection = await self.add_connection(provider, name, owner=owner)
        except AlreadyExists:
            uuid = await self.find_uuid_by_provider_name(
                (provider, names.normalize_name(name)), owner=owner
            )
        else:
            uuid = connection.uuid
        await self.save_setup(uuid, data)
        return await self.get_integration_by_uuid(uuid)

    # -- key rotation -----------------------------------------------------------------

    async def rotate_keys(
        self, *, batch_size: int = 500, progress: ProgressCallback | None = None
    ) -> RotationProgress:
        """Re-encrypt every stored secret not yet under the primary key, online.

        Connections (then the PKCE verifiers of pending authorizations) are taken in
        batches of ``batch_size`` rows in uuid order, each batch in its own short
        transaction with its rows locked (rows another transaction holds are skipped and
        retried once the rest is done), so the application keeps reading and writing
        meanwhile. Rows already under the primary key are skipped: after a crash, run it
        again to resume. ``progress`` (a function or a coroutine function) gets a
        RotationProgress after each batch and once more at the end (``done=True``); the
        final one is returned. A row sealed with a key that is not in the keyring raises
        UnknownKey naming the key id and the row; the batch holding it is left as it was.
        """
        self._check_open()
        return await rotate(
            self._repo,
            self._vault,
            secret_fields_of=lambda row: self._secret_fields(self._provider_of(row)),
            all_secret_fields=[f for p in self.providers.all() for f in p.secret_field_keys],
            batch_size=batch_size,
            progress=progress,
        )


def _has_saved_data(data: Mapping[str, Any]) -> bool:
    """Whether anything but what the library itself writes (status, checks, token metadata)."""
    return any(k not in _LIBRARY_WRITTEN and data.get(k) not in (None, "", {}) for k in data)


def _validation_outcome(result: Any) -> tuple[bool, str]:
    """Accept a Validation, True/"ok", False, (False, message), an exception or a message."""
    if isinstance(result, Validation):
        return result.ok, result.message
    if result is True or result == "ok":
        return True, "ok"
    if result is False or result is None:
        return False, "Validation failed"
    if isinstance(result, tuple) and len(result) == 2 and result[0] in ("ok", "error"):
        # The seed's {:ok, _} / {:error, reason} shapes.
        return (True, "ok") if result[0] == "ok" else (False, str(result[1] or "Failed"))
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bool):
        return result[0], str(result[1]) if result[1] else ("ok" if result[0] else "Failed")
    if isinstance(result, BaseException):
        return False, str(getattr(result, "message", None) or type(result).__name__)
    if isinstance(result, str):
        return False, result
    raise InvalidInput("result must be a Validation, True/'ok', False, (ok, message) or an error")


def _iso(value: datetime) -> str:
    return value.isoformat()
