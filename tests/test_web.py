"""The admin console over HTTP without a browser: access, CSRF, forms, secrets, error pages."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import html
import inspect
import io
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

pytest.importorskip("starlette")
pytest.importorskip("jinja2")

from starlette.requests import Request
from starlette.responses import Response

from integrations import Integrations, Provider
from integrations.web import Admin, Owner, console, serve
from integrations.web._present import ago, parse_scopes, setup_incomplete, status_text
from integrations.web._security import CSRF_COOKIE, Csrf, cross_origin, set_cookie
from integrations.web._serve import LoginLink, standalone_app

from .oauth_server import OAuthTestServer
from .oauthkit import loopback_provider, new_connection
from .webkit import (
    GOOD_KEY,
    acme_provider,
    client,
    csrf_of,
    fake_api,
    open_integrations,
    running,
)

UUID_RE = re.compile(r"/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


@pytest.fixture
async def api() -> AsyncIterator[str]:
    async with fake_api() as base_url:
        yield base_url


@pytest.fixture
async def oauth_server() -> AsyncIterator[OAuthTestServer]:
    async with OAuthTestServer() as server:
        yield server


@pytest.fixture
async def integ(
    fresh_db: str, api: str, oauth_server: OAuthTestServer
) -> AsyncIterator[Integrations]:
    async with open_integrations(
        fresh_db, acme_provider(api), loopback_provider(oauth_server.base_url)
    ) as instance:
        yield instance


def admin(request: Request) -> Admin:
    return Admin()


@pytest.fixture
def http(integ: Integrations) -> httpx.AsyncClient:
    return client(console(integ, authorize=admin))


async def form_post(
    http: httpx.AsyncClient, page: str, action: str, data: dict[str, str]
) -> httpx.Response:
    """Submit a form the way a browser does: the CSRF token from the page that holds it."""
    html = (await http.get(page)).text
    return await http.post(action, data={"csrf_token": csrf_of(html), **data})


async def add(http: httpx.AsyncClient, provider: str, name: str) -> str:
    response = await form_post(http, "/", "/connections", {"provider": provider, "name": name})
    assert response.status_code == 303, response.text
    found = UUID_RE.search(response.headers["location"])
    assert found is not None
    return found.group(1)


# -- access ---------------------------------------------------------------------------------


async def test_a_request_authorize_refuses_gets_401_and_touches_nothing(
    integ: Integrations,
) -> None:
    async with client(console(integ, authorize=lambda request: None)) as http:
        page = await http.get("/")
        assert page.status_code == 401
        assert "Sign in" in page.text
        posted = await http.post("/connections", data={"provider": "acme", "name": "x"})
        assert posted.status_code == 401
    assert await integ.list_connections("acme") == []


async def test_authorize_raising_permission_error_gives_403(integ: Integrations) -> None:
    def refuse(request: Request) -> Admin:
        raise PermissionError("not an admin")

    uuid = (await integ.add_connection("acme", "main")).uuid
    async with client(console(integ, authorize=refuse)) as http:
        for path in ("/", f"/{uuid}", f"/{uuid}/status", "/fragments/list", "/events"):
            response = await http.get(path)
            assert response.status_code == 403, path
        response = await http.post(f"/{uuid}/remove", data={"csrf_token": "x"})
        assert response.status_code == 403
    assert [c.uuid for c in await integ.list_connections("acme")] == [uuid]


async def test_an_async_authorize_is_awaited(integ: Integrations) -> None:
    seen: list[str] = []

    async def authorize(request: Request) -> Admin | None:
        seen.append(request.url.path)
        return Admin() if request.headers.get("x-user") == "root" else None

    async with client(console(integ, authorize=authorize)) as http:
        assert (await http.get("/")).status_code == 401
        assert (await http.get("/", headers={"x-user": "root"})).status_code == 200
    assert seen == ["/", "/"]


# -- CSRF and cookies -------------------------------------------------------------------------


async def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(
    integ: Integrations, http: httpx.AsyncClient
) -> None:
    await http.get("/")  # the CSRF cookie is set, but the form token is missing or wrong
    for data in ({}, {"csrf_token": ""}, {"csrf_token": "0" * 64}):
        response = await http.post("/connections", data={"provider": "acme", "name": "x", **data})
        assert response.status_code == 403
        assert "Reload the page" in response.text
    assert await integ.list_connections("acme") == []


async def test_a_token_only_works_with_its_own_cookie(integ: Integrations) -> None:
    app = console(integ, authorize=admin)
    async with client(app) as first, client(app) as second:
        token = csrf_of((await first.get("/")).text)
        await second.get("/")  # another browser: another cookie
        response = await second.post(
            "/connections", data={"csrf_token": token, "provider": "acme", "name": "x"}
        )
        assert response.status_code == 403
    assert await integ.list_connections("acme") == []


async def test_cookies_are_httponly_and_samesite_strict(http: httpx.AsyncClient) -> None:
    response = await http.get("/")
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("integrations_csrf=")
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    assert "Path=/" in cookie
    # Over plain http the cookie cannot be Secure; pages not saying otherwise are not cached.
    assert "Secure" not in cookie
    assert response.headers["cache-control"] == "no-store"
    # The CSRF cookie is 32 random bytes.
    value = cookie.split(";")[0].removeprefix("integrations_csrf=")
    assert len(base64.urlsafe_b64decode(value + "=")) == 32


def test_cookies_set_over_https_are_secure() -> None:
    response = Response()
    set_cookie(response, _bare_request({}, scheme="https"), "n", "v")
    assert "secure" in response.headers["set-cookie"].lower()


async def test_pages_carry_a_csp_without_inline_scripts(
    integ: Integrations, http: httpx.AsyncClient
) -> None:
    uuid = await add(http, "acme", "main")
    for path in ("/", f"/{uuid}", f"/{uuid}/remove", "/nope/nope"):
        response = await http.get(path)
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert re.search(r"<script(?![^>]*\bsrc=)", response.text) is None
        assert re.search(r"\son[a-z]+=", response.text) is None
    script = await http.get("/static/console.js")
    assert script.status_code == 200
    assert "EventSource" in script.text


# -- pages and forms --------------------------------------------------------------------------


async def test_add_then_the_connection_page_has_its_setup_fields(
    integ: Integrations, http: httpx.AsyncClient
) -> None:
    uuid = await add(http, "acme", "main")
    page = await http.get(f"/{uuid}?done=added")
    assert page.status_code == 200
    html = page.text
    assert "Connection added." in html
    assert '<label for="field-api_key">API key</label>' in html
    assert 'type="password"' in html
    assert "Where the account lives, e.g. eu-1." in html
    assert re.search(r'id="field-api_key"[^>]*required', html)
    assert "setup incomplete" in html and "not configured" not in html
    assert re.search(r"data-status>disconnected<", html)
    for name in ("Save", "Test connection", "Disconnect", "Rename"):
        assert f">{name}</button>" in html
    assert ">Remove</a>" in html
    assert ">Connect</button>" not in html  # an API key provider has nothing to authorize
    connections = await integ.list_connections("acme")
    assert [(c.uuid, c.name) for c in connections] == [(uuid, "main")]


async def test_a_bad_name_renders_the_form_again_with_the_reason(
    integ: Integrations, http: httpx.AsyncClient
) -> None:
    response = await form_post(http, "/", "/connections", {"provider": "acme", "name": "no way"})
    assert response.status_code == 400
    assert 'role="alert"' in response.text
    assert 'value="no way"' in response.text
    await add(http, "acme", "main")
    taken = await form_post(http, "/", "/connections", {"provider": "acme", "name": "main"})
    assert taken.status_code == 409
    assert len(await integ.list_connections("acme")) == 1


async def test_save_test_rename_remove(integ: Integrations, http: httpx.AsyncClient) -> None:
    uuid = await add(http, "acme", "main")
    page = f"/{uuid}"
    saved = await form_post(http, page, f"{page}/setup", {"api_key": GOOD_KEY, "region": "eu-1"})
    assert saved.status_code == 303
    assert saved.headers["location"] == f"{page}?done=saved"
    assert (await integ.get_credentials(uuid))["api_key"] == GOOD_KEY

    # A blank secret keeps the stored one; the page shows only its masked hint.
    kept = await form_post(http, page, f"{page}/setup", {"api_key": "", "region": "eu-2"})
    assert kept.status_code == 303
    credentials = await integ.get_credentials(uuid)
    assert (credentials["api_key"], credentials["region"]) == (GOOD_KEY, "eu-2")
    html = (await http.get(page)).text
    assert "Stored: ••••6789" in html
    assert 'value="eu-2"' in html

    tested = await form_post(http, page, f"{page}/test", {})
    assert tested.status_code == 303
    status = (await http.get(f"{page}/status")).text
    assert ">connected<" in status
    assert re.search(r"Last tested <time[^>]*>just now</time>", status)

    renamed = await form_post(http, page, f"{page}/rename", {"new_name": "primary"})
    assert renamed.headers["location"] == f"{page}?done=renamed"
    assert (await integ.get_integration_by_uuid(uuid)).name == "primary"

    confirm = await http.get(f"{page}/remove")
    assert confirm.status_code == 200
    assert "cannot be undone" in confirm.text
    assert len(await integ.list_connections("acme")) == 1  # asking is not removing
    removed = await form_post(http, f"{page}/remove", f"{page}/remove", {})
    assert removed.headers["location"] == "/?done=removed"
    assert await integ.list_connections("acme") == []
    assert (await http.get(page)).status_code == 404


async def test_the_events_panel_opens_with_what_happened_before_the_page(
    integ: Integrations, http: httpx.AsyncClient
) -> None:
    uuid = await add(http, "acme", "main")
    page = f"/{uuid}"
    await form_post(http, page, f"{page}/setup", {"api_key": GOOD_KEY})
    await form_post(http, page, f"{page}/test", {})
    other = (await integ.add_connection("acme", "other")).uuid
    await integ.disconnect(other)
    # Read from the durable event log: a console started afterwards (a restart) shows
    # everything that happened, whoever did it.
    async with client(console(integ, authorize=admin)) as restarted:
        html = (await restarted.get(page)).text
    panel = html.split("data-events-log", 1)[1].split("</ol>", 1)[0]
    lines = re.findall(r"<time[^>]*>([^<]*)</time>", panel)
    # One time format for every line of the console.
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC ", line) for line in lines)
    shown = [line.split(" ", 3)[3] for line in lines]
    # Newest first; only this connection's; the transition from → to and who made it.
    assert shown == [
        "validated → connected (Connected) by admin",
        "setup saved disconnected → connected by admin",
        "connection added → disconnected by admin",
    ]
    assert GOOD_KEY not in html


async def test_a_failing_check_shows_error(integ: Integrations, http: httpx.AsyncClient) -> None:
    uuid = await add(http, "acme", "main")
    await form_post(http, f"/{uuid}", f"/{uuid}/setup", {"api_key": "wrong-key-0000000"})
    await form_post(http, f"/{uuid}", f"/{uuid}/test", {})
    status = (await http.get(f"/{uuid}/status")).text
    assert ">error<" in status
    assert "Invalid credentials" in status


async def test_the_listing_groups_by_provider_with_status_and_pages(
    integ: Integrations, oauth_server: OAuthTestServer
) -> None:
    for i in range(5):
        await integ.add_connection("acme", f"a{i}")
    uuid = await new_connection(integ, "web")
    await integ.record_validation(uuid, (False, "Token expired"))
    async with client(console(integ, authorize=admin, page_size=4)) as http:
        first = (await http.get("/")).text
        next_url = html.unescape(first.split('rel="next"', 1)[0].rsplit('href="', 1)[1])[:-2]
        second = (await http.get(next_url)).text
        fragment = (await http.get("/fragments/list?" + next_url.split("?", 1)[1])).text
        junk = (await http.get("/?after=junk&size=x&status=nope&provider=Not%20A%20Key")).text
    assert first.count("<tr data-uuid=") == 4
    assert 'id="provider-acme"' in first
    assert "6 connections" in first
    assert "Next page" in first and "First page" not in first
    assert "setup incomplete" in first and "not configured" not in first
    assert second.count("<tr data-uuid=") == 2
    assert 'id="provider-loopback"' in second
    assert ">error<" in second
    assert "Token expired" in second
    assert "Next page" not in second and "First page" in second
    assert fragment.count("<tr data-uuid=") == 2
    # A link edited by hand falls back to the first page.
    assert junk.count("<tr data-uuid=") == 4
    # The catalogue's other providers follow the last page, for the add form.
    assert "Providers without connections" not in first
    idle = second.split("Providers without connections", 1)[1]
    assert "<code>openai</code>" in idle
    assert "<code>acme</code>" not in idle and "<code>loopback</code>" not in idle


async def test_the_listing_searches_filters_and_counts_in_the_database(
    integ: Integrations,
) -> None:
    for name in ("alpha", "Alpine", "beta", "gamma"):
        await integ.add_connection("acme", name)
    await integ.add_connection("openai", "alpha")
    mine = await integ.add_connection("acme", "alpha", owner="user:1")
    failing = (await integ.add_connection("acme", "failing")).uuid
    await integ.record_validation(failing, (False, "Bad key"))
    async with client(console(integ, authorize=admin, page_size=10)) as http:
        everything = (await http.get("/")).text
        named = (await http.get("/?q=ALP")).text
        acme_named = (await http.get("/?q=alp&provider=acme")).text
        errors = (await http.get("/?status=error")).text
        theirs = (await http.get("/?owner=user:1")).text
        small = (await http.get("/?size=10&q=a")).text
    # Per-provider counts of every owner's connections, in the provider filter.
    assert "Acme (6)</option>" in everything and "OpenAI (1)</option>" in everything
    assert "7 connections" not in everything  # one page: no page links
    assert named.count("<tr data-uuid=") == 4  # acme alpha twice (two owners), Alpine, openai
    assert acme_named.count("<tr data-uuid=") == 3
    assert 'id="provider-openai"' not in acme_named
    assert errors.count("<tr data-uuid=") == 1 and "Bad key" in errors
    assert theirs.count("<tr data-uuid=") == 1 and f"/{mine.uuid}" in theirs
    assert 'value="user:1"' in theirs
    assert small.count("<tr data-uuid=") == 7 and '<option value="10" selected>' in small
    # An owner searches only their own connections, and sees only their own counts.
    async with client(console(integ, authorize=lambda request: Owner("user:1"))) as http:
        own = (await http.get("/?q=alp")).text
        other = (await http.get("/?owner=")).text
    assert own.count("<tr data-uuid=") == 1 and f"/{mine.uuid}" in own
    assert "Acme (1)</option>" in own and 'id="find-owner"' not in own
    assert other.count("<tr data-uuid=") == 1


async def test_the_next_page_links_walk_every_connection_once(integ: Integrations) -> None:
    made = set()
    for owner in (None, "user:1", "user:2"):
        for i in range(7):
            made.add((await integ.add_connection("acme", f"c{i}", owner=owner)).uuid)
    seen: list[str] = []
    async with client(console(integ, authorize=admin, page_size=4)) as http:
        path: str | None = "/"
        while path is not None:
            page = (await http.get(path)).text
            seen += re.findall(r'<tr data-uuid="([^"]+)"', page)
            link = re.search(r'<a href="([^"]+)" rel="next">', page)
            path = html.unescape(link.group(1)) if link else None
    assert len(seen) == len(made) == 21 and set(seen) == made


async def test_oauth_connect_and_callback(
    integ: Integrations, http: httpx.AsyncClient, oauth_server: OAuthTestServer
) -> None:
    uuid = await new_connection(integ, "web")
    page = (await http.get(f"/{uuid}")).text
    assert 'value="read"' in page  # the provider's scopes, editable
    start = await http.post(
        f"/{uuid}/connect", data={"csrf_token": csrf_of(page), "scopes": "read, write"}
    )
    assert start.status_code == 303
    authorize_url = start.headers["location"]
    assert authorize_url.startswith(oauth_server.authorize_url)
    assert "redirect_uri=http%3A%2F%2Fconsole.test%2Fcallback" in authorize_url
    assert "scope=read+write" in authorize_url or "scope=read%20write" in authorize_url
    async with httpx.AsyncClient() as browser:
        answer = await browser.get(authorize_url)
    assert answer.status_code == 302
    back = answer.headers["location"].replace("http://console.test", "")
    done = await http.get(back)
    assert done.status_code == 303
    assert done.headers["location"] == f"/{uuid}?done=connected"
    assert await integ.is_connected(uuid)
    assert ">Reconnect</button>" in (await http.get(f"/{uuid}")).text
    replay = await http.get(back)
    assert replay.status_code == 400
    assert "already used" in replay.text


async def test_a_callback_without_cookies_bounces_through_a_page_of_ours(
    integ: Integrations, oauth_server: OAuthTestServer
) -> None:
    """Browsers withhold SameSite=Strict cookies on a redirect from the provider's site."""

    def authorize(request: Request) -> Admin | None:
        return Admin() if request.cookies.get("sid") == "signed-in" else None

    uuid = await new_connection(integ, "web")
    url, _state = await integ.begin_authorization(uuid, "http://console.test/callback")
    async with httpx.AsyncClient() as browser:
        back = (await browser.get(url)).headers["location"].replace("http://console.test", "")
    async with client(console(integ, authorize=authorize)) as http:
        first = await http.get(back)
        assert first.status_code == 401
        found = re.search(r'http-equiv="refresh" content="0;url=([^"]+)"', first.text)
        assert found is not None
        target = html.unescape(found.group(1))
        assert target == back + "&bounced=1"
        assert not await integ.is_connected(uuid)
        refused = await http.get(target)  # still no session: refused, nothing consumed
        assert refused.status_code == 401
        assert "http-equiv" not in refused.text
        http.cookies.set("sid", "signed-in")
        done = await http.get(target)
        assert done.status_code == 303
        assert done.headers["location"] == f"/{uuid}?done=connected"
    assert await integ.is_connected(uuid)


