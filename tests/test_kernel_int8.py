"""The C++ kernel on int8 values (codes + float32 scales; csrc/sparse_linear_q8.h): decode against a float64 matmul
of the dequantized weight, the AVX2 and AVX-512 paths bit for bit (on this CPU, and in the build that emulates the
AVX-512 intrinsics), prefill tiles against `dequantize_int8` bit for bit, the prefill GEMMs, and the argument checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from optimum_owl.algorithms.quantize import dequantize_int8
from optimum_owl.inference import isa as isa_mod
from optimum_owl.inference import kernel as kernel_mod
from optimum_owl.inference.format import DTYPE_CODES, INT8_VALUE_PADDING, pack_dense, quantize_packed, unpack_stored

needs_kernel = pytest.mark.skipif(kernel_mod.kernel() is None, reason="C++ kernel unavailable on this machine")
# (out, in, sparsity): in not a multiple of 64 (nor of 8), one word, several words, a fully dense layer
SHAPES = [(37, 100, 0.5), (70, 300, 0.7), (16, 64, 0.0), (9, 200, 0.97), (5, 1, 0.5), (33, 130, 0.8)]
GROUPS = [None, 128, 64]
TOKENS = [1, 2, 3, 4, 5, 7, 8, 13, 16, 33, 64]
EMULATION = Path(__file__).parent / "csrc" / "avx512_emulated.h"


def _layer(out: int, inp: int, sparsity: float, seed: int, group_size: int | None):
    """A pruned layer in the int8 sparse form with an empty row, a full row, a zero mask word and a stored element
    whose code rounds to 0; and its dequantized dense weight (float32, what the kernel must compute with)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    w[torch.rand(out, inp, generator=g) < sparsity] = 0
    if out > 3:
        w[0] = 0
        w[1] = torch.randn(inp, generator=g)
        w[2, :64] = 0
        if inp > 2:
            w[3, :2] = torch.tensor([1e-6, 100.0])
    packed = quantize_packed(pack_dense(w), group_size)
    return packed, dequantize_int8(unpack_stored(packed), packed.scales, group_size)


def _with_threads(threads: int, f):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return f()
    finally:
        torch.set_num_threads(previous)


def _decode(ops, x, p, bias):
    return ops.decode_q8(x, p.mask, p.values, p.offsets, p.scales, p.group_size, bias)


@needs_kernel
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_size", GROUPS)
def test_decode_matches_a_float64_matmul_of_the_dequantized_weight(group_size, xdtype):
    ops = kernel_mod.kernel()
    for i, (out, inp, sparsity) in enumerate(SHAPES):
        packed, weight = _layer(out, inp, sparsity, seed=i, group_size=group_size)
        for with_bias in (True, False):
            bias = torch.randn(out) if with_bias else None
            for n in TOKENS:
                x = torch.randn(n, inp).to(xdtype)
                # the same call with 1 and 2 threads: each row is summed by one thread in a fixed order
                call = lambda x=x, p=packed, b=bias: _decode(ops, x, p, b)  # noqa: E731
                one, two = (_with_threads(t, call) for t in (1, 2))
                assert one.dtype == xdtype and one.shape == (n, out)
                assert torch.equal(one.view(torch.int16 if xdtype == torch.bfloat16 else torch.int32),
                                   two.view(torch.int16 if xdtype == torch.bfloat16 else torch.int32))
                ref = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
                size = x.double().abs() @ weight.double().abs().t()
                tol = 1e-5 * size + 1e-6 + (2.0**-8 * ref.abs() if xdtype == torch.bfloat16 else 0)
                assert ((one.double() - ref).abs() <= tol).all(), (out, inp, group_size, with_bias, n)


def _paths_agree(ops, threads: int) -> None:
    """Every layer, group size, token count (4-token groups and the 3, 2, 1 left over) and activation dtype, with
    the AVX2 and the AVX-512 decode path: the same bits."""

    def run() -> None:
        for i, (out, inp, sparsity) in enumerate(SHAPES + [(130, 1000, 0.7)]):
            for group_size in GROUPS + [192]:
                packed, _ = _layer(out, inp, sparsity, seed=10 + i, group_size=group_size)
                bias = torch.randn(out) if i % 2 else None
                for n in (1, 2, 3, 4, 5, 6, 7, 13):
                    for xdtype in (torch.float32, torch.bfloat16, torch.float16):
                        x = torch.randn(n, inp).to(xdtype)
                        ys = []
                        for isa in ("avx2", "avx512"):
                            ops.set_isa(torch.int8, isa)
                            ys.append(_decode(ops, x, packed, bias))
                        ops.set_isa(torch.int8, "avx2")
                        bits = torch.int32 if xdtype == torch.float32 else torch.int16
                        assert torch.equal(ys[0].view(bits), ys[1].view(bits)), (out, inp, group_size, n, xdtype)

    try:
        _with_threads(threads, run)
    finally:
        ops.set_isa(torch.int8, "avx2")


