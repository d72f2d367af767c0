"""Per-process cache of sealed connection rows, kept true by the change notifications."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from . import _telemetry as telemetry
from ._models import Event
from ._names import shown
from ._record import Change, StoredRow
from ._repository import Repository, ResealBatch

__all__ = ["CacheStats", "CachedRepository", "RowCache"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of the row cache, for monitoring and tests."""

    enabled: bool
    serving: bool
    size: int
    capacity: int
    hits: int
    misses: int
    invalidations: int


class RowCache:
    """Sealed rows by uuid, and (owner, key) -> uuid for refs; LRU-bounded.

    Serves only while the LISTEN connection is up. Every change notice, our own writes,
    and the listener going down or coming back bump ``_epoch``; a read fills the cache
    only if the epoch it started at is still current, so a row read before a change
    whose notice arrived meanwhile is never kept.
    """

    __slots__ = (
        "_epoch",
        "_extras",
        "_live",
        "_proven_until",
        "_refs",
        "_rows",
        "capacity",
        "enabled",
        "hits",
        "invalidations",
        "misses",
    )

    def __init__(self, *, enabled: bool = True, capacity: int = 10_000) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"cache_size must be a positive int, got {shown(capacity)}")
        self.enabled = enabled
        self.capacity = capacity
        self._rows: OrderedDict[str, StoredRow] = OrderedDict()
        self._refs: dict[tuple[str | None, str], str] = {}
        # Values derived from a cached row (built auth headers), dropped with the row.
        self._extras: dict[str, dict[str, Any]] = {}
        self._epoch = 0
        self._live = False
        # Monotonic time until which the listener is known to hear changes (its last
        # probe's proof); infinite when nobody probes it.
        self._proven_until = math.inf
        self.hits = 0
        self.misses = 0
        self.invalidations = 0

    def __repr__(self) -> str:
        return f"<RowCache rows={len(self._rows)} serving={self.serving}>"

    @property
    def serving(self) -> bool:
        return self.enabled and self._live and time.monotonic() < self._proven_until

    @property
    def stats(self) -> CacheStats:
        return CacheStats(
            enabled=self.enabled,
            serving=self.serving,
            size=len(self._rows),
            capacity=self.capacity,
            hits=self.hits,
            misses=self.misses,
            invalidations=self.invalidations,
        )

    # -- lookups ------------------------------------------------------------------------

    def get(self, uuid: str) -> StoredRow | None:
        row = self._rows.get(uuid)
        if row is not None:
            self._rows.move_to_end(uuid)
            self.hits += 1
            telemetry.record_cache(True)
        return row

    def get_ref(self, owner: str | None, key: str) -> StoredRow | None:
        uuid = self._refs.get((owner, key))
        return None if uuid is None else self.get(uuid)

    def extra(self, row: StoredRow, name: str) -> Any:
        """A value kept beside ``row`` under ``name``; None unless ``row`` is the very row
        the cache holds (so it was built from this version and nothing changed since)."""
        if self._rows.get(row.uuid) is not row:
            return None
        extras = self._extras.get(row.uuid)
        return None if extras is None else extras.get(name)

    def keep_extra(self, row: StoredRow, name: str, value: Any) -> None:
        """Keep ``value`` beside ``row`` while the cache holds that very row."""
        if self._rows.get(row.uuid) is row:
            self._extras.setdefault(row.uuid, {})[name] = value

    def ticket(self) -> int | None:
        """Taken before a database read: the epoch to fill at, None when not serving."""
        if not self.serving:
            return None
        self.misses += 1
        telemetry.record_cache(False)
        return self._epoch

    def fill(self, ticket: int | None, row: StoredRow) -> None:
        """Keep ``row`` unless something changed since ``ticket`` was taken."""
        if ticket is None or ticket != self._epoch or not self.serving:
            return
        self._drop(row.uuid)
        self._rows[row.uuid] = row
        self._refs[(row.owner, row.key)] = row.uuid
        while len(self._rows) > self.capacity:
            self._drop(next(iter(self._rows)))

    # -- invalidation (RowWatcher) --------------------------------------------------------

    def rows_changed(self, uuids: Sequence[str] | None) -> None:
        self._epoch += 1
        if not self.enabled:
            return  # nothing held, nothing invalidated
        self.invalidations += 1
        if uuids is None:
            self._clear()
            return
        for uuid in uuids:
            self._drop(uuid)

    def listening(self, up: bool) -> None:
        # Either way what is held may have missed a change: start again from empty.
        self._epoch += 1
        self._live = up
        self._proven_until = math.inf
        self._clear()

    def proven(self, until: float) -> None:
        # What is held stays: notifications arrive in commit order, so once a probe sent
        # after a change arrives, that change's notice has too; until then nothing is
        # served or filled.
        self._proven_until = until

    def _drop(self, uuid: str) -> None:
        row = self._rows.pop(uuid, None)
        if row is not None:
            self._refs.pop((row.owner, row.key), None)
            self._extras.pop(uuid, None)

    def _clear(self) -> None:
        self._rows.clear()
        self._refs.clear()
        self._extras.clear()


