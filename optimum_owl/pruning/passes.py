"""The passes of a pruning run, each one call of THE block loop (`BlockRunner.run_blocks`) on a `RunState`.

| pass | statistics | propagation | per block |
|---|---|---|---|
| `outlier_pass` | fresh row norms | dense | outlier ratio for M and mean Wanda score (`allocation.score_summary`) |
| `prune_pass` (sequential) | what the criterion needs (block 0 may reuse the dense pass's) | pruned | `prune_block`, resume state |
| `dense_prune` | fresh row norms (uniform) or the outlier pass's (OWL) | dense / none | `prune_block` |
| `exact_prune_pass` (owl-auto) | as `prune_pass` | pruned | input norms kept, `prune_block` |
| `holdout_ratios` (search refit) | fresh row norms, merged into the dense pass's | dense | outlier ratio, mean score |

`RunState` holds everything one run knows (no pruner attributes change during a run, so a pruner is re-entrant).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..algorithms.allocation import (
    BlockPlan,
    alphapruning_allocation,
    atp_allocation,
    dlp_allocation,
    esd_alpha,
    owl_plans,
    projection_split,
    score_summary,
    uniform_plans,
)
from ..algorithms.criteria import Criterion, PruneTask, get_criterion, wanda_scores
from .modeling import Unit
from .report import Candidate
from .runner import Batch, BlockRunner
from .stats import BlockStats, merge_stats

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """Everything one pruning run knows; owl-auto re-plans from it without recomputing dense statistics."""

    config: Any  # OWLPrunerConfig
    model: nn.Module
    path: str
    blocks: nn.ModuleList
    units: list[list[Unit]]
    runner: BlockRunner
    inputs0: list[Batch] | None = None
    dense_stats: list[BlockStats] = field(default_factory=list)
    outlier_ratios: list[float] | None = None
    mean_scores: list[float] | None = None  # mean Wanda score per block, from the dense statistics pass (DLP)
    block_metrics: list[float] | None = None  # the applied family's block metric (DLP: mean score; AlphaPruning: α)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    calibration_ids: torch.Tensor | None = None  # [num_samples, seqlen] token ids behind `inputs0`
    holdout_ids: torch.Tensor | None = None  # searches: windows the candidates are scored on
    holdout_separate: bool = False  # searches: `holdout_ids` were drawn beyond the calibration windows (none held out)
    holdout_source: str | None = None  # searches: `auto_holdout_dataset`, described, when the windows came from it
    candidates: list[Candidate] = field(default_factory=list)  # owl-auto: candidates tried
    resume: Any = None  # optimum_owl.pruning.resume.ResumeState when `checkpoint_dir` is set

    @property
    def criterion(self) -> Criterion:
        return get_criterion(self.config.method)

    def add_time(self, key: str, start: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

    def warn(self, message: str) -> None:
        logger.warning(message)
        self.warnings.append(message)


# ------------------------------------------------------------------------------------------------ plans
def uniform(state: RunState) -> list[BlockPlan]:
    cfg = state.config
    return split_plans(state, uniform_plans(cfg.target_sparsity, cfg.nm_pattern, len(state.blocks)))


def split_plans(state: RunState, plans: list[BlockPlan], shift: float | None = None) -> list[BlockPlan]:
    """With `attention_shift` (or `shift`; unstructured only), each block's sparsity split between its attention
    projections and its other matrices (`projection_split`, mean kept); every family's plans pass through here."""
    shift = state.config.attention_shift if shift is None else shift
    if not shift:
        return plans
    out = []
    for units, p in zip(state.units, plans):
        attention = sum(u.numel for u in units if u.group == "attention")
        mlp = sum(u.numel for u in units if u.group != "attention")
        out.append(BlockPlan(p.sparsity, p.nm, projection_split(p.sparsity, shift, attention, mlp)))
    return out


def plan(state: RunState, ratios: Sequence[float], owl_lambda: float | None = None, record: bool = True) -> list[BlockPlan]:
    """OWL plans (or mixed N:M) from outlier ratios; a clamping warning goes to the report when `record`."""
    cfg = state.config
    lam = cfg.owl_lambda if owl_lambda is None else owl_lambda
    plans, clamped = owl_plans(ratios, cfg.sparsity, lam, cfg.nm_pattern)
    if clamped and record:
        state.warn(
            f"OWL allocation S={cfg.sparsity}, λ={lam} left [0, 1): block sparsities were clamped and the rest "
            "shifted so the mean stays at the target. A smaller `owl_lambda` avoids this."
        )
    return split_plans(state, plans)


