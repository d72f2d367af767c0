"""The ``integrations`` command: connections, checks, tokens, keys, export/import, operations."""

from __future__ import annotations

import contextlib
import difflib
import errno
import importlib
import json
import os
import stat
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .._errors import AlreadyExists, MissingExtra
from .._names import PROVIDER_KEY_RE
from .._scope import ALL_OWNERS
from ._support import (
    FAILED,
    USAGE,
    Env,
    Fail,
    all_owners_option,
    connection_json,
    console,
    emit_json,
    env_of,
    guard,
    interruptible,
    json_option,
    json_text,
    late_options,
    new_table,
    print_table,
    provider_key,
    redact_dsn,
    ref_of,
    resolve,
    run,
    say,
    setup_summary,
    show_warnings,
    stderr,
)
from ._support import ago as _ago

# What a command needs is imported when it runs, so that --help and a command's usage
# errors come at once (the HTTP client, the driver, rich and cryptography take a while).
if TYPE_CHECKING:
    from .._audit import AuditRecord, Breach
    from .._integrations import Integrations
    from .._models import Connection, Event, RotationProgress
    from . import _bundle, _transfer

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.option(
    "--dsn",
    envvar="INTEGRATIONS_DSN",
    help="PostgreSQL DSN (else INTEGRATIONS_DSN, else the embedded database).",
)
@click.option("--owner", help="Address connections of this owner (default: the system scope).")
@click.option(
    "--providers",
    envvar="INTEGRATIONS_PROVIDERS",
    help=(
        "Application providers: a provider file (TOML or JSON) or module:attribute "
        "(else INTEGRATIONS_PROVIDERS)."
    ),
)
@click.option(
    "--actor",
    envvar="INTEGRATIONS_ACTOR",
    help="Who the audit trail names for this command (default: the OS user).",
)
@click.option("--json", "json_", is_flag=True, help="Print JSON instead of tables.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(package_name="integrations", prog_name="integrations")
@click.pass_context
def cli(
    ctx: click.Context,
    dsn: str | None,
    owner: str | None,
    providers: str | None,
    actor: str | None,
    json_: bool,
    debug: bool,
) -> None:
    """Manage stored integration credentials.

    Keys come only from INTEGRATIONS_KEYS (comma-separated, primary first) or, with the
    embedded database, from its key file. Exit codes: 0 ok, 1 a check or operation failed,
    2 usage error.
    """
    env = ctx.ensure_object(Env)
    env.dsn = dsn or None
    env.owner = owner
    env.providers = providers or None
    if actor is not None and not actor.strip():
        raise click.BadParameter(
            "must not be empty (left out: the user running the command)", param_hint="--actor"
        )
    env.actor = actor or _os_user()
    env.json = env.json or json_
    env.debug = debug
    if debug:
        import logging

        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    else:
        show_warnings()


def _os_user() -> str | None:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


# -- catalogue and connections -------------------------------------------------------------


@cli.group(invoke_without_command=True)
@json_option
@click.pass_context
def providers(ctx: click.Context) -> None:
    """The provider catalogue: key, name, auth type, API hosts (and the provider file
    tools: schema, validate, convert)."""
    if ctx.invoked_subcommand is not None:
        return
    env = env_of(ctx)
    from .._integrations import Integrations

    # No database needed: the catalogue is data.
    found = guard(
        lambda: Integrations(
            providers=env.provider_list(), auth_schemes=env.auth_schemes()
        ).list_providers()
    )
    if env.json:
        emit_json(
            [
                {
                    "key": p.key,
                    "name": p.name,
                    "auth_type": p.auth_type,
                    "api_hosts": list(p.api_hosts),
                    "setup_fields": [f.key for f in p.setup_fields],
                    "secret_fields": sorted(p.secret_field_keys),
                }
                for p in found
            ]
        )
        return
    table = new_table("key", "name", "auth type", "API hosts")
    for p in found:
        table.add_row(p.key, p.name, p.auth_type, ", ".join(p.api_hosts))
    print_table(table)


@providers.command("schema")
def providers_schema() -> None:
    """Print the JSON Schema of a provider file (generated from the Provider model)."""
    from .._provider_file import provider_file_schema

    click.echo(json.dumps(provider_file_schema(), indent=2))


@providers.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.pass_context
def providers_validate(ctx: click.Context, files: tuple[str, ...]) -> None:
    """Check provider FILES (TOML or JSON): each entry against the Provider model and the
    catalogue's rules (https only, the check under an API host, strict host fields, scopes
    one per item). Mistakes name the file, the entry and the field; exit 1 if any."""
    from .._errors import ConfigurationError
    from .._provider_file import lint_provider
    from .._registry import load_providers

    failed = False
    for file in files:
        try:
            found = load_providers(file)
        except ConfigurationError as exc:
            stderr(f"error: {exc.message}")
            failed = True
            continue
        for index, provider in enumerate(found):
            for problem in lint_provider(provider):
                where = f"entry {index + 1} ({provider.key!r})"
                stderr(
                    f"error: Provider file {file!r}, {where}, field {problem.field!r}: "
                    f"{problem.message}."
                )
                failed = True
        if not failed:
            click.echo(f"{file}: {len(found)} providers, valid")
    if failed:
        raise SystemExit(FAILED)


@providers.command("convert")
@json_option
@click.option(
    "--from",
    "source",
    type=click.Choice(["nango"]),
    required=True,
    help="The format of FILE: nango (a providers.yaml).",
)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the converted providers (.toml, or .json).",
)
@click.argument("file", type=click.Path(dir_okay=False, exists=True))
@click.pass_context
def providers_convert(ctx: click.Context, source: str, out: str, file: str) -> None:
    """Convert FILE, a provider file of another tool, into this package's format. Every
    entry that could not be converted is reported, with the reason; exit 1 if none was."""
    guard(lambda: _convert_file(ctx, source, out, file))


def _convert_file(ctx: click.Context, source: str, out: str, file: str) -> None:
    from .._convert import convert_nango
    from .._provider_file import to_toml

    try:
        yaml = importlib.import_module("yaml")
    except ImportError:
        raise Fail(
            "reading YAML needs PyYAML: install the yaml extra ('integrations[yaml]')", USAGE
        ) from None
    try:
        doc = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise Fail(f"cannot read {file}: {str(exc).splitlines()[0]}", USAGE) from exc
    result = convert_nango(doc)
    header = f"Converted from {Path(file).name} ({source} format)."
    if out.endswith(".json"):
        text = json.dumps({"providers": result.entries}, indent=2) + "\n"
    else:
        text = to_toml(result.entries, header=header)
    if result.entries:
        try:
            Path(out).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise Fail(f"cannot write {out}: {exc.strerror}") from exc
    for key, why in result.skipped:
        stderr(f"not converted: {key}: {why}")
    if env_of(ctx).json:
        emit_json(
            {
                "converted": result.converted,
                "skipped": [{"key": k, "reason": r} for k, r in result.skipped],
            }
        )
    else:
        click.echo(
            f"{len(result.entries)} converted, {len(result.skipped)} not converted"
            + (f"; written to {out}" if result.entries else "")
        )
    if not result.entries:
        raise SystemExit(FAILED)


