"""Provider model, setup attributes, registry rules and the generated catalogue page."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from integrations._catalogue import BUILTIN_PROVIDERS, providers_markdown
from integrations._errors import (
    InvalidAttrs,
    InvalidField,
    InvalidProviderKey,
    MissingField,
    ProviderConflict,
)
from integrations._providers import (
    AUTH_TYPES,
    AuthHeader,
    Provider,
    SetupField,
    ValidationRequest,
)
from integrations._registry import ProviderRegistry

ROOT = Path(__file__).resolve().parent.parent
SECRET = "S3CR3T-value-0123456789"
REGISTRY = ProviderRegistry()

EXPECTED = {
    "oauth2": {"google", "microsoft", "slack", "github"},
    "api_key": {
        "openrouter",
        "openai",
        "mistral",
        "deepseek",
        "xai",
        "elevenlabs",
        "stripe",
        "sendgrid",
        "brevo",
        "giphy",
        "tomtom",
    },
    "key_secret": {"twilio", "aws"},
    "jwt_bearer": {"google-service-account", "bigquery-service-account"},
    "bot_token": {"telegram", "discord"},
    "credentials": {"smtp", "postgres"},
    "oauth1": {"x-oauth1", "trello"},
}


def test_catalogue_keeps_two_builtins_for_each_way_of_authenticating():
    by_key = {provider.key: provider for provider in BUILTIN_PROVIDERS}
    signed = {k for k, p in by_key.items() if p.token_auth == "private_key_jwt"}
    assert {"okta-service-app", "auth0-private-key-jwt"} <= signed
    device = {k for k, p in by_key.items() if p.device_authorization_url}
    assert {"github", "microsoft"} <= device
    query = {k for k, p in by_key.items() if p.auth_header and p.auth_header.kind == "query"}
    assert {"giphy", "tomtom"} <= query


def custom(**fields: Any) -> Provider:
    base: dict[str, Any] = {"key": "acme", "name": "Acme", "auth_type": "api_key"}
    return Provider(**{**base, **fields})


# --- the catalogue --------------------------------------------------------------


def test_catalogue_keeps_the_first_providers_with_their_auth_types():
    by_type: dict[str, set[str]] = {}
    for provider in BUILTIN_PROVIDERS:
        by_type.setdefault(provider.auth_type, set()).add(provider.key)
    for auth_type, keys in EXPECTED.items():
        assert keys <= by_type[auth_type]


@pytest.mark.parametrize("provider", BUILTIN_PROVIDERS, ids=lambda p: p.key)
def test_every_builtin_has_setup_fields_a_check_and_an_auth_header(provider: Provider):
    assert provider.setup_fields
    # A service account's check is obtaining a token with its key.
    renewal_is_check = getattr(provider.scheme, "renewal_is_check", False)
    assert provider.validation is not None or provider.userinfo_url or renewal_is_check
    assert provider.docs_url and provider.docs_url.startswith("https://")
    if provider.scheme.freeform:
        assert provider.validation is not None
        assert provider.validation.hook in ("smtp", "postgres")
    elif provider.auth_type == "oauth1":
        # Signed per request by its scheme: no header template.
        assert provider.api_hosts and provider.request_token_url
    else:
        assert provider.auth_header is not None
        assert provider.api_hosts
        for field in provider.auth_header.fields:
            assert field in {f.key for f in provider.setup_fields} | {"access_token"}
    assert all(f.key for f in provider.setup_fields)


@pytest.mark.parametrize(
    "provider", [REGISTRY.get(key) for key in sorted(EXPECTED["oauth2"])], ids=lambda p: p.key
)
def test_oauth_builtins_have_real_endpoints(provider: Provider):
    assert provider.authorize_url and provider.authorize_url.startswith("https://")
    assert provider.token_url and provider.token_url.startswith("https://")
    assert provider.userinfo_url and provider.userinfo_url.startswith("https://")
    assert provider.scopes


def test_auth_types_constant_lists_the_six_types():
    assert AUTH_TYPES == (
        "oauth2",
        "oauth2_client_credentials",
        "api_key",
        "key_secret",
        "bot_token",
        "credentials",
        "oauth1",
        "mtls",
    )


def test_committed_providers_doc_matches_the_generator():
    committed = (ROOT / "docs" / "providers.md").read_text(encoding="utf-8")
    assert committed == providers_markdown()
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_providers_doc.py"), "--check"],
        capture_output=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_providers_doc_lists_every_builtin():
    doc = providers_markdown()
    for provider in BUILTIN_PROVIDERS:
        assert f"| `{provider.key}` |" in doc


# --- the model --------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "Acme", "ac:me", "-acme", "ac me", "acme/x"])
def test_provider_key_must_be_a_lowercase_slug(key: str):
    with pytest.raises(ValidationError):
        custom(key=key)


def test_provider_is_frozen_and_refuses_unknown_fields():
    provider = custom()
    with pytest.raises(ValidationError):
        provider.name = "Other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        custom(api_host="typo.example.com")


def test_defaults_follow_the_auth_type():
    api = custom()
    assert [f.key for f in api.setup_fields] == ["api_key"]
    assert api.auth_header == AuthHeader(template="Bearer {api_key}")
    oauth = custom(
        auth_type="oauth2", authorize_url="https://a.test/a", token_url="https://a.test/t"
    )
    assert [f.key for f in oauth.setup_fields] == ["client_id", "client_secret"]
    assert oauth.auth_header == AuthHeader(template="Bearer {access_token}")
    creds = custom(auth_type="credentials")
    assert creds.setup_fields == () and creds.auth_header is None


def test_oauth_provider_needs_its_endpoints():
    with pytest.raises(ValidationError):
        custom(auth_type="oauth2", authorize_url="https://a.test/a")
    with pytest.raises(ValidationError):
        custom(auth_type="oauth2_client_credentials")
    assert custom(auth_type="oauth2_client_credentials", token_url="https://a.test/t")


@pytest.mark.parametrize(
    "host", ["a.test/x", "user@a.test", "*", "a.*.test", "a.test:0", "a.test:x"]
)
def test_api_hosts_must_be_host_host_port_or_wildcard(host: str):
    with pytest.raises(ValidationError):
        custom(api_hosts=(host,))


def test_api_hosts_are_normalised():
    assert custom(api_hosts=(" API.Acme.test ", "*.Acme.test", "[::1]:8080")).api_hosts == (
        "api.acme.test",
        "*.acme.test",
        "[::1]:8080",
    )


def test_templates_accept_only_plain_field_names():
    with pytest.raises(ValidationError):
        AuthHeader(template="Bearer {api_key.__class__}")
    with pytest.raises(ValidationError):
        ValidationRequest(url="https://a.test/{x!r}")
    with pytest.raises(ValidationError):
        AuthHeader(kind="path", template="bot{bot_token}")
    with pytest.raises(ValidationError):
        AuthHeader(name="Bad Header", template="{api_key}")


def test_choice_fields_need_choices():
    with pytest.raises(ValidationError):
        SetupField(key="mode", label="Mode", type="choice")
    with pytest.raises(ValidationError):
        SetupField(key="mode", label="Mode", choices=("a",))


def test_auth_header_must_use_declared_setup_fields():
    with pytest.raises(ValidationError):
        custom(setup_fields=(SetupField(key="token", label="Token", secret=True),))
    named = custom(
        setup_fields=(SetupField(key="token", label="Token", secret=True),),
        auth_header=AuthHeader(name="X-Token", template="{token}"),
    )
    assert named.runtime_fields == ("token",)
    assert named.has_runtime_credentials({"token": "t"})


def test_duplicate_setup_field_keys_are_refused():
    field = SetupField(key="api_key", label="Key")
    with pytest.raises(ValidationError):
        custom(setup_fields=(field, field))


def test_secret_field_keys_and_runtime_fields():
    assert REGISTRY.get("openai").secret_field_keys == {"api_key"}
    assert REGISTRY.get("aws").secret_field_keys == {"secret_key", "session_token"}
    assert REGISTRY.get("twilio").secret_field_keys == {"auth_token"}
    assert REGISTRY.get("google").secret_field_keys == {"client_secret"}
    assert REGISTRY.get("smtp").secret_field_keys == {"password"}
    assert REGISTRY.get("google").runtime_fields == ("access_token",)
    assert REGISTRY.get("openai").runtime_fields == ("api_key",)
    assert REGISTRY.get("telegram").runtime_fields == ("bot_token",)
    assert REGISTRY.get("aws").runtime_fields == ("access_key", "secret_key")
    assert REGISTRY.get("twilio").runtime_fields == ("account_sid", "auth_token")
    assert REGISTRY.get("smtp").runtime_fields == ("credentials",)
    cc = custom(auth_type="oauth2_client_credentials", token_url="https://a.test/t")
    assert cc.runtime_fields == ("client_id", "client_secret")


# --- setup attributes ----------------------------------------------------------------


def test_normalize_coerces_known_fields_and_keeps_extra_keys():
    smtp = REGISTRY.get("smtp")
    patch = smtp.normalize_attrs(
        {"host": " mail.acme.test ", "port": "465", "security": "tls", "from": "a@acme.test"}
    )
    assert patch == {
        "credentials": {
            "host": "mail.acme.test",
            "port": 465,
            "security": "tls",
            "from": "a@acme.test",
        }
    }
    openai = REGISTRY.get("openai")
    assert openai.normalize_attrs({"api_key": SECRET, "note": {"team": ["a", 1, None, 1.5]}}) == {
        "api_key": SECRET,
        "note": {"team": ["a", 1, None, 1.5]},
    }


def test_normalize_accepts_a_nested_credentials_map_and_flat_keys_win():
    postgres = REGISTRY.get("postgres")
    patch = postgres.normalize_attrs(
        {"credentials": {"host": "db.test", "port": 5432, "database": "a"}, "database": "b"}
    )
    assert patch == {"credentials": {"host": "db.test", "port": 5432, "database": "b"}}


def test_normalize_blank_non_string_means_unset_and_booleans_read_form_values():
    provider = custom(
        setup_fields=(
            SetupField(key="api_key", label="Key", secret=True),
            SetupField(key="limit", label="Limit", type="integer"),
            SetupField(key="debug", label="Debug", type="boolean"),
            SetupField(key="base", label="Base URL", type="url"),
        )
    )
    assert provider.normalize_attrs({"limit": "", "debug": "on", "base": "https://x.test/v1"}) == {
        "limit": None,
        "debug": True,
        "base": "https://x.test/v1",
    }
    assert provider.normalize_attrs({"debug": False, "limit": -3}) == {"debug": False, "limit": -3}


@pytest.mark.parametrize(
    ("key", "attrs", "field"),
    [
        ("smtp", {"port": "twenty-five"}, "port"),
        ("smtp", {"port": True}, "port"),
        ("smtp", {"port": 2.5}, "port"),
        ("smtp", {"security": "ssl3"}, "security"),
        ("openai", {"api_key": 12345}, "api_key"),
        ("openai", {"api_key": "ab\x00cd"}, "api_key"),
        ("microsoft", {"tenant_id": "evil.test/x?y"}, "tenant_id"),
        ("aws", {"region": "us-east-1.evil.test"}, "region"),
        ("twilio", {"account_sid": "not-a-sid"}, "account_sid"),
        ("smtp", {"credentials": ["host"]}, "credentials"),
    ],
)
def test_wrong_field_types_raise_invalid_field_naming_the_field(
    key: str, attrs: dict[str, Any], field: str
):
    with pytest.raises(InvalidField) as info:
        REGISTRY.get(key).normalize_attrs(attrs)
    assert info.value.context["field"] == field
    assert field in str(info.value)
    assert info.value.code == "invalid_field"


@pytest.mark.parametrize(
    ("attrs", "code"),
    [
        ({1: "x"}, "invalid_attrs"),
        ({"note": {2: "x"}}, "invalid_attrs"),
        ({"credentials": {3: "x"}}, "invalid_attrs"),
        ({"note": object()}, "invalid_field"),
        ({"note": float("nan")}, "invalid_field"),
        ({"note": {"deep": ["a\x00b"]}}, "invalid_field"),
        ({"note": {"a", "b"}}, "invalid_field"),
    ],
)
def test_unusable_attrs_raise_invalid_attrs(attrs: dict[Any, Any], code: str):
    provider = REGISTRY.get("smtp") if "credentials" in attrs else REGISTRY.get("openai")
    with pytest.raises(InvalidAttrs) as info:
        provider.normalize_attrs(attrs)
    assert info.value.code == code, info.value


def test_normalize_refuses_a_non_mapping():
    with pytest.raises(InvalidAttrs) as info:
        REGISTRY.get("openai").normalize_attrs(["api_key"])  # type: ignore[arg-type]
    assert info.value.code == "invalid_attrs", info.value


@given(st.text(min_size=1, max_size=40))
def test_normalize_errors_never_contain_the_value(tail: str):
    secret = SECRET + tail
    smtp = REGISTRY.get("smtp")
    attempts: list[dict[Any, Any]] = [
        {"port": secret},
        {"security": secret},
        {"password": {"nested": secret}},
        {"note": {secret: float("inf")}},
        {"password": secret + "\x00"},
    ]
    for attrs in attempts:
        with pytest.raises(InvalidAttrs) as info:
            smtp.normalize_attrs(attrs)
        assert SECRET not in str(info.value)
        assert SECRET not in repr(info.value)
        assert SECRET not in repr(info.value.context)


def test_missing_required_reads_merged_data_and_defaults():
    microsoft = REGISTRY.get("microsoft")
    assert microsoft.missing_required({}) == ["client_id", "client_secret"]
    assert microsoft.missing_required({"client_id": "id", "client_secret": "  "}) == [
        "client_secret"
    ]
    assert (
        microsoft.missing_required({"client_id": "id", "client_secret": "s", "tenant_id": ""}) == []
    )
    postgres = REGISTRY.get("postgres")
    assert postgres.missing_required({"credentials": {"host": "db"}}) == ["username", "database"]
    assert postgres.is_configured({"credentials": {"host": "db", "username": "u", "database": "d"}})


def test_runtime_credentials_by_auth_type():
    google = REGISTRY.get("google")
    assert not google.has_runtime_credentials({"client_id": "a", "client_secret": "b"})
    assert google.has_runtime_credentials({"access_token": "t"})
    assert REGISTRY.get("openai").has_runtime_credentials({"api_key": "k"})
    assert not REGISTRY.get("openai").has_runtime_credentials({"api_key": ""})
    aws = REGISTRY.get("aws")
    assert not aws.has_runtime_credentials({"access_key": "a"})
    assert aws.has_runtime_credentials({"access_key": "a", "secret_key": "s"})
    smtp = REGISTRY.get("smtp")
    assert not smtp.has_runtime_credentials({})
    assert not smtp.has_runtime_credentials({"credentials": {"port": 25}})
    assert smtp.has_runtime_credentials({"credentials": {"host": "mail.test"}})


def test_render_url_fills_blank_fields_with_their_default_and_encodes_values():
    microsoft = REGISTRY.get("microsoft")
    assert microsoft.authorize_url is not None
    assert (
        microsoft.render_url(microsoft.authorize_url, {"tenant_id": ""})
        == "https://login.microsoftonline.com/common/oauth2/v2.0/authorize"
    )
    assert microsoft.render_url(microsoft.authorize_url, {"tenant_id": "contoso.test"}).startswith(
        "https://login.microsoftonline.com/contoso.test/"
    )
    assert "a%2Fb%3Fc" in microsoft.render_url(microsoft.authorize_url, {"tenant_id": "a/b?c"})
    twilio = REGISTRY.get("twilio")
    assert twilio.validation is not None
    with pytest.raises(MissingField):
        twilio.render_url(twilio.validation.url, {})


def test_userinfo_map_picks_the_first_non_blank_key():
    microsoft = REGISTRY.get("microsoft")
    assert microsoft.map_userinfo(
        {"mail": None, "userPrincipalName": "a@contoso.test", "displayName": "A"}
    ) == {"email": "a@contoso.test", "name": "A", "picture": None, "account_id": None}
    github = REGISTRY.get("github")
    assert github.map_userinfo({"login": "octo", "name": "", "avatar_url": "https://x/a.png"}) == {
        "email": None,
        "name": "octo",
        "picture": "https://x/a.png",
        "account_id": None,
    }
    nested = custom(userinfo_map={"email": ("user.email",)})
    assert nested.map_userinfo({"user": {"email": "u@x.test"}})["email"] == "u@x.test"


# --- the registry -----------------------------------------------------------------------


def test_registry_lists_builtins_sorted_by_key():
    keys = [p.key for p in REGISTRY.all()]
    assert keys == sorted(keys)
    assert len(keys) == len(BUILTIN_PROVIDERS) == len(REGISTRY)
    assert "openai" in REGISTRY and "nope" not in REGISTRY and 3 not in REGISTRY


@pytest.mark.parametrize("key", ["nope", "", None, 3, ("openai",)])
def test_registry_get_refuses_unknown_and_non_string_keys(key: object):
    with pytest.raises(InvalidProviderKey):
        REGISTRY.get(key)


def test_registry_adds_application_providers():
    registry = ProviderRegistry([custom()])
    assert registry.get("acme").name == "Acme"
    assert [p.key for p in registry.all()] == sorted(p.key for p in registry.all())


def test_clash_with_a_builtin_is_refused_unless_override_is_asked_for():
    mine = custom(key="openai", name="My OpenAI", api_hosts=("llm.internal.test",))
    with pytest.raises(ProviderConflict) as info:
        ProviderRegistry([mine])
    assert info.value.code == "provider_conflict"
    registry = ProviderRegistry([mine], override=True)
    assert registry.get("openai").name == "My OpenAI"
    assert ProviderRegistry().get("openai").name == "OpenAI"


def test_duplicate_application_providers_always_conflict():
    with pytest.raises(ProviderConflict):
        ProviderRegistry([custom(), custom(name="Acme 2")])
    with pytest.raises(ProviderConflict):
        ProviderRegistry([custom(key="openai"), custom(key="openai")], override=True)


def test_registry_refuses_non_providers():
    with pytest.raises(TypeError, match="expected a Provider"):
        ProviderRegistry([{"key": "acme"}])  # type: ignore[list-item]


def test_a_provider_can_ask_to_override_a_builtin_itself():
    mine = custom(key="openai", name="My OpenAI", api_hosts=("llm.internal.test",), override=True)
    assert ProviderRegistry([mine]).get("openai").name == "My OpenAI"


async def test_integrations_takes_overrides_through_either_switch(fresh_db):
    from integrations import Integrations

    from .conftest import TEST_KEY

    mine = custom(key="openai", name="My OpenAI", api_hosts=("llm.internal.test",))
    with pytest.raises(ProviderConflict):
        Integrations(fresh_db, keys=TEST_KEY, providers=[mine])
    integ = Integrations(fresh_db, keys=TEST_KEY, providers=[mine], override_providers=True)
    assert {p.key: p.name for p in integ.list_providers()}["openai"] == "My OpenAI"
