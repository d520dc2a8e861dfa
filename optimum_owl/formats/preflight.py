"""Checks of a compact checkpoint's files before transformers loads them (headers, companions, mask lengths,
popcounts), with the CRC-32 table the writer stored in the safetensors metadata."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import torch
from torch import nn

from ..errors import OWLCheckpointError
from ..utils import is_conv1d
from .bitmask import (
    BITMASK_SUFFIX,
    FORMAT_NAME_INT8,
    FORMAT_NAMES,
    SCALE_SUFFIX,
    SHAPE_SUFFIX,
    check_parts,
    check_scale,
    crc32,
    popcount,
)
from .files import CT_FORMAT_NAME, METADATA_CRC_KEY, METADATA_DENSE_CRC_KEY, METADATA_FORMAT_KEY, group_size_of

logger = logging.getLogger(__name__)



def _model_shape(model: nn.Module, name: str) -> tuple[int, ...] | None:
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix:
        candidates += [name.removeprefix(prefix + "."), f"{prefix}.{name}"]
    for candidate in candidates:
        try:
            return tuple(model.get_parameter(candidate).shape)
        except AttributeError:
            continue
    return None


def _model_module(model: nn.Module, name: str) -> nn.Module | None:
    """The module owning parameter `name` (prefix-tolerant like `_model_shape`), or None."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    module_name = name.rpartition(".")[0]
    for candidate in [module_name] + ([module_name.removeprefix(prefix + "."), f"{prefix}.{module_name}"] if prefix else []):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def weight_transposed(model: nn.Module | None, name: str) -> bool | None:
    """Whether weight `name` of `model` is stored `[in, out]` (GPT-2 `Conv1D`); None without a model to ask."""
    if model is None:
        return None
    module = _model_module(model, name)
    return None if module is None else is_conv1d(module)


def int8_layout(checkpoint_files: list[str]) -> dict[str, int | None]:
    """`{weight name: group size}` of every weight stored with int8 values (a `_scale` entry) in the files (group size
    `None`: one scale per output row), from the safetensors headers only. Raises `OWLCheckpointError` naming the file
    when a file names a format this optimum-owl does not read, or holds scales without being `owl-bitmask-v2`."""
    from safetensors import safe_open

    contents: list[tuple[str, list[str], dict[str, str]]] = []
    for file in (str(f) for f in checkpoint_files):
        if not file.endswith(".safetensors"):
            continue
        try:
            with safe_open(file, framework="pt") as handle:
                contents.append((file, list(handle.keys()), handle.metadata() or {}))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise OWLCheckpointError(
                f"Cannot read checkpoint file {file}: {err}. The file is corrupt or truncated; re-download it or "
                "re-save the model."
            ) from err
    compressed = {k.removesuffix(BITMASK_SUFFIX) for _, keys, _ in contents for k in keys if k.endswith(BITMASK_SUFFIX)}
    layout: dict[str, int | None] = {}
    for file, keys, metadata in contents:
        fmt = metadata.get(METADATA_FORMAT_KEY)
        if fmt is not None and fmt not in FORMAT_NAMES and fmt != CT_FORMAT_NAME:  # CT: float values, no scales
            raise OWLCheckpointError(
                f"{file} is in the compact format {fmt!r}; this optimum-owl reads {', '.join(FORMAT_NAMES)}. Upgrade "
                "optimum-owl (`pip install -U optimum-owl`)."
            )
        scales = [k.removesuffix(SCALE_SUFFIX) for k in keys
                  if k.endswith(SCALE_SUFFIX) and k.removesuffix(SCALE_SUFFIX) in compressed]
        if scales and fmt != FORMAT_NAME_INT8:
            raise OWLCheckpointError(
                f"{file} holds int8 scales (`{scales[0]}{SCALE_SUFFIX}`) but its `{METADATA_FORMAT_KEY}` is {fmt!r}, "
                f"not {FORMAT_NAME_INT8!r}: the file is corrupt or was edited; re-save the checkpoint."
            )
        if scales:
            layout.update(dict.fromkeys(scales, group_size_of(metadata, file)))
    return layout


def dense_checksums(checkpoint_files: list[str]) -> dict[str, list[Any]]:
    """The `owl_crc32_dense` tables of the checkpoint files' metadata (empty for checkpoints saved without them)."""
    from safetensors import safe_open

    table: dict[str, list[Any]] = {}
    for file in (str(f) for f in checkpoint_files):
        if not file.endswith(".safetensors"):
            continue
        with safe_open(file, framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_DENSE_CRC_KEY)
        if raw:
            try:
                table.update(json.loads(raw))
            except json.JSONDecodeError as err:
                raise OWLCheckpointError(f"Corrupt `{METADATA_DENSE_CRC_KEY}` metadata in {file}: {err}.") from None
    return table


def check_dense_crc(table: dict[str, list[Any]], name: str, tensor: Any) -> None:
    """Raise `OWLCheckpointError` when `tensor` (stored as is) does not match its recorded CRC-32; a tensor without
    a record, or cast to another dtype on load (its stored bytes are gone), is not checked."""
    expected = table.get(name)
    if expected is None or not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
        return
    crc, dtype = expected
    if str(tensor.dtype).removeprefix("torch.") == dtype and crc32(tensor) != crc:
        raise OWLCheckpointError(f"`{name}` fails its CRC-32 check (corrupt file); re-download or re-save the checkpoint.")


