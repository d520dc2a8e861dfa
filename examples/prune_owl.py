"""Prune the bundled stories260K Llama with OWL + Wanda and compare perplexity before and after.

Runs offline in a few seconds on CPU:

    python examples/prune_owl.py
    python examples/prune_owl.py --sparsity 0.6 --layerwise uniform      # the baseline OWL improves on
    python examples/prune_owl.py --calibration ../shared/assets/text/c4_train_first1000.jsonl

Without `--calibration`, the calibration windows are sampled from the dense model itself (seeded), and the
perplexity is measured on other windows sampled with a different seed, so nothing has to be downloaded.
"""

from __future__ import annotations

import argparse
import logging

from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.demo import generate_token_windows, load_bundled_model
from optimum_owl.evaluation import perplexity, perplexity_of_ids

logger = logging.getLogger("prune_owl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.7, help="target mean sparsity (default 0.7)")
    p.add_argument("--method", default="wanda", help="wanda | sparsegpt | magnitude (default wanda)")
    p.add_argument("--layerwise", default="owl", help="owl | uniform | owl-auto (default owl)")
    p.add_argument("--num-samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window (default 128)")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out generated windows for perplexity (default 8)")
    p.add_argument("--calibration", default=None, help=".txt/.jsonl file to calibrate on instead of generated text")
    p.add_argument("--eval-text", default=None, help=".txt/.jsonl file to also measure perplexity on")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # 1. The real pretrained 260K-parameter Llama shipped inside the package (no download).
    model, tokenizer = load_bundled_model()
    model.eval()

    # 2. Calibration data: a LongTensor [num_samples, seqlen] of text the dense model writes itself, or a file
    #    (OWLPruner then samples `num_samples` random windows of `seqlen` tokens from it, seeded).
    if args.calibration is None:
        logger.info("Sampling %d calibration windows of %d tokens from the dense model", args.num_samples, args.seqlen)
        calibration = generate_token_windows(model, tokenizer, args.num_samples, args.seqlen, seed=args.seed)
    else:
        calibration = args.calibration
    # Held-out evaluation text: other generated windows (another seed), as one flat stream of token ids.
    heldout = generate_token_windows(model, tokenizer, args.eval_windows, args.seqlen, seed=args.seed + 1000).reshape(-1)

    def measure() -> dict[str, float]:
        ppl = {"generated": perplexity_of_ids(model, heldout, seqlen=args.seqlen, batch_size=8)}
        if args.eval_text:
            ppl["eval text"] = perplexity(model, tokenizer, args.eval_text, seqlen=args.seqlen, max_windows=16, add_bos=True)
        return ppl

    dense = measure()

    # 3. Prune in place. The config is validated here; a bad value raises OWLConfigError naming the field.
    config = OWLPrunerConfig(
        sparsity=args.sparsity,
        method=args.method,
        layerwise=args.layerwise,
        owl_m=5.0,  # the paper's M: a score above 5x the block's mean score is an outlier
        owl_lambda=0.08,  # the paper's λ: block sparsities span 2λ around the target
        num_samples=args.num_samples,
        seqlen=args.seqlen,
        seed=args.seed,
    )
    OWLPruner.apply(model, config, dataset=calibration, tokenizer=tokenizer)
    report = model.owl_report  # a PruneReport: per-block outlier ratio, target and achieved sparsity, timings

    pruned = measure()

    # 4. Results.
    print(report.to_markdown())
    print()
    for name in dense:
        print(f"perplexity ({name}): dense {dense[name]:.3f} -> pruned {pruned[name]:.3f}")
    print(f"achieved sparsity: {report.sparsity:.4f} (target {config.target_sparsity})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
