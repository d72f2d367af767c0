"""HTTP client: authenticated requests bound to a provider's hosts, with redirects and retries."""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import json as jsonlib
import logging
import re
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import quote, urlencode

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from . import _aws
from . import _telemetry as telemetry
from ._backoff import equal_jitter
from ._errors import (
    ConfigurationError,
    HostNotAllowed,
    InvalidArgument,
    InvalidField,
    InvalidInput,
    InvalidURL,
    LifecycleError,
    NotConfigured,
    NotConnected,
    RequestFailed,
)
from ._input import check_header_value, check_method
from ._names import shown
from ._providers import AuthHeader, Provider, render, split_host_entry
from ._settings import MAXIMUM

__all__ = [
    "HttpClient",
    "Response",
    "auth_for",
    "bot_url",
    "check_url",
    "host_allowed",
    "retry_after_seconds",
]

logger = logging.getLogger("integrations.http")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({429, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10
# Headers that carry credentials and must not follow a redirect to another origin.
_SENSITIVE_HEADERS = ("Authorization", "Proxy-Authorization", "Cookie")
_REDACTED = "***"


@dataclass(frozen=True, slots=True, repr=False)
class Response:
    """A finished HTTP response with its body read.

    ``url`` is the final URL after redirects, with any credential that
    travelled in it (a Telegram token) replaced by ``***``.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str

    @property
    def ok(self) -> bool:
        """True for a 2xx status."""
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        """The body decoded with the charset from Content-Type (UTF-8 when none)."""
        message = Message()
        message["content-type"] = self.headers.get("Content-Type", "")
        charset = message.get_content_charset() or "utf-8"
        try:
            return self.body.decode(charset, errors="replace")
        except LookupError:
            return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON; ValueError when it is not JSON."""
        return jsonlib.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.url}>"


@functools.lru_cache(maxsize=256)
def is_loopback(host: str) -> bool:
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse(url: str | URL) -> URL:
    if isinstance(url, URL):
        return url
    if not isinstance(url, str):
        raise InvalidArgument(f"url must be a str, not {type(url).__name__}", field="url")
    try:
        return URL(url)
    except (TypeError, ValueError):
        raise InvalidURL() from None


def check_url(url: str | URL) -> URL:
    """The URL parsed, if it is absolute http(s); plain ``http://`` only for loopback hosts.

    Refuses user:password in the URL (credentials come from the provider). The
    fragment is dropped. The message never echoes the URL, which may carry secrets.
    """
    parsed = _parse(url)
    if not parsed.absolute or parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise InvalidURL()
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise InvalidURL("The URL must not carry a user name or password.")
    if parsed.scheme == "http" and not is_loopback(parsed.raw_host):
        raise InvalidURL("Plain http:// is only allowed for loopback hosts; use https://.")
    return parsed.with_fragment(None)


def host_allowed(url: str | URL, api_hosts: Iterable[str]) -> bool:
    """Whether the URL's host is one of ``api_hosts``.

    ``"host"`` matches that host on any port, ``"host:port"`` only that port,
    ``"*.example.com"`` any subdomain of example.com (not example.com itself).
    Nothing else is a wildcard.
    """
    parsed = _parse(url)
    host = (parsed.raw_host or "").lower().rstrip(".")
    if not host:
        return False
    port = parsed.port
    for entry in api_hosts:
        allowed, allowed_port = split_host_entry(entry)
        if allowed_port is not None and allowed_port != port:
            continue
        if allowed.startswith("*."):
            if host.endswith(allowed[1:]):
                return True
        elif host == allowed:
            return True
    return False


def retry_after_seconds(value: str, *, now: datetime | None = None) -> float | None:
    """Seconds to wait for a Retry-After value (seconds or an HTTP date); None if unreadable."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _missing(provider: Provider, key: str) -> Exception:
    if provider.is_oauth and key == "access_token":
        return NotConnected()
    return NotConfigured(f"The connection has no {key!r} saved: call save_setup first.", field=key)


def _header_value(value: Any, key: str) -> str:
    text = str(value)
    try:
        return check_header_value(text, key)
    except InvalidInput:
        # Named as the setup field it came from; the value is a secret.
        raise InvalidField(
            f"Setup field {key!r} contains a control character.", field=key
        ) from None


_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", re.ASCII)


def _check_headers(headers: CIMultiDict[str]) -> None:
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidArgument("header names and values must be strings", field="headers")
        if _HEADER_NAME_RE.fullmatch(name) is None:
            raise InvalidInput("a header name must be a token (RFC 9110)", field="headers")
        check_header_value(value, name)


def auth_for(
    provider: Provider,
    credentials: Mapping[str, Any],
    url: str | URL,
    *,
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[dict[str, str], str]:
    """The headers to add and the final URL for a request made with these credentials.

    Built from ``provider.auth_header``: a templated header (``Bearer``,
    ``Bot``, ``xi-api-key``, ...), HTTP Basic, the token put in front of the
    URL path, or an AWS SigV4 signature (which covers ``method`` and ``body``).
    A missing credential raises NotConnected (no OAuth access token) or
    NotConfigured.
    """
    target = _parse(url)
    header = provider.auth_header
    if header is None:
        return {}, str(target)
    values = provider.template_values(credentials)
    for key in header.fields:
        if key not in values:
            raise _missing(provider, key)
    kind = AUTH_KINDS.get(header.kind)
    if kind is None:
        raise ConfigurationError(f"No auth header kind named {header.kind!r} is registered.")
    added, final = kind.apply(header, values, target, method, body)
    return added, str(final)


#: Builds what a request carries: (header, credential values, URL, method, body) in, the
#: headers to add and the final URL out.
AuthApply = Callable[
    [AuthHeader, Mapping[str, Any], URL, str, bytes | None], tuple[dict[str, str], URL]
]


@dataclass(frozen=True, slots=True)
class AuthKind:
    """A registered way of attaching credentials; ``in_path``: the URL carries them (so
    redirects and logs must hide it); ``signs_body``: the body must be replayable bytes;
    ``reusable``: the headers depend on the credentials alone (not on the URL, method or
    body), so they may be built once per stored row version."""

    name: str
    apply: AuthApply
    in_path: bool = False
    signs_body: bool = False
    reusable: bool = False


#: Auth header kinds by name (``AuthHeader(kind=name)``).
AUTH_KINDS: dict[str, AuthKind] = {}


def register_auth_kind(
    name: str,
    apply: AuthApply,
    *,
    in_path: bool = False,
    signs_body: bool = False,
    reusable: bool = False,
) -> None:
    """Register an auth header kind; a name that is taken is refused."""
    if not isinstance(name, str) or not name:
        raise ValueError("an auth header kind needs a non-empty name")
    if name in AUTH_KINDS:
        raise ValueError(f"an auth header kind named {name!r} is already registered")
    AUTH_KINDS[name] = AuthKind(
        name, apply, in_path=in_path, signs_body=signs_body, reusable=reusable
    )


def _header_auth(
    header: AuthHeader, values: Mapping[str, Any], target: URL, method: str, body: bytes | None
) -> tuple[dict[str, str], URL]:
    rendered = {k: _header_value(v, k) for k, v in values.items()}
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


def _sigv4_auth(
    header: AuthHeader, values: Mapping[str, Any], target: URL, method: str, body: bytes | None
) -> tuple[dict[str, str], URL]:
    service, region = _aws.service_and_region(
        target.raw_host or "", str(values.get("region") or "us-east-1")
    )
    signed = _aws.sign(method, str(target), {}, body, dict(values), service=service, region=region)
    return signed, target


register_auth_kind("header", _header_auth, reusable=True)
register_auth_kind("basic", _basic_auth, reusable=True)
register_auth_kind("path", _path_auth, in_path=True)
register_auth_kind("sigv4", _sigv4_auth, signs_body=True)


def auth_kind(provider: Provider) -> AuthKind | None:
    header = provider.auth_header
    return None if header is None else AUTH_KINDS.get(header.kind)


def bot_url(provider: Provider, credentials: Mapping[str, Any], method_path: str) -> str:
    """The Bot API URL for a method, token included.

    ``bot_url(telegram, creds, "sendMessage")`` →
    ``https://api.telegram.org/bot<TOKEN>/sendMessage``, built on the
    provider's first API host. The result carries the secret: do not log it.
    """
    kind = auth_kind(provider)
    if kind is None or not kind.in_path:
        raise ValueError(f"provider {provider.key!r} does not carry its token in the URL path")
    hosts = [h for h in provider.api_hosts if not h.startswith("*.")]
    if not hosts:
        raise ValueError(f"provider {provider.key!r} has no plain API host to build a URL on")
    _, url = auth_for(provider, credentials, f"https://{hosts[0]}/{method_path.lstrip('/')}")
    return url


def _secret_strings(provider: Provider, credentials: Mapping[str, Any]) -> tuple[str, ...]:
    """The credential strings a request URL may carry, in every spelling, longest first."""
    # Only a path token is put in the URL; header credentials never reach one.
    kind, header = auth_kind(provider), provider.auth_header
    if kind is None or header is None or not kind.in_path:
        return ()
    values = provider.template_values(credentials)
    out: set[str] = set()
    for key in header.fields:
        value = values.get(key)
        if value is not None and str(value):
            text = str(value)
            out.update({text, quote(text, safe=":"), quote(text, safe="")})
    return tuple(sorted(out, key=len, reverse=True))


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, _REDACTED)
    return text


@dataclass(frozen=True, slots=True)
class _Auth:
    provider: Provider
    credentials: Mapping[str, Any] = field(repr=False)
    secrets: tuple[str, ...] = field(repr=False)
    # Headers already built for a header or basic scheme, which do not depend on the URL.
    headers: Mapping[str, str] | None = field(default=None, repr=False)


# The aiohttp request options a caller may pass through (``auth`` is not one: credentials
# come from the provider).
_OPTIONS = frozenset(
    {
        "params",
        "data",
        "json",
        "headers",
        "cookies",
        "skip_auto_headers",
        "allow_redirects",
        "compress",
        "chunked",
        "expect100",
        "read_until_eof",
        "proxy",
        "proxy_auth",
        "proxy_headers",
        "timeout",
        "ssl",
        "server_hostname",
        "trace_request_ctx",
        "read_bufsize",
        "auto_decompress",
        "max_line_size",
        "max_field_size",
    }
)


def _check_options(opts: Mapping[str, Any]) -> None:
    if "auth" in opts:
        raise InvalidArgument(
            "auth= is not accepted: credentials come from the provider", field="auth"
        )
    unknown = sorted(set(opts) - _OPTIONS)
    if unknown:
        raise InvalidArgument(f"unknown request option(s): {', '.join(unknown)}", field=unknown[0])
    timeout = opts.get("timeout")
    if timeout is None or isinstance(timeout, aiohttp.ClientTimeout):
        return
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAXIMUM["timeout"]
    ):
        raise InvalidArgument(
            "timeout must be a positive number of seconds or an aiohttp.ClientTimeout, "
            f"got {shown(timeout)}",
            field="timeout",
        )


# Methods sent without a body on the prepared-header fast path.
_BODYLESS: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
_NO_OPTIONS: Final[Mapping[str, Any]] = MappingProxyType({})

# Checked request URLs kept by HttpClient.target (cleared when full).
_TARGETS_KEPT = 1024


def _site(url: URL) -> str:
    """What logs say of a URL: scheme, host and port; never its path or query, which may
    carry credentials or personal data."""
    return str(url.origin()) if url.absolute else "<url>"


def _origin(url: URL) -> tuple[str, str, int | None]:
    return (url.scheme, (url.raw_host or "").lower().rstrip("."), url.port)


def _encode_body(headers: CIMultiDict[str], json: Any, data: Any) -> tuple[Any, bool]:
    """The body to send and whether it can be sent again (retries, 307/308 redirects)."""
    if json is not None:
        if data is not None:
            raise InvalidArgument("pass json= or data=, not both", field="json")
        headers.setdefault("Content-Type", "application/json")
        try:
            return jsonlib.dumps(json).encode(), True
        except (TypeError, ValueError, RecursionError):
            raise InvalidArgument(
                f"json= must be JSON-serialisable, got {type(json).__name__}", field="json"
            ) from None
    if data is None:
        return None, True
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data), True
    if isinstance(data, str):
        headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        return data.encode(), True
    if isinstance(data, Mapping) or (
        isinstance(data, list | tuple) and all(isinstance(i, tuple) for i in data)
    ):
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        items = data.items() if isinstance(data, Mapping) else data
        return urlencode(list(items), doseq=True).encode(), True
    return data, False


class HttpClient:
    """One aiohttp session for every call, with the host allow-list, redirects and retries.

    Creates its own session on first use unless one is injected; an injected
    session is never closed. Idempotent methods (GET HEAD OPTIONS PUT DELETE)
    are retried on 429/502/503/504 and connection errors, up to
    ``max_attempts`` attempts in all, with exponential backoff and jitter or
    the server's Retry-After, never waiting more than ``max_backoff`` seconds.
    ``timeout`` bounds each attempt.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession | None = None,
        *,
        max_attempts: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 30.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if backoff < 0 or max_backoff < 0 or timeout <= 0:
            raise ValueError("backoff and max_backoff must be >= 0 and timeout > 0")
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self._default_timeout = aiohttp.ClientTimeout(total=timeout)
        self._targets: dict[tuple[str, tuple[str, ...] | None], URL] = {}

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise LifecycleError("The HTTP client is closed.")
        if self._session is None:
            # No cookie jar: one session serves every connection and owner.
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def close(self) -> None:
        """Close the session if this client created it; later calls raise LifecycleError."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    async def request(
        self,
        method: str,
        url: str | URL,
        *,
        provider: Provider,
        credentials: Mapping[str, Any],
        allow_any_host: bool = False,
        max_attempts: int | None = None,
        **opts: Any,
    ) -> Response:
        """Send a request authenticated with ``credentials`` as ``provider`` defines.

        Refuses, before anything is sent, a URL whose host is not in
        ``provider.api_hosts`` (HostNotAllowed). ``allow_any_host=True`` lifts
        that check and sends the credentials wherever the URL points:
        dangerous, use only for URLs you fully control. Credentials are sent
        only to the original origin; a redirect elsewhere is followed without
        them (or refused when the URL itself carries them).

        ``opts``: ``headers``, ``params``, ``json``, ``data``, ``timeout``
        (seconds, or an ``aiohttp.ClientTimeout``, per attempt),
        ``allow_redirects`` (default True), and any other ``aiohttp`` request
        option except ``auth``.
        """
        target = self.target(
            url, params=opts.pop("params", None), provider=provider, allow_any_host=allow_any_host
        )
        return await self.send_authenticated(
            method, target, provider, credentials, max_attempts=max_attempts, opts=opts
        )

    def target(
        self,
        url: str | URL,
        *,
        params: Any = None,
        provider: Provider | None = None,
        allow_any_host: bool = False,
    ) -> URL:
        """The checked URL of a request (https, or http to loopback), ``params`` added;
        HostNotAllowed when it is not one of ``provider``'s API hosts."""
        memo: tuple[str, tuple[str, ...] | None] | None = None
        if params is None and type(url) is str:
            # The same URL for the same hosts is checked once: requests repeat their URLs.
            hosts = None if provider is None or allow_any_host else provider.api_hosts
            memo = (url, hosts)
            known = self._targets.get(memo)
            if known is not None:
                return known
        target = self._target(url, params)
        if (
            provider is not None
            and not allow_any_host
            and not host_allowed(target, provider.api_hosts)
        ):
            raise HostNotAllowed(
                f"{target.raw_host} is not an API host of provider {provider.key!r}; "
                "nothing was sent.",
                provider=provider.key,
                host=target.raw_host,
            )
        if memo is not None:
            if len(self._targets) >= _TARGETS_KEPT:
                self._targets.clear()
            self._targets[memo] = target
        return target

    async def send_authenticated(
        self,
        method: str,
        target: URL,
        provider: Provider,
        credentials: Mapping[str, Any],
        *,
        max_attempts: int | None,
        opts: Mapping[str, Any],
    ) -> Response:
        """Send to a URL that ``target()`` checked, authenticated as ``provider`` defines."""
        auth = _Auth(provider, credentials, _secret_strings(provider, credentials))
        return await self._send(method, target, auth, max_attempts, dict(opts))

    def send_prepared(
        self,
        method: str,
        target: URL,
        provider: Provider,
        headers: Mapping[str, str],
        *,
        max_attempts: int | None,
        opts: Mapping[str, Any],
        scope: telemetry.Row | None = None,
    ) -> Coroutine[Any, Any, Response]:
        """As :meth:`send_authenticated`, with the auth ``headers`` already built by
        :func:`auth_for` (only for ``reusable`` auth kinds), naming the connection
        ``scope`` in the log records made while it runs. Returns the sending coroutine
        itself: one frame less on the hot path's every resumption."""
        if not opts and method in _BODYLESS:
            # The common call (no options, no body): sent as is, the general path taking
            # over only when the answer is a redirect.
            return self._send_plain(method, target, provider, headers, max_attempts, scope)
        auth = _Auth(provider, {}, (), headers)
        sending = self._send(method, target, auth, max_attempts, dict(opts))
        return sending if scope is None else telemetry.in_log_scope(scope, sending)

    def _attempt_count(self, max_attempts: int | None) -> int:
        attempts = self.max_attempts if max_attempts is None else max_attempts
        if (
            isinstance(attempts, bool)
            or not isinstance(attempts, int)
            or not 1 <= attempts <= MAXIMUM["max_attempts"]
        ):
            raise InvalidArgument(
                f"max_attempts must be an int of at least 1, got {shown(attempts)}",
                field="max_attempts",
            )
        return attempts

    async def _send_plain(
        self,
        method: str,
        target: URL,
        provider: Provider,
        headers: Mapping[str, str],
        max_attempts: int | None,
        scope: telemetry.Row | None,
    ) -> Response:
        attempts = self._attempt_count(max_attempts)
        token = None if scope is None else telemetry.enter_log_scope(scope)
        try:
            response = await self._attempts(
                method, target, CIMultiDict(headers), None, attempts, None, _NO_OPTIONS, ()
            )
            if response.status not in REDIRECT_STATUSES or not response.headers.get("Location"):
                return response
            auth = _Auth(provider, {}, (), headers)
            return await self._send(method, target, auth, max_attempts, {}, first=response)
        finally:
            if token is not None:
                telemetry.leave_log_scope(token)

    async def send(
        self,
        method: str,
        url: str | URL,
        *,
        headers: Mapping[str, str] | None = None,
        max_attempts: int | None = None,
        **opts: Any,
    ) -> Response:
        """An unauthenticated request with the same URL rules, redirects and retries.

        Headers that carry credentials (Authorization, Cookie) are dropped on a
        redirect to another origin.
        """
        target = self._target(url, opts.pop("params", None))
        return await self._send(method, target, None, max_attempts, {**opts, "headers": headers})

    @staticmethod
    def _target(url: str | URL, params: Any) -> URL:
        target = check_url(url)
        if params:
            try:
                target = target.extend_query(params)
            except (TypeError, ValueError, RecursionError):
                raise InvalidArgument(
                    "params must be a mapping or a sequence of (name, value) pairs of str, "
                    "int or float",
                    field="params",
                ) from None
        return target

    async def _send(
        self,
        method: str,
        target: URL,
        auth: _Auth | None,
        max_attempts: int | None,
        opts: dict[str, Any],
        *,
        first: Response | None = None,
    ) -> Response:
        """``first``: the answer to the first hop, already sent (a redirect to follow)."""
        method = check_method(method).upper()
        if opts:
            _check_options(opts)
        attempts = self._attempt_count(max_attempts)
        follow = bool(opts.pop("allow_redirects", True))
        timeout = opts.pop("timeout", None)
        given = opts.pop("headers", None)
        try:
            headers: CIMultiDict[str] = CIMultiDict(given) if given else CIMultiDict()
        except (TypeError, ValueError):
            raise InvalidArgument(
                "headers must be a mapping of header names to values", field="headers"
            ) from None
        if given:
            _check_headers(headers)
        body, replayable = _encode_body(headers, opts.pop("json", None), opts.pop("data", None))
        if not replayable:
            attempts = 1
        secrets = auth.secrets if auth else ()
        start = target
        on_origin = True

        for _ in range(MAX_REDIRECTS + 1):
            hop_headers = CIMultiDict(headers)
            url = target
            if auth is not None and on_origin:
                if auth.headers is not None:
                    # Built ahead (a header or basic scheme): nothing signs the body.
                    hop_headers.update(auth.headers)
                else:
                    kind = auth_kind(auth.provider)
                    if kind is not None and kind.signs_body and not replayable:
                        raise InvalidArgument(
                            f"{kind.name} requests need a body given as bytes, str, json or "
                            "form data",
                            field="data",
                        )
                    added, signed_url = auth_for(
                        auth.provider, auth.credentials, url, method=method, body=body
                    )
                    for name, value in added.items():
                        hop_headers[name] = value
                    url = URL(signed_url, encoded=True)
            if first is not None:
                response, first = first, None
            else:
                response = await self._attempts(
                    method, url, hop_headers, body, attempts, timeout, opts, secrets
                )
            if not follow or response.status not in REDIRECT_STATUSES:
                return response
            location = response.headers.get("Location")
            if not location:
                return response
            try:
                next_url = check_url(url.join(URL(location)))
            except ValueError:
                raise RequestFailed(
                    f"{method} {_redact(str(url), secrets)} redirected to a URL that is "
                    "not https (or loopback http); not followed."
                ) from None
            if (response.status == 303 and method != "HEAD") or (
                response.status in (301, 302) and method == "POST"
            ):
                method, body = "GET", None
                for name in ("Content-Type", "Content-Length"):
                    headers.popall(name, None)
            elif response.status in (307, 308) and not replayable:
                return response
            if on_origin and _origin(next_url) != _origin(start):
                on_origin = False
                names = list(_SENSITIVE_HEADERS)
                if auth is not None and auth.provider.auth_header is not None:
                    names.append(auth.provider.auth_header.name)
                for name in names:
                    headers.popall(name, None)
                if any(secret in str(next_url) for secret in secrets):
                    raise RequestFailed(
                        "Refused to follow a redirect to another host: the URL would carry "
                        "the credentials."
                    )
            target = next_url
        raise RequestFailed(f"More than {MAX_REDIRECTS} redirects; gave up.")

    async def _attempts(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: Any,
        attempts: int,
        attempt_timeout: float | aiohttp.ClientTimeout | None,
        opts: Mapping[str, Any],
        secrets: tuple[str, ...],
    ) -> Response:
        retry = method in IDEMPOTENT_METHODS
        if attempt_timeout is None:
            client_timeout = self._default_timeout
        elif isinstance(attempt_timeout, aiohttp.ClientTimeout):
            client_timeout = attempt_timeout
        else:
            client_timeout = aiohttp.ClientTimeout(total=attempt_timeout or self.timeout)
        shown = _redact(str(url), secrets)
        for attempt in range(1, attempts + 1):
            telemetry.count_attempt()
            # Per attempt: close() may have run during the previous one or the backoff.
            session = self._get_session()
            try:
                async with session.request(
                    method,
                    url,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=client_timeout,
                    **opts,
                ) as raw:
                    response = Response(
                        status=raw.status,
                        headers=raw.headers,
                        body=await raw.read(),
                        url=shown,
                    )
            except RuntimeError as exc:
                # aiohttp's "Session is closed": an injected session its owner closed.
                if not session.closed:
                    raise
                raise LifecycleError("The HTTP session is closed.") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                transient = isinstance(
                    exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | TimeoutError
                )
                reason = (
                    "timed out"
                    if isinstance(exc, TimeoutError)
                    else (_redact(str(exc), secrets) or type(exc).__name__)
                )
                if retry and transient and attempt < attempts:
                    delay = self._delay(attempt, None)
                    logger.debug(
                        "%s %s: %s; retrying in %.2fs",
                        method,
                        _site(url),
                        type(exc).__name__,
                        delay,
                        extra=telemetry.fields("http_retry"),
                    )
                    await asyncio.sleep(delay)
                    continue
                leaked = any(secret in repr(exc.args) for secret in secrets)
                raise RequestFailed(
                    f"{method} {shown} failed after {attempt} attempt(s): {reason}",
                    attempts=attempt,
                    reason=reason,
                    # Only a connection never made means the request was surely not sent.
                    maybe_sent=not isinstance(exc, aiohttp.ClientConnectorError),
                ) from (None if leaked else exc)
            if retry and response.status in RETRY_STATUSES and attempt < attempts:
                delay = self._delay(attempt, response.headers.get("Retry-After"))
                logger.debug(
                    "%s %s: status %d; retrying in %.2fs",
                    method,
                    _site(url),
                    response.status,
                    delay,
                    extra=telemetry.fields("http_retry"),
                )
                await asyncio.sleep(delay)
                continue
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            seconds = retry_after_seconds(retry_after)
            if seconds is not None:
                return min(seconds, self.max_backoff)
        return equal_jitter(min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1)))
