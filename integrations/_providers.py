"""Providers as data: the Provider model, its setup fields, and the registry of known providers."""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal
from urllib.parse import quote

from pydantic import (
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import oauth
from ._errors import (
    InvalidField,
    MissingField,
)
from ._input import MAX_ATTRS_BYTES, check_attrs, check_secret_text
from ._names import PROVIDER_KEY_RE
from ._schemes import CERTIFICATE_FIELDS, SCHEMES, AuthHeader, AuthScheme, SchemeRegistry
from ._setup import SetupField, _Frozen
from ._templates import render, template_fields
from ._vault import SECRET_FIELDS

__all__ = [
    "AUTH_TYPES",
    "AuthHeader",
    "Provider",
    "RejectedAnswer",
    "SetupField",
    "UserinfoMap",
    "ValidationRequest",
]

#: The auth types of the built-in schemes; applications register more (``AuthScheme``).
AUTH_TYPES: tuple[str, ...] = (
    "oauth2",
    "oauth2_client_credentials",
    "api_key",
    "key_secret",
    "bot_token",
    "credentials",
    "oauth1",
    "mtls",
)
_AUTH_TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]*$")

_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@functools.lru_cache(maxsize=1024)
def split_host_entry(entry: str) -> tuple[str, int | None]:
    """``"host"``, ``"host:port"``, ``"[::1]:8080"`` or ``"*.domain"`` as (lowercase host, port)."""
    entry = entry.strip().lower()
    port: int | None = None
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"malformed api host {entry!r}")
        port_text = rest[1:] if rest else None
    elif entry.count(":") == 1:
        host, port_text = entry.split(":")
    else:
        host, port_text = entry, None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"malformed port in api host {entry!r}")
        port = int(port_text)
    host = host.rstrip(".")
    pattern = host[2:] if host.startswith("*.") else host
    if not pattern or any(c in pattern for c in "*/@?#[] "):
        raise ValueError(f"api hosts are 'host', 'host:port' or '*.domain', not {entry!r}")
    if "{" in host and host.startswith("*."):
        raise ValueError(f"a templated api host cannot also be a wildcard: {entry!r}")
    return host, port


#: A host name (labels of letters, digits and inner hyphens), optionally with a port.
_HOST_NAME_RE = re.compile(
    r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*(?::[0-9]{1,5})?"
)
#: What a setup field may hold when it is put into a host: host name characters only, so
#: that no value can end the host early ("evil.com#", "a.evil.com/", "x@evil.com").
_HOST_VALUE_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?")


def url_authority(template: str) -> str:
    """The authority part of a URL template (what sits between ``//`` and the path)."""
    _, sep, rest = template.partition("//")
    if not sep:
        return ""
    return re.split(r"[/?#]", rest, maxsplit=1)[0]


def host_value_ok(value: str) -> bool:
    """Whether ``value`` may be put into a host: host name characters, no empty label."""
    return bool(_HOST_VALUE_RE.fullmatch(value)) and ".." not in value


class ValidationRequest(_Frozen):
    """The probe that tells whether credentials work.

    ``url`` is a template over the setup fields and credentials (placeholders
    are percent-encoded). A response is a success when its status is in
    ``success`` (any 2xx when empty) and, if ``json_ok_key`` is set, the JSON
    body has that key truthy (Slack answers 200 with ``"ok": false``).
    ``invalid_statuses`` are read as "Invalid credentials". ``hook`` names a
    registered non-HTTP check (built in: ``"smtp"``, ``"postgres"``; see
    ``integrations.register_check``) used instead of the request. ``json_ok_key`` may be
    a dotted path (``"data.viewer.id"``); ``body`` is a JSON body sent with the check (a
    GraphQL ``{"query": "{ viewer { id } }"}``).
    """

    method: str = "GET"
    url: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
    body: dict[str, Any] | None = None
    success: tuple[int, ...] = ()
    invalid_statuses: tuple[int, ...] = (401,)
    json_ok_key: str | None = None
    hook: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ValidationRequest:
        if self.hook is None:
            if not self.url:
                raise ValueError("a validation request needs a url or a hook")
            template_fields(self.url)
        return self

    def is_success(self, status: int) -> bool:
        return status in self.success if self.success else 200 <= status < 300

    def ok_in(self, payload: Any) -> bool:
        """Whether ``json_ok_key`` (a dotted path) holds a truthy value in ``payload``."""
        for part in (self.json_ok_key or "").split("."):
            if not isinstance(payload, Mapping):
                return False
            payload = payload.get(part)
        return bool(payload)


