"""The refresh fault suite: a private PostgreSQL this module starts (stopped and restarted
at will), a strict provider in its own process that revokes a grant when a spent refresh
token comes back, and several worker processes refreshing one connection at once (and a
writer process frozen with row locks held).

Each scenario counts the token requests the provider saw, the grants it revoked, the
callers that got a token (and the errors of the others) and how long they waited. Waits
are recorded, not bounded: ``INTEGRATIONS_FAULT_RESULTS=/path.jsonl`` appends one JSON
line per scenario to that file (with ``-s`` they are printed too).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from integrations import Integrations, IntegrationsError

from .conftest import TEST_KEY
from .faultproxy import FaultProxy
from .oauth_server import ServerProcess
from .oauthkit import connect, open_integrations
from .privatepg import PrivateServer
from .test_refresh_processes import _expire_locally

pytestmark = pytest.mark.slow

CHILD = Path(__file__).resolve().parent / "refresh_child.py"
WRITER = Path(__file__).resolve().parent / "writer_child.py"
TAKERS = 2
PER_TAKER = 5
#: How long a holder stays frozen (SIGSTOP), and the database stays away.
FREEZE = 8.0
OUTAGE = 20.0
#: Settings that make a dead holder's lease, and its time to write, run out soon.
SHORT = ("--lease", "1", "--write-retry", "1")


@pytest.fixture(scope="module")
def pg() -> Iterator[PrivateServer]:
    server = PrivateServer()
    server.init()
    server.start()
    yield server
    server.remove()


@pytest.fixture
async def dsn(pg: PrivateServer) -> AsyncIterator[str]:
    if not pg.running():  # a failed test may have left it stopped
        await asyncio.to_thread(pg.start)
    name = f"faults_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pg.dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield pg.dsn(name)
    if not pg.running():
        await asyncio.to_thread(pg.start)
    admin = await asyncpg.connect(pg.dsn())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def server_process() -> Iterator[ServerProcess]:
    with ServerProcess() as proc:
        yield proc


@pytest.fixture
def strict(server_process: ServerProcess) -> ServerProcess:
    server_process.reset()
    return server_process


def _state(pid: int) -> str:
    """A process's state letter (``T``: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


