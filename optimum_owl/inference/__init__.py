"""Sparse inference on CPU: keep only the compact (bitmask + packed values) form of pruned weights in memory and
decode through a C++ AVX2 kernel (pure-PyTorch fallback everywhere else). See docs/inference.md.

```python
>>> import optimum_owl
>>> model = optimum_owl.sparsify(pruned_model)   # doctest: +SKIP
>>> model.generate(**inputs)                     # doctest: +SKIP
>>> optimum_owl.densify(model)                   # doctest: +SKIP
```
"""

from __future__ import annotations

from .kernel import kernel_status
from .module import SparseLinear, densify, sparsify

__all__ = ["SparseLinear", "densify", "kernel_status", "sparsify"]
