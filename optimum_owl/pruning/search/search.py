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

The families, their knobs and grids come from the family registry (`optimum_owl.algorithms.families`: `Family.grid`,
`Family.inputs`); the search's own state (scoring windows, candidates) is a `state.SearchState`. Report timings:
`auto_setup` (dense copy, block metrics, plans), `auto_exact`, `auto_screen`, then `auto_keep` or `auto_refit`; the
prune passes run inside them appear as `auto_exact/prune_pass` etc., parts of those phases (never counted twice).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product

import torch
from tqdm.auto import tqdm

from ...algorithms.allocation import BlockPlan
from ...algorithms.criteria import keep_mask
from ...algorithms.families import UNIFORM, Family, family_names, get_family
from ...algorithms.masks import apply_keep_mask_
from ..passes import (
    Applied,
    RunState,
    block_outlier_ratios,
    block_weight_metrics,
    each_block,
    family_plans,
    prune_pass,
    split_plans,
    uniform,
)
from ..report import Candidate
from .holdout import refit
from .scoring import (
    beats_uniform,
    chunk_losses,
    gain_z,
    holdout_loss,
)
from .snapshots import pack_masks, restore, restore_masked, snapshot
from .state import SearchState
from .windows import holdout_count

logger = logging.getLogger(__name__)

# Along an ascending knob, stop a sequence after this many values in a row that do not improve its best screening loss.
PATIENCE = 2
SCREEN_SUFFIX = ", screened"


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


Options = Callable[[Family, dict[str, float]], _Option]


@dataclass
class _Sequence:
    """Candidates screened along one ascending knob (with early stopping); `make(screened so far)` gives them, at
    most `size` (the progress bar's total)."""

    size: int
    make: Callable[[list[_Option]], list[_Option]]


def _options(state: RunState, families: list[Family], grids: dict[str, dict[str, list[float]]]) -> Options:
    """`option(family, knob)`: the candidate with its plans and block metric. Every metric is taken here, once, on
    the dense weights and the outlier pass's statistics: outlier ratios for every M of the grids at once (no forward),
    the weights' metrics (AlphaPruning's spectra), the outlier pass's mean scores."""
    cfg = state.config
    ms = sorted({float(m) for f in families if f.inputs == "outlier_ratios"
                 for m in grids[f.name].get("owl_m", [cfg.owl_m])})
    per_block: list[list[float]] = []  # dense weights, cached dense statistics: no forward
    if ms:
        each_block(state, lambda i: per_block.append(block_outlier_ratios(state.units[i], state.dense_stats[i], ms)))
    weight_metrics = {f.name: block_weight_metrics(state, f.weight_metric) for f in families if f.inputs == "weights"}

    def option(family: Family, knob: dict[str, float]) -> _Option:
        if family.inputs == "outlier_ratios":
            column = ms.index(float(knob.get("owl_m", cfg.owl_m)))
            metrics = [row[column] for row in per_block]
        else:
            metrics = state.mean_scores if family.inputs == "mean_scores" else weight_metrics.get(family.name)
        return _Option(family.name, knob, family_plans(state, family.name, metrics, knob, record=False), metrics=metrics)

    return option


def _sequences(state: RunState, search: SearchState) -> tuple[list[_Sequence], Options]:
    """The candidates of each searched family (registration order), as sequences along an ascending knob: the last
    of its `knobs`; `owl-auto` takes every setting of the others, `auto` goes by coordinates (the last knob at the
    configured others, then each other knob at the best setting screened so far: a function of the candidates
    screened before it)."""
    cfg, n = state.config, len(state.blocks)
    families = [get_family(name) for name in family_names() if name in search.families]
    grids = {f.name: f.grid(cfg, n) for f in families}
    option = _options(state, families, grids)
    out: list[_Sequence] = []
    for family in families:
        *outer, (last, values) = grids[family.name].items()
        if not outer or not search.wide:
            for combo in product(*(vs for _, vs in outer)):
                fixed = dict(zip((k for k, _ in outer), combo))
                options = [option(family, {**fixed, last: v}) for v in values]
                out.append(_Sequence(len(options), lambda done, options=options: options))
            continue
        configured = {k: float(getattr(cfg, k)) for k, _ in outer}
        options = [option(family, {**configured, last: v}) for v in values]
        out.append(_Sequence(len(options), lambda done, options=options: options))
        for name, vs in reversed(outer):

            def along(done: list[_Option], family: Family = family, name: str = name, vs: list[float] = vs) -> list[_Option]:
                best = min((o for o in done if o.family == family.name), key=lambda o: o.sort_key).knob
                return [option(family, {**best, name: v}) for v in vs if v != best[name]]

            out.append(_Sequence(len(vs) - 1, along))
    return out, option


