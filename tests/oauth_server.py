"""A strict OAuth 2.0 authorization server on loopback, in-process or as its own OS process.

It behaves like the strictest real providers: PKCE (S256) is required, authorization
codes are single-use and short-lived, every refresh rotates the refresh token, and
reusing a spent refresh token revokes the whole grant. Faults can be injected and
every token request is counted, so tests and benchmarks can assert how many times
the token endpoint was hit.

In-process::

    async with OAuthTestServer() as server:
        server.config.expires_in = 0
        ... server.base_url, server.stats.token_calls["refresh_token"] ...

As a process (prints its base URL on the first stdout line, serves until killed)::

    python tests/oauth_server.py --port 0

    with ServerProcess() as proc:
        proc.configure(expires_in=0)
        ... proc.base_url, proc.stats()["token_calls"] ...

Endpoints: ``GET /authorize``, ``POST /token``, ``POST /revoke`` (RFC 7009),
``GET /userinfo``, ``/api/...`` (any method, Bearer), and the control API
``GET /_stats``, ``GET|POST /_config``, ``POST /_reset``, ``POST /_expire``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from aiohttp import web
from authlib.oauth2.rfc6749.util import extract_basic_authorization
from authlib.oauth2.rfc7636 import create_s256_code_challenge

DEFAULT_CLIENT_ID = "test-client"
DEFAULT_CLIENT_SECRET = "test-secret"
DEFAULT_USER: Mapping[str, str] = {
    "sub": "user-1",
    "email": "user@example.test",
    "name": "Test User",
    "picture": "https://example.test/avatar/user-1.png",
}
REALM = "oauth-test-server"

_PKCE_RE = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")


def token_id(token: str) -> str:
    """A short, non-secret identifier of a token, as reported by ``/api/...``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]


@dataclass
class ServerConfig:
    """Behaviour knobs; change them as attributes in-process or via ``POST /_config``."""

    #: Access token lifetime in seconds; 0 or negative issues already-expired tokens,
    #: None issues tokens without ``expires_in`` that never expire.
    expires_in: int | None = 3600
    code_ttl: float = 60.0
    #: When False, refresh responses carry no refresh token and the old one stays valid.
    rotate_refresh_tokens: bool = True
    #: When False, the authorization_code grant issues no refresh token.
    issue_refresh_tokens: bool = True
    #: Redirect every authorization with ``error=access_denied``.
    deny: bool = False
    #: The next N token requests answer ``fail_status`` (after being counted).
    fail_next: int = 0
    fail_status: int = 503
    #: Seconds every token request waits before being handled.
    token_delay: float = 0.0
    #: When set, only the next N token requests wait ``token_delay``.
    delay_next: int | None = None
    #: Every token and revocation request fails client authentication.
    force_invalid_client: bool = False
    #: Scope granted regardless of the requested one (space separated).
    granted_scope: str | None = None

    def update(self, values: Mapping[str, Any]) -> None:
        """Set several knobs at once, refusing unknown names and wrong types."""
        known = {f.name: f.type for f in dataclasses.fields(self)}
        for name, value in values.items():
            if name not in known:
                raise ValueError(f"unknown config field {name!r}")
            if not _type_ok(str(known[name]), value):
                raise ValueError(f"config field {name!r} must be {known[name]}")
        for name, value in values.items():
            setattr(self, name, value)


_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "None": (type(None),),
}


def _type_ok(annotation: str, value: Any) -> bool:
    allowed: tuple[type, ...] = ()
    for part in annotation.split("|"):
        allowed += _CONFIG_TYPES[part.strip()]
    if isinstance(value, bool) and bool not in allowed:
        return False
    return isinstance(value, tuple(allowed))


