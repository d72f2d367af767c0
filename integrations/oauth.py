"""OAuth 2.0 client logic without I/O: state, PKCE, request building, token parsing."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from json.decoder import scanstring  # type: ignore[attr-defined]
from types import MappingProxyType
from typing import Any, Final, Literal

import aiohttp
from authlib.common.security import generate_token
from authlib.common.urls import url_decode
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri, prepare_token_request
from authlib.oauth2.rfc7009 import prepare_revoke_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from . import _backoff
from ._client_auth import FORM_HEADERS as _FORM_HEADERS
from ._client_auth import Client, client_auth_method
from ._errors import (
    InvalidAttrs,
    InvalidInput,
    InvalidURL,
    OAuthError,
    ReauthRequired,
    RequestFailed,
    TokenRequestFailed,
)
from ._input import check_text, check_timestamp

__all__ = [
    "TERMINAL_ERROR_CODES",
    "TRANSIENT_ERROR_CODES",
    "AuthMethod",
    "GrantType",
    "TokenSet",
    "authorization_url",
    "backoff_delays",
    "code_challenge",
    "error_code",
    "expires_within",
    "generate_code_verifier",
    "generate_state",
    "hash_state",
    "imported_token_set",
    "is_terminal_error",
    "is_transient_error",
    "map_userinfo",
    "parse_token_response",
    "refresh_due",
    "revoke_request",
    "token_request",
]

AuthMethod = Literal["client_secret_post", "client_secret_basic", "none"]
GrantType = Literal["authorization_code", "refresh_token", "client_credentials"]

_GRANT_REQUIRED: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "authorization_code": ("code", "redirect_uri"),
        "refresh_token": ("refresh_token",),
        "client_credentials": (),
    }
)
_RESERVED_AUTHORIZE_PARAMS: Final = frozenset(
    {
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
    }
)
_NO_PARAMS: Final[Mapping[str, str]] = MappingProxyType({})

_VERIFIER_RE: Final = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
_ERROR_CODE_RE: Final = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_SCOPE_SPLIT_RE: Final = re.compile(r"[\s,]+")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]+")
_MAX_DESCRIPTION: Final = 300

#: Error codes after which retrying cannot help: the user must authorize again.
#: RFC 6749 codes plus the equivalents GitHub and Slack use on 200 responses.
TERMINAL_ERROR_CODES: Final = frozenset(
    {
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "bad_verification_code",
        "bad_refresh_token",
        "incorrect_client_credentials",
        "invalid_refresh_token",
        "invalid_code",
        "code_already_used",
        "bad_client_secret",
        "invalid_client_id",
        "token_revoked",
        "token_expired",
    }
)

#: The terminal codes that blame the client credentials, not the user's grant.
_CLIENT_ERROR_CODES: Final = frozenset(
    {"invalid_client", "incorrect_client_credentials", "bad_client_secret", "invalid_client_id"}
)

#: Error codes that describe a provider-side hiccup, worth retrying with backoff.
TRANSIENT_ERROR_CODES: Final = frozenset(
    {"temporarily_unavailable", "server_error", "internal_error", "ratelimited"}
)

_TRANSIENT_STATUSES: Final = frozenset({408, 425, 429})
_PARSED_FIELDS: Final = frozenset(
    {"access_token", "refresh_token", "id_token", "token_type", "expires_in", "expires_at", "scope"}
)


def generate_state() -> str:
    """Return a fresh, unguessable OAuth ``state`` (48 url-safe characters, ~285 bits)."""
    return str(generate_token(48))


def generate_code_verifier() -> str:
    """Return a fresh PKCE code verifier (RFC 7636: 64 unreserved characters)."""
    return str(generate_token(64))


def code_challenge(verifier: str) -> str:
    """Return the S256 code challenge for ``verifier``."""
    if not isinstance(verifier, str) or not _VERIFIER_RE.fullmatch(verifier):
        raise ValueError("a PKCE code verifier is 43-128 characters of A-Z a-z 0-9 - . _ ~")
    return str(create_s256_code_challenge(verifier))


def hash_state(state: str) -> str:
    """Return the SHA-256 hex digest of ``state``: what is stored server-side instead of it."""
    if not isinstance(state, str):
        raise TypeError("state must be a str")
    check_text(state, "state")
    return hashlib.sha256(state.encode("utf-8")).hexdigest()


def authorization_url(
    authorize_url: str,
    *,
    client_id: str,
    redirect_uri: str,
    scopes: Sequence[str],
    scope_separator: str = " ",
    state: str | None,
    code_challenge: str | None,
    extra_params: Mapping[str, str] = _NO_PARAMS,
) -> str:
    """Build the authorization-code request URL (PKCE S256 when ``code_challenge`` is given)."""
    _check_url(authorize_url)
    _check_url(redirect_uri)
    if not client_id:
        raise ValueError("client_id is required")
    clash = _RESERVED_AUTHORIZE_PARAMS.intersection(extra_params)
    if clash:
        raise ValueError(f"extra_params may not set {', '.join(sorted(clash))}")
    params: dict[str, str] = {}
    if code_challenge is not None:
        params["code_challenge"] = code_challenge
        params["code_challenge_method"] = "S256"
    params.update(extra_params)
    return str(
        prepare_grant_uri(
            authorize_url,
            client_id,
            "code",
            redirect_uri=redirect_uri,
            scope=_join_scopes(scopes, scope_separator),
            state=state,
            **params,
        )
    )


def token_request(
    grant_type: GrantType | str,
    *,
    token_url: str,
    client_id: str,
    client_secret: str | None,
    auth_method: AuthMethod | str,
    scope_separator: str = " ",
    **params: str | Sequence[str] | None,
) -> tuple[str, dict[str, str], str]:
    """Build a token endpoint request as ``(url, headers, form body)``.

    ``authorization_code`` takes ``code``, ``redirect_uri`` and ``code_verifier``;
    ``refresh_token`` takes ``refresh_token`` and an optional ``scope``;
    ``client_credentials`` takes an optional ``scope``; extension grants (an absolute URI,
    such as RFC 7523's JWT bearer or RFC 8628's device code) take what they define. ``None``
    values are left out, a ``scope`` sequence is joined with ``scope_separator``.
    """
    body = grant_body(
        grant_type, token_url=token_url, params=params, scope_separator=scope_separator
    )
    client = Client(client_id, client_secret, client_auth_method(auth_method))
    return client.prepare(token_url, body)


def unauthenticated_token_request(
    grant_type: str, *, token_url: str, **params: str | Sequence[str] | None
) -> tuple[str, dict[str, str], str]:
    """A token request whose grant proves who asks (a JWT bearer assertion): no client
    authentication, no client id."""
    body = grant_body(grant_type, token_url=token_url, params=params)
    return token_url, dict(_FORM_HEADERS), body


def grant_body(
    grant_type: GrantType | str,
    *,
    token_url: str,
    params: Mapping[str, str | Sequence[str] | None],
    scope_separator: str = " ",
) -> str:
    """The form body of a token request for ``grant_type``, checked."""
    _check_url(token_url)
    if grant_type not in _GRANT_REQUIRED and ":" not in grant_type:
        # Extension grants (RFC 6749 §4.5) are absolute URIs, such as RFC 7523's JWT bearer.
        raise ValueError(f"unsupported grant_type {grant_type!r}")
    missing = [name for name in _GRANT_REQUIRED.get(grant_type, ()) if not params.get(name)]
    if missing:
        raise ValueError(f"{grant_type} needs {', '.join(missing)}")
    fields: dict[str, str] = {}
    for name, value in params.items():
        if value is None:
            continue
        if name == "scope" and not isinstance(value, str):
            fields[name] = _join_scopes(value, scope_separator) or ""
        elif isinstance(value, str):
            # A code or token that cannot be encoded must fail here, typed, not in aiohttp.
            fields[name] = check_text(value, name)
        else:
            raise TypeError(f"parameter {name!r} must be a str")
    return str(prepare_token_request(grant_type, **fields))


def revoke_request(
    revoke_url: str,
    *,
    token: str,
    token_type_hint: Literal["access_token", "refresh_token"] | None = None,
    client_id: str,
    client_secret: str | None,
    auth_method: AuthMethod,
) -> tuple[str, dict[str, str], str]:
    """Build an RFC 7009 revocation request as ``(url, headers, form body)``."""
    body = revoke_body(revoke_url, token=token, token_type_hint=token_type_hint)
    return _authenticate(revoke_url, body, client_id, client_secret, auth_method)


def revoke_body(
    revoke_url: str,
    *,
    token: str,
    token_type_hint: Literal["access_token", "refresh_token"] | None = None,
) -> str:
    """The form body of an RFC 7009 revocation request, checked."""
    _check_url(revoke_url)
    if not token:
        raise ValueError("token is required")
    body, _ = prepare_revoke_token_request(token, token_type_hint)
    return str(body)


def _authenticate(
    url: str, body: str, client_id: str, client_secret: str | None, auth_method: str
) -> tuple[str, dict[str, str], str]:
    client = Client(client_id, client_secret, client_auth_method(auth_method))
    return client.prepare(url, body)


@dataclass(frozen=True, kw_only=True, repr=False)
class TokenSet:
    """Tokens from a token endpoint response, with an absolute UTC expiry.

    ``extras`` holds the rest of the response with every token-like field removed
    (for example Slack's ``team`` or Microsoft's ``ext_expires_in``).
    """

    access_token: str
    refresh_token: str | None = None
    token_type: str = "Bearer"
    expires_at: datetime | None = None
    scope: tuple[str, ...] = ()
    obtained_at: datetime
    id_token: str | None = None
    extras: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def expires_within(self, leeway: float, now: datetime) -> bool:
        """Whether the access token expires within ``leeway`` seconds of ``now``."""
        return expires_within(self.expires_at, leeway, now)

    def __repr__(self) -> str:
        return (
            f"TokenSet(token_type={self.token_type!r}, access_token=<masked>, "
            f"refresh_token={_mask(self.refresh_token)}, id_token={_mask(self.id_token)}, "
            f"expires_at={self.expires_at!r}, scope={self.scope!r}, "
            f"obtained_at={self.obtained_at!r}, extras={sorted(self.extras)!r})"
        )


def parse_token_response(
    status: int,
    body: bytes | str | Mapping[str, Any],
    *,
    now: datetime,
    requested_scopes: Sequence[str],
    previous_refresh_token: str | None,
    redact: Iterable[str] = (),
) -> TokenSet:
    """Turn a token endpoint response into a ``TokenSet`` or raise a classified error.

    Accepts JSON and, for providers such as GitHub, form-encoded bodies. Without a
    refresh token in the response ``previous_refresh_token`` is kept; without a
    ``scope`` the ``requested_scopes`` are assumed granted.

    Raises ``ReauthRequired`` for terminal errors (``invalid_grant``, ``invalid_client``,
    ``unauthorized_client`` and vendor equivalents), ``TokenRequestFailed`` with
    ``transient=True`` for 5xx, 408, 429 and "try later" codes, else
    ``TokenRequestFailed`` with ``transient=False``. Messages carry the OAuth error
    code and description, with ``previous_refresh_token`` and ``redact`` values masked.
    """
    now = _aware(now, "now").astimezone(UTC)
    payload = _decode_body(body)
    secrets = [s for s in (previous_refresh_token, *redact) if s]
    error = _error_code(payload)
    description = _description(payload, secrets)

    if status >= 500 or status in _TRANSIENT_STATUSES or error in TRANSIENT_ERROR_CODES:
        raise TokenRequestFailed(
            _message("is temporarily unavailable", status, error, description),
            transient=True,
            status=status,
            error=error,
            description=description,
        )
    if error is not None or not 200 <= status < 300:
        if error in _CLIENT_ERROR_CODES:
            # The application's client id or secret is wrong: authorizing again with the
            # same ones fails the same way.
            raise ReauthRequired(
                _message("rejected the client credentials", status, error, description)
                + "; the client id or client secret is wrong: correct them in the "
                "connection's setup (as the provider's console shows them)",
                status=status,
                error=error,
                description=description,
            )
        if error in TERMINAL_ERROR_CODES:
            raise ReauthRequired(
                _message("rejected the grant", status, error, description)
                + "; the connection must be authorized again",
                status=status,
                error=error,
                description=description,
            )
        raise TokenRequestFailed(
            _message("refused the request", status, error, description),
            transient=False,
            status=status,
            error=error,
            description=description,
        )
    if payload is None:
        raise TokenRequestFailed(
            f"The token endpoint answered HTTP {status} with a body that is not a token response",
            transient=False,
            status=status,
        )
    access_token = payload.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise TokenRequestFailed(
            f"The token endpoint answered HTTP {status} without an access_token",
            transient=False,
            status=status,
        )

    refresh_token = payload.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        refresh_token = previous_refresh_token
    if _UNSENDABLE_RE.search(access_token) is not None:
        failed = TokenRequestFailed(
            f"The token endpoint answered HTTP {status} with an access_token that cannot be "
            "sent (it holds control characters)",
            transient=False,
            status=status,
        )
        # The refresh token that came with it may have replaced the one sent: whoever
        # handles this failure keeps it, so the grant outlives the unusable answer.
        if refresh_token and refresh_token != previous_refresh_token:
            _ROTATED[failed] = refresh_token
        raise failed
    id_token = payload.get("id_token")
    return TokenSet(
        access_token=access_token,
        refresh_token=refresh_token,
        token_type=_token_type(payload.get("token_type")),
        expires_at=_expires_at(payload, now),
        scope=_granted_scopes(payload, requested_scopes),
        obtained_at=now,
        id_token=id_token if isinstance(id_token, str) and id_token else None,
        extras=_strip_tokens({k: v for k, v in payload.items() if k not in _PARSED_FIELDS}),
    )


def _decode_body(body: bytes | str | Mapping[str, Any]) -> Mapping[str, Any] | None:
    if isinstance(body, Mapping):
        return body
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            return None
    text = body.strip()
    if not text:
        return None
    try:
        data = json.loads(text, parse_int=_json_int)
    except ValueError:
        data = None
    except RecursionError:
        # Nested deeper than the parser goes: the token fields sit at the top level, and
        # a response that arrived must not be lost for the sake of a member nobody reads.
        data = _top_level(text)
    if isinstance(data, dict):
        return data
    if data is not None or text.startswith(("{", "[", "<")):
        return None
    try:
        pairs = url_decode(text)
    except ValueError:
        return None
    form = {str(k): str(v) for k, v in pairs}
    # A stray word parses as {"word": ""}; only real key=value bodies count as forms.
    return form if "=" in text else None


# The new refresh token of a token answer refused for its access token, by the refusal
# (kept off the exception itself, whose attributes are shown in places).
_ROTATED: weakref.WeakKeyDictionary[BaseException, str] = weakref.WeakKeyDictionary()


def rotated_refresh_token(exc: BaseException) -> str | None:
    """The new refresh token that came with a token answer ``exc`` refused, if any."""
    return _ROTATED.get(exc)


# What no HTTP header value may hold: controls other than tab, and lone surrogates.
_UNSENDABLE_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


def _json_int(digits: str) -> int | str:
    """An integer of a JSON body; beyond Python's digit limit for ``int()`` its text."""
    return int(digits) if len(digits) <= 4000 else digits


