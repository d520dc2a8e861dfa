"""`optimum-owl eval`: perplexity of a (pruned) model on a text file, and its sparsity."""

from __future__ import annotations

import argparse

from . import add_model_source_arguments, existing_file, int_at_least, load_model_arg, load_tokenizer_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="perplexity of a model on a .txt/.jsonl text (standard protocol)")
    p.add_argument("model", help="local model folder or Hub id")
    p.add_argument("--text", required=True, type=existing_file, help=".txt or .jsonl (rows joined with blank lines)")
    add_model_source_arguments(p)
    p.add_argument("--seqlen", type=int_at_least(2), default=2048, help="window length (at least 2)")
    p.add_argument("--max-windows", type=int_at_least(1), default=None, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--add-bos", action="store_true", help="prepend BOS once (e.g. for llama2.c models)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import encode_joined, perplexity_of_ids
    from ..pruning.data import read_texts
    from ..pruning.modeling import get_blocks_and_units, zero_share

    model = load_model_arg(args)
    tokenizer = load_tokenizer_arg(args, needed_for="eval --text")
    ids = encode_joined(tokenizer, read_texts(args.text, documents=False), add_bos=args.add_bos)
    ppl = perplexity_of_ids(model, ids, args.seqlen, args.batch_size, args.max_windows)
    windows = min(ids.numel() // args.seqlen, args.max_windows or ids.numel())
    share = zero_share(get_blocks_and_units(model)[2]) or 0.0
    print(f"perplexity {ppl:.4f} on {windows} windows of {args.seqlen} tokens ({windows * (args.seqlen - 1):,} tokens "
          f"scored, of {ids.numel():,} in the text); block-weight sparsity {share:.4f}")
    return 0
