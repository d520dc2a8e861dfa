"""The picture of docs/inference.md: bytes read per weight (x) against decode tokens/s (y) for every form measured
by `bench.inference speed` (one JSON), with the WikiText-2 perplexity of the quality bench written beside the
sparse points (OWL + Wanda at that sparsity, float and int8 values; the speed bench's own weights are magnitude-pruned,
which changes the values, not the bytes or the time).

    python -m bench.probes.bytes_vs_speed --speed bench/results/speed_smollm2_int8_zen4.json \\
        --quality bench/results/quality_smollm2_int8_zen4.json --out docs/img/bytes_vs_speed_smollm2.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BYTES = {"dense_fp32": lambda s: 4.0, "dense_bf16": lambda s: 2.0, "dense_int8": lambda s: 1.0,
         "sparse_fp32": lambda s: (1 - s) * 4 + 0.125, "sparse_bf16": lambda s: (1 - s) * 2 + 0.125,
         "sparse_int8": lambda s: (1 - s) * 1 + 0.125}
# Perplexities of float values at the same cells, from the quality table (wanda-owl is deterministic across the
# machines measured: bench/results/quality_smollm2.json); the int8 ones come from --quality.
FLOAT_PPL = {0.5: 84.70, 0.7: 1175.32}
DENSE_PPL = 36.63


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", required=True)
    parser.add_argument("--quality", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = json.loads(Path(args.speed).read_text())
    int8_ppl = {r["sparsity"]: r["ppl"] for r in json.loads(Path(args.quality).read_text())["rows"]
                if r["key"] == "wanda-owl"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for level, data in speed["levels"].items():
        s = float(level)
        for form, row in data["summary"].items():
            if form.startswith("dense") and s != 0.7:
                continue  # the dense forms are measured at every level; draw them once
            x, y = BYTES[form](s), row["decode_tok_s"]
            label = form.replace("_", " ") + ("" if form.startswith("dense") else f" {s:.0%}")
            ppl = DENSE_PPL if form == "dense_fp32" else (
                int8_ppl.get(s) if form == "sparse_int8" else FLOAT_PPL.get(s) if form.startswith("sparse") else None)
            text = label + (f"\nppl {ppl:.1f}" if ppl else "\nppl not measured")
            ax.scatter([x], [y], color="tab:red" if "int8" in form else "tab:blue")
            offset = (6, 6) if form == "dense_int8" else (6, -4)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, fontsize=7)
    ax.set_xlabel("bytes read per weight")
    ax.set_ylabel("decode tokens/s (batch 1, 2 threads)")
    ax.set_title(f"SmolLM2-135M, {speed['machine']['cpu']} {speed['machine']['cpu_family_model']}, "
                 f"{speed['machine']['date']}", fontsize=9)
    ax.set_xlim(0, 4.6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
