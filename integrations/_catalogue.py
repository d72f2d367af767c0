"""The built-in providers: one provider file per key in ``integrations/catalogue/``, each read
and validated the first time that key is asked for; and the Markdown table of them."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._providers import Provider

__all__ = [
    "CATALOGUE_DIR",
    "builtin",
    "builtin_keys",
    "builtin_providers",
    "builtin_raw",
    "providers_markdown",
]

CATALOGUE_DIR = Path(__file__).resolve().with_name("catalogue")

_keys: frozenset[str] | None = None
_raw: dict[str, dict[str, Any]] = {}
_loaded: dict[str, Provider] = {}
_lock = threading.RLock()


def builtin_keys() -> frozenset[str]:
    """The keys of the built-in providers (a directory listing; no file is read)."""
    global _keys
    if _keys is None:
        _keys = frozenset(
            name[: -len(".toml")] for name in os.listdir(CATALOGUE_DIR) if name.endswith(".toml")
        )
    return _keys


def builtin_raw(key: str) -> dict[str, Any] | None:
    """The built-in's entry as written (its ``extends`` resolved), None when there is none."""
    if key not in builtin_keys():
        return None
    with _lock:
        found = _raw.get(key)
        if found is None:
            from ._provider_file import parse_entries, resolve_entries

            path = CATALOGUE_DIR / f"{key}.toml"
            entries = resolve_entries(str(path), parse_entries(path), builtin_raw)
            if len(entries) != 1 or entries[0].get("key") != key:
                raise RuntimeError(f"{path} must hold exactly one provider, keyed {key!r}")
            found = _raw[key] = entries[0]
        return found


def builtin(key: str) -> Provider | None:
    """The built-in provider of ``key``, read on first use; None when there is none."""
    found = _loaded.get(key)
    if found is not None:
        return found
    raw = builtin_raw(key)
    if raw is None:
        return None
    from ._provider_file import validate_entry

    with _lock:
        found = _loaded.get(key)
        if found is None:
            found = _loaded[key] = validate_entry(str(CATALOGUE_DIR / f"{key}.toml"), 0, raw)
        return found


def builtin_providers() -> tuple[Provider, ...]:
    """Every built-in provider, sorted by key (reads the whole catalogue)."""
    return tuple(p for key in sorted(builtin_keys()) if (p := builtin(key)) is not None)


def __getattr__(name: str) -> Any:
    # The whole catalogue is read only by code that asks for it by this name.
    if name == "BUILTIN_PROVIDERS":
        return builtin_providers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _modes(provider: Provider) -> str:
    scheme = provider.scheme
    label = scheme.label
    header = provider.auth_header
    if scheme.uses_access_token and provider.token_auth == "private_key_jwt":
        return f"{label}, client proven by `private_key_jwt`"
    if header is None or scheme.uses_access_token:
        return label
    from ._schemes import header_kind

    kind = header_kind(header.kind)
    return f"{label}: {kind.describe(header)}" if kind is not None else label


def _describe_check(provider: Provider) -> str:
    check = provider.validation
    if check is None:
        if provider.scheme.authorizes_user and provider.userinfo_url:
            return f"`GET {provider.userinfo_url}`"
        return "—"
    if check.hook == "smtp":
        return "SMTP login"
    if check.hook == "postgres":
        return "connect"
    return f"`{check.method} {check.url}`"


def _tenant_fields(provider: Provider) -> str:
    names = provider.host_fields
    parts = []
    for field in provider.setup_fields:
        if field.key in names or (field.pattern and not field.secret and field.required):
            text = f"`{field.key}`"
            if field.default is not None:
                text += f" = {field.default}"
            parts.append(text)
    return ", ".join(parts) or "—"


def providers_markdown(providers: Iterable[Provider] | None = None) -> str:
    """docs/providers.md: one table row per provider, sorted by key."""
    chosen = builtin_providers() if providers is None else tuple(providers)
    lines = [
        "# Built-in providers",
        "",
        "<!-- Generated from integrations/catalogue/ by scripts/gen_providers_doc.py;"
        " do not edit by hand. -->",
        "",
        f"{len(chosen)} providers. Each row links to the vendor's page that the entry's URLs,",
        "scopes and check were taken from. *Tenant fields* are setup values that go into the",
        "provider's hosts or URLs (a Zendesk subdomain, a Salesforce My Domain); `= x` is the",
        "value used when the field is left blank. Every provider is a file in",
        "`integrations/catalogue/` written in the [provider file format](provider-files.md).",
        "",
        "| Key | Name | Auth | Tenant fields | API hosts | Check |",
        "|---|---|---|---|---|---|",
    ]
    for p in sorted(chosen, key=lambda p: p.key):
        hosts = ", ".join(f"`{host}`" for host in p.api_hosts) or "—"
        cells = [
            f"`{p.key}`",
            f"[{p.name}]({p.docs_url})" if p.docs_url else p.name,
            _modes(p),
            _tenant_fields(p),
            hosts,
            _describe_check(p),
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
