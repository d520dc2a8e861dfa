"""Pruning criteria: a registry (`registry.py`) and one file per criterion (wanda, sparsegpt, magnitude).

```python
>>> from optimum_owl.algorithms.criteria import criterion_names, get_criterion
>>> criterion_names()
('wanda', 'sparsegpt', 'magnitude')
>>> get_criterion("sparsegpt").statistics, get_criterion("sparsegpt").updates_weights
('hessian', True)
```
"""

from __future__ import annotations

from ...errors import SparseGPTError
from .magnitude import MAGNITUDE
from .registry import Criterion, PruneTask, criterion_names, get_criterion, register_criterion
from .scores import WANDA_BAND_ELEMENTS, keep_mask, magnitude_scores, wanda_prune_, wanda_scores
from .sparsegpt import SPARSEGPT
from .sparsegpt_math import sparsegpt_prune
from .wanda import WANDA

# The built-in criteria, in the order the docs and error messages list them. A new criterion: one file defining a
# `Criterion`, one line here.
for _criterion in (WANDA, SPARSEGPT, MAGNITUDE):
    register_criterion(_criterion)

__all__ = [
    "WANDA_BAND_ELEMENTS",
    "Criterion",
    "PruneTask",
    "SparseGPTError",
    "criterion_names",
    "get_criterion",
    "keep_mask",
    "magnitude_scores",
    "register_criterion",
    "sparsegpt_prune",
    "wanda_prune_",
    "wanda_scores",
]
