"""Loads the migrations and named query blocks of the top-level ``sql/`` folder, once."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from typing import LiteralString

_NAME_LINE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def _sql_folder() -> Path:
    """``sql/`` beside the package in a checkout or editable install, inside it in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sql", here.parent / "sql"):
        if (candidate / "queries.sql").is_file():
            return candidate
    looked = f"{here / 'sql'} and {here.parent / 'sql'}"
    raise RuntimeError(f"the sql/ folder is missing: looked in {looked}")


_SQL = _sql_folder()


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: LiteralString


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
    return parse_blocks((_SQL / "queries.sql").read_text(encoding="utf-8"))


@cache
def _raw_migrations() -> tuple[Migration, ...]:
    found = []
    for path in sorted((_SQL / "migrations").iterdir(), key=lambda p: p.name):
        match = _MIGRATION_FILE.match(path.name)
        if match:
            # Files of the package, not input: literal as far as the query API is concerned.
            text: LiteralString = path.read_text("utf-8")
            found.append(Migration(int(match.group(1)), path.name, text))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ValueError(f"migrations must be numbered 1..n without gaps, got {versions}")
    return tuple(found)


def _fill(sql: str, schema: str) -> LiteralString:
    # The schema is a validated identifier (checked when the configuration is built).
    filled: LiteralString = sql.replace("{schema}", schema)
    return filled


@dataclass(frozen=True, slots=True)
class Queries:
    """Every query block by name, ``{schema}`` filled in.

    The fields are the contract between the code and ``queries.sql``: mypy checks every
    name the code uses, and building the object fails when a block is missing or unused.
    """

    migrations_table: LiteralString
    migrate_lock: LiteralString
    applied_migrations: LiteralString
    migrations_table_exists: LiteralString
    schema_version: LiteralString
    record_migration: LiteralString
    insert_connection: LiteralString
    get_by_uuid: LiteralString
    lock_by_uuid: LiteralString
    lock_by_uuid_clocked: LiteralString
    get_by_key: LiteralString
    uuid_by_key: LiteralString
    list_by_prefixes: LiteralString
    list_every_owner: LiteralString
    list_page: LiteralString
    list_saved_page: LiteralString
    search_page: LiteralString
    search_every_owner: LiteralString
    status_page: LiteralString
    status_every_owner: LiteralString
    connection_counts: LiteralString
    fold_connection_counts: LiteralString
    fold_every_connection_count: LiteralString
    vacuum_connection_counts: LiteralString
    analyze_connections: LiteralString
    update_value: LiteralString
    update_key_value: LiteralString
    delete_connection: LiteralString
    notify: LiteralString
    append_events: LiteralString
    events_after_any_owner: LiteralString
    events_after_owner: LiteralString
    events_after_uuid: LiteralString
    events_pruned_through: LiteralString
    events_last_position: LiteralString
    events_oldest: LiteralString
    events_count_cut: LiteralString
    events_prune: LiteralString
    connections_to_reseal_below: LiteralString
    connections_to_reseal_above: LiteralString
    connections_plain_to_reseal: LiteralString
    webhook_insert_endpoint: LiteralString
    webhook_endpoints: LiteralString
    webhook_endpoint: LiteralString
    webhook_delete_endpoint: LiteralString
    webhook_lock_cursor: LiteralString
    webhook_events_after: LiteralString
    webhook_all_endpoints: LiteralString
    webhook_insert_deliveries: LiteralString
    webhook_move_cursor: LiteralString
    webhook_claim: LiteralString
    webhook_finish: LiteralString
    webhook_deliveries_of: LiteralString
    webhook_replay: LiteralString
    webhook_cursor_position: LiteralString
    webhook_next_due: LiteralString
    lock_connections_to_reseal: LiteralString
    lock_connection_to_reseal: LiteralString
    count_reseal_below_end: LiteralString
    count_reseal_below_rest: LiteralString
    count_reseal_above_end: LiteralString
    count_reseal_above_rest: LiteralString
    count_plain_to_reseal: LiteralString
    reseal_connections: LiteralString
    pending_to_reseal: LiteralString
    count_pending_to_reseal: LiteralString
    reseal_pending: LiteralString
    begin_write: LiteralString
    bound_transaction: LiteralString
    set_idle_timeout: LiteralString
    set_refresh_timeouts: LiteralString
    insert_pending_authorization: LiteralString
    take_pending_authorization: LiteralString
    take_latest_pending_authorization: LiteralString
    delete_expired_pending_authorizations: LiteralString
    sweep_candidates: LiteralString
    take_lease: LiteralString
    drop_lease: LiteralString
    data_keys_of: LiteralString
    all_data_keys: LiteralString
    put_data_key: LiteralString
    data_keys_lock: LiteralString
    audit_lock: LiteralString
    audit_tail: LiteralString
    audit_insert: LiteralString
    audit_page: LiteralString
    audit_chain: LiteralString
    audit_sweep: LiteralString
    audit_first_kept: LiteralString
    audit_count_before: LiteralString
    audit_delete_before: LiteralString
    audit_anchor: LiteralString
    migrations: tuple[Migration, ...]

    @classmethod
    def load(cls, schema: str) -> Queries:
        blocks = _raw_queries()
        wanted = {f.name for f in fields(cls)} - {"migrations"}
        missing, unused = sorted(wanted - blocks.keys()), sorted(blocks.keys() - wanted)
        if missing or unused:
            raise ValueError(f"queries.sql out of step: missing {missing}, unused {unused}")
        filled = {name: _fill(blocks[name], schema) for name in wanted}
        migrations = tuple(
            Migration(m.version, m.name, _fill(m.sql, schema)) for m in _raw_migrations()
        )
        return cls(**filled, migrations=migrations)

    @property
    def latest_version(self) -> int:
        return self.migrations[-1].version if self.migrations else 0


# Checked when the module loads: a block renamed in queries.sql fails the import.
Queries.load("integrations")