def block_summary(units: Sequence[Unit], stats: BlockStats, owl_ms: Sequence[float]) -> tuple[float, list[float]]:
    """Mean Wanda score of one block and its outlier ratio for each M in `owl_ms`, one unit's scores at a time."""
    return score_summary(lambda: (wanda_scores(u.weight(), stats[u.name].norms(u.shape[1])) for u in units), owl_ms)


def block_outlier_ratios(units: Sequence[Unit], stats: BlockStats, owl_ms: Sequence[float]) -> list[float]:
    """Outlier ratio of one block for each M in `owl_ms` from its Wanda scores, one unit's scores at a time."""
    return block_summary(units, stats, owl_ms)[1]


def family_plans(
    state: RunState, family: str, metrics: Sequence[float] | None, knob: float, record: bool = True
) -> list[BlockPlan]:
    """Plans of `family` ("dlp", "alphapruning", "atp") with its knob (α, ε, β) from its block metrics; the mean is
    weighted by the blocks' prunable parameter counts. A clamping warning goes to the report when `record`."""
    cfg = state.config
    weights = [sum(u.shape[0] * u.shape[1] for u in units) for units in state.units]
    if len(set(weights)) == 1 or 0 in weights:
        weights = None  # equal blocks: the plain mean (identical, and free of rounding in the weights)
    if family == "dlp":
        sparsities, clamped = dlp_allocation(metrics or [], cfg.sparsity, knob, weights)
    elif family == "alphapruning":
        sparsities, clamped = alphapruning_allocation(metrics or [], cfg.sparsity, knob, weights)
    elif family == "atp":
        sparsities, clamped = atp_allocation(len(state.units), cfg.sparsity, knob, weights)
    else:
        raise ValueError(f"unknown allocation family {family!r}")
    if clamped and record:
        state.warn(
            f"{family} allocation S={cfg.sparsity} with knob {knob} left [0, 1): block sparsities were clamped and the "
            "rest shifted so the mean stays at the target. A smaller knob avoids this."
        )
    return split_plans(state, [BlockPlan(s) for s in sparsities])


def block_esd_alphas(state: RunState) -> list[float]:
    """AlphaPruning's block metric: per block, the mean ESD heavy-tail exponent of its weight matrices (no data)."""
    t = time.perf_counter()
    out: list[float] = []

    def visit(i: int) -> None:
        alphas = [esd_alpha(u.weight()) for u in state.units[i]]
        out.append(sum(alphas) / len(alphas) if alphas else 0.0)

    each_block(state, visit)
    state.add_time("esd", t)
    return out


def knob_of(config: Any, family: str) -> float:
    """The configured knob of a family: `dlp_alpha`, `alphapruning_epsilon` or `atp_beta`."""
    return {"dlp": config.dlp_alpha, "alphapruning": config.alphapruning_epsilon, "atp": config.atp_beta}[family]


def fixed_plans(state: RunState, layerwise: str) -> list[BlockPlan]:
    """Plans of a fixed rule with the configured knob: "owl" and "dlp" after `outlier_pass`, "alphapruning" (from
    the weights) and "atp" at any time."""
    if layerwise == "owl":
        return plan(state, state.outlier_ratios or [])
    if layerwise == "dlp":
        metrics = list(state.mean_scores or [])
    elif layerwise == "alphapruning":
        metrics = block_esd_alphas(state)
    else:
        metrics = None
    state.block_metrics = metrics
    return family_plans(state, layerwise, metrics, knob_of(state.config, layerwise))


# ------------------------------------------------------------------------------------------------ one block
def prune_block(state: RunState, index: int, stats: BlockStats | None, plan: BlockPlan) -> None:
    """Apply the run's criterion to every unit of block `index` (inside its device scope)."""
    criterion, cfg = state.criterion, state.config
    for unit in state.units[index]:
        acc = stats[unit.name] if stats is not None else None
        sparsity = plan.sparsity_for(unit.group)
        criterion.prune(PruneTask(unit.weight(), acc, unit.shape[1], sparsity, plan.nm, cfg, unit.name))


def _fresh_stats(state: RunState, index: int) -> BlockStats | None:
    """Statistics the criterion needs for block `index` behind the current (pruned) prefix."""
    need = state.criterion.statistics
    if need == "none":
        return None
    if index == 0 and need == "norms" and state.dense_stats:
        return state.dense_stats[0]  # block 0 sees the same inputs in the dense and the prune pass
    return BlockStats(state.units[index], hessian=need == "hessian")


