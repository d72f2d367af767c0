"""The provider file format: reading TOML/JSON provider files (``extends`` included), its JSON
Schema, a TOML writer for it, and the lint rules every entry is held to."""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ._errors import ConfigurationError
from ._providers import Provider, url_authority
from ._templates import template_fields

__all__ = [
    "Problem",
    "lint_provider",
    "parse_entries",
    "provider_file_schema",
    "read_provider_file",
    "resolve_entries",
    "to_toml",
]

#: Looks up a built-in's raw entry for ``extends`` (None when there is no such built-in).
BaseLookup = Callable[[str], "dict[str, Any] | None"]


def parse_entries(path: str | os.PathLike[str]) -> list[Any]:
    """The raw entries of a provider file: ``[[providers]]`` tables in TOML, a
    ``{"providers": [...]}`` object or a bare list in JSON."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"Cannot read provider file {str(file)!r}: {exc.strerror}."
        ) from exc
    try:
        doc: Any = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"Provider file {str(file)!r} is not valid: {exc}.") from exc
    entries: Any = doc
    if isinstance(doc, dict):
        # A JSON file may also hold one provider object.
        entries = doc.get("providers") if "providers" in doc or "key" not in doc else [doc]
    if not isinstance(entries, list):
        raise ConfigurationError(
            f"Provider file {str(file)!r} must hold a list named 'providers' "
            "(in TOML: one [[providers]] table per provider)."
        )
    return entries


def _where(file: str, index: int, entry: Any) -> str:
    label = entry.get("key") if isinstance(entry, dict) else None
    shown = f" ({label!r})" if isinstance(label, str) else ""
    return f"Provider file {file!r}, entry {index + 1}{shown}"


def resolve_entries(
    file: str, entries: list[Any], builtin: BaseLookup | None = None
) -> list[dict[str, Any]]:
    """Each entry with its ``extends`` resolved: the fields of the named provider (an earlier
    entry of this file, else a built-in) under the entry's own. Raw dicts, not validated."""
    out: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}
    for index, entry in enumerate(entries):
        where = _where(file, index, entry)
        if not isinstance(entry, dict):
            raise ConfigurationError(f"{where}: an entry is a table of provider fields.")
        entry = dict(entry)
        base_key = entry.pop("extends", None)
        if base_key is not None:
            if not isinstance(base_key, str):
                raise ConfigurationError(f"{where}, field 'extends': a provider key.")
            base = seen.get(base_key)
            if base is None and builtin is not None:
                base = builtin(base_key)
            if base is None:
                raise ConfigurationError(
                    f"{where}, field 'extends': no earlier entry or built-in provider "
                    f"has the key {base_key!r}."
                )
            # The base's identity stays with the base; everything else is inherited.
            inherited = {k: v for k, v in base.items() if k not in ("key", "override")}
            entry = {**inherited, **entry}
        key = entry.get("key")
        if isinstance(key, str):
            if key in seen:
                raise ConfigurationError(f"{where}, field 'key': {key!r} is given twice.")
            seen[key] = entry
        out.append(entry)
    return out


def validate_entry(file: str, index: int, entry: dict[str, Any]) -> Provider:
    """The entry as a Provider; a mistake names the file, the entry and the field."""
    try:
        return Provider.model_validate(entry)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(entry)"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigurationError(
            f"{_where(file, index, entry)}, field {field!r}: {message}."
        ) from None


def read_provider_file(
    path: str | os.PathLike[str], builtin: BaseLookup | None = None
) -> list[Provider]:
    """Providers declared in a TOML or JSON provider file, validated."""
    file = str(path)
    entries = resolve_entries(file, parse_entries(path), builtin)
    return [validate_entry(file, index, entry) for index, entry in enumerate(entries)]


