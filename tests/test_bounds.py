"""Every numeric setting has a documented upper bound and a typed error beyond it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from integrations import ConfigurationError, Integrations, IntegrationsError
from integrations._settings import MAXIMUM

from .conftest import TEST_KEY

DOCS = Path(__file__).resolve().parent.parent / "docs" / "api.md"
CONSTRUCTOR = [
    "pool_max_size",
    "cache_size",
    "audit_buffer",
    "statement_cache_size",
    "max_attrs_bytes",
    "check_timeout",
    "authorization_ttl",
    "revoke_timeout",
    "leeway",
    "lock_timeout",
    "token_timeout",
    "token_attempts",
    "token_backoff",
    "refresh_cooldown",
    "refresh_lease",
    "token_write_retry",
]
INTS = {
    "pool_max_size",
    "cache_size",
    "audit_buffer",
    "statement_cache_size",
    "max_attrs_bytes",
    "token_attempts",
}


def _at(name: str, extra: float) -> Any:
    value = MAXIMUM[name] + extra
    return int(value) if name in INTS else value


@pytest.mark.parametrize("name", CONSTRUCTOR)
@pytest.mark.parametrize("beyond", [1, 2**31, 10**400])
def test_a_constructor_setting_beyond_its_bound_is_a_configuration_error(
    name: str, beyond: int
) -> None:
    value = _at(name, 1) if beyond == 1 else beyond
    with pytest.raises(ConfigurationError) as info:
        Integrations("postgresql://unused", keys=TEST_KEY, **{name: value})
    assert name in info.value.message and "at most" in info.value.message


@pytest.mark.parametrize("name", CONSTRUCTOR)
def test_a_constructor_setting_at_its_bound_is_accepted(name: str) -> None:
    options: dict[str, Any] = {name: _at(name, 0)}
    if name == "statement_cache_size":
        options["listen_dsn"] = "postgresql://unused"
    inst = Integrations("postgresql://unused", keys=TEST_KEY, **options)
    assert repr(inst) == "<Integrations schema='integrations' state=new>"


def test_the_documented_bounds_are_the_enforced_ones() -> None:
    text = DOCS.read_text()
    for name in CONSTRUCTOR:
        row = re.search(rf"^\| `{name}` \| [^|]+ \| ([^|]+) \|$", text, re.M)
        assert row is not None, f"{name} has no row in docs/api.md"
        documented = int(re.sub(r"[^0-9]", "", row.group(1).split("(")[-1]))
        assert documented == MAXIMUM[name], name


@pytest.mark.parametrize(
    "options",
    [
        {"interval": 10**400},
        {"interval": 2**63},
        {"interval": MAXIMUM["interval"] + 1},
        {"stale_after": 10**400},
        {"refresh_ahead": 1e300},
        {"per_provider_interval": 2**31},
        {"concurrency": 2**31},
    ],
)
async def test_sweep_options_beyond_their_bound_are_typed(
    integ: Integrations, options: dict[str, Any]
) -> None:
    given = {"interval": 60, "stale_after": 60, **options}
    with pytest.raises(IntegrationsError) as info:
        await integ.run_health_sweeps(**given)
    assert info.value.code == "invalid" and isinstance(info.value, TypeError)


async def test_call_options_beyond_their_bound_are_typed(integ: Integrations) -> None:
    calls = [
        lambda: integ.check_all(concurrency=10**6),
        lambda: integ.rotate_keys(batch_size=10**9),
    ]
    for call in calls:
        with pytest.raises(IntegrationsError) as info:
            await call()
        assert info.value.code == "invalid", info.value
    with pytest.raises(IntegrationsError) as info:
        async with integ.subscribe(maxsize=2**40):
            pass
    assert info.value.code == "invalid", info.value
