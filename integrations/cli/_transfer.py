"""Export and import of connections through the public API, the import all or nothing."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .._errors import AlreadyExists, IntegrationsError, NotFound
from .._events import ALL_OWNERS, OwnerScope
from .._integrations import Integrations
from .._models import Connection, utcnow
from .._names import check_owner, normalize_name, parse_uuid
from .._telemetry import fields
from ..oauth import imported_token_set
from . import _bundle
from ._support import USAGE, Fail

log = logging.getLogger("integrations.cli")


async def _every_owner(integ: Integrations, keys: list[str]) -> dict[str, list[Connection]]:
    """Every owner's connections of the registered providers ``keys``, by provider."""
    found: dict[str, list[Connection]] = {key: [] for key in keys}
    after = None
    while True:
        page = await integ.list_page(owner=ALL_OWNERS, limit=500, after=after)
        for connection in page.items:
            if connection.provider in found:
                found[connection.provider].append(connection)
        if page.next_after is None:
            return found
        after = page.next_after


async def export_document(integ: Integrations, owner: OwnerScope) -> dict[str, Any]:
    """Every connection of ``owner``'s scope (every owner's with ``ALL_OWNERS``) with its
    decrypted data."""
    keys = [p.key for p in integ.list_providers()]
    if owner is ALL_OWNERS:
        found = await _every_owner(integ, keys)
    else:
        found = await integ.load_all_connections(keys, owner=owner)
    connections = []
    for key in keys:
        for connection in found[key]:
            data = await integ.get_integration(connection.uuid)
            connections.append(
                {
                    "uuid": connection.uuid,
                    "provider": connection.provider,
                    "name": connection.name,
                    "owner": connection.owner,
                    "data": data,
                }
            )
    if owner is ALL_OWNERS:
        detail = {"connections": len(connections), "all_owners": True}
        await _record(integ, "store.exported", detail, None)
    else:
        await _record(integ, "store.exported", {"connections": len(connections)}, owner)
    return _bundle.document(connections, datetime.now(UTC).isoformat())


async def _record(
    integ: Integrations, action: str, detail: dict[str, Any], owner: str | None
) -> None:
    # The service layer's audit log: the transfer is a door with no facade method of its own.
    await integ._s.core.audit.record(action, owner=owner, detail=detail)


@dataclass
class ImportReport:
    rows: list[tuple[str, str, str | None]] = field(default_factory=list)
    #: Refs whose OAuth grant (refresh token) the import writes (would write).
    grants: list[str] = field(default_factory=list)

    def _of(self, action: str) -> list[tuple[str, str, str | None]]:
        return [row for row in self.rows if row[0] == action]

    @property
    def created(self) -> list[tuple[str, str, str | None]]:
        return self._of("created")

    @property
    def updated(self) -> list[tuple[str, str, str | None]]:
        return self._of("updated")

    @property
    def skipped(self) -> list[tuple[str, str, str | None]]:
        return self._of("skipped")

    def as_json(self, dry_run: bool) -> dict[str, Any]:
        def refs(rows: list[tuple[str, str, str | None]]) -> list[dict[str, Any]]:
            return [{"ref": ref, "uuid": uuid} for _a, ref, uuid in rows]

        return {
            "dry_run": dry_run,
            "created": refs(self.created),
            "updated": refs(self.updated),
            "skipped": refs(self.skipped),
            "oauth_grants": list(self.grants),
        }


async def _add_keeping_uuid(integ: Integrations, p: _Planned, actor: str | None) -> Connection:
    """Create the connection under its exported uuid (references to it stay true); a new
    one when this database already uses that uuid (the name was checked free)."""
    entry = p.entry
    kept = entry.uuid if entry.uuid is not None and parse_uuid(entry.uuid) else None
    if kept is not None:
        try:
            return await integ.add_connection(
                entry.provider, entry.name, owner=p.owner, uuid=kept, actor=actor
            )
        except AlreadyExists:
            pass
    return await integ.add_connection(entry.provider, entry.name, owner=p.owner, actor=actor)


@dataclass
class _Planned:
    entry: _bundle.Entry
    owner: str | None
    action: str
    uuid: str | None = None


def _validate(integ: Integrations, entry: _bundle.Entry, owner: str | None) -> None:
    """Everything an import could refuse, checked before the first write."""
    where = entry.ref
    if entry.provider not in integ.providers:
        raise Fail(f"{where}: unknown provider {entry.provider!r}", USAGE)
    provider = integ.providers.get(entry.provider)
    try:
        normalize_name(entry.name)
        check_owner(owner)
        # Required fields may be missing: an added or disconnected connection exports so.
        provider.normalize_attrs(entry.setup)
        if entry.tokens:
            if not provider.is_oauth:
                raise Fail(f"{where}: tokens given for a non-OAuth provider", USAGE)
            imported_token_set(entry.tokens, utcnow())
    except IntegrationsError as exc:
        raise Fail(f"{where}: {exc.message}", USAGE) from None


async def _existing(integ: Integrations, entry: _bundle.Entry, owner: str | None) -> str | None:
    try:
        return await integ.find_uuid_by_provider_name(
            (entry.provider, normalize_name(entry.name)), owner=owner
        )
    except NotFound:
        return None


