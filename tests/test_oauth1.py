"""OAuth 1.0a: the three-legged flow and signed calls against oauthlib's provider endpoints."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from oauthlib.oauth1 import (
    AccessTokenEndpoint,
    AuthorizationEndpoint,
    RequestTokenEndpoint,
    RequestValidator,
    ResourceEndpoint,
)

from integrations import (
    Integrations,
    InvalidProviderKey,
    InvalidState,
    NotConfigured,
    NotConnected,
    Provider,
    TokenRequestFailed,
)
from integrations._authflow import callback_parameters
from integrations._catalogue import builtin

from .conftest import TEST_KEY

CONSUMER_KEY = "consumerKey0123456789abc"
CONSUMER_SECRET = "S3CR3T-consumer-marker-oauth1"
CALLBACK = "https://app.example/oauth/callback"


def _token() -> str:
    return secrets.token_hex(12)


class Validator(RequestValidator):
    """A provider's bookkeeping, in memory: one consumer, its request and access tokens."""

    enforce_ssl = False  # loopback http
    dummy_client = "dummyClientKey0123456789"
    dummy_request_token = "dummyRequestToken0123456"
    dummy_access_token = "dummyAccessToken01234567"

    def __init__(self, rsa_public_key: str | None = None) -> None:
        super().__init__()
        self.rsa_public_key = rsa_public_key
        self.request_tokens: dict[str, dict[str, Any]] = {}
        self.verifiers: dict[str, str] = {}
        self.access_tokens: dict[str, str] = {}
        self.nonces: set[tuple[str, str]] = set()

    @property
    def allowed_signature_methods(self) -> tuple[str, ...]:
        return ("RSA-SHA1",) if self.rsa_public_key else ("HMAC-SHA1",)

    def get_client_secret(self, client_key: str, request: Any) -> str:
        return CONSUMER_SECRET

    def get_rsa_key(self, client_key: str, request: Any) -> str:
        assert self.rsa_public_key is not None
        return self.rsa_public_key

    def validate_client_key(self, client_key: str, request: Any) -> bool:
        return client_key == CONSUMER_KEY

    def validate_timestamp_and_nonce(
        self,
        client_key: str,
        timestamp: str,
        nonce: str,
        request: Any,
        request_token: str | None = None,
        access_token: str | None = None,
    ) -> bool:
        if (timestamp, nonce) in self.nonces:
            return False
        self.nonces.add((timestamp, nonce))
        return True

    def validate_redirect_uri(self, client_key: str, redirect_uri: str, request: Any) -> bool:
        # The app's callback, or connect_interactive's temporary one on loopback.
        return redirect_uri == CALLBACK or redirect_uri.startswith("http://127.0.0.1:")

    def validate_requested_realms(self, client_key: str, realms: Any, request: Any) -> bool:
        return True

    def get_default_realms(self, client_key: str, request: Any) -> list[str]:
        return []

    def save_request_token(self, token: dict[str, Any], request: Any) -> None:
        self.request_tokens[token["oauth_token"]] = {
            "secret": token["oauth_token_secret"],
            "callback": request.redirect_uri,
        }

    def verify_request_token(self, token: str, request: Any) -> bool:
        return token in self.request_tokens

    def get_realms(self, token: str, request: Any) -> list[str]:
        return []

    def get_redirect_uri(self, token: str, request: Any) -> str:
        return str(self.request_tokens[token]["callback"])

    def save_verifier(self, token: str, verifier: dict[str, str], request: Any) -> None:
        self.verifiers[token] = verifier["oauth_verifier"]

    def validate_request_token(self, client_key: str, token: str, request: Any) -> bool:
        return token in self.request_tokens

    def get_request_token_secret(self, client_key: str, token: str, request: Any) -> str:
        found = self.request_tokens.get(token)
        return str(found["secret"]) if found else "dummy"

    def validate_verifier(self, client_key: str, token: str, verifier: str, request: Any) -> bool:
        return self.verifiers.get(token) == verifier

    def invalidate_request_token(self, client_key: str, request_token: str, request: Any) -> None:
        self.request_tokens.pop(request_token, None)
        self.verifiers.pop(request_token, None)

    def save_access_token(self, token: dict[str, Any], request: Any) -> None:
        self.access_tokens[token["oauth_token"]] = token["oauth_token_secret"]

    def validate_access_token(self, client_key: str, token: str, request: Any) -> bool:
        return token in self.access_tokens

    def get_access_token_secret(self, client_key: str, token: str, request: Any) -> str:
        return self.access_tokens.get(token, "dummy")

    def validate_realms(
        self,
        client_key: str,
        token: str,
        request: Any,
        uri: str | None = None,
        realms: Any = None,
    ) -> bool:
        return True


