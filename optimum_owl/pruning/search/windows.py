"""How many windows the searches (`layerwise="owl-auto"`, `"auto"`) score their candidates on: pure functions of the
config, used by the engine (to draw them), `holdout` (to decide), `search` (the screening's share) and the report."""

from __future__ import annotations

import math
from typing import Any


def holdout_count(num_samples: int, fraction: float) -> int:
    """Windows held out of `num_samples` (or, with separate scoring windows, the screening's share of them):
    `ceil(fraction · num_samples)`, and at least `min(4, num_samples // 4)` (at least 1), so that small calibration
    sets still leave enough held-out tokens to tell candidates apart."""
    return max(1, math.ceil(fraction * num_samples - 1e-9), min(4, num_samples // 4))


def holdout_windows_wanted(config: Any) -> int:
    """Windows to draw beyond the calibration windows for scoring (`auto_holdout_tokens`; 0: none, hold out)."""
    if not config.auto_holdout_tokens:
        return 0
    return max(math.ceil(config.auto_holdout_tokens / config.seqlen), holdout_count(config.num_samples, config.auto_holdout))
