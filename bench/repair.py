"""Benchmark: recovery after pruning. Two suites.

`--suite smollm2` (default; issue 28): SmolLM2-135M (shared GGUF, de-quantised to float32) pruned with OWL + Wanda
at 70% and 50% (calibration: 16 windows x 256 tokens from the first 500 C4 documents, seed 0), recovered on windows
of 256 tokens from C4 documents 500-999 (never calibration) at one training-token budget (`--tokens`), each recipe
one pass over its windows: masked LoRA + LM loss (today's default), masked LoRA + KD, masked full FT + KD, SEFT + KD,
with and without data selection (`select="degradation"`: the budget's windows picked from twice as many
candidates), and the dense model trained like masked LoRA + LM as the control. KD distils the dense model's top-64
logits (T=1), cached once per window set in `--workdir` and shared by the recipes. Evaluation: WikiText-2 test,
16 windows of 512 tokens, no BOS (bench/quality.py's protocol); `--curve K` adds K evaluations during training
(perplexity against tokens). Each cell is written to the JSON (bench/results/repair_smollm2.json) when it finishes
and never recomputed; pruned models and the teacher cache are kept in `--workdir` across runs.

    nice -n 15 python -m bench.repair --tokens 32768 --cells 0.7:lora-lm 0.7:lora-kd 0.7:ft-kd
    python -m bench.repair --render     # the Markdown table of the JSON

`--suite stories`: sparse repair of stories260K pruned to 70% with OWL + Wanda.

1. Sample token sequences from the dense model (the repair and held-out "generated text" sets, disjoint).
2. Prune a copy to 70% with OWL + Wanda (calibration: the first C4 documents).
3. Repair it with masked LoRA (merged), and train the dense model the same way (the control).
4. Report perplexity on held-out generated text and on WikiText-2, the share of the log-perplexity gap recovered,
   sparsity before/after (identical zero sets required), and the masked-LoRA step time relative to plain LoRA.

Run from the repository root:

    OMP_NUM_THREADS=1 python -m bench.repair --suite stories --out bench/repair_results.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench._common import C4, RESULTS, STORIES, WIKI, mean_nll
from bench.repair_suite import RECIPES
from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.evaluation import perplexity
from optimum_owl.repair import (
    RepairConfig,
    attach_masked_lora,
    block_sparsity,
    repair,
    zero_masks,
    zeros_lost,
)
from optimum_owl.repair.masked_lora import resolve_targets


@torch.no_grad()
def sample_sequences(model, n: int, length: int, seed: int, batch: int = 50) -> torch.LongTensor:
    """`n` sequences of `length` tokens sampled (temperature 1) from `model`, each starting with BOS."""
    torch.manual_seed(seed)
    bos = model.config.bos_token_id
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        ids = torch.full((b, 1), bos, dtype=torch.long)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                             temperature=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                             pad_token_id=model.config.eos_token_id)
        out.append(gen[:, :length])
    return torch.cat(out)


def evaluate(model, tok, held_out, wiki_path, seqlen, wiki_windows) -> dict[str, float]:
    nll_gen = mean_nll(model, held_out)
    ppl_wiki = perplexity(model, tok, str(wiki_path), seqlen=seqlen, max_windows=wiki_windows, add_bos=True,
                          batch_size=8)
    return {"nll_generated": nll_gen, "ppl_generated": math.exp(nll_gen), "nll_wikitext2": math.log(ppl_wiki),
            "ppl_wikitext2": ppl_wiki}


def gap_recovered(pruned: float, repaired: float, reference: float) -> float:
    return (pruned - repaired) / (pruned - reference)


def time_steps(model, batch: torch.LongTensor, steps: int, warmup: int = 2) -> list[tuple[float, float]]:
    """(wall, process CPU) seconds of `steps` AdamW training steps (fwd + bwd + step) after `warmup`."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    out = []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            out.append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def step_time_ratio(pruned_model, cfg: RepairConfig, batch: torch.LongTensor, steps: int, reps: int) -> dict:
    from peft import LoraConfig, get_peft_model

    targets, _ = resolve_targets(pruned_model, cfg)
    masked = attach_masked_lora(copy.deepcopy(pruned_model), cfg)
    plain = get_peft_model(copy.deepcopy(pruned_model), LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha,
                                                                   lora_dropout=cfg.lora_dropout, target_modules=targets))
    wall = {"masked": [], "plain": []}
    cpu = {"masked": [], "plain": []}
    for _ in range(reps):  # interleaved so background load hits both alike
        for name, model in (("plain", plain), ("masked", masked)):
            for w, c in time_steps(model, batch, steps):
                wall[name].append(w)
                cpu[name].append(c)
    med = {k: {"wall_ms": 1000 * statistics.median(wall[k]), "cpu_ms": 1000 * statistics.median(cpu[k]),
               "wall_min_ms": 1000 * min(wall[k])} for k in wall}
    return {
        "batch_shape": list(batch.shape),
        "steps_per_rep": steps,
        "reps": reps,
        "plain_lora": med["plain"],
        "masked_lora": med["masked"],
        "ratio_median_wall": med["masked"]["wall_ms"] / med["plain"]["wall_ms"],
        "ratio_median_cpu": med["masked"]["cpu_ms"] / med["plain"]["cpu_ms"],
        "ratio_min_wall": med["masked"]["wall_min_ms"] / med["plain"]["wall_min_ms"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("smollm2", "stories"), default="smollm2")
    p.add_argument("--tokens", type=int, default=32768, help="smollm2: training tokens per recipe")
    p.add_argument("--cells", nargs="+", default=None, help="smollm2: SPARSITY:RECIPE cells, in order "
                   f"(recipes: {', '.join(RECIPES)}; sparsity 0 = the dense control)")
    p.add_argument("--curve", type=int, default=0, help="smollm2: evaluations during training (ppl vs tokens)")
    p.add_argument("--bf16", choices=("auto", "off"), default="off", help="smollm2: bf16 autocast")
    p.add_argument("--workdir", default="/tmp/owl-bench-repair", help="smollm2: converted model, pruned weights, cache")
    p.add_argument("--render", action="store_true", help="smollm2: print the Markdown table of --out")
    p.add_argument("--bf16-probe", action="store_true",
                   help="smollm2: time fp32 vs bf16-autocast training steps (--batch x --seqlen, --timing-reps)")
    p.add_argument("--suite-model", choices=("smollm2", "stories260K"), default="smollm2",
                   help="the suite's model (stories260K: a quick smoke run of the same code)")
    p.add_argument("--model", default=str(STORIES))
    p.add_argument("--calibration", default=str(C4))
    p.add_argument("--wikitext", default=str(WIKI))
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--train-seqs", type=int, default=512)
    p.add_argument("--eval-seqs", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--wiki-windows", type=int, default=80, help="WikiText-2 windows of --seqlen (80 x 256 = 20,480 tokens)")
    p.add_argument("--method", default="masked_lora", choices=("masked_lora", "full_ft"))
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--timing-steps", type=int, default=10)
    p.add_argument("--timing-reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.suite == "smollm2":
        from bench.repair_suite import bf16_probe, render, run_suite

        out = Path(args.out or RESULTS / "repair_smollm2.json")
        if args.bf16_probe:
            return bf16_probe(args, out)
        return print(render(out)) if args.render else run_suite(args, out)
    torch.set_num_threads(1)
    t_start = time.perf_counter()

    tok = AutoTokenizer.from_pretrained(args.model)
    dense = AutoModelForCausalLM.from_pretrained(args.model).eval()

    seqs = sample_sequences(dense, args.train_seqs + args.eval_seqs, args.seqlen, seed=args.seed)
    train_ids, held_out = seqs[: args.train_seqs], seqs[args.train_seqs:]

    pruned = copy.deepcopy(dense)
    prune_cfg = OWLPrunerConfig(sparsity=args.sparsity, method="wanda", layerwise="owl", num_samples=64,
                                seqlen=args.seqlen, seed=args.seed)
    OWLPruner.apply(pruned, prune_cfg, dataset=args.calibration, tokenizer=tok)

    ev = lambda m: evaluate(m, tok, held_out, args.wikitext, args.seqlen, args.wiki_windows)  # noqa: E731
    res: dict = {"args": vars(args)}
    res["dense"] = ev(dense)
    res["pruned"] = ev(pruned)
    masks_before = zero_masks(pruned)
    blocks_before, total_before = block_sparsity(pruned)

    cfg = RepairConfig(method=args.method, r=args.r, lora_alpha=args.alpha, seqlen=args.seqlen, max_steps=args.steps,
                       per_device_train_batch_size=args.batch, learning_rate=args.lr, weight_decay=args.weight_decay,
                       warmup_ratio=0.05, lr_scheduler_type="cosine", logging_steps=max(args.steps // 5, 1),
                       seed=args.seed, target_modules="all")
    repaired, report = repair(copy.deepcopy(pruned), tok, train_data=train_ids, config=cfg)
    res["repaired"] = ev(repaired)
    res["repair_seconds"] = report.seconds
    res["trainable_params"] = report.trainable_params
    blocks_after, total_after = block_sparsity(repaired)
    masks_after = zero_masks(repaired)
    res["sparsity"] = {
        "before": total_before, "after": total_after, "blocks_before": blocks_before, "blocks_after": blocks_after,
        "zero_sets_identical": masks_after.keys() == masks_before.keys()
        and all(torch.equal(masks_after[k], masks_before[k]) for k in masks_before),
        "zeros_lost": zeros_lost(repaired, masks_before),
        "merged_max_abs_logit_diff": report.merged_max_abs_logit_diff,
    }

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dense control has no zeros: expected
        control, _ = repair(copy.deepcopy(dense), tok, train_data=train_ids, config=cfg)
    res["control"] = ev(control)

    for key in ("generated", "wikitext2"):
        d, pr, r, c = (res[n][f"nll_{key}"] for n in ("dense", "pruned", "repaired", "control"))
        res[f"gap_recovered_{key}"] = gap_recovered(pr, r, d)
        res[f"gap_recovered_vs_control_{key}"] = gap_recovered(pr, r, c)

    timing_batch = train_ids[: args.batch]
    res["step_time"] = step_time_ratio(pruned, cfg, timing_batch, args.timing_steps, args.timing_reps)
    res["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    res["total_seconds"] = time.perf_counter() - t_start

    rows = [("dense", res["dense"]), ("pruned 70% OWL+Wanda", res["pruned"]), ("repaired (masked LoRA, merged)", res["repaired"]),
            ("control: dense + same training", res["control"])]
    print(f"{'model':34s} {'ppl generated':>14s} {'ppl WikiText-2':>15s}")
    for name, r in rows:
        print(f"{name:34s} {r['ppl_generated']:14.3f} {r['ppl_wikitext2']:15.3f}")
    print(f"log-ppl gap recovered: generated {100 * res['gap_recovered_generated']:.1f}%  "
          f"WikiText-2 {100 * res['gap_recovered_wikitext2']:.1f}%")
    print(f"  vs control: generated {100 * res['gap_recovered_vs_control_generated']:.1f}%  "
          f"WikiText-2 {100 * res['gap_recovered_vs_control_wikitext2']:.1f}%")
    s = res["sparsity"]
    print(f"sparsity before {s['before']:.6f} after {s['after']:.6f} identical zero sets {s['zero_sets_identical']}")
    st = res["step_time"]
    print(f"step time (batch {st['batch_shape']}): plain LoRA {st['plain_lora']['wall_ms']:.1f} ms, masked LoRA "
          f"{st['masked_lora']['wall_ms']:.1f} ms -> x{st['ratio_median_wall']:.2f} wall (x{st['ratio_median_cpu']:.2f} CPU time)")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
