"""Real-PostgreSQL harness: a migrated template database per run, a fresh clone per test."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import secrets
import signal
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import asyncpg
import pytest

from integrations import Integrations, _embedded, generate_key
from integrations._repository import rows_channel

# A run that shares a template database across test processes (INTEGRATIONS_TEST_TEMPLATE,
# below) shares the key its data keys are wrapped with too.
TEST_KEY = os.environ.get("INTEGRATIONS_TEST_KEY") or generate_key()

# Tests stop the commands they start with Ctrl-C (SIGINT), as at a terminal. A suite run as
# a background job of a script starts with SIGINT ignored, which its commands would inherit
# (and then never stop): a handler of our own is what a command sees as the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _local_server() -> tuple[str, int]:
    """Where the local test server is probed; INTEGRATIONS_TEST_LOCAL=host:port moves it."""
    host, _, port = os.environ.get("INTEGRATIONS_TEST_LOCAL", "127.0.0.1:5432").rpartition(":")
    return host, int(port)


def _local_server_up() -> bool:
    try:
        with socket.create_connection(_local_server(), timeout=0.5):
            return True
    except OSError:
        return False


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def _admin_dsn() -> str:
    explicit = os.environ.get("INTEGRATIONS_TEST_DSN")
    if explicit:
        return explicit
    if _local_server_up():
        host, port = _local_server()
        return f"postgresql://postgres@{host}:{port}/postgres"
    # The embedded server's loopback port, as a local server's: the fault proxy and
    # PgBouncer need TCP. It is stopped once the last test process using it ends.
    server = _embedded.embedded_server(Path(tempfile.gettempdir()) / "integrations-test-embedded")
    if server.tcp_dsn is None:
        raise RuntimeError(f"the embedded test server answers on no loopback port: {server}")
    return server.tcp_dsn


async def _admin(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def admin_dsn() -> str:
    return _admin_dsn()


@pytest.fixture(scope="session")
def pg_params(admin_dsn: str) -> dict[str, Any]:
    """The admin server as connect() keywords: host (or socket directory), port, user, database."""
    parts = urlsplit(admin_dsn)
    query = dict(parse_qsl(parts.query))
    return {
        "host": parts.hostname or query.get("host", "127.0.0.1"),
        "port": parts.port or int(query.get("port", 5432)),
        "user": unquote(parts.username or query.get("user", "postgres")),
        "password": unquote(parts.password or query.get("password", "")),
        "database": parts.path.lstrip("/") or "postgres",
    }


# Each clone of the template costs a few hundred milliseconds on a server that syncs its
# files, so a test's database is handed on to the next test of the same process when the
# test left nothing behind but rows: an event trigger notes any DDL (tests that migrate,
# drop or alter schemas), and a database with DDL, statistics, settings or an altered
# migrations table is dropped as before. A database handed on is emptied and renamed, so
# that a connection left over from the test before cannot find it.
_TESTKIT = """
CREATE SCHEMA testkit;
CREATE TABLE testkit.ddl_seen (at timestamptz NOT NULL DEFAULT now());
CREATE FUNCTION testkit.note_ddl() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands()) THEN
        INSERT INTO testkit.ddl_seen DEFAULT VALUES;
    END IF;
END
$$;
CREATE FUNCTION testkit.note_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    INSERT INTO testkit.ddl_seen DEFAULT VALUES;
END
$$;
CREATE EVENT TRIGGER testkit_ddl ON ddl_command_end EXECUTE FUNCTION testkit.note_ddl();
CREATE EVENT TRIGGER testkit_drop ON sql_drop EXECUTE FUNCTION testkit.note_drop();
"""

_MIGRATIONS = "SELECT array_agg((version, name)::text ORDER BY version) FROM {}.schema_migrations"

# Only rows changed: nothing else a test can leave in its database that the next would see.
_REUSABLE = """
SELECT NOT EXISTS (SELECT 1 FROM testkit.ddl_seen)
   AND (SELECT datallowconn FROM pg_database WHERE datname = current_database())
   AND NOT EXISTS (
       SELECT 1 FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
       WHERE d.datname = current_database())
   AND NOT EXISTS (
       SELECT 1 FROM pg_statistic st JOIN pg_class c ON c.oid = st.starelid
       JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'integrations')
   AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts WHERE database = current_database())
