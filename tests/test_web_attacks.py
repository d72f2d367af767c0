"""Cross-port attacks on the console, in real Chromium: planted CSRF pairs and sessions."""

from __future__ import annotations

import asyncio
import html
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

pytest.importorskip("starlette")
pytest.importorskip("playwright.async_api")

from playwright.async_api import Browser, async_playwright
from starlette.requests import Request

from integrations import Integrations
from integrations.web import Admin, Owner, Viewer, console
from integrations.web._serve import LoginLink, standalone_app

from .webkit import acme_provider, csrf_of, fake_api, open_integrations, running

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed"),
]
# Every POST route of the console, with the fields its form sends.
ROUTES = [
    ("/connections", {"provider": "acme", "name": "pwned-M"}),
    ("/{uuid}/setup", {"api_key": "sk-pwned-0123456789"}),
    ("/{uuid}/test", {}),
    ("/{uuid}/connect", {"scopes": "read"}),
    ("/{uuid}/disconnect", {}),
    ("/{uuid}/rename", {"new_name": "pwned-M"}),
    ("/{uuid}/remove", {}),
]


@pytest.fixture
async def integ(fresh_db: str) -> AsyncIterator[Integrations]:
    async with fake_api() as api, open_integrations(fresh_db, acme_provider(api)) as instance:
        yield instance


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        instance = await pw.chromium.launch(executable_path=CHROMIUM)
        yield instance
        await instance.close()


@asynccontextmanager
async def other_port(pages: dict[str, str], seen: list[dict[str, str]]) -> AsyncIterator[str]:
    """A site on another port of 127.0.0.1 (same site, other origin): serves ``pages`` by
    path and records the cookies the browser sends it."""

    async def serve(request: web.Request) -> web.Response:
        seen.append(dict(request.cookies))
        return web.Response(
            text=pages.get(request.path, "<title>x</title>"), content_type="text/html"
        )

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


def _attack_page(cookie: str, action: str, fields: dict[str, str]) -> str:
    """Plants mallory's CSRF cookie at the console's path and posts her token there."""
    inputs = "".join(
        f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
        for k, v in fields.items()
    )
    return (
        "<!doctype html><title>cute cats</title>"
        f'<form id="f" method="post" action="{html.escape(action)}">{inputs}</form>'
        f"<script>document.cookie = {json.dumps('integrations_csrf=' + cookie + '; path=/')};"
        "document.getElementById('f').submit();</script>"
    )


async def test_a_planted_csrf_pair_from_another_port_changes_nothing(
    integ: Integrations, browser: Browser
) -> None:
    victim = (await integ.add_connection("acme", "victim")).uuid

    def authorize(request: Request) -> Viewer | None:
        who = request.cookies.get("who")
        return Admin() if who == "admin" else Owner("user:mallory") if who == "mallory" else None

    async with running(console(integ, authorize=authorize)) as base:
        # Mallory signs in and mints her own pair.
        async with httpx.AsyncClient(base_url=base, cookies={"who": "mallory"}) as mallory:
            listing = await mallory.get("/")
            pair = (listing.cookies["integrations_csrf"], csrf_of(listing.text))
        pages = {}
        for index, (path, fields) in enumerate(ROUTES):
            action = base + path.format(uuid=victim)
            pages[f"/{index}"] = _attack_page(pair[0], action, {"csrf_token": pair[1], **fields})
        async with other_port(pages, []) as evil:
            context = await browser.new_context()
            await context.add_cookies([{"name": "who", "value": "admin", "url": base}])
            tab = await context.new_page()
            statuses = []
            for index in range(len(ROUTES)):
                async with tab.expect_response(lambda r: r.request.method == "POST") as posted:
                    await tab.goto(f"{evil}/{index}")
                statuses.append((await posted.value).status)
            await context.close()
    # All 7 routes refused the planted pair; the administrator's data is untouched.
    assert statuses == [403] * len(ROUTES)
    names = sorted(c.name for c in await integ.list_integrations()) + sorted(
        c.name for c in await integ.list_connections("acme")
    )
    assert "pwned-M" not in names and "victim" in names
    assert (await integ.get_integration_by_uuid(victim)).data.get("api_key") is None


