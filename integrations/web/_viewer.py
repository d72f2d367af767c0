"""Who is looking at the console: the system administrator or one owner."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Admin:
    """The system administrator: works through Integrations itself, on every owner's
    connections (the ones it adds are system connections).

    ``name`` is recorded as the actor of every change made through the console.
    """

    name: str = "admin"

    @property
    def actor(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Owner:
    """One owner (``"user:42"``): sees and changes only that owner's connections."""

    owner: str
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.owner, str) or not self.owner.strip():
            raise ValueError("owner must be a non-empty string")

    @property
    def actor(self) -> str:
        return self.name if self.name is not None else self.owner


Viewer = Admin | Owner
