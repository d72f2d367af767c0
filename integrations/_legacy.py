"""Registry of application-supplied legacy-data migrators, run best-effort."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from . import _telemetry as telemetry
from ._errors import InvalidArgument, InvalidInput

log = logging.getLogger("integrations")

#: An application's migrator: called with the ``Integrations`` instance it was registered on.
LegacyMigrator = Callable[[Any], Awaitable[Any]]


class LegacyMigrators:
    """Named migrators; a duplicate name is refused so two modules cannot shadow each other."""

    def __init__(self) -> None:
        self._migrators: dict[str, LegacyMigrator] = {}

    def register(self, name: str, migrator: LegacyMigrator) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidInput("a legacy migrator needs a non-empty name")
        if not callable(migrator):
            raise InvalidArgument("a legacy migrator must be an async callable", field="migrator")
        if name in self._migrators:
            raise InvalidInput(f"a legacy migrator named {name!r} is already registered")
        self._migrators[name] = migrator

    def names(self) -> list[str]:
        return list(self._migrators)

    async def run_all(self, integ: object) -> dict[str, bool]:
        """Run every migrator; a failure is logged and reported, never raised."""
        outcome: dict[str, bool] = {}
        for name, migrator in self._migrators.items():
            try:
                await migrator(integ)
            except Exception as exc:
                # The exception text may quote data, so only its type is logged.
                log.warning(
                    "legacy migrator %r failed: %s",
                    name,
                    type(exc).__name__,
                    extra=telemetry.fields("legacy_migrator_failed"),
                )
                outcome[name] = False
            else:
                outcome[name] = True
        return outcome