@needs_kernel
@pytest.mark.skipif(not (kernel_mod.kernel() and kernel_mod.kernel().avx512_available(torch.int8)),
                    reason="no AVX-512 VBMI2 here")
def test_avx2_and_avx512_paths_give_the_same_bits_on_this_cpu():
    ops = kernel_mod.kernel()
    previous = ops.isa(torch.int8)
    try:
        _paths_agree(ops, threads=2)
        assert isa_mod.paths_agree(ops, torch.int8)
    finally:
        ops.set_isa(torch.int8, previous)


@pytest.fixture(scope="module")
def emulated_ops(tmp_path_factory):
    """The kernel built with its AVX-512 intrinsics emulated in plain C++ (tests/csrc/avx512_emulated.h): the int8
    AVX-512 path's code runs lane by lane on any AVX2 CPU."""
    if kernel_mod.kernel() is None:
        pytest.skip("C++ kernel unavailable on this machine")
    folder = tmp_path_factory.mktemp("owl_q8_emulated")
    return kernel_mod.load_ops(kernel_mod.SOURCE, folder, "owl_q8_emulated", ["-include", str(EMULATION)])


@pytest.mark.parametrize("threads", [1, 2])
def test_avx512_path_gives_the_avx2_bits_in_an_emulated_build(emulated_ops, threads):
    assert emulated_ops.avx512_available(torch.int8)
    _paths_agree(emulated_ops, threads)


@needs_kernel
@pytest.mark.parametrize("group_size", GROUPS)
def test_expanded_tiles_are_dequantize_int8_bit_for_bit(group_size):
    ops = kernel_mod.kernel()
    for i, (out, inp, sparsity) in enumerate(SHAPES):
        packed, weight = _layer(out, inp, sparsity, seed=20 + i, group_size=group_size)
        width = packed.mask.shape[1] * 8
        for dtype in (torch.float32, torch.bfloat16):
            tile = torch.full((16, width), float("nan"), dtype=dtype)
            for r0 in range(0, out, 16):
                r1 = min(out, r0 + 16)
                ops.expand_q8(packed.mask, packed.values, packed.offsets, packed.scales, group_size, r0, r1, tile)
                want = weight[r0:r1].to(dtype)  # float32 code * scale, rounded to bf16 by torch for a bf16 tile
                bits = torch.int32 if dtype == torch.float32 else torch.int16
                assert torch.equal(tile[: r1 - r0, :inp].view(bits), want.view(bits)), (out, inp, dtype, r0)
                assert not tile[: r1 - r0, inp:].view(bits).any()  # padding columns are zero


@needs_kernel
@pytest.mark.parametrize("group_size", [None, 128])
def test_prefill_of_int8_values_matches_the_dequantized_linear(group_size):
    ops = kernel_mod.kernel()
    packed, weight = _layer(300, 200, 0.7, seed=5, group_size=group_size)
    bias = torch.randn(300)
    x = torch.randn(20, 200)
    xp = F.pad(x, (0, 256 - 200)).contiguous()
    y = ops.prefill(xp, packed.mask, packed.values, packed.offsets, bias, 200, 64, packed.scales, group_size)
    torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    assert y.is_contiguous() and y.dtype == torch.float32
    decode = ops.decode_q8(xp[:5], packed.mask, packed.values, packed.offsets, packed.scales, group_size, bias)
    torch.testing.assert_close(decode, y[:5], rtol=1e-5, atol=1e-4)
    # bf16 activations: bf16 tiles of the dequantized values and torch's bf16 GEMM, as the dense bf16 layer computes
    xb, wb, bb = x.to(torch.bfloat16), weight.to(torch.bfloat16), bias.to(torch.bfloat16)
    yb = ops.prefill(xb, packed.mask, packed.values, packed.offsets, bb, 200, 64, packed.scales, group_size)
    assert yb.dtype == torch.bfloat16 and yb.shape == (20, 300)
    ref = xb.double() @ wb.double().t() + bb.double()
    assert ((yb.double() - ref).abs() <= 2.0**-7 * ref.abs() + 1e-2).all()


