"""Sparse CPU inference benchmark: decode and prefill speed, bytes per token, peak RSS (docs/benchmarks.md).

Modes:

- `speed`: one process holds dense fp32, dense bf16, dense int8, sparse fp32, sparse bf16 and sparse int8 variants of
  the same model (`--forms` picks some; the others share embeddings, norms and head with the dense one of their dtype;
  both int8 forms run bf16 activations with the LM head int8 too: `bench/int8_forms.py`, which also says how the
  dense int8 weight-only baseline is chosen, torchao or `torch._weight_int8pack_mm` modules, whichever decodes
  faster here) and, per sparsity level, alternates them: batch-1 greedy decode (random prompt of `--prompt-len` tokens, exactly `--new-tokens` new tokens; the rate
  excludes the first token) and one prefill forward of `--prefill` tokens (`logits_to_keep=1`, as generate does).
  Each decode figure is the best of `--repeats` alternated runs (prefill: `--prefill-repeats`). Weight bytes read per decoded token are computed from the
  stored tensors, so every speed-up is reported beside its memory-traffic limit (dense bytes / sparse bytes).
- `rss`: saves the pruned model (dense checkpoint + compact checkpoint) and measures, each in a fresh subprocess, the
  peak RSS of loading it dense (`from_pretrained`) and straight into the sparse form (`load_sparse`), fp32 and bf16,
  then of an 8-token generation; and, in bf16, the two int8 forms: the dense checkpoint loaded and converted to int8
  weight-only modules, and `load_sparse(values="int8")` of the compact one (quantized while loading).
- `traffic`: the decode kernel against the memory-traffic limit. A stack of 5632 x 2048 layers (12 of them: several
  times the L3 cache, so every weight byte comes from memory, as in a real decode step) at each sparsity, fp32 and
  bf16 values, alternating dense `F.linear` (same dtype), the sparse kernel at one token, and a plain streaming read
  of a 1 GiB tensor (`sum`, the machine's read bandwidth ceiling); best of `--repeats` rounds. Reports each one's
  weight GB/s, the kernel's fraction of the read ceiling and its speed-up over dense beside the bytes ratio, and the
  kernel's GB/s on one thread over 2048 rows that stay in the L3 cache (`cached_1thread_GB_s`: what the kernel's
  instructions allow per core when memory is not the limit).
- `breakdown`: where a decoded token's time goes. The same four variants as `speed`, at the first of `--sparsities`;
  forward hooks time, during the decode steps only (not the prompt's prefill), the block linears (dense or sparse)
  and the LM head; the rest of the token (attention, norms, activations, `generate`'s own work) is the token's time minus those two.
  With `--decode lean` or `both` (the default) the same forms also run through the lean decode (static KV cache, compiled
  step: `optimum_owl.inference.generate`), whose linears are timed outside the model (bench/lean.py); `rest_vs_eager`
  is its rest over `model.generate`'s.
  Per variant, the split of the fastest of `--repeats` alternated decodes.
- `peer`: llama.cpp (llama-cpp-python in the bench venv, as a subprocess: bench/peer_llamacpp.py) beside optimum-owl
  on the same model, alternated in one run: llama.cpp's F16, Q8_0 and Q4_0 GGUF forms (SmolLM2 requantized from its
  shipped file, the random models converted with llama.cpp's converter) and optimum-owl's forms (default dense_bf16,
  sparse_bf16, sparse_int8, at each of `--sparsities`) through the lean decode (`optimum_owl.inference.generate`; its
  compile is done before timing and reported); best of `--repeats`, every optimum-owl / llama.cpp ratio.
- `crossover`: one 2048 -> 5632 and one 5632 -> 2048 layer at 70%: decode kernel, prefill kernel (tile expansion +
  GEMM) and dense `F.linear` for 1..64 tokens, values and activations in `--dtype` (float32 by default; bfloat16
  prefills with a bf16 GEMM where `native_bf16_gemm()`); `SparseLinear`'s crossovers come from this table.

Models: `llama09b` (random Llama: hidden 2048, intermediate 5632, 16 layers, 32 heads, vocab 32000, untied head;
0.95B parameters), `smollm2` (SmolLM2-135M from ../shared/assets, de-quantized from its GGUF file), `tiny` (smoke
tests). Random models are pruned per row by magnitude (random weights: the masks are random anyway).

    OMP_NUM_THREADS=2 flock -x /work/cpu.lock python -m bench.inference speed --model llama09b
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench._common import cpu_info, peak_rss_bytes, random_llama, smollm2
from bench.int8_forms import choose_dense_int8, int8_head, int8pack_model, module_weight_bytes, sparse_int8_linear
from optimum_owl.inference import SparseLinear, kernel_status
from optimum_owl.inference.module import native_bf16_gemm
from optimum_owl.utils import atomic_write_text

MODELS = {  # random_llama's shapes
    "llama09b": dict(hidden=2048, intermediate=5632, layers=16, heads=32, vocab=32000),
    "tiny": dict(hidden=256, intermediate=704, layers=2, heads=4, vocab=1000),
}


def build_model(name: str) -> nn.Module:
    if name == "smollm2":
        return smollm2()
    return random_llama(**MODELS[name], bos_token_id=1, eos_token_id=2)


def block_linears(model: nn.Module) -> list[str]:
    from optimum_owl.formats import compressible_names

    return [n.removesuffix(".weight") for n in compressible_names(model)]


def pruned_weight(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row magnitude pruning to exactly `round(sparsity * in)` zeros per row."""
    k = int(round(sparsity * weight.shape[1]))
    w = weight.detach().clone()
    if k:
        idx = w.abs().topk(k, dim=1, largest=False).indices
        w.scatter_(1, idx, 0.0)
    return w


