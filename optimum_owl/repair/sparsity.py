"""Which weights of a (possibly PEFT-wrapped) model are prunable, where their zeros are, and how sparse each block is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..algorithms.masks import is_valid_nm
from ..pruning.modeling import get_blocks_and_units

# Sub-module names PEFT adds inside a wrapped layer; their weights are adapter parameters, never pruned weights.
ADAPTER_MARKERS = (".lora_", ".hira_", ".shira_")


@dataclass(eq=False)
class PrunableParam:
    """One prunable parameter tensor (an `nn.Linear`/`Conv1D` weight or a fused-experts tensor).

    Attributes:
        name: module name without PEFT's `.base_layer` (`model.layers.0.self_attn.q_proj`).
        block: index of the transformer block.
        param: the parameter (any orientation; masks use the stored layout).
        module: the owning module.
    """

    name: str
    block: int
    param: nn.Parameter
    module: nn.Module


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a `PeftModel` (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def clean_name(name: str) -> str:
    return name.replace(".base_layer", "")


def prunable_params(model: nn.Module, block_name: str | None = None) -> list[PrunableParam]:
    """Every prunable parameter of the model's blocks, once each, adapters excluded."""
    base = unwrap_peft(model)
    _, _, units = get_blocks_and_units(base, block_name)
    seen: set[int] = set()
    out: list[PrunableParam] = []
    for b, block_units in enumerate(units):
        for unit in block_units:
            if any(marker in unit.name for marker in ADAPTER_MARKERS):
                continue
            p = unit.parameter()
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = unit.name if unit.expert is None else unit.name.rsplit(".", 1)[0]
            out.append(PrunableParam(clean_name(name), b, p, unit.module))
    return out


@torch.no_grad()
def zero_masks(model: nn.Module, block_name: str | None = None, only_sparse: bool = True) -> dict[str, torch.Tensor]:
    """`{name: bool tensor True where the weight is exactly 0}` for each prunable parameter (holding zeros)."""
    masks: dict[str, torch.Tensor] = {}
    for pp in prunable_params(model, block_name):
        zeros = pp.param.detach() == 0
        if only_sparse and not bool(zeros.any()):
            continue
        masks[pp.name] = zeros
    return masks


@torch.no_grad()
def block_sparsity(model: nn.Module, block_name: str | None = None) -> tuple[list[float], float]:
    """Per-block and overall fraction of exact zeros over the prunable weights."""
    zeros: dict[int, int] = {}
    counts: dict[int, int] = {}
    for pp in prunable_params(model, block_name):
        zeros[pp.block] = zeros.get(pp.block, 0) + int((pp.param.detach() == 0).sum())
        counts[pp.block] = counts.get(pp.block, 0) + pp.param.numel()
    blocks = [zeros[b] / counts[b] for b in sorted(counts)]
    total = sum(zeros.values()) / max(sum(counts.values()), 1)
    return blocks, total


@torch.no_grad()
def zeros_lost(model: nn.Module, before: dict[str, torch.Tensor], block_name: str | None = None) -> dict[str, int]:
    """`{name: count}` of positions that were zero in `before` but are not zero now (empty when all kept)."""
    now = {pp.name: pp.param for pp in prunable_params(model, block_name)}
    lost: dict[str, int] = {}
    for name, zeros in before.items():
        if name not in now:
            lost[name] = int(zeros.sum())
            continue
        bad = int((zeros.to(now[name].device) & (now[name].detach() != 0)).sum())
        if bad:
            lost[name] = bad
    return lost


def detect_nm(weight: torch.Tensor, candidates: tuple[tuple[int, int], ...] = ((2, 4), (4, 8), (1, 4))) -> tuple[int, int] | None:
    """The first N:M pattern in `candidates` that an `[out, in]` weight satisfies exactly at sparsity 1 − n/m."""
    if weight.dim() != 2:
        return None
    for n, m in candidates:
        if weight.shape[1] % m == 0 and abs(float((weight == 0).float().mean()) - (1 - n / m)) < 1e-9:
            if is_valid_nm(weight, n, m):
                return n, m
    return None


class MaskKeeper:
    """Pruned-position masks for trainable parameters, enforced on gradients (hooks) and on weights (`apply`)."""

    def __init__(self) -> None:
        self.pruned: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
        self._hooks: list[Any] = []

    def set(self, name: str, param: nn.Parameter, pruned: torch.Tensor) -> None:
        self.pruned[name] = (param, pruned)

    def install_hooks(self) -> None:
        self.remove_hooks()
        for param, pruned in self.pruned.values():
            if param.requires_grad:
                self._hooks.append(param.register_hook(lambda g, m=pruned: g.masked_fill(m.to(g.device), 0)))

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def apply(self, optimizer: Any = None) -> None:
        for param, pruned in self.pruned.values():
            param.data.masked_fill_(pruned.to(param.device), 0)
            state = getattr(optimizer, "state", {}).get(param) if optimizer is not None else None
            if isinstance(state, dict):
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value.masked_fill_(pruned.to(value.device), 0)