async def test_bad_uuids_and_unknown_paths_render_a_404_page(http: httpx.AsyncClient) -> None:
    for path in (
        "/not-a-uuid",
        "/00000000-0000-7000-8000-000000000000",
        "/00000000-0000-7000-8000-000000000000/status",
        "/00000000-0000-7000-8000-000000000000/remove",
        "/events?uuid=00000000-0000-7000-8000-000000000000",
        "/a/b/c/d",
    ):
        response = await http.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("text/html")
        assert "Not found" in response.text
    assert (await http.get("/callback")).status_code == 400


async def test_a_failure_inside_renders_an_error_page_never_a_traceback(
    integ: Integrations,
) -> None:
    def broken(request: Request) -> Admin:
        raise RuntimeError("internal detail /srv/app.py line 12")

    async with client(console(integ, authorize=broken)) as http:
        response = await http.get("/")
    assert response.status_code == 500
    assert "Something went wrong" in response.text
    assert "Traceback" not in response.text
    assert "internal detail" not in response.text


# -- secrets ------------------------------------------------------------------------------------

MARKERS = {
    "api_key": "MARKER-api-key-5f1e0c7a9b",
    "client_secret": "MARKER-client-secret-8d2a",
}


async def test_no_page_or_fragment_ever_shows_a_secret(
    integ: Integrations, http: httpx.AsyncClient, oauth_server: OAuthTestServer
) -> None:
    acme = (await integ.add_connection("acme", "main")).uuid
    await integ.save_setup(acme, {"api_key": MARKERS["api_key"], "region": "eu-1"})
    await integ.validate_connection(acme)
    oauth_uuid = await new_connection(integ, "web")
    url, _state = await integ.begin_authorization(oauth_uuid, "http://console.test/callback")
    async with httpx.AsyncClient() as browser:
        query = httpx.URL((await browser.get(url)).headers["location"]).params
    await integ.complete_authorization(query["state"], code=query["code"])
    tokens = await integ.get_credentials(oauth_uuid)
    await integ.save_setup(oauth_uuid, {"client_secret": MARKERS["client_secret"]})
    secrets = [*MARKERS.values(), tokens["access_token"], tokens["refresh_token"]]
    assert all(len(secret) >= 12 for secret in secrets)

    bodies: list[str] = []
    for uuid in (acme, oauth_uuid):
        for path in (f"/{uuid}", f"/{uuid}/status", f"/{uuid}/remove"):
            bodies.append((await http.get(path)).text)
        # Pages rendered after a failing action show the stored state too.
        failed = await form_post(http, f"/{uuid}", f"/{uuid}/rename", {"new_name": "no way"})
        assert failed.status_code == 400
        bodies.append(failed.text)
    for path in ("/", "/fragments/list", "/?page=2", "/nope/nope"):
        bodies.append((await http.get(path)).text)
    bodies.append((await form_post(http, "/", "/connections", {"provider": "acme"})).text)
    for body in bodies:
        for secret in secrets:
            assert secret not in body


