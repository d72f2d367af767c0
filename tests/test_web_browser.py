"""The admin console in a real browser (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

pytest.importorskip("starlette")
playwright_api = pytest.importorskip("playwright.async_api")

from playwright.async_api import Browser, Page, async_playwright, expect  # noqa: E402
from starlette.requests import Request  # noqa: E402

from integrations import Integrations  # noqa: E402
from integrations.web import Admin, console  # noqa: E402
from integrations.web._serve import LoginLink, standalone_app  # noqa: E402

from .conftest import TEST_KEY  # noqa: E402
from .oauth_server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, OAuthTestServer  # noqa: E402
from .oauthkit import loopback_provider  # noqa: E402
from .webkit import GOOD_KEY, acme_provider, fake_api, open_integrations, running  # noqa: E402

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed"),
]
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
CONNECTION_URL = re.compile(r"/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@pytest.fixture
async def oauth_server() -> AsyncIterator[OAuthTestServer]:
    async with OAuthTestServer() as server:
        yield server


@pytest.fixture
async def consent_url(oauth_server: OAuthTestServer) -> AsyncIterator[str]:
    """A consent page in front of the loopback server, as a real provider shows one.

    Its "Allow" link starts the redirect back to the console from a page of another site.
    """

    async def authorize(request: web.Request) -> web.Response:
        allow = html.escape(f"{oauth_server.authorize_url}?{request.query_string}")
        body = f'<!doctype html><title>Consent</title><a href="{allow}">Allow</a>'
        return web.Response(text=body, content_type="text/html")

    app = web.Application()
    app.router.add_get("/authorize", authorize)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}/authorize"
    await server.close()


@pytest.fixture
async def integ(
    fresh_db: str, oauth_server: OAuthTestServer, consent_url: str
) -> AsyncIterator[Integrations]:
    consented = loopback_provider(
        oauth_server.base_url, key="consented", name="Consented", authorize_url=consent_url
    )
    loopback = loopback_provider(oauth_server.base_url)
    async with (
        fake_api() as api,
        open_integrations(fresh_db, acme_provider(api), loopback, consented) as instance,
    ):
        yield instance


@pytest.fixture
async def base_url(integ: Integrations) -> AsyncIterator[str]:
    def authorize(request: Request) -> Admin:
        return Admin()

    async with running(console(integ, authorize=authorize)) as url:
        yield url


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        instance = await pw.chromium.launch(executable_path=CHROMIUM)
        yield instance
        await instance.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1100, "height": 820})
    tab = await context.new_page()
    violations: list[str] = []
    tab.on(
        "console",
        lambda message: (
            violations.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    yield tab
    await context.close()
    assert violations == []  # the pages need nothing the CSP forbids


def status_of(page: Page) -> object:
    return page.locator("[data-status]")


async def add_in_browser(page: Page, base_url: str, provider: str, name: str) -> str:
    await page.goto(base_url + "/")
    await page.get_by_label("Provider", exact=True).select_option(provider)
    await page.get_by_label("Name", exact=True).fill(name)
    await page.get_by_role("button", name="Add connection").click()
    await expect(page).to_have_url(re.compile(CONNECTION_URL.pattern + r"\?done=added$"))
    return page.url.split("?")[0]


async def test_add_set_a_key_test_rename_remove(
    page: Page, base_url: str, integ: Integrations
) -> None:
    url = await add_in_browser(page, base_url, "acme", "main")
    await expect(page.get_by_role("status")).to_have_text("Connection added.")
    await expect(page.locator("[data-status]")).to_have_text("disconnected")
    await expect(page.locator("[data-incomplete]")).to_be_visible()

    await page.get_by_label("API key").fill(GOOD_KEY)
    await page.get_by_label("Region").fill("eu-1")
    await page.get_by_role("button", name="Save").click()
    await expect(page.get_by_role("status")).to_have_text("Saved.")
    await expect(page.get_by_label("API key")).to_have_value("")  # never pre-filled
    await expect(page.get_by_text("Stored: ••••6789")).to_be_visible()
    await expect(page.locator("[data-status]")).to_have_text("connected")

    await page.get_by_role("button", name="Test connection").click()
    await expect(page.get_by_role("status")).to_have_text("Checked.")
    await expect(page.locator("#live")).to_contain_text("just now")

    await page.get_by_label("Name", exact=True).fill("primary")
    await page.get_by_role("button", name="Rename").click()
    await expect(page.get_by_role("status")).to_have_text("Renamed.")
    assert page.url.split("?")[0] == url  # the page is pinned to the uuid
    await expect(page.get_by_role("heading", level=1)).to_contain_text("primary")

    await page.get_by_role("link", name="Remove").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Remove primary?")
    assert await integ.list_connections("acme") != []
    await page.get_by_role("button", name="Remove").click()
    await expect(page.get_by_role("status")).to_have_text("Connection removed.")
    assert await integ.list_connections("acme") == []
    response = await page.goto(url)
    assert response is not None and response.status == 404
    await expect(page.get_by_role("heading", level=1)).to_have_text("Not found")


async def test_oauth_connect_through_the_loopback_authorization_server(
    page: Page, integ: Integrations, oauth_server: OAuthTestServer
) -> None:
    """The standalone server at ``localhost``, the provider at ``127.0.0.1``: another site,
    so the provider's redirect arrives without the SameSite=Strict session cookie."""
    link = LoginLink()
    async with running(standalone_app(integ, link)) as served:
        base_url = served.replace("127.0.0.1", "localhost")
        assert (await page.goto(base_url + "/")).status == 401  # type: ignore[union-attr]
        await page.goto(f"{base_url}/login?token={link.token}")
        await expect(page.get_by_role("heading", level=1)).to_have_text("Connections")
        url = await add_in_browser(page, base_url, "consented", "web")
        await page.get_by_label("Client ID").fill(DEFAULT_CLIENT_ID)
        await page.get_by_label("Client secret").fill(DEFAULT_CLIENT_SECRET)
        await page.get_by_role("button", name="Save").click()
        await expect(page.locator("[data-status]")).to_have_text("disconnected")
        await expect(page.get_by_label("Scopes")).to_have_value("read")
        await page.get_by_label("Scopes").fill("read write")

        callbacks: list[tuple[int, bool]] = []
        page.on(
            "response",
            lambda r: (
                callbacks.append((r.status, "bounced=1" in r.url))
                if "/callback?" in r.url
                else None
            ),
        )
        await page.get_by_role("button", name="Connect", exact=True).click()
        await page.get_by_role("link", name="Allow").click()
        # To the authorization server and back to the console's callback.
        await expect(page).to_have_url(url + "?done=connected")
        # The cross-site redirect came without the cookie, the bounce with it.
        assert callbacks == [(401, False), (303, True)]
        await expect(page.locator("[data-status]")).to_have_text("connected")
        await expect(page.locator("#live")).to_contain_text("user@example.test")
        await expect(page.get_by_role("button", name="Reconnect")).to_be_visible()
        assert await integ.is_connected(url.rsplit("/", 1)[1])
        assert oauth_server.stats.token_calls["authorization_code"] == 1

        await page.get_by_role("button", name="Disconnect").click()
        await expect(page.locator("[data-status]")).to_have_text("disconnected")
        await expect(page.get_by_role("button", name="Connect", exact=True)).to_be_visible()
        await page.close()


