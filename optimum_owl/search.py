"""`layerwise="owl-auto"`: choose OWL's (M, λ), or uniform sparsity, by the loss on held-out calibration windows.

The paper's M=5, λ=0.08 were tuned on LLaMA-7B at 70%; other models and sparsities want other values, and OWL with
the wrong ones can be worse than uniform sparsity. The search here is bounded and reuses everything that does not
depend on the candidate:

1. **Hold-out** (`split_holdout`, before the outlier pass): the last `ceil(auto_holdout · num_samples)` calibration
   windows are set aside; statistics, outlier ratios and pruning only ever see the others.
2. **Outlier ratios for every M at once** from the dense statistics already collected by the outlier pass
   (`passes.block_outlier_ratios`; no forward).
3. **Uniform, exactly**: the baseline is pruned for real (`method`, sequential propagation, DSnoT if configured)
   and scored by the full model's next-token loss on the held-out windows. Its statistics pass also gives, per
   unit, the input norms ‖X_j‖₂ seen behind a *pruned* prefix; they are kept (a vector per unit).
4. **Screening**: every candidate (uniform, and each (M, λ) of `auto_owl_ms × auto_owl_lambdas`, plus the
   configured `owl_m`, `owl_lambda`) is pruned *cheaply* with Wanda scores |W|·‖X_j‖₂ from those kept norms (|W|
   for magnitude; the Wanda proxy also stands in for SparseGPT): no statistics forward, one full-model forward on
   the held-out windows. Candidates with the same per-block sparsities share one score; along λ (ascending) a
   value of M stops after two λ in a row that do not improve its best loss. (Norms from the *dense* pass were
   tried first and ranked candidates poorly on stories260K: a pruned prefix changes the inputs of later blocks.)
5. **Exact check**: the `auto_finalists` best OWL candidates of the screening are pruned for real and scored
   again, window by window. An OWL finalist replaces uniform sparsity only if its held-out loss is lower by more
   than `MIN_GAIN_SE` (2) standard errors of the mean per-window difference (`beats_uniform`); the lowest loss among
   such finalists wins, else uniform. So the choice is never worse than uniform *on the held-out windows*, and a
   gain inside their noise does not switch OWL on.
6. **Refit** (`refit`): the winner is pruned once more from the dense weights on *all* calibration windows, the
   held-out ones included (they were only needed to choose). The result is exactly what a direct run with the
   chosen setting gives on the same data (`layerwise="uniform"`, or `"owl"` with the chosen M and λ, whose outlier
   ratios then also count the held-out windows), so choosing uniform costs no calibration data.

Between candidates the dense weights are restored from a CPU copy of the prunable weights (extra host memory: one
copy of the prunable weights).

Cost, in block forwards over the calibration windows (L blocks, held-out fraction h, K screened candidates, F = 1 +
`auto_finalists` exact candidates): (1−h)·L for the outlier pass, K·h·L for screening (one full-model forward on the
held-out windows each), F·(1−h)(2L−1) + F·h·L for the exact candidates and their scores, h·L + 2L−1 for the refit.
One exact OWL run costs 3L−1; `bench/prune_speed.py --variants owl_wanda_exact owl_wanda_auto` measures the ratio
(docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .allocation import BlockPlan
from .criteria import keep_mask
from .errors import OWLConfigError
from .masks import apply_keep_mask_
from .passes import RunState, block_outlier_ratios, each_block, holdout_ratios, plan, prune_pass, uniform
from .report import Candidate
from .runner import module_device

logger = logging.getLogger(__name__)

# Along ascending λ, stop a value of M after this many λ in a row that do not improve its best screening loss.
PATIENCE = 2
SCREEN_SUFFIX = ", screened"
# OWL replaces uniform sparsity only when its held-out loss is lower by more than this many standard errors of the
# per-window paired difference (about 95% one-sided confidence with 8 windows): a gain within the noise of a few
# held-out windows does not carry over to other text.
MIN_GAIN_SE = 2.0


def holdout_count(num_samples: int, fraction: float) -> int:
    """Windows held out of `num_samples` for a fraction: `ceil(fraction · num_samples)`, at least 1."""
    return max(1, math.ceil(fraction * num_samples - 1e-9))


def split_holdout(state: RunState) -> None:
    """Set the last windows of the calibration data aside (`state.holdout_ids`); re-capture block 0's inputs
    from the others only, so that no statistic ever sees a held-out window."""
    cfg = state.config
    head = state.model.get_output_embeddings() if hasattr(state.model, "get_output_embeddings") else None
    if head is None:
        raise OWLConfigError(
            "`layerwise='owl-auto'` scores candidates by the next-token loss, so it needs a model with a language-"
            f"modelling head; {type(state.model).__name__} has none. Use layerwise='owl' or 'uniform'."
        )
    ids = state.calibration_ids
    if ids is None:
        raise RuntimeError("split_holdout needs the calibration ids (call after the calibration data is captured).")
    n = int(ids.shape[0])
    k = holdout_count(n, cfg.auto_holdout)
    if n - k < 1:
        raise OWLConfigError(
            f"`layerwise='owl-auto'` holds out {k} of the {n} calibration windows (`auto_holdout`={cfg.auto_holdout}) "
            "and none would be left for the statistics; raise `num_samples` (at least 2, 16 or more is better)."
        )
    state.holdout_ids = ids[n - k :].clone()
    state.calibration_ids = ids[: n - k]
    t = time.perf_counter()
    state.inputs0 = state.runner.capture(state.calibration_ids, cfg.batch_size)
    state.add_time("capture", t)
    logger.info("owl-auto: %d calibration windows for statistics, %d held out for scoring", n - k, k)


@torch.no_grad()
def window_losses(model: nn.Module, ids: torch.LongTensor, batch_size: int) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token) of the full model on each window of `ids` (float64, [n])."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = module_device(emb) if emb is not None else module_device(model)
    out: list[float] = []
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        targets = batch[:, 1:].to(logits.device)
        for row in range(batch.shape[0]):  # one window at a time keeps the fp32 logits small
            out.append(float(F.cross_entropy(logits[row, :-1].float(), targets[row])))
    return torch.tensor(out, dtype=torch.float64)


def holdout_loss(model: nn.Module, ids: torch.LongTensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats per token) of the full model on the windows `ids` (all of one length)."""
    return float(window_losses(model, ids, batch_size).mean())


