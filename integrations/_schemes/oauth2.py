"""OAuth 2.0 schemes: ``oauth2`` (authorization code, PKCE) and ``oauth2_client_credentials``.

Both keep an access token that the tokens service renews (single flight, row lease); they
differ in how a connection gets its first token and which grant renews it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._errors import NotConnected, ReauthRequired
from .._setup import SetupField
from ._base import AuthContext, AuthScheme, ProviderView, Request
from ._kinds import AuthHeader

__all__ = ["ClientCredentialsScheme", "OAuth2Scheme", "TokenGrant", "TokenScheme"]


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What renews an access token: the grant type and its parameters for the token
    endpoint, the refresh token it spends (None when none is spent), the scopes asked
    for (what the answer is read against when it names none), whether the client
    authenticates, and the endpoint when the connection names its own."""

    grant_type: str
    params: Mapping[str, str | Sequence[str] | None] = field(repr=False)
    spends: str | None = field(default=None, repr=False)
    requested_scopes: Sequence[str] = ()
    #: Whether the client authenticates as the provider's ``token_auth`` says (False: the
    #: grant itself proves who asks, as a JWT bearer assertion does).
    client_auth: bool = True
    #: The token endpoint, when the connection's data names it (a key file's ``token_uri``).
    token_url: str | None = None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class TokenScheme(AuthScheme):
    """A scheme whose requests carry an access token that the tokens service obtains and
    renews. Subclasses say when a stored token may be used as it is and which grant
    renews it."""

    uses_access_token = True
    secret_fields = frozenset(
        {"client_secret", "client_private_key", "access_token", "refresh_token", "device_code"}
    )
    #: Whether obtaining a token is itself the credential check (no other check declared).
    renewal_is_check: bool = False

    def setup_fields(self, spec: Mapping[str, Any]) -> tuple[SetupField, ...]:
        client_id = SetupField(key="client_id", label="Client ID", required=True)
        if spec.get("token_auth") == "private_key_jwt":
            # The client proves itself with a signed assertion, not a secret.
            return (
                client_id,
                SetupField(
                    key="client_private_key",
                    label="Client private key (PEM or JWK)",
                    type="text",
                    required=True,
                    secret=True,
                ),
                SetupField(key="client_key_id", label="Client key ID (kid)"),
            )
        # A public client (PKCE, token_auth="none") has no secret to require.
        public = spec.get("token_auth") == "none"
        return (
            client_id,
            SetupField(
                key="client_secret", label="Client secret", required=not public, secret=True
            ),
        )

    def auth_header(self) -> AuthHeader | None:
        return AuthHeader(template="Bearer {access_token}")

    def disconnect_drops(self, provider: ProviderView) -> tuple[str, ...]:
        # The app's client id and secret stay; tokens are dropped for every scheme.
        return ()

    def describe(self, provider: ProviderView) -> str:
        return self.label

    async def auth_flow(self, request: Request, auth: AuthContext) -> AsyncGenerator[Request, Any]:
        token = await auth.access_token()
        response = yield request.with_credentials({**auth.credentials, "access_token": token})
        if not auth.rejected(response):
            return
        fresh = await auth.renew(token)
        if fresh != token:
            yield request.with_credentials({**auth.credentials, "access_token": fresh})

    # -- what the tokens service asks -------------------------------------------------------

    def usable_token(self, plain: Mapping[str, Any], *, due: bool) -> str | None:
        """The stored token to hand out as it is, None when it must be renewed first."""
        token = _text(plain.get("access_token"))
        return token if token is not None and not due else None

    def not_connected(self, plain: Mapping[str, Any]) -> bool:
        """Whether nothing can be renewed until a user connects (NotConnected)."""
        return False

    def grant(self, provider: ProviderView, plain: Mapping[str, Any]) -> TokenGrant:
        raise NotImplementedError

    def renew_before_check(self, plain: Mapping[str, Any]) -> bool:
        """Whether a check renews a due token first (an expiring token would make a
        healthy connection look broken)."""
        return True

    def renews_ahead(self, data: Mapping[str, Any]) -> bool:
        """Whether the health sweep may renew this connection's token before it expires."""
        return False


class OAuth2Scheme(TokenScheme):
    """Authorization code with PKCE: a user grants access; a refresh token renews it."""

    name = "oauth2"
    label = "OAuth 2.0"
    authorizes_user = True

    def check_provider(self, provider: ProviderView) -> None:
        if not (provider.authorize_url and provider.token_url):
            raise ValueError("an oauth2 provider needs authorize_url and token_url")

    def runtime_fields(self, provider: ProviderView) -> tuple[str, ...]:
        return ("access_token",)

    def usable_token(self, plain: Mapping[str, Any], *, due: bool) -> str | None:
        token = _text(plain.get("access_token"))
        if token is None:
            raise NotConnected()
        # Without a refresh token nothing can be done ahead of time; the API will tell.
        if not due or _text(plain.get("refresh_token")) is None:
            return token
        return None

    def not_connected(self, plain: Mapping[str, Any]) -> bool:
        return (
            _text(plain.get("access_token")) is None and _text(plain.get("refresh_token")) is None
        )

    def grant(self, provider: ProviderView, plain: Mapping[str, Any]) -> TokenGrant:
        refresh_token = _text(plain.get("refresh_token"))
        if refresh_token is None:
            raise ReauthRequired(
                "The access token was rejected and there is no refresh token; "
                "the connection must be authorized again"
            )
        granted = plain.get("granted_scopes")
        requested = [str(s) for s in granted] if isinstance(granted, list) else provider.scopes
        return TokenGrant(
            "refresh_token",
            {"refresh_token": refresh_token},
            spends=refresh_token,
            requested_scopes=requested,
        )

    def renew_before_check(self, plain: Mapping[str, Any]) -> bool:
        return bool(plain.get("refresh_token"))

    def renews_ahead(self, data: Mapping[str, Any]) -> bool:
        return bool(data.get("refresh_token")) and not data.get("refresh_error")


class ClientCredentialsScheme(TokenScheme):
    """Client credentials: the application's own id and secret obtain each token."""

    name = "oauth2_client_credentials"
    label = "OAuth 2.0 client credentials"
    renewal_is_check = True

    def check_provider(self, provider: ProviderView) -> None:
        if not provider.token_url:
            raise ValueError("an oauth2_client_credentials provider needs token_url")

    def runtime_fields(self, provider: ProviderView) -> tuple[str, ...]:
        if provider.token_auth == "private_key_jwt":
            return ("client_id", "client_private_key")
        return ("client_id", "client_secret")

    def grant(self, provider: ProviderView, plain: Mapping[str, Any]) -> TokenGrant:
        return TokenGrant(
            "client_credentials",
            {"scope": list(provider.scopes) or None},
            requested_scopes=provider.scopes,
        )
