"""The provider registry: built-ins plus the application's own, and provider files."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ._errors import ConfigurationError, InvalidProviderKey, ProviderConflict
from ._probes import CHECK_HOOKS
from ._providers import Provider, unknown_provider_message
from ._schemes import AUTH_KINDS, SCHEMES, SchemeRegistry

__all__ = ["ProviderRegistry", "load_providers"]


def load_providers(path: str | os.PathLike[str]) -> list[Provider]:
    """Providers declared in a TOML or JSON file: a list of tables under ``providers``.

    Each entry is validated by the ``Provider`` model; a mistake names the file, the
    entry and the field.
    """
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
    entries = doc.get("providers") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ConfigurationError(
            f"Provider file {str(file)!r} must hold a list named 'providers' "
            "(in TOML: one [[providers]] table per provider)."
        )
    found = []
    for index, entry in enumerate(entries):
        label = entry.get("key") if isinstance(entry, dict) else None
        where = f"entry {index + 1}" + (f" ({label!r})" if isinstance(label, str) else "")
        try:
            found.append(Provider.model_validate(entry))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(entry)"
            raise ConfigurationError(
                f"Provider file {str(file)!r}, {where}, field {field!r}: {first['msg']}."
            ) from None
    return found


class ProviderRegistry:
    """The built-in providers plus the application's own, looked up by key.

    A provider whose key is already a built-in replaces it only when
    ``override=True`` is passed here or set on the provider itself
    (``Provider(..., override=True)``); otherwise ProviderConflict. Two application
    providers with the same key are always a ProviderConflict.
    """

    def __init__(
        self,
        extra: Iterable[Provider] = (),
        *,
        override: bool = False,
        schemes: SchemeRegistry = SCHEMES,
    ) -> None:
        # The catalogue's models are built when a registry is, not at import.
        from ._catalogue import BUILTIN_PROVIDERS

        self.schemes = schemes
        self._providers: dict[str, Provider] = {p.key: p for p in BUILTIN_PROVIDERS}
        seen: set[str] = set()
        for provider in extra:
            if not isinstance(provider, Provider):
                raise TypeError(f"expected a Provider, got {type(provider).__name__}")
            if provider.key in seen:
                raise ProviderConflict(
                    f"Provider {provider.key!r} is given twice.", provider=provider.key
                )
            if provider.key in self._providers and not (override or provider.override):
                raise ProviderConflict(
                    f"Provider {provider.key!r} is a built-in; pass override=True to replace it.",
                    provider=provider.key,
                )
            if provider.auth_type not in schemes:
                raise ConfigurationError(
                    f"Provider {provider.key!r} uses the auth type {provider.auth_type!r}, which "
                    f"no registered auth scheme has (known: {', '.join(schemes.names())}); "
                    "register it with Integrations(auth_schemes=[...]) or "
                    "integrations.register_auth_scheme() first."
                )
            try:
                provider = provider.bind(schemes)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ConfigurationError(
                    f"Provider {provider.key!r} does not fit its auth scheme "
                    f"{provider.auth_type!r}: {first['msg']}."
                ) from None
            except ValueError as exc:
                raise ConfigurationError(
                    f"Provider {provider.key!r} does not fit its auth scheme "
                    f"{provider.auth_type!r}: {exc}."
                ) from None
            header = provider.auth_header
            if header is not None and header.kind not in AUTH_KINDS:
                raise ConfigurationError(
                    f"Provider {provider.key!r} uses the auth header kind {header.kind!r}, which "
                    f"is not registered (known: {', '.join(sorted(AUTH_KINDS))}); register it "
                    "with integrations.register_auth_kind() first."
                )
            hook = provider.validation.hook if provider.validation is not None else None
            if hook is not None and hook not in CHECK_HOOKS:
                raise ConfigurationError(
                    f"Provider {provider.key!r} names the check hook {hook!r}, which is not "
                    f"registered (known: {', '.join(sorted(CHECK_HOOKS))}); register it with "
                    "integrations.register_check() first."
                )
            seen.add(provider.key)
            self._providers[provider.key] = provider
        self._sorted = sorted(self._providers.values(), key=lambda p: p.key)

    def get(self, key: object) -> Provider:
        if not isinstance(key, str):
            raise InvalidProviderKey(
                f"The provider key must be a string, not {type(key).__name__}; "
                "pass a key like 'openai'."
            )
        try:
            return self._providers[key]
        except KeyError:
            raise InvalidProviderKey(
                unknown_provider_message(key, self._providers), provider=key
            ) from None

    def find(self, key: str) -> Provider | None:
        """The provider of ``key``, None when it is not registered (rows may outlive it)."""
        return self._providers.get(key)

    def all(self) -> list[Provider]:
        """Every provider, sorted by key."""
        return list(self._sorted)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._providers

    def __iter__(self) -> Iterator[Provider]:
        return iter(self._sorted)

    def __len__(self) -> int:
        return len(self._providers)

    def __repr__(self) -> str:
        return f"<ProviderRegistry {len(self)} providers>"
