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
