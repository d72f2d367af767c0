"""Pure status transitions: a stored record and what happened in, new record and events out."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, get_args

from . import _names as names
from . import oauth
from ._errors import (
    IntegrationsError,
    InvalidInput,
    MissingField,
    ReauthRequired,
    TokenRequestFailed,
)
from ._input import ENVELOPE_MARKER, check_text
from ._models import Event, EventKind, Validation

__all__ = [
    "BOOKKEEPING",
    "LIBRARY_FIELDS",
    "STATUSES",
    "TOKEN_FIELDS",
    "Change",
    "EventKind",
    "Status",
    "StoredRow",
    "Transition",
    "added",
    "disconnected",
    "event",
    "fingerprint",
    "has_saved_data",
    "refresh_failed",
    "refreshed",
    "removed",
    "renamed",
    "setup_saved",
    "store_tokens",
    "tokens_issued",
    "validated",
    "validation_outcome",
]

#: What a connection's ``status`` may be. ``connected``: runtime credentials are saved and
#: the last check or token request (if any) succeeded; ``disconnected``: nothing to call the
#: provider with; ``error``: the last check or token request failed.
Status = Literal["connected", "disconnected", "error"]
STATUSES: frozenset[str] = frozenset(get_args(Status))


#: Keys every row carries from birth; a row with nothing else has no saved data.
BOOKKEEPING = frozenset({"provider", "name", "auth_type", "status", "created_at", "owner"})
#: Token fields: what a grant wrote, what disconnect drops.
TOKEN_FIELDS = frozenset(
    {
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
        "refresh_lease",
    }
)
#: Everything only the library writes; ``save_setup`` refuses these, and what remains in a
#: row beyond them is what someone saved.
LIBRARY_FIELDS = (
    BOOKKEEPING
    | TOKEN_FIELDS
    | {
        "validation_status",
        "last_validated_at",
        "last_ok_at",
        "disconnected_at",
    }
)
_SAVED_EXEMPT = LIBRARY_FIELDS - {"access_token", "refresh_token"}


@dataclass(frozen=True, slots=True)
class StoredRow:
    """A connection row as stored: ``data`` may hold sealed secrets."""

    uuid: str
    owner: str | None
    key: str
    data: dict[str, Any]
    version: int
    # Read on every request (provider lookup, log scope): taken from the key once.
    provider: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "provider", names.provider_of_key(self.key))

    @property
    def name(self) -> str:
        return names.name_of_key(self.key)

    @property
    def status(self) -> Any:
        return self.data.get("status")


@dataclass(slots=True)
class Change:
    """What a read-modify-write decided: the new value (None = unchanged), events, deletion."""

    data: dict[str, Any] | None = None
    key: str | None = None
    events: list[Event] = field(default_factory=list)
    delete: bool = False


@dataclass(frozen=True, slots=True)
class Transition:
    """A change and the row it leaves behind (the row as it was, for a deletion)."""

    change: Change
    row: StoredRow


def event(
    kind: EventKind,
    row: StoredRow,
    *,
    status: Any = None,
    previous_status: Any = None,
    actor: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> Event:
    """The event of ``kind`` about ``row`` (as it is after the change)."""
    return Event(
        kind=kind,
        uuid=row.uuid,
        provider=row.provider,
        name=row.name,
        owner=row.owner,
        status=status if status is not None else row.data.get("status"),
        previous_status=previous_status,
        actor=actor,
        detail=dict(detail or {}),
    )


def _after(row: StoredRow, data: dict[str, Any], key: str | None = None) -> StoredRow:
    return StoredRow(row.uuid, row.owner, key or row.key, data, row.version + 1)


def has_saved_data(data: Mapping[str, Any]) -> bool:
    """Whether anything but what the library itself writes (status, checks, token metadata)."""
    return any(k not in _SAVED_EXEMPT and data.get(k) not in (None, "", {}) for k in data)


# -- connection lifecycle -------------------------------------------------------------------


def added(
    uuid: str, owner: str | None, provider: str, auth_type: str, name: str, actor: str | None
) -> Transition:
    """A new connection: disconnected until credentials are saved."""
    data: dict[str, Any] = {
        "provider": provider,
        "name": name,
        "auth_type": auth_type,
        "status": "disconnected",
    }
    row = StoredRow(uuid, owner, names.storage_key(provider, name), data, 1)
    return Transition(Change(data=data, events=[event("connection_added", row, actor=actor)]), row)


def renamed(row: StoredRow, new_name: str, actor: str | None) -> Transition:
    """The key's name part rewritten in place; the same name changes nothing."""
    if row.name == new_name:
        return Transition(Change(), row)
    new_key = names.renamed_key(row.key, new_name)
    data = {**row.data, "name": new_name}
    after = _after(row, data, new_key)
    ev = event(
        "connection_renamed",
        after,
        previous_status=row.status,
        actor=actor,
        detail={"old_name": row.name, "new_name": new_name},
    )
    return Transition(Change(data=data, key=new_key, events=[ev]), after)