async def test_mallorys_pair_is_worthless_to_the_administrator_even_without_origin_headers(
    integ: Integrations,
) -> None:
    def authorize(request: Request) -> Viewer | None:
        return Admin() if request.cookies.get("who") == "admin" else Owner("user:mallory")

    app = console(integ, authorize=authorize)
    async with running(app) as base:
        async with httpx.AsyncClient(base_url=base) as mallory:
            listing = await mallory.get("/")
            cookie, token = listing.cookies["integrations_csrf"], csrf_of(listing.text)
        async with httpx.AsyncClient(
            base_url=base, cookies={"who": "admin", "integrations_csrf": cookie}
        ) as admin:
            refused = await admin.post(
                "/connections", data={"csrf_token": token, "provider": "acme", "name": "pwned"}
            )
            assert refused.status_code == 403
            own = csrf_of((await admin.get("/")).text)
            done = await admin.post(
                "/connections", data={"csrf_token": own, "provider": "acme", "name": "mine"}
            )
            assert done.status_code == 303
    assert [c.name for c in await integ.list_connections("acme")] == ["mine"]


async def test_a_session_seen_by_another_port_is_not_a_way_in(
    integ: Integrations, browser: Browser
) -> None:
    link = LoginLink(session_idle=3, login_ttl=30)
    async with running(standalone_app(integ, link)) as base:
        port = int(base.rsplit(":", 1)[1])
        link.bind_port(port)
        seen: list[dict[str, str]] = []
        async with other_port({}, seen) as evil:
            context = await browser.new_context()
            tab = await context.new_page()
            await tab.goto(f"{base}/login?token={link.token}")
            assert "Connections" in await tab.content()
            await tab.goto(f"{evil}/")
            # Chromium does send it (cookies are not kept apart by port): under a name that
            # belongs to this server instance and port only.
            leaked = {k: v for k, v in seen[-1].items() if k.startswith("integrations_session")}
            assert list(leaked) == [link.cookie]
            assert link.cookie.startswith(f"integrations_session_{port}_")
            # Another console on another port does not take it.
            other = LoginLink()
            async with running(standalone_app(integ, other)) as second:
                other.bind_port(int(second.rsplit(":", 1)[1]))
                async with httpx.AsyncClient(base_url=second, cookies=leaked) as replay:
                    assert (await replay.get("/")).status_code == 401
            # Addressed to the console under another port's Host, it is refused too.
            async with httpx.AsyncClient(base_url=base, cookies=leaked) as replay:
                wrong_host = await replay.get("/", headers={"host": "127.0.0.1:1"})
                assert wrong_host.status_code == 401
            # Signing out ends it: the leaked cookie is worth nothing afterwards.
            await tab.goto(f"{base}/")
            async with tab.expect_response(lambda r: r.url.endswith("/logout")) as out:
                await tab.get_by_role("button", name="Sign out").click()
            signed_out = await out.value
            assert signed_out.status == 303
            async with httpx.AsyncClient(base_url=base, cookies=leaked) as replay:
                assert (await replay.get("/")).status_code == 401
            await context.close()


async def test_sessions_expire_when_idle_and_login_links_expire_unused(
    integ: Integrations, browser: Browser
) -> None:
    link = LoginLink(session_idle=1.5, login_ttl=30)
    async with running(standalone_app(integ, link)) as base:
        link.bind_port(int(base.rsplit(":", 1)[1]))
        context = await browser.new_context()
        tab = await context.new_page()
        await tab.goto(f"{base}/login?token={link.token}")
        assert "Connections" in await tab.content()
        await asyncio.sleep(2)
        response = await tab.goto(f"{base}/")
        assert response is not None and response.status == 401
        await context.close()
    late = LoginLink(login_ttl=1)
    async with running(standalone_app(integ, late)) as base:
        late.bind_port(int(base.rsplit(":", 1)[1]))
        await asyncio.sleep(1.5)
        context = await browser.new_context()
        tab = await context.new_page()
        response = await tab.goto(f"{base}/login?token={late.token}")
        assert response is not None and response.status == 403
        await context.close()
