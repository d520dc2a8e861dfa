"""Prune the bundled stories260K, then repair it with a short masked-LoRA fine-tune that keeps every pruned zero.

Runs offline on CPU (about ten seconds with the defaults):

    python examples/sparse_lora_repair.py
    python examples/sparse_lora_repair.py --steps 100 --train-windows 64       # a longer repair

A plain LoRA merge adds a dense low-rank delta and un-prunes the model. The masked LoRA of `optimum_owl.repair`
multiplies the delta by the weight's keep-mask, so the merged model has exactly the pruned zeros (docs/repair.md).
Needs peft: `pip install "optimum-owl[peft]"`.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.demo import generate_token_windows, load_bundled_model
from optimum_owl.repair import RepairConfig, repair, zero_masks, zeros_lost

logger = logging.getLogger("sparse_lora_repair")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.7, help="target mean sparsity (default 0.7)")
    p.add_argument("--num-samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per window, pruning and repair (default 128)")
    p.add_argument("--steps", type=int, default=20, help="repair optimizer steps (default 20)")
    p.add_argument("--train-windows", type=int, default=32, help="generated training windows (default 32)")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out generated windows (default 8)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--learning-rate", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    model, tokenizer = load_bundled_model()
    model.eval()
    # Three disjoint sets of text written by the dense model (different seeds): calibration, training, evaluation.
    calibration = generate_token_windows(model, tokenizer, args.num_samples, args.seqlen, seed=args.seed)
    train = generate_token_windows(model, tokenizer, args.train_windows, args.seqlen, seed=args.seed + 1)
    heldout = generate_token_windows(model, tokenizer, args.eval_windows, args.seqlen, seed=args.seed + 1000)

    # 1. Prune (OWL + Wanda) in place.
    config = OWLPrunerConfig(sparsity=args.sparsity, num_samples=args.num_samples, seqlen=args.seqlen, seed=args.seed)
    OWLPruner.apply(model, config, dataset=calibration, tokenizer=tokenizer)
    zeros_before = zero_masks(model)  # {weight name: bool tensor, True where the weight is exactly 0}
    logger.info("Pruned to sparsity %.4f; %d weight matrices hold zeros", model.owl_report.sparsity, len(zeros_before))

    # 2. Repair: masked LoRA on every pruned weight, trained with the transformers Trainer, merged at the end.
    #    `train_data` / `eval_data` given as LongTensor [n, seqlen] are used as the windows directly.
    with tempfile.TemporaryDirectory(prefix="owl-repair-") as scratch:
        repair_config = RepairConfig(
            r=args.rank,
            lora_alpha=2.0 * args.rank,
            seqlen=args.seqlen,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=args.learning_rate,
            logging_steps=max(1, args.steps // 4),
            seed=args.seed,
            output_dir=scratch,  # Trainer scratch space (nothing is saved there; removed on exit)
        )
        model, report = repair(model, tokenizer, train_data=train, config=repair_config, eval_data=heldout)

    # 3. Check the zeros independently of the report: every weight that was 0 after pruning must still be 0.
    lost = zeros_lost(model, zeros_before)
    loss = "n/a" if report.train_loss is None else f"{report.train_loss:.4f}"
    print(f"trainable LoRA parameters: {report.trainable_params:,}; steps: {report.steps}; train loss: {loss}")
    print(f"perplexity (generated, held out): pruned {report.eval_ppl_before:.3f} -> repaired {report.eval_ppl_after:.3f}")
    print(f"sparsity: before {report.sparsity_before:.6f}, after {report.sparsity_after:.6f}")
    if lost:
        print(f"FAILED: pruned zeros became non-zero in {len(lost)} weights: {dict(list(lost.items())[:5])}")
        return 1
    print(f"zeros preserved: all {sum(int(m.sum()) for m in zeros_before.values()):,} pruned weights are still 0")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
