"""`RepairConfig`: every knob of a sparse repair run (masked LoRA or masked full fine-tuning), validated."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RepairConfigError
from ..utils import atomic_write_text

REPAIR_CONFIG_NAME = "repair_config.json"
METHODS = ("masked_lora", "full_ft", "seft")
OBJECTIVES = ("lm", "kd", "kd+lm")
HIDDEN_LOSSES = (None, "squarehead")
SELECTIONS = (None, "degradation")
SELECT_METRICS = ("loss_gap", "kl")
SEFT_DROPS = ("magnitude", "sensitivity")


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
        max_steps (`int`, *optional*): optimizer steps; `None` = one pass over the training windows.
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
        bf16 / fp16 (`bool`): mixed precision for the Trainer (masks stay exact under both; fp32 master weights).
            `bf16="auto"` turns bf16 autocast on where the CPU (AVX-512 BF16) or GPU computes bf16 natively.
        logging_steps (`int`): Trainer logging interval; the sparsity (total, and min / mean / max over blocks)
            is logged with the loss (per block: `RepairReport.block_sparsity_after`).
        report_to (`str` or `list[str]`): Trainer loggers (`"none"`, `"tensorboard"`, ...).
        merge (`bool`): merge the masked adapter into the weights at the end (`repair` then returns a plain,
            sparse model); when `False` the `PeftModel` is returned.
        verify (`bool`): after merging, check every pruned zero is still zero, N:M groups still valid, and
            (masked LoRA) the merged logits equal the unmerged ones on one training window.
        output_dir (`str`, *optional*): Trainer scratch directory (a temporary one when omitted); Trainer
            checkpoints go there with `save_steps`.
        objective (`str`): `"lm"` (next-token loss, default), `"kd"` (distillation from `teacher`:
            `T²·KL(teacher ‖ student)` on logits softened by `temperature`) or `"kd+lm"`
            (`kd_alpha·KD + (1 − kd_alpha)·LM`).
        teacher (`nn.Module` or `str`, *optional*): the dense model to distil from (a model, or a path / Hub id
            loaded like the student; `teacher_gguf_file` names a GGUF file in that folder). Needed by `"kd"`,
            `"kd+lm"`, `hidden_loss` and `select`.
        temperature (`float`): distillation temperature `T`.
        kd_top_k (`int`, *optional*): distil on the teacher's `k` largest logits only (teacher renormalised over
            them, student over the full vocabulary); `None` uses the full distribution.
        kd_alpha (`float`): weight of the KD term in `"kd+lm"`.
        hidden_loss (`str`, *optional*): `"squarehead"` adds `hidden_weight ·` the mean over blocks of
            `MSE(h_student, h_teacher) / mean(h_teacher²)` (SquareHead, arXiv 2310.06927); needs the live teacher.
        teacher_cache (`bool` or `"auto"`): keep the teacher's top-`kd_top_k` logits of every training window in
            safetensors files and read them instead of running the teacher at every step. `"auto"` caches when
            it saves teacher forwards: `kd_top_k` set, no `hidden_loss`, and the windows are seen more than once
            or `select` already runs the teacher on them.
        teacher_cache_dir (`str`, *optional*): where the cache lives (reused when the windows, `kd_top_k` and
            teacher match); a temporary folder when omitted.
        select (`str`, *optional*): `"degradation"` scores every candidate window by how much worse the pruned
            model is than the teacher there (`select_metric`) and trains on the worst ones within `max_tokens`;
            `None` keeps the data's order.
        select_metric (`str`): `"loss_gap"` (student NLL − teacher NLL) or `"kl"` (KL(teacher ‖ student)).
        max_tokens (`int`, *optional*): training-token budget: the windows trained on are the first (or, with
            `select`, the selected) `max_tokens // seqlen`.
        seft_interval (`int`, *optional*): `method="seft"`: optimizer steps between drop-and-grow updates
            (default: a twentieth of the steps).
        seft_fraction (`float`): share of each matrix's non-zeros swapped at the first update (cosine decay).
        seft_end (`float`): share of the steps after which masks stop changing.
        seft_drop (`str`): drop score, `"magnitude"` (`|w|`) or `"sensitivity"` (`|w·grad|`); regrowth takes
            the largest accumulated gradients.
        save_steps (`int`, *optional*): write a Trainer checkpoint to `output_dir` every `save_steps` steps.
        resume_from_checkpoint (`str` or `bool`, *optional*): resume an interrupted run from a Trainer checkpoint
            (`True`: the latest one in `output_dir`).

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
    max_steps: int | None = 100
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
    bf16: bool | str = False
    fp16: bool = False
    logging_steps: int = 10
    report_to: str | list[str] = "none"
    merge: bool = True
    verify: bool = True
    output_dir: str | None = None
    extra_training_args: dict[str, Any] = field(default_factory=dict)
    objective: str = "lm"
    teacher: Any = None
    teacher_gguf_file: str | None = None
    temperature: float = 1.0
    kd_top_k: int | None = None
    kd_alpha: float = 0.5
    hidden_loss: str | None = None
    hidden_weight: float = 1.0
    teacher_cache: bool | str = "auto"
    teacher_cache_dir: str | None = None
    select: str | None = None
    select_metric: str = "loss_gap"
    max_tokens: int | None = None
    seft_interval: int | None = None
    seft_fraction: float = 0.1
    seft_end: float = 0.75
    seft_drop: str = "magnitude"
    save_steps: int | None = None
    resume_from_checkpoint: str | bool | None = None

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
                     "logging_steps", "kd_top_k", "max_tokens", "seft_interval", "save_steps"):
            value = getattr(self, name)
            if value is None and name in ("max_steps", "kd_top_k", "max_tokens", "seft_interval", "save_steps"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RepairConfigError(f"`{name}` must be a positive integer, got {value!r}.")
        self._validate_recovery()
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
        if self.bf16 not in (True, False, "auto"):
            raise RepairConfigError(f"`bf16` must be True, False or 'auto' (native bf16 only), got {self.bf16!r}.")
        if self.bf16 is True and self.fp16:
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

    def _validate_recovery(self) -> None:
        """The distillation, selection and SEFT fields."""
        choices = (("objective", OBJECTIVES), ("hidden_loss", HIDDEN_LOSSES), ("select", SELECTIONS),
                   ("select_metric", SELECT_METRICS), ("seft_drop", SEFT_DROPS))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise RepairConfigError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}.")
        needs = [name for name, on in (("objective", self.objective != "lm"), ("hidden_loss", self.hidden_loss),
                                       ("select", self.select)) if on]
        if needs and self.teacher is None:
            raise RepairConfigError(f"`teacher` is required by `{needs[0]}`={getattr(self, needs[0])!r}: pass the "
                                    "dense model (or its path) as RepairConfig(teacher=...).")
        if self.teacher is not None and not (isinstance(self.teacher, (str, os.PathLike)) or hasattr(self.teacher, "forward")):
            raise RepairConfigError(f"`teacher` must be a model or a path, got {type(self.teacher).__name__}.")
        for name in ("temperature", "hidden_weight"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise RepairConfigError(f"`{name}` must be > 0, got {getattr(self, name)!r}.")
        for name in ("kd_alpha", "seft_fraction", "seft_end"):
            if not (isinstance(getattr(self, name), (int, float)) and 0.0 < getattr(self, name) <= 1.0):
                raise RepairConfigError(f"`{name}` must be in (0, 1], got {getattr(self, name)!r}.")
        if self.teacher_cache not in (True, False, "auto"):
            raise RepairConfigError(f"`teacher_cache` must be True, False or 'auto', got {self.teacher_cache!r}.")
        if self.teacher_cache is True and (self.kd_top_k is None or self.hidden_loss or self.objective == "lm"):
            raise RepairConfigError("`teacher_cache`=True stores the teacher's top-k logits: it needs a KD "
                                    "`objective`, `kd_top_k` set and no `hidden_loss` (hidden states are too large "
                                    "to cache); set teacher_cache='auto' or False.")
        if self.select is not None and self.max_tokens is None:
            raise RepairConfigError("`select`='degradation' fills a budget: set `max_tokens` (the training tokens "
                                    "to keep; the rest of the data is the candidate pool).")
        if self.save_steps is not None and self.output_dir is None:
            raise RepairConfigError("`save_steps` writes Trainer checkpoints into `output_dir`: set `output_dir` "
                                    "(a temporary folder would vanish with the run).")
        if self.method == "seft" and self.merge is False:
            raise RepairConfigError("`merge`=False keeps an adapter, but `method`='seft' trains the weights "
                                    "themselves; leave merge=True.")

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "teacher"}
        if isinstance(data["target_modules"], tuple):
            data["target_modules"] = list(data["target_modules"])
        data["teacher"] = teacher_name(self.teacher)
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


def teacher_name(teacher: Any) -> str | None:
    """What a record says about the teacher: its path, or the name a model was loaded from (its class otherwise)."""
    if teacher is None or isinstance(teacher, str):
        return teacher
    if isinstance(teacher, os.PathLike):
        return os.fspath(teacher)
    loaded = getattr(getattr(teacher, "config", None), "_name_or_path", "")
    return str(loaded) if loaded else f"<{type(teacher).__name__}>"
