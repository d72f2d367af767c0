"""A worker reacting to ``refresh_failed``: log it and tell someone, once per failure.

    INTEGRATIONS_DSN=postgresql://... INTEGRATIONS_KEYS=... python examples/worker_refresh_failed.py

Failures are only sent when the connection's status or message changes, so a token
that fails on every refresh cycle calls ``on_failure`` once, and again only after a
``recovered``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from integrations import ALL_OWNERS, Event, Integrations

log = logging.getLogger("refresh_worker")

KINDS = ("refresh_failed", "recovered")


async def watch_refresh_failures(
    integ: Integrations,
    on_failure: Callable[[Event], Awaitable[None]],
    *,
    on_resync: Callable[[], Awaitable[None]] | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Call ``on_failure`` for every ``refresh_failed``, until ``integ`` closes.

    ``on_resync`` runs after the event listener reconnected: failures that happened
    during the gap were not delivered, so re-check the connections you track.
    """
    async with integ.subscribe(owner=ALL_OWNERS, kinds=KINDS) as subscription:
        if ready is not None:
            ready.set()
        async for event in subscription:
            if event.kind == "resync":
                log.warning("event listener reconnected; re-checking connections")
                if on_resync is not None:
                    await _guarded(on_resync())
            elif event.kind == "refresh_failed":
                log.warning(
                    "token refresh failed for %s:%s (owner %s, uuid %s): %s",
                    event.provider,
                    event.name,
                    event.owner or "system",
                    event.uuid,
                    event.detail.get("validation_status"),
                )
                await _guarded(on_failure(event))
            else:
                log.info("connection %s:%s recovered", event.provider, event.name)
        if subscription.dropped:
            log.warning("fell behind and skipped %d events", subscription.dropped)


async def _guarded(call: Awaitable[None]) -> None:
    # One failing notification must not stop the worker for every other connection.
    try:
        await call
    except Exception:
        log.exception("refresh failure handler raised")


async def main() -> None:
    logging.basicConfig(level=logging.INFO)

    async def page_someone(event: Event) -> None:
        print(f"ALERT {event.provider}:{event.name} needs to be reconnected ({event.uuid})")

    async with Integrations() as integ:
        await watch_refresh_failures(integ, page_someone)


if __name__ == "__main__":
    asyncio.run(main())
