"""Auth schemes: one registered strategy per kind of credential, built-ins included."""

from __future__ import annotations

from ._base import (
    Answer,
    AuthContext,
    AuthScheme,
    ProviderView,
    Request,
    SchemeRegistry,
    missing_credential,
)
from ._kinds import AUTH_KINDS, AuthHeader, AuthKind, header_kind, register_auth_kind
from .api_key import ApiKeyScheme
from .bot_token import BotTokenScheme
from .credentials import CredentialsScheme
from .headers import HeaderScheme
from .jwt_bearer import JwtBearerScheme
from .key_secret import KeySecretScheme
from .mtls import CERTIFICATE_FIELDS, MtlsScheme
from .oauth1 import OAuth1Scheme
from .oauth2 import ClientCredentialsScheme, OAuth2Scheme, TokenGrant, TokenScheme

__all__ = [
    "AUTH_KINDS",
    "CERTIFICATE_FIELDS",
    "SCHEMES",
    "Answer",
    "AuthContext",
    "AuthHeader",
    "AuthKind",
    "AuthScheme",
    "HeaderScheme",
    "ProviderView",
    "Request",
    "SchemeRegistry",
    "TokenGrant",
    "TokenScheme",
    "header_kind",
    "missing_credential",
    "register_auth_kind",
    "register_auth_scheme",
]

#: The module-level registry: the built-in schemes and those registered for the whole process.
SCHEMES = SchemeRegistry(
    [
        OAuth2Scheme(),
        ClientCredentialsScheme(),
        ApiKeyScheme(),
        KeySecretScheme(),
        BotTokenScheme(),
        CredentialsScheme(),
        JwtBearerScheme(),
        OAuth1Scheme(),
        MtlsScheme(),
    ]
)


def register_auth_scheme(scheme: AuthScheme) -> AuthScheme:
    """Register ``scheme`` for every ``Integrations`` of this process; a name that is taken
    is refused (ConfigurationError). ``Integrations(auth_schemes=[...])`` registers for one
    instance only."""
    return SCHEMES.register(scheme)
