"""What the audit trail costs at each level: the cached ``authenticated_request`` with 50
concurrent callers (throughput) and the cached ``get_credentials`` (50 callers), each level
against ``audit="admin"`` (which records neither) in the same run, slices interleaved."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from _common import http_server, result, scratch_database
from bench_fast_path import API_KEY, CALLERS, PROVIDER, interleaved_throughput

from integrations import Integrations, generate_key

SECONDS = 6.0
LEVELS = ("admin", "reveal", "use")


async def main() -> None:
    logging.getLogger("integrations").setLevel(logging.ERROR)
    key = generate_key()
    async with (
        http_server() as url,
        scratch_database() as dsn,
        aiohttp.ClientSession() as session,
    ):
        async with Integrations(dsn, keys=key, providers=[PROVIDER]) as setup:
            conn = await setup.add_connection("bench", "default")
            await setup.save_setup(conn.uuid, {"api_key": API_KEY})
        instances = {
            level: Integrations(dsn, keys=key, providers=[PROVIDER], http=session, audit=level)
            for level in LEVELS
        }
        for integ in instances.values():
            await integ.open()
        try:
            requests = {
                level: (lambda i=integ: i.authenticated_request(conn.uuid, "GET", url))
                for level, integ in instances.items()
            }
            reads = {
                level: (lambda i=integ: i.get_credentials(conn.uuid))
                for level, integ in instances.items()
            }
            req = await interleaved_throughput(requests, CALLERS, SECONDS)
            cred = await interleaved_throughput(reads, CALLERS, SECONDS)
        finally:
            for integ in instances.values():
                await integ.close()
    figures: dict[str, float] = {}
    print(f"audit overhead, {CALLERS} callers, throughput against audit='admin'")
    for level in LEVELS:
        figures[f"req_{level}_ops"] = req[level]
        figures[f"cred_{level}_ops"] = cred[level]
        figures[f"req_{level}_ratio"] = req["admin"] / req[level]
        figures[f"cred_{level}_ratio"] = cred["admin"] / cred[level]
        print(
            f"  {level:<7} authenticated_request {req[level]:8,.0f} ops/s "
            f"({figures[f'req_{level}_ratio']:.2f}x)   get_credentials {cred[level]:8,.0f} "
            f"ops/s ({figures[f'cred_{level}_ratio']:.2f}x)"
        )
    result("audit", figures)


if __name__ == "__main__":
    asyncio.run(main())
