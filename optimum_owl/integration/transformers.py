"""transformers quantizer plugin: prune on load, and compact (bitmask) checkpoints for pruned models.

Registered under `quant_method="owl"` (see `optimum_owl.integration.install`), which gives:

- `AutoModelForCausalLM.from_pretrained(path, quantization_config=OWLPrunerConfig(..., dataset=...))` loads the dense
  weights, then prunes them with `OWLPruner` (the report lands on `model.owl_report`).
- `model.save_pretrained(dir)` writes `quantization_config` (without calibration data) into `config.json` and stores
  each pruned linear weight as values + packed bitmask + shape (`optimum_owl.bitmask`).
- `from_pretrained(dir)` of such a checkpoint checks every compressed tensor before loading (header shapes, mask
  length, mask popcount against the number of values) and after (CRC-32), and rebuilds bit-identical dense weights.

Models pruned outside `from_pretrained` (`OWLPruner.apply`) are hooked in with `mark_pruned(model, config)`; a plain
dense export (zeros in place, no `quantization_config`) is written by `optimum_owl.serialization.save_dense`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers.base import HfQuantizer

from ..bitmask import (
    BITMASK_SUFFIX,
    FORMAT_NAME,
    SHAPE_SUFFIX,
    OWLCheckpointError,
    compress,
    crc32,
    decompress,
    stored_mask,
    worth_compressing,
)
from ..config import OWLPrunerConfig
from ..engine import prune_model
from ..errors import OWLOffloadError  # noqa: F401  (defined in optimum_owl.errors)
from ..modeling import is_conv1d
from ..utils import public_config
from .preflight import (
    METADATA_CRC_KEY,
    METADATA_DENSE_CRC_KEY,
    METADATA_FORMAT_KEY,
    check_dense_crc,
    dense_checksums,
    preflight_check,
)

logger = logging.getLogger(__name__)

QUANT_METHOD = "owl"


# ---------------------------------------------------------------------------------------------------- which weights
def _converter_matched(model: nn.Module, names: list[str]) -> set[str]:
    """Parameter names that a model-specific `WeightConverter` rewrites on save (left dense, to stay reversible)."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping

            conversions = get_model_conversion_mapping(model, add_legacy=False)
        except Exception:  # noqa: BLE001 - best effort: no mapping means nothing to avoid
            conversions = []
    matched: set[str] = set()
    for conversion in conversions or []:
        if not isinstance(conversion, WeightConverter) or _is_own_converter(conversion):
            continue
        try:
            reverse = conversion.reverse_transform()
        except Exception:  # noqa: BLE001
            continue
        for name in names:
            if reverse.rename_source_key(name)[1] is not None:
                matched.add(name)
    return matched


def compressible_names(model: nn.Module) -> list[str]:
    """Names of the weights eligible for bitmask storage: every `nn.Linear` / GPT-2 `Conv1D` weight, except
    embeddings, the output head and anything tied or rewritten by a model weight converter."""
    excluded: set[str] = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for key, value in dict(tied).items():
        excluded.update({key, value})
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            excluded.update(f"{n}.weight" for n, m in model.named_modules() if m is module)
    names = []
    for module_name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)) or getattr(module, "weight", None) is None:
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        if name not in excluded:
            names.append(name)
    blocked = _converter_matched(model, names)
    return [n for n in names if n not in blocked]


