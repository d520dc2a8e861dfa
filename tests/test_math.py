"""Hand-worked golden cases for the masks, the criteria and the OWL allocation."""

import pytest
import torch

from optimum_owl.algorithms.allocation import clamp_preserving_mean, mixed_nm_allocation, outlier_ratio, owl_allocation
from optimum_owl.algorithms.criteria import keep_mask, wanda_prune_, wanda_scores
from optimum_owl.algorithms.masks import (
    apply_keep_mask_,
    is_valid_nm,
    keep_mask_nm,
    keep_mask_per_layer,
    keep_mask_per_row,
)


def test_wanda_one_row_by_hand():
    # |W| = [4, 3, 2, 1], ||X_j|| = [1, 2, 3, 4]  ->  scores [4, 6, 6, 4]
    w = torch.tensor([[4.0, -3.0, 2.0, -1.0]])
    norms = torch.tensor([1.0, 2.0, 3.0, 4.0])
    scores = wanda_scores(w, norms)
    assert scores.tolist() == [[4.0, 6.0, 6.0, 4.0]]
    # 50%: prune two lowest; the tie 4 vs 4 is broken by position -> columns 0 and 3 go
    assert keep_mask(scores, 0.5).tolist() == [[False, True, True, False]]
    # 25%: floor(4 * 0.25) = 1 -> column 0 only (first of the tied lowest)
    assert keep_mask(scores, 0.25).tolist() == [[False, True, True, True]]
    # magnitude alone would prune differently: |W| lowest are columns 3, 2
    assert keep_mask(w.abs(), 0.5).tolist() == [[True, True, False, False]]


def test_per_row_keeps_the_same_count_in_every_row():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    keep = keep_mask_per_row(scores, 0.5)  # floor(5 * 0.5) = 2 pruned per row
    assert keep.tolist() == [[False, False, True, True, True], [True, True, True, False, False]]


def test_per_layer_ranks_the_whole_matrix():
    scores = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    assert keep_mask_per_layer(scores, 0.5).tolist() == [[False, True], [True, False]]


def test_two_four_and_one_four_on_arange():
    scores = torch.arange(8.0).reshape(1, 8)
    assert keep_mask_nm(scores, 2, 4).tolist() == [[False, False, True, True, False, False, True, True]]
    assert keep_mask_nm(scores, 1, 4).tolist() == [[False, False, False, True, False, False, False, True]]
    rev = torch.arange(8.0).flip(0).reshape(1, 8)
    assert keep_mask_nm(rev, 2, 4).tolist() == [[True, True, False, False, True, True, False, False]]
    w = torch.randn(6, 16)
    w *= keep_mask_nm(w.abs(), 2, 4)
    assert is_valid_nm(w, 2, 4) and not is_valid_nm(torch.ones(2, 8), 2, 4)


def test_nm_needs_divisible_columns():
    with pytest.raises(ValueError, match="divisible by 4"):
        keep_mask_nm(torch.randn(2, 6), 2, 4)


def test_outlier_ratio_counts_scores_above_m_times_mean_over_the_block():
    # mean of all 10 values = (8*1 + 2*11) / 10 = 3; M=3 -> threshold 9 -> the two 11s are outliers
    a = torch.ones(2, 4)
    b = torch.tensor([[11.0, 11.0]])
    assert outlier_ratio([a, b], 3.0) == pytest.approx(0.2)
    # per-matrix means would find none in `a` and none in `b`: the block mean is what the paper uses
    assert outlier_ratio([a], 3.0) == 0.0 and outlier_ratio([b], 3.0) == 0.0


