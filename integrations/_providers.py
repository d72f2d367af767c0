"""Providers as data: the Provider model, its setup fields, and the registry of known providers."""

from __future__ import annotations

import difflib
import functools
import re
import string
from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from yarl import URL

from . import oauth
from ._errors import (
    InvalidField,
    MissingField,
)
from ._input import MAX_ATTRS_BYTES, check_attrs, check_secret_text
from ._names import PROVIDER_KEY_RE
from ._vault import SECRET_FIELDS

__all__ = [
    "AUTH_TYPES",
    "AuthHeader",
    "Provider",
    "SetupField",
    "UserinfoMap",
    "ValidationRequest",
]

AuthType = Literal[
    "oauth2",
    "oauth2_client_credentials",
    "api_key",
    "key_secret",
    "bot_token",
    "credentials",
]
AUTH_TYPES: tuple[str, ...] = get_args(AuthType)
FieldType = Literal["string", "integer", "boolean", "choice", "url"]

_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_FIELD_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


@functools.lru_cache(maxsize=1024)
def template_fields(template: str) -> tuple[str, ...]:
    """Names of the ``{field}`` placeholders in a template; refuses anything but plain names."""
    names: list[str] = []
    for _literal, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not _FIELD_KEY_RE.match(name) or spec or conversion:
            raise ValueError(f"template placeholder {{{name}}} must be a plain field name")
        names.append(name)
    return tuple(names)


