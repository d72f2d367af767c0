"""The health sweep: what it checks and renews, its pacing, and one leader per fleet."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import sys
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from integrations import ALL_OWNERS, Integrations, SweepReport
from integrations._telemetry import LOG_FIELDS

from . import sweepkit
from .conftest import TEST_KEY, store_setup
from .oauth_server import OAuthTestServer
from .oauthkit import connect, eventually, loopback_provider, set_stored_expiry
from .sweepkit import probe_provider, register_probe

CHILD = Path(__file__).resolve().parent / "sweep_child.py"
SECRET = "MARKER-sweep-key-4Rt9Lm"


@pytest.fixture(autouse=True)
def probe() -> None:
    register_probe()
    sweepkit.CALLS.clear()
    sweepkit.DELAY["seconds"] = 0.0


@asynccontextmanager
async def sweeping(
    integ: Integrations, **options: Any
) -> AsyncIterator[tuple[list[SweepReport], asyncio.Task[None]]]:
    reports: list[SweepReport] = []
    options.setdefault("interval", 0.2)
    options.setdefault("stale_after", 3600)
    task = asyncio.create_task(integ.run_health_sweeps(on_sweep=reports.append, **options))
    try:
        yield reports, task
    finally:
        task.cancel()
        await asyncio.wait({task})


async def until(reports: list[SweepReport], count: int) -> None:
    await eventually(lambda: len(reports) >= count, within=20)


async def add_probe(integ: Integrations, name: str, key: str, owner: str | None = None) -> str:
    conn = await integ.add_connection("probe", name, owner=owner)
    await store_setup(integ, conn.uuid, {"api_key": key})
    return conn.uuid


async def set_last_validated(db: asyncpg.Connection, uuid: str, ago: timedelta) -> None:
    at = (datetime.now(UTC) - ago).isoformat()
    await db.execute(
        "UPDATE integrations.connections "
        "SET value_json = jsonb_set(value_json, '{last_validated_at}', to_jsonb($2::text)) "
        "WHERE uuid = $1",
        uuid_mod.UUID(uuid),
        at,
    )


async def test_stale_connections_are_checked_and_events_fire_only_on_change(
    fresh_db: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[probe_provider()]) as integ:
        good = await add_probe(integ, "good", SECRET, owner="alice")
        bad = await add_probe(integ, "bad", "bad-" + SECRET)
        fresh = await add_probe(integ, "fresh", SECRET)
        recent = await integ.add_connection("probe", "unconfigured")
        await set_last_validated(db, fresh, timedelta(minutes=1))
        await set_last_validated(db, good, timedelta(hours=2))
        async with (
            integ.subscribe(owner=ALL_OWNERS, kinds=["validated"]) as events,
            sweeping(integ, stale_after=0.0) as (reports, _),
        ):
            await until(reports, 3)
            # Events arrive in commit order: a sentinel's, written after three sweeps, ends
            # the ones the sweeps sent.
            await integ.record_validation(recent.uuid, (True, "sentinel"))
            seen = []
            while not seen or seen[-1].uuid != recent.uuid:
                seen.append(await asyncio.wait_for(events.get(), 15))
            seen.pop()
        first = reports[0]
        # Three configured connections, all due with stale_after=0; the unconfigured one
        # is not a candidate at all.
        assert (first.examined, first.checked, first.check_failures) == (3, 3, 1)
        # Each check's outcome, as check_all reports them: provider, owner, name order.
        assert [(i.name, i.owner, i.ok) for i in first.checks.items] == [
            ("bad", None, False),
            ("fresh", None, True),
            ("good", "alice", True),
        ]
        assert first.checks.failed[0].uuid == bad
        assert SECRET not in repr(first)
        assert all(r.checked == 3 for r in reports[1:3])
        # Later sweeps re-check, but the status did not change: no more events.
        assert sorted(e.uuid for e in seen) == sorted([good, bad, fresh])
        assert all(e.actor == "health_sweep" for e in seen)
        assert (await integ.get_integration_by_uuid(bad)).status == "error"
        assert (await integ.get_integration_by_uuid(recent.uuid)).status != "error"

        sweepkit.CALLS.clear()
        await set_last_validated(db, good, timedelta(hours=2))
        async with sweeping(integ, stale_after=timedelta(hours=1)) as (reports, _):
            await until(reports, 2)
        assert (reports[0].checked, reports[1].checked) == (1, 0)
        assert [c[0] for c in sweepkit.CALLS] == [SECRET]

    records = [r for r in caplog.records if r.name.startswith("integrations")]
    assert any(getattr(r, "integrations_event_kind", None) == "sweep_done" for r in records)
    for record in records:
        assert all(hasattr(record, f) for f in LOG_FIELDS), record.getMessage()
        assert SECRET[:-4] not in repr(vars(record))


async def test_tokens_close_to_expiry_are_renewed_ahead_of_use(
    fresh_db: str, db: asyncpg.Connection
) -> None:
    async with OAuthTestServer() as server:
        provider = loopback_provider(server.base_url)
        async with Integrations(
            fresh_db, keys=TEST_KEY, providers=[provider], token_backoff=0.01
        ) as integ:
            soon = await connect(integ, "soon")
            later = await connect(integ, "later")
            for uuid in (soon, later):
                assert (await integ.validate_connection(uuid)).ok
            old = await integ.access_token(soon)
            await set_stored_expiry(db, soon, 90)
            before = server.stats.token_calls["refresh_token"]
            async with sweeping(integ, refresh_ahead=120) as (reports, _):
                await until(reports, 2)
            assert (reports[0].refreshed, reports[0].checked) == (1, 0)
            assert reports[1].refreshed == 0
            assert server.stats.token_calls["refresh_token"] - before == 1
            assert await integ.access_token(soon) != old

            # Due for a check as well: renewed first, then checked with the new token.
            renewed = await integ.access_token(soon)
            await set_stored_expiry(db, soon, 90)
            before = server.stats.token_calls["refresh_token"]
            async with sweeping(integ, refresh_ahead=120, stale_after=0) as (reports, _):
                await until(reports, 1)
            assert (reports[0].refreshed, reports[0].checked, reports[0].errors) == (1, 2, 0)
            assert server.stats.token_calls["refresh_token"] - before == 1
            assert await integ.access_token(soon) != renewed


async def test_connections_awaiting_reauthorization_are_left_alone(
    fresh_db: str, db: asyncpg.Connection
) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[probe_provider()]) as integ:
        uuid = await add_probe(integ, "needs-user", SECRET)
        await db.execute(
            "UPDATE integrations.connections SET value_json = value_json || "
            '\'{"reauth_required": true, "status": "error"}\' WHERE uuid = $1',
            uuid_mod.UUID(uuid),
        )
        async with sweeping(integ, stale_after=0) as (reports, _):
            await until(reports, 1)
        assert (reports[0].examined, reports[0].checked) == (1, 0)
        assert sweepkit.CALLS == []


async def test_a_sweep_never_records_a_check_of_a_provider_this_process_does_not_know(
    fresh_db: str, db: asyncpg.Connection
) -> None:
    """A sweeping process started without the application's providers leaves their
    connections as they are: no verdict, no event."""
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[probe_provider()]) as app:
        uuid = await add_probe(app, "main", SECRET)
        assert (await app.validate_connection(uuid)).ok
        before = (await app.get_integration_by_uuid(uuid)).data
    await set_last_validated(db, uuid, timedelta(days=2))
    stale = await db.fetchval(
        "SELECT value_json->>'last_validated_at' FROM integrations.connections WHERE uuid = $1",
        uuid_mod.UUID(uuid),
    )
    sweepkit.CALLS.clear()
    async with Integrations(fresh_db, keys=TEST_KEY) as bare:
        async with (
            bare.subscribe(owner=ALL_OWNERS) as events,
            sweeping(bare, stale_after=0) as (reports, _),
        ):
            await until(reports, 2)
            assert events.pending == 0
        after = (await bare.get_integration_by_uuid(uuid)).data
    assert [(r.checked, r.check_failures, r.errors) for r in reports[:2]] == [(0, 0, 0)] * 2
    assert sweepkit.CALLS == []
    assert (after["status"], after.get("validation_status")) == (
        before["status"],
        before.get("validation_status"),
    )
    assert after.get("last_validated_at") == stale


async def test_concurrency_and_per_provider_pacing_are_honoured(fresh_db: str) -> None:
    other = probe_provider("probe2")
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[probe_provider(), other]) as integ:
        for i in range(6):
            await add_probe(integ, f"c{i}", f"key-{i}")
        for i in range(3):
            conn = await integ.add_connection("probe2", f"d{i}")
            await store_setup(integ, conn.uuid, {"api_key": f"other-{i}"})
        sweepkit.DELAY["seconds"] = 0.15
        async with sweeping(integ, stale_after=0, concurrency=2, interval=30) as (reports, _):
            await until(reports, 1)
        assert reports[0].checked == 9
        calls = list(sweepkit.CALLS)
        assert max(running(calls, at) for _, at, _ in calls) == 2

        sweepkit.CALLS.clear()
        sweepkit.DELAY["seconds"] = 0.0
        async with sweeping(
            integ, stale_after=0, concurrency=4, per_provider_interval=0.1, interval=30
        ) as (reports, _):
            await until(reports, 1)
        starts = sorted(at for key, at, _ in sweepkit.CALLS if key.startswith("key-"))
        assert len(starts) == 6
        # Spaced by the pace (unpaced they would start within a millisecond or two); the
        # probe's clock starts after the row is read, which a loaded machine can delay.
        assert all(b - a >= 0.05 for a, b in itertools.pairwise(starts))
        assert starts[-1] - starts[0] >= 0.45
        # The other provider's checks were not held up behind the first one's pacing: all
        # three started while the paced ones were still being spaced out.
        others = sorted(at for key, at, _ in sweepkit.CALLS if key.startswith("other-"))
        assert len(others) == 3 and others[-1] < starts[-1]


def running(calls: list[tuple[str, float, float]], at: float) -> int:
    return sum(1 for _, start, end in calls if start <= at < end)


async def test_bad_options_are_refused(fresh_db: str) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY) as integ:
        bad: list[tuple[dict[str, Any], type[Exception]]] = [
            ({"interval": 0, "stale_after": 1}, ValueError),
            ({"interval": "1", "stale_after": 1}, TypeError),
            ({"interval": 1, "stale_after": -1}, ValueError),
            ({"interval": 1, "stale_after": float("nan")}, ValueError),
            ({"interval": 1, "stale_after": 1, "concurrency": 0}, ValueError),
            ({"interval": 1, "stale_after": 1, "concurrency": True}, TypeError),
            ({"interval": 1, "stale_after": 1, "per_provider_interval": -1}, ValueError),
            ({"interval": 1, "stale_after": 1, "on_sweep": "print"}, TypeError),
        ]
        for options, kind in bad:
            with pytest.raises(kind):
                await integ.run_health_sweeps(**options)


async def test_close_ends_the_sweeps_and_gives_up_the_lease(fresh_db: str) -> None:
    integ = Integrations(fresh_db, keys=TEST_KEY, providers=[probe_provider()])
    await integ.open()
    reports: list[SweepReport] = []
    task = asyncio.create_task(
        integ.run_health_sweeps(interval=0.2, stale_after=0, on_sweep=reports.append)
    )
    await until(reports, 1)
    await asyncio.wait_for(integ.close(), 10)
    await asyncio.wait_for(task, 5)
    assert task.result() is None
    # The lease went with it: another instance leads at once.
    async with (
        Integrations(fresh_db, keys=TEST_KEY, providers=[probe_provider()]) as other,
        sweeping(other) as (later, _),
    ):
        await until(later, 1)


async def test_two_instances_in_one_process_do_not_sweep_together(fresh_db: str) -> None:
    async with (
        Integrations(fresh_db, keys=TEST_KEY, providers=[probe_provider()]) as one,
        Integrations(fresh_db, keys=TEST_KEY, providers=[probe_provider()]) as two,
    ):
        await add_probe(one, "x", SECRET)
        async with (
            sweeping(one, interval=0.2) as (first, _),
            sweeping(two, interval=0.2) as (
                second,
                _,
            ),
        ):
            await eventually(lambda: len(first) + len(second) >= 4, within=20)
        assert not (first and second)


# -- several processes -------------------------------------------------------------------------


INTERVAL = 1.0
# Scheduling slack on a loaded machine: reading the child's pipe, starting its sweep.
SLACK = 0.5


async def _read_lines(proc: asyncio.subprocess.Process, into: list[dict[str, Any]]) -> None:
    assert proc.stdout is not None
    async for line in proc.stdout:
        into.append(json.loads(line))


async def _start_child(dsn: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        "--dsn",
        dsn,
        "--key",
        TEST_KEY,
        "--interval",
        str(INTERVAL),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(CHILD.parent.parent)},
    )


async def test_one_process_of_three_sweeps_and_another_takes_over_after_sigkill(
    fresh_db: str,
) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[probe_provider()]) as integ:
        for i in range(3):
            await add_probe(integ, f"c{i}", f"key-{i}")
    lines: list[dict[str, Any]] = []
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(CHILD),
            "--dsn",
            fresh_db,
            "--key",
            TEST_KEY,
            "--interval",
            str(INTERVAL),
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(CHILD.parent.parent)},
        )
        for _ in range(3)
    ]
    readers = [asyncio.create_task(_read_lines(p, lines)) for p in procs]

    def sweeps() -> list[dict[str, Any]]:
        return [line for line in lines if "start" in line]

    def pids_after(at: float) -> set[int]:
        return {s["pid"] for s in sweeps() if s["start"] >= at}

    try:
        await eventually(lambda: sum("ready" in line for line in lines) == 3, within=60)
        ready_at = time.time()
        await eventually(lambda: len(sweeps()) >= 4, within=30)
        leaders = {s["pid"] for s in sweeps()}
        assert len(leaders) == 1, "exactly one process sweeps"
        [leader] = leaders
        assert all(s["checked"] == 3 for s in sweeps())
        assert sweeps()[0]["start"] - ready_at < INTERVAL + SLACK

        victim = next(p for p in procs if p.pid == leader)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.time()
        await victim.wait()
        await eventually(lambda: pids_after(killed_at), within=10)
        takeover = min(s["start"] for s in sweeps() if s["start"] >= killed_at)
        # The dead leader's lease runs out (one interval), then the next try takes it.
        assert takeover - killed_at <= 2 * INTERVAL + SLACK
        [successor] = pids_after(killed_at)
        assert successor != leader

        await asyncio.sleep(3 * INTERVAL)
        assert pids_after(killed_at) == {successor}, "still exactly one"
        ordered = sorted(sweeps(), key=lambda s: s["start"])
        for earlier, later in itertools.pairwise(ordered):
            assert earlier["end"] <= later["start"], "two sweeps overlapped"
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
        for proc in procs:
            await proc.wait()
        for reader in readers:
            await asyncio.wait({reader}, timeout=5)


async def test_a_leader_that_finds_its_lease_taken_stops_at_once(
    fresh_db: str, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[probe_provider()]) as integ:
        await add_probe(integ, "one", SECRET)
        async with sweeping(integ, interval=0.1) as (reports, task):
            await until(reports, 2)
            # Another holder takes the lease for 4 s (as one whose clock ran ahead would).
            await db.execute(
                "UPDATE integrations.leases SET holder = gen_random_uuid(), "
                "expires_at = clock_timestamp() + interval '4 seconds'"
            )
            taken_at = datetime.now(UTC)
            await asyncio.sleep(3.5)
            during = [r for r in reports if r.started_at >= taken_at]
            # The lease lasts one second (the shortest) and is renewed three times in
            # it: the leader learns of the takeover within a third of a second and by its
            # own clock can lead no longer than the lease it last renewed.
            assert all(r.started_at - taken_at < timedelta(seconds=1) for r in during)
            seen = len(reports)
            await until(reports, seen + 2)  # the foreign lease ran out: it leads again
            assert not task.done()
    kinds = [getattr(r, "integrations_event_kind", None) for r in caplog.records]
    assert "sweep_lead_lost" in kinds


async def test_a_sigstopped_leader_is_replaced_and_does_not_sweep_once_resumed(
    fresh_db: str,
) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[probe_provider()]) as integ:
        for i in range(3):
            await add_probe(integ, f"c{i}", f"key-{i}")
    lines: list[dict[str, Any]] = []
    procs = [await _start_child(fresh_db) for _ in range(3)]
    readers = [asyncio.create_task(_read_lines(p, lines)) for p in procs]

    def checks(pid: int | None = None) -> list[dict[str, Any]]:
        return [x for x in lines if "check" in x and (pid is None or x["pid"] == pid)]

    try:
        await eventually(lambda: sum("ready" in line for line in lines) == 3, within=60)
        await eventually(lambda: len([x for x in lines if "start" in x]) >= 2, within=30)
        [leader] = {x["pid"] for x in lines if "start" in x}
        victim = next(p for p in procs if p.pid == leader)
        victim.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        await eventually(
            lambda: any(x["pid"] != leader and x["at"] >= stopped_at for x in checks()),
            within=15,
        )
        takeover = min(x["at"] for x in checks() if x["pid"] != leader and x["at"] >= stopped_at)
        assert takeover - stopped_at <= 2 * INTERVAL + SLACK
        successors = {x["pid"] for x in checks() if x["at"] >= stopped_at}
        assert len(successors) == 1 and leader not in successors

        victim.send_signal(signal.SIGCONT)
        resumed_at = time.time()
        await asyncio.sleep(3 * INTERVAL)
        # Resumed, the old leader sees by its own clock that its lease ran out: it starts
        # no check, while the new leader goes on.
        assert [x for x in checks(leader) if x["at"] >= stopped_at] == []
        assert any(x["at"] >= resumed_at + INTERVAL for x in checks(successors.pop()))
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
        for proc in procs:
            await proc.wait()
        for reader in readers:
            await asyncio.wait({reader}, timeout=5)


async def test_a_sweep_folds_the_count_deltas_no_reader_folded(
    fresh_db: str, db: asyncpg.Connection
) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[probe_provider()]) as integ:
        for i in range(6):
            await integ.add_connection("probe", f"p{i}", owner="carol")
        deltas = "SELECT count(*) FROM integrations.connection_counts WHERE scope = 'o:carol'"
        assert await db.fetchval(deltas) == 6
        async with sweeping(integ) as (reports, _):
            await until(reports, 1)
        assert await db.fetchval(deltas) == 1
        assert await integ.for_owner("carol").count_connections() == {"probe": 6}
