"""The ``jwt_bearer`` scheme: service accounts (RFC 7523 §2.1). The library signs a JWT
assertion with the account's private key and exchanges it for an access token; renewal is a
new assertion (there is no refresh token), under the same single flight and lease as OAuth
refresh."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._errors import InvalidField
from .._jwt import assertion, signing_key
from .._setup import SetupField
from ._base import ProviderView
from .oauth2 import TokenGrant, TokenScheme, _text

__all__ = ["JWT_BEARER_GRANT", "JwtBearerScheme"]

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"

# The members of a service-account key file as issued (Google's JSON), and the setup field
# each one fills.
_KEY_FILE_FIELDS = {
    "client_email": "client_email",
    "private_key": "private_key",
    "private_key_id": "private_key_id",
    "token_uri": "token_uri",
}


class JwtBearerScheme(TokenScheme):
    """A service account: ``client_email`` signs assertions with ``private_key`` (RS256 or
    ES256, by the key's type), for ``subject`` when the account acts for a user
    (domain-wide delegation), asking for the provider's scopes."""

    name = "jwt_bearer"
    label = "Service account (JWT bearer)"
    #: Obtaining a token with the key is what proves it works (when no check is declared).
    renewal_is_check = True
    secret_fields = frozenset({"private_key", "access_token", "key_file"})

    def setup_fields(self, spec: Mapping[str, Any]) -> tuple[SetupField, ...]:
        return (
            SetupField(
                key="key_file",
                label="Key file (JSON, as issued)",
                type="text",
                secret=True,
                help="Paste the whole file; its members fill the fields below.",
            ),
            SetupField(key="client_email", label="Service account (issuer)", required=True),
            SetupField(
                key="private_key",
                label="Private key (PEM or JWK)",
                type="text",
                required=True,
                secret=True,
            ),
            SetupField(key="private_key_id", label="Key ID"),
            SetupField(key="token_uri", label="Token endpoint", type="url"),
            SetupField(
                key="subject",
                label="Act as (subject)",
                help="A user the account acts for (domain-wide delegation); blank: itself.",
            ),
        )

    def expand_setup(self, attrs: Mapping[str, Any]) -> Mapping[str, Any]:
        expanded = self._from_key_file(attrs)
        key = expanded.get("private_key")
        if isinstance(key, str | Mapping) and key:
            # A key that can't sign is refused when saved, not at the first renewal.
            signing_key(key, field_name="private_key")
        if isinstance(key, Mapping):
            expanded = {**expanded, "private_key": json.dumps(dict(key))}
        return expanded

    def _from_key_file(self, attrs: Mapping[str, Any]) -> Mapping[str, Any]:
        if attrs.get("key_file") in (None, ""):
            return attrs
        raw = attrs["key_file"]
        try:
            data = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            data = None
        if not isinstance(data, Mapping) or not isinstance(data.get("private_key"), str):
            raise InvalidField(
                "Setup field 'key_file' must be the service account's JSON key file as "
                "issued (with client_email, private_key and token_uri).",
                field="key_file",
            )
        expanded = {k: v for k, v in attrs.items() if k != "key_file"}
        for member, key in _KEY_FILE_FIELDS.items():
            value = data.get(member)
            if isinstance(value, str) and value and key not in expanded:
                expanded[key] = value
        return expanded

    def check_provider(self, provider: ProviderView) -> None:
        # The endpoint may come from the key file (token_uri) instead of the provider.
        return None

    def runtime_fields(self, provider: ProviderView) -> tuple[str, ...]:
        return ("client_email", "private_key")

    def disconnect_drops(self, provider: ProviderView) -> tuple[str, ...]:
        return ("private_key",)

    def grant(self, provider: ProviderView, plain: Mapping[str, Any]) -> TokenGrant:
        values = provider.template_values(plain)
        issuer = _text(values.get("client_email"))
        if issuer is None:
            raise self.missing("client_email")
        if _text(values.get("private_key")) is None:
            raise self.missing("private_key")
        token_url = (
            provider.render_url(provider.token_url, plain)
            if provider.token_url
            else _text(values.get("token_uri"))
        )
        if token_url is None:
            raise self.missing("token_uri")
        key = signing_key(
            values["private_key"], field_name="private_key", kid=_text(values.get("private_key_id"))
        )
        scope = provider.scope_separator.join(provider.scopes) or None
        signed = assertion(
            key,
            issuer=issuer,
            subject=_text(values.get("subject")) or issuer,
            audience=token_url,
            extra={"scope": scope},
        )
        return TokenGrant(
            JWT_BEARER_GRANT,
            {"assertion": signed},
            requested_scopes=provider.scopes,
            client_auth=False,
            token_url=token_url,
        )
