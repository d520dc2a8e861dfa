"""Mask-preserving LoRA on top of PEFT: the adapter's delta is multiplied by the pruned weight's keep-mask.

`W_eff = W + s·(B@A) ⊙ M` with `M = (W ≠ 0)` captured from the (frozen, sparse) base weight when the adapter is
attached. Because PEFT's `merge()` / `merge_and_unload()` go through `get_delta_weight`, masking there makes the
merged weight keep every pruned zero exactly (`0 + 0 = 0`) and every N:M group valid.

The layer is injected through PEFT's (experimental) custom-module hook `LoraConfig._register_custom_module`. The mask
is a non-persistent buffer: it is never written to the adapter file and is recomputed from the sparse base on load,
so `load_masked_adapter` must be given the *pruned* model.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import RepairConfigError, RepairModelError, RepairWarning
from ..utils import atomic_output_dir, input_paths, is_conv1d, matches_any
from .config import RepairConfig
from .sparsity import detect_nm, prunable_params, unwrap_peft, zeros_lost

logger = logging.getLogger(__name__)

ADAPTER_MARKER_NAME = "owl_masked_lora.json"
ADAPTER_FORMAT = "optimum-owl-masked-lora"

try:  # peft is an optional extra
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.lora.layer import Linear as _LoraLinear
except ImportError:  # pragma: no cover - exercised only without the extra
    _LoraLinear = nn.Module  # type: ignore[assignment,misc]
    LoraConfig = PeftModel = get_peft_model = None  # type: ignore[assignment]


def _require_peft() -> None:
    if LoraConfig is None:
        raise ImportError("Sparse repair with masked LoRA needs peft: pip install 'optimum-owl[peft]'.")


class _MaskedLoRAFn(torch.autograd.Function):
    """`y = x @ (W + s·(B@A) ⊙ keep)ᵀ + b` with memory like plain LoRA: only `x` is saved, `W_eff` is recomputed.

    Backward: `grad_x = gy @ W_eff`, `G = s·(gyᵀ x) ⊙ keep`, `grad_A = Bᵀ G`, `grad_B = G Aᵀ`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, pruned, scaling):  # type: ignore[override]
        w_eff = torch.mm(lora_b, lora_a).mul_(scaling).masked_fill_(pruned, 0).add_(weight)
        ctx.save_for_backward(x, weight, lora_a, lora_b, pruned)
        ctx.scaling = scaling
        ctx.has_bias_grad = bias is not None and bias.requires_grad
        return F.linear(x, w_eff, bias)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        x, weight, lora_a, lora_b, pruned = ctx.saved_tensors
        s = ctx.scaling
        grad_x = grad_a = grad_b = grad_bias = None
        gy2 = gy.reshape(-1, gy.shape[-1])
        if ctx.needs_input_grad[0]:
            w_eff = torch.mm(lora_b, lora_a).mul_(s).masked_fill_(pruned, 0).add_(weight)
            grad_x = (gy2 @ w_eff).view(*gy.shape[:-1], w_eff.shape[1])
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            g = torch.mm(gy2.t(), x.reshape(-1, x.shape[-1])).masked_fill_(pruned, 0).mul_(s)
            if ctx.needs_input_grad[3]:
                grad_a = torch.mm(lora_b.t(), g)
            if ctx.needs_input_grad[4]:
                grad_b = torch.mm(g, lora_a.t())
        if ctx.has_bias_grad:
            grad_bias = gy2.sum(0)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


