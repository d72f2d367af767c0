"""Records a credential check outcome from its own OS process, as another worker would.

python tests/console_writer.py DSN UUID MESSAGE   (INTEGRATIONS_KEYS in the environment)
"""

from __future__ import annotations

import asyncio
import sys

from integrations import Integrations


async def main(dsn: str, uuid: str, message: str) -> None:
    async with Integrations(dsn) as integ:
        await integ.record_validation(uuid, (False, message))
    print("written", flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
