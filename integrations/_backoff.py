"""One backoff for every retry: exponential, capped, with equal jitter."""

from __future__ import annotations

import random

__all__ = ["delays", "equal_jitter"]

_SYSTEM = random.SystemRandom()


def equal_jitter(ceiling: float, rng: random.Random | None = None) -> float:
    """A delay in ``[ceiling/2, ceiling]``: callers spread out instead of retrying in
    lockstep, yet each still waits."""
    return ceiling / 2 + (rng or _SYSTEM).uniform(0, ceiling / 2)


def delays(attempts: int, base: float, cap: float, rng: random.Random | None = None) -> list[float]:
    """``attempts`` delays; delay ``i`` is jittered below ``min(cap, base * 2**i)``."""
    if attempts < 0:
        raise ValueError("attempts must be >= 0")
    if base < 0 or cap < 0:
        raise ValueError("base and cap must be >= 0")
    return [equal_jitter(min(cap, base * 2.0 ** min(i, 64)), rng) for i in range(attempts)]
