"""Experiment (issue 27): which matmul the dense int8 LM head (`optimum_owl.inference.head.Int8Linear`) should use.

For each head shape (the random 0.95B Llama's 32000 x 2048, SmolLM2's 49152 x 576) and token count, alternates in
one process: dense `F.linear` in float32 and in bfloat16 (the float heads), `torch._weight_int8pack_mm` with bf16
activations and scales and with float32 ones, the sparse kernel's int8 paths over the head's full mask (decode below
the crossover, else tiles + GEMM), the no-kernel many-token path of `Int8Linear` (row tiles dequantized by torch +
GEMM), and `Int8Linear` itself (which picks one of those); best of `--repeats` rounds (a tenth of them from 64 tokens
on) of `--calls` calls. Also checks that `Int8Linear` agrees with a float64 matmul on the dequantized weight. On a
machine shared with other jobs, many short rounds let the best one find a quiet moment.

    OMP_NUM_THREADS=2 python -m bench.probes.int8_head --repeats 60 --calls 1 --json bench/results/int8_head.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.inference import machine
from optimum_owl.inference.format import dense_int8_packed
from optimum_owl.inference.head import Int8Linear, quantize_rows
from optimum_owl.inference.kernel import kernel
from optimum_owl.inference.module import native_bf16_gemm
from optimum_owl.utils import atomic_write_text

SHAPES = ((32000, 2048), (49152, 576))


def _row(head: Int8Linear, n: int, args: argparse.Namespace) -> dict:
    deq32 = head.dense_weight()
    deq16 = deq32.bfloat16()
    codes, scales, s16 = head.codes, head.scales, head.scales.bfloat16()
    ops = kernel()
    x = torch.randn(n, head.in_features)
    x16 = x.bfloat16()
    fns = {
        "dense_fp32": lambda: F.linear(x, deq32),
        "dense_bf16": lambda: F.linear(x16, deq16),
        "int8pack_bf16": lambda: torch._weight_int8pack_mm(x16, codes, s16),
        "int8pack_fp32": lambda: torch._weight_int8pack_mm(x, codes, scales),
        "tiles_fp32": lambda: head._tiled(x),
        "kernel_fp32": lambda: head._kernel(ops, x, False),
        "kernel_bf16": lambda: head._kernel(ops, x16, native_bf16_gemm()),
        "Int8Linear_fp32": lambda: head(x),
        "Int8Linear_bf16": lambda: head(x16),
    }
    if n > args.max_int8pack_tokens:  # minutes per round at 512 tokens: the GEMV-shaped kernel is not a GEMM
        fns = {k: f for k, f in fns.items() if not k.startswith("int8pack")}
    if ops is None:
        fns = {k: f for k, f in fns.items() if not k.startswith("kernel")}
    best = {k: float("inf") for k in fns}
    repeats = args.repeats if n < 64 else max(3, args.repeats // 10)  # a 512-token call takes seconds
    with torch.inference_mode():
        ref = x.double() @ deq32.double().t()
        err = {"fp32": (head(x).double() - ref).abs().max().item(),
               "bf16": (head(x16).double() - x16.double() @ deq32.double().t()).abs().max().item()}
        for rep in range(repeats):
            for k in (list(fns) if rep % 2 == 0 else list(reversed(fns))):
                start = time.perf_counter()
                for _ in range(args.calls):
                    fns[k]()
                best[k] = min(best[k], (time.perf_counter() - start) / args.calls)
    return {"shape": [head.out_features, head.in_features], "tokens": n, "ms": {k: v * 1e3 for k, v in best.items()},
            "max_abs_error_vs_float64": err, "max_abs_logit": ref.abs().max().item()}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    rows = []
    for out_f, in_f in SHAPES:
        torch.manual_seed(0)
        codes, scales = quantize_rows(torch.randn(out_f, in_f) * 0.02)
        head = Int8Linear(dense_int8_packed(codes, scales), None, torch.float32)
        for n in args.tokens:
            rows.append(_row(head, n, args))
            print(json.dumps(rows[-1]), flush=True)
    return {"machine": machine(), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=[1, 4, 16, 512])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-int8pack-tokens", type=int, default=64)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = run(args)
    result["command"] = " ".join(sys.argv)
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
