"""Sparse CPU inference: kernel vs dense matmul, pure path vs kernel, sparsify/densify round trip, generation,
compact save and sparse loading, fallback when the kernel cannot be built."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from optimum_owl.formats.bitmask import compress
from optimum_owl.inference import SparseLinear, densify, sparsify
from optimum_owl.inference import isa as isa_mod
from optimum_owl.inference import kernel as kernel_mod
from optimum_owl.inference.format import from_checkpoint_parts, pack_dense, to_checkpoint_parts, unpack_dense

from .conftest import ARCH_KWARGS, tiny_model

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (out, in): in_features not a multiple of 8 / 16 / 32 / 64, tiny and wide rows
SHAPES = [(37, 100), (64, 64), (5, 1), (33, 130), (19, 257), (48, 24), (3, 7), (70, 200)]
BATCHES = [1, 2, 3, 4, 5, 8, 11, 12, 13, 31, 64]

needs_kernel = pytest.mark.skipif(kernel_mod.kernel() is None, reason="C++ kernel unavailable on this machine")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def _sparse_weight(out: int, inp: int, sparsity: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    w[torch.rand(out, inp, generator=g) < sparsity] = 0
    if out > 2:
        w[0] = 0  # an empty row
        w[1] = torch.randn(inp, generator=g)  # a fully dense row
    if out > 3 and inp > 2:
        w[2, 1] = -0.0  # kept: stored by bit pattern
    return w.to(dtype)


def _linear(out, inp, sparsity, seed, dtype, bias=True) -> nn.Linear:
    lin = nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(_sparse_weight(out, inp, sparsity, seed))
        if bias:
            lin.bias.normal_()
    return lin.to(dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_and_checkpoint_parts_are_bit_identical(shape, dtype):
    w = _sparse_weight(*shape, 0.7, seed=3, dtype=dtype)
    for transposed, dense in ((False, w), (True, w.t().contiguous())):
        packed = pack_dense(dense, transposed=transposed)
        assert packed.nnz == int(torch.count_nonzero(w.view(BITS[dtype])))
        assert packed.mask.shape == (shape[0], 8 * math.ceil(shape[1] / 64))
        assert _same_bits(unpack_dense(packed, transposed), dense)
        values, bitmask, dims = to_checkpoint_parts(packed, transposed)
        ref = compress(dense)
        assert _same_bits(values, ref[0]) and torch.equal(bitmask, ref[1]) and torch.equal(dims, ref[2])
        again = from_checkpoint_parts(values, bitmask, dims.tolist(), transposed, "w")
        assert torch.equal(again.mask, packed.mask) and torch.equal(again.offsets, packed.offsets)
        assert _same_bits(again.values, packed.values)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_dense_matmul(dtype, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, (out, inp) in enumerate(SHAPES):
            for bias in (True, False):
                lin = _linear(out, inp, 0.7 if i % 2 else 0.5, seed=i, dtype=dtype, bias=bias)
                sparse = SparseLinear.from_dense(lin)
                w64 = lin.weight.double()
                for n in BATCHES:
                    x = torch.randn(n, inp).to(dtype)
                    ref = x.double() @ w64.t() + (lin.bias.double() if bias else 0)
                    with torch.no_grad():
                        y = sparse(x)
                        pure = sparse._forward_pure(x).to(dtype)
                    assert y.dtype == dtype and y.shape == (n, out)
                    # fp32 accumulation; bf16/fp16 outputs are rounded once at the end
                    tol = 1e-4 * math.sqrt(inp) if dtype == torch.float32 else 1e-2 * (1 + ref.abs().max().item())
                    assert (y.double() - ref).abs().max().item() <= tol, (out, inp, n, bias)
                    assert (y.double() - pure.double()).abs().max().item() <= tol, (out, inp, n, bias)
    finally:
        torch.set_num_threads(previous)


@needs_kernel
def test_kernel_decode_and_prefill_paths_agree_and_thread_count_does_not_change_results():
    lin = _linear(300, 200, 0.7, seed=9, dtype=torch.float32)
    sparse = SparseLinear.from_dense(lin)
    ops = kernel_mod.kernel()
    x = torch.randn(20, 200)
    xp = torch.nn.functional.pad(x, (0, 256 - 200)).contiguous()
    decode = ops.decode(xp, sparse.mask, sparse.values, sparse.offsets, lin.bias.detach())
    prefill = ops.prefill(xp, sparse.mask, sparse.values, sparse.offsets, lin.bias.detach(), 200, 16)
    torch.testing.assert_close(decode, prefill, rtol=1e-5, atol=1e-5)
    assert prefill.is_contiguous()
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.decode(xp, sparse.mask, sparse.values, sparse.offsets, None)
        torch.set_num_threads(2)
        two = ops.decode(xp, sparse.mask, sparse.values, sparse.offsets, None)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)  # rows are split across threads, each row's sum order is fixed


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_expand_into_a_tile_of_the_values_dtype_copies_their_bits(dtype):
    w = _sparse_weight(70, 200, 0.7, seed=4, dtype=dtype)
    packed = pack_dense(w)
    ops = kernel_mod.kernel()
    tile = torch.full((32, 256), float("nan"), dtype=dtype)
    for r0 in range(0, 70, 32):
        r1 = min(70, r0 + 32)
        ops.expand(packed.mask, packed.values, packed.offsets, r0, r1, tile)
        assert _same_bits(tile[: r1 - r0, :200], w[r0:r1])
        assert not tile[: r1 - r0, 200:].view(BITS[dtype]).any()  # the padding columns are zero
    with pytest.raises(ValueError, match="bad tile"):
        ops.expand(packed.mask, packed.values, packed.offsets, 0, 8, torch.empty(8, 256, dtype=torch.float64))


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_prefill_with_the_bf16_gemm_matches_dense_bf16_linear(bias, monkeypatch):
    # bf16 activations and values: tiles stay bf16 and torch's bf16 GEMM (float32 accumulation, one rounding) runs
    # on them, as in the dense bf16 layer; below `bf16_crossover` tokens the decode kernel runs instead
    lin = _linear(300, 200, 0.7, seed=5, dtype=torch.bfloat16, bias=bias)
    sparse = SparseLinear.from_dense(lin)
    monkeypatch.setattr(sparse, "_tile_rows", 64)  # several tiles
    x = torch.randn(3, 40, 200).to(torch.bfloat16)
    ref64 = x.double() @ lin.weight.double().t() + (lin.bias.double() if bias else 0)
    calls = []
    original = kernel_mod.KernelOps.prefill
    monkeypatch.setattr(kernel_mod.KernelOps, "prefill", lambda self, xx, *a: calls.append(xx.dtype) or original(self, xx, *a))
    with torch.no_grad():
        dense = lin(x)
        sparse.bf16_gemm = True
        gemm = sparse(x)
        sparse.bf16_gemm = False
        fp32 = sparse(x)
        sparse.bf16_gemm = True
        few = sparse(x[0, : sparse.bf16_crossover - 1])
    assert calls == [torch.bfloat16, torch.float32]  # the last call took the decode path
    assert gemm.dtype == torch.bfloat16 and gemm.shape == (3, 40, 300)
    assert gemm.is_contiguous() and fp32.is_contiguous()  # row-major like F.linear's (a transposed view slows later ops)
    # bf16 rounding: at most half an ulp each for the output and for a bias added in bf16 (plus float32 sums)
    tol = 2.0**-7 * ref64.abs() + 1e-4
    assert ((gemm.double() - ref64).abs() <= tol).all()
    assert ((gemm.double() - dense.double()).abs() <= tol).all()
    assert ((fp32.double() - ref64).abs() <= tol).all()
    assert few.shape == (sparse.bf16_crossover - 1, 300)
    assert ((few.double() - ref64[0, : len(few)]).abs() <= tol[0, : len(few)]).all()
    ops = kernel_mod.kernel()
    with pytest.raises(ValueError, match="bfloat16 values"):
        ops.prefill(x[0].contiguous(), sparse.mask, sparse.values.float(), sparse.offsets, None, 200, 64)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_takes_activations_in_their_dtype_and_rounds_like_torch(dtype):
    # the kernel widens and pads bf16/fp16/odd-width activations itself and writes its output in their dtype: the
    # result must be bit for bit the float32 kernel result on the padded float32 input, rounded by torch's `.to()`
    ops = kernel_mod.kernel()
    for out, inp in SHAPES:
        lin = _linear(out, inp, 0.7, seed=out, dtype=dtype)
        sparse = SparseLinear.from_dense(lin)
        x = torch.randn(3, 2 * inp).to(dtype)[:, ::2]  # not contiguous
        with torch.no_grad():
            y = sparse(x)
        xp = torch.nn.functional.pad(x.float(), (0, sparse.mask.shape[1] * 8 - inp)).contiguous()
        ref = ops.decode(xp, sparse.mask, sparse.values, sparse.offsets, lin.bias.detach().float())
        assert _same_bits(y, ref.to(dtype)), (out, inp)
    if dtype == torch.float32:
        return
    # exact ties: 1 + ulp/2 rounds down to even 1.0, 1 + 3 ulp/2 up to 1 + 2 ulp (truncation or half-up would differ)
    h = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    w = torch.tensor([[1.0, h, 0.0], [1.0, 3 * h, 0.0], [-1.0, -h, 0.0], [-1.0, -3 * h, 0.0]])
    lin = nn.Linear(3, 4, bias=False).to(dtype)
    lin.weight.data = w.to(dtype)
    expected = torch.tensor([1.0, 1.0 + 4 * h, -1.0, -1.0 - 4 * h])
    y = SparseLinear.from_dense(lin)(torch.tensor([[1.0, 1.0, 0.0]], dtype=dtype))
    assert _same_bits(y[0], expected.to(dtype)) and _same_bits(y[0], (w.sum(1)).to(dtype))


@needs_kernel
def test_kernel_error_codes_become_clear_errors():
    ops = kernel_mod.kernel()
    sparse = SparseLinear.from_dense(_linear(8, 70, 0.5, seed=1, dtype=torch.float32))
    x, y = torch.randn(1, 200), torch.empty(1, 8)
    common = (sparse.mask.data_ptr(), 8, sparse.mask.shape[1] // 8, sparse.values.data_ptr())
    # 200 inputs for a 70-input weight (two 64-bit words per row hold at most 128)
    rc = ops.lib.owl_decode(x.data_ptr(), 0, 1, 200, *common, 0, sparse.offsets.data_ptr(), None, y.data_ptr())
    assert rc == 3
    with pytest.raises(RuntimeError, match="owl_decode failed: activations of an unsupported dtype or width"):
        kernel_mod.check_rc("owl_decode", rc)
    rc = ops.lib.owl_decode(x.data_ptr(), 0, 1, 70, *common, 7, sparse.offsets.data_ptr(), None, y.data_ptr())
    assert rc == 1
    with pytest.raises(ValueError, match="in in \\(64, 128\\]"):
        ops.decode(x, sparse.mask, sparse.values, sparse.offsets, None)


# ------------------------------------------------------------------------------------------------- AVX-512 path
EMULATION = Path(__file__).parent / "csrc" / "avx512_emulated.h"


@pytest.fixture(scope="module")
def emulated_ops(tmp_path_factory):
    """The kernel built with its AVX-512 intrinsics emulated in plain C++ (tests/csrc/avx512_emulated.h), so that the
    AVX-512 path's code runs, lane by lane, on a CPU that only has AVX2."""
    if kernel_mod.kernel() is None:
        pytest.skip("C++ kernel unavailable on this machine")
    folder = tmp_path_factory.mktemp("owl_avx512_emulated")
    ops = kernel_mod.load_ops(kernel_mod.SOURCE, folder, "owl_avx512_emulated", ["-include", str(EMULATION)])
    yield ops
    for dtype in DTYPES + [torch.int8]:
        ops.set_isa(dtype, "avx2")


