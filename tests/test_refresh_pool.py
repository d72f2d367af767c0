"""A token request holds no pooled connection: other calls go on while a slow refresh waits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from .oauth_server import OAuthTestServer
from .oauthkit import connect, eventually, open_integrations

TOKEN_DELAY = 3.0
OTHER_CALLS = 200


@pytest.fixture
async def server() -> AsyncIterator[OAuthTestServer]:
    async with OAuthTestServer() as srv:
        yield srv


async def test_two_hundred_calls_finish_while_a_slow_refresh_waits_on_a_pool_of_two(
    fresh_db: str, server: OAuthTestServer
) -> None:
    async with open_integrations(fresh_db, server.base_url, pool_max_size=2) as integ:
        uuid = await connect(integ)
        other = await connect(integ, "other")
        # The event listener holds one of the two connections for as long as it listens.
        async with integ.subscribe(uuid=other):
            server.config.token_delay = TOKEN_DELAY
            started = time.monotonic()
            refresh = asyncio.create_task(integ.refresh_access_token(uuid))
            await eventually(lambda: server.stats.token_calls["refresh_token"] >= 1)
            done_before_refresh: list[float] = []

            async def one(i: int) -> None:
                if i % 2:
                    await integ.get_credentials(other)
                else:
                    await integ.list_connections("loopback")
                if not refresh.done():
                    done_before_refresh.append(time.monotonic() - started)

            await asyncio.wait_for(
                asyncio.gather(*(one(i) for i in range(OTHER_CALLS))), TOKEN_DELAY * 4
            )
            await refresh
            elapsed = time.monotonic() - started
    print(f"\ncompleted while the refresh was pending: {len(done_before_refresh)}/{OTHER_CALLS}")
    assert elapsed >= TOKEN_DELAY
    # Every call finished while the refresh was still waiting on its token request.
    assert len(done_before_refresh) == OTHER_CALLS
