"""Immutable values that cross the public API: Connection, Page, Validation, Event, ..."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from ._input import parse_timestamp

#: What an event may be about.
EventKind = Literal[
    "connection_added",
    "connection_renamed",
    "connection_removed",
    "setup_saved",
    "connected",
    "disconnected",
    "validated",
    "token_refreshed",
    "refresh_failed",
    "recovered",
    "resync",
]
EVENT_KINDS: frozenset[str] = frozenset(get_args(EventKind))


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Connection:
    """One stored connection. ``data`` is always masked: secrets never show here."""

    uuid: str
    provider: str
    name: str
    owner: str | None
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """``connected``: runtime credentials are saved and nothing has failed with them
        since (see ``last_ok_at`` for whether a check has passed); ``disconnected``: nothing
        to call the provider with; ``error``: the last check or token request failed."""
        return str(self.data.get("status", "disconnected"))

    @property
    def validation_status(self) -> str | None:
        """The last check's message ("Connected", "Invalid credentials", ...), if any."""
        value = self.data.get("validation_status")
        return value if isinstance(value, str) else None

    @property
    def last_checked_at(self) -> datetime | None:
        """When a check last ran, whatever its outcome (the "Last tested N ago" reading)."""
        return parse_timestamp(self.data.get("last_validated_at"))

    @property
    def last_ok_at(self) -> datetime | None:
        """When a check last passed with the credentials saved now; None when they were
        saved after the last passing check (or never checked)."""
        return parse_timestamp(self.data.get("last_ok_at"))

    @property
    def reauth_required(self) -> bool:
        """The provider refused the grant: the user must authorize again."""
        return self.data.get("reauth_required") is True


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing: ``items`` in order, and the ``after=`` to pass for the next
    page (None when this is the last)."""

    items: list[Connection]
    next_after: str | None


class ConnectionList(list[Connection]):
    """A list of connections that may be one page of a longer listing: ``next_after`` is
    the ``after=`` that gives the next page (None when there is no more)."""

    def __init__(self, items: Iterable[Connection] = (), next_after: str | None = None) -> None:
        super().__init__(items)
        self.next_after = next_after

    @property
    def items(self) -> list[Connection]:
        """The connections, as :class:`Page` names them."""
        return list(self)


def ago(value: object, now: datetime | None = None, *, seconds: bool = False) -> str:
    """A stored ISO time as ``"3 min ago"`` (``"never"`` when absent or unreadable).

    Under a minute is ``"just now"``, or with ``seconds`` ``"42 s ago"`` from 10 s on.
    """
    when = parse_timestamp(value)
    if when is None:
        return "never"
    elapsed = int(((now or utcnow()) - when).total_seconds())
    if elapsed < 60:
        return f"{elapsed} s ago" if seconds and elapsed >= 10 else "just now"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if elapsed >= size:
            return f"{elapsed // size} {unit} ago"
    return "just now"


@dataclass(frozen=True, slots=True)
class DeviceAuthorization:
    """A device authorization under way (RFC 8628): show the user ``user_code`` and
    ``verification_uri`` (or ``verification_uri_complete``, which carries the code, as a link
    or a QR code), then call ``complete_device_authorization``. The code expires at
    ``expires_at``; the provider wants at least ``interval`` seconds between polls."""

    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: int
    interval: int
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Validation:
    """The outcome of a credential check; a provider-side failure is ``ok=False``."""

    ok: bool
    message: str
    checked_at: datetime = field(default_factory=utcnow)

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True, slots=True)
class Event:
    """A change to a connection, delivered to subscribers in every process."""

    kind: str
    uuid: str | None
    provider: str | None = None
    name: str | None = None
    owner: str | None = None
    status: str | None = None
    previous_status: str | None = None
    actor: str | None = None
    at: datetime = field(default_factory=utcnow)
    detail: Mapping[str, Any] = field(default_factory=dict)
    #: Where the event stands in the durable log: pass it as ``subscribe(after=...)`` to
    #: resume after this event. None for ``resync``, which is not logged.
    position: int | None = None

    def to_payload(self) -> str:
        """The NOTIFY payload: compact JSON, never carrying secrets. The position is not
        part of it: the log draws it as the event is appended, and puts it first."""
        return json.dumps(
            {
                "kind": self.kind,
                "uuid": self.uuid,
                "provider": self.provider,
                "name": self.name,
                "owner": self.owner,
                "status": self.status,
                "previous_status": self.previous_status,
                "actor": self.actor,
                "at": self.at.isoformat(),
                "detail": dict(self.detail),
            },
            separators=(",", ":"),
            default=str,
        )

    @classmethod
    def from_payload(cls, payload: str) -> Event:
        """Parse a NOTIFY payload; raises ValueError on anything malformed."""
        raw = json.loads(payload)
        if not isinstance(raw, dict) or raw.get("kind") not in EVENT_KINDS:
            raise ValueError("not an integrations event payload")
        if not isinstance(raw.get("at"), str):
            raise ValueError("event time must be an ISO 8601 string")
        detail = raw.get("detail") or {}
        if not isinstance(detail, dict):
            raise ValueError("event detail must be an object")

        def opt(key: str) -> str | None:
            value = raw.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"event field {key!r} must be a string")
            return value

        position = raw.get("position")
        if position is not None and (
            isinstance(position, bool) or not isinstance(position, int) or position < 1
        ):
            raise ValueError("event position must be a positive integer")
        return cls(
            kind=raw["kind"],
            uuid=opt("uuid"),
            provider=opt("provider"),
            name=opt("name"),
            owner=opt("owner"),
            status=opt("status"),
            previous_status=opt("previous_status"),
            actor=opt("actor"),
            at=datetime.fromisoformat(raw["at"]),
            detail=detail,
            position=position,
        )


@dataclass(frozen=True, slots=True)
class RotationProgress:
    """How far ``rotate_keys()`` has got; reported after each batch and returned at the end.

    ``rotated`` rows were re-encrypted and ``scanned`` rows examined so far (a row can be
    examined and left alone, e.g. when a concurrent write already moved it to the primary
    key). ``total`` is the number of rows that needed it when the run started: connections
    plus pending authorizations. ``undecryptable`` holds the uuids of the connections
    (``undecryptable_pending`` the state hashes of the pending authorizations) that could
    not be decrypted, so were skipped and left as they are. ``rewrapped`` counts the data
    keys (of an ``aws-kms:`` or ``pkcs11:`` source) wrapped anew by the primary source
    before the rows were moved. Counts, ids and key ids only, never secrets.
    """

    primary_kid: str
    rotated: int = 0
    scanned: int = 0
    total: int = 0
    batches: int = 0
    elapsed: float = 0.0
    done: bool = False
    undecryptable: tuple[str, ...] = ()
    undecryptable_pending: tuple[str, ...] = ()
    rewrapped: int = 0

    @property
    def remaining(self) -> int:
        """Rows still to examine, estimated from ``total``; 0 once ``done``."""
        return 0 if self.done else max(self.total - self.scanned, 0)

    @property
    def rows_per_second(self) -> float:
        return self.rotated / self.elapsed if self.elapsed > 0 else 0.0
