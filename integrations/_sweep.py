"""Health sweep: one process per fleet re-checks stale connections and renews idle tokens."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import uuid as uuid_mod
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from . import _telemetry as telemetry
from ._checkall import CheckItem, CheckReport, CheckTarget, run_checks
from ._errors import IntegrationsError, InvalidArgument, LifecycleError, StorageError
from ._events import ALL_OWNERS
from ._lease import parse_time
from ._models import Validation, utcnow
from ._record import StoredRow
from ._schemes import TokenScheme
from ._services import Services
from ._settings import MAXIMUM, check_at_most

__all__ = ["SWEEP_ACTOR", "HealthSweep", "SweepCallback", "SweepReport", "check_sweep_options"]

log = logging.getLogger("integrations")

#: The ``actor`` of the checks a sweep records (it shows in their ``validated`` events).
SWEEP_ACTOR = "health_sweep"
#: The sweep's row in the ``leases`` table.
LEASE_PURPOSE = "health-sweep"
#: The shortest sweep lease, in seconds: a shorter one would be lost to a busy moment.
MIN_LEASE = 1.0
_PAGE = 200
_FIRST_UUID = str(uuid_mod.UUID(int=0))

Job = Literal["check", "refresh"]


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one sweep did; handed to ``on_sweep`` after each one.

    ``examined`` connections were configured; ``checked`` of them were checked (their
    last check older than ``stale_after``), ``check_failures`` of those checks failed;
    ``refreshed`` OAuth tokens close to expiry were renewed ahead of use,
    ``refresh_failures`` of the renewals failed; ``errors`` jobs raised (a database
    error, say) and are tried again next sweep. ``checks`` holds each check's outcome,
    as ``check_all()`` reports them (the checks that raised are among its failures).
    """

    started_at: datetime
    finished_at: datetime
    examined: int = 0
    checked: int = 0
    check_failures: int = 0
    refreshed: int = 0
    refresh_failures: int = 0
    errors: int = 0
    checks: CheckReport = field(default_factory=CheckReport)


SweepCallback = Callable[[SweepReport], object]