@needs_kernel
def test_the_hot_path_arguments_give_decode_q8s_result():
    ops = kernel_mod.kernel()
    packed, _ = _layer(70, 300, 0.7, seed=6, group_size=128)
    bias = torch.randn(70)
    args = ops.q8_args(packed.mask, packed.values, packed.offsets, packed.scales, 128, bias)
    x = torch.randn(3, 300, dtype=torch.bfloat16)
    y = torch.empty(3, 70, dtype=torch.bfloat16)
    kernel_mod.check_rc("owl_decode_q8", ops.lib.owl_decode_q8(x.data_ptr(), DTYPE_CODES[x.dtype], 3, 300, *args,
                                                               y.data_ptr()))
    assert torch.equal(y.view(torch.int16), _decode(ops, x, packed, bias).view(torch.int16))
    # 300 inputs need 5 mask words; 330 do not fit in them: the C entry point refuses, with its code
    rc = ops.lib.owl_decode_q8(x.data_ptr(), DTYPE_CODES[x.dtype], 3, 330, *args, y.data_ptr())
    with pytest.raises(RuntimeError, match="owl_decode_q8 failed: activations of an unsupported dtype or width"):
        kernel_mod.check_rc("owl_decode_q8", rc)


@needs_kernel
def test_bad_arguments_are_clear_value_errors():
    ops = kernel_mod.kernel()
    p, _ = _layer(8, 130, 0.5, seed=7, group_size=128)
    x = torch.randn(2, 130)

    def decode(**change):
        a = {"x": x, "mask": p.mask, "codes": p.values, "offsets": p.offsets, "scales": p.scales, "group_size": 128,
             "bias": None, **change}
        return ops.decode_q8(a["x"], a["mask"], a["codes"], a["offsets"], a["scales"], a["group_size"], a["bias"])

    for bad in (100, 32, 0, True, 128.0):
        with pytest.raises(ValueError, match="group_size must be None .* or a positive multiple of 64"):
            decode(group_size=bad)
    with pytest.raises(ValueError, match=r"scales must be contiguous float32 \[8, 2\] \(group_size=128\)"):
        decode(scales=p.scales[:, :1].contiguous())
    with pytest.raises(ValueError, match=r"scales must be contiguous float32 \[8\] \(group_size=None\)"):
        decode(group_size=None)  # group scales given for one scale per row
    with pytest.raises(ValueError, match="scales must be contiguous float32"):
        decode(scales=p.scales.double())
    with pytest.raises(ValueError, match="int8 values must be a contiguous 1-D int8 tensor"):
        decode(codes=p.values.float())
    with pytest.raises(ValueError, match=f"then {INT8_VALUE_PADDING} bytes of padding"):
        decode(codes=p.values[: p.nnz].clone())
    with pytest.raises(ValueError, match=r"offsets must be contiguous int64 \[out \+ 1\] = \[9\]"):
        decode(offsets=p.offsets[:-1].clone())
    with pytest.raises(ValueError, match="mask must be contiguous uint8"):
        decode(mask=p.mask.t())
    with pytest.raises(ValueError, match=r"x must be contiguous .* with in in \(128, 192\], got torch.float32 \(2, 64\)"):
        decode(x=torch.randn(2, 64))
    with pytest.raises(ValueError, match="x must be contiguous float32/bfloat16/float16"):
        decode(x=x.double())
    with pytest.raises(ValueError, match=r"bias must be None or contiguous float32 \[8\]"):
        decode(bias=torch.randn(8, dtype=torch.bfloat16))
    tile = torch.empty(8, 192)
    with pytest.raises(ValueError, match=r"rows \[0, 9\) are not inside \[0, 8\)"):
        ops.expand_q8(p.mask, p.values, p.offsets, p.scales, 128, 0, 9, tile)
    with pytest.raises(ValueError, match="the tile must be contiguous float32/bfloat16"):
        ops.expand_q8(p.mask, p.values, p.offsets, p.scales, 128, 0, 8, torch.empty(8, 192, dtype=torch.float16))
    xp = F.pad(x, (0, 62)).contiguous()
    with pytest.raises(ValueError, match="int8 values need their float32 scales"):
        ops.prefill(xp, p.mask, p.values, p.offsets, None, 130, 4)
    with pytest.raises(ValueError, match=r"x must be contiguous float32 \[n, 64 \* words per row\]"):
        ops.prefill(x, p.mask, p.values, p.offsets, None, 130, 4, p.scales, 128)
    with pytest.raises(ValueError, match="isa must be one of"):
        ops.set_isa(torch.int8, "vbmi2")
