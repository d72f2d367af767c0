"""Refresh coalescing across OS processes: four workers, one database, one strict server process."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import uuid as uuid_mod
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from integrations import Integrations

from .conftest import TEST_KEY, settle
from .oauth_server import ServerProcess
from .oauthkit import connect, loopback_provider, open_integrations

pytestmark = pytest.mark.slow

CHILD = Path(__file__).resolve().parent / "refresh_child.py"
WORKERS = 4
PER_WORKER = 25


@pytest.fixture(scope="module")
def server_process() -> Iterator[ServerProcess]:
    with ServerProcess() as proc:
        yield proc


@pytest.fixture
def server(server_process: ServerProcess) -> ServerProcess:
    server_process.reset()
    return server_process


@pytest.fixture
async def integ(fresh_db: str, server: ServerProcess) -> AsyncIterator[Integrations]:
    async with open_integrations(fresh_db, server.base_url) as instance:
        yield instance


class Worker:
    """One child process with its own Integrations, waiting for the start signal."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls,
        dsn: str,
        base_url: str,
        uuid: str,
        *,
        mode: str = "request",
        count: int = 25,
        extra: tuple[str, ...] = (),
    ) -> Worker:
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
            mode,
            "--count",
            str(count),
            "--lock-timeout",
            "10",
            *extra,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        worker = cls(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"ready", line
        return worker

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    async def result(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        assert await asyncio.wait_for(self.proc.wait(), 30) == 0
        outcome: dict[str, Any] = json.loads(line)
        return outcome

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)


async def _storm(
    dsn: str, server: ServerProcess, uuid: str, mode: str, extra: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    workers = await asyncio.gather(
        *(Worker.start(dsn, server.base_url, uuid, mode=mode, extra=extra) for _ in range(WORKERS))
    )
    # Every worker is open and waiting: release them together.
    for worker in workers:
        worker.go()
    outcomes = await asyncio.gather(*(w.result() for w in workers))
    return [r for outcome in outcomes for r in outcome["results"]]


async def _expire_locally(db: asyncpg.Connection, uuid: str) -> None:
    past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    await db.execute(
        "UPDATE integrations.connections "
        "SET value_json = jsonb_set(value_json, '{expires_at}', to_jsonb($2::text)) "
        "WHERE uuid = $1",
        uuid_mod.UUID(uuid),
        past,
    )
    await settle()


async def test_four_processes_with_an_expired_token_make_one_token_request(
    integ: Integrations, server: ServerProcess, fresh_db: str, db: asyncpg.Connection
) -> None:
    uuid = await connect(integ)
    await _expire_locally(db, uuid)
    # A slow token endpoint keeps the first refresh open while the others pile up.
    server.configure(token_delay=0.3)
    results = await _storm(fresh_db, server, uuid, "request")
    assert len(results) == WORKERS * PER_WORKER
    assert [r["status"] for r in results] == [200] * len(results)
    stats = server.stats()
    assert stats["token_calls"].get("refresh_token") == 1
    assert stats["grants_revoked"] == 0
    assert stats["api_rejected"] == 0
    stored = await integ.get_integration(uuid)
    assert {r["token_id"] for r in results} == {_token_id(stored["access_token"])}


async def test_four_processes_on_the_401_path_make_one_token_request(
    integ: Integrations, server: ServerProcess, fresh_db: str
) -> None:
    uuid = await connect(integ)
    # The tokens still look valid locally; only the server knows they expired.
    assert server.expire_access_tokens() >= 1
    server.configure(token_delay=0.3)
    results = await _storm(fresh_db, server, uuid, "request")
    assert [r["status"] for r in results] == [200] * (WORKERS * PER_WORKER)
    stats = server.stats()
    assert stats["token_calls"].get("refresh_token") == 1
    assert stats["grants_revoked"] == 0
    assert stats["refresh_reuse_detected"] == 0


async def test_four_processes_refreshing_explicitly_share_one_token_request(
    integ: Integrations, server: ServerProcess, fresh_db: str
) -> None:
    uuid = await connect(integ)
    # Each call returns a token obtained after it began: the one request, answered a
    # second after the start signal, is that for every worker however late it wakes up.
    server.configure(token_delay=1.0)
    results = await _storm(fresh_db, server, uuid, "refresh")
    assert all(r["status"] == 200 for r in results), results
    stats = server.stats()
    # Every call began before the one request did, so that request serves them all.
    assert stats["token_calls"].get("refresh_token", 0) == 1
    assert stats["grants_revoked"] == 0


async def test_four_failing_processes_do_not_stampede(
    integ: Integrations, server: ServerProcess, fresh_db: str, db: asyncpg.Connection
) -> None:
    uuid = await connect(integ)
    await _expire_locally(db, uuid)
    server.configure(force_invalid_client=True, token_delay=1.0)
    results = await _storm(fresh_db, server, uuid, "access_token")
    assert {r.get("error") for r in results} == {"reauth_required"}
    assert server.stats()["token_calls"].get("refresh_token") == 1
    data = await integ.get_integration(uuid)
    assert (data["status"], data["reauth_required"]) == ("error", True)


async def test_a_killed_refreshing_process_holds_no_lock_and_its_lease_runs_out(
    integ: Integrations, server: ServerProcess, fresh_db: str, db: asyncpg.Connection
) -> None:
    uuid = await connect(integ)
    # Without rotation the refresh token the killed process sent stays good, as with
    # providers that do not rotate; with rotation it would be spent (see docs/oauth.md).
    server.configure(rotate_refresh_tokens=False, token_delay=5.0)
    lease = 2.0
    victim = await Worker.start(
        fresh_db, server.base_url, uuid, mode="refresh", count=1, extra=("--lease", str(lease))
    )
    victim.go()
    deadline = time.monotonic() + 20
    while server.stats()["token_calls"].get("refresh_token", 0) < 1:
        assert time.monotonic() < deadline, "the worker never reached the token endpoint"
        await asyncio.sleep(0.02)
    holders = await db.fetchval(
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
        "WHERE c.relname = 'connections' AND l.granted"
    )
    assert holders == 0, "no lock is held while the worker waits for the token endpoint"
    stored = await db.fetchval(
        "SELECT value_json -> 'refresh_lease' ->> 'holder' FROM integrations.connections "
        "WHERE uuid = $1",
        uuid_mod.UUID(uuid),
    )
    assert stored is not None and stored.split(":")[1] == str(victim.proc.pid)
    victim.kill()
    assert await asyncio.wait_for(victim.proc.wait(), 10) == -signal.SIGKILL
    server.configure(token_delay=0.0)

    before = (await integ.get_integration(uuid))["access_token"]
    # The process that takes over knows the provider keeps refresh tokens valid.
    provider = loopback_provider(server.base_url, rotates_refresh_tokens=False)
    async with open_integrations(
        fresh_db, server.base_url, providers=[provider], token_write_retry=0.5
    ) as taker:
        started = time.monotonic()
        token = await taker.refresh_access_token(uuid)
        waited = time.monotonic() - started
        # Its lease ran out, then the killed holder's time to write: taken over.
        assert waited < lease + 0.5 + 2, "the lease ran out and was taken over"
        assert token != before
        assert server.stats()["token_calls"]["refresh_token"] == 2
        response = await taker.authenticated_request(uuid, "GET", f"{server.base_url}/api/resource")
        assert response.status == 200
        assert (await taker.get_integration_by_uuid(uuid)).status == "connected"


def _token_id(token: str) -> str:
    from .oauth_server import token_id

    return token_id(token)
