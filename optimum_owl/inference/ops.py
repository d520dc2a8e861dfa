"""The sparse kernel as torch operators, so that `torch.compile` keeps it inside its graphs.

The kernel's library (`kernel.py`) also carries `csrc/ops.cpp`, which registers, in C++:

- `torch.ops.owl.sparse_decode(x, mask, values, offsets, bias)`: `x @ W^T + bias` (float values; `owl_decode`);
- `torch.ops.owl.sparse_expand(mask, values, offsets, r0, r1, dtype)`: rows `[r0, r1)` of `W`, dense (`owl_expand`);
- `torch.ops.owl.sparse_decode_q8(x, mask, codes, offsets, scales, group_words, bias)` and
  `torch.ops.owl.sparse_expand_q8(mask, codes, offsets, scales, group_words, r0, r1, dtype)`: the same for int8 codes
  with float32 scales (`group_words`: 64-bit mask words per scale group, 0 for one scale per row).

`bias` is float32 or None; `x` is contiguous float32 / bfloat16 / float16 `[..., in]` and the result has its dtype.
Their fake (shape-only) implementations are registered here with `torch.library.register_fake` once the library has
loaded (`available()`), so the operators pass `torch.library.opcheck` and a compiled graph calls them like any aten op
(inductor's C++ wrapper included: no Python per call). A C++ operator costs one more source in the kernel's first
build (about 5 s of CPU time, compiled beside the kernel) and nothing per call; a Python `torch.library.custom_op`
around the ctypes call would cost a trip through Python per call inside every compiled graph (210 calls a token on
SmolLM2-135M), so the operators are C++ and eager code keeps the ctypes path (`SparseLinear._decode`), which is as
cheap as a call gets from Python.

`SparseLinear.forward` under `torch.compile` runs `traced_forward`, which gives what the eager forward gives (same
kernel, same dtype rules, same decode/prefill choice by token count).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from .kernel import kernel

_lock = threading.Lock()
_registered: set[str] = set()

OPERATORS = ("sparse_decode", "sparse_expand", "sparse_decode_q8", "sparse_expand_q8")


def _decode_fake(x: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    torch._check(x.shape[-1] <= mask.shape[1] * 8, lambda: "owl::sparse_decode: x is wider than the weight")
    return x.new_empty((*x.shape[:-1], mask.shape[0]))


def _expand_fake(mask: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, r0: int, r1: int,
                 dtype: torch.dtype) -> torch.Tensor:
    return mask.new_empty((r1 - r0, mask.shape[1] * 8), dtype=dtype)


def _decode_q8_fake(x: torch.Tensor, mask: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor,
                    scales: torch.Tensor, group_words: int, bias: torch.Tensor | None) -> torch.Tensor:
    return _decode_fake(x, mask, codes, offsets, bias)


def _expand_q8_fake(mask: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor,
                    group_words: int, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    return mask.new_empty((r1 - r0, mask.shape[1] * 8), dtype=dtype)


_FAKES: dict[str, Callable[..., torch.Tensor]] = {
    "sparse_decode": _decode_fake, "sparse_expand": _expand_fake,
    "sparse_decode_q8": _decode_q8_fake, "sparse_expand_q8": _expand_q8_fake,
}


def _defined(name: str) -> bool:
    try:
        getattr(torch.ops.owl, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def available() -> bool:
    """Whether the `owl` operators can be used: the kernel built and loaded (it carries them; building it on first
    call) and their fake implementations registered."""
    if kernel() is None:
        return False
    with _lock:
        for name, fake in _FAKES.items():
            if name not in _registered and _defined(name):
                torch.library.register_fake(f"owl::{name}", fake)
                _registered.add(name)
    return "sparse_decode" in _registered


@torch.compiler.assume_constant_result
def ready_for_tracing() -> bool:
    """`available()`, run once when `torch.compile` traces it (its result becomes a constant of the graph)."""
    return available()


def traced_forward(module: Any, x: torch.Tensor, native_bf16_gemm: Callable[[], bool]) -> torch.Tensor | None:
    """`SparseLinear.forward` as `torch.compile` traces it: the owl operators with the eager forward's rules, so a
    compiled graph gives the eager model's results. None where the eager forward would not use the kernel (no kernel,
    not on the CPU, gradients needed): the caller then runs its own (pure-PyTorch) path."""
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()) or not ready_for_tracing():
        return None
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # e.g. float64, as `SparseLinear._decode`
        y = traced_forward(module, x.float(), native_bf16_gemm)
        return None if y is None else y.to(x.dtype)
    n = x.numel() // module.in_features
    values = module.values
    int8 = values.dtype == torch.int8
    bf16_gemm = x.dtype == torch.bfloat16 and (int8 or values.dtype == torch.bfloat16) and (
        native_bf16_gemm() if module.bf16_gemm is None else bool(module.bf16_gemm))
    bias = module.bias
    if n < (module.bf16_crossover if bf16_gemm else module.crossover):
        bias32 = None if bias is None else bias.float()
        if int8:
            return torch.ops.owl.sparse_decode_q8(x.contiguous(), module.mask, values, module.offsets, module.scales,
                                                  _group_words(module.group_size), bias32)
        return torch.ops.owl.sparse_decode(x.contiguous(), module.mask, values, module.offsets, bias32)
    # prefill: the whole weight expanded once, then one GEMM (eager expands tiles of rows, same products and sums)
    dtype = torch.bfloat16 if bf16_gemm else torch.float32
    out = module.out_features
    if int8:
        weight = torch.ops.owl.sparse_expand_q8(module.mask, values, module.offsets, module.scales,
                                                _group_words(module.group_size), 0, out, dtype)
    else:
        weight = torch.ops.owl.sparse_expand(module.mask, values, module.offsets, 0, out, dtype)
    x2 = x.reshape(-1, module.in_features).to(dtype)
    y_t = torch.mm(weight[:, : module.in_features], x2.t())
    if bias is not None:
        y_t = y_t + bias.to(dtype)[:, None]
    return y_t.t().contiguous().to(x.dtype).reshape(*x.shape[:-1], out)


def _group_words(group_size: int | None) -> int:
    return 0 if group_size is None else group_size // 64
