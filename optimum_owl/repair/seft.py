"""SEFT-style sparse fine-tuning: the weights train with their masks, and the masks evolve by drop-and-grow at
constant per-matrix sparsity (arXiv 2505.24037; the schedule follows RigL, arXiv 1911.11134).

Every `interval` optimizer steps until `end` of the run, each tracked matrix drops the `f_t · nnz` kept weights with
the lowest score (`|w|`, or `|w·g|` with `drop="sensitivity"`) and regrows as many pruned positions with the largest
accumulated gradient `|g|` (the gradient of the step before the update, recorded before the pruned positions are
masked out). `f_t = fraction · (1 + cos(π t / T_end)) / 2`. A regrown weight starts at `−lr · sign(g)` (one
sign-descent step, never exactly zero), so each matrix's non-zero count is the same after every update. In a
matrix whose zeros form N:M groups, a drop and its regrowth happen inside the same group, so every group stays N:M.
The pruned-position masks are updated in place: the gradient hooks and the re-zeroing after every optimizer step
(`SparsityPreservingCallback`) follow the new masks.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from .callbacks import SparsityPreservingCallback
from .sparsity import detect_nm

logger = logging.getLogger(__name__)


class SEFTCallback(SparsityPreservingCallback):
    """Drop-and-grow sparse fine-tuning at constant per-matrix sparsity, as a Trainer callback.

    Args:
        interval (`int`, *optional*): optimizer steps between updates (default: `max_steps // 20`, at least 1).
        fraction (`float`): share of each matrix's non-zeros swapped at the first update (cosine decay after).
        end (`float`): share of the run after which the masks stop changing.
        drop (`str`): `"magnitude"` (`|w|`) or `"sensitivity"` (`|w·g|`).

    `history` lists `{"step", "fraction", "swapped"}` per update; `swapped` counts the positions that changed from
    pruned to kept (as many changed the other way).

    Example:

    ```python
    >>> from transformers import Trainer
    >>> from optimum_owl.repair import SEFTCallback
    >>> trainer = Trainer(model=pruned_model, args=args, train_dataset=ds, callbacks=[SEFTCallback()])  # doctest: +SKIP
    ```
    """

    def __init__(self, interval: int | None = None, fraction: float = 0.1, end: float = 0.75,
                 drop: str = "magnitude", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if drop not in ("magnitude", "sensitivity"):
            raise ValueError(f"`drop` must be 'magnitude' or 'sensitivity', got {drop!r}.")
        self.interval, self.fraction, self.end, self.drop = interval, fraction, end, drop
        self.history: list[dict[str, Any]] = []
        self._grads: dict[str, torch.Tensor] = {}
        self._record_hooks: list[Any] = []
        self._armed = False
        self._nm: dict[str, tuple[int, int] | None] = {}

    def _every(self, max_steps: int) -> int:
        return self.interval or max(1, max_steps // 20)

    def _is_update(self, step: int, max_steps: int) -> bool:
        return step > 0 and step % self._every(max_steps) == 0 and step <= self.end * max_steps

    # ---------------------------------------------------------------------------------------------- hooks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self._captured and model is not None:
            self.capture(model)
        self._nm = {name: detect_nm(param.detach()) for name, (param, _) in self.keeper.pruned.items()}
        for name, (param, _) in self.keeper.pruned.items():  # recorder first: it sees the unmasked gradient
            self._record_hooks.append(param.register_hook(lambda g, n=name: self._record(n, g)))
        super().on_train_begin(args, state, control, model=model, **kwargs)

    def _record(self, name: str, grad: torch.Tensor) -> None:
        if self._armed:
            acc = self._grads.get(name)
            self._grads[name] = grad.detach().float().clone() if acc is None else acc.add_(grad.detach().float())

    def on_step_begin(self, args, state, control, **kwargs):
        self._armed = self._is_update(state.global_step + 1, state.max_steps)
        self._grads = {}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        super().on_optimizer_step(args, state, control, optimizer=optimizer, **kwargs)
        step = state.global_step + 1  # global_step is increased after this event
        if self._armed and self._grads:
            t_end = max(self.end * state.max_steps, 1.0)
            fraction = self.fraction * (1 + math.cos(math.pi * min(step / t_end, 1.0))) / 2
            lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else 1e-6
            swapped = self.update(fraction, lr, optimizer)
            self.history.append({"step": step, "fraction": fraction, "swapped": swapped})
        self._armed = False
        self._grads = {}

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        for h in self._record_hooks:
            h.remove()
        self._record_hooks = []

    # ---------------------------------------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, fraction: float, lr: float, optimizer: Any = None) -> int:
        """One drop-and-grow over every tracked matrix; returns the number of regrown positions."""
        swapped = 0
        for name, (param, pruned) in self.keeper.pruned.items():
            grad = self._grads.get(name)
            if grad is None:
                continue
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(grad)  # every rank regrows the same positions
            w = param.data
            drop_score = w.abs().float() if self.drop == "magnitude" else (w.float() * grad).abs()
            nm = self._nm.get(name)
            if nm is not None:
                drop_idx, grow_idx = _swaps_nm(drop_score, grad.abs(), pruned, fraction, nm[1])
            else:
                drop_idx, grow_idx = _swaps(drop_score, grad.abs(), pruned, fraction)
            if drop_idx.numel() == 0:
                continue
            flat_w, flat_m, flat_g = w.view(-1), pruned.view(-1), grad.view(-1)
            flat_m[drop_idx] = True
            flat_m[grow_idx] = False
            flat_w[drop_idx] = 0
            step = max(lr, torch.finfo(w.dtype).tiny)
            sign = torch.where(flat_g[grow_idx] > 0, -1.0, 1.0).to(w.dtype)
            flat_w[grow_idx] = sign * step
            swapped += int(grow_idx.numel())
        self.keeper.apply(optimizer)  # optimizer moments of dropped positions -> 0 (regrown ones were masked: 0)
        return swapped


def _swaps(drop_score: torch.Tensor, grow_score: torch.Tensor, pruned: torch.Tensor,
           fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices to drop (lowest `drop_score` among kept) and to grow (highest `grow_score` among pruned)."""
    kept = int((~pruned).sum())
    k = min(int(fraction * kept), int(pruned.sum()))
    if k < 1:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    drop = torch.topk(drop_score.view(-1).masked_fill(pruned.view(-1), math.inf), k, largest=False).indices
    grow = torch.topk(grow_score.view(-1).masked_fill(~pruned.view(-1), -1.0), k).indices
    return drop, grow


def _swaps_nm(drop_score: torch.Tensor, grow_score: torch.Tensor, pruned: torch.Tensor, fraction: float,
              m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Swaps inside groups of `m` consecutive inputs: the groups whose best pruned gradient beats their weakest
    kept weight by the most (`fraction` of the groups at most) swap that pair."""
    groups = pruned.numel() // m
    pr = pruned.reshape(groups, m)
    low, low_at = drop_score.reshape(groups, m).masked_fill(pr, math.inf).min(-1)
    high, high_at = grow_score.reshape(groups, m).masked_fill(~pr, -1.0).max(-1)
    k = int(fraction * int((~pruned).sum()))
    valid = (high >= 0) & torch.isfinite(low)
    k = min(k, int(valid.sum()))
    if k < 1:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    gain = (high / high.clamp_min(1e-30).max()) - (low / low.masked_fill(~valid, 0).max().clamp_min(1e-30))
    chosen = torch.topk(gain.masked_fill(~valid, -math.inf), k).indices
    base = chosen * m
    return base + low_at[chosen], base + high_at[chosen]