def beats_uniform(candidate: torch.Tensor, uniform: torch.Tensor, z: float = MIN_GAIN_SE) -> bool:
    """Whether per-window losses `candidate` are lower than `uniform`'s by more than `z` standard errors of the
    mean paired difference (plain "lower on average" when there is one window)."""
    diff = (uniform - candidate).reshape(-1)
    gain = float(diff.mean())
    se = float(diff.std()) / math.sqrt(diff.numel()) if diff.numel() > 1 else 0.0
    return gain > 0.0 and gain > z * se


def _snapshot(state: RunState) -> list[list[torch.Tensor]]:
    out: list[list[torch.Tensor]] = []
    each_block(state, lambda i: out.append([u.weight().detach().to("cpu", copy=True) for u in state.units[i]]))
    return out


def _restore(state: RunState, saved: list[list[torch.Tensor]]) -> None:
    def visit(i: int) -> None:
        for u, w in zip(state.units[i], saved[i]):
            target = u.weight()
            target.copy_(w.to(target.device, target.dtype))

    each_block(state, visit)


def _screen_prune(state: RunState, plans: Sequence[BlockPlan], norms: list[dict[str, torch.Tensor]]) -> None:
    """Prune the (dense) model to `plans` from fixed per-unit input norms with the criterion's cheap proxy
    (`Criterion.screen`): no statistics forward."""
    criterion, cfg = state.criterion, state.config

    def visit(i: int) -> None:
        for u in state.units[i]:
            w = u.weight()
            scores, group = criterion.screen(w, norms[i].get(u.name), cfg)
            apply_keep_mask_(w, keep_mask(scores, plans[i].sparsity, plans[i].nm, group))

    each_block(state, visit)


def _plan_key(plans: Sequence[BlockPlan]) -> tuple:
    return tuple((round(p.sparsity, 9), p.nm) for p in plans)