class OAuth1Server:
    """oauthlib's four endpoints behind aiohttp routes; what the API saw is kept."""

    def __init__(self, validator: Validator) -> None:
        self.validator = validator
        self.request_token = RequestTokenEndpoint(validator)
        self.authorization = AuthorizationEndpoint(validator)
        self.access_token = AccessTokenEndpoint(validator)
        self.resource = ResourceEndpoint(validator)
        self.seen: list[dict[str, Any]] = []

    @staticmethod
    async def _parts(request: web.Request) -> tuple[str, str, str, dict[str, str]]:
        body = (await request.read()).decode()
        return str(request.url), request.method, body, dict(request.headers)

    @staticmethod
    def _answer(headers: dict[str, str], body: str | None, status: int) -> web.Response:
        return web.Response(status=status, body=body or "", headers=headers)

    async def temporary(self, request: web.Request) -> web.Response:
        uri, method, body, headers = await self._parts(request)
        return self._answer(
            *self.request_token.create_request_token_response(uri, method, body, headers)
        )

    async def authorize(self, request: web.Request) -> web.Response:
        # The user approves on the provider's page: the redirect carries the verifier.
        headers, body, status = self.authorization.create_authorization_response(
            str(request.url), "GET", credentials={"user": "ada"}
        )
        return self._answer(headers, body, status)

    async def token(self, request: web.Request) -> web.Response:
        uri, method, body, headers = await self._parts(request)
        return self._answer(
            *self.access_token.create_access_token_response(uri, method, body, headers)
        )

    async def api(self, request: web.Request) -> web.Response:
        uri, method, body, headers = await self._parts(request)
        valid, checked = self.resource.validate_protected_resource_request(
            uri, method, body, headers
        )
        self.seen.append(
            {"valid": valid, "method": method, "body": body, "query": request.query_string}
        )
        if not valid:
            return web.json_response({"error": "invalid signature"}, status=401)
        return web.json_response({"ok": True, "token": checked.resource_owner_key})


async def _serve(validator: Validator) -> AsyncIterator[tuple[OAuth1Server, str]]:
    server = OAuth1Server(validator)
    app = web.Application()
    app.router.add_post("/oauth/request_token", server.temporary)
    app.router.add_get("/oauth/authorize", server.authorize)
    app.router.add_post("/oauth/access_token", server.token)
    app.router.add_route("*", "/api/{tail:.*}", server.api)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    try:
        yield server, f"http://127.0.0.1:{test_server.port}"
    finally:
        await test_server.close()


@pytest.fixture
async def hmac_api() -> AsyncIterator[tuple[OAuth1Server, str]]:
    async for served in _serve(Validator()):
        yield served


def _provider(base: str, key: str = "tweets") -> Provider:
    return Provider(
        key=key,
        name="Tweets",
        auth_type="oauth1",
        request_token_url=f"{base}/oauth/request_token",
        authorize_url=f"{base}/oauth/authorize",
        token_url=f"{base}/oauth/access_token",
        api_hosts=("127.0.0.1",),
        validation={"url": f"{base}/api/me"},
    )


async def _authorize(
    integ: Integrations, uuid: str, base: str, server: OAuth1Server
) -> tuple[str, str]:
    url, state = await integ.begin_authorization(uuid, CALLBACK)
    assert url.startswith(f"{base}/oauth/authorize?oauth_token=")
    assert state in server.validator.request_tokens
    # The user's browser: the provider's page redirects back with the verifier.
    async with (
        aiohttp.ClientSession() as browser,
        browser.get(url, allow_redirects=False) as page,
    ):
        location = page.headers["Location"]
    query = parse_qs(urlsplit(location).query)
    assert location.startswith(CALLBACK) and query["oauth_token"] == [state]
    return state, query["oauth_verifier"][0]