def _avx512_matches_avx2(ops, threads: int) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i, (out, inp) in enumerate(SHAPES + [(130, 1000), (40, 640)]):
            for dtype in DTYPES:
                lin = _linear(out, inp, (0.5, 0.7, 0.9)[i % 3], seed=i, dtype=dtype, bias=i % 2 == 0)
                sparse = SparseLinear.from_dense(lin)
                bias = None if lin.bias is None else lin.bias.detach().float()
                for n in [b for b in BATCHES if b < SparseLinear.crossover]:
                    for xdtype in (torch.float32, dtype):
                        x = torch.randn(n, inp).to(xdtype)
                        ys = []
                        for isa in ("avx2", "avx512"):
                            ops.set_isa(dtype, isa)
                            ys.append(ops.decode(x, sparse.mask, sparse.values, sparse.offsets, bias))
                        ops.set_isa(dtype, "avx2")
                        assert _same_bits(*ys), (out, inp, dtype, n, xdtype)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
def test_avx512_path_gives_the_avx2_bits_in_an_emulated_build(emulated_ops, threads):
    # every group size (4, 3, 2, 1 tokens), widths that are not multiples of 16 or 64, empty / dense rows, bias,
    # float32 / bf16 / fp16 values and activations: the AVX-512 path sums in the AVX2 path's order
    assert emulated_ops.avx512_supported
    _avx512_matches_avx2(emulated_ops, threads)
    for dtype in DTYPES:
        assert isa_mod.paths_agree(emulated_ops, dtype)
        assert emulated_ops.isa(dtype) == "avx2"  # the check leaves the default in place


