"""Webhooks: endpoints, deliveries made from the event log, and the worker that sends them."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import socket
import time
import uuid as _uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from . import _names as names
from . import _telemetry as telemetry
from ._errors import InvalidArgument, InvalidURL, NotFound
from ._events import ALL_OWNERS, EventHub, OwnerScope
from ._models import EVENT_KINDS, Event
from ._names import shown
from ._repository import Repository
from ._vault import Vault
from .webhooks import generate_secret, sign

__all__ = [
    "RETRY_DELAYS",
    "WebhookAttempt",
    "WebhookDelivery",
    "WebhookEndpoint",
    "Webhooks",
    "check_url",
]

log = logging.getLogger("integrations.webhooks")

#: Seconds before each retry of a failed delivery: exponential (5 s, times 6 each time,
#: capped at 10 h), each stretched by up to 20 % of jitter (never shortened). The last
#: retry comes at least 32 h after the first attempt; a delivery that fails it is dead.
RETRY_DELAYS: Final[tuple[float, ...]] = tuple(min(5.0 * 6**i, 36_000.0) for i in range(8))
JITTER: Final = 0.2
#: Per attempt: the whole request, and how much of the answer is read.
TIMEOUT: Final = 10.0
MAX_RESPONSE_BYTES: Final = 64 * 1024
#: How long a claimed delivery stays with the process that claimed it: well above the
#: request timeout, so that only a process stalled for that long loses it to another.
LEASE: Final = 60.0
DISPATCH_PAGE: Final = 500
_SECRET_FIELD = "secret"


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """A registered endpoint. ``secret`` is set only on the value ``add_webhook`` returns:
    it is shown once; store it in the receiver."""

    id: str
    url: str
    owner: str | None
    kinds: tuple[str, ...] | None
    description: str
    created_at: datetime
    secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """One event for one endpoint: ``id`` is its ``webhook-id``, the same on every attempt.
    ``state`` is ``pending``, ``delivered`` or ``dead`` (every attempt failed)."""

    id: str
    endpoint_id: str
    position: int
    kind: str
    connection: str
    state: str
    attempts: int
    next_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class WebhookAttempt:
    """The outcome of one request to an endpoint: ``ok`` for a 2xx answer."""

    ok: bool
    status: int | None
    error: str | None


def retry_delay(attempts: int, delays: Sequence[float]) -> float | None:
    """Seconds before the next attempt after ``attempts`` failed ones; None: give up."""
    if attempts > len(delays):
        return None
    return delays[attempts - 1] * (1 + random.random() * JITTER)


def check_url(url: object, *, allow_loopback: bool = False) -> str:
    """``url`` if it may be a webhook endpoint: https with a host and no credentials in it;
    http only to a loopback host, and loopback at all only when the application allows it.
    Addresses are checked again, after DNS resolution, on every delivery."""
    if not isinstance(url, str) or not url or len(url) > 2000:
        raise InvalidURL("A webhook URL is a string of up to 2000 characters.", field="url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidURL("The webhook URL does not parse.", field="url") from None
    host = parts.hostname
    if not host or parts.username or parts.password:
        raise InvalidURL("A webhook URL needs a host and no user or password in it.", field="url")
    loopback = _is_loopback_name(host)
    if loopback and not allow_loopback:
        raise InvalidURL(
            f"The webhook URL's host {host!r} is loopback: allowed only with "
            "allow_loopback=True (tests and development).",
            field="url",
        )
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise InvalidURL(
            f"A webhook URL must use https (got {parts.scheme!r}); plain http is accepted "
            "only for loopback hosts with allow_loopback=True.",
            field="url",
        )
    del port
    return url


def _is_loopback_name(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def refused_address(address: str, *, allow_loopback: bool, allow_private: bool) -> str | None:
    """Why a resolved address may not be sent to (None: it may)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None if allow_loopback else "loopback"
    if ip.is_global:
        return None
    if allow_private and not ip.is_multicast and not ip.is_unspecified:
        return None
    if ip.is_link_local:
        return "link-local (cloud metadata lives there)"
    return "private or reserved"


class RefusedAddress(OSError):
    """A webhook host resolved to an address deliveries may not go to."""