def provider_file_schema() -> dict[str, Any]:
    """The JSON Schema of a provider file, generated from the ``Provider`` model."""
    entry = Provider.model_json_schema(mode="validation")
    defs = entry.pop("$defs", {})
    entry["properties"]["extends"] = {
        "type": "string",
        "title": "Extends",
        "description": "Key of an earlier entry of this file or of a built-in provider whose "
        "fields this entry inherits (its own fields win).",
    }
    entry["description"] = " ".join(str(entry.get("description", "")).split())
    defs["Provider"] = entry
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://integrations.invalid/schema/providers.json",
        "title": "Provider file",
        "description": "Providers for integrations: in TOML one [[providers]] table per "
        "provider, in JSON an object with a 'providers' list.",
        "type": "object",
        "properties": {"providers": {"type": "array", "items": {"$ref": "#/$defs/Provider"}}},
        "required": ["providers"],
        "additionalProperties": False,
        "$defs": defs,
    }


# -- writing TOML ------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _string(name)


def _string(text: str) -> str:
    out = ['"']
    for char in text:
        if char == '"':
            out.append('\\"')
        elif char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_list(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(v, Mapping) for v in value)
    )


def _nested(value: Any) -> bool:
    """Whether a value holds tables itself (then it is written as [section] tables)."""
    if isinstance(value, Mapping):
        return any(isinstance(v, Mapping) or _is_table_list(v) for v in value.values())
    if _is_table_list(value):
        return any(_nested(item) for item in value)
    return False


def _table(lines: list[str], prefix: str, table: Mapping[str, Any]) -> None:
    later: list[tuple[str, Any]] = []
    for name, value in table.items():
        if value is None:
            continue
        if _nested(value):
            later.append((name, value))
        elif _is_table_list(value) and len(value) > 1:
            lines.append(f"{_key(name)} = [")
            lines.extend(f"  {_value(item)}," for item in value)
            lines.append("]")
        else:
            lines.append(f"{_key(name)} = {_value(value)}")
    for name, value in later:
        path = f"{prefix}.{_key(name)}"
        if isinstance(value, Mapping):
            lines.append(f"[{path}]")
            _table(lines, path, value)
        else:
            for item in value:
                lines.append(f"[[{path}]]")
                _table(lines, path, item)


def to_toml(entries: Iterable[Mapping[str, Any]], *, header: str = "") -> str:
    """A provider file in TOML: one ``[[providers]]`` table per entry (None values left out)."""
    lines: list[str] = [f"# {line}".rstrip() for line in header.splitlines()]
    for entry in entries:
        if lines:
            lines.append("")
        lines.append("[[providers]]")
        _table(lines, "providers", entry)
    return "\n".join(lines) + "\n"


# -- lint ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an entry: the field and what is wrong with it."""

    field: str
    message: str


def _url_problem(url: str) -> str | None:
    from ._http import is_loopback

    scheme, sep, _ = url.partition("://")
    authority = url_authority(url)
    host = authority.rsplit("@", 1)[-1]
    host = host[1:].split("]")[0] if host.startswith("[") else host.split(":")[0]
    if not sep or not authority:
        return "must be an absolute URL"
    if scheme == "https":
        return None
    if scheme == "http" and is_loopback(host):
        return None
    return "must be https:// (http:// only to a loopback host)"


def _host_covered(url: str, hosts: tuple[str, ...]) -> bool:
    from ._http import host_allowed

    authority = url_authority(url).lower()
    if "{" in authority:
        if authority in hosts:
            return True
        # A template under a wildcard: its placeholders all sit left of the wildcard's
        # domain ("sts.{region}.amazonaws.com" under "*.amazonaws.com").
        for host in hosts:
            suffix = authority[-len(host) + 1 :]
            if host.startswith("*.") and authority.endswith(host[1:]) and "{" not in suffix:
                return True
        return False
    return host_allowed(url, [h for h in hosts if "{" not in h])


