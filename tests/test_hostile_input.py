"""Hostile input through the public API: a typed error or success, and nothing written on error."""

from __future__ import annotations

import asyncio
import json
import uuid as uuid_mod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from integrations import (
    AuthorizationDenied,
    DecryptionFailed,
    Integrations,
    IntegrationsError,
    InvalidAttrs,
    MissingField,
    Provider,
)
from integrations._vault import Keyring, Vault

from .conftest import TEST_KEY, settle

EXAMPLES = 600
SNAPSHOT = "SELECT uuid, key, value_json, version FROM integrations.connections ORDER BY uuid"
REDIRECT = "http://127.0.0.1:9/callback"
SECRET = "sk-hostile-0123456789abcdef"

# -- a loopback provider that answers everything -------------------------------------------


async def _answer(request: web.Request) -> web.Response:
    if request.path == "/token":
        return web.json_response(
            {
                "access_token": "at-" + uuid_mod.uuid4().hex,
                "refresh_token": "rt-" + uuid_mod.uuid4().hex,
                "token_type": "bearer",
                "expires_in": 3600,
            }
        )
    return web.json_response({"ok": True})


@asynccontextmanager
async def loopback() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def providers(base: str) -> list[Provider]:
    return [
        Provider.model_validate(
            {
                "key": "hapi",
                "name": "Hostile API",
                "auth_type": "api_key",
                "setup_fields": [
                    {"key": "api_key", "label": "API key", "required": True, "secret": True},
                    {"key": "limit", "label": "Limit", "type": "integer"},
                ],
                "auth_header": {"template": "Bearer {api_key}"},
                "api_hosts": ["127.0.0.1"],
                "validation": {"url": f"{base}/validate"},
            }
        ),
        Provider.model_validate(
            {
                "key": "hoauth",
                "name": "Hostile OAuth",
                "auth_type": "oauth2",
                "authorize_url": f"{base}/authorize",
                "token_url": f"{base}/token",
                "scopes": ["read"],
                "api_hosts": ["127.0.0.1"],
            }
        ),
    ]


# -- the hostile alphabet --------------------------------------------------------------------

PIECES = ["a", "Z", "0", "-", "_", ":", " ", "é", "😀", "\x00", "\ud800", "\udfff", "\x0b", "\n"]
texts = st.lists(st.sampled_from(PIECES), max_size=8).map("".join)
names = texts | st.sampled_from(["default", "other", "x" * 101, "  ", ""])


def _deep(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value} if depth % 2 else [value]
    return value


FORGED = {"$enc": 1, "kid": "deadbeef", "n": "AAAAAAAAAAAAAAAA", "ct": "A" * 24}
# Built on draw: a huge integer cannot even be repr()'d, which hypothesis does to describe
# the strategy.
HUGE_INT_DIGITS = 5000
specials = st.sampled_from(
    [
        lambda: 2**53,
        lambda: -(2**53),
        lambda: 10**HUGE_INT_DIGITS,
        lambda: float("nan"),
        lambda: float("inf"),
        lambda: _deep(40),
        lambda: _deep(1200),
        lambda: dict(FORGED),
        lambda: {**FORGED, "$enc": 1.0},
        lambda: {"$enc": "1"},
        lambda: "x" * 70_000,
    ]
).map(lambda make: make())
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts | specials
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
attrs = st.dictionaries(
    st.sampled_from(["api_key", "limit", "note", "credentials", "$enc", "client_id"]) | texts,
    values,
    max_size=4,
)
methods = st.sampled_from(["GET", "post", "GÉT", "G\x00T", "GET ", "M-SEARCH", "\ud800", ""])


@dataclass
class World:
    integ: Integrations
    db: asyncpg.Connection
    api: str
    oauth: str
    base: str


Op = Callable[[World], Awaitable[Any]]


def uuid_of(choice: int, text: str) -> Callable[[World], str]:
    def pick(world: World) -> str:
        options = [world.api, world.oauth, str(uuid_mod.uuid4()), text]
        return options[choice]

    return pick


uuids = st.builds(uuid_of, st.integers(0, 3), texts)


