"""Service accounts (RFC 7523 §2.1, ``auth_type="jwt_bearer"``): the key file as issued or
its fields one by one, assertions a real JOSE library accepts, renewal by a new assertion
under the single flight and lease, secrets that never show."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid as uuid_mod
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import ECKey

from integrations import Integrations, InvalidField, Provider

from .conftest import TEST_KEY, settle
from .modekit import AssertionServer, assertion_server, key_file, rsa_pem, storm

EMAIL = "robot@demo.iam.example"


def service_provider(server: AssertionServer | None = None, **extra: object) -> Provider:
    return Provider(
        key="svc",
        name="Service",
        auth_type="jwt_bearer",
        scopes=("read", "write"),
        api_hosts=("127.0.0.1",),
        token_url=server.token_url if server is not None else None,
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
async def rsa_account() -> AsyncIterator[tuple[AssertionServer, str]]:
    pem, public = rsa_pem()
    async with assertion_server({EMAIL: public}) as server:
        yield server, pem


async def test_a_key_file_as_issued_signs_in_and_renews(
    fresh_db: str,
    rsa_account: tuple[AssertionServer, str],
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, pem = rsa_account
    caplog.set_level(logging.DEBUG)
    # No token_url on the provider: the key file's token_uri is the endpoint.
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[service_provider()]) as integ:
        conn = await integ.add_connection("svc", "main")
        async with integ.subscribe(uuid=conn.uuid) as events:
            saved = await integ.save_setup(
                conn.uuid, {"key_file": key_file(EMAIL, pem, server.token_url)}
            )
            event = await asyncio.wait_for(anext(events), 5)
        assert saved["status"] == "connected" and saved["client_email"] == EMAIL
        assert "key_file" not in saved
        assert pem not in json.dumps(saved) and pem not in repr(event)
        (listed,) = await integ.list_connections("svc")
        assert listed.data["private_key"].startswith("••") and "key_file" not in listed.data
        raw = await db.fetchval(
            "SELECT value_json->'private_key' FROM integrations.connections WHERE uuid = $1",
            uuid_mod.UUID(conn.uuid),
        )
        assert "$enc" in json.loads(raw)

        url = f"{server.base_url}/api/resource"
        first = await integ.authenticated_request(conn.uuid, "GET", url)
        second = await integ.authenticated_request(conn.uuid, "GET", url)
        assert first.json() == second.json() == {"token_id": 1}
        assert len(server.token_requests) == 1, server.refused
        sent = server.token_requests[0]
        assert sent["header"]["alg"] == "RS256" and sent["header"]["kid"] == "key-1"
        claims = sent["claims"]
        assert claims["iss"] == claims["sub"] == EMAIL
        assert claims["aud"] == server.token_url and claims["scope"] == "read write"
        assert (await integ.access_token(conn.uuid)) == "sa-token-1"

        # Domain-wide delegation: the next assertion acts for the subject.
        await integ.save_setup(conn.uuid, {"subject": "ada@demo.example"})
        assert await integ.refresh_access_token(conn.uuid) == "sa-token-2"
        second_claims = server.token_requests[1]["claims"]
        assert second_claims["sub"] == "ada@demo.example"
        assert second_claims["jti"] != claims["jti"]

        # Renewal before expiry: a due token gets a new assertion, not a refresh token.
        past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
        await db.execute(
            "UPDATE integrations.connections SET value_json = "
            "jsonb_set(value_json, '{expires_at}', to_jsonb($2::text)) WHERE uuid = $1",
            uuid_mod.UUID(conn.uuid),
            past,
        )
        await settle()
        renewed = await integ.authenticated_request(conn.uuid, "GET", url)
        assert renewed.json() == {"token_id": 3}
        assert len(server.token_requests) == 3 and server.refused == []

        # disconnect drops the key and the token; the account's name stays.
        await integ.disconnect(conn.uuid)
        after = (await integ.get_integration_by_uuid(conn.uuid)).data
        assert "private_key" not in after and "access_token" not in after
        assert after["client_email"] == EMAIL
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "PRIVATE KEY" not in text and "sa-token-" not in text


async def test_fields_one_by_one_with_an_ec_jwk(fresh_db: str) -> None:
    key = ECKey.generate_key("P-256", private=True)
    public = serialization.load_pem_public_key(key.as_pem(private=False))
    async with assertion_server({EMAIL: public}) as server:
        provider = service_provider(server)
        async with Integrations(fresh_db, keys=TEST_KEY, providers=[provider]) as integ:
            conn = await integ.add_connection("svc", "main")
            jwk = json.dumps(key.as_dict(private=True) | {"kid": "ec-1"})
            await integ.save_setup(conn.uuid, {"client_email": EMAIL, "private_key": jwk})
            response = await integ.authenticated_request(
                conn.uuid, "GET", f"{server.base_url}/api/resource"
            )
            assert response.status == 200, server.refused
    (sent,) = server.token_requests
    assert sent["header"]["alg"] == "ES256" and sent["header"]["kid"] == "ec-1"


@pytest.mark.parametrize(
    "attrs",
    [
        {"key_file": "not json"},
        {"key_file": json.dumps({"client_email": EMAIL})},
        {
            "client_email": EMAIL,
            "private_key": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----",
        },
        {"client_email": EMAIL, "private_key": json.dumps({"kty": "oct", "k": "c2VjcmV0"})},
    ],
)
async def test_a_bad_key_is_refused_and_changes_nothing(
    fresh_db: str, attrs: dict[str, str]
) -> None:
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[service_provider()]) as integ:
        conn = await integ.add_connection("svc", "main")
        before = await integ.get_integration_by_uuid(conn.uuid)
        with pytest.raises(InvalidField) as info:
            await integ.save_setup(conn.uuid, attrs)
        assert info.value.code == "invalid_field"
        assert info.value.context["field"] in ("key_file", "private_key")
        assert "nope" not in str(info.value) and "c2VjcmV0" not in str(info.value)
        assert (await integ.get_integration_by_uuid(conn.uuid)).data == before.data


@pytest.mark.slow
async def test_a_renewal_storm_makes_one_token_request(
    fresh_db: str, rsa_account: tuple[AssertionServer, str]
) -> None:
    server, pem = rsa_account
    provider = service_provider(server)
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[provider]) as integ:
        conn = await integ.add_connection("svc", "main")
        await integ.save_setup(conn.uuid, {"key_file": key_file(EMAIL, pem, server.token_url)})
    server.delay = 0.3  # the first answer arrives while every caller is waiting
    results = await storm(fresh_db, provider, conn.uuid, f"{server.base_url}/api/resource")
    assert len(results) == 100
    assert {r["status"] for r in results} == {200}
    assert {r["token_id"] for r in results} == {1}
    assert len(server.token_requests) == 1
