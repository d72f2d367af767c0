"""save_setup with the durable event log against the same write notifying only (no log)."""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import interleaved_medians, result, scratch_database

from integrations import Event, Integrations, generate_key
from integrations._repository import Repository, event_payload

WRITERS = 20
SLICE = 0.25
SLICES = 16


async def notify_only(self: Repository, conn: Any, events: Iterable[Event]) -> None:
    """The write path as it was before the log: one NOTIFY per event, nothing kept."""
    for event in events:
        await conn.execute(self.q.notify, self.channel, event_payload(event))


async def _until(write: Callable[[int], Awaitable[object]], i: int, stop: float) -> int:
    count = 0
    while time.perf_counter() < stop:
        await write(i)
        count += 1
    return count


async def throughput(
    writers: dict[str, Callable[[int], Awaitable[object]]],
) -> dict[str, float]:
    """Writes per second with ``WRITERS`` concurrent callers, the contenders taking turns
    in quarter-second slices."""
    done = {name: 0 for name in writers}
    spent = {name: 0.0 for name in writers}
    for _ in range(SLICES):
        for name, write in writers.items():
            start = time.perf_counter()
            counts = await asyncio.gather(
                *(_until(write, i, start + SLICE) for i in range(WRITERS))
            )
            spent[name] += time.perf_counter() - start
            done[name] += sum(counts)
    return {name: done[name] / spent[name] for name in writers}


async def main() -> None:
    key = generate_key()
    async with (
        scratch_database() as dsn,
        Integrations(dsn, keys=key, schema="logged", pool_max_size=WRITERS + 2) as logged,
        Integrations(dsn, keys=key, schema="unlogged", pool_max_size=WRITERS + 2) as unlogged,
    ):
        # The second instance writes as the library did before the log existed.
        unlogged._repo._log = notify_only.__get__(unlogged._repo)  # type: ignore[method-assign]
        contenders = {"with the log": logged, "notify only": unlogged}
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
            {name: functools.partial(write, 0) for name, write in writes.items()}, rounds=1500
        )
        rates = await throughput(writes)
        # Retention's cost, once: the log grew by every write above.
        start = time.perf_counter()
        pruned = await logged.prune_events(max_age=None, max_count=0)
        prune_seconds = time.perf_counter() - start

    base, ours = single["notify only"], single["with the log"]
    print("save_setup, one caller: with the durable log against notify only (no log)")
    print(f"  notify only   median {base * 1e6:8.1f} µs")
    print(f"  with the log  median {ours * 1e6:8.1f} µs   ratio {ours / base:5.3f}x")
    print(f"save_setup, {WRITERS} concurrent callers on {WRITERS} connections")
    for name, rate in rates.items():
        print(f"  {name:<13} {rate:9,.0f} writes/s")
    print(f"  ratio {rates['with the log'] / rates['notify only']:5.3f}x")
    print(f"prune_events of {pruned:,} logged events: {prune_seconds:.2f} s")
    result(
        "event_log",
        {
            "base_us": base * 1e6,
            "ours_us": ours * 1e6,
            "writers": WRITERS,
            "base_rate": rates["notify only"],
            "ours_rate": rates["with the log"],
            "pruned": pruned,
            "prune_s": prune_seconds,
        },
    )


if __name__ == "__main__":
    asyncio.run(main())
