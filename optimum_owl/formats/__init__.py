"""On-disk formats of pruned weights, below the pruning engine (they import nothing of it).

- `bitmask`: THE codec (values + packed little-endian mask + shape), used by compact checkpoints, resume files and
  the ONNX export.
- `files`: THE checkpoint-file finder and THE safetensors metadata keys (format name, CRC-32 tables).
- `preflight`: the checks of a compact checkpoint's files before anything is loaded.
- `compact`: which weights are stored compressed, the state dict `save_pretrained` writes, `verify_checkpoint` and
  `size_summary` of a saved folder.
- `quantizer`: the binding to transformers (`OWLHfQuantizer`, its load/save ops, `mark_pruned`).
"""

from __future__ import annotations

from .compact import compact_state_dict, compressible_names, size_summary, verify_checkpoint
from .files import checkpoint_files
from .quantizer import QUANT_METHOD, OWLHfQuantizer, mark_pruned

__all__ = [
    "QUANT_METHOD",
    "OWLHfQuantizer",
    "checkpoint_files",
    "compact_state_dict",
    "compressible_names",
    "mark_pruned",
    "size_summary",
    "verify_checkpoint",
]
