"""Loopback peers for the auth modes: a token endpoint that verifies RFC 7523 assertions with
PyJWT (a JOSE library that is not ours), an API that takes its tokens, and storm workers."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt as pyjwt
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from integrations import Provider

from .conftest import TEST_KEY

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CHILD = Path(__file__).resolve().parent / "mode_child.py"


def rsa_pem() -> tuple[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return pem, key.public_key()


def ec_key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


class AssertionServer:
    """``POST /token`` takes a JWT bearer assertion signed by the registered account's key,
    verified with PyJWT: ``iss``, ``aud`` (this endpoint), ``exp``, ``iat``, a ``jti`` never
    seen before. ``GET /api/resource`` answers 200 with the token's number to a live token."""

    def __init__(self, public_keys: dict[str, Any]) -> None:
        self.public_keys = public_keys  # issuer -> public key
        self.base_url = ""
        self.token_requests: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.jtis: set[str] = set()
        self.live: dict[str, int] = {}
        self.delay = 0.0

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != JWT_BEARER:
            return self._refuse("unsupported_grant_type")
        if "client_secret" in form or "Authorization" in request.headers:
            return self._refuse("invalid_request")
        raw = str(form.get("assertion", ""))
        try:
            unverified = pyjwt.decode(raw, options={"verify_signature": False})
            key = self.public_keys[unverified["iss"]]
            claims = pyjwt.decode(
                raw,
                key,
                algorithms=["RS256", "ES256"],
                audience=self.token_url,
                options={"require": ["iss", "sub", "aud", "exp", "iat", "jti"]},
            )
        except (pyjwt.PyJWTError, KeyError) as exc:
            return self._refuse(f"invalid_grant: {exc}")
        if claims["jti"] in self.jtis:
            return self._refuse("invalid_grant: jti replayed")
        if claims["exp"] - claims["iat"] > 3600:
            return self._refuse("invalid_grant: assertion lives too long")
        self.jtis.add(claims["jti"])
        if self.delay:
            await asyncio.sleep(self.delay)
        number = len(self.token_requests) + 1
        header = pyjwt.get_unverified_header(raw)
        self.token_requests.append({"claims": claims, "header": header})
        token = f"sa-token-{number}"
        self.live[token] = number
        return web.json_response(
            {"access_token": token, "expires_in": 3600, "token_type": "Bearer"}
        )

    def _refuse(self, why: str) -> web.Response:
        self.refused.append(why)
        return web.json_response({"error": why.split(":")[0]}, status=400)

    async def resource(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.live:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"token_id": self.live[token]})


@asynccontextmanager
async def assertion_server(public_keys: dict[str, Any]) -> AsyncIterator[AssertionServer]:
    server = AssertionServer(public_keys)
    app = web.Application()
    app.router.add_post("/token", server.token)
    app.router.add_get("/api/resource", server.resource)
    runner = TestServer(app, host="127.0.0.1")
    await runner.start_server()
    server.base_url = f"http://127.0.0.1:{runner.port}"
    try:
        yield server
    finally:
        await runner.close()


def key_file(email: str, pem: str, token_uri: str, key_id: str = "key-1") -> str:
    """A service-account key file shaped as Google issues it."""
    return json.dumps(
        {
            "type": "service_account",
            "project_id": "demo",
            "private_key_id": key_id,
            "private_key": pem,
            "client_email": email,
            "client_id": "1234567890",
            "token_uri": token_uri,
        }
    )


async def storm(
    dsn: str, provider: Provider, uuid: str, url: str, *, workers: int = 4, callers: int = 25
) -> list[dict[str, Any]]:
    """``workers`` processes, each with its own Integrations, released together to make
    ``callers`` concurrent ``authenticated_request`` calls each; every call's outcome."""
    procs = []
    for _ in range(workers):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(CHILD),
            dsn,
            TEST_KEY,
            provider.model_dump_json(),
            uuid,
            url,
            str(callers),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.strip() == b"ready", line
        procs.append(proc)
    started = time.monotonic()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
    outcomes = []
    for proc in procs:
        assert proc.stdout is not None
        outcomes.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 120)))
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    del started
    return [r for outcome in outcomes for r in outcome]
