"""Local stand-ins for outside services, for docs snippets marked ``snippet: fake-provider``."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aioresponses import aioresponses

# Every https URL answers 200 with a small JSON body, the shape most provider APIs list with.
ANY_HTTPS = re.compile(r"^https://.*$")
BODY: dict[str, Any] = {"object": "list", "data": [{"id": "example-model"}]}


@contextmanager
def fake_services() -> Iterator[aioresponses]:
    """Answer every outgoing https request locally; loopback http still reaches real servers."""
    with aioresponses(passthrough=["http://127.0.0.1", "http://localhost"]) as fake:
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            fake.add(ANY_HTTPS, method=method, payload=BODY, repeat=True)
        yield fake
