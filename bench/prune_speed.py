"""Prune-time / dense-forward-time ratios on a ~100M-parameter random Llama, measured in one run.

Baseline: one dense forward of the same calibration batches through all blocks (the runner's own forward, after
capturing block-0 inputs), measured again right before each variant. Each variant prunes a fresh copy of the same
model with the same data: windows drawn from random token documents, more of them than the calibration windows
need, so that the searches score on windows beyond the calibration windows as they do on a real text source.

    python -m bench.prune_speed --num-samples 64 --seqlen 512
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch

from bench._common import random_llama
from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.pruning.data import get_calibration_data
from optimum_owl.pruning.modeling import find_blocks
from optimum_owl.pruning.runner import BlockRunner

VARIANTS = {
    "owl_wanda_exact": dict(method="wanda", layerwise="owl"),
    "owl_wanda_dense": dict(method="wanda", layerwise="owl", propagation="dense"),
    "uniform_wanda": dict(method="wanda", layerwise="uniform"),
    "owl_sparsegpt": dict(method="sparsegpt", layerwise="owl"),
    "owl_wanda_auto": dict(method="wanda", layerwise="owl-auto"),
    "wanda_auto": dict(method="wanda", layerwise="auto"),
}


@torch.no_grad()
def dense_forward_time(model, ids, batch_size: int) -> float:
    _, blocks = find_blocks(model)
    runner = BlockRunner(model, blocks)
    inputs = runner.capture(ids, batch_size)
    start = time.perf_counter()
    for i in range(len(blocks)):
        inputs = runner.forward(i, inputs)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--json", default=None)
    p.add_argument("--documents", type=int, default=None,
                   help="random token documents of seqlen + 8 tokens the calibration windows are drawn from (default: 4 × "
                   "--num-samples, so that the searches can draw their held-out windows beyond the calibration windows)")
    args = p.parse_args()
    model = random_llama(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, heads=args.heads,
                         vocab=args.vocab, max_positions=4096)
    params = sum(p.numel() for p in model.parameters())
    documents = torch.randint(0, args.vocab, (args.documents or 4 * args.num_samples, args.seqlen + 8),
                              generator=torch.Generator().manual_seed(1))
    ids = get_calibration_data(documents, None, args.num_samples, args.seqlen, seed=0)  # what every variant calibrates on
    base = dense_forward_time(model, ids, args.batch_size)
    results = {"params": params, "num_samples": args.num_samples, "seqlen": args.seqlen, "documents": documents.shape[0],
               "threads": torch.get_num_threads(),
               "dense_forward_s": round(base, 3), "machine": platform.platform(), "variants": {}}
    print(f"model {params / 1e6:.1f}M params; dense forward through blocks: {base:.2f} s")
    for name in args.variants:
        # the machine may be shared: measure the baseline right before and right after each variant and divide by
        # their mean (both are recorded)
        before = dense_forward_time(model, ids, args.batch_size)
        m = copy.deepcopy(model)
        config = OWLPrunerConfig(sparsity=0.7, num_samples=args.num_samples, seqlen=args.seqlen,
                                 batch_size=args.batch_size, **VARIANTS[name])
        start = time.perf_counter()
        report = OWLPruner(config).prune(m, dataset=documents)
        elapsed = time.perf_counter() - start
        del m
        after = dense_forward_time(model, ids, args.batch_size)
        base = (before + after) / 2
        results["variants"][name] = {"seconds": round(elapsed, 3), "baseline_s": round(base, 3),
                                     "baseline_before_after_s": [round(before, 3), round(after, 3)],
                                     "ratio": round(elapsed / base, 3),
                                     "sparsity": round(report.sparsity, 4), "timings": report.timings,
                                     "holdout": {k: v for k, v in report.calibration.items() if k.startswith("holdout")}}
        print(f"{name:18s} {elapsed:8.2f} s  ratio {elapsed / base:5.2f}x  (baseline {before:.2f}/{after:.2f} s)  "
              f"sparsity {report.sparsity:.4f}  {report.timings}", flush=True)
    done = results["variants"]
    for name, key in (("owl_wanda_auto", "auto_over_exact_owl"), ("wanda_auto", "wide_auto_over_exact_owl")):
        if name in done and "owl_wanda_exact" in done:
            # the searches' cost bounds are stated against one exact OWL run, measured in the same process
            rel = done[name]["ratio"] / done["owl_wanda_exact"]["ratio"]
            results[key] = round(rel, 3)
            print(f"{VARIANTS[name]['layerwise']} / exact OWL (baseline-normalised): {rel:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