SPARSE_FORMS = ("sparse_fp32", "sparse_bf16", "sparse_int8")
FORMS = ("dense_fp32", "dense_bf16", "dense_int8") + SPARSE_FORMS


def sparse_variants(dense32: nn.Module, dense16: nn.Module, names: list[str], sparsity: float,
                    forms: tuple[str, ...] = SPARSE_FORMS) -> dict[str, nn.Module]:
    """Copies of the dense models (fp32 for sparse_fp32, bf16 for the others) that share every tensor with them except
    the listed linears, which become SparseLinear with the same mask (pruned one layer at a time: no dense pruned copy
    of the whole model); sparse_int8's values are quantized from the float32 pruned weights, its head is int8."""
    out = {form: copy.deepcopy(dense32 if form == "sparse_fp32" else dense16,
                               {id(t): t for t in list((dense32 if form == "sparse_fp32" else dense16).parameters())
                                + list((dense32 if form == "sparse_fp32" else dense16).buffers())})
           for form in forms}
    for name in names:
        src = dense32.get_submodule(name)
        pruned = pruned_weight(src.weight, sparsity)
        for form, model in out.items():
            dtype = torch.bfloat16 if form == "sparse_bf16" else torch.float32
            holder = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None, device="meta")
            holder.weight = nn.Parameter(pruned.to(dtype), requires_grad=False)
            if src.bias is not None:
                holder.bias = nn.Parameter(src.bias.detach().to(dtype), requires_grad=False)
            parent, _, child = name.rpartition(".")
            sparse = sparse_int8_linear(holder) if form == "sparse_int8" else SparseLinear.from_dense(holder)
            setattr(model.get_submodule(parent), child, sparse)
        del pruned
    if "sparse_int8" in out:
        int8_head(out["sparse_int8"])
    return out


