"""Run the console standalone: uvicorn on loopback, entered through a one-time login link."""

from __future__ import annotations

import asyncio
import hmac
import secrets
import socket
import sys
from collections.abc import Callable
from typing import Any, TextIO

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route

from .._integrations import Integrations
from ._app import console
from ._security import SecurityHeaders, set_cookie
from ._viewer import Admin, Owner, Viewer

SESSION_COOKIE = "integrations_session"


class LoginLink:
    """A random token good for one login; each login gets a random session id in a cookie,
    and is signed in as ``viewer`` (the administrator unless told otherwise)."""

    def __init__(self, viewer: Viewer | None = None) -> None:
        self.token: str | None = secrets.token_urlsafe(32)
        self.viewer: Viewer = viewer if viewer is not None else Admin()
        self._sessions: set[str] = set()

    def exchange(self, token: str) -> str | None:
        """A new session id for the right token, once; None for anything else."""
        expected = self.token
        if expected is None or not hmac.compare_digest(token.encode(), expected.encode()):
            return None
        self.token = None
        session = secrets.token_urlsafe(32)
        self._sessions.add(session)
        return session

    def authorize(self, request: Request) -> Viewer | None:
        session = request.cookies.get(SESSION_COOKIE)
        return self.viewer if session is not None and session in self._sessions else None


def standalone_app(
    integ: Integrations, link: LoginLink, *, secret: str | bytes | None = None
) -> Starlette:
    """The console at ``/`` plus ``/login?token=...``, signed in as ``link.viewer``."""
    inner = console(integ, authorize=link.authorize, secret=secret)

    async def login(request: Request) -> Response:
        session = link.exchange(request.query_params.get("token", ""))
        if session is None:
            return inner.state.console.error_page(  # type: ignore[no-any-return]
                request,
                403,
                "This login link is wrong or was already used. Restart the server for a new one.",
            )
        response = RedirectResponse("/", 303)
        set_cookie(response, request, SESSION_COOKIE, session, path="/")
        return response

    app = Starlette(
        routes=[Route("/login", login), Mount("/", app=inner)],
        middleware=[Middleware(SecurityHeaders)],
    )
    app.state.closing = inner.state.console.closing
    return app


def _display_host(host: str, port: int) -> str:
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(
    integ: Integrations,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    log_level: str = "warning",
    out: TextIO | None = None,
    on_ready: Callable[[str], None] | None = None,
    secret: str | bytes | None = None,
    owner: str | None = None,
) -> None:
    """Serve the console until cancelled (or interrupted), printing a one-time login link.

    The link ``http://127.0.0.1:PORT/login?token=...`` goes to ``out`` (standard output by
    default) and to ``on_ready``; opening it sets an HttpOnly, SameSite=Strict session
    cookie. ``port=0`` picks a free port. The login is the administrator's, or with
    ``owner`` that owner's: the console then works through ``integ.for_owner(owner)``.
    """
    import uvicorn

    link = LoginLink(Owner(owner) if owner is not None else None)
    app = standalone_app(integ, link, secret=secret)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {reason}") from exc
    bound_port = sock.getsockname()[1]
    url = f"http://{_display_host(host, bound_port)}/login?token={link.token}"
    config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="off",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    closing: Any = app.state.closing

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Open pages hold event streams; end them so that shutting down is immediate.
            closing.set()
            await super().shutdown(sockets)

    server = Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    stream = out if out is not None else sys.stdout
    print("Integrations console; open this link to sign in (it works once):", file=stream)
    print(f"    {url}", file=stream, flush=True)
    if on_ready is not None:
        on_ready(url)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        server.should_exit = True
        await task
        raise
    finally:
        sock.close()
