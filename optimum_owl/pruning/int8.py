"""int8 values in a pruning run (`OWLPrunerConfig(values="int8")`): every pruned unit's kept weights end on the int8
grid of `algorithms.quantize`, the model holding `code * scale` (float32, cast to its dtype), so everything after a
block is pruned (the next block's inputs, the searches' held-out losses, an evaluation) sees the int8 model.

- A criterion that quantizes in its own loop (SparseGPT, jointly) leaves the weight on the grid and hands back its
  scales and errors (`PruneTask.scales`, `.errors`); every other criterion's kept weights are rounded to nearest here
  (`finish_unit`), their scales taken over the kept weights only.
- The scales of each `nn.Linear` / GPT-2 `Conv1D` weight are recorded on its module (`formats.int8.set_int8_grid`),
  so that the compact checkpoint stores int8 codes (`owl-bitmask-v2`) that give these weights back bit for bit. Fused
  MoE experts get int8-grid values too but are saved as float values (the compact format stores linear weights only).
- The searches' screening (a cheap proxy prune) does not quantize; every candidate they prune exactly does, and a
  winner rebuilt from its packed masks is rounded again (`search.snapshots.restore_masked`), as is a block restored
  by a resumed run, on its saved scales (`resume.ResumeState`).
- The quantization error of every unit goes to the report (`summary`): for a criterion that quantizes jointly, the
  relative error of the layer's outputs on the calibration inputs, ‖(W_f − Q)X‖_F / ‖W_f X‖_F, both for rounding its
  float result W_f to nearest (`rtn`) and for the joint result (`joint`); for the others, the relative error of the
  weights, ‖W − Q‖_F / ‖W‖_F, of rounding to nearest (`rtn`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..algorithms.criteria import PruneTask
from ..algorithms.quantize import dequantize_int8, int8_scales, quantize_int8, relative_error
from ..formats.int8 import set_int8_grid
from .modeling import Unit

logger = logging.getLogger(__name__)

# the unit's quantization record in `RunState.int8`: (scales, errors)
Record = tuple[torch.Tensor, dict[str, float]]


def quantize_to(unit: Unit, scales: torch.Tensor, group_size: int | None) -> None:
    """Put `unit`'s kept (non-zero) weights on the grid of `scales`, in place (pruned zeros stay zero)."""
    w = unit.weight()
    scales = scales.to(w.device)
    codes = quantize_int8(w, scales, group_size) * (w != 0).to(torch.int8)
    w.copy_(dequantize_int8(codes, scales, group_size, w.dtype))


def record_grid(unit: Unit, scales: torch.Tensor, group_size: int | None) -> None:
    """Record the grid on the unit's module for the compact checkpoint (linear and Conv1D weights only)."""
    if unit.kind in ("linear", "conv1d") and unit.expert is None and unit.param_name == "weight":
        set_int8_grid(unit.module, scales, group_size)


def finish_unit(unit: Unit, task: PruneTask, group_size: int | None) -> Record:
    """After the criterion pruned `unit` (`task`): round its kept weights to nearest unless the criterion quantized
    them itself, record the grid; returns the unit's `(scales, errors)`."""
    if task.scales is None:
        return round_unit(unit, group_size)
    scales, errors = task.scales.detach().to("cpu", torch.float32), dict(task.errors)
    record_grid(unit, scales, group_size)
    return scales, errors


def round_unit(unit: Unit, group_size: int | None) -> Record:
    """Round `unit`'s kept weights to nearest on scales from its kept weights, record the grid; `(scales, errors)`."""
    w = unit.weight()
    before = w.detach().clone()
    scales = int8_scales(w, w != 0, group_size)
    quantize_to(unit, scales, group_size)
    scales = scales.cpu()
    record_grid(unit, scales, group_size)
    return scales, {"rtn": relative_error(before, w)}


def summary(records: dict[str, Record], units: list[list[Unit]], values: str, group_size: int | None) -> dict[str, Any]:
    """The report's `quantization` entry: per unit (in block order) its errors, and their mean over the units."""
    layers = {u.name: {k: round(v, 8) for k, v in records[u.name][1].items()}
              for block in units for u in block if u.name in records}
    ways = sorted({k for errors in layers.values() for k in errors}, key=lambda k: (k != "rtn", k))
    mean = {}
    for way in ways:
        errors = [e[way] for e in layers.values() if way in e]
        mean[way] = round(math.fsum(errors) / len(errors), 8)
    joint = "joint" in ways
    return {"values": values, "group_size": group_size, "quantized": "joint" if joint else "rtn",
            "error": "outputs" if joint else "weights", "mean": mean, "layers": layers}


def log_summary(entry: dict[str, Any]) -> None:
    means = ", ".join(f"{k} {v:.4g}" for k, v in entry["mean"].items())
    what = ("‖(W−Q)X‖/‖WX‖ on the calibration inputs" if entry["error"] == "outputs" else "‖W−Q‖/‖W‖ of the weights")
    logger.info("int8 values (%s, group size %s): mean relative quantization error over %d matrices: %s (%s)",
                entry["quantized"], entry["group_size"] or "per row", len(entry["layers"]), means, what)
