"""The ``oauth1`` scheme: OAuth 1.0a (RFC 5849) requests signed with HMAC-SHA1 or RSA-SHA1."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from authlib.oauth1 import SIGNATURE_HMAC_SHA1, SIGNATURE_RSA_SHA1, ClientAuth
from yarl import URL

from .._errors import NotConfigured
from .._setup import SetupField
from ._base import AuthScheme, ProviderView

__all__ = ["OAuth1Scheme", "parse_credentials", "signed_headers"]

_FORM = "application/x-www-form-urlencoded"


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def form_params(body: bytes | None) -> bool:
    """Whether ``body`` is valid form encoding (its parameters then enter the base string,
    RFC 5849 §3.4.1.3.1)."""
    if not body:
        return False
    try:
        text = body.decode("ascii")
        parse_qsl(text, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return False
    return True


def signed_headers(
    values: Mapping[str, Any],
    method: str,
    url: str,
    body: bytes | None,
    *,
    token: str | None = None,
    token_secret: str | None = None,
    callback: str | None = None,
    verifier: str | None = None,
) -> dict[str, str]:
    """The ``Authorization: OAuth ...`` header of one request, signed with the consumer's
    credentials (RSA-SHA1 when a private key is saved, else HMAC-SHA1) and ``token``."""
    consumer_key = _text(values.get("consumer_key"))
    if consumer_key is None:
        raise NotConfigured(
            "The connection has no 'consumer_key' saved: call save_setup first.",
            field="consumer_key",
        )
    private_key = _text(values.get("private_key"))
    secret = _text(values.get("consumer_secret"))
    if private_key is None and secret is None:
        raise NotConfigured(
            "The connection has no 'consumer_secret' (or 'private_key' for RSA-SHA1) saved: "
            "call save_setup first.",
            field="consumer_secret",
        )
    auth = ClientAuth(
        consumer_key,
        client_secret=secret or "",
        token=token,
        token_secret=token_secret or "",
        redirect_uri=callback,
        rsa_key=private_key,
        verifier=verifier,
        signature_method=SIGNATURE_HMAC_SHA1 if private_key is None else SIGNATURE_RSA_SHA1,
    )
    headers = {"Content-Type": _FORM} if form_params(body) else {}
    _, signed, _ = auth.prepare(method, url, headers, body if headers else b"")
    return {"Authorization": str(signed["Authorization"])}


def parse_credentials(body: bytes) -> dict[str, str] | None:
    """The form-encoded answer of a credentials endpoint (RFC 5849 §2.1, §2.3); None when
    it holds no ``oauth_token`` and ``oauth_token_secret``."""
    try:
        pairs = dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
    except (UnicodeDecodeError, ValueError):
        return None
    if not pairs.get("oauth_token") or "oauth_token_secret" not in pairs:
        return None
    return pairs


class OAuth1Scheme(AuthScheme):
    """A consumer key and secret (or RSA private key), and the token and token secret a
    user grants through the three-legged flow: each request signed anew."""

    name = "oauth1"
    label = "OAuth 1.0a"
    authorizes_user = True
    uses_request_token = True
    secret_fields = frozenset({"consumer_secret", "private_key", "access_token", "token_secret"})

    def setup_fields(self, spec: Mapping[str, Any]) -> tuple[SetupField, ...]:
        return (
            SetupField(key="consumer_key", label="Consumer key (API key)", required=True),
            SetupField(
                key="consumer_secret",
                label="Consumer secret (API key secret)",
                secret=True,
                help="Signs with HMAC-SHA1; not needed when a private key is given.",
            ),
            SetupField(
                key="private_key",
                label="RSA private key (PEM)",
                type="text",
                secret=True,
                help="Signs with RSA-SHA1 instead of HMAC-SHA1.",
            ),
        )

    def check_provider(self, provider: ProviderView) -> None:
        if provider.authorize_url and not (provider.request_token_url and provider.token_url):
            raise ValueError(
                "an oauth1 provider with an authorize_url needs its request_token_url "
                "(the temporary credentials endpoint) and token_url"
            )

    def runtime_fields(self, provider: ProviderView) -> tuple[str, ...]:
        return ("consumer_key", "access_token", "token_secret")

    def disconnect_drops(self, provider: ProviderView) -> tuple[str, ...]:
        return ("access_token", "token_secret")

    def describe(self, provider: ProviderView) -> str:
        return "OAuth 1.0a signature (HMAC-SHA1 or RSA-SHA1) of each request"

    def signs_body(self, provider: ProviderView) -> bool:
        return True

    def url_secrets(
        self, provider: ProviderView, credentials: Mapping[str, Any]
    ) -> tuple[str, ...]:
        return ()

    def sign(
        self,
        provider: ProviderView,
        credentials: Mapping[str, Any],
        method: str,
        url: URL,
        body: bytes | None,
    ) -> tuple[dict[str, str], URL]:
        values = provider.template_values(credentials)
        token = _text(values.get("access_token"))
        if token is None:
            raise self.missing("access_token")
        headers = signed_headers(
            values,
            method,
            str(url),
            body,
            token=token,
            token_secret=_text(values.get("token_secret")) or "",
        )
        return headers, url
