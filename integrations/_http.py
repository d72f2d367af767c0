"""HTTP client: authenticated requests bound to a provider's hosts, with redirects and retries."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json as jsonlib
import logging
import re
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlencode

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from . import _telemetry as telemetry
from ._backoff import equal_jitter
from ._errors import (
    HostNotAllowed,
    InvalidArgument,
    InvalidInput,
    InvalidURL,
    LifecycleError,
    RequestFailed,
)
from ._input import check_header_value, check_method
from ._names import shown
from ._providers import Provider, split_host_entry
from ._schemes import Request, header_kind
from ._settings import MAXIMUM

__all__ = [
    "HttpClient",
    "Request",
    "Response",
    "Signer",
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
    """The headers to add and the final URL for a request made with these credentials,
    as the provider's auth scheme signs it (a templated header such as ``Bearer``, HTTP
    Basic, the token put in front of the URL path, an AWS SigV4 signature over ``method``
    and ``body``, or an application scheme's own). A missing credential raises
    NotConnected (no OAuth access token) or NotConfigured."""
    added, final = provider.scheme.sign(provider, credentials, method, _parse(url), body)
    return added, str(final)


def bot_url(provider: Provider, credentials: Mapping[str, Any], method_path: str) -> str:
    """The Bot API URL for a method, token included.

    ``bot_url(telegram, creds, "sendMessage")`` →
    ``https://api.telegram.org/bot<TOKEN>/sendMessage``, built on the
    provider's first API host. The result carries the secret: do not log it.
    """
    header = provider.auth_header
    kind = header_kind(header.kind) if header is not None else None
    if kind is None or not kind.in_path:
        raise ValueError(f"provider {provider.key!r} does not carry its token in the URL path")
    hosts = [h for h in provider.api_hosts if not h.startswith("*.")]
    if not hosts:
        raise ValueError(f"provider {provider.key!r} has no plain API host to build a URL on")
    _, url = auth_for(provider, credentials, f"https://{hosts[0]}/{method_path.lstrip('/')}")
    return url


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, _REDACTED)
    return text


Sign = Callable[[str, URL, "bytes | None"], tuple[dict[str, str], URL]]


@dataclass(frozen=True, slots=True, repr=False)
class Signer:
    """How each hop of a request to its origin is authenticated: ``headers`` built ahead
    (they depend on the credentials alone), or ``sign`` called per hop with its method,
    URL and body. ``secrets``: credential strings the URL may carry (hidden in logs and
    errors, never sent to another host); ``header``: the scheme's own header, dropped on a
    redirect to another origin with the usual credential headers; ``signs_body``: the body
    must be replayable bytes."""

    headers: Mapping[str, str] | None = None
    sign: Sign | None = None
    secrets: tuple[str, ...] = ()
    header: str | None = None
    signs_body: bool = False

    @classmethod
    def of(cls, provider: Provider, credentials: Mapping[str, Any]) -> Signer:
        """Signs with ``credentials`` as ``provider``'s auth scheme does."""
        scheme = provider.scheme

        def sign(method: str, url: URL, body: bytes | None) -> tuple[dict[str, str], URL]:
            return scheme.sign(provider, credentials, method, url, body)

        return cls(
            sign=sign,
            secrets=scheme.url_secrets(provider, credentials),
            header=_header_name(provider),
            signs_body=scheme.signs_body(provider),
        )

    @classmethod
    def prepared(cls, provider: Provider, headers: Mapping[str, str]) -> Signer:
        """Adds ``headers``, built ahead by the scheme's ``prepared_headers``."""
        return cls(headers=headers, header=_header_name(provider))