class MaskedLoraLinear(_LoraLinear):
    """A PEFT LoRA `Linear` whose delta is zero wherever the base weight is zero (pruned).

    Handles `nn.Linear` and GPT-2 `Conv1D` bases (the latter with `fan_in_fan_out=True`). The pruned-position mask
    is the non-persistent bool buffer `owl_pruned_mask` in the base weight's stored layout.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        weight = self.get_base_layer().weight
        self.register_buffer("owl_pruned_mask", (weight.detach() == 0), persistent=False)

    # -------------------------------------------------------------------------------------------- merge path
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        delta = super().get_delta_weight(adapter)
        return delta.masked_fill(self.owl_pruned_mask.to(delta.device), 0)

    # -------------------------------------------------------------------------------------------- forward
    def _masked_delta_oi(self, adapter: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The masked delta in `[out, in]` layout (differentiable w.r.t. A and B)."""
        a = self.lora_A[adapter].weight
        b = self.lora_B[adapter].weight
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        pruned = self.owl_pruned_mask.t() if self.fan_in_fan_out else self.owl_pruned_mask
        return (b @ a * self.scaling[adapter]).masked_fill(pruned, 0)

    def _can_fuse(self, x: torch.Tensor, adapters: list[str]) -> bool:
        if len(adapters) != 1 or self.fan_in_fan_out or not isinstance(self.get_base_layer(), nn.Linear):
            return False
        adapter = adapters[0]
        if adapter in self.lora_variant or self.lora_bias.get(adapter, False):
            return False
        if not isinstance(self.lora_dropout[adapter], nn.Identity):
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        w = self.get_base_layer().weight
        return x.dtype == w.dtype == self.lora_A[adapter].weight.dtype and not w.requires_grad

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise NotImplementedError("Masked LoRA does not support mixed-adapter batches (`adapter_names=`).")
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if not adapters:
            return base(x, *args, **kwargs)
        if not args and not kwargs and self._can_fuse(x, adapters):
            a = adapters[0]
            return _MaskedLoRAFn.apply(
                x, base.weight, base.bias, self.lora_A[a].weight, self.lora_B[a].weight,
                self.owl_pruned_mask, float(self.scaling[a]),
            )
        result = base(x, *args, **kwargs)
        out_dtype = result.dtype
        for a in adapters:
            if a in self.lora_variant:
                raise NotImplementedError("Masked LoRA does not support LoRA variants (DoRA, ...).")
            xa = self._cast_input_dtype(x, self.lora_A[a].weight.dtype)
            result = result + F.linear(self.lora_dropout[a](xa), self._masked_delta_oi(a))
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "masked_" + super().__repr__()


# ------------------------------------------------------------------------------------------------ checks & targets
QUANT_ATTRS = ("qweight", "W_q", "quant_state", "weight_scale", "qzeros")


def check_not_quantized(model: nn.Module) -> None:
    """Raise `RepairModelError` when the model's base layers are quantized (their zeros are not visible)."""
    base = unwrap_peft(model)
    qc = getattr(getattr(base, "config", None), "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)
    problem = None
    if method is not None and str(method) != "owl":
        problem = f"the model is quantized with quant_method={method!r}"
    else:
        for name, module in base.named_modules():
            w = getattr(module, "weight", None)
            if any(hasattr(module, attr) for attr in QUANT_ATTRS) or type(w).__name__ in ("Params4bit", "Int8Params"):
                problem = f"module `{name}` ({type(module).__name__}) holds quantized weights"
                break
            if isinstance(w, torch.Tensor) and not (w.is_floating_point() and w.element_size() >= 2):
                problem = f"module `{name}` has a {w.dtype} weight"
                break
    if problem:
        raise RepairModelError(
            f"Cannot repair `model`: {problem}. Masked repair reads the pruned positions from the exact zeros of "
            "floating-point base weights, which quantized layers do not expose (zero-points, packed ints). "
            "Repair the pruned model in fp32/bf16/fp16 first, then quantize the merged result."
        )


def resolve_targets(model: nn.Module, config: RepairConfig) -> tuple[list[str], bool]:
    """Module names to adapt, and whether the model has any zeros in its prunable weights.

    Raises `RepairConfigError` (naming `target_modules`) when nothing matches, `RepairModelError` when the model
    has no prunable linear weights at all.
    """
    params = [pp for pp in prunable_params(model) if isinstance(pp.module, nn.Linear) or is_conv1d(pp.module)]
    if not params:
        raise RepairModelError(
            "Cannot repair `model`: its transformer blocks hold no nn.Linear / Conv1D weights that LoRA can adapt."
        )
    has_zeros = {pp.name: bool((pp.param.detach() == 0).any()) for pp in params}
    any_zeros = any(has_zeros.values())
    tm = config.target_modules
    if tm == "pruned":
        names = [pp.name for pp in params if has_zeros[pp.name]] if any_zeros else [pp.name for pp in params]
    elif tm == "all":
        names = [pp.name for pp in params]
    else:
        names = [pp.name for pp in params if matches_any(pp.name, list(tm))]
        if not names:
            raise RepairConfigError(
                f"`target_modules={list(tm)}` matches none of the model's prunable weights; examples of valid "
                f"names: {[pp.name for pp in params[:4]]} (globs such as '*q_proj' and 're:<regex>' also work)."
            )
    return names, any_zeros


def build_lora_config(model: nn.Module, config: RepairConfig, targets: list[str]) -> Any:
    """A `peft.LoraConfig` for `targets` with `MaskedLoraLinear` registered for `nn.Linear`/`Conv1D` bases."""
    _require_peft()
    base = unwrap_peft(model)
    kinds = {is_conv1d(base.get_submodule(t)) for t in targets}
    if len(kinds) > 1:
        raise RepairConfigError(
            "`target_modules` mixes nn.Linear and GPT-2 Conv1D layers; PEFT needs one `fan_in_fan_out` setting. "
            "Pass a list of names of one kind."
        )
    lora_cfg = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(targets),
        bias="none",
        fan_in_fan_out=kinds == {True},
    )
    register_masked_modules(lora_cfg)
    return lora_cfg


