"""Block-by-block execution: capture the inputs of block 0 once, then THE block loop (`BlockRunner.run_blocks`).

Every pass over the model (the OWL outlier pass, the sequential and dense prune passes, owl-auto's exact passes and
refit, the report, snapshots) is one call of `run_blocks` with what it needs per block: which statistics to
collect, what to do with the block (`visit`), and which outputs feed the next block. The runner knows nothing
about criteria. Hidden states are kept per batch, on the block's device or on CPU (`offload_activations`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import OWLNumericalError
from ..utils import map_tensors
from .memory import release_freed_memory

if TYPE_CHECKING:
    from .stats import BlockStats

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded, to skip the rest of the model."""


@dataclass
class Batch:
    """One calibration batch at a block boundary: hidden states plus the other arguments the block receives."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    args: tuple = ()


def _move(value: Any, device: torch.device) -> Any:
    return map_tensors(value, lambda t: t.to(device, non_blocking=True))


def module_device(module: nn.Module) -> torch.device:
    """Device a module computes on: accelerate's execution device when hooked, else its first parameter's."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


class BlockRunner:
    """Runs a model's transformer blocks one at a time over calibration batches.

    Args:
        model: the full model (used once, to capture block 0's inputs).
        blocks: the `nn.ModuleList` of blocks.
        offload_activations: keep hidden states on CPU between blocks.
        block_context: optional callable `(index, block) -> context manager` that makes the block's weights
            available on its execution device for the duration (used for Accelerate offload).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        offload_activations: bool = False,
        block_context: Callable[[int, nn.Module], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.model = model
        self.blocks = blocks
        self.offload_activations = offload_activations
        self.block_context = block_context or (lambda i, b: contextlib.nullcontext())

    # ------------------------------------------------------------------------------------------------ capture
    @torch.no_grad()
    def capture(self, input_ids: torch.LongTensor, batch_size: int) -> list[Batch]:
        """Run the embeddings on every batch and record what block 0 receives."""
        captured: list[Batch] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            rest = dict(kwargs)
            hidden = args[0] if args else rest.pop("hidden_states")
            # A KV cache must not be carried from block to block during calibration.
            extra = tuple(None if "Cache" in type(a).__name__ else a for a in args[1:])
            rest.pop("past_key_values", None)
            rest.pop("past_key_value", None)
            rest.pop("layer_past", None)
            if "use_cache" in rest:
                rest["use_cache"] = False
            store = torch.device("cpu") if self.offload_activations else hidden.device
            captured.append(Batch(hidden.detach().to(store), _detach(rest), _detach(extra)))
            raise _StopForward

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        device = _input_device(self.model)
        config = getattr(self.model, "config", None)
        old_cache = getattr(config, "use_cache", None)
        if config is not None and old_cache is not None:
            config.use_cache = False
        try:
            for batch in input_ids.split(batch_size):
                try:
                    self.model(input_ids=batch.to(device))
                except _StopForward:
                    pass
                else:
                    raise RuntimeError("the model finished its forward without calling block 0; check `block_name`")
        finally:
            handle.remove()
            if config is not None and old_cache is not None:
                config.use_cache = old_cache
        return captured

    # ------------------------------------------------------------------------------------------------ blocks
    def block_scope(self, index: int) -> contextlib.AbstractContextManager:
        """Block `index` with real weights on its execution device (a no-op for models held in memory)."""
        return self.block_context(index, self.blocks[index])

    @contextlib.contextmanager
    def block_on_device(self, index: int) -> Iterator[nn.Module]:
        """`block_scope`, then hand the heap pages freed by the block's work back to the OS."""
        block = self.blocks[index]
        try:
            with self.block_context(index, block):
                yield block
        finally:
            # the block's activations, statistics and scores are freed: hand heap pages glibc kept back to the OS
            release_freed_memory()

    def run_blocks(
        self,
        inputs: list[Batch] | None,
        visit: Callable[[int, BlockStats | None], None],
        *,
        statistics: Callable[[int], BlockStats | None] | None = None,
        propagate: Literal["none", "dense", "pruned"] = "none",
        done: Callable[[int, list[Batch] | None], None] | None = None,
        start: int = 0,
        desc: str | None = None,
    ) -> list[Batch] | None:
        """THE block loop: for each block from `start`, on its device: statistics, `visit`, propagation.

        Args:
            inputs: block `start`'s inputs (`None` when `propagate="none"`).
            visit: `visit(i, stats)` does the pass's work on block i (prune it, take its outlier ratio, ...).
            statistics: `statistics(i)` gives block i's `BlockStats` (or `None`: nothing to collect). A fresh one
                (not yet `collected`) is filled by a forward of block i over `inputs` before `visit`; one already
                collected (e.g. the dense pass's statistics of block 0) is passed through as is.
            propagate: `"dense"`: the statistics forward also gives the next block's inputs (outputs of the block
                *before* `visit`, one forward per block); `"pruned"`: after `visit`, a second forward gives the
                outputs of the visited (pruned) block; `"none"`: no forward besides the statistics.
            done: `done(i, next_inputs)` after block i (still inside its device scope; `next_inputs` is `None`
                after the last block or without propagation).
            start: first block to run (resumed runs).
            desc: progress-bar label (`None`: no bar).

        Returns:
            The outputs of the last block run when propagating (`None` after the last block).
        """
        n = len(self.blocks)
        for i in tqdm(range(start, n), desc=desc, leave=False, disable=desc is None):
            last = i == n - 1
            outputs: list[Batch] | None = None
            with self.block_on_device(i):
                stats = statistics(i) if statistics is not None else None
                fresh = stats is not None and not stats.collected
                if propagate == "dense":
                    with stats.collecting() if fresh else contextlib.nullcontext():
                        outputs = self.forward(i, inputs, keep_outputs=not last)
                else:
                    if fresh:
                        with stats.collecting():
                            self.forward(i, inputs, keep_outputs=False)
                visit(i, stats)
                del stats
                if propagate == "pruned" and not last:
                    outputs = self.forward(i, inputs)
                if done is not None:
                    done(i, outputs)
            inputs = outputs
        return inputs

    @torch.no_grad()
    def forward(self, index: int, inputs: list[Batch], keep_outputs: bool = True) -> list[Batch] | None:
        """Run block `index` on every batch; return the next block's inputs (same kwargs), or `None`."""
        outputs: list[Batch] | None = [] if keep_outputs else None
        block = self.blocks[index]
        device = module_device(block)
        for batch in inputs:
            out = block(_move(batch.hidden, device), *_move(batch.args, device), **_move(batch.kwargs, device))
            if isinstance(out, (tuple, list)):
                out = out[0]
            elif not isinstance(out, torch.Tensor):
                out = out[0]
            # a sum is NaN/Inf when any element is (cheap); confirm element-wise before raising (finite overflow)
            if not torch.isfinite(out.sum(dtype=torch.float32)) and not torch.isfinite(out).all():
                raise OWLNumericalError(
                    f"Block {index} produced NaN/Inf activations. Run the model in float32 or bfloat16 instead of "
                    "float16, or check the calibration data."
                )
            if outputs is not None:
                store = torch.device("cpu") if self.offload_activations else out.device
                outputs.append(Batch(out.detach().to(store), batch.kwargs, batch.args))
        return outputs


def _detach(value: Any) -> Any:
    return map_tensors(value, lambda t: t.detach())


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return module_device(emb) if emb is not None else module_device(model)
