"""The fast path, each figure against a baseline in the same run: cached and uncached
get_credentials, authenticated_request with 1 and 50 callers against a server in another
process, queries per 1,000 cached calls, cross-process invalidation lag, listings by
table size, and the memory of 100k cached rows.

    python benchmarks/bench_fast_path.py [case ...]   # cases: credentials requests
                                                      # queries lag listings memory
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import asyncpg
from _common import http_server, interleaved_medians, library_pool, result, scratch_database

import integrations
from integrations import Integrations, Provider, generate_key

PACKAGE_PARENT = str(Path(integrations.__file__).resolve().parent.parent)
API_KEY = "sk-bench-0123456789abcdef"
CALLERS = 50
SECONDS = 2.0  # per throughput contender
REPEATS = 5  # interleaved runs of the single-caller figures; their medians are reported
PROVIDER = Provider(key="bench", name="Bench", auth_type="api_key", api_hosts=("127.0.0.1",))
BARE_SQL = "SELECT uuid, owner, key, value_json::text, version FROM integrations.connections "


# -- helpers ----------------------------------------------------------------------------


async def throughput(call: Callable[[], Awaitable[object]], callers: int, seconds: float) -> float:
    """Calls per second with ``callers`` concurrent loops, for ``seconds``."""
    done = 0
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(callers)))
    return done / (time.perf_counter() - start)


async def interleaved_throughput(
    calls: dict[str, Callable[[], Awaitable[object]]], callers: int, seconds: float
) -> dict[str, float]:
    """Throughput of each contender, in alternating slices of a quarter second so that
    drift on the (shared) machine hits all alike; ``seconds`` per contender in all."""
    for call in calls.values():
        await asyncio.gather(*(call() for _ in range(callers)))
    slices = max(1, round(seconds / 0.25))
    rates: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(slices):
        for name, call in calls.items():
            rates[name].append(await throughput(call, callers, seconds / slices))
    return {name: statistics.median(values) for name, values in rates.items()}


# -- cases ------------------------------------------------------------------------------


async def credentials(dsn: str, key: str) -> dict[str, float]:
    """get_credentials cached and uncached against a bare fetch of the row on an asyncpg
    pool configured as the library's own (no reset query on release, the same statement
    deadline), and against a dict lookup plus decrypt (the floor of a cached read). Both
    instances record no reveals (audit="admin"): bench_audit.py measures that write.
    Five interleaved repeats; the medians of their ratios."""
    async with (
        library_pool(dsn) as default_pool,
        Integrations(dsn, keys=key, audit="admin") as cached,
        Integrations(dsn, keys=key, cache=False, audit="admin") as uncached,
    ):
        conn = await cached.add_connection("openai", "default")
        await cached.save_setup(conn.uuid, {"api_key": API_KEY})
        row_id = uuid.UUID(conn.uuid)
        core = cached._s.core
        sealed = {conn.uuid: (await cached._repo.get(conn.uuid, fresh=True))}
        fields = core.secret_fields(sealed[conn.uuid])  # type: ignore[arg-type]

        async def bare() -> object:
            return await default_pool.fetchrow(BARE_SQL + "WHERE uuid = $1", row_id)

        async def floor() -> object:
            row = sealed[conn.uuid]
            return core.vault.unseal(row.uuid, row.data, fields)  # type: ignore[union-attr]

        async def hit() -> object:
            return await cached.get_credentials(conn.uuid)

        async def miss() -> object:
            return await uncached.get_credentials(conn.uuid)

        runs = [
            await interleaved_medians(
                {"bare": bare, "floor": floor, "cached": hit, "uncached": miss}, rounds=1000
            )
            for _ in range(REPEATS)
        ]
        m = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
        ratios = {
            "cached_speedup": statistics.median(r["bare"] / r["cached"] for r in runs),
            "uncached_ratio": statistics.median(r["uncached"] / r["bare"] for r in runs),
            "cached_vs_floor": statistics.median(r["cached"] / r["floor"] for r in runs),
        }
        tput = await interleaved_throughput(
            {"bare": bare, "cached": hit, "uncached": miss}, CALLERS, SECONDS
        )
    out = {
        "cred_bare_us": m["bare"] * 1e6,
        "cred_floor_us": m["floor"] * 1e6,
        "cred_cached_us": m["cached"] * 1e6,
        "cred_uncached_us": m["uncached"] * 1e6,
        "cred_cached_speedup": ratios["cached_speedup"],
        "cred_uncached_ratio": ratios["uncached_ratio"],
        "cred_cached_vs_floor": ratios["cached_vs_floor"],
        "cred_repeats": float(REPEATS),
        "cred_bare_ops50": tput["bare"],
        "cred_cached_ops50": tput["cached"],
        "cred_uncached_ops50": tput["uncached"],
    }
    print(f"get_credentials(uuid), {REPEATS} repeats of 1,000 interleaved calls (medians)")
    print(f"  bare pool.fetchrow (library's pool settings) {out['cred_bare_us']:8.1f} µs")
    print(f"  dict lookup + decrypt              {out['cred_floor_us']:8.1f} µs")
    print(
        f"  cached                             {out['cred_cached_us']:8.1f} µs  "
        f"{out['cred_cached_speedup']:.1f}x faster than bare, "
        f"{out['cred_cached_vs_floor']:.2f}x the floor"
    )
    print(
        f"  uncached                           {out['cred_uncached_us']:8.1f} µs  "
        f"{out['cred_uncached_ratio']:.2f}x bare"
    )
    print(
        f"  {CALLERS} callers: bare {tput['bare']:,.0f} ops/s, cached {tput['cached']:,.0f}, "
        f"uncached {tput['uncached']:,.0f}"
    )
    return out


async def requests(dsn: str, key: str) -> dict[str, float]:
    """authenticated_request (cached) against a bare aiohttp GET with the same header, on
    the same session, to a server in another process."""
    async with (
        http_server() as url,
        aiohttp.ClientSession() as session,
        Integrations(dsn, keys=key, providers=[PROVIDER], http=session) as integ,
    ):
        conn = await integ.add_connection("bench", "default")
        await integ.save_setup(conn.uuid, {"api_key": API_KEY})
        headers = {"Authorization": f"Bearer {API_KEY}"}

        async def bare() -> object:
            async with session.get(url, headers=headers) as response:
                return await response.read()

        async def ours() -> object:
            return (await integ.authenticated_request(conn.uuid, "GET", url)).body

        m = await interleaved_medians({"bare": bare, "ours": ours}, rounds=1500)
        tput = await interleaved_throughput({"bare": bare, "ours": ours}, CALLERS, SECONDS)
        bare_ops, our_ops = tput["bare"], tput["ours"]
    out = {
        "req_bare_us": m["bare"] * 1e6,
        "req_ours_us": m["ours"] * 1e6,
        "req_ratio_1": m["ours"] / m["bare"],
        "req_bare_ops50": bare_ops,
        "req_ours_ops50": our_ops,
        "req_tput_ratio_50": our_ops / bare_ops,
    }
    print("authenticated_request (cached) vs bare aiohttp GET, server in another process")
    print(
        f"  1 caller: bare {out['req_bare_us']:.1f} µs, ours {out['req_ours_us']:.1f} µs, "
        f"{out['req_ratio_1']:.2f}x"
    )
    print(
        f"  {CALLERS} callers: bare {bare_ops:,.0f} ops/s, ours {our_ops:,.0f} ops/s, "
        f"{out['req_tput_ratio_50']:.2f}x"
    )
    return out


async def queries(dsn: str, key: str) -> dict[str, float]:
    """Statements sent to PostgreSQL during 1,000 cached authenticated_request calls."""
    statements: list[str] = []

    def logged(record: object) -> None:
        statements.append(str(getattr(record, "query", "")))

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(logged)

    async with (
        http_server() as url,
        library_pool(dsn, init=init) as pool,
        Integrations(pool=pool, keys=key, providers=[PROVIDER]) as integ,
    ):
        conn = await integ.add_connection("bench", "default")
        await integ.save_setup(conn.uuid, {"api_key": API_KEY})
        await integ.authenticated_request(conn.uuid, "GET", url)
        statements.clear()
        for _ in range(1000):
            await integ.authenticated_request(conn.uuid, "GET", url)
        # The listener's heartbeat (a NOTIFY to itself every `listen_heartbeat` seconds)
        # goes on whatever the calls do: counted apart, not as the calls' statements.
        probes = sum(1 for text in statements if "pg_notify" in text)
        counted = len(statements) - probes
    print(
        f"statements per 1,000 cached authenticated_request calls, no writes: {counted} "
        f"(and {probes} listener heartbeat probes meanwhile)"
    )
    return {"queries_per_1000": float(counted), "heartbeat_probes": float(probes)}


async def lag_reader(dsn: str, uuid_: str) -> None:
    """Child process: read the credentials in a loop until the value is ``v-end``; print
    when each new value was seen (a value replaced before any read saw it is missed)."""
    seen: dict[str, int] = {}
    async with Integrations(dsn) as integ:
        last = (await integ.get_credentials(uuid_))["api_key"]
        print("ready", flush=True)
        while last != "v-end":
            value = (await integ.get_credentials(uuid_))["api_key"]
            if value != last:
                seen[value] = time.time_ns()
                last = value
            await asyncio.sleep(0)
    print(json.dumps(seen), flush=True)


async def notify_reader(dsn: str, channel: str) -> None:
    """Child process: LISTEN on ``channel`` until ``v-end``; print when each payload came."""
    seen: dict[str, int] = {}
    done = asyncio.Event()

    def got(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        seen[payload] = time.time_ns()
        if payload == "v-end":
            done.set()

    conn = await asyncpg.connect(dsn)
    await conn.add_listener(channel, got)
    print("ready", flush=True)
    await done.wait()
    await conn.close()
    print(json.dumps(seen), flush=True)


async def child(*args: str, key: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        *args,
        env={**os.environ, "INTEGRATIONS_KEYS": key, "PYTHONPATH": PACKAGE_PARENT},
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    if await asyncio.wait_for(proc.stdout.readline(), 30) != b"ready\n":
        raise RuntimeError(f"the {args[0]} process did not start")
    return proc


def quantiles(lags: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(lags, n=100, method="inclusive")
    return statistics.median(lags), cuts[98]


async def lag(dsn: str, key: str, count: int = 300) -> dict[str, float]:
    """Cross-process invalidation: from a write's COMMIT acknowledgement in this process to
    the first read in another process (reading in a loop, cached) that returns the new
    value; against a bare NOTIFY round trip in the same run (from ``pg_notify`` acknowledged,
    on a pool configured as the library's, to the payload's arrival at a LISTEN in another
    process), the two interleaved write by write."""
    async with library_pool(dsn) as pool, Integrations(dsn, keys=key, cache=False) as integ:
        conn = await integ.add_connection("openai", "lag")
        await integ.save_setup(conn.uuid, {"api_key": "v-start"})
        reader = await child("--lag-reader", dsn, conn.uuid, key=key)
        listener = await child("--notify-reader", dsn, "bench_bare", key=key)
        committed: dict[str, int] = {}
        notified: dict[str, int] = {}
        for i in range(count):
            value = f"v-{i}"
            await integ.save_setup(conn.uuid, {"api_key": value})
            committed[value] = time.time_ns()
            await asyncio.sleep(0.005)
            await pool.execute("SELECT pg_notify('bench_bare', $1)", value)
            notified[value] = time.time_ns()
            await asyncio.sleep(0.005)
        await integ.save_setup(conn.uuid, {"api_key": "v-end"})
        await pool.execute("SELECT pg_notify('bench_bare', 'v-end')")
        out, _ = await asyncio.wait_for(reader.communicate(), 60)
        bare_out, _ = await asyncio.wait_for(listener.communicate(), 60)
    seen = json.loads(out.decode().splitlines()[-1])
    heard = json.loads(bare_out.decode().splitlines()[-1])
    lags = [(seen[v] - committed[v]) / 1e6 for v in committed if v in seen]
    bare = [(heard[v] - notified[v]) / 1e6 for v in notified if v in heard]
    p50, p99 = quantiles(lags)
    b50, b99 = quantiles(bare)
    print(f"invalidation lag into another process, {count} writes interleaved with bare NOTIFYs")
    print(f"  ours: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
    print(f"  bare NOTIFY to LISTEN: p50 {b50:.3f} ms, p99 {b99:.3f} ms")
    print(f"  ratio: p50 {p50 / b50:.2f}x, p99 {p99 / b99:.2f}x")
    return {
        "lag_p50_ms": p50,
        "lag_p99_ms": p99,
        "lag_missed": float(count - len(lags)),
        "notify_p50_ms": b50,
        "notify_p99_ms": b99,
        "lag_ratio_p50": p50 / b50,
        "lag_ratio_p99": p99 / b99,
    }


async def listings(dsn: str, key: str) -> dict[str, float]:
    """list_connections (10 rows of one provider) and list_page(limit=50) on tables of 1k,
    10k and 100k rows of 50 providers and many owners: one schema per size, measured call
    by call in turn, so that the machine's drift hits every size alike."""
    sizes = (1_000, 10_000, 100_000)
    out: dict[str, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        db = await asyncpg.connect(dsn)
        stack.push_async_callback(db.close)
        calls: dict[str, Callable[[], Awaitable[object]]] = {}
        for size in sizes:
            schema = f"bench_list_{size}"
            integ = await stack.enter_async_context(Integrations(dsn, keys=key, schema=schema))
            for name in range(10):
                await integ.add_connection("openai", f"n{name}")
            await db.execute(
                f"""INSERT INTO {schema}.connections (uuid, owner, key, value_json)
                    SELECT gen_random_uuid(),
                           CASE WHEN i % 3 = 0 THEN '' ELSE 'user:' || (i % 7919) END,
                           'integration:p' || (i % 50) || ':n' || i,
                           '{{"status": "connected"}}'
                    FROM generate_series(10, $1::int - 1) AS i""",
                size,
            )
            await db.execute(f"ANALYZE {schema}.connections")
            calls[f"list_{size}"] = partial(integ.list_connections, "openai")
            calls[f"page_{size}"] = partial(integ.list_page, limit=50, after="integration:p2")
        m = await interleaved_medians(calls, rounds=300, warmup=30)
    for size in sizes:
        out[f"list_{size}_us"] = m[f"list_{size}"] * 1e6
        out[f"page_{size}_us"] = m[f"page_{size}"] * 1e6
        print(
            f"  {size:>7,} rows: list_connections (10 rows) {m[f'list_{size}'] * 1e6:8.1f} µs, "
            f"list_page(limit=50) {m[f'page_{size}'] * 1e6:8.1f} µs"
        )
    for what in ("list", "page"):
        values = [out[f"{what}_{s}_us"] for s in sizes]
        out[f"{what}_spread"] = max(values) / min(values)
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def memory(dsn: str, key: str, rows: int = 100_000) -> dict[str, float]:
    """Resident memory added by ``rows`` cached rows (sealed, one secret each)."""
    async with Integrations(dsn, keys=key, cache_size=rows) as integ:
        conn = await integ.add_connection("openai", "template")
        await integ.save_setup(conn.uuid, {"api_key": API_KEY})
        template = (await integ._repo.get(conn.uuid, fresh=True)).data  # type: ignore[union-attr]
        db = await asyncpg.connect(dsn)
        try:
            await db.execute(
                """INSERT INTO integrations.connections (uuid, owner, key, value_json)
                   SELECT gen_random_uuid(), '', 'integration:openai:m' || i, $2::text::jsonb
                   FROM generate_series(1, $1::int) AS i""",
                rows,
                json.dumps(template),
            )
        finally:
            await db.close()
        await asyncio.sleep(0.2)  # the insert's notice
        repo, cache = integ._repo, integ._repo.cache
        gc.collect()
        before = rss_bytes()
        after_key = ""
        while True:
            ticket = cache.ticket()
            batch = await repo.list_page(None, "integration:openai:m", after_key, 1000)
            for row in batch:
                cache.fill(ticket, row)
            if len(batch) < 1000:
                break
            after_key = batch[-1].key
        gc.collect()
        size = cache.stats.size
        grown = rss_bytes() - before
    per_row = grown / size
    print(f"RSS for {size:,} cached rows: {grown / 2**20:.1f} MiB ({per_row:,.0f} bytes a row)")
    return {"rss_rows": float(size), "rss_mib": grown / 2**20, "rss_per_row": per_row}


CASES = {
    "credentials": credentials,
    "requests": requests,
    "queries": queries,
    "lag": lag,
    "listings": listings,
    "memory": memory,
}


async def main(names: list[str]) -> None:
    key = generate_key()
    figures: dict[str, float] = {}
    for name in names or list(CASES):
        # A fresh database per case: one case's rows do not slow another's.
        async with scratch_database() as dsn:
            figures.update(await CASES[name](dsn, key))
    result("fast_path", figures)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--lag-reader":
        asyncio.run(lag_reader(sys.argv[2], sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--notify-reader":
        asyncio.run(notify_reader(sys.argv[2], sys.argv[3]))
    else:
        asyncio.run(main(sys.argv[1:]))