@st.composite
def operations(draw: st.DrawFn) -> tuple[str, Op]:
    kind = draw(
        st.sampled_from(
            [
                "save_setup",
                "add_connection",
                "rename_connection",
                "validate_credentials",
                "get_credentials",
                "begin_authorization",
                "complete_authorization",
                "begin_then_complete",
                "authenticated_request",
            ]
        )
    )
    target = draw(uuids)
    actor = draw(st.none() | texts)
    if kind == "save_setup":
        given_attrs = draw(attrs)
        return kind, lambda w: w.integ.save_setup(target(w), given_attrs, actor=actor)
    if kind == "add_connection":
        provider = draw(st.sampled_from(["hapi", "hoauth", "nope"]) | texts)
        name, owner = draw(names), draw(st.none() | texts)
        return kind, lambda w: w.integ.add_connection(provider, name, owner=owner, actor=actor)
    if kind == "rename_connection":
        name = draw(names)
        return kind, lambda w: w.integ.rename_connection(target(w), name, actor=actor)
    if kind == "validate_credentials":
        given_attrs = draw(attrs)
        return kind, lambda w: w.integ.validate_credentials("hapi", given_attrs)
    if kind == "get_credentials":
        return kind, lambda w: w.integ.get_credentials(target(w))
    if kind == "begin_authorization":
        scopes = draw(st.none() | st.lists(texts, max_size=3))
        redirect = draw(st.just(REDIRECT) | texts.map(lambda t: REDIRECT + t))
        return kind, lambda w: w.integ.begin_authorization(
            target(w), redirect, scopes=scopes, actor=actor
        )
    if kind == "complete_authorization":
        state, code = draw(texts), draw(st.none() | texts)
        error, description = draw(st.none() | texts), draw(st.none() | texts)
        return kind, lambda w: w.integ.complete_authorization(
            state, code=code, error=error, error_description=description
        )
    if kind == "begin_then_complete":
        code = draw(texts)
        error, description = draw(st.none() | texts), draw(st.none() | texts)

        async def flow(w: World) -> Any:
            _, state = await w.integ.begin_authorization(w.oauth, REDIRECT)
            return await w.integ.complete_authorization(
                state, code=code, error=error, error_description=description
            )

        return kind, flow
    method = draw(methods)
    path = draw(texts)
    return kind, lambda w: w.integ.authenticated_request(
        target(w), method, w.base + "/" + path, max_attempts=1
    )


@asynccontextmanager
async def world(fresh_db: str, base: str) -> AsyncIterator[World]:
    async with Integrations(
        fresh_db, keys=TEST_KEY, providers=providers(base), check_timeout=5.0
    ) as integ:
        db = await asyncpg.connect(fresh_db)
        try:
            api = await integ.add_connection("hapi", "default")
            await integ.save_setup(api.uuid, {"api_key": SECRET})
            oauth = await integ.add_connection("hoauth", "default")
            await integ.save_setup(oauth.uuid, {"client_id": "cid", "client_secret": "csecret"})
            yield World(integ, db, api.uuid, oauth.uuid, base)
        finally:
            await db.close()


@dataclass
class Tally:
    examples: int = 0
    successes: int = 0
    typed_errors: int = 0
    escaped: list[str] = field(default_factory=list)


def test_hostile_input_gets_a_typed_error_and_writes_nothing(fresh_db: str) -> None:
    loop = asyncio.new_event_loop()
    tally = Tally()
    stack: list[Any] = []

    async def setup() -> World:
        server = loopback()
        base = await server.__aenter__()
        stack.append(server)
        opened = world(fresh_db, base)
        state = await opened.__aenter__()
        stack.append(opened)
        return state

    async def teardown() -> None:
        for context in reversed(stack):
            await context.__aexit__(None, None, None)

    w = loop.run_until_complete(setup())
    try:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            derandomize=True,
        )
        @given(operations())
        def check(operation: tuple[str, Op]) -> None:
            kind, run = operation

            async def one() -> None:
                before = await w.db.fetch(SNAPSHOT)
                try:
                    await run(w)
                except AuthorizationDenied:
                    # A provider's refusal is recorded on the connection by design.
                    tally.typed_errors += 1
                except IntegrationsError as exc:
                    tally.typed_errors += 1
                    after = await w.db.fetch(SNAPSHOT)
                    assert after == before, f"{kind} wrote despite {exc.code}"
                except BaseException as exc:
                    tally.escaped.append(f"{kind}: {type(exc).__name__}")
                    raise
                else:
                    tally.successes += 1

            tally.examples += 1
            loop.run_until_complete(one())

        check()
    finally:
        loop.run_until_complete(teardown())
        loop.close()
        print(
            f"\nhostile input: {tally.examples} examples, {tally.successes} succeeded, "
            f"{tally.typed_errors} typed errors, {len(tally.escaped)} escaped {tally.escaped}"
        )
    assert tally.escaped == []
    assert tally.examples >= EXAMPLES
    assert tally.successes > 0 and tally.typed_errors > 0


# -- the specific cases, one by one ------------------------------------------------------------


