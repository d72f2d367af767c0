"""Webhook deliveries: the library's own delivery table against pgqueuer (a PostgreSQL job
queue on asyncpg), on what this use needs, in one run.

1. The write path. Ours: ``save_setup`` logs its event in its transaction and a dispatcher
   turns logged events into deliveries later, in batches. pgqueuer: the same ``save_setup``
   also enqueues one job per event in the same transaction, on the same connection (its
   asyncpg driver takes the library's connection). Both interleaved call by call, then
   with concurrent writers in alternating slices; and ours' dispatch, per event.
2. Claim and complete, drained as a worker would: ours (a lane's head only, one update per
   finished delivery) against pgqueuer with one entrypoint (no order) and with an
   entrypoint per connection at a concurrency limit of 1 (the nearest it comes to order
   per connection).
3. Order per connection when the first delivery of each connection fails once and is
   retried a moment later: how many connections were delivered out of order.
4. The schema each adds.

pgqueuer is a benchmark-only dependency: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved_medians, result, scratch_database
from bench_event_log import throughput

try:
    from pgqueuer.adapters.drivers.asyncpg import AsyncpgDriver
    from pgqueuer.adapters.persistence.qb import (
        QueryBuilderEnvironment,
        QueryQueueBuilder,
        QuerySchedulerBuilder,
    )
    from pgqueuer.adapters.persistence.queries import Queries
    from pgqueuer.domain.settings import DBSettings
    from pgqueuer.domain.types import QueueManagerId
    from pgqueuer.ports.repository import EntrypointExecutionParameter
except ImportError:
    raise SystemExit("bench_webhook_queue.py needs pgqueuer: pip install -e '.[bench]'") from None

from integrations import Event, Integrations, generate_key
from integrations._repository import Repository
from integrations._webhooks import plan_deliveries

WRITERS = 20
ITEMS = 2000
LANES = 200
BATCH = 50
DRAINS = 3
ORDER_LANES = 50
ORDER_DEPTH = 4
RETRY_AFTER = 0.3
HEARTBEAT = timedelta(seconds=30)

SETTINGS = DBSettings(db_schema="pgq")
BUILDERS = {
    "qbe": QueryBuilderEnvironment(settings=SETTINGS),
    "qbq": QueryQueueBuilder(settings=SETTINGS),
    "qbs": QuerySchedulerBuilder(settings=SETTINGS),
}


def pgq(conn: Any) -> Queries:
    return Queries(AsyncpgDriver(conn), **BUILDERS)


async def log_and_enqueue(self: Repository, conn: Any, events: Iterable[Event]) -> None:
    """The write path with pgqueuer: the event logged as always, and a job per event
    enqueued in the same transaction. The job cannot carry the event's position, which
    is drawn when the transaction commits."""
    batch = list(events)
    await Repository._log(self, conn, batch)
    if batch:
        await pgq(conn).enqueue(
            ["webhook"] * len(batch),
            [e.to_payload().encode() for e in batch],
            [0] * len(batch),
        )


# -- 1. the write path ---------------------------------------------------------------------


async def write_path(
    ours: Integrations, inline: Integrations
) -> tuple[dict[str, float], dict[str, float], float, int]:
    inline._repo._log = log_and_enqueue.__get__(inline._repo)  # type: ignore[method-assign]
    contenders = {"ours": ours, "pgqueuer": inline}
    uuids = {
        name: [(await integ.add_connection("openai", f"c{i}")).uuid for i in range(WRITERS)]
        for name, integ in contenders.items()
    }
    counter = 0

    def saving(name: str) -> Callable[[int], Awaitable[object]]:
        integ = contenders[name]

        async def write(i: int) -> object:
            nonlocal counter
            counter += 1
            return await integ.save_setup(
                uuids[name][i], {"api_key": f"sk-bench-{counter:08d}-0123456789"}
            )

        return write

    writes = {name: saving(name) for name in contenders}
    single = await interleaved_medians(
        {name: functools.partial(write, 0) for name, write in writes.items()}, rounds=1000
    )
    rates = await throughput(writes)
    # Ours' deferred half: the dispatcher turning those logged events into deliveries.
    dispatched = 0
    start = time.perf_counter()
    while step := await ours._repo.webhook_dispatch(500, plan_deliveries):
        dispatched += step
    dispatch_s = time.perf_counter() - start
    return single, rates, dispatch_s / max(dispatched, 1), dispatched


# -- 2. claim and complete -----------------------------------------------------------------


async def fill_ours(db: Any, endpoint: str, items: int, lanes: int) -> None:
    await db.execute("DELETE FROM ours.webhook_deliveries")
    await db.execute(
        "INSERT INTO ours.webhook_deliveries (id, endpoint_id, position, lane, kind, payload) "
        "SELECT 'msg_bench_' || i, $1::uuid, i, 'c' || (i % $3), 'setup_saved', "
        '\'{"type":"setup_saved"}\' FROM generate_series(1, $2) AS i',
        endpoint,
        items,
        lanes,
    )


async def fill_pgq(db: Any, items: int, lanes: int, *, per_lane: bool) -> list[str]:
    q = pgq(db)
    await q.clear_queue()
    entrypoints = [f"c{i % lanes}" if per_lane else "webhook" for i in range(1, items + 1)]
    payloads: list[bytes | None] = [str(i).encode() for i in range(1, items + 1)]
    await q.enqueue(entrypoints, payloads, [0] * items)
    return sorted(set(entrypoints))


async def drain_ours(repo: Repository, workers: int = 2) -> int:
    async def worker() -> int:
        token, done = str(uuid.uuid4()), 0
        while claimed := await repo.webhook_claim(token, 60.0, BATCH):
            await asyncio.gather(
                *(repo.webhook_finish(d["id"], token, "delivered", 200, None, 0.0) for d in claimed)
            )
            done += len(claimed)
        return done

    return sum(await asyncio.gather(*(worker() for _ in range(workers))))


async def drain_pgq(pool: Any, entrypoints: list[str], *, limit: int, workers: int = 2) -> int:
    params = {e: EntrypointExecutionParameter(concurrency_limit=limit) for e in entrypoints}

    async def worker() -> int:
        manager, done = QueueManagerId(uuid.uuid4()), 0
        async with pool.acquire() as conn:
            q = pgq(conn)
            while jobs := await q.dequeue(BATCH, params, manager, None, HEARTBEAT):
                await q.log_jobs([(job, "successful", None) for job in jobs])
                done += len(jobs)
        return done

    return sum(await asyncio.gather(*(worker() for _ in range(workers))))


async def claim_complete(db: Any, pool: Any, ours: Integrations, endpoint: str) -> dict[str, float]:
    """Items per second drained by two workers, each contender in turn, ``DRAINS`` times."""
    rates: dict[str, list[float]] = {"ours": [], "pgq_one": [], "pgq_lanes": []}
    for _ in range(DRAINS):
        await fill_ours(db, endpoint, ITEMS, LANES)
        await db.execute("VACUUM ANALYZE ours.webhook_deliveries")
        start = time.perf_counter()
        assert await drain_ours(ours._repo) == ITEMS
        rates["ours"].append(ITEMS / (time.perf_counter() - start))
        for name, per_lane, limit in (("pgq_one", False, 0), ("pgq_lanes", True, 1)):
            entrypoints = await fill_pgq(db, ITEMS, LANES, per_lane=per_lane)
            await db.execute("VACUUM ANALYZE pgq.pgqueuer")
            start = time.perf_counter()
            assert await drain_pgq(pool, entrypoints, limit=limit) == ITEMS
            rates[name].append(ITEMS / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


# -- 3. order per connection under a retry -------------------------------------------------


def out_of_order(done: list[tuple[str, int]]) -> int:
    """Lanes whose deliveries completed in another order than their positions."""
    seen: dict[str, list[int]] = {}
    for lane, position in done:
        seen.setdefault(lane, []).append(position)
    return sum(1 for positions in seen.values() if positions != sorted(positions))


async def order_ours(db: Any, ours: Integrations, endpoint: str) -> int:
    repo = ours._repo
    await fill_ours(db, endpoint, ORDER_LANES * ORDER_DEPTH, ORDER_LANES)
    token, done = str(uuid.uuid4()), []
    heads = set(range(1, ORDER_LANES + 1))  # the first position of every lane
    while await repo.webhook_next_due() is not None:
        claimed = await repo.webhook_claim(token, 60.0, BATCH)
        for d in claimed:
            if d["position"] in heads and d["attempts"] == 0:
                await repo.webhook_finish(d["id"], token, "pending", 500, "HTTP 500", RETRY_AFTER)
            else:
                await repo.webhook_finish(d["id"], token, "delivered", 200, None, 0.0)
                done.append((d["lane"], d["position"]))
        if not claimed:
            await asyncio.sleep(0.02)
    return out_of_order(done)


async def order_pgq(db: Any, *, per_lane: bool) -> int:
    entrypoints = await fill_pgq(db, ORDER_LANES * ORDER_DEPTH, ORDER_LANES, per_lane=per_lane)
    q = pgq(db)
    params = {
        e: EntrypointExecutionParameter(concurrency_limit=1 if per_lane else 0) for e in entrypoints
    }
    manager, done = QueueManagerId(uuid.uuid4()), []
    heads = set(range(1, ORDER_LANES + 1))
    while await db.fetchval("SELECT count(*) FROM pgq.pgqueuer"):
        jobs = await q.dequeue(BATCH, params, manager, None, HEARTBEAT)
        for job in jobs:
            position = int(job.payload or b"0")
            if position in heads and job.attempts == 0:
                await q.retry_job(job, timedelta(seconds=RETRY_AFTER), None)
            else:
                await q.log_jobs([(job, "successful", None)])
                done.append((f"c{position % ORDER_LANES}", position))
        if not jobs:
            await asyncio.sleep(0.02)
    return out_of_order(done)


# -- 4. schema -----------------------------------------------------------------------------

COUNT_OBJECTS = """
SELECT
  (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   WHERE n.nspname = $1 AND c.relkind = 'r' AND c.relname LIKE $2) AS tables,
  (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
   JOIN pg_index i ON i.indexrelid = c.oid JOIN pg_class t ON t.oid = i.indrelid
   WHERE n.nspname = $1 AND t.relname LIKE $2) AS indexes,
  (SELECT count(*) FROM pg_trigger g JOIN pg_class t ON t.oid = g.tgrelid
   JOIN pg_namespace n ON n.oid = t.relnamespace
   WHERE n.nspname = $1 AND t.relname LIKE $2 AND NOT g.tgisinternal) AS triggers,
  (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
   WHERE n.nspname = $1 AND p.proname LIKE $2) AS functions,
  (SELECT count(*) FROM pg_type y JOIN pg_namespace n ON n.oid = y.typnamespace
   WHERE n.nspname = $1 AND y.typtype = 'e' AND y.typname LIKE $2) AS types
