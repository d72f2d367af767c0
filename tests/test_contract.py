"""The public contract, black-box: names, signatures, error codes and seed semantics.

Only the public API (``import integrations``) is used, plus the shared fixtures and the
loopback OAuth server. Each test names the contract line it checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import integrations
from integrations import HostNotAllowed, Integrations, IntegrationsError, MissingField, Provider

from .conftest import TEST_KEY, save_and_settle
from .oauth_server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, OAuthTestServer
from .oauthkit import (
    REDIRECT_URI,
    approve,
    connect,
    eventually,
    loopback_provider,
    new_connection,
    open_integrations,
    set_stored_expiry,
)

# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def raises_code(code: str) -> Iterator[None]:
    """The block raises the IntegrationsError of exactly ``code``."""
    with pytest.raises(IntegrationsError) as info:
        yield
    assert info.value.code == code, info.value


def code_of(exc_info: pytest.ExceptionInfo[BaseException]) -> str:
    return getattr(exc_info.value, "code", None)  # type: ignore[return-value]


@pytest.fixture
async def oauth_server() -> AsyncIterator[OAuthTestServer]:
    async with OAuthTestServer() as srv:
        yield srv


@pytest.fixture
async def ointeg(fresh_db: str, oauth_server: OAuthTestServer) -> AsyncIterator[Integrations]:
    async with open_integrations(fresh_db, oauth_server.base_url) as instance:
        yield instance


class Echo:
    """A loopback API that records the headers it was sent."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.server: TestServer | None = None

    async def handler(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        return web.json_response({"path": request.path, "ok": True}, headers={"X-Probe": "yes"})

    @property
    def base(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    e = Echo()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", e.handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    e.server = server
    yield e
    await server.close()


def api_key_provider(**over: Any) -> Provider:
    fields: dict[str, Any] = {
        "key": "echoapi",
        "name": "Probe API",
        "auth_type": "api_key",
        "api_hosts": ["127.0.0.1"],
    }
    fields.update(over)
    return Provider(**fields)


@pytest.fixture
async def pinteg(fresh_db: str) -> AsyncIterator[Integrations]:
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[api_key_provider()]) as inst:
        yield inst


# ----------------------------------------------------------------------------- surface

DESIGN_METHODS: dict[str, tuple[list[str], dict[str, Any], bool]] = {
    # name: (positional params after self, keyword-only params with defaults, is_async)
    "add_connection": (["provider", "name"], {"actor": None, "owner": None}, True),
    "rename_connection": (["uuid", "new_name"], {"actor": None}, True),
    "remove_connection": (["uuid"], {"actor": None}, True),
    "list_connections": (["provider"], {"owner": None}, True),
    "load_all_connections": (["providers"], {"owner": None}, True),
    "list_integrations": ([], {"owner": None}, True),
    "list_providers": ([], {}, False),
    "get_integration": (["ref"], {}, True),
    "get_integration_by_uuid": (["uuid"], {}, True),
    "find_uuid_by_provider_name": (["ref"], {}, True),
    "resolve_to_uuid": (["value"], {}, True),
    "get_credentials": (["ref"], {}, True),
    "is_connected": (["uuid"], {}, True),
    "save_setup": (["uuid", "attrs"], {"actor": None}, True),
    "disconnect": (["uuid"], {"actor": None}, True),
    "validate_connection": (["uuid"], {"actor": None}, True),
    "validate_credentials": (["provider", "attrs"], {}, True),
    "record_validation": (["uuid", "result"], {}, True),
    "authorization_url": (["uuid", "redirect_uri"], {"scopes": None, "state": None}, True),
    "exchange_code": (["uuid", "code", "redirect_uri"], {"actor": None}, True),
    "refresh_access_token": (["uuid"], {}, True),
    "authenticated_request": (["uuid", "method", "url"], {}, True),
    "run_legacy_migrations": ([], {}, True),
    "settings_key": (["ref"], {}, False),
    "migrate": ([], {}, True),
    "begin_authorization": (["uuid", "redirect_uri"], {"scopes": None, "actor": None}, True),
    "complete_authorization": (["state"], {"code": None, "error": None}, True),
    "access_token": (["uuid"], {}, True),
    "rotate_keys": ([], {}, True),
}


@pytest.mark.parametrize("name", sorted(DESIGN_METHODS))
def test_design_method_exists_with_signature(name: str) -> None:
    positional, kwonly, is_async = DESIGN_METHODS[name]
    method = getattr(Integrations, name)
    assert inspect.iscoroutinefunction(method) is is_async, name
    params = list(inspect.signature(method).parameters.values())[1:]
    pos = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert pos == positional, (name, pos)
    kw = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    for key, default in kwonly.items():
        assert key in kw and kw[key] == default, (name, key, kw)
    if name == "authenticated_request":
        assert any(p.kind is p.VAR_KEYWORD for p in params)


def test_subscribe_signature_and_module_level_helpers() -> None:
    sig = inspect.signature(Integrations.subscribe)
    for key, default in {"provider": None, "uuid": None, "maxsize": 1000}.items():
        assert sig.parameters[key].kind is inspect.Parameter.KEYWORD_ONLY
        assert sig.parameters[key].default == default
    assert integrations.settings_key("google") == "integration:google:default"
    assert integrations.settings_key("google:personal") == "integration:google:personal"
    state = integrations.oauth.generate_state()
    assert isinstance(state, str) and len(state) >= 20
    assert state != integrations.oauth.generate_state()
    key = integrations.generate_key()
    assert isinstance(key, str) and key != integrations.generate_key()


def test_constructor_keywords() -> None:
    sig = inspect.signature(Integrations.__init__)
    assert list(sig.parameters)[1] == "dsn"
    for key, default in {
        "pool": None,
        "http": None,
        "keys": None,
        "providers": None,
        "leeway": 60,
        "auto_migrate": True,
    }.items():
        assert sig.parameters[key].default == default, key
    assert "encryption" in sig.parameters


ERROR_CODES = [
    "empty_name",
    "invalid_name",
    "already_exists",
    "not_configured",
    "deleted",
    "invalid_uuid",
    "invalid",
    "not_found",
    "invalid_provider_key",
    "host_not_allowed",
]


def test_every_named_error_code_exists_under_one_root() -> None:
    codes = {}
    for name in integrations.__all__:
        obj = getattr(integrations, name)
        if isinstance(obj, type) and issubclass(obj, IntegrationsError):
            codes[obj.code] = obj
    for code in ERROR_CODES:
        assert code in codes, code


def test_connection_and_event_models() -> None:
    fields = {f for f in integrations.Connection.__dataclass_fields__}  # type: ignore[attr-defined]
    assert {"uuid", "provider", "name", "owner", "data"} <= fields
    ev = integrations.Event(kind="connection_added", uuid="u")
    for attr in (
        "kind",
        "uuid",
        "provider",
        "name",
        "owner",
        "status",
        "previous_status",
        "actor",
        "at",
        "detail",
    ):
        assert hasattr(ev, attr), attr
    with pytest.raises(AttributeError):
        ev.kind = "x"  # type: ignore[misc]


def test_provider_keyword_construction_and_clash_refusal() -> None:
    p = Provider(
        key="acme",
        name="Acme",
        auth_type="oauth2",
        authorize_url="https://acme.example/authorize",
        token_url="https://acme.example/token",
        userinfo_url="https://acme.example/userinfo",
        revoke_url="https://acme.example/revoke",
        scopes=["read", "write"],
        api_hosts=["api.acme.example"],
    )
    assert p.key == "acme" and tuple(p.scopes) == ("read", "write")
    clash = Provider(key="google", name="Mine", auth_type="api_key", api_hosts=["x.example"])
    with raises_code("provider_conflict"):
        Integrations("postgresql://nowhere/db", keys=TEST_KEY, providers=[clash])
    Integrations(
        "postgresql://nowhere/db",
        keys=TEST_KEY,
        providers=[clash.model_copy(update={"override": True})],
    )


async def test_list_providers_sync_and_settings_key_instance(integ: Integrations) -> None:
    providers = integ.list_providers()
    assert providers and all(isinstance(p, Provider) for p in providers)
    assert {"google", "openai", "telegram", "smtp"} <= {p.key for p in providers}
    assert integ.settings_key("google") == "integration:google:default"


# ----------------------------------------------------------------------------- lifecycle


async def test_lifecycle_errors(fresh_db: str) -> None:
    inst = Integrations(fresh_db, keys=TEST_KEY)
    with raises_code("lifecycle"):
        await inst.list_integrations()
    await inst.open()
    with raises_code("lifecycle"):
        await inst.open()
    await inst.close()
    with raises_code("lifecycle"):
        await inst.list_integrations()


async def test_auto_migrate_false_error_says_migrate_and_migrate_is_callable(
    empty_db: str,
) -> None:
    """DESIGN: open() with auto_migrate=False raises a clear error saying to run migrate().

    Following that advice with the same configuration must be possible: migrate() on the
    object whose open() refused, or on a fresh auto_migrate=False object, then open().
    """
    inst = Integrations(empty_db, keys=TEST_KEY, auto_migrate=False)
    with pytest.raises(IntegrationsError) as info:
        await inst.open()
    assert code_of(info) == "schema_outdated"
    assert "migrate" in str(info.value)
    migrated = False
    for candidate in (inst, Integrations(empty_db, keys=TEST_KEY, auto_migrate=False)):
        try:
            await candidate.migrate()
            migrated = True
            break
        except IntegrationsError:
            continue
    assert migrated, "no way to call migrate() without auto_migrate=True"
    async with Integrations(empty_db, keys=TEST_KEY, auto_migrate=False) as ok:
        await ok.add_connection("openai", "default")


async def test_injected_pool_is_not_closed(fresh_db: str) -> None:
    pool = await asyncpg.create_pool(fresh_db, min_size=1, max_size=4)
    try:
        async with Integrations(pool=pool, keys=TEST_KEY) as inst:
            await inst.add_connection("openai", "default")
        assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


async def test_dsn_from_environment(fresh_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTEGRATIONS_DSN", fresh_db)
    async with Integrations(keys=TEST_KEY) as inst:
        conn = await inst.add_connection("openai", "env")
        assert conn.provider == "openai"


# ----------------------------------------------------------------------------- keys


async def test_dsn_without_keys_refuses_secrets_unless_encryption_off(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INTEGRATIONS_KEYS", raising=False)
    async with Integrations(fresh_db) as inst:
        conn = await inst.add_connection("openai", "default")
        with pytest.raises(IntegrationsError) as info:
            await inst.save_setup(conn.uuid, {"api_key": "sk-plain-0123456789"})
        assert code_of(info) == "encryption_not_configured"
        assert "key" in str(info.value).lower()
        # nothing was written
        with raises_code("not_configured"):
            await inst.get_credentials(conn.uuid)
    async with Integrations(fresh_db, encryption="off") as inst:
        await inst.save_setup(conn.uuid, {"api_key": "sk-plain-0123456789"})
        assert (await inst.get_credentials(conn.uuid))["api_key"] == "sk-plain-0123456789"


async def test_keys_from_environment(fresh_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    second = integrations.generate_key()
    monkeypatch.setenv("INTEGRATIONS_KEYS", f"{second},{TEST_KEY}")
    async with Integrations(fresh_db) as inst:
        conn = await inst.add_connection("openai", "default")
        await inst.save_setup(conn.uuid, {"api_key": "sk-env-0123456789"})
    async with Integrations(fresh_db, keys=second) as inst:
        assert (await inst.get_credentials(conn.uuid))["api_key"] == "sk-env-0123456789"


# ----------------------------------------------------------------------------- connections


async def test_names_and_their_errors(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "  work ")
    assert isinstance(conn, integrations.Connection)
    assert conn.name == "work" and conn.provider == "openai" and conn.owner is None
    for bad, code in (
        ("", "empty_name"),
        ("   ", "empty_name"),
        ("a b", "invalid_name"),
        ("-x", "invalid_name"),
        ("x.y", "invalid_name"),
    ):
        with pytest.raises(IntegrationsError) as info:
            await integ.add_connection("openai", bad)
        assert code_of(info) == code, bad
    with pytest.raises(IntegrationsError) as info:
        await integ.add_connection("openai", "work")
    assert code_of(info) == "already_exists"
    # another owner may use the same name
    other = await integ.add_connection("openai", "work", owner="user:1")
    assert other.owner == "user:1"
    with pytest.raises(IntegrationsError) as info:
        await integ.add_connection("no-such-provider", "x")
    assert code_of(info) == "invalid_provider_key"


async def test_rename_and_remove_default(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    await integ.add_connection("openai", "taken")
    data = await integ.rename_connection(conn.uuid, "work")
    assert isinstance(data, dict) and data["name"] == "work"
    assert (await integ.get_integration_by_uuid(conn.uuid)).name == "work"
    assert await integ.rename_connection(conn.uuid, "work") is not None  # no-op
    with pytest.raises(IntegrationsError) as info:
        await integ.rename_connection(conn.uuid, "taken")
    assert code_of(info) == "already_exists"
    await integ.rename_connection(conn.uuid, "default")
    assert await integ.remove_connection(conn.uuid) is None
    with pytest.raises(IntegrationsError) as info:
        await integ.get_credentials(conn.uuid)
    assert code_of(info) == "deleted"


async def test_list_order_and_load_all(integ: Integrations) -> None:
    for name in ("zeta", "alpha", "default", "Beta"):
        await integ.add_connection("openai", name)
    names = [c.name for c in await integ.list_connections("openai")]
    assert names[0] == "default" and names[1:] == sorted(names[1:])
    got = await integ.load_all_connections(["openai", "stripe", "github"])
    assert set(got) == {"openai", "stripe", "github"}
    assert [c.name for c in got["openai"]] == names and got["stripe"] == []


async def test_list_integrations_only_with_saved_data(integ: Integrations) -> None:
    empty = await integ.add_connection("openai", "empty")
    saved = await integ.add_connection("openai", "saved")
    await integ.save_setup(saved.uuid, {"api_key": "sk-0123456789abcdef"})
    uuids = [c.uuid for c in await integ.list_integrations()]
    assert saved.uuid in uuids and empty.uuid not in uuids
    listed = next(c for c in await integ.list_integrations() if c.uuid == saved.uuid)
    assert "sk-0123456789abcdef" not in repr(listed)
    assert listed.data["api_key"] != "sk-0123456789abcdef"


async def test_find_and_resolve(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    work = await integ.add_connection("openai", "work")
    assert await integ.find_uuid_by_provider_name("openai") == conn.uuid
    assert await integ.find_uuid_by_provider_name("openai:work") == work.uuid
    assert await integ.find_uuid_by_provider_name(("openai", "work")) == work.uuid
    for bad in ("", ":x", ("openai",), 42, None, "a:b:c"):
        with pytest.raises(IntegrationsError) as info:
            await integ.find_uuid_by_provider_name(bad)
        assert code_of(info) == "invalid", bad
    with pytest.raises(IntegrationsError) as info:
        await integ.find_uuid_by_provider_name("openai:nope")
    assert code_of(info) == "not_found"
    assert await integ.resolve_to_uuid(work.uuid) == work.uuid
    assert await integ.resolve_to_uuid("openai:work") == work.uuid
    assert await integ.resolve_to_uuid("openai") == conn.uuid
    for bad in ("", None, 12, b"openai"):
        with pytest.raises(IntegrationsError) as info:
            await integ.resolve_to_uuid(bad)
        assert code_of(info) == "invalid", bad
    with pytest.raises(IntegrationsError) as info:
        await integ.resolve_to_uuid("019b669c-3c9d-7256-8ed1-edbc6ae29703")
    assert code_of(info) == "not_found"
    with pytest.raises(IntegrationsError) as info:
        await integ.resolve_to_uuid("openai:nope")
    assert code_of(info) == "not_found"


async def test_uuid_v7(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    assert conn.uuid[14] == "7"


async def test_get_credentials_deleted_vs_not_configured(integ: Integrations) -> None:
    with pytest.raises(IntegrationsError) as info:
        await integ.get_credentials("019b669c-3c9d-7256-8ed1-edbc6ae29703")
    assert code_of(info) == "deleted"
    with pytest.raises(IntegrationsError) as info:
        await integ.get_credentials("openai:nope")
    assert code_of(info) == "not_configured"
    conn = await integ.add_connection("openai", "default")
    with pytest.raises(IntegrationsError) as info:
        await integ.get_credentials(conn.uuid)
    assert code_of(info) == "not_configured"
    await integ.save_setup(conn.uuid, {"api_key": "sk-0123456789abcdef"})
    creds = await integ.get_credentials("openai")
    assert creds["api_key"] == "sk-0123456789abcdef"
    assert (await integ.get_integration(conn.uuid))["api_key"] == "sk-0123456789abcdef"


async def test_get_credentials_not_configured_when_only_a_validation_was_recorded(
    integ: Integrations,
) -> None:
    """DESIGN: 'a row with no credentials → not_configured'. A recorded check is no credential."""
    conn = await integ.add_connection("openai", "default")
    await integ.record_validation(conn.uuid, False)
    with pytest.raises(IntegrationsError) as info:
        await integ.get_credentials(conn.uuid)
    assert code_of(info) == "not_configured"


async def test_get_credentials_not_configured_after_disconnecting_a_checked_api_key(
    integ: Integrations,
) -> None:
    """A disconnected api_key connection has no credentials any more (DESIGN)."""
    conn = await integ.add_connection("openai", "default")
    await integ.save_setup(conn.uuid, {"api_key": "sk-0123456789abcdef"})
    await integ.record_validation(conn.uuid, True)
    await integ.disconnect(conn.uuid)
    with pytest.raises(IntegrationsError) as info:
        await integ.get_credentials(conn.uuid)
    assert code_of(info) == "not_configured"


async def test_owner_isolation_on_listing_and_ref_reads(integ: Integrations) -> None:
    mine = await integ.add_connection("openai", "default", owner="user:1")
    await integ.save_setup(mine.uuid, {"api_key": "sk-owner1-0123456789"})
    assert await integ.list_connections("openai") == []
    assert await integ.list_connections("openai", owner="user:2") == []
    assert await integ.list_integrations() == []
    assert (await integ.load_all_connections(["openai"], owner="user:2"))["openai"] == []
    assert [c.uuid for c in await integ.list_connections("openai", owner="user:1")] == [mine.uuid]
    with raises_code("not_found"):
        await integ.find_uuid_by_provider_name("openai")
    with raises_code("not_configured"):
        await integ.get_credentials("openai:default")
    with raises_code("not_configured"):
        await integ.get_credentials("openai:default", owner="user:2")  # type: ignore[call-arg]


async def test_owner_isolation_get_credentials_by_uuid_with_another_owner(
    integ: Integrations,
) -> None:
    """DESIGN: 'connections of one owner are invisible to every other owner'.

    get_credentials accepts owner=; asking as user:2 must not reveal user:1's secret.
    """
    mine = await integ.add_connection("openai", "default", owner="user:1")
    await integ.save_setup(mine.uuid, {"api_key": "sk-owner1-0123456789"})
    with raises_code("deleted"):
        await integ.get_credentials(mine.uuid, owner="user:2")  # type: ignore[call-arg]


async def test_owner_isolation_get_integration_by_uuid_with_another_owner(
    integ: Integrations,
) -> None:
    mine = await integ.add_connection("openai", "default", owner="user:1")
    await integ.save_setup(mine.uuid, {"api_key": "sk-owner1-0123456789"})
    with raises_code("deleted"):
        await integ.get_integration(mine.uuid, owner="user:2")  # type: ignore[call-arg]


async def test_owner_isolation_resolve_to_uuid_with_another_owner(integ: Integrations) -> None:
    mine = await integ.add_connection("openai", "default", owner="user:1")
    with pytest.raises(IntegrationsError) as info:
        await integ.resolve_to_uuid(mine.uuid, owner="user:2")  # type: ignore[call-arg]
    assert code_of(info) == "not_found"


async def test_save_setup_status_and_merge(integ: Integrations) -> None:
    conn = await integ.add_connection("github", "default")
    data = await integ.save_setup(conn.uuid, {"client_id": "cid", "client_secret": "csecret"})
    assert isinstance(data, dict) and data["status"] == "disconnected"
    assert data["client_id"] == "cid" and data["client_secret"] != "csecret"
    key = await integ.add_connection("openai", "default")
    data = await integ.save_setup(key.uuid, {"api_key": "sk-0123456789abcdef"})
    data = await integ.save_setup(key.uuid, {"organization": "org-1"})
    creds = await integ.get_credentials(key.uuid)
    assert creds["api_key"] == "sk-0123456789abcdef" and creds["organization"] == "org-1"
    with pytest.raises(IntegrationsError) as info:
        await integ.save_setup("019b669c-3c9d-7256-8ed1-edbc6ae29703", {"api_key": "x"})
    assert code_of(info) == "not_configured"
    with pytest.raises(IntegrationsError) as info:
        await integ.save_setup("not-a-uuid", {"api_key": "x"})
    assert code_of(info) == "invalid_uuid"


async def test_disconnect_api_key_and_unknown_uuid(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    await integ.save_setup(conn.uuid, {"api_key": "sk-0123456789abcdef"})
    assert await integ.disconnect(conn.uuid) is None
    data = (await integ.get_integration_by_uuid(conn.uuid)).data
    assert "api_key" not in data or data["api_key"] in (None, "")
    assert data["status"] == "disconnected"
    assert not await integ.is_connected(conn.uuid)
    assert await integ.disconnect("019b669c-3c9d-7256-8ed1-edbc6ae29703") is None


async def test_record_validation_gating_and_timestamp(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    await integ.save_setup(conn.uuid, {"api_key": "sk-0123456789abcdef"})
    async with integ.subscribe(uuid=conn.uuid) as sub:
        assert await integ.record_validation(conn.uuid, integrations.Validation(True, "ok")) is None
        first = (await integ.get_integration_by_uuid(conn.uuid)).data["last_validated_at"]
        await asyncio.sleep(0.01)
        await integ.record_validation(conn.uuid, integrations.Validation(True, "ok"))
        second = (await integ.get_integration_by_uuid(conn.uuid)).data["last_validated_at"]
        assert second != first
        await integ.record_validation(
            conn.uuid, integrations.Validation(False, "Invalid credentials")
        )
        data = (await integ.get_integration_by_uuid(conn.uuid)).data
        assert data["status"] == "error" and data["validation_status"] == "Invalid credentials"
        kinds = []
        while True:
            try:
                ev = await asyncio.wait_for(sub.get(), 1.0)
            except TimeoutError:
                break
            kinds.append(ev.kind)
        assert kinds.count("validated") == 2, kinds


async def test_validate_credentials_and_connection_return_validation(integ: Integrations) -> None:
    v = await integ.validate_credentials("github", {"client_id": "a", "client_secret": "b"})
    assert isinstance(v, integrations.Validation) and v.ok is False and v.message
    conn = await integ.add_connection("openai", "default")
    v = await integ.validate_connection(conn.uuid)
    assert isinstance(v, integrations.Validation) and v.ok is False
    assert "not configured" in v.message.lower()


async def test_run_legacy_migrations_warns(integ: Integrations) -> None:
    with pytest.warns(DeprecationWarning):
        assert await integ.run_legacy_migrations() is None


# ----------------------------------------------------------------------------- requests


async def test_authenticated_request_response_api_and_host_allow_list(
    pinteg: Integrations, echo: Echo
) -> None:
    conn = await pinteg.add_connection("echoapi", "default")
    await pinteg.save_setup(conn.uuid, {"api_key": "k-0123456789abcdef"})
    resp = await pinteg.authenticated_request(conn.uuid, "GET", f"{echo.base}/v1/me")
    assert resp.status == 200
    assert resp.headers["X-Probe"] == "yes"
    assert resp.json() == {"path": "/v1/me", "ok": True}
    assert isinstance(resp.text, str) and '"ok"' in resp.text
    assert echo.seen[-1]["Authorization"] == "Bearer k-0123456789abcdef"
    resp = await pinteg.authenticated_request("echoapi:default", "GET", f"{echo.base}/x")
    assert resp.status == 200
    before = len(echo.seen)
    with pytest.raises(IntegrationsError) as info:
        await pinteg.authenticated_request(conn.uuid, "GET", "https://evil.example/steal")
    assert code_of(info) == "host_not_allowed"
    assert len(echo.seen) == before


# ----------------------------------------------------------------------------- events


async def test_events_reach_a_second_instance_and_carry_uuid(fresh_db: str) -> None:
    async with (
        Integrations(fresh_db, keys=TEST_KEY) as a,
        Integrations(fresh_db, keys=TEST_KEY) as b,
        b.subscribe() as sub,
    ):
        conn = await a.add_connection("openai", "default", actor="admin")
        ev = await asyncio.wait_for(sub.get(), 5)
        assert ev.kind == "connection_added" and ev.uuid == conn.uuid
        assert ev.provider == "openai" and ev.name == "default" and ev.actor == "admin"
        assert isinstance(ev.at, datetime)
        await a.rename_connection(conn.uuid, "work")
        await a.save_setup(conn.uuid, {"api_key": "sk-0123456789abcdef"})
        await a.disconnect(conn.uuid)
        await a.remove_connection(conn.uuid)
        kinds = [(await asyncio.wait_for(sub.get(), 5)).kind for _ in range(4)]
        assert kinds == [
            "connection_renamed",
            "setup_saved",
            "disconnected",
            "connection_removed",
        ]


async def test_subscription_by_uuid_sees_an_owned_connection(integ: Integrations) -> None:
    """subscribe(uuid=...) is the DESIGN way to watch one connection; its owner is irrelevant."""
    conn = await integ.add_connection("openai", "default", owner="user:7")
    async with integ.subscribe(uuid=conn.uuid) as sub:
        await integ.save_setup(conn.uuid, {"api_key": "sk-0123456789abcdef"})
        ev = await asyncio.wait_for(sub.get(), 5)
        assert ev.uuid == conn.uuid and ev.kind == "setup_saved"


async def test_subscription_async_for_and_close(fresh_db: str) -> None:
    inst = Integrations(fresh_db, keys=TEST_KEY)
    await inst.open()
    got: list[str] = []
    subscribed = asyncio.Event()

    async def reader() -> None:
        async with inst.subscribe(provider="openai") as sub:
            subscribed.set()
            async for ev in sub:
                got.append(ev.kind)

    task = asyncio.create_task(reader())
    await asyncio.wait_for(subscribed.wait(), 10)
    await inst.add_connection("openai", "default")
    await eventually(lambda: got == ["connection_added"])
    await inst.close()
    await asyncio.wait_for(task, 5)


# ----------------------------------------------------------------------------- OAuth


async def test_begin_complete_and_state_single_use(
    ointeg: Integrations, oauth_server: OAuthTestServer
) -> None:
    uuid = await new_connection(ointeg)
    url, state = await ointeg.begin_authorization(uuid, REDIRECT_URI)
    assert "code_challenge=" in url and "S256" in url
    query = await approve(url)
    conn = await ointeg.complete_authorization(state, code=query["code"])
    assert isinstance(conn, integrations.Connection) and conn.uuid == uuid
    assert conn.data["status"] == "connected"
    assert await ointeg.is_connected(uuid)
    with raises_code("invalid_state"):
        await ointeg.complete_authorization(state, code=query["code"])
    with raises_code("invalid_state"):
        await ointeg.complete_authorization("forged-state", code="x")
    data = (await ointeg.get_integration_by_uuid(uuid)).data
    for key in ("access_token", "refresh_token", "token_type", "expires_at", "connected_at"):
        assert key in data, key
    assert data["access_token"] != (await ointeg.get_credentials(uuid))["access_token"]


async def test_complete_with_provider_error(ointeg: Integrations) -> None:
    uuid = await new_connection(ointeg)
    _url, state = await ointeg.begin_authorization(uuid, REDIRECT_URI)
    with raises_code("authorization_denied"):
        await ointeg.complete_authorization(state, error="access_denied")
    data = (await ointeg.get_integration_by_uuid(uuid)).data
    assert data["status"] == "error"


async def test_expired_state_refused(fresh_db: str, oauth_server: OAuthTestServer) -> None:
    async with open_integrations(fresh_db, oauth_server.base_url, authorization_ttl=0.2) as inst:
        uuid = await new_connection(inst)
        url, state = await inst.begin_authorization(uuid, REDIRECT_URI)
        query = await approve(url)
        await asyncio.sleep(0.5)
        with raises_code("invalid_state"):
            await inst.complete_authorization(state, code=query["code"])
        assert not await inst.is_connected(uuid)


async def test_seed_authorization_url_and_exchange_code(
    ointeg: Integrations, oauth_server: OAuthTestServer
) -> None:
    uuid = await new_connection(ointeg)
    state = integrations.oauth.generate_state()
    url = await ointeg.authorization_url(uuid, REDIRECT_URI, state=state)
    assert isinstance(url, str) and f"state={state}" in url
    query = await approve(url)
    assert query["state"] == state
    data = await ointeg.exchange_code(uuid, query["code"], REDIRECT_URI)
    assert isinstance(data, dict) and data["status"] == "connected"
    assert await ointeg.is_connected(uuid)


async def test_the_same_state_again_while_pending_is_refused_and_the_first_still_completes(
    ointeg: Integrations, oauth_server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    """A deliberate deviation (docs/api.md): a state is single use, bound to one verifier."""
    uuid = await new_connection(ointeg)
    state = integrations.oauth.generate_state()
    url = await ointeg.authorization_url(uuid, REDIRECT_URI, state=state)
    pending = await db.fetchval("SELECT count(*) FROM integrations.pending_authorizations")
    with pytest.raises(integrations.InvalidState) as reloaded:
        await ointeg.authorization_url(uuid, REDIRECT_URI, state=state)
    assert reloaded.value.code == "invalid_state"
    assert await db.fetchval("SELECT count(*) FROM integrations.pending_authorizations") == pending
    query = await approve(url)
    data = await ointeg.exchange_code(uuid, query["code"], REDIRECT_URI)
    assert data["status"] == "connected"


@pytest.mark.parametrize("value", ["not-a-uuid", "019b669c-3c9d-7256-8ed1"])
async def test_disconnect_of_a_value_that_is_not_a_uuid_is_refused(
    integ: Integrations, db: asyncpg.Connection, value: str
) -> None:
    """A deliberate deviation (docs/api.md): the seed returns ``:ok``; a malformed argument
    is a programming mistake, and is loud."""
    conn = await integ.add_connection("openai", "default")
    await integ.save_setup(conn.uuid, {"api_key": "sk-0123456789abcdef"})
    before = await db.fetch("SELECT uuid, version FROM integrations.connections ORDER BY uuid")
    with pytest.raises(integrations.InvalidUUID) as refused:
        await integ.disconnect(value)
    assert refused.value.code == "invalid_uuid"
    assert await db.fetch("SELECT uuid, version FROM integrations.connections ORDER BY uuid") == (
        before
    )
    assert await integ.is_connected(conn.uuid)


async def test_disconnect_oauth_keeps_client_and_revokes(
    ointeg: Integrations, oauth_server: OAuthTestServer
) -> None:
    uuid = await connect(ointeg)
    await ointeg.disconnect(uuid)
    creds = await ointeg.get_credentials(uuid)
    assert creds["client_id"] == DEFAULT_CLIENT_ID
    assert creds["client_secret"] == DEFAULT_CLIENT_SECRET
    assert "access_token" not in creds and "refresh_token" not in creds
    assert (await ointeg.get_integration_by_uuid(uuid)).data["status"] == "disconnected"
    await eventually(lambda: oauth_server.stats.revocations >= 1)


async def test_access_token_refreshes_inside_leeway(
    ointeg: Integrations, oauth_server: OAuthTestServer, db: asyncpg.Connection
) -> None:
    uuid = await connect(ointeg)
    await set_stored_expiry(db, uuid, 30)  # an hour-long token inside the 60 s leeway
    first = (await ointeg.get_credentials(uuid))["access_token"]
    token = await ointeg.access_token(uuid)
    assert token != first
    assert oauth_server.stats.token_calls["refresh_token"] == 1


async def test_refresh_coalesces_in_process(
    ointeg: Integrations, oauth_server: OAuthTestServer
) -> None:
    uuid = await connect(ointeg)
    oauth_server.config.token_delay = 0.2
    tokens = await asyncio.gather(*(ointeg.refresh_access_token(uuid) for _ in range(50)))
    assert len(set(tokens)) == 1
    assert oauth_server.stats.token_calls["refresh_token"] == 1
    oauth_server.expire_access_tokens()
    oauth_server.config.token_delay = 0.0
    resps = await asyncio.gather(
        *(
            ointeg.authenticated_request(uuid, "GET", oauth_server.api_url + "/thing")
            for _ in range(20)
        )
    )
    assert all(r.status == 200 for r in resps)
    assert oauth_server.stats.token_calls["refresh_token"] == 2


async def test_invalid_grant_marks_reauth_and_recovery(
    ointeg: Integrations, oauth_server: OAuthTestServer
) -> None:
    uuid = await connect(ointeg)
    async with ointeg.subscribe(uuid=uuid) as sub:
        oauth_server.config.force_invalid_client = True
        with raises_code("reauth_required"):
            await ointeg.refresh_access_token(uuid)
        data = (await ointeg.get_integration_by_uuid(uuid)).data
        assert data["status"] == "error" and data["reauth_required"] is True
        assert isinstance(data["validation_status"], str) and data["validation_status"]
        ev = await asyncio.wait_for(sub.get(), 5)
        assert ev.kind == "refresh_failed"
        oauth_server.config.force_invalid_client = False
        await ointeg.refresh_access_token(uuid)
        data = (await ointeg.get_integration_by_uuid(uuid)).data
        assert data["status"] == "connected"


async def test_transient_failure_is_retried(
    ointeg: Integrations, oauth_server: OAuthTestServer
) -> None:
    uuid = await connect(ointeg)
    oauth_server.config.fail_next = 1
    oauth_server.config.fail_status = 503
    token = await ointeg.refresh_access_token(uuid)
    assert isinstance(token, str)
    assert (await ointeg.get_integration_by_uuid(uuid)).data["status"] == "connected"


async def test_on_401_refresh_and_retry_once(
    ointeg: Integrations, oauth_server: OAuthTestServer
) -> None:
    oauth_server.config.expires_in = None  # no expiry known: only a 401 reveals it
    uuid = await connect(ointeg)
    oauth_server.expire_access_tokens()
    resp = await ointeg.authenticated_request(uuid, "GET", oauth_server.api_url + "/x")
    assert resp.status == 200
    assert oauth_server.stats.token_calls["refresh_token"] == 1


async def test_oauth_tokens_never_go_to_foreign_host(
    ointeg: Integrations, oauth_server: OAuthTestServer
) -> None:
    uuid = await connect(ointeg)
    with pytest.raises(IntegrationsError) as info:
        await ointeg.authenticated_request(uuid, "GET", "https://evil.example/x")
    assert code_of(info) == "host_not_allowed"


async def test_public_oauth_client_can_save_setup_without_secret(
    fresh_db: str, oauth_server: OAuthTestServer
) -> None:
    """A public client (PKCE, ``token_auth="none"``) has a client_id and no secret."""
    public = loopback_provider(oauth_server.base_url, key="public", token_auth="none")
    providers = [public, loopback_provider(oauth_server.base_url)]
    async with open_integrations(fresh_db, oauth_server.base_url, providers=providers) as inst:
        conn = await inst.add_connection("public", "default")
        data = await inst.save_setup(conn.uuid, {"client_id": "public-client"})
        assert data["client_id"] == "public-client"
        url, _state = await inst.begin_authorization(conn.uuid, "http://127.0.0.1:9/cb")
        assert "code_challenge=" in url
        confidential = await inst.add_connection("loopback", "default")
        with pytest.raises(MissingField):
            await inst.save_setup(confidential.uuid, {"client_id": "x"})


async def test_masking_in_listing_repr_and_events(integ: Integrations) -> None:
    secret = "sk-MARKER-abcdefghijklmnop"
    conn = await integ.add_connection("openai", "default")
    async with integ.subscribe() as sub:
        await integ.save_setup(conn.uuid, {"api_key": secret})
        ev = await asyncio.wait_for(sub.get(), 5)
    assert secret not in repr(ev)
    listed = await integ.list_connections("openai")
    assert secret not in repr(listed)
    assert secret not in repr(await integ.get_integration_by_uuid(conn.uuid))
    assert secret not in repr(await integ.load_all_connections(["openai"]))


# ----------------------------------------------------------------------------- more checks


async def test_migrate_is_idempotent(integ: Integrations) -> None:
    assert not await integ.migrate()
    assert not await integ.migrate()


async def test_relative_url_is_a_typed_error(pinteg: Integrations, echo: Echo) -> None:
    conn = await pinteg.add_connection("echoapi", "default")
    await pinteg.save_setup(conn.uuid, {"api_key": "k-0123456789abcdef"})
    with raises_code("invalid_url"):
        await pinteg.authenticated_request(conn.uuid, "GET", "/v1/me")
    assert echo.seen == []


async def test_unknown_key_is_typed_names_kid_and_survives_other_writes(fresh_db: str) -> None:
    old = integrations.generate_key()
    kid = old.split(":")[1]
    async with Integrations(fresh_db, keys=old) as inst:
        conn = await inst.add_connection("openai", "default")
        await inst.save_setup(conn.uuid, {"api_key": "sk-old-0123456789abc"})
    async with Integrations(fresh_db, keys=TEST_KEY) as inst:
        with pytest.raises(IntegrationsError) as info:
            await inst.get_credentials(conn.uuid)
        assert code_of(info) == "unknown_key"
        assert kid in str(info.value) and "sk-old" not in str(info.value)
        await inst.save_setup(conn.uuid, {"organization": "org-2"})
    async with Integrations(fresh_db, keys=[TEST_KEY, old]) as inst:
        creds = await inst.get_credentials(conn.uuid)
        assert creds["api_key"] == "sk-old-0123456789abc" and creds["organization"] == "org-2"


async def test_rotate_keys_then_new_key_alone(fresh_db: str) -> None:
    old, new = integrations.generate_key(), integrations.generate_key()
    async with Integrations(fresh_db, keys=old) as inst:
        uuids = []
        for i in range(30):
            c = await inst.add_connection("openai", f"c{i}")
            await inst.save_setup(c.uuid, {"api_key": f"sk-rot-{i:04d}-abcdefgh"})
            uuids.append(c.uuid)
    async with Integrations(fresh_db, keys=[new, old]) as inst:
        seen: list[Any] = []
        result = await inst.rotate_keys(batch_size=7, progress=seen.append)
        assert result.rotated == 30 and seen
    async with Integrations(fresh_db, keys=new) as inst:
        for i, u in enumerate(uuids):
            assert (await inst.get_credentials(u))["api_key"] == f"sk-rot-{i:04d}-abcdefgh"


async def test_cancelled_caller_does_not_abandon_refresh(
    ointeg: Integrations, oauth_server: OAuthTestServer
) -> None:
    uuid = await connect(ointeg)
    spent = (await ointeg.get_credentials(uuid))["refresh_token"]
    oauth_server.config.token_delay = 0.5
    task = asyncio.create_task(ointeg.refresh_access_token(uuid))
    await eventually(lambda: oauth_server.stats.token_calls["refresh_token"] == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def stored() -> bool:
        return (await ointeg.get_credentials(uuid))["refresh_token"] != spent

    # The abandoned caller's refresh goes on: its rotated refresh token gets stored.
    await eventually(stored)
    oauth_server.config.token_delay = 0.0
    # the rotated refresh token must have been stored: a second refresh works
    await ointeg.refresh_access_token(uuid)
    assert oauth_server.stats.refresh_reuse_detected == 0
    assert (await ointeg.get_integration_by_uuid(uuid)).data["status"] == "connected"


async def test_refresh_without_new_refresh_token_keeps_old(
    ointeg: Integrations, oauth_server: OAuthTestServer
) -> None:
    uuid = await connect(ointeg)
    before = (await ointeg.get_credentials(uuid))["refresh_token"]
    oauth_server.config.rotate_refresh_tokens = False
    await ointeg.refresh_access_token(uuid)
    assert (await ointeg.get_credentials(uuid))["refresh_token"] == before


async def test_oauth_event_kinds(ointeg: Integrations, oauth_server: OAuthTestServer) -> None:
    async with ointeg.subscribe(provider="loopback") as sub:
        uuid = await connect(ointeg)
        await ointeg.refresh_access_token(uuid)
        await ointeg.disconnect(uuid)
        kinds = []
        while True:
            try:
                kinds.append((await asyncio.wait_for(sub.get(), 1.0)).kind)
            except TimeoutError:
                break
    assert kinds == [
        "connection_added",
        "setup_saved",
        "connected",
        "token_refreshed",
        "disconnected",
    ], kinds


async def test_client_credentials_access_token(
    ointeg: Integrations, oauth_server: OAuthTestServer
) -> None:
    conn = await ointeg.add_connection("machine", "default")
    await ointeg.save_setup(
        conn.uuid, {"client_id": DEFAULT_CLIENT_ID, "client_secret": DEFAULT_CLIENT_SECRET}
    )
    tokens = await asyncio.gather(*(ointeg.access_token(conn.uuid) for _ in range(10)))
    assert len(set(tokens)) == 1
    assert oauth_server.stats.token_calls["client_credentials"] == 1
    resp = await ointeg.authenticated_request(conn.uuid, "GET", oauth_server.api_url + "/m")
    assert resp.status == 200


async def test_is_connected_after_saving_an_api_key(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    assert not await integ.is_connected(conn.uuid)
    await integ.save_setup(conn.uuid, {"api_key": "sk-0123456789abcdef"})
    assert await integ.is_connected(conn.uuid)


async def test_wrong_shapes_are_typed_and_write_nothing(integ: Integrations) -> None:
    conn = await integ.add_connection("openai", "default")
    for call, code in (
        (lambda: integ.add_connection(123, "x"), "invalid_provider_key"),  # type: ignore[arg-type]
        (lambda: integ.add_connection("openai", None), "invalid_name"),  # type: ignore[arg-type]
        (lambda: integ.rename_connection(conn.uuid, 5), "invalid_name"),  # type: ignore[arg-type]
        (lambda: integ.save_setup(conn.uuid, "api_key=x"), "invalid_attrs"),  # type: ignore[arg-type]
        (lambda: integ.save_setup(conn.uuid, {"api_key": 123}), "invalid_field"),
        (lambda: integ.save_setup(conn.uuid, {1: "x"}), "invalid_attrs"),  # type: ignore[dict-item]
        (lambda: integ.get_integration_by_uuid("nope"), "invalid_uuid"),
        (lambda: integ.list_connections(None), "invalid_provider_key"),  # type: ignore[arg-type]
        (lambda: integ.load_all_connections("openai"), "invalid"),
    ):
        with raises_code(code):
            await call()
    assert await integ.list_integrations() == []


async def test_microsoft_blank_tenant_means_common(integ: Integrations) -> None:
    conn = await integ.add_connection("microsoft", "default")
    await integ.save_setup(
        conn.uuid, {"client_id": "cid", "client_secret": "csecret", "tenant_id": ""}
    )
    url, _state = await integ.begin_authorization(conn.uuid, "https://app.example/cb")
    assert url.startswith("https://login.microsoftonline.com/common/")


async def test_bot_url_helper_for_telegram(integ: Integrations) -> None:
    telegram = next(p for p in integ.list_providers() if p.key == "telegram")
    url = integrations.bot_url(telegram, {"bot_token": "123:abc"}, "getMe")
    assert url == "https://api.telegram.org/bot123:abc/getMe"


async def test_injected_http_session_is_not_closed(fresh_db: str, echo: Echo) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with Integrations(
            fresh_db, keys=TEST_KEY, http=session, providers=[api_key_provider()]
        ) as inst:
            conn = await inst.add_connection("echoapi", "default")
            await inst.save_setup(conn.uuid, {"api_key": "k-0123456789abcdef"})
            await inst.authenticated_request(conn.uuid, "GET", f"{echo.base}/x")
        assert not session.closed


async def test_no_lost_updates_across_two_instances(fresh_db: str) -> None:
    async with (
        Integrations(fresh_db, keys=TEST_KEY) as a,
        Integrations(fresh_db, keys=TEST_KEY) as b,
    ):
        conn = await a.add_connection("openai", "default")
        await a.save_setup(conn.uuid, {"api_key": "sk-0123456789abcdef"})
        calls = []
        for i in range(50):
            inst = a if i % 2 else b
            calls.append(inst.save_setup(conn.uuid, {f"field_{i}": i}))
            if i % 5 == 0:
                calls.append(inst.record_validation(conn.uuid, i % 10 == 0))
        await asyncio.gather(*calls)
        data = await a.get_integration(conn.uuid)
        assert all(data.get(f"field_{i}") == i for i in range(50))
        assert "last_validated_at" in data


async def test_validate_connection_of_a_missing_uuid_is_a_validation(integ: Integrations) -> None:
    """Seed spec: validate_connection :: :ok | {:error, String.t()}; issue 2: a 'not
    configured' outcome is a Validation, not an exception."""
    v = await integ.validate_connection("019b669c-3c9d-7256-8ed1-edbc6ae29703")
    assert isinstance(v, integrations.Validation) and v.ok is False


async def test_record_validation_of_a_removed_uuid_is_quiet(integ: Integrations) -> None:
    """Seed spec: record_validation :: :ok (a check racing a removal must not crash)."""
    conn = await integ.add_connection("openai", "default")
    await integ.remove_connection(conn.uuid)
    assert await integ.record_validation(conn.uuid, True) is None


async def test_a_request_decrypts_the_row_once_and_checks_each_url_host_once(
    fresh_db: str, echo: Echo, monkeypatch: pytest.MonkeyPatch
) -> None:
    from integrations import _http
    from integrations._vault import Vault

    async with Integrations(
        fresh_db, keys=TEST_KEY, providers=[api_key_provider()], cache=False
    ) as inst:
        conn = await inst.add_connection("echoapi", "default")
        await inst.save_setup(conn.uuid, {"api_key": "k-0123456789abcdef"})
        counts = {"unseal": 0, "host": 0}
        unseal, host_allowed = Vault.unseal, _http.host_allowed

        def counted_unseal(*args: Any, **kwargs: Any) -> Any:
            counts["unseal"] += 1
            return unseal(*args, **kwargs)

        def counted_host(*args: Any, **kwargs: Any) -> Any:
            counts["host"] += 1
            return host_allowed(*args, **kwargs)

        monkeypatch.setattr(Vault, "unseal", counted_unseal)
        monkeypatch.setattr(_http, "host_allowed", counted_host)
        for _ in range(3):
            response = await inst.authenticated_request(conn.uuid, "GET", f"{echo.base}/v1")
            assert response.status == 200
        # One decrypt per request (no row cache here); the host of a URL is checked once
        # and remembered, so a new URL is checked and a repeated one is not.
        assert counts == {"unseal": 3, "host": 1}
        await inst.authenticated_request(conn.uuid, "GET", f"{echo.base}/v2")
        assert counts == {"unseal": 4, "host": 2}
        with pytest.raises(HostNotAllowed):
            await inst.authenticated_request(conn.uuid, "GET", "https://elsewhere.example/v1")
        with pytest.raises(HostNotAllowed):
            await inst.authenticated_request(conn.uuid, "GET", "https://elsewhere.example/v1")
        assert counts["host"] == 4  # a refusal is not remembered
        assert echo.seen[-1]["Authorization"] == "Bearer k-0123456789abcdef"


async def test_cached_requests_build_the_auth_header_once_per_row_version(
    pinteg: Integrations, echo: Echo, monkeypatch: pytest.MonkeyPatch
) -> None:
    from integrations._vault import Vault

    conn = await pinteg.add_connection("echoapi", "default")
    await save_and_settle(pinteg, conn.uuid, {"api_key": "k-0123456789abcdef"})
    unseal, calls = Vault.unseal, [0]

    def counted_unseal(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return unseal(*args, **kwargs)

    monkeypatch.setattr(Vault, "unseal", counted_unseal)
    for _ in range(5):
        await pinteg.authenticated_request(conn.uuid, "GET", f"{echo.base}/v1")
    assert calls[0] == 1
    await pinteg.save_setup(conn.uuid, {"api_key": "k-new-0123456789abcd"})
    await pinteg.authenticated_request(conn.uuid, "GET", f"{echo.base}/v1")
    assert calls[0] == 2
    assert echo.seen[-1]["Authorization"] == "Bearer k-new-0123456789abcd"


async def test_a_cached_request_follows_redirects_keeping_credentials_on_its_origin_only(
    pinteg: Integrations, echo: Echo
) -> None:
    seen: dict[str, str | None] = {}

    async def hop(request: web.Request) -> web.StreamResponse:
        seen[request.path] = request.headers.get("Authorization")
        if request.path == "/same":
            raise web.HTTPFound(f"{request.url.origin()}/landed")
        if request.path == "/away":
            raise web.HTTPFound(f"{echo.base}/elsewhere")
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/{tail:.*}", hop)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        base = str(server.make_url("")).rstrip("/")
        conn = await pinteg.add_connection("echoapi", "default")
        await save_and_settle(pinteg, conn.uuid, {"api_key": "k-0123456789abcdef"})
        for _ in range(2):  # the second time from the cache, with the kept header
            landed = await pinteg.authenticated_request(conn.uuid, "GET", f"{base}/same")
            assert landed.status == 200 and landed.url.endswith("/landed")
            assert seen["/landed"] == "Bearer k-0123456789abcdef"
            away = await pinteg.authenticated_request(
                conn.uuid, "GET", f"{base}/away", allow_any_host=True
            )
            assert away.status == 200
            assert "Authorization" not in echo.seen[-1]  # another origin: no credentials
        plain = await pinteg.authenticated_request(
            conn.uuid, "GET", f"{base}/same", allow_redirects=False
        )
        assert plain.status == 302
    finally:
        await server.close()