def preflight_check(checkpoint_files: list[str], model: nn.Module | None = None) -> dict[str, list[Any]]:
    """Check every bitmask-compressed tensor of a checkpoint before transformers loads it.

    Reads the safetensors headers, the small shape tensors and the packed masks (not the values), and raises
    `OWLCheckpointError` naming the file or tensor when a file cannot be parsed (corrupt or truncated), a companion
    tensor is missing, a dtype is wrong, the recorded shape differs from the model's, the mask length does not fit the
    shape, or the mask's popcount differs from the number of stored values. A weight with int8 values
    (`owl-bitmask-v2`) must have int8 codes and a `_scale` entry of float32, finite, positive scales of the shape its
    group size gives (`bitmask.check_scale`; the scales are read too, they are small).

    Returns:
        The CRC-32 table stored in the files' metadata (checked later, tensor by tensor, while loading).
    """
    from safetensors import safe_open

    files = [str(f) for f in checkpoint_files]
    location: dict[str, str] = {}
    checksums: dict[str, list[Any]] = {}
    for file in files:
        if not file.endswith(".safetensors"):
            continue
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    location[key] = file
                metadata = handle.metadata() or {}
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise OWLCheckpointError(
                f"Cannot read checkpoint file {file}: {err}. The file is corrupt or truncated; re-download it or "
                "re-save the model."
            ) from err
        if METADATA_CRC_KEY in metadata:
            try:
                checksums.update(json.loads(metadata[METADATA_CRC_KEY]))
            except json.JSONDecodeError as err:
                raise OWLCheckpointError(f"Corrupt `{METADATA_CRC_KEY}` metadata in {file}: {err}.") from err
    compressed = sorted(k.removesuffix(BITMASK_SUFFIX) for k in location if k.endswith(BITMASK_SUFFIX))
    int8 = int8_layout(files)
    for name in compressed:
        missing = [name + s for s in ("", SHAPE_SUFFIX) if name + s not in location]
        if missing:
            raise OWLCheckpointError(
                f"`{name}` is stored compressed but {missing} is missing from the checkpoint files (truncated or "
                "partially copied shards?); re-download or re-save the checkpoint."
            )
    # one pass per file: read the small shape tensors and the packed masks, and the values' header entries
    parts: dict[str, dict[str, Any]] = {name: {} for name in compressed}
    wanted: dict[str, list[tuple[str, str]]] = {}
    for name in compressed:
        roles = (("", "values"), (BITMASK_SUFFIX, "bitmask"), (SHAPE_SUFFIX, "shape"))
        for suffix, role in roles + (((SCALE_SUFFIX, "scale"),) if name in int8 else ()):
            wanted.setdefault(location[name + suffix], []).append((name, role))
    for file, items in wanted.items():
        try:
            with safe_open(file, framework="pt") as handle:
                for name, role in items:
                    if role == "values":
                        values_slice = handle.get_slice(name)
                        parts[name]["values"] = (
                            math.prod(values_slice.get_shape()),
                            _safetensors_dtype(values_slice.get_dtype()),
                        )
                    else:
                        suffix = {"bitmask": BITMASK_SUFFIX, "shape": SHAPE_SUFFIX, "scale": SCALE_SUFFIX}[role]
                        parts[name][role] = handle.get_tensor(name + suffix)
        except Exception as err:  # noqa: BLE001
            raise OWLCheckpointError(f"Cannot read compressed tensors from {file}: {err}; the file is corrupt.") from err
    for name in compressed:
        shape, bitmask = parts[name]["shape"], parts[name]["bitmask"]
        values_numel, values_dtype = parts[name]["values"]
        if shape.dtype != torch.int64 or shape.dim() != 1:
            raise OWLCheckpointError(f"`{name}{SHAPE_SUFFIX}` must be a 1-D int64 tensor, got {shape.dtype} {list(shape.shape)}.")
        expected = _model_shape(model, name) if model is not None else None
        check_parts(
            values_numel,
            values_dtype,
            bitmask.numel(),
            bitmask.dtype,
            shape.tolist(),
            name,
            expected_shape=expected,
            nonzeros=popcount(bitmask) if bitmask.dtype == torch.uint8 else None,
            int8=name in int8,
        )
        if name in int8:
            scale = parts[name]["scale"]
            check_scale(list(scale.shape), scale.dtype, shape.tolist(), int8[name], name,
                        weight_transposed(model, name))
            if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
                raise OWLCheckpointError(f"`{name}{SCALE_SUFFIX}` holds a scale that is not a positive finite number: "
                                         "the checkpoint is corrupt or was edited; re-save it from the pruned model.")
    if compressed:
        logger.info("Compact checkpoint: %d bitmask-compressed weights passed the preflight check", len(compressed))
    return checksums


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


def _safetensors_dtype(name: str) -> torch.dtype:
    return _SAFETENSORS_DTYPES.get(name, torch.uint8)