async def write_elsewhere(dsn: str, uuid: str, *args: str) -> None:
    """Change the connection from another OS process (tests/console_writer.py)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).parent / "console_writer.py"),
        dsn,
        uuid,
        *args,
        env={**os.environ, "INTEGRATIONS_KEYS": TEST_KEY},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await child.communicate()
    assert child.returncode == 0 and out.strip() == b"written"


async def test_a_change_from_another_process_appears_without_reload(
    page: Page, browser: Browser, base_url: str, integ: Integrations, fresh_db: str
) -> None:
    uuid = (await integ.add_connection("acme", "main")).uuid
    await integ.save_setup(uuid, {"api_key": GOOD_KEY})
    assert (await integ.validate_connection(uuid)).ok
    listing = await browser.new_page()
    await listing.goto(base_url + "/")
    await page.goto(f"{base_url}/{uuid}")
    for tab in (page, listing):
        await expect(tab.locator("[data-live]")).to_have_attribute("data-stream", "open")
        await expect(tab.locator(".status").first).to_have_text("connected")
        await tab.evaluate("window.notReloaded = true")

    # The console has no polling and no reload: the change can only come by its live stream.
    await write_elsewhere(fresh_db, uuid, "Key revoked")
    await expect(status_of(page)).to_have_text("error", timeout=10_000)
    await expect(listing.locator(".status").first).to_have_text("error", timeout=10_000)
    await expect(page.locator("#live")).to_contain_text("Key revoked")
    await expect(page.locator("[data-events-log]")).to_contain_text(
        "validated connected → error (Key revoked)"
    )
    for tab in (page, listing):
        assert await tab.evaluate("window.notReloaded") is True


async def test_the_setup_form_follows_a_change_from_another_process(
    page: Page, base_url: str, integ: Integrations, fresh_db: str
) -> None:
    uuid = (await integ.add_connection("acme", "main")).uuid
    await integ.save_setup(uuid, {"api_key": GOOD_KEY, "region": "eu-1"})
    (acme,) = [p for p in integ.list_providers() if p.key == "acme"]
    assert acme.validation is not None
    api_url = acme.validation.url.removesuffix("/check")
    await page.goto(f"{base_url}/{uuid}")
    await expect(page.locator("[data-live]")).to_have_attribute("data-stream", "open")
    await expect(page.locator("#hint-api_key")).to_have_text(
        "Stored: ••••6789; leave blank to keep it."
    )
    await expect(page.get_by_label("Region")).to_have_value("eu-1")
    await page.evaluate("window.notReloaded = true")

    await write_elsewhere(
        fresh_db, uuid, "--setup", api_url, "api_key=other-key-000004242", "region=eu-2"
    )
    await expect(page.locator("#hint-api_key")).to_have_text(
        "Stored: ••••4242; leave blank to keep it.", timeout=5000
    )
    await expect(page.get_by_label("Region")).to_have_value("eu-2")  # not edited: follows
    await expect(page.get_by_label("API key")).to_have_value("")
    assert await page.evaluate("window.notReloaded") is True

    # What the operator is typing is left alone; the stored value's hint still follows.
    await page.get_by_label("Region").fill("us-3")
    await page.get_by_label("API key").fill("typed-but-not-saved")
    await write_elsewhere(
        fresh_db, uuid, "--setup", api_url, "api_key=third-key-00001111", "region=eu-4"
    )
    await expect(page.locator("#hint-api_key")).to_have_text(
        "Stored: ••••1111; leave blank to keep it.", timeout=5000
    )
    await expect(page.get_by_label("Region")).to_have_value("us-3")
    await expect(page.get_by_label("API key")).to_have_value("typed-but-not-saved")
    assert await page.evaluate("window.notReloaded") is True


async def note_is_focused(page: Page, selector: str, role: str) -> None:
    note = page.locator(f"main > {selector}")
    await expect(note).to_be_focused()
    await expect(note).to_have_attribute("role", role)
    await expect(note).to_have_attribute("tabindex", "-1")


async def test_focus_moves_to_the_outcome_after_a_form_is_sent(
    page: Page, base_url: str, integ: Integrations
) -> None:
    """A screen reader user hears what a POST did: the note it leaves is focused."""
    await add_in_browser(page, base_url, "acme", "main")
    await expect(page.get_by_role("status")).to_have_text("Connection added.")
    await note_is_focused(page, ".flash", "status")

    await page.get_by_label("API key").fill(GOOD_KEY)
    await page.get_by_role("button", name="Save").click()
    await expect(page.get_by_role("status")).to_have_text("Saved.")
    await note_is_focused(page, ".flash", "status")

    await page.get_by_label("Name", exact=True).fill("")
    await page.get_by_role("button", name="Rename").click()
    await expect(page.get_by_role("alert")).to_be_visible()
    await note_is_focused(page, ".error", "alert")

    # The next Tab goes on from the note, not from the top of the page.
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent") == "All connections"

    # A page opened without sending a form keeps the browser's own start.
    await page.goto(base_url + "/")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Connections")
    assert await page.evaluate("document.activeElement === document.body") is True


async def tab_to(page: Page, name: str, limit: int = 40) -> list[str]:
    """Press Tab until the focused element's label or text is ``name``; the names passed."""
    passed: list[str] = []
    for _ in range(limit):
        await page.keyboard.press("Tab")
        focused = await page.evaluate(
            """() => {
                const el = document.activeElement;
                if (!el) return "";
                if (el.labels && el.labels.length) return el.labels[0].textContent.trim();
                return (el.textContent || el.value || "").trim();
            }"""
        )
        passed.append(focused)
        if focused == name:
            return passed
    raise AssertionError(f"{name!r} is not reachable with Tab; passed {passed}")


