"""The dense LM head as int8 weight-only (`Int8Linear`), and a tied input embedding that reads the same codes
(`Int8Embedding`): once the blocks are sparse, the head is the largest matrix a decoded token reads.

Codes: int8 `[out, in]` (row-major, `[-127, 127]`), one float32 scale per output row (a vocabulary entry), `value =
code * scale` as everywhere in optimum-owl (`optimum_owl.algorithms.quantize`), held in the sparse kernel's int8 layout
with every mask bit set (1/8 byte per weight of mask, so the kernel's int8 paths apply unchanged). Unlike the block
linears' scales (largest magnitude / 127), a head's scale is that value rounded UP to the nearest bfloat16, so that
the scales are exact in bfloat16, the dtype torch's int8 matmul wants them in: `code * scale` is then the same number
whichever path computes it, and no code leaves `[-127, 127]`.

Forward (`Int8Linear`; accumulation float32, output in the input's dtype), on CPU without gradients:

- with the sparse kernel: its int8 decode (fewer than `SparseLinear.crossover` tokens, `bf16_crossover` for bf16
  activations where the CPU has native bf16) or its prefill (tiles of `code * scale`, a bf16 GEMM for bf16
  activations where the CPU has native bf16). On the Zen 4 development machine one token of a 32000 x 2048 head took
  2.4 ms that way, against 3.3 ms for `torch._weight_int8pack_mm` with bf16 activations (the kernel behind torchao's
  older int8 weight-only path) and 18.5 / 25 ms for the dense bf16 / fp32 heads (`bench/probes/int8_head.py`);
- without it: `torch._weight_int8pack_mm` for bfloat16 activations (where `in` is a multiple of 16: torch 2.13's bf16
  path crashed on other widths) and for float32 / float16 ones below `FLOAT_MATMUL_TOKENS` tokens (in float32, where
  it is several times slower than a dense float32 `F.linear`), else row tiles dequantized in float32 and one GEMM
  each: a float32 model's int8 head then saves memory but costs time;

and anywhere else (gradients, other devices) the pure path, `F.linear` in float32 on the whole dequantized weight:
exactly what the dense model with the dequantized weight (`to_dense`) computes.

A tied input embedding (`Int8Embedding`) shares the head's codes and scales: a lookup returns `code * scale` of its
rows (computed in float32, in the model's dtype), exactly the rows of the dequantized weight, so the tie holds and
`densify` ties the dequantized weight again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.quantize import QMAX, relative_error
from .format import DTYPE_CODES, Packed, dense_int8_packed
from .kernel import check_rc, kernel
from .module import TILE_BYTES, SparseLinear, native_bf16_gemm
from .ops import traced_forward

logger = logging.getLogger(__name__)

# Without the kernel, float32 / float16 activations: calls with fewer tokens run torch's int8 matmul in float32,
# longer ones dequantized tiles and a GEMM (the two took the same time at 4 tokens: bench/probes/int8_head.py)
FLOAT_MATMUL_TOKENS = 4
# Rows dequantized per tile of the many-token path (about 4 MiB of float32 at width 2048).
TILE_ELEMENTS = 1 << 20


def head_scales(weight: torch.Tensor) -> torch.Tensor:
    """float32 `[out]`: each row's largest magnitude / 127, rounded up to the nearest bfloat16 (1.0 for a zero row).

    A row that already lies on such a grid (a head saved dequantized, loaded again) gets its own scale back: where
    the largest magnitude / 127 or / 126 (rounding up can leave 126 as the largest code) is a bfloat16 number that
    divides every element of the row exactly, that number is the scale, so the codes come back unchanged."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    rounded = scales.to(torch.bfloat16).float()
    below = rounded < scales  # round-to-nearest went down: one bfloat16 step up (positive finite floats)
    rounded[below] = (rounded[below].view(torch.int32) + (1 << 16)).view(torch.float32)
    for largest in (QMAX - 1, QMAX):  # the exact grids, the 127 one last so that it wins
        exact = amax / largest
        on_grid = (amax > 0) & (exact.to(torch.bfloat16).float() == exact)
        if bool(on_grid.any()):
            rows = on_grid.nonzero().squeeze(1)
            ratio = w[rows] / exact[rows, None]
            whole = (ratio == torch.round(ratio)).all(dim=1)
            rounded[rows[whole]] = exact[rows[whole]]
    return rounded.contiguous()


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(codes int8 [out, in], scales float32 [out])` of a 2-D weight on the head grid (`head_scales`)."""
    scales = head_scales(weight)
    codes = torch.clamp(torch.round(weight.detach().float() / scales[:, None]), -QMAX, QMAX).to(torch.int8)
    return codes.contiguous(), scales


class _Int8Rows(nn.Module):
    """A dense int8 matrix in the kernel's int8 layout with every mask bit set (`format.dense_int8_packed`): buffers
    `mask`, `values` (the codes, row-major, then padding), `offsets` and `scales` (float32 `[out]`); `codes` is the
    `[out, in]` view of `values`. `.to(dtype)` leaves codes and scales as they are and changes `weight_dtype`, the
    dtype of what the module returns dense."""

    def __init__(self, packed: Packed, weight_dtype: torch.dtype) -> None:
        super().__init__()
        for name in ("mask", "values", "offsets", "scales"):
            self.register_buffer(name, getattr(packed, name), persistent=False)
        self._shape = (packed.out_features, packed.in_features)
        self.weight_dtype = weight_dtype

    @property
    def codes(self) -> torch.Tensor:
        rows, cols = self._shape
        return self._buffers["values"][: rows * cols].view(rows, cols)

    def packed(self) -> Packed:
        return Packed(self.mask, self.values, self.offsets, *self._shape, self.scales, None)

    def dense_weight(self) -> torch.Tensor:
        """`code * scale` computed in float32, in `weight_dtype`."""
        return (self.codes.float() * self.scales[:, None]).to(self.weight_dtype)

    def weight_nbytes(self) -> int:
        """Bytes held: codes (and padding), mask, row offsets, scales."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values() if t is not None)

    def _apply(self, fn: Callable, recurse: bool = True) -> nn.Module:
        self.weight_dtype = fn(torch.zeros(0, dtype=self.weight_dtype)).dtype
        kept = {name: self._buffers[name] for name in ("scales", "scales_bf16") if name in self._buffers}
        self._buffers.update(dict.fromkeys(kept))  # the scales keep their dtypes; they only move
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update({name: t.to(self._buffers["values"].device) for name, t in kept.items()})
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # the checkpoint format stores dense weights in the model's dtype: the dequantized weight
        destination[prefix + "weight"] = self.dense_weight()
        bias = self._parameters.get("bias")
        if bias is not None:
            destination[prefix + "bias"] = bias if keep_vars else bias.detach()


class Int8Linear(_Int8Rows):
    """Dense int8 weight-only `nn.Linear` (the LM head); see the module docstring for its paths."""

    group_size = None  # one scale per row; with `bf16_gemm` and the crossovers: what `ops.traced_forward` reads
    bf16_gemm: bool | None = None

    @property
    def crossover(self) -> int:
        return SparseLinear.crossover

    @property
    def bf16_crossover(self) -> int:
        return SparseLinear.bf16_crossover

    def __init__(self, packed: Packed, bias: torch.Tensor | None, weight_dtype: torch.dtype) -> None:
        super().__init__(packed, weight_dtype)
        self.out_features, self.in_features = self._shape
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # torch's int8 matmul takes the scales in the activations' dtype: exact in bf16 (`head_scales`)
        self.register_buffer("scales_bf16", self.scales.to(torch.bfloat16), persistent=False)
        self._tile_rows = max(64, TILE_BYTES // (4 * self.mask.shape[1] * 8))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        codes, scales = quantize_rows(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(dense_int8_packed(codes, scales), bias, linear.weight.dtype).to(linear.weight.device)

    def to_dense(self) -> nn.Linear:
        module = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        module.weight = nn.Parameter(self.dense_weight())
        if self.bias is not None:
            module.bias = nn.Parameter(self.bias.detach().clone())
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"values=int8 (dense, one scale per row), weight_dtype={self.weight_dtype}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int8Linear expects inputs with {self.in_features} features, got {x.shape[-1]}.")
        x2 = x.reshape(-1, self.in_features)
        n = x2.shape[0]
        if torch.compiler.is_compiling():  # torch.compile: the kernel as torch operators, same results (ops.py)
            y = traced_forward(self, x, native_bf16_gemm.__wrapped__)
            if y is not None:
                return y
        if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
            y = self._forward_pure(x2)
        else:
            ops = kernel()
            if ops is not None:
                y = self._kernel(ops, x2, x2.dtype == torch.bfloat16 and native_bf16_gemm())
            elif (x2.dtype == torch.bfloat16 and self.in_features % 16 == 0) or n < FLOAT_MATMUL_TOKENS:
                y = self._matmul(x2)
            else:
                y = self._tiled(x2)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _forward_pure(self, x2: torch.Tensor) -> torch.Tensor:
        weight = self.codes.float() * self.scales[:, None]
        return F.linear(x2.float(), weight, None if self.bias is None else self.bias.float())

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        xc = x2.contiguous()
        if xc.dtype == torch.bfloat16 and self.in_features % 16 == 0:
            y = torch._weight_int8pack_mm(xc, self.codes, self.scales_bf16)
        else:
            y = torch._weight_int8pack_mm(xc.float(), self.codes, self.scales)
        return self._add_bias(y)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        """`y + bias` summed in float32 and rounded once to `y`'s dtype (as a compiled graph computes it)."""
        return y if self.bias is None else (y.float() + self.bias.float()).to(y.dtype)

    def _kernel(self, ops: Any, x2: torch.Tensor, bf16_gemm: bool) -> torch.Tensor:
        """The sparse kernel's int8 paths over the full mask: decode below `SparseLinear.crossover` tokens, else the
        prefill (tiles of `code * scale`, in bf16 with a bf16 GEMM for bf16 activations where `native_bf16_gemm`)."""
        n = x2.shape[0]
        if n < (self.bf16_crossover if bf16_gemm else self.crossover):
            key = (self.mask.data_ptr(), self.values.data_ptr(), self.scales.data_ptr(),
                   None if self.bias is None else (self.bias.data_ptr(), self.bias._version))
            if self.__dict__.get("_q8_key") != key:
                self._bias32 = None if self.bias is None else self.bias.detach().float().contiguous()
                self._q8 = ops.q8_args(self.mask, self.values, self.offsets, self.scales, None, self._bias32)
                self._q8_key = key
            code = DTYPE_CODES.get(x2.dtype)
            xc = (x2 if code is not None else x2.float()).contiguous()
            y = torch.empty(n, self.out_features, dtype=xc.dtype)
            check_rc("owl_decode_q8", ops.lib.owl_decode_q8(xc.data_ptr(), DTYPE_CODES[xc.dtype], n, self.in_features,
                                                            *self._q8, y.data_ptr()))
            return y
        if bf16_gemm:
            bias = None if self.bias is None else self.bias.to(torch.bfloat16).contiguous()
            xp = x2.contiguous()
        else:
            bias = None if self.bias is None else self.bias.float().contiguous()
            xp = F.pad(x2.float(), (0, self.mask.shape[1] * 8 - self.in_features)).contiguous()
        return ops.prefill(xp, self.mask, self.values, self.offsets, bias, self.in_features, self._tile_rows,
                           self.scales, None)

    def _tiled(self, x2: torch.Tensor) -> torch.Tensor:
        xf = x2.float()
        y_t = torch.empty(self.out_features, xf.shape[0])
        rows = max(1, TILE_ELEMENTS // max(1, self.in_features))
        for r0 in range(0, self.out_features, rows):
            r1 = min(self.out_features, r0 + rows)
            tile = self.codes[r0:r1].float().mul_(self.scales[r0:r1, None])
            torch.mm(tile, xf.t(), out=y_t[r0:r1])
        if self.bias is not None:
            y_t += self.bias.float()[:, None]
        return y_t.t().contiguous()


class Int8Embedding(_Int8Rows):
    """An `nn.Embedding` tied to an `Int8Linear` head: it shares the head's codes and scales (the same tensors)."""

    def __init__(self, head: Int8Linear, padding_idx: int | None) -> None:
        super().__init__(head.packed(), head.weight_dtype)
        self.num_embeddings, self.embedding_dim = self._shape
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.codes).float() * self.scales[ids].unsqueeze(-1)
        return rows.to(self.weight_dtype)

    def to_dense(self) -> nn.Embedding:
        module = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, device="meta")
        module.weight = nn.Parameter(self.dense_weight())
        return module

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, values=int8 (the tied "
                f"head's codes), weight_dtype={self.weight_dtype}")


# --------------------------------------------------------------------------------------------------- model level
def _module_names(model: nn.Module, module: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules(remove_duplicate=False) if m is module]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _getter(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return getattr(model, name)()
    except (AttributeError, NotImplementedError):
        return None


def quantize_lm_head(model: nn.Module) -> dict[str, Any] | None:
    """Replace, in place, the model's output head (`get_output_embeddings()`, an `nn.Linear`) by an `Int8Linear`, and
    a plain `nn.Embedding` tied to it by an `Int8Embedding` sharing its codes. Returns what it cost and saved (bytes,
    the relative weight error), or None (one INFO line says why) when the head is missing, already int8, not an
    `nn.Linear` of a float dtype on CPU, or tied to an embedding of another kind."""
    head = _getter(model, "get_output_embeddings")
    if isinstance(head, Int8Linear):
        return None
    if not isinstance(head, nn.Linear) or head.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or head.weight.device.type != "cpu":
        logger.info("quantize_head: the output head (%s) is not a float nn.Linear on CPU; left as it is",
                    type(head).__name__ if head is not None else "none")
        return None
    embedding = _getter(model, "get_input_embeddings")
    tied = embedding is not None and getattr(embedding, "weight", None) is head.weight
    if tied and (type(embedding) is not nn.Embedding or embedding.max_norm is not None):
        logger.info("quantize_head: the head is tied to a %s, whose lookup cannot read int8 rows; left as it is",
                    type(embedding).__name__)
        return None
    weight = head.weight.detach()
    new = Int8Linear.from_linear(head)
    error = relative_error(weight, new.dense_weight())
    dense_bytes = weight.numel() * weight.element_size()
    for name in _module_names(model, head):
        _set(model, name, new)
    if tied:
        lookup = Int8Embedding(new, embedding.padding_idx)
        for name in _module_names(model, embedding):
            _set(model, name, lookup)
    return {"tied": tied, "dense_bytes": dense_bytes, "int8_bytes": new.weight_nbytes(), "relative_error": error,
            "shape": list(weight.shape)}


def dequantize_lm_head(model: nn.Module) -> bool:
    """Undo `quantize_lm_head`: an `nn.Linear` with the dequantized weight (tied again to a dequantized `nn.Embedding`
    where the embedding shared the codes). Returns whether there was an int8 head."""
    head = _getter(model, "get_output_embeddings")
    if not isinstance(head, Int8Linear):
        return False
    dense = head.to_dense()
    for name in _module_names(model, head):
        _set(model, name, dense)
    embedding = _getter(model, "get_input_embeddings")
    if isinstance(embedding, Int8Embedding) and embedding.values is head.values:
        lookup = embedding.to_dense()
        lookup.weight = dense.weight  # tied again, as the model was
        for name in _module_names(model, embedding):
            _set(model, name, lookup)
    return True