def removed(row: StoredRow, actor: str | None) -> Transition:
    ev = event("connection_removed", row, previous_status=row.status, actor=actor)
    return Transition(Change(delete=True, events=[ev]), row)


def setup_saved(
    row: StoredRow,
    sealed: Mapping[str, Any],
    *,
    fields: Iterable[str],
    credential_fields: Iterable[str] = (),
    missing: Callable[[Mapping[str, Any]], list[str]],
    runtime: Callable[[Mapping[str, Any]], bool],
    oauth_code_flow: bool,
    actor: str | None,
) -> Transition:
    """Merge saved setup; the status follows what the connection can now call with.

    Without runtime credentials it is ``disconnected``. With them, a key-based connection
    becomes ``connected`` (as the seed does). New credentials (a runtime or secret field in
    ``fields``) replace what an earlier failed check was about: an ``error`` goes back to
    ``connected`` with its message dropped, and ``last_ok_at`` is cleared until a check
    passes with them. Other setup keeps the status as it is. Authorization-code OAuth
    connections become connected only through a grant.
    """
    data = dict(row.data)
    for name, value in sealed.items():
        old = data.get(name)
        if name == "credentials" and isinstance(old, dict) and isinstance(value, dict):
            data[name] = {**old, **value}
        else:
            data[name] = value
    lacking = missing(data)
    if lacking:
        raise MissingField(
            f"Required setup field missing: {', '.join(lacking)}. Pass a value for it.",
            field=lacking[0],
        )
    # New setup (a corrected client secret, say) is worth another refresh at once.
    data.pop("refresh_error", None)
    previous = row.status
    fields = sorted(fields)
    new_credentials = bool(set(fields) & set(credential_fields))
    if new_credentials:
        data.pop("last_ok_at", None)
    if not runtime(data):
        data["status"] = "disconnected"
    elif not oauth_code_flow and (previous != "error" or new_credentials):
        data["status"] = "connected"
        if previous == "error":
            data.pop("validation_status", None)
    after = _after(row, data)
    ev = event(
        "setup_saved",
        after,
        previous_status=previous,
        actor=actor,
        detail={"fields": fields},
    )
    return Transition(Change(data=data, events=[ev]), after)


def disconnected(
    row: StoredRow, drop: Iterable[str], actor: str | None, now: datetime | None = None
) -> Transition:
    """Runtime credentials dropped: tokens always, plus ``drop`` (keys of key-based kinds).
    ``disconnected_at`` tells a connection someone disconnected from one never set up."""
    gone = TOKEN_FIELDS | set(drop)
    data = {k: v for k, v in row.data.items() if k not in gone}
    data["status"] = "disconnected"
    if now is not None:
        data["disconnected_at"] = now.isoformat()
    after = _after(row, data)
    ev = event("disconnected", after, previous_status=row.status, actor=actor)
    return Transition(Change(data=data, events=[ev]), after)


# -- checks ---------------------------------------------------------------------------------


