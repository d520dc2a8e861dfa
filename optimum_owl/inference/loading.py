"""Load a compact checkpoint (`owl-bitmask-v1`, see docs/checkpoints.md), or a compressed-tensors `sparse-bitmask`
one (`formats.compressed_tensors`), straight into the sparse form.

`load_sparse(path)` builds the model's modules with empty (meta) parameters, turns every bitmask-stored linear into a
`SparseLinear` from its stored parts (never building its dense weight; int8 codes of an `owl-bitmask-v2` checkpoint
stay int8), and reads every other tensor one at a time. Peak memory is therefore about the compact model, not the
dense one (see docs/inference.md for the measured RSS). `values="int8"` quantizes a float checkpoint's stored values
while loading, one weight at a time.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import OWLCheckpointError
from ..formats.bitmask import BITMASK_SUFFIX, SCALE_SUFFIX, SHAPE_SUFFIX, crc32, decompress
from ..formats.compressed_tensors import int8_group_size, sparsity_config_of, weight_keys
from ..formats.compressed_tensors_load import read_weight
from ..formats.files import METADATA_CRC_KEY, checkpoint_files
from ..formats.int8 import decode_int8, set_int8_grid
from ..formats.preflight import check_dense_crc, dense_checksums, int8_layout
from ..formats.quantizer import mark_pruned
from ..utils import is_conv1d
from .convert import check_int8_options, set_submodule, sparse_summary, summary_text
from .format import dequantize_packed, quantize_packed
from .head import quantize_lm_head
from .module import SparseLinear

logger = logging.getLogger(__name__)

def load_sparse(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    min_sparsity: float = 0.0,
    model_class: Any = None,
    *,
    values: str | None = None,
    group_size: int | None = None,
    quantize_head: bool | None = None,
) -> nn.Module:
    """Load a checkpoint written by `save_pretrained` of a pruned (or sparsified) model straight into the sparse form;
    a compressed-tensors `sparse-bitmask` checkpoint (written by compressed-tensors <= 0.14, llm-compressor, or
    `save_format="compressed-tensors"`) loads the same way, its parts converted without a dense copy.

    Args:
        path: a local folder with `config.json` and safetensors weights.
        dtype: dtype of the loaded model (default: the checkpoint's). Stored values are cast to it.
        min_sparsity: bitmask-stored weights at least this sparse (a fraction in [0, 1]) become `SparseLinear`; the
            others are rebuilt dense.
        model_class: the transformers auto class (default `AutoModelForCausalLM`).
        values: the sparse weights' values: None (default) as stored; `"int8"`: int8 codes with float32 scales (a
            float checkpoint is quantized while loading, as `sparsify(values="int8")` would; an int8 checkpoint is
            read as it is); `"float"`: the model's dtype (int8 codes are dequantized).
        group_size: with values="int8" and a float checkpoint: None (one scale per output row) or a multiple of 64.
        quantize_head: store the LM head as dense int8 (as `sparsify` does); default: when the sparse weights are
            int8.

    Returns:
        The model in eval mode, ready for `generate`; `save_pretrained` writes the compact format again.

    Raises:
        OWLCheckpointError: a tensor fails its CRC-32 check (compressed weights and, from the `owl_crc32_dense`
            table, every tensor stored as is: embeddings, norms, biases), or the files do not fit the config.

    Example:

    ```python
    >>> from optimum_owl.inference import load_sparse
    >>> model = load_sparse("pruned-model")      # doctest: +SKIP
    ```
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"`min_sparsity` must be in [0, 1] (a fraction of zero weights), got {min_sparsity}.")
    if values is None and group_size is not None:
        raise ValueError(f"group_size={group_size} applies when a float checkpoint is quantized while loading; pass "
                         "values='int8' too.")
    form = values  # `values` names the stored values below
    group_size = check_int8_options(form or "float", group_size)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a folder written by save_pretrained.")
    files = checkpoint_files(path)
    config = AutoConfig.from_pretrained(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    quant = getattr(config, "quantization_config", None)
    ct_sparsity = sparsity_config_of(quant, path)  # None unless a compressed-tensors checkpoint
    if ct_sparsity is not None:
        del config.quantization_config  # transformers' own compressed-tensors loader no longer reads this format
    cls = model_class or AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype)
    model.eval()

    location: dict[str, Path] = {}
    checksums: dict[str, list[Any]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                location[key] = file
            meta = handle.metadata() or {}
            if METADATA_CRC_KEY in meta:
                checksums.update(json.loads(meta[METADATA_CRC_KEY]))
    dense_table = dense_checksums(files)  # tensors stored as is: checked before any cast
    stored_int8 = int8_layout(files)  # weights stored as int8 codes -> their group size (checks the format names)
    if group_size is not None and stored_int8 and set(stored_int8.values()) != {group_size}:
        raise ValueError(f"group_size={group_size}, but {path} stores int8 codes with group_size "
                         f"{sorted(map(str, set(stored_int8.values())))}; leave group_size unset to read them as stored.")

    def read(key: str) -> torch.Tensor:
        with safe_open(str(location[key]), framework="pt") as handle:
            return handle.get_tensor(key)

    ct_keys = weight_keys(location, path) if ct_sparsity is not None else None
    ct_group = int8_group_size(quant, path)[1]  # compressed-tensors int8 codes: their group size
    if ct_keys is not None:
        compressed = sorted(ct_keys)
    else:
        compressed = sorted(k.removesuffix(BITMASK_SUFFIX) for k in location if k.endswith(BITMASK_SUFFIX))
    model_keys = set(model.state_dict().keys())
    done: set[str] = set()
    sparse_count = 0
    for name in compressed:
        module_name = name.removesuffix(".weight")
        parts = ct_keys[name] if ct_keys is not None else [name, name + BITMASK_SUFFIX, name + SHAPE_SUFFIX]
        if ct_keys is None and name in stored_int8:
            parts.append(name + SCALE_SUFFIX)
        missing = [k for k in parts if k not in location]
        if missing:
            raise OWLCheckpointError(f"`{name}` is stored compressed but {missing} is missing from {path}.")
        try:
            module = model.get_submodule(module_name)
        except AttributeError as err:
            raise OWLCheckpointError(
                f"`{name}` in {path} names no module of {type(model).__name__}; the checkpoint does not belong to "
                "this config. Load it with `from_pretrained` instead."
            ) from err
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise OWLCheckpointError(f"`{name}` is stored compressed but `{module_name}` is a {type(module).__name__}.")
        scales = None  # int8 codes: their float32 scales
        if ct_keys is not None:  # four parts (+ int8 scales), each checked against the writer's CRC-32 if recorded
            values, bitmask, shape, scales = read_weight([read(k) for k in parts], parts, name, dense_table, ct_group)
            if scales is not None:
                stored_int8[name] = ct_group
        else:
            values, bitmask, shape, *scale = (read(k) for k in parts)
            scales = scale[0] if scale else None
        expected = checksums.get(name)
        if expected:
            stored = [values, bitmask, shape] + ([scales] if scales is not None else [])
            crcs = expected[:3] + (expected[4:5] if scales is not None else [])
            for label, tensor, crc in zip(("values", "bitmask", "shape", "scales"), stored, crcs):
                if crc32(tensor) != crc:
                    raise OWLCheckpointError(
                        f"`{name}`: the stored {label} fail their CRC-32 check (corrupt file); re-download or re-save."
                    )
        if values.dtype != dtype and scales is None and form != "int8":
            values = values.to(dtype)
        bias_key = module_name + ".bias"
        bias = read(bias_key) if bias_key in location else None
        if bias is not None:
            check_dense_crc(dense_table, bias_key, bias)
            bias = bias.to(dtype)
        dims = shape.tolist()
        numel = dims[0] * dims[1] if len(dims) == 2 else 0
        sparsity = 1.0 - values.numel() / numel if numel else 0.0
        transposed = is_conv1d(module)
        if sparsity >= min_sparsity:
            new = SparseLinear.from_checkpoint_parts(values, bitmask, dims, bias, transposed, name, scales,
                                                     stored_int8.get(name), weight_dtype=dtype)
            set_submodule(model, module_name, _convert(new, form, group_size, dtype))
            sparse_count += 1
        else:
            dense = decompress(values, bitmask, shape, name=name, expected_shape=tuple(module.weight.shape),
                               int8=scales is not None)
            if scales is not None:  # `code * scale` in float32, in the model's dtype; the grid kept for saving
                dense = decode_int8(dense, scales, stored_int8[name], transposed, dtype)
                set_int8_grid(module, scales, stored_int8[name])
            set_module_tensor_to_device(model, name, "cpu", value=dense.to(dtype))
            if bias is not None:
                set_module_tensor_to_device(model, bias_key, "cpu", value=bias)
        done.update(parts)
        if bias is not None:
            done.add(bias_key)
        del values, bitmask, shape, scales

    unknown = [k for k in location if k not in done and k not in model_keys]
    if unknown:
        raise OWLCheckpointError(
            f"{len(unknown)} tensors of {path} (e.g. {unknown[:3]}) have no place in {type(model).__name__}; "
            "load this checkpoint with `from_pretrained` and call `optimum_owl.sparsify(model)` instead."
        )
    for key in location:
        if key in done:
            continue
        tensor = read(key)
        check_dense_crc(dense_table, key, tensor)
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        set_module_tensor_to_device(model, key, "cpu", value=tensor)
        del tensor
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise OWLCheckpointError(f"{path} does not hold {left[:5]} ({len(left)} tensors missing): incomplete checkpoint.")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    if ct_sparsity is not None and hasattr(model, "save_pretrained"):
        from ..config import CONFIG_NAME, OWLPrunerConfig

        mark_pruned(model, OWLPrunerConfig.from_pretrained(path) if (path / CONFIG_NAME).is_file() else None)
    elif quant is not None and hasattr(model, "save_pretrained"):
        from ..config import OWLPrunerConfig

        mark_pruned(model, quant if isinstance(quant, OWLPrunerConfig) else OWLPrunerConfig.from_dict(dict(quant)))
    int8 = any(isinstance(m, SparseLinear) and m.int8 for m in model.modules())
    head = quantize_lm_head(model) if (int8 if quantize_head is None else quantize_head) else None
    logger.info("load_sparse: %d weights loaded as SparseLinear from %s; %s", sparse_count, path,
                summary_text(sparse_summary(model), head))
    return model


def _convert(sparse: SparseLinear, form: str | None, group_size: int | None, dtype: torch.dtype) -> SparseLinear:
    """`sparse` with its values in the form asked for: a float one quantized (`values="int8"`, from the values as
    stored), int8 codes dequantized (`values="float"`), else as it is."""
    bias = None if sparse.bias is None else sparse.bias.detach()
    if form == "int8" and not sparse.int8:
        return SparseLinear(quantize_packed(sparse.packed(), group_size), bias, sparse.transposed, dtype)
    if form == "float" and sparse.int8:
        return SparseLinear(dequantize_packed(sparse.packed(), dtype), bias, sparse.transposed, dtype)
    return sparse
