"""Mutual TLS: a client certificate presented on API calls and token requests, a provider's
own CA trusted, against an https server on loopback that requires a certificate."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from integrations import Integrations, InvalidField, Provider, RequestFailed

from .conftest import TEST_KEY
from .modekit import storm


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_cert: str = ""
    other_key: str = ""


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca_key = _key()
    ca = _certificate("Test CA", ca_key, None, ca_key, ca=True)
    server_key, client_key, other_key = _key(), _key(), _key()
    return Pki(
        ca=_pem_cert(ca),
        server_cert=_pem_cert(_certificate("127.0.0.1", server_key, ca, ca_key, server=True)),
        server_key=_pem_key(server_key),
        client_cert=_pem_cert(_certificate("client-1", client_key, ca, ca_key)),
        client_key=_pem_key(client_key),
        other_cert=_pem_cert(_certificate("client-2", other_key, ca, ca_key)),
        other_key=_pem_key(other_key),
    )


def _thumbprint(request: web.Request) -> str | None:
    tls = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = tls.getpeercert(binary_form=True) if tls is not None else None
    return hashlib.sha256(der).hexdigest() if der else None


@dataclass
class Server:
    base: str
    #: Access tokens and the thumbprint of the certificate each is bound to (RFC 8705).
    bound: dict[str, str] = field(default_factory=dict)
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    #: Seconds the token endpoint takes to answer.
    delay: float = 0.0


@pytest.fixture
async def server(pki: Pki, tmp_path: Path) -> AsyncIterator[Server]:
    (tmp_path / "server.pem").write_text(pki.server_cert)
    (tmp_path / "server.key").write_text(pki.server_key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=pki.ca)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    state = Server(base="")

    async def token(request: web.Request) -> web.Response:
        thumb = _thumbprint(request)
        state.seen.append(("token", thumb))
        assert thumb is not None
        if state.delay:
            await asyncio.sleep(state.delay)
        access = secrets.token_urlsafe(16)
        state.bound[access] = thumb
        return web.json_response(
            {"access_token": access, "token_type": "Bearer", "expires_in": 3600}
        )

    async def api(request: web.Request) -> web.Response:
        thumb = _thumbprint(request)
        state.seen.append(("api", thumb))
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer ") and state.bound.get(header[7:]) != thumb:
            # A certificate-bound token presented over another certificate's connection.
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_get("/api/{tail:.*}", api)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.base = f"https://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


def _providers(pki: Pki, base: str) -> list[Provider]:
    return [
        # Certificate-bound tokens: the client credentials grant, over mutual TLS.
        Provider(
            key="bank",
            name="Bank",
            auth_type="oauth2_client_credentials",
            token_url=f"{base}/token",
            api_hosts=("127.0.0.1",),
            mtls=True,
            ca_bundle=pki.ca,
        ),
        # The certificate alone.
        Provider(
            key="ledger",
            name="Ledger",
            auth_type="mtls",
            api_hosts=("127.0.0.1",),
            ca_bundle=pki.ca,
            validation={"url": f"{base}/api/ping"},
        ),
        # The CA trusted, no certificate: the server refuses the handshake.
        Provider(
            key="plain",
            name="Plain",
            auth_type="api_key",
            api_hosts=("127.0.0.1",),
            ca_bundle=pki.ca,
        ),
    ]


def _tls_files() -> list[str]:
    return [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("integrations-tls-")]


async def test_the_certificate_is_presented_on_calls_and_token_requests(
    fresh_db: str,
    pki: Pki,
    server: Server,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    base = server.base
    async with Integrations(fresh_db, keys=TEST_KEY, providers=_providers(pki, base)) as integ:
        # Without a certificate the server refuses the connection.
        plain = await integ.add_connection("plain", "main")
        await integ.save_setup(plain.uuid, {"api_key": "k-0123456789"})
        with pytest.raises(RequestFailed):
            await integ.authenticated_request(plain.uuid, "GET", f"{base}/api/me")
        assert server.seen == []

        bank = integ.providers.get("bank")
        assert {"client_certificate", "client_key"} <= {f.key for f in bank.setup_fields}
        assert "client_key" in bank.secret_keys
        conn = await integ.add_connection("bank", "main")
        await integ.save_setup(
            conn.uuid,
            {
                "client_id": "bank-client",
                "client_secret": "s3cret-bank-client",
                "client_certificate": pki.client_cert,
                "client_key": pki.client_key,
            },
        )
        got = await integ.authenticated_request(conn.uuid, "GET", f"{base}/api/accounts")
        assert got.status == 200, got.text
        # The token request and the call both presented the client certificate, and the
        # token bound to it is accepted.
        client = server.seen[0][1]
        assert [kind for kind, _ in server.seen] == ["token", "api"]
        assert client is not None and all(thumb == client for _, thumb in server.seen)
        assert _tls_files() == []

        # Another certificate with the same token is refused: the binding holds.
        await integ.save_setup(
            conn.uuid, {"client_certificate": pki.other_cert, "client_key": pki.other_key}
        )
        refused = await integ.authenticated_request(conn.uuid, "GET", f"{base}/api/accounts")
        assert refused.status == 200  # renewed over the new certificate, then accepted
        assert server.seen[-2][0] == "token" and server.seen[-1][1] != client

        # The certificate alone: the mtls scheme, with its credential check.
        ledger = await integ.add_connection("ledger", "main")
        saved = await integ.save_setup(
            ledger.uuid,
            {"client_certificate": pki.client_cert, "client_key": pki.client_key},
        )
        assert saved["status"] == "connected"
        check = await integ.validate_connection(ledger.uuid)
        assert check.ok, check
        ping = await integ.authenticated_request(ledger.uuid, "GET", f"{base}/api/ping")
        assert ping.status == 200

        # The key is sealed at rest and shows nowhere.
        raw = await db.fetchval(
            "SELECT value_json::text FROM integrations.connections WHERE uuid = $1", ledger.uuid
        )
        listed = await integ.list_connections("ledger")
        events = await db.fetch("SELECT body::text AS t FROM integrations.events")
        shown = [raw, json.dumps([c.data for c in listed], default=str), repr(listed)]
        shown += [e["t"] for e in events] + [r.getMessage() for r in caplog.records]
        shown += [json.dumps(r.__dict__, default=str) for r in caplog.records]
        marker = pki.client_key.splitlines()[1]
        assert not any(marker in text for text in shown)


async def test_a_key_that_does_not_fit_is_a_typed_error(
    fresh_db: str, pki: Pki, server: Server
) -> None:
    async with Integrations(
        fresh_db, keys=TEST_KEY, providers=_providers(pki, server.base)
    ) as integ:
        ledger = await integ.add_connection("ledger", "main")
        await integ.save_setup(
            ledger.uuid,
            {"client_certificate": pki.client_cert, "client_key": pki.other_key},
        )
        with pytest.raises(InvalidField) as info:
            await integ.authenticated_request(ledger.uuid, "GET", f"{server.base}/api/ping")
        assert "PRIVATE" not in str(info.value) and info.value.context["field"] == "client_key"
        assert server.seen == [] and _tls_files() == []


@pytest.mark.slow
async def test_a_renewal_storm_over_mutual_tls_makes_one_token_request(
    fresh_db: str, pki: Pki, server: Server
) -> None:
    bank = _providers(pki, server.base)[0]
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[bank]) as integ:
        conn = await integ.add_connection("bank", "main")
        await integ.save_setup(
            conn.uuid,
            {
                "client_id": "bank-client",
                "client_secret": "s3cret-bank-client",
                "client_certificate": pki.client_cert,
                "client_key": pki.client_key,
            },
        )
    # No token yet: every caller wants one, and the first answer comes while all wait.
    server.delay = 0.3
    results = await storm(fresh_db, bank, conn.uuid, f"{server.base}/api/accounts")
    assert len(results) == 100 and {r["status"] for r in results} == {200}
    assert [kind for kind, _ in server.seen].count("token") == 1
    assert len({thumb for _, thumb in server.seen}) == 1
