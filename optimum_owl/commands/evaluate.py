"""`optimum-owl eval`: perplexity of a (pruned) model on a text file, and its sparsity."""

from __future__ import annotations

import argparse

from . import existing_file, int_at_least


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="perplexity of a model on a .txt/.jsonl text (standard protocol)")
    p.add_argument("model", help="local model folder or Hub id")
    p.add_argument("--text", required=True, type=existing_file, help=".txt or .jsonl (rows joined with blank lines)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--seqlen", type=int_at_least(2), default=2048, help="window length (at least 2)")
    p.add_argument("--max-windows", type=int_at_least(1), default=None, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--add-bos", action="store_true", help="prepend BOS once (e.g. for llama2.c models)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import perplexity
    from ..pruning.data import load_tokenizer
    from ..pruning.modeling import get_blocks_and_units, load_model, zero_share

    model = load_model(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    ppl = perplexity(model, tokenizer, args.text, seqlen=args.seqlen, batch_size=args.batch_size,
                     max_windows=args.max_windows, add_bos=args.add_bos)
    share = zero_share(get_blocks_and_units(model)[2]) or 0.0
    print(f"perplexity {ppl:.4f} (seqlen {args.seqlen}); block-weight sparsity {share:.4f}")
    return 0