@needs_kernel
@pytest.mark.skipif(not (kernel_mod.kernel() and kernel_mod.kernel().avx512_supported), reason="no AVX-512F here")
def test_avx512_path_gives_the_avx2_bits_on_this_cpu():
    _avx512_matches_avx2(kernel_mod.kernel(), threads=2)


def test_choose_isa_checks_times_and_honours_the_environment(emulated_ops, monkeypatch, caplog):
    ops = emulated_ops
    timed: list[str] = []

    def fake_time(ops_, dtype, isa, layer, rounds=7):  # AVX-512 faster for float32 only
        timed.append(isa)
        return 1.0 if isa == "avx2" or dtype != torch.float32 else 0.5

    monkeypatch.setattr(isa_mod, "best_time", fake_time)
    with caplog.at_level(logging.INFO, logger="optimum_owl.inference.isa"):
        monkeypatch.setenv("OPTIMUM_OWL_KERNEL_ISA", "auto")
        assert isa_mod.choose_isa(ops) == {"float32": "avx512", "bfloat16": "avx2", "float16": "avx2", "int8": "avx2"}
        assert [ops.isa(d) for d in DTYPES] == ["avx512", "avx2", "avx2"] and "avx512" in timed
        assert "AVX-512 decode (checked against AVX2) for float32 (AVX-512 speed vs AVX2: float32 2.00x" in caplog.text

        timed.clear()
        monkeypatch.setenv("OPTIMUM_OWL_KERNEL_ISA", "avx512")  # forced: no timing, still checked
        monkeypatch.setattr(isa_mod, "paths_agree", lambda ops_, dtype: dtype != torch.bfloat16)
        assert isa_mod.choose_isa(ops) == {"float32": "avx512", "bfloat16": "avx2", "float16": "avx512",
                                           "int8": "avx512"}
        assert not timed and "different bfloat16 results from the AVX2 path" in caplog.text

        monkeypatch.setenv("OPTIMUM_OWL_KERNEL_ISA", "avx2")  # also undoes the previous choice
        assert set(isa_mod.choose_isa(ops).values()) == {"avx2"} and not timed
        assert [ops.isa(d) for d in DTYPES + [torch.int8]] == ["avx2"] * 4

        monkeypatch.setenv("OPTIMUM_OWL_KERNEL_ISA", "fastest")
        isa_mod.choose_isa(ops)
        assert "OPTIMUM_OWL_KERNEL_ISA='fastest' is not one of auto, avx2, avx512; using auto" in caplog.text
    for dtype in DTYPES + [torch.int8]:
        ops.set_isa(dtype, "avx2")
    with pytest.raises(ValueError, match="isa must be one of"):
        ops.set_isa(torch.float32, "neon")