# ------------------------------------------------------------------------------------------------ passes
def outlier_pass(state: RunState) -> list[float]:
    """Dense pass: per block, input statistics and outlier ratio; outputs feed the next block unpruned."""
    if state.resume is not None and None not in (state.resume.saved_ratios(), state.resume.saved_mean_scores()):
        state.outlier_ratios = state.resume.saved_ratios()  # resumed run: the dense pass already happened
        state.mean_scores = state.resume.saved_mean_scores()
        return state.outlier_ratios
    t = time.perf_counter()
    ratios: list[float] = []
    means: list[float] = []
    state.dense_stats = []
    owl_m = state.config.owl_m

    def visit(i: int, stats: BlockStats | None) -> None:
        mean, ratio = block_summary(state.units[i], stats, [owl_m])
        ratios.append(ratio[0])
        means.append(mean)
        state.dense_stats.append(stats)

    state.runner.run_blocks(
        state.inputs0, visit, statistics=lambda i: BlockStats(state.units[i]), propagate="dense", desc="OWL outlier pass"
    )
    state.outlier_ratios = ratios
    state.mean_scores = means
    state.timings["outlier_pass"] = time.perf_counter() - t
    if state.resume is not None:
        state.resume.save_ratios(ratios, means)
    return ratios


def prune_pass(state: RunState, plans: list[BlockPlan], record_norms: list | None = None) -> None:
    """Sequential pass: statistics behind the pruned prefix, prune block i to `plans[i]`, propagate pruned outputs.

    With `record_norms` (a list), each block's per-unit input norms ‖X_j‖₂ (CPU) are appended to it (owl-auto)."""
    t = time.perf_counter()
    start, inputs = 0, state.inputs0
    if state.resume is not None:
        start, resumed = state.resume.resume(state.units, plans, state.runner.block_scope)
        if start:
            state.warnings.append(f"Resumed from checkpoint_dir after {start} finished blocks.")
        inputs = resumed if resumed is not None else inputs

    def visit(i: int, stats: BlockStats | None) -> None:
        if record_norms is not None:
            units = state.units[i]
            record_norms.append({} if stats is None else {u.name: stats[u.name].norms(u.shape[1]).to("cpu", copy=True) for u in units})
        prune_block(state, i, stats, plans[i])

    done = None
    if state.resume is not None:
        def done(i: int, next_inputs: list[Batch] | None) -> None:
            state.resume.block_done(i, state.units[i], next_inputs)

    needs_inputs = state.criterion.needs_data or state.inputs0 is not None
    state.runner.run_blocks(
        inputs,
        visit,
        statistics=lambda i: _fresh_stats(state, i),
        propagate="pruned" if needs_inputs else "none",
        done=done,
        start=start,
        desc=f"{state.config.method} prune",
    )
    state.add_time("prune_pass", t)


def dense_prune(state: RunState, plans: list[BlockPlan], from_outlier_pass: bool) -> None:
    """`propagation="dense"`: blocks pruned from dense-input statistics, the outlier pass's when it ran."""
    t = time.perf_counter()
    visit = lambda i, stats: prune_block(state, i, stats, plans[i])  # noqa: E731
    if from_outlier_pass:
        state.runner.run_blocks(None, visit, statistics=lambda i: state.dense_stats[i])
    else:
        state.runner.run_blocks(
            state.inputs0,
            visit,
            statistics=lambda i: BlockStats(state.units[i]),
            propagate="dense",
            desc=f"{state.config.method} prune (dense)",
        )
    state.timings["prune_pass"] = time.perf_counter() - t


def holdout_ratios(state: RunState, inputs: list[Batch], owl_m: float) -> list[float]:
    """Dense pass over extra windows: their row norms are merged into the outlier pass's statistics, then each
    block's outlier ratio for `owl_m` (and its mean score, into `state.mean_scores`) is taken from the merged
    statistics (the search's refit)."""
    ratios: list[float] = []
    means: list[float] = []

    def visit(i: int, held: BlockStats | None) -> None:
        merge_stats(state.dense_stats[i], held)
        mean, ratio = block_summary(state.units[i], state.dense_stats[i], [owl_m])
        ratios.append(ratio[0])
        means.append(mean)

    state.runner.run_blocks(inputs, visit, statistics=lambda i: BlockStats(state.units[i]), propagate="dense")
    state.mean_scores = means
    return ratios


def each_block(state: RunState, visit) -> None:
    """`visit(i)` for every block inside its device scope, without any forward (reports, snapshots)."""
    state.runner.run_blocks(None, lambda i, _stats: visit(i))
