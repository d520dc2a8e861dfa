"""transformers quantizer plugin: prune on load, on top of the compact format's quantizer.

Registered under `quant_method="owl"` (see `optimum_owl.integration.install`), which gives:

- `AutoModelForCausalLM.from_pretrained(path, quantization_config=OWLPrunerConfig(..., dataset=...))` loads the dense
  weights, then prunes them with the core (`pruning.engine.prune_model`); the report lands on `model.owl_report`.
- `from_pretrained(dir)` / `save_pretrained(dir)` of compact (bitmask) checkpoints, inherited from
  `optimum_owl.formats.OWLHfQuantizer`.

Models pruned outside `from_pretrained` (`OWLPruner.apply`) are hooked in with `optimum_owl.formats.mark_pruned`; a
plain dense export (zeros in place, no `quantization_config`) is written by `optimum_owl.serialization.save_dense`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from torch import nn

from ..config import OWLPrunerConfig
from ..formats.quantizer import QUANT_METHOD, OWLHfQuantizer, mark_pruned

logger = logging.getLogger(__name__)


class OWLPruningQuantizer(OWLHfQuantizer):
    """The quantizer transformers finds under `quant_method="owl"`: the compact format, plus pruning a fresh load
    with the data carried by its `OWLPrunerConfig`."""

    def prune_after_loading(self, model: nn.Module) -> nn.Module:
        return prune_loaded_model(model, self)


def prune_loaded_model(model: nn.Module, quantizer: OWLHfQuantizer) -> nn.Module:
    """Prune-on-load: run the core (`engine.prune_model`) on a freshly loaded model with the data carried by the
    config, then attach the report and mark the model for compact saving, once."""
    # imported here, not at the top: registering the plugin (on transformers' first `from_pretrained`, possibly in
    # the middle of importing the engine itself) must not need the pruning engine
    from ..pruning.engine import prune_model

    config: OWLPrunerConfig = quantizer.quantization_config
    config.validate()
    tokenizer = config.tokenizer
    if tokenizer is None and config.dataset is not None:
        tokenizer = _default_tokenizer(model)
    model.owl_report = prune_model(model, config, dataset=config.dataset, tokenizer=tokenizer)
    mark_pruned(model, config)
    return model


def _default_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved next to the model, if any (used when text calibration data comes without one)."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        logger.debug("No tokenizer next to %s: %s", path, err)
        return None


def register() -> None:
    """Register `OWLPrunerConfig` / `OWLPruningQuantizer` under `quant_method="owl"` with transformers (idempotent)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    current = AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD)
    if current is None:
        register_quantization_config(QUANT_METHOD)(OWLPrunerConfig)
    elif current is not OWLPrunerConfig:
        logger.warning("Replacing %s registered for quant_method 'owl' with optimum-owl's config.", current)
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = OWLPrunerConfig
    current = AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD)
    if current is None:
        register_quantizer(QUANT_METHOD)(OWLPruningQuantizer)
    elif current is not OWLPruningQuantizer:
        logger.warning("Replacing %s registered for quant_method 'owl' with optimum-owl's quantizer.", current)
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = OWLPruningQuantizer


def is_registered() -> bool:
    """Whether transformers currently dispatches `quant_method="owl"` to optimum-owl."""
    auto = sys.modules.get("transformers.quantizers.auto")
    return auto is not None and auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is OWLPruningQuantizer


# Importing this module (directly, or through `import optimum_owl` once transformers loads its quantizer registry)
# makes `quant_method="owl"` available to `from_pretrained`.
register()
