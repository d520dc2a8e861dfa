"""The compact format's binding to transformers: the load / save ops, `OWLHfQuantizer` (reads and writes compact
checkpoints under `quant_method="owl"`) and `mark_pruned` (hooks an in-memory pruned model in, so that
`model.save_pretrained(dir)` writes the compact format).

- `from_pretrained(dir)` of a compact checkpoint checks every compressed tensor before loading (header shapes, mask
  length, mask popcount against the number of values, int8 scales) and after (CRC-32), and rebuilds bit-identical
  dense weights (int8 values: code * scale in float32, cast to the model's dtype, the grid recorded on the module).
- `save_pretrained` writes `quantization_config` (without calibration data) into `config.json` and stores each pruned
  linear weight as values + packed bitmask + shape (`formats.compact.compact_state_dict`).

Pruning while loading (`from_pretrained(..., quantization_config=OWLPrunerConfig(..., dataset=...))`) is the
subclass in `optimum_owl.integration.transformers`, which is what transformers finds registered.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer

from ..config import OWLPrunerConfig
from ..errors import OWLCheckpointError
from ..utils import is_conv1d, public_config, sort_safetensors_metadata
from .bitmask import (
    BITMASK_SUFFIX,
    FORMAT_NAME,
    FORMAT_NAMES,
    SCALE_SUFFIX,
    SHAPE_SUFFIX,
    compress,
    crc32,
    decompress,
    worth_compressing,
)
from .compact import compact_state_dict, compressible_names, is_own_converter, shard_metadata
from .files import METADATA_FORMAT_KEY
from .int8 import decode_int8, encode_int8, int8_grid, set_int8_grid
from .preflight import check_dense_crc, dense_checksums, int8_layout, preflight_check

logger = logging.getLogger(__name__)

QUANT_METHOD = "owl"


# --------------------------------------------------------------------------------------------------------- load ops
class BitmaskDeserialize(ConversionOps):
    """Load op: `{weight, weight_bitmask, weight_shape}` -> the dense `weight`; other weights pass through.

    The quantizer is kept as `_quantizer` (not `hf_quantizer`) on purpose: transformers then casts the float
    values to the model's dtype before this op, exactly as it would cast a dense weight. A checkpoint with int8 values
    (`owl-bitmask-v2`) is the exception: there nothing is cast before this op (the float32 scales must stay float32,
    `OWLHfQuantizer.get_new_dtype`), and the op casts what it returns to `target_dtype`, the dtype transformers chose.
    `{weight, weight_bitmask, weight_shape, weight_scale}` -> `code * scale` computed in float32, cast to that dtype.
    """

    owl_format = FORMAT_NAME  # how `formats.compact.is_own_converter` recognises our ops

    def __init__(self, hf_quantizer: OWLHfQuantizer) -> None:
        self._quantizer = hf_quantizer
        self.target_dtype: Any = None  # int8 checkpoints: the dtype to return float tensors in (None: as stored)

    def __deepcopy__(self, memo: dict) -> BitmaskDeserialize:
        # transformers deep-copies the converter once per weight; share the quantizer instead of copying it
        return type(self)(self._quantizer)

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None, model=None, **kwargs: Any):
        parts = {key: (value[0] if isinstance(value, list) else value) for key, value in input_dict.items()}
        values = parts.get("weight")
        bitmask = parts.get("weight" + BITMASK_SUFFIX)
        shape = parts.get("weight" + SHAPE_SUFFIX)
        scale = parts.get("weight" + SCALE_SUFFIX)
        name = full_layer_name or "weight"
        if bitmask is None and shape is None:
            check_dense_crc(self._quantizer._dense_checksums, name, values)
            return {name: self._cast(values)}
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
        self._quantizer._verify_checksums(name, values, bitmask, shape, scale)
        key = _checkpoint_key(name, model, self._quantizer._int8_layout)
        int8 = key is not None
        if int8 and scale is None:
            raise OWLCheckpointError(f"`{name}` stores int8 codes but `{name}{SCALE_SUFFIX}` is missing from the "
                                     "checkpoint (truncated or partially copied shards?); re-save or re-download it.")
        dense = decompress(values, bitmask, shape, name=name, expected_shape=expected, int8=int8)
        if not int8:
            return {name: self._cast(dense)}
        module = model.get_submodule(name.rpartition(".")[0]) if model is not None else None
        group_size = self._quantizer._int8_layout[key]
        dtype = self.target_dtype or torch.float32
        weight = decode_int8(dense, scale, group_size, is_conv1d(module), dtype)
        if module is not None:
            set_int8_grid(module, scale, group_size)  # so that the loaded model saves int8 values again
        return {name: weight}

    def _cast(self, tensor: Any) -> Any:
        if self.target_dtype is None or not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            return tensor
        return tensor.to(self.target_dtype)

    @property
    def reverse_op(self) -> ConversionOps:
        return BitmaskSerialize(self._quantizer)


def _checkpoint_key(name: str, model: Any, table: dict[str, Any]) -> str | None:
    """The key of `table` (checkpoint names) for the model's parameter `name`: as is, or with the model's
    `base_model_prefix` added or removed (a base model loaded from a checkpoint of its task model, or the reverse)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name] + ([f"{prefix}.{name}", name.removeprefix(prefix + ".")] if prefix else [])
    return next((c for c in candidates if c in table), None)


