"""Shared pieces of the OAuth tests: the loopback provider, the consent step, connecting."""

from __future__ import annotations

import asyncio
import uuid as uuid_mod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import asyncpg

from integrations import Integrations, Provider

from .conftest import settle
from .oauth_server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET

REDIRECT_URI = "http://127.0.0.1:9/callback"


def loopback_provider(base_url: str, **overrides: Any) -> Provider:
    """A provider for the loopback authorization server at ``base_url``."""
    fields: dict[str, Any] = {
        "key": "loopback",
        "name": "Loopback",
        "auth_type": "oauth2",
        "authorize_url": f"{base_url}/authorize",
        "token_url": f"{base_url}/token",
        "userinfo_url": f"{base_url}/userinfo",
        "revoke_url": f"{base_url}/revoke",
        "scopes": ("read",),
        "api_hosts": ("127.0.0.1",),
    }
    fields.update(overrides)
    return Provider(**fields)


def client_credentials_provider(base_url: str, **overrides: Any) -> Provider:
    fields: dict[str, Any] = {
        "key": "machine",
        "name": "Machine",
        "auth_type": "oauth2_client_credentials",
        "token_url": f"{base_url}/token",
        "scopes": ("read",),
        "api_hosts": ("127.0.0.1",),
    }
    fields.update(overrides)
    return Provider(**fields)


@asynccontextmanager
async def open_integrations(dsn: str, base_url: str, **options: Any) -> AsyncIterator[Integrations]:
    providers = options.pop("providers", None) or [
        loopback_provider(base_url),
        client_credentials_provider(base_url),
    ]
    from .conftest import TEST_KEY

    options.setdefault("token_backoff", 0.01)
    options.setdefault("keys", TEST_KEY)
    async with Integrations(dsn, providers=providers, **options) as integ:
        yield integ


async def approve(url: str) -> dict[str, str]:
    """Open an authorization URL like a browser whose user consents; the callback's query."""
    async with aiohttp.ClientSession() as http, http.get(url, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        location = resp.headers["Location"]
    assert location.startswith(REDIRECT_URI) or "/callback" in location
    return dict(parse_qsl(urlsplit(location).query))


async def new_connection(integ: Integrations, name: str = "default", **setup: Any) -> str:
    conn = await integ.add_connection("loopback", name)
    await integ.save_setup(
        conn.uuid,
        {"client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET, **setup},
    )
    return conn.uuid


async def machine_connection(integ: Integrations, name: str = "default") -> str:
    """A client-credentials connection (``client_credentials_provider``) with its client
    saved."""
    conn = await integ.add_connection("machine", name)
    await integ.save_setup(
        conn.uuid, {"client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET}
    )
    return conn.uuid


async def connect(integ: Integrations, name: str = "default") -> str:
    """A connected loopback connection, through begin/complete."""
    uuid = await new_connection(integ, name)
    url, state = await integ.begin_authorization(uuid, REDIRECT_URI)
    query = await approve(url)
    await integ.complete_authorization(query["state"], code=query["code"])
    assert query["state"] == state
    return uuid


async def eventually(check: Callable[[], Any], within: float = 10.0) -> None:
    """Wait until ``check()`` is truthy (awaiting it when it returns an awaitable)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def set_stored_expiry(db: asyncpg.Connection, uuid: str, seconds: float) -> None:
    """Make the stored access token look like one obtained an hour ago that expires
    ``seconds`` from now (negative: already expired); the server's view does not change."""
    now = datetime.now(UTC)
    await db.execute(
        "UPDATE integrations.connections "
        "SET value_json = value_json || jsonb_build_object("
        "'expires_at', $2::text, 'token_obtained_at', $3::text) "
        "WHERE uuid = $1",
        uuid_mod.UUID(uuid),
        (now + timedelta(seconds=seconds)).isoformat(),
        (now - timedelta(hours=1)).isoformat(),
    )
    await settle()  # the row-change notice reaches the instances' row caches
