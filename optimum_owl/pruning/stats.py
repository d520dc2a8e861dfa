"""Calibration statistics of one block, collected with forward hooks while the block runs.

- `RowNorms`: Σ_tokens x_j² per input feature j (fp32). Wanda's ‖X_j‖₂ is its square root. It also keeps Σ_tokens x_j
  (the feature means, used by the DSnoT refinement).
- `Hessian`: Σ_tokens x xᵀ (fp32), SparseGPT's H up to the factor 2/N (scale does not change SparseGPT's result).

Units that read the same input tensor (q/k/v, gate/up) share one computation per forward: the hook keeps the
last input it saw and reuses its reduction when the next unit receives the very same tensor object.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .modeling import Unit, expert_param_names

STATS_DTYPE = torch.float32  # bf16/fp16 sums lose the small columns


class RowNorms:
    """Running Σ x_j² (and Σ x_j) over tokens, per input feature."""

    def __init__(self) -> None:
        self.sum_sq: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.tokens = 0

    def add(self, sum_sq: torch.Tensor, tokens: int, sum_x: torch.Tensor | None = None) -> None:
        self.sum_sq = sum_sq.clone() if self.sum_sq is None else self.sum_sq.add_(sum_sq)
        if sum_x is not None:
            self.sum = sum_x.clone() if self.sum is None else self.sum.add_(sum_x)
        self.tokens += tokens

    def moments(self, columns: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean E[x_j] and mean square E[x_j²] over the tokens seen (zeros when none were seen)."""
        if self.sum_sq is None or self.sum is None or self.tokens == 0:
            zeros = torch.zeros(columns, dtype=STATS_DTYPE, device=device)
            return zeros, zeros.clone()
        mean, mean_sq = self.sum / self.tokens, self.sum_sq / self.tokens
        return (mean.to(device), mean_sq.to(device)) if device is not None else (mean, mean_sq)

    def rms(self) -> torch.Tensor | None:
        """Root mean square per feature, sqrt(Σ x_j² / tokens); `None` before any token was seen."""
        if self.sum_sq is None or self.tokens == 0:
            return None
        return (self.sum_sq / self.tokens).sqrt()

    def all_reduce(self) -> None:
        """Sum Σ x², Σ x and the token count over the ranks of an initialised `torch.distributed` group."""
        if self.sum_sq is None:
            return
        torch.distributed.all_reduce(self.sum_sq)
        if self.sum is not None:
            torch.distributed.all_reduce(self.sum)
        t = torch.tensor([float(self.tokens)], device=self.sum_sq.device)
        torch.distributed.all_reduce(t)
        self.tokens = int(t.item())

    def norms(self, columns: int, device: torch.device | None = None) -> torch.Tensor:
        """‖X_j‖₂ over all tokens seen (zeros for a unit that saw none, e.g. an unused expert)."""
        if self.sum_sq is None:
            return torch.zeros(columns, dtype=STATS_DTYPE, device=device)
        return self.sum_sq.sqrt().to(device) if device is not None else self.sum_sq.sqrt()


def merge_stats(into: BlockStats, other: BlockStats) -> None:
    """Add `other`'s row-norm sums to `into`'s, unit by unit: as if `into` had also seen `other`'s batches, in order."""
    for name, acc in other.stats.items():
        target = into.stats[name]
        if not isinstance(acc, RowNorms) or not isinstance(target, RowNorms):
            raise TypeError("merge_stats merges row-norm statistics only.")
        if acc.sum_sq is not None:
            target.add(acc.sum_sq, acc.tokens, acc.sum)


class Hessian:
    """Running Σ x xᵀ over tokens."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.tokens = 0

    def add(self, xtx: torch.Tensor, tokens: int) -> None:
        self.h = xtx.clone() if self.h is None else self.h.add_(xtx)
        self.tokens += tokens

    def matrix(self, columns: int, device: torch.device | None = None) -> torch.Tensor:
        if self.h is None:
            return torch.zeros(columns, columns, dtype=STATS_DTYPE, device=device)
        return self.h.to(device) if device is not None else self.h

    def norms(self, columns: int, device: torch.device | None = None) -> torch.Tensor:
        """‖X_j‖₂ from the diagonal of Σ x xᵀ (= Σ x_j², as `RowNorms.norms`)."""
        return torch.diagonal(self.matrix(columns, device)).clamp_min(0).sqrt()


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(STATS_DTYPE)


# Rows reduced at a time by `_sums`: a [tokens, features] square would be a large temporary (allocating it costs more
# than the arithmetic); chunks of this many rows stay in cache and make the reduction several times faster.
_CHUNK_ROWS = 256


def _sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Σ x_j² and Σ x_j over all rows of `x` viewed as [tokens, features], in `STATS_DTYPE`, chunk by chunk."""
    rows = x.reshape(-1, x.shape[-1])
    sum_sq = torch.zeros(rows.shape[1], dtype=STATS_DTYPE, device=rows.device)
    total = torch.zeros_like(sum_sq)
    for chunk in rows.split(_CHUNK_ROWS):
        chunk = chunk.to(STATS_DTYPE)
        sum_sq += chunk.pow(2).sum(0)
        total += chunk.sum(0)
    return sum_sq, total, rows.shape[0]


