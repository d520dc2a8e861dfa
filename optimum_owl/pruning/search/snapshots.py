"""Host copies of the prunable weights, for the searches (optimum_owl.pruning.search.search).

- `snapshot` / `restore`: the dense weights, one CPU tensor per unit (as much host memory as the prunable weights),
  restored before each candidate is pruned.
- `pack_masks` / `restore_masked`: a pruned candidate kept as 1 bit per weight (1/32 of float32), set where the
  weight's bit pattern is not all zeros. A mask-only criterion (Wanda, magnitude, DSnoT: kept weights unchanged,
  pruned ones set to +0.0) is rebuilt from them and the dense copy bit for bit, without pruning it again: a kept
  weight reads back its dense value, and a dense +0.0 that was kept reads back +0.0 either way. With int8 values the
  rebuilt weights are rounded to nearest again, which gives the grid the candidate had (a kept weight that rounded to
  zero is missing from the mask, and rounds to zero again either way).
"""

from __future__ import annotations

import torch

from ...formats.bitmask import pack_bits, stored_mask, unpack_bits
from ..int8 import round_unit
from ..passes import RunState, each_block


def snapshot(state: RunState) -> list[list[torch.Tensor]]:
    """A CPU copy of every unit's weight, per block."""
    out: list[list[torch.Tensor]] = []
    each_block(state, lambda i: out.append([u.weight().detach().to("cpu", copy=True) for u in state.units[i]]))
    return out


def restore(state: RunState, saved: list[list[torch.Tensor]]) -> None:
    """Copy `snapshot`'s tensors back into the model's weights, in place."""

    def visit(i: int) -> None:
        for u, w in zip(state.units[i], saved[i]):
            target = u.weight()
            target.copy_(w.to(target.device, target.dtype))

    each_block(state, visit)


def pack_masks(state: RunState) -> list[list[torch.Tensor]]:
    """Every unit's non-zero pattern as packed bits (`uint8`, CPU), per block."""
    out: list[list[torch.Tensor]] = []
    each_block(state, lambda i: out.append([pack_bits(stored_mask(u.weight())) for u in state.units[i]]))
    return out


def restore_masked(state: RunState, dense: list[list[torch.Tensor]], masks: list[list[torch.Tensor]]) -> None:
    """Set every weight to its dense copy with the weights outside `masks` zeroed (a mask-only criterion's result)."""

    def visit(i: int) -> None:
        for u, w, packed in zip(state.units[i], dense[i], masks[i]):
            target = u.weight()
            keep = unpack_bits(packed, w.numel()).view(w.shape)
            target.copy_(w.masked_fill(~keep, 0).to(target.device, target.dtype))
            if state.config.values == "int8":  # rounded to nearest again, exactly as when the candidate was pruned
                state.int8[u.name] = round_unit(u, state.config.group_size)

    each_block(state, visit)
