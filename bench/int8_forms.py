"""The int8 forms of `python -m bench.inference` (issue 27), both with bf16 activations and the LM head int8:

- `dense_int8`: dense int8 weight-only as a PyTorch user gets it today: torchao's `Int8WeightOnlyConfig` (when torchao
  is installed; eager, as `quantize_` leaves the model) or modules calling `torch._weight_int8pack_mm` (the kernel
  behind torchao's older int8 path; per-row scales = largest magnitude / 127, bf16 activations and scales, which is
  what that kernel wants: fp32 activations were several times slower). `choose_dense_int8` times both on a short
  decode and keeps the faster; the result names it.
- `sparse_int8`: optimum-owl's `SparseLinear` with int8 values (one float32 scale per output row) plus its dense
  int8 head (`optimum_owl.inference.head.Int8Linear`).

Not a benchmark by itself; `bench/inference.py` imports it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from optimum_owl.inference import SparseLinear
from optimum_owl.inference.head import Int8Linear, quantize_lm_head

INT8PACK = "torch._weight_int8pack_mm modules"
TORCHAO = "torchao Int8WeightOnlyConfig (eager)"


class Int8PackLinear(nn.Module):
    """A dense int8 weight-only linear as a user writes it around `torch._weight_int8pack_mm` (bf16 activations)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float()
        amax = w.abs().amax(dim=1)
        scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        self.register_buffer("codes", torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(x2, self.codes, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` that shares every parameter and buffer with it (modules swapped in the copy only)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    return next(n for n, m in model.named_modules() if m is head)


def int8pack_model(dense16: nn.Module, source: nn.Module, names: list[str], in_place: bool = False) -> nn.Module:
    """`dense16` (or, `in_place`, the model itself) with every block linear in `names` and the LM head as
    `Int8PackLinear`, quantized from the weights of `source` (the float32 model)."""
    model = dense16 if in_place else shared_copy(dense16)
    for name in names + [_head_name(source)]:
        src = source.get_submodule(name)
        _swap(model, name, Int8PackLinear(src.weight, src.bias))
    return model


def torchao_model(dense16: nn.Module) -> nn.Module | None:
    """`dense16` quantized by torchao's `Int8WeightOnlyConfig` (every `nn.Linear`, head included), or None without
    torchao."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None
    model = shared_copy(dense16)
    quantize_(model, Int8WeightOnlyConfig())
    return model


def choose_dense_int8(dense16: nn.Module, dense32: nn.Module, names: list[str],
                      rate: Callable[[nn.Module], float], rounds: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """The faster of the dense int8 weight-only candidates on this CPU (best of `rounds` alternated `rate(model)`
    calls, decode tokens/s), and what was measured."""
    candidates = {INT8PACK: int8pack_model(dense16, dense32, names)}
    ao = torchao_model(dense16)
    if ao is not None:
        candidates[TORCHAO] = ao
    rates: dict[str, float] = {name: 0.0 for name in candidates}
    for rep in range(rounds):
        for name in (list(candidates) if rep % 2 == 0 else list(reversed(candidates))):
            rates[name] = max(rates[name], rate(candidates[name]))
    best = max(rates, key=rates.get)
    info = {"impl": best, "candidates_decode_tok_s": rates, "torchao_installed": ao is not None}
    return candidates[best], info


def sparse_int8_linear(holder32: nn.Linear) -> SparseLinear:
    """`SparseLinear` with int8 values from a pruned float32 linear, run with bf16 activations (bias bf16)."""
    return SparseLinear.from_dense(holder32, values="int8").to(torch.bfloat16)


def int8_head(model: nn.Module) -> nn.Module:
    """`model` (bf16) with its LM head as optimum-owl's dense int8 head."""
    quantize_lm_head(model)
    return model


def module_weight_bytes(module: nn.Module) -> int:
    """Bytes of a linear's weight as held: the compact form, int8 codes + scales, or the dense tensor."""
    if isinstance(module, (SparseLinear, Int8Linear)):
        return module.weight_nbytes()
    if isinstance(module, Int8PackLinear):
        return module.codes.numel() + module.scales.numel() * module.scales.element_size()
    weight = module.weight
    qdata = getattr(weight, "qdata", None)  # a torchao Int8Tensor
    if qdata is not None:
        scale = weight.scale
        return qdata.numel() * qdata.element_size() + scale.numel() * scale.element_size()
    return weight.numel() * weight.element_size()
