"""How much held-out text does the search's exact check need? (issue 12, SparseGPT 70% on SmolLM2-135M)

Runs `layerwise="auto"` on SmolLM2 with the given overrides (default: the old setting, 4 of the 16 calibration
windows held out, `auto_holdout_tokens=0`, and `auto_finalists=4` so that every family is checked exactly) and
records, for every exact candidate, its next-token loss (NLL) and its KL divergence to the dense model (top-64
tokens of the dense distribution plus the rest as one bin) per 32-token chunk on three texts: the held-out windows
the search used, 48 more C4 windows drawn with seed 1 (any identical to a calibration window dropped; they may come
from the same documents), and the first 16 WikiText-2 test windows of 512 tokens. The search itself is unchanged (it scores by NLL on its held-out windows).

    OMP_NUM_THREADS=2 python -m bench.probes.holdout_probe --out bench/results/holdout_probe_sg70_intel.json
    python -m bench.probes.holdout_probe --render bench/results/holdout_probe_sg70_intel.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import quality as Q
from bench._common import C4, WIKI, machine_summary, real_model

TOP_K = 64
CHUNK = 32


def _chunks(x: torch.Tensor) -> list[float]:
    per = max(1, round(x.shape[1] / CHUNK))
    return torch.cat([c.mean(1, keepdim=True) for c in x.tensor_split(per, 1)], 1).reshape(-1).tolist()


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> list[torch.Tensor]:
    return [model(input_ids=b, use_cache=False).logits.float() for b in ids.split(8)]


@torch.no_grad()
def dense_reference(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Top-k token ids and log-probabilities of the dense model at every predicted position."""
    out = []
    for lg in _logits(model, ids):
        values, index = F.log_softmax(lg[:, :-1], -1).topk(TOP_K, -1)
        out.append((index, values))
    return out


@torch.no_grad()
def scores(model, ids: torch.Tensor, ref) -> dict[str, list[float]]:
    """Per-chunk NLL and KL(dense ‖ model) over the dense top-k plus one bin for the rest."""
    nll, kl = [], []
    for (index, values), lg, batch in zip(ref, _logits(model, ids), ids.split(8)):
        logq = F.log_softmax(lg[:, :-1], -1)
        nll.append(-logq.gather(-1, batch[:, 1:, None])[..., 0].double())
        qk, logp = logq.gather(-1, index).double(), values.double()
        head = (logp.exp() * (logp - qk)).sum(-1)
        rest_p = (1 - logp.exp().sum(-1)).clamp_min(1e-12)
        rest_q = (1 - qk.exp().sum(-1)).clamp_min(1e-12)
        kl.append(head + rest_p * (rest_p.log() - rest_q.log()))
    return {"nll": _chunks(torch.cat(nll)), "kl": _chunks(torch.cat(kl))}


def run(args: argparse.Namespace) -> None:
    import optimum_owl.pruning.search.search as search
    from optimum_owl import OWLPruner, OWLPrunerConfig
    from optimum_owl.evaluation import encode_joined, load_texts
    from optimum_owl.pruning.data import draw_windows

    overrides = {"auto_holdout_tokens": 0, "auto_finalists": 4} | dict(Q.parse_set(i) for i in args.set or [])
    config = OWLPrunerConfig(sparsity=args.sparsity, method=args.method, layerwise="auto", num_samples=16, seqlen=256,
                             seed=0, batch_size=8, **overrides)
    model, tok = real_model("smollm2", Path(tempfile.mkdtemp(prefix="owl-probe-")))
    calibration, _ = draw_windows(str(C4), tok, 16, 256, 0)
    seen = {tuple(r.tolist()) for r in calibration}
    more = torch.stack([r for r in draw_windows(str(C4), tok, 64, 256, 1)[0] if tuple(r.tolist()) not in seen][:48])
    texts = {"c4_more": more, "wikitext": encode_joined(tok, load_texts(str(WIKI)))[: 16 * 512].view(16, 512)}
    refs = {name: dense_reference(model, ids) for name, ids in texts.items()}
    records: list[dict] = []
    original = search.chunk_losses

    def recording(m, ids, batch_size):  # every exact candidate, uniform first, as the search scores it
        rec = {name: scores(m, texts[name], refs[name]) for name in texts}
        rec["held_out"] = {"nll": original(m, ids, batch_size).tolist()}
        records.append(rec)
        return torch.tensor(rec["held_out"]["nll"], dtype=torch.float64)

    search.chunk_losses = recording
    t = time.perf_counter()
    report = OWLPruner(config).prune(model, dataset=str(C4), tokenizer=tok)
    ppl = Q.evaluate(Q.MODELS["smollm2"], model, tok)
    exact = [c for c in report.candidates if not c.layerwise.endswith(", screened")]
    rows = [{"setting": c.setting, "chosen": c.chosen, "gain_z": c.gain_z, **rec} for c, rec in zip(exact, records)]
    out = {"config": overrides, "method": args.method, "sparsity": args.sparsity, "ppl": ppl,
           "threads": torch.get_num_threads(), "machine": machine_summary(), "seconds": round(time.perf_counter() - t, 1),
           "rows": rows}
    Path(args.out).write_text(json.dumps(out) + "\n")
    render(args.out)


def _z(candidate: list[float], uniform: list[float]) -> tuple[float, float]:
    d = torch.tensor(uniform) - torch.tensor(candidate)
    se = float(d.std()) / math.sqrt(d.numel())
    return float(d.mean()), float(d.mean()) / se if se else math.inf


def render(path: str) -> None:
    data = json.loads(Path(path).read_text())
    rows = data["rows"]
    print(f"{path}: {data['method']} {data['sparsity']:.0%}, {data['threads']} threads, {data['machine']}; "
          f"WikiText-2 perplexity of auto's choice {data['ppl']:.2f}")
    print("| exact candidate | held-out (NLL) | C4 ×48, NLL | C4 ×48, KL | C4 16-window thirds, NLL | WikiText-2, NLL |")
    print("|---|---:|---:|---:|---:|---:|")
    base = rows[0]
    for r in rows[1:]:
        cells = []
        for text, metric in (("held_out", "nll"), ("c4_more", "nll"), ("c4_more", "kl")):
            g, z = _z(r[text][metric], base[text][metric])
            cells.append(f"{g:+.3f} (z {z:.1f})")
        n = len(r["c4_more"]["nll"]) // 3
        thirds = [_z(r["c4_more"]["nll"][i * n:(i + 1) * n], base["c4_more"]["nll"][i * n:(i + 1) * n]) for i in range(3)]
        cells.append(" / ".join(f"{g:+.3f} (z {z:.1f})" for g, z in thirds))
        g, z = _z(r["wikitext"]["nll"], base["wikitext"]["nll"])
        cells.append(f"{g:+.3f} (z {z:.1f})")
        print(f"| {r['setting']}{' ✓' if r['chosen'] else ''} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/holdout_probe.json")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--set", action="append", help="OWLPrunerConfig field=value (JSON value)")
    parser.add_argument("--render", metavar="JSON", help="print the table of an earlier run")
    args = parser.parse_args()
    render(args.render) if args.render else run(args)


if __name__ == "__main__":
    main()
