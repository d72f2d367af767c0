"""Tokens obtained elsewhere (a backup, another system) checked and written into a connection."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from . import oauth
from ._errors import InvalidAttrs
from ._models import utcnow
from ._refresher import store_tokens

__all__ = ["TOKEN_KEYS", "apply_tokens", "parse_tokens"]

TOKEN_KEYS = frozenset({"access_token", "refresh_token", "expires_at", "token_type", "scope"})


def _optional_text(tokens: Mapping[str, Any], key: str) -> str | None:
    value = tokens.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidAttrs(f"{key} must be a non-empty string")
    return value.strip()


def parse_tokens(tokens: Mapping[str, Any]) -> oauth.TokenSet:
    """Check the types of an imported token set; errors name the field, never its value.

    ``access_token`` is required; ``expires_at`` is an ISO 8601 time with a zone (or a
    datetime); ``scope`` a space-separated string or a list of strings.
    """
    if not isinstance(tokens, Mapping):
        raise InvalidAttrs("tokens must be a mapping")
    unknown = sorted(str(k) for k in tokens if k not in TOKEN_KEYS)
    if unknown:
        raise InvalidAttrs(f"unknown token fields: {', '.join(unknown)}")
    access = _optional_text(tokens, "access_token")
    if access is None:
        raise InvalidAttrs("access_token is required")
    expires: Any = tokens.get("expires_at")
    if isinstance(expires, str):
        try:
            expires = datetime.fromisoformat(expires)
        except ValueError:
            raise InvalidAttrs("expires_at must be an ISO 8601 time") from None
    if expires is not None and (not isinstance(expires, datetime) or expires.tzinfo is None):
        raise InvalidAttrs("expires_at must be an ISO 8601 time with a time zone")
    scope: Any = tokens.get("scope")
    if isinstance(scope, str):
        scope = scope.split()
    if scope is None:
        scope = []
    if not isinstance(scope, list | tuple) or not all(isinstance(s, str) for s in scope):
        raise InvalidAttrs("scope must be a string or a list of strings")
    return oauth.TokenSet(
        access_token=access,
        refresh_token=_optional_text(tokens, "refresh_token"),
        token_type=_optional_text(tokens, "token_type") or "Bearer",
        expires_at=expires,
        scope=tuple(scope),
        obtained_at=utcnow(),
    )


def apply_tokens(
    data: Mapping[str, Any], tokens: oauth.TokenSet, seal: Callable[[str, Any], Any]
) -> dict[str, Any]:
    """The row's new data: tokens sealed, status connected, earlier failures cleared."""
    new = dict(data)
    store_tokens(new, tokens, seal=seal, previous_refresh_token=None, new_grant=True)
    new["status"] = "connected"
    new["reauth_required"] = False
    new.pop("validation_status", None)
    new.pop("refresh_error", None)
    return new