def choose_and_prune(state: RunState) -> list[BlockPlan]:
    """Search (uniform | OWL with (M, λ)) on the held-out windows, prune the model in place with the winner.

    Needs `split_holdout` and the outlier pass to have run (`state.holdout_ids`, `state.dense_stats`).
    Appends every candidate tried to `state.candidates` and returns the winner's per-block plans.
    """
    cfg = state.config
    if state.holdout_ids is None or not state.dense_stats:
        raise RuntimeError("choose_and_prune needs split_holdout and the outlier pass to have run first.")
    n = len(state.blocks)
    model, hold, bs = state.model, state.holdout_ids, cfg.batch_size
    start = time.perf_counter()
    dense = _snapshot(state)

    ms = sorted(set(cfg.auto_owl_ms) | {float(cfg.owl_m)})
    lambdas = sorted(set(cfg.auto_owl_lambdas) | {float(cfg.owl_lambda)})
    per_block: list[list[float]] = []  # dense weights, cached dense statistics: no forward
    each_block(state, lambda i: per_block.append(block_outlier_ratios(state.units[i], state.dense_stats[i], ms)))
    ratios = {m: [per_block[i][k] for i in range(n)] for k, m in enumerate(ms)}
    uniform_plans = uniform(state)

    # ---- exact uniform first: the baseline, and the pruned-prefix input norms that the screening reuses
    exact_losses: list[float] = []
    norms: list[dict[str, torch.Tensor]] = []
    prune_pass(state, uniform_plans, record_norms=norms)
    uniform_windows = window_losses(model, hold, bs)
    exact_losses.append(float(uniform_windows.mean()))
    best_loss, best_index = exact_losses[0], 0
    state.timings["auto_exact"] = time.perf_counter() - start

    # ---- screening: cheap prune from the uniform run's input norms, full-model loss on the held-out windows
    t = time.perf_counter()
    seen: dict[tuple, float] = {}
    screened: list[tuple[float | None, float | None, list[BlockPlan], float]] = []

    def screen(plans: list[BlockPlan]) -> float:
        key = _plan_key(plans)
        if key not in seen:
            _restore(state, dense)
            _screen_prune(state, plans, norms)
            seen[key] = holdout_loss(model, hold, bs)
        return seen[key]

    screened.append((None, None, uniform_plans, screen(uniform_plans)))
    for m in ms:
        best_m, stale = math.inf, 0
        for lam in lambdas:
            plans = plan(state, ratios[m], owl_lambda=lam, record=False)
            loss = screen(plans)
            screened.append((m, lam, plans, loss))
            if loss < best_m - 1e-12:
                best_m, stale = loss, 0
            else:
                stale += 1
                if stale >= PATIENCE:
                    break
    state.timings["auto_screen"] = time.perf_counter() - t

    # ---- exact check of the best OWL candidates of the screening
    t = time.perf_counter()
    owl_ranked: list[tuple[float | None, float | None, list[BlockPlan], float]] = []
    keys = {_plan_key(uniform_plans)}
    for cand in sorted((c for c in screened if c[0] is not None), key=lambda c: (c[3], c[0], c[1])):
        key = _plan_key(cand[2])
        if key not in keys:
            keys.add(key)
            owl_ranked.append(cand)
    finalists = [screened[0]] + owl_ranked[: cfg.auto_finalists]
    if state.criterion.updates_weights:
        # the screening prunes with a mask-only proxy, which can misjudge a criterion that reconstructs the kept
        # weights (SparseGPT) at high sparsity: the configured (owl_m, owl_lambda) is always checked exactly as well
        prior = next(
            (c for c in screened if c[0] == float(cfg.owl_m) and c[1] == float(cfg.owl_lambda)),
            (float(cfg.owl_m), float(cfg.owl_lambda), plan(state, ratios[float(cfg.owl_m)], record=False), math.nan),
        )
        if all(_plan_key(prior[2]) != _plan_key(f[2]) for f in finalists):
            finalists.append(prior)
    for j in range(1, len(finalists)):
        _restore(state, dense)
        prune_pass(state, finalists[j][2])
        windows = window_losses(model, hold, bs)
        loss = float(windows.mean())
        exact_losses.append(loss)
        if loss < best_loss - 1e-12 and beats_uniform(windows, uniform_windows):
            best_loss, best_index = loss, j
    state.timings["auto_exact"] += time.perf_counter() - t

    # ---- report, then the winner once more on every window
    m_w, lam_w, _plans, _ = finalists[best_index]
    for m, lam, _plans, loss in screened:
        state.candidates.append(Candidate(("uniform" if m is None else "owl") + SCREEN_SUFFIX, m, lam, loss, False))
    for j, (m, lam, _plans, _) in enumerate(finalists):
        state.candidates.append(Candidate("uniform" if m is None else "owl", m, lam, exact_losses[j], j == best_index))
    _restore(state, dense)
    dense.clear()  # free the copy before the refit
    plans_w = refit(state, m_w, lam_w)
    logger.info(
        "owl-auto chose %s (held-out loss %.4f; uniform %.4f) after %d screened and %d exact candidates",
        "uniform" if m_w is None else f"OWL M={m_w:g} λ={lam_w:g}",
        exact_losses[best_index],
        exact_losses[0],
        len(screened),
        len(finalists),
    )
    return plans_w


def refit(state: RunState, owl_m: float | None, owl_lambda: float | None) -> list[BlockPlan]:
    """Prune the dense model with the chosen setting on *all* calibration windows, the held-out ones included.

    The held-out windows only served to choose; the result is what a direct run with the choice gives
    (`layerwise="uniform"`, or `layerwise="owl"` with `owl_m`, `owl_lambda`) on the same calibration data: the
    held-out windows' dense statistics are added to the outlier pass's (one dense pass over them, h·L block
    forwards) before the outlier ratios of the chosen M are taken, and the sequential prune sees every window.
    """
    t = time.perf_counter()
    cfg = state.config
    if state.holdout_ids is None or state.calibration_ids is None:
        raise RuntimeError("refit needs split_holdout to have run first.")
    if owl_m is None:
        plans = uniform(state)
        state.dense_stats = []  # a direct uniform run takes block 0's statistics in its own prune pass
        state.outlier_ratios = None
    else:
        ratios = holdout_ratios(state, state.runner.capture(state.holdout_ids, cfg.batch_size), owl_m)
        state.outlier_ratios = ratios
        plans = plan(state, ratios, owl_lambda=owl_lambda)  # records a clamping warning, if any
    state.calibration_ids = torch.cat([state.calibration_ids, state.holdout_ids])
    state.inputs0 = None
    state.inputs0 = state.runner.capture(state.calibration_ids, cfg.batch_size)
    prune_pass(state, plans)
    state.timings["auto_refit"] = time.perf_counter() - t
    return plans
