"""Server-sent events: stream connection status changes to a browser.

Written with Starlette; a FastAPI app is a Starlette app, so the same generator goes
into ``fastapi.responses.StreamingResponse`` unchanged. It needs Starlette and uvicorn:
``pip install -e '.[web]'`` from a checkout (``integrations[web]`` once installed).

    INTEGRATIONS_DSN=postgresql://... INTEGRATIONS_KEYS=... python examples/sse_fastapi.py
    curl -N http://127.0.0.1:8000/events

In the page: ``new EventSource("/events").addEventListener("setup_saved", ...)``.
On ``resync`` reload whatever the page shows: changes made while the server's
listener was reconnecting were not delivered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from integrations import Event, Integrations, LifecycleError, Subscription

# Comment lines keep proxies from timing the stream out, and they are how a
# vanished client is noticed when no events flow.
KEEPALIVE_SECONDS = 15.0
RETRY_MILLISECONDS = 3000


def is_status_change(event: Event) -> bool:
    """What a status page needs: new statuses, removals, and the cue to reload."""
    return event.kind in ("resync", "connection_removed") or event.status != event.previous_status


def sse_message(event: Event) -> str:
    # The payload is the same JSON that travels through NOTIFY: no secrets in it.
    return f"event: {event.kind}\ndata: {event.to_payload()}\n\n"


async def status_stream(subscription: Subscription) -> AsyncIterator[str]:
    """SSE text for one open subscription; ends when the ``Integrations`` closes."""
    # Sent once the subscription is live: anything committed from now on is streamed.
    yield f"retry: {RETRY_MILLISECONDS}\n\n"
    while True:
        try:
            event = await asyncio.wait_for(subscription.get(), KEEPALIVE_SECONDS)
        except TimeoutError:
            yield ": keepalive\n\n"
            continue
        except LifecycleError:
            return
        if is_status_change(event):
            yield sse_message(event)


def create_app(
    dsn: str | None = None,
    *,
    owner_of: Callable[[Request], str | None] = lambda request: None,
    **options: Any,
) -> Starlette:
    """An app with ``GET /events``; ``options`` go to ``Integrations``.

    ``owner_of`` picks the owner whose connections a request may watch. Take it from
    the authenticated session, never from the query string; the default streams the
    system connections, as an admin page would.
    """

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with Integrations(dsn, **options) as integ:
            app.state.integrations = integ
            yield

    async def events(request: Request) -> StreamingResponse:
        integ: Integrations = request.app.state.integrations
        owner = owner_of(request)

        async def body() -> AsyncIterator[str]:
            async with integ.subscribe(owner=owner) as subscription:
                async for chunk in status_stream(subscription):
                    yield chunk

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return Starlette(routes=[Route("/events", events)], lifespan=lifespan)


if __name__ == "__main__":
    import uvicorn

    # Open streams hold a graceful shutdown until this timeout cuts them.
    uvicorn.run(create_app(), host="127.0.0.1", port=8000, timeout_graceful_shutdown=5)
