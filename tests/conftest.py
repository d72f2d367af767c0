"""Real-PostgreSQL harness: a migrated template database per run, a fresh clone per test."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import asyncpg
import pytest

from integrations import Integrations, generate_key

TEST_KEY = generate_key()


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(
            Path(tempfile.gettempdir()) / "integrations-test-pg", cleanup_mode="stop"
        )
    return str(server.get_uri())


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
        "database": parts.path.lstrip("/") or "postgres",
    }


@pytest.fixture(scope="session")
def template_db(admin_dsn: str) -> Iterator[str]:
    name = f"integrations_tpl_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_admin(admin_dsn, f'CREATE DATABASE "{name}"'))

    async def migrate() -> None:
        async with Integrations(_with_database(admin_dsn, name), keys=TEST_KEY):
            pass

    asyncio.run(migrate())
    yield name
    asyncio.run(_admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def fresh_db(admin_dsn: str, template_db: str) -> Iterator[str]:
    name = f"integrations_t_{secrets.token_hex(6)}"
    asyncio.run(_admin(admin_dsn, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"'))
    yield _with_database(admin_dsn, name)
    asyncio.run(_admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


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


# A write made with raw SQL reaches an instance's row cache as a notification, which
# arrives within a millisecond or so; tests that read right after such a write wait this.
SETTLE = 0.2


async def settle() -> None:
    """Let the row-change notice of a raw SQL write reach the instances' row caches."""
    await asyncio.sleep(SETTLE)


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
