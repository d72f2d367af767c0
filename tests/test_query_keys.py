"""API keys in the query string (``AuthHeader(kind="query")``) or a custom header name: sent
where the provider says, never shown in logs, errors, redacted URLs or redirects."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from integrations import AuthHeader, Integrations, Provider, RequestFailed, ValidationRequest

from .conftest import TEST_KEY

KEY = "AIza-query-key-S3CR3T+/=&x"


def query_provider(base: str) -> Provider:
    return Provider(
        key="mapsy",
        name="Mapsy",
        auth_type="api_key",
        api_hosts=("127.0.0.1",),
        auth_header=AuthHeader(kind="query", name="key", template="{api_key}"),
        validation=ValidationRequest(url=f"{base}/v1/whoami"),
    )


def header_provider() -> Provider:
    return Provider(
        key="headery",
        name="Headery",
        auth_type="api_key",
        api_hosts=("127.0.0.1",),
        auth_header=AuthHeader(name="X-Api-Key", template="{api_key}"),
    )


@pytest.fixture
async def api() -> AsyncIterator[tuple[list[web.Request], str, str]]:
    seen: list[web.Request] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request)
        if request.path == "/v1/elsewhere":
            raise web.HTTPFound(f"{other_base}/landing")
        if request.path == "/v1/echo-elsewhere":
            raise web.HTTPFound(f"{other_base}/landing?{request.query_string}")
        if request.path == "/v1/broken":
            return web.Response(status=503)
        if request.query.get("key") == KEY or request.headers.get("X-Api-Key") == KEY:
            return web.json_response({"ok": True, "query": dict(request.query)})
        return web.json_response({"error": "bad key"}, status=401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    other = TestServer(app, host="localhost")
    await server.start_server()
    await other.start_server()
    other_base = f"http://localhost:{other.port}"
    try:
        yield seen, f"http://127.0.0.1:{server.port}", other_base
    finally:
        await server.close()
        await other.close()


async def test_a_key_in_the_query_is_sent_and_never_shown(
    fresh_db: str,
    api: tuple[list[web.Request], str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen, base, _other = api
    caplog.set_level(logging.DEBUG)
    provider = query_provider(base)
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[provider]) as integ:
        conn = await integ.add_connection("mapsy", "main")
        await integ.save_setup(conn.uuid, {"api_key": KEY})
        response = await integ.authenticated_request(
            conn.uuid, "GET", f"{base}/v1/things", params={"q": "1", "key": "caller"}
        )
        assert response.status == 200
        # The provider's parameter wins over one the caller put in the URL.
        assert response.json()["query"] == {"q": "1", "key": KEY}
        assert KEY not in response.url and "***" in response.url
        assert (await integ.validate_connection(conn.uuid)).ok

        # A redirect to another host is followed without the key.
        moved = await integ.authenticated_request(conn.uuid, "GET", f"{base}/v1/elsewhere")
        assert moved.status == 401 and KEY not in moved.url

        # A redirect whose URL would carry the key elsewhere is refused.
        with pytest.raises(RequestFailed) as info:
            await integ.authenticated_request(conn.uuid, "GET", f"{base}/v1/echo-elsewhere")
        assert "redirect" in info.value.message
        assert KEY not in str(info.value) and KEY not in repr(info.value)

        failed = await integ.authenticated_request(conn.uuid, "GET", f"{base}/v1/broken")
        assert failed.status == 503 and KEY not in failed.url
        (listed,) = await integ.list_connections("mapsy")
        assert KEY not in str(listed.data)

    sent = [r for r in seen if r.path in ("/v1/things", "/v1/whoami", "/v1/broken")]
    assert sent and all(r.query.get("key") == KEY for r in sent)
    landed = [r for r in seen if r.path == "/landing"]
    assert len(landed) == 1 and "key" not in landed[0].query
    # The loopback server's own access log is not ours.
    ours = [r for r in caplog.records if not r.name.startswith("aiohttp.access")]
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in ours)
    assert KEY not in text
    assert KEY.replace("+", "%2B") not in text


async def test_a_key_in_a_custom_header(
    fresh_db: str, api: tuple[list[web.Request], str, str]
) -> None:
    seen, base, _other = api
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[header_provider()]) as integ:
        conn = await integ.add_connection("headery", "main")
        await integ.save_setup(conn.uuid, {"api_key": KEY})
        response = await integ.authenticated_request(conn.uuid, "GET", f"{base}/v1/things")
        assert response.status == 200
    assert seen[-1].headers["X-Api-Key"] == KEY
    assert "Authorization" not in seen[-1].headers


def test_the_query_kind_describes_itself() -> None:
    provider = query_provider("https://maps.example")
    assert provider.auth_header is not None and provider.auth_header.fields == ("api_key",)
    assert "query parameter `key" in provider.scheme.describe(provider)
