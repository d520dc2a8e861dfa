"""`layerwise="owl"` (Yin et al. 2023): block sparsity from the block's outlier ratio at M, spread 2λ
(`allocation.owl_allocation`; with `nm_mixed`, a per-block N of the N:M pattern: `allocation.mixed_nm_allocation`).

Its two knobs are searched by `owl-auto` on the full grid (every M along λ) and by `auto` by coordinates (λ along the
configured M, then the other Ms at the best λ)."""

from __future__ import annotations

from typing import Any

from ..allocation import owl_plans
from .registry import Allocation, Budget, Family, Knob, Metrics, with_configured


def allocate(budget: Budget, ratios: Metrics, knob: Knob) -> Allocation:
    lam = knob["owl_lambda"]
    plans, clamped = owl_plans(ratios or [], budget.sparsity, lam, budget.nm)
    warning = None
    if clamped:
        warning = (
            f"OWL allocation S={budget.sparsity}, λ={lam} left [0, 1): block sparsities were clamped and the rest "
            "shifted so the mean stays at the target. A smaller `owl_lambda` avoids this."
        )
    return plans, warning


def grid(config: Any, num_blocks: int) -> dict[str, list[float]]:
    return {
        "owl_m": with_configured(config.auto_owl_ms, config.owl_m),
        "owl_lambda": with_configured(config.auto_owl_lambdas, config.owl_lambda),
    }


OWL = Family(
    "owl", allocate, knobs=("owl_m", "owl_lambda"), inputs="outlier_ratios", grid=grid, nm=True,
    check_configured=True, description="outlier-weighed layerwise sparsity (OWL)",
)