@dataclass
class ServerStats:
    """What the server saw; ``token_calls`` counts every token request by grant type."""

    token_calls: Counter[str] = field(default_factory=Counter)
    token_errors: Counter[str] = field(default_factory=Counter)
    faults_injected: int = 0
    authorizations: int = 0
    codes_issued: int = 0
    revocations: int = 0
    grants_revoked: int = 0
    refresh_reuse_detected: int = 0
    userinfo_calls: int = 0
    api_calls: int = 0
    api_rejected: int = 0

    @property
    def total_token_calls(self) -> int:
        return sum(self.token_calls.values())

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = dict(value) if isinstance(value, Counter) else value
        data["total_token_calls"] = self.total_token_calls
        return data


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    challenge: str
    scope: str
    expires_at: float
    used: bool = False
    grant_id: str | None = None


@dataclass
class _Grant:
    id: str
    client_id: str
    scope: str
    subject: str
    revoked: bool = False
    access_tokens: set[str] = field(default_factory=set)


@dataclass
class _AccessToken:
    client_id: str
    grant_id: str | None
    scope: str
    expires_at: float | None
    revoked: bool = False


@dataclass
class _RefreshToken:
    grant_id: str
    spent: bool = False


class _OAuthFailure(Exception):
    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(error)
        self.error = error
        self.description = description
        self.status = status


