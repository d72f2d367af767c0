"""Shared benchmark plumbing: a scratch database and a median timer."""

from __future__ import annotations

import json
import os
import secrets
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

# Benchmarks run from a checkout too, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ADMIN_DSN = os.environ.get(
    "INTEGRATIONS_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@asynccontextmanager
async def scratch_database() -> AsyncIterator[str]:
    """A throwaway database on the benchmark server, dropped afterwards."""
    name = f"integrations_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(ADMIN_DSN)._replace(path="/" + name))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def median_seconds(
    call: Callable[[], Awaitable[object]], *, rounds: int = 2000, warmup: int = 200
) -> float:
    for _ in range(warmup):
        await call()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


async def interleaved_medians(
    calls: dict[str, Callable[[], Awaitable[object]]], *, rounds: int = 2000, warmup: int = 200
) -> dict[str, float]:
    """Alternate the contenders call by call so drift on the machine hits both alike."""
    for _ in range(warmup):
        for call in calls.values():
            await call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            await call()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def library_pool(dsn: str, **options: object) -> asyncpg.Pool:
    """An asyncpg pool configured as the library configures its own (``Repository.open``):
    the same sizes, no reset query on release, and the same client-side statement deadline
    (``command_timeout``, from the default ``lock_timeout``). Baselines use it, so that a
    ratio compares the library's work with a bare call on the same footing."""
    from integrations._repository import COMMAND_MARGIN, _keep_session

    return asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=10,
        reset=_keep_session,
        command_timeout=30.0 + COMMAND_MARGIN,
        **options,
    )


SERVER_CODE = """
import asyncio, sys
from aiohttp import web
async def hello(request):
    return web.json_response({'ok': request.headers.get('Authorization', '')[:7]})
async def main():
    app = web.Application()
    app.router.add_get('/v1/hello', hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, '127.0.0.1', 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@asynccontextmanager
async def http_server() -> AsyncIterator[str]:
    """A loopback aiohttp server in another process (so that it does not share the
    measuring process's CPU time and event loop); yields its URL."""
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER_CODE, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        port = int((await asyncio.wait_for(proc.stdout.readline(), 30)).decode())
        yield f"http://127.0.0.1:{port}/v1/hello"
    finally:
        proc.kill()
        await proc.wait()


RESULT_PREFIX = "RESULT "


def result(name: str, figures: dict[str, float]) -> None:
    """The machine-readable line that ``benchmarks/report.py`` turns into docs/benchmarks.md."""
    print(RESULT_PREFIX + json.dumps({"name": name, "figures": figures}), flush=True)
