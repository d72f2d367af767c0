"""Debian's PgBouncer in transaction mode on a loopback port, in front of a test server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

CANDIDATES = ("pgbouncer", "/usr/sbin/pgbouncer")


def pgbouncer_binary() -> str:
    for candidate in CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise RuntimeError("PgBouncer is not installed: apt-get install -y pgbouncer")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgBouncer:
    """``with PgBouncer(dsn) as bouncer: bouncer.dsn_for(database_dsn)``.

    Transaction pooling: a client's statements outside a transaction may run on any
    server connection, and session state (LISTEN, named prepared statements) is not kept.
    """

    def __init__(self, upstream_dsn: str, *, pool_size: int = 20) -> None:
        parts = urlsplit(upstream_dsn)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 5432
        self.user = parts.username or "postgres"
        self.password = parts.password or ""
        self.pool_size = pool_size
        self.port = 0
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = Path(os.devnull)

    def dsn_for(self, database_dsn: str) -> str:
        """``database_dsn`` (a database of the upstream server) through PgBouncer."""
        parts = urlsplit(database_dsn)
        netloc = f"{self.user}@127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="integrations-pgbouncer-")
        # PgBouncer refuses to run as root; it then switches to another user, who must
        # be able to read its files.
        os.chmod(self._dir, 0o755)
        directory = Path(self._dir)
        (directory / "users.txt").write_text(f'"{self.user}" "{self.password}"\n')
        self.port = _free_port()
        (directory / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={self.upstream_host} port={self.upstream_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {directory / 'users.txt'}\n"
            "pool_mode = transaction\n"
            "max_client_conn = 500\n"
            f"default_pool_size = {self.pool_size}\n"
            "server_reset_query =\n"
            "ignore_startup_parameters = extra_float_digits\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
        )
        for name in ("users.txt", "pgbouncer.ini"):
            os.chmod(directory / name, 0o644)
        command = [pgbouncer_binary()]
        if os.geteuid() == 0:
            command += ["-u", "postgres"]
        command.append(str(directory / "pgbouncer.ini"))
        self._log = directory / "pgbouncer.log"
        with self._log.open("wb") as log:
            # The child keeps its own copy of the descriptor.
            self._proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    err = self._log.read_text(errors="replace")
                    self.stop()
                    raise RuntimeError(f"PgBouncer did not start: {err[-500:]}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
