"""Latency from commit to delivery of an event in another OS process (p50/p99).

The writer renames one connection N times, a short pause apart, and notes the wall
clock when each write returns, its COMMIT acknowledged. (Its pool skips the reset
query asyncpg otherwise runs on release, so nothing after the COMMIT is counted.)
A subscriber in a separate process notes the wall clock when ``Subscription.get()``
hands it each event. Both processes read the same system clock.

The notification and the COMMIT acknowledgement leave the server together, so the
first figure is a lower bound and can dip below zero when the writer is scheduled
late. The second counts from the event's ``at``, stamped inside the write before
its UPDATE, NOTIFY and COMMIT round trips: an upper bound.

    python benchmarks/bench_event_latency.py [N]
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg
from _common import result as report
from _common import scratch_database

import integrations
from integrations import Integrations, generate_key

# The subscriber imports the very package the writer runs, installed or not.
PACKAGE_PARENT = str(Path(integrations.__file__).resolve().parent.parent)
WARMUP = 20
PAUSE_SECONDS = 0.002


async def subscriber(dsn: str, count: int) -> None:
    """Child process: receive ``count`` renames, then print what arrived when, as JSON."""
    received: dict[str, tuple[int, float]] = {}
    async with Integrations(dsn) as integ, integ.subscribe(kinds=["connection_renamed"]) as sub:
        print("ready", flush=True)
        while len(received) < count:
            event = await sub.get()
            arrived = time.time_ns()
            received[str(event.detail["new_name"])] = (arrived, event.at.timestamp())
        dropped = sub.dropped
    print(json.dumps({"received": received, "dropped": dropped}), flush=True)


def percentiles(samples_ms: list[float]) -> str:
    cuts = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return (
        f"p50 {statistics.median(samples_ms):6.3f} ms   p99 {cuts[98]:6.3f} ms   "
        f"min {min(samples_ms):6.3f}   max {max(samples_ms):6.3f}"
    )


async def main(count: int) -> None:
    key = generate_key()

    async def no_reset(_conn: object) -> None:
        """Skip the reset round trip asyncpg makes on release, after the COMMIT."""

    async with (
        scratch_database() as dsn,
        asyncpg.create_pool(dsn, min_size=2, max_size=4, reset=no_reset) as pool,
        Integrations(pool=pool, keys=key) as integ,
    ):
        conn = await integ.add_connection("openai", "bench")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--subscriber",
            dsn,
            str(WARMUP + count),
            env={**os.environ, "INTEGRATIONS_KEYS": key, "PYTHONPATH": PACKAGE_PARENT},
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        if await asyncio.wait_for(proc.stdout.readline(), 30) != b"ready\n":
            raise RuntimeError("the subscriber process did not start")
        committed: dict[str, int] = {}
        for seq in range(WARMUP + count):
            name = f"n{seq}"
            await integ.rename_connection(conn.uuid, name)
            committed[name] = time.time_ns()
            await asyncio.sleep(PAUSE_SECONDS)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    result = json.loads(out.decode().splitlines()[-1])
    measured = [f"n{seq}" for seq in range(WARMUP, WARMUP + count)]
    arrivals = {name: result["received"][name] for name in measured}
    from_commit = [(arrivals[n][0] - committed[n]) / 1e6 for n in measured]
    from_at = [(arrivals[n][0] / 1e9 - arrivals[n][1]) * 1e3 for n in measured]
    print(f"event latency into another process, {count} events ({WARMUP} warm-up not counted)")
    print(f"  from COMMIT acknowledged to the writer:   {percentiles(from_commit)}")
    print(f"  from event.at (before UPDATE and COMMIT): {percentiles(from_at)}")
    print(f"  dropped by the subscriber: {result['dropped']}")
    figures = {"events": float(count), "dropped": float(result["dropped"])}
    for tag, samples in (("commit", from_commit), ("at", from_at)):
        figures[f"{tag}_p50_ms"] = statistics.median(samples)
        figures[f"{tag}_p99_ms"] = statistics.quantiles(samples, n=100, method="inclusive")[98]
    report("event_latency", figures)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--subscriber":
        asyncio.run(subscriber(sys.argv[2], int(sys.argv[3])))
    else:
        asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 500))
