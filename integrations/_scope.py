"""The small values the CLI needs at start-up, kept apart from the event hub and the audit
trail so that ``integrations --help`` imports neither (nor asyncio)."""

from __future__ import annotations

import contextvars
import enum
from typing import Final

__all__ = ["ACTOR", "ALL_OWNERS", "AllOwners"]


class AllOwners(enum.Enum):
    """The type of ``ALL_OWNERS``: a scope that spans every owner."""

    ALL_OWNERS = "ALL_OWNERS"

    def __repr__(self) -> str:
        return "ALL_OWNERS"


# Documented (and pickled, and shown by the API reference) as the event hub's.
AllOwners.__module__ = "integrations._events"

ALL_OWNERS: Final = AllOwners.ALL_OWNERS
"""Pass as ``owner=`` to see every owner's connections, system ones included."""

#: The actor of the calls made in this context when they take no ``actor=`` (the CLI's
#: ``--actor``, the console's signed-in user).
ACTOR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "integrations_audit_actor", default=None
)
