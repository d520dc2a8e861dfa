"""Conversions between a dense weight, the in-memory sparse form and the compact checkpoint parts.

In-memory sparse form (`Packed`) of a weight with `out` rows and `in` columns (a GPT-2 `Conv1D` weight, stored
`[in, out]`, is transposed first so that rows are always output features):

- `mask`: `uint8 [out, 8 * wpr]`, `wpr = ceil(in / 64)`: row `r` is a little-endian bitmap over the row's inputs
  (bit `k` of byte `j` set = element `8 j + k` stored, least significant bit first), zero-padded to whole 64-bit
  words so the kernel reads one `uint64` per 64 inputs.
- `values`: the stored elements in row-major order, in the weight's dtype, followed by `VALUE_PADDING` zeros (the
  kernel loads 8 (AVX2) or 16 (AVX-512, bf16 / fp16) values at a time past each row's last non-zero).
- `offsets`: `int64 [out + 1]`, prefix sum of the rows' popcounts.

An element is stored when its bit pattern is not all zeros (`-0.0` is kept), exactly as in the checkpoint format
(`optimum_owl.formats.bitmask`), so dense -> sparse -> dense is bit-identical. Checkpoint parts are the flat
`(values, bitmask, shape)` of `docs/checkpoints.md`; for an `nn.Linear` whose `in` is a multiple of 8 the values are
the same buffer and the mask rows are the same bytes, so loading one never builds the dense weight.

int8 values (`Packed.scales` set): `values` holds the int8 codes of the stored elements (row-major, then
`INT8_VALUE_PADDING` zero bytes), `scales` the float32 scales, `[out]` or `[out, ceil(in / group_size)]`; a stored
element's value is `code * scale` computed in float32 (`optimum_owl.algorithms.quantize`). The stored set is the
float weight's (a kept element whose code rounds to 0 stays stored), so the zero set never changes. The checkpoint's
`owl-bitmask-v2` parts add `<name>_scale` (docs/checkpoints.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..algorithms.quantize import QMAX, check_group_size, dequantize_int8
from ..errors import OWLCheckpointError
from ..formats.bitmask import SCALE_SUFFIX, check_parts, check_scale, compress

VALUE_PADDING = 16
# int8 codes: zero bytes after the last code. The kernel's AVX2 loops load 16 bytes at the first code of every mask
# byte, so they read up to 15 bytes past a row's last code (the AVX-512 expand-load reads only the codes it selects);
# 64 = one whole 64-byte vector loaded at the last code (csrc/sparse_linear_q8.h), checked by `kernel_int8`.
INT8_VALUE_PADDING = 64
# The value / activation dtypes of the kernel's C entry points and their codes there (csrc/sparse_linear.cpp).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


@dataclass
class Packed:
    """A weight in the in-memory sparse form (see the module docstring)."""

    mask: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    out_features: int
    in_features: int
    scales: torch.Tensor | None = None  # int8 values only: float32 `[out]` or `[out, groups]`
    group_size: int | None = None  # int8 values with one scale per row and group of this many inputs

    @property
    def nnz(self) -> int:
        return int(self.offsets[-1])

    @property
    def int8(self) -> bool:
        return self.scales is not None


def words_per_row(in_features: int) -> int:
    return max(1, math.ceil(in_features / 64))


def _int_view(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().cpu().view(_INT_VIEW[t.element_size()])


def _finish(keep_padded: np.ndarray, values: torch.Tensor, in_features: int) -> Packed:
    """Pack a bool `[out, 64 * wpr]` keep-matrix (zero-padded) and the row-major stored values."""
    out = keep_padded.shape[0]
    mask = np.packbits(keep_padded, axis=1, bitorder="little")
    return _from_mask_bytes(torch.from_numpy(mask), values, out, in_features)


def _from_mask_bytes(mask: torch.Tensor, values: torch.Tensor, out: int, in_features: int) -> Packed:
    counts = _POPCOUNT[mask.numpy()].sum(axis=1) if out else np.zeros(0, dtype=np.int64)
    offsets = torch.zeros(out + 1, dtype=torch.int64)
    offsets[1:] = torch.from_numpy(np.cumsum(counts))
    padding = INT8_VALUE_PADDING if values.dtype == torch.int8 else VALUE_PADDING
    padded = torch.zeros(values.numel() + padding, dtype=values.dtype)
    padded[: values.numel()] = values.reshape(-1)
    return Packed(mask.contiguous(), padded, offsets, out, in_features)


def pack_dense(weight: torch.Tensor, transposed: bool = False) -> Packed:
    """Sparse form of a dense 2-D weight (`transposed=True` for a GPT-2 `Conv1D` weight stored `[in, out]`)."""
    if weight.dim() != 2:
        raise ValueError(f"Expected a 2-D weight, got shape {list(weight.shape)}.")
    w = weight.detach().cpu()
    if transposed:
        w = w.t()
    out, inp = w.shape
    ints = _int_view(w).reshape(out, inp).numpy()
    keep = np.zeros((out, 64 * words_per_row(inp)), dtype=bool)
    keep[:, :inp] = ints != 0
    values = torch.from_numpy(ints[keep[:, :inp]]).view(w.dtype)
    return _finish(keep, values, inp)


def _keep(packed: Packed) -> np.ndarray:
    """bool `[out, in]`: which elements are stored."""
    mask = packed.mask.cpu().numpy()
    return np.unpackbits(mask, axis=1, bitorder="little")[:, : packed.in_features].view(bool)


def unpack_stored(packed: Packed) -> torch.Tensor:
    """The dense `[out, in]` matrix of the stored values as they are (int8 values: the codes), zeros elsewhere."""
    stored = _int_view(packed.values[: packed.nnz]).numpy()
    dense = np.zeros((packed.out_features, packed.in_features), dtype=stored.dtype)
    dense[_keep(packed)] = stored
    return torch.from_numpy(dense).view(packed.values.dtype)


def unpack_dense(packed: Packed, transposed: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight: for float values bit-identical to the one `pack_dense` was given; for int8 values the
    dequantized `code * scale` (computed in float32), in `dtype` (default float32)."""
    weight = unpack_stored(packed)
    if packed.int8:
        weight = dequantize_int8(weight, packed.scales, packed.group_size, dtype or torch.float32)
    return weight.t().contiguous() if transposed else weight


