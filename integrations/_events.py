"""Event hub: one LISTEN connection per process, fanned out to bounded, filtered subscriptions."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Final, Literal, Protocol, TypeAlias

from . import _telemetry as telemetry
from ._backoff import equal_jitter
from ._errors import ConfigurationError, IntegrationsError, InvalidArgument, LifecycleError
from ._models import EVENT_KINDS, Event
from ._names import shown
from ._scope import ALL_OWNERS as ALL_OWNERS
from ._scope import AllOwners as AllOwners
from ._settings import MAXIMUM

__all__ = [
    "ALL_OWNERS",
    "EventHub",
    "HubStats",
    "ListenFn",
    "Listener",
    "LogReader",
    "OwnerScope",
    "RowWatcher",
    "Subscription",
]

# Positions are PostgreSQL bigints.
_MAX_POSITION = 2**63 - 1

logger = logging.getLogger("integrations.events")

#: Seconds between the LISTEN connection's probes (``listen_heartbeat=``): each NOTIFYs
#: the connection from another session and waits for the notification to arrive. A
#: probe heard proves the changes committed before it were heard too, and lets the row
#: cache serve for two heartbeats from when it was sent: a frozen link stops the cache
#: within two heartbeats.
HEARTBEAT_EVERY = 1.0
#: How long a probe may take before the connection is treated as lost (and reopened).
HEARTBEAT_TIMEOUT = 5.0
#: What to do about notifications that do not arrive: the message names the remedy.
UNHEARD = (
    "the LISTEN connection on channel {channel!r} did not receive its own notification "
    "within {timeout:g}s: notifications do not arrive over this link, so events are not "
    "delivered and the row cache stays off. Behind a transaction-mode pooler (PgBouncer "
    "pool_mode=transaction) pass listen_dsn= a DSN that reaches PostgreSQL directly (or "
    "a session-mode pool)."
)


class Listener(Protocol):
    """A live LISTEN connection, as handed back by a ``ListenFn``."""

    async def close(self) -> None: ...


class RowWatcher(Protocol):
    """Told of changed rows and of the listener's state (the row cache)."""

    def rows_changed(self, uuids: Sequence[str] | None) -> None:
        """These rows changed; None: any row may have."""

    def listening(self, up: bool) -> None:
        """The LISTEN connection is up (changes are being received) or lost."""

    def proven(self, until: float) -> None:
        """Changes are known to be heard until ``until`` (monotonic clock): the
        listener's last probe arrived."""


ListenFn: TypeAlias = Callable[
    [str, Callable[[str], None], Callable[[], None]], Awaitable[Listener]
]
"""``await listen(channel, on_payload, on_lost)``: open a dedicated connection and LISTEN.

Both callbacks must be invoked on the event loop thread (asyncpg's listener and
termination callbacks are). ``on_lost`` may also fire after ``close()``; the
hub ignores calls from listeners it no longer holds.
"""


class LogReader(Protocol):
    """Reads the durable event log (the repository's ``events_after``)."""

    async def __call__(
        self,
        after: int,
        *,
        owner: str | None,
        any_owner: bool,
        provider: str | None,
        uuid: str | None,
        kinds: Sequence[str] | None,
        limit: int,
    ) -> tuple[list[Event], int]: ...


OwnerScope: TypeAlias = str | Literal[AllOwners.ALL_OWNERS] | None

RESYNC: Final = "resync"

#: Events read from the log per query while a resuming subscription catches up.
REPLAY_PAGE: Final = 500
#: The longest wait between tries to read the log while the database cannot be reached.
REPLAY_RETRY_MAX: Final = 5.0


class _Closed:
    """Wakes getters of a closed subscription; never queued."""


_CLOSED: Final = _Closed()


