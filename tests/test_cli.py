"""The ``integrations`` command: the real script against a real database, prompts on a pty."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pexpect
import pytest
from click.testing import CliRunner

from integrations import Integrations, generate_key
from integrations.cli import cli
from tests.conftest import TEST_KEY, _admin, _with_database, clone_database

MARKER = "S3CR3T-cli-marker-0123456789"
GOOD = MARKER + "-good"
BAD = MARKER + "-bad"
SCRIPT = str(Path(sys.executable).with_name("integrations"))


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.path == "/me" and self.headers.get("X-Acme-Key") == GOOD
        body = b'{"ok": true}' if ok else b'{"error": "bad key"}'
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def acme_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def providers_file(tmp_path: Path, acme_port: int) -> str:
    path = tmp_path / "providers.json"
    path.write_text(
        json.dumps(
            [
                {
                    "key": "acme",
                    "name": "Acme",
                    "auth_type": "api_key",
                    "api_hosts": ["127.0.0.1"],
                    "auth_header": {"name": "X-Acme-Key", "template": "{api_key}"},
                    "setup_fields": [
                        {"key": "api_key", "label": "API key", "required": True, "secret": True}
                    ],
                    "validation": {"url": f"http://127.0.0.1:{acme_port}/me"},
                }
            ]
        )
    )
    return str(path)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTEGRATIONS_")}
    env["INTEGRATIONS_KEYS"] = TEST_KEY
    env.update(extra)
    return env


def script(
    dsn: str,
    *args: str,
    stdin: str = "",
    env: dict[str, str] | None = None,
    check_secret: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run the installed script in a subprocess; no output but `token`'s and `export
    --decrypted`'s may hold a secret."""
    done = subprocess.run(
        [SCRIPT, "--dsn", dsn, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=60,
    )
    if check_secret:
        assert MARKER not in done.stdout + done.stderr, args
    return done


def sh(
    dsn: str,
    *args: str,
    stdin: str = "",
    env: dict[str, str] | None = None,
    check_secret: bool = True,
) -> subprocess.CompletedProcess[str]:
    """The script's entry point run in this process (as :func:`script` runs it in a
    subprocess, without the interpreter's start-up): arguments, environment, standard
    input, output and exit code as the console script has them."""
    import contextlib
    import io

    from integrations.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_argv, saved_stdin = dict(os.environ), sys.argv, sys.stdin
    os.environ.clear()
    os.environ.update(env or cli_env())
    sys.argv = ["integrations", "--dsn", dsn, *args]
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv, sys.stdin = saved_argv, saved_stdin
    done = subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())
    if check_secret:
        assert MARKER not in done.stdout + done.stderr, args
    return done


def add_acme(dsn: str, providers: str, name: str, key: str) -> str:
    uuid = sh(dsn, "--providers", providers, "add", "acme", name).stdout.strip()
    done = sh(dsn, "--providers", providers, "set", f"acme:{name}", "api_key=@-", stdin=key)
    assert done.returncode == 0, done.stderr
    return uuid


# -- connections ---------------------------------------------------------------------------


def test_add_set_list_show_in_the_real_script(fresh_db: str, tmp_path: Path) -> None:
    added = script(fresh_db, "add", "openai")
    assert added.returncode == 0, added.stderr
    uuid = added.stdout.strip()
    assert len(uuid) == 36
    done = script(fresh_db, "set", "openai", "api_key=@-", stdin=MARKER + "\n")
    assert done.returncode == 0, done.stderr
    assert "saved api_key on openai:default (status connected)" in done.stdout
    key_file = tmp_path / "key"
    key_file.write_text(MARKER + "-2\n")
    assert script(fresh_db, "set", uuid, f"api_key=@{key_file}").returncode == 0
    listed = script(fresh_db, "list")
    assert "openai:default" in listed.stdout and uuid in listed.stdout
    assert "••••" in listed.stdout and "never" in listed.stdout
    shown = json.loads(script(fresh_db, "show", "openai:default", "--json").stdout)
    assert shown["uuid"] == uuid and shown["status"] == "connected"
    assert shown["data"]["api_key"].startswith("••••")
    assert set(shown) == {
        "uuid",
        "provider",
        "name",
        "owner",
        "status",
        "validation_status",
        "last_validated_at",
        "data",
    }
    listed_json = json.loads(script(fresh_db, "--json", "list", "openai").stdout)
    assert [c["uuid"] for c in listed_json] == [uuid]


def test_a_secret_on_the_command_line_is_refused_with_the_reason(fresh_db: str) -> None:
    sh(fresh_db, "add", "openai")
    done = sh(fresh_db, "set", "openai", "api_key=" + MARKER, check_secret=False)
    assert done.returncode == 2
    assert "shell history" in done.stderr and "process list" in done.stderr
    assert MARKER not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    shown = json.loads(sh(fresh_db, "show", "openai", "--json").stdout)
    assert "api_key" not in shown["data"]


def test_a_bare_secret_without_a_terminal_says_how_to_give_it(fresh_db: str) -> None:
    sh(fresh_db, "add", "openai")
    done = sh(fresh_db, "set", "openai", "api_key")
    assert done.returncode == 2
    assert "api_key=@-" in done.stderr


def test_a_bare_secret_is_read_from_a_hidden_prompt(fresh_db: str) -> None:
    sh(fresh_db, "add", "openai")
    child = pexpect.spawn(
        SCRIPT, ["--dsn", fresh_db, "set", "openai", "api_key"], env=cli_env(), encoding="utf-8"
    )
    child.expect("api_key: ")
    child.sendline(MARKER)
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    output = child.before or ""
    assert child.exitstatus == 0, output
    # Hidden: the terminal never echoed what was typed.
    assert MARKER not in output
    assert "saved api_key on openai:default" in output
    shown = json.loads(sh(fresh_db, "show", "openai", "--json").stdout)
    assert shown["status"] == "connected"


def test_rename_disconnect_and_remove(fresh_db: str) -> None:
    uuid = sh(fresh_db, "add", "openai", "work").stdout.strip()
    sh(fresh_db, "set", "openai:work", "api_key=@-", stdin=MARKER)
    assert "renamed openai:work to openai:main" in sh(fresh_db, "rename", uuid, "main").stdout
    done = sh(fresh_db, "disconnect", "openai:main", "--json")
    assert json.loads(done.stdout)["status"] == "disconnected"
    refused = sh(fresh_db, "remove", "openai:main", stdin="n\n")
    assert refused.returncode == 1
    assert sh(fresh_db, "show", uuid).returncode == 0
    removed = sh(fresh_db, "remove", "openai:main", "--yes", "--json")
    assert json.loads(removed.stdout)["removed"] == uuid
    gone = sh(fresh_db, "show", uuid)
    assert gone.returncode == 1 and gone.stderr.startswith("error: no connection")


# -- bad input -----------------------------------------------------------------------------


def test_unknown_provider_suggests_the_closest_keys(fresh_db: str) -> None:
    done = sh(fresh_db, "add", "opnai", "x")
    assert done.returncode == 2
    expected = "error: unknown provider 'opnai' (did you mean: openai, monday, xai?)"
    assert done.stderr.strip() == expected


def test_bad_and_missing_refs(fresh_db: str) -> None:
    bad = sh(fresh_db, "show", "not a ref!")
    assert bad.returncode == 2 and "bad reference" in bad.stderr
    missing = sh(fresh_db, "show", "openai:nobody")
    assert missing.returncode == 1 and "no connection openai:nobody" in missing.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_unreachable_database_gives_the_drivers_reason_and_no_traceback() -> None:
    dsn = "postgresql://postgres@127.0.0.1:1/none"
    done = sh(dsn, "list")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "Connect call failed" in done.stderr or "refused" in done.stderr
    debug = sh(dsn, "--debug", "list")
    assert "Traceback" in debug.stderr


def test_usage_errors_exit_2() -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["test"]).exit_code == 2
    assert runner.invoke(cli, ["nope"]).exit_code == 2


# -- checks --------------------------------------------------------------------------------


