"""The command line facing hostile values: stored escapes, bundles and files given to @."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from integrations import Integrations
from integrations.cli import _bundle

from .conftest import TEST_KEY
from .test_cli import SCRIPT, cli_env, sh

# Sets the terminal's title, clears the screen, then a C1 CSI and a right-to-left override.
ESCAPES = "\x1b]0;PWNED\x07\x1b[2J\x9b31m\u202eevil"
RAW = ("\x1b", "\x07", "\x9b", "\u202e")


def _planted(dsn: str, *, actor: str | None = None, owner: str | None = None) -> str:
    async def plant() -> str:
        async with Integrations(dsn, keys=TEST_KEY) as integ:
            conn = await integ.add_connection("aws", "tenant", owner=owner, actor=actor)
            # A field the provider does not declare: stored as given, listed in the setup.
            await integ.save_setup(
                conn.uuid,
                {"access_key": "AKIAIOSFODNN7EXAMPLE", "secret_key": "s" * 40, "note": ESCAPES},
                actor=actor,
            )
            await integ.record_validation(conn.uuid, (False, ESCAPES))
            return conn.uuid

    return asyncio.run(plant())


def _clean(text: str) -> None:
    for char in RAW:
        assert char not in text, repr(text)


def test_stored_escapes_are_printed_visibly_and_json_stays_exact(fresh_db: str) -> None:
    uuid = _planted(fresh_db)
    shown = sh(fresh_db, "show", uuid)
    assert shown.returncode == 0
    _clean(shown.stdout + shown.stderr)
    assert "\\x1b]0;PWNED\\x07\\x1b[2J\\x9b31m\\u202eevil" in shown.stdout
    listed = sh(fresh_db, "list")
    _clean(listed.stdout + listed.stderr)
    assert "\\x1b" in listed.stdout
    checks = sh(fresh_db, "show", uuid, "--json")
    _clean(checks.stdout)
    data = json.loads(checks.stdout)
    assert data["data"]["note"] == ESCAPES
    assert data["validation_status"] == ESCAPES
    listing = json.loads(sh(fresh_db, "list", "--json").stdout)
    assert listing[0]["data"]["note"] == ESCAPES


def test_an_error_echoing_an_escape_is_printed_visibly(fresh_db: str) -> None:
    done = sh(fresh_db, "show", "aw\x1b]0;PWNED\x07s:x")
    assert done.returncode != 0 and done.stderr.startswith("error:")
    _clean(done.stdout + done.stderr)
    done = sh(fresh_db, "--owner", "\x1b[2J\x9b", "list")
    _clean(done.stdout + done.stderr)


def test_watch_prints_an_actors_escapes_visibly(fresh_db: str) -> None:
    child = subprocess.Popen(
        [SCRIPT, "--dsn", fresh_db, "watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
    )
    try:
        assert child.stderr is not None and child.stdout is not None
        assert b"watching" in child.stderr.readline()
        _planted(fresh_db, actor=ESCAPES)
        line = child.stdout.readline().decode("utf-8")
        assert "connection_added aws:tenant" in line and "actor=\\x1b]0;PWNED\\x07" in line
        _clean(line)
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=20) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


# -- import bundles ----------------------------------------------------------------------------


def _sealed_with(n: int, r: int, p: int) -> str:
    doc = _bundle.seal(_bundle.document([], "2026-01-01T00:00:00+00:00"), "pass")
    doc["kdf"].update(n=n, r=r, p=p)
    return json.dumps(doc)


@pytest.mark.parametrize(("n", "r", "p"), [(2**20, 8, 1), (2**16, 32, 1), (2**15, 8, 16)])
def test_a_bundle_asking_for_costly_key_derivation_is_refused_at_once(
    fresh_db: str, tmp_path: Path, n: int, r: int, p: int
) -> None:
    path = tmp_path / "costly.json"
    path.write_text(_sealed_with(n, r, p))
    env = cli_env(INTEGRATIONS_EXPORT_PASSPHRASE="pass")
    started = time.monotonic()
    done = sh(fresh_db, "--owner", "user:9", "import", str(path), env=env)
    # Refused before deriving anything (n=2**20, r=8 alone is a second and 1 GiB).
    assert time.monotonic() - started < 5
    assert done.returncode == 1 and "key derivation parameters" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("n", "r", "p"),
    [
        (2**9, 1, 1),
        (2**10, 0, 1),
        (2**10, 1, 0),
        (2 * _bundle.SCRYPT_MAX_N, 1, 1),
        (2**10, _bundle.SCRYPT_MAX_R + 1, 1),
        (2**10, 1, _bundle.SCRYPT_MAX_P + 1),
    ],
)
def test_key_derivation_parameters_out_of_bounds_are_named_as_such(n: int, r: int, p: int) -> None:
    # Cheap to derive (when the bound is lifted the passphrase check answers instead).
    with pytest.raises(_bundle.BundleError, match="key derivation parameters"):
        _bundle.unseal(json.loads(_sealed_with(n, r, p)), "pass")


@pytest.mark.parametrize(("n", "r", "p"), [(2**10, 1, 1), (2**10, 1, _bundle.SCRYPT_MAX_P)])
def test_key_derivation_parameters_at_the_bounds_reach_the_passphrase_check(
    n: int, r: int, p: int
) -> None:
    with pytest.raises(_bundle.BundleError, match="wrong passphrase"):
        _bundle.unseal(json.loads(_sealed_with(n, r, p)), "pass")


def test_export_parameters_are_within_what_import_accepts() -> None:
    sealed = _bundle.seal(_bundle.document([], "2026-01-01T00:00:00+00:00"), "pass")
    assert _bundle.unseal(sealed, "pass")["connections"] == []
    doubled = {**sealed, "kdf": {**sealed["kdf"], "n": _bundle.SCRYPT_MAX_N}}
    with pytest.raises(_bundle.BundleError, match="wrong passphrase"):
        _bundle.unseal(doubled, "pass")


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"format": "integrations-export", "version": 1, "connections": '
        + "[" * 5000
        + "]" * 5000
        + "}",
        '{"a": ' * 3000 + "1" + "}" * 3000,
    ],
)
def test_a_deeply_nested_bundle_is_a_typed_error(fresh_db: str, tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.json"
    path.write_text(text)
    done = sh(fresh_db, "--owner", "user:9", "import", str(path))
    assert done.returncode == 1
    assert "nests deeper than 64 levels" in done.stderr and "Traceback" not in done.stderr


def test_a_nested_string_is_not_counted_as_nesting() -> None:
    doc = {"format": "integrations-export", "version": 1, "connections": [], "x": "[{" * 500}
    assert _bundle.load_document(json.dumps(doc))["x"] == "[{" * 500
    # Spaces and the characters before the quote do not end a string.
    spaced = {**doc, "x": " ![\x01" * 100}
    assert _bundle.load_document(json.dumps(spaced))["x"] == " ![\x01" * 100


def test_an_import_names_its_owners_explicitly(fresh_db: str, tmp_path: Path) -> None:
    async def bob() -> str:
        async with Integrations(fresh_db, keys=TEST_KEY) as integ:
            conn = await integ.add_connection("openai", "default", owner="user:bob")
            await integ.save_setup(conn.uuid, {"api_key": "sk-bob-0123456789"})
            return conn.uuid

    bobs = asyncio.run(bob())
    doc = {
        "format": "integrations-export",
        "version": 1,
        "connections": [
            {
                "provider": "openai",
                "name": "default",
                "owner": "user:bob",
                "data": {"api_key": "sk-mallory-0123456789"},
            }
        ],
    }
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(doc))
    refused = sh(fresh_db, "import", str(path), "--overwrite")
    assert refused.returncode == 2 and "--keep-owners" in refused.stderr
    both = sh(fresh_db, "--owner", "user:m", "import", str(path), "--keep-owners")
    assert both.returncode == 2
    # --owner places it in mallory's own scope: bob's key stays.
    placed = sh(fresh_db, "--owner", "user:mallory", "import", str(path), "--overwrite")
    assert placed.returncode == 0, placed.stderr

    async def keys() -> tuple[str, list[str]]:
        async with Integrations(fresh_db, keys=TEST_KEY) as integ:
            mine = await integ.for_owner("user:mallory").list_connections("openai")
            return (await integ.get_credentials(bobs))["api_key"], [c.owner for c in mine]

    assert asyncio.run(keys()) == ("sk-bob-0123456789", ["user:mallory"])


# -- set FIELD=@PATH ---------------------------------------------------------------------------


def test_at_path_reads_only_regular_files(fresh_db: str, tmp_path: Path) -> None:
    assert sh(fresh_db, "add", "aws").returncode == 0
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    for source in (str(fifo), "/dev/zero", str(tmp_path)):
        done = sh(fresh_db, "set", "aws", f"region=@{source}")
        assert done.returncode == 2, source
        assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr
        assert "cannot read" in done.stderr
    # The FIFO with no writer did not block.
    assert time.monotonic() - started < 10


def test_at_path_and_at_dash_are_size_capped(fresh_db: str, tmp_path: Path) -> None:
    assert sh(fresh_db, "add", "aws").returncode == 0
    big = tmp_path / "big"
    big.write_text("x" * (64 * 1024 + 1))
    done = sh(fresh_db, "set", "aws", f"region=@{big}")
    assert done.returncode == 2 and "larger than 64 KiB" in done.stderr
    done = sh(fresh_db, "set", "aws", "secret_key=@-", stdin="k" * (64 * 1024 + 1))
    assert done.returncode == 2 and "larger than 64 KiB" in done.stderr
    shown = json.loads(sh(fresh_db, "show", "aws", "--json").stdout)
    assert "region" not in shown["data"] and shown["status"] == "disconnected"


def test_at_path_says_whether_the_field_is_secret_before_saving(
    fresh_db: str, tmp_path: Path
) -> None:
    assert sh(fresh_db, "add", "aws").returncode == 0
    key = tmp_path / "key.pem"
    key.write_text("sk-file-0123456789\n")
    link = tmp_path / "link"
    link.symlink_to(key)
    done = sh(fresh_db, "set", "aws", f"access_key=@{link}", f"secret_key=@{key}")
    assert done.returncode == 0, done.stderr
    said = done.stderr.splitlines()
    assert said[0].startswith("access_key: read from") and "NOT secret" in said[0]
    assert said[1].startswith("secret_key: read from") and "secret, stored encrypted" in said[1]


# -- the bundle format, stated in the numbers a reader of the file sees ------------------------


def test_a_sealed_bundle_names_scrypt_at_its_cost_a_16_byte_salt_and_a_96_bit_nonce() -> None:
    import base64

    sealed = _bundle.seal(_bundle.document([], "2026-01-01T00:00:00+00:00"), "pass")
    kdf = sealed["kdf"]
    assert (kdf["name"], kdf["n"], kdf["r"], kdf["p"]) == ("scrypt", 32768, 8, 1)
    assert len(base64.b64decode(kdf["salt"])) == 16
    assert len(base64.b64decode(sealed["nonce"])) == 12
    assert (sealed["format"], sealed["version"], sealed["cipher"]) == (
        "integrations-export-sealed",
        1,
        "AES-256-GCM",
    )
    assert _bundle.is_sealed(sealed)
    # As read back from its file: the format is compared by value.
    assert _bundle.is_sealed(json.loads(json.dumps(sealed)))
    assert not _bundle.is_sealed(_bundle.document([], "2026-01-01T00:00:00+00:00"))


@pytest.mark.parametrize(
    ("n", "r", "p"), [(2**16, 2, 1), (2**10, 8, 1), (2**10, 1, 2), (2**10, 1, 1)]
)
def test_import_accepts_key_derivation_up_to_twice_the_export_cost(n: int, r: int, p: int) -> None:
    with pytest.raises(_bundle.BundleError, match="wrong passphrase"):
        _bundle.unseal(json.loads(_sealed_with(n, r, p)), "other")


@pytest.mark.parametrize(
    ("n", "r", "p"), [(2**17, 1, 1), (2**10, 9, 1), (2**10, 1, 3), (2**9, 1, 1), (2**10, 0, 1)]
)
def test_import_refuses_key_derivation_beyond_the_bounds_in_numbers(n: int, r: int, p: int) -> None:
    with pytest.raises(_bundle.BundleError, match="key derivation parameters"):
        _bundle.unseal(json.loads(_sealed_with(n, r, p)), "pass")


@pytest.mark.parametrize(
    "change",
    [
        {"kdf": {"name": "argon2"}},
        {"kdf": {"name": "yescrypt"}},
        {"cipher": "ChaCha20-Poly1305"},
        # Names sorting before and after the one supported, and one AES-GCM of another size.
        {"cipher": "AES-128-GCM"},
        {"cipher": "XChaCha20-Poly1305"},
    ],
)
def test_another_kdf_or_cipher_is_unsupported(change: dict[str, object]) -> None:
    sealed = _bundle.seal(_bundle.document([], "2026-01-01T00:00:00+00:00"), "pass")
    if "kdf" in change:
        changed = {**sealed, "kdf": {**sealed["kdf"], **change["kdf"]}}  # type: ignore[dict-item]
    else:
        changed = {**sealed, **change}
    with pytest.raises(_bundle.BundleError, match="unsupported encryption"):
        _bundle.unseal(changed, "pass")


@pytest.mark.parametrize(
    "damage",
    [
        {"kdf": 5},  # AttributeError
        {"nonce": None},  # TypeError
        {"ciphertext": "not base64!"},  # ValueError
        {"kdf": {"name": "scrypt", "n": 1024, "r": 1}},  # KeyError
    ],
)
def test_each_kind_of_damaged_field_is_named_damaged(damage: dict[str, object]) -> None:
    sealed = _bundle.seal(_bundle.document([], "2026-01-01T00:00:00+00:00"), "pass")
    if isinstance(damage.get("kdf"), dict):
        damage = {"kdf": {**damage["kdf"], "salt": sealed["kdf"]["salt"]}}  # type: ignore[dict-item]
    with pytest.raises(_bundle.BundleError, match="damaged"):
        _bundle.unseal({**sealed, **damage}, "pass")


def test_parameters_within_bounds_that_scrypt_cannot_use_are_refused_as_damage() -> None:
    # scrypt needs n < 2**(16 * r): n=2**16 with r=1 is within the bounds but not usable.
    with pytest.raises(_bundle.BundleError, match="damaged"):
        _bundle.unseal(json.loads(_sealed_with(2**16, 1, 1)), "pass")


def test_a_nonce_of_the_wrong_length_reads_as_altered() -> None:
    sealed = _bundle.seal(_bundle.document([], "2026-01-01T00:00:00+00:00"), "pass")
    with pytest.raises(_bundle.BundleError, match="altered"):
        _bundle.unseal({**sealed, "nonce": ""}, "pass")


def test_the_size_limit_is_64_mib_exactly() -> None:
    limit = 64 * 2**20
    # Both texts open 65 arrays, so a text under the limit is refused for its depth instead.
    at_limit = "[" * 65 + " " * (limit - 65)
    with pytest.raises(_bundle.BundleError, match="nests deeper than 64 levels"):
        _bundle.load_document(at_limit)
    del at_limit
    with pytest.raises(_bundle.BundleError, match="larger than 64 MiB"):
        _bundle.load_document("[" * 65 + " " * (limit - 64))


@pytest.mark.parametrize("open_, close", [("[", "]"), ('{"a":', "}")])
def test_64_levels_of_nesting_are_read_and_65_refused(open_: str, close: str) -> None:
    assert _bundle.load_document("{" + '"a":' + open_ * 63 + "1" + close * 63 + "}") == (
        _bundle.load_document("{" + '"a":' + open_ * 63 + "1" + close * 63 + "}")
    )
    with pytest.raises(_bundle.BundleError, match="nests deeper than 64 levels"):
        _bundle.load_document("{" + '"a":' + open_ * 64 + "1" + close * 64 + "}")
    # Whitespace between the brackets is not text: it hides no level.
    with pytest.raises(_bundle.BundleError, match="nests deeper than 64 levels"):
        _bundle.load_document('{ "a": ' + (open_ + " \n\t") * 64 + "1" + close * 64 + "}")


def test_depth_counts_closed_siblings_down_and_skips_strings_with_escapes() -> None:
    siblings = '{"a": [' + ",".join(["[[]]"] * 100) + "]}"
    assert len(_bundle.load_document(siblings)["a"]) == 100
    # A closed array counts one level down, no more: its sibling one deeper is level 65.
    assert _bundle.load_document('{"a": ' + "[" * 62 + "[], []" + "]" * 62 + "}")
    with pytest.raises(_bundle.BundleError, match="nests deeper than 64 levels"):
        _bundle.load_document('{"a": ' + "[" * 62 + "[], [[]]" + "]" * 62 + "}")
    # Brackets inside a string, after an escaped quote, are text.
    quoted = '{"a": "\\"' + "[" * 100 + '"}'
    assert _bundle.load_document(quoted) == {"a": '"' + "[" * 100}
    # An escaped backslash ends the escape: the quote after it closes the string.
    after = '{"a": "\\\\", "b": ' + "[" * 64 + "]" * 64 + "}"
    with pytest.raises(_bundle.BundleError, match="nests deeper"):
        _bundle.load_document(after)


@pytest.mark.parametrize("text", ["[]", "1", '"x"', "not json"])
def test_a_bundle_that_is_not_a_json_object_is_refused(text: str) -> None:
    with pytest.raises(_bundle.BundleError, match=r"not an export bundle|not JSON"):
        _bundle.load_document(text)


@pytest.mark.parametrize(
    ("fmt", "version"),
    [
        ("integrations-export-sealed", 1),
        ("a", 1),
        ("integrations-export", 0),
        ("integrations-export", 2),
    ],
)
def test_entries_need_the_plain_format_at_version_1(fmt: str, version: int) -> None:
    with pytest.raises(_bundle.BundleError, match="not an integrations-export version 1 file"):
        _bundle.entries({"format": fmt, "version": version, "connections": []})


def _doc(*items: object) -> dict[str, object]:
    return {"format": "integrations-export", "version": 1, "connections": list(items)}


def test_document_is_the_plain_format_at_version_1() -> None:
    doc = _bundle.document([], "2026-01-01T00:00:00+00:00")
    assert doc == _doc() | {"exported_at": "2026-01-01T00:00:00+00:00"}
    assert _bundle.entries(doc) == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("x", "connection #2 is not an object"),
        ({"provider": 1, "name": "n", "data": {}}, "connection #2: provider and name"),
        ({"provider": "p", "name": None, "data": {}}, "connection #2: provider and name"),
        ({"provider": "p", "name": "n", "owner": 5, "data": {}}, "connection #2: owner"),
        ({"provider": "p", "name": "n", "data": []}, "connection #2: data must be an object"),
    ],
)
def test_entries_name_the_first_bad_connection(bad: object, message: str) -> None:
    good = {"provider": "p", "name": "n", "owner": "user:1", "data": {}}
    with pytest.raises(_bundle.BundleError, match=message):
        _bundle.entries(_doc(good, bad))
    # Counted from 1, whatever the position.
    with pytest.raises(_bundle.BundleError, match=message.replace("#2", "#1")):
        _bundle.entries(_doc(bad, good))
    with pytest.raises(_bundle.BundleError, match=message.replace("#2", "#3")):
        _bundle.entries(_doc(good, good, bad))
    with pytest.raises(_bundle.BundleError, match="no connections list"):
        _bundle.entries({**_doc(), "connections": {}})


def test_an_entry_splits_setup_tokens_and_bookkeeping() -> None:
    data = {
        "api_key": "k",
        "region": None,
        "access_token": "a",
        "refresh_token": "r",
        "expires_at": None,
        "granted_scopes": ["read"],
        "status": "failing",
        "validation_status": "401 from the provider",
    }
    item = {"provider": "p", "name": "n", "owner": None, "uuid": "u-1", "data": data}
    (entry,) = _bundle.entries(_doc(item))
    assert entry == _bundle.Entry(
        "p",
        "n",
        None,
        {"api_key": "k"},
        {"access_token": "a", "refresh_token": "r", "scope": ["read"]},
        "u-1",
        "failing",
        "401 from the provider",
    )
    assert entry.ref == "p:n"
    odd = {**item, "uuid": 7, "data": {"status": 1, "validation_status": 2}}
    (entry,) = _bundle.entries(_doc(odd))
    assert (entry.uuid, entry.status, entry.validation, entry.tokens) == (None, None, None, {})


def test_a_grant_without_scopes_or_without_an_access_token() -> None:
    assert _bundle.split_data({"access_token": "a", "granted_scopes": None}) == (
        {},
        {"access_token": "a"},
    )
    # A refresh token alone is not importable as a grant; the scopes go with it.
    assert _bundle.split_data({"refresh_token": "r", "granted_scopes": ["x"], "k": "v"}) == (
        {"k": "v"},
        {},
    )


def test_an_entry_cannot_be_changed_after_reading() -> None:
    import dataclasses

    entry = _bundle.Entry("p", "n", None, {}, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.name = "other"  # type: ignore[misc]