def choose_and_prune(state: RunState, search: SearchState) -> Applied:
    """Search the allocation on the held-out windows, prune the model in place with the winner.

    `owl-auto`: uniform or OWL with (M, λ); `auto`: uniform or any family of `auto_families` with its knob grid.
    Needs `split_holdout` and the outlier pass to have run (`search.ids`, `state.dense_stats`).
    Appends every candidate tried to `search.candidates` and returns the winner as applied.
    """
    cfg = state.config
    if search.ids is None or not state.dense_stats:
        raise RuntimeError("choose_and_prune needs split_holdout and the outlier pass to have run first.")
    model, hold, bs = state.model, search.ids, cfg.batch_size
    # the screening scores on as many windows as holding out would take (its cost does not grow with
    # `auto_holdout_tokens`); only the exact check, which decides, scores on every held-out window
    screen_ids = hold
    if search.separate:
        screen_ids = hold[: holdout_count(int(state.calibration_ids.shape[0]), cfg.auto_holdout)]
    with state.phase("auto_setup"):  # dense copy, every candidate's block metric and plans
        dense = snapshot(state)
        base = _Option(UNIFORM, {}, uniform(state))
        sequences, option = _sequences(state, search)

    # ---- exact uniform first: the baseline, and the pruned-prefix input norms that the screening reuses
    with state.phase("auto_exact"):
        norms: list[dict[str, torch.Tensor]] = []
        prune_pass(state, base.plans, record_norms=norms)
        uniform_chunks = chunk_losses(model, hold, bs)
        # a mask-only criterion's best finalist so far is kept as packed masks: the winner needs no second prune
        masks_only = search.separate and not state.criterion.updates_weights
        best_masks = pack_masks(state) if masks_only else None

    # ---- screening: cheap prune from the uniform run's input norms, full-model loss on the held-out windows
    shifts = list(cfg.auto_attention_shifts or []) if search.wide else []
    bound = 1 + sum(s.size for s in sequences) + len(shifts)  # early stopping usually ends below it
    with state.phase("auto_screen"), tqdm(total=bound, desc=f"{search.layerwise} screening", unit="candidate",
                                          leave=False) as bar:
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
            bar.update()
            return option.loss

        screen(base)
        for sequence in sequences:
            best, stale = math.inf, 0
            for candidate in sequence.make(screened):
                loss = screen(candidate)
                if loss < best - 1e-12:
                    best, stale = loss, 0
                else:
                    stale += 1
                    if stale >= PATIENCE:
                        break
        if shifts:  # below the block: the best setting again with each attention shift
            best_option = min(screened, key=lambda o: o.sort_key)
            for d in shifts:
                screen(_Option(best_option.family, {**best_option.knob, "attention_shift": d},
                               split_plans(state, best_option.plans, d), metrics=best_option.metrics))

    # ---- exact check of the best candidates of the screening
    with state.phase("auto_exact"):
        finalists = [base] + _finalists(state, search, screened, base, option)
        if search.separate:  # the best screened last: when it wins, the model as it stands is the result
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

    # ---- report, then the winner once more on every window
    per_window = exact_chunks[0].numel() // hold.shape[0]
    for screened_option in screened:
        search.candidates.append(screened_option.candidate(screened_option.loss, screened=True))
    for j, finalist in enumerate(finalists):
        chunks = exact_chunks[j]
        z_window = None
        if j and chunks.numel() == per_window * hold.shape[0]:
            windows = lambda c: c.reshape(hold.shape[0], per_window).mean(dim=1)  # noqa: E731
            z_window = _finite(gain_z(windows(chunks), windows(uniform_chunks)))
        search.candidates.append(
            finalist.candidate(
                float(chunks.mean()), chosen=j == best_index,
                gain_z=None if j == 0 else _finite(gain_z(chunks, uniform_chunks)), window_z=z_window,
            )
        )
    winner = finalists[best_index]
    if search.separate:  # the model scored is the result (rebuilt when it is not the last one pruned)
        last = best_index == len(finalists) - 1
        applied = keep(state, winner, None if last else dense, None if last else best_masks)
        dense.clear()
    else:
        restore(state, dense)
        dense.clear()  # free the copy before the refit
        applied = refit(state, search, winner.family, winner.knob)
    logger.info("%s chose %s (held-out loss %.4f; uniform %.4f) after %d screened and %d exact candidates",
                search.layerwise, winner.candidate(math.nan).setting, float(exact_chunks[best_index].mean()),
                float(exact_chunks[0].mean()), len(screened), len(finalists))
    return applied


