"""The provider registry: built-ins plus the application's own, and provider files."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from pydantic import ValidationError

from ._errors import ConfigurationError, InvalidProviderKey, ProviderConflict
from ._probes import CHECK_HOOKS
from ._providers import Provider, unknown_provider_message
from ._schemes import AUTH_KINDS, SCHEMES, SchemeRegistry

__all__ = ["ProviderRegistry", "load_providers"]


def load_providers(path: str | os.PathLike[str]) -> list[Provider]:
    """Providers declared in a TOML or JSON provider file: a list of tables under
    ``providers`` (see docs/provider-files.md). An entry may ``extends`` an earlier entry
    or a built-in. Each entry is validated by the ``Provider`` model; a mistake names the
    file, the entry and the field (ConfigurationError)."""
    from ._catalogue import builtin_raw
    from ._provider_file import read_provider_file

    return read_provider_file(path, builtin_raw)


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
        # The catalogue is read when a registry is built: its directory listing only.
        from ._catalogue import builtin_keys

        self.schemes = schemes
        self._builtin_keys = builtin_keys()
        self._providers: dict[str, Provider] = {}
        # Built-in providers once looked up: ``find`` runs on every call that reads a row.
        self._builtins: dict[str, Provider] = {}
        self._sorted: list[Provider] | None = None
        seen: set[str] = set()
        for provider in extra:
            if not isinstance(provider, Provider):
                raise TypeError(f"expected a Provider, got {type(provider).__name__}")
            if provider.key in seen:
                raise ProviderConflict(
                    f"Provider {provider.key!r} is given twice.", provider=provider.key
                )
            if provider.key in self._builtin_keys and not (override or provider.override):
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

    def get(self, key: object) -> Provider:
        if not isinstance(key, str):
            raise InvalidProviderKey(
                f"The provider key must be a string, not {type(key).__name__}; "
                "pass a key like 'openai'."
            )
        found = self.find(key)
        if found is None:
            raise InvalidProviderKey(unknown_provider_message(key, self.keys()), provider=key)
        return found

    def find(self, key: str) -> Provider | None:
        """The provider of ``key``, None when it is not registered (rows may outlive it)."""
        own = self._providers.get(key)
        if own is not None:
            return own
        found = self._builtins.get(key)
        if found is not None or key not in self._builtin_keys:
            return found
        from ._catalogue import builtin

        found = builtin(key)
        if found is not None:
            self._builtins[key] = found
        return found

    def keys(self) -> list[str]:
        """Every registered key, sorted (no catalogue file is read)."""
        return sorted(self._builtin_keys | self._providers.keys())

    def all(self) -> list[Provider]:
        """Every provider, sorted by key (reads the whole catalogue once)."""
        if self._sorted is None:
            from ._catalogue import builtin_providers

            merged = {p.key: p for p in builtin_providers()} | self._providers
            self._sorted = sorted(merged.values(), key=lambda p: p.key)
        return list(self._sorted)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in self._providers or key in self._builtin_keys)

    def __iter__(self) -> Iterator[Provider]:
        return iter(self.all())

    def __len__(self) -> int:
        return len(self._builtin_keys | self._providers.keys())

    def __repr__(self) -> str:
        return f"<ProviderRegistry {len(self)} providers>"
