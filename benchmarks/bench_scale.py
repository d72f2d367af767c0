"""The library at a million connections against the same figures at a thousand: seeding,
open(), the first call, cached and uncached reads, each listing, the console's list page,
key rotation with writers going on, a rotation pass with nothing left, and memory.

Each size is a schema of its own in one scratch database, seeded with COPY (then the
health sweep's upkeep: count deltas folded, their table vacuumed): rows spread
over one owner per hundred rows (10,000 owners at 1M), 50 providers, every row holding a
sealed secret under an old key, one row in a hundred in error, plus one owner whose rows
are mostly unsaved (a tenth of the table unsaved, and SAVED_AMONG_UNSAVED saved rows spread
among them, so that its first page of list_integrations is full at every size). Listings
are measured with pages that are full at every size, so that each size returns the same
number of rows. Timed calls are interleaved size by size so that drift on the machine
hits every size alike.

    python benchmarks/bench_scale.py                 # 100, 1k, 100k and 1M rows
    python benchmarks/bench_scale.py 100 1000 20000  # other sizes (the first two and the
                                                     # last two are compared)
    python benchmarks/bench_scale.py --no-rotation   # without the rotation figures
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from _common import interleaved_medians, result, scratch_database
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import integrations
from integrations import ALL_OWNERS, Integrations, generate_key
from integrations._names import storage_key, uuid7
from integrations._repository import RESEAL_COUNT_STEP
from integrations._vault import Keyring, Vault
from integrations.web import Admin, Owner, console

PACKAGE_PARENT = str(Path(integrations.__file__).resolve().parent.parent)
PROVIDERS = 50
ROWS_PER_OWNER = 100
UNSAVED_OWNER = "tenant:mostly-unsaved"
#: Saved rows of UNSAVED_OWNER, spread evenly through its unsaved ones: more than a page.
SAVED_AMONG_UNSAVED = 60
#: The page size of the status-filtered listing: full at every compared size (one row in
#: a hundred is in error, so 1,000 rows hold 9 outside the mostly unsaved owner's).
ERROR_PAGE = 5
WRITERS = 4
#: Calls of each every-owner page whose plans are counted.
PLAN_CALLS = 12
COPY_BATCH = 20_000


def schema_of(size: int) -> str:
    return f"scale_{size}"


def rows_of(size: int, old_key: str) -> Any:
    """The seeded rows, in batches of COPY records."""
    vault = Vault(Keyring.parse(old_key))
    owners = max(1, size // ROWS_PER_OWNER)
    unsaved = size // 10
    batch: list[tuple[uuid.UUID, str, str, str]] = []
    for i in range(size):
        row_uuid = uuid7()
        provider = "openai" if i % PROVIDERS == 0 else f"p{i % PROVIDERS}"
        data: dict[str, Any] = {
            "provider": provider,
            "name": f"n{i}",
            "auth_type": "api_key",
            "status": "error" if i % 100 == 7 else "connected",
        }
        if i < unsaved:
            owner = UNSAVED_OWNER
            data["status"] = "disconnected"
        else:
            owner = f"user:{i % owners}"
            data.update(vault.seal(row_uuid, {"api_key": f"sk-{i:08d}-0123456789"}))
        batch.append((uuid.UUID(row_uuid), owner, storage_key(provider, f"n{i}"), json.dumps(data)))
        if len(batch) == COPY_BATCH:
            yield batch
            batch = []
    for k in range(SAVED_AMONG_UNSAVED):
        # Next to the unsaved row j in key order (same provider, the name just after).
        j = k * unsaved // SAVED_AMONG_UNSAVED
        row_uuid = uuid7()
        provider = "openai" if j % PROVIDERS == 0 else f"p{j % PROVIDERS}"
        data = {"provider": provider, "name": f"n{j}s{k}", "auth_type": "api_key"}
        data["status"] = "connected"
        data.update(vault.seal(row_uuid, {"api_key": f"sk-s{k:07d}-0123456789"}))
        key = storage_key(provider, f"n{j}s{k}")
        batch.append((uuid.UUID(row_uuid), UNSAVED_OWNER, key, json.dumps(data)))
    if batch:
        yield batch


async def seed(dsn: str, size: int, old_key: str) -> tuple[float, str]:
    """Create and fill the schema of ``size`` rows; seconds taken and a system row's uuid."""
    started = time.perf_counter()
    schema = schema_of(size)
    async with Integrations(dsn, keys=old_key, schema=schema) as integ:
        target = await integ.add_connection("openai", "target")
        await integ.save_setup(target.uuid, {"api_key": "sk-target-0123456789"})
        async with integ._repo.connection() as conn:
            # The next batch is sealed in a thread while the server copies this one.
            batches = rows_of(size, old_key)
            loop = asyncio.get_running_loop()
            ahead = loop.run_in_executor(None, next, batches, None)
            while (records := await ahead) is not None:
                ahead = loop.run_in_executor(None, next, batches, None)
                await conn.copy_records_to_table(
                    "connections",
                    schema_name=schema,
                    columns=["uuid", "owner", "key", "value_json"],
                    records=records,
                )
            await conn.execute(f"VACUUM ANALYZE {schema}.connections")
        # The health sweep's upkeep after a bulk load: the count deltas each COPY left
        # folded, and the folded rows vacuumed (as every sweep does).
        await integ._repo.fold_every_connection_count()
    return time.perf_counter() - started, target.uuid


