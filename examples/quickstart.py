"""A short printed tour on the embedded default: add, save a key, list, rename, fetch, remove.

Run it with no setup at all: without INTEGRATIONS_DSN the library starts its own PostgreSQL
in the user data dir and creates an encryption key file beside it. With INTEGRATIONS_DSN
set, set INTEGRATIONS_KEYS too (a key from ``integrations keys generate``): secrets are
stored encrypted. The tour only touches its own connection, ``openai:quickstart``.
"""

from __future__ import annotations

import asyncio
import os
import sys

from integrations import Integrations, NotFound

NAME, RENAMED = "quickstart", "quickstart-renamed"


async def main() -> None:
    async with Integrations() as integ:
        print("providers:", ", ".join(p.key for p in integ.list_providers()))

        # Start from a clean slate (the tour's own connection only), so it can run again.
        for connection in await integ.list_connections("openai"):
            if connection.name in (NAME, RENAMED):
                await integ.remove_connection(connection.uuid)

        conn = await integ.add_connection("openai", NAME, actor="quickstart")
        print(f"added     {conn.provider}:{conn.name} uuid={conn.uuid}")
        try:
            await integ.save_setup(conn.uuid, {"api_key": "sk-demo-1234567890abcdef"})
            print("saved     api_key (encrypted at rest)")

            for listed in await integ.list_connections("openai"):
                if listed.uuid == conn.uuid:
                    shown = listed.data["api_key"]
                    print(f"listed    {listed.name} status={listed.status} key={shown}")

            await integ.rename_connection(conn.uuid, RENAMED)
            renamed = await integ.get_integration_by_uuid(conn.uuid)
            print(f"renamed   -> {renamed.name} (same uuid: {renamed.uuid == conn.uuid})")

            creds = await integ.get_credentials(f"openai:{RENAMED}")
            print(f"fetched   credentials by ref, api_key ends with {creds['api_key'][-4:]}")
        finally:
            await integ.remove_connection(conn.uuid)
        try:
            await integ.get_credentials(conn.uuid)
        except NotFound as exc:
            print(f"removed   -> get_credentials now raises {exc.code!r}")


if __name__ == "__main__":
    if os.environ.get("INTEGRATIONS_DSN") and not os.environ.get("INTEGRATIONS_KEYS"):
        sys.exit(
            "INTEGRATIONS_DSN is set but INTEGRATIONS_KEYS is not: secrets could not be "
            "stored. Generate a key with `integrations keys generate` and set "
            "INTEGRATIONS_KEYS to it (or unset INTEGRATIONS_DSN to use the embedded default)."
        )
    asyncio.run(main())
