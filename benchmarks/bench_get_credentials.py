"""get_credentials(uuid) against a bare asyncpg SELECT of the same row on the same pool."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved_medians, scratch_database

from integrations import Integrations, generate_key


async def main() -> None:
    async with scratch_database() as dsn, Integrations(dsn, keys=generate_key()) as integ:
        conn = await integ.add_connection("openai", "default")
        await integ.save_setup(conn.uuid, {"api_key": "sk-bench-0123456789abcdef"})
        pool = integ._repo.pool
        row_id = uuid.UUID(conn.uuid)
        sql = "SELECT value_json FROM integrations.connections WHERE uuid = $1"

        async def bare() -> object:
            return await pool.fetchrow(sql, row_id)

        async def ours() -> object:
            return await integ.get_credentials(conn.uuid)

        medians = await interleaved_medians({"bare asyncpg": bare, "get_credentials": ours})
    base = medians["bare asyncpg"]
    print("get_credentials(uuid) vs bare asyncpg SELECT (same pool, same run)")
    for name, value in medians.items():
        print(f"  {name:<16} median {value * 1e6:8.1f} µs   ratio {value / base:5.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
