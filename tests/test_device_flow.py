"""The device authorization grant (RFC 8628) and private_key_jwt client authentication,
against a real OpenID provider (oidc-provider, run by Node on loopback); the user's approval
goes through the provider's own pages."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from joserfc.jwk import RSAKey

import integrations._device as device_module
from integrations import (
    AuthorizationDenied,
    AuthorizationTimeout,
    Integrations,
    InvalidProviderKey,
    InvalidState,
    Provider,
)

from .conftest import TEST_KEY
from .modekit import storm
from .oidckit import DEVICE_GRANT, OidcProvider, approve_device, device_client

pytestmark = pytest.mark.slow  # a Node.js server, and polls at the provider's interval

SCOPES = ("openid", "offline_access", "email")


def op_provider(op: OidcProvider, **extra: Any) -> Provider:
    return Provider(
        key="op",
        name="OpenID provider",
        auth_type="oauth2",
        authorize_url=op.authorize_url,
        token_url=op.token_url,
        userinfo_url=op.userinfo_url,
        device_authorization_url=op.device_url,
        scopes=SCOPES,
        api_hosts=("127.0.0.1",),
        **extra,
    )


async def granted(op: OidcProvider) -> dict[str, int]:
    async with aiohttp.ClientSession() as session, session.get(f"{op.base_url}/__stats") as got:
        stats: dict[str, dict[str, int]] = await got.json()
    return stats["granted"]


@pytest.fixture
async def op() -> AsyncIterator[OidcProvider]:
    key = RSAKey.generate_key(2048, private=True)
    public = key.as_dict(private=False) | {"kid": "client-key-1", "alg": "RS256", "use": "sig"}
    confidential = device_client(
        "signed-app",
        token_endpoint_auth_method="private_key_jwt",
        token_endpoint_auth_signing_alg="RS256",
        jwks={"keys": [public]},
        grant_types=[DEVICE_GRANT, "refresh_token", "client_credentials"],
    )
    async with OidcProvider([device_client(), confidential]) as server:
        server.client_key = key.as_pem(private=True).decode()  # type: ignore[attr-defined]
        yield server


async def test_a_device_code_approved_on_the_providers_pages_connects(
    fresh_db: str, op: OidcProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = op_provider(op, token_auth="none")
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[provider]) as integ:
        conn = await integ.add_connection("op", "main")
        await integ.save_setup(conn.uuid, {"client_id": "device-app"})
        async with integ.subscribe(uuid=conn.uuid) as events:
            started = await integ.start_device_authorization(conn.uuid)
            assert started.user_code and started.verification_uri.startswith(op.base_url)
            assert started.verification_uri_complete is not None
            assert started.interval == 5 and 0 < started.expires_in <= 600
            waiting = asyncio.create_task(integ.complete_device_authorization(conn.uuid))
            # (Its first poll comes after the 5 s interval, by when the user has approved:
            # answers of authorization_pending are polled through with the scripted
            # provider below.)
            page = await approve_device(started.verification_uri_complete, login="ada")
            assert "Success" in page
            connected = await asyncio.wait_for(waiting, 30)
            kinds = [(await asyncio.wait_for(anext(events), 5)).kind for _ in range(1)]
        assert connected.data["status"] == "connected"
        assert connected.data["account"]["email"] == "ada@example.test"
        assert kinds == ["connected"]
        first = await integ.access_token(conn.uuid)
        me = await integ.authenticated_request(conn.uuid, "GET", op.userinfo_url)
        assert me.json()["sub"] == "ada"
        # The rotating refresh token renews the grant.
        assert await integ.refresh_access_token(conn.uuid) != first
        assert (await granted(op)) == {DEVICE_GRANT: 1, "refresh_token": 1}
        # The code was used: there is nothing left to complete.
        with pytest.raises(InvalidState):
            await integ.complete_device_authorization(conn.uuid)
        (listed,) = await integ.list_connections("op")
        assert "device_code" not in json.dumps(listed.data)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert first not in text


async def test_a_refusal_on_the_providers_pages_is_recorded(
    fresh_db: str, op: OidcProvider
) -> None:
    provider = op_provider(op, token_auth="none")
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[provider]) as integ:
        conn = await integ.add_connection("op", "main")
        await integ.save_setup(conn.uuid, {"client_id": "device-app"})
        started = await integ.start_device_authorization(conn.uuid, scopes=["openid"])
        assert started.verification_uri_complete is not None
        await approve_device(started.verification_uri_complete, deny=True)
        with pytest.raises(AuthorizationDenied) as info:
            await integ.complete_device_authorization(conn.uuid)
        assert info.value.code == "authorization_denied"
        after = await integ.get_integration_by_uuid(conn.uuid)
        assert after.data["status"] == "error"
        assert "access_denied" in after.data["validation_status"]


async def test_private_key_jwt_device_flow_refresh_and_client_credentials(
    fresh_db: str, op: OidcProvider
) -> None:
    key: str = op.client_key  # type: ignore[attr-defined]
    provider = op_provider(op, token_auth="private_key_jwt")
    assert [f.key for f in provider.setup_fields] == [
        "client_id",
        "client_private_key",
        "client_key_id",
    ]
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[provider]) as integ:
        conn = await integ.add_connection("op", "main")
        await integ.save_setup(
            conn.uuid,
            {"client_id": "signed-app", "client_private_key": key, "client_key_id": "client-key-1"},
        )
        (listed,) = await integ.list_connections("op")
        assert listed.data["client_private_key"].startswith("••")
        started = await integ.start_device_authorization(conn.uuid)
        assert started.verification_uri_complete is not None
        await approve_device(started.verification_uri_complete)
        await integ.complete_device_authorization(conn.uuid)
        # Each refresh signs a new assertion: the provider refuses a replayed jti.
        await integ.refresh_access_token(conn.uuid)
        await integ.refresh_access_token(conn.uuid)
        assert (await granted(op)) == {DEVICE_GRANT: 1, "refresh_token": 2}

    machine = Provider(
        key="op-machine",
        name="OpenID provider (client credentials)",
        auth_type="oauth2_client_credentials",
        token_url=op.token_url,
        token_auth="private_key_jwt",
        api_hosts=("127.0.0.1",),
    )
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[machine]) as integ:
        conn = await integ.add_connection("op-machine", "main")
        saved = await integ.save_setup(
            conn.uuid, {"client_id": "signed-app", "client_private_key": key}
        )
        assert saved["status"] == "connected"
        assert await integ.access_token(conn.uuid)
        assert (await granted(op)).get("client_credentials") == 1


async def test_a_renewal_storm_after_a_device_grant_makes_one_token_request(
    fresh_db: str, op: OidcProvider
) -> None:
    provider = op_provider(op, token_auth="none")
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[provider]) as integ:
        conn = await integ.add_connection("op", "main")
        await integ.save_setup(conn.uuid, {"client_id": "device-app"})
        started = await integ.start_device_authorization(conn.uuid)
        assert started.verification_uri_complete is not None
        await approve_device(started.verification_uri_complete)
        await integ.complete_device_authorization(conn.uuid)
        # The stored token is made due, so every caller of the storm wants a new one.
        await integ.import_tokens(
            conn.uuid,
            {
                "access_token": "expired-token",
                "refresh_token": (await integ.get_credentials(conn.uuid))["refresh_token"],
                "expires_in": 1,
            },
        )
    await asyncio.sleep(1.2)
    results = await storm(fresh_db, provider, conn.uuid, op.userinfo_url)
    assert len(results) == 100 and {r["status"] for r in results} == {200}
    assert (await granted(op)).get("refresh_token") == 1


# -- polling rules against a scripted endpoint -----------------------------------------------


class ScriptedDevice:
    """A device endpoint and a token endpoint that answer from a script."""

    def __init__(self, answers: list[tuple[int, dict[str, Any]]], interval: int = 1) -> None:
        self.answers = answers
        self.interval = interval
        self.polls: list[float] = []
        self.base_url = ""

    async def device(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "device_code": "dc-123",
                "user_code": "ABCD-EFGH",
                "verification_uri": f"{self.base_url}/activate",
                "expires_in": 60,
                "interval": self.interval,
            }
        )

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        assert form["grant_type"] == DEVICE_GRANT and form["device_code"] == "dc-123"
        self.polls.append(time.monotonic())
        status, body = self.answers.pop(0)
        return web.json_response(body, status=status)


@pytest.fixture
async def scripted(request: pytest.FixtureRequest) -> AsyncIterator[ScriptedDevice]:
    script = ScriptedDevice(list(request.param))
    app = web.Application()
    app.router.add_post("/device", script.device)
    app.router.add_post("/token", script.token)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    script.base_url = f"http://127.0.0.1:{server.port}"
    try:
        yield script
    finally:
        await server.close()


def scripted_provider(script: ScriptedDevice) -> Provider:
    return Provider(
        key="scripted",
        name="Scripted",
        auth_type="oauth2",
        authorize_url=f"{script.base_url}/authorize",
        token_url=f"{script.base_url}/token",
        device_authorization_url=f"{script.base_url}/device",
        token_auth="none",
        api_hosts=("127.0.0.1",),
    )


PENDING = (400, {"error": "authorization_pending"})
SLOW = (400, {"error": "slow_down"})
TOKENS = (200, {"access_token": "at-1", "refresh_token": "rt-1", "expires_in": 3600})


@pytest.mark.parametrize("scripted", [[PENDING, SLOW, PENDING, TOKENS]], indirect=True)
async def test_polling_honours_the_interval_and_slow_down(
    fresh_db: str, scripted: ScriptedDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert device_module.SLOW_DOWN == 5  # RFC 8628 §3.5
    monkeypatch.setattr(device_module, "SLOW_DOWN", 1)
    async with Integrations(
        fresh_db, keys=TEST_KEY, providers=[scripted_provider(scripted)]
    ) as integ:
        conn = await integ.add_connection("scripted", "main")
        await integ.save_setup(conn.uuid, {"client_id": "app"})
        started = time.monotonic()
        assert (await integ.start_device_authorization(conn.uuid)).interval == 1
        connected = await integ.complete_device_authorization(conn.uuid)
        assert connected.data["status"] == "connected"
    gaps = [b - a for a, b in zip([started, *scripted.polls], scripted.polls, strict=False)]
    assert len(scripted.polls) == 4
    assert gaps[0] >= 0.95 and gaps[1] >= 0.95  # the interval, before slow_down
    assert gaps[2] >= 1.95 and gaps[3] >= 1.95  # the interval plus what slow_down added


@pytest.mark.parametrize(
    ("scripted", "error"),
    [
        ([PENDING, (400, {"error": "expired_token"})], AuthorizationTimeout),
        ([(400, {"error": "access_denied"})], AuthorizationDenied),
    ],
    indirect=["scripted"],
)
async def test_an_expired_or_refused_code_ends_the_wait(
    fresh_db: str, scripted: ScriptedDevice, error: type[Exception]
) -> None:
    async with Integrations(
        fresh_db, keys=TEST_KEY, providers=[scripted_provider(scripted)]
    ) as integ:
        conn = await integ.add_connection("scripted", "main")
        await integ.save_setup(conn.uuid, {"client_id": "app"})
        await integ.start_device_authorization(conn.uuid)
        with pytest.raises(error):
            await integ.complete_device_authorization(conn.uuid)
        with pytest.raises(InvalidState):
            await integ.complete_device_authorization(conn.uuid)


@pytest.mark.parametrize("scripted", [[PENDING, PENDING, TOKENS]], indirect=True)
async def test_a_cancelled_wait_leaves_the_code_for_the_next_call(
    fresh_db: str, scripted: ScriptedDevice
) -> None:
    async with Integrations(
        fresh_db, keys=TEST_KEY, providers=[scripted_provider(scripted)]
    ) as integ:
        conn = await integ.add_connection("scripted", "main")
        await integ.save_setup(conn.uuid, {"client_id": "app"})
        await integ.start_device_authorization(conn.uuid)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.5):
                await integ.complete_device_authorization(conn.uuid)
        assert len(scripted.polls) == 1
        connected = await integ.complete_device_authorization(conn.uuid)
        assert connected.data["status"] == "connected" and len(scripted.polls) == 3


async def test_a_provider_without_the_device_flow_is_refused(fresh_db: str) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY) as integ:
        conn = await integ.add_connection("openai", "main")
        with pytest.raises(InvalidProviderKey):
            await integ.start_device_authorization(conn.uuid)


@pytest.mark.timeout(600)  # four runs of the installed script
@pytest.mark.parametrize("scripted", [[PENDING, TOKENS]], indirect=True)
async def test_the_cli_connects_with_a_device_code(
    fresh_db: str, scripted: ScriptedDevice, tmp_path: Path
) -> None:
    from .test_cli import script

    providers = tmp_path / "providers.json"
    providers.write_text(scripted_provider(scripted).model_dump_json())
    spec = str(providers)
    added = await asyncio.to_thread(script, fresh_db, "--providers", spec, "add", "scripted")
    assert added.returncode == 0, added.stderr
    await asyncio.to_thread(
        script, fresh_db, "--providers", spec, "set", "scripted", "client_id=app"
    )
    done = await asyncio.to_thread(
        script, fresh_db, "--providers", spec, "connect", "scripted", "--device"
    )
    assert done.returncode == 0, done.stderr
    assert "enter the code ABCD-EFGH" in done.stdout
    assert f"Open {scripted.base_url}/activate" in done.stdout
    assert "connected scripted:default" in done.stdout
    assert len(scripted.polls) == 2
    await asyncio.to_thread(script, fresh_db, "add", "openai")
    refused = await asyncio.to_thread(script, fresh_db, "connect", "openai", "--device")
    assert refused.returncode != 0 and "does not offer the device flow" in refused.stderr


@pytest.mark.parametrize("scripted", [[PENDING, TOKENS]], indirect=True)
async def test_the_console_shows_the_code_and_the_link(
    fresh_db: str, scripted: ScriptedDevice
) -> None:
    from integrations.web import Admin, console

    from .webkit import client, csrf_of

    async with Integrations(
        fresh_db, keys=TEST_KEY, providers=[scripted_provider(scripted)]
    ) as integ:
        conn = await integ.add_connection("scripted", "main")
        await integ.save_setup(conn.uuid, {"client_id": "app"})
        http = client(console(integ, authorize=lambda request: Admin()))
        page = (await http.get(f"/{conn.uuid}")).text
        assert ">Connect with a code</button>" in page
        shown = await http.post(f"/{conn.uuid}/device", data={"csrf_token": csrf_of(page)})
        assert shown.status_code == 200, shown.text
        assert '<strong class="user-code">ABCD-EFGH</strong>' in shown.text
        assert f'href="{scripted.base_url}/activate"' in shown.text
        for _ in range(100):
            if (await integ.get_integration_by_uuid(conn.uuid)).data["status"] == "connected":
                break
            await asyncio.sleep(0.1)
        assert (await integ.get_integration_by_uuid(conn.uuid)).data["status"] == "connected"
        await http.aclose()
