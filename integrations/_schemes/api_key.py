"""The ``api_key`` scheme: one secret key, sent as ``Bearer {api_key}`` unless the provider
says otherwise (another header, or the query string)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._setup import SetupField
from ._kinds import AuthHeader
from .headers import HeaderScheme


class ApiKeyScheme(HeaderScheme):
    name = "api_key"
    label = "API key"
    secret_fields = frozenset({"api_key"})

    def setup_fields(self, spec: Mapping[str, Any]) -> tuple[SetupField, ...]:
        return (SetupField(key="api_key", label="API key", required=True, secret=True),)

    def auth_header(self) -> AuthHeader | None:
        return AuthHeader(template="Bearer {api_key}")
