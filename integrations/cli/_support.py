"""What the commands share: options, opening the library, errors, refs and output shapes."""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import json
import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from .._errors import (
    ConfigurationError,
    Deleted,
    IntegrationsError,
    InvalidInput,
    InvalidProviderKey,
    NotConfigured,
    NotFound,
    SchemaOutdated,
    StorageError,
)
from .._names import PROVIDER_KEY_RE, normalize_name, parse_uuid
from .._scope import ACTOR, ALL_OWNERS

# Imported where used, so that --help loads none of them (see _app.py).
if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from .._integrations import Integrations
    from .._models import Connection
    from .._providers import Provider
    from .._schemes import AuthScheme

T = TypeVar("T")

# Exit codes (documented in docs/cli.md).
OK = 0
FAILED = 1
USAGE = 2


class Fail(Exception):
    """A one-line error for stderr and the exit code to leave with."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class Env:
    """The global options, shared by every command through click's context."""

    dsn: str | None = None
    owner: str | None = None
    json: bool = False
    debug: bool = False
    providers: str | None = None
    #: Who the audit trail names for what this command does (``--actor``).
    actor: str | None = None
    all_owners: bool = False
    _loaded: list[Provider] | None = field(default=None, repr=False)
    _schemes: list[AuthScheme] = field(default_factory=list, repr=False)

    def provider_list(self) -> list[Provider]:
        if self._loaded is None:
            self._loaded = load_providers(self.providers) if self.providers else []
            if self.providers:
                self._schemes = load_auth_schemes(self.providers)
        return self._loaded

    def auth_schemes(self) -> list[AuthScheme]:
        """The auth schemes the ``--providers`` module declares (``auth_schemes``)."""
        self.provider_list()
        return self._schemes

    def who(self) -> str:
        """The actor every change this command makes is recorded with: ``--actor``, else
        the user the command runs as."""
        return self.actor if self.actor is not None else os_user()

    def scope(self) -> Any:
        """The owner scope a reading command looks at: ``--all-owners`` every owner's,
        else ``--owner``'s (the system scope when left out)."""
        if self.all_owners:
            if self.owner is not None:
                raise Fail("give --owner or --all-owners, not both", USAGE)
            return ALL_OWNERS
        return self.owner

    def integrations(self, *, auto_migrate: bool = True) -> Integrations:
        """The library on the command's database; ``auto_migrate=False`` for a command
        that only reads (it says the schema is behind rather than changing it)."""
        from .._integrations import Integrations

        return Integrations(
            self.dsn,
            providers=self.provider_list(),
            auth_schemes=self.auth_schemes(),
            auto_migrate=auto_migrate,
        )


def os_user() -> str:
    """The name of the user this process runs as (``uid N`` when it has none)."""
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown user"


def load_providers(spec: str) -> list[Provider]:
    """Application providers from a provider file (TOML or JSON) or ``module:attr``."""
    from .._providers import Provider
    from .._registry import load_providers as load_provider_file

    path = Path(spec)
    if spec.endswith((".json", ".toml")) or path.is_file():
        try:
            found = load_provider_file(path)
        except ConfigurationError as exc:
            raise Fail(exc.message, USAGE) from exc
        _check_registrable(spec, found)
        return found
    try:
        module_name, _, attr = spec.partition(":")
        value = getattr(importlib.import_module(module_name), attr or "providers")
        found = list(value) if not isinstance(value, Provider) else [value]
    except (OSError, ValueError, ImportError, AttributeError, TypeError) as exc:
        raise Fail(f"cannot load providers from {spec}: {_first_line(exc)}", USAGE) from exc
    if not all(isinstance(p, Provider) for p in found):
        raise Fail(f"{spec} must be a list of integrations.Provider", USAGE)
    return found


# What registering a provider refuses, the field it is about, and the advice for a terminal.
_REGISTRY_FIELDS = (
    (
        "auth type",
        "auth_type",
        "register it with Integrations(auth_schemes=[...]) or "
        "integrations.register_auth_scheme() first.",
        "an application's own is declared in the auth_schemes of a --providers module.",
    ),
    (
        "auth header kind",
        "auth_header.kind",
        "register it with integrations.register_auth_kind() first.",
        "an application's own is registered by its --providers module.",
    ),
    ("check hook", "validation.hook", "", ""),
)


