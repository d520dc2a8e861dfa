"""Experiment: is the float-order sensitivity of SparseGPT on SmolLM2 (docs/benchmarks-history.md) the float32
factorisation?

Prunes SmolLM2-135M with SparseGPT, uniform allocation, 16 x 256 C4 calibration (the quality table's setting), with
the damped Hessian factorised (Cholesky, inverse, Cholesky) in float64 instead of float32, under the given
thread count and batch size, and prints the WikiText-2 perplexity. The library itself factorises in float32, as
the reference code does; this script patches that one function for the run only.

    python -m bench.probes.sparsegpt_float64 2:8:0.7 1:8:0.7 1:4:0.7 2:8:0.8 1:8:0.8   # threads:batch:sparsity
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import quality
from bench._common import C4, RESULTS, real_model
from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.algorithms.criteria import sparsegpt_math
from optimum_owl.utils import atomic_write_text

OUT = RESULTS / "sparsegpt_float64.json"
_library_factorisation = sparsegpt_math._upper_cholesky_of_inverse  # float32 as given


def _float64_factorisation(hessian: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    return _library_factorisation(hessian.double(), damp, name).float()


def main() -> None:
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    sparsegpt_math._upper_cholesky_of_inverse = _float64_factorisation
    spec = quality.MODELS["smollm2"]
    with tempfile.TemporaryDirectory() as tmp:
        for run in sys.argv[1:]:
            threads, batch, sparsity = run.split(":")
            torch.set_num_threads(int(threads))
            model, tokenizer = real_model("smollm2", Path(tmp))
            config = OWLPrunerConfig(sparsity=float(sparsity), method="sparsegpt", layerwise="uniform",
                                     num_samples=16, seqlen=256, seed=0, batch_size=int(batch))
            start = time.perf_counter()
            OWLPruner(config).prune(model, dataset=str(C4), tokenizer=tokenizer)
            torch.set_num_threads(2)
            ppl = quality.evaluate(spec, model, tokenizer)
            results[run] = {"ppl": ppl, "seconds": time.perf_counter() - start, "factorisation": "float64"}
            print(f"{run}: WikiText-2 ppl {ppl:.2f}", flush=True)
            atomic_write_text(OUT, json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
