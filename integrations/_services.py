"""The services built at ``open()`` on one core, and the operations that join several."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Coroutine
from datetime import datetime, timedelta
from typing import Any

from . import _names as names
from . import _telemetry as telemetry
from ._audit import ACTIONS, AuditLog, AuditPage, Breach, verify_records
from ._authflow import AuthFlow
from ._checks import Checks
from ._connections import Connections, check_scope
from ._core import Core
from ._device import DeviceFlow
from ._errors import ConfigurationError, InvalidArgument
from ._events import AllOwners, OwnerScope
from ._http import Response
from ._models import utcnow
from ._names import shown
from ._requests import Requests
from ._rotation import ProgressCallback, RotationProgress, rotate
from ._settings import MAXIMUM
from ._tokens import Refresher
from ._webhooks import Webhooks

__all__ = ["Services"]

# The longest retention a sweep takes: beyond it the cut-off would fall before year 1.
_LONGEST = timedelta(days=36_525)


class Services:
    """Every service on one core. ``Scoped`` (``_owner.py``) is the door onto these: each
    operation takes its owner scope explicitly."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.tokens = Refresher(core)
        self.authflow = AuthFlow(core, record_failure=self._record_failure)
        self.device = DeviceFlow(core, self.authflow)
        self.connections = Connections(core, self.authflow)
        self.checks = Checks(core, self.tokens, self.connections)
        self.requests = Requests(core, self.tokens)
        self.webhooks = Webhooks(core.repo, core.vault, core.hub)

    async def rotate_keys(
        self, *, batch_size: int, progress: ProgressCallback | None
    ) -> RotationProgress:
        core = self.core
        done = await rotate(
            core.repo,
            core.vault,
            secret_fields_of=core.secret_fields,
            all_secret_fields=[f for p in core.providers.all() for f in p.secret_field_keys],
            batch_size=batch_size,
            progress=progress,
        )
        await core.audit.record(
            "keys.rotated",
            detail={
                "primary_kid": done.primary_kid,
                "rotated": done.rotated,
                "rewrapped": done.rewrapped,
                "undecryptable": len(done.undecryptable) + len(done.undecryptable_pending),
            },
        )
        return done

    async def new_data_key(self) -> str:
        keyring = self.core.vault.keyring
        custody = None if keyring is None else keyring.custody
        if custody is None:
            raise ConfigurationError(
                "a new data key needs an aws-kms: or pkcs11: source first in the keys "
                "(keys= or INTEGRATIONS_KEYS); plain keys come from integrations.generate_key()"
            )
        kid: str = await custody.new_data_key(self.core.repo)
        await self.core.audit.record("keys.data_key_added", detail={"kid": kid})
        return kid

    # -- the audit trail ------------------------------------------------------------------

    async def audit(
        self,
        *,
        uuid: object,
        owner: OwnerScope,
        actor: object,
        since: object,
        action: object,
        limit: object,
        before: object,
    ) -> AuditPage:
        target = None if uuid is None else names.require_uuid(uuid)
        scope = check_scope(owner)
        actor = names.check_actor(actor)
        if since is not None and (not isinstance(since, datetime) or since.tzinfo is None):
            raise InvalidArgument(
                f"since must be a timezone-aware datetime, got {shown(since)}", field="since"
            )
        pattern: str | None = None
        if action is not None:
            if not isinstance(action, str) or not (
                action in ACTIONS or any(a.startswith(action + ".") for a in ACTIONS)
            ):
                raise InvalidArgument(
                    f"action must be one of {', '.join(sorted(ACTIONS))} or a family such "
                    f"as 'credentials', got {shown(action)}",
                    field="action",
                )
            pattern = action if action in ACTIONS else action + ".%"
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidArgument(f"limit must be 1 to 1000, got {shown(limit)}", field="limit")
        if before is not None and (
            isinstance(before, bool) or not isinstance(before, int) or not 1 <= before < 2**63
        ):
            raise InvalidArgument(
                "before must be a positive record number (a page's next_before), "
                f"got {shown(before)}",
                field="before",
            )
        # Records written by this process but still buffered are part of what is asked.
        await self.core.audit.flush()
        records = await self.core.repo.audit_page(
            before=2**63 - 1 if before is None else before,
            uuid=target,
            owner=None if isinstance(scope, AllOwners) else scope,
            by_owner=not isinstance(scope, AllOwners),
            actor=actor,
            since=since,
            action=pattern,
            limit=limit + 1,
        )
        more = len(records) > limit
        records = records[:limit]
        return AuditPage(records=records, next_before=records[-1].seq if more else None)

    async def verify_audit(self) -> list[Breach]:
        await self.core.audit.flush()
        repo = self.core.repo
        start, anchor = await repo.audit_anchor()
        breaches: list[Breach] = []
        after, previous, expected = start - 1, anchor, start
        while True:
            rows = await repo.audit_chain(after, 5000)
            if not rows:
                break
            breaches.extend(verify_records(rows, start_seq=expected, start_hash=previous))
            last, _, link = rows[-1]
            after, previous, expected = last.seq, link, last.seq + 1
        return breaches

    async def sweep_audit(self, *, older_than: timedelta) -> int:
        if not isinstance(older_than, timedelta) or not timedelta(0) < older_than <= _LONGEST:
            raise InvalidArgument(
                f"older_than must be a timedelta above 0 and at most 100 years, "
                f"got {shown(older_than)}",
                field="older_than",
            )
        await self.core.audit.flush()
        entry = AuditLog.entry_for("audit.swept", {"older_than_s": older_than.total_seconds()})
        return await self.core.repo.audit_sweep(utcnow() - older_than, entry)

    async def _record_failure(self, uuid: str, message: str, actor: str | None) -> None:
        await self.connections.record(uuid, False, message, actor=actor)

    async def close(self) -> None:
        """Stop in reverse order of dependence; the core's parts are the facade's to close."""
        with contextlib.suppress(Exception):
            # Buffered audit records are written while the pool is still open.
            await self.core.audit.close()
        try:
            # Before the HTTP client closes: a disconnect in flight still revokes its grant.
            await self.authflow.close()
        finally:
            try:
                await self.tokens.close()
            finally:
                # Ending the subscriptions first lets every ``async for`` finish cleanly.
                await self.core.hub.close()

    async def prune_events(
        self, *, max_age: float | timedelta | None, max_count: int | None
    ) -> int:
        if max_age is not None:
            if isinstance(max_age, timedelta):
                seconds: float = max_age.total_seconds()
            elif isinstance(max_age, int | float) and not isinstance(max_age, bool):
                seconds = max_age if max_age <= MAXIMUM["max_age"] else math.inf
            else:
                seconds = math.nan
            # Past the bound, a timedelta or a date overflows.
            if not 0 <= seconds <= MAXIMUM["max_age"]:
                raise InvalidArgument(
                    "max_age must be a number of seconds or a timedelta from 0 to "
                    f"{int(MAXIMUM['max_age'])}, or None; got {shown(max_age)}",
                    field="max_age",
                )
            max_age = timedelta(seconds=seconds)
        if max_count is not None and (
            isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 0
        ):
            raise InvalidArgument(
                f"max_count must be an int >= 0 or None, got {shown(max_count)}",
                field="max_count",
            )
        older_than = None if max_age is None else utcnow() - max_age
        return await self.core.repo.prune_events(older_than=older_than, keep=max_count)

    def authenticated_request(
        self,
        ref: object,
        method: str,
        url: str,
        *,
        allow_any_host: bool,
        max_attempts: int | None,
        owner: OwnerScope,
        opts: dict[str, Any],
        fresh: bool = False,
    ) -> Coroutine[Any, Any, Response]:
        """The coroutine that makes the call: on a cache hit, the request pipeline's own,
        with no frame of this layer left around it while the request is in flight."""
        row = None if fresh else self.connections.peek_ref(ref, owner)
        if row is not None:
            return self.requests.request(
                row,
                method,
                url,
                allow_any_host=allow_any_host,
                max_attempts=max_attempts,
                opts=opts,
            )
        return self._read_and_request(
            ref, method, url, allow_any_host, max_attempts, owner, opts, fresh
        )

    async def _read_and_request(
        self,
        ref: object,
        method: str,
        url: str,
        allow_any_host: bool,
        max_attempts: int | None,
        owner: OwnerScope,
        opts: dict[str, Any],
        fresh: bool,
    ) -> Response:
        row = await self.connections.require_ref(ref, owner, fresh=fresh)
        return await self.requests.request(
            row, method, url, allow_any_host=allow_any_host, max_attempts=max_attempts, opts=opts
        )

    async def access_token(self, uuid: object, owner: OwnerScope) -> str:
        row = await self.connections.require(uuid, owner)
        provider = self.core.require_provider(row)
        token = await telemetry.in_log_scope(row, self.tokens.access_token(row, provider))
        await self.core.audit.record(
            "token.revealed", owner=row.owner, uuid=row.uuid, provider=row.provider
        )
        return token

    async def refresh_access_token(self, uuid: object, owner: OwnerScope) -> str:
        # Before the read: a token obtained while the row was being read is new enough.
        began = utcnow()
        row = await self.connections.require(uuid, owner)
        provider = self.core.require_provider(row)
        refreshing = self.tokens.refresh(row, provider, began=began)
        return await telemetry.in_log_scope(row, refreshing)
