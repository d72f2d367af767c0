"""Token answers that are odd but arrived: parsed for what matters, nothing of the grant lost."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from integrations import Integrations, ReauthRequired, TokenRequestFailed

from .conftest import TEST_KEY
from .oauthkit import loopback_provider


class TokenEndpoint:
    """A loopback token endpoint answering with whatever body the test sets; it records
    the refresh tokens it is sent."""

    def __init__(self) -> None:
        self.body = ""
        self.status = 200
        self.sent: list[str] = []
        self.server: TestServer | None = None

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.sent.append(str(form.get("refresh_token", "")))
        return web.Response(text=self.body, status=self.status, content_type="application/json")

    @property
    def base(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def endpoint() -> AsyncIterator[TokenEndpoint]:
    found = TokenEndpoint()
    app = web.Application()
    app.router.add_post("/token", found.token)
    found.server = TestServer(app, host="127.0.0.1")
    await found.server.start_server()
    yield found
    await found.server.close()


@pytest.fixture
async def connected(
    fresh_db: str, endpoint: TokenEndpoint
) -> AsyncIterator[tuple[Integrations, str]]:
    provider = loopback_provider(endpoint.base)
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[provider]) as integ:
        conn = await integ.add_connection("loopback", "default")
        await integ.save_setup(conn.uuid, {"client_id": "cid", "client_secret": "csecret"})
        await integ.import_tokens(
            conn.uuid,
            {
                "access_token": "at-0",
                "refresh_token": "rt-0",
                "expires_at": "2020-01-01T00:00:00+00:00",
            },
        )
        yield integ, conn.uuid


def answer(**members: Any) -> str:
    return json.dumps({"token_type": "Bearer", "expires_in": 3600, **members})


async def test_an_answer_nested_deeper_than_the_parser_goes_is_still_read(
    connected: tuple[Integrations, str], endpoint: TokenEndpoint
) -> None:
    integ, uuid = connected
    deep = "[" * 5000 + "]" * 5000
    endpoint.body = answer(access_token="at-1", refresh_token="rt-1")[:-1] + f', "deep": {deep}}}'
    assert await integ.refresh_access_token(uuid) == "at-1"
    credentials = await integ.get_credentials(uuid)
    assert (credentials["access_token"], credentials["refresh_token"]) == ("at-1", "rt-1")


async def test_an_answer_with_a_huge_number_is_still_read(
    connected: tuple[Integrations, str], endpoint: TokenEndpoint
) -> None:
    integ, uuid = connected
    endpoint.body = (
        answer(access_token="at-1", refresh_token="rt-1")[:-1] + ', "n": ' + "9" * 5000 + "}"
    )
    assert await integ.refresh_access_token(uuid) == "at-1"
    assert (await integ.get_credentials(uuid))["refresh_token"] == "rt-1"


@pytest.mark.parametrize("bad", ["at\x00x", "at\nx", "at\ud800x"])
async def test_an_unsendable_access_token_is_refused_and_its_new_refresh_token_kept(
    connected: tuple[Integrations, str], endpoint: TokenEndpoint, bad: str
) -> None:
    integ, uuid = connected
    endpoint.body = json.dumps(
        {"access_token": bad, "refresh_token": "rt-1", "expires_in": 3600}, ensure_ascii=True
    )
    with pytest.raises(TokenRequestFailed) as info:
        await integ.refresh_access_token(uuid)
    assert "control characters" in info.value.message
    assert "rt-1" not in repr(info.value) and "rt-1" not in repr(vars(info.value))
    # The answer's refresh token replaced the one it was asked with: the next refresh
    # sends it, and the grant goes on.
    endpoint.body = answer(access_token="at-2", refresh_token="rt-2")
    assert await integ.refresh_access_token(uuid) == "at-2"
    assert endpoint.sent == ["rt-0", "rt-1"]
    assert (await integ.get_integration_by_uuid(uuid)).status == "connected"


async def test_an_error_text_echoing_the_connections_secrets_is_masked(
    connected: tuple[Integrations, str],
    endpoint: TokenEndpoint,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from integrations import ReauthRequired

    integ, uuid = connected
    endpoint.status = 400
    endpoint.body = json.dumps(
        {"error": "invalid_grant", "error_description": "no: rt-0 / csecret / at-0"}
    )
    caplog.set_level(logging.DEBUG, logger="integrations")
    with pytest.raises(ReauthRequired) as info:
        await integ.refresh_access_token(uuid)
    shown = [info.value.message, str(info.value)] + [r.getMessage() for r in caplog.records]
    shown.append((await integ.get_integration_by_uuid(uuid)).validation_status or "")
    assert any("invalid_grant" in text for text in shown)
    for secret in ("rt-0", "csecret", "at-0"):
        assert all(secret not in text for text in shown), secret


@pytest.mark.parametrize(
    "members",
    [
        {"$enc": 1, "kid": "deadbeef", "n": "AAAA", "ct": "AAAA"},
        {"$enc": 1},
        {"extra": {"$enc": 1, "kid": "deadbeef"}},
    ],
)
async def test_an_envelope_marker_in_an_answer_is_not_taken_as_an_envelope(
    connected: tuple[Integrations, str], endpoint: TokenEndpoint, members: dict[str, Any]
) -> None:
    integ, uuid = connected
    endpoint.body = answer(access_token="at-1", refresh_token="rt-1", **members)
    assert await integ.refresh_access_token(uuid) == "at-1"
    # The connection stays readable: nothing of the answer reads as an envelope.
    credentials = await integ.get_credentials(uuid)
    assert (credentials["access_token"], credentials["refresh_token"]) == ("at-1", "rt-1")
    assert "$enc" not in json.dumps(credentials.get("token_extras", {}))
    assert (await integ.get_integration_by_uuid(uuid)).status == "connected"
    assert await integ.access_token(uuid) == "at-1"


def test_invalid_client_blames_the_client_credentials_not_the_grant() -> None:
    from integrations.oauth import parse_token_response

    for code in ("invalid_client", "incorrect_client_credentials"):
        with pytest.raises(ReauthRequired) as caught:
            parse_token_response(
                401,
                {"error": code},
                now=datetime.now(UTC),
                requested_scopes=[],
                previous_refresh_token=None,
            )
        assert "client id or client secret is wrong" in caught.value.message
        assert "authorized again" not in caught.value.message
