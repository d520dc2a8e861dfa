"""Sparse inference on CPU: keep only the compact (bitmask + packed values) form of pruned weights in memory and
decode through a C++ AVX2 kernel, or its AVX-512 path where that checks out faster (pure-PyTorch fallback
everywhere else). See docs/inference.md.

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

__all__ = ["MEASURED", "SparseLinear", "densify", "kernel_status", "sparsify"]

# What optimum-owl measured, and where (quoted in generated model cards; full tables in docs/benchmarks.md).
MEASURED = (
    "AMD EPYC Zen 3, 2 cores, AVX2, no AVX-512, 2 threads, torch 2.13, 2026-11-30: a random 0.95B Llama at 70% "
    "unstructured sparsity decodes 2.10x faster than dense fp32 with fp32 values and 2.85x with bf16 values "
    "(1.51x dense bf16); 1.54x dense fp32 at 50%; SmolLM2-135M at 70%: 1.65x dense fp32"
)
