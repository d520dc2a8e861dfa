"""OWL: outlier ratios -> per-block sparsity. Pure functions of numbers and score tensors.

Outlier ratio of a block (Layerwise Outlier Distribution, as a fraction): the share of all the block's Wanda scores
|W_ij|·‖X_j‖₂ (every prunable matrix concatenated) that exceed M times their mean.

Allocation: with r̃_i = (D_i − min D)/(max D − min D), block i gets s_i = S + 2λ·(mean r̃ − r̃_i). The mean is S and
the spread max − min is 2λ; equal ratios give the uniform allocation (the reference divides by zero there).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch

logger = logging.getLogger(__name__)

# Largest sparsity a block may be given; 1.0 would delete every weight of the block.
MAX_BLOCK_SPARSITY = 0.999


def outlier_ratio(scores: Iterable[torch.Tensor], owl_m: float) -> float:
    """Fraction of all values in `scores` (taken together) above `owl_m` × their mean."""
    scores = list(scores)
    total = sum(float(s.sum(dtype=torch.float64)) for s in scores)
    count = sum(s.numel() for s in scores)
    if count == 0:
        return 0.0
    threshold = owl_m * total / count
    above = sum(int((s > threshold).sum()) for s in scores)
    return above / count


def normalise(ratios: Sequence[float]) -> list[float]:
    """Min-max normalise to [0, 1]; all-equal inputs give all zeros."""
    lo, hi = min(ratios), max(ratios)
    if hi - lo <= 0:
        return [0.0 for _ in ratios]
    return [(r - lo) / (hi - lo) for r in ratios]


def owl_allocation(ratios: Sequence[float], sparsity: float, owl_lambda: float) -> tuple[list[float], bool]:
    """Per-block sparsities `s_i = S + 2λ(mean r̃ − r̃_i)`, kept in [0, MAX_BLOCK_SPARSITY] with the mean preserved.

    Returns `(sparsities, clamped)`; `clamped` tells whether the bounds changed the formula's values.

    Example:

    ```python
    >>> owl_allocation([0.01, 0.02, 0.03], sparsity=0.7, owl_lambda=0.1)[0]   # r̃ = 0, 0.5, 1
    [0.8, 0.7, 0.6]
    ```
    """
    if not ratios:
        return [], False
    r = normalise(ratios)
    mean_r = sum(r) / len(r)
    values = [sparsity + 2.0 * owl_lambda * (mean_r - ri) for ri in r]
    values = [round(v, 12) for v in values]  # keep 0.7 as 0.7 in reports despite float noise
    bounded, clamped = clamp_preserving_mean(values, 0.0, max(MAX_BLOCK_SPARSITY, sparsity))
    return [round(v, 12) for v in bounded], clamped


def clamp_preserving_mean(values: Sequence[float], lo: float, hi: float) -> tuple[list[float], bool]:
    """Shift every value by one constant c and clip into [lo, hi], with c chosen so the mean is unchanged.

    Values left inside the bounds keep their differences; the mean of `clip(v + c)` grows monotonically with c,
    so c is found by bisection. Needs lo ≤ mean ≤ hi. Returns `(values, changed)`.
    """
    vals = [float(v) for v in values]
    if all(lo <= v <= hi for v in vals):
        return vals, False
    target = sum(vals) / len(vals)
    if not lo - 1e-12 <= target <= hi + 1e-12:
        raise ValueError(f"mean {target} is outside [{lo}, {hi}]; it cannot be preserved")
    if target <= lo or target >= hi:  # only one way to have that mean
        return [min(max(target, lo), hi)] * len(vals), True

    def mean_at(c: float) -> float:
        return sum(min(max(v + c, lo), hi) for v in vals) / len(vals)

    left, right = lo - max(vals), hi - min(vals)  # mean_at(left) = lo, mean_at(right) = hi
    for _ in range(200):
        mid = (left + right) / 2
        if mean_at(mid) < target:
            left = mid
        else:
            right = mid
    c = (left + right) / 2
    return [min(max(v + c, lo), hi) for v in vals], True


def mixed_nm_allocation(ratios: Sequence[float], n: int, m: int, owl_lambda: float) -> list[int]:
    """Per-block kept count n_i for a mixed N:M pattern (the reference's `wanda_owl_structure`).

    Pruned per group p = m − n; block i gets p_i = p − λ(r̃_i − mean r̃) rounded so that Σ p_i = L·p exactly
    (largest remainders), with 0 ≤ p_i ≤ m − 1. Returns n_i = m − p_i (so the mean sparsity stays 1 − n/m).
    """
    r = normalise(ratios)
    mean_r = sum(r) / len(r)
    p = m - n
    real, _ = clamp_preserving_mean([p - owl_lambda * (ri - mean_r) for ri in r], 0.0, m - 1.0)
    floors = [int(v // 1) for v in real]
    remaining = p * len(real) - sum(floors)
    order = sorted(range(len(real)), key=lambda i: (-(real[i] - floors[i]), i))
    for i in order[: max(remaining, 0)]:
        floors[i] += 1
    return [m - pi for pi in floors]
