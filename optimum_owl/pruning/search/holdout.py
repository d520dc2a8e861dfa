"""Which windows score the searches' candidates (`layerwise="owl-auto"`, `"auto"`), and the refit of the winner when
they were held out of the calibration windows (optimum_owl.pruning.search.search, docs/quality.md).

Two cases, decided by `split_holdout` before the outlier pass:

- **Separate windows** (the default whenever the calibration source has the text): `holdout_windows_wanted` windows
  (`auto_holdout_tokens`, 8,192 tokens by default) are drawn by the engine after the calibration windows, sharing no
  text with them (`data.draw_windows`). Every calibration window goes to the statistics; the winner, pruned from
  them as a direct run would be, is the model returned (`search.keep`).
- **Another source** (`auto_holdout_dataset`): the same number of windows drawn from that text instead (e.g. a
  validation split of the domain the model will serve); otherwise as separate windows.
- **Held-out calibration windows** (a source with no other text, or `auto_holdout_tokens=0`): the last
  `holdout_count` calibration windows are set aside; statistics, outlier ratios and pruning only ever see the
  others, and the winner is pruned once more on all of them (`refit`).
"""

from __future__ import annotations

import logging
import math
import time

import torch

from ...algorithms.allocation import BlockPlan
from ...errors import OWLConfigError
from ..passes import RunState, block_esd_alphas, family_plans, holdout_ratios, plan, prune_pass, split_plans, uniform

logger = logging.getLogger(__name__)


def holdout_count(num_samples: int, fraction: float) -> int:
    """Windows held out of `num_samples`: `ceil(fraction · num_samples)`, and at least `min(4, num_samples // 4)` (at
    least 1), so that small calibration sets still leave enough held-out tokens to tell candidates apart."""
    return max(1, math.ceil(fraction * num_samples - 1e-9), min(4, num_samples // 4))


def holdout_windows_wanted(config) -> int:
    """Windows to draw beyond the calibration windows for scoring (`auto_holdout_tokens`; 0: none, hold out)."""
    if not config.auto_holdout_tokens:
        return 0
    return max(math.ceil(config.auto_holdout_tokens / config.seqlen), holdout_count(config.num_samples, config.auto_holdout))


def split_holdout(state: RunState) -> None:
    """Decide which windows score the candidates (`state.holdout_ids`).

    When the calibration source gave at least as many windows beyond the calibration windows
    (`holdout_windows_wanted`, drawn by the engine) as holding out would take, they are the held-out windows and
    every calibration window stays in the statistics (`state.holdout_separate`). Otherwise the last calibration
    windows are set aside and block 0's inputs re-captured from the others only, so that no statistic ever sees a
    held-out window."""
    cfg = state.config
    head = state.model.get_output_embeddings() if hasattr(state.model, "get_output_embeddings") else None
    if head is None:
        raise OWLConfigError(
            f"`layerwise={cfg.layerwise!r}` scores candidates by the next-token loss, so it needs a model with a "
            f"language-modelling head; {type(state.model).__name__} has none. Use layerwise='owl' or 'uniform'."
        )
    ids = state.calibration_ids
    if ids is None:
        raise RuntimeError("split_holdout needs the calibration ids (call after the calibration data is captured).")
    n = int(ids.shape[0])
    k = holdout_count(n, cfg.auto_holdout)
    drawn = state.holdout_ids
    if drawn is not None and drawn.shape[0] >= k:
        state.holdout_separate = True
        logger.info("%s: %d calibration windows for statistics, %d other windows (%d tokens; %d wanted) of %s for "
                    "scoring", cfg.layerwise, n, drawn.shape[0], drawn.numel(), holdout_windows_wanted(cfg),
                    state.holdout_source or "the calibration source")
        return
    if cfg.auto_holdout_tokens:
        state.warn(
            f"`layerwise={cfg.layerwise!r}`: the calibration source has too little text beyond the calibration "
            f"windows to score candidates on (`auto_holdout_tokens`={cfg.auto_holdout_tokens} wanted "
            f"{holdout_windows_wanted(cfg)} windows, {0 if drawn is None else drawn.shape[0]} found), so {k} of the {n} "
            "calibration windows are held out instead: a smaller, noisier test. Pass a larger source (more documents "
            "than `num_samples`) to score on more text."
        )
    state.holdout_ids = None
    if n - k < 1:
        raise OWLConfigError(
            f"`layerwise={cfg.layerwise!r}` holds out {k} of the {n} calibration windows (`auto_holdout`="
            f"{cfg.auto_holdout}) and none would be left for the statistics; raise `num_samples` (at least 2, 16 or "
            "more is better)."
        )
    state.holdout_ids = ids[n - k :].clone()
    state.calibration_ids = ids[: n - k]
    t = time.perf_counter()
    state.inputs0 = state.runner.capture(state.calibration_ids, cfg.batch_size)
    state.add_time("capture", t)
    logger.info("%s: %d calibration windows for statistics, %d held out for scoring", cfg.layerwise, n - k, k)


def refit(state: RunState, family: str, knob: dict[str, float]) -> list[BlockPlan]:
    """Prune the dense model with the chosen setting on *all* calibration windows, the held-out ones included.

    The held-out windows only served to choose; the result is what a direct run with the choice gives
    (`layerwise="uniform"`, or the chosen family with its knob) on the same calibration data: for OWL and DLP the
    held-out windows' dense statistics are added to the outlier pass's (one dense pass over them, h·L block
    forwards) before the outlier ratios (mean scores) are taken, and the sequential prune sees every window.
    """
    t = time.perf_counter()
    cfg = state.config
    if state.holdout_ids is None or state.calibration_ids is None:
        raise RuntimeError("refit needs split_holdout to have run first.")
    state.outlier_ratios = None
    state.block_metrics = None
    if family == "uniform":
        plans = uniform(state)
    elif family in ("owl", "dlp"):
        m = knob.get("owl_m", cfg.owl_m)
        ratios = holdout_ratios(state, state.runner.capture(state.holdout_ids, cfg.batch_size), m)
        state.outlier_ratios = ratios
        if family == "owl":
            plans = plan(state, ratios, owl_lambda=knob["owl_lambda"])  # records a clamping warning, if any
        else:
            state.block_metrics = list(state.mean_scores or [])
            plans = family_plans(state, "dlp", state.block_metrics, knob["dlp_alpha"])
    else:  # alphapruning, atp: no statistics (AlphaPruning reads the dense weights, restored before the refit)
        state.block_metrics = block_esd_alphas(state) if family == "alphapruning" else None
        plans = family_plans(state, family, state.block_metrics, next(iter(knob.values())))
    if family not in ("owl", "dlp"):
        state.dense_stats = []  # a direct run of these takes block 0's statistics in its own prune pass
    if "attention_shift" in knob:
        plans = split_plans(state, plans, knob["attention_shift"])
    state.calibration_ids = torch.cat([state.calibration_ids, state.holdout_ids])
    state.inputs0 = None
    state.inputs0 = state.runner.capture(state.calibration_ids, cfg.batch_size)
    prune_pass(state, plans)
    state.timings["auto_refit"] = time.perf_counter() - t
    return plans
