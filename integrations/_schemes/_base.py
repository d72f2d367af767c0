"""The AuthScheme base class, the request an auth flow signs, and the registry of schemes."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from yarl import URL

from .._errors import ConfigurationError, NotConfigured, NotConnected
from .._setup import SetupField
from ._kinds import AuthHeader, apply_header, header_kind, url_secrets

__all__ = [
    "Answer",
    "AuthContext",
    "AuthScheme",
    "ProviderView",
    "Request",
    "SchemeRegistry",
    "missing_credential",
]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True, slots=True, repr=False)
class Request:
    """One request, built once per call (URL checked against the provider's hosts, headers
    and options checked, body encoded), then handed through the scheme's auth flow to the
    HTTP client's one ``send``.

    ``body`` is the encoded body (bytes) when it can be sent again, which is what a
    scheme that signs the body needs; ``replayable`` is False for a stream. ``credentials``
    are what the flow chose to sign with (the stored ones, or with a fresh access token);
    the pipeline signs each hop to the request's origin with them through the scheme's
    :meth:`AuthScheme.sign`.
    """

    method: str
    url: URL
    #: The caller's headers, checked (None: none given).
    headers: Mapping[str, str] | None = None
    body: Any = None
    replayable: bool = True
    #: Per attempt: seconds or an ``aiohttp.ClientTimeout``; None: the client's default.
    timeout: Any = None
    follow_redirects: bool = True
    max_attempts: int | None = None
    #: Further aiohttp request options, checked.
    options: Mapping[str, Any] = field(default_factory=dict)
    credentials: Mapping[str, Any] | None = field(default=None, repr=False)

    def with_credentials(self, credentials: Mapping[str, Any]) -> Request:
        """This request, to be signed with ``credentials``."""
        return replace(self, credentials=credentials)

    def __repr__(self) -> str:
        # The path and query may carry personal data or a key: show the origin only.
        return f"<Request {self.method} {self.url.origin() if self.url.absolute else '<url>'}>"


class ProviderView(Protocol):
    """What a scheme reads of a provider (``integrations.Provider`` is one)."""

    @property
    def key(self) -> str: ...
    @property
    def auth_type(self) -> str: ...
    @property
    def authorize_url(self) -> str | None: ...
    @property
    def token_url(self) -> str | None: ...
    @property
    def request_token_url(self) -> str | None: ...
    @property
    def scopes(self) -> tuple[str, ...]: ...
    @property
    def scope_separator(self) -> str: ...
    @property
    def token_auth(self) -> str: ...
    @property
    def setup_fields(self) -> tuple[SetupField, ...]: ...
    @property
    def auth_header(self) -> AuthHeader | None: ...

    def template_values(self, data: Mapping[str, Any]) -> dict[str, Any]: ...
    def render_url(self, template: str, data: Mapping[str, Any]) -> str: ...
    def is_configured(self, data: Mapping[str, Any]) -> bool: ...


class Answer(Protocol):
    """What a flow sees of a response (``integrations.Response`` is one)."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def body(self) -> bytes: ...


class AuthContext(Protocol):
    """What a flow may ask of the connection it signs for."""

    @property
    def provider(self) -> ProviderView: ...

    @property
    def credentials(self) -> Mapping[str, Any]:
        """The connection's decrypted credentials (setup fields and tokens)."""
        ...

    async def access_token(self) -> str:
        """A valid access token (renewed first when it is due); token schemes only."""
        ...

    async def renew(self, rejected: str) -> str:
        """The token to retry with after the API rejected ``rejected`` (the same one when
        another process already stored a newer grant that is also ``rejected``)."""
        ...

    def rejected(self, response: Answer) -> bool:
        """Whether the answer says the credentials were rejected (the provider's
        ``refresh_on`` statuses, or its rule on the body)."""
        ...