def _groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else max(1, math.ceil(in_features / group_size))


def scale_index(packed: Packed, group_size: int | None) -> torch.Tensor:
    """int64 `[nnz]`: for every stored element (in storage order), the index of its scale in the flattened scales."""
    counts = packed.offsets[1:] - packed.offsets[:-1]
    rows = torch.repeat_interleave(torch.arange(packed.out_features), counts.cpu())
    if group_size is None:
        return rows
    cols = torch.from_numpy(np.nonzero(_keep(packed))[1])
    return rows * _groups(packed.in_features, group_size) + torch.div(cols, group_size, rounding_mode="floor")


def quantize_packed(packed: Packed, group_size: int | None = None, scales: torch.Tensor | None = None) -> Packed:
    """int8 values of a float `Packed` (same mask, same stored set): round-to-nearest on float32 scales computed from
    the stored values (largest magnitude / 127 per output row, or per row and group of `group_size` inputs; 1.0 where
    a row / group keeps nothing non-zero), or on the given `scales` (a grid recorded when the model was quantized).
    Gives the codes and scales of `optimum_owl.algorithms.quantize.quantize_dequantize` on the dense weight, bit for
    bit, without building it."""
    check_group_size(group_size)
    if packed.int8:
        raise ValueError("quantize_packed: the values are int8 already")
    out, nnz = packed.out_features, packed.nnz
    values = packed.values[:nnz].float()
    index = scale_index(packed, group_size)
    groups = _groups(packed.in_features, group_size)
    if scales is None:
        amax = torch.zeros(out * groups).scatter_reduce_(0, index, values.abs(), "amax")
        scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    scales = scales.detach().to("cpu", torch.float32).reshape(out, groups)
    scales = (scales.reshape(-1) if group_size is None else scales).contiguous()
    codes = torch.zeros(nnz + INT8_VALUE_PADDING, dtype=torch.int8)
    codes[:nnz] = torch.clamp(torch.round(values / scales.reshape(-1)[index]), -QMAX, QMAX).to(torch.int8)
    return Packed(packed.mask, codes, packed.offsets, out, packed.in_features, scales, group_size)


def dense_int8_packed(codes: torch.Tensor, scales: torch.Tensor) -> Packed:
    """An int8 `Packed` that stores every element of a dense `[out, in]` int8 matrix (all mask bits set) with one
    scale per row; `values[: out * in].view(out, in)` is the matrix itself, row-major."""
    out, inp = codes.shape
    row = np.zeros(64 * words_per_row(inp), dtype=bool)
    row[:inp] = True
    mask = torch.from_numpy(np.tile(np.packbits(row, bitorder="little"), (out, 1)))
    values = torch.zeros(out * inp + INT8_VALUE_PADDING, dtype=torch.int8)
    values[: out * inp] = codes.reshape(-1)
    offsets = torch.arange(out + 1, dtype=torch.int64) * inp
    return Packed(mask, values, offsets, out, inp, scales.detach().float().contiguous(), None)