@cli.command("list")
@click.argument("provider", required=False)
@all_owners_option
@json_option
@click.pass_context
def list_(ctx: click.Context, provider: str | None) -> None:
    """Connections (of PROVIDER) with status, last check and masked setup."""

    async def work(env: Env) -> None:
        scope = env.scope()
        async with env.integrations(auto_migrate=False) as integ:
            if provider:
                connections = await _provider_connections(integ, provider, scope)
            else:
                connections = await _all_connections(integ, scope)
        if env.json:
            emit_json([connection_json(c) for c in connections])
            return
        if not connections:
            stderr("no connections")
            return
        columns = ["ref", "uuid", "status", "checked", "setup"]
        if env.all_owners:
            columns.insert(1, "owner")
        table = new_table(*columns, wrap="setup")
        for c in connections:
            cells = [
                ref_of(c),
                c.uuid,
                c.status,
                _ago(c.data.get("last_validated_at")),
                setup_summary(c.data),
            ]
            if env.all_owners:
                cells.insert(1, c.owner or "(system)")
            table.add_row(*cells)
        print_table(table)

    run(ctx, work)


@cli.command()
@json_option
@click.pass_context
def owners(ctx: click.Context) -> None:
    """Every owner that has connections, with how many of each status."""

    async def work(env: Env) -> list[dict[str, Any]]:
        async with env.integrations(auto_migrate=False) as integ:
            connections = await _all_connections(integ, ALL_OWNERS)
        counts: dict[str | None, dict[str, int]] = {}
        for c in connections:
            row = counts.setdefault(
                c.owner, {"connections": 0, "connected": 0, "error": 0, "disconnected": 0}
            )
            row["connections"] += 1
            row[c.status] = row.get(c.status, 0) + 1
        # The system scope first, then owners by name.
        order = sorted(counts, key=lambda o: (o is not None, o or ""))
        return [{"owner": o, **counts[o]} for o in order]

    found = run(ctx, work)
    if env_of(ctx).json:
        emit_json(found)
        return
    if not found:
        stderr("no connections")
        return
    table = new_table("owner", "connections", "connected", "error", "disconnected")
    for row in found:
        table.add_row(
            row["owner"] if row["owner"] is not None else "(system)",
            *(str(row[k]) for k in ("connections", "connected", "error", "disconnected")),
        )
    print_table(table)


async def _provider_connections(integ: Integrations, provider: str, owner: Any) -> list[Connection]:
    """A provider's connections; one that is not registered (any more) lists what is
    stored, and is an unknown provider only when nothing is."""
    if owner is ALL_OWNERS:
        if provider in integ.providers or not PROVIDER_KEY_RE.fullmatch(provider):
            provider = provider_key(integ, provider)
        stored = await _all_connections(integ, owner, provider)
    elif provider in integ.providers or not PROVIDER_KEY_RE.fullmatch(provider):
        return await integ.list_connections(provider_key(integ, provider), owner=owner)
    else:
        stored = await integ.list_connections(provider, owner=owner)
    if not stored:
        provider_key(integ, provider)  # raises: unknown provider, with suggestions
    return stored


async def _all_connections(
    integ: Integrations, owner: Any, provider: str | None = None
) -> list[Connection]:
    """Every connection of ``owner``'s scope (of ``provider``), registered provider or
    not: by provider, then "default" first and by name."""
    found: list[Connection] = []
    after = None
    while True:
        page = await integ.list_page(owner=owner, provider=provider, limit=500, after=after)
        found.extend(page.items)
        if page.next_after is None:
            break
        after = page.next_after
    from .._connections import listing_order

    found.sort(key=listing_order)
    return found


@cli.command()
@click.argument("ref")
@all_owners_option
@json_option
@click.pass_context
def show(ctx: click.Context, ref: str) -> None:
    """One connection, masked. REF is a uuid or provider:name (provider = provider:default)."""

    async def work(env: Env) -> None:
        async with env.integrations(auto_migrate=False) as integ:
            connection = await integ.get_integration_by_uuid(await resolve(integ, env, ref))
        if env.json:
            emit_json(connection_json(connection))
            return
        shown = connection_json(connection)
        data = shown.pop("data")
        width = max(len(k) for k in [*shown, *data]) + 4
        for key, value in shown.items():
            say(f"{key + ':':<{width}}{_plain_value(value)}")
        say("data:")
        for key, value in sorted(data.items()):
            say(f"  {key + ':':<{width - 2}}{_plain_value(value)}")

    run(ctx, work)


def _plain_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list | bool):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


@cli.command()
@click.argument("provider")
@click.argument("name", default="default")
@json_option
@click.pass_context
def add(ctx: click.Context, provider: str, name: str) -> None:
    """Create a connection NAME (default: "default") of PROVIDER; prints its uuid."""

    async def work(env: Env) -> None:
        async with env.integrations() as integ:
            key = provider_key(integ, provider)
            try:
                connection = await integ.add_connection(key, name, owner=env.owner, actor=env.who())
            except AlreadyExists as exc:
                raise Fail(f"{exc.message}", FAILED) from None
        if env.json:
            emit_json(connection_json(connection))
        else:
            click.echo(connection.uuid)

    run(ctx, work)


@cli.command()
@click.argument("ref")
@click.argument("new_name")
@json_option
@click.pass_context
def rename(ctx: click.Context, ref: str, new_name: str) -> None:
    """Rename a connection; its uuid stays the same."""

    async def work(env: Env) -> None:
        async with env.integrations() as integ:
            uuid = await resolve(integ, env, ref)
            before = await integ.get_integration_by_uuid(uuid)
            await integ.rename_connection(uuid, new_name, actor=env.who())
            connection = await integ.get_integration_by_uuid(uuid)
        if env.json:
            emit_json(connection_json(connection))
        else:
            say(f"renamed {ref_of(before)} to {ref_of(connection)} ({uuid})")

    run(ctx, work)


def _confirmed(question: str) -> bool:
    try:
        with interruptible():
            return click.confirm(question, default=False, err=True)
    except click.Abort:
        # Standard input ended without an answer (no terminal, nothing piped).
        click.echo(file=sys.stderr)
        raise Fail(
            "not removed: no answer was given (--yes removes without asking)", FAILED
        ) from None


