"""An auth scheme defined outside the package, as an application would write it: each request
signed with an HMAC-SHA256 of its method, path, a server nonce and its body.

The server answers a request without a fresh nonce with 401 and a new ``nonce``; the flow
signs the request again with it, once. Loaded by the CLI through ``--providers
tests.hmac_scheme:providers`` (the module's ``auth_schemes`` come along).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from yarl import URL

from integrations import AuthContext, AuthScheme, Provider, Request, SetupField
from integrations._schemes import ProviderView


def signature(secret: str, method: str, path_qs: str, nonce: str, body: bytes) -> str:
    message = b"\n".join([method.encode(), path_qs.encode(), nonce.encode(), body])
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


class HmacScheme(AuthScheme):
    name = "hmac-demo"
    label = "HMAC request signature"

    def setup_fields(self, spec: Mapping[str, Any]) -> tuple[SetupField, ...]:
        return (
            SetupField(key="key_id", label="Key ID", required=True),
            SetupField(key="signing_secret", label="Signing secret", required=True, secret=True),
        )

    def runtime_fields(self, provider: ProviderView) -> tuple[str, ...]:
        return ("key_id", "signing_secret")

    def disconnect_drops(self, provider: ProviderView) -> tuple[str, ...]:
        return ("signing_secret",)

    def describe(self, provider: ProviderView) -> str:
        return "HMAC-SHA256 of the method, path, nonce and body"

    def sign(
        self,
        provider: ProviderView,
        credentials: Mapping[str, Any],
        method: str,
        url: URL,
        body: bytes | None,
    ) -> tuple[dict[str, str], URL]:
        values = provider.template_values(credentials)
        for key in ("key_id", "signing_secret"):
            if key not in values:
                raise self.missing(key)
        nonce = str(credentials.get("nonce", ""))
        mac = signature(values["signing_secret"], method, url.raw_path_qs, nonce, body or b"")
        return {"X-Key-Id": values["key_id"], "X-Nonce": nonce, "X-Signature": mac}, url

    async def auth_flow(self, request: Request, auth: AuthContext) -> AsyncGenerator[Request, Any]:
        response = yield request.with_credentials(auth.credentials)
        if auth.rejected(response):
            nonce = response.headers.get("X-Next-Nonce", "")
            yield request.with_credentials({**auth.credentials, "nonce": nonce})


auth_schemes = [HmacScheme()]


def signed_provider(base_url: str = "http://127.0.0.1") -> Provider:
    host = URL(base_url).host or "127.0.0.1"
    return Provider(
        key="signed",
        name="Signed API",
        auth_type="hmac-demo",
        api_hosts=(host,),
        docs_url="https://signed.example/docs/auth",
    )


providers = [signed_provider()]
