"""The allocation-family registry: what each `layerwise=` family needs and does, declared once.

Everything that used to test the family name as a string (config validation, the passes, the searches, the refit,
the report) asks the registry instead, so a new family is one new file defining a `Family` plus one registration in
`optimum_owl/algorithms/families/__init__.py` (plus its tests).

A family maps one number per block (its *block metric*) and a knob to per-block `BlockPlan`s:

- `allocate(budget, metrics, knob)`: the plans for `budget` (target mean sparsity, number of blocks, their prunable
  parameter counts, the N:M pattern) from `metrics` (one per block, or `None` for `inputs="none"`) and `knob` (config
  field name -> value; it may hold other keys, e.g. `attention_shift`, which it ignores). Returns `(plans, warning)`:
  `warning` is a sentence for the report when the bounds [0, MAX_BLOCK_SPARSITY] changed the formula's values.
- `inputs`: where the block metric comes from; the passes compute it, the family never sees a model:
  `"none"` (ATP, uniform), `"weights"` (AlphaPruning: `weight_metric` of every prunable matrix, averaged per block, on
  the dense weights), `"outlier_ratios"` (OWL: the share of the block's Wanda scores above M × their mean, with M the
  knob `owl_m` when the family has one, else the config's) or `"mean_scores"` (DLP: the block's mean Wanda score).
  The last two need calibration data and the dense outlier pass.
- `knobs`: the config fields of its knob, in order (the searches vary the last one along its grid first).
- `grid(config, num_blocks)`: the values `layerwise="auto"` screens, per knob, ascending, the configured value
  included; `None`: not searchable (uniform is every search's baseline anyway).
- `metric`: the name of the block metric in reports (`BlockReport.metric`); a family with
  `inputs="outlier_ratios"` reports them as `BlockReport.outlier_ratio` instead and leaves it `None`.
- `nm`: it can give each block its own N of an N:M pattern (`nm_mixed=True`).
- `check_configured`: the searches always check its configured knob exactly (with a criterion that updates weights,
  whose cheap screening proxy can misjudge it; with `auto` also when that setting screened better than uniform).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..allocation import BlockPlan

INPUTS = ("none", "weights", "outlier_ratios", "mean_scores")
# The baseline: every block gets the target. Searches compare every candidate with it; an N:M pattern without
# `nm_mixed` falls back to it.
UNIFORM = "uniform"
# The searches: `layerwise` values that choose a family by the loss on held-out text, and the families each one
# searches besides uniform (`None`: the config's `auto_families`, each family's knobs one at a time).
SEARCHES: dict[str, tuple[str, ...] | None] = {"owl-auto": ("owl",), "auto": None}


@dataclass(frozen=True)
class Budget:
    """What a family allocates: `sparsity`, the target mean over `num_blocks` blocks; `weights`, their prunable
    parameter counts (`None` when all equal: the plain mean); `nm`, the run's N:M pattern (`None`: unstructured)."""

    sparsity: float
    num_blocks: int
    weights: list[float] | None = None
    nm: tuple[int, int] | None = None


Metrics = Sequence[float] | None  # one block metric per block (None: the family has none)
Knob = Mapping[str, float]  # config field -> value
Allocation = tuple[list[BlockPlan], str | None]  # the plans and a clamping warning (None: none)
Allocate = Callable[[Budget, Metrics, Knob], Allocation]


@dataclass(frozen=True)
class Family:
    name: str
    allocate: Allocate
    knobs: tuple[str, ...] = ()
    inputs: str = "none"
    grid: Callable[[Any, int], dict[str, list[float]]] | None = None
    metric: str | None = None
    weight_metric: Callable[[torch.Tensor], float] | None = None
    nm: bool = False
    check_configured: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.inputs not in INPUTS:
            raise ValueError(f"Family {self.name!r}: `inputs` must be one of {INPUTS}, got {self.inputs!r}.")
        if (self.inputs == "weights") != (self.weight_metric is not None):
            raise ValueError(f"Family {self.name!r}: `weight_metric` is needed exactly when inputs='weights'.")

    @property
    def needs_data(self) -> bool:
        """Whether its block metric needs calibration data (the dense outlier pass)."""
        return self.inputs in ("outlier_ratios", "mean_scores")

    def configured(self, config: Any) -> dict[str, float]:
        """Its knob as configured: `{field: getattr(config, field)}` for each of `knobs`."""
        return {k: getattr(config, k) for k in self.knobs}


def clamp_warning(name: str, sparsity: float, value: float) -> str:
    """The report's sentence when a one-knob family's values left [0, 1) and were clamped."""
    return (
        f"{name} allocation S={sparsity} with knob {value} left [0, 1): block sparsities were clamped and the rest "
        "shifted so the mean stays at the target. A smaller knob avoids this."
    )


def with_configured(values: Sequence[float], configured: float) -> list[float]:
    """A knob's grid: `values` and the configured value, ascending, without repeats."""
    return sorted(set(values) | {float(configured)})


_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make `family` available as `OWLPrunerConfig(layerwise=family.name)` (and, with a `grid`, in `auto_families`);
    returns it. Names are unique and never those of the searches."""
    key = family.name.strip().lower()
    if key in SEARCHES:
        raise ValueError(f"{key!r} is a search, not an allocation family name.")
    if key in _REGISTRY and _REGISTRY[key] is not family:
        raise ValueError(f"An allocation family named {key!r} is already registered.")
    _REGISTRY[key] = family
    return family


def get_family(name: str) -> Family:
    """The registered family called `name` (case-insensitive); `KeyError` naming the known ones otherwise."""
    try:
        return _REGISTRY[str(name).strip().lower()]
    except KeyError:
        raise KeyError(f"Unknown allocation family {name!r}; registered: {', '.join(family_names())}.") from None


def family_names() -> tuple[str, ...]:
    """Names of the registered families, in registration order."""
    return tuple(_REGISTRY)


def searchable_names() -> tuple[str, ...]:
    """The families `layerwise="auto"` can search besides uniform (those with a `grid`), in registration order."""
    return tuple(name for name, family in _REGISTRY.items() if family.grid is not None)


def layerwise_names() -> tuple[str, ...]:
    """Every valid `layerwise`: the registered families, then the searches."""
    return family_names() + tuple(SEARCHES)
