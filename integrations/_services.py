"""The services built at ``open()`` on one core, and the operations the doors share."""

from __future__ import annotations

from collections.abc import Coroutine, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any

from . import _names as names
from . import _record as record
from . import _telemetry as telemetry
from ._authflow import AuthFlow
from ._checks import Checks
from ._connections import Connections, check_scope
from ._core import Core
from ._errors import InvalidArgument
from ._events import OwnerScope, Subscription
from ._http import Response
from ._models import Connection, utcnow
from ._requests import Requests
from ._rotation import ProgressCallback, RotationProgress, rotate
from ._tokens import Refresher

__all__ = ["Services"]


class Services:
    """Every service on one core. The facade and the owner handle are doors onto these:
    each operation takes its owner scope explicitly."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.tokens = Refresher(core)
        self.authflow = AuthFlow(core, record_failure=self._record_failure)
        self.connections = Connections(core, self.authflow)
        self.checks = Checks(core, self.tokens, self.connections)
        self.requests = Requests(core, self.tokens)

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

    def subscribe(
        self,
        provider: str | None,
        uuid: str | None,
        owner: OwnerScope,
        kinds: Iterable[str] | None,
        maxsize: int,
        after: int | None = None,
    ) -> AbstractAsyncContextManager[Subscription]:
        if provider is not None:
            provider = self.core.providers.get(provider).key
        if uuid is not None:
            uuid = names.require_uuid(uuid)
        scope = check_scope(owner)
        return self.core.hub.subscribe(
            provider=provider, uuid=uuid, owner=scope, kinds=kinds, maxsize=maxsize, after=after
        )

    async def prune_events(
        self, *, max_age: float | timedelta | None, max_count: int | None
    ) -> int:
        if max_age is not None:
            if isinstance(max_age, int | float) and not isinstance(max_age, bool):
                max_age = timedelta(seconds=max_age)
            if not isinstance(max_age, timedelta) or max_age.total_seconds() < 0:
                raise InvalidArgument(
                    f"max_age must be a number of seconds or a timedelta >= 0, or None; got "
                    f"{max_age!r}",
                    field="max_age",
                )
        if max_count is not None and (
            isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 0
        ):
            raise InvalidArgument(
                f"max_count must be an int >= 0 or None, got {max_count!r}", field="max_count"
            )
        older_than = None if max_age is None else utcnow() - max_age
        return await self.core.repo.prune_events(older_than=older_than, keep=max_count)

    async def record_validation(self, uuid: object, result: Any, owner: OwnerScope) -> None:
        # A uuid that resolves to nothing (or to another owner's row) is quietly left alone.
        target = names.require_uuid(uuid)
        ok, message = record.validation_outcome(result)
        await self.connections.record(target, ok, message, actor=None, owner=check_scope(owner))

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

    async def begin_authorization(
        self,
        uuid: object,
        redirect_uri: str,
        *,
        scopes: Sequence[str] | None,
        actor: str | None,
        state: str | None = None,
        owner: OwnerScope,
    ) -> tuple[str, str]:
        return await self.authflow.begin(
            names.require_uuid(uuid),
            redirect_uri,
            scopes=scopes,
            actor=names.check_actor(actor),
            state=state,
            owner=check_scope(owner),
        )

    async def complete_authorization(
        self,
        state: str,
        *,
        code: str | None,
        error: str | None,
        error_description: str | None,
        owner: OwnerScope,
    ) -> Connection:
        row = await self.authflow.complete(
            state,
            code=code,
            error=error,
            error_description=error_description,
            owner=check_scope(owner),
        )
        return self.core.connection(row)

    async def exchange_code(
        self, uuid: object, code: str, redirect_uri: str, *, actor: str | None, owner: OwnerScope
    ) -> dict[str, Any]:
        row = await self.authflow.exchange(
            names.require_uuid(uuid),
            code,
            redirect_uri,
            names.check_actor(actor),
            check_scope(owner),
        )
        return self.core.masked(row)

    async def connect_interactive(
        self,
        uuid: object,
        *,
        scopes: Sequence[str] | None,
        open_browser: bool,
        timeout: float,  # noqa: ASYNC109 - enforced inside with asyncio.timeout
        port: int,
        owner: OwnerScope,
    ) -> Connection:
        from ._interactive import connect_interactive

        return await connect_interactive(
            self.authflow,
            self.core,
            names.require_uuid(uuid),
            owner=check_scope(owner),
            scopes=scopes,
            open_browser=open_browser,
            timeout=timeout,
            port=port,
        )
