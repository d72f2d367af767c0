"""A real OpenID provider (the npm package ``oidc-provider``) on loopback, and a user who
approves a device code through its own pages."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import html
import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

HERE = Path(__file__).resolve().parent / "oidc"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def ensure_installed() -> None:
    """``npm ci`` the provider once (CI installs it first; a newcomer's run does it here)."""
    if (HERE / "node_modules" / "oidc-provider" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.fail(
            "Node.js and npm are needed for the OpenID provider tests (apt-get install nodejs npm)"
        )
    with open(HERE / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (HERE / "node_modules" / "oidc-provider" / "package.json").exists():
            subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"], cwd=HERE, check=True, timeout=600
            )


class OidcProvider:
    """``async with OidcProvider(clients=[...]) as op``: the server's endpoints as attributes."""

    def __init__(
        self, clients: list[Mapping[str, Any]], *, rotate: bool = True, **extra: Any
    ) -> None:
        self.config = {"clients": list(clients), "rotate": rotate, **extra}
        self.process: asyncio.subprocess.Process | None = None
        self.base_url = ""

    async def __aenter__(self) -> OidcProvider:
        ensure_installed()
        self.process = await asyncio.create_subprocess_exec(
            "node",
            str(HERE / "server.mjs"),
            json.dumps(self.config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        self.base_url = f"http://127.0.0.1:{int(line)}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            with contextlib.suppress(ProcessLookupError, TimeoutError):
                await asyncio.wait_for(self.process.wait(), 10)

    @property
    def host(self) -> str:
        return self.base_url.removeprefix("http://")

    @property
    def authorize_url(self) -> str:
        return f"{self.base_url}/auth"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def device_url(self) -> str:
        return f"{self.base_url}/device/auth"

    @property
    def userinfo_url(self) -> str:
        return f"{self.base_url}/me"

    @property
    def revoke_url(self) -> str:
        return f"{self.base_url}/token/revocation"


_FORM = re.compile(r"<form\b([^>]*)>(.*?)</form>", re.S | re.I)
_INPUT = re.compile(r"<input\b([^>]*)/?>", re.I)
_ATTR = re.compile(r'(\w+)="([^"]*)"')


def _forms(page: str) -> list[tuple[dict[str, str], dict[str, str]]]:
    forms = []
    for attrs, body in _FORM.findall(page):
        form = {k.lower(): html.unescape(v) for k, v in _ATTR.findall(attrs)}
        fields: dict[str, str] = {}
        for raw in _INPUT.findall(body):
            a = {k.lower(): html.unescape(v) for k, v in _ATTR.findall(raw)}
            if "name" in a:
                fields[a["name"]] = a.get("value", "")
        forms.append((form, fields))
    return forms


async def approve_device(url: str, *, login: str = "alice", deny: bool = False) -> str:
    """Open ``url`` (a ``verification_uri_complete``) as a user would, sign in as ``login`` and
    confirm (or abort, with ``deny``) through the provider's own pages; the last page's text."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        async with session.get(url) as response:
            page = await response.text()
        for _ in range(10):
            forms = _forms(page)
            if not forms:
                return page
            form, fields = forms[0]
            if "login" in fields:
                fields.update(login=login, password="any")
            aborting = "confirm" in fields and deny
            if aborting:
                fields["abort"] = "yes"
            action = form.get("action") or url
            async with session.post(action, data=fields) as response:
                page = await response.text()
            if aborting:
                # The provider forgets the code's approval and offers a code form again.
                return page
        raise AssertionError("the provider's pages did not end")


def device_client(client_id: str = "device-app", **extra: Any) -> dict[str, Any]:
    """A public client allowed the device grant and refresh tokens."""
    return {
        "client_id": client_id,
        "token_endpoint_auth_method": "none",
        "grant_types": [DEVICE_GRANT, "refresh_token"],
        "response_types": [],
        "redirect_uris": [],
        **extra,
    }


async def approve_code(url: str, redirect_uri: str, *, login: str = "alice") -> dict[str, str]:
    """Open the authorization ``url`` as a user would, sign in as ``login`` and consent through
    the provider's own pages; the query of the redirect back to ``redirect_uri`` (``code``,
    ``state``)."""
    from urllib.parse import parse_qsl, urljoin, urlsplit

    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        method, target, data = "GET", url, None
        for _ in range(20):
            async with session.request(
                method, target, data=data, allow_redirects=False
            ) as response:
                location = response.headers.get("Location")
                page = await response.text()
            if location is not None:
                target = urljoin(target, location)
                if target.startswith(redirect_uri):
                    return dict(parse_qsl(urlsplit(target).query))
                method, data = "GET", None
                continue
            forms = _forms(page)
            if not forms:
                raise AssertionError(f"the provider's page has no form: {page[:200]}")
            form, fields = forms[0]
            if "login" in fields:
                fields.update(login=login, password="any")
            method, target, data = "POST", urljoin(target, form.get("action") or target), fields
        raise AssertionError("the provider's pages did not end")
