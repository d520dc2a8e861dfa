"""Real-model quality: stories260K (real pretrained Llama, 260K params) pruned at 50% and 70%, uniform vs OWL.

Perplexity on the shared WikiText-2 test text with the assets README's protocol: one BOS, the first 20,480 tokens,
windows of 512 (dense ≈ 131). Calibration: C4 documents (shared first 1000 of shard 00000), seeded windows.

    python -m bench.stories_ppl --assets ../shared/assets
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench._common import ASSETS
from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.evaluation import encode_joined, load_texts, perplexity_of_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--assets", default=str(ASSETS))
    p.add_argument("--sparsities", type=float, nargs="*", default=[0.5, 0.7])
    p.add_argument("--methods", nargs="*", default=["wanda", "sparsegpt", "magnitude"])
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--owl-m", type=float, default=5.0)
    p.add_argument("--owl-lambda", type=float, default=0.08)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    assets = Path(args.assets)
    path = assets / "models" / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = encode_joined(tok, load_texts(assets / "text" / "wikitext2_test.jsonl"), add_bos=True)[:20480]
    calib = str(assets / "text" / "c4_train_first1000.jsonl")
    dense = perplexity_of_ids(model, ids, 512, batch_size=8)
    rows = [{"method": "dense", "layerwise": "-", "sparsity": 0.0, "ppl": dense}]
    print(f"dense: {dense:.2f}")
    for s in args.sparsities:
        for method in args.methods:
            for layerwise in ("uniform", "owl"):
                m = copy.deepcopy(model)
                config = OWLPrunerConfig(sparsity=s, method=method, layerwise=layerwise, owl_m=args.owl_m,
                                         owl_lambda=args.owl_lambda, num_samples=args.num_samples, seqlen=args.seqlen)
                report = OWLPruner(config).prune(m, dataset=calib, tokenizer=tok)
                ppl = perplexity_of_ids(m, ids, 512, batch_size=8)
                rows.append({"method": method, "layerwise": layerwise, "sparsity": s, "ppl": ppl,
                             "achieved": report.sparsity, "blocks": [b.target_sparsity for b in report.blocks]})
                print(f"{method:9s} {layerwise:7s} {s:.0%}: ppl {ppl:10.2f}  achieved {report.sparsity:.4f}  "
                      f"blocks {[round(b.target_sparsity, 3) for b in report.blocks]}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
