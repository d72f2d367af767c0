"""Auth schemes: an application's own scheme works end to end; names are refused twice; no
part of the package branches on a kind's name outside the schemes."""

from __future__ import annotations

import ast
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import integrations
from integrations import (
    AuthScheme,
    ConfigurationError,
    Integrations,
    NotConfigured,
    Provider,
    RejectedAnswer,
)
from integrations._schemes import SCHEMES

from .conftest import TEST_KEY
from .hmac_scheme import HmacScheme, signature
from .test_cli import sh

PACKAGE = Path(integrations.__file__).parent
SECRET = "S3CR3T-cli-marker-0123456789-hmac"


class SignedApi:
    """A loopback API that accepts only HMAC-signed requests with a nonce it issued; a
    request with a stale nonce gets 400 ``{"error": "stale_nonce"}`` and a new one."""

    def __init__(self, key_id: str, secret: str) -> None:
        self.key_id, self.secret = key_id, secret
        self.nonces: set[str] = set()
        self.seen: list[tuple[str, int]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        nonce = request.headers.get("X-Nonce", "")
        if nonce not in self.nonces:
            fresh = secrets.token_hex(8)
            self.nonces.add(fresh)
            self.seen.append((nonce, 400))
            return web.json_response(
                {"error": "stale_nonce"}, status=400, headers={"X-Next-Nonce": fresh}
            )
        self.nonces.discard(nonce)
        expected = signature(self.secret, request.method, request.path_qs, nonce, body)
        if (
            request.headers.get("X-Key-Id") != self.key_id
            or request.headers.get("X-Signature") != expected
        ):
            self.seen.append((nonce, 401))
            return web.json_response({"error": "bad signature"}, status=401)
        self.seen.append((nonce, 200))
        return web.json_response({"ok": True, "echo": body.decode()})


@pytest.fixture
async def api() -> AsyncIterator[tuple[SignedApi, str]]:
    signed = SignedApi("key-1", SECRET)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", signed.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield signed, f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


def signed_provider() -> Provider:
    return Provider(
        key="signed",
        name="Signed API",
        auth_type="hmac-demo",
        api_hosts=("127.0.0.1",),
        rejected_answers=(RejectedAnswer(statuses=(400,), key="error", values=("stale_nonce",)),),
    )


@pytest.fixture
async def integ(fresh_db: str) -> AsyncIterator[Integrations]:
    async with Integrations(
        fresh_db, keys=TEST_KEY, providers=[signed_provider()], auth_schemes=[HmacScheme()]
    ) as instance:
        yield instance


async def test_an_application_scheme_works_end_to_end(
    integ: Integrations, api: tuple[SignedApi, str], db: asyncpg.Connection
) -> None:
    server, base = api
    provider = integ.providers.get("signed")
    assert [f.key for f in provider.setup_fields] == ["key_id", "signing_secret"]
    assert provider.secret_field_keys == {"signing_secret"}
    conn = await integ.add_connection("signed", "main")
    saved = await integ.save_setup(conn.uuid, {"key_id": "key-1", "signing_secret": SECRET})
    assert saved["status"] == "connected"
    assert SECRET not in json.dumps(saved)

    # Encrypted at rest, masked in listings, plaintext only from get_credentials.
    raw = json.loads(
        await db.fetchval(
            "SELECT value_json::text FROM integrations.connections WHERE uuid = $1", conn.uuid
        )
    )
    assert isinstance(raw["signing_secret"], dict) and "$enc" in raw["signing_secret"]
    assert raw["key_id"] == "key-1"
    (listed,) = await integ.list_connections("signed")
    assert SECRET not in json.dumps(listed.data) and listed.data["key_id"] == "key-1"
    assert (await integ.get_credentials(conn.uuid))["signing_secret"] == SECRET

    # Signed by the scheme's flow: the stale nonce is rejected, the flow signs once more.
    response = await integ.authenticated_request(
        conn.uuid, "POST", f"{base}/v1/things?x=1", json={"n": 1}
    )
    assert response.status == 200, response.text
    assert response.json() == {"ok": True, "echo": '{"n": 1}'}
    assert [status for _, status in server.seen] == [400, 200]

    # Never more than one renewal: a server that keeps refusing gets two requests.
    server.secret = "another"
    server.seen.clear()
    refused = await integ.authenticated_request(conn.uuid, "GET", f"{base}/v1/things")
    assert refused.status == 401
    assert [status for _, status in server.seen] == [400, 401]

    # disconnect drops what the scheme says, keeps the rest.
    await integ.disconnect(conn.uuid)
    after = await integ.get_integration_by_uuid(conn.uuid)
    assert after.data["status"] == "disconnected"
    assert "signing_secret" not in after.data and after.data["key_id"] == "key-1"
    with pytest.raises(NotConfigured) as info:
        await integ.authenticated_request(conn.uuid, "GET", f"{base}/v1/things")
    assert info.value.code == "not_configured"


async def test_a_scheme_name_is_registered_once(fresh_db: str) -> None:
    with pytest.raises(ConfigurationError, match="already registered"):
        Integrations(fresh_db, keys=TEST_KEY, auth_schemes=[HmacScheme(), HmacScheme()])

    class Shadow(AuthScheme):
        name = "api_key"

    with pytest.raises(ConfigurationError, match="'api_key' is already registered"):
        Integrations(fresh_db, keys=TEST_KEY, auth_schemes=[Shadow()])
    with pytest.raises(ConfigurationError, match="already registered"):
        integrations.register_auth_scheme(Shadow())
    assert "hmac-demo" not in SCHEMES  # an instance's schemes stay its own

    class Nameless(AuthScheme):
        name = "Has Spaces"

    with pytest.raises(ConfigurationError, match="name must match"):
        Integrations(fresh_db, keys=TEST_KEY, auth_schemes=[Nameless()])
    with pytest.raises(TypeError, match="expected an AuthScheme instance"):
        Integrations(fresh_db, keys=TEST_KEY, auth_schemes=[object()])  # type: ignore[list-item]


def test_a_provider_of_an_unregistered_scheme_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"'hmac-demo'.*register it"):
        Integrations("postgresql://unused", keys=TEST_KEY, providers=[signed_provider()])