def _top_level(text: str) -> dict[str, Any] | None:
    """The members of a JSON object whose values are not objects or arrays (those are
    skipped without recursion); None when ``text`` is not an object."""
    decoder = json.JSONDecoder(parse_int=_json_int)
    found: dict[str, Any] = {}
    at = _skip_ws(text, 0)
    if not text.startswith("{", at):
        return None
    at = _skip_ws(text, at + 1)
    try:
        while not text.startswith("}", at):
            if not text.startswith('"', at):
                return None
            key, at = scanstring(text, at + 1)
            at = _skip_ws(text, at)
            if not text.startswith(":", at):
                return None
            at = _skip_ws(text, at + 1)
            if text.startswith(("{", "["), at):
                at = _skip_container(text, at)
            else:
                found[key], at = decoder.raw_decode(text, at)
            at = _skip_ws(text, at)
            if text.startswith(",", at):
                at = _skip_ws(text, at + 1)
            elif not text.startswith("}", at):
                return None
    except (ValueError, RecursionError):
        return None
    return found


def _skip_ws(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\n\r":
        at += 1
    return at


def _skip_container(text: str, at: int) -> int:
    """The index just past the object or array starting at ``at``, strings respected."""
    depth, i, n = 0, at, len(text)
    while i < n:
        char = text[i]
        if char == '"':
            _, i = scanstring(text, i + 1)
            continue
        if char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unterminated JSON container")


def error_code(value: object) -> str | None:
    """``value`` when it is shaped like an OAuth error code (``invalid_grant``,
    ``access_denied``: letters, digits, ``_``, ``.``, ``-``, at most 64), else None. The one
    check for error codes read from providers, which may be anything."""
    if isinstance(value, str) and _ERROR_CODE_RE.fullmatch(value):
        return value
    return None


def _error_code(payload: Mapping[str, Any] | None) -> str | None:
    if payload is None:
        return None
    error = payload.get("error")
    if error is None and payload.get("ok") is False:
        error = "unknown_error"
    if error is None:
        return None
    return error_code(error) or "unknown_error"


def _description(payload: Mapping[str, Any] | None, secrets: Sequence[str]) -> str | None:
    if payload is None:
        return None
    text = payload.get("error_description")
    if not isinstance(text, str) or not text.strip():
        return None
    text = _CONTROL_RE.sub(" ", text).strip()
    for secret in secrets:
        text = text.replace(secret, "<masked>")
    if len(text) > _MAX_DESCRIPTION:
        text = text[: _MAX_DESCRIPTION - 1] + "…"
    return text


def _message(what: str, status: int, error: str | None, description: str | None) -> str:
    detail = error or "no error code"
    if description:
        detail = f"{detail}: {description}"
    return f"The token endpoint {what} (HTTP {status}, {detail})"


def _token_type(value: Any) -> str:
    if not isinstance(value, str) or not value:
        return "Bearer"
    # Providers answer "bearer" too; the Authorization header wants the canonical case.
    return "Bearer" if value.lower() == "bearer" else value


def _expires_at(payload: Mapping[str, Any], now: datetime) -> datetime | None:
    seconds = _number(payload.get("expires_in"))
    if seconds is not None:
        return now + timedelta(seconds=max(seconds, 0.0))
    epoch = _number(payload.get("expires_at"))
    if epoch is not None:
        try:
            return datetime.fromtimestamp(epoch, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    # Beyond ~10**10 s a timedelta overflows; such an expiry means "never" anyway.
    return number if math.isfinite(number) and abs(number) < 1e10 else None


def _granted_scopes(payload: Mapping[str, Any], requested: Sequence[str]) -> tuple[str, ...]:
    scope = payload.get("scope")
    if isinstance(scope, str):
        return tuple(s for s in _SCOPE_SPLIT_RE.split(scope) if s)
    if isinstance(scope, list | tuple):
        return tuple(str(s) for s in scope if s)
    return tuple(requested)


def _strip_tokens(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            str(k): _strip_tokens(v)
            for k, v in value.items()
            if not str(k).lower().endswith(("token", "secret"))
        }
    if isinstance(value, list | tuple):
        return [_strip_tokens(v) for v in value]
    return value


def _mask(value: str | None) -> str:
    return "None" if value is None else "<masked>"


def is_terminal_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the grant is dead and only a new authorization helps."""
    return isinstance(exc, ReauthRequired)


def is_transient_error(exc: BaseException) -> bool:
    """Whether retrying the token request later may succeed (5xx, 429, timeouts, network)."""
    if isinstance(exc, TokenRequestFailed):
        return exc.transient
    if isinstance(exc, OAuthError):
        return False
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status >= 500 or exc.status in _TRANSIENT_STATUSES
    return isinstance(exc, TimeoutError | ConnectionError | aiohttp.ClientError | RequestFailed)


def expires_within(expires_at: datetime | None, leeway: float, now: datetime) -> bool:
    """Whether a token expiring at ``expires_at`` is expired ``leeway`` seconds ahead of ``now``.

    An unknown expiry (``None``) is never considered due: such tokens are refreshed
    only after the API rejects them.
    """
    if expires_at is None:
        return False
    # Subtracting aware datetimes cannot overflow, whatever year they hold.
    remaining = _aware(expires_at, "expires_at") - _aware(now, "now")
    return remaining.total_seconds() <= leeway


def refresh_due(
    expires_at: datetime | None, obtained_at: datetime | None, leeway: float, now: datetime
) -> bool:
    """Whether a token should be refreshed ahead of time: ``expires_within`` with a leeway
    of at most half the token's lifetime (``expires_at - obtained_at``, when known).

    A token that lives shorter than the leeway would otherwise be due the moment it is
    issued, and refreshed on every use.
    """
    if expires_at is not None and obtained_at is not None:
        lifetime = _aware(expires_at, "expires_at") - _aware(obtained_at, "obtained_at")
        leeway = min(leeway, max(lifetime.total_seconds(), 0.0) / 2)
    return expires_within(expires_at, leeway, now)


#: Where a userinfo response usually keeps each reading (OpenID Connect first).
USERINFO_EMAIL: Final = ("email", "mail", "userPrincipalName")
USERINFO_NAME: Final = ("name", "displayName", "login", "username")
USERINFO_PICTURE: Final = ("picture", "avatar_url")
USERINFO_ACCOUNT_ID: Final = ("sub", "id", "https://slack.com/user_id", "user_id")


def map_userinfo(
    info: Mapping[str, Any],
    *,
    email: Sequence[str] = USERINFO_EMAIL,
    name: Sequence[str] = USERINFO_NAME,
    picture: Sequence[str] = USERINFO_PICTURE,
    account_id: Sequence[str] = USERINFO_ACCOUNT_ID,
) -> dict[str, Any]:
    """A userinfo response as ``{"email", "name", "picture", "account_id"}``.

    Each reading takes the first non-blank of its candidate keys; a key may be a dotted
    path into nested objects (``"user.email"``). Missing readings are ``None``;
    ``account_id`` is always a string when present. Providers declare their own
    candidates (``Provider.userinfo_map``); the defaults fit OpenID Connect.
    """
    return {
        "email": _first_text(info, email),
        "name": _first_text(info, name),
        "picture": _first_text(info, picture),
        "account_id": _first_id(info, account_id),
    }


def _lookup(info: Mapping[str, Any], path: str) -> Any:
    if path in info:
        return info[path]
    value: Any = info
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _first_text(info: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    for key in keys:
        value = _lookup(info, key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _first_id(info: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    for key in keys:
        value = _lookup(info, key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int) or (isinstance(value, str) and value.strip()):
            return str(value).strip()
    return None


def backoff_delays(
    attempts: int, base: float, cap: float, *, rng: random.Random | None = None
) -> list[float]:
    """Return ``attempts`` jittered exponential delays in seconds.

    Delay ``i`` lies in ``[c/2, c]`` with ``c = min(cap, base * 2**i)`` ("equal jitter"):
    callers spread out instead of retrying in lockstep, yet each still waits.
    """
    return _backoff.delays(attempts, base, cap, rng)


def _join_scopes(scopes: Sequence[str] | str, separator: str) -> str | None:
    if isinstance(scopes, str):
        raise TypeError("scopes must be a sequence of str, not a str")
    cleaned = [check_text(s, "scope") for s in scopes if s]
    return separator.join(cleaned) if cleaned else None


def _check_url(url: str) -> None:
    if not isinstance(url, str) or not re.match(r"^https?://[^/?#\s]+", url):
        raise InvalidURL(f"not an absolute http(s) URL: {url!r}")


def _aware(value: datetime, name: str) -> datetime:
    # No conversion to UTC: at year 1 or 9999 that can overflow, and aware datetimes
    # compare and subtract correctly across offsets anyway.
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return value


_IMPORT_FIELDS = frozenset(
    {"access_token", "refresh_token", "token_type", "expires_at", "expires_in", "scope"}
)


def imported_token_set(tokens: Mapping[str, Any], now: datetime) -> TokenSet:
    """Tokens brought in from another system, checked: InvalidAttrs names the bad field.

    ``access_token`` is required; ``refresh_token``, ``token_type`` (default Bearer),
    ``scope`` (a space-separated string or a list) and one of ``expires_at`` (ISO 8601
    with a timezone, or a datetime) or ``expires_in`` (seconds from now) are optional.
    """
    if not isinstance(tokens, Mapping):
        raise InvalidAttrs(f"tokens must be a mapping, got {type(tokens).__name__}.")
    unknown = sorted(str(k) for k in tokens if k not in _IMPORT_FIELDS)
    if unknown:
        raise InvalidAttrs(
            f"Unknown token fields: {', '.join(unknown)[:200]}; expected some of "
            f"{', '.join(sorted(_IMPORT_FIELDS))}.",
            fields=unknown,
        )

    def text(name: str, required: bool = False) -> str | None:
        value = tokens.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise InvalidAttrs(f"Token field {name!r} must be a non-empty string.", field=name)
        if not value.isprintable() or not value.isascii():
            raise InvalidAttrs(
                f"Token field {name!r} holds characters a token cannot have "
                "(control or non-ASCII characters).",
                field=name,
            )
        return value.strip()

    access = text("access_token", required=True)
    assert access is not None
    expires_at: datetime | None = None
    if tokens.get("expires_at") is not None and tokens.get("expires_in") is not None:
        raise InvalidAttrs("Give expires_at or expires_in, not both.", field="expires_at")
    raw_at, raw_in = tokens.get("expires_at"), tokens.get("expires_in")
    if raw_at is not None:
        try:
            # Unlike a stored value read back, an out-of-range one is refused, not clamped.
            expires_at = check_timestamp(raw_at, "expires_at")
        except InvalidInput as exc:
            raise InvalidAttrs(
                f"{exc.message}, such as '2030-01-01T00:00:00+00:00'.", field="expires_at"
            ) from None
    elif raw_in is not None:
        if isinstance(raw_in, bool) or not isinstance(raw_in, int | float) or raw_in != raw_in:
            raise InvalidAttrs("expires_in must be a number of seconds.", field="expires_in")
        if not 0 <= raw_in <= 10 * 365 * 86400:
            raise InvalidAttrs("expires_in must be between 0 and ten years.", field="expires_in")
        expires_at = now + timedelta(seconds=float(raw_in))
    scope = tokens.get("scope")
    if isinstance(scope, str):
        scopes = tuple(scope.split())
    elif scope is None:
        scopes = ()
    elif isinstance(scope, list | tuple) and all(isinstance(s, str) and s for s in scope):
        scopes = tuple(scope)
    else:
        raise InvalidAttrs("scope must be a string or a list of strings.", field="scope")
    if any(not s.isprintable() or any(c.isspace() for c in s) for s in scopes):
        raise InvalidAttrs("Each scope must be printable and have no spaces.", field="scope")
    return TokenSet(
        access_token=access,
        refresh_token=text("refresh_token"),
        token_type=text("token_type") or "Bearer",
        expires_at=expires_at,
        scope=scopes,
        obtained_at=now,
    )