class CachedRepository(Repository):
    """The repository with reads through a :class:`RowCache`, and every write of this
    process dropping the rows it touched (other processes' writes arrive as notices)."""

    def __init__(
        self,
        schema: str,
        *,
        channel: str,
        cache: RowCache,
        lock_timeout: float = 30.0,
        statement_cache_size: int | None = None,
        listen_dsn: str | None = None,
    ) -> None:
        super().__init__(
            schema,
            channel=channel,
            lock_timeout=lock_timeout,
            statement_cache_size=statement_cache_size,
            listen_dsn=listen_dsn,
        )
        self.cache = cache

    # -- reads --------------------------------------------------------------------------

    def peek(self, uuid: str) -> StoredRow | None:
        cache = self.cache
        return cache.get(uuid) if cache.serving else None

    async def get(self, uuid: str, *, fresh: bool = False) -> StoredRow | None:
        cache = self.cache
        if not fresh and cache.serving:
            hit = cache.get(uuid)
            if hit is not None:
                return hit
        ticket = cache.ticket()
        row = await super().get(uuid)
        if row is not None:
            cache.fill(ticket, row)
        return row

    async def get_by_key(
        self, owner: str | None, key: str, *, fresh: bool = False
    ) -> StoredRow | None:
        cache = self.cache
        if not fresh and cache.serving:
            hit = cache.get_ref(owner, key)
            if hit is not None:
                return hit
        ticket = cache.ticket()
        row = await super().get_by_key(owner, key)
        if row is not None:
            cache.fill(ticket, row)
        return row

    # -- writes: the rows touched are dropped once the write is over ---------------------

    async def insert(
        self, uuid: str, owner: str | None, key: str, data: dict[str, Any], events: Iterable[Event]
    ) -> StoredRow | None:
        try:
            return await super().insert(uuid, owner, key, data, events)
        finally:
            self.cache.rows_changed((uuid,))

    async def modify(self, uuid: str, decide: Callable[[StoredRow | None], tuple[Change, T]]) -> T:
        try:
            return await super().modify(uuid, decide)
        finally:
            self.cache.rows_changed((uuid,))

    async def modify_clocked(
        self,
        uuid: str,
        decide: Callable[[StoredRow | None, datetime | None], tuple[Change, T]],
        *,
        lock_timeout: float,
        idle_timeout: float,
    ) -> T:
        try:
            return await super().modify_clocked(
                uuid, decide, lock_timeout=lock_timeout, idle_timeout=idle_timeout
            )
        finally:
            self.cache.rows_changed((uuid,))

    async def reseal_connections(
        self,
        after: str,
        limit: int,
        primary_kid: str,
        plaintext_fields: Sequence[str],
        reseal: Callable[[StoredRow], dict[str, Any] | None],
    ) -> ResealBatch:
        try:
            return await super().reseal_connections(
                after, limit, primary_kid, plaintext_fields, reseal
            )
        finally:
            self.cache.rows_changed(None)

    async def reseal_listed(
        self,
        uuids: Sequence[str],
        reseal: Callable[[StoredRow], dict[str, Any] | None],
        *,
        wait: bool,
    ) -> ResealBatch:
        try:
            return await super().reseal_listed(uuids, reseal, wait=wait)
        finally:
            self.cache.rows_changed(list(uuids))
