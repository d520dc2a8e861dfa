"""`optimum-owl prune`: prune a local model folder or Hub id and save it with its report."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments that map one-to-one onto `OWLPrunerConfig` fields."""
    g = p.add_argument_group("pruning")
    g.add_argument("--sparsity", type=float, default=0.7, help="target mean sparsity in [0, 1) (default 0.7)")
    g.add_argument("--method", default="wanda", help="wanda | sparsegpt | magnitude")
    g.add_argument("--layerwise", default="owl", help="owl | uniform | owl-auto")
    g.add_argument("--owl-m", type=float, default=5.0, help="the paper's M (outlier threshold multiple)")
    g.add_argument("--owl-lambda", type=float, default=0.08, help="the paper's λ (spread of block sparsities is 2λ)")
    g.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M (N non-zeros kept per M), e.g. 2:4")
    g.add_argument("--nm-mixed", action="store_true", help="with OWL and N:M: per-block N (mean kept at N/M)")
    g.add_argument("--propagation", default="sequential", help="sequential (exact) | dense (faster approximation)")
    g.add_argument("--num-samples", type=int, default=128)
    g.add_argument("--seqlen", type=int, default=2048)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--block-name", default=None, help="dotted path of the block list, e.g. model.layers")
    g.add_argument("--ignore", action="append", default=[], help="module-name glob (or re:regex) never pruned")
    g.add_argument("--text-column", default="text")


def config_from_args(args: argparse.Namespace):
    from ..config import OWLPrunerConfig

    return OWLPrunerConfig(
        sparsity=args.sparsity, method=args.method, layerwise=args.layerwise, owl_m=args.owl_m,
        owl_lambda=args.owl_lambda, pattern=args.pattern, nm_mixed=args.nm_mixed, propagation=args.propagation,
        num_samples=args.num_samples, seqlen=args.seqlen, batch_size=args.batch_size, seed=args.seed,
        block_name=args.block_name, ignore=args.ignore, text_column=args.text_column,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prune",
        help="prune a model and save it with owl_report.json",
        description="Prune MODEL (local folder or Hub id) and write it, its tokenizer, owl_report.json and "
        "owl_config.json to --output-dir (atomically).",
    )
    p.add_argument("model", help="local model folder or Hub id")
    p.add_argument("--calibration", "--dataset", dest="calibration", required=False, default=None,
                   help="calibration source: .txt/.jsonl path or a datasets name (not needed for uniform magnitude)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (defaults to MODEL)")
    p.add_argument("--output-dir", "-o", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    p.add_argument("--eval-text", default=None, help=".txt/.jsonl to measure perplexity on, before and after")
    p.add_argument("--eval-seqlen", type=int, default=None, help="window for --eval-text (default: --seqlen)")
    p.add_argument("--eval-max-windows", type=int, default=None)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..data import load_tokenizer
    from ..evaluation import perplexity
    from ..pruner import OWLPruner
    from ..saving import load_model, save_pruned

    config = config_from_args(args)  # validate before loading anything
    if Path(args.output_dir).exists() and not args.overwrite:
        raise FileExistsError(f"--output-dir {args.output_dir} exists; pass --overwrite to replace it.")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_model(args.model, dtype=dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    eval_seqlen = args.eval_seqlen or args.seqlen
    before = None
    if args.eval_text:
        before = perplexity(model, tokenizer, args.eval_text, seqlen=eval_seqlen, max_windows=args.eval_max_windows)
    report = OWLPruner(config).prune(model, dataset=args.calibration, tokenizer=tokenizer)
    if args.eval_text:
        after = perplexity(model, tokenizer, args.eval_text, seqlen=eval_seqlen, max_windows=args.eval_max_windows)
        report.evaluation = {"text": args.eval_text, "seqlen": eval_seqlen, "dense_ppl": before, "pruned_ppl": after}
    save_pruned(model, args.output_dir, report=report, config=config, tokenizer=tokenizer, overwrite=args.overwrite)
    print(report.to_markdown())
    if args.eval_text:
        print(f"perplexity on {args.eval_text}: dense {before:.3f} -> pruned {after:.3f}")
    print(f"saved to {args.output_dir}")
    return 0