def lint_provider(provider: Provider, *, builtin: bool = False) -> list[Problem]:
    """What the catalogue's rules find wrong with ``provider``: https only (loopback allowed),
    the check under an allowed host, hosts of per-tenant fields exact, scopes separated as
    declared; for a built-in also a ``docs_url`` and a credential check."""
    problems: list[Problem] = []
    urls = {
        "authorize_url": provider.authorize_url,
        "token_url": provider.token_url,
        "request_token_url": provider.request_token_url,
        "userinfo_url": provider.userinfo_url,
        "revoke_url": provider.revoke_url,
        "client_assertion_audience": provider.client_assertion_audience,
        "docs_url": provider.docs_url,
    }
    check = provider.validation
    if check is not None and check.url:
        urls["validation.url"] = check.url
    for name, url in urls.items():
        if url is not None and (problem := _url_problem(url)) is not None:
            problems.append(Problem(name, problem))
    hosts = provider.api_hosts
    if check is not None and check.hook is None:
        if not hosts:
            problems.append(Problem("api_hosts", "an HTTP check needs the API hosts it runs on"))
        elif not _host_covered(check.url, hosts):
            problems.append(Problem("validation.url", "its host is not one of the api_hosts"))
    fields = {field.key: field for field in provider.setup_fields}
    for index, template in enumerate(hosts):
        for name in template_fields(template):
            field = fields.get(name)
            if field is None or field.pattern is None:
                continue
            # A field followed by a dot is a subdomain: it must not hold a dot itself,
            # or a value like "evil.com" would pick the host's parent domain.
            if f"{{{name}}}." in template and re.fullmatch(field.pattern, "a.b"):
                problems.append(
                    Problem(
                        f"api_hosts.{index}",
                        f"{{{name}}} is a subdomain but its pattern accepts dots",
                    )
                )
    separator = provider.scope_separator
    for index, scope in enumerate(provider.scopes):
        if not scope or scope != scope.strip() or (separator and separator in scope):
            problems.append(
                Problem(
                    f"scopes.{index}",
                    f"one scope per item, without the separator {separator!r}",
                )
            )
        elif " " in scope:
            problems.append(Problem(f"scopes.{index}", "a scope holds no spaces"))
    if len(set(provider.scopes)) != len(provider.scopes):
        problems.append(Problem("scopes", "a scope is given twice"))
    if builtin:
        if not provider.docs_url:
            problems.append(Problem("docs_url", "a built-in names the vendor's auth page"))
        has_userinfo = provider.scheme.authorizes_user and bool(provider.userinfo_url)
        # A service account's check is obtaining a token with its key.
        renewal_is_check = bool(getattr(provider.scheme, "renewal_is_check", False))
        if check is None and not has_userinfo and not renewal_is_check:
            problems.append(Problem("validation", "a built-in has a credential check"))
    return problems


_FIELD_ORDER = (
    "key",
    "name",
    "description",
    "docs_url",
    "auth_type",
    "request_token_url",
    "authorize_url",
    "token_url",
    "userinfo_url",
    "revoke_url",
    "scopes",
    "scope_separator",
    "authorize_params",
    "token_auth",
    "client_assertion_audience",
    "pkce",
    "api_hosts",
    "auth_header",
    "setup_fields",
    "validation",
    "refresh_on",
    "rejected_answers",
    "userinfo_map",
    "override",
)


def entry_of(provider: Provider) -> dict[str, Any]:
    """The shortest file entry that gives back ``provider``: fields left at their
    default (or at the auth scheme's default) are left out, and so are the defaults of
    nested tables (setup fields, the auth header, the check)."""
    full = provider.model_dump(mode="json")
    short = provider.model_dump(mode="json", exclude_defaults=True)
    bare: dict[str, Any] = {}
    for name, info in Provider.model_fields.items():
        if not info.is_required():
            default = info.get_default(call_default_factory=True)
            dumped = default.model_dump(mode="json") if hasattr(default, "model_dump") else default
            bare[name] = json.loads(json.dumps(dumped))
    scheme = provider.scheme
    spec = {"token_auth": provider.token_auth}
    bare["setup_fields"] = [f.model_dump(mode="json") for f in scheme.setup_fields(spec)]
    header = scheme.auth_header()
    bare["auth_header"] = header.model_dump(mode="json") if header is not None else None
    entry: dict[str, Any] = {}
    # Fields the order above does not name yet come last rather than being lost.
    names = [*_FIELD_ORDER, *(n for n in Provider.model_fields if n not in _FIELD_ORDER)]
    for name in names:
        if name in ("key", "name", "auth_type") or full.get(name) != bare.get(name):
            entry[name] = short.get(name, full.get(name))
    return entry
