"""The core of a pruning run: config -> data -> runner -> statistics -> allocation -> criterion -> masks -> report.

`prune_model(model, config, dataset, tokenizer)` prunes in place and returns the `PruneReport`. It keeps every bit
of run state in one `passes.RunState`, so any number of runs may go on at once. It neither attaches the report to
the model nor touches saving or the transformers plugin: the callers above (`OWLPruner`, prune-on-load) do.

Passes over the calibration data (L = number of blocks, one "forward" = one block over all batches):

| layerwise / propagation | forwards | what happens |
|---|---|---|
| uniform, sequential | 2L − 1 | per block: statistics forward, prune, forward of the pruned block |
| owl or dlp, sequential | 3L − 1 | dense outlier pass (L), then the uniform loop with s_i (block 0 reuses the dense statistics) |
| atp or alphapruning, sequential | 2L − 1 | as uniform, with s_i from the depth (ATP) or the weights' spectra (AlphaPruning) |
| uniform or owl, dense | L | one dense pass; every block pruned from dense-input statistics (approximation) |
| criterion without statistics (magnitude), uniform | 0 | no calibration data needed |
| criterion without statistics, atp or alphapruning | 0 | no calibration data needed |
| owl-auto, auto | see optimum_owl.pruning.search.search | |

Which passes a family needs comes from the family registry (`optimum_owl.algorithms.families`): its `inputs` say
whether it needs the outlier pass (calibration data) or only the weights.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any

import torch
from torch import nn

from ..algorithms.families import SEARCHES, UNIFORM, get_family
from ..config import OWLPrunerConfig
from ..errors import CalibrationDataError, OWLConfigError
from ..utils import public_config, public_path
from . import int8, passes
from .data import describe_source, draw_windows
from .modeling import PRUNED_ZERO_SHARE, context_length, get_blocks_and_units, zero_share
from .offload import make_block_offloader
from .passes import Applied, RunState
from .report import BlockReport, ModuleReport, PruneReport
from .resume import ResumeState
from .runner import BlockRunner
from .search import holdout, search
from .search.state import SearchState
from .search.windows import holdout_windows_wanted

logger = logging.getLogger(__name__)


def prune_model(
    model: nn.Module, config: OWLPrunerConfig, dataset: Any = None, tokenizer: Any = None, block_context: Any = None
) -> PruneReport:
    """Prune `model` in place with `config` and return the report (not attached to the model).

    `block_context` (optional) is a callable `(index, block) -> context manager` that makes a block's weights
    real on its execution device; by default one is made for Accelerate-offloaded models and for `config.device`.
    """
    start = time.perf_counter()
    path, blocks, units = get_blocks_and_units(model, config.block_name, config.ignore)
    if block_context is None:
        block_context = make_block_offloader(model, config.device, config.offload_folder)
    runner = BlockRunner(model, blocks, offload_activations=config.offload_activations, block_context=block_context)
    layerwise, notes = effective_layerwise(config, len(blocks))
    state = RunState(config=config, model=model, path=path, blocks=blocks, units=units, runner=runner,
                     layerwise=layerwise)
    warn_if_pruned(state)
    for note in notes:
        state.warn(note)
    searching = SearchState.open(layerwise, config) if layerwise in SEARCHES else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            calibration = prepare(state, dataset, tokenizer, searching)
            open_resume(state)
            applied = run(state, searching)
    finally:
        model.train(was_training)
    state.timings["total"] = time.perf_counter() - start
    report = build_report(state, applied, calibration, searching)
    logger.info("Pruned %s: sparsity %.4f over %d weights", type(model).__name__, report.sparsity, report.total_params)
    return report


def warn_if_pruned(state: RunState) -> None:
    """Pruning an already pruned model compounds the sparsity: say so (a `UserWarning` and a report warning)."""
    share = zero_share(state.units)
    if share is not None and share > PRUNED_ZERO_SHARE:
        msg = (
            f"The block weights are already {share:.4f} zero: this model was pruned before. Pruning it again "
            "compounds the sparsity (the allocation assumes a dense model, and the achieved sparsity will not "
            "match the target); prune the dense model instead."
        )
        warnings.warn(msg, UserWarning, stacklevel=4)  # once: the CLI routes warnings through logging
        state.warnings.append(msg)


def effective_layerwise(config: OWLPrunerConfig, num_blocks: int) -> tuple[str, list[str]]:
    """The `layerwise` the run applies (decided once, kept in `RunState.layerwise`) and the warnings that go with it:
    a fixed N:M pattern without `nm_mixed` gives every block the same pattern (uniform)."""
    if config.nm_pattern is not None and config.layerwise != UNIFORM and not config.nm_mixed:
        return UNIFORM, [
            f"layerwise={config.layerwise!r} with a fixed N:M pattern {config.pattern} gives every block the same "
            "pattern; OWL is skipped. Set nm_mixed=True for per-block N:M."
        ]
    if config.layerwise not in SEARCHES and get_family(config.layerwise).knobs and num_blocks < 2:
        return config.layerwise, [f"layerwise={config.layerwise!r} needs at least two blocks; one block gets the uniform "
                                  "target."]
    return config.layerwise, []


def needs_data(state: RunState) -> bool:
    """Whether the run needs calibration data: its criterion, a search, or a family that needs the outlier pass."""
    return state.criterion.needs_data or state.layerwise in SEARCHES or get_family(state.layerwise).needs_data


def prepare(state: RunState, dataset: Any, tokenizer: Any, searching: SearchState | None = None) -> dict[str, Any]:
    """Calibration windows -> block 0's inputs (`state.inputs0`; a search's extra scoring windows into `searching`);
    returns the report's calibration entry."""
    cfg = state.config
    if not needs_data(state):
        return {"source": f"none ({cfg.method} pruning needs no data)"}
    dataset = dataset if dataset is not None else cfg.dataset
    tokenizer = tokenizer if tokenizer is not None else cfg.tokenizer
    model_cfg = getattr(state.model, "config", None)
    max_pos = context_length(state.model)
    if max_pos is not None and cfg.seqlen > max_pos:
        raise OWLConfigError(f"`seqlen`={cfg.seqlen} exceeds the model's max_position_embeddings={max_pos}; lower `seqlen`.")
    t = time.perf_counter()
    extra = holdout_windows_wanted(cfg) if searching is not None else 0
    scoring_source = cfg.auto_holdout_dataset if extra else None
    if isinstance(scoring_source, str) and isinstance(dataset, (str, os.PathLike)) and scoring_source == str(dataset):
        raise OWLConfigError(
            f"`auto_holdout_dataset` is the calibration source itself ({describe_source(dataset)}); by default the "
            "searches already score on windows of it that share no text with the calibration windows. Unset "
            "`auto_holdout_dataset`, or give other text (e.g. a validation split of the text the model will serve)."
        )
    ids, held = draw_windows(dataset, tokenizer, cfg.num_samples, cfg.seqlen, cfg.seed, cfg.text_column,
                             warnings=state.warnings, extra=0 if scoring_source is not None else extra)
    if scoring_source is not None:
        held = draw_scoring_windows(state, searching, scoring_source, tokenizer, extra)
    vocab = getattr(model_cfg, "vocab_size", None)
    top = max(int(ids.max()), int(held.max()) if held.numel() else 0)
    if isinstance(vocab, int) and top >= vocab:
        raise OWLConfigError(
            f"Calibration token id {top} is outside the model's vocabulary ({vocab}); "
            "pass the model's own tokenizer."
        )
    state.add_time("calibration_data", t)
    state.calibration_ids = ids
    if extra:
        searching.ids = held  # split_holdout decides whether there are enough of them
    t = time.perf_counter()
    state.inputs0 = state.runner.capture(ids, cfg.batch_size)
    state.add_time("capture", t)
    return {"source": describe_source(dataset), "num_samples": int(ids.shape[0]), "seqlen": int(ids.shape[1])}


