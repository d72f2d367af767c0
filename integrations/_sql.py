"""Loads migrations and named query blocks from the ``sql/`` directory, once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

_NAME_LINE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def sql_dir() -> Path:
    """The wheel carries ``integrations/sql``; a source checkout has ``sql/`` beside the package."""
    packaged = resources.files("integrations") / "sql"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "sql"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def parse_blocks(text: str) -> dict[str, str]:
    """Split a file into ``-- name: x`` blocks; a duplicate name is a bug, so refuse it."""
    blocks: dict[str, str] = {}
    matches = list(_NAME_LINE.finditer(text))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        name = match.group(1)
        if name in blocks:
            raise ValueError(f"duplicate query block {name!r}")
        blocks[name] = text[match.end() : end].strip()
    return blocks


@cache
def _raw_queries() -> dict[str, str]:
    return parse_blocks((sql_dir() / "queries.sql").read_text(encoding="utf-8"))


@cache
def _raw_migrations() -> tuple[Migration, ...]:
    found = []
    for path in sorted((sql_dir() / "migrations").iterdir()):
        match = _MIGRATION_FILE.match(path.name)
        if match:
            found.append(Migration(int(match.group(1)), path.name, path.read_text("utf-8")))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ValueError(f"migrations must be numbered 1..n without gaps, got {versions}")
    return tuple(found)


class Queries:
    """The query blocks with ``{schema}`` filled in; attribute access by block name."""

    def __init__(self, schema: str) -> None:
        self._blocks = {
            name: sql.replace("{schema}", schema) for name, sql in _raw_queries().items()
        }
        self.migrations = tuple(
            Migration(m.version, m.name, m.sql.replace("{schema}", schema))
            for m in _raw_migrations()
        )

    def __getattr__(self, name: str) -> str:
        try:
            return self._blocks[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def latest_version(self) -> int:
        return self.migrations[-1].version if self.migrations else 0
