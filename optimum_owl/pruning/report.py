"""`PruneReport`: what a pruning run did, per block and per weight matrix, serialisable to JSON and Markdown."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils import atomic_write_text
from .search.windows import holdout_count

REPORT_NAME = "owl_report.json"
REPORT_VERSION = 1


@dataclass
class ModuleReport:
    """One pruned weight matrix (a linear, a Conv1D, or one expert of a fused MoE layer)."""

    name: str
    block: int
    shape: list[int]
    target_sparsity: float
    achieved_sparsity: float
    num_params: int


@dataclass
class BlockReport:
    """One transformer block: its outlier ratio (a fraction of its weights), and its target and achieved sparsity."""

    index: int
    name: str
    outlier_ratio: float | None
    target_sparsity: float
    achieved_sparsity: float
    num_params: int
    nm: list[int] | None = None
    metric: float | None = None  # the allocation family's block metric (`PruneReport.allocation["metric"]` names it)
    attention_sparsity: float | None = None  # with `attention_shift`: target of the attention projections
    mlp_sparsity: float | None = None  # with `attention_shift`: target of the block's other matrices


@dataclass
class Candidate:
    """One allocation tried by `layerwise="owl-auto"` or `"auto"`, and its held-out loss (nats per token).

    `layerwise` is the family, with ", screened" for the cheap screening; `owl_m`/`owl_lambda` are set for OWL;
    `family` and `knob` name any family's setting. For the exact candidates other than uniform, `gain_z` is the
    held-out gain over uniform in standard errors of the mean paired chunk difference (the choice needs > 2; None:
    a gain with no spread) and `window_z` the same over whole windows (for comparison; not used to choose)."""

    layerwise: str
    owl_m: float | None
    owl_lambda: float | None
    loss: float
    chosen: bool = False
    family: str | None = None
    knob: dict[str, float] | None = None
    gain_z: float | None = None
    window_z: float | None = None

    @property
    def setting(self) -> str:
        """'uniform', 'owl M=5, λ=0.08', 'dlp dlp_alpha=0.15', ..."""
        family = self.family or self.layerwise.replace(", screened", "")
        if self.knob:
            return family + " " + ", ".join(f"{k}={v:g}" for k, v in self.knob.items())
        if self.owl_m is not None:
            return f"{family} owl_m={self.owl_m:g}, owl_lambda={self.owl_lambda:g}"
        return family


@dataclass
class PruneReport:
    """Result of `OWLPruner.prune`.

    Attributes:
        config: the `OWLPrunerConfig` as a dict.
        model: model class and name/path.
        blocks: per-block outlier ratio, target and achieved sparsity.
        modules: per-matrix achieved sparsity.
        total_params / total_zeros / sparsity: totals over the prunable weights.
        timings: seconds per phase (`calibration_data`, `capture`, `outlier_pass`, `prune_pass`, ..., `total`); a
            phase run inside another is keyed "outer/inner" (`auto_exact/prune_pass`) and is part of the outer one's
            time, so the keys without "/" add up to at most `total` (`timing_text`).
        candidates: the (M, λ) settings tried by `owl-auto`, with their held-out losses.
        allocation: the allocation actually applied: `family` ("uniform", "owl", "dlp", "alphapruning", "atp"),
            its `knob` (name -> value) and the name of its block `metric` (None when it has none).
        warnings: warnings raised during the run (also logged).
        evaluation: perplexity before and after (`text`, `seqlen`, `max_windows`, `dense_ppl`, `pruned_ppl`), and
            under `zero_shot` the lm-evaluation-harness results added by `optimum_owl.evaluation.record_zero_shot`.
        quantization: with `values="int8"` (empty otherwise, and then not written): `values`, `group_size`, how the
            values were quantized (`quantized`: "rtn" round to nearest, or "joint" inside SparseGPT's sweep), what
            the relative errors measure (`error`: "weights" ‖W−Q‖_F/‖W‖_F, or "outputs" ‖(W_f−Q)X‖_F/‖W_f X‖_F on
            the calibration inputs, W_f the float-valued SparseGPT result), their `mean` over the matrices and, per
            matrix, `layers` `{name: {"rtn": ..., "joint": ...}}`.
    """

    config: dict[str, Any]
    model: dict[str, Any]
    blocks: list[BlockReport] = field(default_factory=list)
    modules: list[ModuleReport] = field(default_factory=list)
    total_params: int = 0
    total_zeros: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    allocation: dict[str, Any] = field(default_factory=dict)
    version: int = REPORT_VERSION
    quantization: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over all prunable weights."""
        return self.total_zeros / self.total_params if self.total_params else 0.0

    @property
    def block_sparsities(self) -> list[float]:
        return [b.target_sparsity for b in self.blocks]

    # --------------------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not self.quantization:
            del out["quantization"]  # float values: the report is written as before int8 values existed
        out["sparsity"] = self.sparsity
        return out

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneReport:
        data = dict(data)
        data.pop("sparsity", None)
        data["blocks"] = [BlockReport(**b) for b in data.get("blocks", [])]
        data["modules"] = [ModuleReport(**m) for m in data.get("modules", [])]
        data["candidates"] = [Candidate(**c) for c in data.get("candidates", [])]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> PruneReport:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON; `path` may be a directory (then `owl_report.json` inside it)."""
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_NAME
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruneReport:
        path = Path(path)
        if path.is_dir():
            path = path / REPORT_NAME
        return cls.from_json(path.read_text())

    # --------------------------------------------------------------------------------------------- rendering
    def block_table(self) -> str:
        """The per-block allocation as a Markdown table."""
        show_nm = any(b.nm for b in self.blocks)
        metric = self.allocation.get("metric") if any(b.metric is not None for b in self.blocks) else None
        split = any(b.attention_sparsity is not None for b in self.blocks)
        head = "| block | outlier ratio |" + (f" {metric} |" if metric else "") + " target sparsity |"
        head += (" attention target | MLP target |" if split else "") + " achieved sparsity |" + (" N:M |" if show_nm else "")
        sep = "|---:|---:|" + ("---:|" if metric else "") + "---:|" + ("---:|---:|" if split else "") + "---:|"
        sep += "---:|" if show_nm else ""
        rows = [head, sep]
        for b in self.blocks:
            ratio = "–" if b.outlier_ratio is None else f"{b.outlier_ratio:.4%}"
            row = f"| {b.index} | {ratio} |"
            if metric:
                row += " – |" if b.metric is None else f" {b.metric:.4g} |"
            row += f" {b.target_sparsity:.4f} |"
            if split:
                row += " – | – |" if b.attention_sparsity is None else f" {b.attention_sparsity:.4f} | {b.mlp_sparsity:.4f} |"
            row += f" {b.achieved_sparsity:.4f} |"
            if show_nm:
                row += f" {b.nm[0]}:{b.nm[1]} |" if b.nm else " – |"
            rows.append(row)
        return "\n".join(rows)

    def timing_text(self) -> str:
        """Seconds per phase, adding up to the total: each top-level phase once, with the phases run inside it (keys
        "outer/inner", already part of its time) in brackets, then what no phase covers ("other")."""
        top = {k: v for k, v in self.timings.items() if "/" not in k and k != "total"}
        parts = []
        for key, seconds in top.items():
            inner = [f"{k.split('/', 1)[1]} {v:.2f}" for k, v in self.timings.items() if k.startswith(key + "/")]
            parts.append(f"{key} {seconds:.2f}" + (f" (of which {', '.join(inner)})" if inner else ""))
        if "total" not in self.timings:
            return ", ".join(parts)
        total = self.timings["total"]
        return f"total {total:.2f} = " + " + ".join([*parts, f"other {max(total - sum(top.values()), 0.0):.2f}"])

    def candidate_table(self) -> str:
        """The search's candidates as a Markdown table, screened rows and exact rows labelled, after a note saying
        how they differ and what "gain z" is."""
        held = self.calibration.get("holdout_windows")
        screened_on = held
        if held is not None and not str(self.calibration.get("holdout", "")).startswith("held out"):
            num, fraction = self.calibration.get("num_samples"), self.config.get("auto_holdout")
            if num is not None and fraction is not None:  # separate windows: the screening scores on the first ones
                screened_on = min(int(held), holdout_count(int(num), float(fraction)))
        few = f"the first {screened_on} of the {held} held-out windows" if held is not None else "held-out windows"
        every = f"all {held} held-out windows" if held is not None else "every held-out window"
        note = (
            f"Candidates, by held-out loss (nats per token, lower is better). *Screened* rows: a quick prune from the "
            f"uniform run's input norms, scored on {few}, to rank the settings; *exact* rows: pruned for real and "
            f"scored on {every}, so a setting's screened and exact losses differ. *gain z*: how many standard errors "
            "(of the mean paired difference over short chunks of the held-out tokens) an exact candidate's loss is "
            "below exact uniform's; a candidate replaces uniform only above 2."
        )
        stage = {True: "screened" + (f" ({screened_on} windows)" if held is not None else ""),
                 False: "exact" + (f" ({held} windows)" if held is not None else "")}
        rows = [note, "", "| stage | setting | held-out loss | gain z | chosen |", "|---|---|---:|---:|:---:|"]
        for c in self.candidates:
            z = "–" if c.gain_z is None else f"{c.gain_z:.2f}"
            rows.append(f"| {stage[c.layerwise.endswith(', screened')]} | {c.setting} | {c.loss:.4f} | {z} | "
                        f"{'✓' if c.chosen else ''} |")
        return "\n".join(rows)

    def _target_text(self) -> str:
        """The mean target: `sparsity`, or 1 − N/M for an N:M pattern (which does not use `sparsity`)."""
        cfg = self.config
        pattern = str(cfg.get("pattern") or "unstructured")
        if ":" in pattern:
            n, m = (int(x) for x in pattern.split(":"))
            mixed = " per-block N, mean" if cfg.get("nm_mixed") else ""
            return f"{1 - n / m:g} (N:M {pattern}{mixed}; `sparsity` is not used)"
        return f"{cfg.get('sparsity')}"

    def to_markdown(self) -> str:
        cfg = self.config
        lines = [
            "## OWL pruning report",
            "",
            f"- model: `{self.model.get('name_or_path') or self.model.get('class')}` ({self.model.get('class')})",
            f"- method: {cfg.get('method')}, layerwise: {cfg.get('layerwise')}, pattern: {cfg.get('pattern')}, "
            + (
                f"M={cfg.get('owl_m')}, λ={cfg.get('owl_lambda')}"
                if not self.allocation.get("knob")
                else ", ".join(f"{k}={v}" for k, v in self.allocation["knob"].items())
            )
            + (f", attention_shift={cfg['attention_shift']}" if cfg.get("attention_shift") else ""),
            f"- target sparsity: {self._target_text()}; achieved: {self.sparsity:.4f} "
            f"({self.total_zeros:,} of {self.total_params:,} prunable weights are zero)",
        ]
        if self.calibration:
            lines.append(
                f"- calibration: {self.calibration.get('num_samples')} × {self.calibration.get('seqlen')} tokens "
                f"from {self.calibration.get('source')}"
                + (f"; candidates scored on {self.calibration['holdout_windows']} windows {self.calibration['holdout']}"
                   if "holdout_windows" in self.calibration else "")
            )
        ev = self.evaluation
        if ev.get("pruned_ppl") is not None:
            first = f", first {ev['max_windows']} windows" if ev.get("max_windows") else ""
            dense = "–" if ev.get("dense_ppl") is None else f"{ev['dense_ppl']:.3f}"
            lines.append(
                f"- perplexity on {ev.get('text')} (seqlen {ev.get('seqlen')}{first}): dense {dense}, "
                f"pruned {ev.get('pruned_ppl'):.3f}"
            )
        for task, row in (ev.get("zero_shot") or {}).get("tasks", {}).items():  # `evaluation.record_zero_shot`
            lines.append(f"- {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if not k.endswith("_stderr")))
        if self.quantization:
            q = self.quantization
            means = ", ".join(f"{k} {v:.4g}" for k, v in q.get("mean", {}).items())
            scales = f"group size {q['group_size']}" if q.get("group_size") else "one scale per row"
            lines.append(f"- values: int8 ({q.get('quantized')}, {scales}); mean relative quantization error of the "
                         f"{q.get('error')}: {means}")
        if self.timings:
            lines.append("- time (s): " + self.timing_text())
        lines += ["", self.block_table()]
        if self.candidates:
            lines += ["", self.candidate_table()]
        if self.warnings:
            lines += ["", "Warnings:"] + [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"
