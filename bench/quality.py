"""Quality benchmark: WikiText-2 perplexity of a real model pruned with each layerwise allocation family.

Two real models (shared assets, ../shared/assets/README.md):

- `smollm2` (default): SmolLM2-135M-Instruct (Llama architecture, 30 blocks), read from its GGUF file and converted
  once per run into a temporary folder (about 20 s; de-quantised to float32). Evaluation: the WikiText-2 test rows
  joined with "\\n\\n", no BOS, the first 16 windows of 512 tokens (8,192 tokens). Calibration: 16 windows of 256
  tokens of the first 1000 C4 train documents, seed 0 (the issue's small-calibration setting; on the shared 2-core
  machine the full table has to fit in a few hours). Results: bench/results/quality_smollm2.json.
- `stories260K`: the bundled 260K Llama (5 blocks), kept for continuity with earlier tables: the first 40 windows of
  512 tokens with one BOS, calibration 64 windows of 512 tokens. Results: bench/results/quality.json.

Usage (from the project root):

    OMP_NUM_THREADS=2 python -m bench.quality --model smollm2
    OMP_NUM_THREADS=2 python -m bench.quality --model smollm2 --only uniform owl --sparsities 0.7
    # the per-projection split (not in the default table): one cell per command, into its own JSON
    OMP_NUM_THREADS=2 python -m bench.quality --model smollm2 \
        --out bench/results/quality_smollm2_split.json --cells wanda-atp-attn+0.05:0.7
    python -m bench.quality --model smollm2 --render   # Markdown tables + docs/img/quality_*.png
    # the same cells under another float summation order (SparseGPT at 70-80% depends on it), then side by side
    OMP_NUM_THREADS=1 python -m bench.quality --batch-size 4 --out bench/results/quality_smollm2_b4t1.json \
        --cells sparsegpt-uniform:0.7 sparsegpt-atp:0.7
    python -m bench.quality --variants bench/results/quality_smollm2.json bench/results/quality_smollm2_b4t1.json
    # `auto` choosing on the WikiText-2 validation text instead of held-out C4 (the table's perplexity is on test)
    OMP_NUM_THREADS=2 python -m bench.quality --model smollm2 --cells sparsegpt-auto-val:0.7
    # any OWLPrunerConfig field for every cell, into its own JSON
    python -m bench.quality --set sparsegpt_damp=0.1 --out damp.json --cells sparsegpt-uniform:0.7

Every cell (model, setting, sparsity) is written to the JSON as soon as it is measured, and a cell already in the
JSON is never recomputed (delete it from the JSON, or pass --fresh, to measure again).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench._common import C4, ROOT, SMOL_DIR, SMOL_GGUF, STORIES, WIKI, WIKI_VAL, machine_summary, real_model

MODELS = {
    "smollm2": {
        "out": "bench/results/quality_smollm2.json",
        "eval_windows": 16,
        "eval_seqlen": 512,
        "add_bos": False,
        "num_samples": 16,
        "seqlen": 256,
        "describe": "SmolLM2-135M-Instruct (30 blocks; ../shared/assets/models/smollm2-135m, Q4_1 GGUF de-quantised "
        "to float32)",
    },
    "stories260K": {
        "out": "bench/results/quality.json",
        "eval_windows": 40,
        "eval_seqlen": 512,
        "add_bos": True,
        "num_samples": 64,
        "seqlen": 512,
        "describe": "stories260K (../shared/assets/models/stories260K)",
    },
}

# (key, label, OWLPrunerConfig overrides); the key names the cell in the JSON together with the sparsity
SETTINGS = [
    ("wanda-uniform", "Wanda uniform", dict(method="wanda", layerwise="uniform")),
    ("wanda-owl", "Wanda OWL (M=5, λ=0.08)", dict(method="wanda", layerwise="owl")),
    ("wanda-owl-dense", "Wanda OWL (M=5, λ=0.08), dense propagation", dict(method="wanda", layerwise="owl", propagation="dense")),
    ("wanda-dlp", "Wanda DLP (α=0.15)", dict(method="wanda", layerwise="dlp")),
    ("wanda-alphapruning", "Wanda AlphaPruning (ε=0.2)", dict(method="wanda", layerwise="alphapruning")),
    ("wanda-atp", "Wanda ATP (β=0.005)", dict(method="wanda", layerwise="atp")),
    ("wanda-owl-auto", "Wanda owl-auto", dict(method="wanda", layerwise="owl-auto")),
    ("wanda-auto", "Wanda auto", dict(method="wanda", layerwise="auto")),
    ("wanda-uniform-dsnot", "Wanda uniform + DSnoT", dict(method="wanda", layerwise="uniform", refine="dsnot")),
    ("wanda-owl-auto-dsnot", "Wanda owl-auto + DSnoT", dict(method="wanda", layerwise="owl-auto", refine="dsnot")),
    ("sparsegpt-uniform", "SparseGPT uniform", dict(method="sparsegpt", layerwise="uniform")),
    ("sparsegpt-owl", "SparseGPT OWL (M=5, λ=0.08)", dict(method="sparsegpt", layerwise="owl")),
    ("sparsegpt-dlp", "SparseGPT DLP (α=0.15)", dict(method="sparsegpt", layerwise="dlp")),
    ("sparsegpt-alphapruning", "SparseGPT AlphaPruning (ε=0.2)", dict(method="sparsegpt", layerwise="alphapruning")),
    ("sparsegpt-atp", "SparseGPT ATP (β=0.005)", dict(method="sparsegpt", layerwise="atp")),
    ("sparsegpt-owl-auto", "SparseGPT owl-auto", dict(method="sparsegpt", layerwise="owl-auto")),
    ("sparsegpt-auto", "SparseGPT auto", dict(method="sparsegpt", layerwise="auto")),
    # the same search choosing on text of the evaluation's domain: WikiText-2 validation (the table is on test)
    ("wanda-auto-val", "Wanda auto, chosen on WikiText-2 validation",
     dict(method="wanda", layerwise="auto", auto_holdout_dataset=str(WIKI_VAL))),
    ("sparsegpt-auto-val", "SparseGPT auto, chosen on WikiText-2 validation",
     dict(method="sparsegpt", layerwise="auto", auto_holdout_dataset=str(WIKI_VAL))),
]
# The per-projection split (`attention_shift`: attention projections d above the block's sparsity, the MLP below it,
# block mean kept), measured on its own: bench/results/quality_smollm2_split.json via --out and --cells.
SPLIT_SETTINGS = [
    (f"wanda-{family}-attn{shift:+.2f}" if round(shift, 2) == shift else f"wanda-{family}-attn{shift:+g}",
     f"Wanda {label}, attention {shift:+g}", dict(method="wanda", layerwise=family, attention_shift=shift))
    for family, label in (("atp", "ATP (β=0.005)"), ("uniform", "uniform"))
    for shift in (0.0125, 0.025, 0.0375, 0.05, -0.05, 0.1, -0.1)
]
# `auto`'s choice at 70% (ATP with β = 0.32 / 29), with and without a split
SPLIT_SETTINGS += [
    (f"wanda-atp0.011-attn{shift:+g}" if shift else "wanda-atp0.011", f"Wanda ATP (β=0.011034), attention {shift:+g}",
     dict(method="wanda", layerwise="atp", atp_beta=0.011034, attention_shift=shift))
    for shift in (0.0, 0.025, 0.05)
]
SPLIT_SETTINGS.append(("wanda-auto-attn", "Wanda auto, attention shifts +0.025, +0.05, +0.1 searched",
                       dict(method="wanda", layerwise="auto", auto_attention_shifts=[0.025, 0.05, 0.1])))
SPLIT_KEYS = {k for k, _, _ in SPLIT_SETTINGS}
SETTINGS += SPLIT_SETTINGS
# what each model's table runs by default (the stories260K rows of earlier tables stay in its JSON)
DEFAULT_KEYS = {
    "smollm2": [k for k, _, _ in SETTINGS if "dsnot" not in k and k != "wanda-owl-dense" and k not in SPLIT_KEYS],
    "stories260K": [k for k, _, _ in SETTINGS if k not in SPLIT_KEYS],
}
LABELS = {k: label for k, label, _ in SETTINGS}


def evaluate(spec: dict, model, tokenizer) -> float:
    from optimum_owl.evaluation import perplexity

    return perplexity(
        model, tokenizer, str(WIKI), seqlen=spec["eval_seqlen"], max_windows=spec["eval_windows"],
        add_bos=spec["add_bos"], batch_size=8,
    )


def _add_keys(rows: list[dict]) -> list[dict]:
    """Rows written before keys existed carry only their label."""
    for row in rows:
        row.setdefault("key", next((k for k, label, _ in SETTINGS if label == row["label"]), row["label"]))
    return rows


def cell_key(row: dict) -> tuple[str, float]:
    return row["key"], round(float(row["sparsity"]), 4)


def run(args: argparse.Namespace) -> None:
    from optimum_owl import OWLPruner, OWLPrunerConfig
    from optimum_owl.utils import atomic_write_text

    spec = MODELS[args.model]
    out = Path(args.out or ROOT / spec["out"])
    data = json.loads(out.read_text()) if out.exists() and not args.fresh else {"rows": []}
    _add_keys(data["rows"])
    num_samples = args.num_samples or spec["num_samples"]
    seqlen = args.seqlen or spec["seqlen"]
    data.setdefault("setup", {})
    data["setup"].update({
        "model": spec["describe"],
        "eval": f"WikiText-2 test, first {spec['eval_windows']} windows of {spec['eval_seqlen']} tokens, "
        + ("one BOS at the start" if spec["add_bos"] else "no BOS"),
        "calibration": f"{num_samples} windows x {seqlen} tokens of C4 (c4_train_first1000.jsonl), seed {args.seed}, "
        f"batch {args.batch_size}",
        "machine": machine_summary(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    })

    def save() -> None:
        # another process may have added cells to the same file meanwhile: merge by cell, ours last
        if out.exists() and not args.fresh:
            mine = {cell_key(r) for r in data["rows"]}
            on_disk = json.loads(out.read_text())
            _add_keys(on_disk.get("rows", []))
            data["rows"] = [r for r in on_disk.get("rows", []) if cell_key(r) not in mine] + data["rows"]
            data.setdefault("dense_ppl", on_disk.get("dense_ppl"))
        atomic_write_text(out, json.dumps(data, indent=1) + "\n")

    extra = dict(parse_set(item) for item in args.set or [])
    if extra:
        data["setup"]["overrides"] = extra  # every cell of this file ran with them (use a separate --out)
    done = {cell_key(r) for r in data["rows"]}
    keys = [k for k in DEFAULT_KEYS[args.model] if not args.only or any(o.lower() == k or f"-{o.lower()}" == k[k.index("-"):] for o in args.only)]
    if args.cells:  # an explicit order, "key:sparsity" each (the most informative cells first on a busy machine)
        cells = [(c.rsplit(":", 1)[0], float(c.rsplit(":", 1)[1])) for c in args.cells]
        unknown = [k for k, _ in cells if k not in LABELS]
        if unknown:
            raise SystemExit(f"unknown setting keys {unknown}; known: {sorted(LABELS)}")
    else:
        cells = [(k, s) for s in args.sparsities for k in keys]
    with tempfile.TemporaryDirectory(prefix="owl-quality-") as tmp:
        workdir = Path(tmp)
        if "dense_ppl" not in data:
            model, tok = real_model(args.model, workdir)
            data["dense_ppl"] = evaluate(spec, model, tok)
            save()
            print(f"dense ppl {data['dense_ppl']:.3f}", flush=True)
        for key, sparsity in cells:
            if (key, round(sparsity, 4)) in done:
                continue
            overrides = dict(next(o for k, _, o in SETTINGS if k == key)) | extra
            model, tok = real_model(args.model, workdir)
            config = OWLPrunerConfig(
                sparsity=sparsity, num_samples=num_samples, seqlen=seqlen, seed=args.seed, batch_size=args.batch_size, **overrides
            )
            t = time.perf_counter()
            report = OWLPruner(config).prune(model, dataset=str(C4), tokenizer=tok)
            prune_s = time.perf_counter() - t
            ppl = evaluate(spec, model, tok)
            chosen = next((c for c in report.candidates if c.chosen), None)
            row = {
                "key": key,
                "label": LABELS[key],
                "method": config.method,
                "layerwise": config.layerwise,
                "refine": config.refine,
                "attention_shift": config.attention_shift,
                "propagation": config.propagation,
                "sparsity": sparsity,
                "achieved": round(report.sparsity, 5),
                "ppl": ppl,
                "prune_s": round(prune_s, 2),
                "batch_size": config.batch_size,
                "threads": torch.get_num_threads(),  # SparseGPT at high sparsity depends on it (float summation order)
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "block_sparsities": [round(b.target_sparsity, 4) for b in report.blocks],
                "chosen": None if chosen is None else _candidate(chosen),
                "candidates": [_candidate(c) for c in report.candidates],
                "timings": report.timings,
            }
            data["rows"].append(row)
            done.add(cell_key(row))
            save()
            print(f"{sparsity:.2f} {LABELS[key]:34s} ppl {ppl:10.3f}  prune {prune_s:6.1f}s  chosen {row['chosen']}", flush=True)
            del model


def parse_set(item: str) -> tuple[str, object]:
    """`--set name=value`: an OWLPrunerConfig field for every cell; the value read as JSON when it parses."""
    name, sep, value = item.partition("=")
    if not sep or not name:
        raise SystemExit(f"--set expects name=value, got {item!r}")
    import dataclasses

    from optimum_owl import OWLPrunerConfig

    known = {f.name for f in dataclasses.fields(OWLPrunerConfig)}
    if name not in known:
        raise SystemExit(f"--set: {name!r} is not an OWLPrunerConfig field; use one of {sorted(known)}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _candidate(c) -> dict:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in vars(c).items()}


def describe_choice(c: dict | None) -> str:
    """'uniform', 'OWL M=5, λ=0.08', 'DLP α=0.15', ... from a stored candidate."""
    if c is None:
        return "–"
    if isinstance(c, list):  # rows written before candidates were stored as dicts: [layerwise, M, λ]
        c = {"layerwise": c[0], "owl_m": c[1], "owl_lambda": c[2]}
        c["layerwise"] = "uniform" if c["owl_m"] is None else "owl"
    family = c.get("family") or c.get("layerwise")
    if family == "uniform":
        return "uniform"
    if family == "owl" and c.get("owl_m") is not None:
        return f"OWL M={c['owl_m']:g}, λ={c['owl_lambda']:g}"
    names = {"owl": "OWL", "dlp": "DLP", "alphapruning": "AlphaPruning", "atp": "ATP"}
    symbols = {"dlp_alpha": "α", "alphapruning_epsilon": "ε", "atp_beta": "β"}
    knob = ", ".join(f"{symbols.get(k, k)}={v:g}" for k, v in (c.get("knob") or {}).items())
    return f"{names.get(family, family)} {knob}".strip()


def _verdicts(by: dict, sparsities: list[float]) -> list[str]:
    """Per cell: the best fixed family and how auto / owl-auto compare with uniform, OWL's defaults and that best."""
    fixed = ("uniform", "owl", "dlp", "alphapruning", "atp")
    lines = [
        "| criterion | sparsity | best fixed rule (ppl) | vs uniform | auto (choice) | auto vs uniform | auto vs OWL | "
        "auto vs best fixed |",
        "|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for method in ("wanda", "sparsegpt"):
        for s, search in ((s, search) for s in sparsities for search in ("auto", "auto-val")):
            cells = {f: by[(f"{method}-{f}", s)]["ppl"] for f in fixed if (f"{method}-{f}", s) in by}
            auto = by.get((f"{method}-{search}", s))
            if "uniform" not in cells or (auto is None and search != "auto"):
                continue
            best = min(cells, key=cells.get)
            row = f"| {method} | {s:.0%} | {LABELS[f'{method}-{best}']} ({cells[best]:.2f}) | "
            row += f"{cells[best] / cells['uniform'] - 1:+.1%} | "
            if search != "auto":
                row += "chosen on WikiText-2 validation: "
            if auto is None:
                row += "not computed | – | – | – |"
            else:
                a = auto["ppl"]
                owl = f"{a / cells['owl'] - 1:+.1%}" if "owl" in cells else "–"
                choice = auto.get("choice_text") or describe_choice(auto["chosen"])
                row += f"{a:.2f} ({choice}) | {a / cells['uniform'] - 1:+.1%} | {owl} | "
                row += f"{a / cells[best] - 1:+.1%} |"
            lines.append(row)
    return lines


def render_variants(paths: list[str]) -> None:
    """The cells of the first results file that other files also have (the same runs under another thread count or
    batch size: only the float summation order differs) side by side, their geometric mean, and the verdicts on
    those means."""
    runs = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        setup = data.get("setup", {})
        runs.append((Path(p).name, {cell_key(r): r for r in _add_keys(data["rows"])}, setup))
    order = [k for k, _, _ in SETTINGS]
    cells = sorted((c for c in runs[0][1] if any(c in by for _, by, _ in runs[1:])), key=lambda c: (c[1], order.index(c[0])))
    if not cells:
        raise SystemExit("--variants: no cell of the first file is in any other one")
    lines = ["| setting | sparsity | " + " | ".join(name for name, _, _ in runs) + " | geometric mean | max / min |",
             "|---|---:|" + "---:|" * (len(runs) + 2)]
    means: dict = {}
    for key, s in cells:
        rows = [by[(key, s)] for _, by, _ in runs if (key, s) in by]
        ppl = [r["ppl"] for r in rows]
        mean = math.exp(sum(math.log(x) for x in ppl) / len(ppl))
        text = []
        for _, by, _ in runs:
            r = by.get((key, s))
            text.append("–" if r is None else f"{r['ppl']:.1f}" + (f" ({describe_choice(r['chosen'])})" if r["chosen"] else ""))
        choices = sorted({describe_choice(r["chosen"]) for r in rows if r["chosen"]})
        means[(key, s)] = {"ppl": mean, "chosen": None, "choice_text": " / ".join(choices)}
        lines.append(f"| {LABELS[key]} | {s:.0%} | " + " | ".join(text) + f" | {mean:.1f} | {max(ppl) / min(ppl):.2f} |")
    print("\n".join(lines))
    print()
    print("\n".join(line for line in _verdicts(means, sorted({s for _, s in cells})) if "not computed" not in line))
    for name, by, setup in runs:
        threads = sorted({r.get("threads") for r in by.values() if cell_key(r) in cells} - {None})
        print(f"\n{name}: {setup.get('calibration', '?')}; threads {threads or 'not recorded'}")


def render(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = MODELS[args.model]
    path = Path(args.out or ROOT / spec["out"])
    data = json.loads(path.read_text())
    rows = _add_keys(data["rows"])
    sparsities = sorted({round(r["sparsity"], 4) for r in rows})
    keys = [k for k, _, _ in SETTINGS if any(r["key"] == k for r in rows)]
    by = {cell_key(r): r for r in rows}

    lines = ["| setting | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |", "|---|" + "---:|" * len(sparsities)]
    for key in keys:
        cells = ["–" if (key, s) not in by else f"{by[(key, s)]['ppl']:.2f}" for s in sparsities]
        lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    print("\n".join(lines))

    chosen = ["| setting | sparsity | chosen | per-block sparsity |", "|---|---:|---|---|"]
    for r in sorted(rows, key=lambda r: (r["key"], r["sparsity"])):
        if r["layerwise"] in ("owl-auto", "auto"):
            blocks = r["block_sparsities"]
            if len(set(blocks)) == 1:
                shown = f"{blocks[0]:.3f} × {len(blocks)}"
            elif len(blocks) > 8:  # first, last and range of a deep model
                shown = f"{blocks[0]:.3f} (first) … {blocks[-1]:.3f} (last); min {min(blocks):.3f}, max {max(blocks):.3f}"
            else:
                shown = ", ".join(f"{x:.3f}" for x in blocks)
            chosen.append(f"| {r['label']} | {r['sparsity']:.0%} | {describe_choice(r['chosen'])} | {shown} |")
    print()
    print("\n".join(chosen))
    print()
    print("\n".join(_verdicts(by, sparsities)))

    methods = [m for m in ("wanda", "sparsegpt") if any(k.startswith(m + "-") for k in keys)]
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for key in keys:
            if not key.startswith(method + "-"):
                continue
            xs = [s for s in sparsities if (key, s) in by]
            ax.plot([x * 100 for x in xs], [by[(key, x)]["ppl"] for x in xs], marker="o", label=LABELS[key])
        ax.axhline(data["dense_ppl"], color="gray", ls=":", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("WikiText-2 perplexity (log)")
        ax.set_title(f"{args.model}, {'Wanda' if method == 'wanda' else 'SparseGPT'}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    img = ROOT / "docs" / "img" / ("quality.png" if args.model == "stories260K" else f"quality_{args.model}.png")
    if args.out:  # a separate results file gets its own plot
        img = img.with_name(Path(args.out).stem + ".png")
    img.parent.mkdir(parents=True, exist_ok=True)
    tmp = img.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, img)
    print(f"\ndense perplexity {data['dense_ppl']:.3f}; plot written to {img}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--out", help="results JSON (default: the model's file under bench/results/)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--num-samples", type=int, default=None, help="calibration windows (default: the model's)")
    parser.add_argument("--seqlen", type=int, default=None, help="calibration window length (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8,
                        help="calibration batch size (changes only the float summation order of the statistics)")
    parser.add_argument("--only", nargs="*", help="settings to run: full keys ('wanda-owl') or layerwise suffixes ('owl')")
    parser.add_argument("--cells", nargs="*", help="explicit cells in this order, e.g. wanda-owl:0.7 wanda-dlp:0.5")
    parser.add_argument("--set", nargs="+", metavar="NAME=VALUE",
                        help="OWLPrunerConfig fields for every cell, e.g. sparsegpt_damp=0.1 (write to a separate --out)")
    parser.add_argument("--fresh", action="store_true", help="ignore (and overwrite) the cells already in the JSON")
    parser.add_argument("--render", action="store_true", help="print the Markdown tables and write the plot")
    parser.add_argument("--variants", nargs="+", metavar="JSON",
                        help="print the cells of the first results file that any other one also has, side by side, "
                             "with geometric means and the verdicts on them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    needed = SMOL_DIR / SMOL_GGUF if args.model == "smollm2" else STORIES
    if not (args.render or args.variants) and not needed.exists():
        print(f"{args.model} not found at {needed}", file=sys.stderr)
        return 2
    if args.variants:
        render_variants(args.variants)
        return 0
    if args.render:
        render(args)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
