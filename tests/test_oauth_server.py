"""The loopback authorization server, driven with plain aiohttp calls and ``integrations.oauth``."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import pytest

from integrations import oauth
from integrations._errors import ReauthRequired, TokenRequestFailed
from tests.oauth_server import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_USER,
    OAuthTestServer,
    ServerConfig,
    ServerProcess,
    token_id,
)

REDIRECT_URI = "http://127.0.0.1:9/callback"
SCOPES = ("read", "write")


@pytest.fixture
async def server() -> AsyncIterator[OAuthTestServer]:
    async with OAuthTestServer() as srv:
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Endpoints:
    """URLs of either an in-process server or a server process."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.authorize_url = f"{base_url}/authorize"
        self.token_url = f"{base_url}/token"
        self.revoke_url = f"{base_url}/revoke"
        self.userinfo_url = f"{base_url}/userinfo"
        self.api_url = f"{base_url}/api/resource"


async def authorize(
    http: aiohttp.ClientSession,
    server: OAuthTestServer | Endpoints,
    *,
    verifier: str | None,
    state: str | None = "state-1",
    scopes: tuple[str, ...] = SCOPES,
) -> dict[str, str]:
    url = oauth.authorization_url(
        server.authorize_url,
        client_id=DEFAULT_CLIENT_ID,
        redirect_uri=REDIRECT_URI,
        scopes=scopes,
        state=state,
        code_challenge=oauth.code_challenge(verifier) if verifier else None,
    )
    return await follow(http, url)


