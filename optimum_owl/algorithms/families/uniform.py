"""`layerwise="uniform"`: every block gets the target (or the fixed N:M pattern). No knob, no block metric, no data."""

from __future__ import annotations

from ..allocation import uniform_plans
from .registry import UNIFORM, Allocation, Budget, Family, Knob, Metrics


def allocate(budget: Budget, metrics: Metrics, knob: Knob) -> Allocation:
    return uniform_plans(budget.sparsity, budget.nm, budget.num_blocks), None


UNIFORM_FAMILY = Family(UNIFORM, allocate, nm=True, description="every block gets the target sparsity")