def test_the_cli_sets_up_an_application_scheme(fresh_db: str) -> None:
    spec = "tests.hmac_scheme:providers"
    uuid = sh(fresh_db, "--providers", spec, "add", "signed").stdout.strip()
    done = sh(
        fresh_db,
        "--providers",
        spec,
        "set",
        "signed",
        "key_id=key-1",
        "signing_secret=@-",
        stdin=SECRET + "\n",
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(sh(fresh_db, "--providers", spec, "show", uuid, "--json").stdout)
    assert shown["data"]["key_id"] == "key-1"
    assert shown["data"]["signing_secret"].startswith("••")
    providers = sh(fresh_db, "--providers", spec, "providers").stdout
    assert "signed" in providers


async def test_the_console_form_has_the_schemes_fields(integ: Integrations) -> None:
    from integrations.web import Admin, console

    from .webkit import client, csrf_of

    http = client(console(integ, authorize=lambda request: Admin()))
    page = await http.get("/")
    added = await http.post(
        "/connections",
        data={"csrf_token": csrf_of(page.text), "provider": "signed", "name": "main"},
    )
    assert added.status_code == 303, added.text
    setup = await http.get(added.headers["location"])
    html = setup.text
    assert '<label for="field-key_id">Key ID</label>' in html
    assert '<label for="field-signing_secret">Signing secret</label>' in html
    assert 'id="field-signing_secret"' in html and 'type="password"' in html
    uuid = added.headers["location"].split("/")[-1].split("?")[0]
    saved = await http.post(
        f"/{uuid}/setup",
        data={"csrf_token": csrf_of(html), "key_id": "key-1", "signing_secret": SECRET},
    )
    assert saved.status_code == 303, saved.text
    assert (await integ.get_credentials(uuid))["signing_secret"] == SECRET
    assert SECRET not in (await http.get(f"/{uuid}")).text
    await http.aclose()


def test_rejected_answers_read_the_body() -> None:
    slack = Provider(
        key="chat",
        name="Chat",
        auth_type="oauth2",
        authorize_url="https://chat.example/oauth/authorize",
        token_url="https://chat.example/oauth/token",
        rejected_answers=(RejectedAnswer(values=("token_expired",)),),
    )
    assert slack.rejects(401, b"")
    assert slack.rejects(200, b'{"ok": false, "error": "token_expired"}')
    assert not slack.rejects(200, b'{"ok": false, "error": "channel_not_found"}')
    assert not slack.rejects(200, b"not json")
    assert not slack.rejects(400, b'{"error": "token_expired"}')
    nested = RejectedAnswer(statuses=(403,), key="error.code", values=("expired",))
    assert nested.matches(403, b'{"error": {"code": "expired"}}')
    assert not nested.matches(403, b'{"error": "expired"}')
    with pytest.raises(ValueError, match="a rejected answer names a key"):
        RejectedAnswer(values=())


# -- no branch on a kind's name outside its scheme -----------------------------------------

# Event kinds (``event.kind == "resync"``) are another matter: only an auth type, or the kind
# of something whose name says it is about auth (a header, a scheme), counts.
_AUTHISH = ("auth", "header", "scheme")


def _names_a_kind(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        if node.attr == "auth_type":
            return True
        return node.attr == "kind" and any(w in ast.unparse(node.value) for w in _AUTHISH)
    if isinstance(node, ast.Name):
        return node.id in ("auth_type", "auth_kind", "header_kind")
    return False


def _literal_strings(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_literal_strings(e) for e in node.elts)
    return False


def kind_branches(source: str) -> list[int]:
    """Lines that compare an auth type or an auth header's kind with string literals:
    ``==``, ``!=``, ``in``, ``not in``, ``match``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_names_a_kind(o) for o in operands) and any(
                _literal_strings(o) for o in operands
            ):
                found.append(node.lineno)
        elif isinstance(node, ast.Match) and _names_a_kind(node.subject):
            found.append(node.lineno)
    return found


def test_the_detector_finds_branches_on_a_kind() -> None:
    assert kind_branches("if p.auth_type == 'oauth2': pass") == [1]
    assert kind_branches("x = 1\nif header.kind in ('basic', 'path'): pass") == [2]
    assert kind_branches("if 'oauth2' != provider.auth_type: pass") == [1]
    assert kind_branches("match header.kind:\n    case 'path': pass") == [1]
    assert kind_branches("if event.kind == RESYNC: pass") == []
    assert kind_branches("if event.kind == 'resync': pass") == []
    assert kind_branches("if provider.auth_header.kind == 'sigv4': pass") == [1]
    assert kind_branches("if auth_type not in ['a']: pass") == [1]
    assert kind_branches("if p.scheme.freeform: pass") == []


def test_no_module_branches_on_a_kinds_name_outside_the_schemes() -> None:
    schemes = PACKAGE / "_schemes"
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if schemes in path.parents:
            continue
        for line in kind_branches(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    assert offenders == []