async def timed(call: Callable[[], Awaitable[object]], times: int = 5) -> float:
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


async def open_and_first_call(
    dsn: str, keys: list[str], size: int, target: str
) -> dict[str, float]:
    """open() of an instance on the schema, and its first get_credentials (cold cache,
    statements not yet prepared), medians of five."""
    opens, firsts = [], []
    for _ in range(5):
        integ = Integrations(dsn, keys=keys, schema=schema_of(size), audit="admin")
        start = time.perf_counter()
        await integ.open()
        opened = time.perf_counter()
        await integ.get_credentials(target)
        firsts.append(time.perf_counter() - opened)
        opens.append(opened - start)
        await integ.close()
    return {"open": statistics.median(opens), "first": statistics.median(firsts)}


def trivial_app() -> Starlette:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", hello)])


async def reads(
    dsn: str, keys: list[str], sizes: list[int], targets: dict[int, str]
) -> dict[str, float]:
    """Every read and listing at every size, interleaved call by call."""
    calls: dict[str, Callable[[], Awaitable[object]]] = {}
    stack: list[Any] = []
    trivial = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=trivial_app()), base_url="http://c"
    )
    stack.append(trivial)

    async def baseline() -> object:
        return (await trivial.get("/")).text

    calls["trivial_route"] = baseline
    for size in sizes:
        schema = schema_of(size)
        # Reads are measured without reveal records (audit="admin"): a reveal's audit write
        # is the same at every size and bench_audit.py measures it.
        cached = Integrations(dsn, keys=keys, schema=schema, audit="admin")
        uncached = Integrations(dsn, keys=keys, schema=schema, cache=False, audit="admin")
        await cached.open()
        await uncached.open()
        stack += [cached, uncached]
        target = targets[size]
        owner = f"user:{max(1, size // ROWS_PER_OWNER) // 2}"
        admin = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=console(cached, authorize=lambda r: Admin())),
            base_url="http://c",
        )
        tenant = httpx.AsyncClient(
            transport=httpx.ASGITransport(
                app=console(cached, authorize=lambda r, o=owner: Owner(o))
            ),
            base_url="http://c",
        )
        stack += [admin, tenant]
        # The console's second page: after the first page's last key.
        first = await cached.list_page(owner=ALL_OWNERS, limit=25)
        second_path = "/?" + httpx.QueryParams({"after": first.next_after or ""}).__str__()

        def page(client: httpx.AsyncClient, path: str) -> Callable[[], Awaitable[object]]:
            async def get() -> object:
                response = await client.get(path)
                assert response.status_code == 200, response.status_code
                return response.text

            return get

        ops: dict[str, Callable[[], Awaitable[object]]] = {
            "cached": lambda c=cached, t=target: c.get_credentials(t),
            "uncached": lambda c=uncached, t=target: c.get_credentials(t),
            "list_connections": lambda c=cached, o=owner: c.list_connections("p7", owner=o),
            "list_integrations": lambda c=cached: c.list_integrations(
                owner=UNSAVED_OWNER, limit=50
            ),
            "list_page": lambda c=cached, o=owner: c.list_page(owner=o, limit=50),
            "list_page_all": lambda c=cached: c.list_page(owner=ALL_OWNERS, limit=50),
            "list_page_errors": lambda c=cached: c.list_page(
                owner=ALL_OWNERS, status="error", limit=ERROR_PAGE
            ),
            "count_connections": lambda c=cached: c.count_connections(owner=ALL_OWNERS),
            "console_admin": page(admin, "/"),
            "console_admin_next": page(admin, second_path),
            "console_admin_search": page(admin, "/?q=n12&status=connected"),
            "console_owner": page(tenant, "/"),
        }
        for name, call in ops.items():
            calls[f"{name}_{size}"] = call
    try:
        medians = await interleaved_medians(calls, rounds=60, warmup=5)
    finally:
        for item in reversed(stack):
            await (item.aclose() if isinstance(item, httpx.AsyncClient) else item.close())
    return medians


