"""transformers `TrainerCallback`s for sparse models: keep masks, log per-block sparsity, prune gradually with OWL.

Where the masks are enforced (transformers 5.x step order: clip → `on_pre_optimizer_step` → `optimizer.step()` →
`on_optimizer_step` → scheduler → `zero_grad` → `on_step_end`):

* gradient hooks zero the pruned positions of every gradient as it is produced, so gradient clipping, gradient
  accumulation and the optimizer's moments never see them;
* `on_optimizer_step` zeroes the pruned weights again right after each real update (weight decay, momentum from
  earlier state, optimizers with their own update rules, mixed-precision casts), once per optimizer step whatever
  `gradient_accumulation_steps` is.

Under DDP every rank holds the same weights, so masks computed from weights are identical on every rank; the gradual
pruning callback all-reduces its activation statistics so that its Wanda-like scores are identical too.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .sparsity import MaskKeeper, block_sparsity, prunable_params

logger = logging.getLogger(__name__)


class SparsityPreservingCallback(TrainerCallback):
    """Keep a (fully) fine-tuned pruned model exactly sparse: pruned weights stay zero through training.

    Masks are the zeros of each trainable prunable weight at `on_train_begin` (or of `model` when given at
    construction). Gradients are masked as they are produced and the weights re-masked after every optimizer step,
    which is correct with gradient accumulation, gradient clipping, weight decay and fp16/bf16 mixed precision.

    Args:
        model (`nn.Module`, *optional*): capture the masks now instead of at `on_train_begin`.
        block_name (`str`, *optional*): dotted path of the block list when it cannot be found automatically.

    Example:

    ```python
    >>> from transformers import Trainer
    >>> from optimum_owl.repair import SparsityPreservingCallback
    >>> trainer = Trainer(model=pruned_model, args=args, train_dataset=ds,
    ...                   callbacks=[SparsityPreservingCallback()])            # doctest: +SKIP
    >>> trainer.train()                                                      # doctest: +SKIP
    ```
    """

    def __init__(self, model: nn.Module | None = None, block_name: str | None = None) -> None:
        self.block_name = block_name
        self.keeper = MaskKeeper()
        self._captured = False
        if model is not None:
            self.capture(model)

    @torch.no_grad()
    def capture(self, model: nn.Module) -> int:
        """Record the zeros of every trainable prunable weight; returns how many tensors are tracked."""
        self.keeper = MaskKeeper()
        for pp in prunable_params(model, self.block_name):
            if not pp.param.requires_grad:
                continue
            pruned = pp.param.detach() == 0
            if bool(pruned.any()):
                self.keeper.set(pp.name, pp.param, pruned)
        self._captured = True
        if not self.keeper.pruned:
            logger.warning("SparsityPreservingCallback: no trainable prunable weight holds zeros; nothing to keep.")
        return len(self.keeper.pruned)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """`{name: bool tensor True at pruned positions}`."""
        return {name: m for name, (_, m) in self.keeper.pruned.items()}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self._captured and model is not None:
            self.capture(model)
        self.keeper.install_hooks()
        self.keeper.apply()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.keeper.apply(optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        self.keeper.apply()
        self.keeper.remove_hooks()


class SparsityLoggingCallback(TrainerCallback):
    """Add the total sparsity of the prunable weights, its spread over blocks (`sparsity/block_min`, `block_mean`,
    `block_max`) and, with `per_block`, every block's (`sparsity/block_3`, ...) to every Trainer log.

    Loggers (TensorBoard, W&B, ...) are callbacks too and run in list order; install this one with
    `add_sparsity_logging(trainer)` so it runs before them and they receive the sparsity values.

    Args:
        prefix (`str`): key prefix.
        per_block (`bool`): log every block, not only the total and the min / mean / max over blocks (`repair()`
            logs the summary only: one value per block in every log line is unreadable for deep models).
        block_name (`str`, *optional*): dotted path of the block list.
    """

    def __init__(self, prefix: str = "sparsity", per_block: bool = True, block_name: str | None = None) -> None:
        self.prefix = prefix
        self.per_block = per_block
        self.block_name = block_name

    def values(self, model: nn.Module) -> dict[str, float]:
        blocks, total = block_sparsity(model, self.block_name)
        out = {f"{self.prefix}/total": round(total, 6)}
        if blocks:
            out.update({f"{self.prefix}/block_min": round(min(blocks), 6),
                        f"{self.prefix}/block_mean": round(sum(blocks) / len(blocks), 6),
                        f"{self.prefix}/block_max": round(max(blocks), 6)})
        if self.per_block:
            out.update({f"{self.prefix}/block_{i}": round(v, 6) for i, v in enumerate(blocks)})
        return out

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if model is None or logs is None:
            return
        values = self.values(model)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def add_sparsity_logging(trainer: Any, callback: SparsityLoggingCallback | None = None) -> SparsityLoggingCallback:
    """Install a `SparsityLoggingCallback` first in `trainer`'s callback list so loggers see its values."""
    callback = callback or SparsityLoggingCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


__all__ = ["SparsityLoggingCallback", "SparsityPreservingCallback", "add_sparsity_logging"]
