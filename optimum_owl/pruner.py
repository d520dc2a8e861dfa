"""`OWLPruner`: orchestration only. config -> data -> runner -> statistics -> allocation -> criterion -> masks -> report.

Passes over the calibration data (L = number of blocks, one "forward" = one block over all batches):

| layerwise / propagation | forwards | what happens |
|---|---|---|
| uniform, sequential | 2L − 1 | per block: statistics forward, prune, forward of the pruned block |
| owl, sequential | 3L − 1 | dense outlier pass (L), then the uniform loop with s_i (block 0 reuses the dense statistics) |
| uniform or owl, dense | L | one dense pass; every block pruned from dense-input statistics (approximation) |
| magnitude, uniform | 0 | no calibration data needed |
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import mixed_nm_allocation, owl_allocation
from .config import OWLConfigError, OWLPrunerConfig
from .criteria import keep_mask, magnitude_scores, sparsegpt_prune, wanda_prune_, wanda_scores
from .data import describe_source, get_calibration_data, load_tokenizer
from .masks import apply_keep_mask_
from .modeling import Unit, get_blocks_and_units
from .report import BlockReport, ModuleReport, PruneReport
from .runner import Batch, BlockRunner
from .stats import BlockStats

logger = logging.getLogger(__name__)


@dataclass
class BlockPlan:
    """What block i is pruned to: a sparsity (unstructured) or a kept count n of every m (N:M)."""

    sparsity: float
    nm: tuple[int, int] | None = None


@dataclass
class PruneState:
    """Everything one run knows; kept so that `owl-auto` can re-plan without recomputing dense statistics."""

    model: nn.Module
    path: str
    blocks: nn.ModuleList
    units: list[list[Unit]]
    runner: BlockRunner | None = None
    inputs0: list[Batch] | None = None
    dense_stats: list[BlockStats] = field(default_factory=list)
    outlier_ratios: list[float] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    calibration_ids: torch.Tensor | None = None  # [num_samples, seqlen] token ids behind `inputs0`
    holdout_ids: torch.Tensor | None = None  # owl-auto: windows held out of the statistics, used for scoring
    candidates: list[Any] = field(default_factory=list)  # owl-auto: `report.Candidate`s tried


def block_outlier_ratios(units: Sequence[Unit], stats: BlockStats, owl_ms: Sequence[float]) -> list[float]:
    """Outlier ratio of one block for each M in `owl_ms`: share of the block's Wanda scores above M × their mean.

    Scores are recomputed per unit instead of concatenated, so no block-sized score buffer is held.
    """
    total, count = 0.0, 0
    for u in units:
        s = wanda_scores(u.weight(), stats[u.name].norms(u.shape[1]))
        total += float(s.sum(dtype=torch.float64))
        count += s.numel()
    if count == 0:
        return [0.0 for _ in owl_ms]
    mean = total / count
    above = [0] * len(owl_ms)
    for u in units:
        s = wanda_scores(u.weight(), stats[u.name].norms(u.shape[1]))
        for k, m in enumerate(owl_ms):
            above[k] += int((s > m * mean).sum())
    return [a / count for a in above]


class OWLPruner:
    """Prunes a transformers model in place with OWL layerwise sparsity and a Wanda/SparseGPT/magnitude criterion.

    Args:
        config (`OWLPrunerConfig`, *optional*): the run's settings; keyword arguments build one when omitted.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from optimum_owl import OWLPruner, OWLPrunerConfig
    >>> model = AutoModelForCausalLM.from_pretrained("path/to/model")            # doctest: +SKIP
    >>> tok = AutoTokenizer.from_pretrained("path/to/model")                     # doctest: +SKIP
    >>> config = OWLPrunerConfig(sparsity=0.7, method="wanda", layerwise="owl", num_samples=128, seqlen=2048)
    >>> report = OWLPruner(config).prune(model, dataset="c4_sample.jsonl", tokenizer=tok)  # doctest: +SKIP
    >>> print(report.block_table())                                              # doctest: +SKIP
    ```
    """

    def __init__(self, config: OWLPrunerConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            config = OWLPrunerConfig(**kwargs)
        elif kwargs:
            raise TypeError("Pass either `config` or keyword arguments, not both.")
        if not isinstance(config, OWLPrunerConfig):
            raise TypeError(f"`config` must be an OWLPrunerConfig, got {type(config).__name__}.")
        config.validate()
        self.config = config
        self.model: nn.Module | None = None
        self.tokenizer: Any = None

    # ------------------------------------------------------------------------------------------ public entry points
    @classmethod
    def apply(
        cls, model: nn.Module, config: OWLPrunerConfig | None = None, dataset: Any = None, tokenizer: Any = None, **kw
    ) -> nn.Module:
        """Prune `model` in place and return it (the report is attached as `model.owl_report`)."""
        cls(config, **kw).prune(model, dataset=dataset, tokenizer=tokenizer)
        return model

    @classmethod
    def from_pretrained(cls, model_or_path: nn.Module | str | os.PathLike, config: OWLPrunerConfig | None = None, **model_kwargs: Any):
        """Optimum-style constructor: load (or take) a model, keep it on the pruner for `quantize(save_dir)`."""
        pruner = cls(config or OWLPrunerConfig())
        if isinstance(model_or_path, nn.Module):
            pruner.model = model_or_path
        else:
            from .saving import load_model

            pruner.model = load_model(str(model_or_path), **model_kwargs)
            try:
                pruner.tokenizer = load_tokenizer(str(model_or_path))
            except (OSError, ValueError):
                pruner.tokenizer = None
        return pruner

    def quantize(
        self,
        save_dir: str | os.PathLike,
        dataset: Any = None,
        tokenizer: Any = None,
        overwrite: bool = False,
        dense: bool = False,
    ) -> PruneReport:
        """Optimum-style: prune the model given to `from_pretrained` and save it (+ tokenizer, report, config).

        The checkpoint is compact (bitmask + values) unless `dense=True`: plain safetensors with zeros in place."""
        if self.model is None:
            raise ValueError("No model: build the pruner with `OWLPruner.from_pretrained(model_or_path, config)`.")
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        report = self.prune(self.model, dataset=dataset, tokenizer=tokenizer)
        from .saving import save_pruned

        save_pruned(
            self.model, save_dir, report=report, config=self.config, tokenizer=tokenizer, overwrite=overwrite, dense=dense
        )
        return report

    def prune(self, model: nn.Module, dataset: Any = None, tokenizer: Any = None) -> PruneReport:
        """Prune `model` in place; return the `PruneReport` (also attached as `model.owl_report`)."""
        cfg = self.config
        start = time.perf_counter()
        path, blocks, units = get_blocks_and_units(model, cfg.block_name, cfg.ignore)
        state = PruneState(model=model, path=path, blocks=blocks, units=units)
        layerwise = self._effective_layerwise(state)
        self._setup_offload(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                calibration = self._prepare(state, layerwise, dataset, tokenizer)
                self._open_checkpoint(state)
                plans = self._run(state, layerwise)
        finally:
            model.train(was_training)
        state.timings["total"] = time.perf_counter() - start
        report = self._report(state, plans, calibration)
        model.owl_report = report
        self._after_prune(model)
        logger.info("Pruned %s: sparsity %.4f over %d weights", type(model).__name__, report.sparsity, report.total_params)
        return report

    # ------------------------------------------------------------------------------------------ steps
    def _effective_layerwise(self, state: PruneState) -> str:
        cfg = self.config
        if cfg.nm_pattern is not None and cfg.layerwise != "uniform" and not cfg.nm_mixed:
            msg = (
                f"layerwise={cfg.layerwise!r} with a fixed N:M pattern {cfg.pattern} gives every block the same "
                "pattern; OWL is skipped. Set nm_mixed=True for per-block N:M."
            )
            logger.warning(msg)
            state.warnings.append(msg)
            return "uniform"
        if cfg.layerwise == "owl" and len(state.blocks) < 2:
            state.warnings.append("OWL needs at least two blocks; one block gets the uniform target.")
        return cfg.layerwise

    def _needs_data(self, layerwise: str) -> bool:
        return not (self.config.method == "magnitude" and layerwise == "uniform")

    def _prepare(self, state: PruneState, layerwise: str, dataset: Any, tokenizer: Any) -> dict[str, Any]:
        cfg = self.config
        if not self._needs_data(layerwise):
            return {"source": "none (magnitude pruning needs no data)"}
        dataset = dataset if dataset is not None else cfg.dataset
        tokenizer = tokenizer if tokenizer is not None else cfg.tokenizer
        max_pos = getattr(getattr(state.model, "config", None), "max_position_embeddings", None)
        if isinstance(max_pos, int) and cfg.seqlen > max_pos:
            raise OWLConfigError(
                f"`seqlen`={cfg.seqlen} exceeds the model's max_position_embeddings={max_pos}; lower `seqlen`."
            )
        t = time.perf_counter()
        ids = get_calibration_data(dataset, tokenizer, cfg.num_samples, cfg.seqlen, cfg.seed, cfg.text_column)
        vocab = getattr(getattr(state.model, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and int(ids.max()) >= vocab:
            raise OWLConfigError(
                f"Calibration token id {int(ids.max())} is outside the model's vocabulary ({vocab}); "
                "pass the model's own tokenizer."
            )
        state.timings["calibration_data"] = time.perf_counter() - t
        state.calibration_ids = ids
        t = time.perf_counter()
        state.runner = BlockRunner(
            state.model, state.blocks, offload_activations=cfg.offload_activations, block_context=self._block_context
        )
        state.inputs0 = state.runner.capture(ids, cfg.batch_size)
        state.timings["capture"] = time.perf_counter() - t
        return {"source": describe_source(dataset), "num_samples": int(ids.shape[0]), "seqlen": int(ids.shape[1])}

    # Subclasses / integrations override this to bring offloaded blocks onto their execution device.
    _block_context = None

    def _run(self, state: PruneState, layerwise: str) -> list[BlockPlan]:
        cfg = self.config
        num_blocks = len(state.blocks)
        uniform = self._uniform_plans(num_blocks)
        if not self._needs_data(layerwise):
            t = time.perf_counter()
            start, _ = self._resume(state, uniform)
            for i in tqdm(range(start, num_blocks), desc="magnitude prune", leave=False):
                with self._block_scope(state, i):
                    self.prune_block(state, i, None, uniform[i])
                    self._block_done(state, i, None)
            state.timings["prune_pass"] = time.perf_counter() - t
            return uniform
        if cfg.propagation == "dense":
            return self._dense_run(state, layerwise, uniform)
        if layerwise == "uniform":
            self.prune_pass(state, uniform)
            return uniform
        if layerwise == "owl-auto":
            from .auto import split_holdout  # held-out windows must not enter the outlier statistics

            split_holdout(self, state)
        self.outlier_pass(state)
        if layerwise == "owl-auto":
            from .auto import choose_and_prune  # layerwise="owl-auto": search (M, λ) on held-out data

            return choose_and_prune(self, state)
        plans = self.plan(state.outlier_ratios or [], num_blocks, state)
        self.prune_pass(state, plans)
        return plans

    def _uniform_plans(self, num_blocks: int) -> list[BlockPlan]:
        nm = self.config.nm_pattern
        return [BlockPlan(self.config.target_sparsity, nm) for _ in range(num_blocks)]

    def plan(
        self,
        ratios: Sequence[float],
        num_blocks: int,
        state: PruneState | None = None,
        owl_lambda: float | None = None,
    ) -> list[BlockPlan]:
        """Per-block plans from outlier ratios (OWL allocation, or mixed N:M)."""
        cfg = self.config
        lam = cfg.owl_lambda if owl_lambda is None else owl_lambda
        nm = cfg.nm_pattern
        if nm is not None:
            kept = mixed_nm_allocation(ratios, nm[0], nm[1], lam)
            return [BlockPlan(1.0 - k / nm[1], (k, nm[1])) for k in kept]
        sparsities, clamped = owl_allocation(ratios, cfg.sparsity, lam)
        if clamped and state is not None:
            msg = (
                f"OWL allocation S={cfg.sparsity}, λ={lam} left [0, 1): block sparsities were clamped and the rest "
                "shifted so the mean stays at the target. A smaller `owl_lambda` avoids this."
            )
            logger.warning(msg)
            state.warnings.append(msg)
        return [BlockPlan(s) for s in sparsities]

    def outlier_pass(self, state: PruneState) -> list[float]:
        """Dense pass: per block, input statistics and outlier ratio; outputs feed the next block unpruned."""
        if self._checkpoint is not None and self._checkpoint.saved_ratios() is not None:
            state.outlier_ratios = self._checkpoint.saved_ratios()  # resumed run: the dense pass already happened
            return state.outlier_ratios
        t = time.perf_counter()
        inputs = state.inputs0
        ratios: list[float] = []
        state.dense_stats = []
        n = len(state.blocks)
        for i in tqdm(range(n), desc="OWL outlier pass", leave=False):
            with state.runner.block_on_device(i):
                stats = BlockStats(state.units[i])
                with stats.collecting():
                    outputs = state.runner.forward(i, inputs, keep_outputs=i < n - 1)
                ratios.append(block_outlier_ratios(state.units[i], stats, [self.config.owl_m])[0])
            state.dense_stats.append(stats)
            inputs = outputs
        state.outlier_ratios = ratios
        state.timings["outlier_pass"] = time.perf_counter() - t
        if self._checkpoint is not None:
            self._checkpoint.save_ratios(ratios)
        return ratios

    def prune_pass(self, state: PruneState, plans: list[BlockPlan], inputs: list[Batch] | None = None) -> None:
        """Sequential pass: statistics from the pruned prefix, prune block i to `plans[i]`, propagate pruned outputs."""
        t = time.perf_counter()
        inputs = state.inputs0 if inputs is None else inputs
        n = len(state.blocks)
        hessian = self.config.method == "sparsegpt"
        start, resumed = self._resume(state, plans)
        inputs = resumed if resumed is not None else inputs
        for i in tqdm(range(start, n), desc=f"{self.config.method} prune", leave=False):
            with state.runner.block_on_device(i):
                if i == 0 and not hessian and state.dense_stats:
                    stats = state.dense_stats[0]  # block 0 sees the same inputs in both passes
                elif self.config.method == "magnitude":
                    stats = None
                else:
                    stats = BlockStats(state.units[i], hessian=hessian)
                    with stats.collecting():
                        state.runner.forward(i, inputs, keep_outputs=False)
                self.prune_block(state, i, stats, plans[i])
                if i < n - 1:
                    inputs = state.runner.forward(i, inputs)
                self._block_done(state, i, inputs if i < n - 1 else None)
        state.timings["prune_pass"] = state.timings.get("prune_pass", 0.0) + time.perf_counter() - t

    def _dense_run(self, state: PruneState, layerwise: str, uniform: list[BlockPlan]) -> list[BlockPlan]:
        """`propagation="dense"`: one dense pass; blocks pruned from dense-input statistics."""
        if layerwise == "uniform":
            t = time.perf_counter()
            inputs = state.inputs0
            n = len(state.blocks)
            for i in tqdm(range(n), desc=f"{self.config.method} prune (dense)", leave=False):
                with state.runner.block_on_device(i):
                    stats = BlockStats(state.units[i])
                    with stats.collecting():
                        inputs = state.runner.forward(i, inputs, keep_outputs=i < n - 1)
                    self.prune_block(state, i, stats, uniform[i])
            state.timings["prune_pass"] = time.perf_counter() - t
            return uniform
        if layerwise == "owl-auto":
            raise OWLConfigError("`layerwise='owl-auto'` needs propagation='sequential'.")
        self.outlier_pass(state)
        plans = self.plan(state.outlier_ratios or [], len(state.blocks), state)
        t = time.perf_counter()
        for i in range(len(state.blocks)):
            with state.runner.block_on_device(i):
                self.prune_block(state, i, state.dense_stats[i], plans[i])
        state.timings["prune_pass"] = time.perf_counter() - t
        return plans

    def prune_block(self, state: PruneState, index: int, stats: BlockStats | None, plan: BlockPlan) -> None:
        """Apply the criterion to every unit of block `index`."""
        cfg = self.config
        for unit in state.units[index]:
            weight = unit.weight()
            if cfg.method == "sparsegpt":
                new, keep = sparsegpt_prune(
                    weight,
                    stats[unit.name].matrix(unit.shape[1], weight.device),
                    plan.sparsity,
                    plan.nm,
                    cfg.sparsegpt_blocksize,
                    cfg.sparsegpt_damp,
                    unit.name,
                )
                weight.copy_(new.to(weight.dtype))
            elif cfg.method == "wanda" and (plan.nm is not None or cfg.wanda_group == "row") and cfg.refine != "dsnot":
                # per-row comparison groups: scored and selected a band of rows at a time (same mask, small buffers)
                wanda_prune_(weight, stats[unit.name].norms(unit.shape[1], weight.device), plan.sparsity, plan.nm)
                continue
            else:
                if cfg.method == "wanda":
                    scores = wanda_scores(weight, stats[unit.name].norms(unit.shape[1], weight.device))
                    group = cfg.wanda_group
                else:
                    scores, group = magnitude_scores(weight), "layer"
                keep = keep_mask(scores, plan.sparsity, plan.nm, group)
                if cfg.refine == "dsnot" and stats is not None:
                    from .dsnot import dsnot_keep_mask

                    mean, mean_sq = stats[unit.name].moments(unit.shape[1], weight.device)
                    keep = dsnot_keep_mask(weight, keep, mean, mean_sq, plan.nm, cfg.dsnot_cycles, cfg.dsnot_threshold)
            apply_keep_mask_(weight, keep)

    # ------------------------------------------------------------------------------------------ report
    def _report(self, state: PruneState, plans: list[BlockPlan], calibration: dict[str, Any]) -> PruneReport:
        model = state.model
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
        report = PruneReport(
            config=self.config.to_dict(),
            model={"class": type(model).__name__, "name_or_path": name, "block_path": state.path},
            timings={k: round(v, 4) for k, v in state.timings.items()},
            warnings=list(state.warnings),
            calibration=calibration,
            candidates=list(state.candidates),
        )
        for i, units in enumerate(state.units):
            block_zeros = block_params = 0
            with self._block_scope(state, i):  # offloaded weights are meta tensors outside their block's context
                for u in units:
                    w = u.weight()
                    zeros = int((w == 0).sum())
                    block_zeros += zeros
                    block_params += w.numel()
                    report.modules.append(
                        ModuleReport(u.name, i, list(u.shape), round(plans[i].sparsity, 12), zeros / max(w.numel(), 1), w.numel())
                    )
            ratio = state.outlier_ratios[i] if state.outlier_ratios is not None else None
            report.blocks.append(
                BlockReport(
                    index=i,
                    name=f"{state.path}.{i}",
                    outlier_ratio=ratio,
                    target_sparsity=round(plans[i].sparsity, 12),
                    achieved_sparsity=block_zeros / max(block_params, 1),
                    num_params=block_params,
                    nm=list(plans[i].nm) if plans[i].nm else None,
                )
            )
            report.total_params += block_params
            report.total_zeros += block_zeros
        return report

    # ------------------------------------------------------------------------------------------ offload and resume
    # (docs/scale.md) Accelerate-dispatched models and `device=` go through optimum_owl.offload.BlockOffloader;
    # `checkpoint_dir` through optimum_owl.checkpointing.RunCheckpoint.
    _checkpoint = None

    def _setup_offload(self, model: nn.Module) -> None:
        if type(self)._block_context is not None:  # a subclass brings its own context
            return
        from .offload import make_block_offloader

        self._block_context = make_block_offloader(model, self.config.device, self.config.offload_folder)

    def _block_scope(self, state: PruneState, index: int) -> contextlib.AbstractContextManager:
        """Block `index` with real weights on its execution device (a no-op for models held in memory)."""
        if self._block_context is None:
            return contextlib.nullcontext()
        return self._block_context(index, state.blocks[index])

    def _open_checkpoint(self, state: PruneState) -> None:
        self._checkpoint = None
        if self.config.checkpoint_dir is not None:
            from .checkpointing import RunCheckpoint

            self._checkpoint = RunCheckpoint.open(self.config, state.path, state.units, state.inputs0)

    def _resume(self, state: PruneState, plans: list[BlockPlan]) -> tuple[int, list[Batch] | None]:
        if self._checkpoint is None:
            return 0, None
        start, inputs = self._checkpoint.resume(state.units, plans, lambda i: self._block_scope(state, i))
        if start:
            state.warnings.append(f"Resumed from checkpoint_dir after {start} finished blocks.")
        return start, inputs

    def _block_done(self, state: PruneState, index: int, next_inputs: list[Batch] | None) -> None:
        if self._checkpoint is not None:
            self._checkpoint.block_done(index, state.units[index], next_inputs)

    def _after_prune(self, model: nn.Module) -> None:
        """Let integrations (compact checkpoints) know the model is pruned."""
        try:
            from .integration.transformers import mark_pruned
        except ImportError:
            return
        mark_pruned(model, self.config)
