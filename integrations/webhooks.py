"""Standard Webhooks signatures: make a secret, sign a message, verify one (no I/O)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

from ._errors import IntegrationsError

__all__ = ["WebhookVerificationFailed", "generate_secret", "sign", "verify"]

#: How far a message's timestamp may be from the receiver's clock, in seconds.
DEFAULT_TOLERANCE = 300
_PREFIX = "whsec_"


class WebhookVerificationFailed(IntegrationsError):
    """The webhook's signature, id or timestamp did not verify; do not act on the message."""

    code = "webhook_verification_failed"


def generate_secret() -> str:
    """A new signing secret: ``whsec_`` and 32 random bytes in base64."""
    return _PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    if not isinstance(secret, str) or not secret.startswith(_PREFIX):
        raise ValueError("a webhook secret is a string that starts with 'whsec_'")
    try:
        return base64.b64decode(secret[len(_PREFIX) :], validate=True)
    except ValueError:
        raise ValueError("the webhook secret is not valid base64 after 'whsec_'") from None


def sign(secret: str, message_id: str, timestamp: int, body: bytes | str) -> str:
    """The ``webhook-signature`` header value (``v1,<base64 HMAC-SHA256>``) of a message."""
    data = body.encode() if isinstance(body, str) else body
    signed = f"{message_id}.{timestamp}.".encode() + data
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    secret: str,
    body: bytes | str,
    headers: Mapping[str, str],
    *,
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> str:
    """Check a received webhook; returns its ``webhook-id`` (keep it to drop a retry of a
    message already handled). Raises WebhookVerificationFailed when a header is missing,
    the timestamp is more than ``tolerance`` seconds away, or no signature matches.

    ``body`` must be the raw request body, exactly as received."""
    lowered = {k.lower(): v for k, v in headers.items()}
    message_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not message_id or not stamp or not signatures:
        raise WebhookVerificationFailed(
            "The message lacks a webhook-id, webhook-timestamp or webhook-signature header."
        )
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationFailed("The webhook-timestamp header is not a number.") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationFailed(
            f"The message's timestamp is more than {tolerance} s away from this clock: a "
            "replayed message, or a clock to fix."
        )
    expected = sign(secret, message_id, timestamp, body).split(",", 1)[1]
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return message_id
    raise WebhookVerificationFailed("No signature of the message matches the secret.")
