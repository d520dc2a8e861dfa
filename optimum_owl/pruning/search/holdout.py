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
import time

import torch

from ...algorithms.families import get_family
from ...errors import OWLConfigError
from ..passes import Applied, RunState, block_metrics, family_plans, holdout_ratios, prune_pass, split_plans
from .state import SearchState
from .windows import holdout_count, holdout_windows_wanted

logger = logging.getLogger(__name__)


def split_holdout(state: RunState, search: SearchState) -> None:
    """Decide which windows score the candidates (`search.ids`).

    When the calibration source gave at least as many windows beyond the calibration windows
    (`holdout_windows_wanted`, drawn by the engine into `search.ids`) as holding out would take, they are the
    held-out windows and every calibration window stays in the statistics (`search.separate`). Otherwise the last
    calibration windows are set aside and block 0's inputs re-captured from the others only, so that no statistic
    ever sees a held-out window."""
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
    drawn = search.ids
    if drawn is not None and drawn.shape[0] >= k:
        search.separate = True
        logger.info("%s: %d calibration windows for statistics, %d other windows (%d tokens; %d wanted) of %s for "
                    "scoring", cfg.layerwise, n, drawn.shape[0], drawn.numel(), holdout_windows_wanted(cfg),
                    search.source or "the calibration source")
        return
    if cfg.auto_holdout_tokens:
        state.warn(
            f"`layerwise={cfg.layerwise!r}`: the calibration source has too little text beyond the calibration "
            f"windows to score candidates on (`auto_holdout_tokens`={cfg.auto_holdout_tokens} wanted "
            f"{holdout_windows_wanted(cfg)} windows, {0 if drawn is None else drawn.shape[0]} found), so {k} of the {n} "
            "calibration windows are held out instead: a smaller, noisier test. Pass a larger source (more documents "
            "than `num_samples`) to score on more text."
        )
    search.ids = None
    if n - k < 1:
        raise OWLConfigError(
            f"`layerwise={cfg.layerwise!r}` holds out {k} of the {n} calibration windows (`auto_holdout`="
            f"{cfg.auto_holdout}) and none would be left for the statistics; raise `num_samples` (at least 2, 16 or "
            "more is better)."
        )
    search.ids = ids[n - k :].clone()
    state.calibration_ids = ids[: n - k]
    t = time.perf_counter()
    state.inputs0 = state.runner.capture(state.calibration_ids, cfg.batch_size)
    state.add_time("capture", t)
    logger.info("%s: %d calibration windows for statistics, %d held out for scoring", cfg.layerwise, n - k, k)


def refit(state: RunState, search: SearchState, family: str, knob: dict[str, float]) -> Applied:
    """Prune the dense model with the chosen setting on *all* calibration windows, the held-out ones included.

    The held-out windows only served to choose; the result is what a direct run with the choice gives
    (`layerwise="uniform"`, or the chosen family with its knob) on the same calibration data: for a family that needs
    data (OWL, DLP) the held-out windows' dense statistics are added to the outlier pass's (one dense pass over them,
    h·L block forwards) before its block metric (outlier ratios at the chosen M, mean scores) is taken, and the
    sequential prune sees every window.
    """
    cfg = state.config
    if search.ids is None or state.calibration_ids is None:
        raise RuntimeError("refit needs split_holdout to have run first.")
    with state.phase("auto_refit"):
        chosen = get_family(family)
        if chosen.needs_data:
            m = knob.get("owl_m", cfg.owl_m)
            ratios, means = holdout_ratios(state, state.runner.capture(search.ids, cfg.batch_size), m)
            metrics = ratios if chosen.inputs == "outlier_ratios" else means
        else:  # no statistics (AlphaPruning reads the dense weights, restored before the refit)
            metrics = block_metrics(state, chosen)
            state.dense_stats = []  # a direct run of these takes block 0's statistics in its own prune pass
        plans = family_plans(state, family, metrics, knob)  # records a clamping warning, if any
        if "attention_shift" in knob:
            plans = split_plans(state, plans, knob["attention_shift"])
        state.calibration_ids = torch.cat([state.calibration_ids, search.ids])
        state.inputs0 = None
        state.inputs0 = state.runner.capture(state.calibration_ids, cfg.batch_size)
        prune_pass(state, plans)
    return Applied(family, dict(knob), plans, metrics)
