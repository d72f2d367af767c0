"""rotate_keys(): rows per second for 5,000 connections, quiet and under concurrent writers,
and the cost of a pass that finds nothing left to do (what a resumed run pays first).

The writers share the rotation's process and event loop, the harder case: the
re-encryption is CPU work that holds the loop for the length of a batch."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import result, scratch_database

from integrations import Integrations, generate_key
from integrations._names import storage_key, uuid7
from integrations._vault import Keyring, Vault

ROWS = 5_000
WRITERS = 4
# ``python benchmarks/bench_rotation.py 100`` tries another batch size.
BATCH_SIZE = int(sys.argv[1]) if len(sys.argv) > 1 else 500


@dataclass
class Run:
    rotated: int
    seconds: float
    writes_before: float  # writes per second before the rotation started
    writes_during: float  # writes per second while it ran
    noop_seconds: float


async def insert_rows(integ: Integrations, key: str) -> list[str]:
    """Rows as save_setup stores them under ``key`` (two secrets each), in one COPY."""
    vault = Vault(Keyring.parse(key))
    records, uuids = [], []
    for i in range(ROWS):
        row_uuid = uuid7()
        data = {
            "provider": "aws",
            "name": f"r{i}",
            "auth_type": "key_secret",
            "status": "connected",
            "access_key": f"AKIA{i:08d}",
            "region": "us-east-1",
        }
        secrets = {"secret_key": f"secret-{i:06d}-initial", "session_token": f"token-{i:06d}"}
        data.update(vault.seal(row_uuid, secrets, ["session_token"]))
        records.append((uuid.UUID(row_uuid), "", storage_key("aws", f"r{i}"), json.dumps(data)))
        uuids.append(row_uuid)
    async with integ._repo.connection() as conn:
        await conn.copy_records_to_table(
            "connections",
            schema_name="integrations",
            columns=["uuid", "owner", "key", "value_json"],
            records=records,
        )
        await conn.execute("ANALYZE integrations.connections")
    return uuids


async def run(writers: int) -> Run:
    old, new = generate_key(), generate_key()
    async with scratch_database() as dsn:
        async with Integrations(dsn, keys=old) as integ:
            uuids = await insert_rows(integ, old)
        async with Integrations(dsn, keys=[new, old], pool_max_size=writers + 2) as integ:
            stop = asyncio.Event()
            writes = 0

            async def writer(k: int) -> None:
                nonlocal writes
                rng = random.Random(k)
                seq = 0
                while not stop.is_set():
                    seq += 1
                    attrs = {f"note_{k}": seq, "secret_key": f"secret-w{k}-{seq:08d}"}
                    await integ.save_setup(rng.choice(uuids), attrs)
                    writes += 1

            tasks = [asyncio.create_task(writer(k)) for k in range(writers)]
            await asyncio.sleep(1.0 if writers else 0)
            writes_before = writes / 1.0 if writers else 0.0
            start_writes, start = writes, time.perf_counter()
            result = await integ.rotate_keys(batch_size=BATCH_SIZE)
            seconds = time.perf_counter() - start
            writes_during = (writes - start_writes) / seconds
            stop.set()
            await asyncio.gather(*tasks)
            start = time.perf_counter()
            await integ.rotate_keys(batch_size=BATCH_SIZE)
            noop_seconds = time.perf_counter() - start
        async with Integrations(dsn, keys=new) as check:
            for row_uuid in random.Random(1).sample(uuids, 100):
                await check.get_credentials(row_uuid)
    return Run(result.rotated, seconds, writes_before, writes_during, noop_seconds)


async def main() -> None:
    print(f"rotate_keys(): {ROWS} rows, batch_size={BATCH_SIZE}")
    figures: dict[str, float] = {}
    for writers in (0, WRITERS):
        r = await run(writers)
        label = f"{writers} concurrent writers" if writers else "no concurrent writes"
        print(f"  {label}")
        rate = r.rotated / r.seconds
        print(f"    rotated {r.rotated} rows in {r.seconds:.2f} s = {rate:,.0f} rows/s")
        if writers:
            print(
                f"    save_setup throughput {r.writes_before:,.0f}/s before, "
                f"{r.writes_during:,.0f}/s during the rotation"
            )
        print(f"    a second pass with nothing left to do: {r.noop_seconds * 1e3:.0f} ms")
        tag = "busy" if writers else "quiet"
        figures[f"{tag}_rows_per_s"] = rate
        figures[f"{tag}_noop_ms"] = r.noop_seconds * 1e3
        if writers:
            figures["writes_before"] = r.writes_before
            figures["writes_during"] = r.writes_during
    figures["rows"] = float(ROWS)
    figures["writers"] = float(WRITERS)
    result("rotation", figures)


if __name__ == "__main__":
    asyncio.run(main())