def _check_registrable(spec: str, found: list[Provider]) -> None:
    """What registering the file's providers would refuse (an auth type, header kind or
    check hook nobody registered), said as a provider file's other errors are: the file,
    the entry, the field and the allowed values; a usage error."""
    from .._registry import ProviderRegistry

    for index, provider in enumerate(found):
        try:
            ProviderRegistry([provider], override=True)
        except ConfigurationError as exc:
            message = exc.message
            field = "(entry)"
            for words, name, python, terminal in _REGISTRY_FIELDS:
                if words in message:
                    field = name
                    if python:
                        message = message.replace(python, terminal)
                    break
            raise Fail(
                f"provider file {spec!r}, entry {index + 1} ({provider.key!r}), field "
                f"{field!r}: {message}",
                USAGE,
            ) from exc


def load_auth_schemes(spec: str) -> list[AuthScheme]:
    """The ``auth_schemes`` a ``module:attr`` provider spec's module declares, if any: an
    application's own schemes, registered for this command only."""
    path = Path(spec)
    if spec.endswith((".json", ".toml")) or path.is_file():
        return []
    from .._schemes import AuthScheme

    module_name, _, _attr = spec.partition(":")
    try:
        found = list(getattr(importlib.import_module(module_name), "auth_schemes", ()))
    except (ImportError, TypeError) as exc:
        raise Fail(f"cannot load auth schemes from {spec}: {_first_line(exc)}", USAGE) from exc
    if not all(isinstance(s, AuthScheme) for s in found):
        raise Fail(f"{module_name}.auth_schemes must be a list of integrations.AuthScheme", USAGE)
    return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def redact_dsn(dsn: str) -> str:
    """The DSN without its password (in the URL, its query or a keyword), for messages."""
    from .._repository import mask_dsn

    return mask_dsn(dsn)


def env_of(ctx: click.Context) -> Env:
    return ctx.ensure_object(Env)


def set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        env_of(ctx).json = True


