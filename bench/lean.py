"""The lean decode (`optimum_owl.inference.generate`: static KV cache, compiled decode step) in the benchmarks: its
decode rate, and where its token's time goes (the `breakdown` mode's lean rows and the `peer` mode of
bench/inference.py).

Inside a compiled graph forward hooks cannot time the linears, so `weight_ms` times the same kernels the graph calls
(`owl::sparse_decode` / `owl::sparse_decode_q8` for sparse layers, `torch.mm` for dense ones, the LM head's own
forward), one token each, back to back over every block linear and then the head, outside the model; each call's
Python cost, measured on a one-row layer, is subtracted. The rest of a lean token is its time minus those.

    python -m bench.lean --model tiny      # smoke test: eager generate vs lean, and the lean breakdown
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from optimum_owl.inference import SparseLinear, generate


class _Clock:
    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def lean_rate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor, float]:
    """(decode tokens/s excluding the first token, the sequences, compile seconds spent in this call) of the lean
    decode; exactly `new_tokens` new tokens (no end-of-sequence stop)."""
    clock = _Clock()
    out = generate(model, prompt, new_tokens, eos_token_id=[], streamer=clock, return_dict=True)
    end = time.perf_counter()
    if not out.compiled:
        print(f"lean decode ran eagerly: {out.fallback_reason}", flush=True)
    return (new_tokens - 1) / (end - clock.times[1] - out.compile_seconds), out.sequences, out.compile_seconds


def _kernel_call(module: nn.Module, x: torch.Tensor):
    """A no-argument callable running what a compiled graph runs for `module` on one token `x`."""
    if isinstance(module, SparseLinear) and module.values.dtype == torch.int8:
        group = 0 if module.group_size is None else module.group_size // 64
        bias = None if module.bias is None else module.bias.float()
        return lambda: torch.ops.owl.sparse_decode_q8(x, module.mask, module.values, module.offsets, module.scales,
                                                      group, bias)
    if isinstance(module, SparseLinear):
        bias = None if module.bias is None else module.bias.float()
        return lambda: torch.ops.owl.sparse_decode(x, module.mask, module.values, module.offsets, bias)
    if isinstance(module, nn.Linear):
        weight_t = module.weight.t()
        return lambda: torch.mm(x.view(1, -1), weight_t)
    return lambda: module(x)  # a GPT-2 Conv1D, an int8 head: its own forward


def _inputs(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    features = getattr(module, "in_features", None) or module.weight.shape[0]  # Conv1D: weight [in, out]
    return torch.randn(1, 1, features).to(dtype)


def weight_ms(model: nn.Module, names: list[str], dtype: torch.dtype, repeats: int = 5) -> dict[str, float]:
    """ms per token in the block linears and in the LM head (module docstring), best of `repeats`."""
    from optimum_owl.inference.ops import available

    available()
    blocks = [_kernel_call(m, _inputs(m, dtype)) for m in (model.get_submodule(n) for n in names)]
    head_module = model.get_output_embeddings()
    head = _kernel_call(head_module, _inputs(head_module, dtype))
    tiny = nn.Linear(64, 1, bias=False).to(dtype)
    call = _kernel_call(tiny, torch.randn(1, 1, 64).to(dtype))
    best = {"block_linears": float("inf"), "head": float("inf"), "call": float("inf")}
    with torch.inference_mode():
        for _ in range(repeats):
            for key, calls in (("block_linears", blocks), ("head", [head]), ("call", [call] * len(blocks))):
                start = time.perf_counter()
                for f in calls:
                    f()
                best[key] = min(best[key], time.perf_counter() - start)
    per_call = best.pop("call") / len(blocks)
    return {"block_linears": (best["block_linears"] - len(blocks) * per_call) * 1e3,
            "head": (best["head"] - per_call) * 1e3, "python_per_call_us": per_call * 1e6}


def lean_breakdown(model: nn.Module, names: list[str], prompt: torch.Tensor, new_tokens: int,
                   repeats: int = 3) -> dict[str, float]:
    """ms per decoded token of the lean decode: the token, the weights (`weight_ms`) and the rest."""
    lean_rate(model, prompt, 3)  # compile (or reuse) before timing
    token = min(1e3 / lean_rate(model, prompt, new_tokens)[0] for _ in range(repeats))
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    ms = weight_ms(model, names, dtype)
    return {"token": token, "block_linears": ms["block_linears"], "head": ms["head"],
            "rest": token - ms["block_linears"] - ms["head"], "python_per_call_us": ms["python_per_call_us"]}


def main() -> None:
    from bench.inference import MODELS, block_linears, build_model, sparse_variants, time_decode

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["llama09b", "smollm2", "tiny"], default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.7)
    args = parser.parse_args()
    assert args.model in MODELS or args.model == "smollm2"
    torch.set_num_threads(args.threads)
    dense32 = build_model(args.model)
    names = block_linears(dense32)
    dense16 = dense32.to(torch.bfloat16)
    sparse = sparse_variants(dense16, dense16, names, args.sparsity, ("sparse_bf16",))["sparse_bf16"]
    prompt = torch.randint(3, dense16.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    for name, model in (("dense_bf16", dense16), ("sparse_bf16", sparse)):
        time_decode(model, prompt, 3)
        eager = 1e3 / time_decode(model, prompt, args.new_tokens)[0]
        print(json.dumps({name: {"eager_token_ms": eager, "lean": lean_breakdown(model, names, prompt,
                                                                                  args.new_tokens)}}), flush=True)


if __name__ == "__main__":
    main()
