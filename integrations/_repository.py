"""PostgreSQL access through asyncpg: the only module that imports the driver."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import secrets
import uuid as _uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias, TypeVar

import asyncpg

from . import _audit as audit
from . import _telemetry as telemetry
from ._errors import AlreadyExists, ConfigurationError, IntegrationsError, LockTimeout, StorageError
from ._models import Event
from ._record import Change, StoredRow
from ._sql import Queries

log = logging.getLogger("integrations")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ResealBatch:
    """One rotation batch: rows examined and rewritten, the keyset cursor to go on from
    (None when nothing was left), and the candidates another transaction held."""

    scanned: int
    rewritten: int
    last: str | None
    skipped: tuple[str, ...] = ()
    #: The rows examined (locked), for a caller that keeps a list of skipped ones.
    examined: tuple[str, ...] = ()


# Delta rows of one scope's counts that a reader sums before it folds them into one a
# provider.
_FOLD_COUNTS_AFTER = 64
#: Scopes folded at most by one pass of ``fold_every_connection_count``.
_FOLD_SCOPES = 10_000

#: The cursor that starts a rotation pass (see :meth:`Repository.reseal_connections`).
RESEAL_START = ""
_NIL_UUID = _uuid.UUID(int=0)
_MAX_UUID = _uuid.UUID(int=2**128 - 1)
#: Index entries one statement of :meth:`Repository.count_to_reseal` reads at most.
RESEAL_COUNT_STEP = 50_000


@dataclass(frozen=True, slots=True)
class _ResealCursor:
    """Where a rotation pass is: the index range it reads ("below" and "above" the primary
    key id's array of envelope key ids, then "plain" for plaintext), the last row read, and
    whether the pass rewrote a row.

    A writer's save re-seals the fields it writes under the primary and leaves the others'
    envelopes as they were, which changes the row's array and so may move it behind the
    cursor: a pass that rewrote anything is followed by another, which reads only what is
    still left (rows that cannot be decrypted are left as they are, so passes end)."""

    phase: str
    kids: tuple[str, ...]
    uuid: _uuid.UUID
    moved: bool = False

    @classmethod
    def parse(cls, text: str, primary_kid: str) -> _ResealCursor:
        if text == RESEAL_START:
            return cls.start()
        try:
            phase, kids, row, moved = json.loads(text)
            if phase not in ("below", "above", "plain") or not all(
                isinstance(k, str) for k in kids
            ):
                raise ValueError(phase)
            return cls(phase, tuple(kids), _uuid.UUID(row), bool(moved))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a rotation cursor: {text[:80]!r}") from exc

    @classmethod
    def start(cls) -> _ResealCursor:
        # Past every row without an envelope ('{}' sorts before '{""}').
        return cls("below", ("",), _NIL_UUID)

    def dump(self) -> str:
        return json.dumps([self.phase, list(self.kids), str(self.uuid), self.moved])


#: The asyncpg pool type, for the annotations of other modules (which never import asyncpg).
Pool: TypeAlias = asyncpg.Pool


# Lowercase, hyphenated uuid text: the form every row uuid is read and cached in.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _owner_to_db(owner: str | None) -> str:
    return owner or ""


# json.loads without its per-call argument checks: a stored document is jsonb's text
# output, which never starts with a byte order mark.
_decode_json = json.JSONDecoder().decode


def _row(record: asyncpg.Record) -> StoredRow:
    data = _decode_json(record["value_json"])
    if not isinstance(data, dict):
        data = {}
    return StoredRow(
        uuid=str(record["uuid"]),
        owner=record["owner"] or None,
        key=record["key"],
        data=data,
        version=record["version"],
    )


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


def prefix_end(prefix: str) -> str:
    """The least string above every string that starts with ``prefix``, byte-wise (UTF-8
    order is code point order). Our prefixes end in ':', so the last character bumps."""
    if not prefix or prefix[-1] == "\U0010ffff":
        raise ValueError("a prefix must end below U+10FFFF")
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more, and a refused NOTIFY
# would fail the write it belongs to. Owner and actor are capped at 255 characters;
# ``detail`` and, in theory, a very long connection name are what can overflow.
PAYLOAD_BUDGET = 7000
_DETAIL_VALUE_BUDGET = 200


def event_payload(event: Event) -> str:
    """The event's NOTIFY payload, trimmed (``detail`` first) to stay within the budget."""
    payload = event.to_payload()
    if len(payload.encode()) <= PAYLOAD_BUDGET:
        return payload
    # Short values (error codes, field names) are the useful part; long ones get cut.
    trimmed: dict[str, Any] = {}
    for key, value in event.detail.items():
        if isinstance(value, str) and len(value) > _DETAIL_VALUE_BUDGET:
            trimmed[key] = value[:_DETAIL_VALUE_BUDGET] + "…"
        elif len(json.dumps(value, default=str)) <= _DETAIL_VALUE_BUDGET:
            trimmed[key] = value
    trimmed["truncated"] = True
    payload = dataclasses.replace(event, detail=trimmed).to_payload()
    if len(payload.encode()) <= PAYLOAD_BUDGET:
        return payload
    # The uuid still identifies the connection; readers re-read it for the rest.
    name = event.name
    if name is not None and len(name) > _DETAIL_VALUE_BUDGET:
        name = name[:_DETAIL_VALUE_BUDGET] + "…"
    return dataclasses.replace(event, name=name, detail={"truncated": True}).to_payload()


# What the driver raises on its own: server errors, misuse and protocol states
# ("cannot switch to state ..."), and the network's OSError (TimeoutError included).
_DRIVER_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
)
_DRIVER_DIR = os.path.dirname(asyncpg.__file__) + os.sep
# Compiled parts name their source relative to the package root.
_DRIVER_PREFIX = "asyncpg" + os.sep


def _from_driver(exc: BaseException) -> bool:
    """Whether ``exc`` is the driver's: one of its types, or raised in its code."""
    if isinstance(exc, _DRIVER_ERRORS):
        return True
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.startswith((_DRIVER_DIR, _DRIVER_PREFIX)):
            return True
        tb = tb.tb_next
    return False


@contextlib.contextmanager
def _translate(lock_timeout: float | None = None) -> Iterator[None]:
    """The one place driver faults become library errors, with the cause's own text.

    Library errors (a ``decide`` refusing a change, say) and bugs outside the driver
    pass through unchanged.
    """
    try:
        yield
    except Exception as exc:
        error = _library_error(exc, lock_timeout)
        if error is None:
            raise
        raise error from exc


def _library_error(exc: Exception, lock_timeout: float | None = None) -> Exception | None:
    """The library error a driver fault becomes; None for what passes through unchanged."""
    if isinstance(exc, IntegrationsError):
        return None
    if isinstance(exc, asyncpg.UniqueViolationError):
        return AlreadyExists()
    if isinstance(exc, asyncpg.LockNotAvailableError):
        within = "" if lock_timeout is None else f" within {lock_timeout:g}s"
        return LockTimeout(f"the connection's row lock was not granted{within}")
    if not _from_driver(exc):
        return None
    return StorageError(describe(exc))