async def follow(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    async with http.get(url, allow_redirects=False) as resp:
        assert resp.status == 302, await resp.text()
        location = resp.headers["Location"]
    assert location.startswith(REDIRECT_URI + "?")
    return dict(parse_qsl(urlsplit(location).query))


async def post_token(
    http: aiohttp.ClientSession,
    server: OAuthTestServer | Endpoints,
    grant_type: oauth.GrantType,
    *,
    auth_method: oauth.AuthMethod = "client_secret_post",
    client_secret: str = DEFAULT_CLIENT_SECRET,
    **params: Any,
) -> tuple[int, bytes]:
    url, headers, body = oauth.token_request(
        grant_type,
        token_url=server.token_url,
        client_id=DEFAULT_CLIENT_ID,
        client_secret=client_secret,
        auth_method=auth_method,
        **params,
    )
    async with http.post(url, headers=headers, data=body) as resp:
        return resp.status, await resp.read()


async def fetch_tokens(
    http: aiohttp.ClientSession,
    server: OAuthTestServer | Endpoints,
    grant_type: oauth.GrantType,
    *,
    previous_refresh_token: str | None = None,
    **params: Any,
) -> oauth.TokenSet:
    status, body = await post_token(http, server, grant_type, **params)
    return oauth.parse_token_response(
        status,
        body,
        now=datetime.now(UTC),
        requested_scopes=SCOPES,
        previous_refresh_token=previous_refresh_token,
    )


async def connect(
    http: aiohttp.ClientSession,
    server: OAuthTestServer | Endpoints,
    **token_params: Any,
) -> oauth.TokenSet:
    verifier = oauth.generate_code_verifier()
    callback = await authorize(http, server, verifier=verifier)
    return await fetch_tokens(
        http,
        server,
        "authorization_code",
        code=callback["code"],
        redirect_uri=REDIRECT_URI,
        code_verifier=verifier,
        **token_params,
    )


async def refresh(
    http: aiohttp.ClientSession, server: OAuthTestServer | Endpoints, refresh_token: str
) -> oauth.TokenSet:
    return await fetch_tokens(
        http,
        server,
        "refresh_token",
        refresh_token=refresh_token,
        previous_refresh_token=refresh_token,
    )


async def call_api(
    http: aiohttp.ClientSession, server: OAuthTestServer | Endpoints, access_token: str
) -> tuple[int, Mapping[str, Any], Mapping[str, str]]:
    headers = {"Authorization": f"Bearer {access_token}"}
    async with http.get(server.api_url, headers=headers) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def revoke(
    http: aiohttp.ClientSession, server: OAuthTestServer, token: str, hint: str | None
) -> int:
    url, headers, body = oauth.revoke_request(
        server.revoke_url,
        token=token,
        token_type_hint=hint,  # type: ignore[arg-type]
        client_id=DEFAULT_CLIENT_ID,
        client_secret=DEFAULT_CLIENT_SECRET,
        auth_method="client_secret_basic",
    )
    async with http.post(url, headers=headers, data=body) as resp:
        return resp.status


# --- the full flow --------------------------------------------------------------------


@pytest.mark.parametrize("auth_method", ["client_secret_post", "client_secret_basic"])
async def test_full_flow_with_rotation_and_reuse_revoking_the_grant(
    server: OAuthTestServer, http: aiohttp.ClientSession, auth_method: oauth.AuthMethod
) -> None:
    state = oauth.generate_state()
    verifier = oauth.generate_code_verifier()
    callback = await authorize(http, server, verifier=verifier, state=state)
    assert callback["state"] == state
    assert callback["code"]

    before = datetime.now(UTC)
    first = await fetch_tokens(
        http,
        server,
        "authorization_code",
        auth_method=auth_method,
        code=callback["code"],
        redirect_uri=REDIRECT_URI,
        code_verifier=verifier,
    )
    assert first.refresh_token
    assert first.token_type == "Bearer"
    assert first.scope == SCOPES
    assert first.expires_at is not None
    assert before + timedelta(seconds=3590) < first.expires_at < before + timedelta(seconds=3610)

    status, payload, _ = await call_api(http, server, first.access_token)
    assert status == 200
    assert payload["token_id"] == token_id(first.access_token)
    assert payload["sub"] == DEFAULT_USER["sub"]

    async with http.get(
        server.userinfo_url, headers={"Authorization": f"Bearer {first.access_token}"}
    ) as resp:
        assert resp.status == 200
        info = await resp.json()
    assert oauth.map_userinfo(info) == {
        "email": DEFAULT_USER["email"],
        "name": DEFAULT_USER["name"],
        "picture": DEFAULT_USER["picture"],
        "account_id": DEFAULT_USER["sub"],
    }

    second = await refresh(http, server, first.refresh_token)
    assert second.refresh_token and second.refresh_token != first.refresh_token
    assert second.access_token != first.access_token
    assert server.token_status(first.refresh_token) == "spent"
    status, payload, _ = await call_api(http, server, second.access_token)
    assert (status, payload["token_id"]) == (200, token_id(second.access_token))

    # A second client holding the spent token: strict providers kill the grant.
    with pytest.raises(ReauthRequired, match="invalid_grant"):
        await refresh(http, server, first.refresh_token)
    status, payload, headers = await call_api(http, server, second.access_token)
    assert status == 401
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert payload["error"] == "invalid_token"
    with pytest.raises(ReauthRequired):
        await refresh(http, server, second.refresh_token)

    assert server.stats.token_calls == {"authorization_code": 1, "refresh_token": 3}
    assert server.stats.refresh_reuse_detected == 1
    assert server.stats.grants_revoked == 1
    assert server.stats.api_rejected == 1
    assert server.stats.codes_issued == 1


async def test_concurrent_refreshes_with_one_refresh_token_leave_the_grant_dead(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    tokens = await connect(http, server)
    assert tokens.refresh_token
    results = await asyncio.gather(
        *(refresh(http, server, tokens.refresh_token) for _ in range(10)),
        return_exceptions=True,
    )
    winners = [r for r in results if isinstance(r, oauth.TokenSet)]
    assert len(winners) == 1
    assert all(isinstance(r, ReauthRequired) for r in results if r not in winners)
    status, _, _ = await call_api(http, server, winners[0].access_token)
    assert status == 401
    assert server.stats.token_calls["refresh_token"] == 10


# --- authorization endpoint --------------------------------------------------------------


async def test_authorize_without_pkce_redirects_with_invalid_request(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    callback = await authorize(http, server, verifier=None, state="s-9")
    assert callback["error"] == "invalid_request"
    assert "PKCE" in callback["error_description"]
    assert callback["state"] == "s-9"
    assert "code" not in callback


async def test_authorize_refuses_plain_pkce(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    params = {
        "response_type": "code",
        "client_id": DEFAULT_CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "state": "s",
        "code_challenge": "a" * 43,
        "code_challenge_method": "plain",
    }
    callback = await follow(http, f"{server.authorize_url}?{urlencode(params)}")
    assert callback["error"] == "invalid_request"


async def test_authorize_requires_state(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    callback = await authorize(http, server, verifier=oauth.generate_code_verifier(), state=None)
    assert callback["error"] == "invalid_request"
    assert "state" in callback["error_description"]


async def test_authorize_refuses_other_response_types(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    params = {
        "response_type": "token",
        "client_id": DEFAULT_CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "state": "s",
        "code_challenge": oauth.code_challenge(oauth.generate_code_verifier()),
        "code_challenge_method": "S256",
    }
    callback = await follow(http, f"{server.authorize_url}?{urlencode(params)}")
    assert callback["error"] == "unsupported_response_type"


@pytest.mark.parametrize(
    ("client_id", "redirect_uri"),
    [("unknown-client", REDIRECT_URI), (DEFAULT_CLIENT_ID, ""), (DEFAULT_CLIENT_ID, "/relative")],
)
async def test_authorize_with_untrusted_client_or_redirect_does_not_redirect(
    server: OAuthTestServer, http: aiohttp.ClientSession, client_id: str, redirect_uri: str
) -> None:
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri}
    async with http.get(
        f"{server.authorize_url}?{urlencode(params)}", allow_redirects=False
    ) as resp:
        assert resp.status == 400
        assert "Location" not in resp.headers


async def test_deny_mode_redirects_with_access_denied(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    server.config.deny = True
    callback = await authorize(http, server, verifier=oauth.generate_code_verifier(), state="s-d")
    assert callback == {
        "error": "access_denied",
        "error_description": "the user denied the request",
        "state": "s-d",
    }


async def test_authorize_keeps_the_redirect_uri_query(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    url = oauth.authorization_url(
        server.authorize_url,
        client_id=DEFAULT_CLIENT_ID,
        redirect_uri=REDIRECT_URI + "?next=%2Fhome",
        scopes=SCOPES,
        state="s",
        code_challenge=oauth.code_challenge(oauth.generate_code_verifier()),
    )
    callback = await follow(http, url)
    assert callback["next"] == "/home"
    assert callback["code"]


# --- authorization code grant --------------------------------------------------------------


async def test_wrong_code_verifier_is_refused_and_burns_the_code(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    verifier = oauth.generate_code_verifier()
    callback = await authorize(http, server, verifier=verifier)
    with pytest.raises(ReauthRequired, match="code_verifier"):
        await fetch_tokens(
            http,
            server,
            "authorization_code",
            code=callback["code"],
            redirect_uri=REDIRECT_URI,
            code_verifier=oauth.generate_code_verifier(),
        )
    with pytest.raises(ReauthRequired, match="already used"):
        await fetch_tokens(
            http,
            server,
            "authorization_code",
            code=callback["code"],
            redirect_uri=REDIRECT_URI,
            code_verifier=verifier,
        )


async def test_missing_code_verifier_is_refused(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    callback = await authorize(http, server, verifier=oauth.generate_code_verifier())
    status, body = await post_token(
        http, server, "authorization_code", code=callback["code"], redirect_uri=REDIRECT_URI
    )
    assert status == 400
    assert b"invalid_grant" in body


async def test_code_reuse_is_refused_and_revokes_what_the_code_produced(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    verifier = oauth.generate_code_verifier()
    callback = await authorize(http, server, verifier=verifier)
    params = {"code": callback["code"], "redirect_uri": REDIRECT_URI, "code_verifier": verifier}
    tokens = await fetch_tokens(http, server, "authorization_code", **params)
    with pytest.raises(ReauthRequired, match="already used"):
        await fetch_tokens(http, server, "authorization_code", **params)
    status, _, _ = await call_api(http, server, tokens.access_token)
    assert status == 401
    assert tokens.refresh_token is not None
    assert server.token_status(tokens.refresh_token) == "revoked"


async def test_redirect_uri_must_match_the_authorization(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    verifier = oauth.generate_code_verifier()
    callback = await authorize(http, server, verifier=verifier)
    with pytest.raises(ReauthRequired, match="redirect_uri"):
        await fetch_tokens(
            http,
            server,
            "authorization_code",
            code=callback["code"],
            redirect_uri="http://127.0.0.1:9/elsewhere",
            code_verifier=verifier,
        )


async def test_expired_code_is_refused(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    server.config.code_ttl = 0
    with pytest.raises(ReauthRequired, match="expired"):
        await connect(http, server)


async def test_granted_scope_override_is_reported(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    server.config.granted_scope = "read"
    tokens = await connect(http, server)
    assert tokens.scope == ("read",)


# --- client authentication -----------------------------------------------------------------


@pytest.mark.parametrize("auth_method", ["client_secret_post", "client_secret_basic"])
async def test_wrong_client_secret_is_invalid_client(
    server: OAuthTestServer, http: aiohttp.ClientSession, auth_method: oauth.AuthMethod
) -> None:
    status, body = await post_token(
        http, server, "client_credentials", auth_method=auth_method, client_secret="nope"
    )
    assert status == 401
    with pytest.raises(ReauthRequired, match="invalid_client"):
        oauth.parse_token_response(
            status, body, now=datetime.now(UTC), requested_scopes=(), previous_refresh_token=None
        )
    assert server.stats.token_errors["invalid_client"] == 1


async def test_two_client_auth_methods_at_once_are_refused(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    url, headers, body = oauth.token_request(
        "client_credentials",
        token_url=server.token_url,
        client_id=DEFAULT_CLIENT_ID,
        client_secret=DEFAULT_CLIENT_SECRET,
        auth_method="client_secret_basic",
    )
    body += "&" + urlencode({"client_secret": DEFAULT_CLIENT_SECRET})
    async with http.post(url, headers=headers, data=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"


async def test_client_registry_is_overridable(http: aiohttp.ClientSession) -> None:
    async with OAuthTestServer(clients={"acme": "acme-secret"}) as server:
        status, _ = await post_token(http, server, "client_credentials")
        assert status == 401
        url, headers, body = oauth.token_request(
            "client_credentials",
            token_url=server.token_url,
            client_id="acme",
            client_secret="acme-secret",
            auth_method="client_secret_post",
        )
        async with http.post(url, headers=headers, data=body) as resp:
            assert resp.status == 200


async def test_force_invalid_client(server: OAuthTestServer, http: aiohttp.ClientSession) -> None:
    tokens = await connect(http, server)
    assert tokens.refresh_token
    server.config.force_invalid_client = True
    with pytest.raises(ReauthRequired, match="invalid_client"):
        await refresh(http, server, tokens.refresh_token)


async def test_non_form_token_request_is_refused(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    payload = {"grant_type": "client_credentials", "client_id": DEFAULT_CLIENT_ID}
    async with http.post(server.token_url, json=payload) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"
    assert server.stats.token_calls == {"(none)": 1}


async def test_unsupported_grant_type_is_counted_and_refused(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    body = urlencode(
        {
            "grant_type": "password",
            "client_id": DEFAULT_CLIENT_ID,
            "client_secret": DEFAULT_CLIENT_SECRET,
        }
    )
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with http.post(server.token_url, data=body, headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "unsupported_grant_type"
    assert server.stats.token_calls["password"] == 1


# --- refresh behaviour ----------------------------------------------------------------------


async def test_refresh_without_rotation_keeps_the_old_refresh_token(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    server.config.rotate_refresh_tokens = False
    tokens = await connect(http, server)
    assert tokens.refresh_token
    again = await refresh(http, server, tokens.refresh_token)
    assert again.refresh_token == tokens.refresh_token
    third = await refresh(http, server, tokens.refresh_token)
    assert third.access_token not in (tokens.access_token, again.access_token)
    assert server.stats.grants_revoked == 0


async def test_refresh_may_narrow_but_not_widen_the_scope(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    tokens = await connect(http, server)
    assert tokens.refresh_token
    narrowed = await fetch_tokens(
        http,
        server,
        "refresh_token",
        refresh_token=tokens.refresh_token,
        scope=["read"],
        previous_refresh_token=tokens.refresh_token,
    )
    assert narrowed.scope == ("read",)
    assert narrowed.refresh_token
    with pytest.raises(TokenRequestFailed, match="invalid_scope") as info:
        await fetch_tokens(
            http,
            server,
            "refresh_token",
            refresh_token=narrowed.refresh_token,
            scope=["read", "admin"],
        )
    assert info.value.transient is False


async def test_no_refresh_tokens_when_configured_off(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    server.config.issue_refresh_tokens = False
    tokens = await connect(http, server)
    assert tokens.refresh_token is None


# --- expiry ---------------------------------------------------------------------------------


async def test_expires_in_zero_issues_already_expired_tokens(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    server.config.expires_in = 0
    tokens = await connect(http, server)
    assert oauth.expires_within(tokens.expires_at, 0, datetime.now(UTC))
    assert server.token_status(tokens.access_token) == "expired"
    status, payload, headers = await call_api(http, server, tokens.access_token)
    assert status == 401
    assert "expired" in payload["error_description"]
    assert headers["WWW-Authenticate"].startswith("Bearer ")
    server.config.expires_in = 3600
    assert tokens.refresh_token
    fresh = await refresh(http, server, tokens.refresh_token)
    assert (await call_api(http, server, fresh.access_token))[0] == 200


async def test_expires_in_none_issues_tokens_without_expiry(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    server.config.expires_in = None
    tokens = await connect(http, server)
    assert tokens.expires_at is None
    assert (await call_api(http, server, tokens.access_token))[0] == 200


async def test_expire_access_tokens_rejects_tokens_clients_still_trust(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    tokens = await connect(http, server)
    assert server.expire_access_tokens() == 1
    assert not oauth.expires_within(tokens.expires_at, 60, datetime.now(UTC))
    assert (await call_api(http, server, tokens.access_token))[0] == 401


# --- fault injection -------------------------------------------------------------------------


async def test_injected_503s_are_transient_and_counted(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    server.config.fail_next = 2
    for _ in range(2):
        with pytest.raises(TokenRequestFailed) as info:
            await fetch_tokens(http, server, "client_credentials")
        assert info.value.transient
        assert oauth.is_transient_error(info.value)
    tokens = await fetch_tokens(http, server, "client_credentials")
    assert tokens.access_token
    assert server.stats.faults_injected == 2
    assert server.stats.token_calls["client_credentials"] == 3
    assert server.config.fail_next == 0


async def test_injected_429_carries_retry_after(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    server.config.fail_next = 1
    server.config.fail_status = 429
    url, headers, body = oauth.token_request(
        "client_credentials",
        token_url=server.token_url,
        client_id=DEFAULT_CLIENT_ID,
        client_secret=DEFAULT_CLIENT_SECRET,
        auth_method="client_secret_post",
    )
    async with http.post(url, headers=headers, data=body) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"


async def test_token_delay_slows_the_token_endpoint(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    server.config.token_delay = 0.2
    started = time.monotonic()
    await fetch_tokens(http, server, "client_credentials")
    assert time.monotonic() - started >= 0.2


# --- client credentials, userinfo, revocation -----------------------------------------------


async def test_client_credentials_grant(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    tokens = await fetch_tokens(http, server, "client_credentials", scope=["reports"])
    assert tokens.refresh_token is None
    assert tokens.scope == ("reports",)
    status, payload, _ = await call_api(http, server, tokens.access_token)
    assert status == 200
    assert payload["client_id"] == DEFAULT_CLIENT_ID
    assert payload["grant_id"] is None


async def test_userinfo_requires_a_valid_bearer_token(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(server.userinfo_url) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="oauth-test-server"'
    async with http.get(server.userinfo_url, headers={"Authorization": "Bearer nope"}) as resp:
        assert resp.status == 401
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert server.stats.userinfo_calls == 2


async def test_revoking_the_refresh_token_revokes_the_grant(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    tokens = await connect(http, server)
    assert tokens.refresh_token
    assert await revoke(http, server, tokens.refresh_token, "refresh_token") == 200
    assert (await call_api(http, server, tokens.access_token))[0] == 401
    with pytest.raises(ReauthRequired):
        await refresh(http, server, tokens.refresh_token)
    assert server.stats.revocations == 1
    assert server.stats.grants_revoked == 1


async def test_revoking_an_access_token_leaves_the_refresh_token_usable(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    tokens = await connect(http, server)
    assert tokens.refresh_token
    assert await revoke(http, server, tokens.access_token, "access_token") == 200
    assert (await call_api(http, server, tokens.access_token))[0] == 401
    fresh = await refresh(http, server, tokens.refresh_token)
    assert (await call_api(http, server, fresh.access_token))[0] == 200
    assert server.stats.grants_revoked == 0


async def test_revoking_an_unknown_token_answers_200(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    assert await revoke(http, server, "never-issued", None) == 200


async def test_revocation_requires_client_authentication(
    server: OAuthTestServer, http: aiohttp.ClientSession
) -> None:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with http.post(server.revoke_url, data="token=x", headers=headers) as resp:
        assert resp.status == 401


# --- control API ----------------------------------------------------------------------------


async def test_control_api_over_http(server: OAuthTestServer, http: aiohttp.ClientSession) -> None:
    base = server.base_url
    async with http.post(f"{base}/_config", json={"expires_in": 5, "fail_next": 1}) as resp:
        assert resp.status == 200
        assert (await resp.json())["expires_in"] == 5
    assert server.config.expires_in == 5
    for bad in ({"expires_in": "soon"}, {"nope": 1}, {"deny": 1}, [1]):
        async with http.post(f"{base}/_config", json=bad) as resp:
            assert resp.status == 400
    assert server.config.deny is False

    with pytest.raises(TokenRequestFailed):
        await fetch_tokens(http, server, "client_credentials")
    tokens = await connect(http, server)
    async with http.get(f"{base}/_stats") as resp:
        stats = await resp.json()
    assert stats["token_calls"] == {"client_credentials": 1, "authorization_code": 1}
    assert stats["total_token_calls"] == 2
    assert stats["faults_injected"] == 1

    async with http.post(f"{base}/_expire") as resp:
        assert (await resp.json()) == {"expired": 1}
    async with http.post(f"{base}/_reset") as resp:
        assert resp.status == 200
    assert server.token_status(tokens.access_token) == "unknown"
    assert server.stats.total_token_calls == 0
    assert server.config.expires_in == 3600


async def test_reset_restores_the_initial_config_in_place() -> None:
    async with OAuthTestServer(config=ServerConfig(expires_in=10)) as server:
        config, stats = server.config, server.stats
        server.config.expires_in = 0
        server.stats.api_calls = 7
        server.reset()
        assert server.config is config and server.stats is stats
        assert (config.expires_in, stats.api_calls) == (10, 0)


async def test_server_refuses_a_second_start(server: OAuthTestServer) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        await server.start()


# --- as its own OS process ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_process() -> Iterator[ServerProcess]:
    with ServerProcess() as proc:
        yield proc


def test_server_process_prints_its_url_and_answers(server_process: ServerProcess) -> None:
    assert urlsplit(server_process.base_url).hostname == "127.0.0.1"
    server_process.reset()
    assert server_process.stats()["total_token_calls"] == 0
    assert server_process.configure(expires_in=0)["expires_in"] == 0
    assert server_process.configure(expires_in=3600)["expires_in"] == 3600
    assert server_process.expire_access_tokens() == 0


async def test_full_flow_against_the_server_process(
    server_process: ServerProcess, http: aiohttp.ClientSession
) -> None:
    endpoints = Endpoints(server_process.base_url)
    async with http.post(f"{endpoints.base_url}/_reset") as resp:
        assert resp.status == 200
    tokens = await connect(http, endpoints)
    assert tokens.refresh_token
    rotated = await refresh(http, endpoints, tokens.refresh_token)
    assert (await call_api(http, endpoints, rotated.access_token))[0] == 200
    with pytest.raises(ReauthRequired):
        await refresh(http, endpoints, tokens.refresh_token)
    assert (await call_api(http, endpoints, rotated.access_token))[0] == 401
    async with http.get(f"{endpoints.base_url}/_stats") as resp:
        stats = await resp.json()
    assert stats["token_calls"] == {"authorization_code": 1, "refresh_token": 2}
    assert stats["grants_revoked"] == 1


def test_server_process_exits_on_sigterm() -> None:
    proc = ServerProcess("--client-id", "cli-client", "--client-secret", "cli-secret")
    proc.start()
    pid = proc.pid
    try:
        assert proc.configure()["expires_in"] == 3600
        os.kill(pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.stop()


def test_server_process_reports_a_failed_start() -> None:
    proc = ServerProcess("--port", "not-a-port", python=sys.executable, timeout=10)
    with pytest.raises(RuntimeError, match="did not start"):
        proc.start()
