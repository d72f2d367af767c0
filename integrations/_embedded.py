"""The embedded default: a private PostgreSQL (pgserver) and a key file in the user data dir."""

from __future__ import annotations

import asyncio
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from ._errors import ConfigurationError

_servers: dict[Path, Any] = {}
_lock = threading.Lock()


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
            "or install the embedded extra (pip install 'integrations[embedded]')"
        ) from exc
    with _lock:
        server = _servers.get(pgdata)
        if server is None:
            pgdata.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
            _servers[pgdata] = server
        return str(server.get_uri())


async def start_embedded(data_dir: Path) -> str:
    """Start (or join) the embedded server; returns its DSN."""
    return await asyncio.to_thread(_start, data_dir / "pgdata")


def ensure_key_file(data_dir: Path) -> str:
    """Read the embedded key file, creating it (mode 0600) on first use."""
    from ._vault import generate_key

    path = data_dir / "keys"
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(generate_key() + "\n")
    keys = [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]
    if not keys:
        raise ConfigurationError(f"the key file {path} is empty")
    return ",".join(keys)
