"""The passes of a pruning run, each one call of THE block loop (`BlockRunner.run_blocks`) on a `RunState`.

| pass | statistics | propagation | per block |
|---|---|---|---|
| `outlier_pass` | fresh row norms | dense | outlier ratio for M (`allocation.outlier_ratios`) |
| `prune_pass` (sequential) | what the criterion needs (block 0 may reuse the dense pass's) | pruned | `prune_block`, resume state |
| `dense_prune` | fresh row norms (uniform) or the outlier pass's (OWL) | dense / none | `prune_block` |
| `exact_prune_pass` (owl-auto) | as `prune_pass` | pruned | input norms kept, `prune_block` |
| `holdout_ratios` (owl-auto refit) | fresh row norms, merged into the dense pass's | dense | outlier ratio |

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

from .allocation import BlockPlan, outlier_ratios, owl_plans, uniform_plans
from .criteria import Criterion, PruneTask, get_criterion, wanda_scores
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
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    calibration_ids: torch.Tensor | None = None  # [num_samples, seqlen] token ids behind `inputs0`
    holdout_ids: torch.Tensor | None = None  # owl-auto: windows held out of the statistics, used for scoring
    candidates: list[Candidate] = field(default_factory=list)  # owl-auto: candidates tried
    resume: Any = None  # optimum_owl.resume.ResumeState when `checkpoint_dir` is set

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
    return uniform_plans(cfg.target_sparsity, cfg.nm_pattern, len(state.blocks))


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
    return plans


def block_outlier_ratios(units: Sequence[Unit], stats: BlockStats, owl_ms: Sequence[float]) -> list[float]:
    """Outlier ratio of one block for each M in `owl_ms` from its Wanda scores, one unit's scores at a time."""
    return outlier_ratios(lambda: (wanda_scores(u.weight(), stats[u.name].norms(u.shape[1])) for u in units), owl_ms)


# ------------------------------------------------------------------------------------------------ one block
def prune_block(state: RunState, index: int, stats: BlockStats | None, plan: BlockPlan) -> None:
    """Apply the run's criterion to every unit of block `index` (inside its device scope)."""
    criterion, cfg = state.criterion, state.config
    for unit in state.units[index]:
        acc = stats[unit.name] if stats is not None else None
        criterion.prune(PruneTask(unit.weight(), acc, unit.shape[1], plan.sparsity, plan.nm, cfg, unit.name))


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
    if state.resume is not None and state.resume.saved_ratios() is not None:
        state.outlier_ratios = state.resume.saved_ratios()  # resumed run: the dense pass already happened
        return state.outlier_ratios
    t = time.perf_counter()
    ratios: list[float] = []
    state.dense_stats = []
    owl_m = state.config.owl_m

    def visit(i: int, stats: BlockStats | None) -> None:
        ratios.append(block_outlier_ratios(state.units[i], stats, [owl_m])[0])
        state.dense_stats.append(stats)

    state.runner.run_blocks(
        state.inputs0, visit, statistics=lambda i: BlockStats(state.units[i]), propagate="dense", desc="OWL outlier pass"
    )
    state.outlier_ratios = ratios
    state.timings["outlier_pass"] = time.perf_counter() - t
    if state.resume is not None:
        state.resume.save_ratios(ratios)
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
    block's outlier ratio for `owl_m` is taken from the merged statistics (owl-auto refit)."""
    ratios: list[float] = []

    def visit(i: int, held: BlockStats | None) -> None:
        merge_stats(state.dense_stats[i], held)
        ratios.append(block_outlier_ratios(state.units[i], state.dense_stats[i], [owl_m])[0])

    state.runner.run_blocks(inputs, visit, statistics=lambda i: BlockStats(state.units[i]), propagate="dense")
    return ratios


def each_block(state: RunState, visit) -> None:
    """`visit(i)` for every block inside its device scope, without any forward (reports, snapshots)."""
    state.runner.run_blocks(None, lambda i, _stats: visit(i))
