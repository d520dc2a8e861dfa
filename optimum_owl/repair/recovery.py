"""What `repair()` prepares for a recovery run beyond plain training: the teacher, the training windows (the data's
first ones within `max_tokens`, or those where the pruned model degraded most), the teacher cache, bf16 where the
hardware has it, and the check that SEFT kept every matrix's non-zero count."""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RepairConfigError
from .config import RepairConfig
from .distill import TeacherCache, select_top, window_scores
from .sparsity import detect_nm, prunable_params

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """The recovery run's inputs once prepared."""

    windows: torch.Tensor
    teacher: nn.Module | None = None
    cache: TeacherCache | None = None
    candidate_windows: int = 0
    selected: list[int] | None = None
    select_seconds: float = 0.0
    cache_seconds: float = 0.0
    max_steps: int = 0
    bf16: bool = False
    scratch: Any = field(default=None, repr=False)

    @property
    def uses_teacher(self) -> bool:
        return self.teacher is not None

    def close(self) -> None:
        if self.scratch is not None:
            self.scratch.cleanup()
            self.scratch = None


def native_bf16() -> bool:
    """Whether this machine computes bf16 natively: a CUDA GPU with bf16, or a CPU with AVX-512 BF16."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if callable(probe) else False


def load_teacher(config: RepairConfig, student: nn.Module) -> nn.Module | None:
    """The teacher model, frozen and in eval mode (loaded when `config.teacher` is a path), or `None`."""
    teacher = config.teacher
    if teacher is None:
        return None
    if isinstance(teacher, (str, os.PathLike)):
        from ..pruning.modeling import load_model

        teacher = load_model(os.fspath(teacher), gguf_file=config.teacher_gguf_file)
    if teacher is student:
        raise RepairConfigError("`teacher` is the model being repaired; pass the dense model it was pruned from.")
    device = next(student.parameters()).device
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    vocab = getattr(getattr(student, "config", None), "vocab_size", None)
    t_vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
    if vocab is not None and t_vocab is not None and vocab != t_vocab:
        raise RepairConfigError(f"`teacher` has vocab_size={t_vocab}, the model {vocab}: distillation needs the "
                                "same tokenizer; pass the dense model the pruned one came from.")
    return teacher


def world_size() -> int:
    return max(int(os.environ.get("WORLD_SIZE", "1")), 1)


def prepare(model: nn.Module, windows: torch.Tensor, config: RepairConfig) -> Plan:
    """Load the teacher, choose the training windows, fill or open the teacher cache, resolve `max_steps` and bf16."""
    teacher = load_teacher(config, model)
    plan = Plan(windows=windows, teacher=teacher, candidate_windows=int(windows.shape[0]))
    budget = None if config.max_tokens is None else max(config.max_tokens // config.seqlen, 1)
    top = {}
    if config.select is not None:
        start = time.perf_counter()
        want_top = config.kd_top_k if config.objective != "lm" and config.hidden_loss is None else None
        scores, top = window_scores(model, teacher, windows, config.select_metric,
                                    config.per_device_train_batch_size, want_top)
        chosen = select_top(scores, budget)
        plan.windows, plan.selected = windows[chosen], chosen.tolist()
        top = {k: v[chosen] for k, v in top.items()}
        plan.select_seconds = time.perf_counter() - start
        logger.info("select=degradation: %d of %d windows (%s from %.4f to %.4f) in %.1fs", len(chosen),
                    windows.shape[0], config.select_metric, float(scores[chosen].min()), float(scores.max()),
                    plan.select_seconds)
    elif budget is not None:
        plan.windows = windows[:budget]
    n = int(plan.windows.shape[0])
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size()
    plan.max_steps = config.max_steps if config.max_steps is not None else max(math.ceil(n / per_step), 1)
    plan.bf16 = native_bf16() if config.bf16 == "auto" else bool(config.bf16)
    if teacher is not None and _use_cache(config, plan.max_steps * per_step / n):
        folder = config.teacher_cache_dir
        if folder is None:
            plan.scratch = tempfile.TemporaryDirectory(prefix="owl-teacher-")
            folder = plan.scratch.name
        start = time.perf_counter()
        plan.cache = TeacherCache(folder, plan.windows, teacher, config.kd_top_k)
        if plan.cache.valid():
            logger.info("Teacher cache: reusing %s", folder)
        elif top:
            plan.cache.write(top["values"], top["indices"])
        else:
            plan.cache.fill(teacher, plan.windows, config.per_device_train_batch_size)
        plan.cache_seconds = time.perf_counter() - start
    return plan


def _use_cache(config: RepairConfig, epochs: float) -> bool:
    if config.teacher_cache is False or config.objective == "lm" or config.hidden_loss is not None:
        return False
    if config.teacher_cache is True:
        return True
    return config.kd_top_k is not None and (config.select is not None or epochs > 1.0
                                            or config.teacher_cache_dir is not None)


@torch.no_grad()
def nnz_counts(model: nn.Module) -> dict[str, int]:
    """`{name: non-zero count}` of every prunable weight."""
    return {pp.name: int((pp.param.detach() != 0).sum()) for pp in prunable_params(model)}


@torch.no_grad()
def nm_patterns(model: nn.Module) -> dict[str, tuple[int, int]]:
    """`{name: (n, m)}` of the prunable weights whose zeros form N:M groups."""
    out = {}
    for pp in prunable_params(model):
        nm = detect_nm(pp.param.detach())
        if nm is not None:
            out[pp.name] = nm
    return out


def sparsity_kept(model: nn.Module, nnz_before: dict[str, int], nm_before: dict[str, tuple[int, int]]) -> list[str]:
    """Names of the matrices whose non-zero count changed or whose N:M groups broke (empty: all kept)."""
    now = nnz_counts(model)
    bad = [name for name, count in nnz_before.items() if now.get(name) != count]
    nm_now = nm_patterns(model)
    return bad + [name for name, nm in nm_before.items() if nm_now.get(name) != nm]
