"""The compact (bitmask) checkpoint: which weights it compresses, the state dict `save_pretrained` writes, and
inspection of a saved folder (`verify_checkpoint`, `size_summary`) without loading a model.

Every sufficiently sparse `nn.Linear` / GPT-2 `Conv1D` weight is stored as `<name>` (non-zero values) +
`<name>_bitmask` (packed mask, THE codec in `formats.bitmask`) + `<name>_shape`; the safetensors metadata carries the
format name and the CRC-32 of every tensor (keys in `formats.files`). A weight on an int8 grid (pruned with
`values="int8"`) is stored as int8 codes + bitmask + shape + `<name>_scale` whatever its sparsity, in files marked
`owl-bitmask-v2` (`formats.int8`; docs/checkpoints.md).

Example:

```python
>>> from optimum_owl.formats import size_summary, verify_checkpoint
>>> model.save_pretrained("pruned-compact")                  # doctest: +SKIP
>>> verify_checkpoint("pruned-compact")["compressed_tensors"]  # doctest: +SKIP
154
```
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import WeightConverter

from ..errors import OWLCheckpointError
from ..utils import is_conv1d
from .bitmask import (
    BITMASK_SUFFIX,
    FORMAT_NAME,
    FORMAT_NAME_INT8,
    FORMAT_NAMES,
    SCALE_SUFFIX,
    SHAPE_SUFFIX,
    compress,
    crc32,
    stored_mask,
    worth_compressing,
)
from .files import (
    METADATA_CRC_KEY,
    METADATA_DENSE_CRC_KEY,
    METADATA_FORMAT_KEY,
    METADATA_GROUP_SIZE_KEY,
    METADATA_VALUES_KEY,
    checkpoint_files,
    read_headers,
)
from .int8 import encode_int8, int8_grid
from .preflight import dense_checksums, preflight_check

logger = logging.getLogger(__name__)

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _converter_matched(model: nn.Module, names: list[str]) -> set[str]:
    """Parameter names that a model-specific `WeightConverter` rewrites on save (left dense, to stay reversible)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping

            conversions = get_model_conversion_mapping(model, add_legacy=False)
        except Exception:  # noqa: BLE001 - best effort: no mapping means nothing to avoid
            conversions = []
    matched: set[str] = set()
    for conversion in conversions or []:
        if not isinstance(conversion, WeightConverter) or is_own_converter(conversion):
            continue
        try:
            reverse = conversion.reverse_transform()
        except Exception:  # noqa: BLE001
            continue
        for name in names:
            if reverse.rename_source_key(name)[1] is not None:
                matched.add(name)
    return matched


def compressible_names(model: nn.Module) -> list[str]:
    """Names of the weights eligible for bitmask storage: every `nn.Linear` / GPT-2 `Conv1D` weight, except
    embeddings, the output head and anything tied or rewritten by a model weight converter."""
    excluded: set[str] = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for key, value in dict(tied).items():
        excluded.update({key, value})
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            excluded.update(f"{n}.weight" for n, m in model.named_modules() if m is module)
    names = []
    for module_name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)) or getattr(module, "weight", None) is None:
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        if name not in excluded:
            names.append(name)
    blocked = _converter_matched(model, names)
    return [n for n in names if n not in blocked]