def register_masked_modules(lora_cfg: Any) -> Any:
    """Register `MaskedLoraLinear` for `nn.Linear` (and transformers' `Conv1D`) on a `LoraConfig`."""
    mapping: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: MaskedLoraLinear}
    try:
        from transformers.pytorch_utils import Conv1D

        mapping[Conv1D] = MaskedLoraLinear
    except ImportError:  # pragma: no cover
        pass
    lora_cfg._register_custom_module(mapping)
    return lora_cfg


# ------------------------------------------------------------------------------------------------ public API
def attach_masked_lora(model: nn.Module, config: RepairConfig | None = None) -> Any:
    """Wrap a pruned model with a mask-preserving LoRA (a regular `peft.PeftModel`, usable with any Trainer).

    Args:
        model: the pruned transformers model (modified in place by PEFT; `peft_model.unload()` restores it).
        config (`RepairConfig`, *optional*): rank, alpha, dropout and `target_modules`.

    Returns:
        `peft.PeftModel` whose targeted layers are `MaskedLoraLinear`.

    Example:

    ```python
    >>> from optimum_owl.repair import RepairConfig, attach_masked_lora, merge_masked_lora
    >>> peft_model = attach_masked_lora(pruned_model, RepairConfig(r=8))   # doctest: +SKIP
    >>> # ... train peft_model with transformers.Trainer ...
    >>> sparse_model = merge_masked_lora(peft_model)                       # doctest: +SKIP
    ```
    """
    _require_peft()
    config = config or RepairConfig()
    if isinstance(model, PeftModel):
        raise RepairModelError("`model` is already a PeftModel; pass the pruned base model (merge or unload first).")
    check_not_quantized(model)
    targets, any_zeros = resolve_targets(model, config)
    if not any_zeros:
        warn_no_zeros()
    lora_cfg = build_lora_config(model, config, targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        with warnings.catch_warnings():
            # PEFT reads transformers' deprecated `is_gradient_checkpointing` alias; the FutureWarning is not ours
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, lora_cfg)
    logger.info("Attached masked LoRA (r=%d) to %d modules", config.r, len(targets))
    return peft_model


def warn_no_zeros() -> None:
    msg = (
        "The model has no zeros in its prunable weights, so there is no sparsity to preserve: the repair is an "
        "ordinary (dense) fine-tune and the merged model is as dense as before. Prune first (OWLPruner.apply), "
        "or load the pruned checkpoint instead of the dense one."
    )
    warnings.warn(msg, RepairWarning, stacklevel=3)  # once: the CLI routes warnings through logging


