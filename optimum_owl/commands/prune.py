"""`optimum-owl prune`: prune a local model folder or Hub id and save it with its report. Its `OWLPrunerConfig` flags
(help groups, help texts, defaults) are built from the config's fields by `optimum_owl.config_flags`."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..config_flags import add_config_arguments, config_from_args
from ..validation import SAVE_FORMATS, check_save_format
from . import (
    add_model_source_arguments,
    args_input_paths,
    dtype_arg,
    existing_file,
    int_at_least,
    load_model_arg,
    load_tokenizer_arg,
)

logger = logging.getLogger(__name__)


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
    add_model_source_arguments(p, tokenizer_help="tokenizer path (defaults to MODEL); loaded only when text is read "
                               "(calibration, --eval-text) or given explicitly")
    p.add_argument("--output-dir", "-o", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    p.add_argument("--eval-text", default=None, type=existing_file, help=".txt/.jsonl to measure perplexity on, before and after")
    p.add_argument("--eval-seqlen", type=int_at_least(2), default=None,
                   help="window for --eval-text, at least 2 (default: --seqlen)")
    p.add_argument("--eval-max-windows", type=int_at_least(1), default=None,
                   help="--eval-text: evaluate only the first N windows")
    p.add_argument("--dtype", default="auto", type=dtype_arg,
                   help="dtype to load and prune in: auto (the checkpoint's own, default) | float32 | bfloat16 | float16")
    p.add_argument("--allow-pruned", action="store_true",
                   help="prune MODEL even if its block weights are already sparse (the sparsities compound)")
    p.add_argument("--format", choices=SAVE_FORMATS, default=None,
                   help="checkpoint format: compact (default: optimum-owl's bitmask format, loading needs `import "
                   "optimum_owl`), compressed-tensors (its sparse-bitmask layout, read by compressed-tensors <= 0.14 "
                   "and by optimum-owl's load_sparse) or dense (plain safetensors, zeros in place); "
                   "docs/checkpoints.md compares them")
    p.add_argument("--dense-checkpoint", action="store_true",
                   help="the same as --format dense: plain dense safetensors (zeros in place, no quantization_config) "
                   "for engines that read none of the sparse formats")
    add_config_arguments(p)
    p.set_defaults(func=run)


def _tokenizer_needed_for(args: argparse.Namespace, config: Any) -> str | None:
    """What needs the tokenizer in this run (for its error message), or None when nothing reads text: magnitude
    pruning with a data-free allocation reads no calibration text, so a model folder without tokenizer files works."""
    from ..algorithms.criteria import get_criterion
    from ..algorithms.families import SEARCHES, get_family

    if args.eval_text:
        return "--eval-text"
    if args.tokenizer:
        return "--tokenizer"
    layerwise = config.layerwise
    if get_criterion(config.method).needs_data or layerwise in SEARCHES or get_family(layerwise).needs_data:
        return f"--method {config.method} --layerwise {config.layerwise} (calibration text)"
    return None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..evaluation import perplexity
    from ..pruner import OWLPruner
    from ..pruning.modeling import PRUNED_ZERO_SHARE, get_blocks_and_units, zero_share
    from ..serialization import estimate_saved_bytes, save_pruned
    from ..utils import check_free_space, check_output_dir, public_path
    from ..validation import check_target_sparsity

    config = config_from_args(args)  # validate before loading anything
    fmt = check_save_format(args.format, args.dense_checkpoint, field="--format")
    check_target_sparsity(config, "--sparsity")
    check_output_dir(args.output_dir, args.overwrite, protected={"input model": args.model},
                     inputs=args_input_paths(args, "output_dir"),
                     disjoint={"--checkpoint-dir": config.checkpoint_dir, "--offload-folder": config.offload_folder})
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_model_arg(args, dtype=dtype)
    check_free_space(args.output_dir, estimate_saved_bytes(model, config, file_sources=(args.model, args.tokenizer),
                                                           save_format=fmt),
                     what=f"estimated for the {fmt} format at sparsity {config.target_sparsity:g}, with a margin")
    share = zero_share(get_blocks_and_units(model, config.block_name, config.ignore)[2])
    if share is not None and share > PRUNED_ZERO_SHARE and not args.allow_pruned:
        raise ValueError(
            f"{args.model} is already pruned ({share:.4f} of its block weights are zero); pruning it again compounds "
            "the sparsity. Prune the dense model, or pass --allow-pruned."
        )
    tokenizer = load_tokenizer_arg(args, needed_for=_tokenizer_needed_for(args, config))
    eval_seqlen = config.seqlen if args.eval_seqlen is None else args.eval_seqlen
    before = None
    if args.eval_text:
        before = perplexity(model, tokenizer, args.eval_text, seqlen=eval_seqlen, max_windows=args.eval_max_windows)
    report = OWLPruner(config).prune(model, dataset=args.calibration, tokenizer=tokenizer)
    if args.eval_text:
        after = perplexity(model, tokenizer, args.eval_text, seqlen=eval_seqlen, max_windows=args.eval_max_windows)
        report.evaluation = {"text": public_path(args.eval_text), "seqlen": eval_seqlen,
                             "max_windows": args.eval_max_windows, "dense_ppl": before, "pruned_ppl": after}
    save_pruned(model, args.output_dir, report=report, config=config, tokenizer=tokenizer, overwrite=args.overwrite,
                save_format=fmt)
    print(report.to_markdown())
    if args.eval_text:
        print(f"perplexity on {args.eval_text}: dense {before:.3f} -> pruned {after:.3f}")
    described = {"dense": "dense, zeros in place", "compact": "compact bitmask",
                 "compressed-tensors": "compressed-tensors sparse-bitmask"}
    print(f"saved to {args.output_dir} ({described[fmt]} format)")
    return 0