# -- owners ---------------------------------------------------------------------------------------


async def test_an_owner_sees_and_changes_only_their_connections(integ: Integrations) -> None:
    mine = (await integ.add_connection("acme", "mine", owner="user:1")).uuid
    theirs = (await integ.add_connection("acme", "theirs", owner="user:2")).uuid
    system = (await integ.add_connection("acme", "site")).uuid
    async with client(console(integ, authorize=lambda r: Owner("user:1"))) as http:
        listing = (await http.get("/")).text
        assert f"/{mine}" in listing
        assert f"/{theirs}" not in listing and f"/{system}" not in listing
        for uuid in (theirs, system):
            assert (await http.get(f"/{uuid}")).status_code == 404
            token = csrf_of(listing)
            for action in ("remove", "disconnect", "test"):
                response = await http.post(f"/{uuid}/{action}", data={"csrf_token": token})
                assert response.status_code == 404
        added = await form_post(http, "/", "/connections", {"provider": "acme", "name": "new"})
        assert added.status_code == 303
    owned = await integ.list_connections("acme", owner="user:1")
    assert sorted(c.name for c in owned) == ["mine", "new"]
    assert [c.name for c in await integ.list_connections("acme", owner="user:2")] == ["theirs"]
    assert [c.name for c in await integ.list_connections("acme")] == ["site"]