"""


class _Databases:
    """The template and the emptied databases this test process can hand on."""

    def __init__(self, admin_dsn: str, template: str, *, shared: bool = False) -> None:
        self.admin_dsn = admin_dsn
        self.template = template
        self.shared = shared
        self.reuse = False
        self.migrations: str | None = None
        self.spare: list[str] = []

    async def setup(self) -> None:
        dsn = _with_database(self.admin_dsn, self.template)
        async with Integrations(dsn, keys=TEST_KEY):
            pass
        conn = await asyncpg.connect(dsn)
        try:
            self.migrations = await conn.fetchval(_MIGRATIONS.format("integrations"))
            try:
                await conn.execute(_TESTKIT)
            except asyncpg.InsufficientPrivilegeError:
                return  # not a superuser: every test gets a new clone
            self.reuse = True
        finally:
            await conn.close()

    async def adopt(self) -> None:
        """Use a template made by an earlier process, as that process's setup left it."""
        conn = await asyncpg.connect(_with_database(self.admin_dsn, self.template))
        try:
            self.migrations = await conn.fetchval(_MIGRATIONS.format("integrations"))
            self.reuse = bool(
                await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = 'testkit'")
            )
        finally:
            await conn.close()

    async def take(self) -> str:
        if self.spare:
            return self.spare.pop()
        name = f"integrations_t_{secrets.token_hex(6)}"
        if self.shared and await self._claim_parked(name):
            return name
        await clone_database(self.admin_dsn, self.template, name)
        return name

    async def _claim_parked(self, name: str) -> bool:
        """Take a database that an earlier process emptied and parked, renamed to ``name``."""
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            parked = await conn.fetch(
                "SELECT datname FROM pg_database WHERE starts_with(datname, $1)",
                f"{self.template}_p",
            )
            for row in parked:
                try:
                    await conn.execute(f'ALTER DATABASE "{row[0]}" RENAME TO "{name}"')
                except asyncpg.PostgresError:
                    continue  # another process took it first
                return True
            return False
        finally:
            await conn.close()

    async def give_back(self, name: str) -> None:
        if self.reuse and await self._empty(name):
            spare = f"integrations_t_{secrets.token_hex(6)}"
            await _admin(self.admin_dsn, f'ALTER DATABASE "{name}" RENAME TO "{spare}"')
            self.spare.append(spare)
            return
        await _admin(self.admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def _empty(self, name: str) -> bool:
        """End every other session on ``name``; empty its tables if only rows changed."""
        try:
            conn = await asyncpg.connect(_with_database(self.admin_dsn, name))
        except (OSError, asyncpg.PostgresError):
            return False
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            if not await conn.fetchval(_REUSABLE):
                return False
            if await conn.fetchval(_MIGRATIONS.format("integrations")) != self.migrations:
                return False
            tables = await conn.fetch(
                "SELECT format('%I.%I', schemaname, tablename) AS name FROM pg_tables "
                "WHERE schemaname = 'integrations' AND tablename <> 'schema_migrations'"
            )
            if tables:
                await conn.execute(f"TRUNCATE {', '.join(t['name'] for t in tables)}")
            return True
        except asyncpg.PostgresError:
            return False
        finally:
            await conn.close()

    async def drop_all(self) -> None:
        """Drop this process's databases; a shared template is kept, and the emptied
        databases are parked beside it (``<template>_p<hex>``) for the next process."""
        if self.shared:
            await _admin(
                self.admin_dsn,
                *(
                    f'ALTER DATABASE "{n}" RENAME TO "{self.template}_p{secrets.token_hex(6)}"'
                    for n in self.spare
                ),
            )
            self.spare.clear()
            return
        names = [*self.spare, self.template]
        self.spare.clear()
        await _admin(
            self.admin_dsn, *(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)' for n in names)
        )


async def _database_exists(admin_dsn: str, name: str) -> bool:
    conn = await asyncpg.connect(admin_dsn)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def databases(admin_dsn: str) -> Iterator[_Databases]:
    """The migrated template this process clones. INTEGRATIONS_TEST_TEMPLATE names one to
    keep across processes run one after another (with INTEGRATIONS_TEST_KEY): made by the
    first process that finds it missing, used as it is by the next, and dropped by none
    (scripts/mutants.py drops it and the databases parked beside it)."""
    shared = os.environ.get("INTEGRATIONS_TEST_TEMPLATE")
    name = shared or f"integrations_tpl_{os.getpid()}_{secrets.token_hex(3)}"
    found = _Databases(admin_dsn, name, shared=bool(shared))
    if shared and asyncio.run(_database_exists(admin_dsn, shared)):
        asyncio.run(found.adopt())
    else:
        asyncio.run(_admin(admin_dsn, f'CREATE DATABASE "{name}"'))
        asyncio.run(found.setup())
    yield found
    asyncio.run(found.drop_all())


@pytest.fixture(scope="session")
def template_db(databases: _Databases) -> str:
    return databases.template


# PostgreSQL 15 and later copy a template through the WAL by default, which for a small
# database takes several times longer than copying its files; older servers know no
# STRATEGY clause. Which one works is found on first use.
_CLONE_STRATEGY: list[str] = []


async def clone_database(admin_dsn: str, template: str, name: str) -> None:
    """CREATE DATABASE ``name`` as a copy of ``template``, the fastest way the server has."""
    plain = f'CREATE DATABASE "{name}" TEMPLATE "{template}"'
    if not _CLONE_STRATEGY:
        try:
            await _admin(admin_dsn, plain + " STRATEGY FILE_COPY")
        except asyncpg.PostgresSyntaxError:
            _CLONE_STRATEGY.append("")
        else:
            _CLONE_STRATEGY.append(" STRATEGY FILE_COPY")
            return
    await _admin(admin_dsn, plain + _CLONE_STRATEGY[0])


@pytest.fixture
def fresh_db(admin_dsn: str, databases: _Databases) -> Iterator[str]:
    name = asyncio.run(databases.take())
    yield _with_database(admin_dsn, name)
    asyncio.run(databases.give_back(name))


@pytest.fixture
def empty_db(admin_dsn: str) -> Iterator[str]:
    """A database with no schema at all, for migration tests."""
    name = f"integrations_e_{secrets.token_hex(6)}"
    asyncio.run(_admin(admin_dsn, f'CREATE DATABASE "{name}"'))
    yield _with_database(admin_dsn, name)
    asyncio.run(_admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def integ(fresh_db: str) -> AsyncIterator[Integrations]:
    async with Integrations(fresh_db, keys=TEST_KEY) as instance:
        yield instance


@pytest.fixture
async def db(fresh_db: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw connection to the test database, for corrupting rows and counting statements."""
    conn = await asyncpg.connect(fresh_db)
    yield conn
    await conn.close()


async def settle() -> None:
    """Wait until every open instance of this process whose row cache serves has received
    the row-change notices of the writes committed so far (raw SQL ones included).

    Each gets a sentinel notice for a uuid no row has, sent now: a listener receives
    notifications in commit order, so once its cache has seen the sentinel, every earlier
    notice has reached it too."""
    loop = asyncio.get_running_loop()
    for instance in [o for o in gc.get_objects() if isinstance(o, Integrations)]:
        if instance._state.value != "open" or not instance._cache.serving:
            continue  # nothing served from a cache that is not serving
        if instance._repo.pool._loop is loop:  # (not one left open by an earlier test)
            await _sentinel_notice(instance)


async def _sentinel_notice(instance: Integrations) -> None:
    hub = instance._s.core.hub
    watcher = _SentinelWatcher(hub._watcher, str(uuid.uuid4()))
    hub._watcher = watcher
    try:
        await instance._repo.pool.execute(
            "SELECT pg_notify($1, $2)",
            rows_channel(hub.channel),
            json.dumps({"rows": [watcher.sentinel]}),
        )
        await asyncio.wait_for(watcher.arrived.wait(), 30)
    finally:
        hub._watcher = watcher.cache


class _SentinelWatcher:
    """The row cache as the event hub sees it, noting when the sentinel's notice comes."""

    def __init__(self, cache: Any, sentinel: str) -> None:
        self.cache, self.sentinel, self.arrived = cache, sentinel, asyncio.Event()

    def rows_changed(self, uuids: Any) -> None:
        self.cache.rows_changed(uuids)
        if uuids is not None and self.sentinel in uuids:
            self.arrived.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


async def save_and_settle(integ: Any, uuid: str, attrs: dict[str, Any]) -> None:
    """``save_setup``, then wait for the write's own notices: the write drops the row from
    the cache at once, and the database's notices of it drop it once more when they
    arrive. Counting cache behaviour from after them all keeps a test exact."""
    # Notices of earlier writes (the connection's insert) may still be on their way:
    # a sentinel notice sent after them has come once they have.
    await _sentinel_notice(integ)
    await integ.save_setup(uuid, attrs)
    await _sentinel_notice(integ)


_TOKEN_FIELDS = ("access_token", "refresh_token", "token_type", "expires_at", "scope")


async def store_setup(integ: Any, uuid: str, attrs: dict[str, Any], **kwargs: Any) -> Any:
    """Save ``attrs`` as an application would: setup through ``save_setup``, OAuth tokens
    (brought from elsewhere) through ``import_tokens``. Returns the masked data."""
    setup = {k: v for k, v in attrs.items() if k not in _TOKEN_FIELDS}
    tokens = {k: v for k, v in attrs.items() if k in _TOKEN_FIELDS}
    data = await integ.save_setup(uuid, setup, **kwargs)
    if tokens:
        await integ.import_tokens(uuid, tokens, **kwargs)
        data = (await integ.get_integration_by_uuid(uuid)).data
    return data
