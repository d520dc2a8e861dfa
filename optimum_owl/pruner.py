"""`OWLPruner`: the public, Optimum-style entry point. It sits above the core (`optimum_owl.pruning.engine`) and ties a
run to the rest of the stack: the report is attached as `model.owl_report`, the model is marked once for compact
`save_pretrained` through the transformers plugin, and `quantize` saves through `optimum_owl.serialization`.

The pruning itself is `engine.prune_model`, which keeps all run state in one object: a pruner holds only its config
(and, for the Optimum-style `from_pretrained`/`quantize`, the model and tokenizer), so it is re-entrant.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from .config import OWLPrunerConfig
from .formats import mark_pruned
from .pruning.data import load_tokenizer
from .pruning.engine import prune_model
from .pruning.modeling import load_model
from .pruning.report import PruneReport
from .serialization import estimate_saved_bytes, save_pruned
from .utils import check_free_space, check_output_dir, input_paths
from .validation import check_save_format, check_target_sparsity

logger = logging.getLogger(__name__)


class OWLPruner:
    """Prunes a transformers model in place with OWL layerwise sparsity and a registered criterion
    (Wanda, SparseGPT, magnitude: `optimum_owl.algorithms.criteria`).

    Args:
        config (`OWLPrunerConfig`, *optional*): the run's settings; keyword arguments build one when omitted.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from optimum_owl import OWLPruner, OWLPrunerConfig
    >>> model = AutoModelForCausalLM.from_pretrained("path/to/model")            # doctest: +SKIP
    >>> tok = AutoTokenizer.from_pretrained("path/to/model")                     # doctest: +SKIP
    >>> config = OWLPrunerConfig(sparsity=0.7, method="wanda", layerwise="owl", num_samples=128, seqlen=2048)
    >>> report = OWLPruner(config).prune(model, dataset="c4_sample.jsonl", tokenizer=tok)  # doctest: +SKIP
    >>> print(report.block_table())                                              # doctest: +SKIP
    ```
    """

    def __init__(self, config: OWLPrunerConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            config = OWLPrunerConfig(**kwargs)
        elif kwargs:
            raise TypeError("Pass either `config` or keyword arguments, not both.")
        if not isinstance(config, OWLPrunerConfig):
            raise TypeError(f"`config` must be an OWLPrunerConfig, got {type(config).__name__}.")
        config.validate()
        self.config = config
        self.model: nn.Module | None = None
        self.tokenizer: Any = None

    @classmethod
    def apply(
        cls, model: nn.Module, config: OWLPrunerConfig | None = None, dataset: Any = None, tokenizer: Any = None, **kw
    ) -> nn.Module:
        """Prune `model` in place and return it (the report is attached as `model.owl_report`)."""
        cls(config, **kw).prune(model, dataset=dataset, tokenizer=tokenizer)
        return model

    def prune(self, model: nn.Module, dataset: Any = None, tokenizer: Any = None) -> PruneReport:
        """Prune `model` in place; return the `PruneReport` (also attached as `model.owl_report`).

        A transformers model is also marked for compact saving: `model.save_pretrained(dir)` then writes
        optimum-owl's bitmask format (`mark_pruned`)."""
        report = prune_model(model, self.config, dataset=dataset, tokenizer=tokenizer)
        model.owl_report = report
        mark_pruned(model, self.config)
        return report

    # ------------------------------------------------------------------------------------------ Optimum style
    @classmethod
    def from_pretrained(cls, model_or_path: nn.Module | str | os.PathLike, config: OWLPrunerConfig | None = None, **model_kwargs: Any):
        """Optimum-style constructor: load (or take) a model, keep it on the pruner for `prune_and_save(save_dir)`."""
        pruner = cls(config or OWLPrunerConfig())
        if isinstance(model_or_path, nn.Module):
            pruner.model = model_or_path
        else:
            pruner.model = load_model(str(model_or_path), **model_kwargs)
            try:
                pruner.tokenizer = load_tokenizer(str(model_or_path))
            except (OSError, ValueError):
                pruner.tokenizer = None
        return pruner

    def prune_and_save(
        self,
        save_dir: str | os.PathLike,
        dataset: Any = None,
        tokenizer: Any = None,
        overwrite: bool = False,
        dense: bool = False,
        save_format: str | None = None,
    ) -> PruneReport:
        """Prune the model given to `from_pretrained` and save it (+ tokenizer, report, config) to `save_dir`.

        `save_format`: `"compact"` (default, bitmask + values), `"compressed-tensors"` (its sparse-bitmask layout) or
        `"dense"` (plain safetensors with zeros in place; `dense=True` is the older spelling); docs/checkpoints.md.
        Before pruning, refuses (`ValueError`) a `save_dir` that is or contains an input (the model's or tokenizer's
        folder, a local `dataset`: even with `overwrite`, replacing it would delete them) and a sparsity of 0, and
        (`OSError`) a file system without room for the estimated output (`estimate_saved_bytes`)."""
        if self.model is None:
            raise ValueError("No model: build the pruner with `OWLPruner.from_pretrained(model_or_path, config)`.")
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        check_target_sparsity(self.config)
        save_format = check_save_format(save_format, dense)
        inputs = {**input_paths(self.model, tokenizer, self.config), "`dataset`": dataset}
        check_output_dir(save_dir, overwrite, flag="save_dir", inputs=inputs)
        sources = (getattr(self.model, "name_or_path", None), getattr(tokenizer, "name_or_path", None))
        check_free_space(save_dir, estimate_saved_bytes(self.model, self.config, file_sources=sources,
                                                           save_format=save_format), flag="save_dir",
                         what="estimated from the model, the sparsity and the format, with a margin")
        report = self.prune(self.model, dataset=dataset, tokenizer=tokenizer)
        save_pruned(self.model, save_dir, report=report, config=self.config, tokenizer=tokenizer, overwrite=overwrite,
                    save_format=save_format)
        return report

    def quantize(self, save_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> PruneReport:
        """Optimum's name for `prune_and_save` (Optimum quantizers call it `quantize`); prunes and saves."""
        return self.prune_and_save(save_dir, *args, **kwargs)

