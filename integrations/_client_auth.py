"""How an OAuth client authenticates at a token or revocation endpoint, one method per name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from authlib.oauth2.auth import ClientAuth

__all__ = [
    "CLIENT_AUTH_METHODS",
    "FORM_HEADERS",
    "PRIVATE_KEY_JWT",
    "Client",
    "ClientAuthMethod",
    "client_auth_method",
]

#: A request to an endpoint: its URL, headers and form body.
Prepared = tuple[str, dict[str, str], str]

FORM_HEADERS: Final[Mapping[str, str]] = MappingProxyType(
    {
        # GitHub answers form-encoded unless JSON is asked for.
        "Accept": "application/json",
        "Content-Type": "application/x-www-form-urlencoded",
    }
)


CLIENT_ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
PRIVATE_KEY_JWT: Final = "private_key_jwt"


class ClientAuthMethod:
    """One way of authenticating the client (RFC 6749 §2.3, RFC 7591's
    ``token_endpoint_auth_method``): it adds the client's proof to a form request.

    A new method (``private_key_jwt``, ``client_secret_jwt``...) is a subclass with its
    ``name`` and ``prepare``, added to :data:`CLIENT_AUTH_METHODS`.
    """

    name: str = ""
    #: Whether the method proves the client with its ``client_secret``.
    needs_secret: bool = True
    #: Whether it proves the client with a private key (``Client.private_key``).
    needs_key: bool = False

    def prepare(self, client: Client, url: str, headers: dict[str, str], body: str) -> Prepared:
        raise NotImplementedError


class _Authlib(ClientAuthMethod):
    """``client_secret_post``, ``client_secret_basic`` and ``none``, as Authlib applies them."""

    def __init__(self, name: str, *, needs_secret: bool) -> None:
        self.name = name
        self.needs_secret = needs_secret

    def prepare(self, client: Client, url: str, headers: dict[str, str], body: str) -> Prepared:
        auth = ClientAuth(client.client_id, client.client_secret, self.name)
        url, headers, body = auth.prepare("POST", url, headers, body)
        return str(url), {str(k): str(v) for k, v in headers.items()}, str(body)


class _PrivateKeyJwt(ClientAuthMethod):
    """``private_key_jwt`` (RFC 7523 §2.2, OpenID Connect Core §9): a JWT signed with the
    client's private key, a fresh ``jti`` every time, the endpoint's URL as audience."""

    name = PRIVATE_KEY_JWT
    needs_secret = False
    needs_key = True

    def prepare(self, client: Client, url: str, headers: dict[str, str], body: str) -> Prepared:
        from urllib.parse import urlencode

        from ._jwt import assertion, signing_key

        assert client.private_key is not None
        key = signing_key(client.private_key, field_name="client_private_key", kid=client.key_id)
        audience = client.audience or url
        signed = assertion(
            key, issuer=client.client_id, subject=client.client_id, audience=audience
        )
        proof = urlencode(
            {
                "client_id": client.client_id,
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
                "client_assertion": signed,
            }
        )
        return url, headers, f"{body}&{proof}" if body else proof


#: The client authentication methods by name.
CLIENT_AUTH_METHODS: dict[str, ClientAuthMethod] = {
    method.name: method
    for method in (
        _Authlib("client_secret_post", needs_secret=True),
        _Authlib("client_secret_basic", needs_secret=True),
        _Authlib("none", needs_secret=False),
        _PrivateKeyJwt(),
    )
}


def client_auth_method(name: str) -> ClientAuthMethod:
    """The method called ``name``; ValueError when there is none."""
    method = CLIENT_AUTH_METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"unsupported token endpoint auth method {name!r}")
    return method


@dataclass(frozen=True, slots=True)
class Client:
    """An OAuth client as one endpoint call sees it: its id, its secret, and how it
    proves itself."""

    client_id: str
    client_secret: str | None = field(repr=False)
    method: ClientAuthMethod
    #: The private key (PEM or JWK) that signs a ``private_key_jwt`` assertion, and its id.
    private_key: str | None = field(default=None, repr=False)
    key_id: str | None = None
    #: The assertion's ``aud`` when the server wants another than the endpoint's URL.
    audience: str | None = None

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("client_id is required")
        if self.method.needs_secret and not self.client_secret:
            raise ValueError(f"{self.method.name} needs a client_secret")
        if self.method.needs_key and not self.private_key:
            raise ValueError(f"{self.method.name} needs a private key")

    def prepare(self, url: str, body: str) -> Prepared:
        """A POST of the form ``body`` to ``url``, authenticated as this client."""
        return self.method.prepare(self, url, dict(FORM_HEADERS), body)
