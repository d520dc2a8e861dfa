"""Wanda (Sun et al. 2023, arXiv 2306.11695): score |W_ij|·‖X_j‖₂, compared per output row by default
(`wanda_group="layer"`: one ranking per matrix); optional DSnoT refinement of the chosen mask."""

from __future__ import annotations

import torch

from .. import dsnot
from ..masks import apply_keep_mask_
from .registry import Criterion, PruneTask
from .scores import keep_mask, wanda_prune_, wanda_scores


def prune(task: PruneTask) -> None:
    cfg, w = task.settings, task.weight
    norms = task.stats.norms(task.columns, w.device)
    if (task.nm is not None or cfg.wanda_group == "row") and cfg.refine != "dsnot":
        # per-row comparison groups: scored and selected a band of rows at a time (same mask, small buffers)
        wanda_prune_(w, norms, task.sparsity, task.nm)
        return
    keep = keep_mask(wanda_scores(w, norms), task.sparsity, task.nm, cfg.wanda_group)
    if cfg.refine == "dsnot":
        mean, mean_sq = task.stats.moments(task.columns, w.device)
        keep = dsnot.dsnot_keep_mask(w, keep, mean, mean_sq, task.nm, cfg.dsnot_cycles, cfg.dsnot_threshold)
    apply_keep_mask_(w, keep)


def screen(weight: torch.Tensor, norms: torch.Tensor | None, settings) -> tuple[torch.Tensor, str]:
    return wanda_scores(weight, norms.to(weight.device)), settings.wanda_group


WANDA = (
    Criterion("wanda", "norms", False, prune, screen, refine=("dsnot",), description="|W|·‖X‖₂, no weight update")
)
