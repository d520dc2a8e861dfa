"""Sparse repair: fine-tune a pruned model so it regains quality while every pruned zero stays exactly zero.

```python
>>> from optimum_owl.repair import RepairConfig, repair
>>> model, report = repair(pruned_model, tokenizer, train_data=texts, config=RepairConfig(max_steps=200))  # doctest: +SKIP
```

Building blocks: `attach_masked_lora` / `merge_masked_lora` / `save_masked_adapter` / `load_masked_adapter` (PEFT
LoRA whose delta is multiplied by the weight's keep-mask), and Trainer callbacks `SparsityPreservingCallback`,
`SparsityLoggingCallback`, `GradualPruningCallback`, `SEFTCallback` (drop-and-grow at constant sparsity); recovery
losses `kd_loss` / `squarehead_loss` (distillation from the dense model, `RepairConfig(objective="kd", teacher=...)`).
"""

from __future__ import annotations

from ..errors import RepairConfigError, RepairDataError, RepairModelError, RepairWarning
from .callbacks import SparsityLoggingCallback, SparsityPreservingCallback, add_sparsity_logging
from .config import RepairConfig
from .data import build_windows
from .distill import TeacherCache, kd_loss, squarehead_loss
from .gradual import GradualPruningCallback, cubic_sparsity
from .masked_lora import (
    MaskedLoraLinear,
    attach_masked_lora,
    load_masked_adapter,
    merge_masked_lora,
    save_masked_adapter,
)
from .seft import SEFTCallback
from .sparsity import block_sparsity, zero_masks, zeros_lost
from .train import RepairReport, repair, save_repaired

__all__ = [
    "GradualPruningCallback",
    "MaskedLoraLinear",
    "RepairConfig",
    "RepairConfigError",
    "RepairDataError",
    "RepairModelError",
    "RepairReport",
    "RepairWarning",
    "SEFTCallback",
    "SparsityLoggingCallback",
    "SparsityPreservingCallback",
    "TeacherCache",
    "add_sparsity_logging",
    "attach_masked_lora",
    "block_sparsity",
    "build_windows",
    "cubic_sparsity",
    "kd_loss",
    "load_masked_adapter",
    "merge_masked_lora",
    "repair",
    "save_masked_adapter",
    "save_repaired",
    "squarehead_loss",
    "zero_masks",
    "zeros_lost",
]
