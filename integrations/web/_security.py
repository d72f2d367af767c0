"""CSRF tokens, cookie attributes and the security headers every console response carries."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSRF_COOKIE = "integrations_csrf"
CSRF_FIELD = "csrf_token"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class Csrf:
    """Signed double-submit tokens: a random id in a cookie, its HMAC in every form.

    The HMAC covers the cookie, the signed-in principal and the sign-in session (when the
    console knows it), under the console's secret: a (cookie, token) pair minted by one
    signed-in user (and planted by a page of a sibling port, which is the same site) is
    worthless to anyone else, and a token is useless without its cookie.
    """

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _sign(self, cookie: str, binding: str = "") -> str:
        message = cookie.encode() + b"\0" + binding.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def cookie_of(self, request: Request) -> str | None:
        value = request.cookies.get(CSRF_COOKIE)
        return value if value and len(value) <= 128 else None

    def token_for(self, request: Request, binding: str = "") -> tuple[str, str | None]:
        """The form token for this request and ``binding`` (who is signed in, in which
        session), and a new cookie value to set when it had none."""
        cookie = self.cookie_of(request)
        if cookie is not None:
            return self._sign(cookie, binding), None
        fresh = getattr(request.state, "csrf_cookie", None) or secrets.token_urlsafe(32)
        request.state.csrf_cookie = fresh
        return self._sign(fresh, binding), fresh

    def verify(self, request: Request, token: object, binding: str = "") -> bool:
        cookie = self.cookie_of(request)
        if cookie is None or not isinstance(token, str) or not token:
            return False
        return hmac.compare_digest(self._sign(cookie, binding), token)


def cross_origin(request: Request) -> bool:
    """Whether the browser says this request comes from another origin: ``Sec-Fetch-Site``
    other than same-origin (or none: typed by the user), or, from a browser that does not
    send it, an ``Origin`` that is not the console's own. A page on another port of the
    same host is same-site but cross-origin, and is refused here before its token is
    looked at."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    # Without Sec-Fetch-Site, an Origin that names a site. "null" says nothing: browsers
    # send it for our own forms too, since pages go out with Referrer-Policy: no-referrer.
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return False
    host = request.headers.get("host")
    return host is None or origin != f"{request.url.scheme}://{host}"


def set_cookie(
    response: Response, request: Request, name: str, value: str, *, path: str | None = None
) -> None:
    """A cookie scripts cannot read and other sites never send."""
    response.set_cookie(
        name,
        value,
        path=path or (request.scope.get("root_path") or "/"),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


class SecurityHeaders:
    """ASGI middleware adding the CSP and friends (streaming responses pass through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in present]
                if b"cache-control" not in present:
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
