"""The core built at ``open()``: repository, vault, providers, HTTP client, event hub, settings."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from . import _names as names
from . import _telemetry as telemetry
from ._audit import AuditLog
from ._cache import CachedRepository, RowCache
from ._errors import ConfigurationError, InvalidProviderKey
from ._events import EventHub
from ._http import HttpClient
from ._keysource import Custody, load_keyring, parse_sources
from ._models import Connection
from ._names import shown
from ._providers import Provider
from ._record import StoredRow
from ._registry import ProviderRegistry
from ._repository import Pool, Repository
from ._settings import Settings, check_at_most
from ._token_endpoint import TokenEndpoint
from ._vault import ENV_KEYS, Vault, mask_data

log = logging.getLogger("integrations")

__all__ = ["Core", "connect", "storage", "unwrap_keys"]


def storage(
    settings: Settings,
    *,
    cache: bool,
    cache_size: int,
    statement_cache_size: int | None,
    listen_dsn: str | None,
    pool: Pool | None,
) -> CachedRepository:
    """The repository (with its row cache) for these options; a bad one is a
    ConfigurationError. Nothing connects until ``connect()``."""
    if statement_cache_size is not None and (
        isinstance(statement_cache_size, bool)
        or not isinstance(statement_cache_size, int)
        or statement_cache_size < 0
    ):
        raise ConfigurationError(
            f"statement_cache_size must be an int >= 0, got {shown(statement_cache_size)}."
        )
    if statement_cache_size is not None:
        check_at_most("statement_cache_size", statement_cache_size)
    if statement_cache_size is not None and pool is not None:
        raise ConfigurationError(
            "statement_cache_size applies to the pool the library creates; with pool= "
            "create your pool with it instead."
        )
    if listen_dsn is not None and (not isinstance(listen_dsn, str) or not listen_dsn):
        raise ConfigurationError("listen_dsn must be a non-empty DSN string.")
    if not isinstance(cache, bool):
        raise ConfigurationError(f"cache must be True or False, got {shown(cache)}.")
    if cache and statement_cache_size is not None and listen_dsn is None:
        # statement_cache_size says "behind a transaction pooler", where LISTEN through
        # the pooler misses notifications: a cache fed by them could serve stale rows.
        log.warning(
            "The row cache is off: behind a transaction pooler it needs listen_dsn= (a "
            "direct connection for LISTEN).",
            extra=telemetry.fields("cache_disabled"),
        )
        cache = False
    if isinstance(cache_size, int) and not isinstance(cache_size, bool):
        check_at_most("cache_size", cache_size)
    try:
        row_cache = RowCache(enabled=cache, capacity=cache_size)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    return CachedRepository(
        settings.schema,
        channel=f"{settings.schema}_events",
        cache=row_cache,
        lock_timeout=settings.token.lock_timeout,
        statement_cache_size=statement_cache_size,
        listen_dsn=listen_dsn,
    )


async def connect(
    repo: Repository,
    *,
    dsn: str | None,
    pool: Pool | None,
    keys: str | Sequence[str] | None,
    encryption: Literal["on", "off"],
    data_dir: Path | None,
    pool_max_size: int,
) -> tuple[Vault, str | None]:
    """Resolve the DSN and keys (starting the embedded server if need be) and open ``repo``.

    Returns the vault and, when the embedded server was started, its DSN.
    """
    embedded: str | None = None
    if dsn is None and pool is None:
        dsn = os.environ.get("INTEGRATIONS_DSN") or None
        if dsn is None:
            from ._embedded import default_data_dir, ensure_key_file, start_embedded

            directory = data_dir or default_data_dir()
            dsn = embedded = await start_embedded(directory)
            if keys is None and not os.environ.get("INTEGRATIONS_KEYS"):
                keys = ensure_key_file(directory)
    if keys is None:
        value = os.environ.get(ENV_KEYS, "")
        keys = value if value.strip(" \t\r\n,") else None
    sources = parse_sources(keys) if keys is not None else None
    if sources is None and encryption == "on":
        log.warning(
            "No encryption keys are configured (keys= or INTEGRATIONS_KEYS), so saving a "
            "secret will fail; generate one with integrations.generate_key().",
            extra=telemetry.fields("encryption_keys_missing"),
        )
    vault = Vault(None, encryption=encryption)
    if sources is not None:
        custody = Custody(sources)
        if custody.needs_store:
            # Data keys live in the schema: unwrapped once the schema is up to date.
            vault.pending = sources
        else:
            vault.install(await load_keyring(sources, None))
    await repo.open(dsn=dsn, pool=pool, max_size=pool_max_size)
    return vault, embedded


async def unwrap_keys(vault: Vault, repo: Repository) -> None:
    """Load the keys of sources that keep wrapped data keys in the database (a KMS, an
    HSM): one call to the key holder per data key, here and never again in this process."""
    sources, vault.pending = vault.pending, None
    if sources:
        vault.install(await load_keyring(sources, repo))


class Core:
    """What every service stands on; services receive it and never see the facade."""

    __slots__ = ("_endpoints", "audit", "http", "hub", "providers", "repo", "settings", "vault")

    def __init__(
        self,
        *,
        repo: CachedRepository,
        vault: Vault,
        providers: ProviderRegistry,
        http: HttpClient,
        hub: EventHub,
        settings: Settings,
        audit: AuditLog,
    ) -> None:
        self.audit = audit
        self.repo = repo
        self.vault = vault
        self.providers = providers
        self.http = http
        self.hub = hub
        self.settings = settings
        self._endpoints: dict[int, TokenEndpoint] = {}

    def token_endpoint(self, provider: Provider) -> TokenEndpoint:
        """The provider's token endpoint client, built once per provider."""
        endpoint = self._endpoints.get(id(provider))
        if endpoint is None or endpoint.provider is not provider:
            endpoint = self._endpoints[id(provider)] = TokenEndpoint(provider)
        return endpoint

    def provider_of(self, row: StoredRow) -> Provider | None:
        """The row's provider, None when it is no longer registered; per-tenant API hosts
        rendered from the row's setup values."""
        provider = self.providers.find(row.provider)
        return provider.for_data(row.data) if provider is not None else None

    def require_provider(self, row: StoredRow) -> Provider:
        provider = self.provider_of(row)
        if provider is None:
            raise InvalidProviderKey(
                f"The connection's provider {row.provider!r} is not registered; register it "
                "with Integrations(providers=[...]) to use this connection.",
                provider=row.provider,
            )
        return provider

    def secret_fields(self, row: StoredRow) -> frozenset[str]:
        provider = self.provider_of(row)
        return provider.secret_field_keys if provider is not None else frozenset()

    def masked(self, row: StoredRow) -> dict[str, Any]:
        return mask_data(row.data, self.secret_fields(row))

    def connection(self, row: StoredRow) -> Connection:
        return Connection(
            uuid=row.uuid,
            provider=names.provider_of_key(row.key),
            name=names.name_of_key(row.key),
            owner=row.owner,
            data=self.masked(row),
        )

    def plain(self, row: StoredRow) -> dict[str, Any]:
        """The row's data with its secrets decrypted."""
        return self.vault.unseal(row.uuid, row.data, self.secret_fields(row))

    def seal(self, row_uuid: str, values: Mapping[str, Any], provider: Provider) -> dict[str, Any]:
        return self.vault.seal(row_uuid, values, provider.secret_field_keys)
