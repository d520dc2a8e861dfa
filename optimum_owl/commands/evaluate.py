"""`optimum-owl eval`: perplexity of a (pruned) model on a text file (`--text`), zero-shot accuracy through
lm-evaluation-harness (`--tasks`), and its sparsity."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from . import add_model_source_arguments, existing_file, int_at_least, load_model_arg, load_tokenizer_arg

logger = logging.getLogger(__name__)


def _limit(value: str) -> int | float:
    """`--limit`: documents per task (an integer), or a fraction of each task below 1."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return int(number) if number >= 1 else number


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="perplexity on a text (--text) and/or zero-shot accuracy with lm-evaluation-harness (--tasks)",
        description="Evaluate MODEL (a folder, Hub id, compact or compressed-tensors checkpoint): perplexity on "
        "--text with the papers' protocol, and/or lm-evaluation-harness tasks (--tasks; needs "
        "`pip install 'optimum-owl[eval]'`). Zero-shot results go into MODEL/owl_report.json when it has one, "
        "where the model card's evaluation table reads them.")
    p.add_argument("model", help="local model folder or Hub id")
    p.add_argument("--text", default=None, type=existing_file, help=".txt or .jsonl (rows joined with blank lines)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval tasks (e.g. arc_easy,hellaswag); 'paper' = boolq, rte, hellaswag, "
                   "winogrande, arc_easy, arc_challenge, openbookqa (their data comes from the Hub or the datasets "
                   "cache: HF_DATASETS_OFFLINE=1)")
    add_model_source_arguments(p)
    p.add_argument("--seqlen", type=int_at_least(2), default=2048, help="--text: window length (at least 2)")
    p.add_argument("--max-windows", type=int_at_least(1), default=None, help="--text: only the first N windows")
    p.add_argument("--batch-size", type=int_at_least(1), default=1, help="windows (--text) or requests (--tasks) per "
                   "forward")
    p.add_argument("--add-bos", action="store_true", help="--text: prepend BOS once (e.g. for llama2.c models)")
    p.add_argument("--num-fewshot", type=int_at_least(0), default=None, help="--tasks: examples per prompt (default: "
                   "each task's own, 0 for the paper tasks)")
    p.add_argument("--limit", type=_limit, default=None,
                   help="--tasks: only the first N documents of each task (a fraction if below 1): quick checks only")
    p.add_argument("--include-path", action="append", default=None, metavar="DIR",
                   help="--tasks: a folder of local lm-eval task YAML files (repeatable)")
    p.add_argument("--sparse", action="store_true",
                   help="run with optimum-owl's sparse CPU kernels (load_sparse for a compact or compressed-tensors "
                   "checkpoint, else sparsify)")
    p.add_argument("--baseline", default=None, metavar="DENSE",
                   help="--tasks: also evaluate this dense model (folder or Hub id) on the same tasks, for the card's "
                   "dense column")
    p.add_argument("--output-json", default=None, metavar="PATH", help="also write the zero-shot results to PATH")
    p.add_argument("--no-record", action="store_true",
                   help="do not add the zero-shot results to MODEL/owl_report.json")
    p.set_defaults(func=run)


def _load(args: argparse.Namespace) -> Any:
    if not args.sparse:
        return load_model_arg(args)
    from ..inference import load_sparse, sparsify
    from .generate import is_sparse_checkpoint

    path = Path(args.model)
    if args.gguf_file is None and is_sparse_checkpoint(path):
        return load_sparse(path)
    return sparsify(load_model_arg(args))


def _find_spec(name: str) -> Any:
    import importlib.util

    try:
        return importlib.util.find_spec(name)
    except ValueError:  # `sys.modules[name]` is None: imports of it fail (how tests hide a package)
        return None


def run(args: argparse.Namespace) -> int:
    from ..evaluation import encode_joined, expand_tasks, perplexity_of_ids, record_zero_shot, zero_shot
    from ..pruning.data import read_texts
    from ..pruning.modeling import get_blocks_and_units, zero_share

    if not args.text and not args.tasks:
        raise ValueError("eval: pass --text (perplexity) and/or --tasks (zero-shot accuracy with lm-evaluation-harness).")
    tasks = expand_tasks(args.tasks) if args.tasks else None
    if tasks and _find_spec("lm_eval") is None:  # the one-line "install the extra" error before any model loads
        raise ImportError("--tasks needs lm-evaluation-harness 0.4: pip install 'optimum-owl[eval]'")
    model = _load(args)
    tokenizer = load_tokenizer_arg(args, needed_for="eval --text / --tasks")
    if args.text:
        ids = encode_joined(tokenizer, read_texts(args.text, documents=False), add_bos=args.add_bos)
        ppl = perplexity_of_ids(model, ids, args.seqlen, args.batch_size, args.max_windows)
        windows = min(ids.numel() // args.seqlen, args.max_windows or ids.numel())
        share = zero_share(get_blocks_and_units(model)[2]) or 0.0
        print(f"perplexity {ppl:.4f} on {windows} windows of {args.seqlen} tokens ({windows * (args.seqlen - 1):,} "
              f"tokens scored, of {ids.numel():,} in the text); block-weight sparsity {share:.4f}")
    if not tasks:
        return 0
    options = {"num_fewshot": args.num_fewshot, "limit": args.limit, "batch_size": args.batch_size,
               "include_path": args.include_path}
    results = zero_shot(model, tokenizer, tasks, **options)
    dense = None
    if args.baseline:
        from ..pruning.modeling import load_model

        del model
        dense = zero_shot(load_model(args.baseline), tokenizer, tasks, **options)
    for task, row in results["tasks"].items():
        base = (dense or {}).get("tasks", {}).get(task, {})
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" + (f" (dense {base[k]:.4f})" if k in base else "")
                                      for k, v in row.items() if not k.endswith("_stderr"))
              + f" on {results['samples'].get(task, '?')} documents")
    print(f"{results['harness']}, {results['seconds']:.1f} s")
    if args.output_json:
        from ..utils import atomic_write_text

        atomic_write_text(args.output_json, json.dumps({**results, "dense": dense}, indent=2) + "\n")
    if not args.no_record and Path(args.model, "owl_report.json").is_file():
        print(f"recorded in {record_zero_shot(args.model, results, dense)}")
    return 0
