"""Key sources: env:, file:, command:, aws-kms: (moto's KMS server) and pkcs11: (SoftHSM2)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from integrations import ConfigurationError, Integrations, UnknownKey, generate_key
from integrations._keysource import CALLS, parse_sources

from .keykit import AWS_ENV, MotoKms, SoftHsm

API_KEY = "sk-custody-0123456789abcdef"


@pytest.fixture(autouse=True)
def no_keys_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INTEGRATIONS_KEYS", raising=False)


async def _store_and_read(dsn: str, keys: str | list[str]) -> str:
    async with Integrations(dsn, keys=keys) as integ:
        conn = await integ.add_connection("openai", "custody")
        await integ.save_setup(conn.uuid, {"api_key": API_KEY})
    async with Integrations(dsn, keys=keys) as integ:
        creds = await integ.get_credentials(conn.uuid)
    assert creds["api_key"] == API_KEY
    return conn.uuid


# -- sources read at open(): env:, file:, command: --------------------------------------------


async def test_env_source_reads_another_variable(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = generate_key()
    monkeypatch.setenv("APP_MASTER_KEYS", key)
    monkeypatch.setenv("INTEGRATIONS_KEYS", "env:APP_MASTER_KEYS")
    async with Integrations(fresh_db) as integ:
        conn = await integ.add_connection("openai", "env")
        await integ.save_setup(conn.uuid, {"api_key": API_KEY})
    async with Integrations(fresh_db, keys=key) as integ:
        assert (await integ.get_credentials(conn.uuid))["api_key"] == API_KEY


async def test_env_source_unset_names_the_variable(fresh_db: str) -> None:
    with pytest.raises(ConfigurationError, match=r"env:NO_SUCH_KEYS_VAR.*not set"):
        async with Integrations(fresh_db, keys="env:NO_SUCH_KEYS_VAR"):
            pass


async def test_file_source_and_plain_key_after_it(fresh_db: str, tmp_path: Path) -> None:
    first, second = generate_key(), generate_key()
    path = tmp_path / "keys"
    path.write_text(first + "\n")
    path.chmod(0o600)
    await _store_and_read(fresh_db, f"file:{path},{second}")
    async with Integrations(fresh_db, keys=first) as integ:
        assert integ._s.core.vault.keyring is not None
        assert integ._s.core.vault.keyring.primary_id == first.split(":")[1]


async def test_file_source_refuses_a_file_others_can_read(fresh_db: str, tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(generate_key() + "\n")
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match=r"file:.*chmod 600"):
        async with Integrations(fresh_db, keys=f"file:{path}"):
            pass


async def test_command_source_runs_once_and_keeps_its_commas(fresh_db: str, tmp_path: Path) -> None:
    key, other = generate_key(), generate_key()
    script = tmp_path / "helper.py"
    script.write_text(f"import sys\nprint({key!r}, end='\\n')\n")
    before = CALLS["command"]
    # A command runs to the end of the value, commas included.
    spec = f"{other},command:{sys.executable} -c \"exec(open('{script}').read())\" # a,b"
    sources = parse_sources(spec)
    assert [s.kind for s in sources] == ["key", "command"]
    await _store_and_read(fresh_db, [f"command:{sys.executable} {script}", other])
    assert CALLS["command"] - before == 2  # once per open(), never per call


async def test_command_failure_says_which_and_what_it_said(fresh_db: str, tmp_path: Path) -> None:
    secret_out = generate_key()
    script = tmp_path / "failing.py"
    script.write_text(
        "import sys\n"
        f"print({secret_out!r})\n"
        f"print('vault locked; key was {secret_out}', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    with pytest.raises(ConfigurationError) as caught:
        async with Integrations(fresh_db, keys=f"command:{sys.executable} {script}"):
            pass
    message = caught.value.message
    assert f"command:{sys.executable} {script}" in message
    assert "status 3" in message and "vault locked" in message
    assert secret_out not in message and secret_out.split(":")[2] not in message


async def test_command_that_prints_no_key_is_refused_without_echo(
    fresh_db: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        async with Integrations(fresh_db, keys="command:echo not-a-key-but-a-secret"):
            pass
    assert "command:echo" in caught.value.message
    assert "wrong layout" in caught.value.message


def test_malformed_sources_are_refused() -> None:
    for bad, words in [
        ("env:", "names no environment variable"),
        ("aws-kms:", "names no key"),
        ("aws-kms:alias/x?colour=blue", "unknown option 'colour'"),
        ("pkcs11:token=t", "needs the token and the key's label"),
        ("command:", "names no command"),
        ("ik1:nope", "malformed"),
    ]:
        with pytest.raises(ConfigurationError, match=words):
            parse_sources(bad)


# -- aws-kms: against moto's KMS server -------------------------------------------------------


@pytest.fixture
def kms(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoKms]:
    pytest.importorskip("moto.server", reason="moto[server] is not installed (the dev extra)")
    pytest.importorskip("botocore", reason="botocore is not installed (the kms extra)")
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    server = MotoKms()
    server.start()
    yield server
    server.stop()


async def test_aws_kms_envelope_keys(fresh_db: str, kms: MotoKms) -> None:
    source = kms.source(kms.create_key(alias="alias/integrations"))
    before = CALLS["aws-kms"]
    async with Integrations(fresh_db, keys=source) as integ:
        opened = CALLS["aws-kms"] - before
        conn = await integ.add_connection("openai", "kms")
        await integ.save_setup(conn.uuid, {"api_key": API_KEY})
        during = CALLS["aws-kms"]
        for _ in range(1000):
            await integ.get_credentials(conn.uuid)
        # The hot path never calls the KMS.
        assert CALLS["aws-kms"] == during
    # First open: describe, generate the data key, unwrap it.
    assert opened == 3
    db = await asyncpg.connect(fresh_db)
    try:
        stored = await db.fetch("SELECT kid, wrapper, wrapped FROM integrations.data_keys")
        value = await db.fetchval(
            "SELECT value_json->>'api_key' FROM integrations.connections WHERE uuid = $1",
            conn.uuid,
        )
    finally:
        await db.close()
    assert len(stored) == 1 and stored[0]["wrapper"].startswith("aws-kms:arn:aws:kms:")
    assert f'"kid": "{stored[0]["kid"]}"' in value
    assert API_KEY not in value
    # Another process: the stored data key is unwrapped, not made again.
    before = CALLS["aws-kms"]
    async with Integrations(fresh_db, keys=source) as integ:
        assert CALLS["aws-kms"] - before == 2
        assert (await integ.get_credentials(conn.uuid))["api_key"] == API_KEY
        # A KMS that goes away later changes nothing for keys already in memory.
        kms.stop()
        for _ in range(10):
            assert (await integ.get_credentials(conn.uuid, fresh=True))["api_key"] == API_KEY
    with pytest.raises(ConfigurationError, match=r"key source aws-kms:.*at http://127\.0\.0\.1"):
        async with Integrations(fresh_db, keys=source):
            pass


async def test_aws_kms_unknown_key_names_the_source(fresh_db: str, kms: MotoKms) -> None:
    with pytest.raises(ConfigurationError, match=r"aws-kms:alias/missing.*NotFound"):
        async with Integrations(fresh_db, keys=kms.source("alias/missing")):
            pass


async def test_aws_kms_rewrap_to_a_new_kms_key_and_a_new_data_key(
    fresh_db: str, kms: MotoKms
) -> None:
    old = kms.source(kms.create_key())
    new = kms.source(kms.create_key())
    row = await _store_and_read(fresh_db, old)
    # New master key first, the old one after it: rotation wraps the data key anew.
    async with Integrations(fresh_db, keys=f"{new},{old}") as integ:
        # The new source made its data key at open(); rows move to it.
        done = await integ.rotate_keys()
        assert done.rewrapped == 1 and done.rotated == 1
    # The old KMS key is no longer needed.
    async with Integrations(fresh_db, keys=new) as integ:
        assert (await integ.get_credentials(row))["api_key"] == API_KEY
        kid = await integ.new_data_key()
    async with Integrations(fresh_db, keys=new) as integ:
        keyring = integ._s.core.vault.keyring
        assert keyring is not None and keyring.primary_id == kid and len(keyring) == 3
        done = await integ.rotate_keys()
        assert done.rotated == 1 and done.primary_kid == kid
    db = await asyncpg.connect(fresh_db)
    try:
        stored = await db.fetchval(
            "SELECT value_json->'api_key'->>'kid' FROM integrations.connections WHERE uuid = $1",
            row,
        )
    finally:
        await db.close()
    assert stored == kid


async def test_new_data_key_needs_a_wrapping_source(fresh_db: str) -> None:
    async with Integrations(fresh_db, keys=generate_key()) as integ:
        with pytest.raises(ConfigurationError, match="aws-kms: or pkcs11:"):
            await integ.new_data_key()


# -- pkcs11: against SoftHSM2 -----------------------------------------------------------------


@pytest.fixture(scope="session")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed (the pkcs11 extra)")
    token = SoftHsm(tmp_path_factory.mktemp("softhsm"))
    token.create_kek("kek")
    token.create_kek("kek2")
    return token


async def test_pkcs11_wraps_data_keys_in_the_token(fresh_db: str, hsm: SoftHsm) -> None:
    before = CALLS["pkcs11"]
    row = await _store_and_read(fresh_db, hsm.source("kek"))
    # wrap at the first open, unwrap at each open
    assert CALLS["pkcs11"] - before == 3
    async with Integrations(fresh_db, keys=hsm.source("kek")) as integ:
        during = CALLS["pkcs11"]
        for _ in range(1000):
            await integ.get_credentials(row)
        assert CALLS["pkcs11"] == during
    # Another key on the token takes over: the data key is wrapped anew.
    async with Integrations(fresh_db, keys=[hsm.source("kek2"), hsm.source("kek")]) as integ:
        assert (await integ.rotate_keys()).rewrapped == 1
    async with Integrations(fresh_db, keys=hsm.source("kek2")) as integ:
        assert (await integ.get_credentials(row))["api_key"] == API_KEY


async def test_pkcs11_wrong_pin_names_the_source_not_the_pin(fresh_db: str, hsm: SoftHsm) -> None:
    await _store_and_read(fresh_db, hsm.source("kek"))
    with pytest.raises(ConfigurationError) as caught:
        async with Integrations(fresh_db, keys=hsm.source("kek", pin="98765")):
            pass
    assert "pkcs11:token=integrations;object=kek" in caught.value.message
    assert "PinIncorrect" in caught.value.message
    assert "98765" not in caught.value.message


async def test_pkcs11_missing_key_on_the_token(fresh_db: str, hsm: SoftHsm) -> None:
    with pytest.raises(ConfigurationError, match=r"object=nothere.*NoSuchKey"):
        async with Integrations(fresh_db, keys=hsm.source("nothere")):
            pass


async def test_wrapped_key_of_another_wrapper_is_unknown_without_it(
    fresh_db: str, hsm: SoftHsm
) -> None:
    row = await _store_and_read(fresh_db, hsm.source("kek"))
    async with Integrations(fresh_db, keys=generate_key()) as integ:
        with pytest.raises(UnknownKey):
            await integ.get_credentials(row)
    assert os.environ.get("SOFTHSM2_CONF") == str(hsm.conf)


def test_cli_new_data_key_then_rotate(fresh_db: str, hsm: SoftHsm) -> None:
    from .test_cli import cli_env, sh

    env = cli_env(INTEGRATIONS_KEYS=hsm.source("kek"), SOFTHSM2_CONF=str(hsm.conf))
    added = sh(fresh_db, "add", "openai", "cli-kms", env=env)
    assert added.returncode == 0, added.stderr
    assert (
        sh(fresh_db, "set", "openai:cli-kms", "api_key=@-", stdin=API_KEY, env=env).returncode == 0
    )
    made = sh(fresh_db, "keys", "new-data-key", "--json", env=env)
    assert made.returncode == 0, made.stderr
    kid = json.loads(made.stdout)["kid"]
    rotated = sh(fresh_db, "keys", "rotate", "--json", env=env)
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout)["primary_kid"] == kid
    assert json.loads(rotated.stdout)["rotated"] == 1
    plain = sh(fresh_db, "keys", "new-data-key", env=cli_env())
    assert plain.returncode != 0 and "aws-kms: or pkcs11:" in plain.stderr
