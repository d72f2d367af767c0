"""Local stand-ins for outside services, for docs snippets marked ``snippet: fake-provider``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aioresponses import aioresponses

# Every https URL answers 200 with a small JSON body, the shape most provider APIs list with;
# a POST to a token endpoint (".../token", ".../access_token") answers tokens, one to a device
# authorization endpoint (".../devicecode", ".../device/code") a device code the "user"
# approved already.
ANY_HTTPS = re.compile(r"^https://.*$")
TOKEN_ENDPOINT = re.compile(r"^https://[^?#]*/(token|access_token)(\?.*)?$")
DEVICE_ENDPOINT = re.compile(r"^https://[^?#]*/(devicecode|device/code)(\?.*)?$")
BODY: dict[str, Any] = {"object": "list", "data": [{"id": "example-model"}]}
TOKENS: dict[str, Any] = {
    "access_token": "example-access-token",
    "refresh_token": "example-refresh-token",
    "token_type": "Bearer",
    "expires_in": 3600,
}
DEVICE: dict[str, Any] = {
    "device_code": "example-device-code",
    "user_code": "WDJB-MJHT",
    "verification_uri": "https://example.test/device",
    "expires_in": 900,
    "interval": 1,
}


@contextmanager
def fake_services() -> Iterator[aioresponses]:
    """Answer every outgoing https request locally; loopback http still reaches real servers."""
    with aioresponses(passthrough=["http://127.0.0.1", "http://localhost"]) as fake:
        fake.add(TOKEN_ENDPOINT, method="POST", payload=TOKENS, repeat=True)
        fake.add(DEVICE_ENDPOINT, method="POST", payload=DEVICE, repeat=True)
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            fake.add(ANY_HTTPS, method=method, payload=BODY, repeat=True)
        yield fake
