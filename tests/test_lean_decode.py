"""Lean decode (`optimum_owl.inference.generate`: static KV cache, compiled decode step) and the kernel's torch
operators (`inference/ops.py`, `csrc/ops.cpp`).

Compiling a model takes seconds to tens of seconds (inductor and its C++ compiler; torch caches the result on disk),
so one compiled model is a fast test and the grid (architectures x value forms) is marked slow.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from optimum_owl.inference import SparseLinear, generate, sparsify
from optimum_owl.inference import decode as decode_mod
from optimum_owl.inference.kernel import kernel

from .conftest import ASSETS, tiny_model

STORIES = ASSETS / "models" / "stories260K"
needs_kernel = pytest.mark.skipif(kernel() is None, reason="the C++ kernel (and its torch operators) is unavailable")
needs_compile = pytest.mark.skipif(decode_mod.compile_unavailable() is not None,
                                   reason=f"torch.compile unavailable: {decode_mod.compile_unavailable()}")


def _prune(model: nn.Module, fraction: float = 0.6, seed: int = 5) -> nn.Module:
    """Zero `fraction` of every block linear's weights (the model's own linears: attention and MLP)."""
    from optimum_owl.formats import compressible_names

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in compressible_names(model):
            w = model.get_parameter(name)
            w[torch.rand(w.shape, generator=g) < fraction] = 0
    return model


def _model(arch: str, form: str) -> nn.Module:
    """A tiny model (`arch`: stories260K, the real tiny Llama, or a random llama / qwen2 / gpt2) in `form`: dense
    float32, or pruned and sparsified with float32, bfloat16 or int8 values."""
    if arch == "stories260K":
        if not STORIES.is_dir():
            pytest.skip(f"shared assets not found at {STORIES}")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(STORIES)).eval()
    else:
        model = tiny_model(arch, layers=2, vocab=128)
    if form == "dense":
        return model
    _prune(model)
    if form == "sparse_bf16":
        model = model.to(torch.bfloat16)
    return sparsify(model, min_sparsity=0.5, values="int8" if form == "sparse_int8" else "float")


def _prompt(model: nn.Module, batch: int = 1, length: int = 7) -> torch.LongTensor:
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(3))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _check_compiled_matches_eager(arch: str, form: str, new_tokens: int = 12) -> None:
    model = _model(arch, form)
    ids = _prompt(model)
    eager = generate(model, ids, new_tokens, compile=False, eos_token_id=[], output_logits=True)
    compiled = generate(model, ids, new_tokens, eos_token_id=[], output_logits=True)
    assert compiled.compiled, compiled.fallback_reason
    assert not eager.compiled and eager.fallback_reason is None
    assert torch.equal(compiled.sequences, eager.sequences)
    assert _relative(compiled.logits, eager.logits) <= 1e-5
    with torch.inference_mode():  # and the tokens transformers' own greedy generate gives
        reference = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
    assert torch.equal(compiled.sequences, reference)
    again = generate(model, ids, new_tokens, eos_token_id=[], return_dict=True)  # the compiled graph is reused
    assert again.compiled and again.compile_seconds == 0.0 and torch.equal(again.sequences, eager.sequences)


# --------------------------------------------------------------------------------------------- compiled decode
@needs_kernel
@needs_compile
def test_compiled_decode_matches_eager_on_sparse_stories260k():
    _check_compiled_matches_eager("stories260K", "sparse_fp32")


@pytest.mark.slow
@needs_kernel
@needs_compile
@pytest.mark.parametrize("form", ["dense", "sparse_fp32", "sparse_bf16", "sparse_int8"])
@pytest.mark.parametrize("arch", ["stories260K", "llama", "qwen2", "gpt2"])
def test_compiled_decode_matches_eager(arch, form):
    _check_compiled_matches_eager(arch, form)


# ------------------------------------------------------------------------------------------------ eager loop
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_eager_lean_loop_gives_model_generate_tokens(arch):
    model = _model(arch, "sparse_fp32" if kernel() is not None else "dense")
    ids = _prompt(model, batch=2)
    out = generate(model, ids, 10, compile=False, eos_token_id=[])
    with torch.inference_mode():
        reference = model.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
    assert torch.equal(out, reference)


def test_end_of_sequence_stops_and_pads_like_model_generate():
    model = tiny_model("llama", layers=2, vocab=128)
    ids = _prompt(model, batch=2)
    free = generate(model, ids, 10, compile=False, eos_token_id=[])
    eos = int(free[0, ids.shape[1] + 2])  # row 0 stops at its third new token
    out = generate(model, ids, 10, compile=False, eos_token_id=eos, pad_token_id=0)
    with torch.inference_mode():
        reference = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, reference)


def test_streamer_gets_the_prompt_then_each_token():
    model = tiny_model("llama", layers=2, vocab=128)
    ids = _prompt(model)
    seen = []

    class Streamer:
        def put(self, value):
            seen.append(value.clone())

        def end(self):
            seen.append("end")

    out = generate(model, ids, 5, compile=False, eos_token_id=[], streamer=Streamer())
    assert torch.equal(seen[0], ids) and seen[-1] == "end"
    assert torch.equal(torch.stack(seen[1:-1], 1), out[:, ids.shape[1]:])


def test_bad_arguments_are_refused_naming_the_fix():
    model = tiny_model("llama", layers=2, vocab=128)
    ids = _prompt(model)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, 0)
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, ids[0], 4)
    with pytest.raises(ValueError, match="model.generate for a padded batch"):
        generate(model, ids, 4, attention_mask=torch.tensor([[0] + [1] * (ids.shape[1] - 1)]))
    with pytest.raises(TypeError, match="causal LM"):
        generate(nn.Linear(2, 2), ids, 4)


# ------------------------------------------------------------------------------------------------- fallback
def test_no_compiler_decodes_eagerly_with_the_reason(monkeypatch, caplog):
    model = tiny_model("llama", layers=2, vocab=128)
    ids = _prompt(model)
    monkeypatch.setattr(decode_mod, "compile_unavailable", lambda: "no C++ compiler for inductor (test)")
    with caplog.at_level(logging.WARNING, logger="optimum_owl.inference.decode"):
        out = generate(model, ids, 6, eos_token_id=[], return_dict=True)
    assert not out.compiled and out.fallback_reason == "no C++ compiler for inductor (test)"
    assert "no C++ compiler for inductor (test); decoding eagerly" in caplog.text
    assert torch.equal(out.sequences, generate(model, ids, 6, compile=False, eos_token_id=[]))


def test_a_failing_compile_falls_back_to_eager_and_logs_why(monkeypatch, caplog):
    model = tiny_model("llama", layers=2, vocab=128)
    ids = _prompt(model)

    def broken_compile(fn, **kwargs):
        def step(*args):
            raise RuntimeError("C++ compile failed: no such compiler")

        return step

    monkeypatch.setattr(decode_mod, "compile_unavailable", lambda: None)
    monkeypatch.setattr(decode_mod.torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="optimum_owl.inference.decode"):
        out = generate(model, ids, 6, eos_token_id=[], return_dict=True)
    assert not out.compiled and "no such compiler" in out.fallback_reason
    assert "decoding eagerly" in caplog.text and "no such compiler" in caplog.text
    assert torch.equal(out.sequences, generate(model, ids, 6, compile=False, eos_token_id=[]))


def test_deepcopy_of_a_decoded_model_starts_without_compiled_state():
    model = tiny_model("llama", layers=2, vocab=128)
    generate(model, _prompt(model), 3, compile=False)
    assert model.__dict__["_owl_lean_decoder"].entries
    assert copy.deepcopy(model).__dict__.get("_owl_lean_decoder") is None


# ------------------------------------------------------------------------------------------------ operators
def _sparse(out: int, inp: int, dtype: torch.dtype, bias: bool, values: str = "float") -> SparseLinear:
    g = torch.Generator().manual_seed(out * 7 + inp)
    lin = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=g))
        lin.weight[torch.rand(out, inp, generator=g) < 0.7] = 0
    return SparseLinear.from_dense(lin.to(dtype), values=values)


@needs_kernel
@pytest.mark.parametrize("values", ["float32", "bfloat16", "int8"])
def test_operators_pass_opcheck(values):
    from optimum_owl.inference.ops import available

    assert available()
    dtype = torch.bfloat16 if values == "bfloat16" else torch.float32
    layer = _sparse(37, 100, dtype, bias=True, values="int8" if values == "int8" else "float")
    bias = layer.bias.float()
    for x in (torch.randn(3, 100).to(dtype), torch.randn(2, 1, 100).to(dtype)):
        if values == "int8":
            args = (x, layer.mask, layer.values, layer.offsets, layer.scales, 0, bias)
            torch.library.opcheck(torch.ops.owl.sparse_decode_q8.default, args)
            torch.library.opcheck(torch.ops.owl.sparse_decode_q8.default, args[:-1] + (None,))
        else:
            torch.library.opcheck(torch.ops.owl.sparse_decode.default, (x, layer.mask, layer.values, layer.offsets, bias))
            torch.library.opcheck(torch.ops.owl.sparse_decode.default, (x, layer.mask, layer.values, layer.offsets, None))
    if values == "int8":
        torch.library.opcheck(torch.ops.owl.sparse_expand_q8.default,
                              (layer.mask, layer.values, layer.offsets, layer.scales, 0, 2, 9, torch.bfloat16))
    else:
        torch.library.opcheck(torch.ops.owl.sparse_expand.default,
                              (layer.mask, layer.values, layer.offsets, 2, 9, torch.float32))


@needs_kernel
def test_operators_give_the_modules_eager_results():
    from optimum_owl.inference.ops import available

    available()
    for dtype, values in ((torch.float32, "float"), (torch.bfloat16, "float"), (torch.bfloat16, "int8")):
        layer = _sparse(70, 300, dtype, bias=True, values=values)
        x = torch.randn(1, 2, 300).to(dtype)
        bias = layer.bias.float()
        with torch.inference_mode():
            eager = layer(x)
            if values == "int8":
                op = torch.ops.owl.sparse_decode_q8(x, layer.mask, layer.values, layer.offsets, layer.scales, 0, bias)
            else:
                op = torch.ops.owl.sparse_decode(x, layer.mask, layer.values, layer.offsets, bias)
        assert op.dtype == x.dtype and op.shape == (1, 2, 70) and torch.equal(op, eager)
    with pytest.raises(RuntimeError, match="int8 codes: use owl::sparse_decode_q8"):
        torch.ops.owl.sparse_decode(torch.randn(1, 1, 300), layer.mask, layer.values, layer.offsets, None)
    layer = _sparse(70, 300, torch.float32, bias=False)
    with pytest.raises(RuntimeError, match="x has 200 features; the weight takes 257 to 320"):
        torch.ops.owl.sparse_decode(torch.randn(1, 1, 200), layer.mask, layer.values, layer.offsets, None)


@needs_kernel
@needs_compile
def test_a_compiled_sparse_linear_keeps_the_kernel_and_its_results():
    """Decode (1-3 tokens) and prefill (20 tokens) shapes, float32 and bfloat16 values: the compiled graph holds the
    owl operators (fullgraph: no break) and gives the eager module's bits."""
    for dtype in (torch.float32, torch.bfloat16):
        layer = _sparse(37, 100, dtype, bias=True)
        compiled = torch.compile(lambda x, layer=layer: layer(x) * 2, fullgraph=True, dynamic=False)
        for n in (1, 3, 20):
            x = torch.randn(2, n, 100).to(dtype)
            with torch.inference_mode():
                assert torch.equal(compiled(x), layer(x) * 2)


# ------------------------------------------------------------------------------------------------------ CLI
@needs_kernel
@needs_compile
def test_cli_generate_compiles_by_default_and_no_compile_uses_model_generate(monkeypatch, capsys):
    from optimum_owl.cli import main

    if not STORIES.is_dir():
        pytest.skip(f"shared assets not found at {STORIES}")
    args = ["generate", str(STORIES), "--prompt", "Once upon a time", "--max-new-tokens", "8", "--threads", "1",
            "--min-sparsity", "0"]
    monkeypatch.setenv("OPTIMUM_OWL_COMPILE", "1")  # tests/conftest.py turns the CLI's default off for other tests
    assert main(args) == 0
    compiled = capsys.readouterr().out
    assert main([*args, "--no-compile"]) == 0
    eager = capsys.readouterr().out
    assert "tokens/s (compiled)" in compiled and "(once; not in the decode rate)" in compiled
    assert "tokens/s (model.generate)" in eager and "compile" not in eager.splitlines()[-1]
    text = [line for line in compiled.splitlines() if line.startswith("Once upon a time")]
    assert text and text == [line for line in eager.splitlines() if line.startswith("Once upon a time")]
