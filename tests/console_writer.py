"""Changes a connection from its own OS process, as another worker would.

python tests/console_writer.py DSN UUID MESSAGE                          records a failed check
python tests/console_writer.py DSN UUID --setup API_URL KEY=VALUE...     saves setup fields of
    an Acme connection (tests/webkit.py's provider, checked against the API at API_URL)
(INTEGRATIONS_KEYS in the environment)
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integrations import Integrations
from tests.webkit import acme_provider


async def main(dsn: str, uuid: str, *rest: str) -> None:
    if rest[0] == "--setup":
        attrs = dict(pair.split("=", 1) for pair in rest[2:])
        async with Integrations(dsn, providers=[acme_provider(rest[1])]) as integ:
            await integ.save_setup(uuid, attrs)
    else:
        async with Integrations(dsn) as integ:
            await integ.record_validation(uuid, (False, rest[0]))
    print("written", flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