def _nm_patterns(model: nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for pp in prunable_params(model):
        w = pp.param.detach()
        if w.dim() == 2:
            w2 = w.t() if is_conv1d(pp.module) else w
            nm = detect_nm(w2)
            if nm is not None:
                out[pp.name] = nm
    return out


@torch.no_grad()
def merge_masked_lora(peft_model: Any, verify: bool = True) -> nn.Module:
    """Merge a masked LoRA into the sparse base weights and return the plain transformers model.

    Args:
        peft_model: a `PeftModel` made by `attach_masked_lora` / `load_masked_adapter`.
        verify (`bool`): raise `RuntimeError` if any pruned zero became non-zero or an N:M group broke.

    Returns:
        The merged model (same sparsity as the pruned model).
    """
    from ..algorithms.masks import is_valid_nm
    from .sparsity import zero_masks

    layers = [m for m in peft_model.modules() if isinstance(m, _LoraLinear)]
    unmasked = [type(m).__name__ for m in layers if not isinstance(m, MaskedLoraLinear)]
    if unmasked:
        raise RepairModelError(
            f"`peft_model` holds plain LoRA layers ({unmasked[0]}); merging them would densify the pruned weights. "
            "Build it with attach_masked_lora or load_masked_adapter."
        )
    before = zero_masks(peft_model) if verify else {}
    patterns = _nm_patterns(peft_model) if verify else {}
    model = peft_model.merge_and_unload()
    if verify:
        lost = zeros_lost(model, before)
        if lost:
            raise RuntimeError(f"Merged weights lost pruned zeros in {len(lost)} module(s): {dict(list(lost.items())[:4])}.")
        mods = {pp.name: pp for pp in prunable_params(model)}
        for name, (n, m) in patterns.items():
            w = mods[name].param.detach()
            w = w.t() if is_conv1d(mods[name].module) else w
            if not is_valid_nm(w, n, m):
                raise RuntimeError(f"Merged weight `{name}` is no longer {n}:{m} sparse.")
    return model


def save_masked_adapter(peft_model: Any, save_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save the adapter (PEFT format, no mask inside) plus a marker so `load_masked_adapter` restores masking.

    The write is atomic: an interrupted save leaves no folder.
    """
    with atomic_output_dir(save_dir, overwrite=overwrite, protected=input_paths(peft_model)) as tmp:
        peft_model.save_pretrained(tmp)
        targets = sorted(n for n, m in peft_model.named_modules() if isinstance(m, MaskedLoraLinear))
        marker = {
            "format": ADAPTER_FORMAT,
            "version": 1,
            "mask_source": "zeros of the base weights (recomputed on load)",
            "num_targets": len(targets),
        }
        (tmp / ADAPTER_MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return Path(save_dir)


def load_masked_adapter(model: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False) -> Any:
    """Load an adapter saved by `save_masked_adapter` onto the **pruned** base model, with masking restored.

    Args:
        model: the pruned base model (the masks are read from its zeros).
        adapter_dir: folder written by `save_masked_adapter`.
        is_trainable (`bool`): keep the adapter trainable.

    Returns:
        `peft.PeftModel` with `MaskedLoraLinear` layers.
    """
    _require_peft()
    adapter_dir = Path(adapter_dir)
    marker = adapter_dir / ADAPTER_MARKER_NAME
    if not marker.is_file():
        raise FileNotFoundError(
            f"`adapter_dir={str(adapter_dir)!r}` has no {ADAPTER_MARKER_NAME}: it is not a masked LoRA adapter saved "
            "by optimum_owl.repair.save_masked_adapter (a plain LoRA would densify the pruned weights when merged)."
        )
    info = json.loads(marker.read_text(encoding="utf-8"))
    if info.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"`adapter_dir`: {marker} has format {info.get('format')!r}, expected {ADAPTER_FORMAT!r}.")
    check_not_quantized(model)
    lora_cfg = register_masked_modules(LoraConfig.from_pretrained(str(adapter_dir)))
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), config=lora_cfg, is_trainable=is_trainable)
    layers = [m for m in peft_model.modules() if isinstance(m, MaskedLoraLinear)]
    if layers and not any(bool(m.owl_pruned_mask.any()) for m in layers):
        warnings.warn(
            "The base model has no zeros in any adapted layer: was the adapter loaded onto the dense model instead "
            "of the pruned one? Merging would then give a dense model.",
            RepairWarning,
            stacklevel=2,
        )
    return peft_model