class _VettingResolver(AbstractResolver):
    """Resolves as usual, then refuses the whole answer when any address is not allowed:
    the check is made on what the connection will actually use (no second lookup)."""

    def __init__(self, *, allow_loopback: bool, allow_private: bool) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allow_loopback = allow_loopback
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        for entry in found:
            why = refused_address(
                entry["host"],
                allow_loopback=self._allow_loopback,
                allow_private=self._allow_private,
            )
            if why is not None:
                raise RefusedAddress(f"{host} resolves to a {why} address ({entry['host']})")
        return found

    async def close(self) -> None:
        await self._inner.close()


def _shown(url: str) -> str:
    """The URL for messages: without its query, which may carry a receiver's token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _message(event: Event) -> str:
    """The delivered body (Standard Webhooks: ``type``, ``timestamp``, ``data``)."""
    data = json.loads(event.to_payload())
    data["position"] = event.position
    return json.dumps(
        {"type": event.kind, "timestamp": event.at.isoformat(), "data": data},
        separators=(",", ":"),
    )


def plan_deliveries(
    events: list[Event], endpoints: list[dict[str, Any]]
) -> list[tuple[str, str, int, str, str, str]]:
    """Which endpoint gets which event: a system-wide endpoint every owner's events, an
    owner's endpoint that owner's; then the kinds it asked for. Delivery ids are derived
    from the endpoint and the position, so planning twice makes the same rows."""
    rows = []
    for event in events:
        assert event.position is not None
        body: str | None = None
        for endpoint in endpoints:
            if endpoint["owner"] is not None and endpoint["owner"] != event.owner:
                continue
            if endpoint["kinds"] is not None and event.kind not in endpoint["kinds"]:
                continue
            body = body or _message(event)
            delivery_id = "msg_" + _uuid.uuid5(_uuid.UUID(endpoint["id"]), str(event.position)).hex
            rows.append(
                (delivery_id, endpoint["id"], event.position, event.uuid or "", event.kind, body)
            )
    return rows


class Webhooks:
    """Endpoints and deliveries on one repository; ``run()`` is the delivery worker."""

    def __init__(self, repo: Repository, vault: Vault, hub: EventHub) -> None:
        self._repo = repo
        self._vault = vault
        self._hub = hub

    # -- endpoints -----------------------------------------------------------------------

    async def add(
        self,
        url: str,
        *,
        owner: str | None,
        kinds: Iterable[str] | None,
        description: str,
        allow_loopback: bool,
    ) -> WebhookEndpoint:
        url = check_url(url, allow_loopback=allow_loopback)
        owner = names.check_owner(owner)
        kind_list = _kinds(kinds)
        if not isinstance(description, str) or len(description) > 500:
            raise InvalidArgument(
                "description must be a str of up to 500 characters", field="description"
            )
        endpoint_id = names.uuid7()
        secret = generate_secret()
        sealed = self._vault.seal_value(endpoint_id, _SECRET_FIELD, secret)
        row = await self._repo.webhook_add(endpoint_id, owner, url, kind_list, sealed, description)
        return WebhookEndpoint(**row, secret=secret)

    async def endpoints(self, owner: OwnerScope) -> list[WebhookEndpoint]:
        any_owner = owner is ALL_OWNERS
        rows = await self._repo.webhook_list(
            any_owner=any_owner, owner=None if any_owner else _owner(owner)
        )
        return [WebhookEndpoint(**row) for row in rows]

    async def remove(self, endpoint_id: object, owner: OwnerScope) -> None:
        target = names.require_uuid(endpoint_id)
        any_owner = owner is ALL_OWNERS
        if not await self._repo.webhook_remove(
            target, any_owner=any_owner, owner=None if any_owner else _owner(owner)
        ):
            raise NotFound(f"No webhook endpoint {target} here.", uuid=target)

    async def _endpoint(self, endpoint_id: object, owner: OwnerScope) -> dict[str, Any]:
        target = names.require_uuid(endpoint_id)
        row = await self._repo.webhook_get(target)
        if row is None or (owner is not ALL_OWNERS and row["owner"] != _owner(owner)):
            raise NotFound(f"No webhook endpoint {target} here.", uuid=target)
        return row

    async def deliveries(
        self, endpoint_id: object, owner: OwnerScope, *, state: str | None, limit: int
    ) -> list[WebhookDelivery]:
        row = await self._endpoint(endpoint_id, owner)
        if state not in (None, "pending", "delivered", "dead"):
            raise InvalidArgument(
                f"state must be 'pending', 'delivered', 'dead' or None, got {state!r}",
                field="state",
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidArgument(
                f"limit must be an int from 1 to 1000, got {limit!r}", field="limit"
            )
        found = await self._repo.webhook_deliveries(row["id"], state, limit)
        return [
            WebhookDelivery(
                id=d["id"],
                endpoint_id=d["endpoint_id"],
                position=d["position"],
                kind=d["kind"],
                connection=d["lane"],
                state=d["state"],
                attempts=d["attempts"],
                next_attempt_at=d["next_attempt_at"] if d["state"] == "pending" else None,
                last_status=d["last_status"],
                last_error=d["last_error"],
                created_at=d["created_at"],
                finished_at=d["finished_at"],
            )
            for d in found
        ]

    async def replay(self, delivery_id: object, owner: OwnerScope) -> None:
        if not isinstance(delivery_id, str) or not delivery_id.startswith("msg_"):
            raise InvalidArgument(
                f"a delivery id looks like 'msg_...', got {shown(delivery_id)}",
                field="delivery_id",
            )
        any_owner = owner is ALL_OWNERS
        if not await self._repo.webhook_replay(
            delivery_id, any_owner=any_owner, owner=None if any_owner else _owner(owner)
        ):
            raise NotFound(f"No webhook delivery {delivery_id[:40]} here.")

    async def test(
        self, endpoint_id: object, owner: OwnerScope, *, allow_loopback: bool, allow_private: bool
    ) -> WebhookAttempt:
        """Send a signed ``webhook_test`` message to the endpoint now, once."""
        row = await self._endpoint(endpoint_id, owner)
        secret = self._vault.unseal_value(row["id"], _SECRET_FIELD, row["secret"])
        body = json.dumps(
            {
                "type": "webhook_test",
                "timestamp": datetime.now().astimezone().isoformat(),
                "data": {"endpoint": row["id"]},
            },
            separators=(",", ":"),
        )
        async with _Sender(allow_loopback=allow_loopback, allow_private=allow_private) as sender:
            return await sender.send(row["url"], secret, "msg_" + _uuid.uuid4().hex, body)

    # -- the worker ----------------------------------------------------------------------

    async def run(
        self,
        *,
        allow_loopback: bool,
        allow_private: bool,
        concurrency: int,
        retry_delays: Sequence[float],
        poll: float,
    ) -> None:
        """Dispatch new events and send due deliveries until cancelled."""
        token = str(_uuid.uuid4())
        backoff = 0.1
        async with (
            _Sender(allow_loopback=allow_loopback, allow_private=allow_private) as sender,
            self._hub.subscribe(owner=ALL_OWNERS, maxsize=1) as wake,
        ):
            while True:
                try:
                    busy = await self._round(sender, token, concurrency, retry_delays)
                    backoff = 0.1
                except Exception as exc:
                    if not _is_storage_failure(exc):
                        raise
                    log.warning(
                        "webhook worker: the database failed (%s); retrying in about %.1fs",
                        type(exc).__name__,
                        backoff,
                        extra=telemetry.fields("webhook_worker_failed"),
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if busy:
                    continue
                wait = poll
                with contextlib.suppress(Exception):
                    due = await self._repo.webhook_next_due()
                    if due is not None:
                        wait = max(0.01, min(poll, due))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.get(), wait)

    async def _round(
        self, sender: _Sender, token: str, concurrency: int, retry_delays: Sequence[float]
    ) -> bool:
        """One dispatch and one batch of sends; True when there may be more to do now."""
        dispatched = await self._repo.webhook_dispatch(DISPATCH_PAGE, plan_deliveries)
        claimed = await self._repo.webhook_claim(token, LEASE, concurrency)
        if claimed:
            await asyncio.gather(*(self._deliver(sender, token, d, retry_delays) for d in claimed))
        return bool(claimed) or dispatched == DISPATCH_PAGE

    async def _deliver(
        self, sender: _Sender, token: str, delivery: dict[str, Any], delays: Sequence[float]
    ) -> None:
        secret = self._vault.unseal_value(
            delivery["endpoint_id"], _SECRET_FIELD, delivery["secret"]
        )
        attempt = await sender.send(delivery["url"], secret, delivery["id"], delivery["payload"])
        attempts = delivery["attempts"] + 1
        if attempt.ok:
            state, delay = "delivered", 0.0
        else:
            wait = retry_delay(attempts, delays)
            state, delay = ("dead", 0.0) if wait is None else ("pending", wait)
            log.info(
                "webhook delivery %s to %s failed (attempt %d: %s); %s",
                delivery["id"],
                _shown(delivery["url"]),
                attempts,
                attempt.error or f"HTTP {attempt.status}",
                "dead" if wait is None else f"next in {wait:.0f}s",
                extra=telemetry.fields("webhook_delivery_failed"),
            )
        if not await self._repo.webhook_finish(
            delivery["id"], token, state, attempt.status, attempt.error, delay
        ):
            log.warning(
                "webhook delivery %s: the lease ran out before its attempt was recorded",
                delivery["id"],
                extra=telemetry.fields("webhook_lease_lost"),
            )


class _Sender:
    """Signed POSTs through a session that refuses unsafe addresses and redirects."""

    def __init__(self, *, allow_loopback: bool, allow_private: bool) -> None:
        self._allow_loopback = allow_loopback
        self._allow_private = allow_private
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> _Sender:
        connector = aiohttp.TCPConnector(
            resolver=_VettingResolver(
                allow_loopback=self._allow_loopback, allow_private=self._allow_private
            ),
            use_dns_cache=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, url: str, secret: str, message_id: str, body: str) -> WebhookAttempt:
        assert self._session is not None
        try:
            check_url(url, allow_loopback=self._allow_loopback)
        except InvalidURL as exc:
            return WebhookAttempt(False, None, exc.message)
        host = urlsplit(url).hostname or ""
        with contextlib.suppress(ValueError):
            ipaddress.ip_address(host)  # a literal address never reaches the resolver
            why = refused_address(
                host, allow_loopback=self._allow_loopback, allow_private=self._allow_private
            )
            if why is not None:
                return WebhookAttempt(False, None, f"refused: {host} is a {why} address")
        stamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "integrations-webhooks",
            "webhook-id": message_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign(secret, message_id, stamp, body),
        }
        try:
            async with self._session.post(
                url, data=body.encode(), headers=headers, allow_redirects=False
            ) as response:
                # Read (a bounded part of) the answer so the connection can be reused.
                await response.content.read(MAX_RESPONSE_BYTES)
                status = response.status
        except RefusedAddress as exc:
            return WebhookAttempt(False, None, f"refused: {exc}")
        except aiohttp.ClientConnectorError as exc:
            cause = exc.os_error
            if isinstance(cause, RefusedAddress):
                return WebhookAttempt(False, None, f"refused: {cause}")
            return WebhookAttempt(False, None, f"could not connect to {_shown(url)}")
        except TimeoutError:
            return WebhookAttempt(False, None, f"no answer within {TIMEOUT:g}s")
        except aiohttp.ClientError as exc:
            return WebhookAttempt(False, None, f"{type(exc).__name__} from {_shown(url)}")
        if 200 <= status < 300:
            return WebhookAttempt(True, status, None)
        if 300 <= status < 400:
            return WebhookAttempt(False, status, f"HTTP {status}: redirects are not followed")
        return WebhookAttempt(False, status, f"HTTP {status}")


def _kinds(kinds: Iterable[str] | None) -> list[str] | None:
    if kinds is None:
        return None
    if isinstance(kinds, str):
        raise InvalidArgument("kinds must be an iterable of kind names, not a str", field="kinds")
    chosen = sorted(set(kinds))
    unknown = set(chosen) - (EVENT_KINDS - {"resync"})
    if unknown or not chosen:
        raise InvalidArgument(
            f"kinds must name event kinds among {', '.join(sorted(EVENT_KINDS - {'resync'}))}",
            field="kinds",
        )
    return chosen


def _owner(owner: OwnerScope) -> str | None:
    return None if owner is ALL_OWNERS else names.check_owner(owner)


def _is_storage_failure(exc: Exception) -> bool:
    from ._errors import StorageError

    return isinstance(exc, StorageError)
