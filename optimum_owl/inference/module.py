"""`SparseLinear`: an inference-only linear layer that holds only the compact form of a pruned weight, and
`sparsify` / `densify`, which swap it in and out of a model in place.

Forward: on x86-64 CPUs with AVX2 the C++ kernel (`optimum_owl.inference.kernel`; AVX-512 where checked faster)
runs a mask-expanding matrix-vector product (decode) when the call has fewer than `crossover` tokens
(`bf16_crossover` where the prefill runs a bf16 GEMM), and a tile-wise expansion + GEMM otherwise (prefill).
Everywhere else (CUDA tensors, no compiler, other CPUs, inputs that need gradients) the pure-PyTorch path rebuilds
the dense weight for the call and uses `F.linear`. Both compute in float32 and return the input's dtype, except the
prefill of a bf16 model on CPUs with native bf16 dot products, which runs torch's bf16 GEMM on bf16 tiles (float32
accumulation, as the dense bf16 model's own GEMM does; `native_bf16_gemm`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.bitmask import BITMASK_SUFFIX, SHAPE_SUFFIX
from ..formats.compact import compressible_names
from ..formats.quantizer import mark_pruned
from ..utils import is_conv1d
from .format import Packed, from_checkpoint_parts, pack_dense, to_checkpoint_parts, unpack_dense, unpack_dense_torch
from .kernel import DTYPE_CODES, check_rc, kernel

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

    Build one with `SparseLinear.from_dense(linear)` (an `nn.Linear` or a GPT-2 `Conv1D`) or let `sparsify` do it.
    Inference only: the stored values are buffers, not parameters. `to_dense()` returns the original module type
    with a bit-identical weight. Its state dict is the compact checkpoint layout (`weight` = packed values,
    `weight_bitmask`, `weight_shape`), so `save_pretrained` writes the compact format without a dense copy.
    """

    crossover: int = DEFAULT_CROSSOVER
    bf16_crossover: int = BF16_GEMM_CROSSOVER  # replaces `crossover` where the prefill would run the bf16 GEMM
    # Prefill of bf16 activations with bf16 values: a bf16 GEMM (True), a float32 one (False), or None: bf16 where
    # this CPU has native bf16 dot products (`native_bf16_gemm`). Set on the class or on one module.
    bf16_gemm: bool | None = None

    def __init__(self, packed: Packed, bias: torch.Tensor | None, transposed: bool = False) -> None:
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.transposed = transposed  # True: came from a GPT-2 Conv1D (checkpoint layout [in, out])
        self.register_buffer("mask", packed.mask, persistent=False)
        self.register_buffer("values", packed.values, persistent=False)
        self.register_buffer("offsets", packed.offsets, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._nnz = packed.nnz
        self._tile_rows = max(64, TILE_BYTES // (4 * self.mask.shape[1] * 8))

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def from_dense(cls, module: nn.Module) -> SparseLinear:
        transposed = is_conv1d(module)
        if not (isinstance(module, nn.Linear) or transposed):
            raise TypeError(f"SparseLinear.from_dense expects nn.Linear or GPT-2 Conv1D, got {type(module).__name__}.")
        packed = pack_dense(module.weight, transposed=transposed)
        bias = module.bias.detach().cpu() if module.bias is not None else None
        sparse = cls(packed, bias, transposed)
        return sparse.to(module.weight.device)

    @classmethod
    def from_checkpoint_parts(
        cls, values: torch.Tensor, bitmask: torch.Tensor, shape: Any, bias: torch.Tensor | None,
        transposed: bool = False, name: str = "weight",
    ) -> SparseLinear:
        dims = shape.reshape(-1).tolist() if isinstance(shape, torch.Tensor) else list(shape)
        return cls(from_checkpoint_parts(values, bitmask, dims, transposed, name), bias, transposed)

    def packed(self) -> Packed:
        return Packed(self.mask, self.values, self.offsets, self.out_features, self.in_features)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        return self._nnz

    @property
    def sparsity(self) -> float:
        total = self.in_features * self.out_features
        return 1.0 - self._nnz / total if total else 0.0

    def weight_nbytes(self) -> int:
        """Bytes of the stored form (mask + values + offsets, padding included)."""
        return sum(t.numel() * t.element_size() for t in (self.mask, self.values, self.offsets))

    def dense_weight(self) -> torch.Tensor:
        """The dense weight in its original layout (`[out, in]`, or `[in, out]` for Conv1D), bit-identical."""
        return unpack_dense(self.packed(), self.transposed).to(self.values.device)

    def to_dense(self) -> nn.Module:
        """The equivalent `nn.Linear` (or GPT-2 `Conv1D`) with the bit-identical dense weight."""
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
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.dtype}, sparsity={self.sparsity:.3f}" + (", conv1d" if self.transposed else ""))

    # ----------------------------------------------------------------------------------------- state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        values, bitmask, shape = to_checkpoint_parts(self.packed(), self.transposed)
        destination[prefix + "weight"] = values
        destination[prefix + "weight" + BITMASK_SUFFIX] = bitmask
        destination[prefix + "weight" + SHAPE_SUFFIX] = shape
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        keys = [prefix + "weight", prefix + "weight" + BITMASK_SUFFIX, prefix + "weight" + SHAPE_SUFFIX]
        if all(k in state_dict for k in keys):
            values, bitmask, shape = (state_dict[k] for k in keys)
            packed = from_checkpoint_parts(values, bitmask, shape.reshape(-1).tolist(), self.transposed, keys[0])
            if (packed.out_features, packed.in_features) != (self.out_features, self.in_features):
                error_msgs.append(f"{keys[0]}: shape mismatch for SparseLinear")
            else:
                device = self.values.device
                self.mask, self.values, self.offsets = (t.to(device) for t in (packed.mask, packed.values, packed.offsets))
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
        bf16_gemm = x.dtype == torch.bfloat16 and self._buffers["values"].dtype == torch.bfloat16 and (
            native_bf16_gemm() if self.bf16_gemm is None else bool(self.bf16_gemm))
        if ops is not None and n < (self.bf16_crossover if bf16_gemm else self.crossover):
            return self._decode(ops, x, n)  # the hot path of generation: kept free of avoidable tensor ops
        x2 = x.reshape(-1, self.in_features)
        y = self._forward_pure(x2) if ops is None else self._prefill(ops, x2, bf16_gemm)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _forward_pure(self, x2: torch.Tensor) -> torch.Tensor:
        weight = unpack_dense_torch(self.mask, self.values, self.out_features, self.in_features, self._nnz)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x2.float(), weight.float(), bias)

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
        code = DTYPE_CODES.get(x.dtype)
        if code is None:  # e.g. float64: computed in float32, returned in x's dtype as on the other paths
            return self._decode(ops, x.float(), n).to(x.dtype)
        xc = x if x.is_contiguous() else x.contiguous()
        y = torch.empty(*x.shape[:-1], self.out_features, dtype=x.dtype)
        rc = ops.lib.owl_decode(xc.data_ptr(), code, n, self.in_features, *self._kernel_args(ops), y.data_ptr())
        check_rc("owl_decode", rc)
        return y

    def _kernel_args(self, ops: Any) -> tuple:
        """owl_decode's arguments after `x, xdtype, n, in` and before `y`: checked once, rebuilt only when a buffer
        moved (the dicts are read directly: this runs on every decoded token of every layer)."""
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