def dequantize_packed(packed: Packed, dtype: torch.dtype) -> Packed:
    """The float `Packed` (values `code * scale` computed in float32, cast to `dtype`) of an int8 one."""
    nnz = packed.nnz
    codes = packed.values[:nnz].float()
    values = torch.zeros(nnz + VALUE_PADDING, dtype=dtype)
    values[:nnz] = (codes * packed.scales.reshape(-1)[scale_index(packed, packed.group_size)]).to(dtype)
    return Packed(packed.mask, values, packed.offsets, packed.out_features, packed.in_features)


def unpack_dense_torch(mask: torch.Tensor, values: torch.Tensor, out: int, inp: int, nnz: int) -> torch.Tensor:
    """Torch-only (any device) dense rebuild used by the pure-PyTorch forward; no bit-exactness guarantee needed
    beyond what indexing gives (it is exact)."""
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    keep = ((mask.unsqueeze(-1) >> shifts) & 1).bool().reshape(out, -1)[:, :inp]
    dense = torch.zeros(out, inp, dtype=values.dtype, device=values.device)
    dense[keep] = values[:nnz]
    return dense


def from_checkpoint_parts(
    values: torch.Tensor, bitmask: torch.Tensor, shape: list[int] | tuple[int, ...], transposed: bool, name: str,
    scales: torch.Tensor | None = None, group_size: int | None = None,
) -> Packed:
    """Sparse form straight from a checkpoint's `(values, bitmask, shape)` (shape as stored: `[in, out]` for
    Conv1D), and for int8 values (`owl-bitmask-v2`) the codes with their `scales` (`[out]`, or `[out, groups]` with
    `group_size`), without building the dense weight. Raises `OWLCheckpointError` naming `name` on inconsistent
    parts."""
    dims = [int(d) for d in shape]
    int8 = scales is not None
    check_parts(values.numel(), values.dtype, bitmask.numel(), bitmask.dtype, dims, name, int8=int8)
    if len(dims) != 2:
        raise OWLCheckpointError(f"`{name}` has dense shape {dims}; a linear weight must be 2-D.")
    if int8:
        check_scale(list(scales.shape), scales.dtype, dims, group_size, name, transposed)
        if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
            raise OWLCheckpointError(f"`{name}{SCALE_SUFFIX}` holds a scale that is not a positive finite number: the "
                                     "checkpoint is corrupt or was edited; re-save it from the pruned model.")
    rows, cols = dims
    packed_bytes = bitmask.reshape(-1).cpu().numpy()
    if int(_POPCOUNT[packed_bytes].sum()) != values.numel():
        check_parts(values.numel(), values.dtype, bitmask.numel(), bitmask.dtype, dims, name,
                    nonzeros=int(_POPCOUNT[packed_bytes].sum()), int8=int8)
    if not transposed and cols % 8 == 0:
        # The checkpoint's rows are already whole bytes: only pad each row to 64-bit words.
        wpr = words_per_row(cols)
        mask = np.zeros((rows, 8 * wpr), dtype=np.uint8)
        mask[:, : cols // 8] = packed_bytes[: rows * cols // 8].reshape(rows, cols // 8)
        packed = _from_mask_bytes(torch.from_numpy(mask), values.reshape(-1), rows, cols)
    else:
        keep = np.unpackbits(packed_bytes, count=rows * cols, bitorder="little").view(bool).reshape(rows, cols)
        vals = values.reshape(-1)
        if transposed:
            r, c = np.nonzero(keep)
            order = np.lexsort((r, c))  # row-major order of the transposed [cols, rows] matrix
            vals = vals[torch.from_numpy(order)]
            keep = keep.T
            rows, cols = cols, rows
        keep_padded = np.zeros((rows, 64 * words_per_row(cols)), dtype=bool)
        keep_padded[:, :cols] = keep
        packed = _finish(keep_padded, vals, cols)
    if int8:
        packed.scales = scales.detach().cpu().contiguous()
        packed.group_size = group_size
    return packed


def to_checkpoint_parts(packed: Packed, transposed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(values, bitmask, shape)` in the compact checkpoint layout (`docs/checkpoints.md`); for int8 values the codes
    (row-major over the stored layout, every stored element kept even where its code is 0), to be saved with
    `packed.scales` as `<name>_scale`."""
    out, inp = packed.out_features, packed.in_features
    if not transposed and inp % 8 == 0:
        values = packed.values[: packed.nnz]
        bitmask = packed.mask[:, : inp // 8].reshape(-1).clone()
        return values, bitmask, torch.tensor([out, inp], dtype=torch.int64)
    if not packed.int8:
        return compress(unpack_dense(packed, transposed))
    keep, codes = _keep(packed), unpack_stored(packed).numpy()
    if transposed:
        keep, codes = keep.T, codes.T
    values = torch.from_numpy(np.ascontiguousarray(codes[keep]))
    bitmask = torch.from_numpy(np.packbits(keep.ravel(), bitorder="little"))
    return values, bitmask, torch.tensor(list(keep.shape), dtype=torch.int64)