async def test_the_connection_form_works_with_the_keyboard_alone(
    page: Page, base_url: str, integ: Integrations
) -> None:
    uuid = (await integ.add_connection("acme", "main")).uuid
    await page.goto(f"{base_url}/{uuid}")
    passed = await tab_to(page, "API key")
    assert passed[0] == "Skip to content"
    await page.keyboard.type(GOOD_KEY)
    await page.keyboard.press("Tab")
    await page.keyboard.type("eu-1")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("status")).to_have_text("Saved.")
    credentials = await integ.get_credentials(uuid)
    assert (credentials["api_key"], credentials["region"]) == (GOOD_KEY, "eu-1")

    after_save = await tab_to(page, "Test connection")
    assert after_save.index("API key") < after_save.index("Region") < after_save.index("Save")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("status")).to_have_text("Checked.")
    await expect(status_of(page)).to_have_text("connected")

    await tab_to(page, "Name")
    await page.keyboard.press("Control+A")
    await page.keyboard.type("renamed")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("status")).to_have_text("Renamed.")
    await tab_to(page, "Remove")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Remove renamed?")
    await tab_to(page, "Remove")
    await page.keyboard.press("Space")
    await expect(page.get_by_role("status")).to_have_text("Connection removed.")
    assert await integ.list_connections("acme") == []


