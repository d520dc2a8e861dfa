"""llama.cpp beside optimum-owl, in one run: the `peer` mode of bench/inference.py.

llama.cpp is what a CPU user runs today. llama-cpp-python (0.3.36, built from its sdist with `-DGGML_NATIVE=ON`) lives
in the bench venv only (`.bench-venv`, never a dependency of the package): this module runs there as a subprocess,
`python -m bench.peer_llamacpp serve`, answering one JSON command per line on stdin, while the parent process decodes
with optimum-owl; the parent alternates the two runtimes, so both see the same machine (docs/benchmarks.md).

GGUF files (cached in `--work-dir`):

- SmolLM2-135M: the shared Q4_1 file requantized with llama.cpp's own quantizer (`llama_model_quantize`,
  `allow_requantize`) to F16, Q8_0 and Q4_0. The shipped weights already carry Q4_1's rounding in every form: fine
  for speed, not for quality.
- the random 0.95B Llama (and the `tiny` smoke model): saved by the parent in bfloat16 with SmolLM2's tokenizer cut to
  the model's 32000-entry vocabulary (tokens with ids below it, and the merges among them; llama.cpp's converter
  needs a tokenizer, and its vocabulary must fit the embedding), converted to an F16 GGUF with llama.cpp's
  `convert_hf_to_gguf.py` (from the llama-cpp-python sdist's vendored llama.cpp, downloaded with `pip download` when
  `--llama-cpp-src` is not given; its pre-tokenizer check is told "smollm", since the cut vocabulary no longer hashes
  like SmolLM2's), then quantized to Q8_0 and Q4_0 by llama.cpp. Decode speed does not depend on the token values.

Decode rate, as in docs/PEERS_CPU.md: `Llama(model_path, n_threads, n_threads_batch, n_ctx=512)`, greedy
`generate(prompt, temp=0.0)`; the clock starts at the first yielded token (which includes the prompt) and stops after
`new_tokens - 1` more: the same definition as optimum-owl's rate in bench/inference.py.

    OMP_NUM_THREADS=2 flock -x /work/cpu.lock python -m bench.inference peer --model smollm2 --sparsities 0.7
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_PYTHON = ROOT / ".bench-venv" / "bin" / "python"
FTYPES = {"F16": 1, "Q8_0": 7, "Q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* codes
LLAMA_CPP_VERSION = "0.3.36"


# ------------------------------------------------------------------------------------------ child (bench venv)
def quantize(src: Path, dst: Path, form: str) -> Path:
    """`src` requantized by llama.cpp into `dst` (kept if already there; written to a temp name, then renamed)."""
    import ctypes

    import llama_cpp

    if dst.exists():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[form]
    params.allow_requantize = True
    tmp = dst.with_name(dst.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {form}) returned {rc}")
    os.replace(tmp, dst)
    return dst


def converter_source(work_dir: Path, given: str | None) -> Path:
    """A folder with llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/: `given`, or the llama-cpp-python
    sdist's vendored copy (downloaded once with pip into `work_dir`)."""
    if given:
        return Path(given)
    folder = work_dir / "llama.cpp-src"
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    sdist = work_dir / "sdist"
    subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_VERSION}", "--no-deps",
                    "--no-binary", ":all:", "-d", str(sdist)], check=True, stdout=sys.stderr)
    archive = next(sdist.glob("llama_cpp_python-*.tar.gz"))
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    tmp = work_dir / "llama.cpp-src.tmp"
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            rel = member.name.split("/vendor/llama.cpp/", 1)
            if len(rel) == 2 and rel[1].startswith(wanted) and (member.isfile() or member.isdir()):
                member.name = rel[1]
                tar.extract(member, tmp, filter="data")
    os.replace(tmp, folder)
    return folder


