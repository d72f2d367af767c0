"""Credential checks: HTTP providers via aioresponses, a real SMTP server, the local PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aioresponses import aioresponses
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from yarl import URL

from integrations import Integrations
from integrations._catalogue import BUILTIN_PROVIDERS
from integrations._errors import InvalidField
from integrations._http import HttpClient, auth_for
from integrations._models import Validation
from integrations._probes import (
    ACCESS_DENIED,
    CONNECTED,
    INVALID_CREDENTIALS,
    NO_ACCESS_TOKEN,
    NO_CHECK,
    UNREACHABLE,
    check_credentials,
)
from integrations._providers import Provider, ValidationRequest
from integrations._registry import ProviderRegistry

SECRET = "S3CR3T-credential-0123456789"
TOKEN = "123456:AAE-S3CR3T_bot-token"
SID = "AC" + "0123456789abcdef" * 2
REGISTRY = ProviderRegistry()

OAUTH1 = {
    "consumer_key": "consumer-key",
    "consumer_secret": SECRET,
    "access_token": "token-1",
    "token_secret": SECRET,
}
CREDENTIALS: dict[str, dict[str, str]] = {
    "google": {"access_token": SECRET},
    "microsoft": {"access_token": SECRET, "tenant_id": ""},
    "slack": {"access_token": SECRET},
    "github": {"access_token": SECRET},
    "openrouter": {"api_key": SECRET},
    "openai": {"api_key": SECRET},
    "mistral": {"api_key": SECRET},
    "deepseek": {"api_key": SECRET},
    "xai": {"api_key": SECRET},
    "elevenlabs": {"api_key": SECRET},
    "stripe": {"api_key": SECRET},
    "sendgrid": {"api_key": SECRET},
    "brevo": {"api_key": SECRET},
    "twilio": {"account_sid": SID, "auth_token": SECRET},
    "aws": {"access_key": "AKIDEXAMPLE", "secret_key": SECRET},
    "telegram": {"bot_token": TOKEN},
    "discord": {"bot_token": TOKEN},
    "giphy": {"api_key": SECRET},
    "tomtom": {"api_key": SECRET},
    "bigquery-service-account": {"access_token": SECRET},
    "x-oauth1": OAUTH1,
    "trello": OAUTH1,
}
# The first providers, with hand-made credentials; tests/test_catalogue_lint.py checks
# every built-in's check the same way with generated ones.
HTTP_PROVIDERS = [p for p in BUILTIN_PROVIDERS if p.key in CREDENTIALS]


def probe_url(provider: Provider) -> str:
    """The URL the check of ``provider`` calls, credentials in the path included."""
    assert provider.validation is not None
    creds = CREDENTIALS[provider.key]
    url = provider.render_url(provider.validation.url, creds)
    return auth_for(provider, creds, url)[1]


def sent_headers(mock: aioresponses) -> dict[str, str]:
    ((_key, calls),) = mock.requests.items()
    return dict(calls[0].kwargs["headers"])


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    client = HttpClient(backoff=0, timeout=5)
    yield client
    await client.close()


def assert_no_secret(result: Validation) -> None:
    assert SECRET not in result.message and TOKEN not in result.message


def test_every_sample_credential_has_its_http_builtin():
    assert {p.key for p in HTTP_PROVIDERS} == set(CREDENTIALS)
    assert all(p.validation and p.validation.hook is None for p in HTTP_PROVIDERS)


# --- HTTP providers ---------------------------------------------------------------


@pytest.mark.parametrize("provider", HTTP_PROVIDERS, ids=lambda p: p.key)
async def test_working_credentials_are_connected(provider: Provider, http: HttpClient):
    with aioresponses() as mock:
        mock.get(probe_url(provider), status=200, payload={"ok": True, "id": 1})
        result = await check_credentials(provider, CREDENTIALS[provider.key], http=http)
        headers = sent_headers(mock)
    assert result == Validation(True, CONNECTED, result.checked_at)
    assert result.ok and bool(result)
    expected, _ = auth_for(provider, CREDENTIALS[provider.key], probe_url(provider))
    for name, value in expected.items():
        if provider.key == "aws" or provider.auth_type == "oauth1":
            # Signed with a timestamp and a nonce: the scheme of the header is what repeats.
            assert headers[name].split(" ")[0] == value.split(" ")[0]
        else:
            assert headers[name] == value


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, INVALID_CREDENTIALS),
        (403, ACCESS_DENIED),
        (500, "Service error 500"),
        (418, "Service error 418"),
        (503, "Service error 503"),
    ],
)
@pytest.mark.parametrize("provider", HTTP_PROVIDERS, ids=lambda p: p.key)
async def test_provider_statuses_map_to_readable_messages(
    provider: Provider, status: int, message: str, http: HttpClient
):
    assert provider.validation is not None
    if status in provider.validation.invalid_statuses:
        message = INVALID_CREDENTIALS
    with aioresponses() as mock:
        mock.get(probe_url(provider), status=status, payload={"error": "x"}, repeat=True)
        result = await check_credentials(provider, CREDENTIALS[provider.key], http=http)
    assert result.ok is False
    assert result.message == message
    assert_no_secret(result)


@pytest.mark.parametrize("provider", HTTP_PROVIDERS, ids=lambda p: p.key)
async def test_network_errors_are_could_not_reach_the_service(provider: Provider, http: HttpClient):
    with aioresponses() as mock:
        mock.get(
            probe_url(provider),
            exception=aiohttp.ClientConnectionError("connection reset"),
            repeat=True,
        )
        result = await check_credentials(provider, CREDENTIALS[provider.key], http=http)
    assert result == Validation(False, UNREACHABLE, result.checked_at)


async def test_provider_specific_invalid_statuses(http: HttpClient):
    telegram = REGISTRY.get("telegram")
    aws = REGISTRY.get("aws")
    with aioresponses() as mock:
        mock.get(probe_url(telegram), status=404, payload={"ok": False})
        mock.get(probe_url(aws), status=403, body="<Error>InvalidClientTokenId</Error>")
        assert (await check_credentials(telegram, CREDENTIALS["telegram"], http=http)).message == (
            INVALID_CREDENTIALS
        )
        assert (await check_credentials(aws, CREDENTIALS["aws"], http=http)).message == (
            INVALID_CREDENTIALS
        )


async def test_slack_ok_false_is_invalid_credentials(http: HttpClient):
    slack = REGISTRY.get("slack")
    with aioresponses() as mock:
        mock.get(probe_url(slack), payload={"ok": False, "error": "invalid_auth"})
        mock.get(probe_url(slack), payload={"ok": False, "error": "<script> " + SECRET})
        mock.get(probe_url(slack), body="not json", content_type="text/plain")
        first = await check_credentials(slack, CREDENTIALS["slack"], http=http)
        second = await check_credentials(slack, CREDENTIALS["slack"], http=http)
        third = await check_credentials(slack, CREDENTIALS["slack"], http=http)
    assert first == Validation(False, "Invalid credentials (invalid_auth)", first.checked_at)
    assert second.message == INVALID_CREDENTIALS
    assert third.message == INVALID_CREDENTIALS


async def test_microsoft_check_calls_graph_with_the_bearer_token(http: HttpClient):
    microsoft = REGISTRY.get("microsoft")
    with aioresponses() as mock:
        mock.get("https://graph.microsoft.com/v1.0/me", payload={"displayName": "A"})
        result = await check_credentials(microsoft, {"access_token": SECRET}, http=http)
        assert sent_headers(mock)["Authorization"] == f"Bearer {SECRET}"
    assert result.ok


async def test_aws_check_signs_sts_get_caller_identity(http: HttpClient):
    aws = REGISTRY.get("aws")
    creds = {**CREDENTIALS["aws"], "region": "eu-central-1", "session_token": "tok"}
    url = "https://sts.eu-central-1.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15"
    with aioresponses() as mock:
        mock.get(url, body="<GetCallerIdentityResponse/>", content_type="text/xml")
        result = await check_credentials(aws, creds, http=http)
        headers = sent_headers(mock)
    assert result.ok
    assert "/eu-central-1/sts/aws4_request" in headers["Authorization"]
    assert headers["X-Amz-Security-Token"] == "tok"
    assert SECRET not in str(headers)


async def test_aws_check_without_botocore_names_the_extra(
    http: HttpClient, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(sys.modules, "botocore.auth", None)
    with aioresponses() as mock:
        result = await check_credentials(REGISTRY.get("aws"), CREDENTIALS["aws"], http=http)
        assert mock.requests == {}
    assert not result.ok
    assert "aws" in result.message and "extra" in result.message


# --- nothing is sent when the input is incomplete or malformed ----------------------


async def test_oauth_without_access_token_sends_nothing(http: HttpClient):
    with aioresponses() as mock:
        result = await check_credentials(
            REGISTRY.get("google"), {"client_id": "id", "client_secret": SECRET}, http=http
        )
        assert mock.requests == {}
    assert result == Validation(False, NO_ACCESS_TOKEN, result.checked_at)


@pytest.mark.parametrize(
    ("key", "creds", "missing"),
    [
        ("openai", {}, "api_key"),
        ("openai", {"api_key": "   "}, "api_key"),
        ("twilio", {"auth_token": SECRET}, "account_sid"),
        ("aws", {"access_key": "AKID"}, "secret_key"),
        ("telegram", {"bot_token": None}, "bot_token"),
        ("smtp", {"port": 25}, "host"),
        ("postgres", {"credentials": {"host": "127.0.0.1"}}, "username, database"),
    ],
)
async def test_missing_required_fields_are_not_configured(
    key: str, creds: dict[str, Any], missing: str, http: HttpClient
):
    with aioresponses() as mock:
        result = await check_credentials(REGISTRY.get(key), creds, http=http)
        assert mock.requests == {}
    assert result.message == f"Not configured (missing: {missing})"
    assert not result.ok


async def test_wrong_field_type_raises_before_sending(http: HttpClient):
    with aioresponses() as mock:
        with pytest.raises(InvalidField):
            await check_credentials(REGISTRY.get("openai"), {"api_key": 1234}, http=http)
        assert mock.requests == {}


async def test_provider_without_a_check_is_ok(http: HttpClient):
    plain = Provider(key="acme", name="Acme", auth_type="api_key", api_hosts=("api.acme.test",))
    result = await check_credentials(plain, {"api_key": SECRET}, http=http)
    assert result == Validation(True, NO_CHECK, result.checked_at)


# --- deadlines ----------------------------------------------------------------------------


@pytest.fixture
async def slow_server() -> AsyncIterator[int]:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/slow", slow)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    yield server.port
    await server.close()


async def test_http_check_is_bounded_by_the_deadline(slow_server: int, http: HttpClient):
    provider = Provider(
        key="sleepy",
        name="Sleepy",
        auth_type="api_key",
        api_hosts=("127.0.0.1",),
        validation=ValidationRequest(url=f"http://127.0.0.1:{slow_server}/slow"),
    )
    started = time.monotonic()
    result = await check_credentials(provider, {"api_key": SECRET}, http=http, timeout=0.3)
    assert result == Validation(False, UNREACHABLE, result.checked_at)
    # The server never answers in time: the given deadline ended the check, well before
    # the default one (15 s) would have.
    assert time.monotonic() - started < 10


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never says a word."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("key", ["smtp", "postgres"])
async def test_hook_checks_are_bounded_by_the_deadline(
    key: str, silent_port: int, http: HttpClient
):
    creds = {
        "host": "127.0.0.1",
        "port": silent_port,
        "username": "u",
        "password": SECRET,
        "database": "d",
        "security": "none",
    }
    if key == "smtp":
        del creds["database"]
    started = time.monotonic()
    result = await check_credentials(REGISTRY.get(key), creds, http=http, timeout=0.3)
    assert result == Validation(False, UNREACHABLE, result.checked_at)
    # The server never answers in time: the given deadline ended the check, well before
    # the default one (15 s) would have.
    assert time.monotonic() - started < 10


# --- SMTP against a real local server ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Sink:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 OK"


def _authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == b"mailer"
        and auth_data.password == SECRET.encode()
    )
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp_port() -> Iterator[int]:
    port = free_port()
    controller = Controller(
        _Sink(),
        hostname="127.0.0.1",
        port=port,
        authenticator=_authenticator,
        auth_require_tls=False,
    )
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


def smtp_creds(port: int, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "security": "none", **extra}


async def test_smtp_login_with_the_right_password_is_connected(smtp_port: int, http: HttpClient):
    creds = {"credentials": smtp_creds(smtp_port, username="mailer", password=SECRET)}
    result = await check_credentials(REGISTRY.get("smtp"), creds, http=http)
    assert result == Validation(True, CONNECTED, result.checked_at)


async def test_smtp_wrong_password_is_invalid_credentials(smtp_port: int, http: HttpClient):
    creds = smtp_creds(smtp_port, username="mailer", password="wrong-" + SECRET)
    result = await check_credentials(REGISTRY.get("smtp"), creds, http=http)
    assert result == Validation(False, INVALID_CREDENTIALS, result.checked_at)
    assert_no_secret(result)


async def test_smtp_without_username_only_connects(smtp_port: int, http: HttpClient):
    result = await check_credentials(REGISTRY.get("smtp"), smtp_creds(smtp_port), http=http)
    assert result.ok


async def test_smtp_starttls_refused_by_a_plain_server_is_not_ok(smtp_port: int, http: HttpClient):
    creds = smtp_creds(smtp_port, security="starttls", username="mailer", password=SECRET)
    result = await check_credentials(REGISTRY.get("smtp"), creds, http=http)
    assert not result.ok
    assert_no_secret(result)


async def test_smtp_closed_port_is_unreachable(http: HttpClient):
    creds = smtp_creds(free_port(), username="mailer", password=SECRET)
    result = await check_credentials(REGISTRY.get("smtp"), creds, http=http)
    assert result == Validation(False, UNREACHABLE, result.checked_at)


# --- PostgreSQL against the test server -------------------------------------------------------


@pytest.fixture
def pg_creds(pg_params: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    """Credentials for the test server (local or embedded), with fields overridden."""
    base = {
        "host": pg_params["host"],
        "port": pg_params["port"],
        "username": pg_params["user"],
        "password": pg_params["password"],
        "database": pg_params["database"],
    }

    def make(**overrides: Any) -> dict[str, Any]:
        return {"credentials": {**base, **overrides}}

    return make


async def test_postgres_connect_is_connected(
    http: HttpClient, pg_creds: Callable[..., dict[str, Any]]
):
    result = await check_credentials(REGISTRY.get("postgres"), pg_creds(), http=http)
    assert result == Validation(True, CONNECTED, result.checked_at)


async def test_postgres_unknown_database_is_reported(
    http: HttpClient, pg_creds: Callable[..., dict[str, Any]]
):
    creds = pg_creds(database="integrations_no_such_db")
    result = await check_credentials(REGISTRY.get("postgres"), creds, http=http)
    assert result == Validation(False, "Database not found", result.checked_at)


async def test_postgres_unknown_role_is_invalid_credentials(
    http: HttpClient, pg_creds: Callable[..., dict[str, Any]]
):
    creds = pg_creds(username="integrations_no_such_role", password=SECRET)
    result = await check_credentials(REGISTRY.get("postgres"), creds, http=http)
    assert result == Validation(False, INVALID_CREDENTIALS, result.checked_at)
    assert_no_secret(result)


async def test_postgres_closed_port_is_unreachable(
    http: HttpClient, pg_creds: Callable[..., dict[str, Any]]
):
    result = await check_credentials(
        REGISTRY.get("postgres"), pg_creds(port=free_port()), http=http
    )
    assert result == Validation(False, UNREACHABLE, result.checked_at)


async def test_postgres_check_never_uses_this_process_password(
    http: HttpClient, monkeypatch: pytest.MonkeyPatch, pg_creds: Callable[..., dict[str, Any]]
):
    seen: dict[str, Any] = {}
    import asyncpg

    async def fake_connect(**kwargs: Any) -> Any:
        seen.update(kwargs)
        raise OSError("no route")

    monkeypatch.setenv("PGPASSWORD", SECRET)
    monkeypatch.setattr(asyncpg, "connect", fake_connect)
    creds = pg_creds(host="db.example.test")
    del creds["credentials"]["password"]
    await check_credentials(REGISTRY.get("postgres"), creds, http=http)
    assert seen["password"] == ""
    assert URL(f"https://{seen['host']}").host == "db.example.test"


async def test_an_oauth_provider_without_a_check_is_checked_at_its_userinfo_endpoint(
    http: HttpClient,
) -> None:
    provider = Provider(
        key="idp",
        name="IdP",
        auth_type="oauth2",
        authorize_url="https://id.example.test/authorize",
        token_url="https://id.example.test/token",
        userinfo_url="https://id.example.test/userinfo",
        api_hosts=("api.example.test",),
    )
    creds = {"client_id": "c", "client_secret": "s", "access_token": "tok-0123456789abc"}
    with aioresponses() as mock:
        mock.get("https://id.example.test/userinfo", status=200, payload={"sub": "u"})
        result = await check_credentials(provider, creds, http=http)
        assert (result.ok, result.message) == (True, CONNECTED)
        mock.get("https://id.example.test/userinfo", status=401)
        result = await check_credentials(provider, creds, http=http)
        assert (result.ok, result.message) == (False, INVALID_CREDENTIALS)
        assert sent_headers(mock)["Authorization"] == "Bearer tok-0123456789abc"


# --- outcomes this process or a never-connected connection caused are not recorded -------------


async def test_a_check_of_an_unregistered_provider_is_reported_not_recorded(
    fresh_db: str,
) -> None:
    from .conftest import TEST_KEY

    acme = Provider(key="acme", name="Acme", auth_type="api_key", api_hosts=("api.acme.test",))
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[acme]) as app:
        conn = await app.add_connection("acme", "default")
        await app.save_setup(conn.uuid, {"api_key": "k-0123456789"})
        await app.record_validation(conn.uuid, Validation(True, "Connected"))
        before = (await app.get_integration_by_uuid(conn.uuid)).data
    async with Integrations(fresh_db, keys=TEST_KEY) as shell:
        async with shell.subscribe(uuid=conn.uuid) as events:
            result = await shell.validate_connection(conn.uuid)
            assert not result.ok and "not registered in this process" in result.message
            report = await shell.check_all(record=True)
            assert [i.ok for i in report.items] == [False]
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await anext(aiter(events))
        after = (await shell.get_integration_by_uuid(conn.uuid)).data
    for field in ("status", "validation_status", "last_validated_at"):
        assert after.get(field) == before.get(field), field


async def test_testing_an_oauth_connection_never_connected_records_nothing(
    integ: Integrations,
) -> None:
    conn = await integ.add_connection("github", "default")
    await integ.save_setup(conn.uuid, {"client_id": "cid", "client_secret": "cs-0123456789"})
    before = (await integ.get_integration_by_uuid(conn.uuid)).data
    assert before["status"] == "disconnected"
    result = await integ.validate_connection(conn.uuid)
    assert not result.ok and result.message.startswith("Not connected yet")
    after = (await integ.get_integration_by_uuid(conn.uuid)).data
    assert after["status"] == "disconnected"
    assert after.get("validation_status") == before.get("validation_status")
    assert after.get("last_validated_at") == before.get("last_validated_at")
