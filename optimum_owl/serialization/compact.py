"""Pruned checkpoints on disk: the plain dense export, verification and size accounting of compact checkpoints.

Two formats come out of a pruned model:

- **compact** (default): `model.save_pretrained(dir)` on a model pruned by optimum-owl stores every sparse linear
  weight as `<name>` (non-zero values) + `<name>_bitmask` (packed mask) + `<name>_shape` in safetensors, and
  `config.json` carries `quantization_config: {"quant_method": "owl", ...}`. Loading needs `import optimum_owl`.
- **dense**: `save_dense(model, dir)` writes ordinary safetensors with the zeros in place and no
  `quantization_config`, for engines that do not know the compact format (vLLM, llama.cpp converters, ...). The
  pruning settings go to `owl_config.json` beside it.

Example:

```python
>>> import optimum_owl
>>> from optimum_owl.serialization import save_dense, verify_checkpoint
>>> model.save_pretrained("pruned-compact")                  # doctest: +SKIP
>>> verify_checkpoint("pruned-compact")["compressed_tensors"]  # doctest: +SKIP
154
>>> save_dense(model, "pruned-dense")                        # doctest: +SKIP
```
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..bitmask import BITMASK_SUFFIX, SHAPE_SUFFIX, OWLCheckpointError, crc32
from ..config import OWLPrunerConfig
from ..integration.preflight import dense_checksums, preflight_check
from ..utils import atomic_output_dir

logger = logging.getLogger(__name__)

__all__ = ["OWLCheckpointError", "checkpoint_files", "plain_model", "save_dense", "size_summary", "verify_checkpoint"]

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _is_owl_config(config: Any) -> bool:
    if isinstance(config, OWLPrunerConfig):
        return True
    return isinstance(config, dict) and config.get("quant_method") == "owl"


@contextlib.contextmanager
def plain_model(model: nn.Module) -> Iterator[Any]:
    """Temporarily detach optimum-owl's quantizer and `quantization_config`; yields the detached config (or None)."""
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(model.config, "quantization_config", None)
    if quantizer is not None and getattr(quantizer.quantization_config, "quant_method", None) != "owl":
        raise ValueError(
            f"The model is quantized with {quantizer.quantization_config.quant_method!r}; `save_dense` only removes "
            "optimum-owl's compact format. Dequantize it first (`model.dequantize()`)."
        )
    owl_config = qconfig if _is_owl_config(qconfig) else None
    had_method = hasattr(model, "quantization_method")
    method = getattr(model, "quantization_method", None)
    try:
        if quantizer is not None:
            model.hf_quantizer = None
        if owl_config is not None:
            del model.config.quantization_config
        if had_method and method == "owl":
            del model.quantization_method
        yield owl_config
    finally:
        if quantizer is not None:
            model.hf_quantizer = quantizer
        if owl_config is not None:
            model.config.quantization_config = owl_config
        if had_method and method == "owl":
            model.quantization_method = method


def save_dense(model: nn.Module, save_directory: str | os.PathLike, overwrite: bool = False, **save_kwargs: Any) -> Path:
    """Write a plain dense checkpoint of a pruned model: zeros in place, no `quantization_config` in `config.json`.

    Any engine that reads Hugging Face safetensors can load it. The OWL settings (if the model was pruned by
    optimum-owl) are written to `owl_config.json` and the report (if attached as `model.owl_report`) to
    `owl_report.json`. The model itself is left unchanged and keeps saving compactly with `save_pretrained`.

    Args:
        model: a transformers model.
        save_directory: output folder, written atomically (temporary folder, then one rename).
        overwrite: replace `save_directory` if it exists (otherwise `FileExistsError`).
        **save_kwargs: passed to `model.save_pretrained` (e.g. `max_shard_size`).

    Returns:
        The output folder.
    """
    with atomic_output_dir(save_directory, overwrite=overwrite) as tmp:
        with plain_model(model) as owl_config:
            model.save_pretrained(tmp, **save_kwargs)
        if owl_config is not None:
            config = owl_config if isinstance(owl_config, OWLPrunerConfig) else OWLPrunerConfig.from_dict(owl_config)
            config.save_pretrained(tmp)
        report = getattr(model, "owl_report", None)
        if report is not None and hasattr(report, "save"):
            report.save(tmp)
    logger.info("Saved dense (zeros in place) checkpoint to %s", save_directory)
    return Path(save_directory)


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a local checkpoint folder (following `model.safetensors.index.json` if sharded)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder.")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No .safetensors files in {folder}.")
    return files


def _headers(files: list[Path]) -> dict[str, tuple[str, list[int], int]]:
    """`{tensor: (dtype, shape, nbytes)}` from the safetensors headers (data is not read)."""
    out: dict[str, tuple[str, list[int], int]] = {}
    for file in files:
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise OWLCheckpointError(f"{file} is truncated (no safetensors header).")
            size = int.from_bytes(raw, "little")
            if size > os.path.getsize(file) - 8:
                raise OWLCheckpointError(f"{file} is truncated or corrupt (header size {size} beyond the file).")
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            out[name] = (info["dtype"], list(info["shape"]), end - start)
    return out


def size_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Byte accounting of a checkpoint folder (headers only).

    Returns:
        A dict with `file_bytes` (all safetensors files), `compressed_tensors` (count), `compressed_bytes` (values +
        bitmask + shape of the compressed weights), `compressed_dense_bytes` (what those weights take dense) and
        `compressed_ratio` (their ratio), plus `per_tensor` `{name: [stored_bytes, dense_bytes]}`.
    """
    files = checkpoint_files(path)
    headers = _headers(files)
    per_tensor: dict[str, list[int]] = {}
    for key in headers:
        if not key.endswith(BITMASK_SUFFIX):
            continue
        name = key.removesuffix(BITMASK_SUFFIX)
        if name not in headers or name + SHAPE_SUFFIX not in headers:
            raise OWLCheckpointError(f"`{name}` has a bitmask but no values or shape in {path}.")
        dtype = headers[name][0]
        stored = headers[name][2] + headers[key][2] + headers[name + SHAPE_SUFFIX][2]
        per_tensor[name] = [stored, -1 if dtype not in _DTYPE_BYTES else _DTYPE_BYTES[dtype]]
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
        "compressed_bytes": stored,
        "compressed_dense_bytes": dense,
        "compressed_ratio": stored / dense if dense else None,
        "per_tensor": per_tensor,
    }


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Fully check a compact checkpoint folder without loading a model.

    Runs the same preflight as `from_pretrained` (headers, companions, mask lengths, popcount vs values), then
    verifies the CRC-32 recorded at save time of every tensor in the files: the values, bitmask and shape of each
    compressed weight (`owl_crc32`) and every tensor stored as is, such as embeddings, norms and biases
    (`owl_crc32_dense`). Raises `OWLCheckpointError` naming the tensor on failure. Tensors without a recorded CRC
    (checkpoints saved before optimum-owl recorded the dense table) are listed in `unchecked_tensors`.

    Returns:
        `size_summary(path)` plus `checked_crc` (number of tensors whose checksums matched) and `unchecked_tensors`.
    """
    from safetensors import safe_open

    files = checkpoint_files(path)
    expected: dict[str, int] = {}
    for name, (crc_values, crc_mask, crc_shape, _dtype) in preflight_check([str(f) for f in files]).items():
        expected.update({name: crc_values, name + BITMASK_SUFFIX: crc_mask, name + SHAPE_SUFFIX: crc_shape})
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
