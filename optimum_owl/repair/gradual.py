"""`GradualPruningCallback`: prune during training on the cubic schedule of Zhu & Gupta (2017), OWL per block."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..algorithms.allocation import outlier_ratio, owl_allocation
from ..algorithms.masks import keep_mask_per_row
from ..pruning.modeling import Unit, get_blocks_and_units
from ..pruning.stats import RowNorms
from .sparsity import ADAPTER_MARKERS, MaskKeeper, unwrap_peft

logger = logging.getLogger(__name__)


def cubic_sparsity(step: int, final_sparsity: float, start_step: int, end_step: int, initial_sparsity: float = 0.0) -> float:
    """Zhu & Gupta (2017) schedule: `s_t = s_f + (s_i − s_f)(1 − (t − t0)/(t_end − t0))³`, flat outside [t0, t_end].

    Example:

    ```python
    >>> round(cubic_sparsity(50, 0.8, 0, 100), 4)   # half way: 0.8·(1 − 0.5³)
    0.7
    ```
    """
    if step <= start_step:
        return initial_sparsity
    if step >= end_step:
        return final_sparsity
    frac = (step - start_step) / (end_step - start_step)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3


class _TrainingInputNorms:
    """Training-time input statistics of the blocks' linear layers, in THE input-norm accumulator
    (`stats.RowNorms`, one per unit); forward pre-hooks count training forwards only."""

    def __init__(self, units: list[Unit]) -> None:
        self.stats: dict[str, RowNorms] = {}
        self._hooks = []
        for unit in units:
            if unit.kind in ("linear", "conv1d"):
                self._hooks.append(unit.module.register_forward_pre_hook(self._hook(unit.name)))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not module.training or not args or not torch.is_grad_enabled():
                return
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            self.stats.setdefault(name, RowNorms()).add(x.pow(2).sum(0), x.shape[0])

        return hook

    def norms(self, name: str) -> torch.Tensor | None:
        """Root mean square per input feature, `None` before any training forward."""
        acc = self.stats.get(name)
        return None if acc is None else acc.rms()

    def all_reduce(self) -> None:
        """Sum the statistics over DDP ranks so every rank computes the same scores."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for name in sorted(self.stats):
            self.stats[name].all_reduce()

    def reset(self) -> None:
        self.stats.clear()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


