"""Optional OpenTelemetry spans and metrics, and the structured fields of every log record."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeVar
from urllib.parse import parse_qs

__all__ = [
    "ENABLED",
    "LOG_FIELDS",
    "Row",
    "SpanLike",
    "annotate",
    "check_span",
    "count_attempt",
    "count_event_dropped",
    "count_resync",
    "enter_log_scope",
    "fields",
    "grant_type_of",
    "instruments",
    "leave_log_scope",
    "live",
    "log_scope",
    "pool_wait",
    "record_cache",
    "record_callers",
    "record_sweep",
    "request_span",
    "span",
    "token_span",
]


def _api_installed() -> bool:
    # ``opentelemetry`` is a namespace shared by many distributions: look for the API's
    # ``trace`` package in it without importing anything.
    spec = importlib.util.find_spec("opentelemetry")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(os.path.isdir(os.path.join(p, "trace")) for p in spec.submodule_search_locations)


#: Whether ``opentelemetry-api`` is installed; looked up once, nothing of it imported here.
ENABLED: Final = _api_installed()

#: The ``extra`` fields every log record of the library carries (None when not applicable).
LOG_FIELDS: Final = (
    "integrations_uuid",
    "integrations_provider",
    "integrations_owner",
    "integrations_event_kind",
)

SCOPE: Final = "integrations"

Kind = Literal["internal", "client"]

# The connection the current task works for: log records made deeper down (HTTP retries)
# name it without every layer passing it along.
_LOG_SCOPE: ContextVar[tuple[str, str, str | None] | None] = ContextVar(
    "integrations_log_scope", default=None
)
# HTTP attempts of the authenticated request in progress (a one-item list, shared with the
# sending code); None outside one, so token and userinfo calls are not counted.
_ATTEMPTS: ContextVar[list[int] | None] = ContextVar("integrations_attempts", default=None)

# An OAuth error code is an RFC 6749 token; anything else from a server is not repeated.


_T = TypeVar("_T")


class Row(Protocol):
    """What telemetry reads of a stored connection: never its data."""

    @property
    def uuid(self) -> str: ...

    @property
    def provider(self) -> str: ...

    @property
    def owner(self) -> str | None: ...


class SpanLike(Protocol):
    """What the library does with a span: attributes only."""

    def set_attribute(self, key: str, value: Any) -> None: ...


class _NoSpan:
    __slots__ = ()

    def set_attribute(self, key: str, value: Any) -> None:
        pass


_NO_SPAN: Final = _NoSpan()
_NO_CONTEXT: Final = contextlib.nullcontext(_NO_SPAN)


# -- logs --------------------------------------------------------------------------------


def fields(
    kind: str,
    *,
    uuid: str | None = None,
    provider: str | None = None,
    owner: str | None = None,
) -> dict[str, Any]:
    """The ``extra=`` of a log record: the connection concerned (when there is one) and a
    stable name for what happened. Unset parts come from the connection in scope."""
    scope = _LOG_SCOPE.get()
    if scope is not None and uuid is None:
        uuid, provider, owner = scope[0], provider or scope[1], scope[2]
    return {
        "integrations_uuid": uuid,
        "integrations_provider": provider,
        "integrations_owner": owner,
        "integrations_event_kind": kind,
    }


def enter_log_scope(row: Row) -> Token[tuple[str, str, str | None] | None]:
    """Name ``row`` in the log records made from here on, until :func:`leave_log_scope`
    (the request path's form of :func:`log_scope`, without a generator)."""
    return _LOG_SCOPE.set((row.uuid, row.provider, row.owner))


def leave_log_scope(token: Token[tuple[str, str, str | None] | None]) -> None:
    _LOG_SCOPE.reset(token)


async def in_log_scope(row: Row, running: Awaitable[_T]) -> _T:
    """Await ``running`` with ``row`` named in the log records made meanwhile."""
    token = enter_log_scope(row)
    try:
        return await running
    finally:
        _LOG_SCOPE.reset(token)


@contextlib.contextmanager
def log_scope(row: Row) -> Iterator[None]:
    """Name ``row`` in the log records made inside the block."""
    token = enter_log_scope(row)
    try:
        yield
    finally:
        _LOG_SCOPE.reset(token)


# -- OpenTelemetry -----------------------------------------------------------------------


@dataclass(slots=True)
class _Instruments:
    #: Made from providers given explicitly rather than the global ones.
    explicit: bool
    tracer: Any
    client_kind: Any
    internal_kind: Any
    http_duration: Any
    token_requests: Any
    callers: Any
    checks: Any
    events_dropped: Any
    resyncs: Any
    pool_wait: Any
    cache: Any
    sweeps: Any
    sweep_jobs: Any


_instruments: _Instruments | None = None

_HTTP_METHODS: Final = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"}
)
# The semantic conventions' advice for durations in seconds.
_SECONDS_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)