class Subscription:
    """A filtered, bounded stream of events; iterate it or ``await get()``.

    When the queue is full the oldest event is dropped and ``dropped`` counts
    it, so a slow reader loses history rather than holding up anyone else.
    ``resync`` events pass every filter: they mean "re-read what you care
    about", because notifications sent while the listener was down are gone.

    A subscription that resumes (``after=`` a position) reads the durable log
    instead of losing anything: it first replays what was logged after its
    cursor, and whenever live events may have been missed (the listener was
    lost, or the queue overflowed) it reads the log again from the last event
    it handed out. Live events at or below that cursor are skipped, so nothing
    arrives twice. Its only ``resync`` is the one that says the cursor fell out
    of retention (``detail["reason"] == "expired"``).
    """

    __slots__ = (
        "_catch_up",
        "_closed",
        "_dropped",
        "_kinds",
        "_last",
        "_log",
        "_owner",
        "_provider",
        "_queue",
        "_ready",
        "_replayed",
        "_uuid",
        "maxsize",
    )

    def __init__(
        self,
        *,
        provider: str | None,
        uuid: str | None,
        owner: OwnerScope,
        kinds: frozenset[str] | None,
        maxsize: int,
        after: int | None = None,
        log: LogReader | None = None,
    ) -> None:
        if after is not None and log is None:
            raise ValueError("a subscription that resumes needs the log")
        self._provider = provider
        self._uuid = uuid
        self._owner = owner
        self._kinds = kinds
        self.maxsize = maxsize
        self._dropped = 0
        self._queue: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        self._log = log if after is not None else None
        self._last = after or 0
        self._catch_up = after is not None
        self._replayed: deque[Event] = deque()

    def __repr__(self) -> str:
        return (
            f"Subscription(provider={self._provider!r}, uuid={self._uuid!r}, "
            f"owner={self._owner!r}, kinds={sorted(self._kinds) if self._kinds else None!r}, "
            f"pending={len(self._queue)}, dropped={self._dropped}, closed={self._closed})"
        )

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def dropped(self) -> int:
        """How many events were dropped, oldest first, because the queue was full."""
        return self._dropped

    @property
    def pending(self) -> int:
        """Events queued and not yet read."""
        return len(self._queue) + len(self._replayed)

    @property
    def position(self) -> int | None:
        """The position of the last logged event handed out (or the ``after=`` it started
        from); None for a live-only subscription."""
        return self._last if self._log is not None else None

    def matches(self, event: Event) -> bool:
        """Whether this subscription's filters let ``event`` through."""
        if event.kind == RESYNC:
            return True
        if self._kinds is not None and event.kind not in self._kinds:
            return False
        if self._provider is not None and event.provider != self._provider:
            return False
        if self._uuid is not None and event.uuid != self._uuid:
            return False
        return self._owner is ALL_OWNERS or event.owner == self._owner

    async def get(self) -> Event:
        """The next event; raises LifecycleError once the subscription is closed."""
        item = await self._next()
        if isinstance(item, _Closed):
            raise LifecycleError("The subscription is closed.")
        return item

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        item = await self._next()
        if isinstance(item, _Closed):
            raise StopAsyncIteration
        return item

    async def _next(self) -> Event | _Closed:
        while True:
            if self._closed:
                return _CLOSED
            if self._replayed:
                event = self._replayed.popleft()
                if event.position is not None:
                    self._last = event.position
                return event
            if self._catch_up:
                await self._read_log()
                continue
            if self._queue:
                event = self._queue[0]
                if self._log is not None and event.position is not None:
                    if event.position <= self._last:
                        self._queue.popleft()
                        continue  # replayed already
                    if event.position > self._last + 1:
                        # A hole before this event: other subscribers' events, or ones
                        # whose notification was lost with a listener. The log tells.
                        self._catch_up = True
                        continue
                    self._last = event.position
                self._queue.popleft()
                return event
            self._ready.clear()
            await self._ready.wait()

    async def _read_log(self) -> None:
        """One page of the log after the cursor into ``_replayed``; another is asked
        for while pages come back full. A database that cannot be reached is waited
        for (with backoff), not raised to the reader: the events are still there."""
        assert self._log is not None
        delay = 0.1
        while not self._closed:
            try:
                events, pruned = await self._log(
                    self._last,
                    owner=None if self._owner is ALL_OWNERS else self._owner,
                    any_owner=self._owner is ALL_OWNERS,
                    provider=self._provider,
                    uuid=self._uuid,
                    kinds=None if self._kinds is None else sorted(self._kinds),
                    limit=REPLAY_PAGE,
                )
            except IntegrationsError as exc:
                logger.warning(
                    "reading the event log after position %d failed (%s); retrying in about %.2fs",
                    self._last,
                    exc.code,
                    delay,
                    extra=telemetry.fields("event_log_read_failed"),
                )
                self._ready.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready.wait(), equal_jitter(delay))
                delay = min(delay * 2, REPLAY_RETRY_MAX)
                continue
            if pruned > self._last:
                # Retention deleted events this cursor had not reached: say so, then
                # go on from the oldest event still kept.
                self._replayed.append(
                    Event(
                        kind=RESYNC,
                        uuid=None,
                        detail={"reason": "expired", "after": self._last, "oldest": pruned + 1},
                    )
                )
                self._last = pruned
                return
            self._replayed.extend(events)
            self._catch_up = len(events) >= REPLAY_PAGE
            top = events[-1].position if events else None
            if top is not None:
                # Live events the log has just handed over are not pending twice.
                while self._queue and (self._queue[0].position or 0) <= top:
                    self._queue.popleft()
            return

    def _put(self, event: Event) -> None:
        if self._closed:
            return
        if self._log is not None:
            # The log has everything a resuming subscription could miss here: a lost
            # listener or an overflow means reading it again, never a gap.
            if event.kind == RESYNC or len(self._queue) >= self.maxsize:
                self._queue.clear()
                self._catch_up = True
                self._ready.set()
                return
        elif len(self._queue) >= self.maxsize:
            self._queue.popleft()
            self._dropped += 1
            telemetry.count_event_dropped("queue_full")
        self._queue.append(event)
        self._ready.set()

    def _close(self) -> None:
        # Queued events are discarded: closing is for shutdown, and readers
        # should stop promptly rather than drain a backlog nobody will act on.
        self._closed = True
        self._queue.clear()
        self._replayed.clear()
        self._ready.set()


