"""Prune the bundled stories260K, export it to ONNX with compact (bitmask) weights, run it with onnxruntime and
compare its logits with PyTorch.

Runs offline in a few seconds on CPU:

    python examples/export_onnx.py
    python examples/export_onnx.py --storage sparse_initializer --output-dir stories-owl-onnx

The export is one graph with a KV cache that serves both the prefill and every decode step (docs/onnx.md).
Needs the onnx extra: `pip install "optimum-owl[onnx]"`.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.demo import generate_token_windows, load_bundled_model
from optimum_owl.export import OnnxCausalLM, compare_with_torch, export_onnx, relative_error

logger = logging.getLogger("export_onnx")

# fp32 ONNX vs fp32 PyTorch differ only by kernel rounding; anything above this is a broken export.
MAX_RELATIVE_ERROR = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.7, help="target mean sparsity (default 0.7)")
    p.add_argument("--num-samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window (default 128)")
    p.add_argument("--storage", default="bitmask", help="bitmask | sparse_initializer | dense (default bitmask)")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens compared with PyTorch (default 16)")
    p.add_argument("--output-dir", default=None, help="keep the export here (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace, output_dir: Path) -> int:
    # 1. Prune.
    model, tokenizer = load_bundled_model()
    model.eval()
    calibration = generate_token_windows(model, tokenizer, args.num_samples, args.seqlen, seed=args.seed)
    config = OWLPrunerConfig(sparsity=args.sparsity, num_samples=args.num_samples, seqlen=args.seqlen, seed=args.seed)
    report = OWLPruner(config).prune(model, dataset=calibration, tokenizer=tokenizer)

    # 2. Export. `validate=False` because step 3 does the same check by hand; with the default `validate=True`
    #    the numbers land in `owl_onnx.json` under "validation".
    result = export_onnx(model, output_dir, storage=args.storage, dtype="float32", validate=False,
                         tokenizer=tokenizer, report=report)
    logger.info("Exported to %s", result.output_dir)

    # 3. Run the graph with onnxruntime on a real prompt and compare with the pruned PyTorch model.
    lm = OnnxCausalLM(output_dir)
    prompt = tokenizer("Once upon a time, there was a little", return_tensors="np")["input_ids"].astype(np.int64)
    onnx_logits, _ = lm(prompt)  # prefill: empty KV cache in, logits and the new cache out
    with torch.no_grad():
        torch_logits = model(input_ids=torch.from_numpy(prompt)).logits.numpy()
    prefill_error = relative_error(onnx_logits, torch_logits)
    # compare_with_torch adds one decode step through the KV cache and a greedy-generation comparison.
    checks = compare_with_torch(model, lm, prompt, max_new_tokens=args.new_tokens)

    print(f"achieved sparsity: {report.sparsity:.4f}; storage: {args.storage}")
    print(f"model.onnx: {result.size_ratio:.3f}x the bytes of the dense export of the same model")
    print(f"relative logit error, prefill: {prefill_error:.2e}; decode step: {checks['decode_rel_error']:.2e}")
    print(f"greedy {args.new_tokens} tokens identical to PyTorch: {checks['greedy_equal']}")
    print("onnx sample:", tokenizer.decode(lm.generate(prompt, max_new_tokens=args.new_tokens)[0].tolist()))
    if max(prefill_error, checks["decode_rel_error"]) > MAX_RELATIVE_ERROR:
        print(f"FAILED: ONNX logits differ from PyTorch by more than {MAX_RELATIVE_ERROR:g} (relative)")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.output_dir is not None:
        return run(args, Path(args.output_dir))
    with tempfile.TemporaryDirectory(prefix="owl-onnx-") as tmp:
        return run(args, Path(tmp) / "export")


if __name__ == "__main__":
    raise SystemExit(main())
