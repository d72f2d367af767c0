"""Connections service: add, rename, remove, list, look up, save, disconnect, record checks."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeGuard

from . import _names as names
from . import _record as record
from ._authflow import AuthFlow
from ._core import Core
from ._errors import (
    AlreadyExists,
    Deleted,
    InvalidAttrs,
    InvalidField,
    InvalidInput,
    InvalidProviderKey,
    MissingField,
    NotConfigured,
    NotFound,
)
from ._events import ALL_OWNERS, OwnerScope
from ._input import check_text
from ._models import Connection, ConnectionList, Page, utcnow
from ._providers import Provider, unknown_provider_message
from ._record import Change, StoredRow
from .oauth import imported_token_set

__all__ = ["MAX_PAGE", "SEARCH_EXAMINE", "STATUSES", "Connections", "check_scope"]

#: The largest ``limit`` of one listing page.
MAX_PAGE = 1000
# Rows per keyset page when a listing reads everything.
_SCAN_PAGE = 500
#: Rows a filtered page examines at most: a page costs the same however rare matches are.
SEARCH_EXAMINE = 2000
#: The stored statuses a listing can be filtered by.
STATUSES = ("connected", "error", "disconnected")
# The row cache's extra under which a row's "holds credentials" answer is kept.
_CHECKED = "has_credentials"
_REVEALED = "credentials.revealed"
# Between the key and the owner in a page mark of every owner's listing: never in a key.
_OWNER_MARK = "\x1f"


def check_scope(owner: OwnerScope) -> OwnerScope:
    """``ALL_OWNERS`` (no owner check), ``None`` (the system) or an owner string."""
    return owner if owner is ALL_OWNERS else names.check_owner(owner)


def _ref_scope(owner: OwnerScope) -> str | None:
    """The scope a ``provider:name`` ref is looked up in: the system unless an owner is given."""
    return None if owner is ALL_OWNERS else owner


def listing_order(connection: Connection) -> tuple[str, bool, str]:
    """By provider, then "default" first, then by name: the order of whole listings."""
    return connection.provider, connection.name != names.DEFAULT_NAME, connection.name


def _page_mark(after: object, prefix: str) -> TypeGuard[str]:
    """Whether ``after`` can be a ``next_after`` of a listing of keys under ``prefix``."""
    if not isinstance(after, str) or len(after) > 1000 or not after.startswith(prefix):
        return False
    if "\x00" in after:
        return False
    try:
        after.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_status(status: object) -> str | None:
    if status is None or status in STATUSES:
        return status
    raise InvalidInput(
        f"status must be one of {', '.join(STATUSES)} or None, got {names.shown(status)}.",
        field="status",
    )


def _check_search(search: object) -> str | None:
    """A part of a name to look for, lowercased; None for no search."""
    if search is None:
        return None
    if not isinstance(search, str) or len(search) > names.MAX_NAME_LENGTH:
        raise InvalidInput(
            f"search must be a string of at most {names.MAX_NAME_LENGTH} characters, got "
            f"{names.shown(search)}.",
            field="search",
        )
    text = check_text(search.strip(), "search").lower()
    return text or None


def _visible(row: StoredRow | None, owner: OwnerScope) -> StoredRow | None:
    """Another owner's row is as good as missing."""
    if row is None or (owner is not ALL_OWNERS and row.owner != owner):
        return None
    return row


