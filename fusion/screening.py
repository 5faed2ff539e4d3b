"""Delta-norm screening: spot contributions whose task vector is far larger than the round's typical one.

A volunteer's contribution can be broken (diverged training, wrong learning rate) or hostile (a
scaled-up delta to dominate an average). Before any merge method runs, the driver measures each
contribution's global delta norm ``||theta_i - base||_2`` (over all tensors it changes) and compares
it with the median over the round. A contribution whose norm exceeds ``threshold * median`` is an
outlier; depending on ``action`` it is

* ``flag``: reported, merged unchanged;
* ``clip``: its delta is scaled down to norm ``threshold * median`` (direction kept);
* ``drop``: left out of the merge.

The median is robust as long as fewer than half of the contributions are outliers. With fewer than
``min_contributions`` contributions no median is meaningful and nothing is screened.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coldswarm.common.options import build

from .errors import MergeConfigError


@dataclass
class ScreenConfig:
    action: str = field(
        default="flag",
        metadata={
            "help": "'flag' (report only), 'clip' (scale the delta down to threshold x median norm) or 'drop' (leave the contribution out)"
        },
    )
    threshold: float = field(
        default=3.0,
        metadata={
            "help": "outlier when delta norm > threshold x the round's median delta norm; 3 is lenient, 1.5 strict"
        },
    )
    min_contributions: int = field(
        default=3,
        metadata={
            "help": "screen only rounds with at least this many contributions (a median of 1-2 values says little)"
        },
    )

    def __post_init__(self):
        if self.action not in ("flag", "clip", "drop"):
            raise MergeConfigError(f"screen: action must be 'flag', 'clip' or 'drop' (got {self.action!r})")
        if not self.threshold >= 1.0:
            raise MergeConfigError(f"screen: threshold must be >= 1 (got {self.threshold})")

    @classmethod
    def from_options(cls, value: ScreenConfig | Mapping[str, Any] | str | None) -> ScreenConfig | None:
        """Accepts a ScreenConfig, a mapping of its fields, an action name, or None (no screening)."""
        if value is None or isinstance(value, ScreenConfig):
            return value
        if isinstance(value, str):
            return cls(action=value)
        if isinstance(value, Mapping):
            return build(cls, value, "screen option(s)", MergeConfigError)
        raise MergeConfigError(f"screen: expected a mapping or an action name, got {type(value).__name__}")


@dataclass
class ScreenDecision:
    key: str
    norm: float
    ratio: float  #: norm / median norm (nan when not screened)
    outlier: bool
    action: str  #: 'keep', 'flag', 'clip' or 'drop'
    factor: float  #: what the delta is multiplied by (1.0 unless clipped; 0.0 when dropped)


def screen_norms(norms: Mapping[str, float], config: ScreenConfig) -> dict[str, ScreenDecision]:
    """Decide, per contribution key, what screening does with it, from its global delta norm."""
    out: dict[str, ScreenDecision] = {}
    finite = [v for v in norms.values() if math.isfinite(v)]
    if len(norms) < config.min_contributions or not finite:
        return {k: ScreenDecision(k, v, math.nan, False, "keep", 1.0) for k, v in norms.items()}
    med = statistics.median(finite)
    limit = config.threshold * med
    for k, v in norms.items():
        ratio = v / med if med > 0 else (math.inf if v > 0 else 1.0)
        outlier = not math.isfinite(v) or v > limit
        if not outlier:
            out[k] = ScreenDecision(k, v, ratio, False, "keep", 1.0)
        elif config.action == "flag":
            out[k] = ScreenDecision(k, v, ratio, True, "flag", 1.0)
        elif config.action == "clip" and math.isfinite(v) and v > 0:
            out[k] = ScreenDecision(k, v, ratio, True, "clip", limit / v)
        else:
            out[k] = ScreenDecision(k, v, ratio, True, "drop", 0.0)
    return out
