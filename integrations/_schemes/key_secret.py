"""The ``key_secret`` scheme: an access key and a secret key, as HTTP Basic or AWS SigV4."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._setup import SetupField
from ._kinds import AuthHeader
from .headers import HeaderScheme


class KeySecretScheme(HeaderScheme):
    name = "key_secret"
    label = "Key and secret"
    secret_fields = frozenset({"secret_key"})

    def setup_fields(self, spec: Mapping[str, Any]) -> tuple[SetupField, ...]:
        return (
            SetupField(key="access_key", label="Access key", required=True),
            SetupField(key="secret_key", label="Secret key", required=True, secret=True),
        )

    def auth_header(self) -> AuthHeader | None:
        return AuthHeader(kind="basic", username="access_key", password="secret_key")