def _header_name(provider: Provider) -> str | None:
    header = provider.auth_header
    return header.name if header is not None else None


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
        provider: Provider | None = None,
        credentials: Mapping[str, Any] | None = None,
        allow_any_host: bool = False,
        max_attempts: int | None = None,
        **opts: Any,
    ) -> Response:
        """Build a request and send it, authenticated with ``credentials`` as ``provider``'s
        auth scheme signs it (unauthenticated without a provider).

        Refuses, before anything is sent, a URL whose host is not in
        ``provider.api_hosts`` (HostNotAllowed). ``allow_any_host=True`` lifts
        that check and sends the credentials wherever the URL points:
        dangerous, use only for URLs you fully control. Credentials are sent
        only to the original origin; a redirect elsewhere is followed without
        them (or refused when the URL itself carries them). Headers that carry
        credentials (Authorization, Cookie) are dropped on a redirect to another origin.

        ``opts``: ``headers``, ``params``, ``json``, ``data``, ``timeout``
        (seconds, or an ``aiohttp.ClientTimeout``, per attempt),
        ``allow_redirects`` (default True), and any other ``aiohttp`` request
        option except ``auth``.
        """
        request = self.prepare(
            method,
            url,
            provider=provider,
            allow_any_host=allow_any_host,
            max_attempts=max_attempts,
            opts=opts,
        )
        signer = None if provider is None else Signer.of(provider, credentials or {})
        return await self.send(request, signer)

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

    def prepare(
        self,
        method: str,
        url: str | URL,
        *,
        provider: Provider | None = None,
        allow_any_host: bool = False,
        max_attempts: int | None = None,
        opts: Mapping[str, Any] = _NO_OPTIONS,
    ) -> Request:
        """The request a call makes, checked before anything is sent: method, URL (and
        its host against ``provider``'s), options and headers; the body encoded once."""
        method = check_method(method).upper()
        if not opts:
            target = self.target(url, provider=provider, allow_any_host=allow_any_host)
            return Request(method, target, max_attempts=max_attempts)
        rest = dict(opts)
        target = self.target(
            url, params=rest.pop("params", None), provider=provider, allow_any_host=allow_any_host
        )
        if not rest:
            return Request(method, target, max_attempts=max_attempts)
        _check_options(rest)
        follow = bool(rest.pop("allow_redirects", True))
        timeout = rest.pop("timeout", None)
        given = rest.pop("headers", None)
        headers: CIMultiDict[str] | None = None
        if given:
            try:
                headers = CIMultiDict(given)
            except (TypeError, ValueError):
                raise InvalidArgument(
                    "headers must be a mapping of header names to values", field="headers"
                ) from None
            _check_headers(headers)
        body_headers: CIMultiDict[str] = CIMultiDict()
        body, replayable = _encode_body(
            body_headers, rest.pop("json", None), rest.pop("data", None)
        )
        if body_headers:
            headers = headers if headers is not None else CIMultiDict()
            for name, value in body_headers.items():
                headers.setdefault(name, value)
        return Request(
            method,
            target,
            headers=headers,
            body=body,
            replayable=replayable,
            timeout=timeout,
            follow_redirects=follow,
            max_attempts=max_attempts,
            options=rest,
        )

    def send(
        self,
        request: Request,
        signer: Signer | None = None,
        *,
        scope: telemetry.Row | None = None,
    ) -> Coroutine[Any, Any, Response]:
        """The one way out: send ``request`` (retries on 429/5xx and connection errors,
        redirects), each hop to its origin authenticated by ``signer``, naming the
        connection ``scope`` in the log records made meanwhile. Returns the sending
        coroutine itself: one frame less on the hot path's every resumption."""
        if (
            signer is not None
            and signer.headers is not None
            and request.headers is None
            and request.body is None
            and not request.options
            and request.timeout is None
            and request.follow_redirects
            and request.method in _BODYLESS
        ):
            # The common call (no options, no body, headers built ahead): sent as is, the
            # general path taking over only when the answer is a redirect.
            return self._send_plain(request, signer, scope)
        sending = self._send(request, signer)
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
        self, request: Request, signer: Signer, scope: telemetry.Row | None
    ) -> Response:
        attempts = self._attempt_count(request.max_attempts)
        token = None if scope is None else telemetry.enter_log_scope(scope)
        try:
            assert signer.headers is not None
            response = await self._attempts(
                request.method,
                request.url,
                CIMultiDict(signer.headers),
                None,
                attempts,
                None,
                _NO_OPTIONS,
                (),
            )
            if response.status not in REDIRECT_STATUSES or not response.headers.get("Location"):
                return response
            return await self._send(request, signer, first=response)
        finally:
            if token is not None:
                telemetry.leave_log_scope(token)

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
        request: Request,
        signer: Signer | None,
        *,
        first: Response | None = None,
    ) -> Response:
        """``first``: the answer to the first hop, already sent (a redirect to follow)."""
        method = request.method
        attempts = self._attempt_count(request.max_attempts)
        body, replayable = request.body, request.replayable
        if not replayable:
            attempts = 1
        if signer is not None and signer.signs_body and not replayable:
            raise InvalidArgument(
                "this provider's requests sign their body: give it as bytes, str, json or "
                "form data",
                field="data",
            )
        headers: CIMultiDict[str] = (
            CIMultiDict(request.headers) if request.headers else CIMultiDict()
        )
        secrets = signer.secrets if signer is not None else ()
        timeout, opts = request.timeout, request.options
        target = start = request.url
        on_origin = True

        for _ in range(MAX_REDIRECTS + 1):
            hop_headers = CIMultiDict(headers)
            url = target
            if signer is not None and on_origin:
                if signer.headers is not None:
                    hop_headers.update(signer.headers)
                elif signer.sign is not None:
                    added, url = signer.sign(method, url, body)
                    for name, value in added.items():
                        hop_headers[name] = value
            if first is not None:
                response, first = first, None
            else:
                response = await self._attempts(
                    method, url, hop_headers, body, attempts, timeout, opts, secrets
                )
            if not request.follow_redirects or response.status not in REDIRECT_STATUSES:
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
                if signer is not None and signer.header is not None:
                    names.append(signer.header)
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
