"""Migrations, configuration, packaging, the public surface and legacy migrators."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import asyncpg
import pytest

import integrations
from integrations import Integrations, SchemaOutdated

from .conftest import TEST_KEY

ROOT = Path(__file__).resolve().parent.parent
# Every migration file, by number: what a migrated schema has applied.
MIGRATIONS = sorted(int(p.name[:4]) for p in (ROOT / "sql" / "migrations").glob("[0-9]*.sql"))
PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]


async def test_migrate_is_idempotent(empty_db: str) -> None:
    async with Integrations(empty_db, keys=TEST_KEY) as integ:
        assert await integ.migrate() == []
    conn = await asyncpg.connect(empty_db)
    try:
        versions = await conn.fetch("SELECT version FROM integrations.schema_migrations")
    finally:
        await conn.close()
    assert [r["version"] for r in versions] == MIGRATIONS == list(range(1, len(MIGRATIONS) + 1))


async def test_open_refuses_a_schema_behind_without_auto_migrate(empty_db: str) -> None:
    with pytest.raises(SchemaOutdated) as info:
        async with Integrations(empty_db, keys=TEST_KEY, auto_migrate=False):
            pass
    assert "migrate()" in str(info.value)
    assert info.value.code == "schema_outdated"


async def test_a_custom_schema_name_is_used(empty_db: str) -> None:
    async with Integrations(empty_db, keys=TEST_KEY, schema="creds") as integ:
        await integ.add_connection("openai", "default")
    conn = await asyncpg.connect(empty_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM creds.connections") == 1
    finally:
        await conn.close()


def test_a_bad_schema_name_is_refused_at_configuration() -> None:
    with pytest.raises(integrations.InvalidInput) as info:
        Integrations("postgresql://unused", schema="x; DROP TABLE y")
    assert info.value.code == "invalid", info.value


@pytest.mark.parametrize("schema", ["information_schema", "pg_catalog", "pg_toast", "pg_x"])
def test_a_system_schema_is_refused_at_configuration(schema: str) -> None:
    with pytest.raises(integrations.ConfigurationError) as info:
        Integrations("postgresql://unused", schema=schema)
    assert info.value.code == "configuration"
    assert repr(schema) in info.value.message
    assert "system schema" in info.value.message


@pytest.mark.parametrize("schema", ["integrations", "pgx", "my_pg_schema", "information"])
def test_ordinary_schema_names_are_accepted(schema: str) -> None:
    inst = Integrations("postgresql://unused", schema=schema)
    assert repr(inst) == f"<Integrations schema={schema!r} state=new>"


def test_concurrent_migrations_from_several_processes(empty_db: str) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        sys.path.insert(0, {str(ROOT)!r})
        from integrations import Integrations

        async def main():
            async with Integrations(sys.argv[1], keys=sys.argv[2]) as integ:
                await integ.migrate()

        asyncio.run(main())
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, empty_db, TEST_KEY]) for _ in range(4)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0, 0]

    async def applied() -> list[int]:
        conn = await asyncpg.connect(empty_db)
        try:
            rows = await conn.fetch("SELECT version FROM integrations.schema_migrations")
        finally:
            await conn.close()
        return [r["version"] for r in rows]

    import asyncio

    assert asyncio.run(applied()) == MIGRATIONS


def test_the_wheel_carries_the_sql_files(tmp_path: Path) -> None:
    subprocess.run(
        [*PIP_WHEEL, "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("integrations-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "integrations/sql/queries.sql" in names
    for migration in sorted((ROOT / "sql" / "migrations").glob("*.sql")):
        assert f"integrations/sql/migrations/{migration.name}" in names
    assert "integrations/py.typed" in names


def test_public_names_are_pinned_and_sorted() -> None:
    assert integrations.__all__ == sorted(integrations.__all__)
    for name in integrations.__all__:
        assert hasattr(integrations, name), name
    expected = {
        "Connection",
        "Event",
        "Integrations",
        "IntegrationsError",
        "Provider",
        "Validation",
        "generate_key",
        "settings_key",
    }
    assert expected <= set(integrations.__all__)


def test_every_error_has_a_distinct_code() -> None:
    errors = [
        getattr(integrations, name)
        for name in integrations.__all__
        if isinstance(getattr(integrations, name), type)
        and issubclass(getattr(integrations, name), integrations.IntegrationsError)
    ]
    # InvalidArgument is InvalidInput that is also a TypeError: it shares its code.
    codes = [e.code for e in errors if e is not integrations.InvalidArgument]
    assert len(codes) == len(set(codes))
    assert integrations.InvalidArgument.code == integrations.InvalidInput.code
    assert {"empty_name", "invalid_name", "already_exists", "not_configured", "deleted"} <= set(
        codes
    )
    assert {"invalid_uuid", "invalid", "not_found", "invalid_provider_key"} <= set(codes)


async def test_run_legacy_migrations_is_deprecated_and_best_effort(integ: Integrations) -> None:
    seen: list[str] = []

    async def broken(_: Integrations) -> None:
        raise RuntimeError("boom")

    async def move_old_key(instance: Integrations) -> None:
        seen.append("ran")
        await instance.legacy_upsert("openai", "legacy", {"api_key": "sk-legacy-0123456789"})

    integ.register_legacy_migrator("broken", broken)
    integ.register_legacy_migrator("openai", move_old_key)
    with pytest.raises(integrations.InvalidInput) as info:
        integ.register_legacy_migrator("openai", move_old_key)
    assert info.value.code == "invalid", info.value
    with pytest.warns(DeprecationWarning):
        await integ.run_legacy_migrations()
    assert seen == ["ran"]
    assert (await integ.get_credentials("openai:legacy"))["api_key"] == "sk-legacy-0123456789"
    assert await integ.run_all_legacy_migrations() == {"broken": False, "openai": True}


async def test_the_embedded_default_works_without_a_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("INTEGRATIONS_DSN", raising=False)
    monkeypatch.delenv("INTEGRATIONS_KEYS", raising=False)
    async with Integrations(data_dir=tmp_path) as integ:
        assert integ.embedded_dsn is not None
        conn = await integ.add_connection("openai", "default")
        await integ.save_setup(conn.uuid, {"api_key": "sk-embedded-0123456789"})
        assert (await integ.get_credentials(conn.uuid))["api_key"] == "sk-embedded-0123456789"
    key_file = tmp_path / "keys"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    # A second instance on the same data dir reads the same key and the same data.
    async with Integrations(data_dir=tmp_path) as again:
        assert (await again.get_credentials("openai"))["api_key"] == "sk-embedded-0123456789"


def test_a_pool_too_small_for_the_listener_is_refused() -> None:
    with pytest.raises(integrations.ConfigurationError) as info:
        Integrations("postgresql://unused", pool_max_size=1)
    assert info.value.code == "configuration", info.value


@pytest.mark.slow
def test_a_built_wheel_installed_in_a_fresh_venv_migrates(tmp_path: Path, empty_db: str) -> None:
    # The wheel, not the checkout: built, installed alone in a new venv, run from elsewhere.
    subprocess.run([*PIP_WHEEL, "-w", str(tmp_path), str(ROOT)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("integrations-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # The dependencies come from this environment's site-packages, added as a plain path:
    # its .pth files (this checkout's editable install among them) are not run.
    deps = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
    (site / "deps.pth").write_text(deps + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), wheel],
        check=True,
        timeout=300,
    )
    python = venv / "bin" / "python"
    where = subprocess.run(
        [python, "-c", "import integrations, sys; print(integrations.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(site), where
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTEGRATIONS_")}
    done = subprocess.run(
        [python, "-m", "integrations", "--dsn", empty_db, "migrate"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr

    async def applied() -> list[int]:
        conn = await asyncpg.connect(empty_db)
        try:
            rows = await conn.fetch("SELECT version FROM integrations.schema_migrations")
        finally:
            await conn.close()
        return sorted(r["version"] for r in rows)

    import asyncio

    assert asyncio.run(applied()) == MIGRATIONS