def set_all_owners(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        env_of(ctx).all_owners = True


all_owners_option = click.option(
    "--all-owners",
    is_flag=True,
    expose_value=False,
    callback=set_all_owners,
    help="Every owner's connections, not one scope's (not with --owner).",
)


json_option = click.option(
    "--json",
    "json_flag",
    is_flag=True,
    expose_value=False,
    callback=set_json,
    help="Print JSON (documented shapes; secrets masked).",
)


def _late_owner(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        env_of(ctx).owner = value


def set_actor(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    if not value.strip():
        raise click.BadParameter("must not be empty (left out: the user running the command)")
    env_of(ctx).actor = value


def _late_dsn(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value:
        env_of(ctx).dsn = value


def _late_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not env_of(ctx).debug:
        env_of(ctx).debug = True
        import logging

        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)


def late_options() -> list[click.Option]:
    """The global options that address connections, also accepted after a command name
    (``integrations show REF --owner user:42``)."""
    return [
        click.Option(
            ["--owner"],
            expose_value=False,
            callback=_late_owner,
            help="Address connections of this owner (as before the command).",
        ),
        click.Option(
            ["--dsn"], expose_value=False, callback=_late_dsn, help="PostgreSQL DSN (as before)."
        ),
        click.Option(
            ["--actor"],
            expose_value=False,
            callback=set_actor,
            help="Who makes the change, recorded on its events (as before).",
        ),
        click.Option(
            ["--debug"],
            is_flag=True,
            expose_value=False,
            callback=_late_debug,
            help="Show tracebacks and debug logs.",
        ),
    ]


# Control characters (C0, DEL, C1) and bidirectional overrides: printed as they are, a
# stored value could drive the operator's terminal (set its title, clear the screen) or
# disguise what a line says. They are shown escaped instead.
_UNSAFE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# What JSON leaves raw among them (DEL, C1, bidi): escaped as \uXXXX, still the same JSON.
_JSON_RAW_RE = re.compile("[\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str, *, keep: str = "") -> str:
    """``text`` with every control character written as an escape (``\\x1b``), but ``keep``."""
    return _UNSAFE_RE.sub(lambda m: m.group() if m.group() in keep else _escape(m.group()), text)


def say(text: str) -> None:
    """One line of plain output on stdout, control characters escaped."""
    click.echo(visible(text))


def stderr(message: str) -> None:
    click.echo(visible(message, keep="\n"), err=True)


def json_text(value: Any, *, indent: int | None = 2) -> str:
    """``value`` as JSON that no terminal acts on: the same document, with DEL, C1 and
    bidirectional controls written as ``\\u`` escapes (JSON escapes the rest itself)."""
    text = json.dumps(value, indent=indent, default=str, ensure_ascii=False)
    return _JSON_RAW_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def emit_json(value: Any) -> None:
    click.echo(json_text(value))


@functools.cache
def _plain_table() -> type[Table]:
    """A table whose cells are plain text: control characters escaped, no rich markup
    (made on first use: rich is imported only by the commands that print tables)."""
    from rich.table import Table
    from rich.text import Text

    class PlainTable(Table):
        def add_row(self, *renderables: Any, **options: Any) -> None:
            cells = [Text(visible(c)) if isinstance(c, str) else c for c in renderables]
            super().add_row(*cells, **options)

    return PlainTable


def console(*, stderr: bool = False) -> Console:
    # Wide enough off a terminal that uuids are never cut.
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(width=None if stream.isatty() else 200, highlight=False, stderr=stderr)


def new_table(*columns: str, wrap: str = "") -> Table:
    from rich import box

    table = _plain_table()(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in columns:
        if column == wrap:
            # On a narrow terminal the wrapped column folds: nothing in it is cut off.
            table.add_column(column, overflow="fold")
        else:
            table.add_column(column, no_wrap=True)
    return table


def print_table(table: Table) -> None:
    """The table on stdout, without the padding rich leaves at the end of each line."""
    out = console()
    with out.capture() as captured:
        out.print(table)
    for line in captured.get().splitlines():
        click.echo(line.rstrip())


def _error_code(exc: IntegrationsError) -> int:
    return USAGE if isinstance(exc, InvalidInput) else FAILED


class Interrupted(BaseException):
    """Ctrl-C at a prompt (click turns a KeyboardInterrupt there into an Abort)."""


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Around a blocking prompt inside the event loop: Ctrl-C ends the command at once
    (asyncio's own handler would only cancel the task, which a blocked read never sees)."""

    def on_sigint(_signum: int, _frame: object) -> None:
        raise Interrupted()

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: nothing to replace
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


async def _acting(env: Env, work: Callable[[Env], Coroutine[Any, Any, T]]) -> T:
    # Set inside the run's own task: the actor stays with this command.
    ACTOR.set(env.actor)
    return await work(env)


def run(ctx: click.Context, work: Callable[[Env], Coroutine[Any, Any, T]]) -> T:
    """Run a command's coroutine; library errors become one line on stderr and an exit code."""
    env = env_of(ctx)
    try:
        import asyncio

        return asyncio.run(_acting(env, work))
    except Fail as exc:
        _fail(env, exc, exc.message, exc.code)
    except SchemaOutdated as exc:
        _fail(env, exc, "the database schema is behind: run `integrations migrate`", FAILED)
    except StorageError as exc:
        # The library's message names the driver's reason and the next step.
        where = f" at {redact_dsn(env.dsn)}" if env.dsn else ""
        _fail(env, exc, f"database{where}: {_cli_advice(exc.message)}", FAILED)
    except IntegrationsError as exc:
        _fail(env, exc, f"{_cli_advice(exc.message)} ({exc.code})", _error_code(exc))
    except (KeyboardInterrupt, Interrupted):
        click.echo(file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as exc:
        # A file that cannot be written or read, an address already in use, ...
        _fail(env, exc, _os_reason(exc), FAILED)


def _os_reason(exc: OSError) -> str:
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{reason}: {exc.filename}" if exc.filename else reason


# Advice the library gives a Python caller, and what an operator at a terminal does instead.
_CLI_ADVICE = (
    # Whole sentences first, so that no advice is given twice once rewritten.
    (
        "pass keys= (a key from integrations.generate_key()) or set INTEGRATIONS_KEYS, or "
        'pass encryption="off" to store secrets in plain text',
        "set INTEGRATIONS_KEYS to a key from `integrations keys generate`",
    ),
    (
        "pass keys= (the new primary first, then the old ones) or set INTEGRATIONS_KEYS",
        "set INTEGRATIONS_KEYS (the new primary first, then the old ones)",
    ),
    ("rotate_keys()", "`integrations keys rotate`"),
    (
        "integ.list_providers() lists the registered ones; "
        "Integrations(providers=[...]) adds your own.",
        "`integrations providers` lists the registered ones; --providers adds your own.",
    ),
    ("register it with Integrations(providers=[...])", "give it with --providers"),
    ("integrations.generate_key()", "`integrations keys generate`"),
    ("pass keys=", "set INTEGRATIONS_KEYS"),
    ("Pass keys=", "Set INTEGRATIONS_KEYS"),
    ("keys= (or INTEGRATIONS_KEYS)", "INTEGRATIONS_KEYS"),
    ("(keys= or INTEGRATIONS_KEYS)", "(INTEGRATIONS_KEYS)"),
    ("add that key to keys= or INTEGRATIONS_KEYS", "add that key to INTEGRATIONS_KEYS"),
    (
        "pass None (the system scope) or a non-blank string of at most 255 characters",
        "give --owner a non-blank value of at most 255 characters (left out: the system scope)",
    ),
    (
        "pass None or a string of at most 255 characters",
        "give --actor at most 255 characters (left out: the user running the command)",
    ),
    ("call save_setup first", "run `integrations set` first"),
    ("save_setup(", "`integrations set` ("),
    ("add it with add_connection()", "add it with `integrations add`"),
)


def _cli_advice(message: str) -> str:
    for python, terminal in _CLI_ADVICE:
        message = message.replace(python, terminal)
    return message


class WarningLines(logging.Handler):
    """The library's warnings as ``warning: ...`` lines on standard error, with the advice
    for a terminal (without ``--debug``, which logs everything as it is)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(f"warning: {_cli_advice(record.getMessage())}", err=True)
        except Exception:  # pragma: no cover - a closed stderr
            self.handleError(record)


def show_warnings() -> None:
    """Route the library's warnings through :class:`WarningLines` (once)."""
    logger = logging.getLogger("integrations")
    if not any(isinstance(h, WarningLines) for h in logger.handlers):
        logger.addHandler(WarningLines())


def guard(make: Callable[[], T]) -> T:
    """For work outside ``run``: a Fail becomes its line on stderr and its exit code."""
    try:
        return make()
    except Fail as exc:
        stderr(f"error: {exc.message}")
        raise SystemExit(exc.code) from None
    except IntegrationsError as exc:
        stderr(f"error: {exc.message} ({exc.code})")
        raise SystemExit(_error_code(exc)) from None
    except OSError as exc:
        stderr(f"error: {_os_reason(exc)}")
        raise SystemExit(FAILED) from None
    except Interrupted:
        click.echo(file=sys.stderr)
        raise SystemExit(130) from None


def _fail(env: Env, exc: BaseException, message: str, code: int) -> NoReturn:
    if env.debug:
        traceback.print_exception(exc, file=sys.stderr)
    stderr(f"error: {message}")
    raise SystemExit(code)


def provider_key(integ: Integrations, key: str) -> str:
    """The provider's key, or a usage error suggesting the closest known keys."""
    if key in integ.providers:
        return integ.providers.get(key).key
    close = difflib.get_close_matches(key, integ.providers.keys(), n=3, cutoff=0.5)
    hint = f" (did you mean: {', '.join(close)}?)" if close else " (see `integrations providers`)"
    raise Fail(f"unknown provider {key!r}{hint}", USAGE)


async def resolve(integ: Integrations, env: Env, ref: str) -> str:
    """A REF (uuid, ``provider:name`` or bare ``provider``) → the connection's uuid. Rows
    outlive their provider's registration: a ref to an unregistered provider still finds
    what is stored, and is an unknown provider only when nothing is."""
    provider = None
    if parse_uuid(ref) is None:
        provider = ref.partition(":")[0].strip()
        if not PROVIDER_KEY_RE.fullmatch(provider):
            if PROVIDER_KEY_RE.fullmatch(provider.lower()):
                fixed = provider.lower() + ref[len(ref.partition(":")[0]) :]
                raise Fail(
                    f"bad reference {ref!r}: provider keys are lowercase (did you mean {fixed!r}?)",
                    USAGE,
                )
            raise Fail(f"bad reference {ref!r}: expected a uuid or provider:name", USAGE)
    try:
        if env.scope() is ALL_OWNERS:
            return await _resolve_any_owner(integ, ref, provider)
        if env.owner is None:
            return await integ.resolve_to_uuid(ref)
        return await integ.resolve_to_uuid(ref, owner=env.owner)
    except (InvalidInput, InvalidProviderKey):
        raise Fail(f"bad reference {ref!r}: expected a uuid or provider:name", USAGE) from None
    except (NotFound, NotConfigured, Deleted):
        if provider is not None and not _UUID_START_RE.fullmatch(ref):
            provider_key(integ, provider)  # an unknown provider raises, with suggestions
        scope = f" for owner {env.owner!r}" if env.owner else ""
        hint = await _closest_refs(integ, env, ref, provider)
        raise Fail(f"no connection {ref}{scope}{hint}", FAILED) from None


# A uuid cut short: hexadecimal digits and dashes, at least one group long.
_UUID_START_RE = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{0,12})*")


async def _closest_refs(integ: Integrations, env: Env, ref: str, provider: str | None) -> str:
    """``" (did you mean ...?)"``: the connections a mistyped REF may have meant (a name
    in another case, a uuid cut short), or a pointer to ``list``."""
    scope = env.owner if not env.all_owners else ALL_OWNERS
    candidates: list[str] = []
    try:
        if provider is None or _UUID_START_RE.fullmatch(ref):
            start = ref.lower()
            page = await integ.list_page(owner=scope, limit=500)
            candidates = [c.uuid for c in page.items if c.uuid.startswith(start)][:3]
        else:
            wanted = (ref.partition(":")[2] or "default").strip()
            found = await integ.list_page(owner=scope, provider=provider, limit=500)
            names = [c.name for c in found.items]
            close = [n for n in names if n.lower() == wanted.lower()] or difflib.get_close_matches(
                wanted, names, n=3, cutoff=0.6
            )
            candidates = [f"{provider}:{n}" for n in close]
    except IntegrationsError:
        candidates = []
    if candidates:
        return f" (did you mean {' or '.join(repr(c) for c in candidates)}?)"
    where = " --owner " + env.owner if env.owner else ""
    return f" (`integrations list{where}` lists them)"


async def _resolve_any_owner(integ: Integrations, ref: str, provider: str | None) -> str:
    """With ``--all-owners``: a uuid of any owner, or the one ``provider:name`` of all
    owners (several are a failure that names them)."""
    if provider is None:
        return await integ.resolve_to_uuid(ref, owner=ALL_OWNERS)
    name = normalize_name(ref.partition(":")[2] or "default")
    found: list[Connection] = []
    after = None
    while True:
        page = await integ.list_page(owner=ALL_OWNERS, provider=provider, limit=500, after=after)
        found.extend(c for c in page.items if c.name == name)
        if page.next_after is None:
            break
        after = page.next_after
    if not found:
        raise NotFound(f"no connection {ref}")
    if len(found) > 1:
        owners = ", ".join(c.owner or "(system)" for c in found)
        raise Fail(
            f"{provider}:{name} exists for {len(found)} owners ({owners}): give its uuid, "
            "or --owner OWNER instead of --all-owners",
            USAGE,
        )
    return found[0].uuid


def ago(value: object, now: datetime | None = None) -> str:
    """``"3 min ago"`` for a stored ISO time; ``"never"`` when there is none."""
    from .._models import ago as _ago

    return _ago(value, now)


# Shown by `list` as the setup summary; the rest is status bookkeeping.
_HIDDEN = frozenset(
    {
        "provider",
        "name",
        "auth_type",
        "status",
        "created_at",
        "owner",
        "validation_status",
        "last_validated_at",
        "reauth_required",
        "token_obtained_at",
        "token_extras",
        "connected_at",
        "refresh_error",
        "last_ok_at",
        "disconnected_at",
        "refresh_lease",
    }
)


def setup_summary(data: Mapping[str, Any]) -> str:
    """What was set up: the fields given, not the bookkeeping nor what an OAuth grant
    wrote (tokens, their type, expiry and scopes belong to the status, not the setup)."""
    from .._record import TOKEN_FIELDS

    parts = []
    for key, value in data.items():
        if key in _HIDDEN or key in TOKEN_FIELDS or value in (None, "", {}, []):
            continue
        if isinstance(value, Mapping):
            value = "{" + ", ".join(f"{k}={v}" for k, v in value.items()) + "}"
        elif isinstance(value, list):
            value = ",".join(str(v) for v in value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


def connection_json(connection: Connection) -> dict[str, Any]:
    """The documented shape of one connection; ``data`` is the masked data."""
    data = dict(connection.data)
    return {
        "uuid": connection.uuid,
        "provider": connection.provider,
        "name": connection.name,
        "owner": connection.owner,
        "status": connection.status,
        "validation_status": data.get("validation_status"),
        "last_validated_at": data.get("last_validated_at"),
        "data": data,
    }


def ref_of(connection: Connection) -> str:
    return f"{connection.provider}:{connection.name}"


def unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))
