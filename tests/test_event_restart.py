"""PostgreSQL killed and restarted under 20 writers: every committed change is delivered to
the webhook and seen by a resuming subscriber, once, in order per connection."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from integrations import ALL_OWNERS, Integrations, IntegrationsError

from .conftest import TEST_KEY
from .privatepg import PrivateServer

pytestmark = pytest.mark.slow

WRITERS = 20
RUN = 8.0  # seconds of writing
KILL_AT, DOWN_FOR = 2.0, 1.5  # the server
RECEIVER_DOWN = (3.0, 6.0)  # the webhook receiver refuses connections meanwhile


@pytest.fixture
def server() -> Any:
    found = PrivateServer()
    found.init()
    found.start()
    yield found
    found.remove()


class Receiver:
    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        import json

        async def hook(request: web.Request) -> web.Response:
            body = json.loads(await request.read())
            self.got.append((request.headers["webhook-id"], body))
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/hook", hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    await found.start()
    yield found
    await found.stop()


async def test_a_restart_loses_and_duplicates_no_event(
    server: PrivateServer, receiver: Receiver
) -> None:
    admin = await asyncpg.connect(server.dsn())
    await admin.execute("CREATE DATABASE restart")
    await admin.close()
    dsn = server.dsn("restart")
    opened: list[Integrations] = []

    async def instance(**options: Any) -> Integrations:
        integ = Integrations(dsn, keys=TEST_KEY, pool_max_size=WRITERS + 4, **options)
        await integ.open()
        opened.append(integ)
        return integ

    try:
        writer = await instance()
        endpoint = await writer.add_webhook(
            f"http://127.0.0.1:{receiver.port}/hook", allow_loopback=True
        )
        uuids = [(await writer.add_connection("openai", f"w{i}")).uuid for i in range(WRITERS)]
        workers = [await instance() for _ in range(2)]
        reader = await instance()
        delays = (0.2, 0.5, 1.0) + (2.0,) * 60
        tasks = [
            asyncio.create_task(w.run_webhooks(allow_loopback=True, retry_delays=delays, poll=0.2))
            for w in workers
        ]
        seen: list[int] = []
        other: list[str] = []

        async def subscribe() -> None:
            async with reader.subscribe(owner=ALL_OWNERS, after=0) as events:
                async for event in events:
                    if event.position is None:
                        other.append(event.kind)
                    else:
                        seen.append(event.position)

        tasks.append(asyncio.create_task(subscribe()))
        acked: Counter[str] = Counter()
        tried: Counter[str] = Counter()
        failures: Counter[str] = Counter()
        start = time.monotonic()

        async def write(uuid: str) -> None:
            i = 0
            while time.monotonic() - start < RUN:
                i += 1
                tried[uuid] += 1
                try:
                    await writer.save_setup(uuid, {"api_key": f"sk-{i:05d}-0123456789"})
                    acked[uuid] += 1
                except IntegrationsError as exc:
                    failures[exc.code] += 1
                    await asyncio.sleep(0.05)

        async def chaos() -> None:
            await asyncio.sleep(KILL_AT)
            await asyncio.to_thread(server.kill)
            await asyncio.sleep(DOWN_FOR)
            await asyncio.to_thread(server.start)
            await asyncio.sleep(RECEIVER_DOWN[0] - KILL_AT - DOWN_FOR)
            await receiver.stop()
            await asyncio.sleep(RECEIVER_DOWN[1] - RECEIVER_DOWN[0])
            await receiver.start()

        await asyncio.gather(chaos(), *(write(u) for u in uuids))

        db = await asyncpg.connect(dsn)
        try:
            logged = [
                (r["position"], r["uuid"], r["kind"])
                for r in await db.fetch(
                    "SELECT position, uuid, kind FROM integrations.events ORDER BY position"
                )
            ]
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                pending = await db.fetchval(
                    "SELECT count(*) FROM integrations.webhook_deliveries "
                    "WHERE state <> 'delivered'"
                )
                made = await db.fetchval("SELECT count(*) FROM integrations.webhook_deliveries")
                if not pending and made >= len(logged) and len(seen) >= len(logged):
                    break
                await asyncio.sleep(0.2)
            rows = await db.fetch(
                "SELECT id, position, attempts FROM integrations.webhook_deliveries"
            )
            deliveries = {r["id"]: r["position"] for r in rows}
            failed_attempts = sum(r["attempts"] - 1 for r in rows)
        finally:
            await db.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for integ in opened:
            await integ.close()

    positions = [p for p, _, _ in logged]
    saves = Counter(u for _, u, k in logged if k == "setup_saved")
    # What the writers were told was saved is logged; what failed may or may not be.
    lost_acked = sum(max(0, acked[u] - saves[u]) for u in uuids)
    over_tried = sum(max(0, saves[u] - tried[u]) for u in uuids)

    first_receipt: dict[str, int] = {}
    for message_id, body in receiver.got:
        first_receipt.setdefault(message_id, body["data"]["position"])
    received = Counter(first_receipt.values())
    lost_webhook = len(set(positions) - set(received))
    duplicated_webhook = sum(n - 1 for n in received.values())  # one position, two ids
    retried_same_id = len(receiver.got) - len(first_receipt)
    by_connection: dict[str, list[int]] = defaultdict(list)
    for message_id, body in receiver.got:
        if first_receipt[message_id] == body["data"]["position"] and body["data"]["uuid"]:
            lane = by_connection[body["data"]["uuid"]]
            if body["data"]["position"] not in lane:
                lane.append(body["data"]["position"])
    out_of_order = sum(lane != sorted(lane) for lane in by_connection.values())
    lost_subscriber = len(set(positions) - set(seen))
    duplicated_subscriber = len(seen) - len(set(seen))

    print(
        f"\nrestart: {len(positions)} events logged, {sum(acked.values())} writes acknowledged, "
        f"{sum(failures.values())} failed ({dict(failures)}); webhook: {len(receiver.got)} "
        f"requests, {lost_webhook} lost, {duplicated_webhook} duplicated under another id, "
        f"{retried_same_id} received again with the same id, {failed_attempts} failed "
        f"attempts retried, {out_of_order} connections out of "
        f"order; subscriber: {lost_subscriber} lost, {duplicated_subscriber} duplicated, "
        f"other events {other}"
    )
    assert sum(failures.values()) > 0, "the server restart was not felt"
    assert failed_attempts > 0, "the receiver's downtime was not felt"
    assert lost_acked == 0 and over_tried == 0
    assert set(deliveries.values()) == set(positions)
    assert set(first_receipt) <= set(deliveries)
    assert lost_webhook == 0 and duplicated_webhook == 0 and out_of_order == 0
    assert seen == positions
    assert lost_subscriber == 0 and duplicated_subscriber == 0
    assert endpoint.id