@cli.command()
@click.argument("ref")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
@click.pass_context
def remove(ctx: click.Context, ref: str, yes: bool) -> None:
    """Delete a connection (asks first unless --yes)."""

    async def work(env: Env) -> None:
        async with env.integrations() as integ:
            uuid = await resolve(integ, env, ref)
            connection = await integ.get_integration_by_uuid(uuid)
            if not yes and not _confirmed(f"Remove {ref_of(connection)} ({uuid})?"):
                raise Fail("not removed", FAILED)
            await integ.remove_connection(uuid, actor=env.who())
        if env.json:
            emit_json({"removed": uuid, "provider": connection.provider, "name": connection.name})
        else:
            say(f"removed {ref_of(connection)} ({uuid})")

    run(ctx, work)


@cli.command()
@click.argument("ref")
@json_option
@click.pass_context
def disconnect(ctx: click.Context, ref: str) -> None:
    """Drop the runtime credentials (tokens, keys); OAuth client id/secret are kept."""

    async def work(env: Env) -> None:
        async with env.integrations() as integ:
            uuid = await resolve(integ, env, ref)
            await integ.disconnect(uuid, actor=env.who())
            connection = await integ.get_integration_by_uuid(uuid)
        if env.json:
            emit_json(connection_json(connection))
        else:
            say(f"disconnected {ref_of(connection)} ({uuid})")

    run(ctx, work)


# -- setup ------------------------------------------------------------------------------------


def _is_secret(provider: Any, field: str) -> bool:
    from .._vault import SECRET_FIELDS

    if field in SECRET_FIELDS or field in provider.secret_field_keys:
        return True
    if provider.scheme.freeform:
        # Values under the credentials map are stored as secrets, unless declared otherwise.
        declared = {f.key: f for f in provider.setup_fields}
        return field not in declared or declared[field].secret
    return False


#: The largest value ``FIELD=@PATH`` or ``FIELD=@-`` reads (a setup is at most 64 KiB).
MAX_VALUE_BYTES = 64 * 1024


def _read_limited(source: str, limit: int) -> bytes:
    """At most ``limit`` bytes of standard input (``-``) or of a regular file; OSError
    for anything else (a FIFO, a device such as /dev/zero, a directory), ValueError when
    there is more. The file is opened without blocking, so a FIFO cannot hang."""
    if source == "-":
        stream = getattr(sys.stdin, "buffer", None)
        data = stream.read(limit + 1) if stream is not None else sys.stdin.read(limit + 1).encode()
    else:
        fd = os.open(
            Path(source).expanduser(), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
        )
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            data = handle.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit // 1024} KiB" if limit < 2**20 else "too large")
    return data


def _read_value(field: str, source: str, stdin_used: list[bool], secret: bool) -> str:
    if source == "-":
        if stdin_used:
            raise Fail("only one field can be read from standard input (=@-)", USAGE)
        stdin_used.append(True)
    where = "standard input" if source == "-" else source
    try:
        text = _read_limited(source, MAX_VALUE_BYTES).decode("utf-8")
    except OSError as exc:
        raise Fail(f"{field}: cannot read {where}: {exc.strerror or exc}", USAGE) from None
    except UnicodeDecodeError:
        raise Fail(f"{field}: {where} is not UTF-8 text", USAGE) from None
    except ValueError as exc:
        raise Fail(f"{field}: {where} is {exc}; nothing saved", USAGE) from None
    # Said before saving: a key file read into a field that is not secret is shown as is.
    if secret:
        stderr(f"{field}: read from {where}; secret, stored encrypted and shown masked")
    else:
        stderr(f"{field}: read from {where}; NOT secret, stored and shown as it is")
    # A trailing newline from `echo` or an editor is not part of the secret.
    return text.rstrip("\r\n")


def _check_field(provider: Any, field: str) -> None:
    """A field the provider does not declare is refused (a mistyped secret would be stored
    and shown as a plain value); providers of freeform credentials take any name."""
    declared = [f.key for f in provider.setup_fields]
    if provider.scheme.freeform or not declared or field in declared:
        return
    close = [k for k in declared if k.lower() == field.lower()] or difflib.get_close_matches(
        field, declared, n=2
    )
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise Fail(
        f"{provider.key} has no setup field {field!r} (its fields: {', '.join(declared)}){hint}",
        USAGE,
    )


def parse_assignments(provider: Any, pairs: tuple[str, ...]) -> dict[str, Any]:
    """FIELD=VALUE, FIELD=@PATH, FIELD=@- and bare secret FIELD → the attrs to save."""
    attrs: dict[str, Any] = {}
    stdin_used: list[bool] = []
    for pair in pairs:
        field, has_value, value = pair.partition("=")
        field = field.strip()
        if not field:
            raise Fail(f"expected FIELD=VALUE, got {pair.split('=', 1)[0]!r}=...", USAGE)
        _check_field(provider, field)
        secret = _is_secret(provider, field)
        if not has_value:
            if not secret:
                raise Fail(f"{field} is not secret: give it as {field}=VALUE", USAGE)
            if not sys.stdin.isatty():
                raise Fail(
                    f"no terminal to prompt for {field}: use {field}=@- (standard input) "
                    f"or {field}=@PATH (a file)",
                    USAGE,
                )
            try:
                with interruptible():
                    attrs[field] = click.prompt(f"{field}", hide_input=True, err=True)
            except click.Abort:
                click.echo(file=sys.stderr)
                raise Fail(f"no value was typed for {field}; nothing saved", FAILED) from None
        elif value.startswith("@"):
            attrs[field] = _read_value(field, value[1:], stdin_used, secret)
        elif secret:
            raise Fail(
                f"refusing {field} on the command line: it would stay in the shell history "
                f"and be visible in the process list; give it bare ({field}) to be prompted, "
                f"{field}=@- to read standard input, or {field}=@PATH to read a file",
                USAGE,
            )
        else:
            attrs[field] = value
    return attrs


def _keys_before_secrets(integ: Integrations, provider: Any, pairs: tuple[str, ...]) -> None:
    """Refuse at once, before any prompt or read, a secret that could not be stored: no
    encryption key is configured (typing a secret only to be told so is a waste)."""
    from .._errors import EncryptionNotConfigured

    vault = integ._s.core.vault
    if provider is None or vault.keyring is not None or not vault.enabled:
        return
    if any(_is_secret(provider, pair.partition("=")[0].strip()) for pair in pairs):
        raise EncryptionNotConfigured(
            "No encryption key is configured, so a secret cannot be stored: "
            "pass keys= (a key from integrations.generate_key()) or set INTEGRATIONS_KEYS, "
            'or pass encryption="off" to store secrets in plain text'
        )


