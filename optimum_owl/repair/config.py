"""`RepairConfig`: every knob of a sparse repair run (masked LoRA or masked full fine-tuning), validated."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RepairConfigError
from ..utils import atomic_write_text

REPAIR_CONFIG_NAME = "repair_config.json"
METHODS = ("masked_lora", "full_ft")


@dataclass
class RepairConfig:
    """Settings of a sparse repair run: a short fine-tune after pruning that keeps every pruned zero.

    Args:
        method (`str`): `"masked_lora"` (LoRA whose delta is multiplied by the block's keep-mask, merged at the
            end; default) or `"full_ft"` (every targeted weight trained, masks re-applied after each optimizer step).
        r (`int`): LoRA rank.
        lora_alpha (`float`): LoRA scaling numerator (scaling = `lora_alpha / r`).
        lora_dropout (`float`): dropout on the adapter input. `0` enables the fused (faster) masked path.
        target_modules (`str` or `list[str]`): `"pruned"` = every prunable weight of the blocks that holds zeros
            (all of them when the model has no zeros), `"all"` = every prunable weight of the blocks, or a list
            of module names / shell globs / `"re:<regex>"` patterns (matched against full names and name suffixes).
        seqlen (`int`): tokens per training window (texts are joined and packed).
        max_steps (`int`): optimizer steps.
        per_device_train_batch_size (`int`): windows per device per micro-step.
        gradient_accumulation_steps (`int`): micro-steps per optimizer step.
        learning_rate (`float`): peak learning rate (AdamW).
        weight_decay (`float`): AdamW weight decay (pruned positions stay zero whatever its value).
        warmup_ratio (`float`): share of the steps with a linear warm-up.
        lr_scheduler_type (`str`): transformers scheduler name (`"cosine"`, `"linear"`, `"constant"`, ...).
        max_train_windows (`int`, *optional*): cap on the number of training windows.
        max_eval_windows (`int`, *optional*, defaults to 64): `eval_data` perplexity uses only its first windows
            (before and after repair, so twice); `None` evaluates every window.
        text_column (`str`): column read from `datasets.Dataset` / `.jsonl` inputs.
        seed (`int`): seed for adapter initialisation and data order.
        bf16 / fp16 (`bool`): mixed precision for the Trainer (masks stay exact under both).
        logging_steps (`int`): Trainer logging interval; the sparsity (total, and min / mean / max over blocks)
            is logged with the loss (per block: `RepairReport.block_sparsity_after`).
        report_to (`str` or `list[str]`): Trainer loggers (`"none"`, `"tensorboard"`, ...).
        merge (`bool`): merge the masked adapter into the weights at the end (`repair` then returns a plain,
            sparse model); when `False` the `PeftModel` is returned.
        verify (`bool`): after merging, check every pruned zero is still zero, N:M groups still valid, and
            (masked LoRA) the merged logits equal the unmerged ones on one training window.
        output_dir (`str`, *optional*): Trainer scratch directory (a temporary one when omitted).

    Example:

    ```python
    >>> from optimum_owl.repair import RepairConfig
    >>> cfg = RepairConfig(r=8, max_steps=50, seqlen=128)
    >>> cfg.scaling
    2.0
    ```
    """

    method: str = "masked_lora"
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "pruned"
    seqlen: int = 256
    max_steps: int = 100
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    max_train_windows: int | None = None
    max_eval_windows: int | None = 64
    text_column: str = "text"
    seed: int = 0
    bf16: bool = False
    fp16: bool = False
    logging_steps: int = 10
    report_to: str | list[str] = "none"
    merge: bool = True
    verify: bool = True
    output_dir: str | None = None
    extra_training_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def scaling(self) -> float:
        """LoRA scaling `lora_alpha / r`."""
        return self.lora_alpha / self.r

    def validate(self) -> None:
        """Raise `RepairConfigError` naming the first field whose value cannot work."""
        if self.method not in METHODS:
            raise RepairConfigError(f"`method` must be one of {METHODS}, got {self.method!r}.")
        for name in ("r", "seqlen", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RepairConfigError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.seqlen < 2:
            raise RepairConfigError(f"`seqlen` must be at least 2 (one input and one target token), got {self.seqlen}.")
        if not self.lora_alpha > 0:
            raise RepairConfigError(f"`lora_alpha` must be > 0, got {self.lora_alpha!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise RepairConfigError(f"`lora_dropout` must be in [0, 1), got {self.lora_dropout!r}.")
        if not self.learning_rate > 0:
            raise RepairConfigError(f"`learning_rate` must be > 0, got {self.learning_rate!r}.")
        if self.weight_decay < 0:
            raise RepairConfigError(f"`weight_decay` must be >= 0, got {self.weight_decay!r}.")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise RepairConfigError(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio!r}.")
        if self.max_train_windows is not None and self.max_train_windows < 1:
            raise RepairConfigError(f"`max_train_windows` must be a positive integer or None, got {self.max_train_windows!r}.")
        if self.max_eval_windows is not None and self.max_eval_windows < 1:
            raise RepairConfigError(f"`max_eval_windows` must be a positive integer or None, got {self.max_eval_windows!r}.")
        if self.bf16 and self.fp16:
            raise RepairConfigError("`bf16` and `fp16` are exclusive; set at most one of them.")
        tm = self.target_modules
        if isinstance(tm, str):
            if tm not in ("pruned", "all"):
                raise RepairConfigError(
                    f"`target_modules` must be 'pruned', 'all' or a list of module names/patterns, got {tm!r}; "
                    f"for a single module pass a list: [{tm!r}]."
                )
        elif not isinstance(tm, (list, tuple)) or not tm or not all(isinstance(t, str) and t for t in tm):
            raise RepairConfigError(
                f"`target_modules` must be 'pruned', 'all' or a non-empty list of module names/patterns, got {tm!r}."
            )
        if not isinstance(self.extra_training_args, dict):
            raise RepairConfigError("`extra_training_args` must be a dict of transformers.TrainingArguments fields.")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if isinstance(data["target_modules"], tuple):
            data["target_modules"] = list(data["target_modules"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RepairConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RepairConfigError(f"Unknown RepairConfig field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    def save_pretrained(self, save_dir: str | os.PathLike) -> Path:
        path = Path(save_dir) / REPAIR_CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> RepairConfig:
        path = Path(path)
        if path.is_dir():
            path = path / REPAIR_CONFIG_NAME
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
