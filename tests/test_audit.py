"""The audit trail: what each level records, the hash chain and its verification, the
use buffer, retention, paging and owner scope, on the real database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from integrations import Integrations, InvalidArgument, Provider, acting_as

from .conftest import TEST_KEY

SECRET = "sk-audit-SECRETVALUE-0123456789"
ECHO = Provider(key="echo", name="Echo", auth_type="api_key", api_hosts=("127.0.0.1",))


async def _table(dsn: str) -> list[asyncpg.Record]:
    db = await asyncpg.connect(dsn)
    try:
        return await db.fetch(
            "SELECT *, detail::text AS d FROM integrations.audit_log ORDER BY seq"
        )
    finally:
        await db.close()


@pytest.fixture
async def echo_url() -> AsyncIterator[str]:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({}, status=int(request.query.get("status", "200")))

    app = web.Application()
    app.router.add_get("/v1/echo", answer)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("/v1/echo"))


async def test_default_level_records_changes_and_reveals_never_values(fresh_db: str) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY) as integ:
        conn = await integ.add_connection("openai", "main", actor="alice")
        await integ.save_setup(conn.uuid, {"api_key": SECRET}, actor="alice")
        with acting_as("batch-job"):
            await integ.get_credentials(conn.uuid)
        await integ.rename_connection(conn.uuid, "renamed", actor="bob")
        page = await integ.audit(uuid=conn.uuid)
    actions = [r.action for r in reversed(page.records)]
    assert actions == [
        "connection.added",
        "setup.saved",
        "credentials.revealed",
        "connection.renamed",
    ]
    added, saved, revealed, renamed = reversed(page.records)
    assert added.actor == "alice" and added.provider == "openai" and added.outcome == "ok"
    assert saved.detail == {"fields": ["api_key"]}
    assert revealed.actor == "batch-job" and revealed.detail == {"call": "get_credentials"}
    assert renamed.actor == "bob"
    rows = await _table(fresh_db)
    assert all(SECRET not in str(dict(r)) for r in rows)


async def test_admin_level_leaves_reveals_out(fresh_db: str) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY, audit="admin") as integ:
        conn = await integ.add_connection("openai", "main")
        await integ.save_setup(conn.uuid, {"api_key": SECRET})
        await integ.get_credentials(conn.uuid)
        page = await integ.audit()
    assert [r.action for r in page.records] == ["setup.saved", "connection.added"]


async def test_use_level_records_requests_without_the_path(fresh_db: str, echo_url: str) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[ECHO], audit="use") as integ:
        conn = await integ.add_connection("echo", "default")
        await integ.save_setup(conn.uuid, {"api_key": SECRET})
        await integ.authenticated_request(conn.uuid, "GET", echo_url + "?token=path-secret")
        await integ.authenticated_request(conn.uuid, "GET", echo_url + "?status=403")
        page = await integ.audit(action="request")
    second, first = page.records
    assert first.detail == {"method": "GET", "host": "127.0.0.1", "status": 200}
    assert first.outcome == "ok" and second.outcome == "http_403"
    assert all("path-secret" not in str(dict(r)) for r in await _table(fresh_db))


async def test_reveal_level_records_no_use(fresh_db: str, echo_url: str) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[ECHO]) as integ:
        conn = await integ.add_connection("echo", "default")
        await integ.save_setup(conn.uuid, {"api_key": SECRET})
        await integ.authenticated_request(conn.uuid, "GET", echo_url)
        assert (await integ.audit(action="request")).records == []


async def test_a_full_buffer_drops_the_oldest_uses_and_records_the_count(
    fresh_db: str, echo_url: str
) -> None:
    async with Integrations(
        fresh_db, keys=TEST_KEY, providers=[ECHO], audit="use", audit_buffer=5
    ) as integ:
        conn = await integ.add_connection("echo", "default")
        await integ.save_setup(conn.uuid, {"api_key": SECRET})
        # Sent together: the buffer holds 5, the rest of the 20 are counted as dropped.
        await asyncio.gather(
            *(integ.authenticated_request(conn.uuid, "GET", echo_url) for _ in range(20))
        )
        uses = (await integ.audit(action="request.sent")).records
        dropped = (await integ.audit(action="audit.dropped")).records
    assert len(uses) + sum(r.detail["use_records"] for r in dropped) == 20
    assert dropped and len(uses) >= 5


async def test_use_records_are_written_in_batches_and_at_close(
    fresh_db: str, echo_url: str
) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[ECHO], audit="use") as integ:
        conn = await integ.add_connection("echo", "default")
        await integ.save_setup(conn.uuid, {"api_key": SECRET})
        for _ in range(30):
            await integ.authenticated_request(conn.uuid, "GET", echo_url)
    rows = await _table(fresh_db)
    assert sum(r["action"] == "request.sent" for r in rows) == 30


async def test_verify_names_an_edited_a_deleted_and_a_swapped_record(fresh_db: str) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY) as integ:
        conn = await integ.add_connection("openai", "main")
        for _ in range(8):
            await integ.save_setup(conn.uuid, {"api_key": SECRET})
        assert await integ.verify_audit() == []
        db = await asyncpg.connect(fresh_db)
        try:
            # Past the append-only trigger, as someone with the table's ownership would be.
            await db.execute("ALTER TABLE integrations.audit_log DISABLE TRIGGER USER")
            await db.execute("UPDATE integrations.audit_log SET actor = 'mallory' WHERE seq = 3")
            await db.execute("DELETE FROM integrations.audit_log WHERE seq = 5")
            await db.execute(
                "UPDATE integrations.audit_log SET seq = -1 WHERE seq = 7;"
                "UPDATE integrations.audit_log SET seq = 7 WHERE seq = 8;"
                "UPDATE integrations.audit_log SET seq = 8 WHERE seq = -1;"
            )
        finally:
            await db.close()
        breaches = await integ.verify_audit()
    found = {(b.seq, b.kind) for b in breaches}
    assert (3, "changed") in found
    assert (5, "removed") in found
    assert (7, "reordered") in found
    assert "record 3 was changed" in " ".join(b.message for b in breaches)


async def test_the_log_refuses_update_and_delete(fresh_db: str) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY) as integ:
        await integ.add_connection("openai", "main")
    db = await asyncpg.connect(fresh_db)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await db.execute("UPDATE integrations.audit_log SET actor = 'x'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await db.execute("DELETE FROM integrations.audit_log")
    finally:
        await db.close()


async def test_concurrent_appenders_keep_one_chain(fresh_db: str) -> None:
    async with (
        Integrations(fresh_db, keys=TEST_KEY) as one,
        Integrations(fresh_db, keys=TEST_KEY, cache=False) as two,
    ):
        conn = await one.add_connection("openai", "main")
        await one.save_setup(conn.uuid, {"api_key": SECRET})
        await asyncio.gather(*(i.get_credentials(conn.uuid) for _ in range(40) for i in (one, two)))
        assert await one.verify_audit() == []
    seqs = [r["seq"] for r in await _table(fresh_db)]
    assert seqs == list(range(1, 83))


async def test_sweep_keeps_the_chain_verifiable_and_a_removed_head_is_caught(
    fresh_db: str,
) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY) as integ:
        conn = await integ.add_connection("openai", "main")
        for _ in range(3):
            await integ.save_setup(conn.uuid, {"api_key": SECRET})
        await asyncio.sleep(0.05)
        cut = datetime.now(UTC)
        await integ.save_setup(conn.uuid, {"api_key": SECRET})
        gone = await integ.sweep_audit(older_than=datetime.now(UTC) - cut)
        assert gone == 4
        assert await integ.verify_audit() == []
        kept = [r.action for r in (await integ.audit()).records]
        assert kept == ["audit.swept", "setup.saved"]
        db = await asyncpg.connect(fresh_db)
        try:
            await db.execute("ALTER TABLE integrations.audit_log DISABLE TRIGGER USER")
            await db.execute("DELETE FROM integrations.audit_log WHERE action = 'setup.saved'")
        finally:
            await db.close()
        assert [(b.seq, b.kind) for b in await integ.verify_audit()] == [(5, "removed")]
        with pytest.raises(InvalidArgument):
            await integ.sweep_audit(older_than=timedelta(0))


async def test_pages_by_keyset_and_filters(fresh_db: str) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY) as integ:
        mine = await integ.add_connection("openai", "mine", owner="ann")
        other = await integ.add_connection("openai", "other", owner="ben")
        for _ in range(5):
            await integ.save_setup(mine.uuid, {"api_key": SECRET}, actor="ann")
        await integ.save_setup(other.uuid, {"api_key": SECRET}, actor="ben")
        first = await integ.audit(owner="ann", limit=4)
        second = await integ.audit(owner="ann", limit=4, before=first.next_before)
        assert len(first.records) == 4 and len(second.records) == 2
        assert second.next_before is None
        seqs = [r.seq for r in first.records + second.records]
        assert seqs == sorted(seqs, reverse=True)
        assert all(r.owner == "ann" for r in first.records + second.records)
        assert [r.actor for r in (await integ.audit(actor="ben")).records] == ["ben"]
        assert (await integ.audit(since=datetime.now(UTC) + timedelta(hours=1))).records == []
        assert len((await integ.audit(action="connection")).records) == 2
        for bad in (
            {"action": "nothing.here"},
            {"limit": 0},
            {"before": 0},
            {"since": datetime(2020, 1, 1)},
        ):
            with pytest.raises(InvalidArgument):
                await integ.audit(**bad)  # type: ignore[arg-type]


def test_bad_level_is_a_configuration_error() -> None:
    from integrations import ConfigurationError

    with pytest.raises(ConfigurationError, match='"admin", "reveal" or "use"'):
        Integrations("postgresql://localhost/x", audit="everything")  # type: ignore[arg-type]


# -- the command line -------------------------------------------------------------------------


def test_cli_audit_lists_verifies_and_sweeps(fresh_db: str) -> None:
    import json

    from .test_cli import cli_env, sh

    env = cli_env()
    assert sh(fresh_db, "--actor", "carol", "add", "openai", "cli", env=env).returncode == 0
    assert sh(fresh_db, "set", "openai:cli", "api_key=@-", stdin=SECRET, env=env).returncode == 0
    listed = sh(fresh_db, "audit", "--ref", "openai:cli", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert "connection.added" in lines[0] and "actor=carol" in lines[0]
    assert "setup.saved" in lines[1] and '"fields":["api_key"]' in lines[1]
    as_json = sh(fresh_db, "audit", "--json", "--action", "setup", env=env)
    assert [json.loads(line)["action"] for line in as_json.stdout.splitlines()] == ["setup.saved"]
    ok = sh(fresh_db, "audit", "verify", env=env)
    assert ok.returncode == 0 and "the chain holds through record 2" in ok.stdout
    assert sh(fresh_db, "audit", "--since", "yesterday", env=env).returncode == 2
    swept = sh(fresh_db, "audit", "sweep", "--older-than", "1d", "--json", env=env)
    assert json.loads(swept.stdout) == {"deleted": 0}

    async def tamper() -> None:
        db = await asyncpg.connect(fresh_db)
        try:
            await db.execute("ALTER TABLE integrations.audit_log DISABLE TRIGGER USER")
            await db.execute("UPDATE integrations.audit_log SET actor = 'x' WHERE seq = 1")
        finally:
            await db.close()

    asyncio.run(tamper())
    bad = sh(fresh_db, "audit", "verify", env=env)
    assert bad.returncode == 1 and "changed: record 1 was changed" in bad.stderr


def test_cli_audit_follow_prints_new_records(fresh_db: str) -> None:
    import subprocess
    import time

    from .test_cli import SCRIPT, cli_env, sh

    env = cli_env()
    follower = subprocess.Popen(
        [SCRIPT, "--dsn", fresh_db, "audit", "--follow"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2.5)
        assert sh(fresh_db, "add", "openai", "followed", env=env).returncode == 0
        assert follower.stdout is not None
        line = follower.stdout.readline()
        assert "connection.added" in line
    finally:
        follower.terminate()
        follower.communicate(timeout=10)
