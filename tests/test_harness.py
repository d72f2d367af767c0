"""The test harness finds a PostgreSQL: explicit DSN, else the local server, else embedded."""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlsplit

import pytest

from integrations import _embedded
from integrations._embedded import EmbeddedServer

from . import conftest


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


FAKE = EmbeddedServer(
    "postgresql://postgres@/postgres?host=/tmp/fake-embedded&port=1",
    "postgresql://postgres:pw@127.0.0.1:1/postgres",
)


def test_an_unreachable_local_server_falls_back_to_embedded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[Any] = []
    monkeypatch.setattr(_embedded, "embedded_server", lambda *args: started.append(args) or FAKE)
    monkeypatch.delenv("INTEGRATIONS_TEST_DSN", raising=False)
    monkeypatch.setenv("INTEGRATIONS_TEST_LOCAL", f"127.0.0.1:{closed_port()}")
    # The loopback port, so that the fault proxy and PgBouncer can stand in front of it.
    assert conftest._admin_dsn() == FAKE.tcp_dsn
    assert len(started) == 1


def test_an_explicit_dsn_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTEGRATIONS_TEST_DSN", "postgresql://u@db.example.test/x")
    assert conftest._admin_dsn() == "postgresql://u@db.example.test/x"


def test_the_probe_address_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTEGRATIONS_TEST_LOCAL", "10.1.2.3:6543")
    assert conftest._local_server() == ("10.1.2.3", 6543)
    monkeypatch.delenv("INTEGRATIONS_TEST_LOCAL")
    assert conftest._local_server() == ("127.0.0.1", 5432)


def test_the_admin_dsn_in_use_honours_the_probe(admin_dsn: str) -> None:
    # CI runs this with the probe on a closed port: the session must be on the embedded server.
    host, port = conftest._local_server()
    explicit = os.environ.get("INTEGRATIONS_TEST_DSN")
    if explicit:
        assert admin_dsn == explicit
    elif conftest._local_server_up():
        assert admin_dsn == f"postgresql://postgres@{host}:{port}/postgres"
    else:
        parts = urlsplit(admin_dsn)
        assert (parts.hostname, parts.port) != (host, port)
        # The embedded server's private loopback port, with its password.
        assert parts.hostname == "127.0.0.1" and parts.password
