"""Refresh lease decisions as pure functions over the stored row and the clock.

The tokens service reads a row under its lock and asks these what to do: hand out what is
stored, wait for another process's lease, take the lease and ask the token endpoint, or
store an answer. No database, no network: ``tests/test_lease.py`` runs them alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from . import _record as record
from . import oauth
from ._errors import OAuthError, ReauthRequired, TokenRequestFailed
from ._input import parse_timestamp
from ._record import Change, StoredRow
from ._settings import TokenPolicy

__all__ = [
    "Lease",
    "Look",
    "Mode",
    "Need",
    "Seen",
    "Written",
    "due",
    "failed",
    "failure_id",
    "held_back",
    "look",
    "parse_time",
    "recorded_error",
    "released",
    "renewed",
    "sending",
    "spent",
    "text",
    "usable",
    "written",
]

#: Why a refresh is asked for: the token is due, a caller insists, or the API rejected it.
Mode = Literal["expiring", "force", "rejected"]

#: Seals one field's value for the row being written (the vault's ``seal_value``).
Seal = Callable[[str, Any], Any]


def text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_time(value: Any) -> datetime | None:
    """A stored ISO timestamp as an aware UTC datetime; anything unreadable is None.

    Far-past and far-future values are clamped (``_input.parse_timestamp``), so year 1
    reads as long expired and no later arithmetic can overflow.
    """
    return parse_timestamp(value) if isinstance(value, str) else None


def failure_id(data: Mapping[str, Any]) -> str | None:
    failure = data.get("refresh_error")
    if isinstance(failure, Mapping) and isinstance(failure.get("id"), str):
        return str(failure["id"])
    return None


@dataclass(frozen=True, slots=True)
class Seen:
    """What a caller saw before asking: the access token and the last recorded failure."""

    token: str | None
    failure: str | None

    @classmethod
    def of(cls, token: str | None, row: StoredRow) -> Seen:
        return cls(token, failure_id(row.data))


@dataclass(frozen=True, slots=True)
class Need:
    """What a refresh is for: what its caller saw, why it asks, and (for a forced one)
    the moment after which a token must have been obtained to do."""

    seen: Seen
    mode: Mode
    since: datetime


@dataclass(frozen=True, slots=True)
class Lease:
    """The refresh lease a process holds on a row: who, the fencing value (the row
    version that taking it wrote), and when its token request was decided on."""

    uuid: str
    holder: str
    fence: int
    requested_at: datetime

    def held_in(self, data: Mapping[str, Any]) -> bool:
        lease = data.get("refresh_lease")
        return (
            isinstance(lease, Mapping)
            and lease.get("holder") == self.holder
            and lease.get("fence") == self.fence
        )


@dataclass(frozen=True, slots=True)
class Look:
    """What one look at the row decided: done (a token or an error), wait for another
    holder's lease (``wait`` seconds at most), or ask under ``lease``, just taken.
    ``fallback`` is a stored token still usable if the request fails; ``taken_from``
    the holder whose expired lease this look ended."""

    outcome: str | OAuthError | None = None
    wait: float | None = None
    lease: Lease | None = None
    fallback: str | None = field(default=None, repr=False)
    taken_from: str | None = None


def due(plain: Mapping[str, Any], now: datetime, leeway: float) -> bool:
    """Whether the stored access token should be renewed ahead of its expiry."""
    return oauth.refresh_due(
        parse_time(plain.get("expires_at")),
        parse_time(plain.get("token_obtained_at")),
        leeway,
        now,
    )


def usable(token: str | None, plain: Mapping[str, Any], now: datetime) -> bool:
    """Whether ``token`` has not expired yet (a token of unknown lifetime counts as usable)."""
    if token is None:
        return False
    expires_at = parse_time(plain.get("expires_at"))
    return expires_at is None or expires_at > now


def recorded_error(failure: Mapping[str, Any], data: Mapping[str, Any]) -> OAuthError:
    """The error a recorded refresh failure stands for."""
    message = failure.get("message")
    if not isinstance(message, str) or not message:
        message = data.get("validation_status")
    text = message if isinstance(message, str) and message else "The token refresh failed"
    if failure.get("code") == ReauthRequired.code:
        return ReauthRequired(text, error=failure.get("error"))
    return TokenRequestFailed(
        text, transient=bool(failure.get("transient")), error=failure.get("error")
    )


def held_back(data: Mapping[str, Any], now: datetime) -> OAuthError | None:
    """The recorded failure that keeps automatic refreshes from asking the token endpoint:
    a terminal one until something changes, any other until its ``retry_at``."""
    failure = data.get("refresh_error")
    if not isinstance(failure, Mapping):
        return None
    if failure.get("code") != ReauthRequired.code:
        retry_at = parse_time(failure.get("retry_at"))
        if retry_at is None or retry_at <= now:
            return None
    return recorded_error(failure, data)


def look(
    row: StoredRow,
    plain: Mapping[str, Any],
    need: Need,
    *,
    holder: str,
    now: datetime,
    clock: datetime,
    policy: TokenPolicy,
    rotates: bool = True,
) -> tuple[Change, Look]:
    """Under the row lock: use what is stored, wait for another holder's lease, or take
    the lease (the change writes it with the same commit).

    ``now`` is the database's clock (leases are compared with it, so that processes
    with skewed clocks agree), ``clock`` this process's (tokens' expiry, failures).

    A lease that ran out is taken over by what its holder recorded: without a sending
    mark nothing was sent, and asking is safe. With one, the refresh token may be spent
    and the holder may still hold the answer, retrying its write: the lease is waited
    for ``token_write_retry`` more. After that a provider that does not rotate refresh
    tokens (``rotates``) is asked again; one that does is marked for a new
    authorization, never sent the spent token (so is every provider under
    ``refresh_takeover="reauthorize"``).
    """
    current = text(plain.get("access_token"))
    seen, mode = need.seen, need.mode
    if mode == "force":
        # A token obtained after the call began (here or in another process) will do.
        obtained = parse_time(row.data.get("token_obtained_at"))
        if current is not None and obtained is not None and obtained >= need.since:
            return Change(), Look(outcome=current)
    elif current is not None and current != seen.token:
        # Another process refreshed, or failed, while this caller waited.
        return Change(), Look(outcome=current)
    if mode == "expiring" and current is not None and not due(plain, clock, policy.leeway):
        return Change(), Look(outcome=current)
    # Ahead of expiry, a failure does not take away a token that still works.
    fallback = current if mode == "expiring" and usable(current, plain, clock) else None
    failure = row.data.get("refresh_error")
    if isinstance(failure, Mapping):
        recorded = recorded_error(failure, row.data)
        fresh = failure_id(row.data) != seen.failure
        if fresh or (mode != "force" and held_back(row.data, clock) is not None):
            return Change(), Look(outcome=fallback or recorded)
    lease = row.data.get("refresh_lease")
    taken_from: str | None = None
    if isinstance(lease, Mapping):
        until = parse_time(lease.get("until"))
        if until is not None and until > now and not lease.get("abandoned"):
            return Change(), Look(wait=(until - now).total_seconds())
        if not lease.get("abandoned"):
            taken_from = str(lease.get("holder"))
            sent = parse_time(lease.get("sending"))
            if sent is not None:
                # Its holder may still store what it obtained: wait for the write.
                ended = until if until is not None else sent
                waited = ended + timedelta(seconds=policy.write_retry)
                if waited > now:
                    if fallback is not None:
                        return Change(), Look(outcome=fallback)
                    return Change(), Look(wait=(waited - now).total_seconds())
            if sent is not None and (rotates or policy.takeover == "reauthorize"):
                exc = ReauthRequired(
                    f"A token refresh by another process ({taken_from}) sent the refresh "
                    f"token at {sent.isoformat()} and stored no answer within its lease and "
                    f"{policy.write_retry:g}s more; the provider may have replaced that "
                    "refresh token, and sending it again could revoke the grant, so the "
                    "connection must be authorized again"
                )
                failed = record.refresh_failed(row, exc, clock, cooldown=policy.cooldown_after)
                data = dict(failed.change.data or {})
                # Kept, marked: a holder that comes back may still store its answer.
                data["refresh_lease"] = {**lease, "abandoned": True}
                return Change(data, events=failed.change.events), Look(
                    outcome=fallback or exc, taken_from=taken_from
                )
    taken = Lease(row.uuid, holder, row.version + 1, clock)
    data = {
        **row.data,
        "refresh_lease": {
            "holder": holder,
            "fence": taken.fence,
            "until": (now + timedelta(seconds=policy.lease)).isoformat(),
            "requested_at": clock.isoformat(),
        },
    }
    return Change(data), Look(lease=taken, fallback=fallback, taken_from=taken_from)


def sending(
    lease: Lease, row: StoredRow | None, now: datetime | None, seconds: float
) -> tuple[Change, bool]:
    """The lease renewed and marked as sending, in its own commit before the token request
    leaves: whoever takes the lease over then knows the refresh token may be spent.
    False when the lease is no longer held (nothing was sent: look again)."""
    if row is None or now is None or not lease.held_in(row.data):
        return Change(), False
    held = dict(row.data["refresh_lease"])
    held["until"] = (now + timedelta(seconds=seconds)).isoformat()
    held["sending"] = now.isoformat()
    return Change({**row.data, "refresh_lease": held}), True


def renewed(
    lease: Lease, row: StoredRow | None, now: datetime | None, seconds: float
) -> tuple[Change, bool]:
    """The lease extended by ``seconds`` from the database's ``now``; False when it is no
    longer held (taken over, or the row is gone)."""
    if row is None or now is None or not lease.held_in(row.data):
        return Change(), False
    held = dict(row.data["refresh_lease"])
    held["until"] = (now + timedelta(seconds=seconds)).isoformat()
    return Change({**row.data, "refresh_lease": held}), True


def released(lease: Lease, row: StoredRow | None) -> Change:
    """The lease dropped, if still held: nobody has to wait it out."""
    if row is None or not lease.held_in(row.data):
        return Change()
    data = dict(row.data)
    data.pop("refresh_lease", None)
    return Change(data)


def failed(
    lease: Lease,
    row: StoredRow | None,
    plain: Mapping[str, Any],
    previous: str | None,
    exc: OAuthError,
    clock: datetime,
    policy: TokenPolicy,
    seal: Seal,
) -> Change:
    """The holder's failed request recorded and its lease ended; nothing when the lease
    was taken over meanwhile (this failure is not the newest news). When a new grant
    replaced the refresh token it sent, the failure is old news too: only the lease goes."""
    if row is None or not lease.held_in(row.data):
        return Change()
    if text(plain.get("refresh_token")) != previous:
        return released(lease, row)
    done = record.refresh_failed(row, exc, clock, cooldown=policy.cooldown_after)
    # The message may quote the server's error description.
    data = record.storable(done.change.data or {})
    data.pop("refresh_lease", None)
    rotated = oauth.rotated_refresh_token(exc)
    if rotated:
        # The old one may be spent: the next refresh must send this one.
        data["refresh_token"] = seal("refresh_token", rotated)
    return Change(data, events=done.change.events)


@dataclass(frozen=True, slots=True)
class Written:
    """What storing an answer did: ``stored`` when the row now holds it; else whether
    the row holds ``newer`` tokens, or is ``gone`` (the connection was deleted); ``token``
    is the access token to hand out."""

    stored: bool
    token: str = field(repr=False)
    newer: bool = False
    gone: bool = False


def written(
    lease: Lease,
    row: StoredRow | None,
    plain: Mapping[str, Any],
    tokens: oauth.TokenSet,
    previous: str | None,
    seal: Seal,
) -> tuple[Change, Written]:
    """Compare and set: write while the lease is still ``lease`` and the refresh token it
    was asked with (``previous``) is still the stored one; else keep the row, and hand out
    the answer only if it is still the newest."""
    if row is None:
        return Change(), Written(False, tokens.access_token, gone=True)
    stored_refresh = text(plain.get("refresh_token"))
    if lease.held_in(row.data) and stored_refresh == previous:
        done = record.refreshed(row, tokens, seal=seal, previous_refresh_token=previous)
        data = record.storable(done.change.data or {})
        data.pop("refresh_lease", None)
        return Change(data, events=done.change.events), Written(True, tokens.access_token)
    # A new grant landed while the request was out: the lease is still this holder's to
    # end, or the next refresh would wait it out (and "reauthorize" would then mark the
    # fresh grant as needing a new authorization).
    change = released(lease, row)
    current = text(plain.get("access_token"))
    obtained = parse_time(row.data.get("token_obtained_at"))
    newer = stored_refresh != previous or (obtained is not None and obtained > tokens.obtained_at)
    if newer and current is not None:
        return change, Written(False, current, newer=True)
    return change, Written(False, tokens.access_token, newer=newer)


def spent(
    row: StoredRow | None,
    plain: Mapping[str, Any],
    previous: str | None,
    clock: datetime,
    policy: TokenPolicy,
) -> Change:
    """After new tokens were lost: the stored refresh token, if still ``previous``, was
    rotated away, so the connection needs a new authorization."""
    if row is None or text(plain.get("refresh_token")) != previous:
        return Change()
    exc = ReauthRequired(
        "The tokens of a refresh could not be stored, and the refresh token they replaced "
        "may no longer be accepted; the connection must be authorized again"
    )
    done = record.refresh_failed(row, exc, clock, cooldown=policy.cooldown_after)
    data = dict(done.change.data or {})
    data.pop("refresh_lease", None)
    return Change(data, events=done.change.events)
