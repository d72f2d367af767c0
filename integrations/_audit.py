"""The audit trail: who revealed, used or changed which credential, hash-chained per schema."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from . import _telemetry as telemetry
from ._errors import AuditFailed, ConfigurationError
from ._names import shown
from ._scope import ACTOR as ACTOR
from ._settings import check_at_most

__all__ = [
    "ACTIONS",
    "ACTOR",
    "LEVELS",
    "AuditLevel",
    "AuditLog",
    "AuditPage",
    "AuditRecord",
    "Breach",
    "acting_as",
    "chain_hash",
    "genesis",
    "verify_records",
]

log = logging.getLogger("integrations")

AuditLevel = Literal["admin", "reveal", "use"]
LEVELS: Final[tuple[str, ...]] = ("admin", "reveal", "use")

#: Every action recorded, by the level that records it.
ACTIONS: Final[dict[str, str]] = {
    "connection.added": "admin",
    "connection.renamed": "admin",
    "connection.removed": "admin",
    "connection.disconnected": "admin",
    "setup.saved": "admin",
    "tokens.imported": "admin",
    "token.issued": "admin",
    "token.refreshed": "admin",
    "keys.rotated": "admin",
    "keys.data_key_added": "admin",
    "store.exported": "admin",
    "store.imported": "admin",
    "audit.swept": "admin",
    "audit.dropped": "admin",
    "credentials.revealed": "reveal",
    "token.revealed": "reveal",
    "request.sent": "use",
}


GENESIS: Final = bytes(32)
FLUSH_EVERY: Final = 0.25
BATCH: Final = 500


def genesis() -> bytes:
    return GENESIS


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One entry of the audit trail. ``detail`` holds names and numbers (field names, a
    method, a host, a status, counts), never a secret's value."""

    seq: int
    at: datetime
    action: str
    actor: str | None = None
    owner: str | None = None
    uuid: str | None = None
    provider: str | None = None
    outcome: str = "ok"
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at.isoformat(),
            "action": self.action,
            "actor": self.actor,
            "owner": self.owner,
            "uuid": self.uuid,
            "provider": self.provider,
            "outcome": self.outcome,
            "detail": dict(self.detail),
        }


@dataclass(frozen=True, slots=True)
class AuditPage:
    """A page of records, newest first; ``next_before`` continues it (None at the end)."""

    records: list[AuditRecord]
    next_before: int | None


@dataclass(frozen=True, slots=True)
class Breach:
    """A place where the chain does not hold: ``seq`` is the record at fault (or the first
    one missing), ``kind`` one of ``changed``, ``removed``, ``reordered``."""

    seq: int
    kind: str
    message: str


def _canonical(record: AuditRecord) -> bytes:
    body = [
        record.seq,
        record.at.astimezone(UTC).isoformat(timespec="microseconds"),
        record.action,
        record.actor,
        record.owner,
        record.uuid,
        record.provider,
        record.outcome,
        dict(record.detail),
    ]
    return json.dumps(body, separators=(",", ":"), sort_keys=True, default=str).encode()


def chain_hash(previous: bytes, record: AuditRecord) -> bytes:
    """The record's link: SHA-256 of the previous link and the record's canonical JSON."""
    return hashlib.sha256(previous + _canonical(record)).digest()


def verify_records(
    rows: Sequence[tuple[AuditRecord, bytes, bytes]], *, start_seq: int, start_hash: bytes
) -> list[Breach]:
    """Walk ``(record, prev_hash, hash)`` in storage order from the anchor and report each
    record that was changed, removed or moved."""
    breaches: list[Breach] = []
    expected_seq, previous = start_seq, start_hash
    for record, prev_stored, stored in rows:
        if record.seq != expected_seq:
            if record.seq > expected_seq and prev_stored != previous:
                missing = (
                    f"record {expected_seq}"
                    if record.seq == expected_seq + 1
                    else f"records {expected_seq} to {record.seq - 1}"
                )
                breaches.append(
                    Breach(expected_seq, "removed", f"{missing} removed before record {record.seq}")
                )
            else:
                breaches.append(
                    Breach(
                        record.seq,
                        "reordered",
                        f"record {record.seq} found where record {expected_seq} belongs",
                    )
                )
        elif prev_stored != previous:
            breaches.append(
                Breach(
                    record.seq,
                    "reordered",
                    f"record {record.seq} does not follow record {record.seq - 1} "
                    "(moved, or the record before it was replaced)",
                )
            )
        elif chain_hash(previous, record) != stored:
            breaches.append(
                Breach(
                    record.seq, "changed", f"record {record.seq} was changed after it was written"
                )
            )
        # Go on from what is stored, so that one fault is reported once.
        expected_seq, previous = record.seq + 1, stored
    return breaches


@dataclass(slots=True)
class _Pending:
    records: list[dict[str, Any]]
    done: asyncio.Future[None] | None


