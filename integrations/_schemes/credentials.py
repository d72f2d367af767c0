"""The ``credentials`` scheme: a freeform map of values, every one a secret, checked by a
hook or a request; no header unless the provider declares one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._base import ProviderView
from .headers import HeaderScheme


class CredentialsScheme(HeaderScheme):
    name = "credentials"
    label = "Freeform credentials"
    freeform = True

    def runtime_fields(self, provider: ProviderView) -> tuple[str, ...]:
        return ("credentials",)

    def has_runtime_credentials(self, provider: ProviderView, data: Mapping[str, Any]) -> bool:
        creds = data.get("credentials")
        return isinstance(creds, Mapping) and bool(creds) and provider.is_configured(data)

    def describe(self, provider: ProviderView) -> str:
        if provider.auth_header is None:
            return "—"
        return super().describe(provider)
