"""The ``mtls`` scheme: calls authenticated by a client certificate alone (mutual TLS), and
the certificate fields any provider adds with ``mtls=True``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from yarl import URL

from .._setup import SetupField
from ._base import AuthScheme, ProviderView

__all__ = ["CERTIFICATE_FIELDS", "MtlsScheme"]

CERTIFICATE_FIELDS: tuple[SetupField, ...] = (
    SetupField(
        key="client_certificate",
        label="Client certificate (PEM)",
        type="text",
        required=True,
        help="Presented in the TLS handshake; the chain may follow the certificate.",
    ),
    SetupField(
        key="client_key",
        label="Client certificate's private key (PEM, unencrypted)",
        type="text",
        required=True,
        secret=True,
    ),
)


class MtlsScheme(AuthScheme):
    """No header: the TLS handshake proves who calls."""

    name = "mtls"
    label = "Client certificate (mutual TLS)"
    client_certificate = True
    secret_fields = frozenset({"client_key"})

    def setup_fields(self, spec: Mapping[str, Any]) -> tuple[SetupField, ...]:
        return CERTIFICATE_FIELDS

    def runtime_fields(self, provider: ProviderView) -> tuple[str, ...]:
        return ("client_certificate", "client_key")

    def describe(self, provider: ProviderView) -> str:
        return "client certificate presented in the TLS handshake (mutual TLS)"

    def sign(
        self,
        provider: ProviderView,
        credentials: Mapping[str, Any],
        method: str,
        url: URL,
        body: bytes | None,
    ) -> tuple[dict[str, str], URL]:
        return {}, url

    def prepared_headers(
        self, provider: ProviderView, credentials: Mapping[str, Any]
    ) -> dict[str, str] | None:
        return {}
