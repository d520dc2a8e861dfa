"""SparseGPT as a criterion: needs each matrix's input Hessian and updates the kept weights (see `sparsegpt_math`);
with int8 values it prunes and quantizes jointly (`sparsegpt_prune_int8`).

owl-auto screens SparseGPT candidates with the Wanda proxy (row groups) from the Hessian diagonal's square root."""

from __future__ import annotations

import torch

from .registry import Criterion, PruneTask
from .scores import wanda_scores
from .sparsegpt_math import sparsegpt_prune, sparsegpt_prune_int8


def prune(task: PruneTask) -> None:
    cfg, w = task.settings, task.weight
    args = (w, task.stats.matrix(task.columns, w.device), task.sparsity, task.nm, cfg.sparsegpt_blocksize,
            cfg.sparsegpt_damp, task.name)
    if getattr(cfg, "values", "float") == "int8":  # pruned and quantized jointly: the sweep compensates the rounding
        joint = sparsegpt_prune_int8(*args, group_size=cfg.group_size)
        w.copy_(joint.weight.to(w.dtype))  # code * scale in float32, cast: as the compact checkpoint decodes it
        task.scales = joint.scales
        task.errors = {"rtn": joint.rtn_error, "joint": joint.joint_error}
        return
    new, _keep = sparsegpt_prune(*args)
    w.copy_(new.to(w.dtype))


def screen(weight: torch.Tensor, norms: torch.Tensor | None, settings) -> tuple[torch.Tensor, str]:
    return wanda_scores(weight, norms.to(weight.device)), "row"


SPARSEGPT = (
    Criterion("sparsegpt", "hessian", True, prune, screen, description="OBS reconstruction with weight update")
)
