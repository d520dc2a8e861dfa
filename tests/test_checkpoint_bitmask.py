"""Golden tests of the bitmask pack/unpack math (`optimum_owl.formats.bitmask`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optimum_owl.formats.bitmask import (
    OWLCheckpointError,
    compress,
    compressed_nbytes,
    decompress,
    pack_bits,
    popcount,
    stored_mask,
    unpack_bits,
    worth_compressing,
)


def test_pack_bits_golden_little_endian():
    # element k of each group of 8 is bit k (value 1 << k): [1,0,0,0,0,0,0,0] -> 1, [0,...,0,1] -> 128
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [1, 128, 3]
    assert pack_bits(torch.tensor([0, 1, 0, 1, 0, 1], dtype=torch.bool)).tolist() == [42]


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 63, 64, 1000])
def test_pack_bits_matches_numpy_packbits_little(numel):
    g = torch.Generator().manual_seed(numel)
    mask = torch.rand(numel, generator=g) < 0.3
    expected = np.packbits(mask.numpy(), bitorder="little")
    assert pack_bits(mask).numpy().tobytes() == expected.tobytes()
    assert torch.equal(unpack_bits(pack_bits(mask), numel), mask)
    assert popcount(pack_bits(mask)) == int(mask.sum())


def test_compress_golden_layout():
    w = torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.0, -0.0]])
    values, bitmask, shape = compress(w)
    assert values.tolist() == [1.5, 2.0, -0.0]  # -0.0 is a non-zero bit pattern: kept
    assert bitmask.dtype == torch.uint8 and bitmask.tolist() == [0b101010]
    assert shape.dtype == torch.int64 and shape.tolist() == [2, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_roundtrip_bit_identical(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 53, generator=g).to(dtype)
    w[torch.rand(37, 53, generator=g) < 0.7] = 0
    w[0, 0] = -0.0
    w[0, 1] = float("nan")
    values, bitmask, shape = compress(w)
    out = decompress(values, bitmask, shape, name="w")
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       w.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_sizes_at_70_percent():
    numel = 1000 * 1000
    nnz = 300 * 1000
    assert compressed_nbytes(numel, nnz, 4) / (numel * 4) == pytest.approx(0.30 + 1 / 32)
    assert compressed_nbytes(numel, nnz, 2) / (numel * 2) == pytest.approx(0.30 + 1 / 16)


def test_worth_compressing_threshold():
    w = torch.ones(64, 64)
    assert not worth_compressing(w)  # dense: the mask would only add bytes
    w[:, :32] = 0
    assert worth_compressing(w)
    assert not worth_compressing(torch.zeros(64))  # 1-D tensors (norms, biases) stay dense
    assert stored_mask(torch.tensor([0.0, -0.0, 1.0])).tolist() == [False, True, True]


def test_decompress_errors_name_the_tensor():
    w = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    values, bitmask, shape = compress(w)
    with pytest.raises(OWLCheckpointError, match="layer.weight.*mask/values length mismatch"):
        decompress(values[:1], bitmask, shape, name="layer.weight")
    with pytest.raises(OWLCheckpointError, match="layer.weight_bitmask.*bytes"):
        decompress(values, torch.cat([bitmask, bitmask]), shape, name="layer.weight")
    with pytest.raises(OWLCheckpointError, match="model expects"):
        decompress(values, bitmask, shape, name="layer.weight", expected_shape=(4, 1))
    with pytest.raises(OWLCheckpointError, match="padding bits"):
        decompress(values, torch.tensor([0b10000110], dtype=torch.uint8), shape, name="layer.weight")
    with pytest.raises(OWLCheckpointError, match="uint8"):
        decompress(values, bitmask.to(torch.int8), shape, name="layer.weight")
    with pytest.raises(OWLCheckpointError, match="int64"):
        decompress(values, bitmask, shape.to(torch.int32), name="layer.weight")
