"""`optimum-owl repair`: fine-tune a pruned checkpoint with masked LoRA (or masked full FT) and save it still sparse."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from . import (
    add_model_source_arguments,
    args_input_paths,
    existing_file,
    int_at_least,
    load_model_arg,
    load_tokenizer_arg,
)

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "repair",
        help="repair a pruned model with a short sparse fine-tune (pruned zeros stay zero)",
        description=(
            "Fine-tune a pruned model on text with a mask-preserving LoRA (merged at the end) or masked full "
            "fine-tuning, then save it as a pruned checkpoint with the same zeros."
        ),
    )
    p.add_argument("model", help="pruned model folder or Hub id")
    p.add_argument("--train-data", required=True, type=existing_file, help="training text: .txt or .jsonl file (field --text-column)")
    p.add_argument("--output-dir", "-o", required=True,
                   help="output folder: the merged model with the pruning record (owl_report.json, owl_config.json) "
                   "and repair_report.json, or the adapter with --no-merge")
    add_model_source_arguments(p, tokenizer_help="tokenizer path (default: the model's)")
    p.add_argument("--eval-data", default=None, type=existing_file, help="held-out .txt/.jsonl for perplexity before and after")
    p.add_argument("--method", choices=("masked_lora", "full_ft"), default="masked_lora")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--targets", nargs="+", default=None,
                   help="'pruned' (default), 'all', or module names / globs (e.g. '*q_proj' '*v_proj')")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="windows per device per micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-train-windows", type=int, default=None)
    p.add_argument("--max-eval-windows", type=int_at_least(1), default=64,
                   help="--eval-data perplexity on its first N windows, before and after (default 64)")
    p.add_argument("--eval-all-windows", action="store_true", help="evaluate every --eval-data window (can be slow)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    p.add_argument("--report-to", default="none", help="Trainer loggers: none, tensorboard, wandb, ...")
    p.add_argument("--no-merge", action="store_true", help="save the masked adapter instead of the merged model")
    p.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..repair import RepairConfig, repair, save_masked_adapter, save_repaired
    from ..utils import check_output_dir

    check_output_dir(args.output_dir, args.overwrite, flag="--output-dir", protected={"input model": args.model},
                     inputs=args_input_paths(args, "output_dir"))
    targets: str | list[str] = "pruned"
    if args.targets:
        targets = args.targets[0] if len(args.targets) == 1 and args.targets[0] in ("pruned", "all") else list(args.targets)
    config = RepairConfig(
        method=args.method, r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=targets, seqlen=args.seqlen, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, weight_decay=args.weight_decay, max_train_windows=args.max_train_windows,
        max_eval_windows=None if args.eval_all_windows else args.max_eval_windows,
        text_column=args.text_column, seed=args.seed, bf16=args.bf16, report_to=args.report_to,
        merge=not args.no_merge,
    )
    model = load_model_arg(args)
    tokenizer = load_tokenizer_arg(args, needed_for="repair --train-data")
    model, report = repair(model, tokenizer, train_data=args.train_data, config=config, eval_data=args.eval_data)
    if args.no_merge:
        save_masked_adapter(model, args.output_dir, overwrite=args.overwrite)
        report.save(args.output_dir)
    else:
        save_repaired(model, args.output_dir, tokenizer=tokenizer, report=report, overwrite=args.overwrite,
                      source=args.model if Path(args.model).is_dir() else None)
    summary = {
        "output": str(args.output_dir),
        "steps": report.steps,
        "train_loss": report.train_loss,
        "sparsity_before": report.sparsity_before,
        "sparsity_after": report.sparsity_after,
        "zeros_preserved": report.zeros_preserved,
        "eval_ppl_before": report.eval_ppl_before,
        "eval_ppl_after": report.eval_ppl_after,
        "eval_windows": report.eval_windows,
        "eval_windows_available": report.eval_windows_available,
    }
    print(json.dumps(summary))
    return 0
