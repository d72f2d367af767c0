"""The built-in providers whose client proves itself with private_key_jwt (RFC 7523 §2.2),
their ``https://{tenant}`` URLs pointed at a real OpenID provider (oidc-provider) serving the
vendor's paths on loopback: the provider verifies each assertion and refuses a replayed one."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import RSAKey

from integrations import Integrations, Provider
from integrations._catalogue import builtin
from integrations._token_endpoint import TokenEndpoint

from .conftest import TEST_KEY
from .modekit import storm
from .oidckit import OidcProvider, approve_code

pytestmark = pytest.mark.slow  # a Node.js server

REDIRECT_URI = "http://127.0.0.1:9/callback"
_TENANT = re.compile(r"^https://\{\w+\}")


def at_loopback(key: str, base_url: str, **extra: Any) -> Provider:
    """The built-in ``key`` with the ``https://{tenant field}`` of each of its URLs replaced by
    ``base_url`` (an application provider overriding it, so the registry takes it)."""
    data = builtin(key).model_dump(mode="json")
    for name in ("authorize_url", "token_url", "userinfo_url", "revoke_url"):
        if data.get(name):
            data[name] = _TENANT.sub(base_url, data[name])
    if data.get("validation"):
        data["validation"]["url"] = _TENANT.sub(base_url, data["validation"]["url"])
    data.update(api_hosts=["127.0.0.1"], override=True, **extra)
    return Provider.model_validate(data)


def signing_client(client_id: str, **extra: Any) -> tuple[dict[str, Any], str]:
    """A client registered with its public key for private_key_jwt, and its private key PEM."""
    key = RSAKey.generate_key(2048, private=True)
    public = key.as_dict(private=False) | {"kid": f"{client_id}-key", "alg": "RS256", "use": "sig"}
    client = {
        "client_id": client_id,
        "token_endpoint_auth_method": "private_key_jwt",
        "token_endpoint_auth_signing_alg": "RS256",
        "jwks": {"keys": [public]},
        **extra,
    }
    return client, key.as_pem(private=True).decode()


async def granted(base_url: str) -> dict[str, int]:
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/__stats") as got:
        stats: dict[str, dict[str, int]] = await got.json()
    return stats["granted"]


def assert_masked(pem: str, *texts: str) -> None:
    body = "".join(pem.splitlines()[1:-1])
    for text in texts:
        assert "PRIVATE KEY" not in text and body[:40] not in text


async def test_okta_service_app_gets_tokens_with_private_key_jwt(
    fresh_db: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    client, pem = signing_client(
        "0oa-service", grant_types=["client_credentials"], response_types=[], redirect_uris=[]
    )
    routes = {"token": "/oauth2/v1/token"}
    async with OidcProvider([client], routes=routes, api="/api/v1/") as op:
        okta = at_loopback("okta-service-app", op.base_url, scopes=["openid"])
        assert okta.token_url == f"{op.base_url}/oauth2/v1/token"
        async with Integrations(fresh_db, keys=TEST_KEY, providers=[okta]) as integ:
            conn = await integ.add_connection("okta-service-app", "main")
            async with integ.subscribe(uuid=conn.uuid) as events:
                saved = await integ.save_setup(
                    conn.uuid,
                    {
                        "client_id": "0oa-service",
                        "client_private_key": pem,
                        "client_key_id": "0oa-service-key",
                        "okta_domain": "dev-123456.okta.com",
                    },
                )
                event = await asyncio.wait_for(anext(events), 5)
            assert saved["status"] == "connected"
            # The check: a token obtained with a signed assertion, then the API's answer.
            checked = await integ.validate_connection(conn.uuid)
            assert checked.ok, checked.message
            assert (await granted(op.base_url)) == {"client_credentials": 1}
            users = await integ.authenticated_request(
                conn.uuid, "GET", f"{op.base_url}/api/v1/users?limit=1"
            )
            assert users.status == 200 and users.json()["client_id"] == "0oa-service"
            # A new token is a new assertion: the provider refuses a replayed jti.
            await integ.refresh_access_token(conn.uuid)
            await integ.refresh_access_token(conn.uuid)
            assert (await granted(op.base_url)) == {"client_credentials": 3}
            (listed,) = await integ.list_connections("okta-service-app")
            assert listed.data["client_private_key"].startswith("••")
            assert_masked(pem, json.dumps(saved), json.dumps(listed.data, default=str))
            assert_masked(pem, repr(event), repr(listed), repr(conn))
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert_masked(pem, text)


async def test_okta_service_app_renewal_storm_makes_one_token_request(fresh_db: str) -> None:
    client, pem = signing_client(
        "0oa-service", grant_types=["client_credentials"], response_types=[], redirect_uris=[]
    )
    routes = {"token": "/oauth2/v1/token"}
    async with OidcProvider([client], routes=routes, api="/api/v1/") as op:
        okta = at_loopback("okta-service-app", op.base_url, scopes=["openid"], validation=None)
        async with Integrations(fresh_db, keys=TEST_KEY, providers=[okta]) as integ:
            conn = await integ.add_connection("okta-service-app", "main")
            await integ.save_setup(
                conn.uuid,
                {
                    "client_id": "0oa-service",
                    "client_private_key": pem,
                    "okta_domain": "dev-123456.okta.com",
                },
            )
        # No token is stored yet (no check ran): every caller of the storm wants one.
        assert await granted(op.base_url) == {}
        url = f"{op.base_url}/api/v1/users?limit=1"
        results = await storm(fresh_db, okta, conn.uuid, url)
        assert len(results) == 100 and {r["status"] for r in results} == {200}
        assert len({r["token_id"] for r in results}) == 1
        assert (await granted(op.base_url)) == {"client_credentials": 1}


def test_auth0s_assertion_is_for_the_tenant_url() -> None:
    """Auth0 wants the tenant's URL, with its trailing slash, as the assertion's audience."""
    pem_key = RSAKey.generate_key(2048, private=True)
    pem = pem_key.as_pem(private=True).decode()
    auth0 = builtin("auth0-private-key-jwt")
    assert auth0.token_auth == "private_key_jwt"
    plain = {"client_id": "app-1", "client_private_key": pem, "domain": "acme.us.auth0.com"}
    url, _headers, body = TokenEndpoint(auth0).request("refresh_token", plain, refresh_token="r-1")
    assert url == "https://acme.us.auth0.com/oauth/token"
    form = dict(pair.split("=", 1) for pair in body.split("&"))
    assert "client_secret" not in form
    public = serialization.load_pem_public_key(pem_key.as_pem(private=False))
    claims = pyjwt.decode(
        form["client_assertion"],
        public,  # type: ignore[arg-type]
        algorithms=["RS256"],
        audience="https://acme.us.auth0.com/",
    )
    assert claims["iss"] == claims["sub"] == "app-1" and claims["exp"] - claims["iat"] <= 300


async def test_auth0_private_key_jwt_authorizes_and_refreshes(fresh_db: str) -> None:
    client, pem = signing_client(
        "auth0-app",
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        redirect_uris=[REDIRECT_URI],
    )
    routes = {
        "authorization": "/authorize",
        "token": "/oauth/token",
        "userinfo": "/userinfo",
        "revocation": "/oauth/revoke",
    }
    async with OidcProvider([client], routes=routes) as op:
        # The tenant's URL is the provider's issuer identifier here.
        auth0 = at_loopback("auth0-private-key-jwt", op.base_url)
        auth0 = auth0.model_copy(update={"client_assertion_audience": op.base_url})
        async with Integrations(fresh_db, keys=TEST_KEY, providers=[auth0]) as integ:
            conn = await integ.add_connection("auth0-private-key-jwt", "main")
            await integ.save_setup(
                conn.uuid,
                {"client_id": "auth0-app", "client_private_key": pem, "domain": "acme.auth0.com"},
            )
            url, state = await integ.begin_authorization(conn.uuid, REDIRECT_URI)
            back = await approve_code(url, REDIRECT_URI, login="ada")
            assert back["state"] == state
            connected = await integ.complete_authorization(state, code=back["code"])
            assert connected.data["status"] == "connected"
            assert connected.data["account"]["email"] == "ada@example.test"
            await integ.refresh_access_token(conn.uuid)
            assert (await granted(op.base_url)) == {"authorization_code": 1, "refresh_token": 1}
            (listed,) = await integ.list_connections("auth0-private-key-jwt")
            assert listed.data["client_private_key"].startswith("••")
            assert_masked(pem, json.dumps(listed.data, default=str), repr(connected))
