"""Settings fixed at construction: timing of token requests, checks and authorizations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ._errors import ConfigurationError
from ._names import shown

__all__ = ["BUDGET_MARGIN", "MAXIMUM", "Settings", "Takeover", "TokenPolicy", "check_at_most"]

#: What the next refresher does with a lease that expired without a write: its holder may
#: have spent the refresh token. ``"refresh"`` asks with the stored refresh token anyway;
#: ``"reauthorize"`` marks the connection for a new authorization instead.
Takeover = Literal["refresh", "reauthorize"]

_HOUR = 3600.0
_DAY = 24 * _HOUR

#: The largest value of every numeric setting (seconds for durations). Beyond it a value
#: is a mistake that would exhaust the host (a pool of 2**31 connections) or overflow a
#: timer; docs/operating.md lists the same table.
MAXIMUM: dict[str, float] = {
    # Integrations(...)
    "pool_max_size": 1000,
    "cache_size": 1_000_000,
    "audit_buffer": 1_000_000,
    "statement_cache_size": 100_000,
    "max_attrs_bytes": 16 * 1024 * 1024,
    "check_timeout": _HOUR,
    "authorization_ttl": _DAY,
    "revoke_timeout": _HOUR,
    "leeway": _DAY,
    "lock_timeout": _HOUR,
    "token_timeout": _HOUR,
    "token_attempts": 20,
    "token_backoff": _HOUR,
    "refresh_cooldown": _HOUR,
    "refresh_lease": _HOUR,
    "token_write_retry": _DAY,
    "listen_heartbeat": _HOUR,
    # run_health_sweeps(...)
    "interval": 7 * _DAY,
    "stale_after": 366 * _DAY,
    "per_provider_interval": _DAY,
    "refresh_ahead": 366 * _DAY,
    "concurrency": 1000,
    # per call
    "maxsize": 1_000_000,
    "batch_size": 100_000,
    "timeout": _DAY,
    "max_attempts": 20,
    "max_age": 100 * 366 * _DAY,
}


def check_at_most(name: str, value: float, error: type[Exception] = ConfigurationError) -> None:
    """Raise ``error`` naming the bound when ``value`` exceeds ``MAXIMUM[name]``."""
    limit = MAXIMUM[name]
    if value > limit:
        shown = int(limit) if float(limit).is_integer() else limit
        raise error(f"{name} must be at most {shown}, got a larger value.")


#: Slack beyond the attempts and their waits, for the database round trips of a refresh.
BUDGET_MARGIN = 5.0


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """Timing of token requests, of the refresh lease that serialises them (and of the
    row lock its short transactions take), of storing what they return, and of the
    cool-down after a failed refresh.

    ``lease``: seconds a refresh lease lasts; its holder renews it every third of that
    while its token request is pending, so a frozen or killed holder is taken over after
    at most that long. ``takeover``: see :data:`Takeover`. ``write_retry``: for how long
    new tokens whose write failed are kept in the process and written again.
    """

    leeway: float = 60.0
    lock_timeout: float = 30.0
    timeout: float = 10.0
    attempts: int = 3
    backoff: float = 0.5
    cooldown: float = 5.0
    lease: float = 15.0
    takeover: Takeover = "refresh"
    write_retry: float = 60.0

    def __post_init__(self) -> None:
        if not self.lease >= 1 or not self.write_retry >= 0:
            raise ValueError("refresh_lease must be >= 1 and token_write_retry >= 0")
        if self.takeover not in ("refresh", "reauthorize"):
            raise ValueError(
                f'refresh_takeover must be "refresh" or "reauthorize", got {shown(self.takeover)}'
            )
        if (
            self.leeway < 0
            or self.lock_timeout <= 0
            or self.timeout <= 0
            or self.backoff < 0
            or self.cooldown < 0
        ):
            raise ValueError(
                "leeway, backoff and refresh_cooldown must be >= 0; lock_timeout and timeout > 0"
            )
        if self.attempts < 1:
            raise ValueError("token_attempts must be at least 1")

    @property
    def backoff_cap(self) -> float:
        return self.backoff * 8

    @property
    def cooldown_cap(self) -> float:
        return self.cooldown * 60

    @property
    def stall_after(self) -> float:
        """Seconds a lease transaction may sit idle before the server ends it: its
        statements go back to back, so a longer pause means a stalled (frozen) client,
        whose row lock must not hold the others up for longer than its lease."""
        return max(1.0, min(5.0, self.lease))

    @property
    def budget(self) -> float:
        """The longest one refresh may take from its first token request: every attempt
        times out, every wait maxed. The row lock's idle timeout is set to it."""
        waits = sum(min(self.backoff_cap, self.backoff * 2.0**i) for i in range(self.attempts - 1))
        return self.attempts * self.timeout + waits + BUDGET_MARGIN

    def cooldown_after(self, failures: int, retry_after: float | None) -> float:
        """Seconds automatic refreshes wait after ``failures`` consecutive failed ones."""
        wait = min(self.cooldown_cap, self.cooldown * 2.0 ** min(max(failures - 1, 0), 32))
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.cooldown_cap))
        return wait


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything else a service reads: the schema, check and authorization timing."""

    schema: str = "integrations"
    check_timeout: float = 15.0
    authorization_ttl: float = 600.0
    revoke_timeout: float = 5.0
    #: The largest setup, as JSON, that save_setup and validate_credentials accept.
    max_attrs_bytes: int = 64 * 1024
    token: TokenPolicy = field(default_factory=TokenPolicy)

    @classmethod
    def build(
        cls,
        *,
        schema: str,
        check_timeout: float,
        authorization_ttl: float,
        revoke_timeout: float,
        max_attrs_bytes: int,
        leeway: float,
        lock_timeout: float,
        token_timeout: float,
        token_attempts: int,
        token_backoff: float,
        refresh_cooldown: float,
        refresh_lease: float,
        refresh_takeover: Takeover,
        token_write_retry: float,
    ) -> Settings:
        """Settings from the constructor's options; a bad value is a ConfigurationError."""
        numbers = {
            "check_timeout": check_timeout,
            "authorization_ttl": authorization_ttl,
            "revoke_timeout": revoke_timeout,
            "max_attrs_bytes": max_attrs_bytes,
            "leeway": leeway,
            "lock_timeout": lock_timeout,
            "token_timeout": token_timeout,
            "token_attempts": token_attempts,
            "token_backoff": token_backoff,
            "refresh_cooldown": refresh_cooldown,
            "refresh_lease": refresh_lease,
            "token_write_retry": token_write_retry,
        }
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"{name} must be a number, got {shown(value)}.")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigurationError(f"{name} must be a finite number, got {shown(value)}.")
        for name in ("max_attrs_bytes", "token_attempts"):
            if not isinstance(numbers[name], int):
                raise ConfigurationError(f"{name} must be an int, got {shown(numbers[name])}.")
        for name, value in numbers.items():
            check_at_most(name, value)
        try:
            return cls(
                schema=schema,
                check_timeout=check_timeout,
                authorization_ttl=authorization_ttl,
                revoke_timeout=revoke_timeout,
                max_attrs_bytes=max_attrs_bytes,
                token=TokenPolicy(
                    leeway=float(leeway),
                    lock_timeout=lock_timeout,
                    timeout=token_timeout,
                    attempts=token_attempts,
                    backoff=token_backoff,
                    cooldown=refresh_cooldown,
                    lease=refresh_lease,
                    takeover=refresh_takeover,
                    write_retry=token_write_retry,
                ),
            )
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None

    def __post_init__(self) -> None:
        if self.authorization_ttl <= 0 or self.revoke_timeout <= 0 or self.check_timeout <= 0:
            raise ValueError("authorization_ttl, revoke_timeout and check_timeout must be > 0")
        if self.max_attrs_bytes < 1024:
            raise ValueError("max_attrs_bytes must be at least 1024")
