"""Pure pack/unpack math of the compact ONNX weight storage: a keep-mask packed 8 weights per byte plus the
non-zero values in row-major order.

The bits are packed by THE codec (`optimum_owl.formats.bitmask.pack_bits`). Bit order is little-endian within each byte: weight `k` of the flattened tensor lives in byte `k // 8`, bit
`k % 8` (value `1 << (k % 8)`). The graph-side decoder in `optimum_owl.export.storage` uses the same order.
"""

from __future__ import annotations

import numpy as np
import torch

from ..formats.bitmask import pack_bits, unpack_bits


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Pack a boolean array into `uint8` bytes, 8 flattened (row-major) elements per byte, little-endian bits.

    Args:
        mask (`np.ndarray`): boolean array of any shape (True = the weight is kept).

    Returns:
        `np.ndarray`: 1-D `uint8` array of length `ceil(mask.size / 8)`; padding bits are zero.

    Example:

    ```python
    >>> pack_mask(np.array([True, False, False, False, False, False, False, False, True]))
    array([1, 1], dtype=uint8)
    ```
    """
    flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
    return pack_bits(torch.from_numpy(flat)).numpy()


def unpack_mask(packed: np.ndarray, numel: int) -> np.ndarray:
    """Inverse of `pack_mask`: the first `numel` bits of `packed` as a flat boolean array.

    Args:
        packed (`np.ndarray`): `uint8` bytes from `pack_mask`.
        numel (`int`): number of elements of the original tensor.

    Returns:
        `np.ndarray`: 1-D boolean array of length `numel`.
    """
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size * 8 < numel:
        raise ValueError(f"`packed` holds {packed.size * 8} bits but `numel` is {numel}; the mask is truncated.")
    return unpack_bits(torch.from_numpy(packed), numel).numpy()


def encode_bitmask(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split a tensor into its packed non-zero mask and its non-zero values (row-major order).

    Args:
        weight (`np.ndarray`): any numeric array.

    Returns:
        `(packed_mask, values)`: `uint8` bytes and a 1-D array of `weight.dtype` holding the non-zeros.
    """
    flat = np.ascontiguousarray(weight).reshape(-1)
    mask = flat != 0
    return pack_mask(mask), flat[mask]


def decode_bitmask(packed: np.ndarray, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Rebuild the dense tensor from `encode_bitmask` output (reference for the in-graph decoder).

    Args:
        packed (`np.ndarray`): packed mask bytes.
        values (`np.ndarray`): the non-zero values, row-major.
        shape (`tuple[int, ...]`): shape of the dense tensor.

    Returns:
        `np.ndarray`: dense array of `values.dtype` and `shape`.
    """
    numel = int(np.prod(shape)) if len(shape) else 1
    mask = unpack_mask(packed, numel)
    if int(mask.sum()) != values.size:
        raise ValueError(f"the mask has {int(mask.sum())} set bits but {values.size} values were given.")
    out = np.zeros(numel, dtype=values.dtype)
    out[mask] = values
    return out.reshape(shape)


def bitmask_nbytes(numel: int, nnz: int, itemsize: int) -> int:
    """Bytes used by the bitmask layout: `ceil(numel / 8)` mask bytes plus `nnz * itemsize` value bytes."""
    return (numel + 7) // 8 + nnz * itemsize


def coo_nbytes(nnz: int, itemsize: int) -> int:
    """Bytes used by an ONNX `sparse_initializer` with linear int64 indices: `nnz * (itemsize + 8)`."""
    return nnz * (itemsize + 8)
