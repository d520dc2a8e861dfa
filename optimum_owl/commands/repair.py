"""`optimum-owl repair`: fine-tune a pruned checkpoint with masked LoRA, masked full FT or SEFT, on the LM loss or
distilling from the dense model, and save it still sparse."""

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
    p.add_argument("--method", choices=("masked_lora", "full_ft", "seft"), default="masked_lora",
                   help="seft: full fine-tuning whose masks drop and regrow at constant per-matrix sparsity")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--targets", nargs="+", default=None,
                   help="'pruned' (default), 'all', or module names / globs (e.g. '*q_proj' '*v_proj')")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--max-steps", type=int_at_least(1), default=None,
                   help="optimizer steps (default 100; with --max-tokens, one pass over the budget)")
    p.add_argument("--max-tokens", type=int_at_least(1), default=None,
                   help="training-token budget: the first (or --select'ed) MAX_TOKENS // seqlen windows")
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
    p.add_argument("--bf16", nargs="?", const="on", choices=("on", "auto"), default=None,
                   help="bf16 autocast, fp32 master weights; 'auto': only where the CPU/GPU has native bf16")
    g = p.add_argument_group("recovery: distillation, data selection, SEFT")
    g.add_argument("--objective", choices=("lm", "kd", "kd+lm"), default="lm",
                   help="lm: next-token loss; kd: distil the --teacher's logits; kd+lm: both (--kd-alpha)")
    g.add_argument("--teacher", default=None, help="the dense model (folder or Hub id) for kd, --hidden-loss, --select")
    g.add_argument("--teacher-gguf-file", default=None, help="GGUF file inside --teacher's folder")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--kd-top-k", type=int_at_least(1), default=None,
                   help="distil on the teacher's K largest logits (cached on disk when cheaper)")
    g.add_argument("--kd-alpha", type=float, default=0.5, help="weight of KD in kd+lm")
    g.add_argument("--hidden-loss", choices=("squarehead",), default=None,
                   help="add SquareHead (normalised per-block hidden-state MSE to the teacher)")
    g.add_argument("--teacher-cache", choices=("auto", "on", "off"), default="auto")
    g.add_argument("--teacher-cache-dir", default=None, help="keep the teacher's top-k logits here (reused)")
    g.add_argument("--select", choices=("degradation",), default=None,
                   help="train on the windows where the pruned model lost most against --teacher (needs --max-tokens)")
    g.add_argument("--select-metric", choices=("loss_gap", "kl"), default="loss_gap")
    g.add_argument("--seft-interval", type=int_at_least(1), default=None, help="steps between drop-and-grow updates")
    g.add_argument("--seft-fraction", type=float, default=0.1)
    g.add_argument("--seft-drop", choices=("magnitude", "sensitivity"), default="magnitude")
    g.add_argument("--save-steps", type=int_at_least(1), default=None,
                   help="Trainer checkpoint every N steps into --checkpoint-dir")
    g.add_argument("--checkpoint-dir", default=None, help="Trainer checkpoints (needed by --save-steps / --resume)")
    g.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in --checkpoint-dir")
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
        target_modules=targets, seqlen=args.seqlen,
        max_steps=args.max_steps if args.max_steps or args.max_tokens else 100, max_tokens=args.max_tokens,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, weight_decay=args.weight_decay, max_train_windows=args.max_train_windows,
        max_eval_windows=None if args.eval_all_windows else args.max_eval_windows,
        text_column=args.text_column, seed=args.seed, report_to=args.report_to, merge=not args.no_merge,
        bf16={"on": True, "auto": "auto"}.get(args.bf16, False), objective=args.objective, teacher=args.teacher,
        teacher_gguf_file=args.teacher_gguf_file, temperature=args.temperature, kd_top_k=args.kd_top_k,
        kd_alpha=args.kd_alpha, hidden_loss=args.hidden_loss, select=args.select, select_metric=args.select_metric,
        teacher_cache={"on": True, "off": False}.get(args.teacher_cache, "auto"),
        teacher_cache_dir=args.teacher_cache_dir, seft_interval=args.seft_interval, seft_fraction=args.seft_fraction,
        seft_drop=args.seft_drop, save_steps=args.save_steps, output_dir=args.checkpoint_dir,
        resume_from_checkpoint=True if args.resume else None,
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
        "objective": report.objective,
        "tokens_seen": report.tokens_seen,
        "seconds": round(report.seconds, 2),
        "train_loss": report.train_loss,
        "sparsity_before": report.sparsity_before,
        "sparsity_after": report.sparsity_after,
        "zeros_preserved": report.zeros_preserved,
        "nnz_preserved": report.nnz_preserved,
        "eval_ppl_before": report.eval_ppl_before,
        "eval_ppl_after": report.eval_ppl_after,
        "eval_windows": report.eval_windows,
        "eval_windows_available": report.eval_windows_available,
    }
    print(json.dumps(summary))
    return 0