def _otel() -> _Instruments:
    """The tracer and instruments, made on first use (the API's proxies follow a provider
    configured later)."""
    global _instruments
    if _instruments is None:
        _instruments = instruments()
    return _instruments


def instruments(tracer_provider: Any = None, meter_provider: Any = None) -> _Instruments:
    """The tracer and instruments of the given providers (the global ones by default)."""
    from opentelemetry import metrics, trace

    meter = metrics.get_meter(SCOPE, meter_provider=meter_provider)
    return _Instruments(
        explicit=tracer_provider is not None or meter_provider is not None,
        tracer=trace.get_tracer(SCOPE, tracer_provider=tracer_provider),
        client_kind=trace.SpanKind.CLIENT,
        internal_kind=trace.SpanKind.INTERNAL,
        http_duration=meter.create_histogram(
            "http.client.request.duration",
            unit="s",
            description="Duration of authenticated requests, retries included.",
            explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
        ),
        token_requests=meter.create_counter(
            "integrations.token.requests",
            unit="{request}",
            description="Token endpoint calls by provider, grant type and outcome.",
        ),
        callers=meter.create_histogram(
            "integrations.token.callers",
            unit="{caller}",
            description="Callers served by one token refresh that asked the endpoint.",
        ),
        checks=meter.create_counter(
            "integrations.checks",
            unit="{check}",
            description="Credential checks by provider and outcome.",
        ),
        events_dropped=meter.create_counter(
            "integrations.events.dropped",
            unit="{event}",
            description="Events dropped: a full subscription queue or a malformed payload.",
        ),
        resyncs=meter.create_counter(
            "integrations.events.resyncs",
            unit="{resync}",
            description="LISTEN connections restored (each one sends a resync event).",
        ),
        pool_wait=meter.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="Time to acquire a connection from the pool.",
            explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS,
        ),
        cache=meter.create_observable_counter(
            "integrations.cache.lookups",
            callbacks=[_observe_cache],
            unit="{lookup}",
            description="Cache lookups by result (hit or miss).",
        ),
        sweeps=meter.create_counter(
            "integrations.sweeps",
            unit="{sweep}",
            description="Health sweeps finished (by the process leading the fleet).",
        ),
        sweep_jobs=meter.create_counter(
            "integrations.sweep.jobs",
            unit="{job}",
            description="Checks and token renewals of health sweeps, by job and outcome.",
        ),
    )


def _live() -> bool:
    """Whether anything would receive telemetry: the API is installed and a tracer or meter
    provider was configured (the API's default proxies discard everything, so nothing is
    built for them; checked on each call, since a provider may be configured later)."""
    if not ENABLED:
        return False
    made = _instruments
    if made is not None and made.explicit:
        return True
    configured = _configured
    if configured is None:
        configured = _find_configured()
    return configured()