def render(template: str, values: Mapping[str, str]) -> str:
    """Fill a template's placeholders; a missing value raises KeyError naming the field."""
    return template.format_map({name: values[name] for name in template_fields(template)})


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
    return host, port


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SetupField(_Frozen):
    """One value an operator types when setting up a connection.

    ``default`` is used wherever the stored value is absent or blank (a blank
    Microsoft ``tenant_id`` means ``"common"``), so a required field with a
    default is never missing. ``pattern`` (a regular expression the whole
    string must match) keeps values that land in URLs, such as an AWS region,
    well formed; ``expected`` says in words what it accepts, for the error
    message a mismatch gets.
    """

    key: str
    label: str
    type: FieldType = "string"
    required: bool = False
    secret: bool = False
    help: str = ""
    choices: tuple[str, ...] = ()
    default: Any = None
    pattern: str | None = None
    expected: str = ""

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        if not _FIELD_KEY_RE.match(value):
            raise ValueError("setup field key must match ^[A-Za-z_][A-Za-z0-9_]*$")
        return value

    @model_validator(mode="after")
    def _check_choices(self) -> SetupField:
        if (self.type == "choice") != bool(self.choices):
            raise ValueError("choices are required for, and only for, type 'choice'")
        if self.pattern is not None:
            re.compile(self.pattern)
        return self

    def coerce(self, value: Any) -> Any:
        """The value to store, or InvalidField naming this field (never echoing the value)."""
        if value is None:
            return None
        if isinstance(value, str):
            value = value.strip()
            if value == "" and self.type != "string":
                return None
        if self.type == "string":
            if not isinstance(value, str):
                raise self._invalid("must be a string")
            if "\x00" in value:
                raise self._invalid("must not contain NUL characters")
            if self.pattern is not None and value and not re.fullmatch(self.pattern, value):
                raise self._invalid(self._wrong_format(value))
            return value
        if self.type == "integer":
            if isinstance(value, bool):
                raise self._invalid("must be an integer")
            if isinstance(value, int):
                return value
            if isinstance(value, str) and re.fullmatch(r"[+-]?\d{1,18}", value):
                return int(value)
            raise self._invalid("must be an integer")
        if self.type == "boolean":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise self._invalid("must be true or false")
        if self.type == "choice":
            if isinstance(value, str) and value in self.choices:
                return value
            raise self._invalid(f"must be one of: {', '.join(self.choices)}")
        # type == "url"
        if not isinstance(value, str):
            raise self._invalid("must be an absolute http(s) URL")
        try:
            url = URL(value)
        except (TypeError, ValueError):
            raise self._invalid("must be an absolute http(s) URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise self._invalid("must be an absolute http(s) URL")
        return value

    def _wrong_format(self, value: str) -> str:
        expected = self.expected or f"a value matching the regular expression {self.pattern}"
        # A secret's value is never echoed, even cut short.
        got = "" if self.secret else f", got {value[:40] + '…' if len(value) > 40 else value!r}"
        return f"has the wrong format{got}: expected {expected}"

    def _invalid(self, why: str) -> InvalidField:
        return InvalidField(f"Setup field {self.key!r} {why}.", field=self.key)


class AuthHeader(_Frozen):
    """How stored credentials are attached to a request.

    - ``kind="header"``: header ``name`` set to ``template`` rendered with the
      credentials (``"Bearer {access_token}"``, ``"Bot {bot_token}"``, ``"{api_key}"``).
    - ``kind="basic"``: HTTP Basic from the ``username`` and ``password`` fields.
    - ``kind="path"``: ``template`` (e.g. ``"/bot{bot_token}"``) is put in front
      of the URL path; Telegram's ``https://api.telegram.org/getMe`` becomes
      ``https://api.telegram.org/bot<token>/getMe``.
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
        if self.kind == "path" and not self.template.startswith("/"):
            raise ValueError("a path template must start with '/'")
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", self.name):
            raise ValueError("header name is not a valid HTTP token")
        return self

    @property
    def fields(self) -> tuple[str, ...]:
        """The credential keys this header is built from."""
        if self.kind == "basic":
            return (self.username, self.password)
        if self.kind == "sigv4":
            return ("access_key", "secret_key")
        return template_fields(self.template)


class ValidationRequest(_Frozen):
    """The probe that tells whether credentials work.

    ``url`` is a template over the setup fields and credentials (placeholders
    are percent-encoded). A response is a success when its status is in
    ``success`` (any 2xx when empty) and, if ``json_ok_key`` is set, the JSON
    body has that key truthy (Slack answers 200 with ``"ok": false``).
    ``invalid_statuses`` are read as "Invalid credentials". ``hook`` names a
    registered non-HTTP check (built in: ``"smtp"``, ``"postgres"``; see
    ``integrations.register_check``) used instead of the request.
    """

    method: str = "GET"
    url: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
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


_OAUTH_FIELDS = (
    SetupField(key="client_id", label="Client ID", required=True),
    SetupField(key="client_secret", label="Client secret", required=True, secret=True),
)
# A public client (PKCE, token_auth="none") has no secret to require.
_PUBLIC_OAUTH_FIELDS = (
    SetupField(key="client_id", label="Client ID", required=True),
    SetupField(key="client_secret", label="Client secret", secret=True),
)
_DEFAULT_FIELDS: dict[str, tuple[SetupField, ...]] = {
    "oauth2": _OAUTH_FIELDS,
    "oauth2_client_credentials": _OAUTH_FIELDS,
    "api_key": (SetupField(key="api_key", label="API key", required=True, secret=True),),
    "key_secret": (
        SetupField(key="access_key", label="Access key", required=True),
        SetupField(key="secret_key", label="Secret key", required=True, secret=True),
    ),
    "bot_token": (SetupField(key="bot_token", label="Bot token", required=True, secret=True),),
    "credentials": (),
}

_DEFAULT_AUTH: dict[str, AuthHeader] = {
    "oauth2": AuthHeader(template="Bearer {access_token}"),
    "oauth2_client_credentials": AuthHeader(template="Bearer {access_token}"),
    "api_key": AuthHeader(template="Bearer {api_key}"),
    "key_secret": AuthHeader(kind="basic", username="access_key", password="secret_key"),
    "bot_token": AuthHeader(template="Bearer {bot_token}"),
}


class Provider(_Frozen):
    """A service that connections can be made to, described as data.

    Built with keyword fields. When ``setup_fields`` or ``auth_header`` are not
    given they default by ``auth_type`` (oauth2: client_id + client_secret and
    ``Bearer {access_token}``; api_key: api_key and ``Bearer {api_key}``;
    bot_token: bot_token and ``Bearer {bot_token}``; key_secret: access_key +
    secret_key and Basic; credentials: freeform, no header).
    """

    key: str
    name: str
    auth_type: AuthType
    authorize_url: str | None = None
    token_url: str | None = None
    userinfo_url: str | None = None
    revoke_url: str | None = None
    scopes: tuple[str, ...] = ()
    scope_separator: str = " "
    authorize_params: dict[str, str] = Field(default_factory=dict)
    token_auth: Literal["client_secret_post", "client_secret_basic", "none"] = "client_secret_post"
    pkce: bool = True
    setup_fields: tuple[SetupField, ...] = ()
    api_hosts: tuple[str, ...] = ()
    auth_header: AuthHeader | None = None
    validation: ValidationRequest | None = None
    userinfo_map: UserinfoMap = Field(default_factory=UserinfoMap)
    #: Statuses with which the API says "this token is rejected": refresh once and retry.
    refresh_on: tuple[int, ...] = (401,)
    description: str = ""
    docs_url: str | None = None
    # An application provider with this set replaces the built-in of the same key.
    override: bool = False

    @model_validator(mode="before")
    @classmethod
    def _defaults_by_auth_type(cls, data: Any) -> Any:
        if isinstance(data, dict):
            auth_type = data.get("auth_type")
            if isinstance(auth_type, str):
                data = dict(data)
                if "setup_fields" not in data and auth_type in _DEFAULT_FIELDS:
                    public = auth_type == "oauth2" and data.get("token_auth") == "none"
                    data["setup_fields"] = (
                        _PUBLIC_OAUTH_FIELDS if public else _DEFAULT_FIELDS[auth_type]
                    )
                if "auth_header" not in data and auth_type in _DEFAULT_AUTH:
                    data["auth_header"] = _DEFAULT_AUTH[auth_type]
        return data

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
        keys = [field.key for field in self.setup_fields]
        if len(set(keys)) != len(keys):
            raise ValueError("setup field keys must be unique")
        if self.auth_type == "oauth2" and not (self.authorize_url and self.token_url):
            raise ValueError("an oauth2 provider needs authorize_url and token_url")
        if self.auth_type == "oauth2_client_credentials" and not self.token_url:
            raise ValueError("an oauth2_client_credentials provider needs token_url")
        for url in (self.authorize_url, self.token_url, self.userinfo_url, self.revoke_url):
            if url is not None:
                template_fields(url)
        if self.auth_header is not None and self.auth_type != "credentials":
            known = set(keys) | {"access_token"}
            unknown = [name for name in self.auth_header.fields if name not in known]
            if unknown:
                raise ValueError(f"auth header uses {unknown[0]!r}, which is not a setup field")
        return self

    @field_validator("refresh_on")
    @classmethod
    def _check_refresh_on(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 400 <= status <= 499 for status in value):
            raise ValueError("refresh_on holds 4xx statuses, such as (401,) or (401, 403)")
        return value

    @property
    def is_oauth(self) -> bool:
        """Whether calls carry an OAuth access token (authorization code or client credentials)."""
        return self.auth_type in ("oauth2", "oauth2_client_credentials")

    @functools.cached_property
    def secret_field_keys(self) -> frozenset[str]:
        """Setup fields declared ``secret=True``."""
        return frozenset(field.key for field in self.setup_fields if field.secret)

    @functools.cached_property
    def secret_keys(self) -> frozenset[str]:
        """Every data key whose value is a secret here: :data:`SECRET_FIELDS` and the
        fields declared ``secret=True``."""
        return self.secret_field_keys | SECRET_FIELDS

    @property
    def runtime_fields(self) -> tuple[str, ...]:
        """Data keys whose presence means the connection can make calls.

        oauth2: the access token; client credentials: client_id + client_secret;
        credentials: the ``credentials`` map; api_key, bot_token and key_secret:
        the fields the auth header is built from (``api_key``, ``bot_token``,
        ``access_key`` + ``secret_key``, Twilio's ``account_sid`` + ``auth_token``).
        """
        if self.auth_type == "oauth2":
            return ("access_token",)
        if self.auth_type == "oauth2_client_credentials":
            return ("client_id", "client_secret")
        if self.auth_type == "credentials":
            return ("credentials",)
        if self.auth_header is not None:
            return self.auth_header.fields
        return tuple(field.key for field in self.setup_fields if field.required)

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
        win). Errors name the field, never its value.
        """
        attrs = check_attrs(attrs, max_bytes=max_bytes)
        fields = {field.key: field for field in self.setup_fields}
        secrets = self.secret_keys

        def coerce(key: str, value: Any) -> Any:
            value = fields[key].coerce(value) if key in fields else value
            if key in secrets and isinstance(value, str):
                if not value.strip():
                    return None
                check_secret_text(value, key)
            return value

        patch: dict[str, Any] = {}
        nested: dict[str, Any] = {}
        if self.auth_type == "credentials" and "credentials" in attrs:
            given = attrs["credentials"]
            if given is not None and not isinstance(given, Mapping):
                raise InvalidField(
                    "Setup field 'credentials' must be a mapping.", field="credentials"
                )
            for key, value in (given or {}).items():
                nested[key] = coerce(key, value)
        for key, value in attrs.items():
            if self.auth_type == "credentials" and key == "credentials":
                continue
            coerced = coerce(key, value)
            if self.auth_type == "credentials":
                nested[key] = coerced
            else:
                patch[key] = coerced
        if self.auth_type == "credentials" and (nested or "credentials" in attrs):
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
        if self.auth_type == "credentials" and isinstance(creds, Mapping):
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
        if self.auth_type == "credentials":
            creds = data.get("credentials")
            return isinstance(creds, Mapping) and bool(creds) and self.is_configured(data)
        return all(not _blank(data.get(key)) for key in self.runtime_fields)

    def map_userinfo(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The account (email, name, picture, id) read from a userinfo response, as
        ``userinfo_map`` says."""
        return self.userinfo_map.apply(payload)


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
