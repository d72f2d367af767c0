"""A worker process for the auth-mode storms: its own Integrations on the shared DSN.

Arguments: DSN, key, provider JSON, uuid, URL, callers. Prints ``ready`` once open, waits
for a line on stdin, makes the concurrent calls and prints their outcomes as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from integrations import Integrations, IntegrationsError, Provider


async def main(dsn: str, key: str, provider_json: str, uuid: str, url: str, callers: int) -> None:
    provider = Provider.model_validate_json(provider_json)
    async with Integrations(dsn, keys=key, providers=[provider], token_backoff=0.01) as integ:
        await integ.get_integration_by_uuid(uuid)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)

        async def one() -> dict[str, Any]:
            try:
                response = await integ.authenticated_request(uuid, "GET", url)
                body = response.json() if response.ok else {}
                return {"status": response.status, "token_id": body.get("token_id")}
            except IntegrationsError as exc:
                return {"status": None, "error": exc.code}

        print(json.dumps(await asyncio.gather(*(one() for _ in range(callers)))), flush=True)


if __name__ == "__main__":
    dsn, key, provider_json, uuid, url, callers = sys.argv[1:7]
    asyncio.run(main(dsn, key, provider_json, uuid, url, int(callers)))