def weight_bytes(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Bytes of weights read per decoded token: block linears, and the rest of the matrices (LM head; the embedding
    reads one row, norms are negligible)."""
    block = sum(module_weight_bytes(model.get_submodule(name)) for name in names)
    return {"block": block, "head": module_weight_bytes(model.get_output_embeddings())}


def dense_variants(dense32: nn.Module, dense16: nn.Module, names: list[str], forms: tuple[str, ...], prompt: torch.Tensor,
                   ) -> tuple[dict[str, nn.Module], dict | None]:
    """The dense forms asked for; dense_int8 is the faster dense int8 weight-only baseline (`choose_dense_int8`)."""
    out = {name: m for name, m in (("dense_fp32", dense32), ("dense_bf16", dense16)) if name in forms}
    info = None
    if "dense_int8" in forms:
        out["dense_int8"], info = choose_dense_int8(dense16, dense32, names,
                                                    lambda m: time_decode(m, prompt, 16)[0])
        print(f"dense int8 weight-only baseline: {json.dumps(info)}", flush=True)
    return out, info


class _Clock:
    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    clock = _Clock()
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock, eos_token_id=None, pad_token_id=0)
    end = time.perf_counter()
    return (new_tokens - 1) / (end - clock.times[1]), out


def time_prefill(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - start


def machine() -> dict:
    """The CPU (model name, family/model: a virtualised "AMD EPYC" may be Zen 3 or Zen 4), its vector extensions that
    matter here, torch and the kernel's decode paths."""
    info = cpu_info()
    flags = set(info.get("flags", "").split())
    return {"cpu": info.get("model name", platform.processor()),
            "cpu_family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
            "isa_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vbmi2"}),
            "bf16_gemm": native_bf16_gemm(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "kernel": kernel_status(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_speed(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    dense32 = build_model(args.model)
    names = block_linears(dense32)
    dense16 = copy.deepcopy(dense32).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    vocab = dense32.config.vocab_size
    prompt = torch.randint(3, vocab, (1, args.prompt_len), generator=g)
    prefill_ids = torch.randint(3, vocab, (1, args.prefill), generator=g)
    result = {"machine": machine(), "args": vars(args), "levels": {}}
    dense_bytes32 = weight_bytes(dense32, names)
    print(json.dumps(result["machine"]), flush=True)
    dense, result["dense_int8"] = dense_variants(dense32, dense16, names, args.forms, prompt)
    for sparsity in args.sparsities:
        sparse = sparse_variants(dense32, dense16, names, sparsity, tuple(f for f in args.forms if f in SPARSE_FORMS))
        variants = {**dense, **sparse}
        del sparse
        level: dict[str, dict] = {k: {"decode_tok_s": [], "prefill_s": []} for k in variants}
        for name, model in variants.items():  # warm-up (kernel build, allocator, caches)
            time_decode(model, prompt, 3)
            level[name]["bytes"] = weight_bytes(model, names)
        for rep in range(args.repeats):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for name in order:
                rate, _ = time_decode(variants[name], prompt, args.new_tokens)
                level[name]["decode_tok_s"].append(rate)
                if args.prefill and rep < args.prefill_repeats:
                    level[name]["prefill_s"].append(time_prefill(variants[name], prefill_ids))
                print(f"sparsity {sparsity} rep {rep} {name}: decode {rate:.3f} tok/s"
                      + (f", prefill {level[name]['prefill_s'][-1]:.2f} s" if args.prefill and rep < args.prefill_repeats
                         else ""), flush=True)
        result["levels"][str(sparsity)] = {"runs": level, "summary": summarize(level, dense_bytes32)}
        print(json.dumps({str(sparsity): result["levels"][str(sparsity)]["summary"]}, indent=1), flush=True)
        del variants
    return result


def summarize(level: dict[str, dict], dense_bytes32: dict[str, int]) -> dict[str, dict]:
    """Per form: best decode rate, its ratio to every dense form measured, prefill, bytes against dense fp32 and the
    memory-traffic limit (dense fp32 bytes / the form's bytes)."""
    summary: dict[str, dict] = {}
    rates = {name: max(rec["decode_tok_s"]) for name, rec in level.items()}
    dense_rates = {name: rate for name, rate in rates.items() if name.startswith("dense_")}
    dense_total = dense_bytes32["block"] + dense_bytes32["head"]
    for name, rec in level.items():
        rate = rates[name]
        total = rec["bytes"]["block"] + rec["bytes"]["head"]
        summary[name] = {
            "decode_tok_s": rate,
            **{f"vs_{dense}": rate / dense_rate for dense, dense_rate in dense_rates.items()},
            "vs_faster_dense_float": rate / max(r for d, r in dense_rates.items() if d != "dense_int8")
            if set(dense_rates) - {"dense_int8"} else None,
            "prefill_s": min(rec["prefill_s"]) if rec["prefill_s"] else None,
            "block_bytes": rec["bytes"]["block"],
            "head_bytes": rec["bytes"]["head"],
            "block_bytes_vs_dense_fp32": rec["bytes"]["block"] / dense_bytes32["block"],
            "traffic_limit_vs_dense_fp32": dense_total / total,
            "weight_GB_s": total * rate / 1e9,
        }
    for name, same in (("sparse_fp32", "dense_fp32"), ("sparse_bf16", "dense_bf16"), ("sparse_int8", "dense_bf16"),
                       ("dense_int8", "dense_bf16")):
        mine = summary.get(name, {}).get("prefill_s")
        if mine and summary.get(same, {}).get("prefill_s"):
            summary[name][f"prefill_vs_{same}"] = mine / summary[same]["prefill_s"]
        if mine and summary.get("dense_fp32", {}).get("prefill_s"):
            summary[name]["prefill_vs_dense_fp32"] = mine / summary["dense_fp32"]["prefill_s"]
    return summary


class _Timer:
    """Forward hooks adding up, per key, the wall time of the watched modules during the model's decode steps (forwards
    of one new token; the prompt's prefill is not a decoded token, even where its LM head sees one position)."""

    def __init__(self, model: nn.Module) -> None:
        self.totals: dict[str, float] = {}
        self._start: dict[int, float] = {}
        self.decoding = False

        def phase(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.decoding = ids is not None and ids.shape[-1] == 1

        self.handles = [model.register_forward_pre_hook(phase, with_kwargs=True)]

    def watch(self, module: nn.Module, key: str) -> None:
        def pre(mod: nn.Module, args: tuple) -> None:
            self._start[id(mod)] = time.perf_counter()

        def post(mod: nn.Module, args: tuple, output) -> None:
            if self.decoding:
                self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - self._start[id(mod)]

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def run_breakdown(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    dense32 = build_model(args.model)
    names = block_linears(dense32)
    dense16 = copy.deepcopy(dense32).to(torch.bfloat16)
    prompt = torch.randint(3, dense32.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    sparsity = args.sparsities[0]
    dense, int8_info = dense_variants(dense32, dense16, names, args.forms, prompt)
    variants = {**dense, **sparse_variants(dense32, dense16, names, sparsity,
                                           tuple(f for f in args.forms if f in SPARSE_FORMS))}
    result = {"machine": machine(), "args": vars(args), "sparsity": sparsity, "variants": {}, "dense_int8": int8_info}
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for model in variants.values():
        time_decode(model, prompt, 3)  # warm-up
    for rep in range(args.repeats):
        for name in (list(variants) if rep % 2 == 0 else list(reversed(variants))):
            model = variants[name]
            timer = _Timer(model)
            for lin in names:
                timer.watch(model.get_submodule(lin), "block_linears")
            timer.watch(model.get_output_embeddings(), "head")
            rate, _ = time_decode(model, prompt, args.new_tokens)
            timer.remove()
            steps = args.new_tokens - 1  # decode forwards: the prefill produced the first token
            ms = {k: v / steps * 1e3 for k, v in timer.totals.items()}
            ms["token"] = 1e3 / rate
            ms["rest"] = ms["token"] - ms.get("block_linears", 0.0) - ms.get("head", 0.0)
            runs[name].append(ms)
            print(f"rep {rep} {name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), flush=True)
    for name, rec in runs.items():
        result["variants"][name] = {"best": min(rec, key=lambda r: r["token"]), "runs": rec}
    print(json.dumps({k: v["best"] for k, v in result["variants"].items()}, indent=1), flush=True)
    if args.decode != "eager":  # the same forms through the lean decode (static cache, compiled step): bench/lean.py
        from bench.lean import lean_breakdown

        for name, model in variants.items():
            lean = lean_breakdown(model, names, prompt, args.new_tokens, args.repeats)
            eager_rest = result["variants"][name]["best"]["rest"]
            result["variants"][name]["lean"] = {**lean, "rest_vs_eager": lean["rest"] / eager_rest}
            print(f"lean {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in result["variants"][name]["lean"].items()),
                  flush=True)
    return result


def run_crossover(args: argparse.Namespace) -> dict:
    import torch.nn.functional as F

    from optimum_owl.inference.kernel import kernel

    torch.set_num_threads(args.threads)
    ops = kernel()
    dtype = getattr(torch, args.dtype)
    bf16_gemm = dtype == torch.bfloat16 and native_bf16_gemm()
    rows = []
    for out_f, in_f in ((5632, 2048), (2048, 5632)):
        w = pruned_weight(torch.randn(out_f, in_f), 0.7)
        lin = nn.Linear(in_f, out_f, bias=False)
        lin.weight = nn.Parameter(w, requires_grad=False)
        lin = lin.to(dtype)
        w = lin.weight
        s = SparseLinear.from_dense(lin)
        for n in (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 64):
            x = torch.randn(n, in_f).to(dtype)
            # the prefill's input as SparseLinear passes it: bf16 as it is for a bf16 GEMM, else padded float32
            xp = x if bf16_gemm else F.pad(x.float(), (0, s.mask.shape[1] * 8 - in_f)).contiguous()
            fns = {
                "dense": lambda x=x, w=w: F.linear(x, w),
                "decode": lambda x=x, s=s: ops.decode(x, s.mask, s.values, s.offsets, None),
                "prefill": lambda xp=xp, s=s, i=in_f: ops.prefill(xp, s.mask, s.values, s.offsets, None, i, s._tile_rows),
            }
            best = {k: float("inf") for k in fns}
            for _ in range(5):
                for k, f in fns.items():
                    t = time.perf_counter()
                    for _ in range(5):
                        f()
                    best[k] = min(best[k], (time.perf_counter() - t) / 5)
            row = {"shape": f"{in_f}->{out_f}", "dtype": args.dtype, "bf16_gemm": bf16_gemm, "tokens": n,
                   **{k + "_ms": v * 1e3 for k, v in best.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"machine": machine(), "rows": rows}


CACHED_ROWS = 2048


def _one_thread(f):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return f()
    finally:
        torch.set_num_threads(threads)


def run_traffic(args: argparse.Namespace) -> dict:
    import torch.nn.functional as F

    from optimum_owl.inference.kernel import kernel

    torch.set_num_threads(args.threads)
    ops = kernel()
    if ops is None:
        raise SystemExit("the C++ kernel is not available on this machine: nothing to measure")
    stream = torch.ones(2**28)  # 1 GiB of float32
    out_f, in_f, layers = 5632, 2048, 12
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for sparsity in args.sparsities:
            torch.manual_seed(0)
            dense = [pruned_weight(torch.randn(out_f, in_f), sparsity).to(dtype) for _ in range(layers)]
            sparse = []
            for w in dense:
                lin = nn.Linear(in_f, out_f, bias=False, device="meta")
                lin.weight = nn.Parameter(w, requires_grad=False)
                sparse.append(SparseLinear.from_dense(lin))
            # the kernel with memory out of the way: 2048 rows of the first layer (3-6 MB) on ONE thread, in that
            # core's L3 after the first of 10 back-to-back calls (with two threads rows move between cores from call
            # to call, and on a multi-chiplet CPU another core's cache is about as far as memory). Times the thread
            # count, this is what the kernel's instructions allow when memory is not the limit.
            lin = nn.Linear(in_f, CACHED_ROWS, bias=False, device="meta")
            lin.weight = nn.Parameter(dense[0][:CACHED_ROWS].clone(), requires_grad=False)
            cached = SparseLinear.from_dense(lin)
            x = torch.randn(1, in_f)
            xd = x.to(dtype)
            width = sparse[0].mask.shape[1] * 8
            xp = F.pad(x, (0, width - in_f)).contiguous()
            fns = {
                "dense": lambda xd=xd, dense=dense: [F.linear(xd, w) for w in dense],
                "sparse": lambda xp=xp, sparse=sparse: [ops.decode(xp, s.mask, s.values, s.offsets, None) for s in sparse],
                "read": stream.sum,
                "cached": lambda xp=xp, c=cached: _one_thread(
                    lambda: [ops.decode(xp, c.mask, c.values, c.offsets, None) for _ in range(10)]),
            }
            best = {k: float("inf") for k in fns}
            for _ in range(args.repeats):
                for k, f in fns.items():
                    t = time.perf_counter()
                    f()
                    best[k] = min(best[k], time.perf_counter() - t)
            dense_bytes = sum(w.numel() * w.element_size() for w in dense)
            sparse_bytes = sum(s.weight_nbytes() for s in sparse)
            read_gbs = stream.numel() * 4 / best["read"] / 1e9
            sparse_gbs = sparse_bytes / best["sparse"] / 1e9
            row = {
                "dtype": str(dtype).removeprefix("torch."), "sparsity": sparsity,
                "dense_ms": best["dense"] * 1e3, "sparse_ms": best["sparse"] * 1e3,
                "dense_GB_s": dense_bytes / best["dense"] / 1e9, "sparse_GB_s": sparse_gbs, "read_GB_s": read_gbs,
                "sparse_fraction_of_read": sparse_gbs / read_gbs,
                "cached_1thread_GB_s": 10 * cached.weight_nbytes() / best["cached"] / 1e9,
                "speedup": best["dense"] / best["sparse"], "bytes_ratio": dense_bytes / sparse_bytes,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"machine": machine(), "rows": rows}


# ------------------------------------------------------------------------------------------------------ RSS
def rss_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: load one way, report peak RSS after import / load / generate."""
    import transformers  # noqa: F401 - part of the baseline

    import optimum_owl  # noqa: F401 - registers quant_method "owl"

    base = peak_rss_bytes()
    dtype = getattr(torch, args.dtype)
    if args.kind in ("sparse", "sparse-int8"):
        from optimum_owl.inference.loading import load_sparse

        model = load_sparse(args.path, dtype=dtype, values="int8" if args.kind == "sparse-int8" else None)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.path, dtype=dtype).eval()
        if args.kind == "dense-int8":  # what a user does today: load dense, then swap the linears for int8 ones
            model = int8pack_model(model, model, block_linears(model), in_place=True)
    loaded = peak_rss_bytes()
    with torch.inference_mode():
        model.generate(torch.tensor([[1, 5, 9, 13]]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    print(json.dumps({"baseline": base, "after_load": loaded, "after_generate": peak_rss_bytes()}))


def run_rss(args: argparse.Namespace) -> dict:
    from optimum_owl.inference import sparsify

    work = Path(args.work_dir)
    dense_dir, compact_dir = work / "dense", work / "compact"
    if not (compact_dir / "config.json").is_file():
        model = build_model(args.model)
        with torch.no_grad():
            for name in block_linears(model):
                m = model.get_submodule(name)
                m.weight.copy_(pruned_weight(m.weight, args.rss_sparsity))
        model.save_pretrained(dense_dir)  # not marked pruned: a plain dense checkpoint
        sparsify(model, min_sparsity=0.0)
        model.save_pretrained(compact_dir)
        del model
    result = {"machine": machine(), "sparsity": args.rss_sparsity, "runs": {}}
    runs = [("dense_ckpt_from_pretrained", "dense", dense_dir), ("compact_ckpt_from_pretrained", "dense", compact_dir),
            ("compact_ckpt_load_sparse", "sparse", compact_dir)]
    runs_int8 = [("dense_ckpt_dense_int8", "dense-int8", dense_dir), ("compact_ckpt_load_sparse_int8", "sparse-int8",
                                                                         compact_dir)]
    for dtype in ("float32", "bfloat16"):
        for label, kind, path in runs + (runs_int8 if dtype == "bfloat16" else []):
            cmd = [sys.executable, "-m", "bench.inference", "_rss_child", "--kind", kind, "--path", str(path),
                   "--dtype", dtype]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ)).stdout
            rec = json.loads(out.strip().splitlines()[-1])
            result["runs"][f"{label}_{dtype}"] = rec
            print(label, dtype, json.dumps(rec), flush=True)
    # dense safetensors are mmapped: `from_pretrained` returns before the weights are read, so the comparable peak is
    # "load + first use" (after_generate) for every variant
    for dtype in ("float32", "bfloat16"):
        r = result["runs"]
        sparse = r[f"compact_ckpt_load_sparse_{dtype}"]["after_generate"]
        result[f"peak_ratio_sparse_vs_dense_ckpt_{dtype}"] = sparse / r[f"dense_ckpt_from_pretrained_{dtype}"]["after_generate"]
        result[f"peak_ratio_sparse_vs_compact_dense_{dtype}"] = sparse / r[f"compact_ckpt_from_pretrained_{dtype}"]["after_generate"]
    r = result["runs"]
    result["peak_ratio_sparse_int8_vs_dense_int8"] = (r["compact_ckpt_load_sparse_int8_bfloat16"]["after_generate"]
                                                       / r["dense_ckpt_dense_int8_bfloat16"]["after_generate"])
    files = {d.name: sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (dense_dir, compact_dir)}
    result["checkpoint_bytes"] = files
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["speed", "rss", "crossover", "traffic", "breakdown", "peer", "_rss_child"])
    parser.add_argument("--model", choices=["llama09b", "smollm2", "tiny"], default="tiny")
    parser.add_argument("--sparsities", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.7, 0.8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512, help="prefill length (0: skip)")
    parser.add_argument("--repeats", type=int, default=2, help="alternated decode runs per variant")
    parser.add_argument("--prefill-repeats", type=int, default=1, help="alternated prefill runs per variant")
    parser.add_argument("--work-dir", default="/tmp/owl-inference-bench")
    parser.add_argument("--rss-sparsity", type=float, default=0.7)
    parser.add_argument("--forms", type=lambda s: tuple(f.strip().replace("-", "_") for f in s.split(",")),
                        default=FORMS, help=f"speed / breakdown: the forms to alternate, of {','.join(FORMS)}")
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--decode", choices=["eager", "lean", "both"], default="both",
                        help="breakdown: model.generate's token (forward hooks), the lean decode's (bench/lean.py), or both")
    parser.add_argument("--peer-python", default=None,
                        help="peer: the bench venv's Python with llama-cpp-python (default: .bench-venv/bin/python)")
    parser.add_argument("--llama-cpp-src", default=None,
                        help="peer: a folder with llama.cpp's convert_hf_to_gguf.py (default: from the sdist, via pip)")
    # _rss_child
    parser.add_argument("--kind", choices=["dense", "sparse", "dense-int8", "sparse-int8"])
    parser.add_argument("--path")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    unknown = sorted(set(args.forms) - set(FORMS))
    if unknown:
        parser.error(f"--forms: unknown {unknown}; choose from {','.join(FORMS)}")
    if args.mode == "_rss_child":
        rss_child(args)
        return
    if args.mode == "peer":
        from bench.peer_llamacpp import BENCH_PYTHON, run_peer

        args.peer_python = args.peer_python or str(BENCH_PYTHON)
        result = run_peer(args)
    else:
        result = {"speed": run_speed, "rss": run_rss, "crossover": run_crossover, "traffic": run_traffic,
                  "breakdown": run_breakdown}[args.mode](args)
    result["command"] = " ".join(sys.argv)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
