"""`sparsify` / `densify`: swap a model's pruned linears for `SparseLinear` (float values, or int8 codes with float32
scales) and, for int8 values, its LM head for a dense int8 one (`head.py`), in place, and back; `sparse_summary`
accounts for the bytes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..algorithms.quantize import check_group_size, check_values
from ..formats.compact import compressible_names
from ..formats.int8 import int8_grid
from ..formats.quantizer import mark_pruned
from .format import quantize_packed
from .head import Int8Embedding, Int8Linear, dequantize_lm_head, quantize_lm_head
from .module import SparseLinear

logger = logging.getLogger(__name__)

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def check_int8_options(values: str, group_size: int | None, field: str = "group_size") -> int | None:
    """`group_size` after checking it against `values`: None (one scale per output row) or a multiple of 64, and only
    with int8 values; a ValueError naming `field` otherwise."""
    check_values(values)
    check_group_size(group_size, field)
    if group_size is None:
        return None
    if values != "int8":
        raise ValueError(f"{field}={group_size} applies to int8 values only; pass values='int8' or leave {field} unset.")
    if group_size % 64:
        raise ValueError(f"{field} must be None (one scale per output row) or a multiple of 64 such as 128 (the "
                         f"kernels read 64 inputs per mask word), got {group_size}.")
    return group_size


def _weight_sparsity(weight: torch.Tensor) -> float:
    if weight.numel() == 0:
        return 0.0
    ints = weight.detach().contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[
        weight.element_size()])
    return 1.0 - int(torch.count_nonzero(ints)) / weight.numel()


def _recorded_scales(module: nn.Module, name: str, group_size: int | None) -> tuple[torch.Tensor | None, int | None]:
    """The int8 grid recorded on `module` when it was pruned with values="int8" (its codes then come back exactly),
    or `(None, group_size)` to compute scales from the weight."""
    grid = int8_grid(module)
    if grid is None:
        return None, group_size
    if group_size is not None and grid.group_size != group_size:
        raise ValueError(f"group_size={group_size}, but `{name}` was quantized with group_size={grid.group_size} when "
                         "it was pruned; leave group_size unset to keep its codes, or load the float model.")
    return grid.scales, grid.group_size


def sparsify(model: nn.Module, min_sparsity: float = 0.3, *, modules: list[str] | None = None, values: str = "float",
             group_size: int | None = None, quantize_head: bool | None = None) -> nn.Module:
    """Replace, in place, every pruned linear of `model` (inside the transformer blocks: `nn.Linear` and GPT-2
    `Conv1D`, never embeddings or the output head) whose sparsity is at least `min_sparsity` by a `SparseLinear`
    holding only the compact form, and return the model.

    `model.generate`, `model(...)` and `save_pretrained` (which then writes the compact checkpoint format) keep
    working; `densify(model)` turns the model back: bit for bit with float values, to the dequantized weights with
    int8 values.

    Args:
        model: a transformers model (or any `nn.Module`) on CPU, weights in float32, bfloat16 or float16.
        min_sparsity: weights with fewer zeros than this fraction stay dense. The default 0.3 is where the compact
            form stops saving memory traffic in a useful way (0.7 + 1/32 of the fp32 bytes); speed was measured at
            50, 70 and 80% only (docs/inference.md). When no weight reaches it, a WARNING says so.
        modules: optional explicit list of module names to convert (the sparsity threshold still applies).
        values: `"float"` (the weight's dtype, the default) or `"int8"`: int8 codes of the kept values (symmetric,
            round-to-nearest) with float32 scales; activations stay in the model's dtype, sums are float32. A model
            pruned with values="int8" keeps the codes it was pruned to.
        group_size: int8 only: None (one scale per output row, the default) or a multiple of 64 such as 128 (one
            scale per row and group of that many inputs).
        quantize_head: also store the LM head as dense int8 weight-only (a tied input embedding then reads the same
            codes); default: True for int8 values, False for float values. The log line says what it saves and costs.

    Example:

    ```python
    >>> import optimum_owl
    >>> model = optimum_owl.sparsify(pruned_model)            # doctest: +SKIP
    >>> model = optimum_owl.sparsify(pruned_model, values="int8")  # doctest: +SKIP
    >>> model.generate(**inputs, max_new_tokens=32)           # doctest: +SKIP
    ```
    """
    group_size = check_int8_options(values, group_size)
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"`min_sparsity` must be in [0, 1], got {min_sparsity}.")
    names = [n.removesuffix(".weight") for n in compressible_names(model)]
    names += [n for n, m in model.named_modules() if isinstance(m, SparseLinear) and n not in set(names)]
    if modules is not None:
        unknown = sorted(set(modules) - set(names))
        if unknown:
            raise ValueError(f"`modules` names {unknown} that are not eligible linears of this model (eligible: "
                             f"{names[:5]}...).")
        names = [n for n in names if n in set(modules)]
    converted, sparsest = 0, (-1.0, "")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, SparseLinear):  # already sparse: float values become int8 if asked, nothing else
            if values == "int8" and not module.int8:
                bias = None if module.bias is None else module.bias.detach()
                packed = quantize_packed(module.packed(), group_size)
                set_submodule(model, name, SparseLinear(packed, bias, module.transposed, module.weight_dtype))
                converted += 1
            continue
        weight = module.weight
        if weight.device.type == "meta":
            raise ValueError(f"`{name}` has its weight on the meta device (offloaded); load the model fully into CPU "
                             "memory before `sparsify`.")
        if weight.dtype not in _FLOAT:
            raise ValueError(f"`{name}` has dtype {weight.dtype}; sparsify supports float32, bfloat16 and float16.")
        sparsity = _weight_sparsity(weight)
        sparsest = max(sparsest, (sparsity, name))
        if sparsity < min_sparsity:
            continue
        scales, size = _recorded_scales(module, name, group_size) if values == "int8" else (None, None)
        set_submodule(model, name, SparseLinear.from_dense(module, values, size, scales))
        converted += 1
    if names and not converted and sparsest[0] >= 0:
        logger.warning("sparsify: none of the %d eligible linears reaches min_sparsity=%.2f (the sparsest, `%s`, is "
                       "%.1f%% zeros): nothing was converted. Prune the model first, or pass a lower min_sparsity.",
                       len(names), min_sparsity, sparsest[1], 100 * sparsest[0])
    head = quantize_lm_head(model) if (values == "int8" if quantize_head is None else quantize_head) else None
    logger.info("sparsify: %s", summary_text(sparse_summary(model), head))
    if converted and hasattr(model, "save_pretrained") and getattr(model, "hf_quantizer", None) is None:
        mark_pruned(model)  # so that save_pretrained writes the compact format with quant_method "owl"
    return model


def densify(model: nn.Module) -> nn.Module:
    """Turn every `SparseLinear` of `model` back into its dense `nn.Linear` / `Conv1D` (float values: bit-identical
    weights; int8 values: the dequantized weights, `code * scale` computed in float32, in the model's dtype) and an
    int8 head (and the embedding tied to it) into the dequantized dense ones, in place, and return the model."""
    names = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_dense())
    dequantize_lm_head(model)
    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` (dotted path) by `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def sparse_summary(model: nn.Module) -> dict[str, Any]:
    """Bytes of the model's weights as held now: `sparse_linears` / `int8_linears` (counts), `block_bytes` (their
    stored form: mask, values, offsets, scales) and `block_dense_bytes` (the same weights dense in the model's dtype),
    `head_bytes` / `head_dense_bytes` (the output head as held / dense) and `head_int8`, `head_tied`."""
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    head = next((m for m in model.modules() if isinstance(m, Int8Linear)), None)
    out: dict[str, Any] = {
        "sparse_linears": len(sparse),
        "int8_linears": sum(m.int8 for m in sparse),
        "block_bytes": sum(m.weight_nbytes() for m in sparse),
        "block_dense_bytes": sum(m.in_features * m.out_features * m.weight_dtype.itemsize for m in sparse),
        "head_int8": head is not None,
        "head_tied": head is not None and any(isinstance(m, Int8Embedding) and m.values is head.values
                                              for m in model.modules()),
    }
    if head is not None:
        out["head_bytes"] = head.weight_nbytes()
        out["head_dense_bytes"] = head.codes.numel() * head.weight_dtype.itemsize
    else:
        try:
            weight = getattr(model.get_output_embeddings(), "weight", None)
        except (AttributeError, NotImplementedError):
            weight = None
        if isinstance(weight, torch.Tensor):
            out["head_bytes"] = out["head_dense_bytes"] = weight.numel() * weight.element_size()
    return out


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def summary_text(summary: dict[str, Any], head: dict[str, Any] | None = None) -> str:
    """One line for the log: the sparse linears and their bytes, and what the int8 head saves and costs."""
    text = (f"{summary['sparse_linears']} sparse linears ({summary['int8_linears']} with int8 values): "
            f"{_size(summary['block_bytes'])} held for {_size(summary['block_dense_bytes'])} dense")
    if head is not None:
        text += (f"; LM head {head['shape'][0]} x {head['shape'][1]} as dense int8 (one scale per row): "
                 f"{_size(head['int8_bytes'])} read per token instead of {_size(head['dense_bytes'])} (saves "
                 f"{_size(head['dense_bytes'] - head['int8_bytes'])}; costs a relative weight error of "
                 f"{100 * head['relative_error']:.2f}%")
        text += ("; the tied input embedding reads the same int8 rows)" if head["tied"] else ")")
    return text