async def plan_reuse(dsn: str, keys: list[str], size: int) -> dict[str, float]:
    """How often the server planned the every-owner pages' statements for the call's
    values (a custom plan) and how often it reused its generic plan, over PLAN_CALLS calls
    each on one connection (the pool hands the connection just released back)."""
    statements = {"every": "search_every_owner", "every_status": "status_every_owner"}
    found: dict[str, float] = {}
    async with Integrations(
        dsn, keys=keys, schema=schema_of(size), audit="admin", pool_max_size=2
    ) as integ:
        for _ in range(PLAN_CALLS):
            await integ.list_page(owner=ALL_OWNERS, limit=50)
            await integ.list_page(owner=ALL_OWNERS, status="error", limit=ERROR_PAGE)
        async with integ._repo.connection() as conn:
            records = await conn.fetch(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
            )
        for name, field in statements.items():
            sql = getattr(integ._repo.q, field)
            counts = [
                (r["generic_plans"], r["custom_plans"]) for r in records if r["statement"] == sql
            ]
            generic, custom = counts[0] if counts else (-1, -1)
            found[f"plans_generic_{name}_{size}"] = float(generic)
            found[f"plans_custom_{name}_{size}"] = float(custom)
    return found


async def rotation(dsn: str, keys: list[str], size: int) -> dict[str, float]:
    """rotate_keys() of the whole schema with WRITERS tasks saving setups meanwhile, then a
    pass with nothing left to do."""
    async with Integrations(
        dsn,
        keys=keys,
        schema=schema_of(size),
        pool_max_size=WRITERS + 2,
    ) as integ:
        async with integ._repo.connection() as conn:
            sample = [
                str(r["uuid"])
                for r in await conn.fetch(
                    f"SELECT uuid FROM {schema_of(size)}.connections "
                    "WHERE owner <> $1 AND key LIKE 'integration:openai:%' "
                    "ORDER BY random() LIMIT 2000",
                    UNSAVED_OWNER,
                )
            ]
        stop = asyncio.Event()
        writes = 0

        async def writer(k: int) -> None:
            nonlocal writes
            rng = random.Random(k)
            while not stop.is_set():
                await integ.save_setup(rng.choice(sample), {"api_key": f"sk-w{k}-{writes:08d}xx"})
                writes += 1

        tasks = [asyncio.create_task(writer(k)) for k in range(WRITERS)]
        start = time.perf_counter()
        done = await integ.rotate_keys(batch_size=500)
        seconds = time.perf_counter() - start
        stop.set()
        await asyncio.gather(*tasks)
        # Right after the rotation the indexes still hold the entries of the row versions
        # it replaced, until VACUUM (autovacuum, in time) removes them; a store at rest
        # is what a later pass meets.
        noop_dirty = await timed(lambda: integ.rotate_keys(batch_size=500), times=1)
        # The passes with nothing left on a store at rest are measured by idle_passes(),
        # every size in turn, once every size has been rotated.
        async with integ._repo.connection() as conn:
            await conn.execute(f"VACUUM ANALYZE {schema_of(size)}.connections")
    return {
        "rotated": float(done.rotated),
        "rotation_s": seconds,
        "rotation_rows_per_s": done.scanned / seconds,
        "rotation_writes_per_s": writes / seconds,
        "rotation_noop_unvacuumed_ms": noop_dirty * 1e3,
    }


