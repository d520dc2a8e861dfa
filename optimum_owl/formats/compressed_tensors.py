"""compressed-tensors `sparse-bitmask` checkpoints: written from a pruned model, read back into the compact parts.

This is the sparse layout of the compressed-tensors library (its `BitmaskCompressor`, in releases up to 0.14.0.1;
0.15.0 removed it), the one llm-compressor wrote for sparse models. Each compressed linear weight `<module>.weight`
is four safetensors entries named after its module:

| key | dtype | content |
|---|---|---|
| `<module>.compressed` | the weight's dtype | the stored elements, row-major, 1-D |
| `<module>.bitmask` | `uint8 [rows, ceil(cols / 8)]` | row `r` is `numpy.packbits(mask[r], bitorder="little")` |
| `<module>.shape` | `int64 [2]` | the dense shape as stored (a GPT-2 `Conv1D` weight keeps `[in, out]`) |
| `<module>.row_offsets` | `int64 [rows]` | the index in `.compressed` of each row's first stored element |

and `config.json` has `quantization_config = {"quant_method": "compressed-tensors", "version": ..., "sparsity_config":
{"format": "sparse-bitmask", "global_sparsity": ..., "sparsity_structure": "unstructured", "targets": [...],
"ignore": [...], ...}, "transform_config": {}}` (`quantization_config`).

optimum-owl's writer differs from the library's in two ways its reader does not see: an element is stored when its
bit pattern is non-zero (the library stores `tensor != 0`, dropping `-0.0`), so the round trip is bit-identical; and
every file's safetensors metadata has `owl_format` (`files.CT_FORMAT_NAME`) and `owl_crc32_dense`, the CRC-32 of
every tensor in the file, which optimum-owl's readers check. transformers 5.x cannot load this format by itself
(docs/checkpoints.md): `formats.compressed_tensors_load.load_dense` and `optimum_owl.inference.load_sparse` read it.

int8 values: compressed-tensors stacks a quantization compressor and the sparse-bitmask one; an `int-quantized`
symmetric int8 weight-only scheme (`config_groups`) stores the codes as `.compressed` and their scales as
`<module>.weight_scale` (`[out, 1]` per row, `[out, groups]` per group), value = code * scale: optimum-owl's int8
convention, written and read here.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer

from ..errors import OWLCheckpointError
from ..utils import is_conv1d
from .bitmask import (
    BITMASK_SUFFIX,
    SCALE_SUFFIX,
    SHAPE_SUFFIX,
    compress,
    crc32,
    pack_bits,
    stored_mask,
    worth_compressing,
)
from .compact import compressible_names
from .files import CT_FORMAT_NAME, METADATA_DENSE_CRC_KEY, METADATA_FORMAT_KEY

logger = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
SPARSE_FORMAT = "sparse-bitmask"
# The compressed-tensors release whose layout is written (and that the tests decompress with); the library drops it.
LAYOUT_VERSION = "0.13.0"
PARTS = ("compressed", "bitmask", "shape", "row_offsets")
# int8 codes (compressed-tensors' `int-quantized` weights, then sparse-bitmask over the codes): the scales beside them
SCALE, ZERO_POINT = "weight_scale", "weight_zero_point"
INT8_FORMATS = ("int-quantized", "naive-quantized")
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
_FIX = "the checkpoint is corrupt or was not written by a sparse-bitmask compressor; re-save or re-download it"


# ------------------------------------------------------------------------------------------------- config
def sparsity_config_of(quant: Any, where: Any = "the checkpoint") -> dict[str, Any] | None:
    """The `sparsity_config` of a `config.json` `quantization_config` (dict or config object) that describes a
    compressed-tensors `sparse-bitmask` checkpoint; `None` when the checkpoint is not compressed-tensors at all.

    Raises `OWLCheckpointError` for compressed-tensors checkpoints optimum-owl cannot read: another sparsity format
    (`dense`: the weights are plain tensors, load them with `from_pretrained` and `optimum_owl.sparsify`), or
    quantization other than int8 weight-only (`int8_group_size`).
    """
    quant = _as_dict(quant)
    if quant.get("quant_method") != QUANT_METHOD:
        return None
    int8_group_size(quant, where)  # refuses the quantization schemes optimum-owl has no form for
    sparsity = dict(quant.get("sparsity_config") or {})
    fmt = sparsity.get("format")
    if fmt != SPARSE_FORMAT:
        hint = (" Its weights are stored as plain tensors: load it with `from_pretrained` (compressed-tensors "
                "installed) and call `optimum_owl.sparsify(model)`." if fmt == "dense" else "")
        raise OWLCheckpointError(f"{where} is a compressed-tensors checkpoint with sparsity format {fmt!r}; optimum-owl "
                                 f"reads the {SPARSE_FORMAT!r} format only.{hint}")
    return sparsity


def _as_dict(quant: Any) -> dict[str, Any]:
    if quant is None:
        return {}
    if isinstance(quant, dict):
        return quant
    return quant.to_dict() if hasattr(quant, "to_dict") else dict(vars(quant))


def int8_group_size(quant: Any, where: Any = "the checkpoint") -> tuple[bool, int | None]:
    """`(True, group_size)` when a compressed-tensors `quantization_config` quantizes weights to int8 (symmetric,
    weight-only, one scale per output row: group size None, or per row and group of inputs), `(False, None)` when it
    quantizes nothing. Raises `OWLCheckpointError` for any other scheme (activations, other bit widths, packed
    formats, zero points, several different schemes): optimum-owl's int8 values are exactly this one."""
    quant = _as_dict(quant)
    groups = list((quant.get("config_groups") or {}).values())
    if not groups:
        return False, None
    found: set[int | None] = set()
    for group in groups:
        weights = group.get("weights") or {}
        fmt = group.get("format") or quant.get("format")
        strategy = weights.get("strategy")
        if (group.get("input_activations") or weights.get("num_bits") != 8 or weights.get("type") != "int"
                or not weights.get("symmetric") or weights.get("dynamic") or strategy not in ("channel", "group")
                or fmt not in INT8_FORMATS):
            raise OWLCheckpointError(
                f"{where} is quantized by compressed-tensors with a scheme optimum-owl has no form for (format {fmt!r}, "
                f"weights {weights}, input activations {group.get('input_activations')}); it reads float values and "
                "int8 weight-only values (symmetric, per output row or group). Load it with transformers and "
                "compressed-tensors.")
        found.add(int(weights["group_size"]) if strategy == "group" else None)
    if len(found) > 1:
        raise OWLCheckpointError(f"{where} quantizes its weights with several group sizes {sorted(map(str, found))}; "
                                 "optimum-owl reads one int8 scheme per checkpoint.")
    return True, found.pop()