@dataclass(frozen=True, slots=True)
class HubStats:
    """Counters for monitoring and tests."""

    received: int
    malformed: int
    reconnects: int
    reconnect_attempts: int
    subscriptions: int
    listening: bool


class EventHub:
    """Fans one LISTEN connection out to every subscription in this process.

    The connection is opened by the first ``subscribe()`` and kept until
    ``close()``. When it is lost the hub reconnects with capped exponential
    backoff and then sends ``resync`` to every subscription.
    """

    def __init__(
        self,
        listen: ListenFn,
        channel: str,
        *,
        reconnect_initial: float = 0.1,
        reconnect_max: float = 5.0,
        watcher: RowWatcher | None = None,
        heartbeat: tuple[float, float] | None = None,
        log: LogReader | None = None,
    ) -> None:
        if not isinstance(channel, str) or not channel:
            raise ValueError("channel must be a non-empty string")
        if not 0 < reconnect_initial <= reconnect_max:
            raise ValueError("need 0 < reconnect_initial <= reconnect_max")
        self._listen = listen
        self._channel = channel
        self._reconnect_initial = reconnect_initial
        self._reconnect_max = reconnect_max
        self._subscriptions: set[Subscription] = set()
        self._listener: Listener | None = None
        # Bumped whenever the held listener stops being the current one, so a
        # late on_lost from an old or self-closed connection is ignored.
        self._generation = 0
        self._dead: list[Listener] = []
        self._open_lock = asyncio.Lock()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._closed = False
        self._received = 0
        self._malformed = 0
        self._reconnects = 0
        self._reconnect_attempts = 0
        self._watcher = watcher
        self._heartbeat = heartbeat or (HEARTBEAT_EVERY, HEARTBEAT_TIMEOUT)
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._log = log
        # Probes: the generation whose listener was last heard, how many probes sent in a
        # row went unheard, and news of either (replaced once set).
        self._heard_generation = -1
        self._unheard = 0
        self._news = asyncio.Event()
        self._kick = asyncio.Event()
        self._unheard_logged_generation = -1

    def __repr__(self) -> str:
        return (
            f"EventHub(channel={self._channel!r}, listening={self.listening}, "
            f"subscriptions={len(self._subscriptions)}, closed={self._closed})"
        )

    @property
    def channel(self) -> str:
        return self._channel

    @property
    def listening(self) -> bool:
        return self._listener is not None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> HubStats:
        return HubStats(
            received=self._received,
            malformed=self._malformed,
            reconnects=self._reconnects,
            reconnect_attempts=self._reconnect_attempts,
            subscriptions=len(self._subscriptions),
            listening=self.listening,
        )

    def subscribe(
        self,
        *,
        provider: str | None = None,
        uuid: str | None = None,
        owner: OwnerScope = None,
        kinds: Iterable[str] | None = None,
        maxsize: int = 1000,
        after: int | None = None,
    ) -> AbstractAsyncContextManager[Subscription]:
        """A subscription for the ``async with`` block; arguments are checked now.

        ``owner=None`` sees system connections only, a string sees that owner's,
        ``ALL_OWNERS`` sees everything. ``after`` (a position, 0 for the oldest kept)
        replays the log after it first, then goes on live.
        """
        if after is not None:
            if (
                isinstance(after, bool)
                or not isinstance(after, int)
                or not 0 <= after <= _MAX_POSITION
            ):
                raise InvalidArgument(
                    f"after must be an event position (an int >= 0, such as an earlier "
                    f"Event.position), got {shown(after)}",
                    field="after",
                )
            if self._log is None:
                raise InvalidArgument("this event hub has no log to resume from", field="after")
        for label, value in (("provider", provider), ("uuid", uuid)):
            if value is not None and not isinstance(value, str):
                raise InvalidArgument(f"{label} must be a str or None", field=label)
        if owner is not None and owner is not ALL_OWNERS and not isinstance(owner, str):
            raise InvalidArgument("owner must be a str, None or ALL_OWNERS", field="owner")
        kind_set: frozenset[str] | None = None
        if kinds is not None:
            if isinstance(kinds, str):
                raise InvalidArgument(
                    "kinds must be an iterable of kind names, such as ['connected', "
                    "'disconnected'], not a str.",
                    field="kinds",
                )
            if not isinstance(kinds, Iterable) or isinstance(kinds, bytes | bytearray | Mapping):
                raise InvalidArgument(
                    f"kinds must be an iterable of kind names, not {type(kinds).__name__}.",
                    field="kinds",
                )
            # Looked up one by one: a list or a set among them is unhashable.
            # At most a thousand are read: an endless iterator is a mistake, not a wait.
            given = list(itertools.islice(kinds, 1001))
            if len(given) > 1000 or not all(isinstance(kind, str) for kind in given):
                raise InvalidArgument(
                    "kinds must be up to a thousand strings, such as 'connected'.", field="kinds"
                )
            kind_set = frozenset(given)
            unknown = kind_set - EVENT_KINDS
            if unknown:
                raise InvalidArgument(
                    f"unknown event kinds: {', '.join(sorted(map(shown, unknown)))}; the kinds "
                    f"are {', '.join(sorted(EVENT_KINDS))}",
                    field="kinds",
                )
            if not kind_set:
                raise InvalidArgument(
                    "kinds must name at least one kind (or be None for all)", field="kinds"
                )
        if (
            isinstance(maxsize, bool)
            or not isinstance(maxsize, int)
            or not 1 <= maxsize <= MAXIMUM["maxsize"]
        ):
            raise InvalidArgument(
                f"maxsize must be an int of at least 1, got {shown(maxsize)}", field="maxsize"
            )
        subscription = Subscription(
            provider=provider,
            uuid=uuid,
            owner=owner,
            kinds=kind_set,
            maxsize=maxsize,
            after=after,
            log=self._log,
        )
        return self._subscribed(subscription)

    @asynccontextmanager
    async def _subscribed(self, subscription: Subscription) -> AsyncIterator[Subscription]:
        self._check_open()
        if not await self._ensure_listening():
            await self._sync()
        if await self._proof() is False:
            # A subscription that would never receive anything says so now.
            raise ConfigurationError(self._unheard_message())
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)
            subscription._close()

    async def start(self) -> None:
        """Open the LISTEN connection now rather than at the first ``subscribe()``, and
        wait for its first probe: when notifications do not arrive, an error is logged
        (naming ``listen_dsn``) and the row cache stays off."""
        self._check_open()
        await self._ensure_listening()
        if await self._proof() is False:
            self._log_unheard(self._generation)

    def _unheard_message(self) -> str:
        return UNHEARD.format(channel=self._channel, timeout=self._heartbeat[1])

    def _log_unheard(self, generation: int) -> None:
        # Once per connection; an error the first time, a warning for each reopened one.
        if self._unheard_logged_generation == generation:
            return
        level = logging.WARNING if self._unheard_logged_generation >= 0 else logging.ERROR
        self._unheard_logged_generation = generation
        logger.log(level, self._unheard_message(), extra=telemetry.fields("listen_unheard"))

    @property
    def _proven(self) -> bool:
        return self._listener is not None and self._heard_generation == self._generation

    def _probe_news(self, heard: bool) -> None:
        if heard:
            self._heard_generation = self._generation
            self._unheard = 0
        else:
            self._unheard += 1
        news, self._news = self._news, asyncio.Event()
        news.set()

    async def _proof(self) -> bool | None:
        """Whether the listener is heard: True once a probe arrived on it, False when a
        probe sent went unheard, None when that cannot be told (a listener that cannot
        be probed, a database that cannot be reached)."""
        if not getattr(self._listener, "can_probe", False):
            return None
        every, timeout = self._heartbeat
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * timeout + every
        while True:
            if self._proven:
                return True
            if self._unheard:
                return False
            news = self._news
            try:
                await asyncio.wait_for(news.wait(), deadline - loop.time())
            except TimeoutError:
                return None

    def publish_local(self, event: Event) -> None:
        """Deliver an already-parsed event to the matching subscriptions of this hub."""
        if not isinstance(event, Event):
            raise TypeError("publish_local() takes an Event")
        self._check_open()
        self._fan_out(event)

    async def close(self) -> None:
        """End every subscription and stop the listener; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._generation += 1
        self._set_listening(False)
        for subscription in self._subscriptions:
            subscription._close()
        self._subscriptions.clear()
        tasks = [t for t in (self._reconnect_task, self._heartbeat_task) if t is not None]
        self._reconnect_task = self._heartbeat_task = None
        for task in tasks:
            task.cancel()
        if tasks:
            # wait() rather than await: the tasks' cancellation is not ours to re-raise.
            await asyncio.wait(tasks)
        listener, self._listener = self._listener, None
        if listener is not None:
            self._dead.append(listener)
        await self._close_dead()

    def _check_open(self) -> None:
        if self._closed:
            raise LifecycleError("The event hub is closed.")

    def _fan_out(self, event: Event) -> None:
        for subscription in self._subscriptions:
            if subscription.matches(event):
                subscription._put(event)

    def _set_listening(self, up: bool) -> None:
        if self._watcher is not None:
            self._watcher.listening(up)
            if up and getattr(self._listener, "can_probe", False):
                # Served only once a probe proves the new connection hears changes.
                self._watcher.proven(-math.inf)
        if up:
            self._kick.set()  # probe the new connection at once
        if up and self._heartbeat_task is None and not self._closed:
            self._heartbeat_task = asyncio.get_running_loop().create_task(
                self._beat(), name=f"integrations-events-heartbeat:{self._channel}"
            )

    async def _beat(self) -> None:
        """Probe the listener every so often (see ``HEARTBEAT_EVERY``). A connection cut
        without a close (a dead peer, a frozen network) would otherwise look alive for
        ever, and one behind a transaction pooler would never hear a thing: the row
        cache would go on serving what it can no longer hear changes to."""
        every, timeout = self._heartbeat
        loop = asyncio.get_running_loop()
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), every)
            self._kick.clear()
            listener, generation = self._listener, self._generation
            if listener is None:
                continue
            started = loop.time()
            heard = await self._probe_once(listener, timeout)
            if generation != self._generation or listener is not self._listener:
                continue  # lost and replaced meanwhile
            if heard is None:
                continue
            probed = getattr(listener, "can_probe", False)
            if probed:
                self._probe_news(heard)
            if heard:
                if self._watcher is not None:
                    self._watcher.proven(started + 2 * every)
                continue
            if probed and self._heard_generation != generation:
                self._log_unheard(generation)  # never heard on this connection
            else:
                logger.warning(
                    "the LISTEN connection on channel %r did not answer within %gs",
                    self._channel,
                    timeout,
                    extra=telemetry.fields("listen_unresponsive"),
                )
            abort = getattr(listener, "abort", None)
            if abort is not None:
                abort()
            self._on_lost(generation)

    async def _probe_once(self, listener: Listener, limit: float) -> bool | None:
        """True: the probe arrived; False: it was sent and did not arrive (or, without
        probes, the connection did not answer); None: it could not be sent."""
        probe = getattr(listener, "probe", None)
        if probe is None or not getattr(listener, "can_probe", False):
            sync = getattr(listener, "sync", None)
            if sync is None:
                return None
            try:
                await asyncio.wait_for(sync(), limit)
            except Exception:
                return False
            return None  # alive, but not a proof of hearing
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        try:
            arrival = await asyncio.wait_for(probe(), limit)
        except Exception as exc:
            # The NOTIFY did not go out (the pool cannot reach the database): no news
            # of the listener; its own session's end tells of its loss.
            logger.debug(
                "sending the LISTEN connection's probe failed: %s",
                type(exc).__name__,
                extra=telemetry.fields("listen_probe_failed"),
            )
            return None
        try:
            await asyncio.wait_for(arrival, max(0.0, deadline - loop.time()))
        except TimeoutError:
            return False
        return True

    def _rows_changed(self, payload: str) -> bool:
        """Feed a row-change notice to the watcher; False when ``payload`` is not one."""
        try:
            rows = json.loads(payload)["rows"]
        except (ValueError, TypeError, KeyError):
            return False
        if self._watcher is not None:
            ok = isinstance(rows, list) and all(isinstance(r, str) for r in rows)
            self._watcher.rows_changed(rows if ok else None)
        return True

    def _on_payload(self, payload: str) -> None:
        # Runs inside the driver's callback: parse, enqueue, never raise.
        if self._closed:
            return
        if payload.startswith('{"rows":') and self._rows_changed(payload):
            return
        self._received += 1
        try:
            event = Event.from_payload(payload)
        except Exception as exc:
            if self._watcher is not None:
                # Whatever it was about, a row may have changed.
                self._watcher.rows_changed(None)
            self._malformed += 1
            # The body is left out: it can be up to 8000 bytes of anything.
            logger.warning(
                "dropped a malformed event payload on channel %r (%d chars): %s",
                self._channel,
                len(payload),
                type(exc).__name__,
                extra=telemetry.fields("event_payload_malformed"),
            )
            telemetry.count_event_dropped("malformed")
            return
        if self._watcher is not None and event.uuid is not None:
            self._watcher.rows_changed((event.uuid,))
        self._fan_out(event)

    def _on_lost(self, generation: int) -> None:
        if self._closed or generation != self._generation:
            return
        self._generation += 1
        self._set_listening(False)
        if self._listener is not None:
            self._dead.append(self._listener)
            self._listener = None
        logger.warning(
            "lost the LISTEN connection on channel %r; reconnecting",
            self._channel,
            extra=telemetry.fields("listen_lost"),
        )
        if self._reconnect_task is None:
            self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect(), name=f"integrations-events-reconnect:{self._channel}"
            )

    async def _sync(self) -> None:
        """Let the notifications of commits made so far arrive first, so that a new
        subscription starts after them (when the listener can tell)."""
        sync = getattr(self._listener, "sync", None)
        if sync is not None:
            try:
                await sync()
            except Exception as exc:
                # A lost connection is the reconnect's business, not the subscriber's.
                logger.debug(
                    "syncing the LISTEN connection failed: %s",
                    type(exc).__name__,
                    extra=telemetry.fields("listener_sync_failed"),
                )

    async def _ensure_listening(self) -> bool:
        """Open the listener unless it is open; True when this call opened it."""
        async with self._open_lock:
            if self._listener is not None or self._reconnect_task is not None:
                return False
            generation = self._generation
            # A failure here propagates: the caller learns the database is
            # unreachable, and the next subscribe() tries again.
            listener = await self._listen(
                self._channel, self._on_payload, partial(self._on_lost, generation)
            )
            if self._closed:
                self._dead.append(listener)
                await self._close_dead()
                self._check_open()
            if generation != self._generation:
                # Lost while opening; on_lost has already started the reconnect.
                self._dead.append(listener)
                await self._close_dead()
                return True
            self._listener = listener
            self._set_listening(True)
            return True

    async def _reconnect(self) -> None:
        delay = self._reconnect_initial
        try:
            await self._close_dead()
            while not self._closed:
                generation = self._generation
                self._reconnect_attempts += 1
                try:
                    listener = await self._listen(
                        self._channel, self._on_payload, partial(self._on_lost, generation)
                    )
                except Exception as exc:
                    logger.warning(
                        "reconnecting the LISTEN connection on channel %r failed (%s); "
                        "retrying in about %.2fs",
                        self._channel,
                        type(exc).__name__,
                        delay,
                        extra=telemetry.fields("listen_reconnect_failed"),
                    )
                else:
                    if generation == self._generation and not self._closed:
                        self._listener = listener
                        self._set_listening(True)
                        self._reconnects += 1
                        logger.info(
                            "LISTEN connection on channel %r restored",
                            self._channel,
                            extra=telemetry.fields("listen_restored"),
                        )
                        telemetry.count_resync()
                        self._fan_out(Event(kind=RESYNC, uuid=None))
                        return
                    # Lost again while connecting, or closed meanwhile.
                    self._dead.append(listener)
                    await self._close_dead()
                    if self._closed:
                        return
                # Jitter spreads out processes that lost the server together.
                await asyncio.sleep(equal_jitter(delay))
                delay = min(delay * 2, self._reconnect_max)
        finally:
            if self._reconnect_task is asyncio.current_task():
                self._reconnect_task = None

    async def _close_dead(self) -> None:
        while self._dead:
            listener = self._dead.pop()
            try:
                await listener.close()
            except Exception as exc:
                # The connection is already gone or going; nothing to recover.
                logger.debug(
                    "closing a LISTEN connection failed: %s",
                    type(exc).__name__,
                    extra=telemetry.fields("listen_close_failed"),
                )
