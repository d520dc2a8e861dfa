"""Invariants of the engine on tiny random models of every supported architecture."""

import math

import pytest
import torch

from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.algorithms.masks import is_valid_nm
from optimum_owl.pruning.modeling import get_blocks_and_units

from .conftest import ARCHS, calib_ids, tiny_model

METHODS = ["wanda", "sparsegpt", "magnitude"]


def _prune(arch, **kw):
    model = tiny_model(arch)
    defaults = dict(sparsity=0.6, num_samples=8, seqlen=16, batch_size=4, sparsegpt_blocksize=16, owl_m=3.0)
    defaults.update(kw)
    report = OWLPruner(OWLPrunerConfig(**defaults)).prune(model, dataset=calib_ids())
    return model, report


def _units(model):
    return [u for us in get_blocks_and_units(model)[2] for u in us]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_block_sparsity_matches_target_within_one_weight_per_row(arch, method):
    model, report = _prune(arch, method=method)
    assert abs(sum(b.target_sparsity for b in report.blocks) / len(report.blocks) - 0.6) < 1e-9
    by_block = {}
    for u in _units(model):
        by_block.setdefault(int(u.name.split(".")[u.name.split(".").index(report.model["block_path"].split(".")[-1]) + 1]), []).append(u)
    for block in report.blocks:
        units = by_block[block.index]
        rows = sum(u.shape[0] for u in units)
        params = sum(u.numel for u in units)
        zeros = sum(int((u.weight() == 0).sum()) for u in units)
        assert zeros / params == pytest.approx(block.achieved_sparsity)
        # floor per row (Wanda), per tile (SparseGPT), per matrix (magnitude): never more than one weight per row short
        target_zeros = block.target_sparsity * params
        assert target_zeros - rows - 1e-6 <= zeros <= target_zeros + 1e-6, (block.index, zeros, target_zeros, rows)
    out = model(input_ids=calib_ids(1, 8))
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.isfinite(hidden).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "mixtral"])
def test_nm_groups_are_valid(arch, method):
    model, report = _prune(arch, method=method, pattern="2:4", layerwise="uniform")
    for u in _units(model):
        assert is_valid_nm(u.weight(), 2, 4), u.name
    assert report.sparsity == pytest.approx(0.5, abs=1e-9)


def test_mixed_nm_keeps_mean_and_validity():
    model, report = _prune("llama", pattern="4:8", nm_mixed=True, owl_lambda=2.0, layerwise="owl")
    nms = [b.nm for b in report.blocks]
    assert all(m == 8 for _, m in nms)
    assert sum(8 - n for n, _ in nms) == 4 * len(nms)
    for u, block in ((u, int(u.name.split(".")[2])) for u in _units(model)):
        assert is_valid_nm(u.weight(), nms[block][0], 8)
    assert report.sparsity == pytest.approx(0.5)


def test_fixed_nm_with_owl_warns_and_runs_uniform(caplog):
    model, report = _prune("llama", pattern="2:4", layerwise="owl")
    assert "OWL is skipped" in caplog.text and report.warnings
    assert all(b.nm == [2, 4] for b in report.blocks)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparsity_zero_changes_nothing(arch):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    OWLPruner(OWLPrunerConfig(sparsity=0.0, num_samples=4, seqlen=16, batch_size=4)).prune(model, dataset=calib_ids(4))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_same_seed_same_masks_and_embeddings_untouched(arch):
    m1, r1 = _prune(arch, method="wanda")
    m2, r2 = _prune(arch, method="wanda")
    for a, b in zip(_units(m1), _units(m2)):
        assert torch.equal(a.weight() != 0, b.weight() != 0)
    assert [b.outlier_ratio for b in r1.blocks] == [b.outlier_ratio for b in r2.blocks]
    fresh = tiny_model(arch)
    emb = fresh.get_input_embeddings().weight
    assert torch.equal(m1.get_input_embeddings().weight, emb)
    assert not any(".wte" in m.name or "embed" in m.name or "lm_head" in m.name for m in r1.modules)


def test_gpt2_conv1d_is_pruned_along_its_input_dimension():
    model, report = _prune("gpt2", method="wanda", layerwise="uniform", sparsity=0.5)
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D weight is [in=32, out=128]
    w = c_fc.weight
    assert w.shape == (32, 128)
    # Wanda compares within each output row of W^T: every output column of the stored weight loses 16 of 32
    assert ((w == 0).sum(dim=0) == 16).all()


def test_moe_experts_are_units_and_routers_are_not():
    model, report = _prune("mixtral", method="wanda", layerwise="uniform")
    names = [m.name for m in report.modules]
    assert any(".experts.gate_up_proj.0" in n for n in names) and any(".experts.down_proj.3" in n for n in names)
    assert not any(".gate." in n or n.endswith(".gate") for n in names)


def test_dense_propagation_runs_one_pass_and_is_close_to_sequential():
    m_seq, r_seq = _prune("llama", method="wanda", layerwise="owl")
    m_den, r_den = _prune("llama", method="wanda", layerwise="owl", propagation="dense")
    # identical allocation (it only depends on the dense pass) and identical block-0 masks
    assert [b.target_sparsity for b in r_seq.blocks] == [b.target_sparsity for b in r_den.blocks]
    u_seq, u_den = _units(m_seq), _units(m_den)
    for a, b in zip(u_seq, u_den):
        if ".layers.0." in a.name:
            assert torch.equal(a.weight() != 0, b.weight() != 0)
    assert "outlier_pass" in r_den.timings and math.isfinite(r_den.sparsity)


def test_ignore_patterns_and_block_name():
    model, report = _prune("llama", ignore=["*.q_proj", "re:layers\\.1\\.mlp"], block_name="model.layers")
    names = [m.name for m in report.modules]
    assert not any(n.endswith("q_proj") for n in names)
    assert not any(".layers.1.mlp." in n for n in names)
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()