def checkpoint_quantization_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The `quantization_config` of a local folder's `config.json` (None without one)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("quantization_config")
    except (json.JSONDecodeError, AttributeError) as err:
        raise OWLCheckpointError(f"{config} is not valid JSON ({err}); re-save the checkpoint.") from None


def is_sparse_bitmask_checkpoint(path: str | os.PathLike) -> bool:
    """Whether a local folder holds a compressed-tensors `sparse-bitmask` checkpoint (read from its config.json)."""
    quant = checkpoint_quantization_config(path)
    return (isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD
            and (quant.get("sparsity_config") or {}).get("format") == SPARSE_FORMAT)


def quantization_config(global_sparsity: float, targets: list[str], ignore: list[str],
                        int8: dict[str, int | None] | None = None) -> dict[str, Any]:
    """`config.json`'s `quantization_config` of a sparse-bitmask checkpoint, as compressed-tensors writes it; with
    `int8` (`{module: group size}`) also the int8 weight-only scheme of those modules (`int-quantized`, the layout of
    compressed-tensors' stacked quantization + sparse-bitmask compression)."""
    config: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "sparsity_config": {"format": SPARSE_FORMAT, "global_sparsity": global_sparsity, "ignore": ignore,
                            "registry_requires_subclass": False, "sparsity_structure": "unstructured",
                            "targets": targets},
        "transform_config": {},
        "version": LAYOUT_VERSION,
    }
    if not int8:
        return config
    sizes = set(int8.values())
    if len(sizes) > 1:
        raise ValueError(f"int8 weights with several group sizes {sorted(map(str, sizes))}: compressed-tensors' "
                         "config has one scheme here; save with the default compact format.")
    group_size = sizes.pop()
    weights = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": group_size, "num_bits": 8,
               "observer": "minmax", "observer_kwargs": {}, "scale_dtype": None,
               "strategy": "channel" if group_size is None else "group", "symmetric": True, "type": "int",
               "zp_dtype": None}
    scheme = {"format": INT8_FORMATS[0], "input_activations": None, "output_activations": None,
              "targets": sorted(int8), "weights": weights}
    return {"config_groups": {"group_0": scheme}, "format": INT8_FORMATS[0], "global_compression_ratio": None,
            "ignore": [], "kv_cache_scheme": None, "quantization_status": "compressed", **config}


