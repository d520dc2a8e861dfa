"""`optimum-owl prune`: prune a local model folder or Hub id and save it with its report."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import OWLPrunerConfig

logger = logging.getLogger(__name__)

# Optional `OWLPrunerConfig` fields exposed as flags with `default=argparse.SUPPRESS`: a flag that is not given leaves
# the attribute out of the namespace, so the config's own default applies (defaults are never restated here).
OPTIONAL_FIELDS = (
    "wanda_group",
    "sparsegpt_blocksize",
    "sparsegpt_damp",
    "offload_activations",
    "device",
    "offload_folder",
    "checkpoint_dir",
    "auto_owl_ms",
    "auto_owl_lambdas",
    "auto_holdout",
    "auto_finalists",
    "refine",
    "dsnot_cycles",
    "dsnot_threshold",
)


def _config_default(name: str) -> Any:
    """The default of `OWLPrunerConfig.<name>` (for help texts)."""
    from ..config import OWLPrunerConfig

    for f in dataclasses.fields(OWLPrunerConfig):
        if f.name == name:
            return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    raise KeyError(f"OWLPrunerConfig has no field `{name}`.")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
    add_optional_config_arguments(p)


def add_optional_config_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for the `OPTIONAL_FIELDS`; each help text shows the config's default."""
    from ..config import REFINE, WANDA_GROUPS

    def add(group: argparse._ArgumentGroup, name: str, text: str, **kwargs: Any) -> None:
        default = _config_default(name)  # also fails loudly if the field is renamed or removed
        shown = " ".join(str(v) for v in default) if isinstance(default, list) else default
        shown = "not set" if shown is None else shown
        group.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS, help=f"{text} (default: {shown})",
                           **kwargs)

    g = p.add_argument_group("criteria")
    add(g, "wanda_group", "Wanda comparison group: row (paper) or layer", choices=WANDA_GROUPS)
    add(g, "sparsegpt_blocksize", "SparseGPT columns per lazy batch update (the paper's B)", type=int,
        metavar="N")
    add(g, "sparsegpt_damp", "SparseGPT dampening, fraction of the mean Hessian diagonal", type=float,
        metavar="FRACTION")

    g = p.add_argument_group("refinement (DSnoT)")
    add(g, "refine", "training-free mask refinement after pruning; needs --method wanda", choices=REFINE)
    add(g, "dsnot_cycles", "--refine dsnot: most swaps per row", type=int, metavar="N")
    add(g, "dsnot_threshold", "--refine dsnot: stop a row when a swap gains less than this fraction", type=float,
        metavar="FRACTION")

    g = p.add_argument_group("owl-auto (--layerwise owl-auto)")
    add(g, "auto_owl_ms", "M values searched (--owl-m is always added)", type=float, nargs="+", metavar="M")
    add(g, "auto_owl_lambdas", "λ values searched (--owl-lambda is always added)", type=float, nargs="+",
        metavar="LAMBDA")
    add(g, "auto_holdout", "fraction of calibration windows held out to score candidates, in (0, 0.5]", type=float,
        metavar="FRACTION")
    add(g, "auto_finalists", "best screened OWL candidates pruned exactly and scored again", type=int, metavar="N")

    g = p.add_argument_group("memory and resuming (docs/scale.md)")
    add(g, "offload_activations", "keep calibration activations on CPU between blocks", action="store_true")
    add(g, "device", "move each block to this device for its turn (auto, cpu, cuda:0, ...); unset: where it lives")
    add(g, "offload_folder", "folder for the pruned weights of disk-offloaded blocks (device_map models)",
        metavar="DIR")
    add(g, "checkpoint_dir", "folder for resumable runs: rerun the same command to continue after the last block",
        metavar="DIR")


def config_from_args(args: argparse.Namespace) -> OWLPrunerConfig:
    """Build and validate the `OWLPrunerConfig`; optional flags that were not given keep the config's defaults."""
    from ..config import OWLPrunerConfig

    optional = {name: getattr(args, name) for name in OPTIONAL_FIELDS if hasattr(args, name)}
    return OWLPrunerConfig(
        sparsity=args.sparsity, method=args.method, layerwise=args.layerwise, owl_m=args.owl_m,
        owl_lambda=args.owl_lambda, pattern=args.pattern, nm_mixed=args.nm_mixed, propagation=args.propagation,
        num_samples=args.num_samples, seqlen=args.seqlen, batch_size=args.batch_size, seed=args.seed,
        block_name=args.block_name, ignore=args.ignore, text_column=args.text_column, **optional,
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
    p.add_argument("--dense-checkpoint", action="store_true",
                   help="save plain dense safetensors (zeros in place, no quantization_config) for engines that do "
                   "not read optimum-owl's compact bitmask format; loading the default compact format needs "
                   "`import optimum_owl`")
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..data import load_tokenizer
    from ..evaluation import perplexity
    from ..modeling import load_model
    from ..pruner import OWLPruner
    from ..serialization import save_pruned

    config = config_from_args(args)  # validate before loading anything
    if Path(args.output_dir).exists() and not args.overwrite:
        raise FileExistsError(f"--output-dir {args.output_dir} exists; pass --overwrite to replace it.")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_model(args.model, dtype=dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    eval_seqlen = args.eval_seqlen or config.seqlen
    before = None
    if args.eval_text:
        before = perplexity(model, tokenizer, args.eval_text, seqlen=eval_seqlen, max_windows=args.eval_max_windows)
    report = OWLPruner(config).prune(model, dataset=args.calibration, tokenizer=tokenizer)
    if args.eval_text:
        after = perplexity(model, tokenizer, args.eval_text, seqlen=eval_seqlen, max_windows=args.eval_max_windows)
        report.evaluation = {"text": args.eval_text, "seqlen": eval_seqlen, "dense_ppl": before, "pruned_ppl": after}
    save_pruned(model, args.output_dir, report=report, config=config, tokenizer=tokenizer, overwrite=args.overwrite,
                dense=args.dense_checkpoint)
    print(report.to_markdown())
    if args.eval_text:
        print(f"perplexity on {args.eval_text}: dense {before:.3f} -> pruned {after:.3f}")
    print(f"saved to {args.output_dir} ({'dense, zeros in place' if args.dense_checkpoint else 'compact bitmask'} format)")
    return 0
