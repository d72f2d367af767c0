"""The console's page of one webhook endpoint: its status, recent deliveries with their
next attempt, and a Replay button; an owner reaches only their own endpoints' pages."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("jinja2")

from starlette.requests import Request

from integrations import Integrations
from integrations.web import Admin, Owner, console

from .conftest import TEST_KEY
from .webkit import client


def admin(request: Request) -> Admin:
    return Admin()


async def test_each_endpoint_has_a_page_of_its_own_with_its_deliveries(fresh_db: str) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY) as integ:
        mine = await integ.add_webhook("http://127.0.0.1:9/mine", allow_loopback=True)
        other = await integ.add_webhook("http://127.0.0.1:9/other", allow_loopback=True)
        theirs = await integ.for_owner("user:9").add_webhook(
            "http://127.0.0.1:9/theirs", allow_loopback=True
        )
        worker = asyncio.create_task(
            integ.run_webhooks(allow_loopback=True, retry_delays=(3600,), poll=0.05)
        )
        try:
            await integ.add_connection("openai", "paged")
            deadline = time.monotonic() + 30
            while True:
                pending = await integ.webhook_deliveries(mine.id, state="pending")
                if pending and pending[0].attempts > 0:
                    break
                assert time.monotonic() < deadline, "no attempt made"
                await asyncio.sleep(0.05)
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        async with client(console(integ, authorize=admin)) as http:
            listing = (await http.get("/webhooks")).text
            page = await http.get(f"/webhooks/{mine.id}")
            missing = await http.get("/webhooks/01936f3e-8d1c-7b3a-9f5e-2c4d6e8f0a1b")
        async with client(console(integ, authorize=lambda request: Owner("user:9"))) as owner:
            own = await owner.get(f"/webhooks/{theirs.id}")
            foreign = await owner.get(f"/webhooks/{mine.id}")
    assert f'/webhooks/{mine.id}">' in listing, listing
    assert page.status_code == 200
    body = page.text
    assert f'data-endpoint="{mine.id}"' in body and other.id not in body
    assert "data-health>failing<" in body
    assert f'data-delivery="{pending[0].id}"' in body and "Next attempt" in body
    assert f"/webhooks/deliveries/{pending[0].id}/replay" in body
    assert missing.status_code == 404
    assert own.status_code == 200 and f'data-endpoint="{theirs.id}"' in own.text
    assert foreign.status_code == 404