def _seconds(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(f"{name} must be a number of seconds or a timedelta", field=name)
    if isinstance(value, int) and not 0 <= value <= MAXIMUM[name]:
        # Checked as an int: a huge one has no float.
        seconds = -1.0 if value < 0 else math.inf
    else:
        seconds = float(value)
    if math.isnan(seconds) or seconds < 0 or (positive and seconds == 0):
        raise InvalidArgument(
            f"{name} must be {'positive' if positive else 'zero or more'}", field=name
        )
    check_at_most(name, seconds, InvalidArgument)
    return seconds


def check_sweep_options(
    *,
    interval: object,
    stale_after: object,
    concurrency: object,
    per_provider_interval: object,
    refresh_ahead: object,
    on_sweep: object,
) -> tuple[float, float, int, float, float | None]:
    """The sweep's options in seconds; TypeError/ValueError for a bad one."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int):
        raise InvalidArgument("concurrency must be an int", field="concurrency")
    if concurrency < 1:
        raise InvalidArgument("concurrency must be at least 1", field="concurrency")
    check_at_most("concurrency", concurrency, InvalidArgument)
    if on_sweep is not None and not callable(on_sweep):
        raise InvalidArgument("on_sweep must be a callable taking a SweepReport", field="on_sweep")
    return (
        _seconds("interval", interval, positive=True),
        _seconds("stale_after", stale_after, positive=False),
        concurrency,
        _seconds("per_provider_interval", per_provider_interval, positive=False),
        None if refresh_ahead is None else _seconds("refresh_ahead", refresh_ahead, positive=False),
    )


class HealthSweep:
    """Runs a sweep every ``interval`` seconds while it holds the fleet's sweep lease.

    The lease is a row (``leases``) that lasts ``interval`` seconds (at least
    ``MIN_LEASE``) by the database's clock. The leader renews it three times a lease,
    and the others try to take it as often, so a leader that dies, freezes or loses
    the database is replaced within about one lease and a third. The leader also keeps
    the lease's end by its own clock, from before it asked: once that passes without a
    renewal (frozen, cut off), or a renewal finds the lease taken, it stops sweeping at
    once and starts no further job, so two leaders never sweep together.
    """

    def __init__(
        self,
        services: Services,
        *,
        interval: float,
        stale_after: float,
        concurrency: int,
        per_provider_interval: float,
        refresh_ahead: float | None,
        on_sweep: SweepCallback | None,
    ) -> None:
        self._services = services
        self._core = services.core
        self.interval = interval
        self.stale_after = timedelta(seconds=stale_after)
        self.concurrency = concurrency
        self.per_provider_interval = per_provider_interval
        # Tokens that would expire before the next sweep (and its checks) are renewed now.
        ahead = interval + services.tokens.policy.leeway if refresh_ahead is None else refresh_ahead
        self.refresh_ahead = timedelta(seconds=ahead)
        self._on_sweep = on_sweep
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._pace: dict[str, float] = {}
        self._pace_locks: dict[str, asyncio.Lock] = {}
        self._holder = str(uuid_mod.uuid4())
        self.lease = max(interval, MIN_LEASE)
        # The local end of the lease (event loop clock); jobs start only before it.
        self._lease_ends = -math.inf
        self._sweeping: asyncio.Future[SweepReport] | None = None

    # -- leadership -----------------------------------------------------------------------

    async def run(self) -> None:
        """Sweep while leading, wait while not; returns once ``stop()`` is called."""
        try:
            await self._run()
        finally:
            self._done.set()

    async def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not await self._take():
                    await self._pause(self.lease / 3)
                    continue
                log.info(
                    "health sweep: this process leads the fleet's sweeps",
                    extra=telemetry.fields("sweep_leading"),
                )
                reason = await self._lead()
                if reason is not None:
                    log.warning(
                        "health sweep: %s; stopped sweeping, trying to lead again",
                        reason,
                        extra=telemetry.fields("sweep_lead_lost"),
                    )
        finally:
            if self._lease_ends > -math.inf:
                self._lease_ends = -math.inf
                with contextlib.suppress(IntegrationsError):
                    # The next leader need not wait for the lease to run out.
                    await self._core.repo.drop_lease(LEASE_PURPOSE, self._holder)

    async def stop(self) -> None:
        """Make ``run()`` return, and wait for it: a sweep in progress is cancelled and
        the lease given up."""
        self._stop.set()
        await self._done.wait()

    def _check_lease(self) -> None:
        """Refuse to start a job once the lease ran out by this process's clock (a frozen
        process resuming): the sweep ends, and its jobs not yet started never start."""
        if self._sweeping is not None and not self.leading():
            self._sweeping.cancel()
            raise LifecycleError("the sweep lease ran out")

    def leading(self) -> bool:
        """Whether the lease still runs by this process's clock: no job starts otherwise."""
        return asyncio.get_running_loop().time() < self._lease_ends

    async def _take(self) -> bool:
        """Take or renew the lease; on success its local end moves on."""
        loop = asyncio.get_running_loop()
        asked = loop.time()
        try:
            taken = await self._core.repo.take_lease(LEASE_PURPOSE, self._holder, self.lease)
        except StorageError as exc:
            log.warning(
                "health sweep: could not reach the database (%s); trying again in %gs",
                exc.code,
                self.lease / 3,
                extra=telemetry.fields("sweep_database_unreachable"),
            )
            return False
        if taken:
            # Counted from before the request: the database's end is never earlier.
            self._lease_ends = asked + self.lease
        return taken

    async def _keep(self) -> str:
        """Renew the lease until it is lost; returns why."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, min(self.lease / 3, self._lease_ends - loop.time())))
            if not self.leading():
                return "the sweep lease ran out before it could be renewed"
            asked = loop.time()
            try:
                async with asyncio.timeout_at(self._lease_ends):
                    taken = await self._core.repo.take_lease(
                        LEASE_PURPOSE, self._holder, self.lease
                    )
            except (StorageError, TimeoutError):
                continue  # tried again until the lease runs out
            if not taken:
                self._lease_ends = -math.inf
                return "another process took the sweep lease"
            self._lease_ends = asked + self.lease

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, less when stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), max(seconds, 0.0))

    async def _lead(self) -> str | None:
        """Sweep every ``interval`` while the lease is kept; returns why it was lost, or
        None when stopped."""
        loop = asyncio.get_running_loop()
        keeper = asyncio.ensure_future(self._keep())
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                if not self.leading():
                    # Woken late (a frozen process resuming) before the keeper saw it.
                    return "the sweep lease ran out by this process's clock"
                started = loop.time()
                sweep = self._sweeping = asyncio.ensure_future(self.sweep_once())
                try:
                    await asyncio.wait(
                        {sweep, stopping, keeper}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    if not sweep.done():
                        # Stopped, or no longer the leader: another process may sweep now.
                        sweep.cancel()
                        await asyncio.wait({sweep})
                    self._sweeping = None
                if keeper.done():
                    self._lease_ends = -math.inf
                    return keeper.result()
                if not self.leading():
                    return "the sweep lease ran out by this process's clock"
                if stopping.done() or sweep.cancelled():
                    return None
                try:
                    report = sweep.result()
                except LifecycleError:
                    return None
                except IntegrationsError as exc:
                    log.warning(
                        "health sweep failed (%s); trying again in %gs",
                        exc.code,
                        self.interval,
                        extra=telemetry.fields("sweep_failed"),
                    )
                else:
                    await self._report(report)
                wait = self.interval - (loop.time() - started)
                rest = asyncio.ensure_future(asyncio.sleep(max(wait, 0.0)))
                try:
                    await asyncio.wait(
                        {rest, stopping, keeper}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    rest.cancel()
                if keeper.done():
                    self._lease_ends = -math.inf
                    return keeper.result()
                if stopping.done():
                    return None
        finally:
            stopping.cancel()
            keeper.cancel()
            await asyncio.wait({keeper, stopping})

    async def _report(self, report: SweepReport) -> None:
        log.info(
            "health sweep: %d examined, %d checked (%d failed), %d tokens renewed "
            "(%d failed), %d errors",
            report.examined,
            report.checked,
            report.check_failures,
            report.refreshed,
            report.refresh_failures,
            report.errors,
            extra=telemetry.fields("sweep_done"),
        )
        if self._on_sweep is not None:
            try:
                result = self._on_sweep(report)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                # The application's callback must not end the sweeps.
                log.warning(
                    "health sweep: on_sweep raised %s",
                    type(exc).__name__,
                    extra=telemetry.fields("sweep_callback_failed"),
                )

    # -- one sweep ------------------------------------------------------------------------

    async def sweep_once(self) -> SweepReport:
        """Check every configured connection whose last check is older than
        ``stale_after`` and renew OAuth tokens that expire within ``refresh_ahead``."""
        started = utcnow()
        counts = {
            "examined": 0,
            "checked": 0,
            "check_failures": 0,
            "refreshed": 0,
            "refresh_failures": 0,
            "errors": 0,
        }
        slots = asyncio.Semaphore(self.concurrency)
        items: list[CheckItem] = []
        with telemetry.span("integrations.health_sweep") as span:
            after = _FIRST_UUID
            while True:
                rows = await self._core.repo.sweep_candidates(after, _PAGE)
                if not rows:
                    break
                after = rows[-1].uuid
                counts["examined"] += len(rows)
                now = utcnow()
                due = [(row, *self._due(row, now)) for row in rows]
                # A row due both for a check and a renewal is renewed first, then checked.
                first = {row.uuid for row, check, renew in due if check and renew}
                checks, _ = await asyncio.gather(
                    self._checks([row for row, check, _ in due if check], slots, counts, first),
                    asyncio.gather(
                        *(
                            self._refresh(row, slots, counts)
                            for row, check, renew in due
                            if renew and not check
                        )
                    ),
                )
                items.extend(checks.items)
                if len(rows) < _PAGE:
                    break
            for name, value in counts.items():
                span.set_attribute(f"integrations.sweep.{name}", value)
            self._check_lease()
            # Upkeep: the count deltas of the scopes that no reader folds.
            await self._core.repo.fold_every_connection_count()
        telemetry.record_sweep(counts)
        return SweepReport(
            started_at=started,
            finished_at=utcnow(),
            checks=CheckReport(tuple(items)),
            **counts,
        )

    async def _checks(
        self,
        rows: list[StoredRow],
        slots: asyncio.Semaphore,
        counts: dict[str, int],
        renew_first: set[str],
    ) -> CheckReport:
        """The due checks, run and reported as ``check_all(record=True)`` runs them, paced
        per provider and sharing the sweep's concurrency with its token renewals; the
        tokens of ``renew_first`` are renewed before their check."""
        raised: set[str] = set()
        by_uuid = {row.uuid: row for row in rows}

        async def validate(target: CheckTarget) -> Validation:
            await self._paced(target.provider)
            async with slots:
                self._check_lease()
                if target.uuid in renew_first:
                    await self._renew_logged(by_uuid[target.uuid], counts)
                try:
                    return await self._services.checks.validate_connection(
                        target.uuid, actor=SWEEP_ACTOR, owner=ALL_OWNERS
                    )
                except LifecycleError:
                    raise
                except IntegrationsError as exc:
                    raised.add(target.uuid)
                    self._job_failed("check", target.uuid, target.provider, target.owner, exc)
                    raise

        targets = [CheckTarget.of(row) for row in rows]
        # Bounded by the shared slots, taken after pacing: a provider waiting out its pace
        # holds no place that another provider's check could use.
        report = await run_checks(targets, validate, concurrency=max(1, len(targets)))
        counts["errors"] += len(raised)
        answered = [item for item in report.items if item.uuid not in raised]
        counts["checked"] += len(answered)
        counts["check_failures"] += sum(1 for item in answered if not item.ok)
        return report

    def _due(self, row: StoredRow, now: datetime) -> tuple[bool, bool]:
        """Whether ``row`` is due for a check, and for a token renewal ahead of use."""
        provider = self._core.provider_of(row)
        if provider is None or row.data.get("reauth_required"):
            # Unknown providers cannot be checked; a grant that needs its user stays as is.
            return False, False
        last = parse_time(row.data.get("last_validated_at"))
        check = last is None or now - last >= self.stale_after
        renew = False
        scheme = provider.scheme
        if isinstance(scheme, TokenScheme) and scheme.renews_ahead(row.data):
            expires_at = parse_time(row.data.get("expires_at"))
            renew = expires_at is not None and expires_at - now <= self.refresh_ahead
        return check, renew

    async def _paced(self, provider: str) -> None:
        """Space the start of one provider's jobs ``per_provider_interval`` apart."""
        if self.per_provider_interval <= 0:
            return
        lock = self._pace_locks.setdefault(provider, asyncio.Lock())
        async with lock:
            loop = asyncio.get_running_loop()
            wait = self._pace.get(provider, 0.0) - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._pace[provider] = loop.time() + self.per_provider_interval

    def _job_failed(
        self, job: Job, uuid: str, provider: str, owner: str | None, exc: IntegrationsError
    ) -> None:
        log.warning(
            "health sweep: %s of connection %s raised %s",
            job,
            uuid,
            exc.code,
            extra=telemetry.fields("sweep_job_failed", uuid=uuid, provider=provider, owner=owner),
        )

    async def _refresh(
        self, row: StoredRow, slots: asyncio.Semaphore, counts: dict[str, int]
    ) -> None:
        await self._paced(row.provider)
        async with slots:
            self._check_lease()
            await self._renew_logged(row, counts)

    async def _renew_logged(self, row: StoredRow, counts: dict[str, int]) -> None:
        try:
            provider = self._core.require_provider(row)
            try:
                # The refresher re-reads the row under its lock: a token another process
                # renewed meanwhile is kept, with no token request.
                await self._services.tokens.refresh(row, provider)
            except IntegrationsError as exc:
                if isinstance(exc, LifecycleError | StorageError):
                    raise
                # Recorded on the connection (and its event sent) by the refresher.
                counts["refresh_failures"] += 1
                return
            counts["refreshed"] += 1
        except LifecycleError:
            raise
        except IntegrationsError as exc:
            counts["errors"] += 1
            self._job_failed("refresh", row.uuid, row.provider, row.owner, exc)