class BitmaskSerialize(ConversionOps):
    """Save op (the reverse of `BitmaskDeserialize`): compress an eligible dense `weight` again."""

    owl_format = FORMAT_NAME

    def __init__(self, hf_quantizer: OWLHfQuantizer) -> None:
        self._quantizer = hf_quantizer

    def __deepcopy__(self, memo: dict) -> BitmaskSerialize:
        return type(self)(self._quantizer)

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None, model=None, **kwargs: Any):
        (key, value), *_ = input_dict.items()
        tensor = value[0] if isinstance(value, list) else value
        name = full_layer_name or key
        eligible = model is not None and name in set(compressible_names(model))
        module = model.get_submodule(name.rpartition(".")[0]) if eligible else None
        grid = int8_grid(module)
        if eligible and grid is not None and tensor.is_floating_point() and tensor.dim() == 2:
            codes, bitmask, shape, scales = encode_int8(tensor.detach().cpu(), grid, is_conv1d(module), name)
            return {name: codes, name + BITMASK_SUFFIX: bitmask, name + SHAPE_SUFFIX: shape, name + SCALE_SUFFIX: scales}
        if not eligible or not worth_compressing(tensor):
            return {name: tensor}
        values, bitmask, shape = compress(tensor.cpu())
        return {name: values, name + BITMASK_SUFFIX: bitmask, name + SHAPE_SUFFIX: shape}


