"""The event examples run as documented: an SSE endpoint over real HTTP, a failure worker."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn

from integrations import Event, Integrations, ReauthRequired

from .conftest import TEST_KEY

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 10.0


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sse = load_example("sse_fastapi")
worker = load_example("worker_refresh_failed")


@pytest.fixture
async def server_url(fresh_db: str) -> AsyncIterator[str]:
    """The SSE example served by uvicorn on a loopback port, its own Integrations inside."""
    app = sse.create_app(fresh_db, keys=TEST_KEY)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", http="h11", ws="none")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(TIMEOUT):
            while not server.started:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(TIMEOUT):
            await task
        sock.close()


async def read_sse(lines: AsyncIterator[str]) -> tuple[str, dict[str, object]]:
    """The next ``event:``/``data:`` message, skipping comments and blank lines."""
    kind = None
    async for line in lines:
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: ") and kind is not None:
            return kind, json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended")


async def test_sse_endpoint_streams_status_changes(server_url: str, integ: Integrations) -> None:
    async with (
        httpx.AsyncClient(base_url=server_url, timeout=TIMEOUT) as client,
        client.stream("GET", "/events") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        async with asyncio.timeout(TIMEOUT):
            assert await anext(lines) == f"retry: {sse.RETRY_MILLISECONDS}"
            conn = await integ.add_connection("openai", "default", actor="admin")
            # A rename leaves the status alone, so the stream skips it.
            await integ.rename_connection(conn.uuid, "work")
            await integ.save_setup(conn.uuid, {"api_key": "sk-sse-plaintext-0123456789"})
            added = await read_sse(lines)
            saved = await read_sse(lines)
    assert added[0] == "connection_added"
    assert added[1]["uuid"] == conn.uuid
    assert added[1]["actor"] == "admin"
    assert saved[0] == "setup_saved"
    assert saved[1]["name"] == "work"
    assert (saved[1]["previous_status"], saved[1]["status"]) == ("disconnected", "connected")
    assert "sk-sse-plaintext" not in json.dumps(saved[1])


async def test_sse_stream_ends_when_the_integrations_close(integ: Integrations) -> None:
    chunks: list[str] = []
    async with integ.subscribe() as subscription:
        stream = sse.status_stream(subscription)
        chunks.append(await anext(stream))
        await integ.add_connection("openai", "default")
        chunks.append(await asyncio.wait_for(anext(stream), TIMEOUT))
        await integ.close()
        chunks.extend([chunk async for chunk in stream])
    assert chunks[0] == f"retry: {sse.RETRY_MILLISECONDS}\n\n"
    assert chunks[1].startswith("event: connection_added\ndata: {")
    assert len(chunks) == 2


def test_sse_filter_keeps_status_changes_removals_and_resync() -> None:
    def ev(kind: str, status: str | None, previous: str | None) -> Event:
        return Event(kind=kind, uuid=None, status=status, previous_status=previous)

    assert sse.is_status_change(ev("validated", "error", "connected"))
    assert sse.is_status_change(ev("connection_added", "disconnected", None))
    assert sse.is_status_change(ev("connection_removed", "connected", "connected"))
    assert sse.is_status_change(ev("resync", None, None))
    assert not sse.is_status_change(ev("connection_renamed", "connected", "connected"))
    assert not sse.is_status_change(ev("validated", "error", "error"))


async def test_worker_reacts_once_per_refresh_failure(
    fresh_db: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    from .oauth_server import OAuthTestServer
    from .oauthkit import open_integrations

    caplog.set_level(logging.INFO, logger="refresh_worker")
    async with (
        OAuthTestServer() as server,
        open_integrations(fresh_db, server.base_url) as integ,
    ):
        await _watch_real_refresh_failures(integ, server, db, caplog)


async def _watch_real_refresh_failures(
    integ: Integrations, server: Any, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    from .oauth_server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET
    from .oauthkit import REDIRECT_URI, approve

    conn = await integ.add_connection("loopback", "default", owner="dana")
    setup = {"client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET}
    await integ.save_setup(conn.uuid, setup)
    url, _ = await integ.begin_authorization(conn.uuid, REDIRECT_URI)
    query = await approve(url)
    await integ.complete_authorization(query["state"], code=query["code"])
    failures: list[Event] = []
    resyncs: list[bool] = []
    second_failure = asyncio.Event()

    async def on_failure(event: Event) -> None:
        failures.append(event)
        if len(failures) == 1:
            raise RuntimeError("the pager is down")
        second_failure.set()

    async def on_resync() -> None:
        resyncs.append(True)

    ready = asyncio.Event()
    task = asyncio.create_task(
        worker.watch_refresh_failures(integ, on_failure, on_resync=on_resync, ready=ready)
    )
    async with asyncio.timeout(TIMEOUT):
        await ready.wait()

        async def refresh(fail: bool) -> None:
            server.config.force_invalid_client = fail
            try:
                await integ.refresh_access_token(conn.uuid)
            except ReauthRequired:
                assert fail

        for _ in range(3):
            await refresh(fail=True)
        await refresh(fail=False)
        [listener] = await db.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND query LIKE 'LISTEN %'"
        )
        await db.execute("SELECT pg_terminate_backend($1)", listener["pid"])
        while not resyncs:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await refresh(fail=True)
        await second_failure.wait()
        await integ.close()
        await task

    assert [(e.uuid, e.owner, e.detail["reauth_required"]) for e in failures] == [
        (conn.uuid, "dana", True),
        (conn.uuid, "dana", True),
    ]
    assert resyncs == [True]
    messages = [r.getMessage() for r in caplog.records if r.name == "refresh_worker"]
    assert sum("token refresh failed for loopback:default" in m for m in messages) == 2
    assert any("recovered" in m for m in messages)
    assert any("handler raised" in m for m in messages)