class GradualPruningCallback(TrainerCallback):
    """Prune during training to `final_sparsity` on the cubic schedule of Zhu & Gupta (2017), OWL per block.

    Every `frequency` optimizer steps between `start_step` and `end_step` the target `s_t = cubic_sparsity(t)` is
    split across blocks with OWL: at the first pruning event the blocks' outlier ratios (`outlier_ratio(scores,
    owl_m)`, on the still-dense weights) give the final allocation `s_b = owl_allocation(ratios, final_sparsity,
    owl_lambda)`, and block `b` is pruned to `s_t · s_b / final_sparsity` (so each block's sparsity only grows and
    the mean is `s_t`). Each row of each weight keeps its highest scores. Scores are Wanda-like `|W_ij|·‖X_j‖₂` from the inputs
    seen by the layers since the previous pruning step (`criterion="wanda"`) or `|W_ij|` (`"magnitude"`). Masks only
    grow: a weight pruned once stays zero (gradients masked, weights re-masked after each optimizer step).

    Args:
        final_sparsity (`float`): target fraction of zeros over the prunable weights.
        start_step (`int`): last step before pruning starts.
        end_step (`int`, *optional*): step at which `final_sparsity` is reached (default: 3/4 of `max_steps`).
        frequency (`int`): steps between pruning events.
        initial_sparsity (`float`): `s_i` of the schedule.
        layerwise (`str`): `"owl"` or `"uniform"`.
        owl_lambda (`float`) / owl_m (`float`): OWL's λ and M.
        criterion (`str`): `"wanda"` or `"magnitude"`.
        block_name (`str`, *optional*): dotted path of the block list.

    Example:

    ```python
    >>> from optimum_owl.repair import GradualPruningCallback
    >>> cb = GradualPruningCallback(final_sparsity=0.7, start_step=10, end_step=200, frequency=10)
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])   # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        final_sparsity: float,
        start_step: int = 0,
        end_step: int | None = None,
        frequency: int = 10,
        initial_sparsity: float = 0.0,
        layerwise: str = "owl",
        owl_lambda: float = 0.08,
        owl_m: float = 5.0,
        criterion: str = "wanda",
        block_name: str | None = None,
    ) -> None:
        if not 0.0 < final_sparsity < 1.0:
            raise ValueError(f"`final_sparsity` must be in (0, 1), got {final_sparsity!r}.")
        if not 0.0 <= initial_sparsity <= final_sparsity:
            raise ValueError(f"`initial_sparsity` must be in [0, final_sparsity], got {initial_sparsity!r}.")
        if frequency < 1:
            raise ValueError(f"`frequency` must be a positive integer, got {frequency!r}.")
        if start_step < 0 or (end_step is not None and end_step <= start_step):
            raise ValueError(f"Need 0 <= `start_step` < `end_step`, got start_step={start_step}, end_step={end_step}.")
        if layerwise not in ("owl", "uniform"):
            raise ValueError(f"`layerwise` must be 'owl' or 'uniform', got {layerwise!r}.")
        if criterion not in ("wanda", "magnitude"):
            raise ValueError(f"`criterion` must be 'wanda' or 'magnitude', got {criterion!r}.")
        if owl_lambda < 0 or owl_m <= 0:
            raise ValueError(f"`owl_lambda` must be >= 0 and `owl_m` > 0, got {owl_lambda!r}, {owl_m!r}.")
        self.final_sparsity = final_sparsity
        self.start_step = start_step
        self.end_step = end_step
        self.frequency = frequency
        self.initial_sparsity = initial_sparsity
        self.layerwise = layerwise
        self.owl_lambda = owl_lambda
        self.owl_m = owl_m
        self.criterion = criterion
        self.block_name = block_name
        self.keeper = MaskKeeper()
        self.history: list[dict[str, Any]] = []
        self._units: list[list[Unit]] = []
        self._norms: _TrainingInputNorms | None = None
        self._final_allocation: list[float] | None = None
        self.outlier_ratios: list[float] = []

    # ------------------------------------------------------------------------------------------ schedule
    def target_at(self, step: int) -> float:
        end = self.end_step if self.end_step is not None else self.start_step + 1
        return cubic_sparsity(step, self.final_sparsity, self.start_step, end, self.initial_sparsity)

    def is_pruning_step(self, step: int) -> bool:
        end = self.end_step if self.end_step is not None else self.start_step + 1
        if step == end:
            return True
        return self.start_step < step < end and (step - self.start_step) % self.frequency == 0

    # ------------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.end_step is None:
            self.end_step = max(self.start_step + 1, int(math.ceil(0.75 * state.max_steps)))
        if self.end_step > state.max_steps:
            logger.warning(
                "GradualPruningCallback: end_step=%d is after max_steps=%d; the final sparsity %.3f will not be reached.",
                self.end_step, state.max_steps, self.final_sparsity,
            )
        base = unwrap_peft(model)
        _, _, units = get_blocks_and_units(base, self.block_name)
        self._units = [[u for u in block if not any(m in u.name for m in ADAPTER_MARKERS)] for block in units]
        if not any(u.parameter().requires_grad for block in self._units for u in block):
            raise ValueError(
                "GradualPruningCallback needs trainable prunable weights (full fine-tuning); with LoRA the base is "
                "frozen. Prune first (OWLPruner) and repair with masked LoRA instead."
            )
        if self.criterion == "wanda":
            self._norms = _TrainingInputNorms([u for block in self._units for u in block])
        self._record_existing_zeros()
        self.keeper.install_hooks()
        if self.start_step == 0 and self.initial_sparsity > 0:
            self.prune_to(self.initial_sparsity, step=0)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.keeper.apply(optimizer)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        step = state.global_step
        if self.is_pruning_step(step):
            self.prune_to(self.target_at(step), step=step, optimizer=optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.history:
            logs["gradual_pruning/target"] = round(self.history[-1]["target"], 6)
            logs["gradual_pruning/achieved"] = round(self.history[-1]["achieved"], 6)

    def on_train_end(self, args, state, control, **kwargs):
        self.keeper.apply()
        self.keeper.remove_hooks()
        if self._norms is not None:
            self._norms.remove()
            self._norms = None
        achieved = self.history[-1]["achieved"] if self.history else 0.0
        if achieved + 1e-3 < self.final_sparsity:
            logger.warning(
                "GradualPruningCallback: training ended at sparsity %.4f, below the target %.4f (end_step=%s).",
                achieved, self.final_sparsity, self.end_step,
            )

    # ------------------------------------------------------------------------------------------ pruning
    @torch.no_grad()
    def _record_existing_zeros(self) -> None:
        for block in self._units:
            for unit in block:
                p = unit.parameter()
                pruned = p.detach() == 0
                if bool(pruned.any()):
                    self.keeper.set(unit.name if unit.expert is None else unit.name.rsplit(".", 1)[0], p, pruned)

    def _scores(self, unit: Unit) -> torch.Tensor:
        w = unit.weight().detach().abs().float()
        if self._norms is not None and unit.kind in ("linear", "conv1d"):
            norms = self._norms.norms(unit.name)
            if norms is not None:
                return w * norms.to(w.device)[None, :]
        return w

    @torch.no_grad()
    def prune_to(self, target: float, step: int, optimizer: Any = None) -> dict[str, Any]:
        """Prune (monotonically) to `target` overall sparsity now; returns the history entry."""
        if self._norms is not None:
            self._norms.all_reduce()
        scores = [[self._scores(u) for u in block] for block in self._units]
        if self._final_allocation is None:
            if self.layerwise == "owl" and len(scores) > 1:
                self.outlier_ratios = [outlier_ratio(block, self.owl_m) for block in scores]
                self._final_allocation, _ = owl_allocation(self.outlier_ratios, self.final_sparsity, self.owl_lambda)
            else:
                self._final_allocation = [self.final_sparsity] * len(scores)
        # every block follows the schedule scaled to its OWL share: monotone per block, mean = target
        sparsities = [min(target * s / self.final_sparsity, 0.999) for s in self._final_allocation]
        ratios = list(self.outlier_ratios)
        for block, block_scores, s in zip(self._units, scores, sparsities):
            for unit, sc in zip(block, block_scores):
                w = unit.weight()
                keep = keep_mask_per_row(sc, s) & (w != 0)
                w.masked_fill_(~keep, 0)
        self.keeper = self._rebuild_keeper()
        self.keeper.apply(optimizer)
        if self._norms is not None:
            self._norms.reset()
        _, achieved = block_sparsity_of_units(self._units)
        entry = {"step": step, "target": target, "achieved": achieved, "block_sparsity": sparsities, "outlier_ratios": ratios}
        self.history.append(entry)
        logger.info("GradualPruningCallback step %d: target %.4f, achieved %.4f", step, target, achieved)
        return entry

    def _rebuild_keeper(self) -> MaskKeeper:
        hooks_on = bool(self.keeper._hooks)
        self.keeper.remove_hooks()
        keeper = MaskKeeper()
        seen: set[int] = set()
        for block in self._units:
            for unit in block:
                p = unit.parameter()
                if id(p) in seen:
                    continue
                seen.add(id(p))
                keeper.set(unit.name, p, p.detach() == 0)
        if hooks_on:
            keeper.install_hooks()
        return keeper


def block_sparsity_of_units(units: list[list[Unit]]) -> tuple[list[float], float]:
    zeros, count, blocks = 0, 0, []
    for block in units:
        z = sum(int((u.weight() == 0).sum()) for u in block)
        n = sum(u.numel for u in block)
        blocks.append(z / max(n, 1))
        zeros += z
        count += n
    return blocks, zeros / max(count, 1)
