"""The embedded default: a private PostgreSQL (pgserver) and a key file in the user data dir."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import ConfigurationError

_servers: dict[Path, Any] = {}
_lock = threading.Lock()

PRIVATE_DIR_MODE = 0o700
KEY_FILE_MODE = 0o600
_POSIX = os.name == "posix"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def make_private_dir(path: Path) -> None:
    """Create ``path`` and any missing parents with mode 0700, whatever the umask; an
    existing directory is left as it is."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            continue
        if _POSIX:
            # mkdir's mode is filtered by the umask only; chmod states it outright.
            os.chmod(directory, PRIVATE_DIR_MODE)


def _check_key_file(path: Path, info: os.stat_result) -> None:
    # As ssh does with private keys: refuse rather than use a key others may read or swap.
    if stat.S_ISLNK(info.st_mode):
        raise ConfigurationError(
            f"the key file {path} is a symbolic link; replace it with the regular file it "
            f"points to (then chmod 600 {path})"
        )
    if not stat.S_ISREG(info.st_mode):
        raise ConfigurationError(f"the key file {path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if _POSIX and mode & 0o077:
        raise ConfigurationError(
            f"the key file {path} is accessible by group or others (mode {mode:04o}), so "
            f"its keys are refused; make it private with: chmod 600 {path}"
        )


def default_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("integrations", appauthor=False))


# Who may use the loopback port: the owner of the data dir, who alone can read its password.
# Everything else (another user's TCP connection without it, any other address) is refused.
_PG_HBA = """\
# Written by integrations: the socket lives in a private directory; the loopback port
# asks for a password kept in a mode 0600 file beside the data; nothing else is let in.
local all all trust
host all postgres 127.0.0.1/32 scram-sha-256
host all all all reject
"""
_TCP_FILE = "embedded-tcp"
_REAPER_FILE = ".integrations-reaper.pid"
REAP_INTERVAL = 0.5


@dataclass(frozen=True)
class EmbeddedServer:
    """Where the embedded server answers: its private socket, and its loopback port (a
    password-protected DSN) when this version of the library started it."""

    dsn: str
    tcp_dsn: str | None = field(default=None, repr=False)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, killed and not yet reaped, is not)."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def _prune(pid_list: Any) -> list[int]:
    """Drop the pids of processes that ended without saying so (SIGKILL, SIGTERM, a crash)
    from the server's list of users; returns the users still alive."""
    pids = [pid for pid in pid_list.get() if isinstance(pid, int)]
    live = [pid for pid in pids if _alive(pid)]
    if live != pids:
        pid_list.put(live)
    return live


def _read_tcp(pgdata: Path) -> tuple[int, str] | None:
    path = pgdata.parent / _TCP_FILE
    try:
        port, password = path.read_text(encoding="utf-8").split()
        return int(port), password
    except (OSError, ValueError):
        return None


def _write_tcp(pgdata: Path, port: int, password: str) -> None:
    path = pgdata.parent / _TCP_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, KEY_FILE_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        if _POSIX:
            os.fchmod(handle.fileno(), KEY_FILE_MODE)
        handle.write(f"{port} {password}\n")


def _pg_command(name: str) -> Any:
    """One of pgserver's command runners (made at its import, one per bundled binary)."""
    from pgserver import _commands

    return vars(_commands)[name]


def _server_class() -> type[Any]:
    """pgserver's server, started on a private loopback port as well as its socket, with
    its users' list kept true and a reaper process that stops it after its last user."""
    from pgserver import postgres_server, utils

    class Server(postgres_server.PostgresServer):
        def ensure_postgres_running(self) -> None:
            # Called under pgserver's inter-process lock, before this process joins.
            _prune(self.global_process_id_list)
            info = utils.PostmasterInfo.read_from_pgdata(self.pgdata)
            if info is not None and info.is_running():
                self._postmaster_info = info
            else:
                self._start_with_port()
            _ensure_reaper(self.pgdata)

        def _start_with_port(self) -> None:
            socket_dir = utils.find_suitable_socket_dir(self.pgdata, self.runtime_path)
            if self.system_user is not None and socket_dir != self.pgdata:
                utils.ensure_prefix_permissions(socket_dir)
                socket_dir.chmod(0o777)
            (self.pgdata / "pg_hba.conf").write_text(_PG_HBA, encoding="utf-8")
            port = utils.find_suitable_port("127.0.0.1")
            password = secrets.token_urlsafe(24)
            options = f"-h 127.0.0.1 -p {port} -k {socket_dir}"
            _pg_command("pg_ctl")(
                ["-w", "-o", options, "-l", str(self.log), "start"],
                pgdata=self.pgdata,
                user=self.system_user,
                timeout=30,
            )
            for _ in range(300):
                info = utils.PostmasterInfo.read_from_pgdata(self.pgdata)
                if info is not None and info.is_running() and info.status == "ready":
                    break
                time.sleep(0.1)
            else:
                raise ConfigurationError(f"the embedded PostgreSQL in {self.pgdata} did not start")
            self._postmaster_info = info
            # The password is set over the socket, which only this user can reach.
            sql = f"ALTER ROLE postgres PASSWORD '{password}'"
            psql = _pg_command("psql")
            psql(["-q", "-h", str(socket_dir), "-p", str(port), "-U", "postgres", "-c", sql])
            _write_tcp(self.pgdata, port, password)

        def _cleanup(self) -> None:
            with self._lock:
                _prune(self.global_process_id_list)
            super()._cleanup()

    return Server


