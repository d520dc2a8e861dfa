"""int8 values in the compact checkpoint (`owl-bitmask-v2`): the grid a module's weight lies on, and the codec
between a dense weight on that grid and its stored parts (codes under the mask + scales).

A model pruned with `OWLPrunerConfig(values="int8")` holds ordinary float weights whose kept values are
`code * scale` (computed in float32, cast to the model's dtype; `optimum_owl.algorithms.quantize`). The pruning run
records each quantized `nn.Linear` / GPT-2 `Conv1D` weight's scales on its module (`set_int8_grid`; a plain attribute,
not a buffer: `state_dict`, `.to()` and everything else that walks parameters are unchanged), and
`formats.compact.compact_state_dict` stores such a weight as int8 codes + `_scale` (`encode_int8`), checking that the
codes reproduce the weight bit for bit. Loading decodes it back (`decode_int8`) and records the grid again, so a
reloaded model saves as int8 again.

Orientation: scales are per OUTPUT feature (`[out]` or `[out, groups]`, groups over the INPUT features), for a GPT-2
`Conv1D` (stored `[in, out]`) too; the codes follow the stored layout, row-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..algorithms.quantize import check_group_size, dequantize_int8, quantize_int8
from ..errors import OWLCheckpointError
from .bitmask import compress, stored_mask

# the attribute of a module whose `weight` lies on an int8 grid
INT8_ATTR = "owl_int8_grid"


@dataclass(frozen=True)
class Int8Grid:
    """The int8 grid of one weight: float32 CPU `scales` (`[out]`, or `[out, groups]` with `group_size`)."""

    scales: torch.Tensor
    group_size: int | None = None


def set_int8_grid(module: nn.Module, scales: torch.Tensor, group_size: int | None = None) -> Int8Grid:
    """Record that `module.weight` holds `code * scales` values (`scales` per output feature); returns the grid."""
    check_group_size(group_size)
    grid = Int8Grid(scales.detach().to("cpu", torch.float32).contiguous().clone(), group_size)
    object.__setattr__(module, INT8_ATTR, grid)  # not through nn.Module.__setattr__: never a buffer or submodule
    return grid


def int8_grid(module: nn.Module | None) -> Int8Grid | None:
    """The grid `set_int8_grid` recorded on `module`, or None (float values)."""
    grid = getattr(module, INT8_ATTR, None) if module is not None else None
    return grid if isinstance(grid, Int8Grid) else None


def drop_int8_grids(model: nn.Module) -> int:
    """Forget every recorded int8 grid of `model` (its weights are left as they are), so that it saves float values
    (`owl-bitmask-v1`): for a model whose weights were changed after quantization, e.g. fine-tuned. Returns how many
    grids were dropped."""
    count = 0
    for module in model.modules():
        if INT8_ATTR in module.__dict__:
            del module.__dict__[INT8_ATTR]
            count += 1
    return count


def _output_major(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    return tensor.t() if transposed else tensor


def encode_int8(
    stored: torch.Tensor, grid: Int8Grid, transposed: bool = False, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(codes, bitmask, shape, scales)` of a dense 2-D weight in its stored layout (CPU) that lies on `grid`.

    The stored elements are those whose bit pattern is not zero (as in `owl-bitmask-v1`), their codes row-major over
    the stored layout. Raises `OWLCheckpointError` naming `name` when the codes do not give the weight back bit for
    bit (the weight changed after it was quantized)."""
    if stored.dim() != 2 or not stored.is_floating_point():
        raise OWLCheckpointError(f"`{name}`: only 2-D float weights are stored as int8, got {stored.dtype} "
                                 f"{list(stored.shape)}.")
    weight = _output_major(stored, transposed)
    if grid.scales.shape[0] != weight.shape[0]:
        raise OWLCheckpointError(f"`{name}`: its recorded int8 scales cover {grid.scales.shape[0]} output features, "
                                 f"the weight has {weight.shape[0]}; quantize it again (prune with values='int8').")
    codes = quantize_int8(weight, grid.scales, grid.group_size)
    back = dequantize_int8(codes, grid.scales, grid.group_size, weight.dtype)
    int_view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    differ = back.view(int_view) != weight.contiguous().view(int_view)
    if bool(differ.any()):
        count = int(differ.sum())
        raise OWLCheckpointError(
            f"`{name}`: {count} of its {weight.numel()} values are not on the int8 grid recorded when it was "
            "quantized (the weights changed afterwards: fine-tuned, or edited). Save float values instead with "
            "`optimum_owl.formats.drop_int8_grids(model)` before saving, or prune with values='int8' again."
        )
    codes_stored = _output_major(codes, transposed).contiguous()
    mask = stored_mask(stored)
    values, bitmask, shape = compress(codes_stored, mask)
    return values, bitmask, shape, grid.scales


def decode_int8(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int | None, transposed: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense weight (stored layout, contiguous) from its dense int8 `codes` in the stored layout: `code * scale`
    computed in float32, cast to `dtype`."""
    weight = dequantize_int8(_output_major(codes, transposed), scales, group_size, torch.float32)
    return _output_major(weight, transposed).to(dtype).contiguous()
