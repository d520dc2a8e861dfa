"""Reading compressed-tensors `sparse-bitmask` checkpoints (layout: `formats.compressed_tensors`): one weight's parts
into optimum-owl's compact parts (`read_weight`, used by `optimum_owl.inference.load_sparse`), or a whole checkpoint
as an ordinary dense model (`load_dense`, used by every command that reads a model)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import OWLCheckpointError
from .bitmask import decompress
from .compressed_tensors import (
    SCALE,
    SPARSE_FORMAT,
    ZERO_POINT,
    checkpoint_quantization_config,
    int8_group_size,
    sparsity_config_of,
    to_owl_parts,
    weight_keys,
)
from .files import checkpoint_files
from .preflight import check_dense_crc, dense_checksums

logger = logging.getLogger(__name__)


def read_weight(
    tensors: list[torch.Tensor], keys: list[str], name: str, dense_crc: dict[str, list[Any]],
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The compact parts `(values, bitmask, shape, scales)` of one weight from its sparse-bitmask tensors (named
    `keys`, in `weight_keys` order), each checked against its CRC-32 in `dense_crc` when the writer recorded one.
    `scales` is None for float values; for int8 codes it is float32 `[out]` (per row) or `[out, groups]` (groups of
    `group_size` inputs). Raises `OWLCheckpointError` naming `name` on any inconsistency."""
    for key, tensor in zip(keys, tensors):
        check_dense_crc(dense_crc, key, tensor)
    parts = dict(zip((k.rsplit(".", 1)[1] for k in keys), tensors))
    values, bitmask, shape = to_owl_parts(*tensors[:4], name=name)
    scale = parts.get(SCALE)
    if (values.dtype == torch.int8) != (scale is not None):
        raise OWLCheckpointError(f"`{name}`: int8 codes need `.{SCALE}` beside them and float values none (got "
                                 f"{values.dtype} values and {'a' if scale is not None else 'no'} scale): the "
                                 "checkpoint is corrupt or its quantization_config does not describe it.")
    if scale is None:
        return values, bitmask, shape, None
    rows, cols = (int(d) for d in shape.tolist())
    groups = 1 if group_size is None else math.ceil(cols / group_size)
    if not scale.is_floating_point() or tuple(scale.reshape(rows, -1).shape) != (rows, groups):
        raise OWLCheckpointError(f"`{name}`: `.{SCALE}` must hold {rows} x {groups} float scales for a {[rows, cols]} "
                                 f"weight with group size {group_size}, got {scale.dtype} {list(scale.shape)}.")
    zero_point = parts.get(ZERO_POINT)
    if zero_point is not None and bool(zero_point.ne(0).any()):
        raise OWLCheckpointError(f"`{name}`: non-zero `.{ZERO_POINT}` (asymmetric int8): optimum-owl reads symmetric "
                                 "int8 values only.")
    scales = scale.float().reshape(rows, groups)
    return values, bitmask, shape, scales.reshape(rows) if group_size is None else scales


def load_dense(path: str | os.PathLike, dtype: torch.dtype | str | None = None, model_class: Any = None) -> nn.Module:
    """Load a compressed-tensors sparse-bitmask checkpoint as an ordinary dense model (zeros in place, bit-identical
    float weights; int8 codes as `code * scale` computed in float32, their grid recorded so that a compact save keeps
    them int8) without compressed-tensors, which no longer reads this format. The model is marked like a pruned
    model: `save_pretrained` writes optimum-owl's compact format. For the sparse form use
    `optimum_owl.inference.load_sparse`.

    Raises `OWLCheckpointError` naming the tensor on a corrupt, incomplete or mismatched checkpoint.
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from ..config import CONFIG_NAME, OWLPrunerConfig
    from .quantizer import mark_pruned

    path = Path(path)
    quant = checkpoint_quantization_config(path)
    sparsity_config_of(quant, path)
    _, group_size = int8_group_size(quant, path)
    files = checkpoint_files(path)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False):
        model = (model_class or AutoModelForCausalLM).from_config(config, dtype=dtype)
    model.eval()
    model.config.name_or_path = str(path)
    table = dense_checksums(files)
    with contextlib.ExitStack() as stack:  # each file opened once (a safetensors open parses its whole header)
        handles = [stack.enter_context(safe_open(str(file), framework="pt")) for file in files]
        location = {key: handle for handle in handles for key in handle.keys()}
        _fill(model, path, location, table, group_size, dtype)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise OWLCheckpointError(f"{path} does not hold {left[:5]} ({len(left)} tensors missing): incomplete checkpoint.")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    owl = OWLPrunerConfig.from_pretrained(path) if (path / CONFIG_NAME).is_file() else None
    mark_pruned(model, owl)
    logger.info("Loaded the compressed-tensors %s checkpoint %s densely", SPARSE_FORMAT, path)
    return model


def _fill(model: nn.Module, path: Path, location: dict[str, Any], table: dict[str, list[Any]],
          group_size: int | None, dtype: torch.dtype) -> None:
    """Set every tensor of the meta-device `model` from the open safetensors handles in `location` (key -> handle)."""
    from accelerate.utils import set_module_tensor_to_device

    from .int8 import decode_int8, set_int8_grid

    def read(key: str) -> torch.Tensor:
        return location[key].get_tensor(key)

    model_keys = set(model.state_dict())
    done: set[str] = set()
    for name, keys in weight_keys(location, path).items():
        if name not in model_keys:
            raise OWLCheckpointError(f"`{name}` in {path} names no weight of {type(model).__name__}: the checkpoint "
                                     "does not belong to this config.json.")
        values, bitmask, shape, scales = read_weight([read(k) for k in keys], keys, name, table, group_size)
        expected = tuple(model.get_parameter(name).shape)
        dense = decompress(values, bitmask, shape, name=name, expected_shape=expected, int8=scales is not None)
        if scales is not None:
            module = model.get_submodule(name.removesuffix(".weight"))
            dense = decode_int8(dense, scales, group_size, dtype=dtype)
            set_int8_grid(module, scales, group_size)
        set_module_tensor_to_device(model, name, "cpu", value=dense.to(dtype))
        done.update(keys)
    unknown = [k for k in location if k not in done and k not in model_keys]
    if unknown:
        raise OWLCheckpointError(f"{len(unknown)} tensors of {path} (e.g. {unknown[:3]}) have no place in "
                                 f"{type(model).__name__}: the checkpoint does not belong to this config.json.")
    for key in (k for k in location if k not in done):
        tensor = read(key)
        check_dense_crc(table, key, tensor)
        set_module_tensor_to_device(model, key, "cpu", value=tensor.to(dtype) if tensor.is_floating_point() else tensor)
