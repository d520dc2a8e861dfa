"""What the benchmarks share: asset paths, model builders, the peak-RSS definition, the NLL of token windows and the
CPU's description.

Run every benchmark from the repository root as a module, `python -m bench.<name>` (probes:
`python -m bench.probes.<name>`). torch and transformers are imported inside the functions, so that a process that
only starts others (bench/memory.py's parent) stays small.
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ASSETS = ROOT.parent / "shared" / "assets"  # ../shared/assets/README.md
STORIES = ASSETS / "models" / "stories260K"
SMOL_DIR = ASSETS / "models" / "smollm2-135m"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = ASSETS / "text" / "wikitext2_test.jsonl"
WIKI_VAL = ASSETS / "text" / "wikitext2_validation.jsonl"  # `auto` may choose on it (tables report on test)
C4 = ASSETS / "text" / "c4_train_first1000.jsonl"


# ------------------------------------------------------------------------------------------------- model builders
def random_llama(hidden: int, intermediate: int, layers: int, heads: int, vocab: int, *, kv_heads: int | None = None,
                 max_positions: int = 2048, seed: int = 0, **config) -> nn.Module:
    """A randomly initialised float32 Llama in eval mode, untied LM head unless `config` says otherwise.

    The weights depend only on the shapes and `seed` (not on `max_positions` or token ids passed in `config`), so
    every benchmark that names the same shapes gets the same model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads, vocab_size=vocab,
                      max_position_embeddings=max_positions, **{"tie_word_embeddings": False, **config})
    return LlamaForCausalLM(cfg).to(torch.float32).eval()


def smollm2(with_tokenizer: bool = False):
    """SmolLM2-135M-Instruct from the shared GGUF file, de-quantised to plain float32 weights (about 20 s); with
    `with_tokenizer`, `(model, tokenizer)`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(SMOL_DIR), gguf_file=SMOL_GGUF, dtype=torch.float32)
    del model.config.quantization_config  # plain float weights from here on
    model.hf_quantizer = None
    model.eval()
    if not with_tokenizer:
        return model
    return model, AutoTokenizer.from_pretrained(str(SMOL_DIR), gguf_file=SMOL_GGUF)


def real_model(name: str, workdir: Path):
    """`(model, tokenizer)` of a shared real model in float32, eval mode: "stories260K", or "smollm2", converted from
    its GGUF file into `workdir` on first use and read from there afterwards."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "stories260K":
        return AutoModelForCausalLM.from_pretrained(str(STORIES)).eval(), AutoTokenizer.from_pretrained(str(STORIES))
    if name != "smollm2":
        raise ValueError(f"unknown real model {name!r}; use 'stories260K' or 'smollm2'")
    converted = workdir / "smollm2-135m"
    if not (converted / "config.json").exists():
        start = time.perf_counter()
        model, tok = smollm2(with_tokenizer=True)
        tmp = workdir / "smollm2-135m.tmp"
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, converted)
        print(f"converted the GGUF file in {time.perf_counter() - start:.1f} s", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(converted))


# ------------------------------------------------------------------------------------------------------- memory
def proc_status(keys: tuple[str, ...] = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")) -> dict[str, int]:
    """Fields of /proc/self/status in bytes (Linux): VmHWM (peak resident set), VmRSS, and the RssAnon / RssFile
    (mapped files, e.g. safetensors mmaps) / RssShmem split."""
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in keys:
                out[key] = int(value.split()[0]) * 1024
    missing = set(keys) - set(out)
    if missing:
        raise RuntimeError(f"/proc/self/status has no {sorted(missing)} (Linux only)")
    return out


def peak_rss_bytes() -> int:
    """The peak RSS of every benchmark: `VmHWM`, the kernel's high-water mark of this process's resident set
    (anonymous memory and mapped file pages), since the process started or since bench/probes/memory_probe.py last
    reset it. Not `ru_maxrss`, which a child started by fork + exec inherits from its parent's size at fork time."""
    return proc_status(("VmHWM",))["VmHWM"]


# ---------------------------------------------------------------------------------------------------- evaluation
def mean_nll(model: nn.Module, windows: torch.LongTensor, batch_size: int = 16) -> float:
    """Mean next-token NLL (nats) over every predicted token of the rows of `windows` ([n, length] token ids), each
    row one window: `optimum_owl.evaluation.perplexity_of_ids`, the library's evaluation loop, on the rows laid end
    to end."""
    from optimum_owl.evaluation import perplexity_of_ids

    return math.log(perplexity_of_ids(model, windows.reshape(-1), windows.shape[1], batch_size))


# ------------------------------------------------------------------------------------------------------ machine
def cpu_info() -> dict[str, str]:
    """The first CPU's fields of /proc/cpuinfo ("model name", "cpu family", "model", "flags", ...; empty where the
    file cannot be read). A virtualised "AMD EPYC" may be a Zen 3 or a Zen 4: family and model tell them apart."""
    try:
        first = open("/proc/cpuinfo").read().split("\n\n")[0]
    except OSError:
        return {}
    info = {}
    for line in first.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def machine_summary() -> str:
    """One line: CPU, family/model, vector extensions, cores (SparseGPT's results depend on the float summation
    order, so they are only comparable on the same kind of CPU)."""
    info = cpu_info()
    flags = set(info.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{info.get('model name', platform.processor())} (family {info.get('cpu family', '?')} model "
            f"{info.get('model', '?')}, {isa}), {os.cpu_count()} cores, no GPU")
