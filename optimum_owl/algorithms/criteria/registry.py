"""The criterion registry: what each pruning criterion needs and does, declared once.

Everything that used to test the method name as a string (config validation, the passes, the owl-auto search,
resume files) asks the registry instead, so a new criterion is one new file that calls `register_criterion` (plus
its tests), imported by `optimum_owl/criteria/__init__.py`.

A criterion prunes one matrix in place from the statistics of its inputs:

- `statistics`: what the passes collect for it: `"none"` (no calibration forward), `"norms"` (per-input-feature
  Σx², Σx: `stats.RowNorms`) or `"hessian"` (Σxxᵀ: `stats.Hessian`).
- `updates_weights`: whether kept weights change (SparseGPT). Resume files then store weights, not masks, and
  `propagation="dense"` is refused (it needs every block's statistics at once).
- `prune(task)`: prune `task.weight` in place (see `PruneTask`).
- `screen(weight, norms, config)`: owl-auto's cheap proxy, `(scores, group)` from fixed input norms (no forward).
- `refine`: the training-free refinements (`OWLPrunerConfig.refine`) it supports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

STATISTICS = ("none", "norms", "hessian")


@dataclass
class PruneTask:
    """One matrix to prune: the weight (`[out, in]`, pruned in place), its input statistics, the target.

    `stats` is the unit's `RowNorms` / `Hessian` accumulator, or `None` (criteria with `statistics="none"`);
    `settings` is the run's `OWLPrunerConfig` (each criterion reads its own fields).

    With `settings.values == "int8"` a criterion may quantize the kept weights itself (SparseGPT does, in its sweep):
    it then leaves the weight on the grid and sets `scales` (float32, `[out]` or `[out, groups]`) and `errors` (the
    relative quantization errors it measured, e.g. `{"rtn": ..., "joint": ...}`). A criterion that leaves `scales`
    None gets its kept weights rounded to nearest afterwards (`pruning.passes.prune_block`).
    """

    weight: torch.Tensor
    stats: Any
    columns: int
    sparsity: float
    nm: tuple[int, int] | None
    settings: Any
    name: str = "weight"
    scales: torch.Tensor | None = None
    errors: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Criterion:
    name: str
    statistics: str
    updates_weights: bool
    prune: Callable[[PruneTask], None]
    screen: Callable[[torch.Tensor, torch.Tensor | None, Any], tuple[torch.Tensor, str]]
    refine: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if self.statistics not in STATISTICS:
            raise ValueError(f"Criterion {self.name!r}: `statistics` must be one of {STATISTICS}, got {self.statistics!r}.")

    @property
    def needs_data(self) -> bool:
        """Whether the criterion itself needs calibration data (OWL's outlier ratios always do)."""
        return self.statistics != "none"


_REGISTRY: dict[str, Criterion] = {}


def register_criterion(criterion: Criterion) -> Criterion:
    """Make `criterion` available as `OWLPrunerConfig(method=criterion.name)`; returns it. Names are unique."""
    key = criterion.name.strip().lower()
    if key in _REGISTRY and _REGISTRY[key] is not criterion:
        raise ValueError(f"A pruning criterion named {key!r} is already registered.")
    _REGISTRY[key] = criterion
    return criterion


def get_criterion(name: str) -> Criterion:
    """The registered criterion called `name` (case-insensitive); `KeyError` naming the known ones otherwise."""
    try:
        return _REGISTRY[str(name).strip().lower()]
    except KeyError:
        raise KeyError(f"Unknown pruning criterion {name!r}; registered: {', '.join(criterion_names())}.") from None


def criterion_names() -> tuple[str, ...]:
    """Names of the registered criteria, in registration order."""
    return tuple(_REGISTRY)
