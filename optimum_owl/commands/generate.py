"""`optimum-owl generate`: greedy generation with the sparse CPU path, printing the text and tokens/s.

A compact checkpoint (saved by optimum-owl), or a compressed-tensors sparse-bitmask one, is loaded straight into the
sparse form (`load_sparse`); any other model
is loaded normally and its pruned linears are swapped for `SparseLinear` (`sparsify`). `--compare-dense` also runs the
same pruned weights dense (alternating runs) and prints the speed-up and whether the kernel gives the same tokens: a
check of the kernel, not of the pruning. `--reference ORIGINAL` generates with the original dense model too and
prints how many of the new tokens agree and where they first diverge: what the pruning changed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from . import check_model_args, fraction, int_at_least

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text with the sparse CPU kernels (tokens/s, --compare-dense)")
    p.add_argument("model", help="local model folder (a compact optimum-owl checkpoint or any causal LM)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="tokens to generate; the prompt plus these must fit the model's context")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model folder)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside MODEL (loaded by transformers)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights/compute dtype (default: the checkpoint's)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="torch.set_num_threads, at least 1 (default: torch's choice)")
    p.add_argument("--min-sparsity", type=fraction, default=None,
                   help="linears at least this sparse (a fraction in [0, 1]) use the sparse kernel (default: "
                   "sparsify's default, 0.3)")
    p.add_argument("--values", choices=("float", "int8"), default=None,
                   help="the sparse weights' values: int8 codes with float32 scales (a float model or checkpoint is "
                   "quantized while loading; the LM head becomes dense int8 too), or float (default: as stored)")
    p.add_argument("--group-size", type=int_at_least(64), default=None,
                   help="with --values int8: one scale per row and group of this many inputs (a multiple of 64, e.g. "
                   "128; default: one per row)")
    p.add_argument("--no-quantize-head", dest="quantize_head", action="store_false", default=None,
                   help="keep the LM head in float (int8 values quantize it to dense int8 by default)")
    p.add_argument("--dense", action="store_true", help="do not sparsify: run the dense model only")
    p.add_argument("--compare-dense", action="store_true",
                   help="also run the same pruned weights dense (alternating): the speed-up, and whether the kernel "
                   "gives the same tokens (a check of the kernel, not of the pruning's quality)")
    p.add_argument("--reference", default=None, metavar="ORIGINAL",
                   help="the original dense model (folder or Hub id): generate with it too and print how many new "
                   "tokens agree with the pruned model's and where they first diverge")
    p.add_argument("--repeats", type=int_at_least(1), default=2, help="timed runs per variant with --compare-dense")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   default=os.environ.get("OPTIMUM_OWL_COMPILE", "1").strip() != "0",
                   help="decode with transformers' eager model.generate instead of the lean decode "
                   "(optimum_owl.inference.generate: static KV cache, compiled decode step; the first run compiles, "
                   "tens of seconds, which torch caches on disk for later runs); also the default when the "
                   "environment sets OPTIMUM_OWL_COMPILE=0")
    p.set_defaults(func=run)


def is_sparse_checkpoint(path: Path) -> bool:
    """Whether `path` is a local compact checkpoint or a compressed-tensors sparse-bitmask one (`load_sparse` reads
    both straight into the sparse form)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    if quant.get("quant_method") == "compressed-tensors":  # its sparse-bitmask layout loads the same way
        return (quant.get("sparsity_config") or {}).get("format") == "sparse-bitmask"
    return quant.get("quant_method") == "owl"


class _Clock:
    """A `generate` streamer that records when the prompt was processed and when each new token arrived."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _timed_generate(model: Any, inputs: dict, max_new_tokens: int, lean: bool = False) -> tuple[Any, dict[str, Any]]:
    """Greedy generation, timed: `model.generate`, or with `lean` the compiled lean decode
    (`optimum_owl.inference.generate`), whose first call's compile time is reported and left out of the decode rate."""
    import torch

    from ..inference import generate

    clock = _Clock()
    start = time.perf_counter()
    compile_s, note = 0.0, "model.generate"
    if lean:
        result = generate(model, inputs["input_ids"], max_new_tokens, attention_mask=inputs.get("attention_mask"),
                          streamer=clock, return_dict=True)
        out, compile_s = result.sequences, result.compile_seconds
        note = "compiled" if result.compiled else f"eager lean loop: {result.fallback_reason}"
    else:
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=clock)
    end = time.perf_counter()
    new = out.shape[1] - inputs["input_ids"].shape[1]
    # times[0]: the prompt was handed over; times[1]: first new token (= prefill); later: one per decoded token
    first = clock.times[1] if len(clock.times) > 1 else end
    decode_tokens = max(new - 1, 0)
    decode_s = end - first - compile_s  # the compile ran inside the first decode step
    stats = {
        "new_tokens": float(new),
        "prefill_s": first - start,
        "decode_s": decode_s,
        "decode_tok_s": decode_tokens / decode_s if decode_tokens and decode_s > 0 else float("nan"),
        "total_s": end - start,
        "compile_s": compile_s,
        "path": note,
    }
    return out, stats


