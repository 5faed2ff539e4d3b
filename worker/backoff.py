"""Exponential backoff with full jitter for talking to a coordinator that comes and goes.

A volunteer's worker must ride out a coordinator restart or a flaky link without
hammering it when it comes back: every retry waits a random time in
``[0, min(cap, base * factor**attempt)]`` ("full jitter", which spreads many
workers' retries apart better than a fixed or equal-jitter schedule).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Retry delays; call :meth:`next_delay` after each failure and :meth:`reset` after a success."""

    base_s: float = 0.5
    """First retry waits up to this long."""
    factor: float = 2.0
    """Growth per consecutive failure."""
    cap_s: float = 30.0
    """No wait is longer than this, however long the coordinator stays away."""
    rng: random.Random = field(default_factory=random.Random, repr=False)
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (self.factor**self.attempt))
        self.attempt += 1
        return self.rng.uniform(0.0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
