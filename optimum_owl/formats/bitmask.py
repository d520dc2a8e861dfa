"""THE bitmask codec: the pure math behind compact checkpoints, resume files and the ONNX weight storage.

A tensor `W` with `numel` elements is stored as three tensors:

- `bitmask` (`uint8`, `ceil(numel / 8)` bytes): bit `k` of byte `j` (value `1 << k`, least significant bit first,
  i.e. NumPy `np.packbits(mask, bitorder="little")`) says whether element `8 * j + k` of `W.reshape(-1)` (row-major)
  is stored. Padding bits after `numel` are zero.
- `values` (1-D, the dtype of `W`): the stored elements in row-major order; `len(values) == popcount(bitmask)`.
- `shape` (`int64`, 1-D): the dense shape of `W`.

An element is stored when its *bit pattern* is not all zeros, so `-0.0` and NaN payloads survive and the round trip
is bit-identical (`+0.0` is the only value left out). The dense tensor is rebuilt as zeros with `values` scattered
back. The format pays off above `1 / (8 * itemsize)` sparsity (3.1% in fp32, 6.25% in fp16/bf16); at 70% sparsity it
takes `0.30 + 1 / (8 * itemsize)` of the dense bytes: 0.331× in fp32, 0.3625× in fp16/bf16.

Example:

```python
>>> import torch
>>> from optimum_owl.formats.bitmask import compress, decompress
>>> w = torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.0, -0.0]])
>>> values, bitmask, shape = compress(w)
>>> values.tolist(), bitmask.tolist(), shape.tolist()
([1.5, 2.0, -0.0], [42], [2, 3])
>>> torch.equal(decompress(values, bitmask, shape, name="w").view(torch.int32), w.view(torch.int32))
True

```
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from ..errors import OWLCheckpointError

__all__ = [
    "BITMASK_SUFFIX",
    "FORMAT_NAME",
    "FORMAT_NAMES",
    "FORMAT_NAME_INT8",
    "SCALE_SUFFIX",
    "SHAPE_SUFFIX",
    "check_parts",
    "check_scale",
    "compress",
    "compressed_nbytes",
    "crc32",
    "decompress",
    "pack_bits",
    "popcount",
    "stored_mask",
    "unpack_bits",
    "worth_compressing",
]

FORMAT_NAME = "owl-bitmask-v1"
# A file holding int8 values (int8 codes under the mask + float32 scales, `<name>_scale`): docs/checkpoints.md
FORMAT_NAME_INT8 = "owl-bitmask-v2"
FORMAT_NAMES = (FORMAT_NAME, FORMAT_NAME_INT8)  # the versions this optimum-owl reads
# Suffixes appended to a parameter name (`q_proj.weight` -> `q_proj.weight_bitmask`); the values keep the name.
BITMASK_SUFFIX = "_bitmask"
SHAPE_SUFFIX = "_shape"
SCALE_SUFFIX = "_scale"  # int8 values only: float32 scales, `[out]` or `[out, groups]`

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# set bits per byte value (popcount lookup)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _int_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as a flat, contiguous CPU integer tensor of the same element size."""
    flat = tensor.detach().reshape(-1)
    view = _INT_VIEW.get(flat.element_size())
    if view is None:
        raise TypeError(f"Cannot bitmask-compress dtype {tensor.dtype} (element size {flat.element_size()}).")
    return flat.contiguous().cpu().view(view)


def stored_mask(tensor: torch.Tensor) -> torch.Tensor:
    """Flat bool mask (CPU) of the elements to store: `True` where the element's bit pattern is not all zeros."""
    return torch.from_numpy(_int_view(tensor).numpy() != 0)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a flat bool tensor into `uint8`, least significant bit first (`np.packbits(..., bitorder="little")`)."""
    bits = mask.detach().reshape(-1).cpu().numpy().astype(bool, copy=False)
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` bits of `packed` as a flat bool tensor."""
    data = packed.detach().reshape(-1).cpu().numpy()
    return torch.from_numpy(np.unpackbits(data, count=numel, bitorder="little").view(bool))


def popcount(packed: torch.Tensor) -> int:
    """Number of set bits in a `uint8` tensor."""
    return int(_POPCOUNT[packed.detach().reshape(-1).cpu().numpy()].sum(dtype=np.int64))


