"""A writer process for the frozen-writer fault test: one write transaction per uuid, each
holding its row lock, left open; prints ``holding`` once every lock is held, then waits
(the test stops it with SIGSTOP, as a frozen process)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid as uuid_mod
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integrations import Integrations


async def main(args: argparse.Namespace) -> None:
    async with Integrations(
        args.dsn, keys=args.key, lock_timeout=args.lock_timeout, pool_max_size=len(args.uuid) + 2
    ) as integ:
        repo = integ._s.core.repo
        held = asyncio.Event()
        count = {"n": 0}

        async def hold(uuid: str) -> None:
            async with repo._write() as conn:
                await conn.execute(
                    "SELECT 1 FROM integrations.connections WHERE uuid = $1 FOR UPDATE",
                    uuid_mod.UUID(uuid),
                )
                count["n"] += 1
                if count["n"] == len(args.uuid):
                    held.set()
                await asyncio.sleep(3600)

        tasks = [asyncio.create_task(hold(u)) for u in args.uuid]
        await held.wait()
        print("holding", flush=True)
        await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--uuid", action="append", required=True)
    parser.add_argument("--lock-timeout", type=float, default=30.0)
    asyncio.run(main(parser.parse_args()))
