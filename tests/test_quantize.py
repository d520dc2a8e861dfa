"""The shared int8 convention (optimum_owl/algorithms/quantize.py) on hand-checked cases."""

from __future__ import annotations

import pytest
import torch

from optimum_owl.algorithms.quantize import (
    QMAX,
    check_group_size,
    check_values,
    dequantize_int8,
    int8_scales,
    quantize_dequantize,
    quantize_int8,
    relative_error,
)


def test_row_scales_hand_computed():
    w = torch.tensor([[1.0, -2.54, 0.0], [0.5, 0.25, -0.125]])
    scales = int8_scales(w)
    assert torch.equal(scales, torch.tensor([2.54 / QMAX, 0.5 / QMAX]))
    codes = quantize_int8(w, scales)
    assert codes.tolist() == [[50, -127, 0], [127, 64, -32]]  # 63.5 rounds half to even: 64; -31.75 -> -32
    assert torch.equal(dequantize_int8(codes, scales), codes.float() * scales[:, None])


def test_pruned_elements_do_not_set_the_scale_and_stay_zero():
    w = torch.tensor([[100.0, 1.0, -0.5, 0.0]])
    keep = torch.tensor([[False, True, True, False]])
    codes, scales, deq = quantize_dequantize(w * keep, keep)
    assert scales.tolist() == pytest.approx([1.0 / QMAX])
    assert codes.tolist() == [[0, 127, -64, 0]]  # -63.5 -> -64 (half to even)
    assert deq[0, 0] == 0 and deq[0, 3] == 0


def test_group_scales_cover_consecutive_inputs_and_empty_groups_get_one():
    w = torch.zeros(2, 200)
    w[0, 5], w[0, 150], w[1, 199] = 2.0, -4.0, 1.0
    scales = int8_scales(w, group_size=128)
    assert scales.shape == (2, 2)
    assert scales.flatten().tolist() == pytest.approx([2.0 / QMAX, 4.0 / QMAX, 1.0, 1.0 / QMAX])
    codes = quantize_int8(w, scales, 128)
    assert codes[0, 5] == 127 and codes[0, 150] == -127 and codes[1, 199] == 127
    assert relative_error(w, dequantize_int8(codes, scales, 128)) < 1e-6


def test_values_beyond_the_grid_clamp_and_dtype_is_kept():
    w = torch.tensor([[1.0, 3.0]], dtype=torch.bfloat16)
    codes = quantize_int8(w, torch.tensor([1.0 / QMAX]))
    assert codes.tolist() == [[127, 127]]
    assert quantize_dequantize(w)[2].dtype == torch.bfloat16


def test_bad_fields_are_named():
    with pytest.raises(ValueError, match="values must be one of"):
        check_values("int4")
    with pytest.raises(ValueError, match="group_size must be None"):
        check_group_size(0)
    with pytest.raises(ValueError, match="group_size"):
        check_group_size(True)
