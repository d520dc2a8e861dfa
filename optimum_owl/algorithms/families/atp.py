"""`layerwise="atp"` (ICML 2025): data-free; sparsity rising linearly with depth by β per block
(`allocation.atp_allocation`)."""

from __future__ import annotations

from typing import Any

from ..allocation import BlockPlan, atp_allocation
from .registry import Allocation, Budget, Family, Knob, Metrics, clamp_warning, with_configured

# `auto_atp_betas=None`: β = spread / (L − 1) for these total spreads of the block sparsities over the depth.
ATP_SPREADS = (0.08, 0.16, 0.24, 0.32)


def allocate(budget: Budget, metrics: Metrics, knob: Knob) -> Allocation:
    beta = knob["atp_beta"]
    sparsities, clamped = atp_allocation(budget.num_blocks, budget.sparsity, beta, budget.weights)
    return [BlockPlan(s) for s in sparsities], clamp_warning("atp", budget.sparsity, beta) if clamped else None


def grid(config: Any, num_blocks: int) -> dict[str, list[float]]:
    if config.auto_atp_betas is not None:
        betas = list(config.auto_atp_betas)
    else:
        betas = [round(d / max(num_blocks - 1, 1), 6) for d in ATP_SPREADS]
    return {"atp_beta": with_configured(betas, config.atp_beta)}


ATP = Family("atp", allocate, knobs=("atp_beta",), grid=grid, description="sparsity rising with depth (ATP)")