def _find_configured() -> Callable[[], bool]:
    """How to tell that a provider is configured, found on first use. The public getters
    are called once so that providers named by environment variables are loaded; after
    that the modules' own globals are read directly, since this runs on every request
    and the getters look at the environment each time (a provider, once set, stays)."""
    global _configured
    from opentelemetry import metrics, trace
    from opentelemetry.metrics import _internal as meters

    trace.get_tracer_provider()
    metrics.get_meter_provider()
    if hasattr(trace, "_TRACER_PROVIDER") and hasattr(meters, "_METER_PROVIDER"):

        def configured() -> bool:
            return trace._TRACER_PROVIDER is not None or meters._METER_PROVIDER is not None

    else:  # pragma: no cover - an API release that keeps them elsewhere

        def configured() -> bool:
            return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider) or (
                type(metrics.get_meter_provider()).__name__ != "_ProxyMeterProvider"
            )

    _configured = configured
    return configured


_configured: Callable[[], bool] | None = None

#: Whether spans and metrics are being made (see :func:`_live`).
live = _live


def span(
    name: str, attributes: Mapping[str, Any] | None = None, *, kind: Kind = "internal"
) -> contextlib.AbstractContextManager[SpanLike]:
    """A span around the block (current while it runs); a shared no-op without the API.

    An exception leaving the block sets the span's status to error and ``error.type``
    (its code or class), never its message, which may quote a URL or a server's words.
    """
    if not _live():
        return _NO_CONTEXT
    return _span(name, attributes, kind)


