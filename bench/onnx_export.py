"""Benchmark of the sparse ONNX export: file size against the dense export (fp32 and fp16, three storages),
onnxruntime vs PyTorch logits, greedy-32 equality and session creation time, at 70% OWL sparsity.

Models: stories260K (real, from ../shared/assets, pruned with OWL+Wanda on WikiText-2 text), a tiny random Llama
(hidden 64, 2 layers, vocab 128), a larger random Llama (hidden 512, 4 layers, vocab 1024: embeddings 8% of the
parameters) and "llama-1024" (hidden 1024, 8 layers, vocab 2048: embeddings 3.9% of the parameters, LLaMA-7B's share)
to show how the ratio behaves once the graph and embeddings stop dominating the file.

Usage (from the repository root):
    OMP_NUM_THREADS=1 python -m bench.onnx_export --out /tmp/owl-onnx-bench [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

from bench._common import STORIES, WIKI, random_llama
from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.export import OnnxCausalLM, export_onnx


def prune(model, calibration, tokenizer=None, num_samples=16, seqlen=128):
    config = OWLPrunerConfig(sparsity=0.7, method="wanda", layerwise="owl", num_samples=num_samples, seqlen=seqlen, seed=0)
    report = OWLPruner(config).prune(model, dataset=calibration, tokenizer=tokenizer)
    return report


def session_times(folder: Path, repeats: int = 5) -> float:
    times = [OnnxCausalLM(folder).session_creation_s for _ in range(repeats)]
    return statistics.median(times)


STORAGES = ("dense", "bitmask", "sparse_initializer")
MODELS = ("stories260K", "tiny-llama", "llama-512", "llama-1024")


def bench_model(name: str, model, report, out: Path, prompt, rows: list[dict], storages=STORAGES) -> None:
    for dtype in ("float32", "float16"):
        for storage in storages:
            folder = out / f"{name}-{dtype}-{storage}"
            start = time.perf_counter()
            result = export_onnx(
                model, folder, storage=storage, dtype=dtype, overwrite=True, max_new_tokens=32, prompt_ids=prompt, report=report
            )
            wall = time.perf_counter() - start
            meta = result.metadata
            val = meta["validation"]
            row = {
                "model": name,
                "dtype": dtype,
                "storage": storage,
                "sparsity": meta["weight_sparsity"],
                "onnx_bytes": meta["sizes"]["onnx_bytes"],
                "dense_onnx_bytes": meta["sizes"]["dense_onnx_bytes"],
                "ratio": meta["sizes"]["ratio_to_dense"],
                "graph_bytes": meta["sizes"]["graph_bytes"],
                "weight_ratio": meta["storage"]["compact_weight_bytes"] / meta["storage"]["dense_weight_bytes"],
                "prefill_rel_error": val["prefill_rel_error"],
                "decode_rel_error": val["decode_rel_error"],
                "greedy32_equal": val["greedy_equal"],
                "session_s_median5": session_times(folder),
                "export_s": wall,
            }
            rows.append(row)
            print(
                f"{name:10s} {dtype:7s} {storage:18s} sparsity {row['sparsity']:.3f}  {row['onnx_bytes']:>11,d} B  "
                f"ratio {row['ratio']:.3f} (weights {row['weight_ratio']:.3f})  prefill err {row['prefill_rel_error']:.1e}  "
                f"decode err {row['decode_rel_error']:.1e}  greedy32 {row['greedy32_equal']}  "
                f"session {row['session_s_median5'] * 1000:.0f} ms  export {wall:.1f} s",
                flush=True,
            )
            if storage != "dense" or dtype != "float32":
                shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/owl-onnx-bench")
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-large", action="store_true", help="skip llama-512 and llama-1024")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--storages", nargs="+", choices=STORAGES, default=list(STORAGES),
                        help="storages to export (`dense` is always exported: it is the size baseline)")
    args = parser.parse_args()
    storages = ["dense"] + [s for s in args.storages if s != "dense"]
    if args.skip_large:
        args.models = [m for m in args.models if m not in ("llama-512", "llama-1024")]
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if "stories260K" not in args.models:
        pass
    elif STORIES.exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
        tok = AutoTokenizer.from_pretrained(STORIES)
        report = prune(model, str(WIKI), tok, num_samples=16, seqlen=128)
        prompt = tok("Once upon a time, there was a little girl", return_tensors="pt").input_ids
        bench_model("stories260K", model, report, out, prompt, rows, storages)
    else:
        print(f"skipping stories260K: {STORIES} not found")
    gen = torch.Generator().manual_seed(0)
    if "tiny-llama" in args.models:
        tiny = random_llama(hidden=64, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=128, max_positions=512)
        report = prune(tiny, torch.randint(0, 128, (16, 64), generator=gen), num_samples=16, seqlen=64)
        bench_model("tiny-llama", tiny, report, out, None, rows, storages)
    if "llama-512" in args.models:
        large = random_llama(hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=4, vocab=1024,
                             max_positions=512)
        report = prune(large, torch.randint(0, 1024, (8, 64), generator=gen), num_samples=8, seqlen=64)
        bench_model("llama-512", large, report, out, None, rows, storages)
    if "llama-1024" in args.models:
        # LLaMA-7B's proportions: untied embedding + LM head are 3.9% of the parameters (2 x 32000 x 4096 of 6.74B);
        # here 2 x 2048 x 1024 of 107M. llama-512's 8% is closer to small-model or large-vocabulary proportions.
        big = random_llama(hidden=1024, intermediate=2816, layers=8, heads=16, vocab=2048, max_positions=512)
        report = prune(big, torch.randint(0, 2048, (8, 64), generator=gen), num_samples=8, seqlen=64)
        bench_model("llama-1024", big, report, out, None, rows, storages)
    info = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "rows"}))


if __name__ == "__main__":
    main()
