"""Saving pruned models (atomically, with the tokenizer, the report and the config)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..config import OWLPrunerConfig
from ..report import PruneReport
from ..utils import atomic_output_dir
from .compact import plain_model

logger = logging.getLogger(__name__)


def save_pruned(
    model: nn.Module,
    save_dir: str | os.PathLike,
    report: PruneReport | None = None,
    config: OWLPrunerConfig | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    dense: bool = False,
) -> Path:
    """Write the pruned model, tokenizer, `owl_report.json` and `owl_config.json` to `save_dir` in one rename.

    The weights go in optimum-owl's compact format (values + packed bitmask per pruned weight, loading needs
    `import optimum_owl`) unless `dense` is true: then they are plain safetensors with the zeros in place and
    `config.json` has no `quantization_config`, as written by `optimum_owl.serialization.save_dense`.

    Raises `FileExistsError` if `save_dir` exists and `overwrite` is false. An interrupted save leaves nothing.
    """
    with atomic_output_dir(save_dir, overwrite=overwrite) as tmp:
        if dense:
            with plain_model(model):
                model.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        if report is not None:
            report.save(tmp)
        if config is not None:
            config.save_pretrained(tmp)
    logger.info("Saved pruned model (%s format) to %s", "dense" if dense else "compact", save_dir)
    return Path(save_dir)
