"""`layerwise="alphapruning"` (NeurIPS 2024): data-free; block sparsity from the mean heavy-tail exponent α of its
matrices' eigenvalue spectra, target × (1 ± ε) (`allocation.alphapruning_allocation`, `allocation.esd_alpha`)."""

from __future__ import annotations

from typing import Any

from ..allocation import BlockPlan, alphapruning_allocation, esd_alpha
from .registry import Allocation, Budget, Family, Knob, Metrics, clamp_warning, with_configured


def allocate(budget: Budget, alphas: Metrics, knob: Knob) -> Allocation:
    epsilon = knob["alphapruning_epsilon"]
    sparsities, clamped = alphapruning_allocation(alphas or [], budget.sparsity, epsilon, budget.weights)
    return [BlockPlan(s) for s in sparsities], clamp_warning("alphapruning", budget.sparsity, epsilon) if clamped else None


def grid(config: Any, num_blocks: int) -> dict[str, list[float]]:
    return {"alphapruning_epsilon": with_configured(config.auto_alphapruning_epsilons, config.alphapruning_epsilon)}


ALPHAPRUNING = Family(
    "alphapruning", allocate, knobs=("alphapruning_epsilon",), inputs="weights", grid=grid, metric="ESD α",
    weight_metric=esd_alpha, description="heavy-tailed self-regularisation allocation (AlphaPruning)",
)