async def idle_passes(dsn: str, keys: list[str], sizes: list[int]) -> dict[str, float]:
    """A rotate_keys() pass with nothing left at every size, the sizes taken in turn (so
    that autovacuum or other drift after the big rotations hits every size alike)."""
    instances = {size: Integrations(dsn, keys=keys, schema=schema_of(size)) for size in sizes}
    for integ in instances.values():
        await integ.open()
    try:
        medians = await interleaved_medians(
            {
                str(size): lambda i=integ: i.rotate_keys(batch_size=500)
                for size, integ in instances.items()
            },
            rounds=15,
            warmup=2,
        )
    finally:
        for integ in instances.values():
            await integ.close()
    return {f"rotation_noop_ms_{size}": medians[str(size)] * 1e3 for size in sizes}


async def memory_child(dsn: str, schema: str, target: str, keys: str) -> None:
    """Child process: open on ``schema``, read and list as the benchmark does, and print
    the peak resident memory."""
    async with Integrations(dsn, keys=keys.split(","), schema=schema) as integ:
        for _ in range(20):
            await integ.get_credentials(target)
        await integ.list_integrations(owner=UNSAVED_OWNER, limit=50)
        await integ.list_page(owner=ALL_OWNERS, limit=50)
        await integ.count_connections(owner=ALL_OWNERS)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=console(integ, authorize=lambda r: Admin())),
            base_url="http://c",
        ) as http:
            await http.get("/")
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)


async def memory(dsn: str, keys: list[str], size: int, target: str) -> float:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--memory",
        dsn,
        schema_of(size),
        target,
        ",".join(keys),
        env={**os.environ, "PYTHONPATH": PACKAGE_PARENT},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    return float(out.decode().split()[-1])


async def main(sizes: list[int], *, rotate: bool = True) -> None:
    old, new = generate_key(), generate_key()
    keys = [new, old]
    figures: dict[str, float] = {
        "sizes": float(len(sizes)),
        "saved_among_unsaved": float(SAVED_AMONG_UNSAVED),
        "error_page": float(ERROR_PAGE),
        "load_start": os.getloadavg()[0],
        # rotate_keys() refreshes the statistics after a big pass (the report says so).
        "analyzes_after_rotation": 1.0,
        # The rotating instance keeps the default lock_timeout (its statement deadline):
        # the opening count of the rows left reads the index in steps of this many entries.
        "rotation_count_step": float(RESEAL_COUNT_STEP),
    }
    for i, size in enumerate(sizes):
        figures[f"size_{i}"] = float(size)
    async with scratch_database() as dsn:
        targets: dict[int, str] = {}
        for size in sizes:
            seconds, targets[size] = await seed(dsn, size, old)
            figures[f"seed_s_{size}"] = seconds
            print(f"seeded {size:>9,} rows in {seconds:7.1f} s", flush=True)
        for size in sizes:
            got = await open_and_first_call(dsn, keys, size, targets[size])
            figures[f"open_ms_{size}"] = got["open"] * 1e3
            figures[f"first_ms_{size}"] = got["first"] * 1e3
        medians = await reads(dsn, keys, sizes, targets)
        figures["trivial_route_us"] = medians.pop("trivial_route") * 1e6
        for name, value in medians.items():
            figures[f"{name}_us"] = value * 1e6
        for size in sizes:
            figures[f"rss_mib_{size}"] = await memory(dsn, keys, size, targets[size]) / 2**20
            figures.update(await plan_reuse(dsn, keys, size))
        figures["plan_calls"] = float(PLAN_CALLS)
        for size in sizes if rotate else []:
            for name, value in (await rotation(dsn, keys, size)).items():
                figures[f"{name}_{size}"] = value
            print(
                f"rotation of {size:,} rows: {figures[f'rotation_rows_per_s_{size}']:,.0f} rows/s",
                flush=True,
            )
        if rotate:
            figures.update(await idle_passes(dsn, keys, sizes))
    figures["load_end"] = os.getloadavg()[0]
    for key in sorted(figures):
        print(f"  {key:<40} {figures[key]:14,.1f}")
    result("scale", figures)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--memory":
        asyncio.run(memory_child(*sys.argv[2:6]))
    else:
        args = sys.argv[1:]
        rotate = "--no-rotation" not in args
        given = [int(a) for a in args if a != "--no-rotation"] or [100, 1_000, 100_000, 1_000_000]
        asyncio.run(main(given, rotate=rotate))
