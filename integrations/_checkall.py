"""Credential checks of many connections at once, with bounded concurrency, as one report."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from ._errors import IntegrationsError
from ._models import Validation

__all__ = ["CheckItem", "CheckReport", "CheckTarget", "run_checks"]


@dataclass(frozen=True, slots=True)
class CheckTarget:
    """A connection to check: who it is, never its credentials."""

    uuid: str
    provider: str
    name: str
    owner: str | None


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


async def run_checks(
    targets: Iterable[CheckTarget], validate: Validate, *, concurrency: int = 8
) -> CheckReport:
    """Run ``validate`` on every target, at most ``concurrency`` at a time.

    A library error while checking one connection (a secret the keys cannot decrypt, a
    connection removed meanwhile) fails that item with the error's message; the others
    still run.
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError("concurrency must be a positive integer")
    ordered = sorted(targets, key=lambda t: (t.provider, t.owner or "", t.name, t.uuid))
    gate = asyncio.Semaphore(concurrency)

    async def one(target: CheckTarget) -> CheckItem:
        async with gate:
            started = time.monotonic()
            try:
                result = await validate(target)
                ok, message = result.ok, result.message
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
