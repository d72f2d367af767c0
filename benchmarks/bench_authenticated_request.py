"""authenticated_request against a bare aiohttp GET to the same loopback server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from _common import interleaved_medians, scratch_database
from aiohttp import web

from integrations import Integrations, Provider, generate_key


async def main() -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"ok": request.headers.get("Authorization", "")[:7]})

    app = web.Application()
    app.router.add_get("/v1/hello", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/v1/hello"
    provider = Provider(key="bench", name="Bench", auth_type="api_key", api_hosts=("127.0.0.1",))
    try:
        async with (
            scratch_database() as dsn,
            aiohttp.ClientSession() as session,
            Integrations(dsn, keys=generate_key(), providers=[provider], http=session) as integ,
        ):
            conn = await integ.add_connection("bench", "default")
            await integ.save_setup(conn.uuid, {"api_key": "sk-bench-0123456789abcdef"})
            headers = {"Authorization": "Bearer sk-bench-0123456789abcdef"}

            async def bare() -> object:
                async with session.get(url, headers=headers) as response:
                    return await response.read()

            async def ours() -> object:
                return await integ.authenticated_request(conn.uuid, "GET", url)

            medians = await interleaved_medians(
                {"bare aiohttp": bare, "authenticated_request": ours}, rounds=1500
            )
    finally:
        await runner.cleanup()
    base = medians["bare aiohttp"]
    print("authenticated_request vs bare aiohttp GET (same session, same loopback server)")
    for name, value in medians.items():
        print(f"  {name:<22} median {value * 1e6:8.1f} µs   ratio {value / base:5.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
