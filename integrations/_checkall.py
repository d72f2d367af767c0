"""Credential checks of many connections at once, with bounded concurrency, as one report."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import _names as names
from ._errors import IntegrationsError, InvalidArgument, LifecycleError
from ._events import ALL_OWNERS, OwnerScope
from ._models import Validation
from ._names import shown
from ._settings import MAXIMUM

if TYPE_CHECKING:
    from ._checks import Checks
    from ._core import Core
    from ._record import StoredRow

__all__ = ["CheckItem", "CheckReport", "CheckTarget", "check_all", "run_checks"]


@dataclass(frozen=True, slots=True)
class CheckTarget:
    """A connection to check: who it is, never its credentials."""

    uuid: str
    provider: str
    name: str
    owner: str | None

    @classmethod
    def of(cls, row: StoredRow) -> CheckTarget:
        return cls(row.uuid, row.provider, row.name, row.owner)


@dataclass(frozen=True, slots=True)
class CheckItem:
    """The outcome of one connection's check; ``duration`` in seconds."""

    uuid: str
    provider: str
    name: str
    owner: str | None
    ok: bool
    message: str
    duration: float


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What ``check_all()`` found, one item per connection in provider, owner, name order."""

    items: tuple[CheckItem, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every check passed (an empty report too)."""
        return all(item.ok for item in self.items)

    @property
    def failed(self) -> tuple[CheckItem, ...]:
        return tuple(item for item in self.items if not item.ok)

    def __len__(self) -> int:
        return len(self.items)


Validate = Callable[[CheckTarget], Awaitable[Validation]]


def _check_concurrency(concurrency: object) -> None:
    if (
        isinstance(concurrency, bool)
        or not isinstance(concurrency, int)
        or not 1 <= concurrency <= MAXIMUM["concurrency"]
    ):
        raise InvalidArgument(
            f"concurrency must be a positive integer, got {shown(concurrency)}", field="concurrency"
        )


async def run_checks(
    targets: Iterable[CheckTarget], validate: Validate, *, concurrency: int = 8
) -> CheckReport:
    """Run ``validate`` on every target, at most ``concurrency`` at a time.

    A library error while checking one connection (a secret the keys cannot decrypt, a
    connection removed meanwhile) fails that item with the error's message; the others
    still run.
    """
    _check_concurrency(concurrency)
    ordered = sorted(targets, key=lambda t: (t.provider, t.owner or "", t.name, t.uuid))
    gate = asyncio.Semaphore(concurrency)

    async def one(target: CheckTarget) -> CheckItem:
        async with gate:
            started = time.monotonic()
            try:
                result = await validate(target)
                ok, message = result.ok, result.message
            except LifecycleError:
                raise  # closed meanwhile: no report of checks that never ran
            except IntegrationsError as exc:
                ok, message = False, exc.message
            return CheckItem(
                uuid=target.uuid,
                provider=target.provider,
                name=target.name,
                owner=target.owner,
                ok=ok,
                message=message,
                duration=round(time.monotonic() - started, 3),
            )

    items = await asyncio.gather(*(one(target) for target in ordered))
    return CheckReport(items=tuple(items))


async def check_all(
    core: Core,
    checks: Checks,
    *,
    provider: str | None,
    concurrency: int,
    record: bool,
    owner: OwnerScope,
    actor: str | None = None,
) -> CheckReport:
    """Every connection of ``provider`` (all when None) in ``owner``'s scope, checked.

    With ``record`` each outcome is recorded as ``validate_connection`` does; otherwise
    nothing about the check is written (an OAuth token may still be renewed first).
    """
    _check_concurrency(concurrency)
    # A provider no longer registered may still have rows: they are checked (and fail).
    prefix = names.storage_key(names.check_provider_key(provider), "") if provider else None
    if owner is ALL_OWNERS:
        rows = await core.repo.list_every_owner(prefix or names.KEY_PREFIX)
    else:
        rows = await core.repo.list_by_prefixes(
            names.check_owner(owner), [prefix or names.KEY_PREFIX]
        )
    by_uuid = {row.uuid: row for row in rows}

    async def validate(target: CheckTarget) -> Validation:
        if record:
            return await checks.validate_connection(target.uuid, actor=actor, owner=ALL_OWNERS)
        return await checks.probe(by_uuid[target.uuid])

    targets = [CheckTarget.of(row) for row in rows]
    return await run_checks(targets, validate, concurrency=concurrency)