@cli.command("set")
@click.argument("ref")
@click.argument("assignments", nargs=-1, required=True, metavar="FIELD=VALUE...")
@json_option
@click.pass_context
def set_(ctx: click.Context, ref: str, assignments: tuple[str, ...]) -> None:
    """Save setup fields. Secrets: bare FIELD (hidden prompt), FIELD=@- or FIELD=@PATH.

    A secret written on the command line is refused: shell history and the process list
    would keep it.
    """

    async def work(env: Env) -> None:
        async with env.integrations() as integ:
            uuid = await resolve(integ, env, ref)
            connection = await integ.get_integration_by_uuid(uuid)
            provider = integ.providers.get(connection.provider)
            _keys_before_secrets(integ, provider, assignments)
            attrs = parse_assignments(provider, assignments)
            await integ.save_setup(uuid, attrs, actor=env.who())
            connection = await integ.get_integration_by_uuid(uuid)
        if env.json:
            emit_json(connection_json(connection))
        else:
            say(
                f"saved {', '.join(sorted(attrs))} on {ref_of(connection)} "
                f"(status {connection.status})"
            )

    run(ctx, work)


# -- checks and tokens -------------------------------------------------------------------------


def _item_json(item: Any) -> dict[str, Any]:
    return {
        "uuid": item.uuid,
        "provider": item.provider,
        "name": item.name,
        "owner": item.owner,
        "ok": item.ok,
        "message": item.message,
        "duration": item.duration,
    }


@cli.command()
@click.argument("ref", required=False)
@click.option("--all", "all_", is_flag=True, help="Check every connection.")
@click.option("--provider", help="With --all: only this provider's connections.")
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1, 64))
@click.option("--record", is_flag=True, help="With --all: record outcomes on the connections.")
@json_option
@click.pass_context
def test(
    ctx: click.Context,
    ref: str | None,
    all_: bool,
    provider: str | None,
    concurrency: int,
    record: bool,
) -> None:
    """Check credentials against the provider: REF (recorded), or --all. Exit 1 if any fail."""
    if bool(ref) == all_:
        raise click.UsageError("give a REF or --all")
    if ref and (provider or record):
        raise click.UsageError("--provider and --record go with --all")

    async def work(env: Env) -> bool:
        async with env.integrations() as integ:
            if ref:
                uuid = await resolve(integ, env, ref)
                connection = await integ.get_integration_by_uuid(uuid)
                import asyncio

                started = asyncio.get_running_loop().time()
                result = await integ.validate_connection(uuid, actor=env.who())
                duration = round(asyncio.get_running_loop().time() - started, 3)
                item: dict[str, Any] = {
                    "uuid": uuid,
                    "provider": connection.provider,
                    "name": connection.name,
                    "owner": connection.owner,
                    "ok": result.ok,
                    "message": result.message,
                    "duration": duration,
                }
                if env.json:
                    emit_json(item)
                else:
                    mark = "ok" if result.ok else "FAILED"
                    say(f"{mark}  {ref_of(connection)}  {result.message}")
                return result.ok
            key = provider_key(integ, provider) if provider else None
            report = await integ.check_all(
                provider=key,
                concurrency=concurrency,
                record=record,
                owner=env.owner if env.owner is not None else ALL_OWNERS,
                actor=env.who(),
            )
        if env.json:
            emit_json(
                {
                    "ok": report.ok,
                    "checked": len(report.items),
                    "failed": len(report.failed),
                    "items": [_item_json(i) for i in report.items],
                }
            )
            return report.ok
        table = new_table("ref", "owner", "outcome", "message", "time", wrap="message")
        for i in report.items:
            table.add_row(
                f"{i.provider}:{i.name}",
                i.owner or "-",
                "ok" if i.ok else "FAILED",
                i.message,
                f"{i.duration:.2f}s",
            )
        print_table(table)
        say(f"{len(report.items)} checked, {len(report.failed)} failed")
        return report.ok

    if not run(ctx, work):
        ctx.exit(FAILED)


@cli.command()
@click.argument("ref")
@click.option("--no-browser", is_flag=True, help="Only print the URL to open.")
@click.option("--port", default=0, type=click.IntRange(0, 65535), help="Loopback port (0: any).")
@click.option("--scope", "scopes", multiple=True, help="A scope to ask for (repeatable).")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=1))
@click.option(
    "--device",
    is_flag=True,
    help="Use the device flow: enter a code on another device (the default without a "
    "browser, for providers that offer it).",
)
@json_option
@click.pass_context
def connect(
    ctx: click.Context,
    ref: str,
    no_browser: bool,
    port: int,
    scopes: tuple[str, ...],
    timeout: float,
    device: bool,
) -> None:
    """Authorize an OAuth connection in a browser (RFC 8252 loopback redirect), or with a
    code typed on another device (RFC 8628 device flow)."""

    async def work(env: Env) -> None:
        async with env.integrations() as integ:
            uuid = await resolve(integ, env, ref)
            found = await integ.get_integration_by_uuid(uuid)
            provider = integ.providers.find(found.provider)
            offers_device = provider is not None and bool(provider.device_authorization_url)
            if device and not offers_device:
                raise Fail(
                    f"{found.provider} does not offer the device flow; connect without --device",
                    USAGE,
                )
            # With --json, standard output carries only the JSON: the URL goes to stderr.
            with contextlib.redirect_stdout(sys.stderr if env.json else sys.stdout):
                if device or (offers_device and not _has_browser()):
                    code = await integ.start_device_authorization(
                        uuid, scopes=list(scopes) or None, actor=env.who()
                    )
                    print(f"Open {code.verification_uri} and enter the code {code.user_code}")
                    if code.verification_uri_complete:
                        print(f"(or open {code.verification_uri_complete})")
                    print(f"Waiting for the approval (the code expires in {code.expires_in} s)...")
                    sys.stdout.flush()
                    import asyncio

                    async with asyncio.timeout(min(timeout, code.expires_in + code.interval)):
                        connection = await integ.complete_device_authorization(
                            uuid, actor=env.who()
                        )
                else:
                    connection = await integ.connect_interactive(
                        uuid,
                        scopes=list(scopes) or None,
                        open_browser=not no_browser,
                        timeout=timeout,
                        port=port,
                        actor=env.who(),
                    )
        if env.json:
            emit_json(connection_json(connection))
        else:
            say(f"connected {ref_of(connection)} ({connection.uuid})")

    run(ctx, work)


@cli.command()
@click.argument("ref")
@json_option
@click.pass_context
def token(ctx: click.Context, ref: str) -> None:
    """Print a valid access token (refreshed first if needed), for scripts."""

    async def work(env: Env) -> tuple[str, str]:
        async with env.integrations(auto_migrate=False) as integ:
            uuid = await resolve(integ, env, ref)
            return uuid, await integ.access_token(uuid)

    uuid, access_token = run(ctx, work)
    if env_of(ctx).json:
        emit_json({"uuid": uuid, "access_token": access_token})
    else:
        click.echo(access_token)


