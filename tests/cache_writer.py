"""A writer in another process for the row-cache tests: ``python cache_writer.py DSN KEYS UUID
VALUE...`` saves each value as the connection's ``api_key``, one commit each, then exits."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integrations import Integrations


async def main(dsn: str, keys: str, uuid: str, values: list[str]) -> None:
    async with Integrations(dsn, keys=keys, cache=False) as integ:
        for value in values:
            await integ.save_setup(uuid, {"api_key": value})


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
