"""Quality benchmark: WikiText-2 perplexity of stories260K pruned with uniform / OWL (paper M, λ) / owl-auto,
for Wanda (with and without DSnoT refinement) and SparseGPT, at several sparsities.

Protocol (../shared/assets/README.md): the WikiText-2 test rows joined with "\\n\\n", one BOS at the start, the first
40 windows of 512 tokens (20,480 tokens), `optimum_owl.evaluation.perplexity`. Calibration: windows of 512 tokens
of the first 1000 C4 train documents (`c4_train_first1000.jsonl`), the reference protocol's source, seed 0.

Usage (from the project root):

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD python bench/quality.py --out bench/results/quality.json
    PYTHONPATH=$PWD python bench/quality.py --render bench/results/quality.json   # tables + docs/img/quality.png

Results are appended to the JSON after every run, so an interrupted run keeps what it measured; `--resume` skips
rows already there.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
MODEL = ASSETS / "models" / "stories260K"
WIKI = ASSETS / "text" / "wikitext2_test.jsonl"
C4 = ASSETS / "text" / "c4_train_first1000.jsonl"

# (label, method, layerwise, refine, propagation)
SETTINGS = [
    ("Wanda uniform", "wanda", "uniform", None, "sequential"),
    ("Wanda OWL (M=5, λ=0.08)", "wanda", "owl", None, "sequential"),
    ("Wanda OWL (M=5, λ=0.08), dense propagation", "wanda", "owl", None, "dense"),
    ("Wanda owl-auto", "wanda", "owl-auto", None, "sequential"),
    ("Wanda uniform + DSnoT", "wanda", "uniform", "dsnot", "sequential"),
    ("Wanda owl-auto + DSnoT", "wanda", "owl-auto", "dsnot", "sequential"),
    ("SparseGPT uniform", "sparsegpt", "uniform", None, "sequential"),
    ("SparseGPT OWL (M=5, λ=0.08)", "sparsegpt", "owl", None, "sequential"),
    ("SparseGPT owl-auto", "sparsegpt", "owl-auto", None, "sequential"),
]


def evaluate(model, tokenizer) -> float:
    from optimum_owl.evaluation import perplexity

    return perplexity(model, tokenizer, str(WIKI), seqlen=512, max_windows=40, add_bos=True, batch_size=8)


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(MODEL)).eval(), AutoTokenizer.from_pretrained(str(MODEL))


def run(args: argparse.Namespace) -> None:
    from optimum_owl import OWLPruner, OWLPrunerConfig
    from optimum_owl.utils import atomic_write_text

    out = Path(args.out)
    data = json.loads(out.read_text()) if args.resume and out.exists() else {"rows": []}
    data["setup"] = {
        "model": "stories260K (../shared/assets/models/stories260K)",
        "eval": "WikiText-2 test, first 40 windows of 512 tokens, BOS at the start",
        "calibration": f"{args.num_samples} windows x 512 tokens of C4 (c4_train_first1000.jsonl), seed {args.seed}",
        "machine": "2-core CPU, 24 GiB, no GPU (shared with other jobs)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": "2026-11-23",
        "command": "OMP_NUM_THREADS=2 PYTHONPATH=$PWD python " + " ".join(sys.argv),
    }
    done = {(r["label"], r["sparsity"]) for r in data["rows"]}
    if "dense_ppl" not in data:
        model, tok = load()
        data["dense_ppl"] = evaluate(model, tok)
        print(f"dense ppl {data['dense_ppl']:.3f}", flush=True)
    for sparsity in args.sparsities:
        for label, method, layerwise, refine, propagation in SETTINGS:
            if args.only and not any(o.lower() in label.lower() for o in args.only):
                continue
            if (label, sparsity) in done:
                continue
            model, tok = load()
            config = OWLPrunerConfig(
                sparsity=sparsity,
                method=method,
                layerwise=layerwise,
                refine=refine,
                propagation=propagation,
                num_samples=args.num_samples,
                seqlen=512,
                seed=args.seed,
                batch_size=8,
            )
            t = time.perf_counter()
            report = OWLPruner(config).prune(model, dataset=str(C4), tokenizer=tok)
            prune_s = time.perf_counter() - t
            ppl = evaluate(model, tok)
            chosen = next((c for c in report.candidates if c.chosen), None)
            row = {
                "label": label,
                "method": method,
                "layerwise": layerwise,
                "refine": refine,
                "propagation": propagation,
                "sparsity": sparsity,
                "achieved": round(report.sparsity, 5),
                "ppl": ppl,
                "prune_s": round(prune_s, 2),
                "block_sparsities": [round(b.target_sparsity, 4) for b in report.blocks],
                "chosen": None if chosen is None else [chosen.layerwise, chosen.owl_m, chosen.owl_lambda],
                "candidates": [[c.layerwise, c.owl_m, c.owl_lambda, round(c.loss, 5)] for c in report.candidates],
            }
            data["rows"].append(row)
            atomic_write_text(out, json.dumps(data, indent=1) + "\n")
            print(
                f"{sparsity:.2f} {label:32s} ppl {ppl:10.3f}  prune {prune_s:6.1f}s  chosen {row['chosen']}",
                flush=True,
            )


def render(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    rows = data["rows"]
    sparsities = sorted({r["sparsity"] for r in rows})
    labels = [s[0] for s in SETTINGS if any(r["label"] == s[0] for r in rows)]
    by = {(r["label"], r["sparsity"]): r for r in rows}

    head = "| setting | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |"
    lines = [head, "|---|" + "---:|" * len(sparsities)]
    for label in labels:
        cells = []
        for s in sparsities:
            r = by.get((label, s))
            cells.append("–" if r is None else f"{r['ppl']:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)

    chosen_lines = ["| setting | sparsity | chosen | per-block sparsity |", "|---|---:|---|---|"]
    for r in sorted(rows, key=lambda r: (r["label"], r["sparsity"])):
        if r["layerwise"] != "owl-auto":
            continue
        c = r["chosen"]
        what = "–" if c is None else ("uniform" if c[1] is None else f"OWL M={c[1]:g}, λ={c[2]:g}")
        chosen_lines.append(
            f"| {r['label']} | {r['sparsity']:.0%} | {what} | {', '.join(f'{x:.3f}' for x in r['block_sparsities'])} |"
        )

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, method in zip(axes, ("Wanda", "SparseGPT")):
        for label in labels:
            if not label.startswith(method):
                continue
            xs = [s for s in sparsities if (label, s) in by]
            ax.plot([x * 100 for x in xs], [by[(label, x)]["ppl"] for x in xs], marker="o", label=label)
        ax.axhline(data["dense_ppl"], color="gray", ls=":", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("WikiText-2 perplexity (log)")
        ax.set_title(f"stories260K, {method}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    img = ROOT / "docs" / "img" / "quality.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    tmp = img.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, img)

    print(table)
    print()
    print("\n".join(chosen_lines))
    print(f"\ndense perplexity {data['dense_ppl']:.3f}; plot written to {img}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/quality.json")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="run only settings whose label contains one of these strings")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--render", metavar="JSON", help="print the Markdown tables and write docs/img/quality.png from a results JSON"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not MODEL.is_dir():
        print(f"stories260K not found at {MODEL}", file=sys.stderr)
        return 2
    if args.render:
        render(Path(args.render))
        return 0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
