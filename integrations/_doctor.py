"""Health of a deployment for operators: schema, keys, undecryptable rows, listener round trip."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _names as names
from ._errors import CryptoError, IntegrationsError

if TYPE_CHECKING:
    from ._core import Core

__all__ = ["Diagnosis", "Finding", "diagnose", "diagnose_core", "undecryptable_rows"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of a diagnosis: what was checked, whether it is fine, and what to do if not."""

    check: str
    ok: bool
    detail: str
    hint: str = ""


@dataclass(frozen=True, slots=True)
class Diagnosis:
    findings: tuple[Finding, ...]
    undecryptable: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(finding.ok for finding in self.findings)


def undecryptable_rows(rows: Iterable[Any], unseal: Callable[[Any], object]) -> tuple[str, ...]:
    """Uuids of the rows whose secrets ``unseal`` cannot decrypt with the configured keys."""
    bad: list[str] = []
    for row in rows:
        try:
            unseal(row)
        except CryptoError:
            bad.append(str(row.uuid))
    return tuple(bad)


Listen = Callable[[str, Callable[[str], None], Callable[[], None]], Awaitable[Any]]


async def _round_trip(
    listen: Listen,
    send: Callable[[str, str], Awaitable[None]],
    channel: str,
    timeout: float,  # noqa: ASYNC109 - enforced with asyncio.timeout
) -> float:
    """Seconds from NOTIFY to its delivery on a LISTEN connection; TimeoutError if never."""
    token = secrets.token_hex(8)
    got = asyncio.get_running_loop().create_future()

    def on_payload(payload: str) -> None:
        if payload == token and not got.done():
            got.set_result(None)

    listener = await listen(channel, on_payload, lambda: None)
    try:
        started = asyncio.get_running_loop().time()
        await send(channel, token)
        async with asyncio.timeout(timeout):
            await got
        return asyncio.get_running_loop().time() - started
    finally:
        with contextlib.suppress(Exception):
            await listener.close()


async def diagnose(
    *,
    schema_version: Callable[[], Awaitable[int]],
    latest_version: int,
    key_ids: tuple[str, ...] | None,
    encryption: bool,
    rows: Callable[[], Awaitable[list[Any]]],
    unseal: Callable[[Any], object],
    listen: Listen,
    send: Callable[[str, str], Awaitable[None]],
    probe_channel: str,
    timeout: float = 5.0,  # noqa: ASYNC109 - the listener round trip's own deadline
) -> Diagnosis:
    """Run every check; each one that fails says what to do."""
    findings: list[Finding] = []
    version = await schema_version()
    if version >= latest_version:
        findings.append(Finding("schema", True, f"version {version} (latest)"))
    else:
        findings.append(
            Finding(
                "schema",
                False,
                f"version {version}, latest is {latest_version}",
                "run: integrations migrate",
            )
        )
    if not encryption:
        findings.append(
            Finding("keys", False, "encryption is off", "secrets are stored in plaintext")
        )
    elif not key_ids:
        findings.append(
            Finding(
                "keys",
                False,
                "no keys configured",
                "set INTEGRATIONS_KEYS (make one with: integrations keys generate)",
            )
        )
    else:
        findings.append(Finding("keys", True, f"{len(key_ids)} key(s), primary {key_ids[0]}"))
    stored = await rows()
    bad = undecryptable_rows(stored, unseal) if encryption and key_ids else ()
    if bad:
        findings.append(
            Finding(
                "secrets",
                False,
                f"{len(bad)} of {len(stored)} connection(s) cannot be decrypted: "
                + ", ".join(bad[:5])
                + (" ..." if len(bad) > 5 else ""),
                "add the key they were sealed with to INTEGRATIONS_KEYS (after the primary)",
            )
        )
    elif encryption and not key_ids and stored:
        findings.append(
            Finding(
                "secrets",
                False,
                f"{len(stored)} connection(s) not checked: no key to read them with",
                "set INTEGRATIONS_KEYS to the keys they were sealed with",
            )
        )
    else:
        findings.append(Finding("secrets", True, f"{len(stored)} connection(s) readable"))
    try:
        seconds = await _round_trip(listen, send, probe_channel, timeout)
    except TimeoutError:
        findings.append(
            Finding(
                "listener",
                False,
                f"no notification within {timeout:g}s",
                "LISTEN/NOTIFY does not pass: behind a transaction-mode pooler, "
                "point the listener at the database directly",
            )
        )
    except IntegrationsError as exc:
        findings.append(Finding("listener", False, exc.message, "check the database logs"))
    else:
        findings.append(Finding("listener", True, f"round trip {seconds * 1000:.0f} ms"))
    return Diagnosis(findings=tuple(findings), undecryptable=bad)


async def diagnose_core(core: Core) -> Diagnosis:
    """``diagnose`` on the parts of an open instance."""
    repo, keyring = core.repo, core.vault.keyring
    return await diagnose(
        schema_version=repo.schema_version,
        latest_version=repo.q.latest_version,
        key_ids=keyring.ids if keyring is not None else None,
        encryption=core.vault.enabled,
        rows=lambda: repo.list_every_owner(names.KEY_PREFIX),
        unseal=core.plain,
        listen=repo.listen,
        send=repo.notify_channel,
        probe_channel=f"{repo.schema}_probe",
    )
