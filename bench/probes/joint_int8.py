"""Experiment: which mask should SparseGPT's joint prune-and-quantize sweep use (issue 27)?

`sparsegpt_math.sparsegpt_prune_int8` first runs SparseGPT's float sweep (W_f and its mask), then a second sweep
that quantizes every kept weight to the int8 grid and compensates the rounding like a pruning error. The SparseGPT
paper chooses the mask inside the quantizing sweep ("adaptive"); the library keeps the float sweep's mask ("fixed").
On random weights with correlated inputs (low rank + noise, and a decaying spectrum with a few outlier features, as
LLM activations have), this prints, per case, the relative output error ‖(R − Q)X‖_F / ‖R X‖_F of

- rounding W_f to nearest (RTN), the adaptive joint sweep and the fixed-mask joint sweep, against W_f (R = W_f: the
  error quantization adds), and
- the same three and W_f itself against the dense weight (R = W: pruning and quantization together),

and writes them to bench/results/joint_int8.json. Pure math, under a minute on 2 cores:

    python -m bench.probes.joint_int8

With `--model stories260K|smollm2` it prunes that real model instead (SparseGPT, uniform, the bench/quality.py
calibration and WikiText-2 protocol, at each `--sparsity`) three ways, float values, float values then rounded to
nearest (RTN, every matrix on its own kept max), and `values="int8"` (joint), and records each one's perplexity and
the report's mean quantization errors (bench/results/joint_int8_<model>.json):

    python -m bench.probes.joint_int8 --model smollm2 --sparsity 0.5 0.7
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench._common import RESULTS, machine_summary
from optimum_owl.algorithms.criteria import sparsegpt_math
from optimum_owl.algorithms.quantize import dequantize_int8, int8_scales, quantize_dequantize
from optimum_owl.utils import atomic_write_text

OUT = RESULTS / "joint_int8.json"
ROWS, COLS, SAMPLES, BLOCK = 64, 256, 2048, 64


def inputs(kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight `[ROWS, COLS]` and the Hessian XᵀX of `SAMPLES` correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    if kind == "low-rank":
        x = torch.randn(SAMPLES, 6, generator=g) @ torch.randn(6, COLS, generator=g)
        x += 0.05 * torch.randn(SAMPLES, COLS, generator=g)
    else:  # spectrum decaying as 1/k in a random basis, 4 outlier features 20x larger
        basis = torch.linalg.qr(torch.randn(COLS, COLS, generator=g))[0]
        spectrum = torch.arange(1, COLS + 1).float().pow(-1.0)
        x = torch.randn(SAMPLES, COLS, generator=g) * spectrum.sqrt() @ basis.t()
        x[:, :4] *= 20
    return torch.randn(ROWS, COLS, generator=g), x.t() @ x


def case(kind: str, seed: int, sparsity: float, group_size: int | None) -> dict[str, float]:
    weight, hessian = inputs(kind, seed)
    W, H, U = sparsegpt_math._prepare(weight, hessian, None, BLOCK, 0.01, "w")
    w_float, keep, _ = sparsegpt_math._sweep(W.clone(), U, sparsity, None, BLOCK)
    grid = (int8_scales(w_float, keep, group_size), group_size)
    _, _, rtn = quantize_dequantize(w_float, keep, group_size)
    _, _, adaptive = sparsegpt_math._sweep(W.clone(), U, sparsity, None, BLOCK, grid)
    _, _, fixed = sparsegpt_math._sweep(W.clone(), U, sparsity, None, BLOCK, grid, keep)
    library = sparsegpt_math.sparsegpt_prune_int8(weight, hessian, sparsity, None, BLOCK, group_size=group_size)
    if not torch.equal(library.codes, fixed):
        raise AssertionError("sparsegpt_prune_int8 no longer keeps the float sweep's mask; update this probe")
    err = sparsegpt_math._output_error
    q = {"rtn": rtn, "adaptive": dequantize_int8(adaptive, *grid), "fixed": dequantize_int8(fixed, *grid)}
    return {**{f"{k}_vs_float": err(w_float, v, H) for k, v in q.items()},
            **{f"{k}_vs_dense": err(W, v, H) for k, v in {"float": w_float, **q}.items()}}


def real(name: str, sparsities: list[float]) -> None:
    """Float, RTN and joint int8 SparseGPT on a real model: perplexities and quantization errors."""
    from bench import quality
    from bench._common import C4, real_model
    from optimum_owl import OWLPruner, OWLPrunerConfig
    from optimum_owl.pruning.int8 import round_unit
    from optimum_owl.pruning.modeling import get_blocks_and_units

    spec, out = quality.MODELS[name], RESULTS / f"joint_int8_{name}.json"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in sparsities:
            row: dict = {"sparsity": sparsity}
            for values in ("float", "int8"):
                model, tokenizer = real_model(name, Path(tmp))
                config = OWLPrunerConfig(sparsity=sparsity, method="sparsegpt", layerwise="uniform", values=values,
                                         num_samples=spec["num_samples"], seqlen=spec["seqlen"], seed=0)
                start = time.perf_counter()
                report = OWLPruner(config).prune(model, dataset=str(C4), tokenizer=tokenizer)
                key = "joint" if values == "int8" else "float"
                row[f"{key}_seconds"] = round(time.perf_counter() - start, 1)
                row[f"{key}_ppl"] = quality.evaluate(spec, model, tokenizer)
                if values == "int8":
                    row["mean_error"] = report.quantization["mean"]
                    continue
                for block in get_blocks_and_units(model)[2]:  # the float result rounded to nearest
                    for unit in block:
                        round_unit(unit, None)
                row["rtn_ppl"] = quality.evaluate(spec, model, tokenizer)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"command": f"python -m bench.probes.joint_int8 --model {name} --sparsity "
                         + " ".join(f"{s:g}" for s in sparsities),
              "date": datetime.date.today().isoformat(), "machine": machine_summary(), "model": spec["describe"],
              "calibration": f"C4, {spec['num_samples']} x {spec['seqlen']} tokens",
              "evaluation": f"WikiText-2 test, {spec['eval_windows']} windows of {spec['eval_seqlen']}", "rows": rows}
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["stories260K", "smollm2"], default=None)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    args = parser.parse_args()
    if args.model is not None:
        real(args.model, args.sparsity)
        return
    torch.manual_seed(0)
    rows = []
    for kind in ("low-rank", "decaying"):
        for sparsity in (0.5, 0.7):
            for group_size in (None, 64):
                for seed in range(3):
                    row = {"inputs": kind, "sparsity": sparsity, "group_size": group_size, "seed": seed,
                           **case(kind, seed, sparsity, group_size)}
                    rows.append(row)
                    print(" ".join(f"{k}={v:.5f}" if isinstance(v, float) and k.endswith(("float", "dense"))
                                   else f"{k}={v}" for k, v in row.items()), flush=True)
    ratio = {k: [r[f"{k}_vs_float"] / r["rtn_vs_float"] for r in rows] for k in ("adaptive", "fixed")}
    summary = {k: {"min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in ratio.items()}
    print("error added by quantization, joint / RTN:", json.dumps(summary, indent=1))
    result = {"command": "python -m bench.probes.joint_int8", "date": datetime.date.today().isoformat(),
              "machine": machine_summary(), "shape": [ROWS, COLS], "samples": SAMPLES, "blocksize": BLOCK,
              "joint_over_rtn_vs_float": summary, "cases": rows}
    atomic_write_text(OUT, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