class OAuthTestServer:
    """The authorization server, run inside the test's event loop."""

    def __init__(
        self,
        *,
        clients: Mapping[str, str] | None = None,
        user: Mapping[str, Any] | None = None,
        config: ServerConfig | None = None,
    ) -> None:
        self.clients: dict[str, str] = dict(
            clients if clients is not None else {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET}
        )
        self.user: dict[str, Any] = dict(user if user is not None else DEFAULT_USER)
        self.config = config if config is not None else ServerConfig()
        self._initial_config = dataclasses.replace(self.config)
        self.stats = ServerStats()
        self._codes: dict[str, _Code] = {}
        self._grants: dict[str, _Grant] = {}
        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self.app = self._make_app()

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 picks a free port) and return the base URL."""
        if self._runner is not None:
            raise RuntimeError("the server is already running")
        # No access log: query strings carry codes and states.
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        if ":" in bound_host:
            bound_host = f"[{bound_host}]"
        self._base_url = f"http://{bound_host}:{bound_port}"
        return self._base_url

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("the server has not been started")
        return self._base_url

    @property
    def authorize_url(self) -> str:
        return f"{self.base_url}/authorize"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/token"

    @property
    def revoke_url(self) -> str:
        return f"{self.base_url}/revoke"

    @property
    def userinfo_url(self) -> str:
        return f"{self.base_url}/userinfo"

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/api/resource"

    # --- control -------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every code, grant and token, zero the stats, restore the initial config."""
        self._codes.clear()
        self._grants.clear()
        self._access.clear()
        self._refresh.clear()
        # In place, so references held by tests stay live.
        for f in dataclasses.fields(self.stats):
            setattr(self.stats, f.name, getattr(ServerStats(), f.name))
        self.config.update(dataclasses.asdict(self._initial_config))

    def expire_access_tokens(self) -> int:
        """Expire every live access token now (clients still believe they are valid)."""
        now = time.time()
        count = 0
        for record in self._access.values():
            if record.expires_at is None or record.expires_at > now:
                record.expires_at = now
                count += 1
        return count

    def token_status(self, token: str) -> str:
        """``active``, ``expired``, ``revoked``, ``spent`` or ``unknown``."""
        if token in self._refresh:
            record = self._refresh[token]
            if self._grants[record.grant_id].revoked:
                return "revoked"
            return "spent" if record.spent else "active"
        access = self._access.get(token)
        if access is None:
            return "unknown"
        if access.revoked or self._grant_revoked(access.grant_id):
            return "revoked"
        if access.expires_at is not None and time.time() >= access.expires_at:
            return "expired"
        return "active"

    # --- application ----------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        app.router.add_post("/revoke", self._revoke)
        app.router.add_route("GET", "/userinfo", self._userinfo)
        app.router.add_route("POST", "/userinfo", self._userinfo)
        app.router.add_route("*", "/api/{tail:.*}", self._api)
        app.router.add_get("/_stats", self._control_stats)
        app.router.add_get("/_config", self._control_config)
        app.router.add_post("/_config", self._control_config)
        app.router.add_post("/_reset", self._control_reset)
        app.router.add_post("/_expire", self._control_expire)
        return app

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        self.stats.authorizations += 1
        query = request.query
        client_id = query.get("client_id", "")
        redirect_uri = query.get("redirect_uri", "")
        # No trustworthy redirect target: show the error, never redirect (RFC 6749 4.1.2.1).
        if client_id not in self.clients:
            return _json_error(400, "invalid_client", "unknown client_id")
        if not _is_http_url(redirect_uri):
            return _json_error(
                400, "invalid_request", "redirect_uri must be an absolute http(s) URL"
            )
        state = query.get("state")

        def fail(error: str, description: str) -> web.Response:
            params = {"error": error, "error_description": description}
            if state:
                params["state"] = state
            return _redirect(redirect_uri, params)

        for name in ("response_type", "client_id", "redirect_uri", "state", "code_challenge"):
            if len(query.getall(name, [])) > 1:
                return fail("invalid_request", f"{name} is repeated")
        if query.get("response_type") != "code":
            return fail("unsupported_response_type", "only response_type=code is supported")
        if not state:
            return fail("invalid_request", "state is required")
        challenge = query.get("code_challenge")
        if not challenge:
            return fail("invalid_request", "PKCE is required: code_challenge is missing")
        if query.get("code_challenge_method") != "S256":
            return fail("invalid_request", "PKCE code_challenge_method must be S256")
        if not _PKCE_RE.fullmatch(challenge):
            return fail("invalid_request", "malformed code_challenge")
        if self.config.deny:
            return fail("access_denied", "the user denied the request")

        code = "code_" + secrets.token_urlsafe(24)
        self._codes[code] = _Code(
            client_id=client_id,
            redirect_uri=redirect_uri,
            challenge=challenge,
            scope=self.config.granted_scope
            if self.config.granted_scope is not None
            else query.get("scope", ""),
            expires_at=time.time() + self.config.code_ttl,
        )
        self.stats.codes_issued += 1
        return _redirect(redirect_uri, {"code": code, "state": state})

    async def _token(self, request: web.Request) -> web.StreamResponse:
        form = await self._read_form(request)
        grant_type = form.get("grant_type", "") if form is not None else ""
        self.stats.token_calls[grant_type or "(none)"] += 1
        if self.config.token_delay > 0 and self.config.delay_next != 0:
            if self.config.delay_next is not None:
                self.config.delay_next -= 1
            await asyncio.sleep(self.config.token_delay)
        if self.config.fail_next > 0:
            self.config.fail_next -= 1
            self.stats.faults_injected += 1
            status = self.config.fail_status
            self.stats.token_errors[f"http_{status}"] += 1
            headers = {"Retry-After": "1"} if status in (429, 503) else None
            error = "temporarily_unavailable" if status in (429, 503) else "server_error"
            return _json_error(status, error, "injected fault", headers)
        try:
            if form is None:
                raise _OAuthFailure(
                    "invalid_request", "expected an application/x-www-form-urlencoded body"
                )
            client_id = self._authenticate_client(request, form)
            if grant_type == "authorization_code":
                body = self._grant_authorization_code(client_id, form)
            elif grant_type == "refresh_token":
                body = self._grant_refresh_token(client_id, form)
            elif grant_type == "client_credentials":
                body = self._grant_client_credentials(client_id, form)
            elif not grant_type:
                raise _OAuthFailure("invalid_request", "grant_type is missing")
            else:
                raise _OAuthFailure(
                    "unsupported_grant_type", f"grant_type {grant_type!r} is not supported"
                )
        except _OAuthFailure as failure:
            self.stats.token_errors[failure.error] += 1
            return _failure_response(failure)
        return web.json_response(body, headers=_NO_STORE)

    async def _read_form(self, request: web.Request) -> dict[str, str] | None:
        if request.content_type != "application/x-www-form-urlencoded":
            return None
        pairs = parse_qsl(await request.text(), keep_blank_values=True)
        names = [name for name, _ in pairs]
        if len(names) != len(set(names)):
            # Repeated parameters are a malformed request (RFC 6749 3.1).
            return None
        return dict(pairs)

    def _authenticate_client(self, request: web.Request, form: Mapping[str, str]) -> str:
        if self.config.force_invalid_client:
            raise _OAuthFailure("invalid_client", "client authentication failed", 401)
        basic_id: str | None
        basic_secret: str | None
        basic_id, basic_secret = extract_basic_authorization(request.headers)
        if basic_id is not None:
            if "client_secret" in form:
                raise _OAuthFailure("invalid_request", "more than one client authentication method")
            if form.get("client_id", basic_id) != basic_id:
                raise _OAuthFailure(
                    "invalid_client", "client_id does not match the credentials", 401
                )
            client_id, secret = basic_id, basic_secret or ""
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        expected = self.clients.get(client_id)
        if expected is None or not secret or not hmac.compare_digest(secret, expected):
            raise _OAuthFailure("invalid_client", "client authentication failed", 401)
        return client_id

    def _grant_authorization_code(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        record = self._codes.get(form.get("code", ""))
        if record is None or record.client_id != client_id:
            raise _OAuthFailure("invalid_grant", "unknown authorization code")
        if record.used:
            # RFC 6749 4.1.2: a replayed code revokes what it produced.
            if record.grant_id is not None:
                self._revoke_grant(self._grants[record.grant_id])
            raise _OAuthFailure("invalid_grant", "authorization code already used")
        # Burned on the first attempt, even a failed one, so verifiers cannot be guessed.
        record.used = True
        if time.time() >= record.expires_at:
            raise _OAuthFailure("invalid_grant", "authorization code expired")
        if form.get("redirect_uri") != record.redirect_uri:
            raise _OAuthFailure("invalid_grant", "redirect_uri does not match the authorization")
        verifier = form.get("code_verifier")
        if not verifier:
            raise _OAuthFailure("invalid_grant", "PKCE code_verifier is missing")
        if not _PKCE_RE.fullmatch(verifier):
            raise _OAuthFailure("invalid_request", "malformed code_verifier")
        if not hmac.compare_digest(create_s256_code_challenge(verifier), record.challenge):
            raise _OAuthFailure("invalid_grant", "PKCE code_verifier does not match the challenge")
        grant = _Grant(
            id="grant_" + secrets.token_hex(8),
            client_id=client_id,
            scope=record.scope,
            subject=str(self.user.get("sub", "")),
        )
        self._grants[grant.id] = grant
        record.grant_id = grant.id
        refresh = self._new_refresh_token(grant) if self.config.issue_refresh_tokens else None
        return self._token_body(client_id, grant, grant.scope, refresh)

    def _grant_refresh_token(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        token = form.get("refresh_token", "")
        record = self._refresh.get(token)
        if record is None:
            raise _OAuthFailure("invalid_grant", "unknown refresh token")
        grant = self._grants[record.grant_id]
        if grant.client_id != client_id:
            raise _OAuthFailure("invalid_grant", "refresh token was issued to another client")
        if grant.revoked:
            raise _OAuthFailure("invalid_grant", "the grant has been revoked")
        if record.spent:
            self.stats.refresh_reuse_detected += 1
            self._revoke_grant(grant)
            raise _OAuthFailure(
                "invalid_grant", "refresh token reuse detected; the grant is revoked"
            )
        scope = grant.scope
        if "scope" in form:
            requested = set(form["scope"].split())
            if not requested <= set(grant.scope.split()):
                raise _OAuthFailure("invalid_scope", "scope exceeds the original grant")
            scope = " ".join(sorted(requested))
        new_refresh = None
        if self.config.rotate_refresh_tokens:
            record.spent = True
            new_refresh = self._new_refresh_token(grant)
        return self._token_body(client_id, grant, scope, new_refresh)

    def _grant_client_credentials(self, client_id: str, form: Mapping[str, str]) -> dict[str, Any]:
        scope = form.get("scope", "")
        if self.config.granted_scope is not None:
            scope = self.config.granted_scope
        return self._token_body(client_id, None, scope, None)

    def _new_refresh_token(self, grant: _Grant) -> str:
        token = "rt_" + secrets.token_urlsafe(32)
        self._refresh[token] = _RefreshToken(grant_id=grant.id)
        return token

    def _token_body(
        self, client_id: str, grant: _Grant | None, scope: str, refresh_token: str | None
    ) -> dict[str, Any]:
        access = "at_" + secrets.token_urlsafe(32)
        expires_in = self.config.expires_in
        self._access[access] = _AccessToken(
            client_id=client_id,
            grant_id=grant.id if grant else None,
            scope=scope,
            expires_at=None if expires_in is None else time.time() + expires_in,
        )
        if grant is not None:
            grant.access_tokens.add(access)
        body: dict[str, Any] = {"access_token": access, "token_type": "Bearer"}
        if scope:
            body["scope"] = scope
        if expires_in is not None:
            body["expires_in"] = expires_in
        if refresh_token is not None:
            body["refresh_token"] = refresh_token
        return body

    def _revoke_grant(self, grant: _Grant) -> None:
        if grant.revoked:
            return
        grant.revoked = True
        self.stats.grants_revoked += 1
        for token in grant.access_tokens:
            self._access[token].revoked = True

    def _grant_revoked(self, grant_id: str | None) -> bool:
        return grant_id is not None and self._grants[grant_id].revoked

    async def _revoke(self, request: web.Request) -> web.StreamResponse:
        self.stats.revocations += 1
        form = await self._read_form(request)
        try:
            if form is None:
                raise _OAuthFailure(
                    "invalid_request", "expected an application/x-www-form-urlencoded body"
                )
            client_id = self._authenticate_client(request, form)
            token = form.get("token")
            if not token:
                raise _OAuthFailure("invalid_request", "token is missing")
            if token in self._refresh:
                grant = self._grants[self._refresh[token].grant_id]
                if grant.client_id != client_id:
                    raise _OAuthFailure("unauthorized_client", "token was issued to another client")
                self._revoke_grant(grant)
            elif token in self._access:
                access = self._access[token]
                if access.client_id != client_id:
                    raise _OAuthFailure("unauthorized_client", "token was issued to another client")
                access.revoked = True
        except _OAuthFailure as failure:
            return _failure_response(failure)
        # RFC 7009 2.2: unknown tokens are answered with 200 as well.
        return web.Response(status=200, headers=_NO_STORE)

    def _bearer(self, request: web.Request) -> tuple[str, _AccessToken] | web.Response:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _unauthorized(None, "no bearer token")
        record = self._access.get(token)
        if record is None:
            return _unauthorized("invalid_token", "unknown access token")
        if record.revoked or self._grant_revoked(record.grant_id):
            return _unauthorized("invalid_token", "the access token was revoked")
        if record.expires_at is not None and time.time() >= record.expires_at:
            return _unauthorized("invalid_token", "the access token expired")
        return token, record

    async def _userinfo(self, request: web.Request) -> web.StreamResponse:
        self.stats.userinfo_calls += 1
        checked = self._bearer(request)
        if isinstance(checked, web.Response):
            return checked
        _, record = checked
        if record.grant_id is None:
            return web.json_response({"sub": record.client_id})
        return web.json_response(self.user)

    async def _api(self, request: web.Request) -> web.StreamResponse:
        self.stats.api_calls += 1
        checked = self._bearer(request)
        if isinstance(checked, web.Response):
            self.stats.api_rejected += 1
            return checked
        token, record = checked
        return web.json_response(
            {
                "ok": True,
                "method": request.method,
                "path": request.path,
                "token_id": token_id(token),
                "grant_id": record.grant_id,
                "client_id": record.client_id,
                "sub": self.user.get("sub") if record.grant_id else None,
                "scope": record.scope,
            }
        )

    async def _control_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats.as_dict())

    async def _control_config(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            try:
                values = await request.json()
                if not isinstance(values, dict):
                    raise ValueError("expected a JSON object")
                self.config.update(values)
            except ValueError as exc:
                return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(dataclasses.asdict(self.config))

    async def _control_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.json_response({"ok": True})

    async def _control_expire(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"expired": self.expire_access_tokens()})


_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not parts.fragment


def _redirect(uri: str, params: Mapping[str, str]) -> web.Response:
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    location = urlunsplit(parts._replace(query=urlencode(query)))
    return web.Response(status=302, headers={"Location": location, **_NO_STORE})


def _json_error(
    status: int, error: str, description: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": error, "error_description": description},
        status=status,
        headers={**_NO_STORE, **(headers or {})},
    )


def _failure_response(failure: _OAuthFailure) -> web.Response:
    headers = {"WWW-Authenticate": f'Basic realm="{REALM}"'} if failure.status == 401 else None
    return _json_error(failure.status, failure.error, failure.description, headers)


def _unauthorized(error: str | None, description: str) -> web.Response:
    challenge = f'Bearer realm="{REALM}"'
    if error is not None:
        challenge += f', error="{error}", error_description="{description}"'
    return web.json_response(
        {"error": error or "invalid_request", "error_description": description},
        status=401,
        headers={"WWW-Authenticate": challenge},
    )


class ServerProcess:
    """The server in its own OS process, shared by multi-process tests and benchmarks.

    Blocking on purpose, so it fits session fixtures and scripts; the control
    methods are tiny loopback calls.
    """

    def __init__(self, *args: str, python: str = sys.executable, timeout: float = 15.0) -> None:
        self._args = args
        self._python = python
        self._timeout = timeout
        self._proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the server process is not running")
        return self._proc.pid

    def start(self) -> str:
        if self._proc is not None:
            raise RuntimeError("the server process is already running")
        self._proc = subprocess.Popen(
            [self._python, str(Path(__file__).resolve()), "--port", "0", *self._args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], self._timeout)
        line = self._proc.stdout.readline().strip() if ready else ""
        if not line.startswith("http://"):
            self.stop()
            raise RuntimeError(f"the OAuth test server did not start (first line: {line!r})")
        self.base_url = line
        return line

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit (after a signal sent by the test) and return its code."""
        if self._proc is None:
            raise RuntimeError("the server process is not running")
        return self._proc.wait(timeout)

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def control(self, method: str, path: str, payload: Mapping[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=self._timeout) as response:
            return json.loads(response.read() or b"null")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("GET", "/_stats")
        return result

    def configure(self, **values: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.control("POST", "/_config", values)
        return result

    def reset(self) -> None:
        self.control("POST", "/_reset")

    def expire_access_tokens(self) -> int:
        return int(self.control("POST", "/_expire")["expired"])


async def _serve(args: argparse.Namespace) -> None:
    config = ServerConfig(expires_in=args.expires_in)
    server = OAuthTestServer(clients={args.client_id: args.client_secret}, config=config)
    base_url = await server.start(args.host, args.port)
    print(base_url, flush=True)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    try:
        await stopped.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    parser.add_argument("--client-secret", default=DEFAULT_CLIENT_SECRET)
    parser.add_argument("--expires-in", type=int, default=3600)
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
