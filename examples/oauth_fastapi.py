"""Connect an OAuth integration from a FastAPI app: a begin route and a callback route.

It needs FastAPI and uvicorn (``pip install fastapi uvicorn``, or the ``dev`` extra). Run
it with ``INTEGRATIONS_DSN`` and ``INTEGRATIONS_KEYS`` set, for example::

    uvicorn examples.oauth_fastapi:app

then send the user to ``/integrations/{uuid}/connect`` for a connection whose client
id and secret were saved with ``save_setup``. Register ``{your origin}/oauth/callback``
as the redirect URI with the provider.

The state is verified and consumed server-side by ``complete_authorization``. The
cookie below also binds it to the browser that started the flow, so a callback
link crafted by someone else cannot attach their account to this user's connection.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse

from integrations import (
    AuthorizationDenied,
    Integrations,
    IntegrationsError,
    InvalidInput,
    InvalidState,
    NotFound,
    OAuthError,
    TokenRequestFailed,
)

STATE_COOKIE = "oauth_state"


def error_response(exc: IntegrationsError) -> JSONResponse:
    """The HTTP answer for a refused request: the client's mistake is a 4xx, never a 500."""
    if isinstance(exc, NotFound):
        status = 404
    elif isinstance(exc, TokenRequestFailed):
        status = 502  # the provider's token endpoint failed, not this app
    elif isinstance(exc, InvalidInput | OAuthError):
        status = 400
    else:
        raise exc  # a storage or configuration fault is the server's own error
    return JSONResponse({"error": exc.code, "message": exc.message}, status_code=status)


def create_app(make_integrations: Callable[[], Integrations] = Integrations) -> FastAPI:
    """The app; ``make_integrations`` builds the (unopened) ``Integrations`` it runs with."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with make_integrations() as integ:
            app.state.integrations = integ
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/integrations/{uuid}/connect")
    async def begin(uuid: str, request: Request) -> Any:
        integ: Integrations = request.app.state.integrations
        redirect_uri = str(request.url_for("oauth_callback"))
        try:
            # actor= records who connected it; take it from your own authentication.
            url, state = await integ.begin_authorization(uuid, redirect_uri, actor=None)
        except IntegrationsError as exc:
            return error_response(exc)
        response = RedirectResponse(url, status_code=302)
        response.set_cookie(
            STATE_COOKIE,
            state,
            max_age=600,
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
        )
        return response

    @app.get("/oauth/callback", name="oauth_callback")
    async def callback(
        request: Request,
        state: str = "",
        code: str | None = None,
        error: str | None = None,
        error_description: str | None = None,
    ) -> Any:
        integ: Integrations = request.app.state.integrations
        cookie = request.cookies.get(STATE_COOKIE, "")
        if not state or not hmac.compare_digest(cookie.encode(), state.encode()):
            return JSONResponse(
                {
                    "error": "state_mismatch",
                    "message": "This authorization was not started in this browser.",
                },
                status_code=400,
            )
        try:
            connection = await integ.complete_authorization(
                state, code=code, error=error, error_description=error_description
            )
        except InvalidState as exc:
            return JSONResponse(
                {"error": exc.code, "message": "This authorization link is invalid or expired."},
                status_code=400,
            )
        except AuthorizationDenied as exc:
            response = JSONResponse({"connected": False, "reason": exc.message}, status_code=403)
        except IntegrationsError as exc:
            response = error_response(exc)
        else:
            response = JSONResponse(
                {
                    "connected": True,
                    "uuid": connection.uuid,
                    "provider": connection.provider,
                    "name": connection.name,
                    "account": connection.data.get("account"),
                }
            )
        response.delete_cookie(STATE_COOKIE)
        return response

    return app


app = create_app()
