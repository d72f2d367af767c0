"""A provider whose credential check is an in-process hook that records when it ran."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from integrations import Provider, Validation, ValidationRequest, register_check
from integrations._probes import CHECK_HOOKS

HOOK = "sweep-test-probe"
#: (api_key, started, finished) of every check the hook ran in this process.
CALLS: list[tuple[str, float, float]] = []
#: Seconds each check takes; api keys starting with "bad" fail.
DELAY = {"seconds": 0.0}


async def _probe(credentials: Mapping[str, Any], _deadline: float) -> Validation:
    started = time.monotonic()
    if DELAY["seconds"]:
        await asyncio.sleep(DELAY["seconds"])
    key = str(credentials.get("api_key", ""))
    CALLS.append((key, started, time.monotonic()))
    return Validation(
        not key.startswith("bad"), "Invalid credentials" if key[:3] == "bad" else "Connected"
    )


def register_probe() -> None:
    if HOOK not in CHECK_HOOKS:
        register_check(HOOK, _probe)


def probe_provider(key: str = "probe") -> Provider:
    return Provider(
        key=key,
        name="Probe",
        auth_type="api_key",
        api_hosts=("127.0.0.1",),
        validation=ValidationRequest(hook=HOOK),
    )
