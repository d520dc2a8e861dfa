"""The SmolLM2 recovery suite of `python -m bench.repair` (issue 28): recipes, data split, one cell at a time.

Run through bench/repair.py (`python -m bench.repair --suite smollm2 ...`); this module holds the suite's code.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from bench._common import C4, WIKI, machine_summary, real_model

# recipe -> RepairConfig overrides; "select" recipes pick the budget's windows from twice as many candidates
RECIPES: dict[str, dict] = {
    "lora-lm": dict(method="masked_lora", objective="lm", learning_rate=2e-3),
    "lora-kd": dict(method="masked_lora", objective="kd", learning_rate=2e-3),
    "ft-kd": dict(method="full_ft", objective="kd", learning_rate=3e-4),
    "seft-kd": dict(method="seft", objective="kd", learning_rate=3e-4, seft_interval=4, seft_fraction=0.05),
    "lora-kd-select": dict(method="masked_lora", objective="kd", learning_rate=2e-3, select="degradation"),
    "ft-kd-select": dict(method="full_ft", objective="kd", learning_rate=3e-4, select="degradation"),
    "lora-lm-select": dict(method="masked_lora", objective="lm", learning_rate=2e-3, select="degradation"),
    "seft-kd-select": dict(method="seft", objective="kd", learning_rate=3e-4, seft_interval=4, seft_fraction=0.05,
                           select="degradation"),
    "ft-lm": dict(method="full_ft", objective="lm", learning_rate=3e-4),
}
DEFAULT_CELLS = ["0.7:lora-lm", "0.7:lora-kd", "0.7:ft-kd", "0.5:lora-lm", "0.5:lora-kd", "0.5:ft-kd",
                 "0.7:lora-kd-select", "0.7:seft-kd", "0.7:ft-kd-select", "0:lora-lm"]
EVAL = dict(seqlen=512, max_windows=16, add_bos=False, batch_size=8)
CALIBRATION_DOCS = 500  # C4 documents 0-499 calibrate the pruning; 500-999 are the recovery data
KD_TOP_K = 64


def _docs() -> list[str]:
    with open(C4) as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def wikitext_ppl(model, tok) -> float:
    from optimum_owl.evaluation import perplexity

    was = model.training
    model.eval()
    try:
        return perplexity(model, tok, str(WIKI), **EVAL)
    finally:
        model.train(was)


def pruned_model(name: str, sparsity: float, workdir: Path, tok, docs: list[str]):
    """SmolLM2 pruned with OWL + Wanda (16 x 256 calibration windows of C4 documents 0-499, seed 0); the weights are
    kept in `workdir` and reused."""
    from optimum_owl import OWLPruner, OWLPrunerConfig

    model, _ = real_model(name, workdir)
    if sparsity == 0:
        return model, 0.0
    path = workdir / f"{name}_pruned_owl_wanda_{sparsity}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model, None
    start = time.perf_counter()
    config = OWLPrunerConfig(sparsity=sparsity, method="wanda", layerwise="owl", num_samples=16, seqlen=256, seed=0)
    OWLPruner(config).prune(model, dataset=docs[:CALIBRATION_DOCS], tokenizer=tok)
    seconds = time.perf_counter() - start
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model, seconds


class Curve:
    """A TrainerCallback evaluating WikiText-2 perplexity at the given optimizer steps: `points` = [(tokens, ppl)]."""

    def __init__(self, steps: set[int], tokens_per_step: int, tok) -> None:
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step in outer.steps and model is not None:
                    outer.points.append((state.global_step * outer.tokens_per_step, wikitext_ppl(model, outer.tok)))
                    print(f"    curve: {outer.points[-1][0]} tokens -> ppl {outer.points[-1][1]:.2f}", flush=True)

        self.steps, self.tokens_per_step, self.tok, self.points = steps, tokens_per_step, tok, []
        self.callback = _CB()


def run_suite(args, out: Path) -> None:
    from optimum_owl.repair import RepairConfig, TeacherCache, repair, zero_masks
    from optimum_owl.repair.data import build_windows
    from optimum_owl.repair.recovery import nnz_counts

    torch.manual_seed(args.seed)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.exists() else {"cells": {}, "baselines": {}}
    save = lambda: (out.with_suffix(".tmp").write_text(json.dumps(data, indent=2) + "\n"),  # noqa: E731
                    os.replace(out.with_suffix(".tmp"), out))
    teacher, tok = real_model(args.suite_model, workdir)
    for p in teacher.parameters():
        p.requires_grad_(False)
    docs = _docs()
    budget = args.tokens // args.seqlen
    windows = build_windows(docs[CALIBRATION_DOCS:], tok, args.seqlen)[: 2 * budget]
    if windows.shape[0] < 2 * budget:
        raise SystemExit(f"C4 documents 500-999 hold {windows.shape[0]} windows; --tokens needs {2 * budget}")
    data["setup"] = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantised to float32)" if args.suite_model == "smollm2"
        else args.suite_model, "machine": machine_summary(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "tokens": budget * args.seqlen,
        "seqlen": args.seqlen, "batch": args.batch, "candidates_for_select": int(windows.shape[0]),
        "calibration": "OWL + Wanda, 16 x 256 tokens of C4 documents 0-499, seed 0",
        "train_data": "C4 documents 500-999 (c4_train_first1000.jsonl), windows of seqlen, in order",
        "eval": f"WikiText-2 test, {EVAL['max_windows']} x {EVAL['seqlen']} tokens, no BOS", "kd_top_k": KD_TOP_K,
        "lora": f"r={args.r}, alpha={args.alpha}, all projections of the blocks", "bf16": args.bf16,
        "command": "python -m bench.repair " + " ".join(sys.argv[1:]),
        "note": "wall times and tokens/s measured on the shared 2-core CPU under other jobs' load unless re-measured",
    }
    if "dense" not in data["baselines"]:
        data["baselines"]["dense"] = {"ppl": wikitext_ppl(teacher, tok)}
        save()
    dense_ppl = data["baselines"]["dense"]["ppl"]
    print(f"dense ppl {dense_ppl:.3f}; {budget} windows x {args.seqlen} tokens per recipe", flush=True)
    for cell in args.cells or DEFAULT_CELLS:
        sparsity_text, recipe = cell.split(":")
        sparsity = float(sparsity_text)
        key = f"{sparsity}:{recipe}:{budget * args.seqlen}"
        if key in data["cells"]:
            print(f"{key}: done already", flush=True)
            continue
        base_key = f"pruned:{sparsity}"
        model, prune_seconds = pruned_model(args.suite_model, sparsity, workdir, tok, docs)
        if base_key not in data["baselines"]:
            data["baselines"][base_key] = {"ppl": wikitext_ppl(model, tok) if sparsity else dense_ppl,
                                           "prune_seconds": prune_seconds}
            save()
        pruned_ppl = data["baselines"][base_key]["ppl"]
        spec = dict(RECIPES[recipe])
        select = spec.get("select") is not None
        tokens_per_step = args.batch * args.seqlen
        steps = math.ceil(budget / args.batch)
        curve = Curve({round(steps * (i + 1) / (args.curve + 1)) for i in range(args.curve)}, tokens_per_step, tok)
        kd = spec["objective"] != "lm"
        cache_dir = None
        if kd:
            cache_dir = str(workdir / (f"teacher_cache_{key.replace(':', '_')}" if select else f"teacher_cache_{budget}"))
        config = RepairConfig(
            r=args.r, lora_alpha=args.alpha, target_modules="all", seqlen=args.seqlen, max_steps=None,
            max_tokens=budget * args.seqlen, per_device_train_batch_size=args.batch, warmup_ratio=0.05,
            lr_scheduler_type="cosine", logging_steps=max(steps // 4, 1), seed=args.seed,
            bf16="auto" if args.bf16 == "auto" else False,
            teacher=teacher if (kd or select) else None, kd_top_k=KD_TOP_K if kd else None,
            teacher_cache=kd, teacher_cache_dir=cache_dir, **spec)
        before, nnz = zero_masks(model), nnz_counts(model)
        print(f"{key}: pruned ppl {pruned_ppl:.2f}, {steps} steps ...", flush=True)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dense control has no zeros: expected
            repaired, report = repair(model, tok, train_data=windows if select else windows[:budget], config=config,
                                      callbacks=[curve.callback] if args.curve else None)
        wall = time.perf_counter() - start
        ppl = wikitext_ppl(repaired, tok)
        after = zero_masks(repaired)
        cache_read = None
        if report.teacher_mode == "cache":  # what a cached window costs against running the teacher on it
            cache = TeacherCache(cache_dir, _train_windows(windows, budget, report), teacher, KD_TOP_K)
            t = time.perf_counter()
            cache.get(torch.arange(min(32, budget)))
            cache_read = (time.perf_counter() - t) / min(32, budget)
        gap = math.log(pruned_ppl) - math.log(dense_ppl)
        row = {
            "sparsity": sparsity, "recipe": recipe, "spec": spec, "tokens": report.tokens_seen, "steps": report.steps,
            "ppl_pruned": pruned_ppl, "ppl": ppl, "ppl_dense": dense_ppl,
            "gap_recovered": (math.log(pruned_ppl) - math.log(ppl)) / gap if sparsity and gap > 0 else None,
            "train_seconds": report.seconds, "wall_seconds": wall, "tokens_per_s": report.tokens_seen / report.seconds,
            "select_seconds": report.select_seconds, "teacher_cache_fill_seconds": report.teacher_cache_seconds,
            "teacher_mode": report.teacher_mode, "cache_read_seconds_per_window": cache_read,
            "teacher_cache_fill_or_check_seconds_per_window": report.teacher_cache_seconds / budget,
            "train_loss": report.train_loss, "trainable_params": report.trainable_params, "bf16": report.bf16,
            "zero_sets_identical": after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before),
            "nnz_identical": nnz_counts(repaired) == nnz, "seft_swaps": report.seft_swaps,
            "curve": curve.points + [(report.tokens_seen, ppl)],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }
        data["cells"][key] = row
        save()
        print(f"{key}: ppl {pruned_ppl:.2f} -> {ppl:.2f} (dense {dense_ppl:.2f}), gap recovered "
              f"{row['gap_recovered']}, {row['tokens_per_s']:.0f} tok/s, zeros kept {row['zero_sets_identical']}",
              flush=True)
        del model, repaired


def _train_windows(windows: torch.Tensor, budget: int, report) -> torch.Tensor:
    return windows[report.selected_windows] if report.selected_windows is not None else windows[:budget]


def render(out: Path) -> str:
    """The Markdown table of a results JSON."""
    data = json.loads(out.read_text())
    lines = ["| sparsity | recipe | tokens | ppl pruned | ppl after | gap recovered | train s | tokens/s | zeros kept |",
             "|---:|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for row in data["cells"].values():
        gap = "" if row["gap_recovered"] is None else f"{100 * row['gap_recovered']:.1f}%"
        kept = row["zero_sets_identical"] if row["recipe"].split("-")[0] != "seft" else f"nnz {row['nnz_identical']}"
        lines.append(f"| {row['sparsity']:.0%} | {row['recipe']} | {row['tokens']:,} | {row['ppl_pruned']:.2f} | "
                     f"{row['ppl']:.2f} | {gap} | {row['train_seconds']:.0f} | {row['tokens_per_s']:.0f} | {kept} |")
    return "\n".join(lines)


def bf16_probe(args, out: Path) -> None:
    """Training-step time of SmolLM2 in fp32 and under bf16 autocast (fp32 master weights), alternated in one
    process (`--reps` rounds of `--batch` x `--seqlen` tokens each), plus a teacher forward in both: wall and process
    CPU seconds, written under "bf16_probe" in the JSON."""
    model, _ = real_model(args.suite_model, Path(args.workdir))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seqlen), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def train(bf16: bool) -> None:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward(bf16: bool) -> None:
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=ids)

    runs = {f"{kind}_{'bf16' if b else 'fp32'}": (fn, b) for kind, fn in (("train", train), ("forward", forward))
            for b in (False, True)}
    times: dict[str, list] = {k: [] for k in runs}
    for fn, b in runs.values():
        fn(b)  # warm-up
    for _ in range(args.timing_reps):
        for key, (fn, b) in runs.items():
            t, c = time.perf_counter(), time.process_time()
            fn(b)
            times[key].append((time.perf_counter() - t, time.process_time() - c))
    tokens = args.batch * args.seqlen
    result = {k: {"wall_s": [round(w, 3) for w, _ in v], "cpu_s": [round(c, 3) for _, c in v],
                  "tokens_per_cpu_s": tokens / min(c for _, c in v)} for k, v in times.items()}
    result.update(native_bf16=bool(torch.cpu._is_avx512_bf16_supported()), tokens_per_step=tokens,
                  machine=machine_summary(), command="python -m bench.repair " + " ".join(sys.argv[1:]),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    data = json.loads(out.read_text()) if out.exists() else {"cells": {}, "baselines": {}}
    data["bf16_probe"] = result
    out.with_suffix(".tmp").write_text(json.dumps(data, indent=2) + "\n")
    os.replace(out.with_suffix(".tmp"), out)
    print(json.dumps(result, indent=1))
