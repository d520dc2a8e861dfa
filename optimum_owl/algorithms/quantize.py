"""Symmetric weight-only int8 quantization: the one convention every part of optimum-owl uses (pure math).

A weight `W` (`[out, in]`, rows = output features) is stored as

- `codes`: `int8`, same shape, in `[-127, 127]` (-128 is never used, so the grid is symmetric);
- `scales`: `float32`, one per output row (`[out]`, `group_size=None`) or one per row and group of `group_size`
  consecutive inputs (`[out, ceil(in / group_size)]`; group `k` covers inputs `[k * g, (k + 1) * g)`);

and its value is `codes.float() * scale` (float32), the scale of the element's row (and group). A scale is the
largest absolute value the row (group) keeps, divided by 127; a row (group) that keeps nothing non-zero gets scale
1.0, so its codes are 0 and nothing divides by zero. Codes round half to even (`torch.round`).

Only the elements a `keep` mask marks (all, when it is None) set the scales: pruned zeros never widen the grid.
"""

from __future__ import annotations

import math

import torch

QMAX = 127
VALUES = ("float", "int8")  # the value forms: the model's own float dtype, or int8 codes with float32 scales


def check_values(values: str, field: str = "values") -> str:
    """`values` if it names a known value form, else a ValueError naming `field` and the choices."""
    if values not in VALUES:
        raise ValueError(f"{field} must be one of {VALUES} (the stored values' form), got {values!r}.")
    return values


def check_group_size(group_size: int | None, field: str = "group_size") -> int | None:
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
        raise ValueError(f"{field} must be None (one scale per output row) or a positive int such as 128 (one scale "
                         f"per row and group of that many inputs), got {group_size!r}.")
    return group_size


def _grouped(t: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """`[out, in]` -> `[out, groups, g]` (zero-padded past `in`); `[out, 1, in]` without groups."""
    out, inp = t.shape
    if group_size is None:
        return t.reshape(out, 1, inp)
    groups = max(1, math.ceil(inp / group_size))
    pad = groups * group_size - inp
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(out, groups, group_size)


def int8_scales(weight: torch.Tensor, keep: torch.Tensor | None = None, group_size: int | None = None) -> torch.Tensor:
    """float32 scales (`[out]`, or `[out, groups]` with `group_size`) of a 2-D `weight` over its kept elements."""
    check_group_size(group_size)
    w = weight.detach().float().abs()
    if keep is not None:
        w = w * keep.to(torch.bool)
    amax = _grouped(w, group_size).amax(dim=-1)
    scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    return scales.reshape(-1) if group_size is None else scales


def expand_scales(scales: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """The scale of every element, `[out, in]` float32."""
    if group_size is None:
        return scales.reshape(-1, 1).expand(-1, in_features)
    return scales.repeat_interleave(group_size, dim=1)[:, :in_features]


def quantize_int8(weight: torch.Tensor, scales: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """int8 codes of a 2-D `weight` on the grid of `scales` (values beyond it clamp to +-127)."""
    full = expand_scales(scales.float(), weight.shape[1], group_size)
    return torch.clamp(torch.round(weight.detach().float() / full), -QMAX, QMAX).to(torch.int8)


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, group_size: int | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense values `codes * scale` (computed in float32), in `dtype`."""
    full = expand_scales(scales.float(), codes.shape[1], group_size)
    return (codes.float() * full).to(dtype)


def quantize_dequantize(weight: torch.Tensor, keep: torch.Tensor | None = None,
                        group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of a 2-D weight: `(codes, scales, dequantized weight in weight's dtype)`; pruned elements
    (`keep` False) stay exactly zero."""
    scales = int8_scales(weight, keep, group_size)
    codes = quantize_int8(weight, scales, group_size)
    if keep is not None:
        codes = codes * keep.to(torch.int8)
    return codes, scales, dequantize_int8(codes, scales, group_size, weight.dtype)


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """`||W - approx||_F / ||W||_F` in float64 (0.0 for an all-zero weight)."""
    w = weight.detach().double()
    norm = float(w.norm())
    return 0.0 if norm == 0 else float((w - approx.detach().double()).norm()) / norm