async def import_entries(
    integ: Integrations,
    entries: list[_bundle.Entry],
    *,
    owner: str | None,
    overwrite: bool,
    dry_run: bool,
    actor: str | None = None,
    without_tokens: bool = False,
) -> ImportReport:
    """Validate every entry, then create/update; on a failed write undo what was written.

    ``owner`` (the --owner option) places every connection in that scope; left out,
    each keeps the owner it was exported with. ``without_tokens`` leaves OAuth grants
    behind (the connections arrive disconnected, to be authorized again). Each keeps the
    status and check message it was exported with.
    """
    if without_tokens:
        entries = [dataclasses.replace(e, tokens={}) for e in entries]
    plan: list[_Planned] = []
    seen: set[tuple[str | None, str, str]] = set()
    for entry in entries:
        target = owner if owner is not None else entry.owner
        _validate(integ, entry, target)
        ident = (target, entry.provider, normalize_name(entry.name))
        if ident in seen:
            raise Fail(f"{entry.ref}: appears twice in the file", USAGE)
        seen.add(ident)
        uuid = await _existing(integ, entry, target)
        if uuid is None:
            plan.append(_Planned(entry, target, "created"))
        else:
            plan.append(_Planned(entry, target, "updated" if overwrite else "skipped", uuid))
    report = ImportReport()
    if dry_run:
        report.rows = [(p.action, p.entry.ref, p.uuid) for p in plan]
        report.grants = [p.entry.ref for p in plan if p.action != "skipped" and p.entry.tokens]
        return report
    undo: list[tuple[str, str, dict[str, Any] | None]] = []
    writes = [p for p in plan if p.action != "skipped"]
    try:
        for p in writes:
            if p.action == "created":
                connection = await _add_keeping_uuid(integ, p, actor)
                p.uuid = connection.uuid
                undo.append(("created", connection.uuid, None))
            else:
                assert p.uuid is not None
                undo.append(("updated", p.uuid, await integ.get_integration(p.uuid)))
            if p.entry.setup:
                await integ.save_setup(p.uuid, p.entry.setup, actor=actor)
        # Tokens last: a failure before this point undoes rows that never held a token.
        for p in writes:
            if p.entry.tokens and p.uuid is not None:
                await integ.import_tokens(p.uuid, p.entry.tokens, actor=actor)
        for p in writes:
            await _keep_outcome(integ, p, actor)
    except IntegrationsError as exc:
        left = await _undo(integ, undo, actor)
        if not left:
            raise Fail(
                f"import failed, nothing kept ({len(undo)} change(s) undone): {exc.message}"
            ) from exc
        raise Fail(
            f"import failed, and {len(left)} of its {len(undo)} change(s) could not be "
            f"undone (connections {', '.join(left)}; the log says why): {exc.message}"
        ) from exc
    report.rows = [(p.action, p.entry.ref, p.uuid) for p in plan]
    report.grants = [p.entry.ref for p in writes if p.entry.tokens]
    await _record(
        integ,
        "store.imported",
        {"created": len(report.created), "updated": len(report.updated)},
        owner,
    )
    return report


async def _keep_outcome(integ: Integrations, p: _Planned, actor: str | None) -> None:
    """The exported status and check message again: an ``error`` row stays ``error``. A
    connection left without credentials (``disconnected``) has no outcome to keep."""
    entry = p.entry
    if p.uuid is None or entry.status not in ("connected", "error"):
        return
    if entry.status == "connected" and entry.validation is None:
        return
    current = await integ.get_integration_by_uuid(p.uuid)
    if current.status == "disconnected":
        return
    ok = entry.status == "connected"
    message = entry.validation or ("ok" if ok else "Failed")
    await integ.record_validation(p.uuid, (ok, message), actor=actor)


async def _undo(
    integ: Integrations,
    undo: list[tuple[str, str, dict[str, Any] | None]],
    actor: str | None,
) -> list[str]:
    """Undo ``undo``'s steps, last first; the uuids of those that failed (each logged)."""
    left: list[str] = []
    for action, uuid, before in reversed(undo):
        try:
            if action == "created":
                await integ.remove_connection(uuid, actor=actor)
            elif before is not None:
                setup, tokens = _bundle.split_data(before)
                current = _bundle.split_data(await integ.get_integration(uuid))[0]
                # Fields the import added are unset again; the earlier values come back.
                restore: dict[str, Any] = {k: None for k in current if k not in setup}
                restore.update(setup)
                # A save merges the credentials map key by key (a credentials provider's
                # fields are its keys): the keys the import added are unset the same way.
                added = current.get("credentials")
                if isinstance(added, dict):
                    earlier = setup.get("credentials")
                    kept = earlier if isinstance(earlier, dict) else {}
                    restore["credentials"] = {**dict.fromkeys(added), **kept}
                await integ.save_setup(uuid, restore, actor=actor)
                if tokens:
                    await integ.import_tokens(uuid, tokens, actor=actor)
        except IntegrationsError as exc:
            left.append(uuid)
            log.error(
                "could not undo the import of %s: %s",
                uuid,
                exc.message,
                extra=fields("import_undo_failed", uuid=uuid),
            )
    return left
