"""`repair()`: one call that fine-tunes a pruned model with the transformers `Trainer` and keeps every pruned zero."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RepairConfigError
from ..utils import atomic_output_dir, atomic_write_text, input_paths
from .callbacks import SparsityLoggingCallback, SparsityPreservingCallback, add_sparsity_logging
from .config import RepairConfig
from .data import TokenWindows, build_windows
from .distill import DistillTrainer, IndexedWindows
from .masked_lora import attach_masked_lora, check_not_quantized, merge_masked_lora, warn_no_zeros
from .record import carry_pruning_record, trainable_model
from .recovery import nm_patterns, nnz_counts, prepare, sparsity_kept
from .seft import SEFTCallback
from .sparsity import block_sparsity, zero_masks, zeros_lost

logger = logging.getLogger(__name__)

REPAIR_REPORT_NAME = "repair_report.json"


@dataclass
class RepairReport:
    """What a repair run did and the checks it passed.

    Attributes:
        method: `"masked_lora"`, `"full_ft"` or `"seft"`.
        objective / teacher: the loss (`"lm"`, `"kd"`, `"kd+lm"`) and the teacher's name (path or loaded name).
        num_targets: adapted (LoRA) or tracked (full FT) weight tensors.
        trainable_params: parameters the optimizer updated.
        steps / train_windows / train_tokens: training budget.
        train_loss: mean training loss reported by the Trainer.
        sparsity_before / sparsity_after: fraction of zeros over the prunable weights.
        block_sparsity_before / block_sparsity_after: the same per block.
        zeros_preserved: every weight that was zero before is still zero.
        merged_max_abs_logit_diff: max |merged − unmerged| logits on one training window (masked LoRA, merged).
        eval_ppl_before / eval_ppl_after: perplexity on `eval_data` when given.
        eval_windows / eval_windows_available: windows of `eval_data` evaluated (capped by `max_eval_windows`) / in all.
        tokens_seen: tokens the optimizer trained on (steps × global batch × seqlen; repeats counted).
        candidate_windows / selected_windows: windows available and, with `select`, the indices trained on.
        select_seconds / teacher_cache_seconds: time spent scoring windows / filling the teacher cache.
        teacher_mode: `"cache"` (top-k logits from disk), `"live"` (teacher forward each step) or `None`.
        bf16: whether bf16 autocast was on.
        nnz_preserved: every prunable matrix has the same non-zero count and N:M pattern as before.
        seft_swaps: positions regrown by SEFT (as many were dropped); `seft_history` per update.
        seconds: wall time of the training call.
        config: the `RepairConfig` as a dict.
    """

    method: str
    num_targets: int = 0
    trainable_params: int = 0
    steps: int = 0
    train_windows: int = 0
    train_tokens: int = 0
    train_loss: float | None = None
    sparsity_before: float = 0.0
    sparsity_after: float = 0.0
    block_sparsity_before: list[float] = field(default_factory=list)
    block_sparsity_after: list[float] = field(default_factory=list)
    zeros_preserved: bool | None = None
    merged_max_abs_logit_diff: float | None = None
    eval_ppl_before: float | None = None
    eval_ppl_after: float | None = None
    eval_windows: int = 0
    eval_windows_available: int = 0
    objective: str = "lm"
    teacher: str | None = None
    tokens_seen: int = 0
    candidate_windows: int = 0
    selected_windows: list[int] | None = None
    select_seconds: float = 0.0
    teacher_cache_seconds: float = 0.0
    teacher_mode: str | None = None
    bf16: bool = False
    nnz_preserved: bool | None = None
    seft_swaps: int = 0
    seft_history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, save_dir: str | os.PathLike) -> Path:
        path = Path(save_dir) / REPAIR_REPORT_NAME
        atomic_write_text(path, self.to_json())
        return path


# ------------------------------------------------------------------------------------------------ training
def _training_args(config: RepairConfig, output_dir: str, max_steps: int, bf16: bool) -> Any:
    from transformers import TrainingArguments

    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type=config.lr_scheduler_type,
        logging_steps=config.logging_steps,
        report_to=config.report_to,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        seed=config.seed,
        data_seed=config.seed,
        bf16=bf16,
        fp16=config.fp16,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # DistillTrainer reads each window's index (its cached teacher logits)
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs an accelerator (else a UserWarning)
    )
    if bf16 and not torch.cuda.is_available():
        kwargs["use_cpu"] = True  # transformers refuses bf16 without a GPU unless told to train on CPU
    kwargs.update(config.extra_training_args)
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as err:
        raise RepairConfigError(f"`extra_training_args` / training fields rejected by TrainingArguments: {err}") from err


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return model(input_ids=ids.to(device)).logits.float().cpu()
    finally:
        model.train(was)


def _eval_ppl(model: nn.Module, windows: torch.Tensor | None) -> float | None:
    if windows is None:
        return None
    from ..evaluation import perplexity_of_ids

    return perplexity_of_ids(model, windows.reshape(-1), windows.shape[1])


def repair(
    model: nn.Module,
    tokenizer: Any = None,
    train_data: Any = None,
    config: RepairConfig | None = None,
    eval_data: Any = None,
    callbacks: list[Any] | None = None,
) -> tuple[nn.Module, RepairReport]:
    """Fine-tune a pruned model so it recovers quality while every pruned zero stays exactly zero.

    `method="masked_lora"` attaches a mask-preserving LoRA through PEFT, trains it with the transformers
    `Trainer` and (by default) merges it; `method="full_ft"` trains the model itself with
    `SparsityPreservingCallback`. Works under `accelerate launch` / `torchrun` (the Trainer handles DDP).

    If training is interrupted (exception, Ctrl-C) the model is left as it was: the LoRA layers are removed
    (the frozen base was never modified) or, for full fine-tuning, the weights are restored from a copy.

    Args:
        model: the pruned transformers causal LM (modified in place; the merged model is returned).
        tokenizer: its tokenizer (needed for text data).
        train_data: texts, a `.txt`/`.jsonl` path, a `datasets.Dataset`, or a `LongTensor [n, seqlen]`.
        config (`RepairConfig`, *optional*): the run's settings.
        eval_data: optional held-out data (same forms) for perplexity before/after.
        callbacks: extra `TrainerCallback`s.

    Returns:
        `(model, RepairReport)`: the merged sparse model (or the `PeftModel` when `config.merge=False`).

    Example:

    ```python
    >>> from optimum_owl.repair import RepairConfig, repair
    >>> model, report = repair(pruned_model, tokenizer, train_data=texts,
    ...                        config=RepairConfig(max_steps=200, seqlen=256))   # doctest: +SKIP
    >>> report.sparsity_before == report.sparsity_after                           # doctest: +SKIP
    True
    ```
    """
    from transformers import Trainer

    config = config or RepairConfig()
    if not isinstance(config, RepairConfig):
        raise RepairConfigError(f"`config` must be a RepairConfig, got {type(config).__name__}.")
    config.validate()
    model = trainable_model(model, config.seqlen)
    windows = build_windows(train_data, tokenizer, config.seqlen, config.text_column, config.max_train_windows)
    eval_windows = (
        build_windows(eval_data, tokenizer, config.seqlen, config.text_column, field_name="eval_data")
        if eval_data is not None
        else None
    )
    available = 0 if eval_windows is None else int(eval_windows.shape[0])
    if eval_windows is not None and config.max_eval_windows is not None and available > config.max_eval_windows:
        eval_windows = eval_windows[: config.max_eval_windows]
        logger.info(
            "eval_data: perplexity on the first %d of %d windows, before and after repair (max_eval_windows=%d; "
            "None evaluates all).", config.max_eval_windows, available, config.max_eval_windows,
        )
    check_not_quantized(model)

    before = zero_masks(model)
    nnz_before, nm_before = nnz_counts(model), nm_patterns(model)
    blocks_before, total_before = block_sparsity(model)
    plan = prepare(model, windows, config)
    windows = plan.windows
    report = RepairReport(method=config.method, config=config.to_dict(), sparsity_before=total_before,
                          block_sparsity_before=blocks_before, train_windows=int(windows.shape[0]),
                          train_tokens=int(windows.numel()), objective=config.objective,
                          teacher=config.to_dict()["teacher"], candidate_windows=plan.candidate_windows,
                          selected_windows=plan.selected, select_seconds=plan.select_seconds,
                          teacher_cache_seconds=plan.cache_seconds, bf16=plan.bf16,
                          teacher_mode=None if plan.teacher is None else "cache" if plan.cache else "live")
    report.eval_windows, report.eval_windows_available = (0 if eval_windows is None else int(eval_windows.shape[0])), available
    report.eval_ppl_before = _eval_ppl(model, eval_windows)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training

    backup: dict[str, torch.Tensor] | None = None
    if config.method == "masked_lora":
        train_model = attach_masked_lora(model, config)
        report.num_targets = sum(1 for m in train_model.modules() if hasattr(m, "owl_pruned_mask"))
    else:
        if not before:
            warn_no_zeros()
        backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
        train_model = model
    report.trainable_params = sum(p.numel() for p in train_model.parameters() if p.requires_grad)

    all_callbacks = list(callbacks or [])
    if config.method != "masked_lora":
        keeper = next((c for c in all_callbacks if isinstance(c, SparsityPreservingCallback)), None)  # the user's
        if keeper is None:
            keeper = (SEFTCallback(config.seft_interval, config.seft_fraction, config.seft_end, config.seft_drop)
                      if config.method == "seft" else SparsityPreservingCallback())
            all_callbacks.insert(0, keeper)
    evolving = config.method != "masked_lora" and isinstance(keeper, SEFTCallback)  # zeros move, counts stay

    def restore() -> None:
        nonlocal model
        if config.method == "masked_lora":
            model = train_model.unload()
        elif backup is not None:
            model.load_state_dict(backup)
        for n, p in model.named_parameters():
            if n in requires_grad:
                p.requires_grad_(requires_grad[n])
        model.train(was_training)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="owl-repair-") as scratch:
        try:
            args = _training_args(config, config.output_dir or scratch, plan.max_steps, plan.bf16)
            if plan.uses_teacher:
                trainer = DistillTrainer(model=train_model, args=args, train_dataset=IndexedWindows(windows),
                                         callbacks=all_callbacks, repair_config=config, teacher=plan.teacher,
                                         cache=plan.cache)
            else:
                trainer = Trainer(model=train_model, args=args, train_dataset=TokenWindows(windows),
                                  callbacks=all_callbacks)
            add_sparsity_logging(trainer, SparsityLoggingCallback(per_block=False))  # per block: in the report
            result = trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
        except BaseException:
            logger.error("Repair interrupted; restoring the pruned model as it was.")
            restore()
            raise
        finally:
            plan.close()
    report.seconds = time.perf_counter() - start
    report.steps = int(trainer.state.global_step)
    report.tokens_seen = report.steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * \
        args.world_size * config.seqlen
    report.train_loss = float(result.training_loss) if result.training_loss is not None else None
    if config.method != "masked_lora":
        report.num_targets = len(keeper.masks)
    if evolving:
        report.seft_history = list(keeper.history)
        report.seft_swaps = sum(h["swapped"] for h in keeper.history)

    out: nn.Module = train_model
    if config.method == "masked_lora" and config.merge:
        probe = windows[:1]
        unmerged = _logits(train_model, probe) if config.verify else None
        out = merge_masked_lora(train_model, verify=config.verify)
        if unmerged is not None:
            report.merged_max_abs_logit_diff = float((_logits(out, probe) - unmerged).abs().max())
        for n, p in out.named_parameters():
            if n in requires_grad:
                p.requires_grad_(requires_grad[n])
    out.train(was_training)

    check_model = out
    changed = sparsity_kept(check_model, nnz_before, nm_before)
    report.nnz_preserved = not changed
    lost = zeros_lost(check_model, before)
    report.zeros_preserved = None if evolving else not lost
    if (lost and not evolving or changed) and config.verify:
        raise RuntimeError(f"Repair lost pruned zeros in {len(lost)} module(s) / changed the non-zero count or "
                           f"N:M groups of {changed[:4]}: {dict(list(lost.items())[:4])}.")
    blocks_after, total_after = block_sparsity(check_model)
    report.sparsity_after, report.block_sparsity_after = total_after, blocks_after
    report.eval_ppl_after = _eval_ppl(out, eval_windows)
    logger.info(
        "Repair done in %.1fs: %d steps, loss %.4f, sparsity %.4f -> %.4f",
        report.seconds, report.steps, report.train_loss or math.nan, total_before, total_after,
    )
    return out, report


def save_repaired(
    model: nn.Module,
    save_dir: str | os.PathLike,
    tokenizer: Any = None,
    report: RepairReport | None = None,
    overwrite: bool = False,
    source: str | os.PathLike | None = None,
) -> Path:
    """Save a merged repaired model as a pruned checkpoint, atomically: the weights, the tokenizer, the pruning
    record (`owl_report.json`, `owl_config.json`) and the repair's own record (`repair_report.json`).

    The pruning record comes from `source` (the pruned model's folder), else from the folder the model was loaded
    from, else from the model itself (`model.owl_report`, the config of a compact pruned model); see
    `record.carry_pruning_record`. Model cards and `optimum-owl push` read both records.
    """
    if hasattr(model, "peft_config"):
        raise RepairConfigError("`model` is still a PeftModel: merge it (merge_masked_lora) or use save_masked_adapter.")
    with atomic_output_dir(save_dir, overwrite=overwrite, protected=input_paths(model, tokenizer)) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        carry_pruning_record(model, Path(tmp), source)
        if report is not None:
            report.save(tmp)
    return Path(save_dir)
