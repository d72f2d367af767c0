"""The begin/complete route examples (FastAPI and aiohttp.web) driven through the whole flow."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from urllib.parse import urlsplit

import aiohttp
import httpx
import pytest
from aiohttp import web

from examples import oauth_aiohttp, oauth_fastapi
from integrations import Integrations

from .conftest import TEST_KEY
from .oauth_server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, OAuthTestServer
from .oauthkit import loopback_provider


@pytest.fixture
async def server() -> AsyncIterator[OAuthTestServer]:
    async with OAuthTestServer() as srv:
        yield srv


def _factory(dsn: str, server: OAuthTestServer) -> partial[Integrations]:
    return partial(Integrations, dsn, keys=TEST_KEY, providers=[loopback_provider(server.base_url)])


async def _new_connection(integ: Integrations) -> str:
    conn = await integ.add_connection("loopback", "default")
    await integ.save_setup(
        conn.uuid, {"client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET}
    )
    return conn.uuid


async def _consent(url: str) -> str:
    """The authorization server's redirect back to the app, as a browser would follow it."""
    async with aiohttp.ClientSession() as http, http.get(url, allow_redirects=False) as resp:
        assert resp.status == 302
        return resp.headers["Location"]


async def test_fastapi_routes_connect_a_connection(fresh_db: str, server: OAuthTestServer) -> None:
    app = oauth_fastapi.create_app(_factory(fresh_db, server))
    async with app.router.lifespan_context(app):
        integ: Integrations = app.state.integrations
        uuid = await _new_connection(integ)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            begin = await client.get(f"/integrations/{uuid}/connect")
            assert begin.status_code == 302
            authorize = begin.headers["location"]
            assert authorize.startswith(server.authorize_url)
            back = await _consent(authorize)
            assert back.startswith("http://testserver/oauth/callback?")
            done = await client.get(back)
            assert done.status_code == 200, done.text
            body = done.json()
            assert body["connected"] is True
            assert body["uuid"] == uuid
            assert body["account"]["email"] == "user@example.test"
            # The same callback again: the state was consumed.
            client.cookies.set(oauth_fastapi.STATE_COOKIE, dict(_query(back))["state"])
            again = await client.get(back)
            assert again.status_code == 400
        assert await integ.is_connected(uuid)


async def test_fastapi_callback_refuses_a_state_from_another_browser(
    fresh_db: str, server: OAuthTestServer
) -> None:
    app = oauth_fastapi.create_app(_factory(fresh_db, server))
    async with app.router.lifespan_context(app):
        integ: Integrations = app.state.integrations
        uuid = await _new_connection(integ)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as mine:
            begin = await mine.get(f"/integrations/{uuid}/connect")
            back = await _consent(begin.headers["location"])
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as other:
            refused = await other.get(back)
            assert refused.status_code == 400
        assert not await integ.is_connected(uuid)


async def test_fastapi_callback_reports_a_denial(fresh_db: str, server: OAuthTestServer) -> None:
    server.config.deny = True
    app = oauth_fastapi.create_app(_factory(fresh_db, server))
    async with app.router.lifespan_context(app):
        uuid = await _new_connection(app.state.integrations)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            begin = await client.get(f"/integrations/{uuid}/connect")
            done = await client.get(await _consent(begin.headers["location"]))
            assert done.status_code == 403
            assert done.json()["connected"] is False


async def test_aiohttp_routes_connect_a_connection(fresh_db: str, server: OAuthTestServer) -> None:
    app = oauth_aiohttp.create_app(_factory(fresh_db, server))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        origin = f"http://127.0.0.1:{runner.addresses[0][1]}"
        integ = app[oauth_aiohttp.INTEGRATIONS]
        uuid = await _new_connection(integ)
        # A browser: follows every redirect and keeps the app's cookie (an IP host needs unsafe).
        jar = aiohttp.CookieJar(unsafe=True)
        async with (
            aiohttp.ClientSession(cookie_jar=jar) as browser,
            browser.get(f"{origin}/integrations/{uuid}/connect") as resp,
        ):
            assert resp.status == 200, await resp.text()
            body = await resp.json()
            assert str(resp.url).startswith(f"{origin}/oauth/callback?")
        assert body["connected"] is True
        assert body["uuid"] == uuid
        assert await integ.is_connected(uuid)
        async with (
            aiohttp.ClientSession() as stranger,
            stranger.get(f"{origin}/integrations/{uuid}/connect") as resp,
        ):
            # Without the cookie of the browser that began it, the callback is refused.
            assert resp.status == 400
    finally:
        await runner.cleanup()


def _query(url: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl(urlsplit(url).query)