# ------------------------------------------------------------------------------------------------- parts
def weight_keys(keys: Collection[str], where: Any = "the checkpoint") -> dict[str, list[str]]:
    """`{weight name: [its .compressed, .bitmask, .shape, .row_offsets keys, then .weight_scale and
    .weight_zero_point where present]}` of every compressed weight among `keys`; raises `OWLCheckpointError` naming a
    weight whose parts are incomplete."""
    out: dict[str, list[str]] = {}
    for prefix in sorted(k.removesuffix(".bitmask") for k in keys if k.endswith(".bitmask")):
        parts = [f"{prefix}.{part}" for part in PARTS]
        missing = [k for k in parts if k not in keys]
        if missing:
            raise OWLCheckpointError(f"`{prefix}.weight` is stored as {SPARSE_FORMAT} but {missing} is missing from "
                                     f"{where}: truncated or partially copied files; re-download or re-save them.")
        out[prefix + ".weight"] = parts + [f"{prefix}.{k}" for k in (SCALE, ZERO_POINT) if f"{prefix}.{k}" in keys]
    return out


def to_owl_parts(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor, row_offsets: torch.Tensor,
                 name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One weight's sparse-bitmask parts as optimum-owl's compact parts `(values, bitmask, shape)`
    (`formats.bitmask`), after checking every length, the row offsets and the padding bits; never builds the dense
    weight. Raises `OWLCheckpointError` naming `name` on any inconsistency."""
    if shape.dtype not in (torch.int64, torch.int32) or shape.dim() != 1 or shape.numel() != 2:
        raise OWLCheckpointError(f"`{name}`: `.shape` must hold the 2 dims of a linear weight as int64, got "
                                 f"{shape.dtype} {list(shape.shape)}: {_FIX}.")
    rows, cols = (int(d) for d in shape.tolist())
    if rows < 0 or cols < 0:
        raise OWLCheckpointError(f"`{name}`: `.shape` holds a negative dimension {[rows, cols]}: {_FIX}.")
    width = math.ceil(cols / 8)
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, width):
        raise OWLCheckpointError(f"`{name}`: `.bitmask` must be uint8 [{rows}, {width}] for a {[rows, cols]} weight, "
                                 f"got {bitmask.dtype} {list(bitmask.shape)}: {_FIX}.")
    if not (compressed.dtype.is_floating_point or compressed.dtype == torch.int8) or compressed.dim() != 1:
        raise OWLCheckpointError(f"`{name}`: `.compressed` must be a 1-D float or int8 tensor, got {compressed.dtype} "
                                 f"{list(compressed.shape)}: {_FIX}.")
    packed = bitmask.detach().cpu().contiguous().numpy()
    if rows and cols % 8 and (packed[:, -1] >> (cols % 8)).any():
        raise OWLCheckpointError(f"`{name}`: `.bitmask` has padding bits set after column {cols}: {_FIX}.")
    counts = _POPCOUNT[packed].sum(axis=1) if rows else np.zeros(0, dtype=np.int64)
    if int(counts.sum()) != compressed.numel():
        raise OWLCheckpointError(f"`{name}`: the bitmask marks {int(counts.sum())} stored elements but `.compressed` "
                                 f"holds {compressed.numel()} (mask/values length mismatch): {_FIX}.")
    offsets = row_offsets.detach().cpu().reshape(-1)
    if offsets.dtype not in (torch.int64, torch.int32) or offsets.numel() != rows or not np.array_equal(
            offsets.numpy().astype(np.int64), np.cumsum(counts) - counts):
        raise OWLCheckpointError(f"`{name}`: `.row_offsets` do not match the bitmask's rows (each must be the number "
                                 f"of stored elements before its row): {_FIX}.")
    if cols % 8 == 0:
        flat = bitmask.detach().cpu().reshape(-1)
    else:
        flat = pack_bits(torch.from_numpy(np.unpackbits(packed, axis=1, count=cols, bitorder="little").view(bool)))
    return compressed, flat, torch.tensor([rows, cols], dtype=torch.int64)


def from_owl_parts(values: torch.Tensor, bitmask: torch.Tensor, shape: list[int] | tuple[int, ...]) -> dict[str, torch.Tensor]:
    """optimum-owl's compact parts of a 2-D weight as the four sparse-bitmask parts (`{part: tensor}`, `PARTS`)."""
    rows, cols = (int(d) for d in shape)
    if cols % 8 == 0:
        rowmask = bitmask.detach().cpu().reshape(rows, cols // 8)
    else:
        bits = np.unpackbits(bitmask.detach().cpu().numpy(), count=rows * cols, bitorder="little").reshape(rows, cols)
        rowmask = torch.from_numpy(np.packbits(bits, axis=1, bitorder="little"))
    counts = _POPCOUNT[rowmask.numpy()].sum(axis=1) if rows else np.zeros(0, dtype=np.int64)
    offsets = torch.from_numpy((np.cumsum(counts) - counts).astype(np.int64))
    return {"compressed": values, "bitmask": rowmask, "shape": torch.tensor([rows, cols], dtype=torch.int64),
            "row_offsets": offsets}


# ------------------------------------------------------------------------------------------------- writing
def compressed_tensors_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """The model's state dict in the sparse-bitmask layout, the safetensors metadata (format name, CRC-32 of every
    tensor) and the `quantization_config` for `config.json`.

    The weights compressed are those optimum-owl's compact format compresses (`compressible_names`, sparse enough to
    save bytes) and every weight already held compressed in memory (`optimum_owl.sparsify`'s `SparseLinear`: its
    parts are converted, no dense copy is made). int8 values (a `SparseLinear` with int8 codes, or a weight on a
    recorded int8 grid) are written as compressed-tensors' int8 weight-only scheme: the codes as `.compressed`, their
    float32 scales as `.weight_scale` (`[out, 1]`, or `[out, groups]`).
    """
    from .int8 import encode_int8, int8_grid

    state = model.state_dict()
    eligible = set(compressible_names(model))
    held = {k.removesuffix(BITMASK_SUFFIX) for k in state if k.endswith(BITMASK_SUFFIX)}
    held = {n for n in held if n in state and n + SHAPE_SUFFIX in state}
    out: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}  # compressed module -> its class name for `targets`
    int8: dict[str, int | None] = {}  # module with int8 codes -> group size
    zeros = total = 0
    for name, tensor in state.items():
        base = name.removesuffix(BITMASK_SUFFIX).removesuffix(SHAPE_SUFFIX).removesuffix(SCALE_SUFFIX)
        prefix = base.removesuffix(".weight")
        module = model.get_submodule(prefix) if base in held or name in eligible else None
        scales = None
        if base in held:
            if name != base:
                continue
            parts = from_owl_parts(tensor, state[base + BITMASK_SUFFIX], state[base + SHAPE_SUFFIX].tolist())
            if tensor.dtype == torch.int8:
                scales, int8[prefix] = state[base + SCALE_SUFFIX], getattr(module, "group_size", None)
        elif name in eligible and tensor.is_floating_point() and tensor.dim() == 2:
            dense = tensor
            if dense.device.type == "meta":
                from transformers.integrations.accelerate import load_offloaded_parameter

                dense = load_offloaded_parameter(model, name)
            dense, grid = dense.detach().cpu(), int8_grid(module)
            if grid is not None:  # dense float values on a recorded int8 grid: written as their codes
                values, bitmask, shape, scales = encode_int8(dense, grid, _is_conv1d_like(module), name)
                parts, int8[prefix] = from_owl_parts(values, bitmask, shape.tolist()), grid.group_size
            else:
                mask = stored_mask(dense)
                if not worth_compressing(dense, mask):
                    out[name] = tensor
                    zeros, total = zeros + int(dense.numel() - mask.sum()), total + dense.numel()
                    continue
                parts = from_owl_parts(*compress(dense, mask)[:2], list(dense.shape))
        else:
            out[name] = tensor
            if tensor.is_floating_point() and tensor.device.type != "meta":
                zeros, total = zeros + int(tensor.numel() - torch.count_nonzero(tensor)), total + tensor.numel()
            continue
        kinds[prefix] = "Conv1D" if _is_conv1d_like(module) else "Linear"
        if scales is not None:
            if kinds[prefix] == "Conv1D":
                raise ValueError(f"`{base}`: compressed-tensors' int8 scales are per output row of an nn.Linear weight; "
                                 "this GPT-2 Conv1D weight has int8 values: save with the default compact format.")
            out[f"{prefix}.{SCALE}"] = scales.float().reshape(scales.shape[0], -1)
        out.update({f"{prefix}.{part}": value for part, value in parts.items()})
        numel = math.prod(parts["shape"].tolist())
        zeros, total = zeros + numel - parts["compressed"].numel(), total + numel
    ignore = [n for n, m in model.named_modules() if n not in kinds and (isinstance(m, nn.Linear) or is_conv1d(m))]
    crc = {n: [crc32(t), str(t.dtype).removeprefix("torch.")] for n, t in out.items() if t.device.type != "meta"}
    metadata = {METADATA_FORMAT_KEY: CT_FORMAT_NAME, METADATA_DENSE_CRC_KEY: json.dumps(crc, sort_keys=True)}
    config = quantization_config(round(zeros / total, 6) if total else 0.0, sorted(set(kinds.values())), ignore, int8)
    logger.info("compressed-tensors checkpoint: %d weights stored as %s (%d with int8 values)", len(kinds),
                SPARSE_FORMAT, len(int8))
    return out, metadata, config


def _is_conv1d_like(module: nn.Module) -> bool:
    return is_conv1d(module) or bool(getattr(module, "transposed", False))  # SparseLinear made from a Conv1D


class _SaveOnce(HfQuantizer):
    """Hands `save_pretrained` the compressed-tensors state dict and metadata (attached for one save only)."""

    def __init__(self, state: dict[str, torch.Tensor], metadata: dict[str, str], config: dict[str, Any]) -> None:
        super().__init__(config, pre_quantized=True)
        self._state, self._metadata = state, metadata

    def get_state_dict_and_metadata(self, model: nn.Module):
        return self._state, dict(self._metadata)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        return model


def write_compressed_tensors(model: nn.Module, folder: str | os.PathLike, **save_kwargs: Any) -> None:
    """`model.save_pretrained(folder, **save_kwargs)` in the sparse-bitmask layout with its `quantization_config`
    (into an existing folder; `optimum_owl.serialization.save_pruned` and `save_compressed_tensors` write atomically).
    The model is left as it was: its own quantizer and config come back after the save."""
    state, metadata, config = compressed_tensors_state_dict(model)
    missing = object()
    saved = {attr: vars(model).get(attr, missing) for attr in ("hf_quantizer", "quantization_method")}
    qconfig = getattr(model.config, "quantization_config", missing)
    try:
        model.hf_quantizer = _SaveOnce(state, metadata, config)
        if saved["quantization_method"] is not missing:  # "owl" would otherwise be written beside our config
            del model.quantization_method
        model.config.quantization_config = config
        model.save_pretrained(folder, **save_kwargs)
    finally:
        for attr, value in saved.items():
            if value is missing:
                if attr in vars(model):
                    delattr(model, attr)
            else:
                setattr(model, attr, value)
        if qconfig is missing:
            del model.config.quantization_config
        else:
            model.config.quantization_config = qconfig
