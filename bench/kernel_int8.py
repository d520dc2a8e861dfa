"""Layer-level batch-1 decode with int8 values against the memory-traffic limit (issue 27; docs/inference.md).

One process holds a stack of `--layers` pruned `--out` x `--in` layers (default twelve 5632 x 2048: several times the
L3 cache, so every weight byte comes from memory, as in a real decode step) in each form, and times one token through
the whole stack, the forms alternating round after round (best and median of `--rounds`):

- `dense_fp32`, `dense_bf16`: `F.linear` on the pruned weights (float32 / bfloat16 activations);
- `dense_int8`: weight-only int8 with one bf16 scale per row, `torch._weight_int8pack_mm(x_bf16, w_int8, scales)`;
- `sparse_bf16`: today's kernel on bf16 values (bf16 activations);
- `sparse_int8` and `sparse_int8_g128`: the int8 kernel (codes + float32 scales per row / per 128 inputs; bf16
  activations), with the decode path `OPTIMUM_OWL_KERNEL_ISA` / the check on first use chose for int8, and the other
  one too (`sparse_int8_avx2` / `sparse_int8_avx512`) where this CPU has both.

The kernels are called through their C entry points with arguments prepared once (what `SparseLinear`'s cached hot
path does), so the figures are the kernels', without Python overhead. Each form is reported with the bytes it reads
per token (weights, mask, offsets, scales; activations are negligible), its GB/s, and its memory-traffic limit: those
bytes at the streaming read speed of a 1 GiB tensor (`sum`), measured in the same rounds.

    OMP_NUM_THREADS=2 python -m bench.kernel_int8                 # results in bench/results/kernel_int8_<cpu>.json
    python -m bench.kernel_int8 --small --rounds 2 --output /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench._common import RESULTS, cpu_info
from bench.inference import machine, pruned_weight
from optimum_owl.inference.format import DTYPE_CODES, pack_dense, quantize_packed
from optimum_owl.inference.kernel import check_rc, kernel
from optimum_owl.utils import atomic_write_text


def cpu_tag() -> str:
    """`amd_epyc_f25m17`: the CPU's model name and family / model (a virtualised "AMD EPYC" may be Zen 3 or Zen 4)."""
    info = cpu_info()
    name = re.sub(r"[^a-z0-9]+", "_", info.get("model name", "cpu").lower()).strip("_")
    return f"{name}_f{info.get('cpu family', '?')}m{info.get('model', '?')}"


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def forms(ops, weights: list[torch.Tensor]) -> dict[str, tuple[Callable[[], None], int]]:
    """Each form's one-token call over the stack and its bytes read per token."""
    out_f, in_f = weights[0].shape
    x32 = torch.randn(1, in_f, generator=torch.Generator().manual_seed(1))
    x16 = x32.to(torch.bfloat16)
    y16 = torch.empty(1, out_f, dtype=torch.bfloat16)
    dense32 = weights
    dense16 = [w.to(torch.bfloat16) for w in weights]
    int8pack = []
    for w in weights:
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
        int8pack.append((torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8),
                         scale.to(torch.bfloat16)))
    bf16 = [pack_dense(w) for w in dense16]
    lib = ops.lib
    result: dict[str, tuple[Callable[[], None], int]] = {
        "dense_fp32": (lambda: [F.linear(x32, w) for w in dense32], sum(nbytes(w) for w in dense32)),
        "dense_bf16": (lambda: [F.linear(x16, w) for w in dense16], sum(nbytes(w) for w in dense16)),
        "dense_int8": (lambda: [torch._weight_int8pack_mm(x16, q, s) for q, s in int8pack],
                       sum(nbytes(q, s) for q, s in int8pack)),
    }
    bf16_args = [(p.mask.data_ptr(), out_f, p.mask.shape[1] // 8, p.values.data_ptr(), DTYPE_CODES[torch.bfloat16],
                  p.offsets.data_ptr(), None) for p in bf16]

    def sparse_bf16(keep=bf16) -> None:  # `keep`: the tensors `bf16_args` points into
        for args in bf16_args:
            check_rc("owl_decode", lib.owl_decode(x16.data_ptr(), 1, 1, in_f, *args, y16.data_ptr()))

    result["sparse_bf16"] = (sparse_bf16, sum(nbytes(p.mask, p.values, p.offsets) for p in bf16))
    chosen = ops.isa(torch.int8)
    isas = [chosen] + ([i for i in ("avx2", "avx512") if i != chosen] if ops.avx512_available(torch.int8) else [])
    for group_size, suffix in ((None, ""), (128, "_g128")):
        packed = [quantize_packed(p, group_size) for p in (pack_dense(w) for w in weights)]
        args = [ops.q8_args(p.mask, p.values, p.offsets, p.scales, group_size, None) for p in packed]
        size = sum(nbytes(p.mask, p.values, p.offsets, p.scales) for p in packed)
        for isa in isas if group_size is None else [chosen]:

            def sparse_int8(args=args, isa=isa, packed=packed) -> None:
                ops.set_isa(torch.int8, isa)
                for a in args:
                    check_rc("owl_decode_q8", lib.owl_decode_q8(x16.data_ptr(), 1, 1, in_f, *a, y16.data_ptr()))

            name = f"sparse_int8{suffix}" + ("" if isa == chosen else f"_{isa}")
            result[name] = (sparse_int8, size)  # `packed` (a default argument) keeps the tensors `args` points into
    return result


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    ops = kernel()
    if ops is None:
        raise SystemExit("the C++ kernel is not available on this machine: nothing to measure")
    chosen = ops.isa(torch.int8)
    stream = torch.ones(2**28 if not args.small else 2**25)  # 1 GiB of float32 (128 MiB with --small)
    stream.sum()
    rows = []
    for sparsity in args.sparsities:
        gen = torch.Generator().manual_seed(0)
        weights = [pruned_weight(torch.randn(args.out, args.inp, generator=gen), sparsity) for _ in range(args.layers)]
        fns = forms(ops, weights)
        del weights
        times: dict[str, list[float]] = {k: [] for k in [*fns, "read"]}
        for f, _ in fns.values():  # warm-up (first touch, thread pool)
            f()
        ops.set_isa(torch.int8, chosen)
        for _ in range(args.rounds):
            for name, (f, _) in [*fns.items(), ("read", (stream.sum, 0))]:
                start = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - start)
            ops.set_isa(torch.int8, chosen)
        read_gbs = stream.numel() * 4 / min(times["read"]) / 1e9
        row = {"sparsity": sparsity, "read_GB_s": read_gbs, "forms": {}}
        for name, (_, size) in fns.items():
            best = min(times[name])
            limit = size / (read_gbs * 1e9)
            row["forms"][name] = {"best_ms": best * 1e3, "median_ms": statistics.median(times[name]) * 1e3,
                                  "bytes_per_token": size, "GB_s": size / best / 1e9, "limit_ms": limit * 1e3,
                                  "fraction_of_limit": limit / best}
        for entry in row["forms"].values():
            entry["speedup_vs"] = {d: row["forms"][d]["best_ms"] / entry["best_ms"]
                                   for d in ("dense_fp32", "dense_bf16", "dense_int8")}
        rows.append(row)
        print(json.dumps({"sparsity": sparsity, "read_GB_s": round(read_gbs, 2),
                          **{k: [round(v["best_ms"], 3), round(v["GB_s"], 2), round(v["fraction_of_limit"], 2)]
                             for k, v in row["forms"].items()}}), flush=True)
        del fns
    return {"machine": machine(), "command": f"python -m bench.kernel_int8 {args.argv}".strip(),
            "shape": {"out": args.out, "in": args.inp, "layers": args.layers}, "int8_isa": chosen,
            "columns": "per form: best_ms, GB_s (bytes per token / best), fraction_of_limit (limit_ms / best_ms)",
            "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="four 512 x 256 layers (a smoke test, not a figure)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--out", type=int, default=5632)
    parser.add_argument("--in", dest="inp", type=int, default=2048)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, default=None, help="default: bench/results/kernel_int8_<cpu>.json")
    args = parser.parse_args(argv)
    args.argv = " ".join(argv) if argv is not None else " ".join(sys.argv[1:])
    if args.small:
        args.layers, args.out, args.inp = 4, 512, 256
    result = run(args)
    output = args.output or RESULTS / f"kernel_int8_{cpu_tag()}.json"
    atomic_write_text(output, json.dumps(result, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
