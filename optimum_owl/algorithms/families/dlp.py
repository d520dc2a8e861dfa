"""`layerwise="dlp"` (Dynamic Layerwise Pruning, arXiv 2505.23807): block sparsity from the block's mean Wanda score,
spread 2α (`allocation.dlp_allocation`)."""

from __future__ import annotations

from typing import Any

from ..allocation import BlockPlan, dlp_allocation
from .registry import Allocation, Budget, Family, Knob, Metrics, clamp_warning, with_configured


def allocate(budget: Budget, means: Metrics, knob: Knob) -> Allocation:
    alpha = knob["dlp_alpha"]
    sparsities, clamped = dlp_allocation(means or [], budget.sparsity, alpha, budget.weights)
    return [BlockPlan(s) for s in sparsities], clamp_warning("dlp", budget.sparsity, alpha) if clamped else None


def grid(config: Any, num_blocks: int) -> dict[str, list[float]]:
    return {"dlp_alpha": with_configured(config.auto_dlp_alphas, config.dlp_alpha)}


DLP = Family(
    "dlp", allocate, knobs=("dlp_alpha",), inputs="mean_scores", grid=grid, metric="mean Wanda score",
    description="dynamic layerwise pruning (DLP)",
)
