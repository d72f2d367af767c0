"""The RFC 8252 loopback flow for scripts and notebooks: a one-shot callback server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import webbrowser
from collections.abc import Sequence

from aiohttp import web

from ._authflow import AuthFlow, callback_parameters
from ._core import Core
from ._errors import AuthorizationTimeout, IntegrationsError, InvalidInput
from ._events import OwnerScope
from ._models import Connection
from ._settings import MAXIMUM

__all__ = ["connect_interactive"]

CALLBACK_PATH = "/callback"

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title></head>
<body><h1>{title}</h1><p>{text}</p></body></html>
"""


def _page(status: int, title: str, text: str) -> web.Response:
    body = _PAGE.format(title=html.escape(title), text=html.escape(text))
    return web.Response(
        status=status,
        text=body,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )


async def connect_interactive(
    authflow: AuthFlow,
    core: Core,
    uuid: str,
    *,
    owner: OwnerScope,
    scopes: Sequence[str] | None,
    open_browser: bool,
    timeout: float,  # noqa: ASYNC109 - the public signature; enforced with asyncio.timeout
    port: int,
    actor: str | None = None,
) -> Connection:
    """Authorize ``uuid`` in a browser, receiving the callback on a temporary loopback server."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise InvalidInput("port must be 0 (any free port) or a port number")
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAXIMUM["timeout"]
    ):
        raise InvalidInput("timeout must be a positive number of seconds")
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[Connection] = loop.create_future()
    expected: list[str] = []
    claimed = False

    async def callback(request: web.Request) -> web.StreamResponse:
        nonlocal claimed
        given = callback_parameters(request.query)
        state = given["state"] or ""
        # Only the callback for our own state counts; anything else on the port is ignored.
        if not expected or not hmac.compare_digest(state.encode(), expected[0].encode()):
            return _page(400, "Unknown request", "This address only accepts the callback.")
        # Claimed before the first await: a reload or browser retry arriving while the
        # code is being exchanged must not consume the state again and fail the flow.
        if claimed:
            return _page(409, "Already received", "You can close this window.")
        claimed = True
        try:
            row = await authflow.complete(
                state,
                code=given["code"],
                error=given["error"],
                error_description=given["error_description"],
                owner=owner,
            )
            connection = core.connection(row)
        except IntegrationsError as exc:
            if not outcome.done():
                outcome.set_exception(exc)
            return _page(400, "Authorization failed", exc.message)
        if not outcome.done():
            outcome.set_result(connection)
        return _page(200, "Connected", "You can close this window and return to the program.")

    app = web.Application()
    app.router.add_get(CALLBACK_PATH, callback)
    # No access log: the callback's query string carries the code and the state.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    state: str | None = None
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        bound_port = runner.addresses[0][1]
        redirect_uri = f"http://127.0.0.1:{bound_port}{CALLBACK_PATH}"
        url, state = await authflow.begin(
            uuid, redirect_uri, scopes=scopes, actor=actor, owner=owner
        )
        expected.append(state)
        print(f"Open this URL in a browser to authorize the connection:\n{url}", flush=True)
        if open_browser:
            await asyncio.to_thread(webbrowser.open, url)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(outcome)
        except TimeoutError:
            raise AuthorizationTimeout(
                f"The authorization was not completed within {timeout:g} seconds."
            ) from None
    finally:
        if not outcome.done():
            outcome.cancel()
            if state is not None:
                with contextlib.suppress(IntegrationsError):
                    await authflow.discard(state)
        await runner.cleanup()