"""


async def schema_objects(db: Any, schema: str, like: str) -> dict[str, int]:
    row = await db.fetchrow(COUNT_OBJECTS, schema, like)
    return {k: int(v) for k, v in row.items()}


async def main() -> None:
    import asyncpg

    key = generate_key()
    async with (
        scratch_database() as dsn,
        Integrations(dsn, keys=key, schema="ours", pool_max_size=WRITERS + 2) as ours,
        Integrations(dsn, keys=key, schema="inline", pool_max_size=WRITERS + 2) as inline,
    ):
        db = await asyncpg.connect(dsn)
        pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
        try:
            await pgq(db).install()
            endpoint = (await ours.add_webhook("http://127.0.0.1:9/in", allow_loopback=True)).id
            single, rates, dispatch_per_event, dispatched = await write_path(ours, inline)
            drained = await claim_complete(db, pool, ours, endpoint)
            disorder = {
                "ours": await order_ours(db, ours, endpoint),
                "pgq_one": await order_pgq(db, per_lane=False),
                "pgq_lanes": await order_pgq(db, per_lane=True),
            }
            ours_schema = await schema_objects(db, "ours", "webhook\\_deliveries%")
            cursor_schema = await schema_objects(db, "ours", "webhook\\_cursor%")
            ours_schema = {k: v + cursor_schema[k] for k, v in ours_schema.items()}
            pgq_schema = await schema_objects(db, "pgq", "%")
        finally:
            await pool.close()
            await db.close()

    base, theirs = single["ours"], single["pgqueuer"]
    print("save_setup, one caller: ours (log; deliveries made later) against pgqueuer")
    print("(log, and a job enqueued in the same transaction)")
    print(f"  ours       median {base * 1e6:8.1f} µs")
    print(f"  pgqueuer   median {theirs * 1e6:8.1f} µs   ratio {theirs / base:5.3f}x")
    print(f"save_setup, {WRITERS} concurrent callers")
    print(f"  ours     {rates['ours']:9,.0f} writes/s")
    print(f"  pgqueuer {rates['pgqueuer']:9,.0f} writes/s")
    print(f"  ratio {rates['pgqueuer'] / rates['ours']:5.3f}x")
    print(f"ours' dispatch: {dispatched:,} events, {dispatch_per_event * 1e6:.1f} µs per event")
    print(f"claim and complete, {ITEMS:,} items over {LANES} connections, 2 workers:")
    for name, rate in drained.items():
        print(f"  {name:<10} {rate:9,.0f} items/s   {rate / drained['ours']:5.2f}x ours")
    print(
        f"connections delivered out of order ({ORDER_LANES} connections, {ORDER_DEPTH} "
        f"deliveries each, the first failing once):"
    )
    for name, count in disorder.items():
        print(f"  {name:<10} {count}")
    print(f"schema: ours (delivery queue) {ours_schema}; pgqueuer {pgq_schema}")
    figures: dict[str, float] = {
        "ours_us": base * 1e6,
        "pgq_us": theirs * 1e6,
        "writers": WRITERS,
        "ours_rate": rates["ours"],
        "pgq_rate": rates["pgqueuer"],
        "dispatch_us": dispatch_per_event * 1e6,
        "dispatched": dispatched,
        "items": ITEMS,
        "lanes": LANES,
        "order_lanes": ORDER_LANES,
        "order_depth": ORDER_DEPTH,
    }
    figures |= {f"drain_{name}": rate for name, rate in drained.items()}
    figures |= {f"disorder_{name}": count for name, count in disorder.items()}
    figures |= {f"schema_ours_{k}": v for k, v in ours_schema.items()}
    figures |= {f"schema_pgq_{k}": v for k, v in pgq_schema.items()}
    result("webhook_queue", figures)


if __name__ == "__main__":
    asyncio.run(main())