def compact_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict with every sufficiently sparse eligible weight replaced by `(values, bitmask, shape)`,
    and the safetensors metadata (format name, CRC-32 of every compressed tensor's parts and of every other tensor).

    A weight whose module records an int8 grid (`formats.int8.set_int8_grid`, set by pruning with values="int8") is
    stored as int8 codes + bitmask + shape + `_scale` (`owl-bitmask-v2`, `formats.int8.encode_int8`), whatever its
    sparsity; the metadata then also names the value form and the group size (one group size per checkpoint)."""
    state_dict = model.state_dict()
    eligible = set(compressible_names(model))
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    checksums: dict[str, list[Any]] = {}
    group_sizes: dict[str, int | None] = {}
    for name, tensor in state_dict.items():
        if name not in eligible:
            out[name] = tensor
            continue
        dense = tensor
        if dense.device.type == "meta":
            from transformers.integrations.accelerate import load_offloaded_parameter

            dense = load_offloaded_parameter(model, name)
        dense = dense.detach().cpu()
        module = modules.get(name.rpartition(".")[0])
        grid = int8_grid(module)
        if grid is not None and dense.is_floating_point() and dense.dim() == 2:
            codes, bitmask, shape, scales = encode_int8(dense, grid, is_conv1d(module), name)
            out.update({name: codes, name + BITMASK_SUFFIX: bitmask, name + SHAPE_SUFFIX: shape,
                        name + SCALE_SUFFIX: scales})
            checksums[name] = [crc32(codes), crc32(bitmask), crc32(shape), "int8", crc32(scales)]
            group_sizes[name] = grid.group_size
            continue
        mask = stored_mask(dense) if dense.is_floating_point() else None
        if mask is None or not worth_compressing(dense, mask):
            out[name] = tensor
            continue
        values, bitmask, shape = compress(dense, mask)
        out[name] = values
        out[name + BITMASK_SUFFIX] = bitmask
        out[name + SHAPE_SUFFIX] = shape
        checksums[name] = [crc32(values), crc32(bitmask), crc32(shape), str(values.dtype).removeprefix("torch.")]
    # weights already held compressed in memory (optimum_owl.sparsify's SparseLinear) pass through: checksum them too;
    # int8 ones (a `_scale` part) state their group size as `module.group_size`
    for key in [k for k in out if k.endswith(BITMASK_SUFFIX)]:
        name = key.removesuffix(BITMASK_SUFFIX)
        if name not in checksums and name in out and name + SHAPE_SUFFIX in out:
            values = out[name]
            checksums[name] = [crc32(values), crc32(out[key]), crc32(out[name + SHAPE_SUFFIX]),
                               str(values.dtype).removeprefix("torch.")]
            if name + SCALE_SUFFIX in out:
                checksums[name].append(crc32(out[name + SCALE_SUFFIX]))
                group_sizes[name] = getattr(modules.get(name.rpartition(".")[0]), "group_size", None)
    parts = {name + suffix for name, entry in checksums.items()
             for suffix in ("", BITMASK_SUFFIX, SHAPE_SUFFIX) + ((SCALE_SUFFIX,) if len(entry) > 4 else ())}
    dense_crc = {n: [crc32(t), str(t.dtype).removeprefix("torch.")] for n, t in out.items()
                 if n not in parts and t.device.type != "meta"}
    metadata = {METADATA_FORMAT_KEY: FORMAT_NAME, METADATA_CRC_KEY: json.dumps(checksums, sort_keys=True),
                METADATA_DENSE_CRC_KEY: json.dumps(dense_crc, sort_keys=True)}
    if group_sizes:
        sizes = set(group_sizes.values())
        if len(sizes) > 1:
            raise OWLCheckpointError(
                f"The int8 weights of one checkpoint must share one group size, got {sorted(map(str, sizes))}; "
                "quantize the model again with a single `group_size`."
            )
        metadata.update({METADATA_FORMAT_KEY: FORMAT_NAME_INT8, METADATA_VALUES_KEY: "int8",
                         METADATA_GROUP_SIZE_KEY: str(sizes.pop() or 0)})
    logger.info("Compact checkpoint: %d of %d eligible weights stored as bitmask + values (%d with int8 values)",
                len(checksums), len(eligible), len(group_sizes))
    return out, metadata


def shard_metadata(tensors: dict[str, Any], metadata: dict[str, str]) -> dict[str, str]:
    """The metadata of one file of a compact checkpoint: `metadata` of the whole save (`compact_state_dict`), with
    the format version of what this file holds: `owl-bitmask-v2` (and the value form, group size) only when it holds a
    `_scale` entry, else `owl-bitmask-v1` exactly as a float checkpoint has it."""
    if metadata.get(METADATA_FORMAT_KEY) != FORMAT_NAME_INT8:
        return metadata
    int8 = [name for name, entry in json.loads(metadata.get(METADATA_CRC_KEY, "{}")).items() if len(entry) > 4]
    if any(name + SCALE_SUFFIX in tensors for name in int8):
        return metadata
    out = {k: v for k, v in metadata.items() if k not in (METADATA_VALUES_KEY, METADATA_GROUP_SIZE_KEY)}
    out[METADATA_FORMAT_KEY] = FORMAT_NAME
    return out


def is_own_converter(conversion: Any) -> bool:
    """Whether a transformers `WeightConverter` is optimum-owl's own (its ops carry `owl_format`)."""
    return isinstance(conversion, WeightConverter) and any(
        getattr(op, "owl_format", None) in FORMAT_NAMES for op in conversion.operations
    )


def _model_itemsize(folder: str | os.PathLike) -> int:
    """Bytes per element of the model's own dtype (`config.json`'s `dtype` / `torch_dtype`; 4 when it names none)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return 4
    dtype = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}.get(str(dtype), 4)


def size_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Byte accounting of a checkpoint folder (headers only).

    Returns:
        A dict with `file_bytes` (all safetensors files), `compressed_tensors` (count), `int8_tensors` (how many of
        them store int8 values), `compressed_bytes` (values + bitmask + shape, + scales for int8 values, of the
        compressed weights), `compressed_dense_bytes` (what those weights take dense: in their values' dtype, or for
        int8 values in the model's dtype from `config.json`) and `compressed_ratio` (their ratio), plus `per_tensor`
        `{name: [stored_bytes, dense_bytes]}`.
    """
    files = checkpoint_files(path)
    headers = read_headers(files)
    per_tensor: dict[str, list[int]] = {}
    int8 = 0
    for key in headers:
        if not key.endswith(BITMASK_SUFFIX):
            continue
        name = key.removesuffix(BITMASK_SUFFIX)
        if name not in headers or name + SHAPE_SUFFIX not in headers:
            raise OWLCheckpointError(f"`{name}` has a bitmask but no values or shape in {path}.")
        dtype = headers[name][0]
        stored = headers[name][2] + headers[key][2] + headers[name + SHAPE_SUFFIX][2]
        itemsize = -1 if dtype not in _DTYPE_BYTES else _DTYPE_BYTES[dtype]
        if name + SCALE_SUFFIX in headers:
            stored += headers[name + SCALE_SUFFIX][2]
            itemsize = _model_itemsize(path)
            int8 += 1
        per_tensor[name] = [stored, itemsize]
    if per_tensor:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in per_tensor:
                    if name + SHAPE_SUFFIX in handle.keys():
                        numel = math.prod(int(d) for d in handle.get_tensor(name + SHAPE_SUFFIX).tolist())
                        per_tensor[name][1] = numel * per_tensor[name][1]
    stored = sum(v[0] for v in per_tensor.values())
    dense = sum(v[1] for v in per_tensor.values())
    return {
        "files": [f.name for f in files],
        "file_bytes": sum(f.stat().st_size for f in files),
        "compressed_tensors": len(per_tensor),
        "int8_tensors": int8,
        "compressed_bytes": stored,
        "compressed_dense_bytes": dense,
        "compressed_ratio": stored / dense if dense else None,
        "per_tensor": per_tensor,
    }


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Fully check a compact checkpoint folder without loading a model.

    Runs the same preflight as `from_pretrained` (headers, companions, mask lengths, popcount vs values), then
    verifies the CRC-32 recorded at save time of every tensor in the files: the values, bitmask and shape (and the
    scales of int8 values) of each compressed weight (`owl_crc32`) and every tensor stored as is, such as embeddings, norms and biases
    (`owl_crc32_dense`). Raises `OWLCheckpointError` naming the tensor on failure. Tensors without a recorded CRC
    (checkpoints saved before optimum-owl recorded the dense table) are listed in `unchecked_tensors`.

    Returns:
        `size_summary(path)` plus `checked_crc` (number of tensors whose checksums matched) and `unchecked_tensors`.
    """
    from safetensors import safe_open

    files = checkpoint_files(path)
    expected: dict[str, int] = {}
    for name, entry in preflight_check([str(f) for f in files]).items():
        crc_values, crc_mask, crc_shape = entry[:3]
        expected.update({name: crc_values, name + BITMASK_SUFFIX: crc_mask, name + SHAPE_SUFFIX: crc_shape})
        if len(entry) > 4:  # int8 values: [..., "int8", CRC of the scales]
            expected[name + SCALE_SUFFIX] = entry[4]
    for name, (crc, _dtype) in dense_checksums([str(f) for f in files]).items():
        expected.setdefault(name, crc)
    checked = 0
    unchecked: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key not in expected:
                    unchecked.append(key)
                    continue
                if crc32(handle.get_tensor(key)) != expected[key]:
                    raise OWLCheckpointError(f"`{key}` in {file.name} fails its CRC-32 check: corrupt file.")
                checked += 1
    summary = size_summary(path)
    summary["checked_crc"] = checked
    summary["unchecked_tensors"] = sorted(unchecked)
    return summary
