"""Compact (bitmask) vs dense checkpoints of 70%-sparse models: file sizes, decoder-linear ratios, load times.

Models:
- `stories260K` (real pretrained Llama, `../shared/assets/models/stories260K`), pruned with OWL + Wanda at 70% on
  C4 calibration text (16 windows of 128 tokens).
- a random ~100M-class Llama (12 blocks, hidden 768, intermediate 2048, vocab 32000, 134M parameters with the
  untied head), pruned with magnitude at a uniform 70% (the checkpoint size depends only on the sparsity).

For each dtype (fp32, fp16, bf16) the pruned model is saved twice, compact (`save_pretrained`) and dense
(`optimum_owl.serialization.save_dense`), reloaded (weights checked bit-identical), and each checkpoint is loaded
`--repeats` times with `from_pretrained` (median wall time, page cache warm for both).

Usage:
    OMP_NUM_THREADS=2 python -m bench.checkpoint_size [--models stories260K,llama100m] \
        [--dtypes float32,float16,bfloat16] [--repeats 3] [--json out.json]

Timings are medians of `--repeats` loads; "load+forward" adds one 8-token forward pass (see `timed_load`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import optimum_owl  # noqa: F401  (registers the "owl" quantizer)
from bench._common import C4, STORIES, random_llama
from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.formats import compressible_names, size_summary
from optimum_owl.serialization import save_dense

SPARSITY = 0.7


def build(name: str) -> tuple[torch.nn.Module, str]:
    if name == "stories260K":
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
        texts = [json.loads(line)["text"] for line in C4.open()][:200]
        config = OWLPrunerConfig(sparsity=SPARSITY, method="wanda", layerwise="owl", num_samples=16, seqlen=128)
        OWLPruner(config).prune(model, dataset=texts, tokenizer=str(STORIES))
        return model, "OWL + Wanda, 16 x 128 C4 tokens"
    if name == "llama100m":
        model = random_llama(hidden=768, intermediate=2048, layers=12, heads=12, vocab=32000)
        OWLPruner(OWLPrunerConfig(sparsity=SPARSITY, method="magnitude", layerwise="uniform")).prune(model)
        return model, "magnitude, uniform"
    raise ValueError(f"unknown model {name!r}")


def timed_load(path: Path, repeats: int) -> tuple[float, float]:
    """Median `from_pretrained` time, and median time to load + run one 8-token forward pass.

    The second number is the fair one: transformers maps a dense safetensors file lazily, so its weights are only
    read when first used, while a compact file is decoded inside `from_pretrained`.
    """
    load, ready = [], []
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    for _ in range(repeats):
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path)
        load.append(time.perf_counter() - start)
        with torch.no_grad():
            model(ids)
        ready.append(time.perf_counter() - start)
        del model
    return statistics.median(load), statistics.median(ready)


def measure(model: torch.nn.Module, dtype: torch.dtype, repeats: int, workdir: Path) -> dict:
    model = model.to(dtype)
    compact, dense = workdir / "compact", workdir / "dense"
    start = time.perf_counter()
    model.save_pretrained(compact)
    save_compact_s = time.perf_counter() - start
    start = time.perf_counter()
    save_dense(model, dense, overwrite=True)
    save_dense_s = time.perf_counter() - start

    reloaded = AutoModelForCausalLM.from_pretrained(compact)
    identical = all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    del reloaded

    summary = size_summary(compact)
    dense_bytes = sum(f.stat().st_size for f in dense.glob("*.safetensors"))
    linear_dense = linear_stored = 0
    for name in compressible_names(model):
        param = model.get_parameter(name)
        nbytes = param.numel() * param.element_size()
        linear_dense += nbytes
        linear_stored += summary["per_tensor"].get(name, [nbytes])[0]
    # compact load first once so both formats are in the page cache, then alternate
    timed_load(compact, 1)
    timed_load(dense, 1)
    load_dense, ready_dense = timed_load(dense, repeats)
    load_compact, ready_compact = timed_load(compact, repeats)
    zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in compressible_names(model))
    numel = sum(model.get_parameter(n).numel() for n in compressible_names(model))
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "linear_sparsity": round(zeros / numel, 4),
        "dense_file_bytes": dense_bytes,
        "compact_file_bytes": summary["file_bytes"],
        "file_ratio": round(summary["file_bytes"] / dense_bytes, 4),
        "decoder_linear_ratio": round(linear_stored / linear_dense, 4),
        "compressed_tensors": summary["compressed_tensors"],
        "bit_identical": identical,
        "save_compact_s": round(save_compact_s, 3),
        "save_dense_s": round(save_dense_s, 3),
        "load_dense_s": round(load_dense, 3),
        "load_compact_s": round(load_compact, 3),
        "load_forward_dense_s": round(ready_dense, 3),
        "load_forward_compact_s": round(ready_compact, 3),
        "load_forward_ratio": round(ready_compact / ready_dense, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="stories260K,llama100m")
    parser.add_argument("--dtypes", default="float32,float16,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rows = []
    for name in args.models.split(","):
        if name == "stories260K" and not STORIES.is_dir():
            print(f"skipping stories260K: {STORIES} not found", file=sys.stderr)
            continue
        start = time.perf_counter()
        model, how = build(name)
        prune_s = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        for dtype_name in args.dtypes.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                row = measure(model, getattr(torch, dtype_name), args.repeats, Path(tmp))
            row.update(model=name, params=params, pruning=how, prune_s=round(prune_s, 2))
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = ("| model | dtype | sparsity | dense file | compact file | file ratio | decoder linears | "
              "load dense | load compact | load+forward dense | load+forward compact | identical |")
    print("\n" + header + "\n|" + "---|" * 12)
    for r in rows:
        print(f"| {r['model']} ({r['params'] / 1e6:.2f}M) | {r['dtype']} | {r['linear_sparsity']:.3f} | "
              f"{r['dense_file_bytes'] / 2**20:.2f} MiB | {r['compact_file_bytes'] / 2**20:.2f} MiB | "
              f"{r['file_ratio']:.3f} | {r['decoder_linear_ratio']:.3f} | {r['load_dense_s']:.3f} s | "
              f"{r['load_compact_s']:.3f} s | {r['load_forward_dense_s']:.3f} s | {r['load_forward_compact_s']:.3f} s | "
              f"{r['bit_identical']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["bit_identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