class AuditLog:
    """Writes records in batches under one lock per schema.

    Administrative and reveal records are awaited: the call returns once its record is
    committed (calls made together share a transaction). Use records are buffered and
    written every quarter second; past ``buffer`` of them the oldest are dropped, counted,
    and the count itself recorded.
    """

    def __init__(self, repo: Any, *, level: str, buffer: int = 10_000) -> None:
        if level not in LEVELS:
            raise ConfigurationError(
                f'audit must be "admin", "reveal" or "use", got {shown(level)}.'
            )
        if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
            raise ConfigurationError(f"audit_buffer must be a positive int, got {shown(buffer)}.")
        check_at_most("audit_buffer", buffer)
        self._repo = repo
        self.level = level
        self._rank = LEVELS.index(level)
        self._uses: deque[dict[str, Any]] = deque()
        self._buffer = buffer
        self.dropped = 0
        self._urgent: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._writing: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def records_use(self) -> bool:
        return self._rank == 2 and not self._closed

    def records(self, action: str) -> bool:
        return LEVELS.index(ACTIONS[action]) <= self._rank

    @classmethod
    def entry_for(cls, action: str, detail: Mapping[str, Any]) -> dict[str, Any]:
        """A record's fields, for a write made outside the buffer (the retention sweep)."""
        return cls._entry(
            action, actor=None, owner=None, uuid=None, provider=None, outcome="ok", detail=detail
        )

    async def flush(self) -> None:
        """Write what is buffered now."""
        if self._uses or self.dropped or self._urgent:
            self._kick()
        writing = self._writing
        if writing is not None:
            await asyncio.shield(writing)

    @staticmethod
    def _entry(
        action: str,
        *,
        actor: str | None,
        owner: str | None,
        uuid: str | None,
        provider: str | None,
        outcome: str,
        detail: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        return {
            "at": datetime.now(UTC),
            "action": action,
            "actor": actor if actor is not None else ACTOR.get(),
            "owner": owner,
            "uuid": uuid,
            "provider": provider,
            "outcome": outcome,
            "detail": dict(detail or {}),
        }

    async def record(
        self,
        action: str,
        *,
        actor: str | None = None,
        owner: str | None = None,
        uuid: str | None = None,
        provider: str | None = None,
        outcome: str = "ok",
        detail: Mapping[str, Any] | None = None,
    ) -> None:
        """Write an administrative or reveal record; returns once it is committed."""
        if not self.records(action) or self._closed:
            return
        entry = self._entry(
            action,
            actor=actor,
            owner=owner,
            uuid=uuid,
            provider=provider,
            outcome=outcome,
            detail=detail,
        )
        done = asyncio.get_running_loop().create_future()
        self._urgent.append(_Pending([entry], done))
        self._kick()
        try:
            await asyncio.shield(done)
        except AuditFailed:
            # A reveal is refused when it cannot be recorded; a change has already been
            # made, so its caller gets its result and the log says what is missing.
            if ACTIONS[action] != "admin":
                raise
            log.error(
                "the audit record of %s could not be written",
                action,
                extra=telemetry.fields("audit_record_lost", uuid=uuid),
            )

    def use(
        self,
        *,
        owner: str | None,
        uuid: str | None,
        provider: str | None,
        outcome: str,
        detail: Mapping[str, Any],
    ) -> None:
        """Buffer a use record (written within a quarter second, never awaited)."""
        if self._rank < 2 or self._closed:
            return
        if len(self._uses) >= self._buffer:
            self._uses.popleft()
            self.dropped += 1
        self._uses.append(
            self._entry(
                "request.sent",
                actor=None,
                owner=owner,
                uuid=uuid,
                provider=provider,
                outcome=outcome,
                detail=detail,
            )
        )
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush_later(), name="integrations-audit-flush"
            )

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(FLUSH_EVERY)
        finally:
            self._flusher = None
        self._kick()

    def _kick(self) -> None:
        if self._writing is None:
            self._writing = asyncio.get_running_loop().create_task(
                self._write_all(), name="integrations-audit-write"
            )

    async def _write_all(self) -> None:
        try:
            while self._urgent or self._uses or self.dropped:
                urgent, self._urgent = self._urgent, []
                entries = [e for p in urgent for e in p.records]
                while self._uses and len(entries) < BATCH:
                    entries.append(self._uses.popleft())
                if self.dropped:
                    entries.append(
                        self._entry(
                            "audit.dropped",
                            actor=None,
                            owner=None,
                            uuid=None,
                            provider=None,
                            outcome="ok",
                            detail={"use_records": self.dropped},
                        )
                    )
                    self.dropped = 0
                try:
                    await self._repo.audit_append(entries)
                except Exception as exc:
                    for pending in urgent:
                        if pending.done is not None and not pending.done.done():
                            pending.done.set_exception(
                                AuditFailed(f"the audit record could not be written: {exc}")
                            )
                    log.warning(
                        "audit records could not be written: %s",
                        exc,
                        extra=telemetry.fields("audit_write_failed"),
                    )
                    continue
                for pending in urgent:
                    if pending.done is not None and not pending.done.done():
                        pending.done.set_result(None)
        finally:
            self._writing = None

    async def close(self) -> None:
        """Write what is buffered; later records are not taken."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        self._kick()
        writing = self._writing
        if writing is not None:
            await writing
        self._closed = True


@contextlib.contextmanager
def acting_as(actor: str | None) -> Iterator[None]:
    """Calls in this block without ``actor=`` are recorded as made by ``actor``."""
    token = ACTOR.set(actor)
    try:
        yield
    finally:
        ACTOR.reset(token)