# --------------------------------------------------------------------------------------------------- model level
def _weight_sparsity(weight: torch.Tensor) -> float:
    if weight.numel() == 0:
        return 0.0
    ints = weight.detach().contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        weight.element_size()])
    return 1.0 - int(torch.count_nonzero(ints)) / weight.numel()


def sparsify(model: nn.Module, min_sparsity: float = 0.3, *, modules: list[str] | None = None) -> nn.Module:
    """Replace, in place, every pruned linear of `model` (inside the transformer blocks: `nn.Linear` and GPT-2
    `Conv1D`, never embeddings or the output head) whose sparsity is at least `min_sparsity` by a `SparseLinear`
    holding only the compact form, and return the model.

    `model.generate`, `model(...)` and `save_pretrained` (which then writes the compact checkpoint format) keep
    working; `densify(model)` turns the model back, bit for bit.

    Args:
        model: a transformers model (or any `nn.Module`) on CPU, weights in float32, bfloat16 or float16.
        min_sparsity: weights with fewer zeros than this fraction stay dense. The default 0.3 is where the compact
            form stops saving memory traffic in a useful way (0.7 + 1/32 of the fp32 bytes); speed was measured at
            50, 70 and 80% only (docs/inference.md).
        modules: optional explicit list of module names to convert (the sparsity threshold still applies).

    Example:

    ```python
    >>> import optimum_owl
    >>> model = optimum_owl.sparsify(pruned_model)            # doctest: +SKIP
    >>> model.generate(**inputs, max_new_tokens=32)           # doctest: +SKIP
    ```
    """
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"`min_sparsity` must be in [0, 1], got {min_sparsity}.")
    names = [n.removesuffix(".weight") for n in compressible_names(model)]
    if modules is not None:
        unknown = sorted(set(modules) - set(names))
        if unknown:
            raise ValueError(f"`modules` names {unknown} that are not eligible linears of this model (eligible: "
                             f"{names[:5]}...).")
        names = [n for n in names if n in set(modules)]
    converted = 0
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, SparseLinear):
            continue
        weight = module.weight
        if weight.device.type == "meta":
            raise ValueError(f"`{name}` has its weight on the meta device (offloaded); load the model fully into CPU "
                             "memory before `sparsify`.")
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"`{name}` has dtype {weight.dtype}; sparsify supports float32, bfloat16 and float16.")
        if _weight_sparsity(weight) < min_sparsity:
            continue
        set_submodule(model, name, SparseLinear.from_dense(module))
        converted += 1
    logger.info("sparsify: %d of %d eligible linears now sparse (min_sparsity=%.2f)", converted, len(names), min_sparsity)
    if converted and hasattr(model, "save_pretrained") and getattr(model, "hf_quantizer", None) is None:
        mark_pruned(model)  # so that save_pretrained writes the compact format with quant_method "owl"
    return model


def densify(model: nn.Module) -> nn.Module:
    """Turn every `SparseLinear` of `model` back into its dense `nn.Linear` / `Conv1D` (bit-identical weights), in
    place, and return the model."""
    names = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_dense())
    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` (dotted path) by `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