async def test_three_legged_flow_then_signed_calls(
    fresh_db: str,
    hmac_api: tuple[OAuth1Server, str],
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server, base = hmac_api
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[_provider(base)]) as integ:
        conn = await integ.add_connection("tweets", "main")
        # Not connected yet: a call is refused before anything is sent.
        await integ.save_setup(
            conn.uuid, {"consumer_key": CONSUMER_KEY, "consumer_secret": CONSUMER_SECRET}
        )
        with pytest.raises(NotConnected):
            await integ.authenticated_request(conn.uuid, "GET", f"{base}/api/me")
        assert server.seen == []

        state, verifier = await _authorize(integ, conn.uuid, base, server)
        connected = await integ.complete_authorization(state, code=verifier)
        assert connected.status == "connected"
        # The temporary credentials are spent, and so is the state.
        assert server.validator.request_tokens == {}
        with pytest.raises(InvalidState):
            await integ.complete_authorization(state, code=verifier)

        ((token, token_secret),) = server.validator.access_tokens.items()
        creds = await integ.get_credentials(conn.uuid)
        assert creds["access_token"] == token and creds["token_secret"] == token_secret

        # GET with a query: the query parameters are in the signature base string.
        got = await integ.authenticated_request(
            conn.uuid, "GET", f"{base}/api/statuses", params={"q": "a b", "n": "2"}
        )
        assert got.status == 200, got.text
        assert got.json() == {"ok": True, "token": token}
        # POST with a form body: its parameters are signed too, so a changed body fails.
        posted = await integ.authenticated_request(
            conn.uuid, "POST", f"{base}/api/update", data={"status": "hello world", "x": "1"}
        )
        assert posted.status == 200, posted.text
        assert server.seen[-1]["body"] == "status=hello+world&x=1"
        # A JSON body is not form encoding: signed without it.
        as_json = await integ.authenticated_request(
            conn.uuid, "POST", f"{base}/api/things?a=1", json={"n": 1}
        )
        assert as_json.status == 200, as_json.text
        assert [seen["valid"] for seen in server.seen] == [True, True, True]

        # The credential check signs the provider's validation request.
        check = await integ.validate_connection(conn.uuid)
        assert check.ok, check

        # Secrets are sealed at rest and masked in listings, logs and events.
        raw = await db.fetchval(
            "SELECT value_json::text FROM integrations.connections WHERE uuid = $1", conn.uuid
        )
        listed = await integ.list_connections("tweets")
        events = await db.fetch("SELECT body::text AS t FROM integrations.events")
        shown = [raw, json.dumps([c.data for c in listed], default=str), repr(listed)]
        shown += [e["t"] for e in events] + [r.getMessage() for r in caplog.records]
        shown += [json.dumps(r.__dict__, default=str) for r in caplog.records]
        for secret in (CONSUMER_SECRET, token, token_secret, verifier):
            assert not any(secret in text for text in shown), secret

        # A disconnect drops the token and its secret, keeps the consumer's credentials.
        await integ.disconnect(conn.uuid)
        after = await integ.get_credentials(conn.uuid)
        assert "access_token" not in after and "token_secret" not in after
        assert after["consumer_secret"] == CONSUMER_SECRET


async def test_refusals_change_nothing(fresh_db: str, hmac_api: tuple[OAuth1Server, str]) -> None:
    server, base = hmac_api
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[_provider(base)]) as integ:
        conn = await integ.add_connection("tweets", "main")
        with pytest.raises(NotConfigured):
            await integ.begin_authorization(conn.uuid, CALLBACK)
        await integ.save_setup(
            conn.uuid, {"consumer_key": CONSUMER_KEY, "consumer_secret": "wrong-secret"}
        )
        # The provider refuses the temporary credentials request: a typed error, no state.
        with pytest.raises(TokenRequestFailed) as info:
            await integ.begin_authorization(conn.uuid, CALLBACK)
        assert "wrong-secret" not in str(info.value)
        assert server.validator.request_tokens == {}

        await integ.save_setup(conn.uuid, {"consumer_secret": CONSUMER_SECRET})
        state, _ = await _authorize(integ, conn.uuid, base, server)
        # A wrong verifier: the exchange is refused and the state is spent.
        with pytest.raises(TokenRequestFailed):
            await integ.complete_authorization(state, code="not-the-verifier-0123456")
        assert not (await integ.get_integration_by_uuid(conn.uuid)).data.get("access_token")
        # The seed's exchange_code has no temporary token to sign with: refused, clearly.
        with pytest.raises(InvalidProviderKey, match="complete_authorization"):
            await integ.exchange_code(conn.uuid, "verifier", CALLBACK)
        with pytest.raises(InvalidState):
            await integ.complete_authorization(state, code="x")