class _Reducer:
    """Reduces an input tensor once even when several units read it."""

    def __init__(self, hessian: bool) -> None:
        self.hessian = hessian
        self._last: torch.Tensor | None = None
        self._value: tuple[torch.Tensor, int] | None = None
        self.last_sum: torch.Tensor | None = None  # Σ x of the last input (row-norm mode only)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self._last is x and self._value is not None:
            return self._value
        if self.hessian:
            flat = _flat(x)
            value, self.last_sum = (flat.t() @ flat, flat.shape[0]), None
        else:
            sum_sq, self.last_sum, tokens = _sums(x)
            value = (sum_sq, tokens)
        self._last, self._value = x, value
        return value

    def clear(self) -> None:
        self._last, self._value, self.last_sum = None, None, None


class BlockStats:
    """Statistics for every unit of one block: `stats[unit.name]` is a `RowNorms` or a `Hessian`."""

    def __init__(self, units: list[Unit], hessian: bool = False) -> None:
        self.units = units
        self.hessian = hessian
        self.stats: dict[str, RowNorms | Hessian] = {u.name: (Hessian() if hessian else RowNorms()) for u in units}
        self._reducer = _Reducer(hessian)
        self.collected = False  # set once a `collecting()` context has run

    def __getitem__(self, name: str) -> RowNorms | Hessian:
        return self.stats[name]

    @contextlib.contextmanager
    def collecting(self) -> Iterator[BlockStats]:
        """Register the hooks for the duration of the `with` block."""
        handles = []
        experts: dict[int, tuple[nn.Module, list[Unit]]] = {}
        for unit in self.units:
            if unit.kind == "expert":
                experts.setdefault(id(unit.module), (unit.module, []))[1].append(unit)
            else:
                handles.append(unit.module.register_forward_pre_hook(self._linear_hook(unit)))
        for module, units in experts.values():
            handles.append(module.register_forward_pre_hook(self._experts_hook(module, units), with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._reducer.clear()
            self.collected = True

    def _linear_hook(self, unit: Unit):
        acc = self.stats[unit.name]

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if x is None:
                return
            value, tokens = self._reducer(x.detach())
            if isinstance(acc, RowNorms):
                acc.add(value, tokens, self._reducer.last_sum)
            else:
                acc.add(value, tokens)

        return hook

    def _experts_hook(self, module: nn.Module, units: list[Unit]):
        by_key = {(u.param_name, u.expert): self.stats[u.name] for u in units}
        in_name, out_name = expert_param_names(module)
        transposed = bool(getattr(module, "is_transposed", False))

        def linear(x: torch.Tensor, pname: str, e: int) -> torch.Tensor:
            w = getattr(module, pname)[e]
            y = x @ w if transposed else F.linear(x, w)
            bias = getattr(module, f"{pname}_bias", None)
            return y + bias[e] if bias is not None else y

        def add(pname: str, e: int, x: torch.Tensor) -> None:
            acc = by_key.get((pname, e))
            if acc is not None:
                if self.hessian:
                    flat = _flat(x)
                    acc.add(flat.t() @ flat, flat.shape[0])
                else:
                    sum_sq, sum_x, tokens = _sums(x)
                    acc.add(sum_sq, tokens, sum_x)

        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            params = list(args) + [kwargs.get(k) for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
            hidden, top_k_index = params[0], params[1]
            hidden = hidden.detach().reshape(-1, hidden.shape[-1])
            num_experts = getattr(mod, in_name).shape[0]
            for e in range(num_experts):
                rows = (top_k_index == e).any(dim=-1)
                if not bool(rows.any()):
                    continue
                x = hidden[rows]
                add(in_name, e, x)
                if (out_name, e) in by_key:
                    h = linear(x, in_name, e)
                    h = mod._apply_gate(h) if in_name == "gate_up_proj" else mod.act_fn(h)
                    add(out_name, e, h)

        return hook
