"""A short printed tour on the embedded default: add, save a key, list, rename, fetch, remove.

Run it with no setup at all: without INTEGRATIONS_DSN the library starts its own PostgreSQL
in the user data dir and creates an encryption key file beside it.
"""

from __future__ import annotations

import asyncio

from integrations import Integrations, NotFound


async def main() -> None:
    async with Integrations() as integ:
        print("providers:", ", ".join(p.key for p in integ.list_providers()))

        # Start from a clean slate so the tour can be run again.
        for connection in await integ.list_connections("openai"):
            await integ.remove_connection(connection.uuid)

        conn = await integ.add_connection("openai", "default", actor="quickstart")
        print(f"added     {conn.provider}:{conn.name} uuid={conn.uuid}")

        await integ.save_setup(conn.uuid, {"api_key": "sk-demo-1234567890abcdef"})
        print("saved     api_key (encrypted at rest)")

        for listed in await integ.list_connections("openai"):
            print(
                f"listed    {listed.name:<10} status={listed.status} key={listed.data['api_key']}"
            )

        await integ.rename_connection(conn.uuid, "work")
        renamed = await integ.get_integration_by_uuid(conn.uuid)
        print(f"renamed   -> {renamed.name} (same uuid: {renamed.uuid == conn.uuid})")

        creds = await integ.get_credentials("openai:work")
        print(f"fetched   credentials by ref, api_key ends with {creds['api_key'][-4:]}")

        await integ.remove_connection(conn.uuid)
        try:
            await integ.get_credentials(conn.uuid)
        except NotFound as exc:
            print(f"removed   -> get_credentials now raises {exc.code!r}")


if __name__ == "__main__":
    asyncio.run(main())
