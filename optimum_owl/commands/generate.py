"""`optimum-owl generate`: greedy generation with the sparse CPU path, printing the text and tokens/s.

A compact checkpoint (saved by optimum-owl) is loaded straight into the sparse form (`load_sparse`); any other model
is loaded normally and its pruned linears are swapped for `SparseLinear` (`sparsify`). `--compare-dense` also runs the
same model with dense weights (alternating runs) and prints the speed-up and whether the tokens are identical.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text with the sparse CPU kernels (tokens/s, --compare-dense)")
    p.add_argument("model", help="local model folder (a compact optimum-owl checkpoint or any causal LM)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model folder)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside MODEL (loaded by transformers)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights/compute dtype (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--min-sparsity", type=float, default=None,
                   help="linears at least this sparse use the sparse kernel (default: sparsify's default)")
    p.add_argument("--dense", action="store_true", help="do not sparsify: run the dense model only")
    p.add_argument("--compare-dense", action="store_true", help="also run dense (alternating) and print the speed-up")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per variant with --compare-dense")
    p.set_defaults(func=run)


def _is_compact_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == "owl"


class _Clock:
    """A `generate` streamer that records when the prompt was processed and when each new token arrived."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _timed_generate(model: Any, inputs: dict, max_new_tokens: int) -> tuple[Any, dict[str, float]]:
    import torch

    clock = _Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=clock)
    end = time.perf_counter()
    new = out.shape[1] - inputs["input_ids"].shape[1]
    # times[0]: the prompt was handed over; times[1]: first new token (= prefill); later: one per decoded token
    first = clock.times[1] if len(clock.times) > 1 else end
    decode_tokens = max(new - 1, 0)
    stats = {
        "new_tokens": float(new),
        "prefill_s": first - start,
        "decode_s": end - first,
        "decode_tok_s": decode_tokens / (end - first) if decode_tokens and end > first else float("nan"),
        "total_s": end - start,
    }
    return out, stats


def load_for_generation(args: argparse.Namespace) -> Any:
    import torch

    from ..inference import sparsify
    from ..inference.loading import load_sparse

    path = Path(args.model)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    min_sparsity = {} if args.min_sparsity is None else {"min_sparsity": args.min_sparsity}
    if not args.dense and args.gguf_file is None and _is_compact_checkpoint(path):
        logger.info("%s is a compact optimum-owl checkpoint: loading it straight into the sparse form", path)
        return load_sparse(path, dtype=dtype, **min_sparsity)
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype or "auto"}
    if args.gguf_file:
        kwargs["gguf_file"] = args.gguf_file
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    if not args.dense:
        sparsify(model, **min_sparsity)
    return model


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from ..inference import SparseLinear, densify, kernel_status

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1.")
    if args.dense and args.compare_dense:
        raise ValueError("--dense and --compare-dense exclude each other (--compare-dense already runs dense).")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tok_kwargs = {"gguf_file": args.gguf_file} if args.gguf_file and not args.tokenizer else {}
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, **tok_kwargs)
    model = load_for_generation(args)
    sparse_count = sum(isinstance(m, SparseLinear) for m in model.modules())
    inputs = dict(tokenizer(args.prompt, return_tensors="pt"))
    label = "sparse" if sparse_count else "dense"
    if sparse_count:
        status = kernel_status()
        if status["kernel"]:
            dtype = str(next(m for m in model.modules() if isinstance(m, SparseLinear)).dtype).removeprefix("torch.")
            kernel = status["isa"][dtype].upper().replace("AVX512", "AVX-512")
        else:
            kernel = f"pure PyTorch ({status['reason']})"
        print(f"{sparse_count} sparse linears; kernel: {kernel}; {torch.get_num_threads()} threads")
    else:
        print(f"no sparse linears (dense model, or nothing above --min-sparsity); {torch.get_num_threads()} threads")

    out, stats = _timed_generate(model, inputs, args.max_new_tokens)  # also warms up
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    if not args.compare_dense:
        _print_stats(label, stats, inputs)
        return 0
    if not sparse_count:
        print("--compare-dense: the model has no sparse linears; nothing to compare.")
        _print_stats(label, stats, inputs)
        return 0
    dense = densify(copy.deepcopy(model))
    dense_out, _ = _timed_generate(dense, inputs, args.max_new_tokens)  # warm-up
    runs: dict[str, list[dict[str, float]]] = {"sparse": [], "dense": []}
    for _ in range(max(1, args.repeats)):
        for name, m in (("dense", dense), ("sparse", model)):
            runs[name].append(_timed_generate(m, inputs, args.max_new_tokens)[1])
    best = {name: min(r, key=lambda s: s["total_s"]) for name, r in runs.items()}
    for name in ("dense", "sparse"):
        _print_stats(name, best[name], inputs)
    speedup = best["sparse"]["decode_tok_s"] / best["dense"]["decode_tok_s"]
    print(f"decode speed-up sparse / dense: {speedup:.2f}x; prefill time sparse / dense: "
          f"{best['sparse']['prefill_s'] / best['dense']['prefill_s']:.2f}x; "
          f"tokens identical: {bool(torch.equal(out, dense_out))}")
    return 0


def _print_stats(label: str, stats: dict[str, float], inputs: dict) -> None:
    print(f"{label}: {int(stats['new_tokens'])} new tokens, decode {stats['decode_tok_s']:.2f} tokens/s, prefill of "
          f"{inputs['input_ids'].shape[1]} tokens {stats['prefill_s']:.3f} s, total {stats['total_s']:.2f} s")