@pytest.fixture
async def hostile(fresh_db: str) -> AsyncIterator[World]:
    async with loopback() as base, world(fresh_db, base) as state:
        yield state


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
@pytest.mark.parametrize("encryption", ["on", "off"])
async def test_a_blank_required_secret_is_missing_field_whatever_the_encryption(
    fresh_db: str, blank: str, encryption: str
) -> None:
    async with (
        loopback() as base,
        Integrations(
            fresh_db,
            keys=TEST_KEY,
            encryption=encryption,
            providers=providers(base),
        ) as integ,
    ):
        conn = await integ.add_connection("hapi", "blank")
        with pytest.raises(MissingField) as info:
            await integ.save_setup(conn.uuid, {"api_key": blank})
        assert info.value.code == "missing_field"
        assert not await integ.is_connected(conn.uuid)


@pytest.mark.parametrize(
    "given_attrs",
    [
        {"api_key": FORGED},
        {"note": FORGED},
        {"note": {"$enc": 1.0, "kid": "deadbeef"}},
        {"note": [{"deeper": {"$enc": "1"}}]},
        {"$enc": 1},
    ],
)
async def test_a_caller_value_shaped_like_an_envelope_is_refused_and_nothing_written(
    hostile: World, given_attrs: dict[str, Any]
) -> None:
    before = await hostile.db.fetch(SNAPSHOT)
    with pytest.raises(InvalidAttrs) as info:
        await hostile.integ.save_setup(hostile.api, given_attrs)
    assert "deadbeef" not in str(info.value)
    assert await hostile.db.fetch(SNAPSHOT) == before
    assert (await hostile.integ.get_credentials(hostile.api))["api_key"] == SECRET


async def test_plaintext_in_place_of_an_envelope_is_decryption_failed(hostile: World) -> None:
    await hostile.db.execute(
        "UPDATE integrations.connections SET value_json = value_json || $2::jsonb WHERE uuid = $1",
        uuid_mod.UUID(hostile.api),
        json.dumps({"api_key": "sk-planted-by-someone-else"}),
    )
    await settle()
    with pytest.raises(DecryptionFailed) as info:
        await hostile.integ.get_credentials(hostile.api)
    assert "sk-planted" not in str(info.value)


async def test_an_edited_envelope_is_decryption_failed_not_plaintext(hostile: World) -> None:
    sealed = Vault(Keyring.parse(TEST_KEY)).seal_value(hostile.api, "api_key", SECRET)
    for edit in ({"$enc": 1.0}, {"$enc": "1"}, {"extra": 1}):
        await hostile.db.execute(
            "UPDATE integrations.connections SET value_json = value_json || $2::jsonb "
            "WHERE uuid = $1",
            uuid_mod.UUID(hostile.api),
            json.dumps({"api_key": {**sealed, **edit}}),
        )
        await settle()
        with pytest.raises(DecryptionFailed):
            await hostile.integ.get_credentials(hostile.api)


@pytest.mark.parametrize(
    "expires_at",
    ["0001-01-01T00:00:00+00:00", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"],
)
async def test_stored_expiry_at_the_ends_of_time_does_not_break_access_token(
    hostile: World, expires_at: str
) -> None:
    _, state = await hostile.integ.begin_authorization(hostile.oauth, REDIRECT)
    await hostile.integ.complete_authorization(state, code="a-code")
    first = await hostile.integ.access_token(hostile.oauth)
    await hostile.db.execute(
        "UPDATE integrations.connections SET value_json = value_json || "
        "jsonb_build_object('expires_at', $2::text) WHERE uuid = $1",
        uuid_mod.UUID(hostile.oauth),
        expires_at,
    )
    await settle()
    # Year 1 reads as long expired (refreshed), year 9999 as far ahead (kept); no overflow.
    for _ in range(2):
        token = await hostile.integ.access_token(hostile.oauth)
        assert token.startswith("at-")
        assert (token == first) == expires_at.startswith("9999")
        check = await hostile.integ.validate_connection(hostile.oauth)
        assert check.ok, check.message


@pytest.mark.parametrize("method", ["GÉT", "G T", "GET\r\n", "\ud800"])
async def test_a_method_that_is_not_a_token_is_invalid(hostile: World, method: str) -> None:
    with pytest.raises(IntegrationsError) as info:
        await hostile.integ.authenticated_request(hostile.api, method, hostile.base + "/x")
    assert info.value.code == "invalid"


@pytest.mark.parametrize("api_key", ["sk\x0bkey", "sk\nkey", "sk\x00key", "sk\ud800key"])
async def test_control_characters_in_a_secret_are_refused_at_save_and_at_check(
    hostile: World, api_key: str
) -> None:
    before = await hostile.db.fetch(SNAPSHOT)
    with pytest.raises(InvalidAttrs) as info:
        await hostile.integ.save_setup(hostile.api, {"api_key": api_key})
    assert info.value.code == "invalid_field", info.value
    with pytest.raises(InvalidAttrs) as info:
        await hostile.integ.validate_credentials("hapi", {"api_key": api_key})
    assert info.value.code == "invalid_field", info.value
    assert await hostile.db.fetch(SNAPSHOT) == before
