"""The console's Starlette app: pages, fragments, form actions and the live event stream."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import secrets
from asyncio import FIRST_COMPLETED
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from .._audit import acting_as
from .._authflow import callback_parameters
from .._checks import NOT_CONNECTED_YET, unregistered_message
from .._errors import (
    AlreadyExists,
    Deleted,
    IntegrationsError,
    InvalidState,
    InvalidUUID,
    LifecycleError,
    NotConfigured,
    NotFound,
)
from .._events import ALL_OWNERS, Subscription
from .._integrations import Integrations
from .._models import Connection, Event, Page
from .._owner import OwnerHandle
from .._providers import Provider
from .._telemetry import fields
from .._webhooks import WebhookDelivery
from ._present import (
    account_text,
    ago,
    field_views,
    parse_scopes,
    setup_incomplete,
    setup_patch,
    status_text,
)
from ._security import CSRF_FIELD, Csrf, SecurityHeaders, cross_origin, set_cookie
from ._viewer import Admin, Owner, Viewer

log = logging.getLogger("integrations.web")

HERE = Path(__file__).parent
Authorize = Callable[[Request], "Viewer | Awaitable[Viewer | None] | None"]
# The id of the request's sign-in session, when the console is told how to find it.
SessionOf = Callable[[Request], "str | None"]
Handler = Callable[[Request, "_Context"], Awaitable[Response]]

# Outcome notes after a redirect: fixed texts chosen by code, so a link cannot inject words.
_DONE = {
    "added": "Connection added.",
    "saved": "Saved.",
    "tested": "Checked.",
    "connected": "Connected.",
    "disconnected": "Disconnected.",
    "renamed": "Renamed.",
    "removed": "Connection removed.",
    "replayed": "Delivery queued again.",
}
_MISSING = (NotConfigured, Deleted, NotFound, InvalidUUID)
# The listing's filter by stored status, and the page sizes it offers.
_STATUS_FILTERS = ("connected", "error", "disconnected")
_PAGE_SIZES = (10, 25, 50, 100)
_KEEPALIVE_SECONDS = 15.0
# Lines an events panel starts with, and the page of the log it reads them in.
_PANEL_LINES = 20
_LOG_PAGE = 500


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class _Context:
    viewer: Viewer
    # Integrations for the administrator, the owner's handle otherwise (same methods).
    handle: Integrations | OwnerHandle


def _scope(integ: Integrations, who: Viewer) -> Integrations | OwnerHandle:
    """The object the console works through for ``who``: never more than that viewer may see.
    The administrator is ``Integrations`` itself (every owner's connections, all listed);
    an owner works through that owner's handle."""
    if isinstance(who, Admin):
        return integ
    return integ.for_owner(who.owner)


class _Console:
    def __init__(
        self,
        integ: Integrations,
        authorize: Authorize,
        *,
        secret: bytes,
        page_size: int,
        callback_url: str | None,
        title: str,
        stream_lifetime: float = 60.0,
        session_of: SessionOf | None = None,
        logout: Callable[[Request], Response] | None = None,
    ) -> None:
        self.integ = integ
        self.authorize = authorize
        self.session_of = session_of
        self.logout_action = logout
        self.csrf = Csrf(secret)
        self.page_size = page_size
        self.callback_url = callback_url
        self.title = title
        self.stream_lifetime = stream_lifetime
        # Set by close(): live streams end so that the server can stop.
        self.closing = asyncio.Event()
        # Device authorizations this console waits on (kept so that they are not collected).
        self._device_waits: set[asyncio.Task[None]] = set()
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        page = self._endpoint
        write = self._write
        routes = [
            Route("/", page(self.index), name="index"),
            Route("/fragments/list", page(self.list_fragment), name="list_fragment"),
            Route("/connections", write(self.add), methods=["POST"], name="add"),
            Route("/events", page(self.events), name="events"),
            Route("/logout", write(self.logout), methods=["POST"], name="logout"),
            Route("/audit", page(self.audit), name="audit"),
            Route("/callback", self._callback_endpoint(self.callback), name="callback"),
            Route("/webhooks", page(self.webhooks), name="webhooks"),
            Route("/webhooks/{endpoint}", page(self.webhook), name="webhook"),
            Route(
                "/webhooks/deliveries/{delivery}/replay",
                write(self.replay),
                methods=["POST"],
                name="replay",
            ),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
            Route("/{uuid}", page(self.connection), name="connection"),
            Route("/{uuid}/status", page(self.status_fragment), name="connection_status"),
            Route("/{uuid}/audit", page(self.connection_audit), name="connection_audit"),
            Route("/{uuid}/setup", write(self.save), methods=["POST"], name="save"),
            Route("/{uuid}/test", write(self.test), methods=["POST"], name="test"),
            Route("/{uuid}/connect", write(self.connect), methods=["POST"], name="connect"),
            Route("/{uuid}/device", write(self.connect_device), methods=["POST"], name="device"),
            Route(
                "/{uuid}/disconnect", write(self.disconnect), methods=["POST"], name="disconnect"
            ),
            Route("/{uuid}/rename", write(self.rename), methods=["POST"], name="rename"),
            Route("/{uuid}/remove", page(self.confirm_remove), name="confirm_remove"),
            Route("/{uuid}/remove", write(self.remove), methods=["POST"], name="remove"),
        ]
        self.app = Starlette(
            routes=routes,
            middleware=[Middleware(SecurityHeaders)],
            exception_handlers={HTTPException: self._http_error, Exception: self._crash},
        )
        self.app.state.console = self

    # -- plumbing ------------------------------------------------------------------------

    async def recent_for(self, uuid: str) -> list[dict[str, str]]:
        """The events panel's first lines for ``uuid``, newest first (as the page's script
        writes the ones that arrive later): read from the durable event log, so they hold
        what every process did, before this one started too. The caller has checked that
        the viewer may see the connection."""
        kept: deque[Event] = deque(maxlen=_PANEL_LINES)
        after = 0
        while True:
            events, _pruned = await self.integ._repo.events_after(
                after,
                owner=None,
                any_owner=True,
                provider=None,
                uuid=uuid,
                kinds=None,
                limit=_LOG_PAGE,
            )
            kept.extend(e for e in events if e.kind != "resync")
            if len(events) < _LOG_PAGE or events[-1].position is None:
                break
            after = events[-1].position
        return [{"at": e.at.isoformat(), "text": _event_line(e)} for e in reversed(kept)]

    def url(self, request: Request, name: str, **params: Any) -> str:
        """A path that works wherever the console is mounted."""
        path = self.app.router.url_path_for(name, **params)
        return str(request.scope.get("root_path", "")).rstrip("/") + str(path)

    async def _viewer(self, request: Request) -> Viewer:
        try:
            who = self.authorize(request)
            if inspect.isawaitable(who):
                who = await who
        except PermissionError:
            raise _Refused(403, "You may not use this console.") from None
        except HTTPException as exc:
            if exc.status_code in (401, 403):
                raise _Refused(exc.status_code, "You may not use this console.") from None
            raise
        if who is None:
            raise _Refused(401, "Sign in to use this console.")
        if not isinstance(who, Admin | Owner):
            raise TypeError("authorize must return Admin(), Owner(...) or None")
        return who

    def _endpoint(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await self._run(request, handler, write=False)

        return endpoint

    def _write(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await self._run(request, handler, write=True)

        return endpoint

    def _callback_endpoint(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await self._run(request, handler, write=False, bounce=True)

        return endpoint

    async def _run(
        self, request: Request, handler: Handler, *, write: bool, bounce: bool = False
    ) -> Response:
        try:
            try:
                viewer = await self._viewer(request)
            except _Refused as refused:
                if bounce and refused.status == 401 and "bounced" not in request.query_params:
                    return self._bounce(request)
                raise
            if write:
                if cross_origin(request):
                    raise _Refused(403, "This form came from another site. Reload the page.")
                form = await request.form(max_files=0, max_fields=200)
                if not self.csrf.verify(
                    request, form.get(CSRF_FIELD), self._binding(request, viewer)
                ):
                    raise _Refused(
                        403, "The form expired or came from elsewhere. Reload the page and retry."
                    )
                request.state.form = form
            # Reveals and changes made for this request are recorded as the viewer's.
            with acting_as(viewer.actor):
                return await handler(request, _Context(viewer, _scope(self.integ, viewer)))
        except _Refused as refused:
            return self.error_page(request, refused.status, refused.message)
        except _MISSING:
            return self.error_page(request, 404, "There is no such connection.")
        except HTTPException as exc:
            return self.error_page(request, exc.status_code, str(exc.detail))
        except Exception:
            log.exception(
                "console request failed: %s %s",
                request.method,
                request.url.path,
                extra=fields("console_request_failed"),
            )
            return self.error_page(request, 500, "Something went wrong. The error was logged.")

    def _binding(self, request: Request, viewer: Viewer | None) -> str:
        """What a CSRF token is bound to besides its cookie: the principal and the
        sign-in session, so that one user's token is worthless to another."""
        if viewer is None:
            return ""
        who = f"owner:{viewer.owner}" if isinstance(viewer, Owner) else f"admin:{viewer.name}"
        session = self.session_of(request) if self.session_of is not None else None
        return f"{who}\0{session or ''}"

    async def logout(self, request: Request, ctx: _Context) -> Response:
        if self.logout_action is None:
            raise HTTPException(404)
        return self.logout_action(request)

    def _bounce(self, request: Request) -> Response:
        """Reload a provider's redirect from our own page, so SameSite=Strict cookies come along.

        A browser arriving from the provider's site withholds Strict cookies; the same URL
        opened by a page of this site carries them. Nothing is consumed until then.
        """
        query = request.url.query
        target = self.url(request, "callback") + "?" + (query + "&" if query else "") + "bounced=1"
        return self.render(request, "bounce.html", {"target": target}, status=401)

    def render(
        self,
        request: Request,
        template: str,
        context: Mapping[str, Any],
        *,
        status: int = 200,
        viewer: Viewer | None = None,
    ) -> Response:
        token, fresh_cookie = self.csrf.token_for(request, self._binding(request, viewer))
        full = {
            "title": self.title,
            "csrf_field": CSRF_FIELD,
            "csrf_token": token,
            "can_logout": viewer is not None and self.logout_action is not None,
            "url": lambda name, **params: self.url(request, name, **params),
            "viewer": viewer,
            "flash": _DONE.get(request.query_params.get("done", "")),
            "error": None,
            **context,
        }
        response = self.templates.TemplateResponse(request, template, full, status_code=status)
        if fresh_cookie is not None:
            from ._security import CSRF_COOKIE

            set_cookie(response, request, CSRF_COOKIE, fresh_cookie)
        return response

    def error_page(self, request: Request, status: int, message: str) -> Response:
        titles = {
            400: "Bad request",
            401: "Sign in required",
            403: "Forbidden",
            404: "Not found",
            405: "Method not allowed",
            500: "Error",
        }
        # No outcome note on an error page: a "?done=added" link to a missing connection
        # did not add anything.
        context = {
            "status": status,
            "heading": titles.get(status, "Error"),
            "message": message,
            "flash": None,
        }
        response = self.render(request, "error.html", context, status=status)
        if status == 401:
            response.headers["www-authenticate"] = 'Cookie realm="integrations"'
        return response

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        return self.error_page(request, status, "There is nothing here.")

    async def _crash(self, request: Request, exc: Exception) -> Response:
        return self.error_page(request, 500, "Something went wrong. The error was logged.")

    def _redirect(self, request: Request, name: str, done: str, **params: Any) -> Response:
        return RedirectResponse(self.url(request, name, **params) + f"?done={done}", 303)

    def _form(self, request: Request) -> FormData:
        form: FormData = request.state.form
        return form

    def _providers(self) -> dict[str, Provider]:
        return {provider.key: provider for provider in self.integ.list_providers()}

    # -- the listing -----------------------------------------------------------------------

    async def _listing(self, request: Request, ctx: _Context) -> dict[str, Any]:
        """One keyset page of the viewer's connections, filtered and counted in SQL: the
        page costs the same at a hundred connections as at a million."""
        params = request.query_params
        every = isinstance(ctx.viewer, Admin)
        providers = sorted(self.integ.list_providers(), key=lambda p: (p.name.lower(), p.key))
        by_key = {provider.key: provider for provider in providers}
        search = params.get("q", "").strip()[:100]
        status = params.get("status", "")
        provider = params.get("provider", "")
        owner = params.get("owner", "").strip()[:255] if every else ""
        size = _page_size(params.get("size"), self.page_size)
        after = params.get("after") or None
        scope: Any = (owner or ALL_OWNERS) if every else None
        counts = (
            await self.integ.count_connections(owner=scope)
            if every
            else await ctx.handle.count_connections()
        )
        filters = {
            "provider": provider or None,
            "status": status if status in _STATUS_FILTERS else None,
            "search": search or None,
            "limit": size,
        }
        try:
            page = await self._page(ctx, scope, filters, after)
        except IntegrationsError:
            # A link edited by hand (a mark of another listing, a provider key that is
            # not one): the first page of what the filters ask, or of everything.
            try:
                page = await self._page(ctx, scope, filters, None)
            except IntegrationsError:
                filters.update(provider=None)
                page = await self._page(ctx, scope, filters, None)
        groups: list[dict[str, Any]] = []
        for conn in page.items:
            if not groups or groups[-1]["key"] != conn.provider:
                known = by_key.get(conn.provider)
                name = known.name if known is not None else conn.provider
                groups.append(
                    {
                        "key": conn.provider,
                        "name": name,
                        "registered": known is not None,
                        "rows": [],
                    }
                )
            groups[-1]["rows"].append(_row(by_key.get(conn.provider), conn))
        filtered = bool(filters["provider"] or filters["status"] or filters["search"] or owner)
        query = {
            key: value
            for key, value in (
                ("q", search),
                ("provider", filters["provider"] or ""),
                ("status", filters["status"] or ""),
                ("owner", owner),
                ("size", str(size) if size != self.page_size else ""),
            )
            if value
        }
        here = dict(query, after=after) if after else dict(query)
        return {
            "groups": groups,
            "total": sum(counts.values()),
            "counts": counts,
            "providers": providers,
            "provider_keys": set(by_key),
            "search": search,
            "status": filters["status"] or "",
            "statuses": _STATUS_FILTERS,
            "provider": filters["provider"] or "",
            "owner": owner,
            "size": size,
            "sizes": sorted({*_PAGE_SIZES, self.page_size}),
            "filtered": filtered,
            "first_url": "?" + urlencode(query) if after else None,
            "next_url": (
                "?" + urlencode(dict(query, after=page.next_after))
                if page.next_after is not None
                else None
            ),
            "here": urlencode(here),
            # Shown after the last page of an unfiltered listing: the catalogue's
            # providers with no connection here.
            "idle": (
                [p for p in providers if not counts.get(p.key)]
                if page.next_after is None and not filtered
                else []
            ),
            # The administrator sees every owner's connections: the listing names the owner.
            "owners": every,
        }

    async def _page(
        self, ctx: _Context, scope: Any, filters: dict[str, Any], after: str | None
    ) -> Page:
        if isinstance(ctx.viewer, Admin):
            return await self.integ.list_page(owner=scope, after=after, **filters)
        return await ctx.handle.list_page(after=after, **filters)

    async def index(self, request: Request, ctx: _Context) -> Response:
        context = await self._listing(request, ctx)
        context.update(form_provider="", form_name="")
        return self.render(request, "index.html", context, viewer=ctx.viewer)

    async def list_fragment(self, request: Request, ctx: _Context) -> Response:
        context = await self._listing(request, ctx)
        return self.render(request, "_list.html", context, viewer=ctx.viewer)

    async def add(self, request: Request, ctx: _Context) -> Response:
        form = self._form(request)
        provider = str(form.get("provider", ""))
        name = str(form.get("name", ""))
        try:
            conn = await ctx.handle.add_connection(provider, name, actor=ctx.viewer.actor)
        except IntegrationsError as exc:
            context = await self._listing(request, ctx)
            context.update(form_provider=provider, form_name=name, error=exc.message)
            status = 409 if isinstance(exc, AlreadyExists) else 400
            return self.render(request, "index.html", context, status=status, viewer=ctx.viewer)
        return self._redirect(request, "connection", "added", uuid=conn.uuid)

    # -- one connection --------------------------------------------------------------------

    async def _connection_context(self, request: Request, ctx: _Context) -> dict[str, Any]:
        uuid = request.path_params["uuid"]
        conn: Connection = await ctx.handle.get_integration_by_uuid(uuid)
        provider = self._providers().get(conn.provider)
        data = conn.data
        return {
            "conn": conn,
            "provider": provider,
            "provider_name": provider.name if provider is not None else conn.provider,
            "row": _row(provider, conn),
            "fields": field_views(provider, data) if provider is not None else [],
            "oauth": provider is not None and provider.scheme.authorizes_user,
            "device": provider is not None and bool(provider.device_authorization_url),
            "has_token": bool(data.get("access_token")),
            # What to register with the provider before the first Connect.
            "redirect_uri": self._callback(request),
            "docs_url": provider.docs_url if provider is not None else None,
            "recent": await self.recent_for(conn.uuid),
            "scopes": " ".join(
                _stored_scopes(data) or (provider.scopes if provider is not None else ())
            ),
        }

    async def _connection_page(
        self, request: Request, ctx: _Context, *, error: str | None = None, status: int = 200
    ) -> Response:
        context = await self._connection_context(request, ctx)
        if error is not None:
            context["error"] = error
        return self.render(request, "connection.html", context, status=status, viewer=ctx.viewer)

    async def connection(self, request: Request, ctx: _Context) -> Response:
        return await self._connection_page(request, ctx)

    async def status_fragment(self, request: Request, ctx: _Context) -> Response:
        context = await self._connection_context(request, ctx)
        return self.render(request, "_status.html", context, viewer=ctx.viewer)

    async def _act(
        self,
        request: Request,
        ctx: _Context,
        action: Callable[[str, Connection], Awaitable[Any]],
        done: str,
    ) -> Response:
        """Run one change on the connection: back to its page, with the error if it failed."""
        uuid = request.path_params["uuid"]
        conn: Connection = await ctx.handle.get_integration_by_uuid(uuid)
        try:
            await action(conn.uuid, conn)
        except _MISSING:
            raise
        except IntegrationsError as exc:
            status = 409 if isinstance(exc, AlreadyExists) else 400
            return await self._connection_page(request, ctx, error=exc.message, status=status)
        return self._redirect(request, "connection", done, uuid=conn.uuid)

    async def save(self, request: Request, ctx: _Context) -> Response:
        form = self._form(request)
        values = {key: str(value) for key, value in form.items() if isinstance(value, str)}

        async def action(uuid: str, conn: Connection) -> None:
            provider = self._providers().get(conn.provider)
            if provider is None:
                raise NotConfigured("the connection's provider is not registered")
            await ctx.handle.save_setup(uuid, setup_patch(provider, values), actor=ctx.viewer.actor)

        return await self._act(request, ctx, action, "saved")

    async def test(self, request: Request, ctx: _Context) -> Response:
        uuid = request.path_params["uuid"]
        conn: Connection = await ctx.handle.get_integration_by_uuid(uuid)
        try:
            result = await ctx.handle.validate_connection(conn.uuid, actor=ctx.viewer.actor)
        except _MISSING:
            raise
        except IntegrationsError as exc:
            return await self._connection_page(request, ctx, error=exc.message, status=400)
        if not result.ok and result.message in (
            NOT_CONNECTED_YET,
            unregistered_message(conn.provider),
        ):
            # Nothing was checked nor recorded: the page says why rather than "Checked.".
            return await self._connection_page(request, ctx, error=result.message, status=409)
        return self._redirect(request, "connection", "tested", uuid=conn.uuid)

    async def disconnect(self, request: Request, ctx: _Context) -> Response:
        async def action(uuid: str, conn: Connection) -> None:
            await ctx.handle.disconnect(uuid, actor=ctx.viewer.actor)

        return await self._act(request, ctx, action, "disconnected")

    async def rename(self, request: Request, ctx: _Context) -> Response:
        new_name = str(self._form(request).get("new_name", ""))

        async def action(uuid: str, conn: Connection) -> None:
            await ctx.handle.rename_connection(uuid, new_name, actor=ctx.viewer.actor)

        return await self._act(request, ctx, action, "renamed")

    async def confirm_remove(self, request: Request, ctx: _Context) -> Response:
        context = await self._connection_context(request, ctx)
        return self.render(request, "remove.html", context, viewer=ctx.viewer)

    async def remove(self, request: Request, ctx: _Context) -> Response:
        uuid = request.path_params["uuid"]
        conn: Connection = await ctx.handle.get_integration_by_uuid(uuid)
        await ctx.handle.remove_connection(conn.uuid, actor=ctx.viewer.actor)
        return RedirectResponse(self.url(request, "index") + "?done=removed", 303)

    # -- OAuth -------------------------------------------------------------------------------

    def _callback(self, request: Request) -> str:
        if self.callback_url is not None:
            return self.callback_url
        return f"{request.url.scheme}://{request.url.netloc}{self.url(request, 'callback')}"

    async def connect(self, request: Request, ctx: _Context) -> Response:
        uuid = request.path_params["uuid"]
        conn: Connection = await ctx.handle.get_integration_by_uuid(uuid)
        scopes = parse_scopes(str(self._form(request).get("scopes", "")))
        try:
            url, _state = await ctx.handle.begin_authorization(
                conn.uuid, self._callback(request), scopes=scopes or None, actor=ctx.viewer.actor
            )
        except _MISSING:
            raise
        except IntegrationsError as exc:
            return await self._connection_page(request, ctx, error=exc.message, status=400)
        return RedirectResponse(url, 303)

    async def connect_device(self, request: Request, ctx: _Context) -> Response:
        """Start a device authorization: show the code and the link; this process polls for
        the approval in the background, and the status on the page follows it."""
        uuid = request.path_params["uuid"]
        conn: Connection = await ctx.handle.get_integration_by_uuid(uuid)
        scopes = parse_scopes(str(self._form(request).get("scopes", "")))
        try:
            code = await ctx.handle.start_device_authorization(
                conn.uuid, scopes=scopes or None, actor=ctx.viewer.actor
            )
        except _MISSING:
            raise
        except IntegrationsError as exc:
            return await self._connection_page(request, ctx, error=exc.message, status=400)
        handle, actor = ctx.handle, ctx.viewer.actor

        async def wait() -> None:
            try:
                await handle.complete_device_authorization(conn.uuid, actor=actor)
            except IntegrationsError as exc:
                # Recorded on the connection (a refusal) or simply ended (an expired code).
                log.info(
                    "device authorization of %s ended: %s",
                    conn.uuid,
                    exc.code,
                    extra=fields("device_authorization_ended", uuid=conn.uuid),
                )

        task = asyncio.create_task(wait())
        self._device_waits.add(task)
        task.add_done_callback(self._device_waits.discard)
        context = await self._connection_context(request, ctx)
        context["device_code"] = code
        return self.render(request, "connection.html", context, viewer=ctx.viewer)

    async def callback(self, request: Request, ctx: _Context) -> Response:
        given = callback_parameters(request.query_params)
        state = given["state"]
        if not state:
            raise _Refused(400, "The authorization answer carries no state.")
        try:
            conn: Connection = await ctx.handle.complete_authorization(
                state,
                code=given["code"],
                error=given["error"],
                error_description=given["error_description"],
            )
        except InvalidState:
            raise _Refused(
                400, "This authorization is unknown, expired or already used. Start it again."
            ) from None
        except _MISSING:
            raise
        except IntegrationsError as exc:
            raise _Refused(400, f"The authorization failed: {exc.message}") from None
        return self._redirect(request, "connection", "connected", uuid=conn.uuid)

    # -- webhooks ----------------------------------------------------------------------------

    async def webhooks(self, request: Request, ctx: _Context) -> Response:
        """The viewer's webhook endpoints (every one for the administrator), each with its
        newest deliveries: state, attempts, the next attempt and a Replay button."""
        return await self._webhooks_page(request, ctx, await ctx.handle.list_webhooks())

    async def webhook(self, request: Request, ctx: _Context) -> Response:
        """One endpoint's page: the same facts and deliveries; 404 for an endpoint the
        viewer may not see."""
        wanted = request.path_params["endpoint"]
        found = [e for e in await ctx.handle.list_webhooks() if e.id == wanted]
        if not found:
            raise _Refused(404, "There is no such webhook endpoint.")
        return await self._webhooks_page(request, ctx, found)

    async def _webhooks_page(self, request: Request, ctx: _Context, shown: list[Any]) -> Response:
        endpoints = []
        for endpoint in shown:
            deliveries = await ctx.handle.webhook_deliveries(endpoint.id, limit=_DELIVERIES)
            endpoints.append(
                {
                    "endpoint": endpoint,
                    "health": _endpoint_health(deliveries),
                    "deliveries": [_delivery_row(d) for d in deliveries],
                }
            )
        return self.render(
            request,
            "webhooks.html",
            {"endpoints": endpoints, "owners": isinstance(ctx.viewer, Admin)},
            viewer=ctx.viewer,
        )

    async def replay(self, request: Request, ctx: _Context) -> Response:
        delivery = request.path_params["delivery"]
        try:
            await ctx.handle.replay_webhook(delivery)
        except _MISSING:
            raise _Refused(404, "There is no such delivery.") from None
        except IntegrationsError as exc:
            raise _Refused(400, exc.message) from None
        return RedirectResponse(self.url(request, "webhooks") + "?done=replayed", 303)

    # -- audit trail ---------------------------------------------------------------------------

    async def _audit_page(
        self, request: Request, ctx: _Context, conn: Connection | None
    ) -> Response:
        # The administrator sees every owner's records; an owner only that owner's.
        owner: Any = ALL_OWNERS if isinstance(ctx.viewer, Admin) else ctx.viewer.owner
        before = request.query_params.get("before", "")
        page = await self.integ.audit(
            uuid=None if conn is None else conn.uuid,
            owner=owner,
            before=int(before) if before.isdigit() and int(before) > 0 else None,
            limit=100,
        )
        context = {"conn": conn, "records": page.records, "next_before": page.next_before}
        return self.render(request, "audit.html", context, viewer=ctx.viewer)

    async def audit(self, request: Request, ctx: _Context) -> Response:
        return await self._audit_page(request, ctx, None)

    async def connection_audit(self, request: Request, ctx: _Context) -> Response:
        conn: Connection = await ctx.handle.get_integration_by_uuid(request.path_params["uuid"])
        return await self._audit_page(request, ctx, conn)

    # -- live updates ------------------------------------------------------------------------

    async def events(self, request: Request, ctx: _Context) -> Response:
        uuid = request.query_params.get("uuid")
        if uuid:
            conn: Connection = await ctx.handle.get_integration_by_uuid(uuid)
            subscription = ctx.handle.subscribe(uuid=conn.uuid, maxsize=100)
        elif isinstance(ctx.viewer, Admin):
            subscription = self.integ.subscribe(owner=ALL_OWNERS, maxsize=100)
        else:
            subscription = ctx.handle.subscribe(maxsize=100)

        async def stream() -> AsyncIterator[str]:
            loop = asyncio.get_running_loop()
            # A stream ends after a while (the browser reconnects and refetches), so a
            # server shutting down never waits on it for long; close() ends them at once.
            deadline = loop.time() + self.stream_lifetime
            stop = asyncio.ensure_future(self.closing.wait())
            try:
                async with subscription as events:
                    yield "retry: 1000\n\n"
                    while not stop.done() and loop.time() < deadline:
                        wait = min(_KEEPALIVE_SECONDS, deadline - loop.time())
                        try:
                            event = await _next_event(events, stop, wait)
                        except LifecycleError:
                            return
                        yield ": keep-alive\n\n" if event is None else _sse(event)
            finally:
                stop.cancel()

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )


#: Deliveries the webhooks page shows per endpoint, newest first.
_DELIVERIES = 20


def _when(value: datetime | None) -> str:
    """The console's one time format: ``2026-12-04 17:31:05 UTC``."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else ""


def _endpoint_health(deliveries: list[WebhookDelivery]) -> str:
    """What the newest deliveries say of an endpoint: ``failing`` while the newest
    finished one is dead or a pending one has failed attempts, ``ok`` when the newest
    finished one was delivered, else ``no deliveries yet`` / ``pending``."""
    if not deliveries:
        return "no deliveries yet"
    if any(d.state == "pending" and d.attempts > 0 for d in deliveries):
        return "failing"
    finished = [d for d in deliveries if d.state != "pending"]
    if not finished:
        return "pending"
    return "ok" if finished[0].state == "delivered" else "failing"


def _delivery_row(d: WebhookDelivery) -> dict[str, Any]:
    last = d.last_error or (f"HTTP {d.last_status}" if d.last_status is not None else "")
    return {
        "id": d.id,
        "kind": d.kind,
        "connection": d.connection,
        "state": d.state,
        "attempts": d.attempts,
        "created": _when(d.created_at),
        "created_at": d.created_at.isoformat(),
        "next": _when(d.next_attempt_at) if d.state == "pending" else "",
        "next_at": d.next_attempt_at.isoformat() if d.next_attempt_at is not None else "",
        "last": last,
    }


def _page_size(value: str | None, default: int) -> int:
    """The page size a link asks for when it is one the listing offers, else the default."""
    try:
        size = int(value or "")
    except ValueError:
        return default
    return size if size in _PAGE_SIZES or size == default else default


def _event_line(event: Event) -> str:
    """``"2026-12-04 12:04:05 UTC validated connected → error (Invalid key) by alice"``:
    what the panel shows of an event, in the page's one time format."""
    words = [_when(event.at), event.kind.replace("_", " ")]
    if event.previous_status and event.status and event.previous_status != event.status:
        words.append(f"{event.previous_status} → {event.status}")
    elif event.status:
        words.append(f"→ {event.status}")
    message = event.detail.get("validation_status") if event.kind == "validated" else None
    if isinstance(message, str) and message:
        words.append(f"({message})")
    if event.actor:
        words.append(f"by {event.actor}")
    return " ".join(words)


async def _next_event(
    events: Subscription, stop: asyncio.Future[Any], within: float | None
) -> Event | None:
    """The next event, or None when ``stop`` is done or ``within`` seconds passed first;
    an error of the subscription (it closed) is raised."""
    get = asyncio.ensure_future(events.get())
    # A stream the client closed leaves this wait behind; its end (the subscription
    # closing) is expected, not an error to report.
    get.add_done_callback(_consume)
    await asyncio.wait({get, stop}, timeout=within, return_when=FIRST_COMPLETED)
    if get.done():
        return get.result()
    get.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await get
    return None


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _row(provider: Provider | None, conn: Connection) -> dict[str, Any]:
    data = conn.data
    checked_at = data.get("last_validated_at")
    message = data.get("validation_status")
    return {
        "uuid": conn.uuid,
        "name": conn.name,
        "status": status_text(provider, data),
        "incomplete": setup_incomplete(provider, data),
        "account": account_text(data),
        "checked": ago(checked_at),
        "checked_at": checked_at if isinstance(checked_at, str) else None,
        "message": message if isinstance(message, str) else "",
        "owner": conn.owner,
    }


def _stored_scopes(data: Mapping[str, Any]) -> tuple[str, ...]:
    """The scopes of the stored grant, to ask for again on Reconnect."""
    scope = data.get("granted_scopes") or data.get("scope") or data.get("scopes")
    if isinstance(scope, str):
        return tuple(parse_scopes(scope))
    if isinstance(scope, list | tuple):
        return tuple(str(s) for s in scope)
    return ()


def _sse(event: Event) -> str:
    """One server-sent event: what changed, never the data itself."""
    kind = "resync" if event.kind == "resync" else "change"
    message = event.detail.get("validation_status") if event.kind == "validated" else None
    payload = {
        "kind": event.kind,
        "uuid": event.uuid,
        "provider": event.provider,
        "name": event.name,
        "status": event.status,
        "previous_status": event.previous_status,
        "message": message if isinstance(message, str) else None,
        "at": event.at.isoformat(),
        "line": _event_line(event),
    }
    return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"


def console(
    integ: Integrations,
    *,
    authorize: Authorize,
    secret: str | bytes | None = None,
    page_size: int = 25,
    callback_url: str | None = None,
    title: str = "Integrations",
    stream_lifetime: float = 60.0,
    session_of: SessionOf | None = None,
    logout: Callable[[Request], Response] | None = None,
) -> Starlette:
    """The admin console as an ASGI app, to mount anywhere or run with ``serve``.

    ``authorize(request)`` (sync or async) returns ``Admin()``, ``Owner("user:42")`` or
    ``None`` (401); raising PermissionError refuses with 403. ``secret`` signs CSRF tokens:
    give the same value to every process behind one address (random per app otherwise).
    ``callback_url`` overrides the OAuth redirect URI built from the request (useful
    behind a proxy that rewrites the host). A live-update stream ends after
    ``stream_lifetime`` seconds and the browser reconnects, so a server shutting down waits
    for open pages at most that long.

    Form tokens are bound to the signed-in principal and, with ``session_of(request)``
    (the id of the request's sign-in session), to that session; a form posted from
    another origin (``Sec-Fetch-Site``, ``Origin``) is refused. With ``logout(request)``
    (returning the response that ends the session) pages show a "Sign out" button.
    """
    if not callable(authorize):
        raise TypeError("authorize must be a callable taking the request")
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError("page_size must be a positive integer")
    if not isinstance(stream_lifetime, int | float) or stream_lifetime <= 0:
        raise ValueError("stream_lifetime must be a positive number of seconds")
    if secret is None:
        key = secrets.token_bytes(32)
    elif isinstance(secret, str):
        key = secret.encode()
    else:
        key = bytes(secret)
    if len(key) < 16:
        raise ValueError("secret must be at least 16 bytes")
    return _Console(
        integ,
        authorize,
        secret=key,
        page_size=page_size,
        callback_url=callback_url,
        title=title,
        stream_lifetime=float(stream_lifetime),
        session_of=session_of,
        logout=logout,
    ).app