def _ensure_reaper(pgdata: Path) -> None:
    """Start the process that stops the server once no user of it is alive, unless one
    is running: a user ended by SIGKILL runs no exit handler of its own."""
    mark = pgdata / _REAPER_FILE
    try:
        if _alive(int(mark.read_text(encoding="utf-8"))):
            return
    except (OSError, ValueError):
        pass
    package_parent = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    process = subprocess.Popen(
        [sys.executable, "-m", "integrations._embedded", str(pgdata)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    mark.write_text(str(process.pid), encoding="utf-8")


def _reap(pgdata: Path) -> None:
    """The reaper's loop: prune dead users; with none left, stop the server (fast
    shutdown) and end. It also ends when the server was stopped by someone else."""
    from pgserver import postgres_server, utils

    pid_list = utils.DiskList(pgdata / ".handle_pids.json")
    while True:
        time.sleep(REAP_INTERVAL)
        with postgres_server.PostgresServer._lock:
            info = utils.PostmasterInfo.read_from_pgdata(pgdata)
            if info is None or not info.is_running():
                return
            if _prune(pid_list):
                continue
            with contextlib.suppress(OSError):
                os.kill(info.pid, signal.SIGINT)
            for _ in range(100):
                if not info.is_running():
                    break
                time.sleep(0.1)
            return


def _start(pgdata: Path) -> EmbeddedServer:
    try:
        with warnings.catch_warnings():
            # pgserver asks platformdirs for a runtime dir at import, which warns on headless hosts.
            warnings.simplefilter("ignore")
            import pgserver  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            "no database configured: pass dsn=, set INTEGRATIONS_DSN, "
            "or install the embedded extra (from a checkout: pip install -e '.[embedded]')"
        ) from exc
    with _lock:
        server = _servers.get(pgdata)
        if server is None:
            make_private_dir(pgdata)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                server = _server_class()(pgdata.resolve(), cleanup_mode="stop")
            _servers[pgdata] = server
        info = server.get_postmaster_info()
        dsn = f"postgresql://postgres@/postgres?host={info.socket_dir}&port={info.port}"
        tcp = _read_tcp(pgdata)
        tcp_dsn = None
        if tcp is not None and info.hostname == "127.0.0.1" and tcp[0] == info.port:
            tcp_dsn = f"postgresql://postgres:{tcp[1]}@127.0.0.1:{info.port}/postgres"
        return EmbeddedServer(dsn, tcp_dsn)


def embedded_server(data_dir: Path) -> EmbeddedServer:
    """Start (or join) the embedded server of ``data_dir``, in this thread."""
    return _start(data_dir / "pgdata")


async def start_embedded(data_dir: Path) -> str:
    """Start (or join) the embedded server; returns its DSN."""
    server = await asyncio.to_thread(_start, data_dir / "pgdata")
    return server.dsn


def ensure_key_file(data_dir: Path) -> str:
    """Read the embedded key file, creating it (mode 0600, in a 0700 directory) on first
    use. A key file that is a symbolic link, or that group or others may read or write,
    is refused with a ConfigurationError saying how to fix it."""
    from ._vault import generate_key

    path = data_dir / "keys"
    make_private_dir(data_dir)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, KEY_FILE_MODE)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            if _POSIX:
                os.fchmod(handle.fileno(), KEY_FILE_MODE)
            handle.write(generate_key() + "\n")
    _check_key_file(path, os.lstat(path))
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError as exc:
        raise ConfigurationError(f"the key file {path} cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "r", encoding="utf-8") as handle:
        # Checked again on the open file: it may have been swapped since the lstat.
        _check_key_file(path, os.fstat(handle.fileno()))
        text = handle.read()
    keys = [line.strip() for line in text.splitlines() if line.strip()]
    if not keys:
        raise ConfigurationError(f"the key file {path} is empty")
    return ",".join(keys)


if __name__ == "__main__":
    _reap(Path(sys.argv[1]))
