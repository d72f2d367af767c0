"""get_credentials(uuid) against a bare asyncpg SELECT of the same row on the same pool, and
the encryption overhead: an encrypted row against an unencrypted one (``encryption="off"``),
in the same run."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved_medians, result, scratch_database

from integrations import Integrations, generate_key

API_KEY = "sk-bench-0123456789abcdef"


async def main() -> None:
    # The plain-text instance's warning is the point of the comparison, not news.
    logging.getLogger("integrations").setLevel(logging.ERROR)
    async with (
        scratch_database() as dsn,
        Integrations(dsn, keys=generate_key(), audit="admin") as integ,
        Integrations(dsn, encryption="off", audit="admin") as plain,
    ):
        conn = await integ.add_connection("openai", "default")
        await integ.save_setup(conn.uuid, {"api_key": API_KEY})
        unencrypted = await plain.add_connection("openai", "plain")
        await plain.save_setup(unencrypted.uuid, {"api_key": API_KEY})
        pool = integ._repo.pool
        row_id = uuid.UUID(conn.uuid)
        sql = "SELECT value_json FROM integrations.connections WHERE uuid = $1"

        async def bare() -> object:
            return await pool.fetchrow(sql, row_id)

        async def ours() -> object:
            return await integ.get_credentials(conn.uuid)

        async def off() -> object:
            return await plain.get_credentials(unencrypted.uuid)

        medians = await interleaved_medians(
            {"bare asyncpg": bare, "get_credentials": ours, "encryption off": off}
        )
    base = medians["bare asyncpg"]
    print("get_credentials(uuid) vs bare asyncpg SELECT (same pool, same run)")
    for name in ("bare asyncpg", "get_credentials"):
        value = medians[name]
        print(f"  {name:<16} median {value * 1e6:8.1f} µs   ratio {value / base:5.2f}x")
    encrypted, unencrypted_time = medians["get_credentials"], medians["encryption off"]
    print('encryption overhead: encrypted row vs encryption="off" on an unencrypted row')
    print(f"  {'encryption on':<16} median {encrypted * 1e6:8.1f} µs")
    print(f"  {'encryption off':<16} median {unencrypted_time * 1e6:8.1f} µs")
    print(
        f"  ratio {encrypted / unencrypted_time:5.2f}x"
        f"   (+{(encrypted - unencrypted_time) * 1e6:.1f} µs per call)"
    )
    result(
        "encryption",
        {"on_us": encrypted * 1e6, "off_us": unencrypted_time * 1e6, "bare_us": base * 1e6},
    )


if __name__ == "__main__":
    asyncio.run(main())