def compact_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict with every sufficiently sparse eligible weight replaced by `(values, bitmask, shape)`,
    and the safetensors metadata (format name, CRC-32 of every compressed tensor's parts and of every other tensor)."""
    state_dict = model.state_dict()
    eligible = set(compressible_names(model))
    out: dict[str, torch.Tensor] = {}
    checksums: dict[str, list[Any]] = {}
    for name, tensor in state_dict.items():
        if name not in eligible:
            out[name] = tensor
            continue
        dense = tensor
        if dense.device.type == "meta":
            from transformers.integrations.accelerate import load_offloaded_parameter

            dense = load_offloaded_parameter(model, name)
        dense = dense.detach().cpu()
        mask = stored_mask(dense) if dense.is_floating_point() else None
        if mask is None or not worth_compressing(dense, mask):
            out[name] = tensor
            continue
        values, bitmask, shape = compress(dense, mask)
        out[name] = values
        out[name + BITMASK_SUFFIX] = bitmask
        out[name + SHAPE_SUFFIX] = shape
        checksums[name] = [crc32(values), crc32(bitmask), crc32(shape), str(values.dtype).removeprefix("torch.")]
    # weights already held compressed in memory (optimum_owl.sparsify's SparseLinear) pass through: checksum them too
    for key in [k for k in out if k.endswith(BITMASK_SUFFIX)]:
        name = key.removesuffix(BITMASK_SUFFIX)
        if name not in checksums and name in out and name + SHAPE_SUFFIX in out:
            values = out[name]
            checksums[name] = [crc32(values), crc32(out[key]), crc32(out[name + SHAPE_SUFFIX]),
                               str(values.dtype).removeprefix("torch.")]
    dense_crc = {n: [crc32(t), str(t.dtype).removeprefix("torch.")] for n, t in out.items()
                 if n.removesuffix(BITMASK_SUFFIX).removesuffix(SHAPE_SUFFIX) not in checksums and t.device.type != "meta"}
    metadata = {METADATA_FORMAT_KEY: FORMAT_NAME, METADATA_CRC_KEY: json.dumps(checksums, sort_keys=True),
                METADATA_DENSE_CRC_KEY: json.dumps(dense_crc, sort_keys=True)}
    logger.info("Compact checkpoint: %d of %d eligible weights stored as bitmask + values", len(checksums), len(eligible))
    return out, metadata


# ---------------------------------------------------------------------------------------------------- load ops
class BitmaskDeserialize(ConversionOps):
    """Load op: `{weight, weight_bitmask, weight_shape}` -> the dense `weight`; other weights pass through.

    The quantizer is kept as `_quantizer` (not `hf_quantizer`) on purpose: transformers then casts the float
    values to the model's dtype before this op, exactly as it would cast a dense weight.
    """

    def __init__(self, hf_quantizer: OWLHfQuantizer) -> None:
        self._quantizer = hf_quantizer

    def __deepcopy__(self, memo: dict) -> BitmaskDeserialize:
        # transformers deep-copies the converter once per weight; share the quantizer instead of copying it
        return type(self)(self._quantizer)

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None, model=None, **kwargs: Any):
        parts = {key: (value[0] if isinstance(value, list) else value) for key, value in input_dict.items()}
        values = parts.get("weight")
        bitmask = parts.get("weight" + BITMASK_SUFFIX)
        shape = parts.get("weight" + SHAPE_SUFFIX)
        name = full_layer_name or "weight"
        if bitmask is None and shape is None:
            check_dense_crc(self._quantizer._dense_checksums, name, values)
            return {name: values}
        missing = [n for n, t in (("", values), (BITMASK_SUFFIX, bitmask), (SHAPE_SUFFIX, shape)) if t is None]
        if missing:
            raise OWLCheckpointError(
                f"`{name}` is stored compressed but `{', '.join(name + m for m in missing)}` is missing from the "
                "checkpoint (truncated or partially copied shards?); re-save or re-download the checkpoint."
            )
        expected = None
        if model is not None:
            try:
                expected = tuple(model.get_parameter(name).shape)
            except AttributeError:
                expected = None
        self._quantizer._verify_checksums(name, values, bitmask, shape)
        dense = decompress(values, bitmask, shape, name=name, expected_shape=expected)
        return {name: dense}

    @property
    def reverse_op(self) -> ConversionOps:
        return BitmaskSerialize(self._quantizer)