def test_allocation_worked_example():
    # D = [0.01, 0.02, 0.03] -> r~ = [0, 0.5, 1], mean 0.5; S=0.7, lambda=0.1 -> s = 0.7 + 0.2 * (0.5 - r~)
    s, clamped = owl_allocation([0.01, 0.02, 0.03], 0.7, 0.1)
    assert s == pytest.approx([0.8, 0.7, 0.6]) and not clamped
    # asymmetric profile: mean exactly S, spread exactly 2 lambda, not symmetric around S
    s, _ = owl_allocation([0.0, 0.0, 0.0, 1.0], 0.7, 0.08)
    assert sum(s) / 4 == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s == pytest.approx([0.74, 0.74, 0.74, 0.58])


def test_allocation_equal_ratios_are_uniform_not_nan():
    s, clamped = owl_allocation([0.02, 0.02, 0.02], 0.5, 0.08)
    assert s == [0.5, 0.5, 0.5] and not clamped


def test_allocation_clamps_inside_bounds_and_keeps_the_mean():
    s, clamped = owl_allocation([0.0, 0.84, 1.0], 0.6, 2.0)
    assert clamped
    assert all(0.0 <= v < 1.0 for v in s)
    assert sum(s) / 3 == pytest.approx(0.6, abs=1e-9)
    assert s[0] > s[1] > s[2]  # more outliers -> lower sparsity, order kept
    zero, _ = owl_allocation([1.0, 2.0, 5.0], 0.0, 0.08)
    assert zero == pytest.approx([0.0, 0.0, 0.0])


def test_clamp_rejects_an_infeasible_mean():
    with pytest.raises(ValueError):
        clamp_preserving_mean([2.0, 2.0], 0.0, 1.0)


def test_mixed_nm_mean_is_renormalised():
    kept = mixed_nm_allocation([0.01, 0.02, 0.05, 0.03], 4, 8, 2.0)
    assert kept == [3, 4, 5, 4]
    assert sum(8 - k for k in kept) == 4 * 4  # mean pruned per group stays m - n
    kept = mixed_nm_allocation([0.01, 0.02, 0.05, 0.03, 0.04], 2, 4, 5.0)
    assert sum(4 - k for k in kept) == 5 * 2 and all(1 <= k <= 4 for k in kept)


def test_selection_equals_a_stable_sort_even_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (64, 40), generator=g).float()  # many ties
    for sparsity in (0.1, 0.5, 0.73):
        k = int(40 * sparsity)
        ref = torch.ones_like(scores, dtype=torch.bool)
        ref.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], False)
        assert torch.equal(keep_mask_per_row(scores, sparsity), ref)
        flat_k = int(scores.numel() * sparsity)
        ref_layer = torch.ones(scores.numel(), dtype=torch.bool)
        ref_layer[torch.sort(scores.flatten(), stable=True).indices[:flat_k]] = False
        assert torch.equal(keep_mask_per_layer(scores, sparsity), ref_layer.view_as(scores))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_banded_wanda_prune_equals_whole_matrix_masks(dtype):
    # wanda_prune_ scores and selects a band of rows at a time; per-row groups make the masks identical to scoring
    # the whole matrix at once, for any band size (1 row, uneven bands, one band), with ties, N:M and transposed views
    g = torch.Generator().manual_seed(1)
    weight = torch.randint(-4, 5, (37, 24), generator=g).to(dtype)  # many ties and exact zeros
    norms = torch.rand(24, generator=g)
    norms[3] = 0.0
    for sparsity, nm in ((0.5, None), (0.3, None), (0.0, None), (1.0, None), (0.5, (2, 4)), (0.75, (1, 4))):
        ref = weight.clone()
        apply_keep_mask_(ref, keep_mask(wanda_scores(ref, norms), sparsity, nm))
        for band in (1, 24 * 5, 24 * 37, 10**6, 50):
            w = weight.clone()
            assert wanda_prune_(w, norms, sparsity, nm, band_elements=band) is w
            assert torch.equal(w, ref), (sparsity, nm, band)
        wt = weight.t().contiguous()  # stored [in, out] (Conv1D): prune through the transposed view
        wanda_prune_(wt.t(), norms, sparsity, nm, band_elements=48)
        assert torch.equal(wt.t(), ref)
