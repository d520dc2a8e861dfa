"""Scores -> keep-masks, and masks applied to weights. Pure tensor math: no hooks, devices or I/O.

Convention: a *keep mask* is a bool tensor shaped like the `[out, in]` weight, `True` where the weight survives.
Ties are broken by position (a stable ascending sort prunes the earlier of two equal scores first).
"""

from __future__ import annotations

import torch

# Tolerance of the floor below: an allocation such as 0.546875 may arrive as 0.54687499999 after float arithmetic;
# the reference would floor 64 × that to 34 instead of the intended 35.
FLOOR_EPS = 1e-9


def num_to_prune(count: int, sparsity: float) -> int:
    """Weights to prune out of `count` at `sparsity`: `floor(count * sparsity)` (as the reference), robust to float noise."""
    return int(count * sparsity + FLOOR_EPS)


def _lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the `k` lowest scores of every row, ties going to the earlier column.

    A selection (`kthvalue`, linear time) finds each row's k-th value; only rows where that value is tied fall back
    to a stable sort, so the result equals a stable ascending sort's first k columns.
    """
    rows, cols = scores.shape
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = torch.kthvalue(scores, k, dim=1, keepdim=True).values
    lowest = scores <= kth
    tied = (lowest.sum(dim=1) != k).nonzero().flatten()
    if tied.numel():
        sub = scores[tied]
        idx = torch.sort(sub, dim=1, stable=True).indices[:, :k]
        lowest[tied] = torch.zeros_like(sub, dtype=torch.bool).scatter_(1, idx, True)
    return lowest


def keep_mask_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the `floor(in * sparsity)` lowest scores of every row (Wanda's comparison group)."""
    return ~_lowest_k(scores, num_to_prune(scores.shape[1], sparsity))


def keep_mask_per_layer(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the `floor(numel * sparsity)` lowest scores of the whole matrix (magnitude; Wanda `group="layer"`)."""
    flat = scores.reshape(1, -1)
    return ~_lowest_k(flat, num_to_prune(flat.shape[1], sparsity)).view_as(scores)


def keep_mask_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest scores in every group of `m` consecutive inputs of each row (N:M, n non-zeros per m)."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, but the weight has {cols} inputs; add the module to `ignore`.")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.ones_like(groups, dtype=torch.bool)
    if n < m:
        idx = torch.sort(groups, dim=-1, stable=True).indices[..., : m - n]
        keep.scatter_(-1, idx, False)
    return keep.view(rows, cols)


def apply_keep_mask_(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero `weight` where `keep` is False, in place; returns `weight`."""
    weight.masked_fill_(~keep.to(weight.device), 0)
    return weight


def is_valid_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of `m` consecutive inputs of every row holds at most `n` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())
