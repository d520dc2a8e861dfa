"""Fingerprints of pruned weights and reports over a matrix of configurations, to show a refactor changes no result.

Every criterion x every allocation family (plus N:M and DSnoT) x four architectures is pruned on a tiny random
model with fixed calibration ids; each cell's SHA-256 covers every parameter's bytes after pruning and the report's
JSON without its timings. Run on two revisions and diff the outputs:

    python -m bench.probes.equivalence --out before.json     # on the old revision
    python -m bench.probes.equivalence --out after.json      # on the new one
    python -m bench.probes.equivalence --compare before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import torch

from optimum_owl import OWLPruner, OWLPrunerConfig

ARCHS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "opt": dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64),
    "gpt2": dict(n_embd=64, n_head=4),
}
SETTINGS = [
    dict(layerwise="uniform"), dict(layerwise="owl"), dict(layerwise="dlp"), dict(layerwise="alphapruning"),
    dict(layerwise="atp"), dict(layerwise="owl", pattern="2:4"), dict(layerwise="owl-auto"), dict(layerwise="auto"),
]
METHODS = ["wanda", "sparsegpt", "magnitude"]


def tiny(arch: str, layers: int = 4):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(ARCHS[arch])
    kwargs.update(dict(n_layer=layers, n_positions=128) if arch == "gpt2" else
                  dict(num_hidden_layers=layers, max_position_embeddings=128))
    config = AutoConfig.for_model(arch, vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def fingerprint(model, report) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    data = report.to_dict()
    data.pop("timings", None)
    digest.update(json.dumps(data, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def run() -> dict[str, str]:
    torch.set_num_threads(1)
    ids = torch.randint(3, 256, (16, 32), generator=torch.Generator().manual_seed(1))
    out = {}
    for arch in ARCHS:
        for method in METHODS:
            for setting in SETTINGS + ([dict(layerwise="owl", refine="dsnot")] if method == "wanda" else []):
                if method == "magnitude" and setting["layerwise"] in ("owl-auto", "auto"):
                    continue
                key = f"{arch}/{method}/" + ",".join(f"{k}={v}" for k, v in setting.items())
                model = tiny(arch)
                config = OWLPrunerConfig(sparsity=0.6, method=method, num_samples=16, seqlen=32, seed=0, **setting)
                report = OWLPruner(config).prune(model, dataset=ids)
                out[key] = fingerprint(model, report)
                print(key, out[key][:16], flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--compare", nargs=2)
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(open(p).read()) for p in args.compare)
        diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        print(f"{len(a)} / {len(b)} cells, {len(diff)} differ" + ("".join("\n  " + k for k in diff)))
        return 1 if diff else 0
    result = run()
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
