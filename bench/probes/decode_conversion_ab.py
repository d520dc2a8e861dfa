"""Experiment (issue 11): what converting a bf16 model's activations inside the kernel saves per decoded token.

Until 2026-12-01 the decode path of a `SparseLinear` in a bfloat16 model converted its input to float32 in Python
(`x.float()`), ran the kernel in float32 and converted the output back (`y.to(torch.bfloat16)`): extra torch ops on
each of the 112 block linears of every decoded token of the random 0.95B Llama. The kernel now reads the bf16
activations and writes bf16 itself. This script holds, in one process, dense bf16, sparse bf16 (the current path) and
sparse bf16 with the former Python-side conversion (a subclass restoring it: same kernel, same masks, same tensors),
alternates batch-1 greedy decodes of them, checks that both sparse variants produce the same tokens, and reports
ms per decoded token (best and median of `--repeats`). First, the same two paths are timed per call on single layers
(`per_call`: one token, 64 -> 64 and 2048 -> 2048, float32 / bfloat16 / float16 activations, alternated).

    OMP_NUM_THREADS=2 python -m bench.probes.decode_conversion_ab --repeats 5 --json bench/results/decode_conversion_ab.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import inference as bench
from optimum_owl.inference import SparseLinear
from optimum_owl.utils import atomic_write_text


class PythonConversion(SparseLinear):
    """The decode path as it was before 2026-12-01: float32 conversion and padding in Python, float32 output."""

    def _decode(self, ops, x, n):
        xp = self._padded_float(x.reshape(n, self.in_features))  # float32, padded to 64 * words per row
        y = torch.empty(*x.shape[:-1], self.out_features, dtype=torch.float32)
        rc = ops.lib.owl_decode(xp.data_ptr(), 0, n, xp.shape[1], *self._kernel_args(ops), y.data_ptr())
        if rc:
            raise RuntimeError(f"owl_decode failed with code {rc}")
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def per_call(repeats: int) -> list[dict]:
    """One forward at one token, current path against the former one, alternated in this process: a 64 -> 64 layer
    (almost all of it per-call cost) and a 2048 -> 2048 layer, 70%, per activation dtype; best of `repeats` rounds."""
    rows = []
    for in_f, out_f, calls in ((64, 64, 2000), (2048, 2048, 50)):
        w = bench.pruned_weight(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)), 0.7)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            lin = torch.nn.Linear(in_f, out_f, bias=True).to(dtype)
            lin.weight = torch.nn.Parameter(w.to(dtype), requires_grad=False)
            current = SparseLinear.from_dense(lin)
            former = SparseLinear.from_dense(lin)
            former.__class__ = PythonConversion
            fns = {"current": current, "former": former}
            x = torch.randn(1, 1, in_f).to(dtype)
            best = {k: float("inf") for k in fns}
            with torch.inference_mode():
                assert torch.equal(current(x), former(x))
                for _ in range(calls // 10):
                    for f in fns.values():
                        f(x)
                for rep in range(repeats):
                    for k in (list(fns) if rep % 2 == 0 else list(reversed(fns))):
                        f = fns[k]
                        t = time.perf_counter()
                        for _ in range(calls):
                            f(x)
                        best[k] = min(best[k], (time.perf_counter() - t) / calls)
            row = {"shape": f"{in_f}->{out_f}", "dtype": str(dtype).removeprefix("torch."),
                   **{k + "_us": round(v * 1e6, 2) for k, v in best.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["llama09b", "smollm2", "tiny"], default="llama09b")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calls = per_call(2 * args.repeats)
    dense32 = bench.build_model(args.model)
    names = bench.block_linears(dense32)
    dense16 = copy.deepcopy(dense32).to(torch.bfloat16)
    _, sparse16 = bench.sparse_variants(dense32, dense16, names, args.sparsity)
    del dense32, _
    memo = {id(t): t for t in list(sparse16.parameters()) + list(sparse16.buffers())}
    former = copy.deepcopy(sparse16, memo)  # shares every tensor with sparse16
    for module in former.modules():
        if type(module) is SparseLinear:
            module.__class__ = PythonConversion
    variants = {"dense_bf16": dense16, "sparse_bf16": sparse16, "sparse_bf16_python_conversion": former}
    prompt = torch.randint(3, dense16.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    for model in variants.values():
        bench.time_decode(model, prompt, 3)  # warm-up
    ms: dict[str, list[float]] = {k: [] for k in variants}
    tokens = {}
    for rep in range(args.repeats):
        for name in (list(variants) if rep % 2 == 0 else list(reversed(variants))):
            rate, out = bench.time_decode(variants[name], prompt, args.new_tokens)
            ms[name].append(1e3 / rate)
            tokens[name] = out
            print(f"rep {rep} {name}: {1e3 / rate:.1f} ms/token", flush=True)
    same = torch.equal(tokens["sparse_bf16"], tokens["sparse_bf16_python_conversion"])
    summary = {k: {"best_ms": min(v), "median_ms": statistics.median(v)} for k, v in ms.items()}
    for key in ("best_ms", "median_ms"):
        for name in ("sparse_bf16", "sparse_bf16_python_conversion"):
            summary[name][f"dense_bf16_over_this_{key.removesuffix('_ms')}"] = summary["dense_bf16"][key] / summary[name][key]
    result = {"machine": bench.machine(), "args": vars(args), "per_call": calls, "same_tokens": same, "summary": summary,
              "runs_ms": ms, "command": " ".join(sys.argv)}
    print(json.dumps({"same_tokens": same, "summary": summary}, indent=1))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
