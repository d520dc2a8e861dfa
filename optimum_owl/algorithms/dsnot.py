"""Training-free mask refinement after pruning, in the spirit of DSnoT (Zhang et al. 2023, "Dynamic Sparse No
Training", [arXiv 2310.08915](https://arxiv.org/abs/2310.08915)). Pure tensor math on one weight matrix.

For output row i of a weight W (dense values) with pruned set P_i, the output error on an input x is
e_i = Σ_{j∈P_i} W_ij x_j. With the per-feature mean μ_j = E[x_j] and variance σ_j² of the calibration inputs, and
treating features as uncorrelated, its expected square is

    f_i(P_i) = r_i² + Σ_{j∈P_i} W_ij² σ_j²,    r_i = Σ_{j∈P_i} W_ij μ_j   (the expected error, DSnoT's "reconstruction error").

Wanda minimises Σ_{j∈P_i} W_ij² E[x_j²], which treats the mean terms W_ij μ_j as if they never cancelled or added up;
the refinement corrects that with one-for-one swaps per row: revive the pruned weight g whose revival lowers f_i
most (Δ = a_g² − 2 r_i a_g − W_ig² σ_g², with a_j = W_ij μ_j), then prune the kept weight p that raises it least
given the new error r' = r_i − a_g (Δ = a_p² + 2 r' a_p + W_ip² σ_p²; inside g's group of M for N:M). The swap is
kept only if the pair lowers f_i by more than `threshold` × f_i, so f_i never increases; a row stops at its first
rejected swap or after `cycles` swaps. Every row keeps exactly its number of pruned weights (and every N:M group its
count), and revived weights get their dense values, so no weight value is changed.

Differences from the DSnoT reference: DSnoT grows by |a_j| with the sign of r (scaled by the variance) and prunes by
the smallest Wanda score under a sign condition on r, stopping when |r_i| falls below an absolute threshold; here
both choices and the stopping rule come from the single objective f_i above, which makes the refinement monotone.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


@torch.no_grad()
def dsnot_keep_mask(
    weight: torch.Tensor,
    keep: torch.Tensor,
    mean: torch.Tensor,
    mean_sq: torch.Tensor,
    nm: tuple[int, int] | None = None,
    cycles: int = 50,
    threshold: float = 1e-3,
) -> torch.Tensor:
    """Refine a keep-mask of a dense weight by per-row swaps that lower the expected squared output error.

    Args:
        weight (`torch.Tensor`): the **dense** `[out, in]` weight (not yet masked).
        keep (`torch.Tensor`): bool keep-mask of the same shape (True = kept); not modified.
        mean (`torch.Tensor`): `[in]` mean of each input feature over the calibration tokens.
        mean_sq (`torch.Tensor`): `[in]` mean of the squares of each input feature.
        nm (`tuple[int, int]`, *optional*): `(n, m)` N:M pattern; swaps then stay inside one group of m inputs.
        cycles (`int`): most swaps per row.
        threshold (`float`): a swap must lower the row's expected squared error by more than this fraction of it.

    Returns:
        `torch.Tensor`: the refined bool keep-mask; every row (and N:M group) keeps as many weights as before.

    Example:

    ```python
    >>> import torch
    >>> from optimum_owl.algorithms.dsnot import dsnot_keep_mask
    >>> w = torch.tensor([[1.0, -1.0, 0.5, 0.6]])
    >>> keep = torch.tensor([[True, True, False, False]])
    >>> mean, mean_sq = torch.tensor([0.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    >>> dsnot_keep_mask(w, keep, mean, mean_sq).sum().item()   # the row still keeps 2 weights
    2
    ```
    """
    if weight.shape != keep.shape:
        raise ValueError(f"`keep` shape {list(keep.shape)} differs from the weight's {list(weight.shape)}.")
    rows, cols = weight.shape
    if mean.numel() != cols or mean_sq.numel() != cols:
        raise ValueError(f"`mean`/`mean_sq` need {cols} values (the weight's input features).")
    device = weight.device
    W = weight.detach().to(torch.float32)
    mu = mean.to(device, torch.float32).reshape(1, -1)
    var = (mean_sq.to(device, torch.float32).reshape(1, -1) - mu.pow(2)).clamp_min(0.0)
    a = W * mu  # each weight's contribution to the expected error
    b = W.pow(2) * var  # its contribution to the error variance
    keep = keep.to(device=device, dtype=torch.bool).clone()
    pruned = ~keep
    r = (a * pruned).sum(1)
    f = r.pow(2) + (b * pruned).sum(1)
    active = pruned.any(1) & keep.any(1)
    group = torch.arange(cols, device=device) // nm[1] if nm is not None else None
    inf = torch.tensor(float("inf"), device=device)
    swaps = 0
    for _ in range(cycles):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        A, B, K, R = a[idx], b[idx], keep[idx], r[idx]
        grow = torch.where(K, inf, A.pow(2) - 2.0 * R.unsqueeze(1) * A - B)
        grow_delta, g = grow.min(1)
        r_after = R - A.gather(1, g.unsqueeze(1)).squeeze(1)
        allowed = K if group is None else K & (group.unsqueeze(0) == group[g].unsqueeze(1))
        prune = torch.where(allowed, A.pow(2) + 2.0 * r_after.unsqueeze(1) * A + B, inf)
        prune_delta, p = prune.min(1)
        delta = grow_delta + prune_delta
        accept = torch.isfinite(delta) & (delta < -threshold * f[idx]) & (delta < 0)
        done = idx[~accept]
        active[done] = False
        if not bool(accept.any()):
            break
        rows_ok, g_ok, p_ok = idx[accept], g[accept], p[accept]
        keep[rows_ok, g_ok] = True
        keep[rows_ok, p_ok] = False
        r[rows_ok] = r_after[accept] + A[accept].gather(1, p_ok.unsqueeze(1)).squeeze(1)
        f[rows_ok] = f[rows_ok] + delta[accept]
        swaps += int(accept.sum())
    logger.debug("DSnoT refinement: %d swaps over %d rows", swaps, rows)
    return keep


def expected_row_error(
    weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, mean_sq: torch.Tensor
) -> torch.Tensor:
    """`[out]` expected squared output error f_i of each row (the objective `dsnot_keep_mask` lowers)."""
    W = weight.detach().to(torch.float32)
    mu = mean.to(W.device, torch.float32).reshape(1, -1)
    var = (mean_sq.to(W.device, torch.float32).reshape(1, -1) - mu.pow(2)).clamp_min(0.0)
    pruned = ~keep.to(W.device, torch.bool)
    return (W * mu * pruned).sum(1).pow(2) + (W.pow(2) * var * pruned).sum(1)