def draw_scoring_windows(state: RunState, searching: SearchState, source: Any, tokenizer: Any, count: int) -> torch.Tensor:
    """`count` windows of `auto_holdout_dataset` for the searches to score on (seeded like the calibration draw)."""
    cfg = state.config
    notes: list[str] = []
    try:
        held, _ = draw_windows(source, tokenizer, count, cfg.seqlen, cfg.seed, cfg.text_column, warnings=notes)
    except CalibrationDataError as err:
        raise CalibrationDataError(f"`auto_holdout_dataset`: {err}") from None
    state.warnings += [f"`auto_holdout_dataset`: {note}" for note in notes]
    searching.source = describe_source(source)
    return held


def open_resume(state: RunState) -> None:
    if state.config.checkpoint_dir is not None:
        state.resume = ResumeState.open(state.config, state.path, state.units, state.inputs0)


def run(state: RunState, searching: SearchState | None = None) -> Applied:
    """The passes for the run's `layerwise` and `propagation`; returns the allocation applied."""
    cfg = state.config
    if not needs_data(state):
        applied = passes.fixed_plans(state)
        passes.prune_pass(state, applied.plans)
        return applied
    if cfg.propagation == "dense":
        if searching is not None:
            raise OWLConfigError(f"`layerwise={state.layerwise!r}` needs propagation='sequential'.")
        if state.layerwise == UNIFORM:
            applied = passes.fixed_plans(state)
            passes.dense_prune(state, applied.plans, from_outlier_pass=False)
            return applied
        passes.outlier_pass(state)  # the dense statistics every block is pruned from
        applied = passes.fixed_plans(state)
        passes.dense_prune(state, applied.plans, from_outlier_pass=True)
        return applied
    if searching is not None:
        holdout.split_holdout(state, searching)  # held-out windows must not enter the outlier statistics
        passes.outlier_pass(state)
        return search.choose_and_prune(state, searching)
    if get_family(state.layerwise).needs_data:
        passes.outlier_pass(state)
    applied = passes.fixed_plans(state)
    passes.prune_pass(state, applied.plans)
    return applied


