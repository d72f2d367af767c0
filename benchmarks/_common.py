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


RESULT_PREFIX = "RESULT "


def result(name: str, figures: dict[str, float]) -> None:
    """The machine-readable line that ``benchmarks/report.py`` turns into docs/benchmarks.md."""
    print(RESULT_PREFIX + json.dumps({"name": name, "figures": figures}), flush=True)
