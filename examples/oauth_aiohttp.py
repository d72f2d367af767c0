"""Connect an OAuth integration from an aiohttp.web app: a begin route and a callback route.

Run it with ``INTEGRATIONS_DSN`` and ``INTEGRATIONS_KEYS`` set::

    python examples/oauth_aiohttp.py

then send the user to ``/integrations/{uuid}/connect`` for a connection whose client
id and secret were saved with ``save_setup``. Register ``{your origin}/oauth/callback``
as the redirect URI with the provider (behind a proxy, build it from your public
origin rather than from the request).

The state is verified and consumed server-side by ``complete_authorization``; the
cookie also binds it to the browser that started the flow.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable

from aiohttp import web

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
INTEGRATIONS = web.AppKey("integrations", Integrations)


def error_response(exc: IntegrationsError) -> web.Response:
    """The HTTP answer for a refused request: the client's mistake is a 4xx, never a 500."""
    if isinstance(exc, NotFound):
        status = 404
    elif isinstance(exc, TokenRequestFailed):
        status = 502  # the provider's token endpoint failed, not this app
    elif isinstance(exc, InvalidInput | OAuthError):
        status = 400
    else:
        raise exc  # a storage or configuration fault is the server's own error
    return web.json_response({"error": exc.code, "message": exc.message}, status=status)


async def begin(request: web.Request) -> web.StreamResponse:
    integ = request.app[INTEGRATIONS]
    callback_path = request.app.router["oauth_callback"].url_for()
    redirect_uri = str(request.url.origin().join(callback_path))
    try:
        # actor= records who connected it; take it from your own authentication.
        url, state = await integ.begin_authorization(
            request.match_info["uuid"], redirect_uri, actor=None
        )
    except IntegrationsError as exc:
        return error_response(exc)
    response = web.Response(status=302, headers={"Location": url})
    response.set_cookie(
        STATE_COOKIE,
        state,
        max_age=600,
        httponly=True,
        samesite="Lax",
        secure=request.secure,
    )
    return response


async def callback(request: web.Request) -> web.StreamResponse:
    integ = request.app[INTEGRATIONS]
    query = request.query
    state = query.get("state", "")
    cookie = request.cookies.get(STATE_COOKIE, "")
    if not state or not hmac.compare_digest(cookie.encode(), state.encode()):
        return web.json_response(
            {
                "error": "state_mismatch",
                "message": "This authorization was not started in this browser.",
            },
            status=400,
        )
    try:
        connection = await integ.complete_authorization(
            state,
            code=query.get("code"),
            error=query.get("error"),
            error_description=query.get("error_description"),
        )
    except InvalidState as exc:
        return web.json_response(
            {"error": exc.code, "message": "This authorization link is invalid or expired."},
            status=400,
        )
    except AuthorizationDenied as exc:
        response = web.json_response({"connected": False, "reason": exc.message}, status=403)
    except IntegrationsError as exc:
        response = error_response(exc)
    else:
        response = web.json_response(
            {
                "connected": True,
                "uuid": connection.uuid,
                "provider": connection.provider,
                "name": connection.name,
                "account": connection.data.get("account"),
            }
        )
    response.del_cookie(STATE_COOKIE)
    return response


def create_app(make_integrations: Callable[[], Integrations] = Integrations) -> web.Application:
    """The app; ``make_integrations`` builds the (unopened) ``Integrations`` it runs with."""

    async def integrations_context(app: web.Application) -> AsyncIterator[None]:
        async with make_integrations() as integ:
            app[INTEGRATIONS] = integ
            yield

    app = web.Application()
    app.cleanup_ctx.append(integrations_context)
    app.router.add_get("/integrations/{uuid}/connect", begin)
    app.router.add_get("/oauth/callback", callback, name="oauth_callback")
    return app


if __name__ == "__main__":
    web.run_app(create_app(), host="127.0.0.1", port=8080)
