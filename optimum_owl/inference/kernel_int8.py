"""Argument checks for the kernel's int8 entry points (`owl_decode_q8`, `owl_expand_q8`: csrc/sparse_linear_q8.h).

int8 values are the bitmask and row offsets of the float form plus int8 `codes` (the stored elements' codes in
row-major order, then `INT8_VALUE_PADDING` zero bytes: the kernels read past a row's last code) and float32 `scales`,
`[out]` (one per output row, `group_size=None`) or `[out, groups]` (one per row and group of `group_size` inputs, a
multiple of 64: whole 64-bit mask words). A stored element's value is `code * scale` (`algorithms.quantize`). These
checks are cheap (no pass over the data) and raise a ValueError naming the argument and what it must be; the kernel
relies on them (`kernel.KernelOps`), so a wrong buffer is an error, never a read out of bounds.
"""

from __future__ import annotations

import math

import torch

from .format import DTYPE_CODES, INT8_VALUE_PADDING

# The kernel's dtype codes for its decode-path switch (`owl_set_isa`): the float value dtypes, and 3 for int8 codes.
ISA_CODES = {**DTYPE_CODES, torch.int8: 3}


def group_words(group_size: int | None, width: int) -> int:
    """64-bit mask words per scale group (0: one scale per row), after checking `group_size`."""
    if group_size is None:
        return 0
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 64 or group_size % 64:
        raise ValueError(f"owl kernel: group_size must be None (one scale per output row) or a positive multiple of "
                         f"64 such as 128 (whole 64-bit mask words), got {group_size!r}")
    return group_size // 64


def check_int8_weight(mask: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor,
                      group_size: int | None) -> int:
    """Check int8 weight buffers (module docstring); return the words per scale group (0: per row)."""
    if not (mask.dtype == torch.uint8 and mask.dim() == 2 and mask.is_contiguous() and mask.shape[1] % 8 == 0
            and mask.shape[1] > 0):
        raise ValueError("owl kernel: mask must be contiguous uint8 [out, 8 * words per row]")
    out, width = mask.shape[0], mask.shape[1] * 8
    if not (offsets.dtype == torch.int64 and offsets.is_contiguous() and offsets.numel() == out + 1):
        raise ValueError(f"owl kernel: offsets must be contiguous int64 [out + 1] = [{out + 1}]")
    if not (codes.dtype == torch.int8 and codes.dim() == 1 and codes.is_contiguous()):
        raise ValueError(f"owl kernel: int8 values must be a contiguous 1-D int8 tensor of codes, got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    tensors = {"mask": mask, "codes": codes, "offsets": offsets, "scales": scales}
    elsewhere = [name for name, t in tensors.items() if t.device.type != "cpu"]
    if elsewhere:
        raise ValueError(f"owl kernel: {', '.join(elsewhere)} must be on the CPU")
    nnz = int(offsets[-1]) if out else 0
    if codes.numel() < nnz + INT8_VALUE_PADDING:
        raise ValueError(f"owl kernel: codes must hold the {nnz} stored codes then {INT8_VALUE_PADDING} bytes of "
                         f"padding (INT8_VALUE_PADDING), got {codes.numel()} elements")
    words = group_words(group_size, width)
    groups = math.ceil(width / group_size) if group_size is not None else None
    expected = (out,) if groups is None else (out, groups)
    shape_ok = tuple(scales.shape) == expected or (groups is None and scales.dim() == 2 and scales.shape == (out, 1))
    if not (scales.dtype == torch.float32 and scales.is_contiguous() and shape_ok):
        raise ValueError(f"owl kernel: scales must be contiguous float32 {list(expected)} (group_size={group_size}), "
                         f"got {scales.dtype} {list(scales.shape)}")
    return words


def check_activations(x: torch.Tensor, width: int) -> int:
    """Check decode activations (`[n, in]`, `in` the weight's in_features or its padded width `width`); return the
    kernel's dtype code of `x`."""
    if not (x.dtype in DTYPE_CODES and x.dim() == 2 and x.is_contiguous() and x.device.type == "cpu"
            and width - 64 < x.shape[1] <= width):
        raise ValueError(f"owl kernel: x must be contiguous float32/bfloat16/float16 on the CPU, [n, in] with in in "
                         f"({width - 64}, {width}], got {x.dtype} {tuple(x.shape)}")
    return DTYPE_CODES[x.dtype]


def check_bias(bias: torch.Tensor | None, out: int) -> None:
    if bias is not None and not (bias.dtype == torch.float32 and bias.is_contiguous() and bias.numel() == out
                                 and bias.device.type == "cpu"):
        raise ValueError(f"owl kernel: bias must be None or contiguous float32 [{out}] on the CPU, got {bias.dtype} "
                         f"{tuple(bias.shape)}")


def check_tile(tile: torch.Tensor, mask: torch.Tensor, r0: int, r1: int) -> int:
    """Check a prefill tile for rows `[r0, r1)`; return its dtype code (0 float32, 1 bfloat16)."""
    if not 0 <= r0 <= r1 <= mask.shape[0]:
        raise ValueError(f"owl kernel: rows [{r0}, {r1}) are not inside [0, {mask.shape[0]})")
    width = mask.shape[1] * 8
    if not (tile.dtype in (torch.float32, torch.bfloat16) and tile.dim() == 2 and tile.is_contiguous()
            and tile.shape[0] >= r1 - r0 and tile.shape[1] == width):
        raise ValueError(f"owl kernel: the tile must be contiguous float32/bfloat16 [>= {r1 - r0}, {width}], got "
                         f"{tile.dtype} {tuple(tile.shape)}")
    return 0 if tile.dtype == torch.float32 else 1
