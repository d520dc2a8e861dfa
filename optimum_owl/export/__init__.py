"""ONNX export of pruned decoders with compact (bitmask / sparse_initializer / dense) weight storage.

Needs the `onnx` extra: `pip install "optimum-owl[onnx]"`.
"""

from __future__ import annotations

from ..errors import UnsupportedArchitectureError
from .deps import INSTALL_HINT, require_onnx
from .onnx import SUPPORTED_MODEL_TYPES, ExportResult, check_exportable, export_onnx, weight_sparsity
from .ort import METADATA_NAME, ONNX_NAME, OnnxCausalLM, compare_with_torch, relative_error
from .packing import decode_bitmask, encode_bitmask, pack_mask, unpack_mask
from .storage import STORAGES, StorageStats, apply_storage

__all__ = [
    "INSTALL_HINT",
    "METADATA_NAME",
    "ONNX_NAME",
    "STORAGES",
    "SUPPORTED_MODEL_TYPES",
    "ExportResult",
    "OnnxCausalLM",
    "StorageStats",
    "UnsupportedArchitectureError",
    "apply_storage",
    "check_exportable",
    "compare_with_torch",
    "decode_bitmask",
    "encode_bitmask",
    "export_onnx",
    "pack_mask",
    "relative_error",
    "require_onnx",
    "unpack_mask",
    "weight_sparsity",
]
