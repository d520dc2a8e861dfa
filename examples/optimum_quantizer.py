"""The Optimum-style flow: `OWLPruner.from_pretrained(model_path, config).quantize(save_dir, dataset=...)` loads,
prunes and saves (model, tokenizer, owl_report.json, owl_config.json) in one call.

Runs offline in a few seconds on CPU:

    python examples/optimum_quantizer.py
    python examples/optimum_quantizer.py --save-dir stories-owl --method sparsegpt

It follows Optimum's GPTQ pattern (`GPTQQuantizer(...).quantize_model(...)`), see docs/optimum.md. Calibration here
is *text*: `quantize` tokenises it with the tokenizer that `from_pretrained` found next to the model.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import optimum_owl  # noqa: F401  (registers quant_method="owl", needed to reload the compact checkpoint)
from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.demo import bundled_model_path, generate_token_windows
from optimum_owl.repair import block_sparsity

logger = logging.getLogger("optimum_quantizer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(bundled_model_path()), help="model folder (default: bundled stories260K)")
    p.add_argument("--sparsity", type=float, default=0.7, help="target mean sparsity (default 0.7)")
    p.add_argument("--method", default="wanda", help="wanda | sparsegpt | magnitude (default wanda)")
    p.add_argument("--num-samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window (default 128)")
    p.add_argument("--save-dir", default=None, help="where to save the pruned model (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace, save_dir: Path) -> int:
    config = OWLPrunerConfig(
        sparsity=args.sparsity, method=args.method, layerwise="owl", num_samples=args.num_samples,
        seqlen=args.seqlen, seed=args.seed,
    )
    # 1. Load: `from_pretrained` takes a path (loads model and tokenizer) or an already loaded model.
    pruner = OWLPruner.from_pretrained(args.model, config, dtype=torch.float32)
    if pruner.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; this example calibrates on text and needs one.")

    # Calibration texts written by the dense model. Each document is twice `seqlen` tokens long, so a random window
    # of `seqlen` tokens fits in it after decoding and re-tokenising. A .txt/.jsonl path works the same way.
    ids = generate_token_windows(pruner.model, pruner.tokenizer, args.num_samples, 2 * args.seqlen, seed=args.seed)
    texts = pruner.tokenizer.batch_decode(ids, skip_special_tokens=True)

    # 2. Prune and save in one call (atomic: a temporary folder, then one rename).
    report = pruner.quantize(save_dir, dataset=texts)
    print(report.to_markdown())

    # 3. The folder is an ordinary transformers checkpoint in optimum-owl's compact format.
    print("saved files:", ", ".join(sorted(p.name for p in save_dir.iterdir())))
    reloaded = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32)
    _, sparsity = block_sparsity(reloaded)  # counted on the reloaded weights, not taken from the report
    print(f"reloaded from {save_dir}: sparsity {sparsity:.4f} (report: {report.sparsity:.4f})")
    if abs(sparsity - report.sparsity) > 1e-6:
        print("FAILED: the reloaded model's sparsity differs from the report")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.save_dir is not None:
        return run(args, Path(args.save_dir))
    with tempfile.TemporaryDirectory(prefix="owl-quantize-") as tmp:
        return run(args, Path(tmp) / "pruned")


if __name__ == "__main__":
    raise SystemExit(main())