# -- keys ------------------------------------------------------------------------------------


@cli.group()
def events() -> None:
    """The durable event log: apply its retention."""


@events.command("prune")
@click.option(
    "--max-age-days",
    type=click.FloatRange(min=0),
    default=7.0,
    show_default=True,
    help="Delete events logged longer ago than this.",
)
@click.option(
    "--max-count", type=click.IntRange(min=0), default=None, help="Keep at most this many."
)
@json_option
@click.pass_context
def events_prune(ctx: click.Context, max_age_days: float, max_count: int | None) -> None:
    """Delete logged events past their retention (run it now and then, from one place)."""

    async def work(env: Env) -> int:
        async with env.integrations() as integ:
            return await integ.prune_events(
                max_age=timedelta(days=max_age_days), max_count=max_count
            )

    deleted = run(ctx, work)
    if env_of(ctx).json:
        emit_json({"deleted": deleted})
    else:
        click.echo(f"deleted {deleted} logged events")


@cli.group()
def webhooks() -> None:
    """Webhook endpoints: add, list, remove, test; their deliveries, and replays."""


def _endpoint_json(endpoint: Any) -> dict[str, Any]:
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "owner": endpoint.owner,
        "kinds": list(endpoint.kinds) if endpoint.kinds is not None else None,
        "description": endpoint.description,
        "created_at": endpoint.created_at.isoformat(),
    }


def _scope(env: Env) -> Any:
    return env.owner if env.owner is not None else ALL_OWNERS


@webhooks.command("add")
@click.argument("url")
@click.option("--kind", "kinds", multiple=True, help="Only this event kind (repeatable).")
@click.option("--description", default="", help="A note shown in listings.")
@click.option(
    "--allow-loopback", is_flag=True, help="Accept a loopback URL (tests and development)."
)
@json_option
@click.pass_context
def webhooks_add(
    ctx: click.Context, url: str, kinds: tuple[str, ...], description: str, allow_loopback: bool
) -> None:
    """Register URL for events (the --owner's, else every owner's); prints the signing
    secret, this once."""

    async def work(env: Env) -> Any:
        async with env.integrations() as integ:
            return await integ.add_webhook(
                url,
                kinds=kinds or None,
                owner=env.owner,
                description=description,
                allow_loopback=allow_loopback,
            )

    endpoint = run(ctx, work)
    if env_of(ctx).json:
        emit_json(_endpoint_json(endpoint) | {"secret": endpoint.secret})
    else:
        click.echo(f"added {endpoint.id} {endpoint.url}")
        click.echo(f"signing secret (shown once, keep it in the receiver): {endpoint.secret}")


@webhooks.command("list")
@json_option
@click.pass_context
def webhooks_list(ctx: click.Context) -> None:
    """The endpoints (every one, or the --owner's)."""

    async def work(env: Env) -> Any:
        async with env.integrations(auto_migrate=False) as integ:
            return await integ.list_webhooks(owner=_scope(env))

    found = run(ctx, work)
    if env_of(ctx).json:
        emit_json([_endpoint_json(e) for e in found])
        return
    for e in found:
        kinds = ",".join(e.kinds) if e.kinds else "all"
        click.echo(f"{e.id} {e.url} owner={e.owner or '*'} kinds={kinds} {e.description}")


@webhooks.command("remove")
@click.argument("endpoint_id")
@json_option
@click.pass_context
def webhooks_remove(ctx: click.Context, endpoint_id: str) -> None:
    """Remove an endpoint and its deliveries."""

    async def work(env: Env) -> None:
        async with env.integrations() as integ:
            await integ.remove_webhook(endpoint_id, owner=_scope(env))

    run(ctx, work)
    if env_of(ctx).json:
        emit_json({"removed": endpoint_id})
    else:
        click.echo(f"removed {endpoint_id}")


@webhooks.command("test")
@click.argument("endpoint_id")
@click.option("--allow-loopback", is_flag=True, help="Allow a loopback address.")
@json_option
@click.pass_context
def webhooks_test(ctx: click.Context, endpoint_id: str, allow_loopback: bool) -> None:
    """Send one signed webhook_test message now; exit 1 unless it is answered with 2xx."""

    async def work(env: Env) -> Any:
        async with env.integrations() as integ:
            return await integ.test_webhook(
                endpoint_id, owner=_scope(env), allow_loopback=allow_loopback
            )

    attempt = run(ctx, work)
    if env_of(ctx).json:
        emit_json({"ok": attempt.ok, "status": attempt.status, "error": attempt.error})
    else:
        click.echo("ok" if attempt.ok else f"failed: {attempt.error or attempt.status}")
    if not attempt.ok:
        ctx.exit(FAILED)


@webhooks.command("deliveries")
@click.argument("endpoint_id")
@click.option("--state", type=click.Choice(["pending", "delivered", "dead"]), default=None)
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@json_option
@click.pass_context
def webhooks_deliveries(
    ctx: click.Context, endpoint_id: str, state: str | None, limit: int
) -> None:
    """An endpoint's newest deliveries: id, event, state, attempts, next attempt."""

    async def work(env: Env) -> Any:
        async with env.integrations(auto_migrate=False) as integ:
            return await integ.webhook_deliveries(
                endpoint_id, state=state, limit=limit, owner=_scope(env)
            )

    found = run(ctx, work)
    if env_of(ctx).json:
        emit_json(
            [
                {
                    "id": d.id,
                    "position": d.position,
                    "kind": d.kind,
                    "connection": d.connection,
                    "state": d.state,
                    "attempts": d.attempts,
                    "next_attempt_at": d.next_attempt_at.isoformat() if d.next_attempt_at else None,
                    "last_status": d.last_status,
                    "last_error": d.last_error,
                }
                for d in found
            ]
        )
        return
    for d in found:
        nxt = f" next={d.next_attempt_at:%Y-%m-%dT%H:%M:%SZ}" if d.next_attempt_at else ""
        last = f" last={d.last_error or d.last_status}" if d.attempts else ""
        click.echo(
            f"{d.id} position={d.position} {d.kind} {d.state} attempts={d.attempts}{nxt}{last}"
        )


@webhooks.command("replay")
@click.argument("delivery_id")
@json_option
@click.pass_context
def webhooks_replay(ctx: click.Context, delivery_id: str) -> None:
    """Send a delivery again from its first attempt, with the same webhook-id."""

    async def work(env: Env) -> None:
        async with env.integrations() as integ:
            await integ.replay_webhook(delivery_id, owner=_scope(env))

    run(ctx, work)
    if env_of(ctx).json:
        emit_json({"replayed": delivery_id})
    else:
        click.echo(f"replaying {delivery_id}")


