"""Block-by-block execution: capture the inputs of block 0 once, then run any block over all calibration batches.

The runner knows nothing about criteria: the pruner asks it to run block i (optionally inside a statistics
context) and gets the outputs back, which become block i+1's inputs. Hidden states are kept per batch, on the
block's device or on CPU (`offload_activations`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import OWLNumericalError  # noqa: F401  (defined in optimum_owl.errors)
from .offload import release_freed_memory

logger = logging.getLogger(__name__)

# Blocks whose weights Accelerate offloads (CPU/disk) are pruned through optimum_owl.offload.BlockOffloader, which
# writes the pruned weights back into a new offload store; prune-on-load checks this flag before allowing offload.
SUPPORTS_OFFLOAD = True


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded, to skip the rest of the model."""


@dataclass
class Batch:
    """One calibration batch at a block boundary: hidden states plus the other arguments the block receives."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    args: tuple = ()


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


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
    @contextlib.contextmanager
    def block_on_device(self, index: int) -> Iterator[nn.Module]:
        block = self.blocks[index]
        try:
            with self.block_context(index, block):
                yield block
        finally:
            # the block's activations, statistics and scores are freed: hand heap pages glibc kept back to the OS
            release_freed_memory()

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
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return module_device(emb) if emb is not None else module_device(model)