class AuthScheme:
    """One kind of credential: what it stores, how it renews, how it signs a request.

    Subclass it and register an instance, with ``Integrations(auth_schemes=[...])`` or
    :func:`integrations.register_auth_scheme`; a provider names it by ``auth_type``. A
    scheme owns, in one place:

    - ``setup_fields()`` and ``auth_header()``: the defaults of a provider that gives none;
    - which stored fields are secrets (its setup fields declared ``secret=True``, plus
      ``secret_fields``);
    - ``runtime_fields()``: the fields whose presence means calls can be made, and
      ``disconnect_drops()``: the ones ``disconnect`` removes;
    - ``describe()``: one line for the CLI, the console and the docs;
    - ``sign()``: the headers (and URL) of one hop of a request, and ``auth_flow()``: the
      request's whole authentication, in the style of httpx's ``Auth.auth_flow``. The
      flow yields the request to send, receives the response, and may yield it once
      more (after renewing its credentials); the pipeline sends at most two.

    Flags say what the rest of the library may do with a connection of this kind:
    ``uses_access_token`` (OAuth-style access tokens kept by the tokens service),
    ``authorizes_user`` (a user grants access through an authorization redirect),
    ``uses_request_token`` (that redirect is OAuth 1.0a's, after temporary credentials),
    ``freeform`` (the stored ``credentials`` map holds any keys, every value secret).
    """

    #: The ``auth_type`` of providers that use this scheme.
    name: str = ""
    #: How the CLI, the console and the docs name it.
    label: str = ""
    uses_access_token: bool = False
    authorizes_user: bool = False
    #: The authorization starts with temporary credentials from the provider's
    #: ``request_token_url`` (OAuth 1.0a), not with an OAuth 2.0 authorization request.
    uses_request_token: bool = False
    #: Calls present the connection's client certificate whatever the provider says.
    client_certificate: bool = False
    freeform: bool = False
    #: Stored fields that are always secrets under this scheme, declared or not.
    secret_fields: frozenset[str] = frozenset()

    # -- what a provider of this kind stores ------------------------------------------------

    def setup_fields(self, spec: Mapping[str, Any]) -> tuple[SetupField, ...]:
        """The setup fields of a provider that declares none (``spec``: the provider's
        other arguments, so that ``token_auth="none"`` can make a secret optional)."""
        return ()

    def auth_header(self) -> AuthHeader | None:
        """The auth header of a provider that declares none."""
        return None

    def expand_setup(self, attrs: Mapping[str, Any]) -> Mapping[str, Any]:
        """Setup attributes as given, before their fields are checked: a scheme may accept
        a whole file as issued and expand it into its fields (InvalidField naming the
        field when it can't, never echoing the value)."""
        return attrs

    def check_provider(self, provider: ProviderView) -> None:
        """Refuse (ValueError, naming the field) a provider this scheme cannot serve."""

    def runtime_fields(self, provider: ProviderView) -> tuple[str, ...]:
        """Data keys whose presence means the connection can make calls."""
        header = provider.auth_header
        if header is not None:
            return header.fields
        return tuple(f.key for f in provider.setup_fields if f.required)

    def has_runtime_credentials(self, provider: ProviderView, data: Mapping[str, Any]) -> bool:
        return all(not _blank(data.get(key)) for key in self.runtime_fields(provider))

    def disconnect_drops(self, provider: ProviderView) -> tuple[str, ...]:
        """The stored fields ``disconnect`` removes (tokens are dropped for every scheme)."""
        return self.runtime_fields(provider)

    def describe(self, provider: ProviderView) -> str:
        """One line saying how requests are authenticated, for people."""
        header = provider.auth_header
        if header is None:
            return self.label or self.name
        kind = header_kind(header.kind)
        return kind.describe(header) if kind is not None else header.kind

    # -- requests ---------------------------------------------------------------------------

    def sign(
        self,
        provider: ProviderView,
        credentials: Mapping[str, Any],
        method: str,
        url: URL,
        body: bytes | None,
    ) -> tuple[dict[str, str], URL]:
        """The headers to add and the URL to send for one hop of a request."""
        values = provider.template_values(credentials)
        return apply_header(provider.auth_header, values, method, url, body, missing=self.missing)

    def prepared_headers(
        self, provider: ProviderView, credentials: Mapping[str, Any]
    ) -> dict[str, str] | None:
        """Headers that depend on the credentials alone (not on the URL, method or body),
        built once per stored row version; None when each request is signed anew."""
        return None

    def signs_body(self, provider: ProviderView) -> bool:
        """Whether :meth:`sign` covers the body (which must then be replayable bytes)."""
        header = provider.auth_header
        kind = header_kind(header.kind) if header is not None else None
        return kind is not None and kind.signs_body

    def url_secrets(
        self, provider: ProviderView, credentials: Mapping[str, Any]
    ) -> tuple[str, ...]:
        """Credential strings that :meth:`sign` puts in the URL, to hide from logs and
        errors and to keep off redirects to other hosts."""
        return url_secrets(provider.auth_header, provider.template_values(credentials))

    async def auth_flow(self, request: Request, auth: AuthContext) -> AsyncGenerator[Request, Any]:
        """Sign with the stored credentials and send once."""
        yield request.with_credentials(auth.credentials)

    def missing(self, key: str) -> Exception:
        """The error for a credential the request needs but the connection lacks."""
        return missing_credential(key)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def missing_credential(key: str) -> Exception:
    if key == "access_token":
        return NotConnected()
    return NotConfigured(f"The connection has no {key!r} saved: call save_setup first.", field=key)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class SchemeRegistry:
    """Auth schemes by name; a name that is taken is refused. ``parent``: the registry this
    one extends (an application's schemes on top of the built-ins)."""

    def __init__(
        self, schemes: Iterable[AuthScheme] = (), *, parent: SchemeRegistry | None = None
    ) -> None:
        self._parent = parent
        self._schemes: dict[str, AuthScheme] = {}
        for scheme in schemes:
            self.register(scheme)

    def register(self, scheme: AuthScheme) -> AuthScheme:
        if not isinstance(scheme, AuthScheme):
            raise TypeError(f"expected an AuthScheme instance, got {type(scheme).__name__}")
        name = scheme.name
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigurationError(
                f"An auth scheme's name must match {_NAME_RE.pattern} (it is the providers' "
                f"auth_type), got {name!r}."
            )
        if self.find(name) is not None:
            raise ConfigurationError(
                f"An auth scheme named {name!r} is already registered; give yours another name."
            )
        self._schemes[name] = scheme
        return scheme

    def find(self, name: object) -> AuthScheme | None:
        if not isinstance(name, str):
            return None
        found = self._schemes.get(name)
        if found is None and self._parent is not None:
            return self._parent.find(name)
        return found

    def get(self, name: str) -> AuthScheme:
        found = self.find(name)
        if found is None:
            raise ConfigurationError(
                f"No auth scheme named {name!r} is registered (known: {', '.join(self.names())}); "
                "register it with Integrations(auth_schemes=[...]) or "
                "integrations.register_auth_scheme()."
            )
        return found

    def names(self) -> list[str]:
        return sorted(scheme.name for scheme in self)

    def __iter__(self) -> Iterator[AuthScheme]:
        seen = dict(self._schemes)
        if self._parent is not None:
            for scheme in self._parent:
                seen.setdefault(scheme.name, scheme)
        return iter(seen.values())

    def __contains__(self, name: object) -> bool:
        return self.find(name) is not None
