"""The services built at ``open()`` on one core, and the operations that join several."""

from __future__ import annotations

import math
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

from . import _telemetry as telemetry
from ._authflow import AuthFlow
from ._checks import Checks
from ._connections import Connections
from ._core import Core
from ._errors import ConfigurationError, InvalidArgument
from ._events import OwnerScope
from ._http import Response
from ._models import utcnow
from ._names import shown
from ._requests import Requests
from ._rotation import ProgressCallback, RotationProgress, rotate
from ._settings import MAXIMUM
from ._tokens import Refresher
from ._webhooks import Webhooks

__all__ = ["Services"]


class Services:
    """Every service on one core. ``Scoped`` (``_owner.py``) is the door onto these: each
    operation takes its owner scope explicitly."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.tokens = Refresher(core)
        self.authflow = AuthFlow(core, record_failure=self._record_failure)
        self.connections = Connections(core, self.authflow)
        self.checks = Checks(core, self.tokens, self.connections)
        self.requests = Requests(core, self.tokens)
        self.webhooks = Webhooks(core.repo, core.vault, core.hub)

    async def rotate_keys(
        self, *, batch_size: int, progress: ProgressCallback | None
    ) -> RotationProgress:
        core = self.core
        return await rotate(
            core.repo,
            core.vault,
            secret_fields_of=core.secret_fields,
            all_secret_fields=[f for p in core.providers.all() for f in p.secret_field_keys],
            batch_size=batch_size,
            progress=progress,
        )

    async def new_data_key(self) -> str:
        keyring = self.core.vault.keyring
        custody = None if keyring is None else keyring.custody
        if custody is None:
            raise ConfigurationError(
                "a new data key needs an aws-kms: or pkcs11: source first in the keys "
                "(keys= or INTEGRATIONS_KEYS); plain keys come from integrations.generate_key()"
            )
        kid: str = await custody.new_data_key(self.core.repo)
        return kid

    async def _record_failure(self, uuid: str, message: str, actor: str | None) -> None:
        await self.connections.record(uuid, False, message, actor=actor)

    async def close(self) -> None:
        """Stop in reverse order of dependence; the core's parts are the facade's to close."""
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
        return await telemetry.in_log_scope(row, self.tokens.access_token(row, provider))

    async def refresh_access_token(self, uuid: object, owner: OwnerScope) -> str:
        # Before the read: a token obtained while the row was being read is new enough.
        began = utcnow()
        row = await self.connections.require(uuid, owner)
        provider = self.core.require_provider(row)
        refreshing = self.tokens.refresh(row, provider, began=began)
        return await telemetry.in_log_scope(row, refreshing)
