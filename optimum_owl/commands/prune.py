"""`optimum-owl prune`: prune a local model folder or Hub id and save it with its report."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from . import dtype_arg, existing_file, int_at_least

if TYPE_CHECKING:
    from ..config import OWLPrunerConfig

logger = logging.getLogger(__name__)

# Help text per `OWLPrunerConfig` field exposed as `--field-name`, in help groups. Everything else about a flag is
# derived from the config field: its type (from the default), `choices` (`config.FIELD_CHOICES`), the shown default,
# and `default=argparse.SUPPRESS`, so a flag that is not given leaves the field out and the config's own default
# applies (defaults are never restated here).
FLAG_HELP: dict[str, dict[str, str]] = {
    "pruning": {
        "sparsity": "target mean sparsity in [0, 1)",
        "method": "pruning criterion",
        "layerwise": "how sparsity is spread over blocks",
        "owl_m": "the paper's M (outlier threshold multiple)",
        "owl_lambda": "the paper's λ (spread of block sparsities is 2λ)",
        "pattern": "'unstructured' or N:M (N non-zeros kept per M), e.g. 2:4",
        "nm_mixed": "with OWL and N:M: per-block N (mean kept at N/M)",
        "propagation": "sequential (exact) or dense (faster approximation)",
        "num_samples": "calibration windows",
        "seqlen": "tokens per calibration window",
        "batch_size": "calibration windows run through a block at once",
        "seed": "seed of the calibration sampling",
        "block_name": "dotted path of the block list, e.g. model.layers",
        "ignore": "module-name glob (or re:regex) never pruned; repeat the flag for several",
        "text_column": "text column of a .jsonl / datasets calibration source",
    },
    "criteria": {
        "wanda_group": "Wanda comparison group: row (paper) or layer",
        "sparsegpt_blocksize": "SparseGPT columns per lazy batch update (the paper's B)",
        "sparsegpt_damp": "SparseGPT dampening, fraction of the mean Hessian diagonal",
    },
    "refinement (DSnoT)": {
        "refine": "training-free mask refinement after pruning; needs --method wanda",
        "dsnot_cycles": "--refine dsnot: most swaps per row",
        "dsnot_threshold": "--refine dsnot: stop a row when a swap gains less than this fraction",
    },
    "allocation families (--layerwise dlp | alphapruning | atp)": {
        "dlp_alpha": "DLP: block sparsities span 2α around the target",
        "alphapruning_epsilon": "AlphaPruning: block sparsities are the target × (1 ± ε), rescaled to the mean",
        "atp_beta": "ATP: sparsity step β from one block to the next",
        "attention_shift": "any family: sparsity added to each block's attention projections, taken from its MLP "
        "(block mean kept)",
    },
    "search (--layerwise owl-auto | auto)": {
        "auto_owl_ms": "M values searched (--owl-m is always added)",
        "auto_owl_lambdas": "λ values searched (--owl-lambda is always added)",
        "auto_holdout_tokens": "tokens to score candidates on, drawn from the calibration source beyond the "
        "calibration windows (0: hold out calibration windows)",
        "auto_holdout": "fraction of calibration windows held out to score candidates when the source has no other "
        "text, in (0, 0.5]",
        "auto_holdout_dataset": "text to score candidates on instead of the calibration source (.txt/.jsonl path or "
        "datasets name), e.g. a validation split of the text the model will serve",
        "auto_finalists": "best screened candidates (auto: of that many families) pruned exactly and scored again",
        "auto_families": "auto: families searched besides uniform",
        "auto_dlp_alphas": "auto: DLP α values searched (--dlp-alpha is always added)",
        "auto_alphapruning_epsilons": "auto: AlphaPruning ε values searched (--alphapruning-epsilon is always added)",
        "auto_atp_betas": "auto: ATP β values searched (--atp-beta is always added); unset: spreads 0.08-0.32 over "
        "the depth",
        "auto_attention_shifts": "auto: attention shifts (see --attention-shift) tried on the best screened setting",
    },
    "memory and resuming (docs/scale.md)": {
        "offload_activations": "keep calibration activations on CPU between blocks",
        "device": "move each block to this device for its turn (auto, cpu, cuda:0, ...); unset: where it lives",
        "offload_folder": "folder for the pruned weights of disk-offloaded blocks (device_map models)",
        "checkpoint_dir": "folder for resumable runs: rerun the same command to continue after the last block",
    },
}
# Every config field with a flag (all of them optional: the config's default applies when the flag is absent).
OPTIONAL_FIELDS = tuple(name for group in FLAG_HELP.values() for name in group)


def _field(name: str) -> dataclasses.Field:
    from ..config import OWLPrunerConfig

    for f in dataclasses.fields(OWLPrunerConfig):
        if f.name == name:
            return f
    raise KeyError(f"OWLPrunerConfig has no field `{name}`.")


def _config_default(name: str) -> Any:
    """The default of `OWLPrunerConfig.<name>` (for help texts and the flag's type)."""
    f = _field(name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_kwargs(name: str) -> dict[str, Any]:
    """argparse keyword arguments of the flag of config field `name`, derived from the field."""
    from ..config import FIELD_CHOICES

    default = _config_default(name)
    if isinstance(default, bool):
        return {"action": "store_true"}
    if default is None and "list[float]" in str(_field(name).type):  # an optional list of numbers
        return {"type": float, "nargs": "+", "metavar": name.rsplit("_", 1)[-1].upper().removesuffix("S")}
    if isinstance(default, list):
        if not default:  # a list of strings given one per flag (`--ignore a --ignore b`)
            return {"action": "append", "metavar": name.upper().removesuffix("S")}
        return {"type": type(default[0]), "nargs": "+", "metavar": name.rsplit("_", 1)[-1].upper().removesuffix("S")}
    kwargs: dict[str, Any] = {}
    if isinstance(default, (int, float)):
        kwargs["type"] = type(default)
    if name in FIELD_CHOICES:
        kwargs.update(type=str.lower, choices=FIELD_CHOICES[name]())
    return kwargs


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per `OWLPrunerConfig` field of `FLAG_HELP`; each help text shows the config's default."""
    for title, fields in FLAG_HELP.items():
        group = p.add_argument_group(title)
        for name, text in fields.items():
            default = _config_default(name)  # also fails loudly if the field is renamed or removed
            shown = " ".join(str(v) for v in default) if isinstance(default, list) else default
            shown = "not set" if shown is None or shown == "" else shown
            group.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS, help=f"{text} (default: {shown})",
                               **_flag_kwargs(name))


def config_from_args(args: argparse.Namespace) -> OWLPrunerConfig:
    """Build and validate the `OWLPrunerConfig`; flags that were not given keep the config's defaults."""
    from ..config import OWLPrunerConfig

    return OWLPrunerConfig(**{name: getattr(args, name) for name in OPTIONAL_FIELDS if hasattr(args, name)})


def config_flags(cfg: dict[str, Any]) -> list[str]:
    """The `optimum-owl prune` flags that rebuild the config dict `cfg` through `config_from_args` (its inverse, up
    to the fields that do not change the result: `resume.NON_RESULT_FIELDS`). Derived from `OPTIONAL_FIELDS`: the
    "pruning" group is always written (a readable command), every other flag when its value differs from the
    config's default, so a new field with a flag is reproduced without touching this function."""
    from ..pruning.resume import NON_RESULT_FIELDS

    always = set(next(iter(FLAG_HELP.values())))
    out: list[str] = []
    for name in OPTIONAL_FIELDS:
        if name in NON_RESULT_FIELDS or name not in cfg:
            continue
        value, default = cfg[name], _config_default(name)
        if value is None or value is False or value == [] or (name not in always and value == default):
            continue
        if value is True:
            out.append(_flag(name))
        elif _flag_kwargs(name).get("action") == "append":
            out += [item for v in value for item in (_flag(name), str(v))]
        elif isinstance(value, (list, tuple)):
            out += [_flag(name), *(str(v) for v in value)]
        else:
            out += [_flag(name), str(value)]
    return out


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
    p.add_argument("--eval-text", default=None, type=existing_file, help=".txt/.jsonl to measure perplexity on, before and after")
    p.add_argument("--eval-seqlen", type=int, default=None, help="window for --eval-text (default: --seqlen)")
    p.add_argument("--eval-max-windows", type=int_at_least(1), default=None,
                   help="--eval-text: evaluate only the first N windows")
    p.add_argument("--dtype", default="auto", type=dtype_arg,
                   help="dtype to load and prune in: auto (the checkpoint's own, default) | float32 | bfloat16 | float16")
    p.add_argument("--allow-pruned", action="store_true",
                   help="prune MODEL even if its block weights are already sparse (the sparsities compound)")
    p.add_argument("--dense-checkpoint", action="store_true",
                   help="save plain dense safetensors (zeros in place, no quantization_config) for engines that do "
                   "not read optimum-owl's compact bitmask format; loading the default compact format needs "
                   "`import optimum_owl`")
    add_config_arguments(p)
    p.set_defaults(func=run)


def _saved_bytes_lower_bound(model: Any, sparsity: float, dense: bool) -> int:
    """Bytes the saved weights take at least: all of them dense, or (compact) the kept share of them."""
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
    return int(total if dense else total * (1.0 - sparsity))


def run(args: argparse.Namespace) -> int:
    import torch

    from ..evaluation import perplexity
    from ..pruner import OWLPruner
    from ..pruning.data import load_tokenizer
    from ..pruning.modeling import PRUNED_ZERO_SHARE, get_blocks_and_units, load_model, zero_share
    from ..serialization import save_pruned
    from ..utils import check_free_space, check_output_dir, public_path

    config = config_from_args(args)  # validate before loading anything
    check_output_dir(args.output_dir, args.overwrite, protected={"input model": args.model},
                     disjoint={"--checkpoint-dir": config.checkpoint_dir, "--offload-folder": config.offload_folder})
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_model(args.model, dtype=dtype)
    check_free_space(args.output_dir, _saved_bytes_lower_bound(model, config.sparsity, args.dense_checkpoint))
    share = zero_share(get_blocks_and_units(model, config.block_name, config.ignore)[2])
    if share is not None and share > PRUNED_ZERO_SHARE and not args.allow_pruned:
        raise ValueError(
            f"{args.model} is already pruned ({share:.4f} of its block weights are zero); pruning it again compounds "
            "the sparsity. Prune the dense model, or pass --allow-pruned."
        )
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    eval_seqlen = args.eval_seqlen or config.seqlen
    before = None
    if args.eval_text:
        before = perplexity(model, tokenizer, args.eval_text, seqlen=eval_seqlen, max_windows=args.eval_max_windows)
    report = OWLPruner(config).prune(model, dataset=args.calibration, tokenizer=tokenizer)
    if args.eval_text:
        after = perplexity(model, tokenizer, args.eval_text, seqlen=eval_seqlen, max_windows=args.eval_max_windows)
        report.evaluation = {"text": public_path(args.eval_text), "seqlen": eval_seqlen,
                             "max_windows": args.eval_max_windows, "dense_ppl": before, "pruned_ppl": after}
    save_pruned(model, args.output_dir, report=report, config=config, tokenizer=tokenizer, overwrite=args.overwrite,
                dense=args.dense_checkpoint)
    print(report.to_markdown())
    if args.eval_text:
        print(f"perplexity on {args.eval_text}: dense {before:.3f} -> pruned {after:.3f}")
    print(f"saved to {args.output_dir} ({'dense, zeros in place' if args.dense_checkpoint else 'compact bitmask'} format)")
    return 0
