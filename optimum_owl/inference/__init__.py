"""Sparse inference on CPU: keep only the compact (bitmask + packed values) form of pruned weights in memory and
decode through a C++ AVX2 kernel, or its AVX-512 path where that checks out faster (pure-PyTorch fallback
everywhere else). See docs/inference.md.

```python
>>> import optimum_owl
>>> model = optimum_owl.sparsify(pruned_model)   # doctest: +SKIP
>>> model.generate(**inputs)                     # doctest: +SKIP
>>> optimum_owl.densify(model)                   # doctest: +SKIP
>>> from optimum_owl.inference import load_sparse
>>> model = load_sparse("pruned-model")          # doctest: +SKIP
>>> from optimum_owl.inference import generate
>>> out = generate(model, input_ids, max_new_tokens=64)   # doctest: +SKIP  (static cache + compiled decode step)
```
"""

from __future__ import annotations

from .convert import densify, sparse_summary, sparsify
from .decode import DecodeOutput, generate
from .kernel import kernel_status
from .loading import load_sparse
from .module import SparseLinear

__all__ = ["MEASURED", "MEASURED_INT8", "DecodeOutput", "SparseLinear", "densify", "generate", "kernel_status",
           "load_sparse", "sparse_summary", "sparsify"]

# What optimum-owl measured, and where (quoted in generated model cards; full tables in docs/benchmarks.md).
MEASURED = (
    "AMD EPYC Zen 4 (AVX-512, AVX512-BF16), 2 cores, 2 threads, torch 2.13, 2026-12-01: a random 0.95B Llama at 70% "
    "unstructured sparsity decodes 3.12x faster than dense fp32 with fp32 values and 2.48x faster than dense bf16 "
    "with bf16 values; 2.61x dense fp32 at 50%; SmolLM2-135M at 70%: 2.02x dense fp32; on a Zen 3 without AVX-512, "
    "2026-11-30: 2.10x and 1.51x"
)
# The same for int8 values (`sparsify(model, values="int8")`, the LM head int8 too); None would make the card say
# that the form was not benchmarked.
MEASURED_INT8: str | None = (
    "AMD EPYC Zen 4 (AVX-512 VBMI2), torch 2.13, 2026-12-07: SmolLM2-135M at 70% with int8 values and an int8 head "
    "decodes 3.14x faster than dense fp32 and 1.19x faster than dense int8 weight-only (2 threads); on the 0.95B "
    "model's layer shapes, one thread: 5.07x dense fp32, 2.20x dense int8"
)
