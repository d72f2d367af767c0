"""The embedded server: a private loopback port beside its socket, and it stops after its
last user, also one ended by SIGTERM or SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.name != "posix", reason="POSIX signals and file modes"),
]

USER = """
import json, sys, time
from pathlib import Path
from integrations._embedded import embedded_server
server = embedded_server(Path(sys.argv[1]))
print(json.dumps({"dsn": server.dsn, "tcp_dsn": server.tcp_dsn}), flush=True)
if sys.argv[2] == "stay":
    time.sleep(600)
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One data dir per test process, reused by its tests one after the other (each ends
    # with the server stopped), so that initdb runs once.
    return tmp_path_factory.mktemp("embedded")


class User:
    """A process using the embedded server of ``data_dir``."""

    def __init__(self, data_dir: Path, *, stay: bool = True) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", USER, str(data_dir), "stay" if stay else "leave"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the user process ended before the server was up"
        found = json.loads(line)
        self.dsn: str = found["dsn"]
        self.tcp_dsn: str = found["tcp_dsn"]

    def end(self, how: signal.Signals) -> None:
        self.process.send_signal(how)
        self.process.wait(timeout=30)


@pytest.fixture
def users(data_dir: Path) -> Iterator[list[User]]:
    started: list[User] = []
    yield started
    for user in started:
        if user.process.poll() is None:
            user.process.kill()
            user.process.wait()
        assert user.process.stdout is not None
        user.process.stdout.close()


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def wait_stopped(data_dir: Path, timeout: float = 30.0) -> float:
    """Seconds until the server of ``data_dir`` stopped; fails after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if postmaster_pid(data_dir) is None:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"the embedded server still runs (pid {postmaster_pid(data_dir)})")


def handle_pids(data_dir: Path) -> list[int]:
    path = data_dir / "pgdata" / ".handle_pids.json"
    return json.loads(path.read_text()) if path.exists() else []


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


async def test_the_loopback_port_is_private(data_dir: Path, users: list[User]) -> None:
    user = User(data_dir)
    users.append(user)
    assert user.tcp_dsn.startswith("postgresql://postgres:")
    assert "@127.0.0.1:" in user.tcp_dsn
    conn = await asyncpg.connect(user.tcp_dsn)
    try:
        assert await conn.fetchval("SELECT inet_server_addr()::text") == "127.0.0.1/32"
        # Another role on the port is refused by the server's pg_hba, whatever its password.
        await conn.execute("CREATE ROLE intruder LOGIN PASSWORD 'intruder'")
    finally:
        await conn.close()
    port = user.tcp_dsn.rsplit(":", 1)[1].split("/")[0]
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(f"postgresql://intruder:intruder@127.0.0.1:{port}/postgres")
    # Without the password (kept in a file only the data dir's owner reads) postgres is refused.
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(f"postgresql://postgres:guess@127.0.0.1:{port}/postgres")
    secret = data_dir / "embedded-tcp"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # The socket is there as before.
    conn = await asyncpg.connect(user.dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        await conn.execute("DROP ROLE intruder")
    finally:
        await conn.close()
    user.end(signal.SIGTERM)
    wait_stopped(data_dir)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_the_server_stops_when_its_last_user_is_killed(
    data_dir: Path, users: list[User], how: signal.Signals
) -> None:
    first, second = User(data_dir), User(data_dir)
    users.extend((first, second))
    assert postmaster_pid(data_dir) is not None
    first.end(how)
    # Another user is still there: the server stays.
    time.sleep(1.5)
    assert postmaster_pid(data_dir) is not None
    second.end(how)
    wait_stopped(data_dir)
    assert handle_pids(data_dir) == []


def test_dead_users_are_pruned_so_the_last_live_one_stops_the_server(
    data_dir: Path, users: list[User]
) -> None:
    gone = dead_pid()
    pgdata = data_dir / "pgdata"
    pgdata.mkdir(exist_ok=True)
    (pgdata / ".handle_pids.json").write_text(json.dumps([gone]))
    user = User(data_dir)
    users.append(user)
    assert gone not in handle_pids(data_dir)
    assert handle_pids(data_dir) == [user.process.pid]
    # A user that leaves normally stops the server on its way out.
    user.process.send_signal(signal.SIGINT)
    user.process.wait(timeout=30)
    wait_stopped(data_dir)


def test_a_user_that_only_opens_and_leaves_stops_the_server(
    data_dir: Path, users: list[User]
) -> None:
    user = User(data_dir, stay=False)
    users.append(user)
    assert user.process.wait(timeout=30) == 0
    wait_stopped(data_dir)
