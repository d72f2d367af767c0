"""Envelopes are strict: nothing but an exact envelope is decrypted, and nothing else is
returned where one belongs."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from integrations._errors import DecryptionFailed, UnknownKey
from integrations._vault import Keyring, Vault, _aead, _associated_data, generate_key, is_envelope

ROW = "0190f5a2-7c3e-7b1a-9d4e-2f6a8b0c1d2e"
SECRET = "sk-live-ENVELOPE-7c1d0e9a2b"
KEY = generate_key()


@pytest.fixture
def vault() -> Vault:
    return Vault(Keyring.parse(KEY))


def sealed(vault: Vault, field: str = "api_key") -> dict[str, Any]:
    envelope = vault.seal_value(ROW, field, SECRET)
    assert isinstance(envelope, dict)
    return envelope


@given(
    kid=st.from_regex(r"[0-9a-f]{8}", fullmatch=True),
    row=st.text(),
    field=st.text(),
    hint=st.none() | st.text(max_size=4),
)
def test_associated_data_is_byte_for_byte_the_json_array(
    kid: str, row: str, field: str, hint: str | None
) -> None:
    expected = json.dumps([1, kid, row, field, hint]).encode()
    assert _associated_data(kid, row, field, hint) == expected


def test_an_envelope_made_with_the_json_associated_data_still_opens() -> None:
    # Built by hand the way every stored envelope was built: the AD format is frozen.
    material = base64.urlsafe_b64decode(KEY.split(":")[2] + "=")
    kid = KEY.split(":")[1]
    nonce = b"\x01" * 12
    ad = json.dumps([1, kid, ROW, 'credentials.pass"word', "7c1d"]).encode()
    cipher: AESGCM = _aead(material)
    ct = cipher.encrypt(nonce, json.dumps("héllo").encode(), ad)
    envelope = {
        "$enc": 1,
        "kid": kid,
        "n": base64.b64encode(nonce).decode(),
        "ct": base64.b64encode(ct).decode(),
        "hint": "7c1d",
    }
    vault = Vault(Keyring.parse(KEY))
    data = {"credentials": {'pass"word': envelope}}
    assert vault.unseal(ROW, data) == {"credentials": {'pass"word': "héllo"}}


def edits(envelope: dict[str, Any]) -> list[Any]:
    def changed(**members: Any) -> dict[str, Any]:
        return {**envelope, **members}

    missing = dict(envelope)
    del missing["ct"]
    return [
        changed(**{"$enc": 1.0}),
        changed(**{"$enc": "1"}),
        changed(**{"$enc": True}),
        changed(extra=1),
        missing,
        # Upper-case hex (the key's own id may hold no letter to change: a fixed one).
        changed(kid="ABCDEF01"),
        changed(kid=5),
        changed(n=envelope["n"][:-1]),
        changed(n=envelope["n"] + "AAAA"),
        changed(ct="*" + envelope["ct"][1:]),
        changed(ct="AAAA"),
        changed(hint="toolong"),
        changed(hint=1234),
        {"$enc": 1},
    ]


def test_edited_envelopes_are_not_envelopes(vault: Vault) -> None:
    envelope = sealed(vault)
    assert is_envelope(envelope)
    for edited in edits(envelope):
        assert not is_envelope(edited), edited


@pytest.mark.parametrize("field", ["api_key", "note"])
@pytest.mark.parametrize("encryption", ["on", "off"])
def test_edited_envelopes_fail_to_decrypt_in_any_field(
    vault: Vault, field: str, encryption: str
) -> None:
    reader = Vault(vault.keyring, encryption=encryption)
    for edited in edits(sealed(vault, field)):
        with pytest.raises(DecryptionFailed) as info:
            reader.unseal(ROW, {field: edited})
        assert info.value.code == "decryption_failed"
        assert SECRET not in str(info.value)
        with pytest.raises(DecryptionFailed):
            reader.unseal(ROW, {"credentials": {"k": edited}})


def test_a_newer_envelope_version_is_refused(vault: Vault) -> None:
    with pytest.raises(DecryptionFailed) as info:
        vault.unseal(ROW, {"api_key": {**sealed(vault), "$enc": 2}})
    assert "version" in info.value.message


@pytest.mark.parametrize("value", [SECRET, "", 5, True, ["x"], {"a": 1}])
def test_plaintext_where_an_envelope_belongs_is_decryption_failed(vault: Vault, value: Any) -> None:
    for data in ({"api_key": value}, {"credentials": {"password": value}}, {"token": value}):
        with pytest.raises(DecryptionFailed) as info:
            vault.unseal(ROW, data, ["token"])
        assert SECRET not in str(info.value)


def test_plaintext_secrets_are_read_while_encryption_is_off() -> None:
    data = {"api_key": SECRET, "credentials": {"password": SECRET}, "note": "x"}
    assert Vault(None, encryption="off").unseal(ROW, data) == data


def test_non_secret_fields_stay_plain_while_encryption_is_on(vault: Vault) -> None:
    data = {"status": "connected", "api_key": None, "extra": {"a": [1]}}
    assert vault.unseal(ROW, data) == data


def test_a_forged_envelope_with_an_unknown_key_is_unknown_key(vault: Vault) -> None:
    forged = {**sealed(vault), "kid": "deadbeef"}
    assert is_envelope(forged)
    with pytest.raises(UnknownKey):
        vault.unseal(ROW, {"api_key": forged})


def test_unseal_round_trips_every_position(vault: Vault) -> None:
    data = {
        "api_key": SECRET,
        "credentials": {"password": SECRET, "port": 5432},
        "token": SECRET,
        "note": "plain",
    }
    assert vault.unseal(ROW, vault.seal(ROW, data, ["token"]), ["token"]) == data


def test_every_form_of_a_row_uuid_binds_the_same_row(vault: Vault) -> None:
    import uuid as uuid_module

    canonical = "0192a3b4-c5d6-7e8f-9a0b-1c2d3e4f5a6b"
    sealed = vault.seal(canonical, {"api_key": "sk-0123456789abcdef"})
    for form in (canonical, canonical.upper(), canonical.replace("-", ""), f"{{{canonical}}}"):
        assert vault.unseal(form, sealed)["api_key"] == "sk-0123456789abcdef"
    assert vault.unseal(uuid_module.UUID(canonical), sealed)["api_key"] == "sk-0123456789abcdef"  # type: ignore[arg-type]
    other = "0192a3b4-c5d6-7e8f-9a0b-1c2d3e4f5a6c"
    with pytest.raises(DecryptionFailed):
        vault.unseal(other, sealed)


def test_scalars_in_secret_fields_are_still_refused_and_plain_fields_kept(vault: Vault) -> None:
    row = "0192a3b4-c5d6-7e8f-9a0b-1c2d3e4f5a6b"
    for value in ("sk-plain-0123456789", 12, 1.5, True):
        with pytest.raises(DecryptionFailed):
            vault.unseal(row, {"api_key": value})
    kept = {"name": "n", "count": 3, "ratio": 0.5, "flag": False, "none": None}
    assert vault.unseal(row, kept) == kept