@needs_kernel
def test_kernel_status_names_the_decode_path_and_avx512_needs_the_cpu(monkeypatch, caplog):
    ops = kernel_mod.kernel()
    status = kernel_mod.kernel_status()
    assert status["kernel"] and set(status["isa"]) == {"float32", "bfloat16", "float16", "int8"}
    assert status["isa"] == {str(d).removeprefix("torch."): ops.isa(d) for d in DTYPES + [torch.int8]}
    flags = kernel_mod._cpu_flags()
    if flags is not None:  # the kernel's own detection (CPUID + OS support) agrees with what Linux reports
        assert ops.avx512_supported == ("avx512f" in flags)
    if ops.avx512_supported:
        return
    assert set(status["isa"].values()) == {"avx2"}
    with pytest.raises(RuntimeError, match="owl_set_isa failed: AVX-512 asked for on a CPU without AVX-512F"):
        ops.set_isa(torch.float32, "avx512")
    monkeypatch.setenv("OPTIMUM_OWL_KERNEL_ISA", "avx512")
    with caplog.at_level(logging.WARNING, logger="optimum_owl.inference.isa"):
        assert set(isa_mod.choose_isa(ops).values()) == {"avx2"}
    assert "OPTIMUM_OWL_KERNEL_ISA=avx512, but this CPU has no AVX-512F; using AVX2" in caplog.text


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_path_follows_bias_changes_in_place_and_by_load_state_dict(dtype):
    # the decode path caches its kernel arguments (and a float32 copy of a bf16/fp16 bias): changing the bias in place,
    # or loading another state dict, must still be seen by the next call
    lin = _linear(40, 72, 0.7, seed=4, dtype=dtype)
    sparse = SparseLinear.from_dense(lin)
    x = torch.randn(1, 2, 72).to(dtype)
    before = sparse(x).float()
    torch.testing.assert_close(before, lin(x).float(), rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        sparse.bias.add_(1.0)
    after = sparse(x).float()
    torch.testing.assert_close(after - before, torch.ones_like(before), rtol=0, atol=0.1)  # stale bias: off by 1
    other = _linear(40, 72, 0.5, seed=5, dtype=dtype)
    sparse.load_state_dict(SparseLinear.from_dense(other).state_dict())
    torch.testing.assert_close(sparse(x).float(), other(x).float(), rtol=2e-2, atol=2e-2)


def test_pure_path_matches_dense_on_3d_inputs_and_gradients_use_it():
    lin = _linear(24, 40, 0.6, seed=1, dtype=torch.float32)
    sparse = SparseLinear.from_dense(lin)
    x = torch.randn(2, 3, 40, requires_grad=True)
    y = sparse(x)  # needs gradients -> pure path
    torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_fallback_without_compiler_logs_one_reason_and_stays_correct(monkeypatch, caplog):
    monkeypatch.setenv("CXX", "definitely-not-a-compiler")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(kernel_mod, "_ninja_module", lambda: False)
    kernel_mod._reset_for_tests()
    try:
        with caplog.at_level(logging.INFO, logger="optimum_owl.inference.kernel"):
            lin = _linear(16, 30, 0.7, seed=2, dtype=torch.float32)
            sparse = SparseLinear.from_dense(lin)
            with torch.no_grad():
                y1 = sparse(torch.randn(3, 30))
                sparse(torch.randn(1, 30))
        lines = [r.getMessage() for r in caplog.records if "pure-PyTorch path" in r.getMessage()]
        assert len(lines) == 1 and "no C++ compiler" in lines[0]
        assert kernel_mod.kernel_status() == {"kernel": False, "reason": lines[0].split("because ")[1][:-1], "isa": None}
        assert y1.shape == (3, 16)
    finally:
        kernel_mod._reset_for_tests()


def test_build_failure_falls_back(monkeypatch, caplog):
    def broken():
        raise RuntimeError("Error building extension 'owl_sparse'")

    monkeypatch.setattr(kernel_mod, "unavailable_reason", lambda: None)
    monkeypatch.setattr(kernel_mod, "_build", broken)
    kernel_mod._reset_for_tests()
    try:
        with caplog.at_level(logging.INFO, logger="optimum_owl.inference.kernel"):
            assert kernel_mod.kernel() is None
        assert any("building the C++ kernel failed" in r.getMessage() for r in caplog.records)
    finally:
        kernel_mod._reset_for_tests()


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setenv("OPTIMUM_OWL_DISABLE_KERNEL", "1")
    assert "OPTIMUM_OWL_DISABLE_KERNEL" in kernel_mod.unavailable_reason()
    monkeypatch.delenv("OPTIMUM_OWL_DISABLE_KERNEL")
    monkeypatch.setattr(kernel_mod.platform, "machine", lambda: "aarch64")
    assert "not x86-64" in kernel_mod.unavailable_reason()
    monkeypatch.setattr(kernel_mod.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(kernel_mod, "_cpu_flags", lambda: {"sse2", "avx", "fma", "popcnt", "f16c"})
    assert "lacks avx2" in kernel_mod.unavailable_reason()


# ------------------------------------------------------------------------------------------------- models
ARCHS = ["llama", "gpt2", "opt", "qwen2", "mistral", "gemma"]


def _tiny(arch: str, dtype=torch.float32, vocab: int = 96):
    if arch == "gemma":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model("gemma", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=3,
                                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    else:
        assert arch in ARCH_KWARGS
        model = tiny_model(arch, vocab=vocab)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in [n.removesuffix(".weight") for n, _ in model.named_parameters() if n.endswith(".weight")]:
            module = model.get_submodule(name)
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                w = module.weight
                w[torch.rand(w.shape, generator=g) < 0.7] = 0
    return model.to(dtype)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparsify_generates_identically_and_densify_is_bit_identical(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from optimum_owl.inference.loading import load_sparse

    model = _tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    dense_out = model.generate(ids, max_new_tokens=10, do_sample=False)
    dense_logits = model(ids).logits
    sparsify(model)
    sparse_modules = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert sparse_modules and all(m.sparsity > 0.5 for m in sparse_modules)
    assert model.get_output_embeddings().__class__ is not SparseLinear
    torch.testing.assert_close(model(ids).logits, dense_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), dense_out)

    model.save_pretrained(tmp_path)  # compact format, straight from the sparse form
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    reloaded_sd = reloaded.state_dict()
    assert all(_same_bits(v, reloaded_sd[k]) for k, v in before.items() if v.is_floating_point() and k in reloaded_sd)
    sparse_loaded = load_sparse(tmp_path)
    assert any(isinstance(m, SparseLinear) for m in sparse_loaded.modules())
    assert torch.equal(sparse_loaded.generate(ids, max_new_tokens=10, do_sample=False), dense_out)

    densify(model)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(_same_bits(v, after[k]) if v.is_floating_point() else torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sparsify_half_precision_round_trip_and_forward(dtype):
    model = _tiny("llama", dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 9, 14, 3]])
    with torch.no_grad():
        ref = model(ids).logits.float()
        sparsify(model)
        assert all(m.dtype == dtype for m in model.modules() if isinstance(m, SparseLinear))
        got = model(ids).logits.float()
    assert (got - ref).abs().max().item() < 0.05 * (1 + ref.abs().max().item())
    densify(model)
    assert all(_same_bits(v, model.state_dict()[k]) for k, v in before.items() if v.is_floating_point())


def test_sparsify_min_sparsity_and_errors():
    model = _tiny("llama")
    assert not any(isinstance(m, SparseLinear) for m in sparsify(model, min_sparsity=0.9).modules())
    with pytest.raises(ValueError, match="min_sparsity"):
        sparsify(model, min_sparsity=1.5)
    with pytest.raises(ValueError, match="not eligible"):
        sparsify(model, modules=["model.embed_tokens"])
    sparsify(model, modules=["model.layers.0.mlp.down_proj"])
    assert isinstance(model.model.layers[0].mlp.down_proj, SparseLinear)
    assert not isinstance(model.model.layers[1].mlp.down_proj, SparseLinear)


def test_stories260k_greedy_generation_identical():
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    path = Path(__file__).resolve().parents[1] / "optimum_owl" / "assets" / "stories260K"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not model.get_output_embeddings():
                w = module.weight
                threshold = w.abs().flatten().kthvalue(int(0.7 * w.numel())).values
                w[w.abs() <= threshold] = 0
    ids = torch.tensor([[1, 400, 300, 259, 260, 301]])
    dense = model.generate(ids, max_new_tokens=40, do_sample=False)
    sparsify(model)
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 7 * model.config.num_hidden_layers
    assert torch.equal(model.generate(ids, max_new_tokens=40, do_sample=False), dense)


def test_generate_cli_loads_compact_checkpoint_sparse_and_compares_dense(tmp_path, capsys):
    from pathlib import Path

    from optimum_owl.cli import main

    model = _tiny("llama", vocab=512)  # the stories260K tokenizer's vocabulary
    sparsify(model)
    model.save_pretrained(tmp_path / "m")
    tok = Path(__file__).resolve().parents[1] / "optimum_owl" / "assets" / "stories260K"
    assert main(["generate", str(tmp_path / "m"), "--tokenizer", str(tok), "--prompt", "Once upon",
                 "--max-new-tokens", "6", "--compare-dense", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "21 sparse linears" in out and "tokens identical: True" in out and "decode speed-up" in out
    status = kernel_mod.kernel_status()
    expected = status["isa"]["float32"].upper().replace("AVX512", "AVX-512") if status["kernel"] else "pure PyTorch"
    assert f"kernel: {expected}" in out
    assert main(["generate", str(tmp_path / "m"), "--tokenizer", str(tok), "--prompt", "Once", "--max-new-tokens",
                 "0"]) == 2


def test_model_card_states_what_was_measured_and_on_which_cpu():
    from optimum_owl.hub.card import sparse_inference_card_section

    text = "\n".join(sparse_inference_card_section())
    assert "## Sparse inference on CPU" in text and "AMD EPYC" in text and "--compare-dense" in text