def build_report(
    state: RunState, applied: Applied, calibration: dict[str, Any], searching: SearchState | None = None
) -> PruneReport:
    model = state.model
    candidates = searching.candidates if searching is not None else []
    if candidates and searching.ids is not None:  # a search: where its scoring windows came from
        calibration = {**calibration, "holdout_windows": int(searching.ids.shape[0]), "holdout": searching.where()}
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    family = get_family(applied.family)
    report = PruneReport(
        config=public_config(state.config.to_dict()),
        model={"class": type(model).__name__, "name_or_path": public_path(name), "block_path": state.path},
        timings={k: round(v, 4) for k, v in state.timings.items()},
        warnings=list(state.warnings),
        calibration=calibration,
        candidates=list(candidates),
        allocation={"family": family.name, "knob": dict(applied.knob), "metric": family.metric},
    )
    # the block metric: OWL's outlier ratios have their own column, any other family's go to `metric`
    metrics = applied.metrics
    as_ratio = family.inputs == "outlier_ratios"
    plans = applied.plans
    for i, units in enumerate(state.units):
        block_zeros = block_params = 0
        with state.runner.block_scope(i):  # offloaded weights are meta tensors outside their block's scope
            for u in units:
                w = u.weight()
                zeros = int((w == 0).sum())
                block_zeros += zeros
                block_params += w.numel()
                report.modules.append(
                    ModuleReport(u.name, i, list(u.shape), round(plans[i].sparsity_for(u.group), 12),
                                 zeros / max(w.numel(), 1), w.numel())
                )
        value = metrics[i] if metrics is not None else None
        report.blocks.append(
            BlockReport(
                index=i,
                name=f"{state.path}.{i}",
                outlier_ratio=value if as_ratio else None,
                target_sparsity=round(plans[i].sparsity, 12),
                achieved_sparsity=block_zeros / max(block_params, 1),
                num_params=block_params,
                nm=list(plans[i].nm) if plans[i].nm else None,
                metric=None if as_ratio else value,
                attention_sparsity=None if plans[i].split is None else plans[i].split[0],
                mlp_sparsity=None if plans[i].split is None else plans[i].split[1],
            )
        )
        report.total_params += block_params
        report.total_zeros += block_zeros
    if state.config.values == "int8":
        report.quantization = int8.summary(state.int8, state.units, state.config.values, state.config.group_size)
        int8.log_summary(report.quantization)
    return report
