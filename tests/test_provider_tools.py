"""`integrations providers schema|validate|convert`: the published provider format and the
converter for Nango-format files (tests/fixtures/nango_providers.yaml, written here)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from integrations._catalogue import CATALOGUE_DIR
from integrations._convert import convert_nango
from integrations._errors import InvalidField
from integrations._provider_file import lint_provider
from integrations._registry import load_providers
from integrations.cli import cli

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "nango_providers.yaml"
# Entries of the fixture in modes this package has no scheme for, or that bind no host.
NOT_CONVERTIBLE = {"acme-warehouse", "acme-ledger", "acme-cloud"}


def run(*args: str) -> tuple[int, str, str]:
    done = CliRunner().invoke(cli, list(args))
    return done.exit_code, done.stdout, done.stderr


# --- schema ----------------------------------------------------------------------------


def test_schema_is_generated_from_the_provider_model() -> None:
    code, out, _ = run("providers", "schema")
    assert code == 0
    schema = json.loads(out)
    entry = schema["$defs"]["Provider"]
    assert schema["properties"]["providers"]["items"] == {"$ref": "#/$defs/Provider"}
    assert {"key", "name", "auth_type", "api_hosts", "validation", "extends"} <= set(
        entry["properties"]
    )
    assert set(entry["required"]) == {"key", "name", "auth_type"}
    assert entry["additionalProperties"] is False


def test_every_catalogue_file_fits_the_schema_s_fields() -> None:
    schema = json.loads(run("providers", "schema")[1])
    known = set(schema["$defs"]["Provider"]["properties"])
    for path in CATALOGUE_DIR.glob("*.toml"):
        (entry,) = tomllib.loads(path.read_text())["providers"]
        assert set(entry) <= known, path.name


# --- validate --------------------------------------------------------------------------


def test_validate_accepts_the_catalogue_and_names_file_entry_and_field(tmp_path: Path) -> None:
    files = [str(p) for p in sorted(CATALOGUE_DIR.glob("*.toml"))[:20]]
    code, out, err = run("providers", "validate", *files)
    assert code == 0, err
    assert out.count("valid") == 20
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[providers]]\nkey = "ok"\nname = "Ok"\nauth_type = "api_key"\n'
        'api_hosts = ["api.ok.test"]\n\n'
        '[[providers]]\nkey = "plain"\nname = "Plain"\nauth_type = "api_key"\n'
        'api_hosts = ["api.plain.test"]\n'
        'validation = { url = "http://api.plain.test/me" }\n'
    )
    code, _, err = run("providers", "validate", str(bad))
    assert code == 1
    assert f"Provider file {str(bad)!r}, entry 2 ('plain'), field 'validation.url'" in err
    broken = tmp_path / "broken.toml"
    broken.write_text('[[providers]]\nkey = "x"\nname = "X"\nauth_type = "api_key"\npkce = 3\n')
    code, _, err = run("providers", "validate", str(broken))
    assert code == 1 and "entry 1 ('x'), field 'pkce'" in err


# --- convert ---------------------------------------------------------------------------


def test_the_fixture_covers_each_mode_and_placeholder_form() -> None:
    doc = yaml.safe_load(FIXTURE.read_text())
    modes = {entry.get("auth_mode") for entry in doc.values()}
    assert {"OAUTH2", "OAUTH2_CC", "API_KEY", "BASIC", "JWT", "OAUTH1"} <= modes
    text = FIXTURE.read_text()
    for form in ("${connectionConfig.", "${apiKey}", "${credentials.apiKey}", "alias:", "query:"):
        assert form in text


def test_convert_writes_valid_providers_and_reports_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "converted.toml"
    code, stdout, err = run(
        "providers", "convert", "--from", "nango", str(FIXTURE), "--out", str(out)
    )
    assert code == 0, err
    doc = yaml.safe_load(FIXTURE.read_text())
    convertible = set(doc) - NOT_CONVERTIBLE
    converted = {p.key: p for p in load_providers(out)}
    # At least 95% of the convertible entries convert with no manual edit.
    assert len(set(converted) & convertible) >= 0.95 * len(convertible)
    for key in NOT_CONVERTIBLE:
        assert f"not converted: {key}: " in err
    assert "mode unsupported" in err
    assert f"{len(converted)} converted, {len(NOT_CONVERTIBLE)} not converted" in stdout
    for provider in converted.values():
        assert lint_provider(provider) == []


def test_converted_entries_keep_what_the_source_says() -> None:
    result = convert_nango(yaml.safe_load(FIXTURE.read_text()))
    by_key = {entry["key"]: entry for entry in result.entries}
    crm = by_key["acme-crm"]
    assert crm["api_hosts"] == ["api.acme-crm.example.test"]
    assert crm["validation"] == {"url": "https://api.acme-crm.example.test/v1/me"}
    assert crm["authorize_params"] == {"access_type": "offline", "prompt": "consent"}
    desk = by_key["acme-desk"]
    assert desk["api_hosts"] == ["{subdomain}.acmedesk.example.test"]
    assert desk["scopes"] == ["tickets:read", "users:read"] and desk["scope_separator"] == ","
    assert desk["pkce"] is False and desk["token_auth"] == "client_secret_basic"
    assert by_key["acme-crm-sandbox"]["scopes"] == ["contacts.read"]
    assert by_key["acme-crm-sandbox"]["token_url"] == crm["token_url"]
    assert by_key["acme-pay"]["auth_type"] == "oauth2_client_credentials"
    # Bearer {api_key} is the api_key scheme's own header: left out of the entry.
    assert by_key["acme-ai"]["auth_type"] == "api_key" and "auth_header" not in by_key["acme-ai"]
    assert by_key["acme-mail"]["auth_header"] == {"name": "x-api-key", "template": "{api_key}"}
    metrics = by_key["acme-metrics"]
    assert metrics["validation"]["method"] == "POST"
    assert metrics["auth_header"]["template"] == "Token token={api_key}"
    assert by_key["acme-billing"]["auth_type"] == "key_secret"
    assert by_key["acme-maps"]["auth_header"] == {
        "kind": "query",
        "name": "api_key",
        "template": "{api_key}",
    }
    docs = by_key["acme-docs"]
    assert docs["auth_type"] == "jwt_bearer"
    assert docs["token_url"] == "https://auth.acmedocs.example.test/oauth2/token"
    assert docs["scopes"] == ["docs.read", "docs.write"]
    assert docs["api_hosts"] == ["{region}.api.acmedocs.example.test"]
    fields = {field["key"] for field in docs["setup_fields"]}
    assert {"client_email", "private_key", "region"} <= fields
    skipped = dict(result.skipped)
    assert "token_url" in skipped["acme-warehouse"]
    assert "HS256" in skipped["acme-ledger"]
    social = by_key["acme-social"]
    assert social["auth_type"] == "oauth1"
    assert social["request_token_url"] == "https://social.example.test/oauth/request_token"


@pytest.mark.parametrize(
    "key", ["acme-desk", "acme-git", "acme-metrics", "acme-helpdesk", "acme-docs"]
)
def test_converted_tenant_hosts_refuse_hostile_values(tmp_path: Path, key: str) -> None:
    out = tmp_path / "converted.toml"
    run("providers", "convert", "--from", "nango", str(FIXTURE), "--out", str(out))
    provider = next(p for p in load_providers(out) if p.key == key)
    (name,) = provider.host_fields
    field = next(f for f in provider.setup_fields if f.key == name)
    for hostile in ("evil.com#", "a.evil.com/", "x@evil.com"):
        with pytest.raises(InvalidField):
            field.coerce(hostile)
        assert provider.for_data({name: hostile}).api_hosts == ()


def test_convert_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed\n")
    code, _, err = run("providers", "convert", "--from", "nango", str(bad), "--out", "x.toml")
    assert code == 2 and "cannot read" in err
    empty = tmp_path / "empty.yaml"
    empty.write_text("just-text\n")
    code, _, err = run(
        "providers", "convert", "--from", "nango", str(empty), "--out", str(tmp_path / "o.toml")
    )
    assert code == 1 and "not converted" in err
    assert not (tmp_path / "o.toml").exists()


def test_the_global_providers_option_takes_a_toml_file_and_says_so(tmp_path: Path) -> None:
    file = tmp_path / "acme.toml"
    file.write_text(
        '[[providers]]\nkey = "acme-tools"\nname = "Acme"\nauth_type = "api_key"\n'
        'docs_url = "https://acme.example/docs/auth"\napi_hosts = ["api.acme.example"]\n'
    )
    helped = CliRunner().invoke(cli, ["--help"])
    assert helped.exit_code == 0 and "TOML or JSON" in " ".join(helped.output.split())
    listed = CliRunner().invoke(cli, ["--providers", str(file), "--json", "providers"])
    assert listed.exit_code == 0, listed.output
    assert "acme-tools" in [entry["key"] for entry in json.loads(listed.output)]
