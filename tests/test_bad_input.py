"""Wrong shapes or types of name, uuid, ref, owner and attrs: a typed error, nothing written."""

from __future__ import annotations

import re
import uuid as uuid_mod
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from integrations import Integrations, IntegrationsError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

not_text = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=False),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
bad_names = st.one_of(
    not_text, st.text(max_size=20).filter(lambda s: not NAME.fullmatch(s.strip()))
)
bad_uuids = st.one_of(
    not_text, st.text(max_size=40).filter(lambda s: not _is_uuid(s)), st.just("0" * 35)
)
bad_refs = st.one_of(
    not_text,
    st.text(max_size=30).filter(lambda s: ":" in s and not _is_ref(s)),
    st.tuples(st.integers(), st.text(max_size=3)),
    st.tuples(st.text(max_size=3)),
)
bad_owners = st.one_of(
    st.integers(), st.binary(max_size=4), st.just(""), st.just("   "), st.text(min_size=256)
)
bad_attrs = st.one_of(
    not_text.filter(lambda v: not isinstance(v, dict)),
    st.dictionaries(st.integers(), st.text(max_size=3), min_size=1, max_size=2),
    st.fixed_dictionaries({"api_key": st.one_of(st.integers(), st.lists(st.text(), max_size=2))}),
    st.just({"api_key": object()}),
    st.just({"x": {1, 2}}),
)


def _is_uuid(value: str) -> bool:
    try:
        uuid_mod.UUID(value)
    except ValueError:
        return False
    return True


def _is_ref(value: str) -> bool:
    provider, _, name = value.strip().partition(":")
    return bool(re.fullmatch(r"[a-z0-9][a-z0-9_-]*", provider.strip())) and bool(
        NAME.fullmatch(name.strip())
    )


SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def _snapshot(db: asyncpg.Connection) -> list[tuple[str, str, int]]:
    rows = await db.fetch(
        "SELECT key, value_json::text AS v, version FROM integrations.connections ORDER BY uuid"
    )
    return [(r["key"], r["v"], r["version"]) for r in rows]


async def _refused(db: asyncpg.Connection, call: Callable[[], Awaitable[Any]], *codes: str) -> None:
    """The call raises an error whose code is one of ``codes`` and writes nothing."""
    before = await _snapshot(db)
    with pytest.raises(IntegrationsError) as info:
        await call()
    assert info.value.code in codes, info.value
    assert await _snapshot(db) == before


@pytest.fixture
async def seeded(integ: Integrations) -> str:
    conn = await integ.add_connection("openai", "default")
    await integ.save_setup(conn.uuid, {"api_key": "sk-seed-0123456789abcdef"})
    return conn.uuid


@SETTINGS
@given(name=bad_names)
async def test_add_and_rename_refuse_bad_names(
    integ: Integrations, db: asyncpg.Connection, seeded: str, name: Any
) -> None:
    code = "empty_name" if isinstance(name, str) and not name.strip() else "invalid_name"
    await _refused(db, lambda: integ.add_connection("openai", name), code)
    await _refused(db, lambda: integ.rename_connection(seeded, name), code)


PROVIDER_KEY = re.compile(r"[a-z0-9][a-z0-9_-]*")


@SETTINGS
@given(provider=st.one_of(not_text, st.text(max_size=12)))
async def test_unknown_or_malformed_providers_are_refused(
    integ: Integrations, db: asyncpg.Connection, seeded: str, provider: Any
) -> None:
    if isinstance(provider, str) and provider in integ.providers:
        return
    await _refused(db, lambda: integ.add_connection(provider, "x"), "invalid_provider_key")
    await _refused(db, lambda: integ.validate_credentials(provider, {}), "invalid_provider_key")
    if isinstance(provider, str) and PROVIDER_KEY.fullmatch(provider):
        # A well-formed key that is not registered: reads answer what is stored (nothing).
        assert await integ.list_connections(provider) == []
        assert await integ.load_all_connections([provider]) == {provider: []}
    else:
        await _refused(db, lambda: integ.list_connections(provider), "invalid_provider_key")
        await _refused(db, lambda: integ.load_all_connections([provider]), "invalid_provider_key")


@SETTINGS
@given(value=bad_uuids)
async def test_uuid_methods_refuse_bad_uuids(
    integ: Integrations, db: asyncpg.Connection, seeded: str, value: Any
) -> None:
    await _refused(db, lambda: integ.rename_connection(value, "x"), "invalid_uuid")
    await _refused(db, lambda: integ.remove_connection(value), "invalid_uuid")
    await _refused(db, lambda: integ.get_integration_by_uuid(value), "invalid_uuid")
    await _refused(db, lambda: integ.is_connected(value), "invalid_uuid")
    await _refused(db, lambda: integ.save_setup(value, {"api_key": "k"}), "invalid_uuid")
    await _refused(db, lambda: integ.disconnect(value), "invalid_uuid")
    await _refused(db, lambda: integ.record_validation(value, True), "invalid_uuid")
    await _refused(db, lambda: integ.validate_connection(value), "invalid_uuid")


@SETTINGS
@given(ref=bad_refs)
async def test_ref_methods_refuse_bad_refs(
    integ: Integrations, db: asyncpg.Connection, seeded: str, ref: Any
) -> None:
    await _refused(db, lambda: integ.find_uuid_by_provider_name(ref), "invalid")
    await _refused(db, lambda: integ.get_integration(ref), "invalid")
    await _refused(db, lambda: integ.get_credentials(ref), "invalid")
    await _refused(db, lambda: integ.resolve_to_uuid(ref), "invalid")


@SETTINGS
@given(owner=bad_owners)
async def test_bad_owners_are_refused(
    integ: Integrations, db: asyncpg.Connection, seeded: str, owner: Any
) -> None:
    await _refused(db, lambda: integ.add_connection("openai", "x", owner=owner), "invalid")
    await _refused(db, lambda: integ.list_connections("openai", owner=owner), "invalid")
    await _refused(db, lambda: integ.list_integrations(owner=owner), "invalid")


@SETTINGS
@given(attrs=bad_attrs)
async def test_save_setup_refuses_bad_attrs(
    integ: Integrations, db: asyncpg.Connection, seeded: str, attrs: Any
) -> None:
    await _refused(db, lambda: integ.save_setup(seeded, attrs), "invalid_attrs", "invalid_field")
    await _refused(
        db, lambda: integ.validate_credentials("openai", attrs), "invalid_attrs", "invalid_field"
    )


@SETTINGS
@given(result=st.one_of(st.integers(), st.floats(), st.binary(max_size=3), st.lists(st.none())))
async def test_record_validation_refuses_unknown_result_shapes(
    integ: Integrations, db: asyncpg.Connection, seeded: str, result: Any
) -> None:
    await _refused(db, lambda: integ.record_validation(seeded, result), "invalid")