@cli.group()
def keys() -> None:
    """Encryption keys: generate one, re-encrypt everything under the primary."""


@keys.command("generate")
@json_option
@click.pass_context
def keys_generate(ctx: click.Context) -> None:
    """Print a new key. Put it first in INTEGRATIONS_KEYS, then run `keys rotate`."""
    from .._vault import generate_key

    key = generate_key()
    if env_of(ctx).json:
        emit_json({"key": key})
    else:
        click.echo(key)


@keys.command("new-data-key")
@json_option
@click.pass_context
def keys_new_data_key(ctx: click.Context) -> None:
    """Make a data key wrapped by the primary aws-kms:/pkcs11: source; print its key id.

    Restart the application's processes so they encrypt with it, then run `keys rotate`.
    """

    async def work(env: Env) -> str:
        async with env.integrations() as integ:
            return await integ.new_data_key()

    kid = run(ctx, work)
    if env_of(ctx).json:
        emit_json({"kid": kid})
    else:
        click.echo(kid)


@keys.command("rotate")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 100_000))
@json_option
@click.pass_context
def keys_rotate(ctx: click.Context, batch_size: int) -> None:
    """Re-encrypt every secret under the primary key. Interrupted? Run it again to resume."""

    async def work(env: Env) -> RotationProgress:
        async with env.integrations() as integ:
            if env.json or not sys.stderr.isatty():
                return await integ.rotate_keys(batch_size=batch_size)
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            with Progress(
                TextColumn("rotating"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("rows"),
                console=console(stderr=True),
            ) as bar:
                task = bar.add_task("rotate", total=None)

                def update(p: RotationProgress) -> None:
                    bar.update(task, total=max(p.total, p.scanned), completed=p.scanned)

                return await integ.rotate_keys(batch_size=batch_size, progress=update)

    result = run(ctx, work)
    undecryptable = tuple(getattr(result, "undecryptable", ()))
    # Rows examined per second: what a pass costs, rewritten or not.
    rate = result.scanned / result.elapsed if result.elapsed > 0 else 0.0
    if env_of(ctx).json:
        emit_json(
            {
                "primary_kid": result.primary_kid,
                "rotated": result.rotated,
                "scanned": result.scanned,
                "total": result.total,
                "batches": result.batches,
                "elapsed": round(result.elapsed, 3),
                "rows_per_second": round(rate, 1),
                "undecryptable": list(undecryptable),
                "rewrapped": result.rewrapped,
            }
        )
    else:
        if result.rewrapped:
            say(f"wrapped {result.rewrapped} data key(s) with the primary key source")
        say(
            f"rotated {result.rotated} of {result.total} row(s) to key {result.primary_kid} "
            f"in {result.elapsed:.2f}s, {rate:,.0f} rows a second"
        )
        if undecryptable:
            stderr(
                f"could not decrypt {len(undecryptable)} row(s) with the configured keys: "
                + ", ".join(undecryptable)
            )
    if undecryptable:
        ctx.exit(FAILED)


# -- export and import -------------------------------------------------------------------------

PASSPHRASE_ENV = "INTEGRATIONS_EXPORT_PASSPHRASE"


def _passphrase(confirm: bool) -> str:
    given = os.environ.get(PASSPHRASE_ENV)
    if given:
        return given
    if not sys.stdin.isatty():
        raise Fail(f"no terminal to ask for the passphrase: set {PASSPHRASE_ENV}", USAGE)
    with interruptible():
        value: str = click.prompt(
            "Passphrase", hide_input=True, confirmation_prompt=confirm, err=True
        )
    if not value:
        raise Fail("the passphrase must not be empty", USAGE)
    return value


@cli.command("export")
@click.option("--out", "out", type=click.Path(dir_okay=False), help="Write here (default: stdout).")
@click.option("--decrypted", is_flag=True, help="Plaintext JSON: every secret readable.")
@all_owners_option
@json_option
@click.pass_context
def export_(ctx: click.Context, out: str | None, decrypted: bool) -> None:
    """Export connections (of --owner's scope, or --all-owners) as a passphrase-encrypted
    bundle."""
    env = env_of(ctx)
    scope = guard(env.scope)
    if out and not Path(out).parent.is_dir():
        # Before any prompt or read: there is nowhere to write the bundle.
        stderr(f"error: no such directory: {Path(out).parent}")
        raise SystemExit(FAILED)
    from . import _bundle, _transfer

    passphrase = None if decrypted else guard(lambda: _passphrase(confirm=True))

    async def work(env: Env) -> dict[str, Any]:
        async with env.integrations(auto_migrate=False) as integ:
            return await _transfer.export_document(integ, scope)

    doc = run(ctx, work)
    count = len(doc["connections"])
    if decrypted:
        stderr("warning: this export holds every secret in plaintext; keep it out of reach")
        bundle = doc
    else:
        assert passphrase is not None
        bundle = _bundle.seal(doc, passphrase)
    text = json.dumps(bundle, indent=2, ensure_ascii=False) + "\n"
    if out:
        path = Path(out)
        guard(lambda: _write_private(path, text))
        summary = {"exported": count, "out": str(path), "encrypted": not decrypted}
        if env.json:
            emit_json(summary)
        else:
            how = "plaintext" if decrypted else "encrypted: scrypt + AES-256-GCM"
            say(f"exported {count} connection(s) to {path} ({how})")
    else:
        click.echo(text, nl=False)
        stderr(f"exported {count} connection(s)")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # An existing file keeps its mode through O_CREAT: narrow it before writing.
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


@cli.command("import")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--overwrite", is_flag=True, help="Update connections that already exist.")
@click.option("--dry-run", is_flag=True, help="Validate and report; write nothing.")
@click.option(
    "--keep-owners",
    is_flag=True,
    help="Write each connection into the owner the file names (else --owner is required).",
)
@click.option(
    "--without-tokens",
    is_flag=True,
    help="Leave OAuth grants behind: those connections arrive disconnected, to authorize again.",
)
@json_option
@click.pass_context
def import_(
    ctx: click.Context,
    file: str,
    overwrite: bool,
    dry_run: bool,
    keep_owners: bool,
    without_tokens: bool,
) -> None:
    """Import a bundle: everything is validated first, then written all or nothing.

    Give --owner OWNER to write every connection into that owner, or --keep-owners to
    write each into the owner the file names (a file decides nothing by itself). Each
    connection keeps the status and check message it was exported with.
    """
    from . import _bundle, _transfer

    env = env_of(ctx)

    def read() -> list[_bundle.Entry]:
        if env.owner is not None and keep_owners:
            raise Fail("give --owner or --keep-owners, not both", USAGE)
        if env.owner is None and not keep_owners:
            raise Fail(
                "say where the connections go: --owner OWNER writes them all into that "
                "owner, --keep-owners into the owners the file names",
                USAGE,
            )
        try:
            text = _read_limited(file, _bundle.MAX_BUNDLE_BYTES).decode("utf-8")
        except OSError as exc:
            raise Fail(f"cannot read {file}: {exc.strerror or exc}", USAGE) from None
        except UnicodeDecodeError:
            raise Fail(f"{file} is not UTF-8 text (an export bundle is JSON)", USAGE) from None
        except ValueError as exc:
            raise Fail(f"{file} is {exc} for an export bundle", USAGE) from None
        try:
            raw = _bundle.load_document(text)
            if _bundle.is_sealed(raw):
                raw = _bundle.unseal(raw, _passphrase(confirm=False))
            return _bundle.entries(raw)
        except _bundle.BundleError as exc:
            raise Fail(str(exc), FAILED) from None

    entries = guard(read)

    async def work(env: Env) -> _transfer.ImportReport:
        async with env.integrations() as integ:
            return await _transfer.import_entries(
                integ,
                entries,
                owner=env.owner,
                overwrite=overwrite,
                dry_run=dry_run,
                actor=env.who(),
                without_tokens=without_tokens,
            )

    report = run(ctx, work)
    if report.grants:
        # One grant in two stores: each renews with the same refresh token, and a provider
        # that rotates refresh tokens then revokes the other store's (or the whole grant).
        stderr(
            f"warning: {'this import would make' if dry_run else 'this import made'} "
            f"{len(report.grants)} OAuth grant(s) live in two stores ({', '.join(report.grants)}): "
            "disconnect them where they came from, or import with --without-tokens and "
            "authorize again here"
        )
    if env.json:
        emit_json(report.as_json(dry_run))
    else:
        for action, ref, uuid in report.rows:
            say(f"{action:<8} {ref}  {uuid or ''}".rstrip())
        prefix = "would import" if dry_run else "imported"
        say(
            f"{prefix}: {len(report.created)} created, {len(report.updated)} updated, "
            f"{len(report.skipped)} skipped"
        )


# -- audit trail ------------------------------------------------------------------------------


_AGES = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _age(value: str) -> timedelta | None:
    """An age such as 30m, 12h, 7d; None when ``value`` is not one."""
    if value[:-1].isdigit() and value[-1:] in _AGES and int(value[:-1]) > 0:
        return timedelta(seconds=int(value[:-1]) * _AGES[value[-1]])
    return None


def _since(value: str | None) -> datetime | None:
    """An ISO time, or an age such as 30m, 12h, 7d."""
    if value is None:
        return None
    age = _age(value)
    if age is not None:
        return datetime.now(UTC) - age
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise Fail(
            f"--since takes an ISO time (2024-05-01T12:00:00+00:00) or an age (30m, 12h, 7d), "
            f"not {value[:40]!r}",
            USAGE,
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _audit_line(record: AuditRecord) -> str:
    parts = [
        f"{record.seq:>6}",
        record.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        f"{record.action:<22}",
        record.outcome,
        f"actor={record.actor or '-'}",
    ]
    if record.owner:
        parts.append(f"owner={record.owner}")
    if record.provider:
        parts.append(f"provider={record.provider}")
    if record.uuid:
        parts.append(record.uuid)
    if record.detail:
        parts.append(json.dumps(dict(record.detail), separators=(",", ":"), default=str))
    return "  ".join(parts)


@cli.group("audit", invoke_without_command=True)
@click.option("--ref", help="Only this connection (uuid or provider:name).")
@click.option("--action", help="An action (credentials.revealed) or a family (credentials).")
@click.option("--by", "by", help="Only records of this actor.")
@click.option("--since", help="From this ISO time, or this age back (30m, 12h, 7d).")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--follow", "-f", is_flag=True, help="Keep printing new records until Ctrl-C.")
@json_option
@click.pass_context
def audit(
    ctx: click.Context,
    ref: str | None,
    action: str | None,
    by: str | None,
    since: str | None,
    limit: int,
    follow: bool,
) -> None:
    """The audit trail, oldest of the page first (--owner limits it to that owner)."""
    if ctx.invoked_subcommand is not None:
        return
    env = env_of(ctx)
    start = guard(lambda: _since(since))
    owner = env.owner if env.owner is not None else ALL_OWNERS

    def show(records: list[AuditRecord]) -> None:
        for record in records:
            if env.json:
                click.echo(json.dumps(record.to_json(), separators=(",", ":")))
            else:
                click.echo(_audit_line(record))
        sys.stdout.flush()

    async def work(env: Env) -> None:
        async with env.integrations(auto_migrate=False) as integ:
            uuid = None if ref is None else await resolve(integ, env, ref)
            page = await integ.audit(
                uuid=uuid, owner=owner, actor=by, action=action, since=start, limit=limit
            )
            show(list(reversed(page.records)))
            last = page.records[0].seq if page.records else 0
            import asyncio

            while follow:
                await asyncio.sleep(1.0)
                fresh = await integ.audit(
                    uuid=uuid, owner=owner, actor=by, action=action, since=start, limit=1000
                )
                new = [r for r in reversed(fresh.records) if r.seq > last]
                show(new)
                if new:
                    last = new[-1].seq

    run(ctx, work)


@audit.command("verify")
@json_option
@click.pass_context
def audit_verify(ctx: click.Context) -> None:
    """Walk the hash chain; name each changed, removed or reordered record (exit 1)."""

    async def work(env: Env) -> tuple[list[Breach], int]:
        async with env.integrations(auto_migrate=False) as integ:
            breaches = await integ.verify_audit()
            newest = await integ.audit(limit=1)
            return breaches, newest.records[0].seq if newest.records else 0

    breaches, head = run(ctx, work)
    if env_of(ctx).json:
        emit_json(
            {
                "ok": not breaches,
                "head": head,
                "breaches": [
                    {"seq": b.seq, "kind": b.kind, "message": b.message} for b in breaches
                ],
            }
        )
    elif breaches:
        for breach in breaches:
            stderr(f"{breach.kind}: {breach.message}")
    else:
        click.echo(f"ok: the chain holds through record {head}")
    if breaches:
        ctx.exit(FAILED)


@audit.command("sweep")
@click.option(
    "--older-than", "older_than", required=True, help="Delete records older than this age (90d)."
)
@json_option
@click.pass_context
def audit_sweep(ctx: click.Context, older_than: str) -> None:
    """Retention: delete old records, recording the sweep (and its anchor) in the chain."""
    age = _age(older_than)
    if age is None:
        stderr(f"error: --older-than takes an age such as 90d, 12h or 30m, not {older_than[:40]!r}")
        raise SystemExit(USAGE)

    async def work(env: Env) -> int:
        async with env.integrations(auto_migrate=False) as integ:
            return await integ.sweep_audit(older_than=age)

    gone = run(ctx, work)
    if env_of(ctx).json:
        emit_json({"deleted": gone})
    else:
        click.echo(f"deleted {gone} record(s) older than {older_than}")


# -- operations -------------------------------------------------------------------------------


@cli.command()
@json_option
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Apply pending schema migrations (idempotent, under an advisory lock)."""

    async def work(env: Env) -> list[int]:
        return await env.integrations(auto_migrate=False).migrate()

    applied = run(ctx, work)
    if env_of(ctx).json:
        emit_json({"applied": applied})
    elif applied:
        say("applied migrations: " + ", ".join(str(v) for v in applied))
    else:
        say("schema up to date")


def _event_line(event: Event) -> str:
    ref = f"{event.provider}:{event.name}" if event.provider else "-"
    status = event.status or "-"
    if event.previous_status and event.previous_status != event.status:
        status = f"{event.previous_status}->{status}"
    parts = [
        event.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        event.kind,
        ref,
        event.uuid or "-",
        f"owner={event.owner or '-'}",
        f"status={status}",
    ]
    if event.actor:
        parts.append(f"actor={event.actor}")
    if event.position is not None:
        parts.append(f"position={event.position}")
    elif event.kind == "resync" and event.detail.get("reason") == "expired":
        parts.append(f"expired: events before position {event.detail.get('oldest')} are gone")
    return " ".join(parts)


def event_json(event: Event) -> dict[str, Any]:
    return {
        "kind": event.kind,
        "uuid": event.uuid,
        "provider": event.provider,
        "name": event.name,
        "owner": event.owner,
        "status": event.status,
        "previous_status": event.previous_status,
        "actor": event.actor,
        "at": event.at.isoformat(),
        "detail": dict(event.detail),
        "position": event.position,
    }


@cli.command()
@click.option("--provider", help="Only this provider's events.")
@click.option(
    "--after",
    type=click.IntRange(min=0),
    default=None,
    help="First print the logged events after this position (0: every one kept), then go on.",
)
@all_owners_option
@json_option
@click.pass_context
def watch(ctx: click.Context, provider: str | None, after: int | None) -> None:
    """Print live events from every process, one line each, until Ctrl-C (every owner's,
    as with --all-owners, unless --owner)."""

    async def work(env: Env) -> None:
        scope = env.scope()
        async with env.integrations(auto_migrate=False) as integ:
            key = provider_key(integ, provider) if provider else None
            owner: Any = scope if scope is not None else ALL_OWNERS
            async with integ.subscribe(provider=key, owner=owner, after=after) as events:
                stderr("watching events (Ctrl-C to stop)")
                async for event in events:
                    line = (
                        json_text(event_json(event), indent=None)
                        if env.json
                        else _event_line(event)
                    )
                    say(line)
                    sys.stdout.flush()

    try:
        run(ctx, work)
    except SystemExit as exc:
        if exc.code == 130:
            ctx.exit(0)
        raise


@cli.command()
@json_option
@click.pass_context
def doctor(ctx: click.Context) -> None:
    """Check the deployment: database, schema, keys, undecryptable rows, listener."""

    async def work(env: Env) -> list[dict[str, Any]]:
        from .._errors import SchemaOutdated, StorageError

        where = redact_dsn(env.dsn) if env.dsn else "the embedded database"
        lines: list[dict[str, Any]] = []
        integ = env.integrations(auto_migrate=False)
        try:
            await integ.open()
        except StorageError as exc:
            reason = str(exc.__cause__ or exc.message).strip().splitlines()[0]
            lines.append(_line("database", False, f"{where}: {reason}", "check the DSN"))
            return lines
        except SchemaOutdated:
            lines.append(_line("database", True, f"{where} reachable"))
            lines.append(_line("schema", False, "behind the library", "run: integrations migrate"))
            return lines
        try:
            lines.append(_line("database", True, f"{where} reachable"))
            diagnosis = await integ.diagnose()
            lines.extend(_line(f.check, f.ok, f.detail, f.hint) for f in diagnosis.findings)
        finally:
            await integ.close()
        return lines

    lines = run(ctx, work)
    healthy = all(line["ok"] for line in lines)
    if env_of(ctx).json:
        emit_json({"ok": healthy, "checks": lines})
    else:
        for line in lines:
            mark = "ok  " if line["ok"] else "FAIL"
            text = f"{mark} {line['check']:<9} {line['detail']}"
            if line["hint"]:
                text += f"  -> {line['hint']}"
            say(text)
    if not healthy:
        ctx.exit(FAILED)


def _line(check: str, ok: bool, detail: str, hint: str = "") -> dict[str, Any]:
    return {"check": check, "ok": ok, "detail": detail, "hint": hint}


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port",
    default=8765,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="0 picks a free port.",
)
@click.option(
    "--login-ttl",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0, 604800, min_open=True),
    help="Seconds the login link works (once).",
)
@click.option(
    "--session-idle",
    default=1800.0,
    show_default=True,
    type=click.FloatRange(0, 604800, min_open=True),
    help="Seconds without a request after which a session ends.",
)
@click.option(
    "--session-lifetime",
    default=43200.0,
    show_default=True,
    type=click.FloatRange(0, 604800, min_open=True),
    help="Seconds after the login at which a session ends.",
)
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    login_ttl: float,
    session_idle: float,
    session_lifetime: float,
) -> None:
    """Run the web console; prints a one-time login link (the administrator's, or with
    --owner that owner's: the console then shows and changes only its connections)."""
    try:
        import importlib

        web = importlib.import_module("integrations.web")
    except MissingExtra as exc:
        stderr(f"error: {exc.message}")
        raise SystemExit(FAILED) from None
    except ModuleNotFoundError as exc:
        if exc.name not in ("integrations.web",):
            raise
        stderr("error: the web console is not part of this installation (integrations.web)")
        raise SystemExit(FAILED) from None

    async def work(env: Env) -> None:
        async with env.integrations() as integ:
            # With --owner the console works through that owner's handle only.
            await web.serve(
                integ,
                host=host,
                port=port,
                owner=env.owner,
                login_ttl=login_ttl,
                session_idle=session_idle,
                session_lifetime=session_lifetime,
            )

    try:
        run(ctx, work)
    except SystemExit as exc:
        if exc.code == 130:
            ctx.exit(0)
        raise


def _accept_late_options(group: click.Group) -> None:
    """``--owner``, ``--dsn`` and ``--debug`` after the command name too."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _accept_late_options(command)
        else:
            command.params.extend(late_options())


_accept_late_options(cli)

# Kept importable for tests that check the catalogue of error classes.
__all__ = ["cli", "parse_assignments"]


def _has_browser() -> bool:
    """Whether a browser could open here: a desktop session, or a platform that has one."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
