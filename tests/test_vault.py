"""Vault: field envelopes, keyring, rotation and masking, without a database."""

from __future__ import annotations

import base64
import copy
import json
import logging
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integrations._errors import (
    ConfigurationError,
    CryptoError,
    DecryptionFailed,
    EncryptionNotConfigured,
    InvalidAttrs,
    UnknownKey,
)
from integrations._vault import (
    SECRET_FIELDS,
    Keyring,
    Vault,
    _associated_data,
    _key_id,
    generate_key,
    is_envelope,
    mask_data,
    mask_secret,
)

ROW = "0190f5a2-7c3e-7b1a-9d4e-2f6a8b0c1d2e"
OTHER_ROW = "0190f5a2-7c3e-7b1a-9d4e-2f6a8b0c1d2f"
MARKER = "sk-live-MARKER-5f2b9c81d7"
OLD_KEY = generate_key()
NEW_KEY = generate_key()


def kid_of(key: str) -> str:
    return key.split(":")[1]


def body_of(key: str) -> str:
    return key.split(":")[2]


@pytest.fixture
def vault() -> Vault:
    return Vault(Keyring.parse(NEW_KEY))


def oauth_data() -> dict[str, Any]:
    return {
        "provider": "google",
        "name": "default",
        "status": "connected",
        "client_id": "1234.apps.example.com",
        "client_secret": "GOCSPX-client-secret-value",
        "access_token": MARKER,
        "refresh_token": "1//refresh-token-value",
        "expires_at": 1_900_000_000,
        "scopes": ["email", "profile"],
    }


# Keys


def test_generate_key_carries_its_key_id() -> None:
    prefix, kid, body = generate_key().split(":")
    assert prefix == "ik1"
    assert len(kid) == 8
    int(kid, 16)
    assert len(base64.urlsafe_b64decode(body + "=")) == 32


def test_generate_key_is_unique() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    assert len({kid_of(key) for key in keys}) == 200


def test_parse_round_trips_a_generated_key() -> None:
    ring = Keyring.parse(NEW_KEY)
    assert ring.primary_id == kid_of(NEW_KEY)
    assert ring.ids == (kid_of(NEW_KEY),)


def test_parse_takes_a_sequence_primary_first() -> None:
    ring = Keyring.parse([NEW_KEY, OLD_KEY])
    assert ring.primary_id == kid_of(NEW_KEY)
    assert ring.ids == (kid_of(NEW_KEY), kid_of(OLD_KEY))


def test_parse_takes_a_comma_separated_string() -> None:
    ring = Keyring.parse(f" {OLD_KEY} , {NEW_KEY},")
    assert ring.ids == (kid_of(OLD_KEY), kid_of(NEW_KEY))


def test_parse_ignores_a_repeated_key() -> None:
    assert Keyring.parse([NEW_KEY, OLD_KEY, NEW_KEY]).ids == (kid_of(NEW_KEY), kid_of(OLD_KEY))


def _malformed_keys() -> list[str]:
    kid, body = kid_of(NEW_KEY), body_of(NEW_KEY)
    other_kid = kid_of(OLD_KEY)
    return [
        body,
        f"ik2:{kid}:{body}",
        f"{kid}:{body}",
        f"ik1:{kid}:{body}:extra",
        f"ik1:{kid}:{body[:-2]}",
        f"ik1:{kid}:{body}AA",
        f"ik1:{kid}:{body[:-1]}!",
        f"ik1:{kid.upper()}:{body}" if kid.upper() != kid else f"ik1:{kid}x:{body}",
        f"ik1:{other_kid}:{body}",
        f"ik1::{body}",
        f"ik1:{kid}:{base64.urlsafe_b64encode(b'x' * 31).decode()}",
        f"ik1:{kid}",
        f"ik0:{kid}:{body}",
    ]


_MALFORMED = _malformed_keys()