class BitmaskSerialize(ConversionOps):
    """Save op (the reverse of `BitmaskDeserialize`): compress an eligible dense `weight` again."""

    def __init__(self, hf_quantizer: OWLHfQuantizer) -> None:
        self._quantizer = hf_quantizer

    def __deepcopy__(self, memo: dict) -> BitmaskSerialize:
        return type(self)(self._quantizer)

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None, model=None, **kwargs: Any):
        (key, value), *_ = input_dict.items()
        tensor = value[0] if isinstance(value, list) else value
        name = full_layer_name or key
        eligible = model is not None and name in set(compressible_names(model))
        if not eligible or not worth_compressing(tensor):
            return {name: tensor}
        values, bitmask, shape = compress(tensor.cpu())
        return {name: values, name + BITMASK_SUFFIX: bitmask, name + SHAPE_SUFFIX: shape}


def _is_own_converter(conversion: Any) -> bool:
    return isinstance(conversion, WeightConverter) and any(
        isinstance(op, (BitmaskDeserialize, BitmaskSerialize)) for op in conversion.operations
    )


# ---------------------------------------------------------------------------------------------------- quantizer
class OWLHfQuantizer(HfQuantizer):
    """transformers `HfQuantizer` for `OWLPrunerConfig` (`quant_method="owl"`).

    Fresh load (`pre_quantized=False`): prunes after the weights are loaded. Pre-pruned checkpoint: decompresses
    bitmask-stored weights while loading. Either way, `save_pretrained` writes the compact format.
    """

    requires_calibration = False
    serialized_names = {"weight": ["weight", "weight" + BITMASK_SUFFIX, "weight" + SHAPE_SUFFIX]}

    def __init__(self, quantization_config: OWLPrunerConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._checksums: dict[str, list[Any]] = {}
        self._dense_checksums: dict[str, list[Any]] = {}

    # --- environment
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        # Offloaded blocks (CPU or disk) are pruned through optimum_owl.offload.BlockOffloader: nothing to refuse.
        return

    # --- loading a compact checkpoint
    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: Any = None, **kwargs: Any):
        if self.pre_quantized and checkpoint_files:
            self._checksums = preflight_check(checkpoint_files, model)
            self._dense_checksums = dense_checksums(checkpoint_files)
        return model

    def get_load_operations(self) -> dict:
        return {"deserialize": BitmaskDeserialize}

    def _verify_checksums(self, name: str, values, bitmask, shape) -> None:
        expected = self._checksums.get(name)
        if not expected:
            return
        crc_values, crc_mask, crc_shape, dtype = expected
        checks = [("bitmask", bitmask, crc_mask), ("shape", shape, crc_shape)]
        if str(values.dtype).removeprefix("torch.") == dtype:
            checks.insert(0, ("values", values, crc_values))  # values cast to another dtype cannot be checked
        for label, tensor, crc in checks:
            if crc32(tensor) != crc:
                raise OWLCheckpointError(
                    f"`{name}`: the stored {label} fail their CRC-32 check (corrupt file); re-download or re-save "
                    "the checkpoint."
                )

    # --- after loading
    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any):
        if self.pre_quantized:
            # Compression on save is done by `get_state_dict_and_metadata`; drop the load-time converter so that
            # `revert_weight_conversion` does not try to reverse it a second time.
            conversions = getattr(model, "_weight_conversions", None)
            if conversions is not None:
                model._weight_conversions = [c for c in conversions if not _is_own_converter(c)]
            _mark_dense_model(model)
            return model
        return prune_loaded_model(model, self)

    # --- saving
    def get_state_dict_and_metadata(self, model: nn.Module):
        if getattr(model, "_hf_peft_config_loaded", False):
            return None, {}  # only the (dense, small) adapter weights are saved
        return compact_state_dict(model)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module, dtype=None):
        # The weights are already dense tensors; `model.dequantize()` just turns the model into a plain one whose
        # `save_pretrained` writes a dense checkpoint without `quantization_config`.
        return model


def _mark_dense_model(model: nn.Module) -> None:
    # A pruned model is an ordinary dense model: keep `.half()`, `.float()`, PEFT and Trainer working as usual.
    model.is_quantized = False


