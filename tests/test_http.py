"""HttpClient against loopback servers: host allow-list, auth headers, redirects, retries."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from integrations._errors import (
    HostNotAllowed,
    IntegrationsError,
    InvalidField,
    InvalidURL,
    LifecycleError,
    NotConfigured,
    NotConnected,
    RequestFailed,
)
from integrations._http import (
    HttpClient,
    Response,
    auth_for,
    bot_url,
    check_url,
    host_allowed,
    retry_after_seconds,
)
from integrations._providers import AuthHeader, Provider
from integrations._registry import ProviderRegistry

SECRET = "sk-test-S3CR3T-0123456789"
TOKEN = "123456:AAE-S3CR3T_bot-token"
REGISTRY = ProviderRegistry()


@dataclass
class Recorder:
    hits: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    plan: list[int] = field(default_factory=list)
    retry_after: str | None = None

    def count(self, path: str) -> int:
        return sum(1 for _method, p, _headers in self.hits if p == path)


def make_app(rec: Recorder) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        rec.hits.append((request.method, request.path, dict(request.headers)))
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.path,
                "headers": dict(request.headers),
                "body": body.decode(),
            }
        )

    async def redirect(request: web.Request) -> web.Response:
        rec.hits.append((request.method, request.path, dict(request.headers)))
        status = int(request.query.get("status", "302"))
        return web.Response(status=status, headers={"Location": request.query["to"]})

    async def flaky(request: web.Request) -> web.Response:
        rec.hits.append((request.method, request.path, dict(request.headers)))
        status = rec.plan.pop(0) if rec.plan else 200
        headers = {"Retry-After": rec.retry_after} if rec.retry_after and status != 200 else {}
        return web.Response(status=status, text=f"status {status}", headers=headers)

    async def slow(request: web.Request) -> web.Response:
        rec.hits.append((request.method, request.path, dict(request.headers)))
        await asyncio.sleep(5)
        return web.Response(text="late")

    async def loop(request: web.Request) -> web.Response:
        rec.hits.append((request.method, request.path, dict(request.headers)))
        raise web.HTTPFound(location="/loop")

    async def latin1(request: web.Request) -> web.Response:
        return web.Response(
            body="café".encode("latin-1"),
            headers={"Content-Type": "text/plain; charset=latin-1", "Authorization": SECRET},
        )

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/redirect", redirect)
    app.router.add_route("*", "/flaky", flaky)
    app.router.add_route("*", "/slow", slow)
    app.router.add_route("*", "/loop", loop)
    app.router.add_get("/latin1", latin1)
    app.router.add_route("*", "/bot{token}/redirect", redirect)
    app.router.add_route("*", "/bot{token}/{method}", echo)
    return app


@dataclass
class Server:
    rec: Recorder
    port: int

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


async def _serve() -> AsyncIterator[Server]:
    rec = Recorder()
    server = TestServer(make_app(rec), host="127.0.0.1")
    await server.start_server()
    try:
        assert server.port is not None
        yield Server(rec, server.port)
    finally:
        await server.close()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async for s in _serve():
        yield s


@pytest.fixture
async def other() -> AsyncIterator[Server]:
    async for s in _serve():
        yield s


@pytest.fixture
async def http() -> AsyncIterator[HttpClient]:
    client = HttpClient(backoff=0.01, max_backoff=0.05, timeout=5)
    yield client
    await client.close()


LOOP = Provider(key="loop", name="Loop", auth_type="api_key", api_hosts=("127.0.0.1",))
LOOP_BOT = Provider(
    key="loopbot",
    name="Loop bot",
    auth_type="bot_token",
    api_hosts=("127.0.0.1",),
    auth_header=AuthHeader(kind="path", template="/bot{bot_token}"),
)
CREDS = {"api_key": SECRET}


# --- URL rules -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "hosts", "allowed"),
    [
        ("https://api.example.com/v1", ("api.example.com",), True),
        ("https://api.example.com:8443/v1", ("api.example.com",), True),
        ("https://API.Example.com./v1", ("api.example.com",), True),
        ("https://api.example.com:8443/v1", ("api.example.com:8443",), True),
        ("https://api.example.com/v1", ("api.example.com:8443",), False),
        ("https://api.example.com:9443/v1", ("api.example.com:8443",), False),
        ("https://api.example.com/v1", ("api.example.com:443",), True),
        ("https://evil.example.com/v1", ("api.example.com",), False),
        ("https://api.example.com.evil.com/v1", ("api.example.com",), False),
        ("https://api.example.com@evil.com/v1", ("api.example.com",), False),
        ("https://eu.api.example.com/v1", ("*.example.com",), True),
        ("https://example.com/v1", ("*.example.com",), False),
        ("https://notexample.com/v1", ("*.example.com",), False),
        ("http://[::1]:8080/", ("[::1]:8080",), True),
        ("http://[::1]:8081/", ("[::1]:8080",), False),
        ("https://api.example.com/v1", (), False),
    ],
)
def test_host_allowed_port_and_wildcard_rules(url: str, hosts: tuple[str, ...], allowed: bool):
    assert host_allowed(url, hosts) is allowed


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x",
        "http://127.8.9.10:81/x",
        "http://localhost:8000/x",
        "http://[::1]/x",
        "https://api.example.com/x",
    ],
)
def test_check_url_accepts_https_and_loopback_http(url: str):
    assert str(check_url(url)).startswith(url.split("/x")[0])


@pytest.mark.parametrize(
    "url",
    [
        "/relative/path",
        "api.example.com/x",
        "ftp://api.example.com/x",
        "http://api.example.com/x",
        "http://10.0.0.1/x",
        "https://user:pw@api.example.com/x",
        "",
    ],
)
def test_check_url_refuses_relative_non_http_and_plain_http_off_loopback(url: str):
    with pytest.raises(InvalidURL):
        check_url(url)


def test_check_url_refuses_non_strings_with_type_error():
    with pytest.raises(TypeError) as info:
        check_url(42)  # type: ignore[arg-type]
    assert info.value.code == "invalid", info.value


def test_retry_after_reads_seconds_and_http_dates():
    now = datetime(2030, 1, 1, tzinfo=UTC)

    def http_date(delta: timedelta) -> str:
        return format_datetime(now + delta, usegmt=True)

    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(http_date(timedelta(seconds=30)), now=now) == 30.0
    assert retry_after_seconds(http_date(-timedelta(hours=1)), now=now) == 0.0
    assert retry_after_seconds("soon") is None


# --- auth headers from the provider definition --------------------------------


@pytest.mark.parametrize(
    ("key", "creds", "header", "value"),
    [
        ("openai", {"api_key": SECRET}, "Authorization", f"Bearer {SECRET}"),
        ("google", {"access_token": SECRET}, "Authorization", f"Bearer {SECRET}"),
        ("discord", {"bot_token": SECRET}, "Authorization", f"Bot {SECRET}"),
        ("elevenlabs", {"api_key": SECRET}, "xi-api-key", SECRET),
        ("brevo", {"api_key": SECRET}, "api-key", SECRET),
        (
            "twilio",
            {"account_sid": "AC" + "0" * 32, "auth_token": SECRET},
            "Authorization",
            "Basic " + base64.b64encode(f"AC{'0' * 32}:{SECRET}".encode()).decode(),
        ),
    ],
)
def test_auth_header_comes_from_the_provider_definition(
    key: str, creds: dict[str, str], header: str, value: str
):
    headers, url = auth_for(REGISTRY.get(key), creds, "https://example.test/v1/x")
    assert headers == {header: value}
    assert url == "https://example.test/v1/x"


def test_path_token_is_put_in_front_of_the_url_path_once():
    telegram = REGISTRY.get("telegram")
    headers, url = auth_for(telegram, {"bot_token": TOKEN}, "https://api.telegram.org/getMe?x=1")
    assert headers == {}
    assert url == f"https://api.telegram.org/bot{TOKEN}/getMe?x=1"
    assert auth_for(telegram, {"bot_token": TOKEN}, url)[1] == url


def test_bot_url_builds_the_telegram_method_url():
    telegram = REGISTRY.get("telegram")
    assert (
        bot_url(telegram, {"bot_token": TOKEN}, "sendMessage")
        == f"https://api.telegram.org/bot{TOKEN}/sendMessage"
    )
    with pytest.raises(ValueError, match="does not carry its token in the URL path"):
        bot_url(REGISTRY.get("discord"), {"bot_token": TOKEN}, "sendMessage")


def test_sigv4_signs_with_botocore():
    aws = REGISTRY.get("aws")
    creds = {"access_key": "AKIDEXAMPLE", "secret_key": SECRET, "session_token": "tok-123"}
    headers, _url = auth_for(
        aws, creds, "https://sts.eu-west-1.amazonaws.com/?Action=GetCallerIdentity"
    )
    assert headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
    assert "/eu-west-1/sts/aws4_request" in headers["Authorization"]
    assert headers["X-Amz-Security-Token"] == "tok-123"
    assert SECRET not in str(headers)


def test_missing_credentials_raise_typed_errors():
    with pytest.raises(NotConnected):
        auth_for(REGISTRY.get("github"), {"client_id": "x"}, "https://api.github.com/user")
    with pytest.raises(NotConfigured):
        auth_for(REGISTRY.get("openai"), {"api_key": "  "}, "https://api.openai.com/v1/models")


def test_header_values_with_line_breaks_are_refused_without_echoing_them():
    with pytest.raises(InvalidField) as info:
        auth_for(REGISTRY.get("openai"), {"api_key": SECRET + "\r\nX: y"}, "https://a.test/")
    assert SECRET not in str(info.value)


# --- the allow-list is enforced before anything is sent ------------------------


async def test_host_not_in_api_hosts_is_refused_before_sending(server: Server, http: HttpClient):
    with pytest.raises(HostNotAllowed) as info:
        await http.request(
            "GET", server.url("/echo", "localhost"), provider=LOOP, credentials=CREDS
        )
    assert server.rec.hits == []
    assert SECRET not in str(info.value)
    assert info.value.code == "host_not_allowed"


async def test_allow_any_host_is_an_explicit_opt_out(server: Server, http: HttpClient):
    response = await http.request(
        "GET",
        server.url("/echo", "localhost"),
        provider=LOOP,
        credentials=CREDS,
        allow_any_host=True,
    )
    assert response.json()["headers"]["Authorization"] == f"Bearer {SECRET}"


async def test_host_with_port_allows_only_that_port(
    server: Server, other: Server, http: HttpClient
):
    pinned = LOOP.model_copy(update={"api_hosts": (f"127.0.0.1:{server.port}",)})
    ok = await http.request("GET", server.url("/echo"), provider=pinned, credentials=CREDS)
    assert ok.status == 200
    with pytest.raises(HostNotAllowed):
        await http.request("GET", other.url("/echo"), provider=pinned, credentials=CREDS)
    assert other.rec.hits == []


async def test_plain_http_to_a_non_loopback_host_is_refused(http: HttpClient):
    public = LOOP.model_copy(update={"api_hosts": ("api.example.com",)})
    with pytest.raises(InvalidURL):
        await http.request("GET", "http://api.example.com/v1", provider=public, credentials=CREDS)


async def test_relative_url_is_refused(http: HttpClient):
    with pytest.raises(InvalidURL):
        await http.request("GET", "/v1/models", provider=LOOP, credentials=CREDS)


# --- requests -------------------------------------------------------------------


async def test_request_adds_auth_and_returns_the_read_response(server: Server, http: HttpClient):
    response = await http.request(
        "post",
        server.url("/echo"),
        provider=LOOP,
        credentials=CREDS,
        json={"a": 1},
        params={"q": "1"},
        headers={"X-Trace": "t"},
    )
    assert response.ok and response.status == 200
    payload = response.json()
    assert payload["method"] == "POST"
    assert payload["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert payload["headers"]["X-Trace"] == "t"
    assert payload["headers"]["Content-Type"] == "application/json"
    assert payload["body"] == '{"a": 1}'
    assert response.url.endswith("/echo?q=1")
    assert isinstance(response.body, bytes) and response.text.startswith("{")


async def test_path_token_request_and_response_never_show_the_token(
    server: Server, http: HttpClient
):
    response = await http.request(
        "GET", server.url("/getMe"), provider=LOOP_BOT, credentials={"bot_token": TOKEN}
    )
    assert response.json()["path"] == f"/bot{TOKEN}/getMe"
    assert TOKEN not in response.url
    assert TOKEN not in repr(response)
    assert "/bot***/getMe" in response.url


async def test_response_repr_and_text(server: Server, http: HttpClient):
    response = await http.request("GET", server.url("/latin1"))
    assert response.text == "café"
    assert SECRET not in repr(response)
    assert repr(response) == f"<Response 200 {server.url('/latin1')}>"


def test_response_json_and_ok():
    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
    response = Response(status=404, headers=headers, body=b'{"a": [1]}', url="https://x.test/")
    assert response.json() == {"a": [1]}
    assert not response.ok
    with pytest.raises(ValueError):
        Response(status=200, headers=headers, body=b"<html>", url="https://x.test/").json()


async def test_auth_keyword_is_refused(server: Server, http: HttpClient):
    with pytest.raises(TypeError) as info:
        await http.request(
            "GET",
            server.url("/echo"),
            provider=LOOP,
            credentials=CREDS,
            auth=("a", "b"),
        )
    assert info.value.code == "invalid", info.value
    assert server.rec.hits == []


# --- redirects -------------------------------------------------------------------


async def test_cross_host_redirect_strips_credentials(
    server: Server, other: Server, http: HttpClient
):
    target = other.url("/echo", "localhost")
    response = await http.request(
        "GET",
        server.url("/redirect"),
        provider=LOOP,
        credentials=CREDS,
        params={"to": target},
        headers={"Cookie": "session=abc", "X-Keep": "1"},
    )
    assert response.status == 200
    assert response.url == target
    received = response.json()["headers"]
    assert "Authorization" not in received
    assert "Cookie" not in received
    assert received["X-Keep"] == "1"
    assert server.rec.hits[0][2]["Authorization"] == f"Bearer {SECRET}"


async def test_cross_port_redirect_counts_as_another_origin(
    server: Server, other: Server, http: HttpClient
):
    response = await http.request(
        "GET",
        server.url("/redirect"),
        provider=LOOP,
        credentials=CREDS,
        params={"to": other.url("/echo")},
    )
    assert "Authorization" not in response.json()["headers"]


async def test_same_origin_redirect_keeps_credentials(server: Server, http: HttpClient):
    response = await http.request(
        "GET",
        server.url("/redirect"),
        provider=LOOP,
        credentials=CREDS,
        params={"to": "/echo"},
    )
    assert response.json()["headers"]["Authorization"] == f"Bearer {SECRET}"


async def test_custom_auth_header_is_stripped_on_cross_host_redirect(
    server: Server, other: Server, http: HttpClient
):
    custom = LOOP.model_copy(
        update={"auth_header": AuthHeader(name="xi-api-key", template="{api_key}")}
    )
    response = await http.request(
        "GET",
        server.url("/redirect"),
        provider=custom,
        credentials=CREDS,
        params={"to": other.url("/echo", "localhost")},
    )
    assert "xi-api-key" not in {k.lower() for k in response.json()["headers"]}
    assert SECRET not in response.text


async def test_redirect_carrying_a_path_token_to_another_host_is_refused(
    server: Server, other: Server, http: HttpClient
):
    with pytest.raises(RequestFailed) as info:
        await http.request(
            "GET",
            server.url("/redirect"),
            provider=LOOP_BOT,
            credentials={"bot_token": TOKEN},
            params={"to": other.url(f"/bot{TOKEN}/getMe", "localhost")},
        )
    assert other.rec.hits == []
    assert TOKEN not in str(info.value)
    assert TOKEN not in repr(info.value)


async def test_send_strips_a_callers_authorization_on_cross_host_redirect(
    server: Server, other: Server, http: HttpClient
):
    response = await http.request(
        "POST",
        server.url("/redirect"),
        params={"status": "307", "to": other.url("/echo", "localhost")},
        headers={"Authorization": "Basic Y2xpZW50OnNlY3JldA=="},
        data={"grant_type": "client_credentials"},
    )
    payload = response.json()
    assert payload["method"] == "POST"
    assert payload["body"] == "grant_type=client_credentials"
    assert "Authorization" not in payload["headers"]


async def test_303_after_post_becomes_a_get_without_body(server: Server, http: HttpClient):
    response = await http.request(
        "POST",
        server.url("/redirect"),
        provider=LOOP,
        credentials=CREDS,
        params={"status": "303", "to": "/echo"},
        json={"a": 1},
    )
    assert response.json()["method"] == "GET"
    assert response.json()["body"] == ""


async def test_redirect_is_returned_when_following_is_off(server: Server, http: HttpClient):
    response = await http.request(
        "GET",
        server.url("/redirect"),
        provider=LOOP,
        credentials=CREDS,
        params={"to": "/echo"},
        allow_redirects=False,
    )
    assert response.status == 302
    assert server.rec.count("/echo") == 0


async def test_redirect_to_plain_http_off_loopback_is_refused(server: Server, http: HttpClient):
    with pytest.raises(RequestFailed):
        await http.request(
            "GET",
            server.url("/redirect"),
            provider=LOOP,
            credentials=CREDS,
            params={"to": "http://example.com/"},
        )


async def test_redirect_loop_is_bounded(server: Server, http: HttpClient):
    with pytest.raises(RequestFailed):
        await http.request("GET", server.url("/loop"), provider=LOOP, credentials=CREDS)
    assert server.rec.count("/loop") == 11


# --- retries ---------------------------------------------------------------------


async def test_idempotent_request_is_retried_on_503_then_succeeds(server: Server, http: HttpClient):
    server.rec.plan = [503, 502]
    response = await http.request("GET", server.url("/flaky"), provider=LOOP, credentials=CREDS)
    assert response.status == 200
    assert server.rec.count("/flaky") == 3


async def test_attempts_are_bounded_and_the_last_response_returned(
    server: Server, http: HttpClient
):
    server.rec.plan = [429] * 10
    response = await http.request(
        "PUT", server.url("/flaky"), provider=LOOP, credentials=CREDS, max_attempts=4
    )
    assert response.status == 429
    assert server.rec.count("/flaky") == 4


async def test_post_is_not_retried(server: Server, http: HttpClient):
    server.rec.plan = [503]
    response = await http.request("POST", server.url("/flaky"), provider=LOOP, credentials=CREDS)
    assert response.status == 503
    assert server.rec.count("/flaky") == 1


async def test_500_is_not_retried(server: Server, http: HttpClient):
    server.rec.plan = [500]
    response = await http.request("GET", server.url("/flaky"), provider=LOOP, credentials=CREDS)
    assert response.status == 500
    assert server.rec.count("/flaky") == 1


async def test_retry_after_seconds_is_honoured(server: Server):
    server.rec.plan = [503]
    server.rec.retry_after = "1"
    async with HttpClient(backoff=0, max_backoff=30) as http:
        started = time.monotonic()
        response = await http.request("GET", server.url("/flaky"), provider=LOOP, credentials=CREDS)
    assert response.status == 200
    assert time.monotonic() - started >= 0.9


async def test_retry_after_is_capped_by_max_backoff(server: Server):
    server.rec.plan = [503, 503]
    server.rec.retry_after = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    async with HttpClient(backoff=0, max_backoff=0.05) as http:
        started = time.monotonic()
        response = await http.request("GET", server.url("/flaky"), provider=LOOP, credentials=CREDS)
    assert response.status == 200
    # Waited max_backoff (0.05 s) twice, not the hour the server asked for.
    assert time.monotonic() - started < 60


async def test_connection_errors_are_retried_then_fail_without_secrets(http: HttpClient):
    with pytest.raises(RequestFailed) as info:
        await http.request("GET", "http://127.0.0.1:9/echo", provider=LOOP, credentials=CREDS)
    assert info.value.context["attempts"] == 3
    assert SECRET not in str(info.value)


async def test_path_token_never_appears_in_a_failure(http: HttpClient):
    with pytest.raises(RequestFailed) as info:
        await http.request(
            "GET", "http://127.0.0.1:9/getMe", provider=LOOP_BOT, credentials={"bot_token": TOKEN}
        )
    assert TOKEN not in str(info.value)
    assert info.value.__cause__ is None or TOKEN not in repr(info.value.__cause__)


async def test_each_attempt_is_bounded_by_the_timeout(server: Server):
    async with HttpClient(timeout=0.2, backoff=0) as http:
        with pytest.raises(RequestFailed, match="timed out"):
            await http.request(
                "GET", server.url("/slow"), provider=LOOP, credentials=CREDS, max_attempts=2
            )
    # Both attempts were cut off by the timeout: unbounded, the first would have been
    # answered (after 5 s) and none would have failed.
    assert server.rec.count("/slow") == 2


async def test_a_body_that_cannot_be_replayed_is_sent_once(server: Server, http: HttpClient):
    server.rec.plan = [503]

    async def stream() -> AsyncIterator[bytes]:
        yield b"chunk"

    response = await http.request(
        "PUT", server.url("/flaky"), provider=LOOP, credentials=CREDS, data=stream()
    )
    assert response.status == 503
    assert server.rec.count("/flaky") == 1


# --- lifecycle -------------------------------------------------------------------


async def test_an_injected_session_is_never_closed(server: Server):
    async with aiohttp.ClientSession() as session:
        http = HttpClient(session)
        response = await http.request("GET", server.url("/echo"))
        assert response.status == 200
        await http.close()
        assert not session.closed


async def test_own_session_is_created_lazily_and_closed(server: Server):
    http = HttpClient()
    assert http._session is None
    await http.request("GET", server.url("/echo"))
    session = http._session
    assert session is not None
    await http.close()
    assert session.closed
    with pytest.raises(LifecycleError):
        await http.request("GET", server.url("/echo"))


async def test_a_request_in_flight_when_the_client_closes_raises_a_library_error(server: Server):
    """close() ends the session under a request in flight; the retry that follows finds the
    client closed and raises LifecycleError, never aiohttp's own RuntimeError."""
    http = HttpClient(backoff=0.01, max_backoff=0.05, timeout=5)
    calling = asyncio.create_task(
        http.request("GET", server.url("/slow"), provider=LOOP, credentials=CREDS)
    )
    for _ in range(250):
        if server.rec.count("/slow"):
            break
        await asyncio.sleep(0.02)
    await http.close()
    [outcome] = await asyncio.gather(calling, return_exceptions=True)
    assert isinstance(outcome, IntegrationsError), f"raw {outcome!r} escaped the library"


async def test_an_injected_session_closed_by_its_owner_raises_lifecycle_error(server: Server):
    session = aiohttp.ClientSession()
    http = HttpClient(session)
    await session.close()
    with pytest.raises(LifecycleError):
        await http.request("GET", server.url("/echo"))


def test_invalid_client_settings_are_refused():
    with pytest.raises(ValueError, match="max_attempts must be at least 1"):
        HttpClient(max_attempts=0)
    with pytest.raises(ValueError, match="backoff and max_backoff must be >= 0"):
        HttpClient(timeout=0)


async def test_method_must_be_a_name(server: Server, http: HttpClient):
    bad: Any = "GET /x"
    with pytest.raises(ValueError) as info:
        await http.request(bad, server.url("/echo"))
    assert info.value.code == "invalid", info.value
