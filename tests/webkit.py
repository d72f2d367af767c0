"""Shared pieces of the console tests: a fake provider API, providers, an in-loop uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from aiohttp import web
from aiohttp.test_utils import TestServer
from starlette.types import ASGIApp

from integrations import Integrations, Provider, SetupField, ValidationRequest

GOOD_KEY = "good-key-0123456789"


@asynccontextmanager
async def fake_api() -> AsyncIterator[str]:
    """A provider API on loopback whose ``/check`` accepts only ``Bearer GOOD_KEY``."""

    async def check(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") == f"Bearer {GOOD_KEY}":
            return web.json_response({"ok": True})
        return web.json_response({"error": "bad key"}, status=401)

    app = web.Application()
    app.router.add_get("/check", check)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


def acme_provider(base_url: str) -> Provider:
    """An application API-key provider checked against the fake API."""
    return Provider(
        key="acme",
        name="Acme",
        auth_type="api_key",
        api_hosts=("127.0.0.1",),
        validation=ValidationRequest(url=f"{base_url}/check"),
        setup_fields=(
            SetupField(key="api_key", label="API key", required=True, secret=True),
            SetupField(key="region", label="Region", help="Where the account lives, e.g. eu-1."),
        ),
    )


@asynccontextmanager
async def open_integrations(
    dsn: str, *providers: Provider, **options: Any
) -> AsyncIterator[Integrations]:
    from .conftest import TEST_KEY

    options.setdefault("keys", TEST_KEY)
    async with Integrations(dsn, providers=list(providers), **options) as integ:
        yield integ


def client(app: ASGIApp, base_url: str = "http://console.test") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=base_url, follow_redirects=False
    )


_CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = _CSRF_RE.search(html)
    assert found is not None, "page has no CSRF field"
    return found.group(1)


@asynccontextmanager
async def running(app: ASGIApp) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in this event loop; its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    # Signals belong to pytest, not to a server running inside a test.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()
