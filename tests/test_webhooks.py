"""Webhooks: signed deliveries from the event log, retried in order, safe about where they go."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from integrations import (
    Integrations,
    InvalidArgument,
    InvalidURL,
    NotFound,
    WebhookDelivery,
)
from integrations._webhooks import (
    RETRY_DELAYS,
    RefusedAddress,
    _VettingResolver,
    refused_address,
    retry_delay,
)
from integrations.webhooks import WebhookVerificationFailed, generate_secret, sign, verify

TIMEOUT = 15.0
FAST = (0.05, 0.05, 0.05)


@dataclass
class Receiver:
    """A loopback endpoint: answers ``status`` (or what ``answers`` says first)."""

    url: str = ""
    status: int = 200
    answers: list[int] = field(default_factory=list)
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    redirected: int = 0

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.got]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()

    async def hook(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        found.got.append((dict(request.headers), body))
        status = found.answers.pop(0) if found.answers else found.status
        if status == 302:
            return web.Response(status=302, headers={"Location": found.url + "/elsewhere"})
        if status == 299:
            return web.Response(status=200, body=b"x" * 5_000_000)
        return web.Response(status=status)

    async def elsewhere(request: web.Request) -> web.Response:
        found.redirected += 1
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_post("/hook/elsewhere", elsewhere)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    found.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield found
    await runner.cleanup()


@pytest.fixture
async def worker(integ: Integrations) -> AsyncIterator[None]:
    task = asyncio.create_task(integ.run_webhooks(allow_loopback=True, retry_delays=FAST, poll=0.2))
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def settled(
    integ: Integrations, endpoint: str, count: int, state: str = "delivered"
) -> list[WebhookDelivery]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        found = await integ.webhook_deliveries(endpoint, state=state)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} {state} deliveries, expected {count}")
        await asyncio.sleep(0.05)


async def test_the_secret_is_shown_once_and_stored_sealed(
    integ: Integrations, db: asyncpg.Connection, receiver: Receiver
) -> None:
    endpoint = await integ.add_webhook(receiver.url, allow_loopback=True, description="ops")
    assert endpoint.secret is not None and endpoint.secret.startswith("whsec_")
    assert endpoint.secret not in repr(endpoint)
    listed = await integ.list_webhooks()
    assert [(e.id, e.secret, e.description) for e in listed] == [(endpoint.id, None, "ops")]
    stored = await db.fetchval("SELECT secret::text FROM integrations.webhook_endpoints")
    assert endpoint.secret not in stored and endpoint.secret[6:] not in stored
    assert "$enc" in stored


async def test_deliveries_are_signed_per_standard_webhooks_and_ordered_per_connection(
    integ: Integrations, receiver: Receiver, worker: None
) -> None:
    endpoint = await integ.add_webhook(receiver.url, allow_loopback=True)
    assert endpoint.secret is not None
    a = await integ.add_connection("openai", "a")
    b = await integ.add_connection("openai", "b")
    for i in range(3):
        await integ.save_setup(a.uuid, {"api_key": f"sk-a-{i}-0123456789"})
        await integ.save_setup(b.uuid, {"api_key": f"sk-b-{i}-0123456789"})
    delivered = await settled(integ, endpoint.id, 8)
    checker = Webhook(endpoint.secret)
    for headers, body in receiver.got:
        checker.verify(body, headers)
        assert verify(endpoint.secret, body, headers) == headers["webhook-id"]
    bodies = receiver.bodies()
    assert {b["data"]["uuid"] for b in bodies} == {a.uuid, b.uuid}
    for uuid in (a.uuid, b.uuid):
        positions = [b["data"]["position"] for b in bodies if b["data"]["uuid"] == uuid]
        assert positions == sorted(positions) and len(positions) == 4
    assert {d.id for d in delivered} == {h["webhook-id"] for h, _ in receiver.got}
    first = bodies[0]
    assert first["type"] == "connection_added" and "timestamp" in first
    assert all("sk-" not in body.decode() for _, body in receiver.got)


async def test_a_failed_delivery_is_retried_with_the_same_id_and_holds_back_its_connection(
    integ: Integrations, receiver: Receiver, worker: None
) -> None:
    endpoint = await integ.add_webhook(receiver.url, allow_loopback=True)
    receiver.answers = [503, 500]
    conn = await integ.add_connection("openai", "main")
    await integ.save_setup(conn.uuid, {"api_key": "sk-retry-0123456789"})
    delivered = await settled(integ, endpoint.id, 2)
    ids = [h["webhook-id"] for h, _ in receiver.got]
    assert ids[0] == ids[1] == ids[2] != ids[3]
    assert [b["type"] for b in receiver.bodies()] == [
        "connection_added",
        "connection_added",
        "connection_added",
        "setup_saved",
    ]
    first = next(d for d in delivered if d.kind == "connection_added")
    assert first.attempts == 3 and first.last_status == 200


async def test_the_last_failed_attempt_makes_a_delivery_dead_and_replay_sends_it_again(
    integ: Integrations, receiver: Receiver, worker: None
) -> None:
    endpoint = await integ.add_webhook(
        receiver.url, allow_loopback=True, kinds=["connection_added"]
    )
    receiver.status = 500
    await integ.add_connection("openai", "main")
    [dead] = await settled(integ, endpoint.id, 1, state="dead")
    assert dead.attempts == len(FAST) + 1
    assert dead.last_status == 500 and dead.last_error == "HTTP 500"
    receiver.status = 200
    await integ.replay_webhook(dead.id)
    [again] = await settled(integ, endpoint.id, 1)
    assert again.id == dead.id
    assert receiver.got[-1][0]["webhook-id"] == dead.id
    with pytest.raises(NotFound) as info:
        await integ.replay_webhook("msg_" + "0" * 32)
    assert info.value.code == "not_found", info.value
    with pytest.raises(InvalidArgument):
        await integ.replay_webhook("nope")


async def test_an_owner_endpoint_gets_that_owners_events_and_a_system_one_everyones(
    integ: Integrations, receiver: Receiver, worker: None
) -> None:
    mine = integ.for_owner("user:1")
    own = await mine.add_webhook(receiver.url, allow_loopback=True)
    everyone = await integ.add_webhook(receiver.url, allow_loopback=True)
    first = await mine.add_connection("openai", "main")
    await integ.for_owner("user:2").add_connection("openai", "main")
    await integ.add_connection("openai", "main")
    assert [d.kind for d in await settled(integ, everyone.id, 3)] == ["connection_added"] * 3
    # Events are dispatched in log order: once a later event of this owner's (a sentinel)
    # has its delivery, the other owners' events before it were passed over, not pending.
    sentinel = await mine.add_connection("openai", "sentinel")
    await settled(integ, own.id, 2)
    deliveries = sorted(await mine.webhook_deliveries(own.id), key=lambda d: d.position)
    assert [(d.kind, d.connection) for d in deliveries] == [
        ("connection_added", first.uuid),
        ("connection_added", sentinel.uuid),
    ]
    assert [e.id for e in await mine.list_webhooks()] == [own.id]
    # Another owner's endpoint is not there for this owner.
    with pytest.raises(NotFound) as info:
        await mine.webhook_deliveries(everyone.id)
    assert info.value.code == "not_found", info.value
    with pytest.raises(NotFound) as info:
        await mine.remove_webhook(everyone.id)
    assert info.value.code == "not_found", info.value
    await mine.remove_webhook(own.id)
    assert [e.id for e in await integ.list_webhooks()] == [everyone.id]


async def test_redirects_are_not_followed_and_large_answers_are_not_read_whole(
    integ: Integrations, receiver: Receiver
) -> None:
    endpoint = await integ.add_webhook(receiver.url, allow_loopback=True)
    receiver.answers = [302, 299]
    moved = await integ.test_webhook(endpoint.id, allow_loopback=True)
    assert not moved.ok and moved.status == 302 and "redirect" in (moved.error or "")
    assert receiver.redirected == 0
    big = await integ.test_webhook(endpoint.id, allow_loopback=True)
    assert big.ok and big.status == 200


async def test_loopback_is_refused_unless_allowed(integ: Integrations, receiver: Receiver) -> None:
    endpoint = await integ.add_webhook(
        receiver.url.replace("127.0.0.1", "localhost"), allow_loopback=True
    )
    refused = await integ.test_webhook(endpoint.id)
    assert not refused.ok and "loopback" in (refused.error or "")
    literal = await integ.add_webhook(receiver.url, allow_loopback=True)
    refused = await integ.test_webhook(literal.id)
    assert not refused.ok and receiver.got == []
    assert (await integ.test_webhook(literal.id, allow_loopback=True)).ok


async def test_the_resolver_refuses_what_a_name_resolves_to() -> None:
    # A public-looking name may resolve to anything: the check runs on the answer.
    resolver = _VettingResolver(allow_loopback=False, allow_private=False)
    with pytest.raises(RefusedAddress, match="loopback"):
        await resolver.resolve("localhost", 443)
    allowing = _VettingResolver(allow_loopback=True, allow_private=False)
    assert {r["host"] for r in await allowing.resolve("localhost", 443)} <= {"127.0.0.1", "::1"}
    await resolver.close()
    await allowing.close()


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("172.16.5.4", "private"),
        ("100.64.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fd00:ec2::254", "private"),
        ("::ffff:10.0.0.1", "private"),
        ("0.0.0.0", "private"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
    ],
)
def test_non_public_addresses_are_refused(address: str, why: str) -> None:
    reason = refused_address(address, allow_loopback=False, allow_private=False)
    assert reason is not None and reason.startswith(why)
    if why == "loopback":
        assert refused_address(address, allow_loopback=True, allow_private=False) is None
    else:
        assert refused_address(address, allow_loopback=True, allow_private=False) is not None


def test_public_addresses_pass_and_private_ones_only_when_allowed() -> None:
    assert refused_address("93.184.216.34", allow_loopback=False, allow_private=False) is None
    assert refused_address("2606:2800:220:1::1", allow_loopback=False, allow_private=False) is None
    assert refused_address("10.1.2.3", allow_loopback=False, allow_private=True) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com/in",
        "ftp://hooks.example.com/in",
        "https://user:pw@hooks.example.com/in",
        "https:///in",
        "http://127.0.0.1:9/in",
        "https://localhost/in",
        "",
        "https://hooks.example.com/" + "x" * 2000,
    ],
)
async def test_unsafe_or_malformed_urls_are_refused_and_nothing_is_stored(
    integ: Integrations, url: str
) -> None:
    with pytest.raises(InvalidURL):
        await integ.add_webhook(url)
    assert await integ.list_webhooks() == []


async def test_bad_webhook_arguments_are_refused(integ: Integrations) -> None:
    with pytest.raises(InvalidArgument):
        await integ.add_webhook("https://hooks.example.com/in", kinds="connected")
    with pytest.raises(InvalidArgument):
        await integ.add_webhook("https://hooks.example.com/in", kinds=["nope"])
    endpoint = await integ.add_webhook("https://hooks.example.com/in")
    with pytest.raises(InvalidArgument):
        await integ.webhook_deliveries(endpoint.id, state="lost")
    with pytest.raises(InvalidArgument):
        await integ.run_webhooks(retry_delays=())
    with pytest.raises(NotFound) as info:
        await integ.remove_webhook("0190f2a4-0000-7000-8000-000000000000")
    assert info.value.code == "not_found", info.value


def test_the_retry_schedule_spans_more_than_a_day_and_ends() -> None:
    assert sum(RETRY_DELAYS) >= 24 * 3600
    waits = [retry_delay(n, RETRY_DELAYS) for n in range(1, len(RETRY_DELAYS) + 2)]
    assert waits[-1] is None
    for wait, base in zip(waits, RETRY_DELAYS, strict=False):
        assert wait is not None and base <= wait <= base * 1.2


def test_verify_accepts_the_reference_signer_and_refuses_tampering() -> None:
    secret = generate_secret()
    stamp = datetime.now(UTC)
    body = '{"type":"connected"}'
    reference = Webhook(secret).sign("msg_1", stamp, body)
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(stamp.timestamp())),
        "webhook-signature": "v1,bogus " + reference,
    }
    assert verify(secret, body, headers) == "msg_1"
    assert sign(secret, "msg_1", int(stamp.timestamp()), body) == reference
    with pytest.raises(WebhookVerificationFailed):
        verify(secret, body + " ", headers)
    with pytest.raises(WebhookVerificationFailed):
        verify(generate_secret(), body, headers)
    with pytest.raises(WebhookVerificationFailed):
        verify(secret, body, headers, now=stamp.timestamp() + 3600)
    with pytest.raises(WebhookVerificationFailed):
        verify(secret, body, {"webhook-id": "msg_1"})


async def test_the_secret_never_shows_in_logs_errors_or_deliveries(
    integ: Integrations, receiver: Receiver, worker: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint = await integ.add_webhook(receiver.url + "?token=receiver-side", allow_loopback=True)
    assert endpoint.secret is not None
    receiver.answers = [500]
    await integ.add_connection("openai", "main")
    [delivery] = await settled(integ, endpoint.id, 1)
    texts = [caplog.text, repr(delivery), repr(await integ.list_webhooks()), repr(endpoint)]
    for text in texts:
        assert endpoint.secret not in text and endpoint.secret[6:] not in text
    assert "receiver-side" not in caplog.text


async def test_events_not_yet_dispatched_are_kept_by_retention(
    integ: Integrations, receiver: Receiver, db: asyncpg.Connection
) -> None:
    await integ.add_webhook(receiver.url, allow_loopback=True)
    await integ.add_connection("openai", "main")
    # No worker ran: the event is not a delivery yet, so pruning keeps it.
    assert await integ.prune_events(max_age=0) == 0
    assert await db.fetchval("SELECT count(*) FROM integrations.events") == 1
