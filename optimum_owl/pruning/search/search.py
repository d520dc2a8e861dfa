"""`layerwise="owl-auto"` and `layerwise="auto"`: choose the allocation by the loss on held-out windows.

`owl-auto` searches OWL's (M, λ) and uniform sparsity; `auto` widens the same search to every allocation family
(`auto_families`: OWL, DLP, AlphaPruning, ATP) with a small grid of each one's knob, and also checks OWL with the
configured (paper) `owl_m`, `owl_lambda` exactly when it screens better than uniform.

The paper's M=5, λ=0.08 were tuned on LLaMA-7B at 70%; other models and sparsities want other values, and OWL with
the wrong ones can be worse than uniform sparsity. The search here is bounded and reuses everything that does not
depend on the candidate:

1. **Hold-out** (`holdout.split_holdout`, before the outlier pass): the candidates are scored on about
   `auto_holdout_tokens` (8,192) tokens of windows drawn from the calibration source beyond the calibration windows
   (no text shared with them), and every calibration window goes to the statistics. Only when the source has too
   little other text are the last `ceil(auto_holdout · num_samples)` calibration windows (at least `min(4,
   num_samples // 4)`) set aside instead; statistics, outlier ratios and pruning never see held-out windows. With
   `auto_holdout_dataset` the scoring windows come from that source instead (`engine.draw_scoring_windows`).
2. **Outlier ratios for every M at once** from the dense statistics already collected by the outlier pass
   (`block_outlier_ratios`; no forward).
3. **Uniform, exactly**: the baseline is pruned for real (`method`, sequential propagation, DSnoT if configured)
   and scored by the full model's next-token loss on the held-out windows. Its statistics pass also gives, per
   unit, the input norms ‖X_j‖₂ seen behind a *pruned* prefix; they are kept (a vector per unit).
4. **Screening**: every candidate (uniform; each (M, λ) of `auto_owl_ms × auto_owl_lambdas` plus the configured
   `owl_m`, `owl_lambda`; for `auto` also DLP's α in `auto_dlp_alphas`, AlphaPruning's ε in
   `auto_alphapruning_epsilons`, ATP's β in `auto_atp_betas`, each family's configured knob added) is pruned
   *cheaply* with Wanda scores |W|·‖X_j‖₂ from those kept norms (|W| for magnitude; the Wanda proxy also stands in
   for SparseGPT): no statistics forward, one full-model forward on the held-out windows (separate ones: only the
   first `ceil(auto_holdout · num_samples)`, as many as holding out would take). Candidates with the same
   per-block sparsities share one score; along each knob (ascending) a sequence (OWL: one per M) stops after two
   values in a row that do not improve its best loss. `auto` searches OWL by coordinates: λ along the configured
   M, then the other Ms at the best λ (about 7 instead of about 19 candidates on SmolLM2); then, with
   `auto_attention_shifts`, the best setting so far with each attention shift. (Norms from the *dense* pass ranked
   candidates poorly on stories260K: a pruned prefix changes the inputs of later blocks.)
5. **Exact check**: the `auto_finalists` best candidates of the screening (`auto`: the best of as many different
   families) are pruned for real and scored again (also OWL with the configured `owl_m`, `owl_lambda`: with
   SparseGPT always, with `auto` when it screened better than uniform). A finalist replaces uniform sparsity only if
   its held-out loss is lower by more than `MIN_GAIN_SE` (2) standard errors of the mean paired difference
   (`beats_uniform`); the lowest loss among such finalists wins, else uniform. The paired samples are chunks of `CHUNK_TOKENS` (32) consecutive predicted tokens
   (`chunk_losses`), not whole windows: with 16 calibration windows only 2–4 are held out, and a standard error
   from 2–4 window differences is itself so noisy that a real gain rarely clears two of them (the search turned
   timid exactly when calibration data is small; 4 held-out windows of 256 tokens were still too few, whence the
   separate windows of step 1). Chunks give dozens of paired samples from the same tokens; they are long enough that
   neighbouring chunks' differences are nearly independent (docs/quality.md has the numbers).
   So the choice is never worse than uniform *on the held-out tokens* beyond their noise.
6. **The winner**: with separate held-out windows (`keep`) the winner as it was scored is the result, pruned from
   every calibration window exactly as a direct run with the chosen setting prunes it (the best screened finalist
   is checked last; any other winner is rebuilt: from its packed masks with a mask-only criterion, else pruned once
   more, to the same weights). With held-out calibration windows (`holdout.refit`) it is pruned once more from the
   dense weights on *all* calibration windows, the held-out ones included, which again is exactly what a direct run
   with the chosen setting gives on the same data (`layerwise="uniform"`, or `"owl"` with the chosen M and λ, whose
   outlier ratios then also count the held-out windows), so choosing uniform costs no calibration data.

Between candidates the dense weights are restored from a CPU copy of the prunable weights (extra host memory;
`snapshots`), and a mask-only criterion's best finalist so far is kept as packed masks (1 bit per weight).

Cost, in block forwards over the calibration windows (L blocks, held-out windows h times as many tokens as the
calibration windows, K screened candidates, F = 1 + `auto_finalists` exact candidates, one more for `auto`'s
configured OWL): with separate held-out windows L for the outlier pass, K·a·L for screening (one full-model forward
on the first windows each, a = `auto_holdout`), F·(2L−1) + F·h·L for the exact candidates and their scores, and at
most 2L−1 to prune the winner again (none with a mask-only criterion); with held-out calibration windows
(fraction h) (1−h)·L, K·h·L, F·(1−h)(2L−1) + F·h·L and h·L + 2L−1 for the refit.
One exact OWL run costs 3L−1; `bench/prune_speed.py --variants owl_wanda_exact owl_wanda_auto wanda_auto` measures
the ratios (docs/benchmarks.md). AlphaPruning's spectra (one SVD per matrix) cost no forward.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...algorithms.allocation import BlockPlan
from ...algorithms.criteria import keep_mask
from ...algorithms.masks import apply_keep_mask_
from ..passes import (
    RunState,
    block_esd_alphas,
    block_outlier_ratios,
    each_block,
    family_plans,
    plan,
    prune_pass,
    split_plans,
    uniform,
)
from ..report import Candidate
from .holdout import holdout_count, refit
from .scoring import (
    beats_uniform,
    chunk_losses,
    gain_z,
    holdout_loss,
)
from .snapshots import pack_masks, restore, restore_masked, snapshot

logger = logging.getLogger(__name__)

# Along an ascending knob, stop a sequence after this many values in a row that do not improve its best screening loss.
PATIENCE = 2
SCREEN_SUFFIX = ", screened"
# The families `layerwise="auto"` can search, and the knob that names each one's candidates.
KNOBS = {"owl": ("owl_m", "owl_lambda"), "dlp": ("dlp_alpha",), "alphapruning": ("alphapruning_epsilon",),
         "atp": ("atp_beta",)}
# `auto_atp_betas=None`: β = spread / (L − 1) for these total spreads of the block sparsities over the depth.
ATP_SPREADS = (0.08, 0.16, 0.24, 0.32)


def _screen_prune(state: RunState, plans: Sequence[BlockPlan], norms: list[dict[str, torch.Tensor]]) -> None:
    """Prune the (dense) model to `plans` from fixed per-unit input norms with the criterion's cheap proxy
    (`Criterion.screen`): no statistics forward."""
    criterion, cfg = state.criterion, state.config

    def visit(i: int) -> None:
        for u in state.units[i]:
            w = u.weight()
            scores, group = criterion.screen(w, norms[i].get(u.name), cfg)
            apply_keep_mask_(w, keep_mask(scores, plans[i].sparsity_for(u.group), plans[i].nm, group))

    each_block(state, visit)


def _plan_key(plans: Sequence[BlockPlan]) -> tuple:
    return tuple((round(p.sparsity, 9), p.nm, p.split) for p in plans)


@dataclass
class _Option:
    """One candidate allocation: its family, knob values and per-block plans; `loss` once screened."""

    family: str
    knob: dict[str, float]
    plans: list[BlockPlan]
    loss: float = math.nan
    metrics: list[float] | None = None  # the block metric the plans came from (OWL: outlier ratios at its M)

    @property
    def sort_key(self) -> tuple:
        return (self.loss, self.family, tuple(self.knob.values()))

    def candidate(self, loss: float, chosen: bool = False, screened: bool = False, **stats: float | None) -> Candidate:
        layerwise = self.family + (SCREEN_SUFFIX if screened else "")
        return Candidate(
            layerwise, self.knob.get("owl_m"), self.knob.get("owl_lambda"), loss, chosen,
            family=self.family, knob=dict(self.knob), **stats,
        )


def _atp_betas(state: RunState, num_blocks: int) -> list[float]:
    cfg = state.config
    if cfg.auto_atp_betas is not None:
        betas = list(cfg.auto_atp_betas)
    else:
        betas = [round(d / max(num_blocks - 1, 1), 6) for d in ATP_SPREADS]
    return sorted(set(betas) | {float(cfg.atp_beta)})


def _sequences(state: RunState, families: Sequence[str], wide: bool) -> list:
    """The candidates of each family, as sequences along an ascending knob (screened with early stopping). A
    sequence may be a function of the candidates screened before it (`auto`'s second OWL stage)."""
    cfg = state.config
    n = len(state.blocks)
    out: list = []
    if "owl" in families:
        ms = sorted(set(cfg.auto_owl_ms) | {float(cfg.owl_m)})
        lambdas = sorted(set(cfg.auto_owl_lambdas) | {float(cfg.owl_lambda)})
        per_block: list[list[float]] = []  # dense weights, cached dense statistics: no forward
        each_block(state, lambda i: per_block.append(block_outlier_ratios(state.units[i], state.dense_stats[i], ms)))

        def owl(m: float, lam: float) -> _Option:
            ratios = [per_block[i][ms.index(m)] for i in range(n)]
            plans = plan(state, ratios, owl_lambda=lam, record=False)
            return _Option("owl", {"owl_m": m, "owl_lambda": lam}, plans, metrics=ratios)

        if not wide:  # owl-auto: every M along λ
            out += [[owl(m, lam) for lam in lambdas] for m in ms]
        else:  # auto: λ along the configured M, then the other Ms at its best λ (a coordinate search, fewer forwards)
            out.append([owl(float(cfg.owl_m), lam) for lam in lambdas])

            def other_ms(done: list[_Option]) -> list[_Option]:
                best = min((o for o in done if o.family == "owl"), key=lambda o: o.sort_key).knob["owl_lambda"]
                return [owl(m, best) for m in ms if m != float(cfg.owl_m)]

            out.append(other_ms)
    grids = {
        "dlp": ("dlp_alpha", sorted(set(cfg.auto_dlp_alphas) | {float(cfg.dlp_alpha)})),
        "alphapruning": (
            "alphapruning_epsilon", sorted(set(cfg.auto_alphapruning_epsilons) | {float(cfg.alphapruning_epsilon)})
        ),
        "atp": ("atp_beta", _atp_betas(state, n)),
    }
    metrics = {"dlp": state.mean_scores, "alphapruning": None, "atp": None}
    if "alphapruning" in families:
        metrics["alphapruning"] = block_esd_alphas(state)
    for family in ("dlp", "alphapruning", "atp"):
        if family not in families:
            continue
        name, values = grids[family]
        out.append([
            _Option(family, {name: v}, family_plans(state, family, metrics[family], v, record=False),
                    metrics=metrics[family])
            for v in values
        ])
    return out


def choose_and_prune(state: RunState) -> list[BlockPlan]:
    """Search the allocation on the held-out windows, prune the model in place with the winner.

    `owl-auto`: uniform or OWL with (M, λ); `auto`: uniform or any family of `auto_families` with its knob grid.
    Needs `split_holdout` and the outlier pass to have run (`state.holdout_ids`, `state.dense_stats`).
    Appends every candidate tried to `state.candidates` and returns the winner's per-block plans.
    """
    cfg = state.config
    if state.holdout_ids is None or not state.dense_stats:
        raise RuntimeError("choose_and_prune needs split_holdout and the outlier pass to have run first.")
    wide = cfg.layerwise == "auto"
    families = list(cfg.auto_families) if wide else ["owl"]
    model, hold, bs = state.model, state.holdout_ids, cfg.batch_size
    # the screening scores on as many windows as holding out would take (its cost does not grow with
    # `auto_holdout_tokens`); only the exact check, which decides, scores on every held-out window
    screen_ids = hold
    if state.holdout_separate:
        screen_ids = hold[: holdout_count(int(state.calibration_ids.shape[0]), cfg.auto_holdout)]
    start = time.perf_counter()
    dense = snapshot(state)
    base = _Option("uniform", {}, uniform(state))
    sequences = _sequences(state, families, wide)

    # ---- exact uniform first: the baseline, and the pruned-prefix input norms that the screening reuses
    norms: list[dict[str, torch.Tensor]] = []
    prune_pass(state, base.plans, record_norms=norms)
    uniform_chunks = chunk_losses(model, hold, bs)
    # a mask-only criterion's best finalist so far is kept as packed masks: the winner needs no second prune
    masks_only = state.holdout_separate and not state.criterion.updates_weights
    best_masks = pack_masks(state) if masks_only else None
    state.timings["auto_exact"] = time.perf_counter() - start

    # ---- screening: cheap prune from the uniform run's input norms, full-model loss on the held-out windows
    t = time.perf_counter()
    seen: dict[tuple, float] = {}
    screened: list[_Option] = []

    def screen(option: _Option) -> float:
        key = _plan_key(option.plans)
        if key not in seen:
            restore(state, dense)
            _screen_prune(state, option.plans, norms)
            seen[key] = holdout_loss(model, screen_ids, bs)
        option.loss = seen[key]
        screened.append(option)
        return option.loss

    screen(base)
    for sequence in sequences:
        best, stale = math.inf, 0
        for option in sequence(screened) if callable(sequence) else sequence:
            loss = screen(option)
            if loss < best - 1e-12:
                best, stale = loss, 0
            else:
                stale += 1
                if stale >= PATIENCE:
                    break
    if wide and cfg.auto_attention_shifts:  # below the block: the best setting again with each attention shift
        best = min(screened, key=lambda o: o.sort_key)
        for d in cfg.auto_attention_shifts:
            screen(_Option(best.family, {**best.knob, "attention_shift": d}, split_plans(state, best.plans, d),
                           metrics=best.metrics))
    state.timings["auto_screen"] = time.perf_counter() - t

    # ---- exact check of the best candidates of the screening
    t = time.perf_counter()
    finalists = [base] + _finalists(state, screened, base, wide)
    if state.holdout_separate:  # the best screened last: when it wins, the model as it stands is the result
        finalists[1:] = finalists[:0:-1]
    exact_chunks = [uniform_chunks]
    best_index = 0
    for j in range(1, len(finalists)):
        restore(state, dense)
        prune_pass(state, finalists[j].plans)
        chunks = chunk_losses(model, hold, bs)
        exact_chunks.append(chunks)
        if float(chunks.mean()) < float(exact_chunks[best_index].mean()) - 1e-12 and beats_uniform(chunks, uniform_chunks):
            best_index = j
            if masks_only and j < len(finalists) - 1:
                best_masks = pack_masks(state)
    state.timings["auto_exact"] += time.perf_counter() - t

    # ---- report, then the winner once more on every window
    per_window = exact_chunks[0].numel() // hold.shape[0]
    for option in screened:
        state.candidates.append(option.candidate(option.loss, screened=True))
    for j, option in enumerate(finalists):
        chunks = exact_chunks[j]
        z_window = None
        if j and chunks.numel() == per_window * hold.shape[0]:
            windows = lambda c: c.reshape(hold.shape[0], per_window).mean(dim=1)  # noqa: E731
            z_window = _finite(gain_z(windows(chunks), windows(uniform_chunks)))
        state.candidates.append(
            option.candidate(
                float(chunks.mean()), chosen=j == best_index,
                gain_z=None if j == 0 else _finite(gain_z(chunks, uniform_chunks)), window_z=z_window,
            )
        )
    winner = finalists[best_index]
    if state.holdout_separate:  # the model scored is the result (rebuilt when it is not the last one pruned)
        last = best_index == len(finalists) - 1
        plans_w = keep(state, winner, None if last else dense, None if last else best_masks)
        dense.clear()
    else:
        restore(state, dense)
        dense.clear()  # free the copy before the refit
        plans_w = refit(state, winner.family, winner.knob)
    logger.info("%s chose %s (held-out loss %.4f; uniform %.4f) after %d screened and %d exact candidates",
                cfg.layerwise, winner.candidate(math.nan).setting, float(exact_chunks[best_index].mean()),
                float(exact_chunks[0].mean()), len(screened), len(finalists))
    return plans_w


def _finite(z: float) -> float | None:
    """A z statistic for the report: rounded, None when infinite (a gain with no spread at all)."""
    return round(z, 4) if math.isfinite(z) else None


def _finalists(state: RunState, screened: list[_Option], base: _Option, wide: bool) -> list[_Option]:
    """Non-uniform candidates checked exactly.

    `owl-auto`: the `auto_finalists` best screened OWL settings (SparseGPT: also the configured (M, λ), which the
    Wanda proxy can misjudge at high sparsity). `auto`: the best screened setting of each of the `auto_finalists`
    best families, and OWL with the configured (paper) `owl_m`, `owl_lambda` when it screened better than uniform
    (always with SparseGPT).
    """
    cfg = state.config
    keys = {_plan_key(base.plans)}
    out: list[_Option] = []
    families_taken: set[str] = set()
    for option in sorted((o for o in screened if o.family != "uniform" or o.knob), key=lambda o: o.sort_key):
        if len(out) >= cfg.auto_finalists:
            break
        key = _plan_key(option.plans)
        if key in keys or (wide and option.family in families_taken):
            continue
        keys.add(key)
        families_taken.add(option.family)
        out.append(option)
    configured = {"owl_m": float(cfg.owl_m), "owl_lambda": float(cfg.owl_lambda)}
    prior = next((o for o in screened if o.family == "owl" and o.knob == configured), None)
    if prior is None and state.criterion.updates_weights and (wide and "owl" in cfg.auto_families or not wide):
        ratios = list(state.outlier_ratios or [])
        prior = _Option("owl", configured, plan(state, ratios, record=False), metrics=ratios)  # not screened
    # The screening prunes with a mask-only proxy, which can misjudge a criterion that reconstructs the kept weights
    # (SparseGPT) at high sparsity: there the configured OWL setting is always checked exactly. `auto` also checks it
    # exactly whenever it screened better than uniform, so that it is held to OWL's configured (paper) setting too.
    if prior is not None and (state.criterion.updates_weights or (wide and prior.loss < base.loss)):
        if _plan_key(prior.plans) not in keys:
            out.append(prior)
    return out


def keep(
    state: RunState, winner: _Option, dense: list[list[torch.Tensor]] | None, masks: list[list[torch.Tensor]] | None
) -> list[BlockPlan]:
    """The winner scored on windows beyond the calibration windows is the result: its plans were made from every
    calibration window, as a direct run with the chosen setting makes them. Records what such a run records (outlier
    ratios, block metric, a clamping warning). With `dense` (the winner was not the last candidate pruned) the
    weights it was scored with are rebuilt: from `masks` (its packed masks, a mask-only criterion), else by pruning
    it again from the dense weights, which gives the same weights."""
    t = time.perf_counter()
    family, knob = winner.family, winner.knob
    metrics = None if winner.metrics is None else list(winner.metrics)
    state.block_metrics = None
    if family == "uniform":
        state.outlier_ratios = None
        plans = uniform(state)
    elif family == "owl":
        state.outlier_ratios = metrics
        plans = plan(state, metrics or [], owl_lambda=knob["owl_lambda"])  # records a clamping warning, if any
    else:
        if family != "dlp":
            state.outlier_ratios = None  # a direct AlphaPruning or ATP run has no outlier pass
        state.block_metrics = metrics
        plans = family_plans(state, family, metrics, next(v for k, v in knob.items() if k != "attention_shift"))
    if "attention_shift" in knob:
        plans = split_plans(state, plans, knob["attention_shift"])
    if _plan_key(plans) != _plan_key(winner.plans):
        raise RuntimeError(f"the {family} plans made again differ from the ones scored; please report this.")
    if dense is not None and masks is not None:
        restore_masked(state, dense, masks)
    elif dense is not None:
        restore(state, dense)
        prune_pass(state, plans)
    state.timings["auto_keep"] = time.perf_counter() - t
    return plans
