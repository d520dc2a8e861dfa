"""Allocation families (`layerwise=`): a registry (`registry.py`) and one file per family (uniform, owl, dlp,
alphapruning, atp); their math is in `optimum_owl.algorithms.allocation`.

```python
>>> from optimum_owl.algorithms.families import family_names, get_family, searchable_names
>>> family_names()
('owl', 'uniform', 'dlp', 'alphapruning', 'atp')
>>> searchable_names()
('owl', 'dlp', 'alphapruning', 'atp')
>>> get_family("dlp").knobs, get_family("dlp").inputs, get_family("atp").needs_data
(('dlp_alpha',), 'mean_scores', False)
```
"""

from __future__ import annotations

from .alphapruning import ALPHAPRUNING
from .atp import ATP
from .dlp import DLP
from .owl import OWL
from .registry import (
    SEARCHES,
    UNIFORM,
    Budget,
    Family,
    family_names,
    get_family,
    layerwise_names,
    register_family,
    searchable_names,
)
from .uniform import UNIFORM_FAMILY

# The built-in families, in the order the docs, the CLI and the searches list them. A new family: one file defining
# a `Family`, one entry here.
for _family in (OWL, UNIFORM_FAMILY, DLP, ALPHAPRUNING, ATP):
    register_family(_family)

__all__ = [
    "SEARCHES",
    "UNIFORM",
    "Budget",
    "Family",
    "family_names",
    "get_family",
    "layerwise_names",
    "register_family",
    "searchable_names",
]