async def test_an_owner_sets_up_and_tests_their_own_connection(integ: Integrations) -> None:
    uuid = (await integ.add_connection("acme", "mine", owner="user:1")).uuid
    async with client(console(integ, authorize=lambda r: Owner("user:1", name="ann"))) as http:
        page = await http.get(f"/{uuid}")
        assert page.status_code == 200
        assert "Owner user:1" in page.text
        saved = await form_post(http, f"/{uuid}", f"/{uuid}/setup", {"api_key": GOOD_KEY})
        assert saved.status_code == 303
        tested = await form_post(http, f"/{uuid}", f"/{uuid}/test", {})
        assert tested.status_code == 303
        assert ">connected<" in (await http.get(f"/{uuid}/status")).text
        assert (await http.get(f"/events?uuid={uuid}x")).status_code == 404
    assert await integ.is_connected(uuid)


async def test_the_administrator_sees_every_owners_connections(integ: Integrations) -> None:
    theirs = (await integ.add_connection("acme", "theirs", owner="user:2")).uuid
    site = (await integ.add_connection("acme", "site")).uuid
    async with client(console(integ, authorize=admin)) as http:
        listing = (await http.get("/")).text
        assert f"/{site}" in listing and f"/{theirs}" in listing
        assert ">user:2</td>" in listing and ">system</td>" in listing
        assert (await http.get(f"/{theirs}")).status_code == 200
        renamed = await http.post(
            f"/{theirs}/rename", data={"csrf_token": csrf_of(listing), "new_name": "renamed"}
        )
        assert renamed.status_code == 303
    # The administrator's change stays with the owner's connection.
    assert [c.name for c in await integ.list_connections("acme", owner="user:2")] == ["renamed"]


async def test_processes_sharing_a_secret_accept_each_others_forms(integ: Integrations) -> None:
    one = console(integ, authorize=admin, secret="s" * 32)
    two = console(integ, authorize=admin, secret="s" * 32)
    other = console(integ, authorize=admin, secret="t" * 32)
    async with client(one) as http:
        token = csrf_of((await http.get("/")).text)
        cookies = http.cookies
    for app, expected in ((two, 303), (other, 403)):
        async with client(app) as http:
            http.cookies = cookies
            response = await http.post(
                "/connections",
                data={"csrf_token": token, "provider": "acme", "name": f"n{expected}"},
            )
            assert response.status_code == expected
    assert [c.name for c in await integ.list_connections("acme")] == ["n303"]


def test_console_refuses_bad_arguments(integ: Integrations) -> None:
    with pytest.raises(TypeError, match="authorize must be a callable"):
        console(integ, authorize="admin")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="page_size must be a positive integer"):
        console(integ, authorize=admin, page_size=0)
    with pytest.raises(ValueError, match="secret must be at least 16 bytes"):
        console(integ, authorize=admin, secret="short")
    with pytest.raises(ValueError, match="owner must be a non-empty string"):
        Owner("  ")


# -- mounting -----------------------------------------------------------------------------------


async def test_mounted_under_a_path_in_fastapi(integ: Integrations) -> None:
    from fastapi import FastAPI

    app = FastAPI()
    app.mount("/admin/integrations", console(integ, authorize=admin), name="integrations")
    async with client(app) as http:
        page = await http.get("/admin/integrations/")
        assert page.status_code == 200
        assert 'action="/admin/integrations/connections"' in page.text
        assert 'href="/admin/integrations/static/console.css"' in page.text
        assert "Path=/admin/integrations" in page.headers["set-cookie"]
        added = await http.post(
            "/admin/integrations/connections",
            data={"csrf_token": csrf_of(page.text), "provider": "acme", "name": "main"},
        )
        assert added.status_code == 303
        location = added.headers["location"]
        assert location.startswith("/admin/integrations/")
        connection = await http.get(location)
        assert connection.status_code == 200
        assert 'action="/admin/integrations/' in connection.text
        assert (await http.get("/admin/integrations/static/console.js")).status_code == 200


# -- standalone server ------------------------------------------------------------------------


async def test_only_a_session_the_login_link_made_signs_in(integ: Integrations) -> None:
    link = LoginLink()
    token = link.token
    async with client(standalone_app(integ, link)) as http:
        for forged in ("forged", "", "0" * 43):
            page = await http.get("/", headers={"cookie": f"{link.cookie}={forged}"})
            assert page.status_code == 401, forged
        login = await http.get(f"/login?token={token}")
        assert login.status_code == 303
        session = login.cookies[link.cookie]
        assert (await http.get("/")).status_code == 200
    async with client(standalone_app(integ, link)) as other:
        near = session[:-1] + ("A" if session[-1] != "A" else "B")
        page = await other.get("/", headers={"cookie": f"{link.cookie}={near}"})
        assert page.status_code == 401
        page = await other.get("/", headers={"cookie": f"{link.cookie}={session}"})
        assert page.status_code == 200


