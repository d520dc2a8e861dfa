"""optimum-owl: OWL (Outlier Weighed Layerwise sparsity) pruning for Hugging Face transformers.

```python
>>> from optimum_owl import OWLPrunerConfig, OWLPruner
>>> config = OWLPrunerConfig(sparsity=0.7, method="wanda", layerwise="owl", num_samples=128, seqlen=2048)
>>> model = OWLPruner.apply(model, config, dataset=texts, tokenizer=tokenizer)  # doctest: +SKIP
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import OWLPrunerConfig
from .errors import OWLConfigError
from .integration import install as _install_transformers_integration
from .pruning.report import PruneReport

__version__ = "0.1.0"

__all__ = [
    "OWLConfigError",
    "OWLPruner",
    "OWLPrunerConfig",
    "PruneReport",
    "__version__",
    "densify",
    "sparsify",
]

# `quant_method="owl"` for transformers (prune on load, compact checkpoints); deferred until transformers needs it.
_install_transformers_integration()

if TYPE_CHECKING:
    from .inference import densify, sparsify
    from .pruner import OWLPruner


def __getattr__(name: str) -> Any:
    # The pruner pulls in the runner and criteria; import it on first use to keep `import optimum_owl` light.
    if name == "OWLPruner":
        from .pruner import OWLPruner

        return OWLPruner
    if name in ("sparsify", "densify"):
        # sparse CPU inference (optimum_owl.inference); its C++ kernel is built on the first sparse forward
        from . import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'optimum_owl' has no attribute {name!r}")
