"""Checkpoint formats after pruning (issue 29): compact (optimum-owl) vs compressed-tensors sparse-bitmask vs dense.

For each sparsity the model is pruned (magnitude, uniform: the sizes and load costs depend only on the sparsity) and
saved in the three formats. Then:

1. bytes of each checkpoint (all safetensors files);
2. load time and peak RSS of each way to load each format, every load in a fresh subprocess (`--repeats`, median
   time; peak RSS = VmHWM of that subprocess, reported beside the RSS after the imports, before the load):
   compact with `from_pretrained` (+ `import optimum_owl`) and `load_sparse`, compressed-tensors with
   `formats.compressed_tensors.load_dense` and `load_sparse`, dense with `from_pretrained`;
3. that `load_sparse` of the compact and the compressed-tensors checkpoint give identical sparse modules (the same
   kernels then run on the same buffers, so decoding speed is the same by construction);
4. lm-evaluation-harness wall time on a local multiple-choice task built from WikiText-2 (next word among four),
   the pruned model dense against the same weights sparsified (alternated `--repeats` times in one process), with
   their accuracies (needs `pip install 'optimum-owl[eval]'`; skipped with a note otherwise).

Usage (the coordinator's run; the smoke test is `--model tiny --task-docs 16 --repeats 1`):
    OMP_NUM_THREADS=2 python -m bench.formats --model smollm2 --sparsities 0.5,0.7 --repeats 3 \
        --json bench/results/formats_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench._common import WIKI, machine_summary, peak_rss_bytes, proc_status, random_llama, real_model

LOADERS = {  # format -> the ways to load it
    "compact": ("from_pretrained", "load_sparse"),
    "compressed-tensors": ("load_dense", "load_sparse"),
    "dense": ("from_pretrained",),
}


def _checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _load_role(path: str, loader: str) -> None:
    """Subprocess: load `path` with `loader`, print {seconds, peak_rss, rss_after_imports} as JSON."""
    from transformers import AutoModelForCausalLM

    import optimum_owl  # noqa: F401  (registers quant_method "owl")
    from optimum_owl.formats.compressed_tensors_load import load_dense
    from optimum_owl.inference import load_sparse

    before = proc_status(("VmRSS",))["VmRSS"]
    start = time.perf_counter()
    if loader == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(path)
    elif loader == "load_dense":
        model = load_dense(path)
    else:
        model = load_sparse(path)
    seconds = time.perf_counter() - start
    assert model is not None
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss_bytes(), "rss_after_imports": before}))


def _timed_load(path: Path, loader: str, repeats: int) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        cmd = [sys.executable, "-m", "bench.formats", "--role", "load", "--path", str(path), "--loader", loader]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"seconds_median": statistics.median(r["seconds"] for r in runs),
            "peak_rss_median": int(statistics.median(r["peak_rss"] for r in runs)),
            "rss_after_imports_median": int(statistics.median(r["rss_after_imports"] for r in runs)), "runs": runs}


def _local_task(folder: Path, docs: int, seed: int = 0) -> Path:
    """A multiple-choice lm-eval task in `folder`: a 24-word WikiText-2 prefix, its next word among 4 words."""
    words = " ".join(json.loads(line)["text"] for line in WIKI.open()).split()
    rng = random.Random(seed)
    rows = []
    for _ in range(docs):
        i = rng.randrange(0, len(words) - 30)
        answer = rng.randrange(4)
        choices = [words[rng.randrange(len(words))] for _ in range(4)]
        choices[answer] = words[i + 24]
        rows.append({"question": " ".join(words[i:i + 24]), "choices": choices, "answer": answer})
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "wiki_next.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "wiki_next.yaml").write_text(
        "task: wiki_next\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{answer}}\"\ndoc_to_choice: \"{{choices}}\"\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    return folder


def _lm_eval_times(model: torch.nn.Module, tokenizer: Any, task_dir: Path, repeats: int, batch_size: int) -> dict:
    import copy

    from optimum_owl.evaluation import zero_shot
    from optimum_owl.inference import sparsify

    sparse = sparsify(copy.deepcopy(model))
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    acc: dict[str, float] = {}
    for _ in range(repeats):
        for name, m in (("dense", model), ("sparse", sparse)):
            out = zero_shot(m, tokenizer, "wiki_next", include_path=task_dir, batch_size=batch_size)
            times[name].append(out["seconds"])
            acc[name] = out["tasks"]["wiki_next"]["acc"]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": times, "median": med, "sparse_over_dense": med["sparse"] / med["dense"], "acc": acc,
            "harness": out["harness"], "docs": out["samples"]["wiki_next"]}


def _build(name: str, workdir: Path) -> tuple[torch.nn.Module, Any]:
    if name == "tiny":
        from transformers import AutoTokenizer

        from bench._common import ASSETS

        tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / "gpt2"))
        return random_llama(hidden=128, intermediate=256, layers=2, heads=4, vocab=len(tok)), tok
    return real_model(name, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "stories260K", "tiny"))
    parser.add_argument("--sparsities", default="0.5,0.7")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--task-docs", type=int, default=200, help="documents of the local lm-eval task")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval requests per forward")
    parser.add_argument("--json", default=None)
    parser.add_argument("--role", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loader", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "load":
        _load_role(args.path, args.loader)
        return

    from optimum_owl import OWLPruner, OWLPrunerConfig
    from optimum_owl.inference import SparseLinear, load_sparse
    from optimum_owl.serialization import save_pruned

    result: dict[str, Any] = {"command": "python -m bench.formats " + " ".join(sys.argv[1:]),
                              "machine": machine_summary(), "date": time.strftime("%Y-%m-%d"),
                              "threads": torch.get_num_threads(), "pruning": "magnitude, uniform", "runs": []}
    with tempfile.TemporaryDirectory(prefix="owl-formats-") as tmp:
        work = Path(tmp)
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            model, tokenizer = _build(args.model, work)
            config = OWLPrunerConfig(sparsity=sparsity, method="magnitude", layerwise="uniform")
            report = OWLPruner(config).prune(model)
            row: dict[str, Any] = {"sparsity": sparsity, "achieved": report.sparsity, "formats": {}}
            for fmt, loaders in LOADERS.items():
                out = save_pruned(model, work / f"{sparsity}-{fmt}", report=report, config=config, save_format=fmt)
                row["formats"][fmt] = {"bytes": _checkpoint_bytes(out),
                                       "loads": {ld: _timed_load(out, ld, args.repeats) for ld in loaders}}
                print(json.dumps({"sparsity": sparsity, "format": fmt, "bytes": row["formats"][fmt]["bytes"],
                                  **{ld: [v["seconds_median"], v["peak_rss_median"]]
                                     for ld, v in row["formats"][fmt]["loads"].items()}}), flush=True)
            a, b = (load_sparse(work / f"{sparsity}-{fmt}") for fmt in ("compact", "compressed-tensors"))
            pairs = [(n, m, b.get_submodule(n)) for n, m in a.named_modules() if isinstance(m, SparseLinear)]
            row["sparse_modules_identical"] = bool(pairs) and all(
                torch.equal(getattr(x, t), getattr(y, t)) for _, x, y in pairs for t in ("mask", "values", "offsets"))
            try:
                import lm_eval  # noqa: F401
            except ImportError:
                row["lm_eval"] = "skipped: lm-eval is not installed (pip install 'optimum-owl[eval]')"
            else:
                task = _local_task(work / "task", args.task_docs)
                model.hf_quantizer = None  # a plain dense model for the baseline
                row["lm_eval"] = _lm_eval_times(model, tokenizer, task, args.repeats, args.batch_size)
                print(json.dumps({"sparsity": sparsity, "lm_eval": row["lm_eval"]["median"],
                                  "acc": row["lm_eval"]["acc"]}), flush=True)
            result["runs"].append(row)
            del model
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    os.environ.get("OMP_NUM_THREADS") or print("note: OMP_NUM_THREADS was not set", file=sys.stderr)


if __name__ == "__main__":
    main()