def load_for_generation(args: argparse.Namespace) -> Any:
    import torch

    from ..inference import densify, load_sparse, sparsify

    path = Path(args.model)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    min_sparsity = {} if args.min_sparsity is None else {"min_sparsity": args.min_sparsity}
    options = {"values": args.values, "group_size": args.group_size, "quantize_head": args.quantize_head}
    if not args.dense and args.gguf_file is None and is_sparse_checkpoint(path):
        logger.info("%s is a compact (or compressed-tensors sparse-bitmask) checkpoint: loading it straight into the "
                    "sparse form", path)
        return load_sparse(path, dtype=dtype, **min_sparsity, **options)
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype or "auto"}
    if args.gguf_file:
        kwargs["gguf_file"] = args.gguf_file
    if args.gguf_file is None and is_sparse_checkpoint(path):  # --dense: transformers 5 cannot read the CT layout
        model = densify(load_sparse(path, dtype=dtype, min_sparsity=1.0))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    if not args.dense:
        sparsify(model, **min_sparsity, **{**options, "values": args.values or "float"})
    return model


def _config(source: str, gguf_file: str | None = None) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))


def check_context(config: Any, prompt_tokens: int, max_new_tokens: int, what: str = "the model") -> None:
    """Refuse a generation that would run past the model's context (`max_position_embeddings`; GPT-2's
    `n_positions`): the positions past it were never trained, and the text there is garbage."""
    max_pos = getattr(config, "max_position_embeddings", None)
    if not isinstance(max_pos, int) or prompt_tokens + max_new_tokens <= max_pos:
        return
    room = max_pos - prompt_tokens
    fix = f"use --max-new-tokens {room} or less" if room >= 1 else "shorten the prompt"
    raise ValueError(
        f"--max-new-tokens {max_new_tokens} after a prompt of {prompt_tokens} tokens runs past the context of {what} "
        f"({max_pos} tokens, max_position_embeddings); {fix}."
    )


def _threads() -> str:
    import torch

    count = torch.get_num_threads()
    return f"{count} thread{'' if count == 1 else 's'}"


