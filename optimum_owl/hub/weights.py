"""What a saved model folder's weights say about its sparsity, read without loading the model: the model card decides
"pruned or not" from this when the folder has no pruning record, never from a missing file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def prunable_parameter_names(folder: str | os.PathLike) -> list[str]:
    """Names of the prunable weights (the matrices inside the transformer blocks, `pruning.modeling`) of the model
    in `folder`, found on a skeleton built from its `config.json` on the meta device (no weight is read)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from ..pruning.modeling import get_blocks_and_units

    config = AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the skeleton is never loaded: no quantizer to set up
    cls = AutoModelForCausalLM if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING else AutoModel
    with torch.device("meta"):
        model = cls.from_config(config)
    by_id = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    _, _, units = get_blocks_and_units(model)
    return sorted({by_id[id(u.parameter())] for block in units for u in block if id(u.parameter()) in by_id})


def folder_zero_share(folder: str | os.PathLike) -> float | None:
    """Share of exact zeros among the prunable weights of a saved model folder (plain safetensors, optimum-owl's
    compact format, or compressed-tensors' sparse-bitmask layout), read tensor by tensor; `None` when the folder has no safetensors checkpoint or no prunable
    weight is found in it (e.g. an ONNX export)."""
    from safetensors import safe_open

    from ..formats.bitmask import BITMASK_SUFFIX, SHAPE_SUFFIX
    from ..formats.files import checkpoint_files

    try:
        files = checkpoint_files(folder)
        names = prunable_parameter_names(folder)
    except Exception as err:  # noqa: BLE001 - no checkpoint or no known architecture: nothing measured
        logger.debug("no weight sparsity measured in %s: %s", folder, err)
        return None
    zeros = total = 0
    wanted = set(names)
    for file in files:
        with safe_open(str(Path(file)), framework="pt") as handle:
            keys = set(handle.keys())
            for name in names:
                key = name if name in keys else name.split(".", 1)[-1]  # checkpoints saved without the base prefix
                module = name.removesuffix(".weight")
                if module + ".compressed" in keys and module + ".shape" in keys:  # compressed-tensors sparse-bitmask
                    key, shape_key = module + ".compressed", module + ".shape"
                else:
                    shape_key = key + SHAPE_SUFFIX if key + BITMASK_SUFFIX in keys else None  # compact
                if key not in keys or name not in wanted:
                    continue
                wanted.discard(name)
                values = handle.get_tensor(key)
                numel = values.numel()
                if shape_key is not None and shape_key in keys:  # values at the kept positions only
                    numel = int(torch.prod(handle.get_tensor(shape_key).long()))
                zeros += numel - int(torch.count_nonzero(values))
                total += numel
    return zeros / total if total else None
