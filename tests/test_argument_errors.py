"""Arguments of the wrong type or value get the library's typed errors, never bare ones."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from integrations import (
    ALL_OWNERS,
    ConfigurationError,
    Integrations,
    IntegrationsError,
    InvalidInput,
)

from .conftest import TEST_KEY

Call = Callable[[Integrations, str], Awaitable[Any]]


async def _subscribe(integ: Integrations, **kwargs: Any) -> None:
    async with integ.subscribe(**kwargs):
        pass


CALLS: dict[str, Call] = {
    "subscribe kinds": lambda i, u: _subscribe(i, kinds=["nope"]),
    "subscribe maxsize": lambda i, u: _subscribe(i, maxsize=0),
    "subscribe owner": lambda i, u: _subscribe(i, owner=5),
    "check_all concurrency": lambda i, u: i.check_all(concurrency=0),
    "health sweep interval": lambda i, u: i.run_health_sweeps(interval=0, stale_after=60),
    "health sweep concurrency": lambda i, u: i.run_health_sweeps(
        interval=60, stale_after=60, concurrency="2"
    ),
    "rotate_keys batch_size": lambda i, u: i.rotate_keys(batch_size=0),
    "request max_attempts": lambda i, u: i.authenticated_request(
        u, "GET", "https://api.openai.com/v1/models", max_attempts=0
    ),
    "request timeout": lambda i, u: i.authenticated_request(
        u, "GET", "https://api.openai.com/v1/models", timeout="x"
    ),
    "request headers": lambda i, u: i.authenticated_request(
        u, "GET", "https://api.openai.com/v1/models", headers=5
    ),
    "request json": lambda i, u: i.authenticated_request(
        u, "POST", "https://api.openai.com/v1/models", json=object()
    ),
    "request params": lambda i, u: i.authenticated_request(
        u, "GET", "https://api.openai.com/v1/models", params=object()
    ),
    "request option": lambda i, u: i.authenticated_request(
        u, "GET", "https://api.openai.com/v1/models", bogus=1
    ),
    "request auth": lambda i, u: i.authenticated_request(
        u, "GET", "https://api.openai.com/v1/models", auth=("u", "p")
    ),
}


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_a_bad_argument_is_an_invalid_input_error(integ: Integrations, name: str) -> None:
    conn = await integ.add_connection("openai", "default")
    await integ.save_setup(conn.uuid, {"api_key": "sk-args-0123456789abcdef"})
    before = await integ.get_integration_by_uuid(conn.uuid)
    with pytest.raises(InvalidInput) as info:
        await CALLS[name](integ, conn.uuid)
    assert info.value.code == "invalid"
    assert isinstance(info.value, IntegrationsError | ValueError | TypeError)
    assert "sk-args" not in str(info.value)
    assert (await integ.get_integration_by_uuid(conn.uuid)).data == before.data


@pytest.mark.parametrize(
    "options",
    [
        {"refresh_lease": "15"},
        {"lock_timeout": "5"},
        {"token_attempts": 2.5},
        {"leeway": float("nan")},
        {"check_timeout": None},
        {"keys": ...},
        {"keys": [TEST_KEY, b"bytes"]},
    ],
)
async def test_bad_constructor_options_are_configuration_errors(
    fresh_db: str, options: dict[str, Any]
) -> None:
    options.setdefault("keys", TEST_KEY)
    with pytest.raises(ConfigurationError) as info:
        async with Integrations(fresh_db, **options):
            pass
    assert info.value.code == "configuration", info.value


def test_the_owner_scope_marker_is_exported() -> None:
    assert ALL_OWNERS is not None