class Connections:
    """The connection API over the repository; every uuid method takes an owner scope."""

    def __init__(self, core: Core, authflow: AuthFlow) -> None:
        self._core = core
        self._authflow = authflow

    # -- reading ----------------------------------------------------------------------

    async def row(self, uuid: str, owner: OwnerScope, *, fresh: bool = False) -> StoredRow | None:
        """The row of a well-formed uuid within ``owner``'s scope, None when missing.

        Served from the row cache unless ``fresh`` (see docs/cache.md)."""
        return _visible(await self._core.repo.get(uuid, fresh=fresh), owner)

    async def row_by_ref(
        self, ref: object, owner: OwnerScope, *, fresh: bool = False
    ) -> tuple[StoredRow | None, bool]:
        """Resolve a uuid or provider ref; the flag says whether the input was a uuid."""
        owner = check_scope(owner)
        if not fresh and type(ref) is str:
            # The cache is keyed by canonical uuid text: a hit needs no parsing of ``ref``.
            hit = self._core.repo.peek(ref)
            if hit is not None:  # a cache hit, without a coroutine per layer
                return _visible(hit, owner), True
        as_uuid = names.parse_uuid(ref)
        if as_uuid is not None:
            hit = None if fresh else self._core.repo.peek(as_uuid)
            if hit is not None:
                return _visible(hit, owner), True
            return await self.row(as_uuid, owner, fresh=fresh), True
        provider, name = names.parse_ref(ref)
        key = names.storage_key(provider, name)
        return await self._core.repo.get_by_key(_ref_scope(owner), key, fresh=fresh), False

    def peek_ref(self, ref: object, owner: OwnerScope) -> StoredRow | None:
        """The cached row of a uuid ``ref`` visible in ``owner``'s scope, without awaiting;
        None when that takes a read (not cached, not a canonical uuid string) or the
        answer is an error."""
        owner = check_scope(owner)
        # The cache is keyed by canonical uuid text: a hit needs no parsing of ``ref``.
        hit = self._core.repo.peek(ref) if type(ref) is str else None
        return None if hit is None else _visible(hit, owner)

    async def require(self, uuid: object, owner: OwnerScope, *, fresh: bool = False) -> StoredRow:
        """The row of ``uuid`` or NotConfigured; a malformed uuid is InvalidUUID."""
        row = await self.row(names.require_uuid(uuid), check_scope(owner), fresh=fresh)
        if row is None:
            raise NotConfigured()
        return row

    async def require_ref(
        self, ref: object, owner: OwnerScope, *, fresh: bool = False
    ) -> StoredRow:
        """``deleted`` for a uuid that resolves to nothing, ``not_configured`` for a ref."""
        row, by_uuid = await self.row_by_ref(ref, owner, fresh=fresh)
        if row is None:
            if by_uuid:
                raise Deleted()
            raise NotConfigured(self._missing_ref(ref, owner))
        return row

    def _missing_ref(self, ref: object, owner: OwnerScope) -> str:
        """Which connection is missing, where, and what to do: add it, or fix the key."""
        provider, name = names.parse_ref(ref)
        scope = "the system scope" if _ref_scope(owner) is None else f"the scope of owner {owner!r}"
        message = f"There is no {provider}:{name} connection in {scope}"
        if self._core.providers.find(provider) is None:
            hint = unknown_provider_message(provider, (p.key for p in self._core.providers))
            return f"{message}. {hint}"
        return f"{message}; add it with add_connection({provider!r}, {name!r}) and save_setup()."

    def _runtime(self, provider: Provider | None, data: Mapping[str, Any]) -> bool:
        return provider is not None and provider.has_runtime_credentials(data)

    def has_credentials(self, row: StoredRow, provider: Provider | None) -> bool:
        """Whether the row holds anything to call the provider with, or any saved setup;
        ``provider`` is the row's (``provider_of``)."""
        if provider is not None and (
            provider.has_runtime_credentials(row.data) or provider.is_configured(row.data)
        ):
            return True
        return record.has_saved_data(row.data)

    async def get_integration_by_uuid(
        self, uuid: object, owner: OwnerScope, *, fresh: bool = False
    ) -> Connection:
        return self._core.connection(await self.require(uuid, owner, fresh=fresh))

    async def get_integration(
        self, ref: object, owner: OwnerScope, *, fresh: bool = False
    ) -> dict[str, Any]:
        row = await self.require_ref(ref, owner, fresh=fresh)
        plain = self._core.plain(row)
        await self._revealed(row, "get_integration")
        return plain

    async def _revealed(self, row: StoredRow, call: str) -> None:
        await self._core.audit.record(
            "credentials.revealed",
            owner=row.owner,
            uuid=row.uuid,
            provider=row.provider,
            detail={"call": call},
        )

    async def get_credentials(
        self, ref: object, owner: OwnerScope, *, fresh: bool = False
    ) -> dict[str, Any]:
        core = self._core
        # A cached row needs no coroutine per layer; a miss or an error takes the long way.
        row = None if fresh else self.peek_ref(ref, owner)
        if row is None:
            as_uuid = names.parse_uuid(ref) if type(ref) is str else None
            if as_uuid is None:
                row = await self.require_ref(ref, owner, fresh=fresh)
            else:
                # require_ref's read of a uuid, without its layers.
                owner = check_scope(owner)
                row = _visible(await core.repo.get(as_uuid, fresh=fresh), owner)
                if row is None:
                    raise Deleted()
        cache = core.repo.cache
        # The row's provider (as provider_of gives it) and whether the row holds
        # credentials depend on the row and the registered provider alone: kept beside
        # the cached row, for the registered provider object they were decided for.
        registered = core.providers.find(row.provider)
        checked = cache.extra(row, _CHECKED)
        if checked is None or checked[0] is not registered:
            bound = None if registered is None else registered.for_data(row.data)
            checked = (registered, bound, self.has_credentials(row, bound))
            cache.keep_extra(row, _CHECKED, checked)
        provider = checked[1]
        if not checked[2]:
            raise NotConfigured(
                f"The connection {row.provider}:{row.name} has no saved credentials; "
                "save them with save_setup first."
            )
        secret_fields = provider.secret_field_keys if provider is not None else frozenset()
        plain = core.vault.unseal(row.uuid, row.data, secret_fields)
        if core.audit.records(_REVEALED):
            await self._revealed(row, "get_credentials")
        return plain

    async def is_connected(self, uuid: object, owner: OwnerScope, *, fresh: bool = False) -> bool:
        row = await self.row(names.require_uuid(uuid), check_scope(owner), fresh=fresh)
        if row is None or row.status != "connected":
            return False
        return self._runtime(self._core.provider_of(row), row.data)

    async def find_uuid(self, ref: object, owner: OwnerScope) -> str:
        provider, name = names.parse_ref(ref)
        # As everywhere a ref is read: ALL_OWNERS looks in the system scope.
        owner = _ref_scope(check_scope(owner))
        found = await self._core.repo.uuid_by_key(owner, names.storage_key(provider, name))
        if found is None:
            raise NotFound(f"No {provider} connection named {name!r} here.")
        return found

    async def resolve(self, value: object, owner: OwnerScope) -> str:
        if not isinstance(value, str) or not value.strip():
            raise InvalidInput(
                "Expected a uuid or a 'provider:name' reference, got "
                f"{_describe(value)}; for example 'openai:default'."
            )
        row, _ = await self.row_by_ref(value.strip(), owner)
        if row is None:
            raise NotFound(f"Nothing matches {value.strip()[:80]!r}.")
        return row.uuid

    # -- listing ----------------------------------------------------------------------

    async def load_all(
        self, providers: Iterable[str], owner: OwnerScope
    ) -> dict[str, list[Connection]]:
        if isinstance(providers, str) or not isinstance(providers, Iterable):
            raise InvalidInput("providers must be a list of provider keys, such as ['openai'].")
        keys = [names.check_provider_key(p) for p in providers]
        owner = check_scope(owner)
        result: dict[str, list[Connection]] = {key: [] for key in keys}
        if not keys:
            return result
        prefixes = [names.storage_key(key, "") for key in dict.fromkeys(keys)]
        if owner is ALL_OWNERS:
            # Every owner's (the administrator's view): one range scan per provider.
            rows = [r for p in prefixes for r in await self._core.repo.list_every_owner(p)]
        else:
            rows = await self._core.repo.list_by_prefixes(owner, prefixes)
        for row in rows:
            connection = self._core.connection(row)
            if connection.provider in result:
                result[connection.provider].append(connection)
        for connections in result.values():
            connections.sort(key=lambda c: (c.owner or "", c.name != names.DEFAULT_NAME, c.name))
        return result

    async def list_integrations(
        self, owner: str | None, *, limit: object = None, after: object = None
    ) -> ConnectionList:
        """Connections with saved data. Without ``limit``: all of them, by provider, then
        "default" first and by name. With ``limit``: at most that many, in storage-key
        order after ``after`` (the ``next_after`` of the page before, or the uuid of its
        last connection), each page a few index range scans."""
        owner = names.check_owner(owner)
        if limit is None:
            if after is not None:
                raise InvalidInput("after= pages a listing: give limit= too.", field="after")
            everything = [c for _, c in await self._saved(owner, "", None)]
            everything.sort(key=listing_order)
            return ConnectionList(everything)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(
                f"limit must be an int from 1 to {MAX_PAGE}, got {names.shown(limit)}.",
                field="limit",
            )
        start = await self._after_key(owner, after)
        found = await self._saved(owner, start, limit + 1)
        page = found[:limit]
        return ConnectionList(
            (c for _, c in page), next_after=page[-1][0] if len(found) > limit else None
        )

    async def _saved(
        self, owner: str | None, after: str, wanted: int | None
    ) -> list[tuple[str, Connection]]:
        """Connections with saved data after key ``after`` with their keys, in key order
        (``wanted`` at most), read from the index of rows with saved data."""
        found: list[tuple[str, Connection]] = []
        while True:
            size = _SCAN_PAGE if wanted is None else wanted - len(found)
            rows = await self._core.repo.list_saved_page(owner, names.KEY_PREFIX, after, size)
            found.extend((row.key, self._core.connection(row)) for row in rows)
            if len(rows) < size or (wanted is not None and len(found) >= wanted):
                return found
            after = rows[-1].key

    async def _after_key(self, owner: str | None, after: object) -> str:
        if after is None:
            return ""
        if _page_mark(after, names.KEY_PREFIX):
            return after
        as_uuid = names.parse_uuid(after)
        row = None if as_uuid is None else await self.row(as_uuid, owner)
        if row is None:
            raise InvalidInput(
                "after must be the next_after of an earlier page, or the uuid of the last "
                f"connection on it; got {names.shown(after)}.",
                field="after",
            )
        return row.key

    async def page(
        self,
        *,
        owner: OwnerScope,
        provider: str | None,
        limit: object,
        after: object,
        status: object = None,
        search: object = None,
    ) -> Page:
        """Every connection of ``owner`` (of one provider if given) in key order, a page
        at a time: ``after`` is the ``next_after`` of the page before.

        ``ALL_OWNERS`` lists every owner's, in (key, owner) order. With ``status`` alone a
        page reads only matching rows, from an index of status then order. With
        ``search`` (a part of the name, any case) a page examines at most
        ``SEARCH_EXAMINE`` rows and returns those that match: fewer than ``limit``, even
        none, when matches are rare, with a ``next_after`` that goes on from where it
        stopped; ``next_after`` is None once the whole range has been read."""
        every = owner is ALL_OWNERS
        scope = check_scope(owner)
        one_owner = None if scope is ALL_OWNERS else scope
        prefix = names.KEY_PREFIX
        if provider is not None:
            prefix = names.storage_key(names.check_provider_key(provider), "")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(
                f"limit must be an int from 1 to {MAX_PAGE}, got {names.shown(limit)}."
            )
        wanted_status = _check_status(status)
        needle = _check_search(search)
        if after is not None and not _page_mark(after, prefix):
            raise InvalidInput(
                "after must be the next_after of an earlier page (of the same provider), or None.",
                field="after",
            )
        if not every and wanted_status is None and needle is None:
            rows = await self._core.repo.list_page(one_owner, prefix, after or "", limit + 1)
            more = len(rows) > limit
            rows = rows[:limit]
            return Page(
                items=[self._core.connection(row) for row in rows],
                next_after=rows[-1].key if more else None,
            )
        start = ("", "")
        if after is not None:
            key, mark, after_owner = after.partition(_OWNER_MARK)
            if bool(mark) != every:
                raise InvalidInput(
                    "after must be the next_after of an earlier page of the same listing "
                    "(every owner's or one owner's), or None.",
                    field="after",
                )
            start = (key, after_owner)
        found, stop = await self._core.repo.search_page(
            one_owner,
            every,
            prefix,
            start,
            examine=max(SEARCH_EXAMINE, limit + 1),
            limit=limit + 1,
            status=wanted_status or "",
            needle=needle or "",
        )
        if len(found) > limit:
            found = found[:limit]
            stop = (found[-1].key, found[-1].owner or "")
        next_after = None
        if stop is not None:
            next_after = stop[0] + _OWNER_MARK + (stop[1] or "") if every else stop[0]
        return Page(items=[self._core.connection(row) for row in found], next_after=next_after)

    async def counts(self, owner: OwnerScope) -> dict[str, int]:
        """Connections per provider key of ``owner`` (every owner's with ``ALL_OWNERS``),
        from counts kept by the database: the same cost at any table size."""
        scope = check_scope(owner)
        return await self._core.repo.connection_counts(
            None if scope is ALL_OWNERS else scope, every_owner=scope is ALL_OWNERS
        )

    # -- writes -----------------------------------------------------------------------

    async def add(
        self,
        provider: str,
        name: str,
        *,
        actor: str | None,
        owner: str | None,
        uuid: object = None,
    ) -> Connection:
        definition = self._core.providers.get(provider)
        clean = names.normalize_name(name)
        owner = names.check_owner(owner)
        actor = names.check_actor(actor)
        if uuid is None:
            uuid = names.uuid7()
        else:
            # A uuid kept from elsewhere (an import): the connection's identity moves with it.
            uuid = names.require_uuid(uuid)
            if await self._core.repo.get(uuid, fresh=True) is not None:
                raise AlreadyExists(f"The uuid {uuid} is taken by another connection here.")
        new = record.added(uuid, owner, definition.key, definition.auth_type, clean, actor)
        row = await self._core.repo.insert(
            uuid, owner, new.row.key, new.row.data, new.change.events
        )
        if row is None:
            raise AlreadyExists(
                f"{'An' if definition.key[:1] in 'aeiou' else 'A'} {definition.key} connection "
                f"named {clean!r} already exists; "
                "choose another name or use the existing one."
            )
        await self._changed("connection.added", row, actor, {"name": clean})
        return self._core.connection(row)

    async def _changed(
        self, action: str, row: StoredRow, actor: str | None, detail: Mapping[str, Any]
    ) -> None:
        await self._core.audit.record(
            action,
            actor=actor,
            owner=row.owner,
            uuid=row.uuid,
            provider=row.provider,
            detail=detail,
        )

    async def rename(
        self, uuid: object, new_name: str, *, actor: str | None, owner: OwnerScope
    ) -> dict[str, Any]:
        uuid = names.require_uuid(uuid)
        clean = names.normalize_name(new_name)
        actor = names.check_actor(actor)
        owner = check_scope(owner)

        def decide(row: StoredRow | None) -> tuple[Change, StoredRow]:
            row = _visible(row, owner)
            if row is None:
                raise NotConfigured()
            done = record.renamed(row, clean, actor)
            return done.change, done.row

        renamed = await self._core.repo.modify(uuid, decide)
        await self._changed("connection.renamed", renamed, actor, {"name": clean})
        return self._core.masked(renamed)

    async def remove(self, uuid: object, *, actor: str | None, owner: OwnerScope) -> None:
        uuid = names.require_uuid(uuid)
        actor = names.check_actor(actor)
        owner = check_scope(owner)

        def decide(row: StoredRow | None) -> tuple[Change, StoredRow]:
            row = _visible(row, owner)
            if row is None:
                # As rename: a uuid that resolves to nothing is not configured.
                raise NotConfigured()
            done = record.removed(row, actor)
            return done.change, done.row

        with self._authflow.operation():
            removed = await self._core.repo.modify(uuid, decide)
            self._authflow.revoke_later(self._core.provider_of(removed), removed)
        await self._changed("connection.removed", removed, actor, {})

    async def save_setup(
        self, uuid: object, attrs: Mapping[str, Any], *, actor: str | None, owner: OwnerScope
    ) -> dict[str, Any]:
        uuid = names.require_uuid(uuid)
        actor = names.check_actor(actor)
        owner = check_scope(owner)
        if not isinstance(attrs, Mapping):
            raise InvalidAttrs(
                f"attrs must be a mapping of setup fields, got {type(attrs).__name__}."
            )
        if any(not isinstance(k, str) for k in attrs):
            raise InvalidAttrs("Setup field names must be strings.")
        current = await self.row(uuid, owner)
        if current is None:
            raise NotConfigured(_nothing_to_save(uuid))
        provider = self._core.providers.get(current.provider)
        patch = provider.normalize_attrs(attrs, max_bytes=self._core.settings.max_attrs_bytes)
        _refuse_managed(patch)
        _refuse_unknown_secrets(provider, patch)
        sealed = self._core.seal(uuid, patch, provider)

        def decide(row: StoredRow | None) -> tuple[Change, StoredRow]:
            row = _visible(row, owner)
            if row is None:
                raise NotConfigured(_nothing_to_save(uuid))
            done = self._setup_transition(provider, row, sealed, patch, actor)
            return done.change, done.row

        saved = await self._core.repo.modify(uuid, decide)
        # Field names only: the values, secret or not, stay out of the trail.
        await self._changed("setup.saved", saved, actor, {"fields": sorted(patch)})
        return self._core.masked(saved)

    @staticmethod
    def _setup_transition(
        provider: Provider,
        row: StoredRow,
        sealed: Mapping[str, Any],
        patch: Mapping[str, Any],
        actor: str | None,
    ) -> record.Transition:
        return record.setup_saved(
            row,
            sealed,
            fields=patch,
            credential_fields={
                *provider.runtime_fields,
                *provider.secret_field_keys,
                "credentials",
            },
            missing=provider.missing_required,
            runtime=provider.has_runtime_credentials,
            oauth_code_flow=provider.scheme.authorizes_user,
            actor=actor,
        )

    async def import_tokens(
        self,
        uuid: object,
        tokens: Mapping[str, Any],
        *,
        actor: str | None,
        owner: OwnerScope,
    ) -> Connection:
        """Store tokens obtained elsewhere as a new grant: connected, failures cleared."""
        uuid = names.require_uuid(uuid)
        actor = names.check_actor(actor)
        owner = check_scope(owner)
        current = await self.row(uuid, owner)
        if current is None:
            raise NotConfigured()
        provider = self._core.require_provider(current)
        if not provider.is_oauth:
            raise InvalidProviderKey(
                f"Provider {provider.key!r} does not use OAuth tokens; save its credentials "
                "with save_setup instead.",
                provider=provider.key,
            )
        now = utcnow()
        token_set = imported_token_set(tokens, now)
        vault = self._core.vault

        def decide(row: StoredRow | None) -> tuple[Change, StoredRow]:
            row = _visible(row, owner)
            if row is None:
                raise NotConfigured()
            done = record.tokens_issued(
                row,
                token_set,
                seal=lambda field, value: vault.seal_value(row.uuid, field, value),
                account=None,
                now=now,
                actor=actor,
            )
            return done.change, done.row

        imported = await self._core.repo.modify(uuid, decide)
        await self._changed("tokens.imported", imported, actor, {})
        return self._core.connection(imported)

    async def legacy_upsert(
        self, provider: str, name: str, data: Mapping[str, Any], *, owner: str | None
    ) -> Connection:
        """Create or merge a connection from pre-uuid data.

        The data is checked before anything is written, so invalid data leaves no new,
        empty connection behind (and sends no event).
        """
        definition = self._core.providers.get(provider)
        clean = names.normalize_name(name)
        owner = names.check_owner(owner)
        if not isinstance(data, Mapping):
            raise InvalidAttrs(
                f"data must be a mapping of setup fields, got {type(data).__name__}."
            )
        patch = definition.normalize_attrs(data, max_bytes=self._core.settings.max_attrs_bytes)
        _refuse_managed(patch)
        _refuse_unknown_secrets(definition, patch)
        key = names.storage_key(definition.key, clean)
        uuid = await self._core.repo.uuid_by_key(owner, key)
        if uuid is None:
            lacking = definition.missing_required(patch)
            if lacking:
                raise MissingField(
                    f"Required setup field missing: {', '.join(lacking)}. Pass a value for it.",
                    field=lacking[0],
                )
            # The new row is written with its setup in one insert: sealing (which fails
            # without keys) happens before, so a failure leaves nothing behind.
            new_uuid = names.uuid7()
            sealed = self._core.seal(new_uuid, patch, definition)
            born = record.added(new_uuid, owner, definition.key, definition.auth_type, clean, None)
            done = self._setup_transition(definition, born.row, sealed, patch, None)
            row = await self._core.repo.insert(
                new_uuid,
                owner,
                born.row.key,
                done.row.data,
                [*born.change.events, *done.change.events],
            )
            if row is not None:
                return self._core.connection(row)
            # Added meanwhile by someone else: merge into theirs.
            uuid = await self.find_uuid((definition.key, clean), owner)
        await self.save_setup(uuid, data, actor=None, owner=ALL_OWNERS)
        return await self.get_integration_by_uuid(uuid, ALL_OWNERS)

    async def disconnect(self, uuid: object, *, actor: str | None, owner: OwnerScope) -> None:
        uuid = names.require_uuid(uuid)
        actor = names.check_actor(actor)
        owner = check_scope(owner)

        def decide(row: StoredRow | None) -> tuple[Change, StoredRow | None]:
            row = _visible(row, owner)
            if row is None:
                return Change(), None
            provider = self._core.provider_of(row)
            drop = () if provider is None else provider.scheme.disconnect_drops(provider)
            done = record.disconnected(row, drop, actor, utcnow())
            return done.change, row

        # The tokens are taken under the row lock, revoked only once the change committed.
        with self._authflow.operation():
            dropped = await self._core.repo.modify(uuid, decide)
            if dropped is not None:
                self._authflow.revoke_later(self._core.provider_of(dropped), dropped)
        if dropped is not None:
            await self._changed("connection.disconnected", dropped, actor, {})

    async def record(
        self,
        uuid: str,
        ok: bool,
        message: str,
        *,
        actor: str | None,
        owner: OwnerScope = ALL_OWNERS,
        checked: str | None = None,
    ) -> None:
        """Store a check's outcome (see ``record.validated``); a removed row is left alone.

        ``checked`` is the fingerprint of the credentials that were checked: when they
        changed meanwhile, only the check time is written.
        """
        now = utcnow()

        def decide(row: StoredRow | None) -> tuple[Change, None]:
            row = _visible(row, owner)
            if row is None:
                # A check that raced a removal has nothing left to record on.
                return Change(), None
            stale = checked is not None and self.fingerprint(row) != checked
            return record.validated(row, ok, message, now, actor=actor, stale=stale).change, None

        await self._core.repo.modify(uuid, decide)

    def fingerprint(self, row: StoredRow) -> str:
        from ._vault import SECRET_FIELDS

        return record.fingerprint(row, SECRET_FIELDS | self._core.secret_fields(row))


