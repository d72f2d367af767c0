"""The catalogue as data: lazy loading, provider files (extends, errors, providers_file and
INTEGRATIONS_PROVIDERS) and per-tenant hosts bound exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from integrations import Integrations
from integrations._catalogue import builtin_keys
from integrations._errors import (
    ConfigurationError,
    HostNotAllowed,
    InvalidField,
    MissingField,
    ProviderConflict,
)
from integrations._providers import Provider, SetupField, ValidationRequest
from integrations._registry import ProviderRegistry, load_providers
from tests.conftest import TEST_KEY

HOSTILE = ["evil.com#", "a.evil.com/", "x@evil.com", "evil.com", "a..b", "a b", "é", "-a", ""]


def tenant_provider(**extra: Any) -> Provider:
    fields: dict[str, Any] = {
        "key": "tenanted",
        "name": "Tenanted",
        "auth_type": "api_key",
        "setup_fields": (
            SetupField(key="api_key", label="API key", required=True, secret=True),
            SetupField(
                key="subdomain",
                label="Subdomain",
                required=True,
                pattern=r"[a-z0-9][a-z0-9-]*",
                expected="the subdomain, such as 'acme'",
            ),
        ),
        "api_hosts": ("{subdomain}.example.test",),
        "validation": ValidationRequest(url="https://{subdomain}.example.test/api/me"),
    }
    return Provider(**{**fields, **extra})


# --- lazy loading -----------------------------------------------------------------------


def _run(code: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(done.stdout)


def test_import_open_registry_and_lookups_read_only_what_they_use() -> None:
    read = _run(
        "import json, integrations, integrations._catalogue as c\n"
        "a = sorted(c._raw)\n"
        "integ = integrations.Integrations('postgresql://x/y', keys=integrations.generate_key())\n"
        "b = sorted(c._raw)\n"
        "integ.providers.get('github'); 'zzz' in integ.providers\n"
        "d = sorted(c._raw)\n"
        "n = len(integ.list_providers())\n"
        "print(json.dumps([a, b, d, n, len(c._raw)]))\n"
    )
    assert read[0] == [] and read[1] == []
    assert read[2] == ["github"]
    assert read[3] == read[4] == len(builtin_keys())


def test_the_command_line_start_reads_no_catalogue_file() -> None:
    read = _run(
        "import json, integrations.cli, integrations._catalogue as c\n"
        "print(json.dumps(sorted(c._raw)))\n"
    )
    assert read == []


def test_every_catalogue_file_holds_the_provider_of_its_name() -> None:
    registry = ProviderRegistry()
    assert {p.key for p in registry.all()} == set(builtin_keys())
    assert len(registry) == len(builtin_keys())


# --- provider files ---------------------------------------------------------------------


def test_an_entry_extends_a_builtin_or_an_earlier_entry(tmp_path: Path) -> None:
    file = tmp_path / "mine.toml"
    file.write_text(
        "[[providers]]\n"
        'key = "acme-google"\n'
        'name = "Acme on Google"\n'
        'extends = "google"\n'
        'scopes = ["openid"]\n'
        "\n"
        "[[providers]]\n"
        'key = "acme-google-2"\n'
        'name = "Acme again"\n'
        'extends = "acme-google"\n'
    )
    first, second = load_providers(file)
    google = ProviderRegistry().get("google")
    assert first.token_url == google.token_url and first.scopes == ("openid",)
    assert second.scopes == ("openid",) and second.name == "Acme again"
    assert second.authorize_params == google.authorize_params


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[providers]]\nkey = "a"\nname = "A"\nauth_type = "api_key"\napi_hosts = [3]\n',
            "entry 1 ('a'), field 'api_hosts.0'",
        ),
        (
            '[[providers]]\nkey = "a"\nname = "A"\nextends = "nope"\n',
            "entry 1 ('a'), field 'extends'",
        ),
        (
            '[[providers]]\nkey = "a"\nname = "A"\nauth_type = "api_key"\n'
            '[[providers]]\nkey = "a"\nname = "B"\nauth_type = "api_key"\n',
            "entry 2 ('a'), field 'key'",
        ),
        (
            '[[providers]]\nkey = "a"\nname = "A"\nauth_type = "api_key"\nwhat = 1\n',
            "entry 1 ('a'), field 'what'",
        ),
        ("providers = 3\n", "must hold a list named 'providers'"),
    ],
)
def test_a_mistake_names_the_file_the_entry_and_the_field(
    tmp_path: Path, text: str, expected: str
) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(ConfigurationError) as info:
        load_providers(file)
    assert str(file) in info.value.message and expected in info.value.message


def _acme_file(tmp_path: Path) -> Path:
    file = tmp_path / "acme.toml"
    file.write_text(
        '[[providers]]\nkey = "acme"\nname = "Acme"\nauth_type = "api_key"\n'
        'api_hosts = ["api.acme.test"]\n'
    )
    return file


def test_providers_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = _acme_file(tmp_path)
    assert "acme" in Integrations(providers_file=file, keys=TEST_KEY).providers
    monkeypatch.setenv("INTEGRATIONS_PROVIDERS", str(file))
    assert "acme" in Integrations(keys=TEST_KEY).providers
    # Providers named in code win over the environment.
    assert "acme" not in Integrations(providers=[], keys=TEST_KEY).providers
    # The module:attribute form is the command line's; the library leaves it alone.
    monkeypatch.setenv("INTEGRATIONS_PROVIDERS", "somewhere.module:providers")
    assert "acme" not in Integrations(keys=TEST_KEY).providers
    with pytest.raises(ConfigurationError, match="Cannot read provider file"):
        Integrations(providers_file=tmp_path / "missing.toml", keys=TEST_KEY)


def test_a_file_provider_with_a_builtin_key_needs_override(tmp_path: Path) -> None:
    file = tmp_path / "mine.toml"
    file.write_text('[[providers]]\nkey = "github"\nname = "Mine"\nauth_type = "api_key"\n')
    with pytest.raises(ProviderConflict):
        Integrations(providers_file=file, keys=TEST_KEY)
    file.write_text(
        '[[providers]]\nkey = "github"\nname = "Mine"\nauth_type = "api_key"\noverride = true\n'
    )
    assert Integrations(providers_file=file, keys=TEST_KEY).providers.get("github").name == "Mine"


# --- per-tenant hosts -------------------------------------------------------------------


def test_a_host_field_must_be_a_non_secret_field_with_a_pattern() -> None:
    with pytest.raises(ValueError, match="not a setup field"):
        tenant_provider(api_hosts=("{tenant}.example.test",))
    loose = SetupField(key="subdomain", label="Subdomain")
    key = SetupField(key="api_key", label="API key", secret=True)
    with pytest.raises(ValueError, match="must be a string field with a pattern"):
        tenant_provider(setup_fields=(key, loose))
    with pytest.raises(ValueError, match="cannot also be a wildcard"):
        tenant_provider(api_hosts=("*.{subdomain}.example.test",))


def test_hosts_are_rendered_per_connection_and_bound_exactly() -> None:
    provider = tenant_provider()
    bound = provider.for_data({"subdomain": "acme"})
    assert bound.api_hosts == ("acme.example.test",)
    assert provider.for_data({"subdomain": "acme"}) is bound
    # Before rendering a template matches no host: fail closed.
    assert provider.api_hosts == ("{subdomain}.example.test",)
    assert provider.for_data({}).api_hosts == ()


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_subdomains_never_widen_the_host(value: str) -> None:
    provider = tenant_provider()
    if value:
        with pytest.raises(InvalidField):
            provider.normalize_attrs({"subdomain": value})
    # Stored by other means (an old row, a hand edit), it still picks no host...
    assert provider.for_data({"subdomain": value}).api_hosts == ()
    # ...and no URL is built on it.
    check = provider.validation
    assert check is not None
    with pytest.raises(InvalidField if value else MissingField):
        provider.render_url(check.url, {"subdomain": value})


@pytest.fixture
async def loopback() -> AsyncIterator[int]:
    async def me(request: web.Request) -> web.Response:
        return web.json_response({"host": request.host, "auth": request.headers.get("X-Key")})

    app = web.Application()
    app.router.add_get("/api/me", me)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    try:
        yield server.port
    finally:
        await server.close()


async def test_a_connection_calls_its_own_tenant_host_only(fresh_db: str, loopback: int) -> None:
    provider = Provider(
        key="tenanted",
        name="Tenanted",
        auth_type="api_key",
        setup_fields=(
            SetupField(key="api_key", label="API key", required=True, secret=True),
            SetupField(key="node", label="Node", required=True, pattern=r"127\.0\.0\.1|localhost"),
        ),
        api_hosts=(f"{{node}}:{loopback}",),
        auth_header={"name": "X-Key", "template": "{api_key}"},
        validation=ValidationRequest(url=f"http://{{node}}:{loopback}/api/me"),
    )
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[provider]) as integ:
        conn = await integ.add_connection("tenanted", "default")
        await integ.save_setup(conn.uuid, {"api_key": "k-1", "node": "127.0.0.1"})
        answer = await integ.authenticated_request(
            conn.uuid, "GET", f"http://127.0.0.1:{loopback}/api/me"
        )
        assert answer.json() == {"host": f"127.0.0.1:{loopback}", "auth": "k-1"}
        # Another tenant's host (same server, another name) gets no credentials.
        with pytest.raises(HostNotAllowed):
            await integ.authenticated_request(
                conn.uuid, "GET", f"http://localhost:{loopback}/api/me"
            )
        assert (await integ.validate_connection(conn.uuid)).ok
        with pytest.raises(InvalidField):
            await integ.save_setup(conn.uuid, {"node": "127.0.0.1@evil.com"})


def test_the_toml_examples_of_the_provider_file_page_load(tmp_path: Path) -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "provider-files.md").read_text()
    blocks = [part.split("```", 1)[0] for part in page.split("```toml\n")[1:]]
    assert len(blocks) >= 3
    for index, block in enumerate(blocks):
        file = tmp_path / f"example{index}.toml"
        file.write_text(block)
        assert load_providers(file)
