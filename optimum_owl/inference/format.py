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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import OWLCheckpointError
from ..formats.bitmask import check_parts, compress

VALUE_PADDING = 16
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

    @property
    def nnz(self) -> int:
        return int(self.offsets[-1])


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
    padded = torch.zeros(values.numel() + VALUE_PADDING, dtype=values.dtype)
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


def unpack_dense(packed: Packed, transposed: bool = False) -> torch.Tensor:
    """The dense weight (bit-identical to the one `pack_dense` was given)."""
    out, inp = packed.out_features, packed.in_features
    dtype = packed.values.dtype
    keep = np.unpackbits(packed.mask.cpu().numpy(), axis=1, bitorder="little")[:, :inp].view(bool)
    stored = _int_view(packed.values[: packed.nnz]).numpy()
    dense = np.zeros((out, inp), dtype=stored.dtype)
    dense[keep] = stored
    weight = torch.from_numpy(dense).view(dtype)
    return weight.t().contiguous() if transposed else weight


def unpack_dense_torch(mask: torch.Tensor, values: torch.Tensor, out: int, inp: int, nnz: int) -> torch.Tensor:
    """Torch-only (any device) dense rebuild used by the pure-PyTorch forward; no bit-exactness guarantee needed
    beyond what indexing gives (it is exact)."""
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    keep = ((mask.unsqueeze(-1) >> shifts) & 1).bool().reshape(out, -1)[:, :inp]
    dense = torch.zeros(out, inp, dtype=values.dtype, device=values.device)
    dense[keep] = values[:nnz]
    return dense


def from_checkpoint_parts(
    values: torch.Tensor, bitmask: torch.Tensor, shape: list[int] | tuple[int, ...], transposed: bool, name: str
) -> Packed:
    """Sparse form straight from a checkpoint's `(values, bitmask, shape)` (shape as stored: `[in, out]` for
    Conv1D), without building the dense weight. Raises `OWLCheckpointError` naming `name` on inconsistent parts."""
    dims = [int(d) for d in shape]
    check_parts(values.numel(), values.dtype, bitmask.numel(), bitmask.dtype, dims, name)
    if len(dims) != 2:
        raise OWLCheckpointError(f"`{name}` has dense shape {dims}; a linear weight must be 2-D.")
    rows, cols = dims
    packed_bytes = bitmask.reshape(-1).cpu().numpy()
    if int(_POPCOUNT[packed_bytes].sum()) != values.numel():
        check_parts(values.numel(), values.dtype, bitmask.numel(), bitmask.dtype, dims, name,
                    nonzeros=int(_POPCOUNT[packed_bytes].sum()))
    if not transposed and cols % 8 == 0:
        # The checkpoint's rows are already whole bytes: only pad each row to 64-bit words.
        wpr = words_per_row(cols)
        mask = np.zeros((rows, 8 * wpr), dtype=np.uint8)
        mask[:, : cols // 8] = packed_bytes[: rows * cols // 8].reshape(rows, cols // 8)
        return _from_mask_bytes(torch.from_numpy(mask), values.reshape(-1), rows, cols)
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
    return _finish(keep_padded, vals, cols)


def to_checkpoint_parts(packed: Packed, transposed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(values, bitmask, shape)` in the compact checkpoint layout (`docs/checkpoints.md`)."""
    out, inp = packed.out_features, packed.in_features
    if not transposed and inp % 8 == 0:
        values = packed.values[: packed.nnz]
        bitmask = packed.mask[:, : inp // 8].reshape(-1).clone()
        return values, bitmask, torch.tensor([out, inp], dtype=torch.int64)
    return compress(unpack_dense(packed, transposed))