def _clean_config(config: OWLPrunerConfig) -> OWLPrunerConfig:
    """A copy for `config.json`: no runtime-only fields (tokenizer, in-memory data), local paths shortened."""
    return OWLPrunerConfig.from_dict(public_config(config.to_dict()))


def prune_loaded_model(model: nn.Module, quantizer: OWLHfQuantizer) -> nn.Module:
    """Prune-on-load: run the core (`engine.prune_model`) on a freshly loaded model with the data carried by the
    config, then attach the report and mark the model for compact saving, once."""
    config: OWLPrunerConfig = quantizer.quantization_config
    config.validate()
    tokenizer = config.tokenizer
    if tokenizer is None and config.dataset is not None:
        tokenizer = _default_tokenizer(model)
    model.owl_report = prune_model(model, config, dataset=config.dataset, tokenizer=tokenizer)
    mark_pruned(model, config)
    return model


def _default_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved next to the model, if any (used when text calibration data comes without one)."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        logger.debug("No tokenizer next to %s: %s", path, err)
        return None


def mark_pruned(model: nn.Module, config: OWLPrunerConfig | None = None) -> nn.Module:
    """Attach the OWL quantizer to an in-memory pruned model so that `model.save_pretrained(dir)` writes the compact
    format and `config.json` gets `quantization_config` (without calibration data or tokenizer).

    Called by `OWLPruner.prune` and by prune-on-load; idempotent. The weights are not touched.

    Args:
        model: a transformers `PreTrainedModel` whose weights hold the pruned zeros.
        config: the `OWLPrunerConfig` it was pruned with (defaults to `OWLPrunerConfig()` when the model has none).

    Returns:
        The same model.

    Example:

    ```python
    >>> from optimum_owl.integration.transformers import mark_pruned
    >>> mark_pruned(model, config)            # doctest: +SKIP
    >>> model.save_pretrained("pruned-model")  # doctest: +SKIP
    ```
    """
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        logger.debug("mark_pruned: %s is not a transformers model; nothing to attach", type(model).__name__)
        return model
    existing = getattr(model, "hf_quantizer", None)
    if existing is not None and not isinstance(existing, OWLHfQuantizer):
        raise ValueError(
            f"The model is already quantized with {existing.quantization_config.quant_method!r}; optimum-owl cannot "
            "store it in its compact format. Save it with `optimum_owl.serialization.save_dense` instead."
        )
    if config is None:
        current = getattr(model.config, "quantization_config", None)
        config = current if isinstance(current, OWLPrunerConfig) else OWLPrunerConfig()
    clean = _clean_config(config)
    if isinstance(existing, OWLHfQuantizer):
        existing.quantization_config = clean
    else:
        model.hf_quantizer = OWLHfQuantizer(clean, pre_quantized=False)
    model.config.quantization_config = clean
    model.quantization_method = QUANT_METHOD
    _mark_dense_model(model)
    return model


# ---------------------------------------------------------------------------------------------------- registration
def register() -> None:
    """Register `OWLPrunerConfig` / `OWLHfQuantizer` under `quant_method="owl"` with transformers (idempotent)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    current = AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD)
    if current is None:
        register_quantization_config(QUANT_METHOD)(OWLPrunerConfig)
    elif current is not OWLPrunerConfig:
        logger.warning("Replacing %s registered for quant_method 'owl' with optimum-owl's config.", current)
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = OWLPrunerConfig
    current = AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD)
    if current is None:
        register_quantizer(QUANT_METHOD)(OWLHfQuantizer)
    elif current is not OWLHfQuantizer:
        logger.warning("Replacing %s registered for quant_method 'owl' with optimum-owl's quantizer.", current)
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = OWLHfQuantizer


def is_registered() -> bool:
    """Whether transformers currently dispatches `quant_method="owl"` to optimum-owl."""
    import sys

    auto = sys.modules.get("transformers.quantizers.auto")
    return auto is not None and auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is OWLHfQuantizer


# Importing this module (directly, or through `import optimum_owl` once transformers loads its quantizer registry)
# makes `quant_method="owl"` available to `from_pretrained`.
register()
