"""The passes of a pruning run, each one call of THE block loop (`BlockRunner.run_blocks`) on a `RunState`.

| pass | statistics | propagation | per block |
|---|---|---|---|
| `outlier_pass` | fresh row norms | dense | outlier ratio for M and mean Wanda score (`allocation.score_summary`) |
| `prune_pass` (sequential) | what the criterion needs (block 0 may reuse the dense pass's) | pruned | `prune_block`, resume state |
| `dense_prune` | fresh row norms (uniform) or the outlier pass's (OWL) | dense / none | `prune_block` |
| `prune_pass(record_norms=...)` (searches) | as `prune_pass` | pruned | input norms kept, `prune_block` |
| `holdout_ratios` (search refit) | fresh row norms, merged into the dense pass's | dense | outlier ratio, mean score |

`RunState` holds everything one run knows (no pruner attributes change during a run, so a pruner is re-entrant).
Plans come from the family registry (`optimum_owl.algorithms.families`): `block_metrics` feeds a family what its
`inputs` name (the outlier pass's ratios or mean scores, a metric of the weights, nothing) and `family_plans` calls
its `allocate`; `fixed_plans` does both for the run's family with its configured knob.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..algorithms.allocation import BlockPlan, projection_split, score_summary
from ..algorithms.criteria import Criterion, PruneTask, get_criterion, wanda_scores
from ..algorithms.families import UNIFORM, Budget, Family, get_family
from .int8 import Record, finish_unit
from .modeling import Unit
from .runner import Batch, BlockRunner
from .stats import BlockStats, merge_stats

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """Everything one pruning run knows; the searches re-plan from it without recomputing dense statistics (what only
    a search knows, its scoring windows and candidates, is its own `search.state.SearchState`)."""

    config: Any  # OWLPrunerConfig
    model: nn.Module
    path: str
    blocks: nn.ModuleList
    units: list[list[Unit]]
    runner: BlockRunner
    layerwise: str  # the effective `layerwise`, decided once (`engine.effective_layerwise`): a family or a search
    inputs0: list[Batch] | None = None
    dense_stats: list[BlockStats] = field(default_factory=list)
    outlier_ratios: list[float] | None = None  # outlier pass: per block, the outlier ratio at `owl_m` (OWL)
    mean_scores: list[float] | None = None  # outlier pass: per block, the mean Wanda score (DLP)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    calibration_ids: torch.Tensor | None = None  # [num_samples, seqlen] token ids behind `inputs0`
    resume: Any = None  # optimum_owl.pruning.resume.ResumeState when `checkpoint_dir` is set
    int8: dict[str, Record] = field(default_factory=dict)  # values="int8": unit name -> (scales, errors), last pruned
    open_phases: list[str] = field(default_factory=list, init=False, repr=False)  # `phase`s running, outermost first

    @property
    def criterion(self) -> Criterion:
        return get_criterion(self.config.method)

    def add_time(self, key: str, start: float) -> None:
        """Add the seconds since `start` to `timings[key]`; inside a `phase` the key is `"phase/key"` (a part of that
        phase's time, not counted again), so the keys without "/" never add up to more than `timings["total"]`."""
        key = "/".join([*self.open_phases, key])
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - start

    @contextlib.contextmanager
    def phase(self, key: str) -> Iterator[None]:
        """Time a phase that holds others (the searches' `auto_exact`, `auto_screen`, ...): see `add_time`."""
        start = time.perf_counter()
        self.open_phases.append(key)
        try:
            yield
        finally:
            self.open_phases.pop()
            self.add_time(key, start)

    def warn(self, message: str) -> None:
        logger.warning(message)
        self.warnings.append(message)


@dataclass
class Applied:
    """The allocation a run applied: its family, knob (config field -> value), per-block plans and the block metric
    they came from (`None` for none), which the report shows (`engine.build_report`)."""

    family: str
    knob: dict[str, float]
    plans: list[BlockPlan]
    metrics: list[float] | None = None


# ------------------------------------------------------------------------------------------------ plans
def budget(state: RunState) -> Budget:
    """What every family allocates: the target over the run's blocks, weighted by their prunable parameter counts
    (`None` for equal blocks: the plain mean, identical and free of rounding in the weights)."""
    cfg = state.config
    weights = [sum(u.shape[0] * u.shape[1] for u in units) for units in state.units]
    if len(set(weights)) == 1 or 0 in weights:
        weights = None
    return Budget(cfg.target_sparsity, len(state.units), weights, cfg.nm_pattern)


def family_plans(
    state: RunState, family: str, metrics: Sequence[float] | None, knob: Mapping[str, float], record: bool = True
) -> list[BlockPlan]:
    """Plans of `family` with `knob` (config field -> value; other keys are ignored) from its block metrics, split by
    `attention_shift`; the family's clamping warning goes to the report when `record`."""
    plans, warning = get_family(family).allocate(budget(state), metrics, knob)
    if warning and record:
        state.warn(warning)
    return split_plans(state, plans)


def uniform(state: RunState) -> list[BlockPlan]:
    return family_plans(state, UNIFORM, None, {})


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


def block_summary(units: Sequence[Unit], stats: BlockStats, owl_ms: Sequence[float]) -> tuple[float, list[float]]:
    """Mean Wanda score of one block and its outlier ratio for each M in `owl_ms`, one unit's scores at a time."""
    return score_summary(lambda: (wanda_scores(u.weight(), stats[u.name].norms(u.shape[1])) for u in units), owl_ms)


def block_outlier_ratios(units: Sequence[Unit], stats: BlockStats, owl_ms: Sequence[float]) -> list[float]:
    """Outlier ratio of one block for each M in `owl_ms` from its Wanda scores, one unit's scores at a time."""
    return block_summary(units, stats, owl_ms)[1]


def block_weight_metrics(state: RunState, metric: Callable[[torch.Tensor], float]) -> list[float]:
    """Per block, the mean of `metric` over its weight matrices (AlphaPruning's ESD α; no data)."""
    t = time.perf_counter()
    out: list[float] = []

    def visit(i: int) -> None:
        values = [metric(u.weight()) for u in state.units[i]]
        out.append(sum(values) / len(values) if values else 0.0)

    each_block(state, visit)
    state.add_time("block_metric", t)
    return out


def block_metrics(state: RunState, family: Family) -> list[float] | None:
    """The block metric `family` allocates from with its configured knob: the outlier pass's ratios (at `owl_m`) or
    mean scores (after `outlier_pass`), its metric of the (dense) weights, or `None`."""
    if family.inputs == "outlier_ratios":
        return list(state.outlier_ratios or [])
    if family.inputs == "mean_scores":
        return list(state.mean_scores or [])
    if family.inputs == "weights":
        return block_weight_metrics(state, family.weight_metric)
    return None


def fixed_plans(state: RunState) -> Applied:
    """The run's family (`state.layerwise`) with its configured knob; after `outlier_pass` when it needs data."""
    family = get_family(state.layerwise)
    knob = family.configured(state.config)
    metrics = block_metrics(state, family)
    return Applied(family.name, knob, family_plans(state, family.name, metrics, knob), metrics)


# ------------------------------------------------------------------------------------------------ one block
def prune_block(state: RunState, index: int, stats: BlockStats | None, plan: BlockPlan) -> None:
    """Apply the run's criterion to every unit of block `index` (inside its device scope)."""
    criterion, cfg = state.criterion, state.config
    for unit in state.units[index]:
        acc = stats[unit.name] if stats is not None else None
        sparsity = plan.sparsity_for(unit.group)
        task = PruneTask(unit.weight(), acc, unit.shape[1], sparsity, plan.nm, cfg, unit.name)
        criterion.prune(task)
        if cfg.values == "int8":  # kept weights onto the int8 grid (unless the criterion quantized them itself)
            state.int8[unit.name] = finish_unit(unit, task, cfg.group_size)


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
    state.add_time("outlier_pass", t)
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
        state.int8.update(state.resume.int8)  # the finished blocks' int8 scales and errors
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
            int8 = {"int8": state.int8, "group_size": state.config.group_size} if state.config.values == "int8" else {}
            state.resume.block_done(i, state.units[i], next_inputs, **int8)

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
    state.add_time("prune_pass", t)


def holdout_ratios(state: RunState, inputs: list[Batch], owl_m: float) -> tuple[list[float], list[float]]:
    """Dense pass over extra windows: their row norms are merged into the outlier pass's statistics, then each
    block's outlier ratio for `owl_m` and its mean score are taken from the merged statistics (the search's refit).
    Returns `(ratios, mean_scores)`."""
    ratios: list[float] = []
    means: list[float] = []

    def visit(i: int, held: BlockStats | None) -> None:
        merge_stats(state.dense_stats[i], held)
        mean, ratio = block_summary(state.units[i], state.dense_stats[i], [owl_m])
        ratios.append(ratio[0])
        means.append(mean)

    state.runner.run_blocks(inputs, visit, statistics=lambda i: BlockStats(state.units[i]), propagate="dense")
    return ratios, means


def each_block(state: RunState, visit) -> None:
    """`visit(i)` for every block inside its device scope, without any forward (reports, snapshots)."""
    state.runner.run_blocks(None, lambda i, _stats: visit(i))
