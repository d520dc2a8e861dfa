"""Magnitude pruning: score |W_ij|, one threshold per matrix; needs no calibration data."""

from __future__ import annotations

import torch

from ..masks import apply_keep_mask_
from .registry import Criterion, PruneTask
from .scores import keep_mask, magnitude_scores


def prune(task: PruneTask) -> None:
    apply_keep_mask_(task.weight, keep_mask(magnitude_scores(task.weight), task.sparsity, task.nm, "layer"))


def screen(weight: torch.Tensor, norms: torch.Tensor | None, settings) -> tuple[torch.Tensor, str]:
    return magnitude_scores(weight), "layer"


MAGNITUDE = (Criterion("magnitude", "none", False, prune, screen, description="|W|, one threshold per matrix"))
