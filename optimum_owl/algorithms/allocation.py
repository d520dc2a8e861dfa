"""Allocation: how much sparsity each block gets. Pure functions of numbers and score tensors (no model, no I/O).

Every allocation family's math lives here as a small pure function; each family's registration
(`optimum_owl.algorithms.families`, one file per family) wraps it into `BlockPlan`s and declares what it needs, which
the passes (optimum_owl.pruning.passes) feed it.

- `uniform_plans`: every block gets the target.
- OWL (Yin et al. 2023). Outlier ratio of a block (Layerwise Outlier Distribution, as a fraction): the share of all
  the block's Wanda scores |W_ij|·‖X_j‖₂ (every prunable matrix together) that exceed M times their mean
  (`outlier_ratios`). With r̃_i = (D_i − min D)/(max D − min D), block i gets s_i = S + 2λ·(mean r̃ − r̃_i)
  (`owl_allocation`): the mean is S and the spread max − min is 2λ; equal ratios give the uniform allocation (the
  reference divides by zero there). `mixed_nm_allocation` is the per-block N:M variant.
- The families that followed OWL map one number per block to a sparsity with the same contract: the mean
  sparsity, weighted by the blocks' prunable parameter counts, is exactly the target, and values outside
  [0, MAX_BLOCK_SPARSITY] are clamped with one common shift that keeps that mean (`clamp_preserving_mean`), as for
  OWL.
- DLP (Dynamic Layerwise Pruning, arXiv 2505.23807; `dlp_allocation`): from each block's mean Wanda score m_i
  (|W|·‖X‖₂ over all its weights), importance I_i = 1 − m_i/Σm; with Ĩ its min-max normalisation,
  s_i = S − 2α(Ĩ_i − mean Ĩ). Since I is a decreasing affine function of m, blocks with larger mean scores are
  pruned *more*; the spread is 2α.
- AlphaPruning (NeurIPS 2024; `alphapruning_allocation`): data-free. Per weight matrix the heavy-tail exponent α of
  the eigenvalue spectrum of WᵀW (`esd_alpha`, a Hill estimate), averaged per block; with α̃ min-max normalised,
  the raw ratio 1 − ε + 2ε·α̃ is scaled by one factor so the mean hits S: s_i = S·r_i / mean(r). Well-trained
  blocks (heavy tails, small α) keep more weights.
- ATP (ICML 2025; `atp_allocation`): sparsity rising linearly with depth, s_l = S − β(L−1)/2 + lβ for l = 0 … L−1.

Below the block, `projection_split` moves sparsity between a block's attention projections and its other (MLP)
matrices while their parameter-weighted mean stays the block's sparsity (`BlockPlan.split`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Largest sparsity a block may be given; 1.0 would delete every weight of the block.
MAX_BLOCK_SPARSITY = 0.999


@dataclass
class BlockPlan:
    """What block i is pruned to: a sparsity (unstructured) or a kept count n of every m (N:M).

    `split`, when set, is `(attention, mlp)`: the sparsities of the block's attention projections and of its other
    matrices (`projection_split`; their parameter-weighted mean is `sparsity`)."""

    sparsity: float
    nm: tuple[int, int] | None = None
    split: tuple[float, float] | None = None

    def sparsity_for(self, group: str) -> float:
        """The sparsity of a matrix of `group` ("attention" or "mlp", `modeling.projection_group`) in this block."""
        if self.split is None:
            return self.sparsity
        return self.split[0] if group == "attention" else self.split[1]


def projection_split(
    sparsity: float, attention_shift: float, attention_params: int, mlp_params: int
) -> tuple[float, float]:
    """`(s_a, s_m)`: a block's sparsity S split between its attention projections (P_a weights) and its other
    matrices (P_m weights) so that (P_a·s_a + P_m·s_m) / (P_a + P_m) = S exactly.

    The attention projections get s_a = S + d (d = `attention_shift`), the rest s_m = S − d·P_a/P_m. When that
    leaves [0, max(MAX_BLOCK_SPARSITY, S)], s_a is clipped to the range that keeps both inside (the shift is
    shortened, never reversed). A block without one of the two groups, or d = 0, keeps S for everything.

    Example (a SmolLM2-135M block: q, o 576×576, k, v 192×576, so P_a = 884,736; gate, up, down 576×1536, so
    P_m = 2,654,208 and P_a/P_m = 1/3):

    ```python
    >>> projection_split(0.7, 0.06, 884_736, 2_654_208)   # 0.7 − 0.06/3
    (0.76, 0.68)
    ```
    """
    if attention_params <= 0 or mlp_params <= 0 or attention_shift == 0:
        return sparsity, sparsity
    pa, pm = float(attention_params), float(mlp_params)
    hi = max(MAX_BLOCK_SPARSITY, sparsity)
    budget = (pa + pm) * sparsity  # zeros the block must have
    lo_a, hi_a = max(0.0, (budget - pm * hi) / pa), min(hi, budget / pa)  # s_m ≤ hi and s_m ≥ 0
    s_a = min(max(sparsity + attention_shift, lo_a), hi_a)
    s_m = (budget - pa * s_a) / pm
    return round(s_a, 12), round(min(max(s_m, 0.0), hi), 12)


def score_summary(scores: Callable[[], Iterable[torch.Tensor]], owl_ms: Sequence[float]) -> tuple[float, list[float]]:
    """The mean of all values yielded by `scores()` (taken together), and for each M in `owl_ms` the fraction of
    them above M × that mean.

    `scores` is called twice (once for the mean, once for the counts; once when `owl_ms` is empty) so that a caller
    can compute one matrix's scores at a time instead of holding a block-sized buffer.
    """
    total, count = 0.0, 0
    for s in scores():
        total += float(s.sum(dtype=torch.float64))
        count += s.numel()
    if count == 0:
        return 0.0, [0.0 for _ in owl_ms]
    mean = total / count
    above = [0] * len(owl_ms)
    if owl_ms:
        for s in scores():
            for k, m in enumerate(owl_ms):
                above[k] += int((s > m * mean).sum())
    return mean, [a / count for a in above]


def outlier_ratios(scores: Callable[[], Iterable[torch.Tensor]], owl_ms: Sequence[float]) -> list[float]:
    """For each M in `owl_ms`: the fraction of all values yielded by `scores()` (taken together) above M × their mean
    (`score_summary`)."""
    return score_summary(scores, owl_ms)[1]


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


def weighted_mean(values: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """Mean of `values`, weighted by `weights` (e.g. parameter counts); plain mean when `weights` is None."""
    if weights is None:
        return sum(values) / len(values)
    if len(weights) != len(values):
        raise ValueError(f"{len(weights)} weights for {len(values)} values")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must have a positive sum")
    return sum(float(v) * float(w) for v, w in zip(values, weights)) / total


def clamp_preserving_mean(
    values: Sequence[float], lo: float, hi: float, weights: Sequence[float] | None = None
) -> tuple[list[float], bool]:
    """Shift every value by one constant c and clip into [lo, hi], with c chosen so the (weighted) mean is unchanged.

    Values left inside the bounds keep their differences; the mean of `clip(v + c)` grows monotonically with c,
    so c is found by bisection. Needs lo ≤ mean ≤ hi. `weights` (e.g. parameter counts) weight the mean. Returns
    `(values, changed)`.
    """
    vals = [float(v) for v in values]
    if all(lo <= v <= hi for v in vals):
        return vals, False
    target = weighted_mean(vals, weights)
    if not lo - 1e-12 <= target <= hi + 1e-12:
        raise ValueError(f"mean {target} is outside [{lo}, {hi}]; it cannot be preserved")
    if target <= lo or target >= hi:  # only one way to have that mean
        return [min(max(target, lo), hi)] * len(vals), True

    def mean_at(c: float) -> float:
        return weighted_mean([min(max(v + c, lo), hi) for v in vals], weights)

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


# ------------------------------------------------------------------------------------------------ the later families
def _bounded(values: list[float], sparsity: float, weights: Sequence[float] | None) -> tuple[list[float], bool]:
    """Round away float noise, then clamp into [0, MAX_BLOCK_SPARSITY] keeping the (weighted) mean."""
    values = [round(v, 12) for v in values]
    bounded, clamped = clamp_preserving_mean(values, 0.0, max(MAX_BLOCK_SPARSITY, sparsity), weights)
    return [round(v, 12) for v in bounded], clamped


def _centre(values: list[float], sparsity: float, weights: Sequence[float] | None) -> list[float]:
    """Shift `values` by one constant so their (weighted) mean is `sparsity`."""
    shift = sparsity - weighted_mean(values, weights)
    return [v + shift for v in values]


def dlp_allocation(
    mean_scores: Sequence[float], sparsity: float, alpha: float, weights: Sequence[float] | None = None
) -> tuple[list[float], bool]:
    """DLP: per-block sparsity from each block's mean Wanda score m_i (see the module docstring).

    Importance I_i = 1 − m_i/Σm, min-max normalised to Ĩ ∈ [0, 1]; s_i = S − 2α·Ĩ_i, shifted so the mean (weighted
    by `weights`, e.g. parameter counts) is S, then clamped like OWL. Equal scores give the uniform allocation.
    Returns `(sparsities, clamped)`.

    Example:

    ```python
    >>> dlp_allocation([1.0, 2.0, 3.0], sparsity=0.7, alpha=0.15)[0]   # I = 5/6, 4/6, 3/6 -> Ĩ = 1, 0.5, 0
    [0.55, 0.7, 0.85]
    ```
    """
    if not mean_scores:
        return [], False
    total = float(sum(mean_scores))
    if total <= 0 or not math.isfinite(total):
        importance = [0.0 for _ in mean_scores]
    else:
        importance = normalise([1.0 - float(m) / total for m in mean_scores])
    raw = [sparsity - 2.0 * alpha * i for i in importance]
    return _bounded(_centre(raw, sparsity, weights), sparsity, weights)


def alphapruning_allocation(
    block_alphas: Sequence[float], sparsity: float, epsilon: float, weights: Sequence[float] | None = None
) -> tuple[list[float], bool]:
    """AlphaPruning: per-block sparsity from each block's mean heavy-tail exponent α (see `esd_alpha`).

    r_i = 1 − ε + 2ε·α̃_i with α̃ the min-max normalised α; s_i = S·r_i / mean(r) (mean weighted by `weights`), so
    the mean is S and blocks with lighter tails (larger α) are pruned more; clamped like OWL.
    Returns `(sparsities, clamped)`.

    Example:

    ```python
    >>> alphapruning_allocation([2.0, 3.0, 4.0], sparsity=0.6, epsilon=0.2)[0]   # r = 0.8, 1.0, 1.2
    [0.48, 0.6, 0.72]
    ```
    """
    if not block_alphas:
        return [], False
    ratios = [1.0 - epsilon + 2.0 * epsilon * a for a in normalise([float(a) for a in block_alphas])]
    scale = sparsity / weighted_mean(ratios, weights)
    return _bounded([r * scale for r in ratios], sparsity, weights)


def atp_allocation(
    num_blocks: int, sparsity: float, beta: float, weights: Sequence[float] | None = None
) -> tuple[list[float], bool]:
    """ATP: sparsity rising linearly with depth, s_l = S − β(L−1)/2 + lβ (shifted so the weighted mean is S when
    `weights` differ), clamped like OWL. Returns `(sparsities, clamped)`.

    Example:

    ```python
    >>> atp_allocation(4, sparsity=0.7, beta=0.02)[0]
    [0.67, 0.69, 0.71, 0.73]
    ```
    """
    if num_blocks <= 0:
        return [], False
    raw = [sparsity - beta * (num_blocks - 1) / 2.0 + index * beta for index in range(num_blocks)]
    return _bounded(_centre(raw, sparsity, weights), sparsity, weights)


def esd_alpha(weight: torch.Tensor, low: float = 0.95, high: float = 1.5, bins: int = 100) -> float:
    """Heavy-tail exponent α of the empirical spectral density of WᵀW (AlphaPruning's per-matrix metric).

    The eigenvalues λ are the squared singular values of `weight` (taken from the smaller Gram matrix, in float64:
    about 1.7× faster than an SVD and equal to 1e-14 relative). For a lower cutoff λ_min, the Hill (maximum
    likelihood) estimate of a power law p(λ) ∝ λ^(−α) over the n eigenvalues ≥ λ_min is
    α = 1 + n / Σ ln(λ_j / λ_min). The cutoff is chosen among the eigenvalues within [low, high] × the peak of the
    spectrum's histogram (over log λ, `bins` bins), as the one whose fitted power law has the smallest
    Kolmogorov-Smirnov distance to the tail; when none lies there, every eigenvalue but the largest is tried.
    Returns 0.0 for a matrix with fewer than three non-zero singular values (no tail to fit).
    """
    w = weight.detach().to(torch.float64)
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T  # the smaller Gram matrix has the same non-zero spectrum
    eigs = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    eigs = torch.sort(eigs[eigs > 1e-12 * float(eigs.max().clamp_min(1e-300))]).values
    n_all = int(eigs.numel())
    if n_all < 3:
        return 0.0
    logs = torch.log(eigs)
    counts = torch.histc(logs, bins=bins, min=float(logs[0]), max=float(logs[-1]))
    edges = torch.linspace(float(logs[0]), float(logs[-1]), bins + 1, dtype=torch.float64)
    peak = math.exp(float(edges[int(torch.argmax(counts))]))
    candidates = [i for i in range(n_all - 1) if low * peak <= float(eigs[i]) <= high * peak] or list(range(n_all - 1))
    suffix = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])  # Σ_{j ≥ i} ln λ_j
    best_alpha, best_d = 0.0, math.inf
    for i in candidates:
        n = n_all - i
        denominator = float(suffix[i]) - n * float(logs[i])
        if denominator <= 0:
            continue
        alpha = 1.0 + n / denominator
        tail = eigs[i:] / eigs[i]
        fitted = 1.0 - tail.pow(1.0 - alpha)  # power-law CDF at each tail eigenvalue
        empirical = torch.arange(n, dtype=torch.float64) / n
        d = float((fitted - empirical).abs().max())
        if d < best_d:
            best_alpha, best_d = alpha, d
    return best_alpha