def fingerprint(row: StoredRow, secret_fields: Iterable[str]) -> str:
    """What a check depends on: the sealed credentials (OAuth tokens: only their presence,
    since a refresh during the check replaces them legitimately)."""
    fields = sorted({*secret_fields, "credentials"})
    return json.dumps(
        {
            f: bool(row.data.get(f)) if f in ("access_token", "refresh_token") else row.data.get(f)
            for f in fields
        },
        sort_keys=True,
        default=str,
    )


def validated(
    row: StoredRow,
    ok: bool,
    message: str,
    now: datetime,
    *,
    actor: str | None,
    stale: bool = False,
) -> Transition:
    """A check's outcome. ``last_validated_at`` is always rewritten; status and message
    too unless ``stale`` (the credentials changed while they were checked); an event only
    when status or message changed. A pass after an error is also ``recovered``."""
    at = now.isoformat()
    if stale:
        data = {**row.data, "last_validated_at": at}
        return Transition(Change(data=data), _after(row, data))
    previous, previous_message = row.status, row.data.get("validation_status")
    status: Status = "connected" if ok else "error"
    data = {**row.data, "status": status, "validation_status": message, "last_validated_at": at}
    if ok:
        data["last_ok_at"] = at
    after = _after(row, data)
    events = []
    if status != previous or message != previous_message:
        events.append(
            event(
                "validated",
                after,
                previous_status=previous,
                actor=actor,
                detail={"ok": ok, "validation_status": message},
            )
        )
        if ok and previous == "error":
            events.append(event("recovered", after, previous_status=previous, actor=actor))
    return Transition(Change(data=data, events=events), after)


def validation_outcome(result: Any) -> tuple[bool, str]:
    """Accept a Validation, True/"ok", False, (ok, message), an exception or a message.

    The message is checked (no NUL or lone surrogates) so that the write cannot be refused.
    """
    ok, message = _outcome(result)
    return ok, check_text(message, "validation message")


def _outcome(result: Any) -> tuple[bool, str]:
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
    raise InvalidInput(
        f"record_validation got a {type(result).__name__}; pass a Validation, True or 'ok', "
        "False, an (ok, message) pair, an exception or a message."
    )


# -- tokens ---------------------------------------------------------------------------------


