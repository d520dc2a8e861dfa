"""Prune on load with `from_pretrained(..., quantization_config=OWLPrunerConfig(...))`, save the compact
checkpoint, reload it and check the weights are bit-identical.

Runs offline in a few seconds on CPU:

    python examples/prune_on_load.py
    python examples/prune_on_load.py --output-dir stories-owl      # keep the folders instead of a temp dir

`import optimum_owl` registers `quant_method="owl"` with transformers, so the same `from_pretrained` call that
loads a dense checkpoint prunes it, and `save_pretrained` writes each pruned weight as a packed bit mask plus its
non-zero values (docs/checkpoints.md).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import optimum_owl  # noqa: F401  (registers quant_method="owl" with transformers)
from optimum_owl import OWLPrunerConfig
from optimum_owl.demo import generate_token_windows, load_bundled_model
from optimum_owl.formats import size_summary, verify_checkpoint

logger = logging.getLogger("prune_on_load")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.7, help="target mean sparsity (default 0.7)")
    p.add_argument("--layerwise", default="owl", help="owl | uniform | owl-auto (default owl)")
    p.add_argument("--num-samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per calibration window (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="keep the dense and pruned folders here (default: a temp dir)")
    return p.parse_args(argv)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run(args: argparse.Namespace, workdir: Path) -> int:
    # 1. A dense checkpoint folder to start from: the bundled stories260K, saved as your own model would be.
    dense_dir = workdir / "dense"
    model, tokenizer = load_bundled_model()
    model.save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)

    # Calibration windows sampled from the dense model (no download). Text works too: a list of strings or a
    # .txt/.jsonl path, tokenised with `tokenizer=` or, when it is left out, with the tokenizer in `dense_dir`.
    calibration = generate_token_windows(model, tokenizer, args.num_samples, args.seqlen, seed=args.seed)
    del model

    # 2. Prune on load. `dataset` and `tokenizer` live only for this run: they are never written to config.json.
    config = OWLPrunerConfig(
        sparsity=args.sparsity,
        method="wanda",
        layerwise=args.layerwise,
        num_samples=args.num_samples,
        seqlen=args.seqlen,
        seed=args.seed,
        dataset=calibration,
        tokenizer=tokenizer,
    )
    logger.info("Loading %s with quantization_config=OWLPrunerConfig(...) (prunes on load)", dense_dir)
    pruned = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config, dtype=torch.float32)
    print(pruned.owl_report.block_table())

    # 3. Save: compact format (values + bitmask + shape per pruned weight, quantization_config in config.json).
    pruned_dir = workdir / "pruned"
    pruned.save_pretrained(pruned_dir)
    tokenizer.save_pretrained(pruned_dir)
    pruned.owl_report.save(pruned_dir)
    checked = verify_checkpoint(pruned_dir)  # headers, popcounts and CRC-32 of every compressed tensor
    summary = size_summary(pruned_dir)
    logger.info("Verified %d compressed tensors (%d CRC checks)", summary["compressed_tensors"], checked["checked_crc"])

    # 4. Reload (needs `import optimum_owl`, done above) and compare every tensor bit for bit.
    reloaded = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32)
    expected = pruned.state_dict()
    actual = reloaded.state_dict()
    mismatched = sorted(k for k in expected if k not in actual or not torch.equal(expected[k], actual[k]))
    if mismatched or set(actual) != set(expected):
        extra = sorted(set(actual) - set(expected))
        print(f"FAILED: {len(mismatched)} tensors differ after reload: {mismatched[:5]}; unexpected: {extra[:5]}")
        return 1

    dense_bytes, pruned_bytes = folder_bytes(dense_dir), folder_bytes(pruned_dir)
    print(f"achieved sparsity: {pruned.owl_report.sparsity:.4f}")
    print(f"safetensors bytes: dense {dense_bytes:,} -> compact {pruned_bytes:,} ({pruned_bytes / dense_bytes:.3f}x); "
          f"compressed weights alone {summary['compressed_ratio']:.3f}x")
    print(f"reloaded {len(actual)} tensors from {pruned_dir}: all bit-identical")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.output_dir is not None:
        return run(args, Path(args.output_dir))
    with tempfile.TemporaryDirectory(prefix="owl-prune-on-load-") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    raise SystemExit(main())
