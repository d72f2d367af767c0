"""Credential probes: ask a provider and report a Validation instead of raising for its answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from . import oauth
from ._errors import (
    InvalidAttrs,
    MissingExtra,
    MissingField,
    NotConfigured,
    NotConnected,
    RequestFailed,
)
from ._http import HttpClient, Response
from ._models import Validation
from ._providers import Provider, ValidationRequest
from ._repository import probe_postgres
from ._tls import context_for

__all__ = [
    "ACCESS_DENIED",
    "CHECK_HOOKS",
    "CONNECTED",
    "INVALID_CREDENTIALS",
    "NO_ACCESS_TOKEN",
    "NO_CHECK",
    "UNREACHABLE",
    "CheckHook",
    "check_credentials",
    "register_check",
]

CONNECTED = "Connected"
INVALID_CREDENTIALS = "Invalid credentials"
ACCESS_DENIED = "Access denied"
UNREACHABLE = "Could not reach the service"
NO_ACCESS_TOKEN = "No access token"
NO_CHECK = "Saved; this provider has no credential check"


#: A check that is not an HTTP request: credentials and a deadline in, a Validation out.
CheckHook = Callable[[Mapping[str, Any], float], Awaitable[Validation]]
#: Registered check hooks by name (``ValidationRequest(hook=name)``).
CHECK_HOOKS: dict[str, CheckHook] = {}


def register_check(name: str, hook: CheckHook) -> None:
    """Register a credential-check hook; a name that is taken is refused."""
    if not isinstance(name, str) or not name:
        raise ValueError("a check hook needs a non-empty name")
    if name in CHECK_HOOKS:
        raise ValueError(f"a check hook named {name!r} is already registered")
    CHECK_HOOKS[name] = hook


def _not_configured(fields: list[str]) -> Validation:
    return Validation(False, f"Not configured (missing: {', '.join(fields)})")


async def check_credentials(
    provider: Provider,
    credentials: Mapping[str, Any],
    *,
    http: HttpClient,
    timeout: float = 15.0,  # noqa: ASYNC109  (the deadline is part of the public contract)
) -> Validation:
    """Probe the provider with ``credentials`` (stored data or setup attrs) within ``timeout`` s.

    Never raises for what the provider answers: a 2xx (or a successful login)
    is ``ok``; 401 (and the provider's other "invalid" statuses) is "Invalid
    credentials"; 403 "Access denied"; another status "Service error N"; no
    answer within the deadline, or a network error, "Could not reach the
    service". Missing required fields give "Not configured (...)" and an OAuth
    connection without an access token "No access token"; nothing is sent then.
    Malformed input (a field of the wrong type) raises InvalidField.
    """
    if not isinstance(credentials, Mapping):
        raise InvalidAttrs("Credentials must be a mapping.")
    values = provider.template_values(credentials)
    for field in provider.setup_fields:
        if field.key in values:
            values[field.key] = field.coerce(values[field.key])
    if provider.is_oauth:
        if "access_token" not in values:
            return Validation(False, NO_ACCESS_TOKEN)
    elif missing := provider.missing_required(values):
        return _not_configured(missing)
    check = provider.validation
    # The provider's own userinfo endpoint is where its token is meant to go, whatever
    # api_hosts says; it is the natural check of an OAuth connection.
    userinfo = check is None and provider.scheme.authorizes_user and bool(provider.userinfo_url)
    if userinfo and provider.userinfo_url:
        check = ValidationRequest(url=provider.userinfo_url)
    if check is None:
        return Validation(True, NO_CHECK)
    try:
        async with asyncio.timeout(timeout):
            if check.hook is not None:
                return await CHECK_HOOKS[check.hook](values, timeout)
            return await _check_http(provider, check, values, http, any_host=userinfo)
    except TimeoutError:
        return Validation(False, UNREACHABLE)


async def _check_http(
    provider: Provider,
    check: ValidationRequest,
    values: dict[str, Any],
    http: HttpClient,
    *,
    any_host: bool = False,
) -> Validation:
    try:
        url = provider.render_url(check.url, values)
        provider = provider.for_data(values)
        context = context_for(provider, values)
        response = await http.request(
            check.method,
            url,
            provider=provider,
            credentials=values,
            headers=check.headers,
            allow_any_host=any_host,
            ssl=True if context is None else context,
        )
    except MissingField as exc:
        return _not_configured([str(exc.context.get("field"))])
    except NotConnected:
        return Validation(False, NO_ACCESS_TOKEN)
    except NotConfigured as exc:
        return _not_configured([str(exc.context.get("field"))])
    except MissingExtra as exc:
        return Validation(False, exc.message)
    except RequestFailed:
        return Validation(False, UNREACHABLE)
    return _interpret(check, response)


def _interpret(check: ValidationRequest, response: Response) -> Validation:
    status = response.status
    if check.is_success(status):
        if check.json_ok_key is None:
            return Validation(True, CONNECTED)
        try:
            payload = response.json()
        except ValueError:
            payload = None
        if isinstance(payload, dict) and payload.get(check.json_ok_key):
            return Validation(True, CONNECTED)
        error = payload.get("error") if isinstance(payload, dict) else None
        if oauth.error_code(error) is not None:
            return Validation(False, f"{INVALID_CREDENTIALS} ({error})")
        return Validation(False, INVALID_CREDENTIALS)
    if status in check.invalid_statuses:
        return Validation(False, INVALID_CREDENTIALS)
    if status == 403:
        return Validation(False, ACCESS_DENIED)
    return Validation(False, f"Service error {status}")


async def _check_smtp(values: Mapping[str, Any], timeout: float) -> Validation:  # noqa: ASYNC109
    try:
        import aiosmtplib
    except ImportError:
        return Validation(
            False, "SMTP checks need aiosmtplib: install the smtp extra ('integrations[smtp]')."
        )
    security = values.get("security", "starttls")
    client = aiosmtplib.SMTP(
        hostname=str(values["host"]),
        port=int(values.get("port", 587)),
        use_tls=security == "tls",
        start_tls=security == "starttls",
        timeout=timeout,
    )
    try:
        await client.connect()
        username = values.get("username")
        if username:
            await client.login(str(username), str(values.get("password", "")))
    except aiosmtplib.SMTPAuthenticationError:
        return Validation(False, INVALID_CREDENTIALS)
    except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError, OSError, TimeoutError):
        return Validation(False, UNREACHABLE)
    except aiosmtplib.SMTPResponseException as exc:
        return Validation(False, f"Service error {exc.code}")
    except aiosmtplib.SMTPException:
        return Validation(False, "Service error (the server refused the login)")
    finally:
        if client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                client.close()
    return Validation(True, CONNECTED)


async def _check_postgres(values: Mapping[str, Any], timeout: float) -> Validation:  # noqa: ASYNC109
    outcome, detail = await probe_postgres(
        host=str(values["host"]),
        port=int(values.get("port", 5432)),
        user=str(values["username"]),
        password=str(values.get("password", "")),
        database=str(values["database"]),
        timeout=timeout,
    )
    messages = {
        "ok": CONNECTED,
        "invalid_credentials": INVALID_CREDENTIALS,
        "database_not_found": "Database not found",
        "access_denied": ACCESS_DENIED,
        "unreachable": UNREACHABLE,
    }
    if outcome in messages:
        return Validation(outcome == "ok", messages[outcome])
    return Validation(False, f"Service error {detail}")


register_check("smtp", _check_smtp)
register_check("postgres", _check_postgres)
