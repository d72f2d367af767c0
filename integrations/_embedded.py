"""The embedded default: a private PostgreSQL (pgserver) and a key file in the user data dir."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import warnings
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


def _start(pgdata: Path) -> str:
    try:
        with warnings.catch_warnings():
            # pgserver asks platformdirs for a runtime dir at import, which warns on headless hosts.
            warnings.simplefilter("ignore")
            import pgserver
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
                server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
            _servers[pgdata] = server
        return str(server.get_uri())


async def start_embedded(data_dir: Path) -> str:
    """Start (or join) the embedded server; returns its DSN."""
    return await asyncio.to_thread(_start, data_dir / "pgdata")


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