def _finite(z: float) -> float | None:
    """A z statistic for the report: rounded, None when infinite (a gain with no spread at all)."""
    return round(z, 4) if math.isfinite(z) else None


def _finalists(
    state: RunState, search: SearchState, screened: list[_Option], base: _Option, option: Options
) -> list[_Option]:
    """Non-uniform candidates checked exactly.

    `owl-auto`: the `auto_finalists` best screened OWL settings (SparseGPT: also the configured (M, λ), which the
    Wanda proxy can misjudge at high sparsity). `auto`: the best screened setting of each of the `auto_finalists`
    best families, and OWL with the configured (paper) `owl_m`, `owl_lambda` when it screened better than uniform
    (always with SparseGPT): the configured knob of every searched family with `check_configured`.
    """
    cfg, wide = state.config, search.wide
    keys = {_plan_key(base.plans)}
    out: list[_Option] = []
    families_taken: set[str] = set()
    for candidate in sorted((o for o in screened if o.family != UNIFORM or o.knob), key=lambda o: o.sort_key):
        if len(out) >= cfg.auto_finalists:
            break
        key = _plan_key(candidate.plans)
        if key in keys or (wide and candidate.family in families_taken):
            continue
        keys.add(key)
        families_taken.add(candidate.family)
        out.append(candidate)
    # The screening prunes with a mask-only proxy, which can misjudge a criterion that reconstructs the kept weights
    # (SparseGPT) at high sparsity: there the configured setting is always checked exactly. `auto` also checks it
    # exactly whenever it screened better than uniform, so that it is held to OWL's configured (paper) setting too.
    for name in family_names():
        family = get_family(name)
        if name not in search.families or not family.check_configured:
            continue
        configured = {k: float(getattr(cfg, k)) for k in family.knobs}
        prior = next((o for o in screened if o.family == name and o.knob == configured), None)
        if prior is None and state.criterion.updates_weights:
            prior = option(family, configured)  # not screened
        if prior is not None and (state.criterion.updates_weights or (wide and prior.loss < base.loss)):
            if _plan_key(prior.plans) not in keys:
                keys.add(_plan_key(prior.plans))
                out.append(prior)
    return out


def keep(
    state: RunState, winner: _Option, dense: list[list[torch.Tensor]] | None, masks: list[list[torch.Tensor]] | None
) -> Applied:
    """The winner scored on windows beyond the calibration windows is the result: its plans were made from every
    calibration window, as a direct run with the chosen setting makes them. Records what such a run records (block
    metric, a clamping warning). With `dense` (the winner was not the last candidate pruned) the weights it was scored
    with are rebuilt: from `masks` (its packed masks, a mask-only criterion), else by pruning it again from the dense
    weights, which gives the same weights."""
    family, knob = winner.family, winner.knob
    metrics = None if winner.metrics is None else list(winner.metrics)
    with state.phase("auto_keep"):
        plans = family_plans(state, family, metrics, knob)  # records a clamping warning, if any
        if "attention_shift" in knob:
            plans = split_plans(state, plans, knob["attention_shift"])
        if _plan_key(plans) != _plan_key(winner.plans):
            raise RuntimeError(f"the {family} plans made again differ from the ones scored; please report this.")
        if dense is not None and masks is not None:
            restore_masked(state, dense, masks)
        elif dense is not None:
            restore(state, dense)
            prune_pass(state, plans)
    return Applied(family, dict(knob), plans, metrics)
