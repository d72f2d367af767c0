"""The begin/complete route examples (FastAPI and aiohttp.web) driven through the whole flow."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from urllib.parse import urlsplit
from uuid import uuid4

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from examples import oauth_aiohttp, oauth_fastapi
from integrations import Integrations

from .conftest import TEST_KEY
from .oauth_server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, OAuthTestServer
from .oauthkit import loopback_provider

Get = Callable[..., Awaitable[tuple[int, str, str]]]


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
            assert again.json()["error"] == "invalid_state"
            assert "invalid or expired" in again.json()["message"]
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
            assert refused.json() == {
                "error": "state_mismatch",
                "message": "This authorization was not started in this browser.",
            }
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


# -- bad input: a 4xx with a message, never a 500 -------------------------------------------


@asynccontextmanager
async def example_client(
    kind: str, dsn: str, server: OAuthTestServer
) -> AsyncIterator[tuple[Integrations, Get]]:
    """The running example app, its Integrations and a GET giving (status, Location, body)."""
    if kind == "fastapi":
        app = oauth_fastapi.create_app(_factory(dsn, server))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:

                async def get_fastapi(url: str, cookie: str = "") -> tuple[int, str, str]:
                    headers = (
                        {"Cookie": f"{oauth_fastapi.STATE_COOKIE}={cookie}"} if cookie else None
                    )
                    resp = await c.get(url, headers=headers)
                    return resp.status_code, resp.headers.get("location", ""), resp.text

                yield app.state.integrations, get_fastapi
        return
    aio_app = oauth_aiohttp.create_app(_factory(dsn, server))
    async with TestClient(TestServer(aio_app, host="127.0.0.1")) as client:

        async def get_aiohttp(url: str, cookie: str = "") -> tuple[int, str, str]:
            target = url if url.startswith("http") else str(client.make_url(url))
            headers = {"Cookie": f"{oauth_aiohttp.STATE_COOKIE}={cookie}"} if cookie else None
            async with client.session.get(target, allow_redirects=False, headers=headers) as resp:
                return resp.status, resp.headers.get("Location", ""), await resp.text()

        yield aio_app[oauth_aiohttp.INTEGRATIONS], get_aiohttp


EXAMPLES = ["fastapi", "aiohttp"]


def _error(body: str) -> tuple[str, str]:
    payload = json.loads(body)
    assert set(payload) == {"error", "message"}
    return payload["error"], payload["message"]


@pytest.mark.parametrize("kind", EXAMPLES)
async def test_connect_with_a_malformed_uuid_is_400(
    kind: str, fresh_db: str, server: OAuthTestServer
) -> None:
    async with example_client(kind, fresh_db, server) as (_integ, get):
        status, _, body = await get("/integrations/bogus/connect")
    assert status == 400
    code, message = _error(body)
    assert code == "invalid_uuid"
    assert "'bogus'" in message


@pytest.mark.parametrize("kind", EXAMPLES)
async def test_connect_of_an_unknown_or_unset_connection_is_404(
    kind: str, fresh_db: str, server: OAuthTestServer
) -> None:
    async with example_client(kind, fresh_db, server) as (integ, get):
        unset = await integ.add_connection("loopback", "unset")
        for uuid in (str(uuid4()), unset.uuid):
            status, _, body = await get(f"/integrations/{uuid}/connect")
            assert status == 404
            assert _error(body)[0] == "not_configured"


@pytest.mark.parametrize("kind", EXAMPLES)
async def test_connect_of_a_non_oauth_connection_is_400(
    kind: str, fresh_db: str, server: OAuthTestServer
) -> None:
    async with example_client(kind, fresh_db, server) as (integ, get):
        conn = await integ.add_connection("openai", "default")
        status, _, body = await get(f"/integrations/{conn.uuid}/connect")
    assert status == 400
    assert _error(body)[0] == "invalid_provider_key"


@pytest.mark.parametrize("kind", EXAMPLES)
@pytest.mark.parametrize(
    ("query", "cookie", "code"),
    [
        # Not started in this browser (no state cookie, or one that differs).
        ("", "", "state_mismatch"),
        ("?state=", "", "state_mismatch"),
        ("?state=forged&code=x", "", "state_mismatch"),
        ("?error=access_denied", "", "state_mismatch"),
        ("?state=%00", "", "state_mismatch"),
        ("?state=forged&code=x", "other", "state_mismatch"),
        # The browser's cookie matches, but the library knows no such pending authorization.
        ("?state=forged&code=x", "forged", "invalid_state"),
        ("?state=forged&error=access_denied", "forged", "invalid_state"),
    ],
)
async def test_callback_without_a_valid_state_is_400(
    kind: str, query: str, cookie: str, code: str, fresh_db: str, server: OAuthTestServer
) -> None:
    async with example_client(kind, fresh_db, server) as (_integ, get):
        status, _, body = await get(f"/oauth/callback{query}", cookie)
    assert status == 400
    assert _error(body)[0] == code


@pytest.mark.parametrize("kind", EXAMPLES)
async def test_callback_when_the_token_endpoint_fails_is_502(
    kind: str, fresh_db: str, server: OAuthTestServer
) -> None:
    async with example_client(kind, fresh_db, server) as (integ, get):
        uuid = await _new_connection(integ)
        status, authorize, _ = await get(f"/integrations/{uuid}/connect")
        assert status == 302
        back = await _consent(authorize)
        server.config.fail_next = 10
        status, _, body = await get(back)
        assert status == 502
        assert _error(body)[0] == "token_request_failed"
        assert not await integ.is_connected(uuid)


@pytest.mark.parametrize("kind", EXAMPLES)
async def test_callback_with_a_rejected_client_is_400(
    kind: str, fresh_db: str, server: OAuthTestServer
) -> None:
    async with example_client(kind, fresh_db, server) as (integ, get):
        uuid = await _new_connection(integ)
        status, authorize, _ = await get(f"/integrations/{uuid}/connect")
        back = await _consent(authorize)
        server.config.force_invalid_client = True
        status, _, body = await get(back)
        assert status == 400
        code, message = _error(body)
        assert code == "reauth_required" and message