def convert(hf_dir: Path, out: Path, source: Path) -> Path:
    """`hf_dir` (a Llama with a GPT-2-style BPE tokenizer) as an F16 GGUF at `out`, by llama.cpp's converter (run in a
    fresh process: `python -m bench.peer_llamacpp _convert`)."""
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "bench.peer_llamacpp", "_convert", str(hf_dir), str(tmp)],
                   check=True, cwd=ROOT, stdout=sys.stderr, env=env)
    os.replace(tmp, out)
    return out


def _convert_main(hf_dir: str, out: str) -> None:
    """llama.cpp's converter (importable through PYTHONPATH, set by `convert`) with two adjustments (docstring)."""
    import convert_hf_to_gguf
    from conversion import base

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "smollm"  # the cut SmolLM2 tokenizer (docstring)

    def no_sentencepiece(self):  # the folder has no tokenizer.model; the converter then reads tokenizer.json (BPE)
        raise FileNotFoundError("no sentencepiece tokenizer.model")

    base.TextModel._set_vocab_sentencepiece = no_sentencepiece
    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", out, "--outtype", "f16"]
    convert_hf_to_gguf.main()


def prepare(model: str, work_dir: Path, hf_dir: str | None, source: str | None, forms: list[str]) -> dict[str, str]:
    """GGUF path per form (module docstring)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    if model == "smollm2":
        from bench._common import SMOL_DIR, SMOL_GGUF

        base = SMOL_DIR / SMOL_GGUF
    else:
        base = convert(Path(hf_dir), work_dir / f"{model}-F16.gguf", converter_source(work_dir, source))
    return {form: str(quantize(base, work_dir / f"{model}-{form}.gguf", form)) for form in forms}


def serve() -> None:
    """One JSON command per line on stdin, one JSON answer per line on stdout (errors: {"error": ...})."""
    import llama_cpp

    models: dict[str, llama_cpp.Llama] = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["cmd"] == "prepare":
                answer = {"paths": prepare(request["model"], Path(request["work_dir"]), request.get("hf_dir"),
                                           request.get("source"), request["forms"])}
            elif request["cmd"] == "load":
                threads = request["threads"]
                models[request["form"]] = llama_cpp.Llama(model_path=request["path"], n_threads=threads,
                                                          n_threads_batch=threads, n_ctx=512, verbose=False)
                answer = {"loaded": request["form"]}
            elif request["cmd"] == "decode":
                answer = {"tok_s": _decode(models[request["form"]], request["prompt"], request["new_tokens"])}
            else:
                answer = {"error": f"unknown command {request['cmd']!r}"}
        except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
            answer = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(answer), flush=True)


def _decode(llm, prompt: list[int], new_tokens: int) -> float:
    start, count = None, 0
    for _ in llm.generate(prompt, temp=0.0, reset=True):
        if start is None:
            start = time.perf_counter()  # the first token: it includes the prompt's processing
        else:
            count += 1
            if count == new_tokens - 1:
                break
    return count / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------ parent side
class LlamaCpp:
    """The llama.cpp subprocess, seen from the benchmark process."""

    def __init__(self, python: str | os.PathLike = BENCH_PYTHON) -> None:
        if not Path(python).is_file():
            raise SystemExit(f"no bench venv Python at {python}: build .bench-venv with llama-cpp-python "
                             f"{LLAMA_CPP_VERSION} (docs/benchmarks.md) or pass --peer-python")
        self.proc = subprocess.Popen([str(python), "-m", "bench.peer_llamacpp", "serve"], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp subprocess ended (exit code {self.proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"llama.cpp subprocess: {answer['error']}")
        return answer

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def random_model_folder(model, vocab_size: int, folder: Path) -> Path:
    """`model` saved in bfloat16 with SmolLM2's tokenizer cut to `vocab_size` entries (module docstring)."""
    from transformers import AutoTokenizer

    from bench._common import SMOL_DIR, SMOL_GGUF

    if (folder / "tokenizer.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    copy_bf16(model).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(SMOL_DIR), gguf_file=SMOL_GGUF).save_pretrained(tmp)
    data = json.loads((tmp / "tokenizer.json").read_text())
    vocab = {tok: i for tok, i in data["model"]["vocab"].items() if i < vocab_size}
    merges = [m for m in data["model"]["merges"]
              if all(part in vocab for part in ((m.split(" ") if isinstance(m, str) else m) + ["".join(
                  m.split(" ") if isinstance(m, str) else m)]))]
    data["model"].update(vocab=vocab, merges=merges)
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < vocab_size]
    (tmp / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    os.replace(tmp, folder)
    return folder


def run_peer(args) -> dict:
    """bench/inference.py `peer`: optimum-owl's forms (lean decode) and llama.cpp's, alternated in one run."""
    import torch

    from bench.inference import FORMS, block_linears, build_model, dense_variants, machine, sparse_variants
    from bench.lean import lean_rate

    torch.set_num_threads(args.threads)
    forms = ("dense_bf16", "sparse_bf16", "sparse_int8") if tuple(args.forms) == FORMS else tuple(args.forms)
    dense32 = build_model(args.model)
    names = block_linears(dense32)
    work = Path(args.work_dir)
    vocab = dense32.config.vocab_size
    prompt = torch.randint(3, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    peer = LlamaCpp(args.peer_python)
    try:
        hf_dir = None if args.model == "smollm2" else str(random_model_folder(dense32, vocab, work / f"{args.model}-hf"))
        paths = peer.ask(cmd="prepare", model=args.model, work_dir=str(work), hf_dir=hf_dir,
                         source=args.llama_cpp_src, forms=list(FTYPES))["paths"]
        for form, path in paths.items():
            peer.ask(cmd="load", form=form, path=path, threads=args.threads)
        dense16 = copy_bf16(dense32)
        owl, _ = dense_variants(dense32, dense16, names, tuple(f for f in forms if f.startswith("dense")), prompt)
        result = {"machine": machine(), "args": vars(args), "gguf": paths, "levels": {}}
        for sparsity in args.sparsities:
            sparse = sparse_variants(dense32, dense16, names, sparsity, tuple(f for f in forms if f.startswith("sparse")))
            variants = {**owl, **sparse}
            rates: dict[str, list[float]] = {**{f"owl_{k}": [] for k in variants}, **{f"llama.cpp_{k}": [] for k in paths}}
            compile_s = {k: lean_rate(m, prompt, 3)[2] for k, m in variants.items()}  # compile before timing
            for rep in range(args.repeats):
                order = [(f"owl_{k}", m) for k, m in variants.items()] + [(f"llama.cpp_{k}", k) for k in paths]
                for name, target in (order if rep % 2 == 0 else order[::-1]):
                    if name.startswith("owl_"):
                        rate = lean_rate(target, prompt, args.new_tokens)[0]
                    else:
                        rate = peer.ask(cmd="decode", form=target, prompt=prompt[0].tolist(),
                                        new_tokens=args.new_tokens)["tok_s"]
                    rates[name].append(rate)
                    print(f"sparsity {sparsity} rep {rep} {name}: {rate:.2f} tok/s", flush=True)
            best = {name: max(r) for name, r in rates.items()}
            ratios = {f"{o} / {p}": best[o] / best[p] for o in best if o.startswith("owl_")
                      for p in best if p.startswith("llama.cpp_")}
            result["levels"][str(sparsity)] = {"tok_s": rates, "best_tok_s": best, "ratios": ratios,
                                               "compile_s": compile_s}
            print(json.dumps({str(sparsity): {"best_tok_s": best, "ratios": ratios}}, indent=1), flush=True)
            del variants, sparse
    finally:
        peer.close()
    return result


def copy_bf16(model):
    import copy

    import torch

    return copy.deepcopy(model).to(torch.bfloat16)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["_convert"]:
        _convert_main(*sys.argv[2:4])
    else:
        raise SystemExit("usage: python -m bench.peer_llamacpp serve   (started by `python -m bench.inference peer`)")