async def test_screenshots_of_the_listing_and_a_connection(
    page: Page, base_url: str, integ: Integrations, tmp_path: Path
) -> None:
    """Writes docs/img/console-*.png when UPDATE_SCREENSHOTS=1 (else into a temporary dir)."""
    target = DOCS_IMG if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    target.mkdir(parents=True, exist_ok=True)
    main = (await integ.add_connection("acme", "main")).uuid
    await integ.save_setup(main, {"api_key": GOOD_KEY, "region": "eu-1"})
    await integ.validate_connection(main)
    staging = (await integ.add_connection("acme", "staging")).uuid
    await integ.save_setup(staging, {"api_key": "revoked-key-0000000"})
    await integ.validate_connection(staging)
    await integ.add_connection("acme", "sandbox")
    web = (await integ.add_connection("loopback", "web")).uuid
    await integ.save_setup(
        web, {"client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET}
    )

    await page.goto(base_url + "/")
    await expect(page.locator("[data-live]")).to_have_attribute("data-stream", "open")
    statuses = await page.locator("tbody .status").all_inner_texts()
    assert sorted(statuses) == ["connected", "disconnected", "disconnected", "error"]
    await page.screenshot(path=str(target / "console-list.png"), full_page=True)

    await page.goto(f"{base_url}/{main}")
    await expect(page.locator("[data-live]")).to_have_attribute("data-stream", "open")
    await integ.save_setup(main, {"region": "eu-2"})
    await expect(page.locator("[data-events-log]")).to_contain_text("setup saved")
    await page.screenshot(path=str(target / "console-connection.png"), full_page=True)
    for name in ("console-list.png", "console-connection.png"):
        data = (target / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


async def test_every_page_fits_a_390_px_wide_phone(
    browser: Browser, base_url: str, integ: Integrations
) -> None:
    """No page scrolls sideways at 390 × 844: tables, forms and the header fit the width."""
    await integ.add_webhook(
        "http://127.0.0.1:9/a-rather-long-webhook-receiver-path/for-the-operations-team",
        allow_loopback=True,
        kinds=["connection_added"],
        description="ops pager",
    )
    main = (await integ.add_connection("acme", "production-eu-west-primary")).uuid
    await integ.save_setup(main, {"api_key": "revoked-key-0000000", "region": "eu-1"})
    await integ.validate_connection(main)
    await integ.add_connection("acme", "staging", owner="team:platform-engineering")
    await integ.add_connection("loopback", "web")
    context = await browser.new_context(viewport={"width": 390, "height": 844})
    phone = await context.new_page()
    too_wide: dict[str, list[object]] = {}
    try:
        for path in ("/", f"/{main}", f"/{main}/audit", "/audit", "/webhooks", f"/{main}/remove"):
            response = await phone.goto(base_url + path)
            assert response is not None and response.status == 200, path
            await expect(phone.locator("h1")).to_be_visible()
            width, viewport, widest = await phone.evaluate(
                """() => [
                    document.documentElement.scrollWidth,
                    window.innerWidth,
                    [...document.querySelectorAll("body *")]
                        .filter((el) => el.getBoundingClientRect().right > window.innerWidth)
                        .slice(0, 5)
                        .map((el) => el.tagName + "." + el.className),
                ]"""
            )
            assert viewport == 390
            if width > viewport:
                too_wide[path] = [width, *widest]
    finally:
        await context.close()
    assert too_wide == {}  # page: [its width, the first elements past the edge]
