"""Allocation: how much sparsity each block gets. Pure functions of numbers and score tensors (no model, no I/O).

Every allocation family lives here as a small pure function; the passes (optimum_owl.passes) feed them the
numbers they need and turn the result into `BlockPlan`s.

- `uniform_plans`: every block gets the target.
- OWL (Yin et al. 2023). Outlier ratio of a block (Layerwise Outlier Distribution, as a fraction): the share of all
  the block's Wanda scores |W_ij|·‖X_j‖₂ (every prunable matrix together) that exceed M times their mean
  (`outlier_ratios`). With r̃_i = (D_i − min D)/(max D − min D), block i gets s_i = S + 2λ·(mean r̃ − r̃_i)
  (`owl_allocation`): the mean is S and the spread max − min is 2λ; equal ratios give the uniform allocation (the
  reference divides by zero there). `mixed_nm_allocation` is the per-block N:M variant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Largest sparsity a block may be given; 1.0 would delete every weight of the block.
MAX_BLOCK_SPARSITY = 0.999


@dataclass
class BlockPlan:
    """What block i is pruned to: a sparsity (unstructured) or a kept count n of every m (N:M)."""

    sparsity: float
    nm: tuple[int, int] | None = None


def outlier_ratios(scores: Callable[[], Iterable[torch.Tensor]], owl_ms: Sequence[float]) -> list[float]:
    """For each M in `owl_ms`: the fraction of all values yielded by `scores()` (taken together) above M × their mean.

    `scores` is called twice (once for the mean, once for the counts) so that a caller can compute one matrix's
    scores at a time instead of holding a block-sized buffer.
    """
    total, count = 0.0, 0
    for s in scores():
        total += float(s.sum(dtype=torch.float64))
        count += s.numel()
    if count == 0:
        return [0.0 for _ in owl_ms]
    mean = total / count
    above = [0] * len(owl_ms)
    for s in scores():
        for k, m in enumerate(owl_ms):
            above[k] += int((s > m * mean).sum())
    return [a / count for a in above]


def outlier_ratio(scores: Iterable[torch.Tensor], owl_m: float) -> float:
    """`outlier_ratios` for one M over a list of score tensors."""
    scores = list(scores)
    return outlier_ratios(lambda: scores, [owl_m])[0]


def uniform_plans(sparsity: float, nm: tuple[int, int] | None, num_blocks: int) -> list[BlockPlan]:
    """Every block gets the target sparsity (or the fixed N:M pattern)."""
    return [BlockPlan(sparsity, nm) for _ in range(num_blocks)]


def owl_plans(
    ratios: Sequence[float], sparsity: float, owl_lambda: float, nm: tuple[int, int] | None = None
) -> tuple[list[BlockPlan], bool]:
    """OWL plans from outlier ratios: `owl_allocation` (unstructured) or `mixed_nm_allocation` (N:M).

    Returns `(plans, clamped)` (`clamped`: the unstructured bounds changed the formula's values)."""
    if nm is not None:
        kept = mixed_nm_allocation(ratios, nm[0], nm[1], owl_lambda)
        return [BlockPlan(1.0 - k / nm[1], (k, nm[1])) for k in kept], False
    sparsities, clamped = owl_allocation(ratios, sparsity, owl_lambda)
    return [BlockPlan(s) for s in sparsities], clamped


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