async def test_rsa_sha1_signatures(fresh_db: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    async for server, base in _serve(Validator(rsa_public_key=public_pem)):
        async with Integrations(fresh_db, keys=TEST_KEY, providers=[_provider(base)]) as integ:
            conn = await integ.add_connection("tweets", "main")
            # The PEM keeps its line breaks (a "text" field), and is a secret.
            await integ.save_setup(
                conn.uuid, {"consumer_key": CONSUMER_KEY, "private_key": private_pem}
            )
            (listed,) = await integ.list_connections("tweets")
            assert "PRIVATE KEY" not in json.dumps(listed.data, default=str)
            state, verifier = await _authorize(integ, conn.uuid, base, server)
            await integ.complete_authorization(state, code=verifier)
            posted = await integ.authenticated_request(
                conn.uuid, "POST", f"{base}/api/update?v=1", data={"status": "signed"}
            )
            assert posted.status == 200, posted.text
            assert server.seen[-1]["valid"] is True


async def test_connect_interactive_takes_the_oauth1_callback(
    fresh_db: str, hmac_api: tuple[OAuth1Server, str], capsys: pytest.CaptureFixture[str]
) -> None:
    server, base = hmac_api
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[_provider(base)]) as integ:
        conn = await integ.add_connection("tweets", "main")
        await integ.save_setup(
            conn.uuid, {"consumer_key": CONSUMER_KEY, "consumer_secret": CONSUMER_SECRET}
        )
        task = asyncio.create_task(integ.connect_interactive(conn.uuid, timeout=30))
        printed = ""
        for _ in range(500):
            printed += capsys.readouterr().out
            if match := re.search(r"(http://\S+/oauth/authorize\?\S+)", printed):
                break
            await asyncio.sleep(0.02)
        assert match, printed
        # The provider's page sends the browser to the loopback callback with
        # oauth_token and oauth_verifier.
        async with aiohttp.ClientSession() as browser, browser.get(match.group(1)) as page:
            assert page.status == 200 and "Connected" in await page.text()
        assert (await task).status == "connected"
        got = await integ.authenticated_request(conn.uuid, "GET", f"{base}/api/me")
        assert got.status == 200 and got.json()["token"] in server.validator.access_tokens


def test_callback_parameters_of_both_protocols() -> None:
    assert callback_parameters({"state": "s", "code": "c"}) == {
        "state": "s",
        "code": "c",
        "error": None,
        "error_description": None,
    }
    assert callback_parameters({"oauth_token": "t", "oauth_verifier": "v"})["code"] == "v"
    refused = callback_parameters({"denied": "t"})
    assert refused["state"] == "t" and refused["error"] == "access_denied"
    assert callback_parameters({})["state"] is None


def test_the_builtin_x_provider() -> None:
    x = builtin("x-oauth1")
    assert x is not None and x.auth_type == "oauth1"
    assert x.request_token_url == "https://api.x.com/oauth/request_token"
    assert x.authorize_url == "https://api.x.com/oauth/authorize"
    assert x.token_url == "https://api.x.com/oauth/access_token"
    assert x.secret_keys >= {"consumer_secret", "private_key", "access_token", "token_secret"}


def test_an_oauth1_provider_with_a_redirect_needs_its_request_token_url() -> None:
    with pytest.raises(ValueError, match="request_token_url"):
        Provider(
            key="half",
            name="Half",
            auth_type="oauth1",
            authorize_url="https://half.example/authorize",
            token_url="https://half.example/token",
        )