async def test_serve_prints_a_one_time_login_link(integ: Integrations) -> None:
    out = io.StringIO()
    links: list[str] = []
    ready = asyncio.Event()

    def on_ready(url: str) -> None:
        links.append(url)
        ready.set()

    task = asyncio.create_task(serve(integ, port=0, out=out, on_ready=on_ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        link = links[0]
        assert link in out.getvalue()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/login\?token=[A-Za-z0-9_-]{40,}", link)
        base = link.split("/login")[0]
        async with httpx.AsyncClient(base_url=base) as http:
            for _ in range(100):
                try:
                    outside = await http.get("/")
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.05)
            assert outside.status_code == 401
            wrong = await http.get("/login?token=guess")
            assert wrong.status_code == 403
            login = await http.get(link)
            assert login.status_code == 303
            cookie = login.headers["set-cookie"]
            assert re.match(r"integrations_session_\d+_[0-9a-f]{8}=", cookie)
            assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
            inside = await http.get("/")
            assert inside.status_code == 200
            assert "Administrator" in inside.text
            async with httpx.AsyncClient() as other:
                assert (await other.get(link)).status_code == 403  # used up
            # An open page's event stream does not hold the server up when it stops.
            cancelled: list[str] = []
            note = logging.Handler()
            note.emit = lambda record: cancelled.append(record.getMessage())  # type: ignore[method-assign]
            logging.getLogger("uvicorn.error").addHandler(note)
            try:
                async with http.stream("GET", "/events") as stream:
                    assert stream.status_code == 200
                    task.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await task
                    # Ended by the server, not merely left open.
                    rest = [line async for line in stream.aiter_lines()]
                    assert all(not line.startswith("data:") for line in rest)
            finally:
                logging.getLogger("uvicorn.error").removeHandler(note)
            # The stream ended at once: the server did not wait out its graceful shutdown
            # and cancel it.
            assert not [m for m in cancelled if "graceful shutdown exceeded" in m], cancelled
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def to_port(link: LoginLink, session: str | None, host: str = "console.test:8000") -> Request:
    """A request to ``host`` carrying ``session`` in the link's cookie (no cookie for None)."""
    headers = [(b"host", host.encode())]
    if session is not None:
        headers.append((b"cookie", f"{link.cookie}={session}".encode()))
    scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": headers}
    return Request(scope)


def test_login_link_timeouts_default_to_a_minute_half_an_hour_and_12_hours() -> None:
    link = LoginLink()
    assert (link.login_ttl, link.session_idle, link.session_lifetime) == (60.0, 1800.0, 43200.0)
    assert isinstance(LoginLink(login_ttl=5).login_ttl, float)


@pytest.mark.parametrize("name", ["login_ttl", "session_idle", "session_lifetime"])
def test_login_link_timeouts_are_more_than_0_and_at_most_7_days(name: str) -> None:
    for fine in (0.001, 0.5, 1, 604800, 604800.0):
        assert getattr(LoginLink(**{name: fine}), name) == fine
    for wrong in (0, 0.0, -1, -0.5, 604800.001, 604801, 10**9):
        with pytest.raises(ValueError) as raised:
            LoginLink(**{name: wrong})
        assert str(raised.value) == f"{name} must be more than 0 and at most 604800 seconds"
    for wrong in (True, False, "60", None, [60]):
        with pytest.raises(ValueError) as raised:
            LoginLink(**{name: wrong})
        assert str(raised.value) == f"{name} must be a number of seconds"


def test_the_login_token_and_session_ids_carry_256_random_bits() -> None:
    link = LoginLink()
    assert link.token is not None and re.fullmatch(r"[A-Za-z0-9_-]{43}", link.token)
    session = link.exchange(link.token)
    assert session is not None and re.fullmatch(r"[A-Za-z0-9_-]{43}", session)


def test_the_session_cookie_is_named_after_the_port_and_the_instance() -> None:
    unbound = LoginLink()
    assert re.fullmatch(r"integrations_session_0_[0-9a-f]{8}", unbound.cookie)
    assert unbound.port is None
    given = LoginLink(port=8000)
    assert re.fullmatch(r"integrations_session_8000_[0-9a-f]{8}", given.cookie)
    instance = unbound.cookie.rsplit("_", 1)[1]
    unbound.bind_port(8765)
    assert unbound.port == 8765
    assert unbound.cookie == f"integrations_session_8765_{instance}"
    assert LoginLink().cookie != LoginLink().cookie


def test_a_login_link_works_once_and_a_wrong_token_does_not_use_it_up() -> None:
    clock = Clock(1.0)
    link = LoginLink(clock=clock)
    token = link.token
    assert token is not None
    assert link.exchange("") is None
    assert link.exchange(token[:-1]) is None
    assert link.exchange(token + "x") is None
    assert link.token == token
    session = link.exchange(token)
    assert session is not None and session != token
    assert link.token is None
    assert link.exchange(token) is None
    assert link.exchange("") is None


def test_a_login_link_works_up_to_login_ttl_after_it_was_made() -> None:
    clock = Clock(1000.0)
    link = LoginLink(login_ttl=60, clock=clock)
    clock.now = 1060.0
    assert link.token is not None and link.exchange(link.token) is not None
    clock = Clock(1000.0)
    late = LoginLink(login_ttl=60, clock=clock)
    token = late.token
    assert token is not None
    clock.now = 1060.5
    assert late.exchange(token) is None
    assert late.token is None  # used up: turning the clock back does not revive it
    clock.now = 1000.0
    assert late.exchange(token) is None
    # Counted from when the link was made, whatever the clock read then.
    for now, works in ((61.0, True), (61.5, False)):
        clock = Clock(1.0)
        early = LoginLink(login_ttl=60, clock=clock)
        assert early.token is not None
        clock.now = now
        assert (early.exchange(early.token) is not None) is works, now


def test_a_session_ends_after_session_idle_seconds_unused() -> None:
    clock = Clock(1.0)
    link = LoginLink(session_idle=10, session_lifetime=1000, clock=clock)
    assert link.token is not None
    session = link.exchange(link.token)
    for now in (11.0, 21.0, 31.0):  # each use within 10 s of the last keeps it
        clock.now = now
        assert link.session_of(to_port(link, session)) == session
    clock.now = 41.5
    assert link.session_of(to_port(link, session)) is None
    clock.now = 31.0  # ended for good, not merely out of time
    assert link.session_of(to_port(link, session)) is None
    # Counted from the login when the session was not used since.
    clock = Clock(1.0)
    unused = LoginLink(session_idle=10, session_lifetime=1000, clock=clock)
    assert unused.token is not None
    session = unused.exchange(unused.token)
    clock.now = 11.5
    assert unused.session_of(to_port(unused, session)) is None


def test_a_session_ends_session_lifetime_seconds_after_its_login_however_used() -> None:
    clock = Clock(1.0)
    link = LoginLink(session_idle=10, session_lifetime=35, clock=clock)
    assert link.token is not None
    session = link.exchange(link.token)
    for now in (9.0, 17.0, 25.0, 33.0, 36.0):
        clock.now = now
        assert link.session_of(to_port(link, session)) == session, now
    clock.now = 36.5
    assert link.session_of(to_port(link, session)) is None
    clock.now = 36.0
    assert link.session_of(to_port(link, session)) is None


def test_a_session_is_only_taken_at_the_port_the_link_is_bound_to() -> None:
    link = LoginLink()
    assert link.token is not None
    session = link.exchange(link.token)
    # Not bound yet: any port (or none) is the console's.
    for host in ("console.test:8000", "console.test:1", "console.test"):
        assert link.session_of(to_port(link, session, host)) == session
    link.bind_port(8000)
    assert link.session_of(to_port(link, session, "console.test:8000")) == session
    for host in ("console.test:7999", "console.test:8001", "console.test"):
        assert link.session_of(to_port(link, session, host)) is None, host
    assert link.authorize(to_port(link, session, "console.test:8000")) is link.viewer
    assert link.authorize(to_port(link, session, "console.test:8001")) is None


def test_no_unknown_or_ended_session_signs_in_and_ending_one_ends_only_it() -> None:
    link = LoginLink(Owner("user:42"))
    assert link.token is not None
    session = link.exchange(link.token)
    assert session is not None
    assert link.session_of(to_port(link, None)) is None
    assert link.session_of(to_port(link, "x" + session[1:])) is None
    assert link.authorize(to_port(link, "x" + session[1:])) is None
    viewer = link.authorize(to_port(link, session))
    assert isinstance(viewer, Owner) and viewer is link.viewer
    link.end(to_port(link, None))  # no cookie: nothing ends
    link.end(to_port(link, "unknown"))
    assert link.session_of(to_port(link, session)) == session
    link.end(to_port(link, session))
    assert link.session_of(to_port(link, session)) is None
    assert link.authorize(to_port(link, session)) is None
    assert isinstance(LoginLink().viewer, Admin)


async def test_signing_out_ends_the_session_and_deletes_its_cookie(integ: Integrations) -> None:
    link = LoginLink()
    async with client(standalone_app(integ, link)) as http:
        login = await http.get(f"/login?token={link.token}")
        assert (login.status_code, login.headers["location"]) == (303, "/")
        cookie = login.headers["set-cookie"]
        assert cookie.startswith(f"{link.cookie}=") and "Path=/;" in cookie
        session = login.cookies[link.cookie]
        page = await http.get("/")
        assert page.status_code == 200
        out = await http.post("/logout", data={"csrf_token": csrf_of(page.text)})
        assert (out.status_code, out.headers["location"]) == (303, "/")
        deleted = out.headers["set-cookie"]
        assert deleted.startswith(f'{link.cookie}="";') and "Max-Age=0" in deleted
        assert "Path=/" in deleted
    async with client(standalone_app(integ, link)) as replay:
        page = await replay.get("/", headers={"cookie": f"{link.cookie}={session}"})
        assert page.status_code == 401


def test_the_printed_host_is_one_a_browser_can_open() -> None:
    from integrations.web._serve import _display_host

    for wildcard in ("0.0.0.0", "", "::"):
        assert _display_host(wildcard, 8765) == "127.0.0.1:8765"
    assert _display_host("127.0.0.2", 1) == "127.0.0.2:1"
    assert _display_host("::1", 8765) == "[::1]:8765"
    assert _display_host("fe80::1%lo", 80) == "[fe80::1%lo]:80"


def test_serve_takes_the_documented_arguments() -> None:
    # docs/console.md: serve(integ, *, host="127.0.0.1", port=8765, log_level="warning", ...)
    params = inspect.signature(serve).parameters
    assert params["integ"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY} == (
        set(params) - {"integ"}
    )
    defaults = {n: p.default for n, p in params.items() if n != "integ"}
    assert defaults == {
        "host": "127.0.0.1",
        "port": 8765,
        "log_level": "warning",
        "out": None,
        "on_ready": None,
        "secret": None,
        "owner": None,
        "login_ttl": 60.0,
        "session_idle": 1800.0,
        "session_lifetime": 43200.0,
    }


@contextlib.asynccontextmanager
async def serving(integ: Integrations, **options: Any) -> AsyncIterator[str]:
    """``serve`` in a task of this loop until the block ends; its login link."""
    links: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(serve(integ, on_ready=links.put_nowait, **options))
    try:
        get = asyncio.ensure_future(links.get())
        done, _ = await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            get.cancel()
            task.result()
        yield get.result()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def login(link: str) -> httpx.AsyncClient:
    http = httpx.AsyncClient(base_url=link.split("/login")[0])
    assert (await http.get(link)).status_code == 303
    return http


async def test_serve_on_a_port_in_use_says_so_and_prints_no_link(integ: Integrations) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = io.StringIO()
        with pytest.raises(OSError) as raised:
            await serve(integ, port=port, out=out)
    assert raised.value.errno == errno.EADDRINUSE
    assert raised.value.strerror == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    assert isinstance(raised.value.__cause__, OSError)
    assert out.getvalue() == ""


async def test_serve_restarted_at_once_on_its_port_starts(integ: Integrations) -> None:
    # The first server closes its keep-alive connection when it stops, which leaves the
    # port in TIME_WAIT for a minute: the next one on that port must start all the same.
    async with serving(integ, port=0, out=io.StringIO()) as link:
        port = int(link.split("/login")[0].rsplit(":", 1)[1])
        http = await login(link)
        assert (await http.get("/")).status_code == 200
    await http.aclose()
    async with serving(integ, port=port, out=io.StringIO()) as again:
        assert again.startswith(f"http://127.0.0.1:{port}/login?token=")
        await (await login(again)).aclose()


async def test_serve_on_ipv6_loopback_prints_a_bracketed_link(integ: Integrations) -> None:
    async with serving(integ, host="::1", port=0, out=io.StringIO()) as link:
        assert re.fullmatch(r"http://\[::1\]:\d+/login\?token=[A-Za-z0-9_-]{43}", link)
        http = await login(link)
        assert (await http.get("/")).status_code == 200
        await http.aclose()


async def test_serve_prints_the_link_to_standard_output_by_default(
    integ: Integrations, capsys: pytest.CaptureFixture[str]
) -> None:
    task = asyncio.create_task(serve(integ, port=0))
    try:
        printed = ""
        while "token=" not in printed:
            assert not task.done()
            await asyncio.sleep(0.01)
            printed += capsys.readouterr().out
        first, second = printed.splitlines()
        assert first == (
            "Integrations console; open this link to sign in (it works once, within 60 s):"
        )
        http = await login(second.strip())
        assert (await http.get("/")).status_code == 200
        await http.aclose()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_link_is_flushed_to_a_pipe_at_once(integ: Integrations) -> None:
    read, write = os.pipe()
    os.set_blocking(read, False)
    try:
        # A text file on a pipe is block-buffered: what is not flushed stays in the process.
        with os.fdopen(write, "w", encoding="utf-8") as out:
            async with serving(integ, port=0, out=out, login_ttl=90) as link:
                printed = os.read(read, 65536).decode()
                assert printed == (
                    "Integrations console; open this link to sign in (it works once, "
                    f"within 90 s):\n    {link}\n"
                )
    finally:
        os.close(read)


async def test_serve_logs_no_request_line_so_no_login_token(
    integ: Integrations, capfd: pytest.CaptureFixture[str]
) -> None:
    async with serving(integ, port=0, out=io.StringIO(), log_level="info") as link:
        http = await login(link)
        assert (await http.get("/")).status_code == 200
        await http.aclose()
    logged = capfd.readouterr()
    assert "Started server process" in logged.err  # info is logged
    token = link.split("token=")[1]
    assert token not in logged.out + logged.err
    assert "GET /" not in logged.out + logged.err


async def test_the_event_stream_tells_what_changed_and_ends_in_time(integ: Integrations) -> None:
    uuid = (await integ.add_connection("acme", "main")).uuid
    app = console(integ, authorize=admin, stream_lifetime=1.5)
    async with running(app) as base, httpx.AsyncClient(base_url=base) as http:
        started = time.monotonic()
        async with http.stream("GET", f"/events?uuid={uuid}") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()
            assert await anext(lines) == "retry: 1000"
            await integ.save_setup(uuid, {"api_key": MARKERS["api_key"]})
            received = []
            async for line in lines:
                received.append(line)
                if line.startswith("data:"):
                    break
            rest = [line async for line in lines]
        elapsed = time.monotonic() - started
    assert received[-2] == "event: change"
    data = json.loads(received[-1][len("data: ") :])
    assert (data["kind"], data["uuid"], data["status"]) == ("setup_saved", uuid, "connected")
    assert MARKERS["api_key"] not in "".join(received + rest)
    # Not before its lifetime; and it did end (an endless stream would hang the read above).
    assert elapsed > 1.4


# -- display helpers --------------------------------------------------------------------------


def test_ago_reads_like_a_person_would_say_it() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def at(**delta: Any) -> str:
        return (now - timedelta(**delta)).isoformat()

    assert ago(at(seconds=3), now) == "just now"
    assert ago(at(seconds=42), now) == "42 s ago"
    assert ago(at(minutes=3, seconds=5), now) == "3 min ago"
    assert ago(at(hours=5), now) == "5 h ago"
    assert ago(at(days=2), now) == "2 d ago"
    assert ago(None, now) == "never"
    assert ago("yesterday", now) == "never"


def test_status_text() -> None:
    acme = acme_provider("http://127.0.0.1:9")
    assert status_text(acme, {"status": "connected", "api_key": "x"}) == "connected"
    assert status_text(acme, {"status": "error"}) == "error"
    # One word for one state: the stored one; a missing required field is said beside it.
    assert status_text(acme, {"status": "disconnected"}) == "disconnected"
    assert setup_incomplete(acme, {"status": "disconnected"})
    assert status_text(acme, {"status": "disconnected", "api_key": "••••"}) == "disconnected"
    assert not setup_incomplete(acme, {"status": "disconnected", "api_key": "••••"})
    # Disconnected by someone (the API key is dropped with it): the setup was complete.
    gone = {"status": "disconnected", "disconnected_at": "2026-01-01T00:00:00+00:00"}
    assert status_text(acme, gone) == "disconnected" and not setup_incomplete(acme, gone)
    assert status_text(None, {}) == "disconnected"
    oauth = Provider(
        key="o", name="O", auth_type="oauth2", authorize_url="http://a/", token_url="http://t/"
    )
    assert status_text(oauth, {"client_id": "c", "client_secret": "••••"}) == "disconnected"


def test_parse_scopes() -> None:
    assert parse_scopes(" read, write  admin,,") == ["read", "write", "admin"]
    assert parse_scopes("") == []


# -- the whole truth --------------------------------------------------------------------------


async def test_rows_of_providers_this_application_does_not_register_are_listed(
    fresh_db: str, integ: Integrations
) -> None:
    await integ.add_connection("acme", "main")
    await integ.add_connection("openai", "main")
    # Another application on the same database, without the acme provider.
    async with (
        open_integrations(fresh_db) as other,
        client(console(other, authorize=admin)) as http,
    ):
        page = (await http.get("/")).text
    assert page.count("<tr data-uuid=") == 2
    acme = page.split('id="provider-acme"', 1)[1].split("</section>", 1)[0]
    assert "is not registered in this application" in acme
    openai = page.split('id="provider-openai"', 1)[1].split("</section>", 1)[0]
    assert "not registered" not in openai


async def test_a_check_that_records_nothing_says_so_instead_of_checked(
    fresh_db: str, integ: Integrations, http: httpx.AsyncClient
) -> None:
    # "Test" on an OAuth connection never connected: no token to check.
    oauth = await add(http, "loopback", "web")
    await form_post(
        http, f"/{oauth}", f"/{oauth}/setup", {"client_id": "cid", "client_secret": "cs-01234567"}
    )
    before = (await integ.get_integration_by_uuid(oauth)).data
    tested = await form_post(http, f"/{oauth}", f"/{oauth}/test", {})
    assert tested.status_code == 409 and "Checked." not in tested.text
    assert re.search(r'role="alert"[^>]*>Not connected yet: [^<]*nothing was recorded', tested.text)
    assert (await integ.get_integration_by_uuid(oauth)).data == before
    # "Test" in an application that does not register the connection's provider.
    acme = (await integ.add_connection("acme", "main")).uuid
    await integ.save_setup(acme, {"api_key": GOOD_KEY})
    before = (await integ.get_integration_by_uuid(acme)).data
    async with (
        open_integrations(fresh_db) as other,
        client(console(other, authorize=admin)) as elsewhere,
    ):
        tested = await form_post(elsewhere, f"/{acme}", f"/{acme}/test", {})
    assert tested.status_code == 409 and "Checked." not in tested.text
    assert "is not registered in this process" in tested.text
    assert (await integ.get_integration_by_uuid(acme)).data == before


async def test_an_error_page_carries_no_outcome_note(http: httpx.AsyncClient) -> None:
    missing = await http.get("/0190a4c6-0000-7000-8000-000000000000?done=added")
    assert missing.status_code == 404
    assert "Connection added." not in missing.text


async def test_the_destructive_buttons_look_destructive(http: httpx.AsyncClient) -> None:
    uuid = await add(http, "acme", "main")
    page = (await http.get(f"/{uuid}")).text
    assert '<button type="submit" class="danger">Disconnect</button>' in page
    assert re.search(r'<a class="button danger" href="[^"]*/remove">Remove</a>', page)
    confirm = (await http.get(f"/{uuid}/remove")).text
    assert '<button type="submit" class="danger">Remove</button>' in confirm


async def test_the_oauth_setup_shows_the_redirect_uri_and_the_providers_docs(
    fresh_db: str, oauth_server: OAuthTestServer
) -> None:
    documented = loopback_provider(
        oauth_server.base_url, docs_url="https://docs.example.com/oauth-apps"
    )
    async with open_integrations(fresh_db, documented) as integ:
        uuid = (await integ.add_connection("loopback", "web")).uuid
        async with client(console(integ, authorize=admin)) as http:
            page = (await http.get(f"/{uuid}")).text
        async with client(
            console(integ, authorize=admin, callback_url="https://app.example.com/cb")
        ) as http:
            behind_proxy = (await http.get(f"/{uuid}")).text
    assert "<code data-redirect-uri>http://console.test/callback</code>" in page
    assert 'href="https://docs.example.com/oauth-apps"' in page
    assert "<code data-redirect-uri>https://app.example.com/cb</code>" in behind_proxy


# -- webhook endpoints --------------------------------------------------------------------------


async def _dead_delivery(integ: Integrations, endpoint: str) -> str:
    """Run the delivery worker until the endpoint's one delivery is dead (nothing listens)."""
    worker = asyncio.create_task(
        integ.run_webhooks(allow_loopback=True, retry_delays=(0.05, 0.05), poll=0.1)
    )
    try:
        await integ.add_connection("openai", "main")
        deadline = time.monotonic() + 30
        while not (dead := await integ.webhook_deliveries(endpoint, state="dead")):
            assert time.monotonic() < deadline, "no dead delivery"
            await asyncio.sleep(0.05)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    return dead[0].id


async def test_the_webhooks_page_shows_each_endpoints_deliveries_and_replays_one(
    integ: Integrations, http: httpx.AsyncClient
) -> None:
    nobody = "http://127.0.0.1:9/hook"
    endpoint = await integ.add_webhook(
        nobody, allow_loopback=True, kinds=["connection_added"], description="ops pager"
    )
    theirs = await integ.for_owner("user:9").add_webhook(
        "http://127.0.0.1:9/theirs", allow_loopback=True
    )
    delivery = await _dead_delivery(integ, endpoint.id)
    page = (await http.get("/webhooks")).text
    assert f"<code>{nobody}</code>" in page and "http://127.0.0.1:9/theirs" in page
    mine = page.split(f'data-endpoint="{endpoint.id}"', 1)[1].split("</section>", 1)[0]
    assert "data-health>failing<" in mine and "ops pager" in mine
    assert f'data-delivery="{delivery}"' in mine and ">dead<" in mine
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", mine)
    # A POST without the page's CSRF token changes nothing.
    refused = await http.post(f"/webhooks/deliveries/{delivery}/replay", data={"csrf_token": "x"})
    assert refused.status_code == 403
    assert (await integ.webhook_deliveries(endpoint.id))[0].state == "dead"
    replayed = await form_post(http, "/webhooks", f"/webhooks/deliveries/{delivery}/replay", {})
    assert replayed.status_code == 303
    assert replayed.headers["location"].endswith("/webhooks?done=replayed")
    [again] = await integ.webhook_deliveries(endpoint.id)
    assert again.id == delivery and again.state == "pending"
    shown = (await http.get("/webhooks?done=replayed")).text
    assert "Delivery queued again." in shown and "Next attempt" in shown
    # An owner sees their own endpoints only, and cannot replay another's delivery.
    async with client(console(integ, authorize=lambda request: Owner("user:9"))) as owner:
        own = (await owner.get("/webhooks")).text
        assert f'data-endpoint="{theirs.id}"' in own and nobody not in own
        other = await form_post(owner, "/", f"/webhooks/deliveries/{delivery}/replay", {})
        assert other.status_code == 404


# -- audit trail ----------------------------------------------------------------------------


async def test_audit_pages_store_wide_per_connection_and_owner_scoped(
    integ: Integrations, http: httpx.AsyncClient
) -> None:
    mine = await integ.add_connection("acme", "mine", owner="user:1")
    theirs = await integ.add_connection("acme", "theirs", owner="user:2")
    uuid = await add(http, "acme", "console")
    page = await http.get(f"/{uuid}")
    assert f'href="/{uuid}/audit"' in page.text
    own = (await http.get(f"/{uuid}/audit")).text
    assert "connection.added" in own and '<td data-label="actor">admin</td>' in own
    assert mine.uuid not in own
    every = (await http.get("/audit")).text
    assert mine.uuid in every and theirs.uuid in every and uuid in every
    async with client(console(integ, authorize=lambda request: Owner("user:1"))) as owner:
        scoped = (await owner.get("/audit")).text
        assert mine.uuid in scoped
        assert theirs.uuid not in scoped and uuid not in scoped
        assert (await owner.get(f"/{theirs.uuid}/audit")).status_code == 404


async def test_the_mount_snippet_of_the_docs_works_as_written(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    from .conftest import TEST_KEY

    text = (Path(__file__).parent.parent / "docs" / "console.md").read_text()
    snippet = text.split("## Mounting it in FastAPI or Starlette", 1)[1]
    code = snippet.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("INTEGRATIONS_DSN", fresh_db)
    monkeypatch.setenv("INTEGRATIONS_KEYS", TEST_KEY)
    scope: dict[str, Any] = {}
    exec(compile(code, "docs/console.md", "exec"), scope)
    scope["SESSIONS"]["staff"] = scope["User"](1, "ops@example.com", True)
    scope["SESSIONS"]["member"] = scope["User"](42, "ann@example.com", False)
    async with scope["integ"], client(scope["app"]) as http:
        assert (await http.get("/admin/integrations/")).status_code == 401
        http.cookies.set("session", "staff")
        staff = await http.get("/admin/integrations/")
        assert staff.status_code == 200 and "Administrator" in staff.text
        http.cookies.set("session", "member")
        member = await http.get("/admin/integrations/")
        assert member.status_code == 200 and "Owner user:42" in member.text


def _bare_request(headers: dict[str, str], scheme: str = "http") -> Request:
    return Request(
        {
            "type": "http",
            "scheme": scheme,
            "method": "POST",
            "path": "/",
            "query_string": b"",
            "server": ("console.test", 80),
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        }
    )


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({"sec-fetch-site": "same-origin", "origin": "http://evil.test"}, False),
        ({"sec-fetch-site": "none"}, False),
        ({"sec-fetch-site": "same-site"}, True),
        ({"sec-fetch-site": "cross-site", "origin": "http://console.test"}, True),
        ({}, False),
        ({"origin": "null", "host": "console.test"}, False),
        ({"origin": "http://console.test", "host": "console.test"}, False),
        # Without Sec-Fetch-Site: a sibling port, another scheme, or no Host to compare with.
        ({"origin": "http://console.test:8001", "host": "console.test"}, True),
        ({"origin": "https://console.test", "host": "console.test"}, True),
        ({"origin": "http://console.test"}, True),
        ({"origin": "safari-web-extension://abc", "host": "console.test"}, True),
        ({"origin": "http://attacker.test", "host": "console.test"}, True),
    ],
)
def test_cross_origin_trusts_sec_fetch_site_else_compares_origin_with_host(
    headers: dict[str, str], refused: bool
) -> None:
    assert cross_origin(_bare_request(headers)) is refused


def test_a_csrf_token_without_its_cookie_or_not_a_string_is_refused_without_an_error() -> None:
    csrf = Csrf(b"k" * 32)
    with_cookie = _bare_request({"cookie": f"{CSRF_COOKIE}=c-0123456789"})
    token, _ = csrf.token_for(with_cookie)
    assert csrf.verify(with_cookie, token) is True
    assert csrf.verify(_bare_request({}), token) is False
    for bad in (None, 123, b"bytes", ""):
        assert csrf.verify(with_cookie, bad) is False


def test_a_csrf_cookie_longer_than_128_characters_is_ignored() -> None:
    csrf = Csrf(b"k" * 32)
    longest, too_long = "c" * 128, "c" * 129
    assert csrf.cookie_of(_bare_request({"cookie": f"{CSRF_COOKIE}={longest}"})) == longest
    assert csrf.cookie_of(_bare_request({"cookie": f"{CSRF_COOKIE}={too_long}"})) is None
