"""`SparseLinear`: an inference-only linear layer that holds only the compact form of a pruned weight (float values,
or int8 codes with float32 scales); `optimum_owl.inference.convert` swaps it in and out of a model.

Forward: on x86-64 CPUs with AVX2 the C++ kernel (`optimum_owl.inference.kernel`; AVX-512 where checked faster)
runs a mask-expanding matrix-vector product (decode) when the call has fewer than `crossover` tokens
(`bf16_crossover` where the prefill runs a bf16 GEMM), and a tile-wise expansion + GEMM otherwise (prefill).
Everywhere else (CUDA tensors, no compiler, other CPUs, inputs that need gradients) the pure-PyTorch path rebuilds
the dense weight for the call and uses `F.linear`. Both compute in float32 and return the input's dtype, except the
prefill of a bf16 model on CPUs with native bf16 dot products, which runs torch's bf16 GEMM on bf16 tiles (float32
accumulation, as the dense bf16 model's own GEMM does; `native_bf16_gemm`).

int8 values (weight-only): the activations stay in the model's dtype, the sum is float32, each stored value is
`code * scale` (float32); the pure-PyTorch path dequantizes the weight in float32 and runs `F.linear` in float32, so it
gives exactly what the dequantized dense weight gives (`to_dense`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..algorithms.quantize import check_values, expand_scales
from ..formats.bitmask import BITMASK_SUFFIX, SCALE_SUFFIX, SHAPE_SUFFIX
from ..formats.int8 import set_int8_grid
from ..utils import is_conv1d
from .format import (
    Packed,
    from_checkpoint_parts,
    pack_dense,
    quantize_packed,
    to_checkpoint_parts,
    unpack_dense,
    unpack_dense_torch,
)
from .kernel import DTYPE_CODES, kernel
from .ops import traced_forward

logger = logging.getLogger(__name__)

# Calls with at least this many tokens use the prefill path (tile expansion + GEMM); measured with
# `bench/inference.py crossover` (docs/inference.md).
DEFAULT_CROSSOVER = 16
# The same for a bf16 model whose prefill runs torch's native bf16 GEMM (`native_bf16_gemm`): that prefill is about
# twice as fast as the float32 one, so it overtakes the decode kernel earlier (measured on Zen 4: 7-12 tokens).
BF16_GEMM_CROSSOVER = 10
# Rows expanded per prefill tile are chosen so that a float32 tile takes about this many bytes (fewer, larger GEMMs
# were faster than L2-sized tiles on the benchmark machine).
TILE_BYTES = 4 << 20

_warned: set[str] = set()


def _log_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.info(message)


class SparseLinear(nn.Module):
    """Linear layer `y = x W^T + b` whose weight is held only as a per-row bitmask plus packed non-zeros.

    Build one with `SparseLinear.from_dense(linear)` (an `nn.Linear` or a GPT-2 `Conv1D`; `values="int8"` for int8
    codes with float32 scales) or let `sparsify` do it. Inference only: the stored values are buffers, not parameters.
    `to_dense()` returns the original module type with a bit-identical weight (int8 values: the dequantized weight, in
    `weight_dtype`). Its state dict is the compact checkpoint layout (`weight` = packed values, `weight_bitmask`,
    `weight_shape`, and `weight_scale` for int8 values), so `save_pretrained` writes the compact format without a
    dense copy.
    """

    crossover: int = DEFAULT_CROSSOVER
    bf16_crossover: int = BF16_GEMM_CROSSOVER  # replaces `crossover` where the prefill would run the bf16 GEMM
    # Prefill of bf16 activations with bf16 values: a bf16 GEMM (True), a float32 one (False), or None: bf16 where
    # this CPU has native bf16 dot products (`native_bf16_gemm`). Set on the class or on one module.
    bf16_gemm: bool | None = None

    def __init__(self, packed: Packed, bias: torch.Tensor | None, transposed: bool = False,
                 weight_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.transposed = transposed  # True: came from a GPT-2 Conv1D (checkpoint layout [in, out])
        self.register_buffer("mask", packed.mask, persistent=False)
        self.register_buffer("values", packed.values, persistent=False)
        self.register_buffer("offsets", packed.offsets, persistent=False)
        # int8 values: float32 scales (kept float32 by `.to(dtype)`, see `_apply`); None for float values
        self.register_buffer("scales", packed.scales, persistent=False)
        self.group_size = packed.group_size
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # the dtype of the dense weight `to_dense` gives: the values' own for float values, the model's for int8
        default = packed.values.dtype if not packed.int8 else (bias.dtype if bias is not None else torch.float32)
        self.weight_dtype = weight_dtype or default
        self._nnz = packed.nnz
        self._tile_rows = max(64, TILE_BYTES // (4 * self.mask.shape[1] * 8))

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def from_dense(cls, module: nn.Module, values: str = "float", group_size: int | None = None,
                   scales: torch.Tensor | None = None) -> SparseLinear:
        """The sparse form of `module` (its zeros are the elements left out). `values="int8"`: round-to-nearest int8
        codes of the stored values, one float32 scale per output row (or per row and group of `group_size` inputs),
        or on the given `scales` (a grid recorded when the model was quantized)."""
        check_values(values)
        transposed = is_conv1d(module)
        if not (isinstance(module, nn.Linear) or transposed):
            raise TypeError(f"SparseLinear.from_dense expects nn.Linear or GPT-2 Conv1D, got {type(module).__name__}.")
        packed = pack_dense(module.weight, transposed=transposed)
        if values == "int8":
            packed = quantize_packed(packed, group_size, scales)
        bias = module.bias.detach().cpu() if module.bias is not None else None
        sparse = cls(packed, bias, transposed, weight_dtype=module.weight.dtype)
        return sparse.to(module.weight.device)

    @classmethod
    def from_checkpoint_parts(
        cls, values: torch.Tensor, bitmask: torch.Tensor, shape: Any, bias: torch.Tensor | None,
        transposed: bool = False, name: str = "weight", scales: torch.Tensor | None = None,
        group_size: int | None = None, weight_dtype: torch.dtype | None = None,
    ) -> SparseLinear:
        """From a compact checkpoint's parts (with `scales` for int8 codes); see `format.from_checkpoint_parts`."""
        dims = shape.reshape(-1).tolist() if isinstance(shape, torch.Tensor) else list(shape)
        packed = from_checkpoint_parts(values, bitmask, dims, transposed, name, scales, group_size)
        return cls(packed, bias, transposed, weight_dtype)

    def packed(self) -> Packed:
        return Packed(self.mask, self.values, self.offsets, self.out_features, self.in_features, self.scales,
                      self.group_size)

    @property
    def dtype(self) -> torch.dtype:
        """The stored values' dtype (`torch.int8` for int8 codes; `weight_dtype` is the dense weight's)."""
        return self.values.dtype

    @property
    def int8(self) -> bool:
        return self._buffers.get("scales") is not None

    @property
    def nnz(self) -> int:
        return self._nnz

    @property
    def sparsity(self) -> float:
        total = self.in_features * self.out_features
        return 1.0 - self._nnz / total if total else 0.0

    def weight_nbytes(self) -> int:
        """Bytes of the stored form (mask + values + offsets + int8 scales, padding included)."""
        tensors = (self.mask, self.values, self.offsets) + ((self.scales,) if self.int8 else ())
        return sum(t.numel() * t.element_size() for t in tensors)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight in its original layout (`[out, in]`, or `[in, out]` for Conv1D): bit-identical for float
        values; for int8 values `code * scale` computed in float32, in `weight_dtype`."""
        return unpack_dense(self.packed(), self.transposed, self.weight_dtype).to(self.values.device)

    def to_dense(self) -> nn.Module:
        """The equivalent `nn.Linear` (or GPT-2 `Conv1D`) with the bit-identical dense weight (int8 values: the
        dequantized weight, its grid recorded on the module so that `save_pretrained` stores the codes again)."""
        weight = self.dense_weight()
        if self.transposed:
            from transformers.pytorch_utils import Conv1D

            module = Conv1D(self.out_features, self.in_features)
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        module.weight = nn.Parameter(weight)
        if self.bias is not None:
            module.bias = nn.Parameter(self.bias.detach().clone())
        elif self.transposed:
            module.bias = None
        if self.int8:
            set_int8_grid(module, self.scales, self.group_size)
        return module

    def extra_repr(self) -> str:
        values = f"values=int8, group_size={self.group_size}" if self.int8 else f"dtype={self.dtype}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{values}, sparsity={self.sparsity:.3f}" + (", conv1d" if self.transposed else ""))

    def _apply(self, fn: Callable, recurse: bool = True) -> SparseLinear:
        """`.to()`, `.cuda()`, `.half()`...: int8 scales keep float32 (only move), and `weight_dtype` follows a cast."""
        self.weight_dtype = fn(torch.zeros(0, dtype=self.weight_dtype)).dtype
        scales = self._buffers.get("scales")
        if scales is None:
            return super()._apply(fn, recurse)
        self._buffers["scales"] = None
        try:
            super()._apply(fn, recurse)
        finally:
            device = self._buffers["values"].device
            self._buffers["scales"] = scales.to(device)
        return self

    # ----------------------------------------------------------------------------------------- state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        values, bitmask, shape = to_checkpoint_parts(self.packed(), self.transposed)
        destination[prefix + "weight"] = values
        destination[prefix + "weight" + BITMASK_SUFFIX] = bitmask
        destination[prefix + "weight" + SHAPE_SUFFIX] = shape
        if self.int8:
            destination[prefix + "weight" + SCALE_SUFFIX] = self.scales
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [prefix + "weight", prefix + "weight" + BITMASK_SUFFIX, prefix + "weight" + SHAPE_SUFFIX]
        if all(k in state_dict for k in keys):
            values, bitmask, shape = (state_dict[k] for k in keys)
            scales = state_dict.get(keys[0] + SCALE_SUFFIX)
            group_size = self.group_size if scales is not None and scales.dim() == 2 else None
            packed = from_checkpoint_parts(values, bitmask, shape.reshape(-1).tolist(), self.transposed, keys[0],
                                           scales, group_size)
            if (packed.out_features, packed.in_features) != (self.out_features, self.in_features):
                error_msgs.append(f"{keys[0]}: shape mismatch for SparseLinear")
            else:
                device = self.values.device
                self.mask, self.values, self.offsets = (t.to(device) for t in (packed.mask, packed.values, packed.offsets))
                self._buffers["scales"] = None if scales is None else packed.scales.to(device)
                self.group_size = packed.group_size
                self._nnz = packed.nnz
        elif strict:
            missing_keys.extend(k for k in keys if k not in state_dict)
        bias_key = prefix + "bias"
        if self.bias is not None:
            if bias_key in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bias_key])
            elif strict:
                missing_keys.append(bias_key)

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects inputs with {self.in_features} features, got {x.shape[-1]}.")
        if torch.compiler.is_compiling():  # torch.compile: the kernel as torch operators, same results (ops.py)
            y = traced_forward(self, x, native_bf16_gemm.__wrapped__)  # unwrapped: dynamo warns of the cache
            if y is not None:
                return y
        ops = None
        if x.device.type != "cpu":
            _log_once("device", f"optimum-owl sparse inference: using the pure-PyTorch path because the tensors are on "
                                f"{x.device.type}, not CPU.")
        elif x.requires_grad and torch.is_grad_enabled():
            _log_once("grad", "optimum-owl sparse inference: using the pure-PyTorch path because the input needs "
                              "gradients (the kernel is inference-only).")
        else:
            ops = kernel()
        n = x.numel() // self.in_features
        if self._buffers["values"].dtype == torch.int8:
            return self._forward_int8(ops, x, n)
        bf16_gemm = x.dtype == torch.bfloat16 and self._buffers["values"].dtype == torch.bfloat16 and (
            native_bf16_gemm() if self.bf16_gemm is None else bool(self.bf16_gemm))
        if ops is not None and n < (self.bf16_crossover if bf16_gemm else self.crossover):
            return self._decode(ops, x, n)  # the hot path of generation: kept free of avoidable tensor ops
        x2 = x.reshape(-1, self.in_features)
        y = self._forward_pure(x2) if ops is None else self._prefill(ops, x2, bf16_gemm)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _forward_pure(self, x2: torch.Tensor) -> torch.Tensor:
        weight = unpack_dense_torch(self.mask, self.values, self.out_features, self.in_features, self._nnz).float()
        if self.int8:  # code * scale in float32: the dequantized dense weight, exactly
            weight = weight * expand_scales(self.scales, self.in_features, self.group_size)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x2.float(), weight, bias)

    def _forward_int8(self, ops: Any, x: torch.Tensor, n: int) -> torch.Tensor:
        """int8 values: the kernel's int8 decode below the crossover, else its prefill (tiles of `code * scale`, bf16
        tiles and GEMM for bf16 activations where `native_bf16_gemm`), or the pure path without the kernel."""
        bf16_gemm = x.dtype == torch.bfloat16 and (native_bf16_gemm() if self.bf16_gemm is None else bool(self.bf16_gemm))
        if ops is not None and n < (self.bf16_crossover if bf16_gemm else self.crossover):
            return self._decode_q8(ops, x, n)
        x2 = x.reshape(-1, self.in_features)
        if ops is None:
            y = self._forward_pure(x2)
        elif bf16_gemm:
            bias = None if self.bias is None else self.bias.to(torch.bfloat16).contiguous()
            y = ops.prefill(x2.contiguous(), self.mask, self.values, self.offsets, bias, self.in_features,
                            self._tile_rows, self.scales, self.group_size)
        else:
            bias = None if self.bias is None else self.bias.float().contiguous()
            y = ops.prefill(self._padded_float(x2), self.mask, self.values, self.offsets, bias, self.in_features,
                            self._tile_rows, self.scales, self.group_size)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _decode_q8(self, ops: Any, x: torch.Tensor, n: int) -> torch.Tensor:
        code = DTYPE_CODES.get(x.dtype)
        if code is None:  # e.g. float64: computed in float32, returned in x's dtype as on the other paths
            return self._decode_q8(ops, x.float(), n).to(x.dtype)
        self._q8_args(ops)  # checks the buffers once, keeps `_bias32` current
        buffers = self._buffers  # the kernel's torch operator, as `_decode`
        return torch.ops.owl.sparse_decode_q8(x if x.is_contiguous() else x.contiguous(), buffers["mask"],
                                              buffers["values"], buffers["offsets"], buffers["scales"],
                                              0 if self.group_size is None else self.group_size // 64, self._bias32)

    def _q8_args(self, ops: Any) -> tuple:
        """owl_decode_q8's cached arguments (`KernelOps.q8_args`), rebuilt only when a buffer moved or the bias
        changed, as `_kernel_args` does for float values."""
        buffers = self._buffers
        mask, codes, offsets, scales = buffers["mask"], buffers["values"], buffers["offsets"], buffers["scales"]
        bias = self._parameters.get("bias")
        key = (mask.data_ptr(), codes.data_ptr(), offsets.data_ptr(), scales.data_ptr(), self.group_size,
               None if bias is None else (bias.data_ptr(), bias.dtype, bias._version))
        if self.__dict__.get("_q8_key") != key:
            self._bias32 = None if bias is None else bias.detach().float().contiguous()
            self._q8 = ops.q8_args(mask, codes, offsets, scales, self.group_size, self._bias32)
            self._q8_key = key
        return self._q8

    def _padded_float(self, x2: torch.Tensor) -> torch.Tensor:
        """`x2` as contiguous float32 `[n, 64 * words per row]` (zero columns past `in_features`), as the kernel reads it."""
        xp = x2 if x2.dtype == torch.float32 else x2.float()
        width = self.mask.shape[1] * 8
        if width != self.in_features:
            xp = F.pad(xp, (0, width - self.in_features))
        return xp.contiguous()

    def _prefill(self, ops: Any, x2: torch.Tensor, bf16_gemm: bool) -> torch.Tensor:
        if bf16_gemm:
            bias = None if self.bias is None else self.bias.to(torch.bfloat16).contiguous()
            return ops.prefill(x2.contiguous(), self.mask, self.values, self.offsets, bias, self.in_features,
                               self._tile_rows)
        bias = None if self.bias is None else self.bias.float().contiguous()
        return ops.prefill(self._padded_float(x2), self.mask, self.values, self.offsets, bias, self.in_features,
                           self._tile_rows)

    def _decode(self, ops: Any, x: torch.Tensor, n: int) -> torch.Tensor:
        # float32 / bfloat16 / float16 activations go to the kernel as they are: it widens (and pads) them itself and
        # writes the output in their dtype, so a bf16 model's call runs no torch conversion ops
        if x.dtype not in DTYPE_CODES:  # e.g. float64: computed in float32, returned in x's dtype as on the other paths
            return self._decode(ops, x.float(), n).to(x.dtype)
        self._kernel_args(ops)  # checks the buffers once, keeps `_bias32` current
        buffers = self._buffers  # the kernel's torch operator: cheaper per call than ctypes (docs/inference.md)
        return torch.ops.owl.sparse_decode(x if x.is_contiguous() else x.contiguous(), buffers["mask"],
                                           buffers["values"], buffers["offsets"], self._bias32)

    def _kernel_args(self, ops: Any) -> tuple:
        """owl_decode's arguments after `x, xdtype, n, in` and before `y`: checked once, rebuilt only when a buffer
        moved (the dicts are read directly: this runs on every decoded token of every layer). The forward uses the
        check and the float32 bias `_bias32` it keeps; bench/probes/decode_conversion_ab.py calls owl_decode with them."""
        buffers = self._buffers
        mask, values, offsets = buffers["mask"], buffers["values"], buffers["offsets"]
        bias = self._parameters.get("bias")
        key = (mask.data_ptr(), values.data_ptr(), offsets.data_ptr(), values.dtype,
               None if bias is None else (bias.data_ptr(), bias.dtype, bias._version))
        if self.__dict__.get("_args_key") != key:  # first call, or the buffers moved (`.to()`, load_state_dict)
            code = ops.check_weight(mask, values, offsets)
            # kept on the module so that the float32 copy of a bf16/fp16 bias lives as long as the pointer is used
            self._bias32 = None if bias is None else bias.detach().float().contiguous()
            bias_ptr = None if self._bias32 is None else self._bias32.data_ptr()
            self._args = (key[0], self.out_features, mask.shape[1] // 8, key[1], code, key[2], bias_ptr)
            self._args_key = key
        return self._args


@functools.cache
@torch.compiler.assume_constant_result  # a constant of compiled graphs (`ops.traced_forward`)
def native_bf16_gemm() -> bool:
    """Whether torch's bf16 GEMM runs on native bf16 dot products on this CPU (AVX512-BF16 or AMX). There a bf16
    prefill GEMM is about twice as fast as a float32 one (the dense bf16 model's prefill is too: docs/inference.md);
    elsewhere bf16 GEMMs are emulated and far slower than float32 (5x on an AVX2-only CPU), so float32 is used."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except Exception:  # noqa: BLE001 - private torch helpers: when they fail, float32 is always correct
        return False