@contextlib.contextmanager
def _span(name: str, attributes: Mapping[str, Any] | None, kind: Kind) -> Iterator[SpanLike]:
    otel = _otel()
    with otel.tracer.start_as_current_span(
        name,
        kind=otel.client_kind if kind == "client" else otel.internal_kind,
        attributes=dict(attributes) if attributes else None,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as exc:
            failed(current, _error_type(exc))
            raise


def failed(current: Any, error_type: str) -> None:
    """Mark ``current`` (a span) as failed with ``error_type`` and nothing else."""
    from opentelemetry.trace import Status, StatusCode

    current.set_attribute("error.type", error_type)
    if hasattr(current, "set_status"):
        current.set_status(Status(StatusCode.ERROR, error_type))


def annotate(key: str, value: Any) -> None:
    """Set an attribute on the current span, if any."""
    if _live():
        from opentelemetry import trace

        trace.get_current_span().set_attribute(key, value)


#: ``_url_attributes`` of the origins seen last (scheme, host and port only: never a path,
#: query or userinfo), bounded.
_ORIGINS: dict[str, dict[str, Any]] = {}
_ORIGINS_KEPT: Final = 256


def _url_attributes(url: Any) -> dict[str, Any]:
    """``server.*``/``url.scheme`` of a URL; its path, query and userinfo are left out
    (they can carry credentials: a bot token in a path, a key in a query). A copy."""
    origin = _origin(url)
    if origin is None:
        return _parse_url_attributes(url)
    known = _ORIGINS.get(origin)
    if known is None:
        if len(_ORIGINS) >= _ORIGINS_KEPT:
            _ORIGINS.clear()
        known = _ORIGINS[origin] = _parse_url_attributes(origin)
    return dict(known)


def _origin(url: Any) -> str | None:
    """``scheme://host[:port]`` of a URL string without userinfo; None otherwise (then
    the URL is parsed whole, and nothing of it is kept)."""
    if type(url) is not str:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.isalpha():
        return None
    end = len(rest)
    for mark in "/?#":
        at = rest.find(mark)
        if at != -1 and at < end:
            end = at
    authority = rest[:end]
    if _AUTHORITY_RE.fullmatch(authority) is None:
        return None
    return f"{scheme}://{authority}"


# A host (name, IPv4 or bracketed IPv6) and port: nothing that would parse otherwise.
_AUTHORITY_RE: Final = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def _parse_url_attributes(url: Any) -> dict[str, Any]:
    from yarl import URL

    try:
        parsed = url if isinstance(url, URL) else URL(str(url))
    except (TypeError, ValueError):
        return {}
    found: dict[str, Any] = {}
    if parsed.scheme:
        found["url.scheme"] = parsed.scheme
    if parsed.host:
        found["server.address"] = parsed.host
        if parsed.port is not None:
            found["server.port"] = parsed.port
    return found


def _error_type(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) and code else type(exc).__qualname__


# -- authenticated requests --------------------------------------------------------------


@contextlib.contextmanager
def request_span(row: Row, method: str, url: Any) -> Iterator[_RequestOutcome]:
    """An HTTP client span for one authenticated request (semantic conventions: the span
    is named after the method), with the connection it was made for and its attempts.
    The block sets ``status`` on what it yields once it has a response.

    This runs on every request, so it does the least the SDK allows: the span is started
    and made current directly (no context manager per layer), its closing attributes go
    in one call, and a URL's attributes are parsed once per URL."""
    token = enter_log_scope(row)
    try:
        if not _live():
            yield _RequestOutcome()
            return
        from opentelemetry import context, trace

        otel = _otel()
        outcome = _RequestOutcome()
        # Semantic conventions: a method outside the known set is named _OTHER.
        known = method if method in _HTTP_METHODS else "_OTHER"
        server = _url_attributes(url)
        attributes: dict[str, Any] = {
            "http.request.method": known,
            **server,
            "integrations.provider": row.provider,
            "integrations.connection.uuid": row.uuid,
        }
        if known != method:
            attributes["http.request.method_original"] = method
        cell = [0]
        attempts = _ATTEMPTS.set(cell)
        started = time.perf_counter()
        error: str | None = None
        current = otel.tracer.start_span(
            known if known != "_OTHER" else "HTTP",
            kind=otel.client_kind,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        )
        attached = context.attach(trace.set_span_in_context(current))
        try:
            yield outcome
        except BaseException as exc:
            error = _error_type(exc)
            raise
        finally:
            try:
                closing: dict[str, Any] = {"integrations.attempts": cell[0]}
                if outcome.status is not None:
                    closing["http.response.status_code"] = outcome.status
                    if outcome.status >= 400 and error is None:
                        error = str(outcome.status)
                if cell[0] > 1:
                    closing["http.request.resend_count"] = cell[0] - 1
                current.set_attributes(closing)
                if error is not None:
                    failed(current, error)
            finally:
                context.detach(attached)
                current.end()
                _ATTEMPTS.reset(attempts)
                metric = {"http.request.method": known, **server}
                metric["integrations.provider"] = row.provider
                if outcome.status is not None:
                    metric["http.response.status_code"] = outcome.status
                if error is not None:
                    metric["error.type"] = error
                otel.http_duration.record(time.perf_counter() - started, metric)
    finally:
        _LOG_SCOPE.reset(token)


class _RequestOutcome:
    __slots__ = ("status",)

    def __init__(self) -> None:
        self.status: int | None = None


def count_attempt() -> None:
    """One HTTP attempt (first send or retry) of the authenticated request in progress."""
    cell = _ATTEMPTS.get()
    if cell is not None:
        cell[0] += 1


# -- token requests ----------------------------------------------------------------------


def grant_type_of(body: Any) -> str:
    """The ``grant_type`` of a form-encoded token request body (nothing else is read)."""
    if isinstance(body, bytes):
        body = body.decode("ascii", "replace")
    if not isinstance(body, str):
        return "unknown"
    from .oauth import error_code  # loaded by then: only token requests get here

    values = parse_qs(body).get("grant_type")
    return (values and error_code(values[0])) or "unknown"


@contextlib.contextmanager
def token_span(provider: str | None, url: str, body: Any) -> Iterator[None]:
    """A span and a count for one token endpoint call: grant type, outcome, error code."""
    if not _live():
        yield
        return
    # The attempts of a request this refresh serves are the request's, not the refresh's.
    attempts = _ATTEMPTS.set(None)
    grant = grant_type_of(body)
    attributes: dict[str, Any] = {
        "http.request.method": "POST",
        **_url_attributes(url),
        "integrations.grant_type": grant,
    }
    if provider:
        attributes["integrations.provider"] = provider
    outcome = "ok"
    try:
        with span("integrations.token_request", attributes, kind="client") as current:
            try:
                yield
            except BaseException as exc:
                code = getattr(exc, "code", None)
                outcome = "reauth_required" if code == "reauth_required" else "failed"
                current.set_attribute("error.type", _error_type(exc))
                if isinstance(code, str):
                    current.set_attribute("integrations.error_code", code)
                context = getattr(exc, "context", None)
                if isinstance(context, Mapping):
                    from .oauth import error_code

                    oauth_error = context.get("error")
                    if error_code(oauth_error) is not None:
                        current.set_attribute("integrations.oauth_error", oauth_error)
                    status = context.get("status")
                    if isinstance(status, int):
                        current.set_attribute("http.response.status_code", status)
                raise
            finally:
                current.set_attribute("integrations.outcome", outcome)
    finally:
        _ATTEMPTS.reset(attempts)
        counted = {
            "integrations.grant_type": grant,
            "integrations.outcome": outcome,
            "integrations.provider": provider or "unknown",
        }
        _otel().token_requests.add(1, counted)


def record_callers(callers: int) -> None:
    """How many callers one token refresh that asked the endpoint served."""
    if _live():
        _otel().callers.record(callers)


# -- checks, rotation --------------------------------------------------------------------


@contextlib.contextmanager
def check_span(row: Row) -> Iterator[_CheckOutcome]:
    """A span and a count for one credential check; the block sets ``ok``."""
    token = enter_log_scope(row)
    outcome = _CheckOutcome()
    try:
        if not _live():
            yield outcome
            return
        attributes = {
            "integrations.provider": row.provider,
            "integrations.connection.uuid": row.uuid,
        }
        result = "error"
        try:
            with span("integrations.check", attributes) as current:
                yield outcome
                result = "ok" if outcome.ok else "failed"
                current.set_attribute("integrations.outcome", result)
        finally:
            _otel().checks.add(
                1, {"integrations.provider": row.provider, "integrations.outcome": result}
            )
    finally:
        _LOG_SCOPE.reset(token)


class _CheckOutcome:
    __slots__ = ("ok",)

    def __init__(self) -> None:
        self.ok = False


# -- events, pool, cache -----------------------------------------------------------------


def count_event_dropped(reason: Literal["queue_full", "malformed"]) -> None:
    if _live():
        _otel().events_dropped.add(1, {"integrations.reason": reason})


def count_resync() -> None:
    if _live():
        _otel().resyncs.add(1)


@contextlib.contextmanager
def _timed_pool_wait() -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        _otel().pool_wait.record(
            time.perf_counter() - started, {"db.client.connection.pool.name": SCOPE}
        )


def pool_wait() -> contextlib.AbstractContextManager[Any]:
    """Time the block as a wait for a pool connection."""
    return _timed_pool_wait() if _live() else _NO_CONTEXT


def record_sweep(counts: Mapping[str, int]) -> None:
    """One finished health sweep and its jobs' outcomes."""
    if not _live():
        return
    otel = _otel()
    otel.sweeps.add(1)
    outcomes = (
        ("check", "ok", counts["checked"] - counts["check_failures"]),
        ("check", "failed", counts["check_failures"]),
        ("refresh", "ok", counts["refreshed"]),
        ("refresh", "failed", counts["refresh_failures"]),
    )
    for job, outcome, value in outcomes:
        if value:
            otel.sweep_jobs.add(value, {"integrations.job": job, "integrations.outcome": outcome})
    if counts["errors"]:
        otel.sweep_jobs.add(counts["errors"], {"integrations.outcome": "error"})


def record_cache(hit: bool) -> None:
    """One cache lookup: a hit or a miss."""
    if _live():
        _CACHE_LOOKUPS["hit" if hit else "miss"] += 1


#: Cache lookups counted while telemetry is live, read by the observable counter
#: ``integrations.cache.lookups`` when metrics are collected: a lookup costs an increment.
_CACHE_LOOKUPS: dict[str, int] = {"hit": 0, "miss": 0}


def _observe_cache(_options: Any) -> list[Any]:
    from opentelemetry.metrics import Observation

    return [
        Observation(count, {"integrations.cache.result": result})
        for result, count in _CACHE_LOOKUPS.items()
    ]
