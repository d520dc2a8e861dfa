"""On-disk formats of pruned weights, below the pruning engine (they import nothing of it).

- `bitmask`: THE codec (values + packed little-endian mask + shape), used by compact checkpoints, resume files and
  the ONNX export.
- `files`: THE checkpoint-file finder and THE safetensors metadata keys (format name, CRC-32 tables).
- `preflight`: the checks of a compact checkpoint's files before anything is loaded.
- `compact`: which weights are stored compressed, the state dict `save_pretrained` writes, `verify_checkpoint` and
  `size_summary` of a saved folder.
- `int8`: int8 values (`owl-bitmask-v2`): the grid a pruned weight lies on (`set_int8_grid`, `int8_grid`,
  `drop_int8_grids`) and the codec between such a weight and its stored codes + scales.
- `quantizer`: the binding to transformers (`OWLHfQuantizer`, its load/save ops, `mark_pruned`).
- `compressed_tensors`, `compressed_tensors_load`: compressed-tensors' `sparse-bitmask` checkpoints, written
  (`write_compressed_tensors`) and read (`read_weight` for `load_sparse`, `load_dense`); docs/checkpoints.md.
"""

from __future__ import annotations

from .compact import compact_state_dict, compressible_names, size_summary, verify_checkpoint
from .files import checkpoint_files
from .int8 import drop_int8_grids, int8_grid
from .quantizer import QUANT_METHOD, OWLHfQuantizer, mark_pruned

__all__ = [
    "QUANT_METHOD",
    "OWLHfQuantizer",
    "checkpoint_files",
    "compact_state_dict",
    "compressible_names",
    "drop_int8_grids",
    "int8_grid",
    "mark_pruned",
    "size_summary",
    "verify_checkpoint",
]
