"""Scores and keep-masks shared by the criteria. Pure tensor math, no hooks or devices.

- Wanda (Sun et al. 2023, arXiv 2306.11695): score S_ij = |W_ij| · ‖X_j‖₂; compared per output row by default.
- Magnitude: score |W_ij|; one threshold per matrix.
"""

from __future__ import annotations

import torch

from ..masks import keep_mask_nm, keep_mask_per_layer, keep_mask_per_row


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W| · ‖X_j‖₂ broadcast over rows, in fp32. `weight` is `[out, in]`, `input_norms` is `[in]`.

    The product is taken in place on the fresh |W| buffer: one matrix-sized temporary instead of two.
    """
    scores = weight.detach().abs().to(torch.float32)
    return scores.mul_(input_norms.to(weight.device, torch.float32).reshape(1, -1))


# Score elements per band of rows in `wanda_prune_`: 2^18 fp32 scores (1 MiB) plus the selection's buffers (a value
# copy and int64 indices, 3 MiB more) instead of buffers four times the size of the whole matrix.
WANDA_BAND_ELEMENTS = 1 << 18


def wanda_prune_(
    weight: torch.Tensor,
    input_norms: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    band_elements: int = WANDA_BAND_ELEMENTS,
) -> torch.Tensor:
    """Prune `weight` (`[out, in]`, a view is fine) in place with Wanda's per-row criterion, one band of rows at a time.

    Wanda compares the scores of one output row with each other (per row: the `floor(in * sparsity)` lowest; N:M:
    within groups of one row), so every row's mask depends on that row alone. Scoring and selecting a band of rows
    at a time therefore gives exactly the mask of `keep_mask(wanda_scores(weight, input_norms), sparsity, nm)` while
    the score, selection and mask buffers cover `band_elements` weights instead of the whole matrix. Returns `weight`.
    """
    rows, cols = weight.shape
    norms = input_norms.to(weight.device, torch.float32).reshape(1, -1)
    step = max(1, band_elements // max(cols, 1))
    for r0 in range(0, rows, step):
        band = weight[r0 : r0 + step]
        keep = keep_mask(wanda_scores(band, norms), sparsity, nm, "row")
        band.masked_fill_(keep.logical_not_(), 0)
    return weight


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().to(torch.float32)


def keep_mask(
    scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None, group: str = "row"
) -> torch.Tensor:
    """Keep-mask from scores: N:M when `nm` is given, else per row (`group="row"`) or per matrix (`"layer"`)."""
    if nm is not None:
        return keep_mask_nm(scores, *nm)
    return keep_mask_per_row(scores, sparsity) if group == "row" else keep_mask_per_layer(scores, sparsity)
