"""Header kinds: how stored credentials ride on a request (header, basic, path, sigv4), and
the AuthHeader a provider declares."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from pydantic import model_validator
from yarl import URL

from .. import _aws
from .._errors import ConfigurationError, InvalidField, InvalidInput
from .._input import check_header_value
from .._setup import _Frozen
from .._templates import render, template_fields

__all__ = [
    "AUTH_KINDS",
    "AuthApply",
    "AuthHeader",
    "AuthKind",
    "apply_header",
    "header_kind",
    "register_auth_kind",
    "url_secrets",
]

#: Builds what a request carries: (header, credential values, URL, method, body) in, the
#: headers to add and the final URL out.
AuthApply = Callable[
    ["AuthHeader", Mapping[str, Any], URL, str, "bytes | None"], tuple[dict[str, str], URL]
]


class AuthHeader(_Frozen):
    """How stored credentials are attached to a request.

    - ``kind="header"``: header ``name`` set to ``template`` rendered with the
      credentials (``"Bearer {access_token}"``, ``"Bot {bot_token}"``, ``"{api_key}"``).
    - ``kind="basic"``: HTTP Basic from the ``username`` and ``password`` fields.
    - ``kind="path"``: ``template`` (e.g. ``"/bot{bot_token}"``) is put in front
      of the URL path; Telegram's ``https://api.telegram.org/getMe`` becomes
      ``https://api.telegram.org/bot<token>/getMe``.
    - ``kind="query"``: the query parameter ``name`` set to ``template`` rendered with the
      credentials (``AuthHeader(kind="query", name="key", template="{api_key}")`` sends
      ``?key=...``); like a path token, it is hidden in logs, errors and redacted URLs and
      never follows a redirect to another host.
    - ``kind="sigv4"``: AWS Signature Version 4 from ``access_key``,
      ``secret_key`` and optional ``session_token`` (needs the ``aws`` extra).
    - any kind registered with ``integrations.register_auth_kind``.
    """

    kind: str = "header"
    name: str = "Authorization"
    template: str = "Bearer {access_token}"
    username: str = "access_key"
    password: str = "secret_key"

    @model_validator(mode="after")
    def _check(self) -> AuthHeader:
        template_fields(self.template)
        kind = header_kind(self.kind)
        if kind is not None and kind.check is not None:
            kind.check(self)
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", self.name):
            raise ValueError("header name is not a valid HTTP token")
        return self

    @property
    def fields(self) -> tuple[str, ...]:
        """The credential keys this header is built from (its kind says which)."""
        kind = header_kind(self.kind)
        return kind.fields(self) if kind is not None else template_fields(self.template)


def _template_fields(header: AuthHeader) -> tuple[str, ...]:
    return template_fields(header.template)


def _template_text(header: AuthHeader) -> str:
    return f"`{header.name}: {header.template}`"


@dataclass(frozen=True, slots=True)
class AuthKind:
    """A registered way of attaching credentials; ``in_path``: the URL carries them (so
    redirects and logs must hide it); ``signs_body``: the body must be replayable bytes;
    ``reusable``: the headers depend on the credentials alone (not on the URL, method or
    body), so they may be built once per stored row version. ``fields``: the credential
    keys an ``AuthHeader`` of this kind is built from; ``describe``: one line for people;
    ``check``: refuses (ValueError) a malformed ``AuthHeader`` of this kind."""

    name: str
    apply: AuthApply
    in_path: bool = False
    signs_body: bool = False
    reusable: bool = False
    fields: Callable[[AuthHeader], tuple[str, ...]] = _template_fields
    describe: Callable[[AuthHeader], str] = _template_text
    check: Callable[[AuthHeader], None] | None = None


#: Auth header kinds by name (``AuthHeader(kind=name)``).
AUTH_KINDS: dict[str, AuthKind] = {}


def register_auth_kind(
    name: str,
    apply: AuthApply,
    *,
    in_path: bool = False,
    signs_body: bool = False,
    reusable: bool = False,
    fields: Callable[[AuthHeader], tuple[str, ...]] | None = None,
    describe: Callable[[AuthHeader], str] | None = None,
    check: Callable[[AuthHeader], None] | None = None,
) -> AuthKind:
    """Register an auth header kind; a name that is taken is refused."""
    if not isinstance(name, str) or not name:
        raise ValueError("an auth header kind needs a non-empty name")
    if name in AUTH_KINDS:
        raise ValueError(f"an auth header kind named {name!r} is already registered")
    kind = AuthKind(
        name,
        apply,
        in_path=in_path,
        signs_body=signs_body,
        reusable=reusable,
        fields=fields or _template_fields,
        describe=describe or _template_text,
        check=check,
    )
    AUTH_KINDS[name] = kind
    return kind


def header_kind(name: str) -> AuthKind | None:
    return AUTH_KINDS.get(name)


def _header_value(value: Any, key: str) -> str:
    try:
        return check_header_value(str(value), key)
    except InvalidInput:
        # Named as the setup field it came from; the value is a secret.
        raise InvalidField(
            f"Setup field {key!r} contains a control character.", field=key
        ) from None


def apply_header(
    header: AuthHeader | None,
    values: Mapping[str, Any],
    method: str,
    url: URL,
    body: bytes | None,
    *,
    missing: Callable[[str], Exception],
) -> tuple[dict[str, str], URL]:
    """The headers and URL that ``header`` makes of the credential ``values`` (a provider's
    template values: setup defaults, stored data and the freeform map)."""
    if header is None:
        return {}, url
    for key in header.fields:
        if key not in values:
            raise missing(key)
    kind = AUTH_KINDS.get(header.kind)
    if kind is None:
        raise ConfigurationError(f"No auth header kind named {header.kind!r} is registered.")
    return kind.apply(header, values, url, method, body)


def url_secrets(header: AuthHeader | None, values: Mapping[str, Any]) -> tuple[str, ...]:
    """The credential strings a request URL may carry, in every spelling, longest first."""
    kind = AUTH_KINDS.get(header.kind) if header is not None else None
    # Only a kind that puts credentials in the URL can leak them there.
    if header is None or kind is None or not kind.in_path:
        return ()
    out: set[str] = set()
    for key in header.fields:
        value = values.get(key)
        if value is not None and str(value):
            text = str(value)
            # As a path segment and as a query value (yarl's own encoding of one).
            query = URL.build(query={"k": text}).raw_query_string[2:]
            out.update({text, quote(text, safe=":"), quote(text, safe=""), query})
    return tuple(sorted(out, key=len, reverse=True))


# -- the built-in kinds --------------------------------------------------------------------


def _header_auth(
    header: AuthHeader, values: Mapping[str, Any], target: URL, method: str, body: bytes | None
) -> tuple[dict[str, str], URL]:
    # Only the fields the template names: others (a multi-line key) never reach a header.
    rendered = {k: _header_value(values[k], k) for k in template_fields(header.template)}
    return {header.name: render(header.template, rendered)}, target


def _basic_auth(
    header: AuthHeader, values: Mapping[str, Any], target: URL, method: str, body: bytes | None
) -> tuple[dict[str, str], URL]:
    user = _header_value(values[header.username], header.username)
    if ":" in user:
        raise InvalidField(
            f"Setup field {header.username!r} must not contain ':'.", field=header.username
        )
    password = _header_value(values[header.password], header.password)
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}, target


def _path_auth(
    header: AuthHeader, values: Mapping[str, Any], target: URL, method: str, body: bytes | None
) -> tuple[dict[str, str], URL]:
    prefix = render(header.template, {k: quote(str(v), safe=":") for k, v in values.items()})
    path = target.raw_path
    if path != prefix and not path.startswith(prefix + "/"):
        target = target.with_path(prefix + path, encoded=True, keep_query=True)
    return {}, target


def _query_auth(
    header: AuthHeader, values: Mapping[str, Any], target: URL, method: str, body: bytes | None
) -> tuple[dict[str, str], URL]:
    # Only the fields the template names: others (a multi-line key) never reach a header.
    rendered = {k: _header_value(values[k], k) for k in template_fields(header.template)}
    # The parameter replaces one of the same name the caller may have put in the URL.
    return {}, target.update_query({header.name: render(header.template, rendered)})


def _check_path(header: AuthHeader) -> None:
    if not header.template.startswith("/"):
        raise ValueError("a path template must start with '/'")


def _sigv4_auth(
    header: AuthHeader, values: Mapping[str, Any], target: URL, method: str, body: bytes | None
) -> tuple[dict[str, str], URL]:
    service, region = _aws.service_and_region(
        target.raw_host or "", str(values.get("region") or "us-east-1")
    )
    signed = _aws.sign(method, str(target), {}, body, dict(values), service=service, region=region)
    return signed, target


register_auth_kind("header", _header_auth, reusable=True)
register_auth_kind(
    "basic",
    _basic_auth,
    reusable=True,
    fields=lambda header: (header.username, header.password),
    describe=lambda header: f"Basic `{header.username}:{header.password}`",
)
register_auth_kind(
    "path",
    _path_auth,
    in_path=True,
    describe=lambda header: f"URL path `{header.template}`",
    check=_check_path,
)
register_auth_kind(
    "query",
    _query_auth,
    in_path=True,
    describe=lambda header: f"query parameter `{header.name}={header.template}`",
)
register_auth_kind(
    "sigv4",
    _sigv4_auth,
    signs_body=True,
    fields=lambda header: ("access_key", "secret_key"),
    describe=lambda header: "AWS SigV4",
)