def _nothing_to_save(uuid: str) -> str:
    return (
        f"No connection {uuid} to save to: it was removed, or it is not in this owner's "
        "scope. Add one with add_connection() and save to the uuid it returns."
    )


def _refuse_managed(patch: Mapping[str, Any]) -> None:
    managed = sorted(set(patch) & record.LIBRARY_FIELDS)
    if managed:
        raise InvalidAttrs(
            f"These fields are managed by the library and cannot be saved: "
            f"{', '.join(managed)}. Tokens from another system go through import_tokens().",
            fields=managed,
        )


# Names that say "this is a secret": a field so named that the provider does not declare
# would be stored in plain text (a typo such as "apikey" for "api_key", as a rule).
_SECRETISH = re.compile(
    r"secret|passw|pwd|token|credential|api[-_]?key|private[-_]?key|(^|[-_])key$",
    re.IGNORECASE,
)


def _refuse_unknown_secrets(provider: Provider, patch: Mapping[str, Any]) -> None:
    if provider.scheme.freeform:
        return  # every value of the freeform map is a secret already
    known = {f.key for f in provider.setup_fields} | provider.secret_keys
    suspect = sorted(k for k in patch if k not in known and _SECRETISH.search(k))
    if not suspect:
        return
    field = suspect[0]
    close = difflib.get_close_matches(field, sorted(known), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    declared = ", ".join(f.key for f in provider.setup_fields) or "none"
    raise InvalidField(
        f"Setup field {names.shown(field)} is not a field of provider {provider.key!r}, and "
        f"its name says it holds a secret, which would be stored unencrypted.{hint} The "
        f"provider's setup fields: {declared}.",
        field=field,
    )


def _describe(value: object) -> str:
    if isinstance(value, str):
        return repr(value[:80])
    return type(value).__name__
