"""SparseGPT as a criterion: needs each matrix's input Hessian and updates the kept weights (see `sparsegpt_math`).

owl-auto screens SparseGPT candidates with the Wanda proxy (row groups) from the Hessian diagonal's square root."""

from __future__ import annotations

import torch

from .registry import Criterion, PruneTask
from .scores import wanda_scores
from .sparsegpt_math import sparsegpt_prune


def prune(task: PruneTask) -> None:
    cfg, w = task.settings, task.weight
    new, _keep = sparsegpt_prune(
        w,
        task.stats.matrix(task.columns, w.device),
        task.sparsity,
        task.nm,
        cfg.sparsegpt_blocksize,
        cfg.sparsegpt_damp,
        task.name,
    )
    w.copy_(new.to(w.dtype))


def screen(weight: torch.Tensor, norms: torch.Tensor | None, settings) -> tuple[torch.Tensor, str]:
    return wanda_scores(weight, norms.to(weight.device)), "row"


SPARSEGPT = (
    Criterion("sparsegpt", "hessian", True, prune, screen, description="OBS reconstruction with weight update")
)