class UserinfoMap(_Frozen):
    """Where the account's email, name, picture and id sit in the userinfo JSON: candidate
    keys, first non-blank wins; a key may be a dotted path (``"user.email"``). The
    defaults fit OpenID Connect userinfo."""

    email: tuple[str, ...] = oauth.USERINFO_EMAIL
    name: tuple[str, ...] = oauth.USERINFO_NAME
    picture: tuple[str, ...] = oauth.USERINFO_PICTURE
    account_id: tuple[str, ...] = oauth.USERINFO_ACCOUNT_ID

    def apply(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """``{"email", "name", "picture", "account_id"}``, ``None`` where nothing matched."""
        return oauth.map_userinfo(
            payload,
            email=self.email,
            name=self.name,
            picture=self.picture,
            account_id=self.account_id,
        )


class RejectedAnswer(_Frozen):
    """An answer that means "these credentials were rejected", told by its body: the
    status is one of ``statuses`` and the JSON body's ``key`` (a dotted path) holds one of
    ``values``."""

    statuses: tuple[int, ...] = (200,)
    key: str = "error"
    values: tuple[str, ...]

    @model_validator(mode="after")
    def _check(self) -> RejectedAnswer:
        if not self.values or not self.key:
            raise ValueError("a rejected answer names a key and at least one value")
        if any(not 100 <= status <= 599 for status in self.statuses):
            raise ValueError("statuses are HTTP statuses (100-599)")
        return self

    def matches(self, status: int, body: bytes) -> bool:
        if status not in self.statuses or not body or len(body) > _REJECTED_BODY_LIMIT:
            return False
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return False
        for part in self.key.split("."):
            if not isinstance(payload, Mapping):
                return False
            payload = payload.get(part)
        return isinstance(payload, str) and payload in self.values


# Per-tenant copies kept per provider (one per distinct set of host values).
_TENANTS_KEPT = 256

# Bodies longer than this are not parsed to look for a rejection.
_REJECTED_BODY_LIMIT = 64 * 1024


class Provider(_Frozen):
    """A service that connections can be made to, described as data.

    Built with keyword fields. ``auth_type`` names a registered :class:`AuthScheme`
    (built in: ``oauth2``, ``oauth2_client_credentials``, ``api_key``, ``key_secret``,
    ``bot_token``, ``credentials``). When ``setup_fields`` or ``auth_header`` are not
    given the scheme's defaults apply (oauth2: client_id + client_secret and
    ``Bearer {access_token}``; api_key: api_key and ``Bearer {api_key}``;
    bot_token: bot_token and ``Bearer {bot_token}``; key_secret: access_key +
    secret_key and Basic; credentials: freeform, no header). ``refresh_on`` and
    ``rejected_answers`` say which answers mean "credentials rejected".
    """

    key: str
    name: str
    auth_type: str
    authorize_url: str | None = None
    token_url: str | None = None
    #: OAuth 1.0a: the temporary credentials endpoint (RFC 5849 §2.1).
    request_token_url: str | None = None
    userinfo_url: str | None = None
    revoke_url: str | None = None
    #: Where a device authorization starts (RFC 8628), for providers that offer the flow.
    device_authorization_url: str | None = None
    scopes: tuple[str, ...] = ()
    scope_separator: str = " "
    authorize_params: dict[str, str] = Field(default_factory=dict)
    token_auth: Literal["client_secret_post", "client_secret_basic", "none", "private_key_jwt"] = (
        "client_secret_post"
    )
    #: private_key_jwt: the ``aud`` of the client's assertions, a URL template filled from the
    #: connection's data (Auth0 wants its tenant's URL, ``https://{domain}/``). Unset: the URL
    #: of the endpoint the assertion is sent to (RFC 7523 §3).
    client_assertion_audience: str | None = None
    pkce: bool = True
    setup_fields: tuple[SetupField, ...] = ()
    api_hosts: tuple[str, ...] = ()
    auth_header: AuthHeader | None = None
    validation: ValidationRequest | None = None
    userinfo_map: UserinfoMap = Field(default_factory=UserinfoMap)
    #: Statuses with which the API says "this token is rejected": refresh once and retry.
    refresh_on: tuple[int, ...] = (401,)
    #: Answers that say so in their body (Slack: 200 with ``{"ok": false, "error":
    #: "token_expired"}``), or with a status other than ``refresh_on``.
    rejected_answers: tuple[RejectedAnswer, ...] = ()
    #: Whether the token endpoint replaces the refresh token at each refresh (and may
    #: refuse, or revoke the grant, when a replaced one comes back). When a refresh may
    #: have been received but its answer was lost, a rotating provider's connection is
    #: marked for a new authorization instead of sending the spent token again. Unknown
    #: providers are assumed to rotate.
    rotates_refresh_tokens: bool = True
    #: Mutual TLS: each connection saves a client certificate and its key (PEM; setup fields
    #: ``client_certificate`` and ``client_key``, added to the scheme's), presented on its API
    #: calls and token requests (RFC 8705 certificate-bound tokens).
    mtls: bool = False
    #: PEM certificates to trust for this provider's hosts instead of the system's (a
    #: private API's own CA).
    ca_bundle: str | None = None
    description: str = ""
    docs_url: str | None = None
    # An application provider with this set replaces the built-in of the same key.
    override: bool = False

    # The scheme this provider was bound to by a registry with application schemes.
    _scheme: Any = PrivateAttr(default=None)
    # Copies with per-tenant api_hosts rendered, by the host fields' values.
    _tenants: dict[tuple[str, ...], Provider] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _defaults_by_auth_type(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict):
            scheme = _schemes_of(info).find(data.get("auth_type"))
            if scheme is not None:
                data = dict(data)
                if "setup_fields" not in data:
                    data["setup_fields"] = scheme.setup_fields(data)
                if data.get("mtls") or scheme.client_certificate:
                    data["setup_fields"] = _with_certificate_fields(data["setup_fields"])
                if "auth_header" not in data:
                    header = scheme.auth_header()
                    if header is not None:
                        data["auth_header"] = header
        return data

    @field_validator("auth_type")
    @classmethod
    def _check_auth_type(cls, value: str) -> str:
        if not _AUTH_TYPE_RE.match(value):
            raise ValueError(
                "auth_type names a registered auth scheme, such as 'oauth2' or 'api_key'"
            )
        return value

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        if not _KEY_RE.match(value):
            raise ValueError("provider key must match ^[a-z0-9][a-z0-9_-]*$")
        return value

    @field_validator("api_hosts")
    @classmethod
    def _check_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        hosts = tuple(host.strip().lower() for host in value)
        for host in hosts:
            split_host_entry(host)
        return hosts

    @model_validator(mode="after")
    def _check(self) -> Provider:
        self._check_with_scheme()
        return self

    def _check_with_scheme(self) -> None:
        keys = [field.key for field in self.setup_fields]
        if len(set(keys)) != len(keys):
            raise ValueError("setup field keys must be unique")
        scheme = self._known_scheme()
        if scheme is not None:
            scheme.check_provider(self)
        for url in (
            self.authorize_url,
            self.token_url,
            self.userinfo_url,
            self.revoke_url,
            self.device_authorization_url,
            self.request_token_url,
        ):
            if url is not None:
                template_fields(url)
        fields = {field.key: field for field in self.setup_fields}
        for name in self.host_fields:
            field = fields.get(name)
            if field is None:
                raise ValueError(f"a host uses {{{name}}}, which is not a setup field")
            if field.secret or field.pattern is None or field.type != "string":
                raise ValueError(
                    f"setup field {name!r} goes into a host: it must be a string field with a "
                    "pattern (such as '[a-z0-9][a-z0-9-]*') and not a secret"
                )
        if self.auth_header is not None and scheme is not None and not scheme.freeform:
            known = set(keys) | {"access_token"}
            unknown = [name for name in self.auth_header.fields if name not in known]
            if unknown:
                raise ValueError(f"auth header uses {unknown[0]!r}, which is not a setup field")

    @functools.cached_property
    def host_fields(self) -> tuple[str, ...]:
        """Setup fields templated into a host: into ``api_hosts`` or the authority of a
        URL (per-tenant hosts such as ``{subdomain}.zendesk.com``)."""
        names: list[str] = []
        templates = list(self.api_hosts)
        urls = (
            self.authorize_url,
            self.token_url,
            self.userinfo_url,
            self.revoke_url,
            self.request_token_url,
        )
        templates += [url_authority(url) for url in urls if url]
        if self.validation is not None and self.validation.url:
            templates.append(url_authority(self.validation.url))
        for template in templates:
            for name in template_fields(template):
                if name not in names:
                    names.append(name)
        return tuple(names)

    def for_data(self, data: Mapping[str, Any]) -> Provider:
        """This provider with its per-tenant ``api_hosts`` rendered from a connection's
        (non-secret) setup values. A host whose value is missing or not a well-formed part
        of a host name is left out, so calls to it are refused rather than sent elsewhere."""
        if not any("{" in host for host in self.api_hosts):
            return self
        values = self.template_values(data)
        key = tuple(str(values.get(name, "")) for name in self.host_fields)
        bound = self._tenants.get(key)
        if bound is not None:
            return bound
        hosts: list[str] = []
        for template in self.api_hosts:
            host = self._render_host(template, values)
            if host is not None and host not in hosts:
                hosts.append(host)
        bound = self.model_copy(update={"api_hosts": tuple(hosts)})
        bound._tenants = {}
        if len(self._tenants) >= _TENANTS_KEPT:
            self._tenants.clear()
        self._tenants[key] = bound
        return bound

    def _render_host(self, template: str, values: Mapping[str, Any]) -> str | None:
        names = template_fields(template)
        if not names:
            return template
        fields = {field.key: field for field in self.setup_fields}
        rendered: dict[str, str] = {}
        for name in names:
            value = values.get(name)
            if not isinstance(value, str) or not self._host_value_fits(fields.get(name), value):
                return None
            rendered[name] = value.lower()
        host = render(template, rendered)
        return host if _HOST_NAME_RE.fullmatch(host) else None

    @staticmethod
    def _host_value_fits(field: SetupField | None, value: str) -> bool:
        if field is None or field.pattern is None or not host_value_ok(value):
            return False
        return re.fullmatch(field.pattern, value) is not None

    @field_validator("refresh_on")
    @classmethod
    def _check_refresh_on(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 400 <= status <= 499 for status in value):
            raise ValueError("refresh_on holds 4xx statuses, such as (401,) or (401, 403)")
        return value

    def _known_scheme(self) -> AuthScheme | None:
        scheme: AuthScheme | None = self._scheme
        return scheme if scheme is not None else SCHEMES.find(self.auth_type)

    @functools.cached_property
    def scheme(self) -> AuthScheme:
        """The auth scheme named by ``auth_type``: the one this provider was registered
        with, else the module-level registry's (ConfigurationError when none is)."""
        scheme = self._known_scheme()
        if scheme is None:
            return SCHEMES.get(self.auth_type)
        return scheme

    def bind(self, schemes: SchemeRegistry) -> Provider:
        """This provider with its scheme taken from ``schemes`` (an application's own
        schemes on top of the built-ins): defaults filled in, checked by the scheme."""
        scheme = schemes.get(self.auth_type)
        if self._scheme is scheme or (self._scheme is None and scheme is self._known_scheme()):
            return self
        given = {name: getattr(self, name) for name in self.model_fields_set}
        bound = Provider.model_validate(given, context={"schemes": schemes})
        bound._scheme = scheme
        bound._check_with_scheme()
        return bound

    def rejects(self, status: int, body: bytes) -> bool:
        """Whether an API answer means the credentials were rejected (renew, retry once)."""
        if status in self.refresh_on:
            return True
        return any(rule.matches(status, body) for rule in self.rejected_answers)

    @property
    def presents_certificate(self) -> bool:
        """Whether calls present the connection's client certificate (``mtls``, or a
        scheme that authenticates by the certificate alone)."""
        return self.mtls or self.scheme.client_certificate

    @property
    def is_oauth(self) -> bool:
        """Whether calls carry an access token kept by the tokens service (its scheme says)."""
        return self.scheme.uses_access_token

    @functools.cached_property
    def secret_field_keys(self) -> frozenset[str]:
        """Setup fields declared ``secret=True``."""
        return frozenset(field.key for field in self.setup_fields if field.secret)

    @functools.cached_property
    def secret_keys(self) -> frozenset[str]:
        """Every data key whose value is a secret here: :data:`SECRET_FIELDS` and the
        fields declared ``secret=True``."""
        return self.secret_field_keys | SECRET_FIELDS | self.scheme.secret_fields

    @property
    def runtime_fields(self) -> tuple[str, ...]:
        """Data keys whose presence means the connection can make calls (its scheme says:
        the access token, the client credentials, the ``credentials`` map, or the fields
        the auth header is built from, such as Twilio's ``account_sid`` + ``auth_token``)."""
        return self.scheme.runtime_fields(self)

    def normalize_attrs(
        self, attrs: Mapping[str, Any], *, max_bytes: int = MAX_ATTRS_BYTES
    ) -> dict[str, Any]:
        """Validate setup attributes and return the patch to store.

        The whole input first passes ``_input.check_attrs`` (string keys, no NUL or
        unpaired surrogates, integers within ±(2**53-1), finite floats, nesting and
        size bounds, no ``$enc`` member anywhere). Known setup fields are then
        type-checked and coerced (surrounding whitespace removed; ``""`` for a
        non-string field means unset). Other keys are kept as given (save_setup refuses
        those whose names say they hold a secret). A secret (a
        :data:`SECRET_FIELDS` name or a field declared ``secret=True``) must not hold
        control characters, and a blank one means unset (None), so a required secret
        given blank is missing whatever the encryption setting. For ``credentials``
        providers every key given flat is moved under ``"credentials"`` (the freeform
        credential map; a nested ``"credentials"`` mapping is accepted too, flat keys
        win). The scheme may first expand what it accepts as given (a service account's key
        file into its fields). Errors name the field, never its value.
        """
        attrs = self.scheme.expand_setup(check_attrs(attrs, max_bytes=max_bytes))
        fields = {field.key: field for field in self.setup_fields}
        secrets = self.secret_keys

        def coerce(key: str, value: Any) -> Any:
            value = fields[key].coerce(value) if key in fields else value
            if key in secrets and isinstance(value, str):
                if not value.strip():
                    return None
                field = fields.get(key)
                check_secret_text(value, key, multiline=field is not None and field.type == "text")
            return value

        patch: dict[str, Any] = {}
        nested: dict[str, Any] = {}
        freeform = self.scheme.freeform
        if freeform and "credentials" in attrs:
            given = attrs["credentials"]
            if given is not None and not isinstance(given, Mapping):
                raise InvalidField(
                    "Setup field 'credentials' must be a mapping.", field="credentials"
                )
            for key, value in (given or {}).items():
                nested[key] = coerce(key, value)
        for key, value in attrs.items():
            if freeform and key == "credentials":
                continue
            coerced = coerce(key, value)
            if freeform:
                nested[key] = coerced
            else:
                patch[key] = coerced
        if freeform and (nested or "credentials" in attrs):
            patch["credentials"] = nested
        return patch

    def template_values(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """Stored data as one flat mapping: setup defaults, then data, then the ``credentials`` map.

        Blank values fall back to the field default.
        """
        out: dict[str, Any] = {}
        for key, value in data.items():
            if not _blank(value):
                out[key] = value
        creds = data.get("credentials")
        if isinstance(creds, Mapping) and self.scheme.freeform:
            for key, value in creds.items():
                if isinstance(key, str) and not _blank(value):
                    out[key] = value
        for field in self.setup_fields:
            if field.key not in out and field.default is not None:
                out[field.key] = field.default
        return out

    def render_url(self, template: str, data: Mapping[str, Any]) -> str:
        """A URL template (``token_url``, a validation URL, ...) filled from stored data.

        Values are percent-encoded so they cannot change the URL's structure; a
        blank field falls back to its default (Microsoft's ``tenant_id`` →
        ``common``). A placeholder without a value raises MissingField.
        """
        values = self.template_values(data)
        missing = [name for name in template_fields(template) if name not in values]
        if missing:
            raise MissingField(f"Setup field {missing[0]!r} is required.", field=missing[0])
        fields = {field.key: field for field in self.setup_fields}
        for name in template_fields(url_authority(template)):
            # Checked again here, not only when saved: a row may have been written by an
            # older release or by hand, and a host is where the credentials go.
            value = str(values[name])
            if not self._host_value_fits(fields.get(name), value):
                raise InvalidField(
                    f"Setup field {name!r} does not hold a valid host name part; "
                    "set it again with save_setup.",
                    field=name,
                )
        return render(template, {k: quote(str(v), safe="-._~") for k, v in values.items()})

    def missing_required(self, data: Mapping[str, Any]) -> list[str]:
        """Required setup fields that are absent or blank (and have no default)."""
        values = self.template_values(data)
        return [
            field.key for field in self.setup_fields if field.required and field.key not in values
        ]

    def is_configured(self, data: Mapping[str, Any]) -> bool:
        return not self.missing_required(data)

    def has_runtime_credentials(self, data: Mapping[str, Any]) -> bool:
        return self.scheme.has_runtime_credentials(self, data)

    def map_userinfo(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The account (email, name, picture, id) read from a userinfo response, as
        ``userinfo_map`` says."""
        return self.userinfo_map.apply(payload)


def _with_certificate_fields(fields: Any) -> Any:
    """``fields`` with the client certificate and key fields added where absent."""
    given = list(fields or ())
    keys = {f.key if isinstance(f, SetupField) else f.get("key") for f in given}
    for field in CERTIFICATE_FIELDS:
        if field.key not in keys:
            given.append(field)
    return tuple(given)


def _schemes_of(info: ValidationInfo) -> SchemeRegistry:
    context = info.context
    if isinstance(context, dict) and context.get("schemes") is not None:
        found: SchemeRegistry = context["schemes"]
        return found
    return SCHEMES


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def unknown_provider_message(key: str, known: Iterable[str]) -> str:
    """Name the unknown key, suggest the closest registered ones and say where the list is."""
    keys = list(known)
    # Case is compared loosely so "OpenAI" finds "openai".
    folded = {k.lower(): k for k in keys}
    close = [folded[m] for m in difflib.get_close_matches(key.lower(), folded, n=3, cutoff=0.6)]
    shown = key if len(key) <= 64 else key[:64] + "…"
    hint = (
        f"Did you mean {' or '.join(repr(k) for k in close)}?"
        if close
        else "No registered provider has this key."
        if PROVIDER_KEY_RE.fullmatch(key)
        else "Provider keys are lowercase, like 'openai' or 'google'."
    )
    return (
        f"Unknown provider {shown!r}. {hint} "
        "integ.list_providers() lists the registered ones; "
        "Integrations(providers=[...]) adds your own."
    )