class Listener:
    """A connection held for LISTEN on the event and row channels: taken from a pool
    (released on close) or opened for it alone (closed on close)."""

    def __init__(
        self,
        pool: asyncpg.Pool | None,
        conn: Any,
        channel: str,
        callback: Any,
        terminated: Any,
        probe_channel: str,
        send: Callable[[str, str], Awaitable[None]] | None,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self._channel = channel
        self._callback = callback
        self._terminated = terminated
        self.backend_pid: int = conn.get_server_pid()
        self._probe_channel = probe_channel
        self._send = send
        self._probes: dict[str, asyncio.Future[None]] = {}
        # One statement at a time on the connection: a subscriber's sync and the hub's
        # heartbeat may ask together.
        self._busy = asyncio.Lock()

    @classmethod
    async def attach(
        cls,
        pool: asyncpg.Pool | None,
        conn: Any,
        channel: str,
        on_payload: Callable[[str], None],
        on_lost: Callable[[], None],
        send: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> Listener:
        """Listen on ``conn``; on failure it is released to ``pool`` (or terminated).

        ``send(channel, payload)`` NOTIFYs from another session: ``probe()`` uses it."""

        def callback(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            on_payload(str(payload))

        def terminated(_conn: Any) -> None:
            on_lost()

        # Its own channel, so that no other listener of the fleet hears its probes (and
        # short: a channel name is at most 63 bytes).
        probe_channel = f"integrations_probe_{secrets.token_hex(8)}"
        listener: Listener | None = None

        def probed(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            if listener is not None:
                listener._probed(str(payload))

        try:
            with _translate():
                conn.add_termination_listener(terminated)
                await conn.add_listener(channel, callback)
                await conn.add_listener(rows_channel(channel), callback)
                await conn.add_listener(probe_channel, probed)
        except BaseException:
            if pool is None:
                conn.terminate()
            else:
                with contextlib.suppress(Exception):
                    await pool.release(conn)
            raise
        listener = cls(pool, conn, channel, callback, terminated, probe_channel, send)
        listener._probed_callback = probed
        return listener

    _probed_callback: Any = None

    def _probed(self, token: str) -> None:
        waiter = self._probes.pop(token, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def can_probe(self) -> bool:
        return self._send is not None

    async def probe(self) -> asyncio.Future[None]:
        """NOTIFY this connection's probe channel from another session; the future is
        done once the notification arrived here, proof that changes committed before
        the call have been heard (it never is where notifications do not arrive).
        Raises StorageError when the NOTIFY could not be sent."""
        if self._send is None or self._conn is None:
            raise StorageError("this LISTEN connection cannot be probed")
        token = secrets.token_hex(8)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._probes[token] = waiter
        waiter.add_done_callback(lambda _: self._probes.pop(token, None))
        try:
            await self._send(self._probe_channel, token)
        except BaseException:
            waiter.cancel()
            raise
        return waiter

    async def sync(self) -> None:
        """Return once the notifications committed before the call have been dispatched:
        the server sends pending ones before it answers a statement."""
        async with self._busy:
            if self._conn is not None:
                with _translate():
                    await self._conn.execute(_relisten(self._channel))

    def abort(self) -> None:
        """Drop the connection at once, without a word to the server (it stopped
        answering): what it may still deliver is never read."""
        conn = self._conn
        if conn is not None and not conn.is_closed():
            conn.remove_termination_listener(self._terminated)
            conn.terminate()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.remove_termination_listener(self._terminated)
        if self._pool is None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=5)
            if not conn.is_closed():
                conn.terminate()
            return
        # A pooled connection goes back without its listeners.
        with contextlib.suppress(Exception):
            if not conn.is_closed():
                await conn.remove_listener(self._channel, self._callback)
                await conn.remove_listener(rows_channel(self._channel), self._callback)
                await conn.remove_listener(self._probe_channel, self._probed_callback)
        with contextlib.suppress(Exception):
            await self._pool.release(conn)


def rows_channel(channel: str) -> str:
    """Where the database announces changed rows (``{"rows": [uuid, ...]}``, see the
    ``connections_changed`` trigger); listened to alongside the event channel."""
    return f"{channel}_rows"


def _relisten(channel: str) -> str:
    # LISTEN on a channel already listened to is a no-op round trip.
    quoted = channel.replace('"', '""')
    return f'LISTEN "{quoted}"'


async def _keep_session(_conn: Any) -> None:
    """The pool's reset hook: nothing to reset (see ``Repository.open``)."""


class Repository:
    """Connection rows, migrations and notifications in domain terms."""

    def __init__(
        self,
        schema: str,
        *,
        channel: str,
        lock_timeout: float = 30.0,
        statement_cache_size: int | None = None,
        listen_dsn: str | None = None,
    ) -> None:
        if (
            isinstance(lock_timeout, bool)
            or not isinstance(lock_timeout, int | float)
            or not math.isfinite(lock_timeout)
            or lock_timeout <= 0
        ):
            raise ConfigurationError("lock_timeout must be a positive number of seconds")
        self.schema = schema
        self.channel = channel
        self.lock_timeout = float(lock_timeout)
        # A write transaction's statements go back to back: idle longer than this, its
        # client has stalled (frozen, cut off), and the server ends it and frees its locks.
        self.idle_timeout = min(self.lock_timeout, IDLE_IN_TRANSACTION)
        # The client-side deadline of every statement: a statement may wait for a row lock
        # up to the lock timeout; past that plus a margin, the link is taken for frozen.
        self.command_timeout = self.lock_timeout + COMMAND_MARGIN
        self._idle_millis = _millis(self.idle_timeout)
        # 0 behind a transaction-mode pooler (PgBouncer): no named prepared statements.
        self.statement_cache_size = statement_cache_size
        # LISTEN needs a session of its own; through a transaction pooler it must go direct.
        self.listen_dsn = listen_dsn
        self.q = Queries.load(schema)
        # One round trip opens the transaction and bounds its lock waits; the value is
        # a number formatted here, never input.
        self._begin_write = self.q.begin_write.replace(
            "{lock_timeout}", _millis(self.lock_timeout)
        ).replace("{idle_timeout}", _millis(self.idle_timeout))
        self._bound_transaction = self.q.bound_transaction.replace(
            "{lock_timeout}", _millis(self.lock_timeout)
        ).replace("{idle_timeout}", _millis(self.idle_timeout))
        self._pool: asyncpg.Pool | None = None
        self._owns_pool = False
        self._dsn: str | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self, *, dsn: str | None, pool: Any | None, max_size: int = 10) -> None:
        if pool is not None:
            self._pool = pool
            self._owns_pool = False
            return
        options: dict[str, Any] = {}
        if self.statement_cache_size is not None:
            options["statement_cache_size"] = self.statement_cache_size
        with _translate():
            # No reset query on release: the library leaves no session state behind (its
            # settings are transaction-local, its locks transaction-scoped, and LISTEN has
            # a connection of its own), and asyncpg still rolls back a transaction left
            # open. That saves a round trip per pooled call.
            self._pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=max_size,
                reset=_keep_session,
                command_timeout=self.command_timeout,
                **options,
            )
        self._owns_pool = True
        self._dsn = dsn

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None and self._owns_pool:
            with _translate():
                await pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError("repository is not open")
        return self._pool

    # -- the way to the database: every query below goes through these -----------------

    @contextlib.asynccontextmanager
    async def _acquire(self, *, lock_timeout: float | None = None) -> AsyncIterator[Any]:
        """A pooled connection for the body; any driver fault, from acquiring to the
        body's last statement, leaves as a library error.

        A connection that fails to go back to the pool once the body has succeeded
        does not undo what was done (a commit, rows read): the pool discards it and
        opens another when needed, and the caller gets its result.

        When the caller is cancelled the connection is dropped rather than cancelled
        and reset: the server rolls back either way, and dropping takes no round trip,
        so the cancellation is not held up by a stalled network.
        """
        pool = self.pool
        with _translate(), telemetry.pool_wait():
            conn = await pool.acquire()
        succeeded = False
        try:
            with _translate(lock_timeout):
                yield conn
            succeeded = True
        except BaseException as exc:
            if not isinstance(exc, Exception) or isinstance(exc.__cause__, TimeoutError):
                # Cancelled, or past the client-side deadline (a frozen link): dropped,
                # not reset over a link that may not answer.
                conn.terminate()
            raise
        finally:
            try:
                await pool.release(conn)
            except Exception as exc:
                if succeeded:
                    log.debug(
                        "a database connection failed on its way back to the pool and was "
                        "discarded: %s",
                        describe(exc),
                        extra=telemetry.fields("pool_release_failed"),
                    )
                # Otherwise the body's own error is what the caller needs to see.

    async def _fetchrow(self, query: str, *args: Any) -> Any:
        """One ``fetchrow`` on a pooled connection, handled as :meth:`_acquire` handles its
        body, without a context manager per layer: the uncached read's path."""
        pool = self.pool
        try:
            with telemetry.pool_wait():
                conn = await pool.acquire()
        except Exception as exc:
            error = _library_error(exc)
            if error is None:
                raise
            raise error from exc
        succeeded = False
        try:
            record = await conn.fetchrow(query, *args)
            succeeded = True
        except BaseException as exc:
            error = _library_error(exc) if isinstance(exc, Exception) else None
            if not isinstance(exc, Exception) or (
                error is not None and isinstance(exc, TimeoutError)
            ):
                # Cancelled, or past the client-side deadline: dropped, as in _acquire.
                conn.terminate()
            if error is None:
                raise
            raise error from exc
        finally:
            try:
                await pool.release(conn)
            except Exception as exc:
                if succeeded:
                    log.debug(
                        "a database connection failed on its way back to the pool and was "
                        "discarded: %s",
                        describe(exc),
                        extra=telemetry.fields("pool_release_failed"),
                    )
        return record

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[Any]:
        """A transaction whose row-lock waits end after ``lock_timeout`` (LockTimeout),
        committed when the body returns, rolled back when it raises."""
        async with self._acquire(lock_timeout=self.lock_timeout) as conn:
            await conn.execute(self._begin_write)
            try:
                yield conn
            except Exception:
                try:
                    await conn.execute("ROLLBACK")
                except Exception:
                    # Broken meanwhile: dropped, the server rolls back on its own.
                    conn.terminate()
                raise
            await conn.execute("COMMIT")

    # -- migrations --------------------------------------------------------------------

    def _lock_id(self) -> int:
        digest = hashlib.sha256(f"integrations:migrate:{self.schema}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)

    async def schema_version(self) -> int:
        async with self._acquire() as conn:
            if not await conn.fetchval(self.q.migrations_table_exists):
                return 0
            version = await conn.fetchval(self.q.schema_version)
        return int(version or 0)

    async def migrate(self) -> list[int]:
        """Apply pending migrations in one transaction under an advisory lock."""
        applied_now: list[int] = []
        async with self._acquire() as conn, conn.transaction():
            # Idle-bounded like every write; its lock waits keep the session's setting (a
            # migration may wait behind long readers and another process's migration).
            await conn.execute(self.q.set_idle_timeout, self._idle_millis)
            await conn.execute(self.q.migrate_lock, self._lock_id())
            await conn.execute(self.q.migrations_table)
            done = {r["version"] for r in await conn.fetch(self.q.applied_migrations)}
            for migration in self.q.migrations:
                if migration.version in done:
                    continue
                await conn.execute(migration.sql)
                await conn.execute(self.q.record_migration, migration.version, migration.name)
                applied_now.append(migration.version)
        return applied_now

    # -- reads -------------------------------------------------------------------------

    def peek(self, uuid: str) -> StoredRow | None:
        """The row when it can be had without a query (from a cache); None otherwise."""
        return None

    async def get(self, uuid: str) -> StoredRow | None:
        # The driver encodes canonical uuid text itself; anything else is parsed here.
        key = uuid if _CANONICAL_UUID.fullmatch(uuid) is not None else _uuid.UUID(uuid)
        record = await self._fetchrow(self.q.get_by_uuid, key)
        return None if record is None else _row(record)

    async def get_by_key(self, owner: str | None, key: str) -> StoredRow | None:
        record = await self._fetchrow(self.q.get_by_key, _owner_to_db(owner), key)
        return None if record is None else _row(record)

    async def uuid_by_key(self, owner: str | None, key: str) -> str | None:
        async with self._acquire() as conn:
            value = await conn.fetchval(self.q.uuid_by_key, _owner_to_db(owner), key)
        return None if value is None else str(value)

    async def list_by_prefixes(self, owner: str | None, prefixes: Sequence[str]) -> list[StoredRow]:
        """Every row whose key starts with one of ``prefixes`` (unordered): one statement
        however many, an index range scan each."""
        highs = [prefix_end(p) for p in prefixes]
        async with self._acquire() as conn:
            records = await conn.fetch(
                self.q.list_by_prefixes, _owner_to_db(owner), list(prefixes), highs
            )
        return [_row(r) for r in records]

    async def list_page(
        self, owner: str | None, prefix: str, after: str, limit: int
    ) -> list[StoredRow]:
        """Up to ``limit`` rows whose key starts with ``prefix`` and sorts after ``after``
        (byte-wise), in key order, read in index order."""
        async with self._acquire() as conn:
            records = await conn.fetch(
                self.q.list_page, _owner_to_db(owner), prefix, prefix_end(prefix), after, limit
            )
        return [_row(r) for r in records]

    async def list_saved_page(
        self, owner: str | None, prefix: str, after: str, limit: int
    ) -> list[StoredRow]:
        """Like :meth:`list_page`, only rows with saved data, read from their own index."""
        async with self._acquire() as conn:
            records = await conn.fetch(
                self.q.list_saved_page,
                _owner_to_db(owner),
                prefix,
                prefix_end(prefix),
                after,
                limit,
            )
        return [_row(r) for r in records]

    async def search_page(
        self,
        owner: str | None,
        every_owner: bool,
        prefix: str,
        after: tuple[str, str],
        *,
        examine: int,
        limit: int,
        status: str,
        needle: str,
    ) -> tuple[list[StoredRow], tuple[str, str] | None]:
        """The rows among the next ``examine`` (in key order, or (key, owner) order over
        ``every_owner``) after ``after`` (key, owner) that have ``status`` and
        ``needle`` in their name (each '' for any), ``limit`` at most; and where reading
        stopped short of the range's end when it stopped on the ``examine`` limit (the
        last row read, matching or not), else None. A filter by ``status`` alone reads
        only matching rows, from an index of status then order: ``limit`` of them at most
        and no stop (``examine`` is not needed)."""
        async with self._acquire() as conn:
            if status and not needle:
                if every_owner:
                    records = await conn.fetch(
                        self.q.status_every_owner,
                        prefix,
                        prefix_end(prefix),
                        after[0],
                        after[1],
                        status,
                        limit,
                    )
                else:
                    records = await conn.fetch(
                        self.q.status_page,
                        _owner_to_db(owner),
                        prefix,
                        prefix_end(prefix),
                        after[0],
                        status,
                        limit,
                    )
            elif every_owner:
                records = await conn.fetch(
                    self.q.search_every_owner,
                    prefix,
                    prefix_end(prefix),
                    after[0],
                    after[1],
                    examine,
                    limit,
                    status,
                    needle,
                )
            else:
                records = await conn.fetch(
                    self.q.search_page,
                    _owner_to_db(owner),
                    prefix,
                    prefix_end(prefix),
                    after[0],
                    examine,
                    limit,
                    status,
                    needle,
                )
        rows = [_row(r) for r in records if r["hit"]]
        stop = None
        if records and records[-1]["last_read"]:
            stop = (records[-1]["key"], records[-1]["owner"])
        return rows, stop

    async def connection_counts(self, owner: str | None, *, every_owner: bool) -> dict[str, int]:
        """Connections per provider key of ``owner`` (or of every owner), from the counts
        the triggers of migration 0004 keep; a scope's deltas are folded into one row per
        provider once there are many of them."""
        scope = "all" if every_owner else "o:" + _owner_to_db(owner)
        async with self._acquire() as conn:
            records = await conn.fetch(self.q.connection_counts, scope)
            if sum(r["deltas"] for r in records) > _FOLD_COUNTS_AFTER + len(records):
                await conn.execute(self.q.fold_connection_counts, scope)
        return {r["provider"]: int(r["connections"]) for r in records if r["connections"]}

    async def fold_every_connection_count(self, scopes: int = _FOLD_SCOPES) -> None:
        """Fold the per-provider count deltas of up to ``scopes`` scopes that hold more
        than one row per provider (those no reader has folded: an owner whose counts
        nobody asks for, rows added by bulk inserts), then vacuum the table if that
        deleted any (best effort: a role that may not vacuum it leaves it to autovacuum).
        The health sweep runs it."""
        async with self._acquire() as conn:
            deleted = await conn.fetchval(self.q.fold_every_connection_count, scopes)
        if not deleted:
            return
        try:
            async with self._acquire() as conn:
                await conn.execute(self.q.vacuum_connection_counts)
        except StorageError as exc:
            log.debug(
                "the connection counts were not vacuumed: %s",
                exc,
                extra=telemetry.fields("vacuum_skipped"),
            )

    async def list_every_owner(self, prefix: str) -> list[StoredRow]:
        """Every row whose key starts with ``prefix``, whoever owns it (operator tools)."""
        async with self._acquire() as conn:
            records = await conn.fetch(self.q.list_every_owner, prefix, prefix_end(prefix))
        return [_row(r) for r in records]

    # -- writes ------------------------------------------------------------------------

    async def insert(
        self, uuid: str, owner: str | None, key: str, data: dict[str, Any], events: Iterable[Event]
    ) -> StoredRow | None:
        """Insert a new row and notify in one transaction; None when (owner, key) is taken."""
        async with self._write() as conn:
            record = await conn.fetchrow(
                self.q.insert_connection,
                _uuid.UUID(uuid),
                _owner_to_db(owner),
                key,
                _dumps(data),
            )
            if record is None:
                return None
            await self._log(conn, events)
        return _row(record)

    async def modify(self, uuid: str, decide: Callable[[StoredRow | None], tuple[Change, T]]) -> T:
        """Read-modify-write one row under its row lock, notifying in the same transaction.

        ``decide`` is pure: it sees the locked row and returns what to write and emit.
        Concurrent writers to the same row queue on the lock, so no update is lost;
        one that waits longer than the lock timeout gets LockTimeout.
        """
        async with self._write() as conn:
            record = await conn.fetchrow(self.q.lock_by_uuid, _uuid.UUID(uuid))
            row = None if record is None else _row(record)
            change, result = decide(row)
            if row is not None:
                if change.delete:
                    await conn.execute(self.q.delete_connection, _uuid.UUID(uuid))
                elif change.key is not None:
                    await conn.execute(
                        self.q.update_key_value,
                        _uuid.UUID(uuid),
                        change.key,
                        _dumps(change.data if change.data is not None else row.data),
                    )
                elif change.data is not None:
                    await conn.execute(self.q.update_value, _uuid.UUID(uuid), _dumps(change.data))
            await self._log(conn, change.events)
        return result

    async def modify_clocked(
        self,
        uuid: str,
        decide: Callable[[StoredRow | None, datetime | None], tuple[Change, T]],
        *,
        lock_timeout: float,
        idle_timeout: float,
    ) -> T:
        """Like :meth:`modify` in a short transaction that waits at most ``lock_timeout``
        seconds for the row lock (LockTimeout), and hands ``decide`` the server's clock
        too (None with the row). Refresh leases are taken, renewed and ended with it.

        The transaction sends its statements back to back: a client that leaves it idle
        for ``idle_timeout`` seconds has stalled (frozen, stopped), and the server ends
        its session, releasing the row lock for everyone else."""
        key = _uuid.UUID(uuid)
        async with self._acquire(lock_timeout=lock_timeout) as conn, conn.transaction():
            await conn.execute(
                self.q.set_refresh_timeouts, _millis(lock_timeout), _millis(idle_timeout)
            )
            record = await conn.fetchrow(self.q.lock_by_uuid_clocked, key)
            row = None if record is None else _row(record)
            change, result = decide(row, None if record is None else record["now"])
            if row is not None and change.data is not None:
                await conn.execute(self.q.update_value, key, _dumps(change.data))
            await self._log(conn, change.events)
        return result

    async def _log(self, conn: Any, events: Iterable[Event]) -> None:
        """Log ``events`` in the caller's transaction; its commit numbers and notifies them
        (see the events_number trigger)."""
        batch = list(events)
        if not batch:
            return
        await conn.execute(
            self.q.append_events,
            [e.kind for e in batch],
            [e.uuid for e in batch],
            [_owner_to_db(e.owner) for e in batch],
            [e.provider for e in batch],
            [event_payload(e) for e in batch],
        )

    # -- the event log -----------------------------------------------------------------

    async def events_after(
        self,
        after: int,
        *,
        owner: str | None,
        any_owner: bool,
        provider: str | None,
        uuid: str | None,
        kinds: Sequence[str] | None,
        limit: int,
    ) -> tuple[list[Event], int]:
        """Up to ``limit`` logged events after position ``after`` that pass the filters,
        in position order, and the position up to which retention may have deleted."""
        kind_list = None if kinds is None else sorted(kinds)
        async with self._acquire() as conn:
            pruned = await conn.fetchval(self.q.events_pruned_through)
            if uuid is not None:
                # One connection's events: through its own index, whatever the log holds.
                records = await conn.fetch(
                    self.q.events_after_uuid,
                    uuid,
                    after,
                    any_owner,
                    None if any_owner else _owner_to_db(owner),
                    provider,
                    kind_list,
                    limit,
                )
            elif any_owner:
                records = await conn.fetch(
                    self.q.events_after_any_owner, after, provider, uuid, kind_list, limit
                )
            else:
                records = await conn.fetch(
                    self.q.events_after_owner,
                    after,
                    _owner_to_db(owner),
                    provider,
                    uuid,
                    kind_list,
                    limit,
                )
        events = []
        for record in records:
            event = Event.from_payload(record["body"])
            events.append(dataclasses.replace(event, position=record["position"]))
        return events, int(pruned or 0)

    async def last_event_position(self) -> int:
        """The highest position logged so far; 0 when the log is empty."""
        async with self._acquire() as conn:
            return int(await conn.fetchval(self.q.events_last_position) or 0)

    async def prune_events(
        self, *, older_than: datetime | None, keep: int | None, batch: int = 5000
    ) -> int:
        """Delete logged events logged before ``older_than`` or beyond the newest ``keep``,
        oldest first, ``batch`` at a time (each in its own short transaction); returns how
        many were deleted."""
        target = 0
        async with self._acquire() as conn:
            if keep is not None:
                cut = await conn.fetchval(self.q.events_count_cut, keep)
                target = max(target, int(cut or 0))
            # Events not yet turned into webhook deliveries are kept whatever their age.
            dispatched, endpoints = await conn.fetchrow(self.q.webhook_cursor_position)
        limit = int(dispatched) if endpoints and dispatched is not None else None
        deleted = 0
        while True:
            async with self._acquire() as conn:
                oldest = await conn.fetch(self.q.events_oldest, batch)
            if not oldest:
                return deleted
            cut = 0
            for record in oldest:
                position = int(record["position"])
                if limit is not None and position > limit:
                    break
                if position <= target or (
                    older_than is not None and record["logged_at"] < older_than
                ):
                    cut = position
                else:
                    break
            if cut == 0:
                return deleted
            async with self._acquire() as conn, conn.transaction():
                await conn.execute(self.q.set_idle_timeout, self._idle_millis)
                record = await conn.fetchrow(self.q.events_prune, cut)
            deleted += int(record["deleted"])
            if cut != int(oldest[-1]["position"]):
                return deleted

    # -- webhooks ----------------------------------------------------------------------

    async def webhook_add(
        self,
        endpoint_id: str,
        owner: str | None,
        url: str,
        kinds: Sequence[str] | None,
        sealed_secret: Any,
        description: str,
    ) -> dict[str, Any]:
        async with self._acquire() as conn, conn.transaction():
            await conn.execute(self.q.set_idle_timeout, self._idle_millis)
            record = await conn.fetchrow(
                self.q.webhook_insert_endpoint,
                _uuid.UUID(endpoint_id),
                owner,
                url,
                None if kinds is None else list(kinds),
                json.dumps(sealed_secret),
                description,
            )
        return _endpoint(record)

    async def webhook_list(self, *, any_owner: bool, owner: str | None) -> list[dict[str, Any]]:
        async with self._acquire() as conn:
            records = await conn.fetch(self.q.webhook_endpoints, any_owner, owner)
        return [_endpoint(r) for r in records]

    async def webhook_get(self, endpoint_id: str) -> dict[str, Any] | None:
        """The endpoint with its sealed secret under ``secret``; None when there is none."""
        async with self._acquire() as conn:
            record = await conn.fetchrow(self.q.webhook_endpoint, _uuid.UUID(endpoint_id))
        if record is None:
            return None
        found = _endpoint(record)
        found["secret"] = json.loads(record["secret"])
        return found

    async def webhook_remove(self, endpoint_id: str, *, any_owner: bool, owner: str | None) -> bool:
        async with self._acquire() as conn:
            gone = await conn.fetchval(
                self.q.webhook_delete_endpoint, _uuid.UUID(endpoint_id), any_owner, owner
            )
        return gone is not None

    async def webhook_dispatch(
        self,
        limit: int,
        plan: Callable[
            [list[Event], list[dict[str, Any]]], list[tuple[str, str, int, str, str, str]]
        ],
    ) -> int | None:
        """Turn up to ``limit`` logged events after the dispatch cursor into deliveries
        (``plan(events, endpoints)`` says which: rows of id, endpoint id, position, lane,
        kind, payload) and move the cursor, in one transaction. None when another process
        is dispatching (or no endpoint was ever added); else how many events were read."""
        async with self._acquire() as conn, conn.transaction():
            await conn.execute(self.q.set_idle_timeout, self._idle_millis)
            cursor = await conn.fetchval(self.q.webhook_lock_cursor)
            if cursor is None:
                return None
            records = await conn.fetch(self.q.webhook_events_after, cursor, limit)
            if not records:
                return 0
            events = [
                dataclasses.replace(Event.from_payload(r["body"]), position=r["position"])
                for r in records
            ]
            endpoints = [
                {"id": str(r["id"]), "owner": r["owner"], "kinds": r["kinds"]}
                for r in await conn.fetch(self.q.webhook_all_endpoints)
            ]
            rows = plan(events, endpoints)
            if rows:
                ids, endpoint_ids, positions, lanes, kinds, payloads = zip(*rows, strict=True)
                await conn.execute(
                    self.q.webhook_insert_deliveries,
                    list(ids),
                    [_uuid.UUID(e) for e in endpoint_ids],
                    list(positions),
                    list(lanes),
                    list(kinds),
                    list(payloads),
                )
            await conn.execute(self.q.webhook_move_cursor, records[-1]["position"])
        return len(records)

    async def webhook_claim(self, token: str, lease: float, limit: int) -> list[dict[str, Any]]:
        """Due deliveries heading their lanes, leased to ``token`` for ``lease`` seconds;
        each with its endpoint's url and sealed secret."""
        async with self._acquire() as conn:
            records = await conn.fetch(self.q.webhook_claim, _uuid.UUID(token), lease, limit)
        return [
            {
                "id": r["id"],
                "endpoint_id": str(r["endpoint_id"]),
                "position": r["position"],
                "lane": r["lane"],
                "kind": r["kind"],
                "payload": r["payload"],
                "attempts": r["attempts"],
                "url": r["url"],
                "secret": json.loads(r["secret"]),
            }
            for r in records
        ]

    async def webhook_finish(
        self,
        delivery_id: str,
        token: str,
        state: str,
        status: int | None,
        error: str | None,
        delay: float,
    ) -> bool:
        """Record an attempt; False when the lease was lost (someone else has it now)."""
        async with self._acquire() as conn:
            done = await conn.fetchval(
                self.q.webhook_finish,
                delivery_id,
                _uuid.UUID(token),
                state,
                status,
                error,
                float(delay),
            )
        return done is not None

    async def webhook_deliveries(
        self, endpoint_id: str, state: str | None, limit: int
    ) -> list[dict[str, Any]]:
        async with self._acquire() as conn:
            records = await conn.fetch(
                self.q.webhook_deliveries_of, _uuid.UUID(endpoint_id), state, limit
            )
        return [dict(r.items()) | {"endpoint_id": str(r["endpoint_id"])} for r in records]

    async def webhook_replay(self, delivery_id: str, *, any_owner: bool, owner: str | None) -> bool:
        async with self._acquire() as conn:
            found = await conn.fetchval(self.q.webhook_replay, delivery_id, any_owner, owner)
        return found is not None

    async def webhook_next_due(self) -> float | None:
        """Seconds until the earliest pending delivery is due (negative: overdue)."""
        async with self._acquire() as conn:
            value = await conn.fetchval(self.q.webhook_next_due)
        return None if value is None else float(value)

    async def notify_channel(self, channel: str, payload: str) -> None:
        """Send ``payload`` on another channel than the events' one (a listener probe)."""
        with _translate():
            await self.pool.execute(self.q.notify, channel, payload)

    # -- key rotation ------------------------------------------------------------------

    async def count_to_reseal(
        self, primary_kid: str, plaintext_fields: Sequence[str], plaintext_verifiers: bool
    ) -> int:
        """Connections plus pending authorizations that :meth:`reseal_connections` and
        :meth:`reseal_pending` would examine now.

        Counted from the indexes of what needs work, in one snapshot, by statements that
        each read at most ``RESEAL_COUNT_STEP`` index entries: counting a million rows
        under an old key takes as long as reading their index entries, and no statement
        of it runs into the client-side statement deadline."""
        step = RESEAL_COUNT_STEP
        q = self.q
        # Each range: the query of the row a step on, the query of the rest, its start
        # (as reseal_connections starts it) and the arguments after the cursor.
        ranges: tuple[tuple[str, str, list[str], _uuid.UUID, tuple[str, ...]], ...] = (
            (q.count_reseal_below_end, q.count_reseal_below_rest, [""], _NIL_UUID, (primary_kid,)),
            (q.count_reseal_above_end, q.count_reseal_above_rest, [primary_kid], _MAX_UUID, ()),
        )
        async with (
            self._acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            await conn.execute(self._bound_transaction)
            total = 0
            for end_query, rest_query, kids, row, bound in ranges:
                while True:
                    end = await conn.fetchrow(end_query, kids, row, step - 1, *bound)
                    if end is None:
                        total += await conn.fetchval(rest_query, kids, row, *bound)
                        break
                    total += step
                    kids, row = end["kids"], end["uuid"]
            total += await conn.fetchval(
                q.count_plain_to_reseal, primary_kid, list(plaintext_fields)
            )
            pending = await conn.fetchval(
                q.count_pending_to_reseal, primary_kid, plaintext_verifiers
            )
        return int(total) + int(pending or 0)

    async def reseal_connections(
        self,
        after: str,
        limit: int,
        primary_kid: str,
        plaintext_fields: Sequence[str],
        reseal: Callable[[StoredRow], dict[str, Any] | None],
    ) -> ResealBatch:
        """One rotation batch in its own transaction, keyset-paginated.

        Takes up to ``limit`` rows after the cursor ``after`` (``RESEAL_START`` to begin,
        else a batch's ``last``) that hold an envelope not under ``primary_kid`` or
        plaintext in ``plaintext_fields``, locks those no other transaction holds, and
        writes back what ``reseal`` returns for each (None leaves the row as it is). The
        rows are found through indexes of what needs work (migration 0004), so a pass
        reads only those: one with nothing to do costs the same at any table size. The
        rows it could not lock come back in ``skipped``, for :meth:`reseal_listed`.
        Writers going through :meth:`modify` take the same row lock, so neither side
        loses the other's update.
        """
        cursor: _ResealCursor | None = _ResealCursor.parse(after, primary_kid)
        async with self._acquire() as conn, conn.transaction():
            await conn.execute(self._bound_transaction)
            while cursor is not None:
                candidates, cursor = await self._reseal_candidates(
                    conn, cursor, limit, primary_kid, plaintext_fields
                )
                if candidates:
                    break
            if cursor is None:
                return ResealBatch(scanned=0, rewritten=0, last=None)
            records = await conn.fetch(self.q.lock_connections_to_reseal, candidates)
            rewritten = await self._reseal_locked(conn, records, reseal)
        locked = {r["uuid"] for r in records}
        if rewritten:
            cursor = dataclasses.replace(cursor, moved=True)
        return ResealBatch(
            scanned=len(records),
            rewritten=rewritten,
            last=cursor.dump(),
            skipped=tuple(str(u) for u in candidates if u not in locked),
            examined=tuple(str(u) for u in locked),
        )

    async def _reseal_candidates(
        self,
        conn: Any,
        cursor: _ResealCursor,
        limit: int,
        primary_kid: str,
        plaintext_fields: Sequence[str],
    ) -> tuple[list[_uuid.UUID], _ResealCursor | None]:
        """The next candidates of the cursor's phase and the cursor after them; an empty
        list with the next phase's start when this phase is done (None after the last)."""
        if cursor.phase == "plain":
            records = await conn.fetch(
                self.q.connections_plain_to_reseal, cursor.uuid, limit, list(plaintext_fields)
            )
            if not records:
                return [], _ResealCursor.start() if cursor.moved else None
            last = records[-1]["uuid"]
            return [r["uuid"] for r in records], dataclasses.replace(cursor, uuid=last)
        if cursor.phase == "below":
            records = await conn.fetch(
                self.q.connections_to_reseal_below,
                list(cursor.kids),
                cursor.uuid,
                limit,
                primary_kid,
            )
        else:
            records = await conn.fetch(
                self.q.connections_to_reseal_above, list(cursor.kids), cursor.uuid, limit
            )
        if not records:
            if cursor.phase == "below":
                # Past every row under the primary key alone.
                return [], _ResealCursor("above", (primary_kid,), _MAX_UUID, cursor.moved)
            return [], _ResealCursor("plain", (), _NIL_UUID, cursor.moved)
        last = records[-1]
        return [r["uuid"] for r in records], _ResealCursor(
            cursor.phase, tuple(last["kids"]), last["uuid"], cursor.moved
        )

    async def analyze_connections(self) -> None:
        """Refresh the planner's statistics of the connections table (best effort: a role
        that may not analyze it leaves them to autovacuum)."""
        try:
            async with self._acquire() as conn:
                await conn.execute(self.q.analyze_connections)
        except StorageError as exc:
            log.debug(
                "the connections table's statistics were not refreshed: %s",
                exc,
                extra=telemetry.fields("analyze_skipped"),
            )

    async def reseal_listed(
        self,
        uuids: Sequence[str],
        reseal: Callable[[StoredRow], dict[str, Any] | None],
        *,
        wait: bool,
    ) -> ResealBatch:
        """Like :meth:`reseal_connections` for rows skipped earlier, by uuid.

        Without ``wait`` rows that are still held are skipped again; with it, the one
        row given is waited for (so the transaction holds nothing else meanwhile). A row
        deleted meanwhile is simply gone.
        """
        if wait and len(uuids) != 1:
            raise ValueError("wait for one row at a time")
        keys = [_uuid.UUID(u) for u in uuids]
        async with self._acquire() as conn, conn.transaction():
            await conn.execute(self._bound_transaction)
            if wait:
                records = await conn.fetch(self.q.lock_connection_to_reseal, keys[0])
            else:
                records = await conn.fetch(self.q.lock_connections_to_reseal, keys)
            rewritten = await self._reseal_locked(conn, records, reseal)
        locked = {r["uuid"] for r in records}
        return ResealBatch(
            scanned=len(records),
            rewritten=rewritten,
            last=None,
            skipped=() if wait else tuple(str(u) for u in keys if u not in locked),
        )

    async def _reseal_locked(
        self,
        conn: Any,
        records: Sequence[asyncpg.Record],
        reseal: Callable[[StoredRow], dict[str, Any] | None],
    ) -> int:
        written: list[tuple[_uuid.UUID, str]] = []
        for record in records:
            data = reseal(_row(record))
            if data is not None:
                written.append((record["uuid"], _dumps(data)))
        if written:
            ids, values = zip(*written, strict=True)
            await conn.execute(self.q.reseal_connections, list(ids), list(values))
        return len(written)

    async def reseal_pending(
        self,
        after: str,
        limit: int,
        primary_kid: str,
        plaintext_verifiers: bool,
        reseal: Callable[[str, Any], Any | None],
    ) -> ResealBatch:
        """Like :meth:`reseal_connections` for the PKCE verifiers of pending
        authorizations, keyset-paginated by state hash; ``reseal(state_hash, verifier)``
        returns the value to store, or None to leave the row as it is."""
        written: list[tuple[str, str]] = []
        async with self._acquire() as conn, conn.transaction():
            await conn.execute(self._bound_transaction)
            records = await conn.fetch(
                self.q.pending_to_reseal, after, limit, primary_kid, plaintext_verifiers
            )
            for record in records:
                verifier = json.loads(record["code_verifier"])
                resealed = reseal(record["state_hash"], verifier)
                if resealed is not None:
                    written.append((record["state_hash"], json.dumps(resealed)))
            if written:
                hashes, values = zip(*written, strict=True)
                await conn.execute(self.q.reseal_pending, list(hashes), list(values))
        last = str(records[-1]["state_hash"]) if records else None
        return ResealBatch(scanned=len(records), rewritten=len(written), last=last)

    # -- listening ---------------------------------------------------------------------

    async def listen(
        self, channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> Listener:
        """LISTEN on ``channel``: on a connection of its own to ``listen_dsn`` when one was
        given (behind a transaction pooler), else on one of its own when the pool is ours
        (its connections are released without a reset), else on one held from the pool."""
        dsn = self.listen_dsn or (self._dsn if self._owns_pool else None)
        pool = None if dsn is not None else self.pool
        with _translate():
            conn = await (
                asyncpg.connect(dsn, command_timeout=self.command_timeout)
                if pool is None
                else pool.acquire()
            )
        return await Listener.attach(pool, conn, channel, on_payload, on_lost, self.notify_channel)

    # -- one health sweep per fleet ------------------------------------------------------

    def advisory_lock_id(self, purpose: str) -> int:
        """A 64-bit advisory lock id for ``purpose`` in this schema."""
        digest = hashlib.sha256(f"integrations:{purpose}:{self.schema}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)

    async def take_lease(self, purpose: str, holder: str, seconds: float) -> bool:
        """Take or renew the lease of ``purpose`` for ``holder`` for ``seconds`` (by the
        database's clock); False while another holder's lease runs. One statement, so it
        holds behind a transaction pooler too."""
        async with self._acquire() as conn:
            term = await conn.fetchval(self.q.take_lease, purpose, _uuid.UUID(holder), seconds)
        return term is not None

    async def drop_lease(self, purpose: str, holder: str) -> None:
        """Give up ``holder``'s lease of ``purpose`` (nothing when it no longer holds it)."""
        async with self._acquire() as conn:
            await conn.execute(self.q.drop_lease, purpose, _uuid.UUID(holder))

    async def sweep_candidates(self, after: str, limit: int) -> list[StoredRow]:
        """A page of configured connections in uuid order, starting after ``after``."""
        with _translate():
            async with self.pool.acquire() as conn:
                records = await conn.fetch(self.q.sweep_candidates, _uuid.UUID(after), limit)
        return [_row(r) for r in records]

    # -- wrapped data keys (key sources held by a KMS or an HSM) ---------------------------

    async def data_keys(self, wrapper: str) -> list[tuple[str, bytes]]:
        """The data keys ``wrapper`` wrapped, newest first, as ``(key id, wrapped)``."""
        async with self._acquire() as conn:
            records = await conn.fetch(self.q.data_keys_of, wrapper)
        return [(r["kid"], bytes(r["wrapped"])) for r in records]

    async def create_data_key(
        self, wrapper: str, make: Callable[[], Awaitable[tuple[str, bytes]]]
    ) -> list[tuple[str, bytes]]:
        """The data keys of ``wrapper``, making the first with ``make`` when there is none;
        processes opening together make one between them."""
        async with self._acquire() as conn, conn.transaction():
            # ``make`` may ask a key service while the transaction waits: idle up to the
            # lock timeout (not the usual 5 s), still bounded.
            await conn.execute(self.q.set_idle_timeout, _millis(self.lock_timeout))
            await conn.execute(self.q.data_keys_lock, self.advisory_lock_id("data_keys"))
            records = await conn.fetch(self.q.data_keys_of, wrapper)
            if not records:
                kid, wrapped = await make()
                await conn.execute(self.q.put_data_key, kid, wrapper, wrapped)
                return [(kid, wrapped)]
        return [(r["kid"], bytes(r["wrapped"])) for r in records]

    async def all_data_keys(self) -> list[tuple[str, str]]:
        """Every stored data key as ``(key id, wrapper)``, oldest first."""
        async with self._acquire() as conn:
            records = await conn.fetch(self.q.all_data_keys)
        return [(r["kid"], r["wrapper"]) for r in records]

    async def put_data_key(self, kid: str, wrapper: str, wrapped: bytes) -> None:
        """Store a data key, or wrap a stored one anew (keeping its age)."""
        async with self._acquire() as conn:
            await conn.execute(self.q.put_data_key, kid, wrapper, wrapped)

    # -- the audit trail ------------------------------------------------------------------

    async def audit_append(self, entries: Sequence[dict[str, Any]]) -> int:
        """Append records to the chain in one transaction, under the schema's audit lock;
        returns the last seq written."""
        async with self._acquire() as conn, conn.transaction():
            await conn.execute(self.q.set_idle_timeout, self._idle_millis)
            await conn.execute(self.q.audit_lock, self.advisory_lock_id("audit"))
            tail = await conn.fetchrow(self.q.audit_tail)
            seq, previous = (0, audit.GENESIS) if tail is None else (tail["seq"], tail["hash"])
            columns: list[list[Any]] = [[] for _ in range(11)]
            for entry in entries:
                seq += 1
                record = audit.AuditRecord(seq=seq, **entry)
                link = audit.chain_hash(previous, record)
                values = (
                    seq,
                    record.at,
                    record.action,
                    record.actor,
                    record.owner,
                    None if record.uuid is None else _uuid.UUID(record.uuid),
                    record.provider,
                    record.outcome,
                    json.dumps(dict(record.detail), separators=(",", ":"), default=str),
                    previous,
                    link,
                )
                for column, value in zip(columns, values, strict=True):
                    column.append(value)
                previous = link
            await conn.execute(self.q.audit_insert, *columns)
        return seq

    async def audit_page(
        self,
        *,
        before: int,
        uuid: str | None,
        owner: str | None,
        actor: str | None,
        since: datetime | None,
        action: str | None,
        limit: int,
        by_owner: bool,
    ) -> list[audit.AuditRecord]:
        async with self._acquire() as conn:
            records = await conn.fetch(
                self.q.audit_page,
                before,
                None if uuid is None else _uuid.UUID(uuid),
                owner,
                actor,
                since,
                action,
                limit,
                by_owner,
            )
        return [_audit_record(r) for r in records]

    async def audit_chain(
        self, after: int, limit: int
    ) -> list[tuple[audit.AuditRecord, bytes, bytes]]:
        """Records after ``after`` in seq order, with their stored links."""
        async with self._acquire() as conn:
            records = await conn.fetch(self.q.audit_chain, after, limit)
        return [(_audit_record(r), bytes(r["prev_hash"]), bytes(r["hash"])) for r in records]

    async def audit_sweep(self, cutoff: datetime, entry: dict[str, Any]) -> int:
        """Delete the records older than ``cutoff``, recording the sweep in the chain (with
        the first kept record and its link, the new anchor); returns how many went."""
        async with self._acquire() as conn, conn.transaction():
            await conn.execute(self.q.set_idle_timeout, self._idle_millis)
            await conn.execute(self.q.audit_lock, self.advisory_lock_id("audit"))
            first = await conn.fetchrow(self.q.audit_first_kept, cutoff)
            tail = await conn.fetchrow(self.q.audit_tail)
            if tail is None:
                return 0
            if first is None:
                keep_from, anchor = tail["seq"] + 1, bytes(tail["hash"])
            else:
                keep_from, anchor = first["seq"], bytes(first["prev_hash"])
            gone = await conn.fetchval(self.q.audit_count_before, keep_from)
            if not gone:
                return 0
            seq, previous = tail["seq"] + 1, bytes(tail["hash"])
            detail = {
                **entry["detail"],
                "kept_from": keep_from,
                "anchor": anchor.hex(),
                "deleted": gone,
            }
            record = audit.AuditRecord(seq=seq, **{**entry, "detail": detail})
            link = audit.chain_hash(previous, record)
            await conn.execute(
                self.q.audit_insert,
                [seq],
                [record.at],
                [record.action],
                [record.actor],
                [record.owner],
                [None],
                [None],
                [record.outcome],
                [json.dumps(detail, separators=(",", ":"))],
                [previous],
                [link],
            )
            await conn.execute(self.q.audit_sweep)
            await conn.execute(self.q.audit_delete_before, keep_from)
        return int(gone)

    async def audit_anchor(self) -> tuple[int, bytes]:
        """Where verification starts: the newest sweep's first kept record and its link,
        or record 1 and the genesis link."""
        async with self._acquire() as conn:
            detail = await conn.fetchval(self.q.audit_anchor)
        if detail is None:
            return 1, audit.GENESIS
        found = json.loads(detail)
        return int(found["kept_from"]), bytes.fromhex(found["anchor"])

    # -- raw access for tests and benchmarks ---------------------------------------------

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        async with self._acquire() as conn:
            yield conn

    # -- pending authorizations ----------------------------------------------------------

    async def insert_pending(
        self,
        state_hash: str,
        connection_uuid: str,
        owner: str | None,
        redirect_uri: str,
        scopes: Sequence[str],
        code_verifier: Any,
        actor: str | None,
        ttl: float,
    ) -> bool:
        """Store a pending authorization; False when the state hash is already pending."""
        async with self._acquire() as conn:
            found = await conn.fetchval(
                self.q.insert_pending_authorization,
                state_hash,
                _uuid.UUID(connection_uuid),
                _owner_to_db(owner),
                redirect_uri,
                list(scopes),
                json.dumps(code_verifier),
                actor,
                float(ttl),
            )
        return found is not None

    async def take_pending(
        self, state_hash: str, *, owner: str | None = None, any_owner: bool = True
    ) -> PendingAuthorization | None:
        """Consume the pending authorization of a state (live or expired): one use at most.

        Unless ``any_owner``, only one started for a connection of ``owner`` is consumed.
        """
        async with self._acquire() as conn:
            record = await conn.fetchrow(
                self.q.take_pending_authorization, state_hash, any_owner, _owner_to_db(owner)
            )
        return None if record is None else _pending(record)

    async def take_latest_pending(
        self, connection_uuid: str, redirect_uri: str
    ) -> PendingAuthorization | None:
        """Consume the newest live pending authorization of a connection and redirect URI."""
        async with self._acquire() as conn:
            record = await conn.fetchrow(
                self.q.take_latest_pending_authorization,
                _uuid.UUID(connection_uuid),
                redirect_uri,
            )
        return None if record is None else _pending(record)

    async def delete_expired_pending(self) -> int:
        """Drop expired pending authorizations; returns how many."""
        async with self._acquire() as conn:
            status = await conn.execute(self.q.delete_expired_pending_authorizations)
        return int(status.split()[-1]) if status.startswith("DELETE") else 0


def _endpoint(record: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(record["id"]),
        "owner": record["owner"],
        "url": record["url"],
        "kinds": None if record["kinds"] is None else tuple(record["kinds"]),
        "description": record["description"],
        "created_at": record["created_at"],
    }


@dataclass(frozen=True, slots=True)
class PendingAuthorization:
    """A consumed pending authorization; ``code_verifier`` is as stored (sealed)."""

    state_hash: str
    connection_uuid: str
    owner: str | None
    redirect_uri: str
    scopes: tuple[str, ...]
    code_verifier: Any = field(repr=False)
    actor: str | None
    live: bool
    expires_at: datetime | None = None


def _pending(record: asyncpg.Record) -> PendingAuthorization:
    raw = record["code_verifier"]
    return PendingAuthorization(
        state_hash=record["state_hash"],
        connection_uuid=str(record["connection_uuid"]),
        owner=record["owner"] or None,
        redirect_uri=record["redirect_uri"],
        scopes=tuple(record["scopes"] or ()),
        code_verifier=None if raw is None else json.loads(raw),
        actor=record["actor"],
        live=bool(record["live"]),
        expires_at=record["expires_at"],
    )


#: The longest a write transaction may sit idle (at most the lock timeout).
IDLE_IN_TRANSACTION = 5.0
#: Seconds beyond the lock timeout a statement may take before the client gives up on it.
COMMAND_MARGIN = 10.0


def _audit_record(record: asyncpg.Record) -> audit.AuditRecord:
    uuid = record["uuid"]
    return audit.AuditRecord(
        seq=record["seq"],
        at=record["at"],
        action=record["action"],
        actor=record["actor"],
        owner=record["owner"],
        uuid=None if uuid is None else str(uuid),
        provider=record["provider"],
        outcome=record["outcome"],
        detail=json.loads(record["detail"]),
    )


def _millis(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


async def probe_postgres(
    *,
    host: str,
    port: int,
    user: str,
    password: str,
    database: str,
    timeout: float,  # noqa: ASYNC109
) -> tuple[str, str]:
    """Log in to a user-given PostgreSQL server and run ``SELECT 1``.

    Returns an outcome (``ok``, ``invalid_credentials``, ``database_not_found``,
    ``access_denied``, ``unreachable`` or ``service_error``) and a detail (the SQLSTATE).
    """
    try:
        conn = await asyncpg.connect(
            host=host,
            port=port,
            user=user,
            # Always explicit: with None, asyncpg would fall back to this process's
            # PGPASSWORD or ~/.pgpass and send it to the user-given host.
            password=password,
            database=database,
            timeout=timeout,
        )
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError):
        return "invalid_credentials", ""
    except asyncpg.InvalidCatalogNameError:
        return "database_not_found", ""
    except asyncpg.InsufficientPrivilegeError:
        return "access_denied", ""
    except (OSError, TimeoutError, asyncpg.CannotConnectNowError):
        return "unreachable", ""
    except asyncpg.PostgresError as exc:
        return "service_error", str(exc.sqlstate)
    except (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError):
        return "service_error", "(connection refused by the driver)"
    try:
        await conn.fetchval("SELECT 1", timeout=timeout)
    except asyncpg.PostgresError as exc:
        return "service_error", str(exc.sqlstate)
    except (OSError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError):
        # Dropped between the login and the query.
        return "unreachable", ""
    finally:
        try:
            await conn.close(timeout=timeout)
        except Exception:
            conn.terminate()
    return "ok", ""


# -- driver failures in plain words ---------------------------------------------------

_MAX_REASON = 300
# user:password@ in any URL-shaped text, and password=... in keyword form.
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(?P<head>password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)
# A data error may quote the offending value; only the reason before it is kept.
_QUOTING_SQLSTATE_CLASSES = ("22", "23")
_SQLALCHEMY_SCHEME = re.compile(r"postgres(?:ql)?\+(?P<driver>[a-z0-9_]+)", re.IGNORECASE)


def mask_dsn(text: str) -> str:
    """``text`` with every password of a DSN or ``password=`` keyword replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    return _KEYWORD_PASSWORD.sub(r"\g<head>***", text)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused ({exc})"
    if isinstance(exc, TimeoutError):
        return "the connection timed out"
    reason = str(exc).strip() or type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate[:2] in _QUOTING_SQLSTATE_CLASSES:
        reason = reason.split(": ", 1)[0]
    reason = " ".join(mask_dsn(reason).split()).replace("`", "'")
    if len(reason) > _MAX_REASON:
        reason = reason[:_MAX_REASON] + "…"
    return reason.rstrip(".")


def _next_step(exc: BaseException, reason: str) -> str:
    sqlalchemy = _SQLALCHEMY_SCHEME.search(reason)
    if sqlalchemy:
        return (
            f"This is a SQLAlchemy-style DSN: drop '+{sqlalchemy['driver']}' "
            "so that it starts with postgresql://."
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return "Create the database or fix its name in the DSN."
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return "Check the user and password in the DSN."
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return "Check the DSN: it looks like postgresql://user:password@host:5432/database."
    if isinstance(exc, OSError | TimeoutError | asyncpg.CannotConnectNowError):
        return "Check that PostgreSQL is running and that the DSN's host and port are right."
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return "Grant the database user the privileges it needs, or use another user."
    return "See the PostgreSQL server log for details."


def describe(exc: BaseException) -> str:
    """One plain sentence or two for a StorageError: what the driver said and what to do."""
    reason = _reason(exc)
    if type(exc) is ValueError and "invalid literal for int()" in reason:
        # The driver's DSN parser reading the port: the server was never asked.
        return (
            "The DSN's port is not a number; the server was not contacted. Check the DSN: "
            "it looks like postgresql://user:password@host:5432/database."
        )
    return f"Database error ({type(exc).__name__}): {reason}. {_next_step(exc, reason)}"


async def _hand_back(pool: asyncpg.Pool | None, conn: Any) -> None:
    """Release a pooled connection, or close one of its own."""
    if pool is None:
        await conn.close()
    else:
        await pool.release(conn)
