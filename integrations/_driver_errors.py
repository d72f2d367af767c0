"""Plain messages for database driver failures: the driver's reason, masked, and a next step."""

from __future__ import annotations

import re

import asyncpg

_MAX_REASON = 300
# user:password@ in any URL-shaped text, and password=... in keyword form.
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(?P<head>password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)
# A data error may quote the offending value; only the reason before it is kept.
_QUOTING_SQLSTATE_CLASSES = ("22", "23")
_SQLALCHEMY_SCHEME = re.compile(r"postgres(?:ql)?\+(?P<driver>[a-z0-9_]+)", re.IGNORECASE)
_SQLALCHEMY_SCHEME = re.compile(r"postgres(?:ql)?\+(?P<driver>[a-z0-9_]+)", re.IGNORECASE)


def mask_dsn(text: str) -> str:
    """``text`` with every password of a DSN or ``password=`` keyword replaced by ``***``."""
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    return _KEYWORD_PASSWORD.sub(r"\g<head>***", text)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused ({exc})"
    if isinstance(exc, TimeoutError):
        return "the connection timed out"
    reason = str(exc).strip() or type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate[:2] in _QUOTING_SQLSTATE_CLASSES:
        reason = reason.split(": ", 1)[0]
    reason = " ".join(mask_dsn(reason).split())
    if len(reason) > _MAX_REASON:
        reason = reason[:_MAX_REASON] + "…"
    return reason.rstrip(".")


def _next_step(exc: BaseException, reason: str) -> str:
    sqlalchemy = _SQLALCHEMY_SCHEME.search(reason)
    if sqlalchemy:
        return (
            f"This is a SQLAlchemy-style DSN: drop '+{sqlalchemy['driver']}' "
            "so that it starts with postgresql://."
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return "Create the database or fix its name in the DSN."
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return "Check the user and password in the DSN."
    if isinstance(exc, asyncpg.ClientConfigurationError):
        return "Check the DSN: it looks like postgresql://user:password@host:5432/database."
    if isinstance(exc, OSError | TimeoutError | asyncpg.CannotConnectNowError):
        return "Check that PostgreSQL is running and that the DSN's host and port are right."
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return "Grant the database user the privileges it needs, or use another user."
    return "See the PostgreSQL server log for details."


def describe(exc: BaseException) -> str:
    """One plain sentence or two for a StorageError: what the driver said and what to do."""
    reason = _reason(exc)
    return f"Database error ({type(exc).__name__}): {reason}. {_next_step(exc, reason)}"
