"""Diagnostic for `bench/memory.py`: where does the resident set of an offloaded pruning run go, phase by phase?

Runs the same offloaded OWL + Wanda prune as `python -m bench.memory --role offload` (the model must already be built
in `<work-dir>/model`, e.g. by one `python -m bench.memory` run), but attributes peak memory to phases exactly: at every phase
boundary it reads the kernel's high-water mark `VmHWM` from /proc/self/status (the peak since the last boundary)
and resets it (`echo 5 > /proc/self/clear_refs`). Because it resets the high-water mark, this script's own
`ru_maxrss` is NOT a valid whole-run peak; `bench/memory.py` measures that, without resetting anything.

`--in-memory` loads the model in RAM instead (no blocks are then entered through the offloader).

Phases: imports, load, capture, and inside each block: materialise (weights read from the offload store),
stats-forward, outlier ratios, prune (per unit), output-forward, write-back, release. Prints, per phase, the
largest peak seen and the RssAnon/RssFile split at the phase's end.

    OMP_NUM_THREADS=1 python -m bench.probes.memory_probe --work-dir /tmp/owl-mem
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

from bench._common import proc_status as status

MB = 1e6


class Phases:
    def __init__(self) -> None:
        self.stack = ["imports"]
        self.peaks: dict[str, int] = {}
        self.ends: dict[str, dict[str, int]] = {}
        self.log: list[tuple[str, int]] = []
        self.reset_ok = True

    def _boundary(self) -> None:
        st = status()
        label = self.stack[-1]
        if st["VmHWM"] > self.peaks.get(label, 0):
            self.peaks[label] = st["VmHWM"]
            self.ends[label] = st
        self.log.append((label, st))
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self.reset_ok = False

    @contextlib.contextmanager
    def __call__(self, name: str):
        self._boundary()
        self.stack.append(name)
        try:
            yield
        finally:
            self._boundary()
            self.stack.pop()


def instrument(ph: Phases) -> None:
    from optimum_owl.pruning import offload, passes, runner

    def wrap(owner, attr, label, gen=False):
        fn = getattr(owner, attr)
        if gen:
            @contextlib.contextmanager
            def wrapped(*a, **k):
                with ph(label), fn(*a, **k) as v:
                    yield v
        else:
            def wrapped(*a, **k):
                with ph(label if not callable(label) else label(a, k)):
                    return fn(*a, **k)
        setattr(owner, attr, wrapped)

    wrap(runner.BlockRunner, "capture", "capture")
    wrap(runner.BlockRunner, "forward", lambda a, k: "forward (outputs)" if k.get("keep_outputs", True) else "forward (stats)")
    wrap(passes, "prune_block", "prune units")
    wrap(offload.BlockOffloader, "_write_back", "write-back")
    orig_ratios = passes.block_outlier_ratios

    def ratios(*a, **k):
        with ph("outlier ratios"):
            return orig_ratios(*a, **k)

    passes.block_outlier_ratios = ratios

    from accelerate.hooks import AlignDevicesHook

    pre = AlignDevicesHook.pre_forward

    def pre_forward(self, module, *a, **k):
        if self.offload and len(ph.stack) and ph.stack[-1] in ("block",):
            with ph("materialise"):
                return pre(self, module, *a, **k)
        return pre(self, module, *a, **k)

    AlignDevicesHook.pre_forward = pre_forward
    orig_block = offload.BlockOffloader.block

    @contextlib.contextmanager
    def block(self, index, module):
        with ph("block"):
            with orig_block(self, index, module) as b:
                yield b

    offload.BlockOffloader.block = block


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--cpu-budget", default="1MiB")
    parser.add_argument("--trace", type=int, nargs=2, help="print boundaries [a, b) of the phase log")
    parser.add_argument("--in-memory", action="store_true", help="load the model in RAM instead (no offload)")
    parser.add_argument("--no-prune", action="store_true", help="stop after loading")
    args = parser.parse_args()
    ph = Phases()
    ph._boundary()
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_owl import OWLPruner, OWLPrunerConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    instrument(ph)
    ph._boundary()
    after_imports = status()
    import shutil

    shutil.rmtree(Path(args.work_dir) / "offload-probe", ignore_errors=True)
    with ph("load"):
        if args.in_memory:
            model = AutoModelForCausalLM.from_pretrained(Path(args.work_dir) / "model", dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                Path(args.work_dir) / "model", device_map="auto", max_memory={"cpu": args.cpu_budget},
                offload_folder=str(Path(args.work_dir) / "offload-probe"), dtype=torch.float32,
            )
    after_load = status()
    import gc

    gc.collect()
    from optimum_owl.pruning.memory import release_freed_memory

    release_freed_memory()
    after_trim = status()
    result = {"after_imports": after_imports, "after_load": after_load, "after_load_gc_trim": after_trim}
    if not args.no_prune:
        ids = torch.randint(0, args.vocab, (args.samples, args.seqlen), generator=torch.Generator().manual_seed(0))
        config = OWLPrunerConfig(sparsity=0.5, method="wanda", layerwise="owl", num_samples=args.samples,
                                 seqlen=args.seqlen, batch_size=args.samples, seed=0)
        t = time.perf_counter()
        with ph("prune (other)"):
            OWLPruner(config).prune(model, dataset=ids)
        result["prune_s"] = round(time.perf_counter() - t, 1)
        result["after_prune"] = status()
    result["phase_peaks_MB"] = {k: round(v / MB, 1) for k, v in sorted(ph.peaks.items(), key=lambda kv: -kv[1])}
    result["phase_end_split_MB"] = {
        k: {kk: round(vv / MB, 1) for kk, vv in v.items()} for k, v in ph.ends.items()
    }
    result["reset_ok"] = ph.reset_ok
    if args.trace:
        for label, st in ph.log[args.trace[0]: args.trace[1]]:
            print(f"{label:20s} peak {st['VmHWM'] / MB:7.1f}  now {st['VmRSS'] / MB:7.1f}  anon {st['RssAnon'] / MB:7.1f}  "
                  f"file {st['RssFile'] / MB:7.1f}")
    for key in ("after_imports", "after_load", "after_load_gc_trim", "after_prune"):
        if key in result:
            result[key] = {k: round(v / MB, 1) for k, v in result[key].items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