def test_test_all_against_a_loopback_provider(fresh_db: str, providers_file: str) -> None:
    add_acme(fresh_db, providers_file, "good", GOOD)
    add_acme(fresh_db, providers_file, "bad", BAD)
    done = sh(fresh_db, "--providers", providers_file, "test", "--all")
    assert done.returncode == 1
    assert "acme:good" in done.stdout and "Invalid credentials" in done.stdout
    assert "2 checked, 1 failed" in done.stdout
    report = json.loads(
        sh(fresh_db, "--providers", providers_file, "test", "--all", "--json").stdout
    )
    assert report["ok"] is False and report["failed"] == 1
    outcomes = {i["name"]: (i["ok"], i["message"]) for i in report["items"]}
    assert outcomes == {"good": (True, "Connected"), "bad": (False, "Invalid credentials")}
    # Without --record nothing was written.
    shown = json.loads(
        sh(fresh_db, "--providers", providers_file, "show", "acme:bad", "--json").stdout
    )
    assert shown["last_validated_at"] is None
    sh(fresh_db, "--providers", providers_file, "test", "--all", "--record")
    shown = json.loads(
        sh(fresh_db, "--providers", providers_file, "show", "acme:bad", "--json").stdout
    )
    assert shown["status"] == "error" and shown["validation_status"] == "Invalid credentials"
    one = sh(fresh_db, "--providers", providers_file, "test", "acme:good")
    assert one.returncode == 0 and one.stdout.startswith("ok  acme:good")
    only = sh(fresh_db, "--providers", providers_file, "test", "--all", "--provider", "openai")
    assert only.returncode == 0 and "0 checked, 0 failed" in only.stdout


async def test_check_all_reports_each_connection(fresh_db: str, acme_port: int) -> None:
    from integrations import CheckReport, Provider

    acme = Provider.model_validate(
        {
            "key": "acme",
            "name": "Acme",
            "auth_type": "api_key",
            "api_hosts": ["127.0.0.1"],
            "auth_header": {"name": "X-Acme-Key", "template": "{api_key}"},
            "validation": {"url": f"http://127.0.0.1:{acme_port}/me"},
        }
    )
    async with Integrations(fresh_db, keys=TEST_KEY, providers=[acme]) as integ:
        for name, key, owner in (("a", GOOD, None), ("b", BAD, "user:1")):
            c = await integ.add_connection("acme", name, owner=owner)
            await integ.save_setup(c.uuid, {"api_key": key})
        report = await integ.check_all(concurrency=2)
        assert isinstance(report, CheckReport)
        assert [(i.name, i.ok) for i in report.items] == [("a", True), ("b", False)]
        assert not report.ok and [i.name for i in report.failed] == ["b"]
        assert [i.name for i in (await integ.check_all(owner=None)).items] == ["a"]
        with pytest.raises(ValueError) as info:
            await integ.check_all(concurrency=0)
        assert info.value.code == "invalid", info.value
        assert MARKER not in repr(report)