@pytest.mark.parametrize("key", _MALFORMED, ids=[f"case{i}" for i in range(len(_MALFORMED))])
def test_malformed_key_raises_configuration_error_without_echoing_it(key: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Keyring.parse([OLD_KEY, key])
    message = str(info.value) + repr(info.value)
    assert "#2" in message
    assert body_of(NEW_KEY)[:8] not in message
    assert key not in message
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ or info.value.__context__ is None


@pytest.mark.parametrize("keys", ["", " , ", []])
def test_parse_without_any_key_is_a_configuration_error(keys: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        Keyring.parse(keys)
    assert info.value.code == "configuration", info.value


@pytest.mark.parametrize("keys", [None, 42, [NEW_KEY, b"bytes"]])
def test_parse_rejects_non_strings_with_a_configuration_error(keys: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        Keyring.parse(keys)
    assert info.value.code == "configuration", info.value


def test_from_env_reads_comma_separated_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTEGRATIONS_KEYS", f"{NEW_KEY},{OLD_KEY}")
    ring = Keyring.from_env()
    assert ring is not None
    assert ring.ids == (kid_of(NEW_KEY), kid_of(OLD_KEY))


@pytest.mark.parametrize("value", [None, "", "  ", ","])
def test_from_env_is_none_when_unset_or_empty(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("INTEGRATIONS_KEYS", raising=False)
    else:
        monkeypatch.setenv("INTEGRATIONS_KEYS", value)
    assert Keyring.from_env() is None


def test_from_env_malformed_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTEGRATIONS_KEYS", body_of(NEW_KEY))
    with pytest.raises(ConfigurationError) as info:
        Keyring.from_env()
    assert body_of(NEW_KEY) not in str(info.value)


def test_repr_of_keyring_and_vault_shows_only_key_ids() -> None:
    ring = Keyring.parse([NEW_KEY, OLD_KEY])
    for text in (repr(ring), str(ring), repr(Vault(ring)), str(Vault(ring))):
        assert kid_of(NEW_KEY) in text
        for key in (NEW_KEY, OLD_KEY):
            assert body_of(key) not in text
            assert body_of(key)[:8] not in text
    assert repr(Vault(None, encryption="off")) == "Vault(keyring=None, encryption='off')"


def test_keyring_holds_no_attribute_dict() -> None:
    assert not hasattr(Keyring.parse(NEW_KEY), "__dict__")


# Sealing and unsealing


@pytest.mark.parametrize("field", sorted(SECRET_FIELDS))
def test_each_secret_field_round_trips_as_an_envelope(vault: Vault, field: str) -> None:
    data = {"status": "connected", field: MARKER}
    sealed = vault.seal(ROW, data)
    assert is_envelope(sealed[field])
    assert sealed["status"] == "connected"
    assert MARKER not in json.dumps(sealed)
    assert vault.unseal(ROW, sealed) == data


def test_credentials_map_round_trips_with_non_string_values(vault: Vault) -> None:
    credentials: dict[str, Any] = {
        "host": "smtp.example.com",
        "port": 587,
        "tls": True,
        "ratio": 0.25,
        "tags": ["a", 1, None],
        "nested": {"user": "u", "password": MARKER},
        "unset": None,
    }
    sealed = vault.seal(ROW, {"credentials": credentials})
    for key, value in sealed["credentials"].items():
        assert value is None if key == "unset" else is_envelope(value)
    assert MARKER not in json.dumps(sealed)
    unsealed = vault.unseal(ROW, sealed)
    assert unsealed == {"credentials": credentials}
    assert type(unsealed["credentials"]["port"]) is int
    assert type(unsealed["credentials"]["tls"]) is bool


@pytest.mark.parametrize("value", [0, 42, 3.5, True, False, "", "short", [], {"a": [1, 2]}])
def test_non_string_and_short_values_round_trip_with_their_type(vault: Vault, value: Any) -> None:
    sealed = vault.seal_value(ROW, "api_key", value)
    assert is_envelope(sealed)
    assert "hint" not in sealed
    unsealed = vault.unseal_value(ROW, "api_key", sealed)
    assert unsealed == value
    assert type(unsealed) is type(value)


def test_extra_secret_fields_are_sealed(vault: Vault) -> None:
    data = {"webhook_secret": MARKER, "region": "eu-west-1"}
    sealed = vault.seal(ROW, data, ["webhook_secret"])
    assert is_envelope(sealed["webhook_secret"])
    assert sealed["region"] == "eu-west-1"
    assert vault.unseal(ROW, sealed, ["webhook_secret"]) == data


def test_unseal_decrypts_envelopes_even_without_being_told_the_field(vault: Vault) -> None:
    sealed = vault.seal(ROW, {"webhook_secret": MARKER}, ["webhook_secret"])
    assert vault.unseal(ROW, sealed) == {"webhook_secret": MARKER}


def test_non_secret_fields_stay_plain_and_queryable(vault: Vault) -> None:
    sealed = vault.seal(ROW, oauth_data())
    for field in ("provider", "name", "status", "client_id", "expires_at", "scopes"):
        assert sealed[field] == oauth_data()[field]


def test_none_stays_none(vault: Vault) -> None:
    data = {"access_token": None, "credentials": None}
    assert vault.seal(ROW, data) == data
    assert vault.seal_value(ROW, "pkce_verifier", None) is None


def test_seal_does_not_mutate_its_input(vault: Vault) -> None:
    data = {**oauth_data(), "credentials": {"password": MARKER}}
    before = copy.deepcopy(data)
    vault.unseal(ROW, vault.seal(ROW, data))
    assert data == before


def test_seal_refuses_envelopes_in_caller_data(vault: Vault) -> None:
    sealed = vault.seal(ROW, {**oauth_data(), "credentials": {"k": "v"}})
    for data in (
        {"access_token": sealed["access_token"]},
        {"credentials": {"k": sealed["credentials"]["k"]}},
        {"note": sealed["access_token"]},
        {"note": {"$enc": 1.0}},
    ):
        with pytest.raises(InvalidAttrs) as info:
            vault.seal(ROW, data)
        assert "$enc" in info.value.message
        assert sealed["access_token"]["ct"] not in str(info.value)


def test_seal_value_encrypts_an_envelope_shaped_value_as_a_value(vault: Vault) -> None:
    inner = vault.seal_value(ROW, "api_key", MARKER)
    outer = vault.seal_value(ROW, "api_key", inner)
    assert outer is not inner and outer["n"] != inner["n"]
    assert vault.unseal_value(ROW, "api_key", outer) == inner


def test_sealing_twice_uses_fresh_nonces(vault: Vault) -> None:
    first = vault.seal_value(ROW, "api_key", MARKER)
    second = vault.seal_value(ROW, "api_key", MARKER)
    assert first["n"] != second["n"]
    assert first["ct"] != second["ct"]


def test_envelope_shape(vault: Vault) -> None:
    envelope = vault.seal_value(ROW, "api_key", MARKER)
    assert set(envelope) == {"$enc", "kid", "n", "ct", "hint"}
    assert envelope["$enc"] == 1
    assert envelope["kid"] == kid_of(NEW_KEY)
    assert len(base64.b64decode(envelope["n"])) == 12
    assert envelope["hint"] == MARKER[-4:]
    json.dumps(envelope)


def test_hint_is_only_kept_for_strings_of_twelve_or_more(vault: Vault) -> None:
    assert vault.seal_value(ROW, "api_key", "x" * 12)["hint"] == "xxxx"
    assert "hint" not in vault.seal_value(ROW, "api_key", "x" * 11)
    assert "hint" not in vault.seal_value(ROW, "api_key", 10**15)


def test_pkce_verifier_seals_as_a_single_value(vault: Vault) -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    sealed = vault.seal_value(ROW, "pkce_verifier", verifier)
    assert is_envelope(sealed)
    assert vault.unseal_value(ROW, "pkce_verifier", sealed) == verifier
    with pytest.raises(DecryptionFailed):
        vault.unseal_value(ROW, "access_token", sealed)


def test_unseal_value_refuses_plaintext_while_encryption_is_on(vault: Vault) -> None:
    with pytest.raises(DecryptionFailed) as info:
        vault.unseal_value(ROW, "api_key", MARKER)
    assert MARKER not in str(info.value)
    assert vault.unseal_value(ROW, "api_key", None) is None


def test_unseal_value_returns_plaintext_unchanged_while_encryption_is_off() -> None:
    assert Vault(None, encryption="off").unseal_value(ROW, "api_key", MARKER) == MARKER


def test_credentials_that_are_not_a_map_are_sealed_whole(vault: Vault) -> None:
    data = {"credentials": MARKER}
    sealed = vault.seal(ROW, data)
    assert is_envelope(sealed["credentials"])
    assert vault.unseal(ROW, sealed) == data


def test_row_uuid_is_compared_in_canonical_form(vault: Vault) -> None:
    sealed = vault.seal(ROW.upper(), oauth_data())
    assert vault.unseal(uuid.UUID(ROW), sealed) == oauth_data()  # type: ignore[arg-type]
    assert vault.unseal(ROW, sealed) == oauth_data()


def test_a_value_that_is_not_json_raises_type_error_without_the_value(vault: Vault) -> None:
    with pytest.raises(TypeError) as info:
        vault.seal(ROW, {"api_key": {MARKER}})
    assert MARKER not in str(info.value)
    assert "api_key" in str(info.value)


# A string shaped like an envelope is just a string


def test_a_string_shaped_like_an_envelope_is_not_an_envelope(vault: Vault) -> None:
    real = vault.seal_value(ROW, "api_key", MARKER)
    lookalike = json.dumps(real)
    assert not is_envelope(lookalike)
    sealed = vault.seal(ROW, {"api_key": lookalike, "note": lookalike})
    assert is_envelope(sealed["api_key"])
    assert sealed["note"] == lookalike
    assert vault.unseal(ROW, sealed) == {"api_key": lookalike, "note": lookalike}


@pytest.mark.parametrize(
    "value",
    [
        {"$enc": 1, "kid": "abcd1234", "n": "AA=="},
        {"$enc": True, "kid": "abcd1234", "n": "AA==", "ct": "AA=="},
        {"$enc": "1", "kid": "abcd1234", "n": "AA==", "ct": "AA=="},
        {"$enc": 1, "kid": "abcd1234", "n": "AA==", "ct": "AA==", "extra": 1},
        {"$enc": 1, "kid": 5, "n": "AA==", "ct": "AA=="},
        {"$enc": 1, "kid": "abcd1234", "n": "AA==", "ct": "AA==", "hint": 1234},
        {"$enc": 1, "kid": "abcd1234", "n": "A" * 16, "ct": "A" * 24, "hint": ""},
        {"$enc": 1, "kid": "abcd1234", "n": "A" * 16, "ct": "A" * 24, "hint": "abc"},
        ["$enc", "kid", "n", "ct"],
        None,
    ],
)
def test_is_envelope_is_strict_about_shape(value: object) -> None:
    assert not is_envelope(value)


def test_a_credential_map_value_shaped_almost_like_an_envelope_is_refused(vault: Vault) -> None:
    data = {"credentials": {"blob": {"$enc": "user data", "kid": "abcd1234"}}}
    with pytest.raises(InvalidAttrs) as info:
        vault.seal(ROW, data)
    assert info.value.code == "invalid_attrs", info.value


def test_a_credential_map_value_nesting_a_lookalike_deeper_round_trips(vault: Vault) -> None:
    data = {"credentials": {"blob": {"inner": {"$enc": "user data"}}}}
    sealed = vault.seal(ROW, data)
    assert is_envelope(sealed["credentials"]["blob"])
    assert vault.unseal(ROW, sealed) == data


# Associated data: row and field binding, tampering


def test_ciphertext_moved_to_another_row_fails(vault: Vault) -> None:
    sealed = vault.seal(ROW, oauth_data())
    with pytest.raises(DecryptionFailed) as info:
        vault.unseal(OTHER_ROW, sealed)
    assert info.value.code == "decryption_failed"


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (("access_token",), ("refresh_token",)),
        (("access_token",), ("credentials", "access_token")),
        (("credentials", "a"), ("credentials", "b")),
        (("credentials", "a"), ("password",)),
    ],
)
def test_ciphertext_moved_to_another_field_fails(
    vault: Vault, source: tuple[str, ...], target: tuple[str, ...]
) -> None:
    sealed = vault.seal(ROW, {"access_token": MARKER, "credentials": {"a": MARKER}})
    envelope = sealed[source[0]] if len(source) == 1 else sealed[source[0]][source[1]]
    moved: dict[str, Any] = {"credentials": {}}
    if len(target) == 1:
        moved[target[0]] = envelope
    else:
        moved["credentials"][target[1]] = envelope
    with pytest.raises(DecryptionFailed) as info:
        vault.unseal(ROW, moved)
    assert ".".join(target) in str(info.value)


@pytest.mark.parametrize("part", ["ct", "n", "hint"])
def test_tampered_envelope_fails(vault: Vault, part: str) -> None:
    envelope = dict(vault.seal_value(ROW, "api_key", MARKER))
    if part == "hint":
        envelope["hint"] = "zzzz"
    else:
        raw = bytearray(base64.b64decode(envelope[part]))
        raw[0] ^= 1
        envelope[part] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(DecryptionFailed):
        vault.unseal_value(ROW, "api_key", envelope)


@pytest.mark.parametrize("garbage", ["not base64!", "", "QUJD"])
def test_garbled_envelope_fails_as_decryption_failed(vault: Vault, garbage: str) -> None:
    envelope = dict(vault.seal_value(ROW, "api_key", MARKER))
    envelope["n"] = garbage
    with pytest.raises(DecryptionFailed) as info:
        vault.unseal_value(ROW, "api_key", envelope)
    assert info.value.__context__ is None


def test_dropping_the_hint_fails(vault: Vault) -> None:
    envelope = dict(vault.seal_value(ROW, "api_key", MARKER))
    del envelope["hint"]
    with pytest.raises(DecryptionFailed):
        vault.unseal_value(ROW, "api_key", envelope)


def test_envelope_relabelled_with_another_ring_key_fails() -> None:
    vault = Vault(Keyring.parse([NEW_KEY, OLD_KEY]))
    envelope = dict(vault.seal_value(ROW, "api_key", MARKER))
    envelope["kid"] = kid_of(OLD_KEY)
    with pytest.raises(DecryptionFailed):
        vault.unseal_value(ROW, "api_key", envelope)


def test_decryption_failure_message_names_the_field_but_no_secret(vault: Vault) -> None:
    sealed = vault.seal(ROW, oauth_data())
    with pytest.raises(DecryptionFailed) as info:
        vault.unseal(OTHER_ROW, sealed)
    message = str(info.value) + repr(info.value) + repr(info.value.context)
    assert "client_secret" in message or "access_token" in message or "refresh_token" in message
    assert MARKER not in message
    assert sealed["access_token"]["ct"] not in message


@pytest.mark.parametrize("version", [2, 0])
def test_unsupported_envelope_version_is_refused(vault: Vault, version: int) -> None:
    envelope = {**vault.seal_value(ROW, "api_key", MARKER), "$enc": version}
    assert is_envelope(envelope)
    with pytest.raises(DecryptionFailed) as info:
        vault.unseal_value(ROW, "api_key", envelope)
    assert f"envelope version {version}" in str(info.value)


# Unknown keys


def test_unknown_key_id_raises_unknown_key_naming_the_kid_and_field() -> None:
    sealed = Vault(Keyring.parse(OLD_KEY)).seal(ROW, {"credentials": {"token": MARKER}})
    with pytest.raises(UnknownKey) as info:
        Vault(Keyring.parse(NEW_KEY)).unseal(ROW, sealed)
    message = str(info.value)
    assert kid_of(OLD_KEY) in message
    assert "credentials.token" in message
    assert MARKER not in message
    assert sealed["credentials"]["token"]["ct"] not in message
    assert info.value.code == "unknown_key"
    assert isinstance(info.value, CryptoError)
    assert info.value.context == {"kid": kid_of(OLD_KEY), "field": "credentials.token"}
    assert "it is not in the keyring" in message


def test_envelope_without_any_keyring_raises_unknown_key() -> None:
    sealed = Vault(Keyring.parse(OLD_KEY)).seal(ROW, {"api_key": MARKER})
    with pytest.raises(UnknownKey) as info:
        Vault(None).unseal(ROW, sealed)
    assert kid_of(OLD_KEY) in str(info.value)
    assert "no keys are configured" in str(info.value)


# Keyring with several keys and rotation


def test_keyring_decrypts_with_any_key_and_writes_with_the_primary() -> None:
    old_sealed = Vault(Keyring.parse(OLD_KEY)).seal(ROW, oauth_data())
    both = Vault(Keyring.parse([NEW_KEY, OLD_KEY]))
    assert both.unseal(ROW, old_sealed) == oauth_data()
    new_sealed = both.seal(ROW, oauth_data())
    assert new_sealed["access_token"]["kid"] == kid_of(NEW_KEY)
    assert Vault(Keyring.parse(NEW_KEY)).unseal(ROW, new_sealed) == oauth_data()


def test_needs_rotation_is_false_under_the_primary(vault: Vault) -> None:
    sealed = vault.seal(ROW, {**oauth_data(), "credentials": {"k": "v"}})
    assert not vault.needs_rotation(sealed)
    assert not vault.needs_rotation({"status": "connected"})
    assert not vault.needs_rotation({"access_token": None})


def test_needs_rotation_sees_old_keys_at_top_level_and_under_credentials() -> None:
    old = Vault(Keyring.parse(OLD_KEY))
    both = Vault(Keyring.parse([NEW_KEY, OLD_KEY]))
    assert both.needs_rotation(old.seal(ROW, {"api_key": MARKER}))
    assert both.needs_rotation(old.seal(ROW, {"x": MARKER}, ["x"]))
    nested = {
        "api_key": both.seal_value(ROW, "api_key", MARKER),
        "credentials": {"k": old.seal_value(ROW, "credentials.k", "v")},
    }
    assert both.needs_rotation(nested)


def test_needs_rotation_sees_plaintext_secrets_only_while_encryption_is_on() -> None:
    plain = {"credentials": {"k": "v"}}
    assert Vault(Keyring.parse(NEW_KEY)).needs_rotation(plain)
    assert Vault(Keyring.parse(NEW_KEY)).needs_rotation({"api_key": MARKER})
    assert Vault(Keyring.parse(NEW_KEY)).needs_rotation({"x": MARKER}, ["x"])
    assert not Vault(Keyring.parse(NEW_KEY)).needs_rotation({"x": MARKER})
    assert not Vault(None, encryption="off").needs_rotation({"api_key": MARKER, **plain})


def test_reseal_moves_every_envelope_to_the_primary() -> None:
    old = Vault(Keyring.parse(OLD_KEY))
    both = Vault(Keyring.parse([NEW_KEY, OLD_KEY]))
    data = {**oauth_data(), "webhook_secret": "w" * 20, "credentials": {"a": 1, "b": MARKER}}
    sealed = old.seal(ROW, data, ["webhook_secret"])
    already = both.seal_value(ROW, "password", "pw-under-primary")
    sealed["password"] = already

    resealed = both.reseal(ROW, sealed)

    assert not both.needs_rotation(resealed)
    assert resealed["password"] is already
    assert resealed["webhook_secret"]["kid"] == kid_of(NEW_KEY)
    assert resealed["credentials"]["b"]["kid"] == kid_of(NEW_KEY)
    new_only = Vault(Keyring.parse(NEW_KEY))
    assert new_only.unseal(ROW, resealed) == {**data, "password": "pw-under-primary"}


def test_reseal_seals_plaintext_secrets() -> None:
    vault = Vault(Keyring.parse(NEW_KEY))
    data = {"api_key": MARKER, "x": "extra-secret-value", "credentials": {"k": "v"}}
    resealed = vault.reseal(ROW, data, ["x"])
    assert is_envelope(resealed["api_key"])
    assert is_envelope(resealed["x"])
    assert is_envelope(resealed["credentials"]["k"])
    assert vault.unseal(ROW, resealed) == data


def test_reseal_with_an_unknown_key_raises_instead_of_dropping() -> None:
    sealed = Vault(Keyring.parse(OLD_KEY)).seal(ROW, {"api_key": MARKER})
    with pytest.raises(UnknownKey):
        Vault(Keyring.parse(NEW_KEY)).reseal(ROW, sealed)


def test_reseal_is_a_no_op_when_nothing_needs_rotation(vault: Vault) -> None:
    sealed = vault.seal(ROW, oauth_data())
    assert vault.reseal(ROW, sealed) == sealed


# Encryption modes


def test_encryption_on_without_keyring_refuses_to_store_a_secret() -> None:
    vault = Vault(None)
    assert vault.enabled
    with pytest.raises(EncryptionNotConfigured) as info:
        vault.seal(ROW, {"api_key": MARKER})
    assert info.value.code == "encryption_not_configured"
    assert isinstance(info.value, ConfigurationError)
    assert MARKER not in str(info.value)
    with pytest.raises(EncryptionNotConfigured):
        vault.seal_value(ROW, "pkce_verifier", "verifier")


def test_encryption_on_without_keyring_still_handles_plaintext_data() -> None:
    vault = Vault(None)
    assert vault.seal(ROW, {"status": "connected", "api_key": None}) == {
        "status": "connected",
        "api_key": None,
    }
    assert vault.unseal(ROW, {"status": "connected", "api_key": None}) == {
        "status": "connected",
        "api_key": None,
    }
    with pytest.raises(DecryptionFailed):
        vault.unseal(ROW, oauth_data())


def test_encryption_off_stores_plaintext_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    vault = Vault(None, encryption="off")
    assert not vault.enabled
    with caplog.at_level(logging.DEBUG, logger="integrations"):
        assert vault.seal(ROW, {"status": "new"}) == {"status": "new"}
        assert caplog.records == []
        assert vault.seal(ROW, oauth_data()) == oauth_data()
        assert vault.seal_value(ROW, "pkce_verifier", "verifier") == "verifier"
        vault.seal(ROW, {"credentials": {"k": "v"}})
    assert len(caplog.records) == 1
    record = caplog.records[0]
    assert record.name == "integrations"
    assert record.levelno == logging.WARNING
    assert "plain text" in record.getMessage()
    assert MARKER not in caplog.text


def test_encryption_off_with_a_keyring_still_decrypts_existing_envelopes() -> None:
    sealed = Vault(Keyring.parse(OLD_KEY)).seal(ROW, oauth_data())
    off = Vault(Keyring.parse(OLD_KEY), encryption="off")
    assert off.unseal(ROW, sealed) == oauth_data()
    assert off.seal(ROW, {"api_key": MARKER}) == {"api_key": MARKER}


def test_encryption_mode_must_be_on_or_off() -> None:
    with pytest.raises(ValueError, match="encryption must be"):
        Vault(None, encryption="maybe")


# Masking


def test_mask_secret_shows_the_last_four_of_long_secrets() -> None:
    assert mask_secret(MARKER) == "••••" + MARKER[-4:]
    assert mask_secret("abcdefghijkl") == "••••ijkl"


@pytest.mark.parametrize("value", ["", "short", "abcdefghijk", 12345678901234, True, {"a": 1}])
def test_mask_secret_shows_nothing_of_short_or_non_string_secrets(value: object) -> None:
    assert mask_secret(value) == "••••"


def test_mask_secret_uses_the_envelope_hint(vault: Vault) -> None:
    assert mask_secret(vault.seal_value(ROW, "api_key", MARKER)) == "••••" + MARKER[-4:]
    assert mask_secret(vault.seal_value(ROW, "api_key", "short")) == "••••"


def test_mask_secret_ignores_an_oversized_hint(vault: Vault) -> None:
    envelope = {**vault.seal_value(ROW, "api_key", MARKER), "hint": MARKER}
    assert mask_secret(envelope) == "••••"


@given(st.text(min_size=12))
def test_masked_long_secret_shows_at_most_its_last_four(secret: str) -> None:
    masked = mask_secret(secret)
    assert masked == "••••" + secret[-4:]
    assert secret not in masked
    assert masked.removeprefix("••••") == secret[-4:]


@given(st.text(max_size=11))
def test_masked_short_secret_shows_nothing(secret: str) -> None:
    assert mask_secret(secret) == "••••"


@given(st.text(min_size=1))
def test_masked_data_never_contains_a_secret_of_twelve_or_more(secret: str) -> None:
    data = {"api_key": secret, "credentials": {"k": secret}, "extra": secret}
    masked = mask_data(data, ["extra"])
    assert masked == {
        "api_key": mask_secret(secret),
        "credentials": {"k": mask_secret(secret)},
        "extra": mask_secret(secret),
    }
    if len(secret) >= 12:
        for shown in (masked["api_key"], masked["credentials"]["k"], masked["extra"]):
            assert secret not in shown


def test_mask_data_masks_secrets_and_keeps_the_rest() -> None:
    data = {
        **oauth_data(),
        "password": None,
        "webhook_secret": "whsec-0123456789",
        "credentials": {"user": "me", "pass": "0123456789abcdef", "none": None},
    }
    masked = mask_data(data, ["webhook_secret"])
    assert masked["access_token"] == "••••" + MARKER[-4:]
    assert masked["client_secret"] == "••••alue"
    assert masked["password"] is None
    assert masked["webhook_secret"] == "••••6789"
    assert masked["credentials"] == {"user": "••••", "pass": "••••cdef", "none": None}
    for field in ("provider", "name", "status", "client_id", "expires_at", "scopes"):
        assert masked[field] == data[field]
    assert MARKER not in json.dumps(masked)


def test_mask_data_gives_the_same_view_of_plaintext_and_sealed_data(vault: Vault) -> None:
    data = {**oauth_data(), "x": "extra-secret-value", "credentials": {"k": MARKER, "n": 5}}
    sealed = vault.seal(ROW, data, ["x"])
    assert mask_data(sealed, ["x"]) == mask_data(data, ["x"])
    # An envelope is masked even when the caller does not name its field.
    assert mask_data(sealed) == mask_data(data, ["x"])


def test_mask_data_masks_credentials_that_are_not_a_map(vault: Vault) -> None:
    assert mask_data({"credentials": MARKER}) == {"credentials": "••••" + MARKER[-4:]}
    sealed = vault.seal(ROW, {"credentials": MARKER})
    assert mask_data(sealed) == {"credentials": "••••" + MARKER[-4:]}


def test_mask_data_does_not_mutate_its_input() -> None:
    data = {**oauth_data(), "credentials": {"k": MARKER}}
    before = copy.deepcopy(data)
    mask_data(data)
    assert data == before


def test_secret_fields_are_the_documented_set() -> None:
    assert (
        frozenset(
            {
                "client_secret",
                "access_token",
                "refresh_token",
                "api_key",
                "secret_key",
                "bot_token",
                "password",
            }
        )
        == SECRET_FIELDS
    )


def test_keyring_constructor_refuses_raw_material_that_is_not_a_key() -> None:
    with pytest.raises(ValueError, match=r"use Keyring\.parse\(\)"):
        Keyring([("abcd1234", b"too short")])


# Values read back from storage


def fresh(value: str) -> str:
    """An equal string that is not the same object (as values read from storage are)."""
    return "".join(list(value))


def test_a_credentials_value_that_is_not_a_map_is_masked_under_a_key_read_from_storage() -> None:
    assert mask_data({fresh("credentials"): MARKER}) == {"credentials": "••••" + MARKER[-4:]}
    masked = mask_data({fresh("credentials"): {"user": "me", "pass": "0123456789abcdef"}})
    assert masked == {"credentials": {"user": "••••", "pass": "••••cdef"}}


def test_only_credentials_is_a_map_of_secrets_other_maps_are_one_value(vault: Vault) -> None:
    # Fields that sort either side of "credentials": a secret map is sealed whole, another kept.
    data = {
        "access_token": {"a": MARKER},
        "account": {"region": "eu"},
        "password": {"p": MARKER},
        "zone": {"name": "z"},
    }
    sealed = vault.seal(ROW, data)
    assert is_envelope(sealed["access_token"]) and is_envelope(sealed["password"])
    assert sealed["account"] == {"region": "eu"} and sealed["zone"] == {"name": "z"}
    assert vault.unseal(ROW, sealed) == data


def test_an_envelope_under_the_primary_read_back_from_storage_is_not_resealed(
    vault: Vault,
) -> None:
    stored = json.loads(json.dumps(vault.seal(ROW, {"api_key": MARKER})))
    assert vault.reseal(ROW, stored) == stored


@pytest.mark.parametrize("shape", ["list", "map", "deeper"])
def test_reseal_refuses_an_envelope_put_inside_a_plaintext_secret(vault: Vault, shape: str) -> None:
    envelope = vault.seal_value(ROW, "api_key", MARKER)
    value: Any = {
        "list": ["x", envelope],
        "map": {"k": envelope},
        "deeper": [{"k": [1, envelope]}],
    }[shape]
    with pytest.raises(DecryptionFailed) as info:
        vault.reseal(ROW, {"api_key": value})
    assert info.value.context == {"field": "api_key"}
    # Without an envelope inside, the same shapes are sealed as one value.
    plain: Any = {"list": ["x", "y"], "map": {"k": "y"}, "deeper": [{"k": [1, "y"]}]}[shape]
    assert vault.unseal(ROW, vault.reseal(ROW, {"api_key": plain})) == {"api_key": plain}


@pytest.mark.parametrize("field", ["api_key", "note"])
def test_a_lookalike_envelope_needs_rotation_which_then_refuses_it(
    vault: Vault, field: str
) -> None:
    lookalike = {field: {"$enc": 1, "kid": kid_of(NEW_KEY)}}
    assert vault.needs_rotation(lookalike)
    with pytest.raises(DecryptionFailed):
        vault.reseal(ROW, lookalike)


def test_a_credentials_map_under_a_key_read_from_storage_is_sealed_value_by_value(
    vault: Vault,
) -> None:
    sealed = vault.seal(ROW, {fresh("credentials"): {"user": "me", "pass": MARKER}})
    assert set(sealed["credentials"]) == {"user", "pass"}
    assert all(is_envelope(v) for v in sealed["credentials"].values())
    assert vault.unseal(ROW, sealed) == {"credentials": {"user": "me", "pass": MARKER}}


def test_unseal_refuses_credentials_that_are_a_plaintext_list_and_keeps_other_lists(
    vault: Vault,
) -> None:
    with pytest.raises(DecryptionFailed) as info:
        vault.unseal(ROW, {"credentials": ["plain", MARKER]})
    assert info.value.context == {"field": "credentials"}
    # A field that sorts before "credentials" is no secret for it.
    kept = {"account": {"region": "eu"}, "accounts": ["a", "b"]}
    assert vault.unseal(ROW, kept) == kept


@pytest.mark.parametrize("size", [31, 33])
def test_keyring_constructor_refuses_material_of_another_size_even_under_its_own_id(
    size: int,
) -> None:
    material = b"k" * size
    with pytest.raises(ValueError, match=r"use Keyring\.parse\(\)"):
        Keyring([(_key_id(material), material)])


def test_a_row_id_that_is_not_a_uuid_binds_envelopes_as_it_is(vault: Vault) -> None:
    sealed = vault.seal("row-1", {"api_key": MARKER})
    assert vault.unseal("row-1", sealed) == {"api_key": MARKER}
    with pytest.raises(DecryptionFailed):
        vault.unseal("ROW-1", sealed)


@pytest.mark.parametrize("kid", ["00000000", "ffffffff"])
def test_keyring_constructor_refuses_material_under_another_id(kid: str) -> None:
    material = b"m" * 32
    assert _key_id(material) != kid
    with pytest.raises(ValueError, match=r"use Keyring\.parse\(\)"):
        Keyring([(kid, material)])


def test_unseal_takes_secret_fields_as_a_one_shot_iterable(vault: Vault) -> None:
    with pytest.raises(DecryptionFailed) as info:
        vault.unseal(ROW, {"note": "n", "x": "plain", "y": ["plain"]}, iter(["x", "y"]))
    assert info.value.context == {"field": "x"}
    with pytest.raises(DecryptionFailed) as info:
        vault.unseal(ROW, {"note": ["n"], "y": ["plain"]}, iter(["y"]))
    assert info.value.context == {"field": "y"}


def test_plaintext_in_a_credentials_field_read_from_storage_is_refused(vault: Vault) -> None:
    with pytest.raises(DecryptionFailed) as info:
        vault.unseal(ROW, {fresh("credentials"): "plain"})
    assert info.value.context == {"field": "credentials"}
    with pytest.raises(DecryptionFailed) as info:
        vault.unseal(ROW, {fresh("credentials"): ["plain"]})
    assert info.value.context == {"field": "credentials"}


@pytest.mark.parametrize("hint", [None, "abcd", 'a"b\\', "é€ü\n"])
def test_associated_data_is_the_json_of_its_parts(hint: str | None) -> None:
    expected = json.dumps([1, "abcd1234", ROW, "api_key", hint]).encode()
    assert _associated_data("abcd1234", ROW, "api_key", hint) == expected


def test_a_secret_ending_in_non_ascii_characters_round_trips(vault: Vault) -> None:
    secret = 'sk-live-value-é€ü"'
    sealed = vault.seal(ROW, {"api_key": secret})
    assert sealed["api_key"]["hint"] == secret[-4:]
    assert vault.unseal(ROW, sealed) == {"api_key": secret}


def test_reseal_moves_envelopes_whose_key_id_sorts_either_side_of_the_primary() -> None:
    keys = sorted((generate_key() for _ in range(9)), key=kid_of)
    primary, below, above = keys[4], keys[0], keys[8]
    assert kid_of(below) < kid_of(primary) < kid_of(above)
    ring = Vault(Keyring.parse([primary, below, above]))
    for old in (below, above):
        sealed = Vault(Keyring.parse(old)).seal(ROW, {"api_key": MARKER})
        resealed = ring.reseal(ROW, sealed)
        assert resealed["api_key"]["kid"] == kid_of(primary)
        assert Vault(Keyring.parse(primary)).unseal(ROW, resealed) == {"api_key": MARKER}


def test_mask_data_masks_the_values_of_credentials_alone_among_maps() -> None:
    data = {"account": {"region": "eu"}, "zone": {"name": "z"}, "access_token": {"a": MARKER}}
    assert mask_data(data) == {
        "account": {"region": "eu"},
        "zone": {"name": "z"},
        "access_token": "••••",
    }


def test_envelopes_under_the_primary_read_back_from_storage_need_no_rotation(
    vault: Vault,
) -> None:
    stored = json.loads(json.dumps(vault.seal(ROW, {"api_key": MARKER, "credentials": {"k": "v"}})))
    assert not vault.needs_rotation(stored)


def test_plaintext_credentials_under_a_key_read_from_storage_are_sealed(vault: Vault) -> None:
    sealed = vault.seal(ROW, {fresh("credentials"): MARKER})
    assert is_envelope(sealed["credentials"])
    assert vault.unseal(ROW, sealed) == {"credentials": MARKER}
