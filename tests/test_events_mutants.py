"""The event hub's listener lifecycle as the row cache sees it: a restored connection."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import pytest

from integrations._errors import ConfigurationError
from integrations._events import EventHub

TIMEOUT = 10.0


class ProbedListener:
    """A listener whose probes arrive at once; it notes when each was sent."""

    can_probe = True

    def __init__(self, on_payload: Callable[[str], None], on_lost: Callable[[], None]) -> None:
        self.on_payload = on_payload
        self.on_lost = on_lost
        self.sent: list[float] = []

    async def probe(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        self.sent.append(loop.time())
        arrived = loop.create_future()
        arrived.set_result(None)
        return arrived

    async def close(self) -> None:
        pass


class ToldWatcher:
    """The row cache's side of the hub: everything it is told, in order."""

    def __init__(self) -> None:
        self.told: list[tuple[str, Any]] = []

    def rows_changed(self, uuids: Any) -> None:
        pass

    def listening(self, up: bool) -> None:
        self.told.append(("listening", up))

    def proven(self, until: float) -> None:
        self.told.append(("proven", until))


async def test_a_restored_connection_turns_the_row_cache_on_again_once_probed() -> None:
    opened: list[ProbedListener] = []

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> ProbedListener:
        opened.append(ProbedListener(on_payload, on_lost))
        return opened[-1]

    watcher = ToldWatcher()
    # Heartbeats an hour apart: a probe seen within the test is one sent at once.
    hub = EventHub(
        listen,
        "integrations_test_restored",
        reconnect_initial=0.01,
        reconnect_max=0.01,
        heartbeat=(3600.0, 1.0),
        watcher=watcher,
    )

    def proofs() -> int:
        return sum(1 for what, value in watcher.told if what == "proven" and value > -math.inf)

    async with hub.subscribe() as sub:
        async with asyncio.timeout(TIMEOUT):
            while proofs() < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            opened[0].on_lost()
            assert (await sub.get()).kind == "resync"
            # The new connection is probed at once, not at the next heartbeat.
            while proofs() < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    await hub.close()
    # Each connection: live, served only once a probe proves it hears (-inf until then).
    shape = [
        (what, value if what == "listening" else value > -math.inf) for what, value in watcher.told
    ]
    assert shape == [
        ("listening", True),
        ("proven", False),
        ("proven", True),
        ("listening", False),
        ("listening", True),
        ("proven", False),
        ("proven", True),
        ("listening", False),
    ]
    assert len(opened) == 2 and len(opened[1].sent) == 1


class LateProbeListener(ProbedListener):
    """A listener whose probe takes 0.1 s to send and arrives 0.45 s after that."""

    async def probe(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0.1)
        self.sent.append(loop.time())
        arrived = loop.create_future()
        loop.call_later(0.45, arrived.set_result, None)
        return arrived


async def test_a_probe_must_arrive_within_the_timeout_counted_from_before_its_sending() -> None:
    opened: list[LateProbeListener] = []

    async def listen(
        _channel: str, on_payload: Callable[[str], None], on_lost: Callable[[], None]
    ) -> LateProbeListener:
        opened.append(LateProbeListener(on_payload, on_lost))
        return opened[-1]

    # 0.55 s from the sending's start to the arrival, against a timeout of 0.5 s: unheard,
    # and a subscription that would never receive anything says so.
    hub = EventHub(listen, "integrations_test_late", heartbeat=(3600.0, 0.5))
    with pytest.raises(ConfigurationError):
        async with hub.subscribe():
            pass
    await hub.close()
    assert opened[0].sent