class Child:
    """A ``refresh_child.py`` process: its own Integrations, waiting for the start signal."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.killed = False

    @classmethod
    async def start(cls, dsn: str, base_url: str, uuid: str, count: int, *extra: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(CHILD),
            "--dsn",
            dsn,
            "--key",
            TEST_KEY,
            "--base-url",
            base_url,
            "--uuid",
            uuid,
            "--mode",
            "access_token",
            "--count",
            str(count),
            *extra,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.strip() == b"ready", line
        return cls(proc)

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    def stopped(self) -> bool:
        """Whether the process is stopped (it stops itself with ``--stop-at``)."""
        return _state(self.proc.pid) == "T"

    async def until_stopped(self) -> None:
        deadline = time.monotonic() + 30
        while not self.stopped():
            assert time.monotonic() < deadline, "the worker never reached its stop point"
            await asyncio.sleep(0.01)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.killed = True

    async def outcome(self) -> dict[str, Any] | None:
        """Its JSON line once it exits, None when it was killed."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 100)
        code = await asyncio.wait_for(self.proc.wait(), 100)
        if self.killed:
            assert code == -signal.SIGKILL
            return None
        assert code == 0, line
        found: dict[str, Any] = json.loads(line)
        return found

    def end(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()


@dataclass
class Run:
    """A holder process (whose refresh meets the fault) and takers that need a token too."""

    dsn: str
    strict: ServerProcess
    uuid: str
    holder: Child
    takers: list[Child]
    started: float = field(default_factory=time.monotonic)

    @classmethod
    async def start(
        cls,
        dsn: str,
        strict: ServerProcess,
        *,
        holder: tuple[str, ...] = (),
        takers: tuple[str, ...] = (),
        holder_dsn: str | None = None,
    ) -> Run:
        async with open_integrations(dsn, strict.base_url) as setup:
            uuid = await connect(setup)
        db = await asyncpg.connect(dsn)
        try:
            await _expire_locally(db, uuid)  # every process needs a refresh
        finally:
            await db.close()
        children = await asyncio.gather(
            Child.start(holder_dsn or dsn, strict.base_url, uuid, 1, *holder),
            *(Child.start(dsn, strict.base_url, uuid, PER_TAKER, *takers) for _ in range(TAKERS)),
        )
        return cls(dsn, strict, uuid, children[0], list(children[1:]))

    def go(self) -> None:
        self.started = time.monotonic()
        self.holder.go()

    def release_takers(self) -> None:
        for taker in self.takers:
            taker.go()

    async def until_sent(self) -> None:
        deadline = time.monotonic() + 30
        while self.strict.stats()["token_calls"].get("refresh_token", 0) < 1:
            assert time.monotonic() < deadline, "the holder never reached the token endpoint"
            await asyncio.sleep(0.01)

    async def finish(self, scenario: str) -> Figures:
        outcomes = await asyncio.gather(
            self.holder.outcome(), *(taker.outcome() for taker in self.takers)
        )
        results: list[dict[str, Any]] = []
        waits: list[float] = []
        for outcome in outcomes:
            if outcome is not None:
                results += outcome["results"]
                waits += outcome["waits"]
        stats = self.strict.stats()
        async with open_integrations(self.dsn, self.strict.base_url) as reader:
            stored = await reader.get_integration_by_uuid(self.uuid)
            data = await reader.get_integration(self.uuid)
            usable = False
            if stored.status == "connected":
                response = await reader.authenticated_request(
                    self.uuid, "GET", f"{self.strict.base_url}/api/resource"
                )
                usable = response.status == 200
        figures = Figures(
            scenario=scenario,
            token_requests=stats["token_calls"].get("refresh_token", 0),
            grants_revoked=stats["grants_revoked"],
            reuse_detected=stats["refresh_reuse_detected"],
            callers_ok=sum(1 for r in results if r["status"] == 200),
            callers_failed=dict(Counter(r["error"] for r in results if r["status"] != 200)),
            holder_killed=self.holder.killed,
            max_wait=round(max(waits, default=0.0), 2),
            status=stored.status,
            grant_usable=usable,
            refresh_error=data.get("refresh_error"),
        )
        figures.record()
        return figures

    def end(self) -> None:
        for child in (self.holder, *self.takers):
            child.end()


@dataclass
class Figures:
    scenario: str
    token_requests: int
    grants_revoked: int
    reuse_detected: int
    callers_ok: int
    callers_failed: dict[str, int]
    holder_killed: bool
    max_wait: float
    status: str
    grant_usable: bool
    refresh_error: Any = None

    @property
    def callers(self) -> int:
        return self.callers_ok + sum(self.callers_failed.values())

    def record(self) -> None:
        line = {k: v for k, v in self.__dict__.items() if k != "refresh_error"}
        error = self.refresh_error
        if isinstance(error, dict):
            line["recorded"] = {k: error.get(k) for k in ("code", "transient")}
        _record(line)


def _record(line: dict[str, Any]) -> None:
    print(f"\n[fault] {json.dumps(line)}")
    target = os.environ.get("INTEGRATIONS_FAULT_RESULTS")
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


@pytest.fixture
async def runs() -> AsyncIterator[list[Run]]:
    started: list[Run] = []
    yield started
    for run in started:
        run.end()
        for child in (run.holder, *run.takers):
            await child.proc.wait()


def _kept(figures: Figures, callers: int) -> None:
    """One token request, nothing revoked, every caller served, the grant still good."""
    assert figures.token_requests == 1, figures
    assert figures.grants_revoked == 0 and figures.reuse_detected == 0, figures
    assert figures.callers_ok == callers, figures
    assert (figures.status, figures.grant_usable) == ("connected", True), figures


def _lost_with_the_holder(figures: Figures) -> None:
    """The holder died with the only copy of the new tokens: the spent refresh token is
    not sent again (nothing revoked); the connection waits for a new authorization."""
    assert figures.token_requests == 1, figures
    assert figures.grants_revoked == 0 and figures.reuse_detected == 0, figures
    assert figures.callers_ok == 0, figures
    assert set(figures.callers_failed) == {"reauth_required"}, figures
    assert figures.status == "error", figures
    assert figures.refresh_error["code"] == "reauth_required"


# -- the database away while a refresh is out (default lease and write retry) -------------


@pytest.mark.parametrize("down", [0.0, OUTAGE], ids=["restart", "stop-20s"])
@pytest.mark.parametrize("when", ["in-flight", "answered"])
async def test_the_database_away_during_a_refresh_costs_no_grant(
    dsn: str,
    strict: ServerProcess,
    pg: PrivateServer,
    runs: list[Run],
    when: str,
    down: float,
) -> None:
    """The database stops (a crash: immediate shutdown) while the token request is out, or
    after its answer came and before it was stored, and comes back at once or after 20 s,
    longer than the default 15 s lease. The holder keeps the new tokens and writes them
    again; the processes that look at the row as the database returns find its lease run
    out but marked as sending, and wait for the holder's write rather than send the spent
    refresh token."""
    stop_at = ("--stop-at", "answer") if when == "answered" else ()
    run = await Run.start(dsn, strict, holder=stop_at)
    runs.append(run)
    if when == "in-flight":
        strict.configure(token_delay=2.0, delay_next=1)
    run.go()
    if when == "answered":
        await run.holder.until_stopped()
    else:
        await run.until_sent()
    await asyncio.to_thread(pg.kill)
    if when == "answered":
        run.holder.signal(signal.SIGCONT)  # its write fails: the database is away
    await asyncio.sleep(down)
    await asyncio.to_thread(pg.start)
    run.release_takers()
    figures = await run.finish(f"database {('restart' if not down else 'stopped 20s')} {when}")
    # The holder's own call got its token while the database was away: handing it out is a
    # reveal, refused when its audit record cannot be written (docs/audit.md).
    assert figures.callers_failed in ({}, {"audit_failed": 1}), figures
    _kept(figures, figures.callers_ok)
    assert figures.callers_ok >= TAKERS * PER_TAKER, figures


# -- the holder frozen or killed -----------------------------------------------------------


async def _holder_meets(run: Run, at: str) -> None:
    """Start the holder's refresh and wait for it to reach ``at``."""
    run.go()
    if at == "in-flight":
        await run.until_sent()
    else:
        await run.holder.until_stopped()


def _stop_args(at: str) -> tuple[str, ...]:
    return () if at == "in-flight" else ("--stop-at", at)


@pytest.mark.parametrize("at", ["before", "in-flight", "answer"])
async def test_a_holder_frozen_keeps_the_grant_and_its_waiters_are_served(
    dsn: str, strict: ServerProcess, runs: list[Run], at: str
) -> None:
    """SIGSTOP for 8 s, with the default lease (15 s) and write retry (60 s): before the
    sending mark, with the request out, or between the answer and its write. The others
    wait for it; when it resumes it sends (or stores) and they all get its token."""
    run = await Run.start(dsn, strict, holder=_stop_args(at))
    runs.append(run)
    if at == "in-flight":
        strict.configure(token_delay=1.0, delay_next=1)
    await _holder_meets(run, at)
    run.holder.signal(signal.SIGSTOP)  # (already stopped at the other points)
    run.release_takers()
    await asyncio.sleep(FREEZE)
    run.holder.signal(signal.SIGCONT)
    figures = await run.finish(f"holder SIGSTOP {FREEZE:g}s {at}")
    _kept(figures, 1 + TAKERS * PER_TAKER)


async def test_a_holder_whose_database_link_freezes_keeps_the_grant(
    dsn: str, strict: ServerProcess, pg: PrivateServer, runs: list[Run]
) -> None:
    """The holder reaches the database through a proxy that stops forwarding (and closes
    nothing) for 8 s while its token request is out: the answer comes, its write waits on
    the frozen link, and goes through once the link flows again. The others, on their
    own links, wait for it (default lease and write retry) and get its token."""
    async with FaultProxy("127.0.0.1", pg.port) as proxy:
        run = await Run.start(dsn, strict, holder_dsn=proxy.dsn(dsn))
        runs.append(run)
        strict.configure(token_delay=1.0, delay_next=1)
        run.go()
        await run.until_sent()
        proxy.pause()
        run.release_takers()
        await asyncio.sleep(FREEZE)
        proxy.resume()
        figures = await run.finish(f"holder's database link frozen {FREEZE:g}s in-flight")
    _kept(figures, 1 + TAKERS * PER_TAKER)


@pytest.mark.parametrize(
    ("at", "takeover"),
    [
        ("before", "refresh"),
        ("before", "reauthorize"),
        ("in-flight", "refresh"),
        ("answer", "refresh"),
    ],
)
async def test_a_holder_killed_never_gets_its_spent_refresh_token_sent_again(
    dsn: str, strict: ServerProcess, runs: list[Run], at: str, takeover: str
) -> None:
    """SIGKILL (lease 1 s, write retry 1 s). Before the sending mark nothing was sent: the
    next process asks, under either takeover policy. Once the request went out, the holder
    died with the only copy of the new tokens: the rotating provider is never sent the
    spent refresh token again, and the connection is marked for a new authorization."""
    policy = ("--takeover", takeover)
    run = await Run.start(
        dsn, strict, holder=(*SHORT, *policy, *_stop_args(at)), takers=(*SHORT, *policy)
    )
    runs.append(run)
    if at == "in-flight":
        strict.configure(token_delay=2.0, delay_next=1)
    await _holder_meets(run, at)
    run.holder.signal(signal.SIGKILL)
    run.release_takers()
    figures = await run.finish(f"holder SIGKILL {at} ({takeover})")
    if at == "before":
        # The holder sent nothing; one taker asked.
        _kept(figures, TAKERS * PER_TAKER)
    else:
        _lost_with_the_holder(figures)


# -- a token endpoint slower than token_timeout ----------------------------------------------


async def test_a_token_request_that_timed_out_is_recorded_as_maybe_spent_and_not_resent(
    dsn: str, strict: ServerProcess, runs: list[Run]
) -> None:
    """The endpoint answers after 2.5 s, the processes wait 1 s (``token_timeout``): the
    request may have been received and its refresh token spent. It is not sent again by
    the holder nor by the processes waiting on its lease, and the recorded failure says
    the connection must be authorized again, not that it was a transient error."""
    slow = ("--token-timeout", "1")
    run = await Run.start(dsn, strict, holder=slow, takers=slow)
    runs.append(run)
    strict.configure(token_delay=2.5)
    run.go()
    await run.until_sent()
    run.release_takers()
    await asyncio.sleep(2.0)  # the provider's answer, to no one
    figures = await run.finish("token endpoint 2.5s > token_timeout 1s")
    assert figures.token_requests == 1, figures
    assert figures.grants_revoked == 0 and figures.reuse_detected == 0, figures
    assert figures.callers_ok == 0 and set(figures.callers_failed) == {"reauth_required"}
    recorded = figures.refresh_error
    assert recorded["code"] == "reauth_required" and not recorded.get("transient"), recorded
    assert "may have received" in recorded["message"], recorded


# -- a writer frozen mid-transaction ---------------------------------------------------------


async def test_a_frozen_writer_process_holds_its_row_locks_no_longer_than_the_idle_limit(
    dsn: str,
) -> None:
    """A process holding four write transactions open (row locks taken) is stopped. With
    the default lock timeout (30 s) the server ends each after the idle limit (5 s): the
    writes of two other instances to those rows go through while it is still frozen."""
    async with (
        Integrations(dsn, keys=TEST_KEY) as first,
        Integrations(dsn, keys=TEST_KEY) as second,
    ):
        uuids = [(await first.add_connection("openai", f"held-{i}")).uuid for i in range(4)]
        writer = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WRITER),
            "--dsn",
            dsn,
            "--key",
            TEST_KEY,
            *(arg for uuid in uuids for arg in ("--uuid", uuid)),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert writer.stdout is not None
            line = await asyncio.wait_for(writer.stdout.readline(), 60)
            assert line.strip() == b"holding", line
            writer.send_signal(signal.SIGSTOP)
            outcomes: list[tuple[str | None, float]] = []

            async def save(integ: Integrations, uuid: str, n: int) -> None:
                began = time.monotonic()
                try:
                    await integ.save_setup(uuid, {"api_key": f"sk-after-freeze-{n}-0123456789"})
                    outcomes.append((None, time.monotonic() - began))
                except IntegrationsError as exc:
                    outcomes.append((exc.code, time.monotonic() - began))

            await asyncio.gather(
                *(save(integ, uuid, n) for n, integ in enumerate((first, second)) for uuid in uuids)
            )
            db = await asyncpg.connect(dsn)
            try:
                idle = await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' "
                    "AND datname = current_database()"
                )
            finally:
                await db.close()
            still_frozen = _state(writer.pid)
        finally:
            writer.send_signal(signal.SIGKILL)
            await writer.wait()
    failed = Counter(code for code, _ in outcomes if code is not None)
    _record(
        {
            "scenario": "writer process frozen holding 4 row locks (lock_timeout 30s)",
            "callers_ok": sum(1 for code, _ in outcomes if code is None),
            "callers_failed": dict(failed),
            "max_wait": round(max(w for _, w in outcomes), 2),
            "idle_in_transaction_after": idle,
        }
    )
    assert still_frozen == "T", "the writes went through while the writer was frozen"
    assert [code for code, _ in outcomes] == [None] * 8
    assert idle == 0
