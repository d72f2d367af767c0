"""Message text for a database driver or network error: its own words, passwords masked."""

from __future__ import annotations

import re

# ``scheme://user:password@host`` and ``password=...`` as in a DSN or connection string.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_LIMIT = 300


def mask_passwords(text: str) -> str:
    """``text`` with the password of any DSN or ``password=`` pair in it replaced."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    return _KV_PASSWORD.sub(r"\g<head>***", text)


def describe(exc: BaseException) -> str:
    """``Type (SQLSTATE): message`` on one line, at most a few hundred characters.

    Only the primary message is used: a server error's DETAIL can quote the failing
    row, which may hold a secret when encryption is off.
    """
    if isinstance(exc, OSError) or not exc.args or not isinstance(exc.args[0], str):
        text = str(exc)
    else:
        text = exc.args[0]
    text = " ".join(mask_passwords(text).split())
    if len(text) > _LIMIT:
        text = text[:_LIMIT] + "…"
    sqlstate = getattr(exc, "sqlstate", None)
    label = type(exc).__name__ + (f" ({sqlstate})" if isinstance(sqlstate, str) else "")
    return f"{label}: {text}" if text else label
