"""Run the console standalone: uvicorn on loopback, entered through a one-time login link."""

from __future__ import annotations

import asyncio
import hmac
import secrets
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
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
#: Defaults: an unused login link lasts a minute; a session ends after 30 idle minutes,
#: and 12 hours after it began whatever happens.
LOGIN_TTL = 60.0
SESSION_IDLE = 30 * 60.0
SESSION_LIFETIME = 12 * 3600.0
_MAX_SECONDS = 7 * 24 * 3600.0


def _seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds")
    if not 0 < value <= _MAX_SECONDS:
        raise ValueError(f"{name} must be more than 0 and at most {int(_MAX_SECONDS)} seconds")
    return float(value)


@dataclass
class _Session:
    started: float
    seen: float


class LoginLink:
    """A random token good for one login within ``login_ttl`` seconds; each login gets a
    random session id in a cookie, and is signed in as ``viewer`` (the administrator
    unless told otherwise).

    A session ends after ``session_idle`` seconds without a request, ``session_lifetime``
    seconds after the login, or at logout. The cookie's name carries ``port`` and a
    random instance id: cookies are not kept apart by port, so another server on the same
    host (another console among them) never takes this one's session for its own.
    """

    def __init__(
        self,
        viewer: Viewer | None = None,
        *,
        login_ttl: float = LOGIN_TTL,
        session_idle: float = SESSION_IDLE,
        session_lifetime: float = SESSION_LIFETIME,
        port: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.login_ttl = _seconds("login_ttl", login_ttl)
        self.session_idle = _seconds("session_idle", session_idle)
        self.session_lifetime = _seconds("session_lifetime", session_lifetime)
        self._clock = clock
        self.token: str | None = secrets.token_urlsafe(32)
        self._issued = clock()
        self.viewer: Viewer = viewer if viewer is not None else Admin()
        self.port = port
        self.cookie = f"{SESSION_COOKIE}_{port if port is not None else 0}_{secrets.token_hex(4)}"
        self._sessions: dict[str, _Session] = {}

    def bind_port(self, port: int) -> None:
        """Name the cookie after the port the server listens on (known once bound)."""
        self.port = port
        self.cookie = f"{SESSION_COOKIE}_{port}_{self.cookie.rsplit('_', 1)[1]}"

    def exchange(self, token: str) -> str | None:
        """A new session id for the right token, once and in time; None for anything else."""
        expected = self.token
        if expected is None or not hmac.compare_digest(token.encode(), expected.encode()):
            return None
        self.token = None
        if self._clock() - self._issued > self.login_ttl:
            return None
        session = secrets.token_urlsafe(32)
        now = self._clock()
        self._sessions[session] = _Session(now, now)
        return session

    def session_of(self, request: Request) -> str | None:
        """The request's live session id (its last use noted), or None."""
        if self.port is not None and request.url.port != self.port:
            # Addressed to another port (the Host header says so): not this server's origin.
            return None
        session = request.cookies.get(self.cookie)
        found = self._sessions.get(session) if session is not None else None
        if found is None or session is None:
            return None
        now = self._clock()
        if now - found.seen > self.session_idle or now - found.started > self.session_lifetime:
            del self._sessions[session]
            return None
        found.seen = now
        return session

    def end(self, request: Request) -> None:
        """Log out: the request's session ends."""
        session = request.cookies.get(self.cookie)
        if session is not None:
            self._sessions.pop(session, None)

    def authorize(self, request: Request) -> Viewer | None:
        return self.viewer if self.session_of(request) is not None else None


def standalone_app(
    integ: Integrations, link: LoginLink, *, secret: str | bytes | None = None
) -> Starlette:
    """The console at ``/`` plus ``/login?token=...``, signed in as ``link.viewer``."""

    def logout(request: Request) -> Response:
        link.end(request)
        response = RedirectResponse("/", 303)
        response.delete_cookie(link.cookie, path="/")
        return response

    inner = console(
        integ, authorize=link.authorize, secret=secret, session_of=link.session_of, logout=logout
    )

    async def login(request: Request) -> Response:
        session = link.exchange(request.query_params.get("token", ""))
        if session is None:
            return inner.state.console.error_page(  # type: ignore[no-any-return]
                request,
                403,
                "This login link is wrong, expired or was already used. Restart the server "
                "for a new one.",
            )
        response = RedirectResponse("/", 303)
        set_cookie(response, request, link.cookie, session, path="/")
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
    login_ttl: float = LOGIN_TTL,
    session_idle: float = SESSION_IDLE,
    session_lifetime: float = SESSION_LIFETIME,
) -> None:
    """Serve the console until cancelled (or interrupted), printing a one-time login link.

    The link ``http://127.0.0.1:PORT/login?token=...`` goes to ``out`` (standard output by
    default) and to ``on_ready``; opening it sets an HttpOnly, SameSite=Strict session
    cookie. ``port=0`` picks a free port. The login is the administrator's, or with
    ``owner`` that owner's: the console then works through ``integ.for_owner(owner)``.
    The link works once and for ``login_ttl`` seconds; a session ends after
    ``session_idle`` seconds unused, ``session_lifetime`` seconds after the login, or with
    "Sign out".
    """
    import uvicorn

    link = LoginLink(
        Owner(owner) if owner is not None else None,
        login_ttl=login_ttl,
        session_idle=session_idle,
        session_lifetime=session_lifetime,
    )
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
    link.bind_port(bound_port)
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
    print(
        f"Integrations console; open this link to sign in (it works once, within "
        f"{link.login_ttl:g} s):",
        file=stream,
    )
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
