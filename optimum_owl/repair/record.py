"""What a repair keeps of its input: the model in trainable form (SparseLinear densified, windows within the context)
and the pruning record (`owl_report.json`, `owl_config.json`) carried into the repaired folder."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..config import CONFIG_NAME, OWLPrunerConfig
from ..errors import RepairConfigError
from ..pruning.modeling import context_length
from ..pruning.report import REPORT_NAME
from .sparsity import unwrap_peft

logger = logging.getLogger(__name__)


def trainable_model(model: nn.Module, seqlen: int) -> nn.Module:
    """The model ready for repair: `SparseLinear` modules (from `load_sparse` / `sparsify`, which cannot be trained)
    turned back into dense linears with the same zeros, and `seqlen` checked against the model's context.

    Raises `RepairConfigError` when `seqlen` exceeds the model's `max_position_embeddings` (windows past the
    context train positions the model has no embedding for)."""
    from ..inference import SparseLinear, densify

    sparse = sum(isinstance(m, SparseLinear) for m in model.modules())
    if sparse:
        logger.info("The model holds %d SparseLinear modules (sparse inference form, not trainable): densifying them "
                    "for repair (same weights and zeros; `optimum_owl.sparsify` the result again for inference).",
                    sparse)
        densify(model)
    max_pos = context_length(unwrap_peft(model))
    if max_pos is not None and seqlen > max_pos:
        raise RepairConfigError(
            f"`seqlen`={seqlen} exceeds the model's max_position_embeddings={max_pos}; lower `seqlen` "
            f"(e.g. {max_pos})."
        )
    return model


def pruning_source(model: nn.Module, source: str | os.PathLike | None) -> Path | None:
    """The folder holding the model's pruning record: `source`, else the local folder the model was loaded from
    when it holds one."""
    if source is not None:
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"`source` {folder} is not a folder; pass the pruned model's folder.")
        return folder
    loaded = getattr(getattr(model, "config", None), "_name_or_path", None)
    if loaded and Path(str(loaded)).is_dir() and (Path(str(loaded)) / REPORT_NAME).is_file():
        return Path(str(loaded))
    return None


def carry_pruning_record(model: nn.Module, out: Path, source: str | os.PathLike | None = None) -> list[str]:
    """Write the pruning record of `model` into `out`: `owl_report.json` and `owl_config.json` copied from the
    `pruning_source` folder, else the report attached as `model.owl_report` and the config the model carries
    (`config.quantization_config` of a compact pruned model). Returns the names written; logs what is missing."""
    folder = pruning_source(model, source)
    written: list[str] = []
    for name in (REPORT_NAME, CONFIG_NAME):
        if folder is not None and (folder / name).is_file():
            shutil.copyfile(folder / name, out / name)
            written.append(name)
    report: Any = getattr(model, "owl_report", None)
    if REPORT_NAME not in written and report is not None and hasattr(report, "save"):
        report.save(out / REPORT_NAME)
        written.append(REPORT_NAME)
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if CONFIG_NAME not in written and isinstance(config, OWLPrunerConfig):
        config.save_pretrained(out)
        written.append(CONFIG_NAME)
    missing = [name for name in (REPORT_NAME, CONFIG_NAME) if name not in written]
    if missing:
        logger.warning("The repaired model has no %s: the model carries no pruning record. Pass the pruned folder "
                       "as `source=` to carry it.", " / ".join(missing))
    return written
