"""Credentials of external service integrations in PostgreSQL, with authenticated calls."""

from __future__ import annotations

from ._errors import *  # noqa: F403  (replaced by explicit re-exports below)
