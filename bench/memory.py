"""Memory benchmark: prune a disk-offloaded random Llama and compare peak resident memory with its checkpoint size.

Steps (each measured run happens in a fresh subprocess, so its peak RSS is its own):

1. (subprocess) Build a random fp32 Llama (default: hidden 1024, 20 layers, intermediate 2816, vocab 32000, untied lm_head:
   a ~1.29 GB `model.safetensors`) and save it to `<work-dir>/model` (reused when present with the same shape).
2. `offload` run: load it with `device_map="auto"`, `max_memory={"cpu": <--cpu-budget>}` and an `offload_folder`
   (so the blocks live on disk), prune with OWL + Wanda, and record the peak RSS.
3. `memory` run: load it normally (all weights in RAM) and prune with the same config and calibration data.
4. Compare the keep masks (`weight != 0`) of every block weight of both runs.

Peak RSS is `VmHWM` (`bench._common.peak_rss_bytes`), the kernel's high-water mark of the process's resident set
(anonymous memory *and* mapped file pages, e.g. safetensors mmaps), for the whole subprocess, so it includes the
Python + torch + transformers baseline. (The figures of docs/benchmarks.md were taken with `ru_maxrss`; for these
children, started by a parent that imports neither torch nor the model, the two are the same high-water mark.) The
baseline (RSS after the imports, before any model exists) is reported separately, then the peak after importing the
model's code (`modeling_llama`, which transformers' modeling stack makes heavy; `from_pretrained` would import it
anyway) and after loading (peak and current), and a psutil sampler (every 10 ms) records which phase the peak fell in.
`bench/probes/memory_probe.py` attributes the peak to the phases inside a block exactly.

Usage (from the repository root):

    OMP_NUM_THREADS=1 python -m bench.memory --work-dir /tmp/owl-memory

Prints a JSON result and writes it to `<work-dir>/results.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench._common import peak_rss_bytes, proc_status, random_llama


def _status_bytes() -> dict[str, int]:
    """RssAnon / RssFile (mapped files, e.g. safetensors mmaps) / RssShmem of this process."""
    return proc_status(("RssAnon", "RssFile", "RssShmem"))


class RssSampler:
    """Samples the current RSS every `interval` seconds and remembers the phase of the maximum."""

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.phase = "start"
        self.peak = 0
        self.peak_phase = "start"
        self.peak_split: dict[str, int] = {}
        self.phase_peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), rss)
            if rss > self.peak:
                self.peak, self.peak_phase = rss, self.phase
                self.peak_split = _status_bytes()
            time.sleep(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _label_phases(sampler: RssSampler) -> None:
    """Label the sampler's phases inside `prune`: capturing block 0's inputs, and time spent inside a block."""
    import contextlib

    from optimum_owl.pruning.offload import BlockOffloader
    from optimum_owl.pruning.runner import BlockRunner

    capture = BlockRunner.capture

    def labelled_capture(self, *a, **k):
        sampler.phase = "prune: capture (embeddings)"
        try:
            return capture(self, *a, **k)
        finally:
            sampler.phase = "prune (other)"

    block = BlockOffloader.block

    @contextlib.contextmanager
    def labelled_block(self, index, module):
        sampler.phase = "prune: inside a block"
        try:
            with block(self, index, module):
                yield module
        finally:
            sampler.phase = "prune (other)"

    BlockRunner.capture = labelled_capture
    BlockOffloader.block = labelled_block


def build_model(args: argparse.Namespace) -> Path:
    path = Path(args.work_dir) / "model"
    spec = {
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 64,
        "num_key_value_heads": args.hidden // 64,
        "vocab_size": args.vocab,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }
    marker = path / "bench_spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return path
    model = random_llama(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                         heads=args.hidden // 64, vocab=args.vocab)  # = spec
    model.save_pretrained(path)
    marker.write_text(json.dumps(spec))
    return path


def run_role(args: argparse.Namespace) -> None:
    """Subprocess body: load (offloaded or in RAM), prune, report RSS, save packed masks."""
    sampler = RssSampler().start()
    sampler.phase = "imports"
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_owl import OWLPruner, OWLPrunerConfig
    from optimum_owl.pruning.modeling import get_blocks_and_units
    from optimum_owl.pruning.offload import BlockOffloader

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    baseline = peak_rss_bytes()
    baseline_split = _status_bytes()
    # The model's code (transformers' modeling stack) is imported by `from_pretrained` anyway; importing it here
    # first only separates its cost (torch.distributed.tensor, sympy, torch._dynamo, ... pulled in by transformers)
    # from the loading itself. It does not change the run's peak.
    sampler.phase = "import model code"
    import transformers.models.llama.modeling_llama  # noqa: F401

    after_model_code = peak_rss_bytes()
    model_path = Path(args.work_dir) / "model"
    sampler.phase = "load"
    t0 = time.perf_counter()
    if args.role == "offload":
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            device_map="auto",
            max_memory={"cpu": args.cpu_budget},
            offload_folder=str(Path(args.work_dir) / "offload"),
            dtype=torch.float32,
        )
        device_map = {k: str(v) for k, v in model.hf_device_map.items()}
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        device_map = None
    load_s = time.perf_counter() - t0
    after_load = peak_rss_bytes()
    after_load_split = _status_bytes()
    import psutil

    after_load_now = psutil.Process().memory_info().rss
    ids = torch.randint(0, args.vocab, (args.samples, args.seqlen), generator=torch.Generator().manual_seed(0))
    config = OWLPrunerConfig(
        sparsity=args.sparsity, method="wanda", layerwise="owl", num_samples=args.samples, seqlen=args.seqlen,
        batch_size=args.batch_size, seed=0,
    )
    _label_phases(sampler)
    sampler.phase = "prune (other)"
    t0 = time.perf_counter()
    report = OWLPruner(config).prune(model, dataset=ids)
    prune_s = time.perf_counter() - t0
    peak = peak_rss_bytes()
    sampler.phase = "masks"
    sampler.stop()
    _, blocks, units = get_blocks_and_units(model)
    offloader = BlockOffloader(model)
    masks = {}
    for i, block in enumerate(blocks):
        with offloader(i, block):
            for u in units[i]:
                masks[u.name] = torch.from_numpy(np.packbits((u.weight() != 0).numpy().reshape(-1)))
    torch.save(masks, Path(args.work_dir) / f"masks_{args.role}.pt")
    result = {
        "role": args.role,
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "baseline_split": baseline_split,
        "rss_after_model_code_import_bytes": after_model_code,
        "rss_after_load_bytes": after_load,
        "rss_now_after_load_bytes": after_load_now,
        "after_load_split": after_load_split,
        "sampler_peak_bytes": sampler.peak,
        "sampler_peak_phase": sampler.peak_phase,
        "sampler_phase_peaks": sampler.phase_peaks,
        "sampler_peak_split": sampler.peak_split,
        "load_s": round(load_s, 2),
        "prune_s": round(prune_s, 2),
        "sparsity": report.sparsity,
        "device_map_values": sorted(set(device_map.values())) if device_map else None,
        "disk_modules": sum(v == "disk" for v in device_map.values()) if device_map else 0,
    }
    print("RESULT " + json.dumps(result))


def _subprocess(args: argparse.Namespace, role: str, parse: bool = True) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", "--role", role] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "role" and v is not None
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{role} run failed:\n{proc.stderr[-4000:]}")
    if not parse:
        return {}
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--cpu-budget", default="1MiB", help="max_memory['cpu'] for the offloaded load")
    parser.add_argument("--role", choices=["build", "offload", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    if args.role == "build":
        build_model(args)
        return
    if args.role:
        run_role(args)
        return
    import shutil

    # The parent never loads torch or the model before the measured runs (a small parent: the children's figures
    # would be the same under ru_maxrss, which Linux carries over fork + exec).
    _subprocess(args, "build", parse=False)
    path = Path(args.work_dir) / "model"
    ckpt_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    shutil.rmtree(Path(args.work_dir) / "offload", ignore_errors=True)
    offload = _subprocess(args, "offload")
    memory = _subprocess(args, "memory")
    import numpy as np
    import torch

    a = torch.load(Path(args.work_dir) / "masks_offload.pt")
    b = torch.load(Path(args.work_dir) / "masks_memory.pt")
    differing = 0
    for name in b:
        x, y = np.unpackbits(a[name].numpy()), np.unpackbits(b[name].numpy())
        differing += int((x != y).sum())
    gib = 1024**3
    result = {
        "checkpoint_bytes": ckpt_bytes,
        "checkpoint_gib": round(ckpt_bytes / gib, 3),
        "offload": offload,
        "memory": memory,
        "peak_rss_over_checkpoint": round(offload["peak_rss_bytes"] / ckpt_bytes, 4),
        "peak_rss_above_baseline_over_checkpoint": round(
            (offload["peak_rss_bytes"] - offload["baseline_rss_bytes"]) / ckpt_bytes, 4
        ),
        "in_memory_peak_rss_over_checkpoint": round(memory["peak_rss_bytes"] / ckpt_bytes, 4),
        "masks_identical": differing == 0 and a.keys() == b.keys(),
        "mask_entries_differing": differing,
        "args": {k: v for k, v in vars(args).items() if k != "role"},
    }
    out = json.dumps(result, indent=1)
    (Path(args.work_dir) / "results.json").write_text(out + "\n")
    print(out)


if __name__ == "__main__":
    main()
