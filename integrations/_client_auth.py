"""How an OAuth client authenticates at a token or revocation endpoint, one method per name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from authlib.oauth2.auth import ClientAuth

__all__ = ["CLIENT_AUTH_METHODS", "Client", "ClientAuthMethod", "client_auth_method"]

#: A request to an endpoint: its URL, headers and form body.
Prepared = tuple[str, dict[str, str], str]

_FORM_HEADERS: Final[Mapping[str, str]] = MappingProxyType(
    {
        # GitHub answers form-encoded unless JSON is asked for.
        "Accept": "application/json",
        "Content-Type": "application/x-www-form-urlencoded",
    }
)


class ClientAuthMethod:
    """One way of authenticating the client (RFC 6749 §2.3, RFC 7591's
    ``token_endpoint_auth_method``): it adds the client's proof to a form request.

    A new method (``private_key_jwt``, ``client_secret_jwt``...) is a subclass with its
    ``name`` and ``prepare``, added to :data:`CLIENT_AUTH_METHODS`.
    """

    name: str = ""
    #: Whether the method proves the client with its ``client_secret``.
    needs_secret: bool = True

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


#: The client authentication methods by name.
CLIENT_AUTH_METHODS: dict[str, ClientAuthMethod] = {
    method.name: method
    for method in (
        _Authlib("client_secret_post", needs_secret=True),
        _Authlib("client_secret_basic", needs_secret=True),
        _Authlib("none", needs_secret=False),
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

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("client_id is required")
        if self.method.needs_secret and not self.client_secret:
            raise ValueError(f"{self.method.name} needs a client_secret")

    def prepare(self, url: str, body: str) -> Prepared:
        """A POST of the form ``body`` to ``url``, authenticated as this client."""
        return self.method.prepare(self, url, dict(_FORM_HEADERS), body)
