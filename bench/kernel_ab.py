"""Two builds of the decode kernel, alternated in one process (for kernel changes; docs/benchmarks.md).

Builds `optimum_owl/inference/csrc/sparse_linear.cpp` as it is at git revision `--base` and as it is in the working
tree, each into a temporary folder with the library's flags, checks that both give bit-identical outputs (or, with
`--reorders`, outputs equal to 1e-3 for changes that reorder the float sums), then times
decode over a stack of random pruned layers shaped like the 0.95B Llama's (per layer: four 2048 x 2048,
two 5632 x 2048, one 2048 x 5632; `--layers` of them: several times the L3 cache, so weights come from memory), the
two builds and dense `F.linear` in turn, `--rounds` times, for each of `--tokens` (tokens per call; below 16 is the
decode path). Reports each one's weight GB/s (weight bytes per call over its time), best and median. Both builds are
called through this tree's `KernelOps`, so `--base` must have the same C entry points (the commit that added the
AVX-512 path, or later).
With `--isa`, the two are instead the working tree's AVX2 and AVX-512 decode paths (one build; needs an AVX-512F
CPU, or `--emulate-avx512` to run the AVX-512 path's code in the test build that emulates its intrinsics: a check
of this script, not a speed).

    OMP_NUM_THREADS=2 python -m bench.kernel_ab --base HEAD --dtypes bfloat16,float32,float16
    OMP_NUM_THREADS=2 python -m bench.kernel_ab --isa --tokens 1,4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench import inference as bench
from bench._common import ROOT
from optimum_owl.inference import SparseLinear
from optimum_owl.inference import kernel as kernel_mod
from optimum_owl.utils import atomic_write_text

SHAPES = [(2048, 2048)] * 4 + [(5632, 2048)] * 2 + [(2048, 5632)]  # (out, in) of one layer's linears


def build(source: str, folder: Path, name: str, extra_cflags: tuple[str, ...] = ()) -> kernel_mod.KernelOps:
    path = folder / "sparse_linear.cpp"
    path.write_text(source)
    return kernel_mod.load_ops(path, folder, name, extra_cflags)


class IsaPath:
    """One decode path of a build: `decode` switches the values' dtype to `isa` first."""

    def __init__(self, ops: kernel_mod.KernelOps, isa: str) -> None:
        self.ops, self.isa = ops, isa

    def decode(self, x, mask, values, offsets, bias):
        self.ops.set_isa(values.dtype, self.isa)
        return self.ops.decode(x, mask, values, offsets, bias)


def compare(builds: dict, dtype: torch.dtype, sparsity: float, layers: int, rounds: int, tokens: int,
            reorders: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    mods, dense = [], []
    for _ in range(layers):
        for out_f, in_f in SHAPES:
            w = bench.pruned_weight(torch.randn(out_f, in_f, generator=gen), sparsity).to(dtype)
            lin = nn.Linear(in_f, out_f, bias=False, device="meta")
            lin.weight = nn.Parameter(w, requires_grad=False)
            mods.append(SparseLinear.from_dense(lin))
            dense.append(w)
    xs = {n: torch.randn(tokens, n, generator=gen) for n in (2048, 5632)}
    outs = [[ops.decode(xs[m.in_features], m.mask, m.values, m.offsets, None) for m in mods[: len(SHAPES)]]
            for ops in builds.values()]
    for a, b in zip(*outs):
        if not (torch.equal(a, b) or (reorders and torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3))):
            raise SystemExit("the two builds give different outputs" + ("" if reorders else
                             " (pass --reorders if the change is meant to change the float summation order)"))
    runs = {name: (lambda ops=ops: [ops.decode(xs[m.in_features], m.mask, m.values, m.offsets, None) for m in mods])
            for name, ops in builds.items()}
    runs["dense"] = lambda: [F.linear(xs[w.shape[1]].to(dtype), w) for w in dense]
    nbytes = {name: sum(m.weight_nbytes() for m in mods) for name in builds}
    nbytes["dense"] = sum(w.numel() * w.element_size() for w in dense)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    row = {"dtype": str(dtype).removeprefix("torch."), "sparsity": sparsity, "tokens": tokens}
    for name, t in times.items():
        row[name] = {"best_GB_s": round(nbytes[name] / min(t) / 1e9, 2),
                     "median_GB_s": round(nbytes[name] / statistics.median(t) / 1e9, 2)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision of the baseline kernel source")
    parser.add_argument("--dtypes", default="bfloat16,float32,float16")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", default="1", help="comma-separated token counts per call (decode path: < 16)")
    parser.add_argument("--reorders", action="store_true",
                        help="the change reorders float sums: outputs must agree to 1e-3, not bit for bit")
    parser.add_argument("--isa", action="store_true", help="compare the working tree's AVX2 and AVX-512 paths")
    parser.add_argument("--emulate-avx512", action="store_true",
                        help="with --isa: build with tests/csrc/avx512_emulated.h (checks the script, not a speed)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rel = "optimum_owl/inference/csrc/sparse_linear.cpp"
    with tempfile.TemporaryDirectory() as tmp:
        builds = {}
        if args.isa:
            folder = Path(tmp) / "isa"
            folder.mkdir()
            flags = ("-include", str(ROOT / "tests" / "csrc" / "avx512_emulated.h")) if args.emulate_avx512 else ()
            ops = build((ROOT / rel).read_text(), folder, "owl_ab_isa", flags)
            if not ops.avx512_supported:
                raise SystemExit("this CPU has no AVX-512F (or the OS does not enable it): nothing to compare")
            builds = {"avx2": IsaPath(ops, "avx2"), "avx512": IsaPath(ops, "avx512")}
        else:
            base_src = subprocess.run(["git", "show", f"{args.base}:{rel}"], cwd=ROOT, check=True,
                                      capture_output=True, text=True).stdout
            for name, src in (("base", base_src), ("working_tree", (ROOT / rel).read_text())):
                folder = Path(tmp) / name
                folder.mkdir()
                builds[name] = build(src, folder, f"owl_ab_{name}")
        rows = []
        for tokens in (int(t) for t in args.tokens.split(",")):
            for dt in args.dtypes.split(","):
                row = compare(builds, getattr(torch, dt), args.sparsity, args.layers, args.rounds, tokens, args.reorders)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"machine": bench.machine(), "args": vars(args), "rows": rows, "command": " ".join(sys.argv)}
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