def test_connect_runs_the_loopback_flow_then_token_and_test_work(
    fresh_db: str, tmp_path: Path
) -> None:
    from tests.oauth_server import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, ServerProcess
    from tests.oauthkit import loopback_provider

    with ServerProcess() as server:
        providers = tmp_path / "oauth.json"
        providers.write_text(
            json.dumps([loopback_provider(server.base_url).model_dump(mode="json")])
        )
        secret = tmp_path / "client_secret"
        secret.write_text(DEFAULT_CLIENT_SECRET)
        base = ("--providers", str(providers))
        sh(fresh_db, *base, "add", "loopback")
        done = sh(
            fresh_db,
            *base,
            "set",
            "loopback",
            f"client_id={DEFAULT_CLIENT_ID}",
            f"client_secret=@{secret}",
        )
        assert done.returncode == 0, done.stderr
        child = subprocess.Popen(
            [SCRIPT, "--dsn", fresh_db, *base, "connect", "loopback", "--no-browser"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline().startswith("Open this URL")
            url = child.stdout.readline().strip()
            assert "code_challenge_method=S256" in url and "127.0.0.1" in url
            # The "browser": the server redirects it to the command's loopback callback.
            with urllib.request.urlopen(url, timeout=20) as page:
                assert b"Connected" in page.read()
            out, err = child.communicate(timeout=30)
            assert child.returncode == 0, err
            assert out.startswith("connected loopback:default")
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
        token = sh(fresh_db, *base, "token", "loopback", check_secret=False)
        assert token.returncode == 0 and len(token.stdout.strip()) > 10
        checked = sh(fresh_db, *base, "test", "loopback")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert token.stdout.strip() not in checked.stdout + checked.stderr


# -- tokens ----------------------------------------------------------------------------------


async def _oauth_connection(dsn: str) -> str:
    async with Integrations(dsn, keys=TEST_KEY) as integ:
        c = await integ.add_connection("github", "default")
        await integ.save_setup(c.uuid, {"client_id": "cid", "client_secret": MARKER + "-client"})
        imported = await integ.import_tokens(
            c.uuid,
            {
                "access_token": MARKER + "-access",
                "token_type": "bearer",
                "expires_at": "2999-01-01T00:00:00+00:00",
                "scope": "repo user",
            },
        )
        assert imported.status == "connected"
        assert MARKER not in repr(imported)
        # A checked connection carries what the library wrote; an import must not resend it.
        await integ.record_validation(c.uuid, True)
        return c.uuid


def test_token_prints_the_access_token(fresh_db: str) -> None:
    uuid = asyncio.run(_oauth_connection(fresh_db))
    done = sh(fresh_db, "token", "github", check_secret=False)
    assert done.returncode == 0
    assert done.stdout == MARKER + "-access\n"
    shown = sh(fresh_db, "show", uuid)
    assert "access_token:" in shown.stdout


# -- export and import ----------------------------------------------------------------------


@pytest.fixture
def second_db(admin_dsn: str, template_db: str) -> Iterator[str]:
    name = f"integrations_t_{secrets.token_hex(6)}"
    asyncio.run(clone_database(admin_dsn, template_db, name))
    yield _with_database(admin_dsn, name)
    asyncio.run(_admin(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_export_and_import_into_another_database(
    fresh_db: str, second_db: str, tmp_path: Path
) -> None:
    asyncio.run(_oauth_connection(fresh_db))
    sh(fresh_db, "add", "openai")
    sh(fresh_db, "set", "openai", "api_key=@-", stdin=MARKER + "-openai")
    env = cli_env(INTEGRATIONS_EXPORT_PASSPHRASE="correct horse battery")
    bundle = tmp_path / "backup.json"
    done = sh(fresh_db, "export", "--out", str(bundle), env=env)
    assert done.returncode == 0, done.stderr
    assert "exported 2 connection(s)" in done.stdout
    assert oct(bundle.stat().st_mode & 0o777) == "0o600"
    assert MARKER not in bundle.read_text()
    assert json.loads(bundle.read_text())["kdf"]["name"] == "scrypt"

    wrong = sh(
        second_db,
        "import",
        str(bundle),
        "--keep-owners",
        env=cli_env(INTEGRATIONS_EXPORT_PASSPHRASE="wrong"),
    )
    assert wrong.returncode == 1 and "wrong passphrase" in wrong.stderr

    dry = sh(second_db, "import", str(bundle), "--keep-owners", "--dry-run", "--json", env=env)
    assert [c["ref"] for c in json.loads(dry.stdout)["created"]] == [
        "github:default",
        "openai:default",
    ]
    assert sh(second_db, "list", "--json").stdout.strip() == "[]"

    done = sh(second_db, "import", str(bundle), "--keep-owners", env=env)
    assert done.returncode == 0, done.stderr
    assert "imported: 2 created, 0 updated, 0 skipped" in done.stdout
    token = sh(second_db, "token", "github", check_secret=False)
    assert token.stdout == MARKER + "-access\n"
    again = sh(second_db, "import", str(bundle), "--keep-owners", "--json", env=env)
    assert len(json.loads(again.stdout)["skipped"]) == 2
    over = sh(second_db, "import", str(bundle), "--keep-owners", "--overwrite", env=env)
    assert "0 created, 2 updated, 0 skipped" in over.stdout
    shown = json.loads(sh(second_db, "show", "openai", "--json").stdout)
    assert shown["status"] == "connected" and shown["data"]["api_key"].startswith("••••")
    # Each connection keeps its uuid: references to it in the application stay true.
    exported = {c["ref"]: c["uuid"] for c in json.loads(dry.stdout)["created"]}
    original = json.loads(sh(fresh_db, "show", "openai", "--json").stdout)["uuid"]
    assert shown["uuid"] == original
    assert set(exported) == {"github:default", "openai:default"}


def test_decrypted_export_warns_and_holds_the_secrets(fresh_db: str, tmp_path: Path) -> None:
    sh(fresh_db, "add", "openai")
    sh(fresh_db, "set", "openai", "api_key=@-", stdin=MARKER)
    done = sh(fresh_db, "export", "--decrypted", check_secret=False)
    assert done.returncode == 0
    assert "warning" in done.stderr and MARKER not in done.stderr
    doc = json.loads(done.stdout)
    assert doc["connections"][0]["data"]["api_key"] == MARKER


def test_an_invalid_bundle_writes_nothing(fresh_db: str, tmp_path: Path) -> None:
    doc = {
        "format": "integrations-export",
        "version": 1,
        "connections": [
            {"provider": "openai", "name": "ok", "owner": None, "data": {"api_key": MARKER}},
            {"provider": "openai", "name": "bad name!", "owner": None, "data": {}},
        ],
    }
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(doc))
    done = sh(fresh_db, "import", str(path), "--keep-owners")
    assert done.returncode == 2 and "openai:bad name!" in done.stderr
    assert sh(fresh_db, "list", "--json").stdout.strip() == "[]"


async def test_a_failed_write_midway_undoes_the_import(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from integrations import StorageError
    from integrations.cli import _bundle, _transfer
    from integrations.cli._support import Fail

    async with Integrations(fresh_db, keys=TEST_KEY) as integ:
        existing = await integ.add_connection("openai", "kept")
        await integ.save_setup(existing.uuid, {"api_key": "before-0123456789", "org": "a"})
        entries = [
            _bundle.Entry(
                "openai",
                "kept",
                None,
                {"api_key": "after-0123456789", "color": "blue", "project": "p"},
                {},
            ),
            _bundle.Entry("openai", "new", None, {"api_key": "new-0123456789"}, {}),
            _bundle.Entry("mistral", "x", None, {"api_key": "x-0123456789"}, {}),
        ]
        real = integ.save_setup
        calls = 0

        async def flaky(uuid: str, attrs: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise StorageError("database error: ConnectionResetError")
            return await real(uuid, attrs, **kw)

        monkeypatch.setattr(integ, "save_setup", flaky)
        with pytest.raises(Fail, match="nothing kept"):
            await _transfer.import_entries(
                integ, entries, owner=None, overwrite=True, dry_run=False
            )
        monkeypatch.setattr(integ, "save_setup", real)
        names = [c.name for c in await integ.list_connections("openai")]
        assert names == ["kept"]
        assert await integ.list_connections("mistral") == []
        creds = await integ.get_credentials(existing.uuid)
        assert creds["api_key"] == "before-0123456789" and creds["org"] == "a"
        # The fields the import added are unset again.
        assert creds.get("color") is None and creds.get("project") is None


async def test_an_undone_import_unsets_the_credential_keys_it_added(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from integrations import StorageError
    from integrations.cli import _bundle, _transfer
    from integrations.cli._support import Fail

    async with Integrations(fresh_db, keys=TEST_KEY) as integ:
        # A credentials provider keeps every field in one map, which a save merges key by key.
        mail = await integ.add_connection("smtp", "mail")
        await integ.save_setup(mail.uuid, {"host": "a.example", "password": "p-0123456789"})
        entries = [
            _bundle.Entry(
                "smtp", "mail", None, {"credentials": {"host": "b.example", "username": "u"}}, {}
            ),
            _bundle.Entry("openai", "new", None, {"api_key": "new-0123456789"}, {}),
        ]
        real = integ.save_setup

        async def failing_second(uuid: str, attrs: Any, **kw: Any) -> Any:
            if uuid != mail.uuid:
                raise StorageError("database error: ConnectionResetError")
            return await real(uuid, attrs, **kw)

        monkeypatch.setattr(integ, "save_setup", failing_second)
        with pytest.raises(Fail, match="nothing kept"):
            await _transfer.import_entries(
                integ, entries, owner=None, overwrite=True, dry_run=False
            )
        creds = (await integ.get_integration(mail.uuid))["credentials"]
        assert creds["host"] == "a.example" and creds["password"] == "p-0123456789"
        assert creds.get("username") is None


async def test_an_undone_overwrite_brings_back_the_earlier_grant(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from integrations import StorageError
    from integrations.cli import _bundle, _transfer
    from integrations.cli._support import Fail

    uuid = await _oauth_connection(fresh_db)
    async with Integrations(fresh_db, keys=TEST_KEY) as integ:
        tokens = {"access_token": "imported-access", "token_type": "bearer", "scope": "repo"}
        entries = [
            _bundle.Entry(
                "github",
                "default",
                None,
                {"client_id": "cid"},
                tokens,
                status="connected",
                validation="ok",
            )
        ]

        # The last step fails: the grant was already written over.
        async def failing(*args: Any, **kw: Any) -> Any:
            raise StorageError("database error: ConnectionResetError")

        monkeypatch.setattr(integ, "record_validation", failing)
        with pytest.raises(Fail, match="nothing kept"):
            await _transfer.import_entries(
                integ, entries, owner=None, overwrite=True, dry_run=False
            )
        data = await integ.get_integration(uuid)
        assert data["access_token"] == MARKER + "-access"
        assert data["status"] == "connected"


async def test_an_undo_step_that_fails_is_logged_and_the_others_still_run(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from integrations import StorageError
    from integrations.cli import _bundle, _transfer
    from integrations.cli._support import Fail

    caplog.set_level(logging.ERROR, logger="integrations.cli")
    async with Integrations(fresh_db, keys=TEST_KEY) as integ:
        existing = await integ.add_connection("openai", "kept")
        await integ.save_setup(existing.uuid, {"api_key": "before-0123456789"})
        entries = [
            _bundle.Entry("openai", "kept", None, {"api_key": "after-0123456789"}, {}),
            _bundle.Entry("openai", "new", None, {"api_key": "new-0123456789"}, {}),
            _bundle.Entry("mistral", "x", None, {"api_key": "x-0123456789"}, {}),
        ]
        real = integ.save_setup

        async def failing_third(uuid: str, attrs: Any, **kw: Any) -> Any:
            if (await integ.get_integration_by_uuid(uuid)).provider == "mistral":
                raise StorageError("database error: ConnectionResetError")
            return await real(uuid, attrs, **kw)

        async def cannot_remove(uuid: str, **kw: Any) -> None:
            raise StorageError("database error: ConnectionRefusedError")

        monkeypatch.setattr(integ, "save_setup", failing_third)
        monkeypatch.setattr(integ, "remove_connection", cannot_remove)
        # The import's own failure is reported, with the steps that could not be undone:
        # it does not claim that nothing was kept.
        with pytest.raises(Fail) as failed:
            await _transfer.import_entries(
                integ, entries, owner=None, overwrite=True, dry_run=False
            )
        monkeypatch.setattr(integ, "save_setup", real)
        said = re.fullmatch(
            r"import failed, and 2 of its 3 change\(s\) could not be undone \(connections "
            r"(\S+), (\S+); the log says why\): .*ConnectionResetError",
            str(failed.value),
        )
        assert said is not None, str(failed.value)
        # The two connections the import created are left, named there and in the log.
        listed = [*await integ.list_connections("openai"), *await integ.list_connections("mistral")]
        left = {c.uuid for c in listed if c.name != "kept"}
        assert len(left) == 2 and set(said.groups()) == left
        logged = [r for r in caplog.records if r.getMessage().startswith("could not undo")]
        assert {getattr(r, "integrations_uuid", None) for r in logged} == left
        assert all("ConnectionRefusedError" in r.getMessage() for r in logged)
        # The step before them still ran: the connection overwritten has its key back.
        creds = await integ.get_credentials(existing.uuid)
        assert creds["api_key"] == "before-0123456789"


def test_a_report_sorts_its_rows_by_the_actions_text() -> None:
    from integrations.cli._transfer import ImportReport

    # Rows as a caller may build them, each action read back from text (a string object of
    # its own, not the literal the import writes).
    actions = json.loads('["created", "updated", "skipped", "created"]')
    report = ImportReport(rows=[(a, f"openai:{i}", None) for i, a in enumerate(actions)])
    assert [ref for _a, ref, _u in report.created] == ["openai:0", "openai:3"]
    assert [ref for _a, ref, _u in report.updated] == ["openai:1"]
    assert [ref for _a, ref, _u in report.skipped] == ["openai:2"]


# -- keys, migrate, doctor, watch, serve -------------------------------------------------------


def test_keys_generate_prints_a_usable_key() -> None:
    done = subprocess.run([SCRIPT, "keys", "generate"], capture_output=True, text=True)
    key = done.stdout.strip()
    asyncio.run(asyncio.sleep(0))
    from integrations._vault import Keyring

    assert len(Keyring.parse(key)) == 1


def test_keys_rotate_and_doctor(fresh_db: str) -> None:
    sh(fresh_db, "add", "openai")
    sh(fresh_db, "set", "openai", "api_key=@-", stdin=MARKER)
    new = generate_key()
    lost = sh(fresh_db, "doctor", env=cli_env(INTEGRATIONS_KEYS=new))
    assert lost.returncode == 1
    assert "FAIL secrets   1 of 1 connection(s) cannot be decrypted" in lost.stdout
    rotated = sh(
        fresh_db, "keys", "rotate", "--json", env=cli_env(INTEGRATIONS_KEYS=f"{new},{TEST_KEY}")
    )
    assert rotated.returncode == 0, rotated.stderr
    result = json.loads(rotated.stdout)
    assert result["rotated"] == 1 and result["undecryptable"] == []
    assert result["rows_per_second"] > 0
    again = sh(fresh_db, "keys", "rotate", env=cli_env(INTEGRATIONS_KEYS=f"{new},{TEST_KEY}"))
    assert "rotated 0 of 0 row(s)" in again.stdout and "rows a second" in again.stdout
    healthy = sh(fresh_db, "doctor", "--json", env=cli_env(INTEGRATIONS_KEYS=new))
    assert healthy.returncode == 0, healthy.stdout
    checks = {c["check"]: c["ok"] for c in json.loads(healthy.stdout)["checks"]}
    assert checks == {
        "database": True,
        "schema": True,
        "keys": True,
        "secrets": True,
        "listener": True,
    }


def test_migrate_then_doctor_on_an_empty_database(empty_db: str) -> None:
    behind = sh(empty_db, "doctor")
    assert behind.returncode == 1 and "integrations migrate" in behind.stdout
    done = sh(empty_db, "migrate", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["applied"]
    assert sh(empty_db, "migrate").stdout.strip() == "schema up to date"


def test_watch_prints_one_line_per_event_until_interrupted(fresh_db: str) -> None:
    child = subprocess.Popen(
        [SCRIPT, "--dsn", fresh_db, "watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert child.stderr is not None and child.stdout is not None
        assert "watching" in child.stderr.readline()
        uuid = sh(fresh_db, "--owner", "user:7", "add", "openai").stdout.strip()
        line = child.stdout.readline()
        assert " connection_added openai:default " + uuid in line
        assert "owner=user:7" in line
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=20) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


def test_watch_with_all_owners_or_one_owner(fresh_db: str) -> None:
    """``watch --all-owners`` prints every owner's events, ``--owner`` that owner's only."""
    for name, scope, expected in (
        ("every", ["watch", "--all-owners"], "user:2"),
        ("own", ["--owner", "user:1", "watch"], "user:1"),
    ):
        child = subprocess.Popen(
            [SCRIPT, "--dsn", fresh_db, *scope],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        try:
            assert child.stderr is not None and child.stdout is not None
            assert "watching" in child.stderr.readline()
            theirs = sh(fresh_db, "--owner", "user:2", "add", "openai", name).stdout.strip()
            mine = sh(fresh_db, "--owner", "user:1", "add", "openai", name).stdout.strip()
            line = child.stdout.readline()
            uuid = theirs if expected == "user:2" else mine
            assert f" connection_added openai:{name} {uuid}" in line
            assert f"owner={expected}" in line
            child.send_signal(signal.SIGINT)
            assert child.wait(timeout=20) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            for stream in (child.stdout, child.stderr):
                if stream is not None:
                    stream.close()
    both = sh(fresh_db, "--owner", "user:1", "watch", "--all-owners")
    assert both.returncode == 2 and "--all-owners" in both.stderr


def test_watch_after_a_position_prints_the_logged_events_first(fresh_db: str) -> None:
    first = sh(fresh_db, "add", "openai").stdout.strip()
    second = sh(fresh_db, "add", "openai", "second").stdout.strip()
    child = subprocess.Popen(
        [SCRIPT, "--dsn", fresh_db, "watch", "--json", "--after", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert child.stdout is not None
        replayed = [json.loads(child.stdout.readline()) for _ in range(2)]
        assert [e["uuid"] for e in replayed] == [first, second]
        assert replayed[0]["position"] < replayed[1]["position"]
        third = sh(fresh_db, "add", "openai", "third").stdout.strip()
        live = json.loads(child.stdout.readline())
        assert live["uuid"] == third and live["position"] > replayed[1]["position"]
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=20) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    after = sh(fresh_db, "watch", "--after", "-1")
    assert after.returncode == 2 and "--after" in after.stderr


def test_events_prune_applies_the_retention(fresh_db: str) -> None:
    for name in ("a", "b", "c"):
        sh(fresh_db, "add", "openai", name)
    done = sh(fresh_db, "events", "prune", "--max-count", "1", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"deleted": 2}
    assert sh(fresh_db, "events", "prune").stdout.strip() == "deleted 0 logged events"


def test_webhooks_add_list_test_deliveries_replay_remove(fresh_db: str) -> None:
    refused = sh(fresh_db, "webhooks", "add", "http://hooks.example.com/in")
    assert refused.returncode != 0 and "https" in refused.stderr
    added = sh(fresh_db, "webhooks", "add", "https://hooks.example.com/in", "--kind", "connected")
    assert added.returncode == 0, added.stderr
    assert "whsec_" in added.stdout and "shown once" in added.stdout
    endpoint = added.stdout.split()[1]
    listed = sh(fresh_db, "webhooks", "list", "--json")
    [shown] = json.loads(listed.stdout)
    assert shown["id"] == endpoint and shown["kinds"] == ["connected"]
    assert "whsec_" not in listed.stdout
    assert json.loads(sh(fresh_db, "webhooks", "deliveries", endpoint, "--json").stdout) == []
    # An address this process may not send to: refused before any connection is made.
    tried = sh(fresh_db, "webhooks", "add", "https://127.0.0.1:9/in", "--allow-loopback")
    loopback = tried.stdout.split()[1]
    test = sh(fresh_db, "webhooks", "test", loopback)
    assert test.returncode == 1 and "loopback" in test.stdout
    replay = sh(fresh_db, "webhooks", "replay", "msg_" + "0" * 32)
    assert replay.returncode != 0
    assert sh(fresh_db, "webhooks", "remove", endpoint).returncode == 0
    assert sh(fresh_db, "webhooks", "remove", endpoint).returncode != 0
    assert [e["id"] for e in json.loads(sh(fresh_db, "webhooks", "list", "--json").stdout)] == [
        loopback
    ]


def test_serve_without_the_console_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "integrations.web", None)
    done = CliRunner().invoke(cli, ["serve"])
    assert done.exit_code == 1
    assert "web console" in done.output


def test_python_dash_m_runs_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "integrations", "providers", "--json"],
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert done.returncode == 0, done.stderr
    keys = {p["key"] for p in json.loads(done.stdout)}
    assert {"openai", "github", "telegram"} <= keys


# -- pure parts, through click's runner ----------------------------------------------------------


def test_providers_json_shape_and_a_bad_providers_file(tmp_path: Path) -> None:
    runner = CliRunner()
    done = runner.invoke(cli, ["providers", "--json"])
    assert done.exit_code == 0
    openai = next(p for p in json.loads(done.output) if p["key"] == "openai")
    assert set(openai) == {"key", "name", "auth_type", "api_hosts", "setup_fields", "secret_fields"}
    assert (openai["name"], openai["auth_type"]) == ("OpenAI", "api_key")
    assert openai["api_hosts"] == ["api.openai.com"]
    assert "api_key" in openai["setup_fields"] and openai["secret_fields"] == ["api_key"]
    bad = tmp_path / "bad.json"
    bad.write_text('[{"key": "Bad Key"}]')
    refused = runner.invoke(cli, ["--providers", str(bad), "providers"])
    assert refused.exit_code == 2
    # The file, the entry and the field at fault are named.
    assert str(bad) in refused.output
    assert "entry 1 ('Bad Key'), field 'key'" in refused.output


def test_keys_generate_json() -> None:
    done = CliRunner().invoke(cli, ["keys", "generate", "--json"])
    assert done.exit_code == 0 and json.loads(done.output)["key"].startswith("ik1:")


def test_set_rules_for_fields() -> None:
    from integrations._catalogue import BUILTIN_PROVIDERS
    from integrations.cli._app import parse_assignments
    from integrations.cli._support import Fail

    smtp = next(p for p in BUILTIN_PROVIDERS if p.key == "smtp")
    assert parse_assignments(smtp, ("host=mail.example.test", "port=587")) == {
        "host": "mail.example.test",
        "port": "587",
    }
    with pytest.raises(Fail) as refused:
        parse_assignments(smtp, ("password=" + MARKER,))
    assert refused.value.code == 2 and MARKER not in refused.value.message
    with pytest.raises(Fail, match="not secret"):
        parse_assignments(smtp, ("host",))
    with pytest.raises(Fail, match="cannot read"):
        parse_assignments(smtp, ("password=@/nonexistent/file",))


def test_a_sealed_bundle_refuses_a_wrong_passphrase_and_tampering() -> None:
    from integrations.cli import _bundle

    doc = _bundle.document(
        [{"provider": "openai", "name": "x", "owner": None, "data": {"api_key": MARKER}}],
        "2026-01-01T00:00:00+00:00",
    )
    sealed = _bundle.seal(doc, "passphrase")
    assert MARKER not in json.dumps(sealed)
    assert _bundle.unseal(sealed, "passphrase") == doc
    with pytest.raises(_bundle.BundleError, match="wrong passphrase"):
        _bundle.unseal(sealed, "other")
    ciphertext = sealed["ciphertext"]
    # One character changed (never "changed" to the one already there).
    tampered = dict(sealed, ciphertext=("B" if ciphertext[0] == "A" else "A") + ciphertext[1:])
    with pytest.raises(_bundle.BundleError):
        _bundle.unseal(tampered, "passphrase")
    with pytest.raises(_bundle.BundleError, match="damaged"):
        _bundle.unseal({"format": _bundle.SEALED_FORMAT}, "passphrase")


def test_last_checked_reads_like_a_person_would_say_it() -> None:
    from datetime import UTC, datetime, timedelta

    from integrations.cli._support import ago

    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert ago(None) == "never"
    assert ago((now - timedelta(seconds=20)).isoformat(), now) == "just now"
    assert ago((now - timedelta(minutes=3)).isoformat(), now) == "3 min ago"
    assert ago((now - timedelta(hours=5)).isoformat(), now) == "5 h ago"
    assert ago((now - timedelta(days=2)).isoformat(), now) == "2 d ago"


def _serve(*args: str) -> tuple[subprocess.Popen[str], str]:
    """``integrations serve --port 0 ARGS...`` and the login link it prints."""
    import re
    import time

    proc = subprocess.Popen(
        [SCRIPT, *args, "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+/login\?token=\S+", line)
        if found:
            return proc, found.group(0)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"no login link printed: {proc.communicate()[1]}")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode in (0, 130, -signal.SIGINT), err
    assert "Traceback" not in err
    return err


def test_serve_prints_a_one_time_login_link_that_signs_in(fresh_db: str) -> None:
    import httpx

    proc, link = _serve("--dsn", fresh_db)
    try:
        with httpx.Client(follow_redirects=True) as browser:
            page = browser.get(link)
            assert page.status_code == 200 and "Add connection" in page.text
            # The token works once: a second browser is refused, with a page.
            with httpx.Client(follow_redirects=True) as other:
                refused = other.get(link)
                assert refused.status_code == 403
                assert refused.headers["content-type"].startswith("text/html")
                assert "already used" in refused.text
    finally:
        _stop(proc)


def test_serve_with_an_owner_signs_in_as_that_owner_only(fresh_db: str) -> None:
    import httpx

    system = sh(fresh_db, "add", "openai").stdout.strip()
    other = sh(fresh_db, "add", "openai", "--owner", "user:7").stdout.strip()
    mine = sh(fresh_db, "add", "openai", "--owner", "user:42").stdout.strip()
    proc, link = _serve("--dsn", fresh_db, "--owner", "user:42")
    try:
        with httpx.Client(follow_redirects=True) as browser:
            listing = browser.get(link)
            assert listing.status_code == 200
            assert "Owner user:42" in listing.text
            assert mine in listing.text
            assert system not in listing.text and other not in listing.text
            base = link.split("/login")[0]
            assert browser.get(f"{base}/{mine}").status_code == 200
            for hidden in (system, other):
                assert browser.get(f"{base}/{hidden}").status_code == 404
    finally:
        _stop(proc)


def test_a_busy_port_or_an_unwritable_file_is_one_line(fresh_db: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = sh(fresh_db, "serve", "--port", str(port))
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in done.stderr
    env = cli_env(INTEGRATIONS_EXPORT_PASSPHRASE="correct horse battery")
    target = tmp_path / "missing" / "bundle.json"
    done = sh(fresh_db, "export", "--out", str(target), env=env)
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: no such directory: {target.parent}"
    target.parent.mkdir()
    target.parent.chmod(0o500)  # not writable (root writes anyway: then it is written)
    done = sh(fresh_db, "export", "--out", str(target), env=env)
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "command",
    [["set", "openai", "api_key"], ["remove", "openai"], ["export"]],
    ids=["secret", "confirmation", "passphrase"],
)
def test_ctrl_c_at_a_prompt_ends_the_command_at_once(fresh_db: str, command: list[str]) -> None:
    sh(fresh_db, "add", "openai")
    child = pexpect.spawn(SCRIPT, ["--dsn", fresh_db, *command], env=cli_env(), encoding="utf-8")
    child.expect(["api_key: ", r"\[y/N\]: ", "Passphrase: "], timeout=30)
    time.sleep(0.2)  # the prompt is waiting for its answer
    child.sendintr()
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    assert child.exitstatus == 130, (child.exitstatus, child.signalstatus, child.before)
    assert "Traceback" not in (child.before or "")
    assert sh(fresh_db, "show", "openai", "--json").returncode == 0  # nothing removed


def test_connections_not_fully_set_up_export_and_import(
    fresh_db: str, second_db: str, tmp_path: Path
) -> None:
    sh(fresh_db, "add", "github")  # added, never set up
    sh(fresh_db, "add", "openai")
    sh(fresh_db, "set", "openai", "api_key=@-", stdin=MARKER)
    assert sh(fresh_db, "disconnect", "openai").returncode == 0
    bundle = tmp_path / "partial.json"
    # An existing file's wider mode is narrowed: the bundle is for its owner only.
    bundle.write_text("")
    bundle.chmod(0o644)
    env = cli_env(INTEGRATIONS_EXPORT_PASSPHRASE="correct horse battery")
    assert sh(fresh_db, "export", "--out", str(bundle), env=env).returncode == 0
    assert oct(bundle.stat().st_mode & 0o777) == "0o600"
    done = sh(second_db, "import", str(bundle), "--keep-owners", env=env)
    assert done.returncode == 0, done.stderr
    assert "imported: 2 created" in done.stdout
    listed = {
        f"{c['provider']}:{c['name']}": c["status"]
        for c in json.loads(sh(second_db, "list", "--json").stdout)
    }
    assert listed == {"github:default": "disconnected", "openai:default": "disconnected"}


def test_a_mistyped_field_is_refused_with_the_fields_there_are(fresh_db: str) -> None:
    sh(fresh_db, "add", "openai")
    for typo in ("API_KEY", "apikey"):
        done = sh(fresh_db, "set", "openai", f"{typo}={MARKER}")
        assert done.returncode == 2
        assert "no setup field" in done.stderr and "did you mean api_key" in done.stderr
    shown = json.loads(sh(fresh_db, "show", "openai", "--json").stdout)
    assert not any(MARKER in str(v) for v in shown["data"].values())


def test_a_file_that_is_not_text_is_a_usage_error(fresh_db: str, tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\xff\xfe\x00binary")
    sh(fresh_db, "add", "openai")
    done = sh(fresh_db, "set", "openai", f"api_key=@{blob}")
    assert done.returncode == 2 and "not UTF-8 text" in done.stderr
    assert "Traceback" not in done.stderr
    done = sh(fresh_db, "import", str(blob), "--keep-owners")
    assert done.returncode == 2 and "not UTF-8 text" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_password_in_the_dsn_query_is_never_shown() -> None:
    dsn = "postgresql://postgres@127.0.0.1:1/x?password=" + MARKER
    for args in (("list",), ("doctor",)):
        done = sh(dsn, *args)  # sh asserts that the marker shows nowhere
        assert done.returncode != 0


def test_owner_and_dsn_may_follow_the_command(fresh_db: str) -> None:
    env = cli_env()
    added = subprocess.run(
        [SCRIPT, "add", "openai", "work", "--owner", "user:42", "--dsn", fresh_db],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    uuid = added.stdout.strip()
    shown = sh(fresh_db, "show", "openai:work", "--owner", "user:42", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["uuid"] == uuid
    # The system scope has no such connection.
    assert sh(fresh_db, "show", "openai:work").returncode == 1


@pytest.mark.parametrize("args", [("show",), ("frob",), ("show", "openai", "--bogus"), ("test",)])
def test_a_usage_error_is_one_line(fresh_db: str, args: tuple[str, ...]) -> None:
    done = sh(fresh_db, *args)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1


def test_remove_without_an_answer_says_how_to_go_on(fresh_db: str) -> None:
    sh(fresh_db, "add", "openai")
    done = sh(fresh_db, "remove", "openai")  # standard input is empty
    assert done.returncode == 1
    assert "--yes" in done.stderr and "Traceback" not in done.stderr
    assert sh(fresh_db, "show", "openai").returncode == 0


def test_without_a_command_the_help_is_printed() -> None:
    done = subprocess.run([SCRIPT], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert done.returncode == 0 and "Commands:" in done.stdout


def test_an_import_where_the_uuid_is_taken_gets_a_new_one(fresh_db: str, tmp_path: Path) -> None:
    uuid = sh(fresh_db, "add", "openai").stdout.strip()
    bundle = tmp_path / "one.json"
    env = cli_env(INTEGRATIONS_EXPORT_PASSPHRASE="correct horse battery")
    assert sh(fresh_db, "export", "--out", str(bundle), env=env).returncode == 0
    # Into another owner's scope of the same database: the name is free, the uuid is not.
    done = sh(fresh_db, "--owner", "user:9", "import", str(bundle), env=env)
    assert done.returncode == 0, done.stderr
    copy = json.loads(sh(fresh_db, "--owner", "user:9", "show", "openai", "--json").stdout)
    assert copy["uuid"] != uuid
    assert json.loads(sh(fresh_db, "show", "openai", "--json").stdout)["uuid"] == uuid


def test_an_import_without_overwrite_leaves_an_existing_connection_as_it_is(
    fresh_db: str, tmp_path: Path
) -> None:
    sh(fresh_db, "add", "openai")
    sh(fresh_db, "set", "openai", "api_key=@-", stdin="sk-here-0123456789")
    doc = {
        "format": "integrations-export",
        "version": 1,
        "connections": [
            {
                "provider": "openai",
                "name": n,
                "owner": None,
                "data": {"api_key": f"sk-{n}-0123456789"},
            }
            for n in ("default", "other")
        ],
    }
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(doc))
    done = sh(fresh_db, "import", str(path), "--keep-owners")
    assert done.returncode == 0, done.stderr
    assert "imported: 1 created, 0 updated, 1 skipped" in done.stdout
    exported = json.loads(sh(fresh_db, "export", "--decrypted", check_secret=False).stdout)
    keys = {c["name"]: c["data"]["api_key"] for c in exported["connections"]}
    assert keys == {"default": "sk-here-0123456789", "other": "sk-other-0123456789"}


def test_a_bundle_uuid_that_is_no_uuid_gets_a_new_one(fresh_db: str, tmp_path: Path) -> None:
    doc = {
        "format": "integrations-export",
        "version": 1,
        "connections": [
            {
                "uuid": "not-a-uuid",
                "provider": "openai",
                "name": "default",
                "owner": None,
                "data": {"api_key": "sk-0123456789"},
            }
        ],
    }
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(doc))
    done = sh(fresh_db, "import", str(path), "--keep-owners", "--json")
    assert done.returncode == 0, done.stderr
    [created] = json.loads(done.stdout)["created"]
    shown = json.loads(sh(fresh_db, "show", "openai", "--json").stdout)
    assert created["uuid"] == shown["uuid"] != "not-a-uuid"


def test_a_narrow_terminal_folds_the_setup_column_instead_of_cutting_it() -> None:
    from rich.console import Console

    from integrations.cli._support import new_table

    table = new_table("ref", "uuid", "setup", wrap="setup")
    setup = "region=eu-central-1 api_key=••••4242"
    table.add_row("acme:default", "01a21fda-8c04-76f0-9c78-dccb4589dc63", setup)
    narrow = Console(width=64, highlight=False)
    with narrow.capture() as captured:
        narrow.print(table)
    lines = captured.get().splitlines()
    assert "01a21fda-8c04-76f0-9c78-dccb4589dc63" in lines[2]  # never cut
    column = lines[2].index("01a21fda") + len("01a21fda-8c04-76f0-9c78-dccb4589dc63")
    folded = "".join(line[column:].strip() for line in lines[2:])
    assert folded.replace(" ", "") == setup.replace(" ", "")
    assert "…" not in captured.get()


def test_connections_of_a_provider_no_longer_registered_are_still_listed_and_shown(
    fresh_db: str, tmp_path: Path
) -> None:
    spec = tmp_path / "providers.json"
    spec.write_text(
        json.dumps(
            [{"key": "acme", "name": "Acme", "auth_type": "api_key", "api_hosts": ["127.0.0.1"]}]
        )
    )
    uuid = sh(fresh_db, "--providers", str(spec), "add", "acme").stdout.strip()
    sh(fresh_db, "add", "openai")
    # Without the application's providers: the stored row is still there to see.
    listed = json.loads(sh(fresh_db, "list", "--json").stdout)
    assert [(c["provider"], c["name"]) for c in listed] == [
        ("acme", "default"),
        ("openai", "default"),
    ]
    assert [c["uuid"] for c in json.loads(sh(fresh_db, "list", "acme", "--json").stdout)] == [uuid]
    assert json.loads(sh(fresh_db, "show", "acme", "--json").stdout)["uuid"] == uuid
    unknown = sh(fresh_db, "list", "acmx")
    assert unknown.returncode == 2
    assert "unknown provider 'acmx'" in unknown.stderr


def test_a_check_of_a_provider_this_shell_does_not_know_is_reported_not_recorded(
    fresh_db: str, providers_file: str
) -> None:
    add_acme(fresh_db, providers_file, "good", GOOD)
    before = json.loads(
        sh(fresh_db, "--providers", providers_file, "show", "acme:good", "--json").stdout
    )
    # A shell without the application's providers file.
    done = sh(fresh_db, "test", "acme:good")
    assert done.returncode == 1
    assert "not registered in this process" in done.stdout + done.stderr
    for args in (["test", "--all", "--record"], ["test", "acme:good", "--record"]):
        sh(fresh_db, *args)
    after = json.loads(
        sh(fresh_db, "--providers", providers_file, "show", "acme:good", "--json").stdout
    )
    for field in ("status", "validation_status", "last_validated_at"):
        assert after[field] == before[field], field


# -- the whole store: actors, every owner, reads that never migrate, faithful imports -------


async def _logged_events(dsn: str, count: int) -> list[Any]:
    from integrations import ALL_OWNERS

    async with (
        Integrations(dsn, keys=TEST_KEY) as integ,
        integ.subscribe(owner=ALL_OWNERS, after=0) as events,
    ):
        return [await asyncio.wait_for(events.__anext__(), 10) for _ in range(count)]


def test_every_change_the_cli_makes_records_who_made_it(fresh_db: str) -> None:
    as_alice = cli_env(USER="alice", LOGNAME="alice")
    uuid = sh(fresh_db, "add", "openai", "work", env=as_alice).stdout.strip()
    sh(fresh_db, "set", "openai:work", "api_key=@-", stdin=MARKER, env=as_alice)
    sh(fresh_db, "rename", uuid, "main", env=as_alice)
    sh(fresh_db, "--actor", "deploy-bot", "disconnect", uuid, env=as_alice)
    done = sh(fresh_db, "remove", uuid, "--yes", "--actor", "ops:carol", env=as_alice)
    assert done.returncode == 0, done.stderr
    events = asyncio.run(_logged_events(fresh_db, 5))
    assert [(e.kind, e.actor) for e in events] == [
        ("connection_added", "alice"),
        ("setup_saved", "alice"),
        ("connection_renamed", "alice"),
        ("disconnected", "deploy-bot"),
        ("connection_removed", "ops:carol"),
    ]
    empty = sh(fresh_db, "--actor", " ", "add", "openai")
    assert empty.returncode == 2 and "--actor" in empty.stderr


def test_all_owners_lists_shows_exports_and_counts_every_owner(
    fresh_db: str, tmp_path: Path
) -> None:
    system = sh(fresh_db, "add", "openai").stdout.strip()
    theirs = sh(fresh_db, "--owner", "user:1", "add", "slack", "team").stdout.strip()
    sh(fresh_db, "--owner", "user:2", "add", "openai")
    # Without it, one scope: the system's.
    assert [c["uuid"] for c in json.loads(sh(fresh_db, "list", "--json").stdout)] == [system]
    every = json.loads(sh(fresh_db, "list", "--all-owners", "--json").stdout)
    assert sorted((c["owner"] or "", c["provider"]) for c in every) == [
        ("", "openai"),
        ("user:1", "slack"),
        ("user:2", "openai"),
    ]
    table = sh(fresh_db, "list", "--all-owners").stdout
    assert "owner" in table and "user:1" in table and "(system)" in table
    assert len(json.loads(sh(fresh_db, "list", "openai", "--all-owners", "--json").stdout)) == 2
    shown = json.loads(sh(fresh_db, "show", "slack:team", "--all-owners", "--json").stdout)
    assert shown["uuid"] == theirs and shown["owner"] == "user:1"
    twice = sh(fresh_db, "show", "openai", "--all-owners")
    assert twice.returncode == 2 and "user:2" in twice.stderr and "uuid" in twice.stderr
    both = sh(fresh_db, "--owner", "user:1", "list", "--all-owners")
    assert both.returncode == 2 and "not both" in both.stderr
    counted = json.loads(sh(fresh_db, "owners", "--json").stdout)
    assert [(o["owner"], o["connections"], o["disconnected"]) for o in counted] == [
        (None, 1, 1),
        ("user:1", 1, 1),
        ("user:2", 1, 1),
    ]
    assert "(system)" in sh(fresh_db, "owners").stdout
    bundle = tmp_path / "all.json"
    done = sh(fresh_db, "export", "--all-owners", "--decrypted", "--out", str(bundle))
    assert done.returncode == 0, done.stderr
    exported = json.loads(bundle.read_text())["connections"]
    assert sorted(c["owner"] or "" for c in exported) == ["", "user:1", "user:2"]


@pytest.mark.parametrize(
    "args",
    [("list",), ("show", "openai"), ("owners",), ("export", "--decrypted"), ("token", "x")],
)
def test_a_read_command_never_migrates(empty_db: str, args: tuple[str, ...]) -> None:
    done = sh(empty_db, *args)
    assert done.returncode == 1
    assert "schema is behind" in done.stderr and "integrations migrate" in done.stderr
    # Nothing was created: migrate still has every migration to apply.
    assert sh(empty_db, "doctor").returncode == 1
    assert json.loads(sh(empty_db, "migrate", "--json").stdout)["applied"][0] == 1


async def _failing_connection(dsn: str) -> str:
    async with Integrations(dsn, keys=TEST_KEY) as integ:
        c = await integ.add_connection("openai", "broken")
        await integ.save_setup(c.uuid, {"api_key": MARKER + "-revoked"})
        await integ.record_validation(c.uuid, (False, "HTTP 401: invalid api key"))
        return c.uuid


def test_an_import_keeps_status_and_warns_about_a_grant_in_two_stores(
    fresh_db: str, second_db: str, tmp_path: Path
) -> None:
    asyncio.run(_oauth_connection(fresh_db))
    asyncio.run(_failing_connection(fresh_db))
    bundle = tmp_path / "b.json"
    sh(fresh_db, "export", "--decrypted", "--out", str(bundle))
    dry = sh(second_db, "import", str(bundle), "--keep-owners", "--dry-run")
    assert "github:default" in dry.stderr and "--without-tokens" in dry.stderr
    done = sh(second_db, "import", str(bundle), "--keep-owners", "--actor", "migration")
    assert done.returncode == 0, done.stderr
    assert "two stores" in done.stderr and "github:default" in done.stderr
    broken = json.loads(sh(second_db, "show", "openai:broken", "--json").stdout)
    assert broken["status"] == "error"
    assert broken["validation_status"] == "HTTP 401: invalid api key"
    github = json.loads(sh(second_db, "show", "github", "--json").stdout)
    assert github["status"] == "connected" and github["validation_status"] == "ok"
    actors = {e.actor for e in asyncio.run(_logged_events(second_db, 3))}
    assert actors == {"migration"}

    sh(second_db, "remove", "github", "--yes")
    bare = sh(second_db, "import", str(bundle), "--keep-owners", "--without-tokens")
    assert bare.returncode == 0, bare.stderr
    assert "two stores" not in bare.stderr
    github = json.loads(sh(second_db, "show", "github", "--json").stdout)
    assert github["status"] == "disconnected" and "access_token" not in github["data"]
    assert github["data"]["client_id"] == "cid"


def test_a_dry_run_names_the_grants_an_overwrite_would_replace(
    fresh_db: str, tmp_path: Path
) -> None:
    asyncio.run(_oauth_connection(fresh_db))
    bundle = tmp_path / "b.json"
    assert sh(fresh_db, "export", "--decrypted", "--out", str(bundle)).returncode == 0
    over = sh(
        fresh_db, "import", str(bundle), "--keep-owners", "--overwrite", "--dry-run", "--json"
    )
    plan = json.loads(over.stdout)
    assert [c["ref"] for c in plan["updated"]] == ["github:default"]
    assert plan["oauth_grants"] == ["github:default"]
    # Left as it is, the connection's grant is not written: none to warn about.
    kept = json.loads(
        sh(fresh_db, "import", str(bundle), "--keep-owners", "--dry-run", "--json").stdout
    )
    assert [c["ref"] for c in kept["skipped"]] == ["github:default"]
    assert kept["oauth_grants"] == []


def test_an_import_takes_the_status_a_bundle_states_and_makes_up_no_check(
    fresh_db: str, tmp_path: Path
) -> None:
    def entry(name: str, **data: str) -> dict[str, Any]:
        key = f"{name}-0123456789"
        return {"provider": "openai", "name": name, "owner": None, "data": {"api_key": key, **data}}

    doc = {
        "format": "integrations-export",
        "version": 1,
        "connections": [
            entry("failing", status="error"),
            entry("unchecked", status="connected"),
            entry("unstated"),
        ],
    }
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(doc))
    done = sh(fresh_db, "import", str(path), "--keep-owners")
    assert done.returncode == 0, done.stderr

    def shown(name: str) -> tuple[str, str | None]:
        data = json.loads(sh(fresh_db, "show", f"openai:{name}", "--json").stdout)
        return data["status"], data["data"].get("validation_status")

    # In error where it was exported, though the bundle holds no check message.
    assert shown("failing") == ("error", "Failed")
    # Never checked: it arrives connected and still never checked.
    assert shown("unchecked") == ("connected", None)
    # No status given: the setup alone decides it.
    assert shown("unstated") == ("connected", None)


def test_an_overwrite_states_the_bundles_status_over_a_connection_already_failing(
    fresh_db: str, tmp_path: Path
) -> None:
    async def failing() -> None:
        async with Integrations(fresh_db, keys=TEST_KEY) as integ:
            for name in ("broken", "mended"):
                c = await integ.add_connection("openai", name)
                await integ.save_setup(c.uuid, {"api_key": f"{name}-0123456789"})
                await integ.record_validation(c.uuid, (False, "HTTP 401: invalid api key"))

    asyncio.run(failing())

    def entry(name: str, status: str, check: str) -> dict[str, Any]:
        # No credential in the setup: the connection keeps its key, and its error with it.
        data = {"org": "o", "status": status, "validation_status": check}
        return {"provider": "openai", "name": name, "owner": None, "data": data}

    doc = {
        "format": "integrations-export",
        "version": 1,
        "connections": [
            entry("broken", "error", "HTTP 403: forbidden"),
            entry("mended", "connected", "ok"),
        ],
    }
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(doc))
    done = sh(fresh_db, "import", str(path), "--keep-owners", "--overwrite")
    assert done.returncode == 0, done.stderr

    def shown(name: str) -> tuple[str, str | None]:
        data = json.loads(sh(fresh_db, "show", f"openai:{name}", "--json").stdout)
        return data["status"], data["data"].get("validation_status")

    assert shown("broken") == ("error", "HTTP 403: forbidden")
    assert shown("mended") == ("connected", "ok")


def test_an_export_is_audited_in_its_owners_scope_or_as_every_owners(fresh_db: str) -> None:
    sh(fresh_db, "--owner", "user:1", "add", "openai")
    sh(fresh_db, "add", "slack")
    assert sh(fresh_db, "--owner", "user:1", "export", "--decrypted").returncode == 0
    assert sh(fresh_db, "export", "--all-owners", "--decrypted").returncode == 0
    done = sh(fresh_db, "audit", "--action", "store.exported", "--json")
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["owner"], r["detail"]) for r in records] == [
        ("user:1", {"connections": 1}),
        (None, {"connections": 2, "all_owners": True}),
    ]


# -- messages -------------------------------------------------------------------------------


def test_a_reference_that_finds_nothing_suggests_the_close_ones(fresh_db: str) -> None:
    uuid = sh(fresh_db, "add", "openai", "staging").stdout.strip()
    upper = sh(fresh_db, "show", "OpenAI:staging")
    assert upper.returncode == 2 and "did you mean 'openai:staging'?" in upper.stderr
    case = sh(fresh_db, "show", "openai:Staging")
    assert case.returncode == 1 and "did you mean 'openai:staging'?" in case.stderr
    cut = sh(fresh_db, "show", uuid[:13])
    assert cut.returncode == 1 and f"did you mean '{uuid}'?" in cut.stderr
    nothing = sh(fresh_db, "show", "openai:prod")
    assert nothing.returncode == 1 and "`integrations list` lists them" in nothing.stderr
    for done in (upper, case, cut, nothing):
        assert len(done.stderr.strip().splitlines()) == 1


def test_the_setup_column_leaves_out_what_an_oauth_grant_wrote(fresh_db: str) -> None:
    asyncio.run(_oauth_connection(fresh_db))
    listed = sh(fresh_db, "list").stdout
    assert "client_id=cid" in listed and "client_secret=••••" in listed
    for written_by_the_grant in ("token_type", "expires_at", "granted_scopes", "access_token"):
        assert written_by_the_grant not in listed


def test_a_secret_under_a_key_this_process_lacks_names_the_connection_and_the_fix(
    fresh_db: str,
) -> None:
    uuid = sh(fresh_db, "add", "openai").stdout.strip()
    sh(fresh_db, "set", "openai", "api_key=@-", stdin=MARKER)
    other = cli_env(INTEGRATIONS_KEYS=generate_key())
    done = sh(fresh_db, "export", "--decrypted", env=other)
    assert done.returncode == 1
    assert uuid in done.stderr and "add that key to INTEGRATIONS_KEYS" in done.stderr
    assert "keys=" not in done.stderr


def test_set_without_keys_says_so_before_prompting_for_a_secret(fresh_db: str) -> None:
    sh(fresh_db, "add", "openai")
    env = cli_env()
    del env["INTEGRATIONS_KEYS"]
    child = pexpect.spawn(
        SCRIPT, ["--dsn", fresh_db, "set", "openai", "api_key"], env=env, encoding="utf-8"
    )
    found = child.expect(["api_key: ", pexpect.EOF], timeout=30)
    output = (child.before or "") + (child.after if isinstance(child.after, str) else "")
    if found == 0:
        child.sendline(MARKER)
        child.expect(pexpect.EOF, timeout=30)
    child.close()
    # No secret is asked for when it could not be stored: the keys come first.
    assert found == 1, output
    assert child.exitstatus == 1
    assert "INTEGRATIONS_KEYS" in output and "integrations keys generate" in output


def test_a_provider_file_error_names_the_entry_the_field_and_the_allowed_values(
    tmp_path: Path,
) -> None:
    spec = tmp_path / "providers.json"
    entry = {"key": "acme", "name": "Acme", "auth_type": "api_key", "api_hosts": ["x"]}
    for bad, field, allowed in (
        ({"auth_type": "api_kee"}, "'auth_type'", "api_key, bot_token"),
        ({"auth_header": {"kind": "bearr"}}, "'auth_header.kind'", "basic, header"),
    ):
        spec.write_text(
            json.dumps([{"key": "first", "name": "F", "auth_type": "api_key"}, {**entry, **bad}])
        )
        done = sh("postgresql://unused", "--providers", str(spec), "providers")
        assert done.returncode == 2, done.stderr
        assert f"entry 2 ('acme'), field {field}" in done.stderr
        assert allowed in done.stderr and str(spec) in done.stderr
        assert "Integrations(" not in done.stderr and "Traceback" not in done.stderr


def test_errors_speak_the_command_lines_terms(fresh_db: str) -> None:
    for args, option in (
        (("--actor", "a" * 300, "add", "openai"), "--actor"),
        (("--owner", "o" * 300, "add", "openai"), "--owner"),
    ):
        done = sh(fresh_db, *args)
        assert done.returncode == 2, done.stderr
        assert option in done.stderr
        assert "None" not in done.stderr and "pass " not in done.stderr
