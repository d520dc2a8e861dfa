"""`SearchState`: what a search (`layerwise="owl-auto"`, `"auto"`) knows beside the run's `RunState`.

The engine makes one for a search run (`SearchState.open`) and gives it the windows it drew for scoring; `holdout`
decides which windows score the candidates, `search` appends the candidates tried, and the engine's report reads
both. Nothing of it is written into `RunState`, which keeps what any run knows (calibration windows, statistics,
timings, warnings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ...algorithms.families import SEARCHES
from ..report import Candidate


@dataclass
class SearchState:
    layerwise: str  # "owl-auto" or "auto"
    families: tuple[str, ...]  # the families searched besides uniform (visited in registration order)
    wide: bool  # `auto`: every family of `auto_families`, each one's knobs one at a time, attention shifts
    ids: torch.Tensor | None = None  # the windows the candidates are scored on
    separate: bool = False  # `ids` were drawn beyond the calibration windows (none held out of them)
    source: str | None = None  # `auto_holdout_dataset`, described, when `ids` came from it
    candidates: list[Candidate] = field(default_factory=list)  # every candidate tried, screened then exact

    @classmethod
    def open(cls, layerwise: str, config: Any) -> SearchState:
        """The state of the search `layerwise` (a key of `families.SEARCHES`) configured by `config`."""
        fixed = SEARCHES[layerwise]
        families = tuple(config.auto_families) if fixed is None else fixed
        return cls(layerwise, families, wide=fixed is None)

    def where(self) -> str:
        """Where the scoring windows came from, for the report."""
        if self.source is not None:
            return f"of auto_holdout_dataset {self.source}"
        return "beyond the calibration windows" if self.separate else "held out of the calibration windows"