# -------------------------------------------------------------------------------------------------------- quantizer
class OWLHfQuantizer(HfQuantizer):
    """transformers `HfQuantizer` for `OWLPrunerConfig` (`quant_method="owl"`): the compact format.

    A compact checkpoint (`pre_quantized=True`): decompresses bitmask-stored weights while loading. Either way,
    `save_pretrained` writes the compact format. Pruning a fresh load is added by the registered subclass
    (`optimum_owl.integration.transformers.OWLPruningQuantizer`, which overrides `prune_after_loading`).
    """

    requires_calibration = False
    serialized_names = {"weight": ["weight", "weight" + BITMASK_SUFFIX, "weight" + SHAPE_SUFFIX, "weight" + SCALE_SUFFIX]}

    def __init__(self, quantization_config: OWLPrunerConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._checksums: dict[str, list[Any]] = {}
        self._dense_checksums: dict[str, list[Any]] = {}
        self._int8_layout: dict[str, int | None] = {}  # int8 weights of the checkpoint loaded -> group size

    # --- environment
    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        # Offloaded blocks (CPU or disk) are pruned through optimum_owl.pruning.offload.BlockOffloader: nothing to refuse.
        return

    # --- loading a compact checkpoint
    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: Any = None, **kwargs: Any):
        if self.pre_quantized and checkpoint_files:
            self._checksums = preflight_check(checkpoint_files, model)
            self._dense_checksums = dense_checksums(checkpoint_files)
            self._int8_layout = int8_layout(checkpoint_files)
        return model

    def get_new_dtype(self, converter: Any, param: Any, dtype: Any) -> Any:
        """transformers' cast of a checkpoint tensor before the load ops. With int8 values in the checkpoint, nothing
        our op receives is cast (the scales stay float32); the op is told the dtype instead (`target_dtype`)."""
        ours = [op for op in getattr(converter, "operations", ()) if isinstance(op, BitmaskDeserialize)]
        if not self._int8_layout or not ours:
            return super().get_new_dtype(converter, param, dtype)
        for op in ours:
            op.target_dtype = dtype
        return None

    def get_load_operations(self) -> dict:
        return {"deserialize": BitmaskDeserialize}

    def _verify_checksums(self, name: str, values, bitmask, shape, scale=None) -> None:
        expected = self._checksums.get(name)
        if not expected:
            return
        crc_values, crc_mask, crc_shape, dtype = expected[:4]
        checks = [("bitmask", bitmask, crc_mask), ("shape", shape, crc_shape)]
        if len(expected) > 4:  # int8 values: the scales' CRC-32 too (a missing scale is reported by the caller)
            checks += [("scales", scale, expected[4])] if scale is not None else []
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
                model._weight_conversions = [c for c in conversions if not is_own_converter(c)]
            mark_dense_model(model)
            return model
        return self.prune_after_loading(model)

    def prune_after_loading(self, model: nn.Module) -> nn.Module:
        """A fresh (dense) load: the compact format alone has nothing to prune with; see the plugin's subclass."""
        mark_dense_model(model)
        return model

    # --- saving
    def get_state_dict_and_metadata(self, model: nn.Module):
        if getattr(model, "_hf_peft_config_loaded", False):
            return None, {}  # only the (dense, small) adapter weights are saved
        sort_saved_metadata()
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


def sort_saved_metadata() -> None:
    """Make `save_pretrained` of a compact checkpoint byte-stable across processes (idempotent).

    safetensors keeps the header metadata in a hash map whose order is random per process, so two saves of the same
    model differ in their header bytes. transformers writes every shard with `modeling_utils.safe_save_file`; this
    wraps it (once, on the first compact save) so that a file carrying the compact format's metadata has its metadata
    keys sorted right after it is written (`utils.sort_safetensors_metadata`); other files are written untouched.
    """
    from transformers import modeling_utils

    save = getattr(modeling_utils, "safe_save_file", None)
    if save is None or getattr(save, "owl_sorts_metadata", False):
        return

    @functools.wraps(save)
    def save_sorted(tensors: Any, filename: Any, metadata: Any = None, *args: Any, **kwargs: Any) -> Any:
        ours = isinstance(metadata, dict) and metadata.get(METADATA_FORMAT_KEY) in FORMAT_NAMES
        if ours and isinstance(tensors, dict):
            metadata = shard_metadata(tensors, metadata)  # v2 only in the files that hold int8 values
        result = save(tensors, filename, metadata, *args, **kwargs)
        if ours:
            sort_safetensors_metadata(filename)
        return result

    save_sorted.owl_sorts_metadata = True  # type: ignore[attr-defined]
    modeling_utils.safe_save_file = save_sorted


def mark_dense_model(model: nn.Module) -> None:
    # A pruned model is an ordinary dense model: keep `.half()`, `.float()`, PEFT and Trainer working as usual.
    model.is_quantized = False


def _clean_config(config: OWLPrunerConfig) -> OWLPrunerConfig:
    """A copy for `config.json`: no runtime-only fields (tokenizer, in-memory data), local paths shortened."""
    return OWLPrunerConfig.from_dict(public_config(config.to_dict()))


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
    >>> from optimum_owl.formats import mark_pruned
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
    mark_dense_model(model)
    return model