def compress(tensor: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split `tensor` into `(values, bitmask, shape)` on CPU (see the module docstring for the layout).

    `mask` may pass a precomputed `stored_mask(tensor)`.
    """
    ints = _int_view(tensor).numpy()
    keep = ints != 0 if mask is None else mask.numpy()
    values = torch.from_numpy(ints[keep]).view(tensor.dtype)
    bitmask = pack_bits(torch.from_numpy(keep))
    return values, bitmask, torch.tensor(list(tensor.shape), dtype=torch.int64)


def compressed_nbytes(numel: int, nonzeros: int, itemsize: int) -> int:
    """Bytes of the three tensors' data for a tensor of `numel` elements with `nonzeros` stored elements."""
    return math.ceil(numel / 8) + nonzeros * itemsize


def worth_compressing(tensor: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    """True when the bitmask form takes fewer data bytes than the dense tensor (sparsity above 1/(8*itemsize)).

    `mask` may pass a precomputed `stored_mask(tensor)`.
    """
    if not tensor.is_floating_point() or tensor.dim() < 2 or tensor.numel() == 0:
        return False
    nonzeros = int(torch.count_nonzero(stored_mask(tensor) if mask is None else mask))
    # shape tensor and two extra safetensors header entries cost ~200 bytes
    return compressed_nbytes(tensor.numel(), nonzeros, tensor.element_size()) + 256 < tensor.numel() * tensor.element_size()


def check_parts(
    values_numel: int,
    values_dtype: torch.dtype,
    bitmask_numel: int,
    bitmask_dtype: torch.dtype,
    shape: tuple[int, ...] | list[int],
    name: str,
    expected_shape: tuple[int, ...] | None = None,
    nonzeros: int | None = None,
    int8: bool = False,
) -> None:
    """Validate the metadata of one compressed tensor; raise `OWLCheckpointError` naming `name`.

    Args:
        values_numel, values_dtype: size and dtype of the stored values (a float dtype, or int8 codes with `int8`).
        bitmask_numel, bitmask_dtype: size and dtype of the packed mask.
        shape: the dense shape recorded in the checkpoint.
        name: parameter name used in error messages.
        expected_shape: the model's shape for this parameter, if known.
        nonzeros: popcount of the mask, if already computed.
        int8: the weight has a `_scale` entry (`owl-bitmask-v2`): its values must be int8 codes (`check_scale`
            checks the scales).
    """
    fix = "the checkpoint is corrupt or was edited; re-save it from the pruned model (or re-download it)"
    if bitmask_dtype != torch.uint8:
        raise OWLCheckpointError(f"`{name}{BITMASK_SUFFIX}` must be uint8, got {bitmask_dtype}: {fix}.")
    if int8 and values_dtype != torch.int8:
        raise OWLCheckpointError(f"`{name}` has a `{name}{SCALE_SUFFIX}` entry, so its values must be int8 codes, "
                                 f"got {values_dtype}: {fix}.")
    if not int8 and values_dtype == torch.int8:
        raise OWLCheckpointError(f"`{name}` stores int8 codes but `{name}{SCALE_SUFFIX}` (their scales) is missing "
                                 f"(truncated or partially copied shards?): {fix}.")
    if not int8 and not values_dtype.is_floating_point:
        raise OWLCheckpointError(f"`{name}` (bitmask values) must be a float tensor, got {values_dtype}: {fix}.")
    if any(int(d) < 0 for d in shape):
        raise OWLCheckpointError(f"`{name}{SHAPE_SUFFIX}` holds a negative dimension {list(shape)}: {fix}.")
    if expected_shape is not None and tuple(int(d) for d in shape) != tuple(expected_shape):
        raise OWLCheckpointError(
            f"`{name}` has dense shape {list(shape)} in the checkpoint but the model expects {list(expected_shape)}: "
            "the checkpoint does not belong to this model config (check config.json), or it is corrupt."
        )
    numel = math.prod(int(d) for d in shape)
    if bitmask_numel != math.ceil(numel / 8):
        raise OWLCheckpointError(
            f"`{name}{BITMASK_SUFFIX}` has {bitmask_numel} bytes but a {list(shape)} tensor needs "
            f"{math.ceil(numel / 8)}: {fix}."
        )
    if values_numel > numel:
        raise OWLCheckpointError(f"`{name}` stores {values_numel} values for only {numel} elements: {fix}.")
    if nonzeros is not None and nonzeros != values_numel:
        raise OWLCheckpointError(
            f"`{name}`: the bitmask marks {nonzeros} stored elements but {values_numel} values are stored "
            f"(mask/values length mismatch): {fix}."
        )


def check_scale(
    scale_shape: tuple[int, ...] | list[int],
    scale_dtype: torch.dtype,
    shape: tuple[int, ...] | list[int],
    group_size: int | None,
    name: str,
    transposed: bool | None = None,
) -> None:
    """Validate the `_scale` entry of an int8 weight of dense stored `shape`; raise `OWLCheckpointError` naming it.

    The scales are float32, `[out]` (`group_size` None) or `[out, ceil(in / group_size)]`, `out` being the output
    features: the stored rows, or the stored columns of a `transposed` (GPT-2 `Conv1D`, `[in, out]`) weight; with
    `transposed=None` (no model to ask) either orientation is accepted."""
    fix = "the checkpoint is corrupt or was edited; re-save it from the pruned model (or re-download it)"
    if scale_dtype != torch.float32:
        raise OWLCheckpointError(f"`{name}{SCALE_SUFFIX}` must be float32, got {scale_dtype}: {fix}.")
    dims = [int(d) for d in shape]
    if len(dims) != 2:
        raise OWLCheckpointError(f"`{name}` has int8 values but a {len(dims)}-D shape {dims}; only 2-D weights "
                                 f"are stored as int8: {fix}.")
    orientations = [False, True] if transposed is None else [transposed]
    wanted = []
    for t in orientations:
        out, inp = (dims[1], dims[0]) if t else (dims[0], dims[1])
        wanted.append([out] if group_size is None else [out, max(1, math.ceil(inp / group_size))])
    if [int(d) for d in scale_shape] not in wanted:
        per = "per output row" if group_size is None else f"per output row and group of {group_size} inputs"
        raise OWLCheckpointError(
            f"`{name}{SCALE_SUFFIX}` has shape {list(scale_shape)} but a weight of stored shape {dims} with one scale "
            f"{per} needs {' or '.join(str(w) for w in wanted)}: {fix}."
        )


def decompress(
    values: torch.Tensor,
    bitmask: torch.Tensor,
    shape: torch.Tensor | tuple[int, ...] | list[int],
    name: str = "tensor",
    expected_shape: tuple[int, ...] | None = None,
    int8: bool = False,
) -> torch.Tensor:
    """Rebuild the dense tensor from `(values, bitmask, shape)` after checking every length; raises
    `OWLCheckpointError` naming `name` on any inconsistency (never returns a wrong tensor silently). With `int8`
    (the weight has scales) the values are int8 codes and so is the result (`formats.int8.decode_int8` scales it)."""
    dims = [int(d) for d in (shape.reshape(-1).tolist() if isinstance(shape, torch.Tensor) else shape)]
    if isinstance(shape, torch.Tensor) and shape.dtype != torch.int64:
        raise OWLCheckpointError(f"`{name}{SHAPE_SUFFIX}` must be int64, got {shape.dtype}; re-save the checkpoint.")
    check_parts(values.numel(), values.dtype, bitmask.numel(), bitmask.dtype, dims, name, expected_shape, int8=int8)
    numel = math.prod(dims)
    packed = bitmask.detach().reshape(-1).cpu().numpy()
    if numel % 8 and int(packed[-1]) >> (numel % 8):
        raise OWLCheckpointError(f"`{name}{BITMASK_SUFFIX}` has padding bits set after element {numel}: corrupt file.")
    count = int(_POPCOUNT[packed].sum(dtype=np.int64))
    if count != values.numel():
        check_parts(values.numel(), values.dtype, bitmask.numel(), bitmask.dtype, dims, name, nonzeros=count, int8=int8)
    keep = np.unpackbits(packed, count=numel, bitorder="little").view(bool)
    if values.device.type != "cpu":
        dense = torch.zeros(numel, dtype=values.dtype, device=values.device)
        dense.masked_scatter_(torch.from_numpy(keep).to(values.device), values.reshape(-1))
        return dense.view(dims)
    stored = _int_view(values).numpy()
    dense_bits = np.zeros(numel, dtype=stored.dtype)
    dense_bits[keep] = stored
    return torch.from_numpy(dense_bits).view(values.dtype).view(dims)


def crc32(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's raw bytes (contiguous, CPU)."""
    t = tensor.detach().contiguous().cpu().reshape(-1)
    if t.numel() == 0:
        return 0
    return zlib.crc32(memoryview(t.view(torch.uint8).numpy()))