def kernel_line(model: Any) -> str:
    """The kernel path the model's sparse linears use, per values dtype: read after the kernel was built and its
    decode path chosen (`kernel_status`), so it says what the log's AVX-512 line means for this model."""
    from ..inference import SparseLinear, kernel_status

    status = kernel_status()
    if not status["kernel"]:
        return f"pure PyTorch ({status['reason']})"
    used = sorted({str(m.dtype).removeprefix("torch.") for m in model.modules() if isinstance(m, SparseLinear)})

    def name(dtype: str) -> str:
        isa = status["isa"].get(dtype)
        return "pure PyTorch" if isa is None else isa.upper().replace("AVX512", "AVX-512")

    line = ", ".join(f"{name(d)} decode for the {d} weights" for d in used)
    others = [f"{name(d)} for {d}" for d in status["isa"] if d not in used and name(d) not in map(name, used)]
    return line + (f" (the kernel uses {', '.join(others)} weights, which this model does not have)" if others else "")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from ..inference import SparseLinear, densify, sparse_summary
    from ..pruning.sources import check_model_source

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1.")
    if args.dense and args.compare_dense:
        raise ValueError("--dense and --compare-dense exclude each other (--compare-dense already runs dense).")
    if args.dense and (args.values or args.group_size or args.quantize_head is not None):
        raise ValueError("--dense runs the model as it is: it excludes --values, --group-size and --no-quantize-head.")
    if args.group_size is not None and (args.values != "int8" or args.group_size % 64):
        raise ValueError(f"--group-size {args.group_size}: a multiple of 64 (e.g. 128), with --values int8.")
    check_model_args(args)  # a wrong name fails here, at once, before anything is loaded
    if args.reference:
        check_model_source(str(args.reference), "Reference model (--reference)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    tok_kwargs = {"gguf_file": args.gguf_file} if args.gguf_file and not args.tokenizer else {}
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, **tok_kwargs)
    inputs = dict(tokenizer(args.prompt, return_tensors="pt"))
    prompt_tokens = inputs["input_ids"].shape[1]
    config = _config(args.model, args.gguf_file)
    check_context(config, prompt_tokens, args.max_new_tokens)
    if args.reference:
        ref_config = _config(args.reference)
        check_context(ref_config, prompt_tokens, args.max_new_tokens, "the --reference model")
        if getattr(ref_config, "vocab_size", None) != getattr(config, "vocab_size", None):
            raise ValueError(
                f"--reference {args.reference} has a vocabulary of {getattr(ref_config, 'vocab_size', None)} tokens "
                f"and {args.model} one of {getattr(config, 'vocab_size', None)}: pass the dense model that "
                f"{args.model} was pruned from."
            )
    model = load_for_generation(args)
    sparse_count = sum(isinstance(m, SparseLinear) for m in model.modules())
    label = "sparse" if sparse_count else "dense"
    if sparse_count:
        head = "; LM head: dense int8" if sparse_summary(model)["head_int8"] else ""
        print(f"{sparse_count} sparse linears; kernel: {kernel_line(model)}{head}; {_threads()}")
    else:
        print(f"no sparse linears (dense model, or nothing above --min-sparsity); {_threads()}")

    out, stats = _timed_generate(model, inputs, args.max_new_tokens, args.compile)  # also warms up
    if stats["compile_s"]:  # the call that compiled also checked dynamo's guards at every step: time a second one
        out, again = _timed_generate(model, inputs, args.max_new_tokens, args.compile)
        stats = {**again, "compile_s": stats["compile_s"], "total_s": stats["total_s"]}
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    if args.compare_dense and not sparse_count:
        print("--compare-dense: the model has no sparse linears; nothing to compare.")
    if not args.compare_dense or not sparse_count:
        _print_stats(label, stats, inputs)
    else:
        dense = densify(copy.deepcopy(model))
        dense_out, _ = _timed_generate(dense, inputs, args.max_new_tokens, args.compile)  # warm-up
        runs: dict[str, list[dict[str, float]]] = {"sparse": [], "dense": []}
        for _ in range(max(1, args.repeats)):
            for name, m in (("dense", dense), ("sparse", model)):
                runs[name].append(_timed_generate(m, inputs, args.max_new_tokens, args.compile)[1])
        del dense
        best = {name: min(r, key=lambda s: s["total_s"]) for name, r in runs.items()}
        for name in ("dense", "sparse"):
            _print_stats(name, best[name], inputs)
        speedup = best["sparse"]["decode_tok_s"] / best["dense"]["decode_tok_s"]
        print(f"sparse kernel vs the same pruned weights run dense: decode speed-up {speedup:.2f}x; prefill time "
              f"{best['sparse']['prefill_s'] / best['dense']['prefill_s']:.2f}x; tokens identical: "
              f"{bool(torch.equal(out, dense_out))} (checks the kernel, not the pruning: see --reference ORIGINAL)")
    if args.reference:
        compare_reference(args, out, inputs, tokenizer)
    return 0


def compare_reference(args: argparse.Namespace, out: Any, inputs: dict, tokenizer: Any) -> None:
    """Generate with the original dense model (`--reference`) and print how many new tokens agree with `out` (the
    pruned model's, greedy) and where they first diverge."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    reference = AutoModelForCausalLM.from_pretrained(args.reference, dtype=dtype or "auto").eval()
    ref_out, ref_stats = _timed_generate(reference, inputs, args.max_new_tokens, args.compile)
    del reference
    print(f"reference (original dense model {args.reference}):")
    print(tokenizer.decode(ref_out[0], skip_special_tokens=True))
    _print_stats("reference", ref_stats, inputs)
    start = inputs["input_ids"].shape[1]
    mine, theirs = out[0, start:].tolist(), ref_out[0, start:].tolist()
    total = max(len(mine), len(theirs))
    same = sum(a == b for a, b in zip(mine, theirs))
    first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    if first >= total:
        print(f"pruned vs original (greedy): all {total} new tokens identical")
        return

    def show(tokens: list[int]) -> str:
        return repr(tokenizer.decode(tokens[first : first + 1])) if first < len(tokens) else "end of text"

    print(f"pruned vs original (greedy): {same} of {total} new tokens identical at the same position; first "
          f"divergence at new token {first + 1}: {show(mine)} (pruned) vs {show(theirs)} (original)")


def _print_stats(label: str, stats: dict[str, Any], inputs: dict) -> None:
    compiled = f", compile {stats['compile_s']:.1f} s (once; not in the decode rate)" if stats.get("compile_s") else ""
    print(f"{label}: {int(stats['new_tokens'])} new tokens, decode {stats['decode_tok_s']:.2f} tokens/s "
          f"({stats.get('path', 'model.generate')}), prefill of {inputs['input_ids'].shape[1]} tokens {stats['prefill_s']:.3f} s"
          f"{compiled}, total {stats['total_s']:.2f} s")