def storable(value: Any) -> Any:
    """``value`` with what PostgreSQL's jsonb refuses (U+0000, lone surrogates) replaced
    by U+FFFD, in strings, keys and nested containers: a token endpoint's answer must
    never make the write of the tokens it carries fail."""
    if isinstance(value, str):
        if "\x00" not in value and value.isascii():
            return value
        return "".join("\ufffd" if c == "\x00" or "\ud800" <= c <= "\udfff" else c for c in value)
    if isinstance(value, Mapping):
        return {storable(str(k)): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value


def foreign(value: Any) -> Any:
    """``value`` from outside (a token answer) without any member named like the envelope
    marker, at any depth: stored as it came, such a member would read as a broken
    envelope and make the connection unreadable."""
    if isinstance(value, Mapping):
        return {k: foreign(v) for k, v in value.items() if str(k) != ENVELOPE_MARKER}
    if isinstance(value, list | tuple):
        return [foreign(v) for v in value]
    return value


def store_tokens(
    data: dict[str, Any],
    tokens: oauth.TokenSet,
    *,
    seal: Callable[[str, Any], Any],
    previous_refresh_token: str | None,
    new_grant: bool,
) -> None:
    """Write a token response into ``data``: tokens sealed, expiry absolute, scopes granted.

    A refresh response without a refresh token keeps the stored one; a new grant without
    one drops it, since the previous grant's token is not ours to reuse.
    """
    data["access_token"] = seal("access_token", tokens.access_token)
    if tokens.refresh_token is not None:
        if tokens.refresh_token != previous_refresh_token or new_grant:
            data["refresh_token"] = seal("refresh_token", tokens.refresh_token)
    elif new_grant:
        data.pop("refresh_token", None)
    data["token_type"] = storable(tokens.token_type)
    if tokens.expires_at is None:
        data.pop("expires_at", None)
    else:
        data["expires_at"] = tokens.expires_at.isoformat()
    data["token_obtained_at"] = tokens.obtained_at.isoformat()
    if tokens.scope or new_grant:
        data["granted_scopes"] = [storable(s) for s in tokens.scope]


def tokens_issued(
    row: StoredRow,
    tokens: oauth.TokenSet,
    *,
    seal: Callable[[str, Any], Any],
    account: Mapping[str, Any] | None,
    now: datetime,
    actor: str | None,
) -> Transition:
    """A new grant (code exchange or imported tokens): connected, earlier failures cleared."""
    data = dict(row.data)
    store_tokens(data, tokens, seal=seal, previous_refresh_token=None, new_grant=True)
    data["connected_at"] = now.isoformat()
    if account is not None:
        data["account"] = dict(account)
    if tokens.extras:
        data["token_extras"] = storable(foreign(dict(tokens.extras)))
    previous = row.status
    data["status"] = "connected"
    data["reauth_required"] = False
    data.pop("validation_status", None)
    data.pop("refresh_error", None)
    after = _after(row, data)
    ev = event(
        "connected",
        after,
        previous_status=previous,
        actor=actor,
        detail={"scopes": list(tokens.scope)},
    )
    return Transition(Change(data=data, events=[ev]), after)


def refreshed(
    row: StoredRow,
    tokens: oauth.TokenSet,
    *,
    seal: Callable[[str, Any], Any],
    previous_refresh_token: str | None,
) -> Transition:
    """A refresh's answer: tokens stored (a rotated refresh token in the same commit),
    connected again; ``recovered`` after an error, and ``token_refreshed``."""
    data = dict(row.data)
    store_tokens(
        data, tokens, seal=seal, previous_refresh_token=previous_refresh_token, new_grant=False
    )
    previous = row.status
    data["status"] = "connected"
    data["reauth_required"] = False
    data.pop("refresh_error", None)
    events = []
    after = _after(row, data)
    if previous == "error":
        data.pop("validation_status", None)
        events.append(event("recovered", after, previous_status=previous))
    events.append(
        event(
            "token_refreshed",
            after,
            previous_status=previous,
            detail={"expires_at": data.get("expires_at")},
        )
    )
    return Transition(Change(data=data, events=events), after)


def refresh_failed(
    row: StoredRow,
    exc: IntegrationsError,
    now: datetime,
    *,
    cooldown: Callable[[int, float | None], float],
) -> Transition:
    """A failed refresh: ``error`` (with ``reauth_required`` when terminal), the failure
    recorded with when automatic refreshes may try again; an event only on change."""
    terminal = isinstance(exc, ReauthRequired)
    transient = isinstance(exc, TokenRequestFailed) and exc.transient
    data = dict(row.data)
    previous, previous_message = row.status, row.data.get("validation_status")
    earlier = row.data.get("refresh_error")
    failures = 1
    if isinstance(earlier, Mapping) and isinstance(earlier.get("failures"), int):
        failures = int(earlier["failures"]) + 1
    record: dict[str, Any] = {
        "id": secrets.token_hex(8),
        "at": now.isoformat(),
        "code": exc.code,
        "error": exc.context.get("error"),
        "transient": transient,
        "message": exc.message,
        "failures": failures,
    }
    if not terminal:
        retry_after = exc.context.get("retry_after")
        wait = cooldown(
            failures, float(retry_after) if isinstance(retry_after, int | float) else None
        )
        record["retry_at"] = (now + timedelta(seconds=wait)).isoformat()
    data["status"] = "error"
    data["reauth_required"] = terminal
    data["validation_status"] = exc.message
    data["refresh_error"] = record
    after = _after(row, data)
    events = []
    # Only a change is news: a dead connection polled in a loop stays quiet.
    if previous != "error" or previous_message != exc.message:
        events.append(
            event(
                "refresh_failed",
                after,
                previous_status=previous,
                detail={
                    "reauth_required": terminal,
                    "transient": transient,
                    "error": exc.context.get("error"),
                    "validation_status": exc.message,
                },
            )
        )
    return Transition(Change(data=data, events=events), after)
