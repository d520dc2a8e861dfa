"""Allocation below the block: `attention_shift` splits a block's sparsity between its attention projections and its
other (MLP) matrices, keeping the block's parameter-weighted mean (hand-worked cases, naming, runs, validation)."""

import random

import pytest

from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.algorithms.allocation import MAX_BLOCK_SPARSITY, BlockPlan, projection_split
from optimum_owl.errors import OWLConfigError
from optimum_owl.pruning.modeling import get_blocks_and_units, projection_group

from .conftest import calib_ids, tiny_model

# a SmolLM2-135M block: q, o 576×576 and k, v 192×576 (attention); gate, up, down 576×1536 (MLP): P_a/P_m = 1/3
SMOL_ATTENTION, SMOL_MLP = 2 * 576 * 576 + 2 * 192 * 576, 3 * 576 * 1536


def test_projection_split_worked_examples():
    # s_a = 0.7 ± 0.06, s_m = 0.7 ∓ 0.06 · (1/3)
    assert projection_split(0.7, 0.06, SMOL_ATTENTION, SMOL_MLP) == pytest.approx((0.76, 0.68))
    assert projection_split(0.7, -0.06, SMOL_ATTENTION, SMOL_MLP) == pytest.approx((0.64, 0.72))
    # attention would leave [0, 0.999]: clipped there, the MLP takes the rest of the budget (4 · 0.9 = 3.6 zeros)
    assert projection_split(0.9, 0.3, 1, 3) == pytest.approx((MAX_BLOCK_SPARSITY, (3.6 - MAX_BLOCK_SPARSITY) / 3))
    assert projection_split(0.1, -0.3, 1, 3) == pytest.approx((0.0, 0.4 / 3))
    # the MLP would leave the range (0.9 + 0.5 = 1.4): the shift is shortened until the MLP sits at 0.999
    assert projection_split(0.9, -0.5, 1, 1) == pytest.approx((1.8 - MAX_BLOCK_SPARSITY, MAX_BLOCK_SPARSITY))
    # nothing to split: no shift, or a block without attention (or without MLP) matrices
    assert projection_split(0.7, 0.0, 5, 7) == (0.7, 0.7)
    assert projection_split(0.7, 0.2, 0, 7) == (0.7, 0.7) and projection_split(0.7, 0.2, 7, 0) == (0.7, 0.7)


def test_projection_split_keeps_the_weighted_mean_and_the_bounds():
    rng = random.Random(0)
    for _ in range(2000):
        s, d = rng.uniform(0.0, 0.99), rng.uniform(-1.0, 1.0)
        pa, pm = rng.randint(1, 10_000), rng.randint(1, 10_000)
        a, m = projection_split(s, d, pa, pm)
        assert (pa * a + pm * m) / (pa + pm) == pytest.approx(s, abs=1e-9)
        hi = max(MAX_BLOCK_SPARSITY, s)
        assert 0.0 <= a <= hi and 0.0 <= m <= hi
        assert (a - s) * d >= -1e-12  # clipping shortens the shift, never reverses it


def test_block_plan_sparsity_for_a_group():
    plan = BlockPlan(0.7, split=(0.76, 0.68))
    assert plan.sparsity_for("attention") == 0.76 and plan.sparsity_for("mlp") == 0.68
    assert BlockPlan(0.7).sparsity_for("attention") == 0.7


@pytest.mark.parametrize(
    "name, group",
    [("self_attn.q_proj", "attention"), ("self_attn.o_proj", "attention"), ("mlp.down_proj", "mlp"),
     ("fc1", "mlp"), ("attn.c_attn", "attention"), ("attn.c_proj", "attention"), ("mlp.c_proj", "mlp"),
     ("attention.query_key_value", "attention"), ("self_attention.dense", "attention"),
     ("attention.output.dense", "attention"), ("output.dense", "mlp"), ("layer.0.SelfAttention.q", "attention"),
     ("layer.1.DenseReluDense.wi", "mlp"), ("mlp.experts.down_proj.3", "mlp")],
)
def test_projection_group_of_common_namings(name, group):
    assert projection_group(name) == group


@pytest.mark.parametrize("arch, attention", [("llama", 4), ("opt", 4), ("gpt2", 2)])
def test_split_runs_prune_each_group_to_its_share(arch, attention):
    model = tiny_model(arch, layers=3)
    _, _, units = get_blocks_and_units(model)
    assert [sum(u.group == "attention" for u in block) for block in units] == [attention] * 3
    config = OWLPrunerConfig(sparsity=0.6, layerwise="atp", atp_beta=0.05, attention_shift=0.1, num_samples=4,
                             seqlen=16)
    report = OWLPruner(config).prune(model, dataset=calib_ids(4))
    assert report.block_sparsities == pytest.approx([0.55, 0.6, 0.65])  # the family's allocation is unchanged
    for block, block_units in zip(report.blocks, units):
        pa = sum(u.numel for u in block_units if u.group == "attention")
        pm = sum(u.numel for u in block_units if u.group == "mlp")
        assert block.attention_sparsity == pytest.approx(block.target_sparsity + 0.1)
        assert block.mlp_sparsity == pytest.approx(block.target_sparsity - 0.1 * pa / pm)
        groups = {u.name: u.group for u in block_units}
        for module in (m for m in report.modules if m.block == block.index):
            want = block.attention_sparsity if groups[module.name] == "attention" else block.mlp_sparsity
            assert module.target_sparsity == pytest.approx(want)
            assert module.achieved_sparsity == pytest.approx(want, abs=1 / module.shape[1])  # whole weights per row
        assert block.achieved_sparsity == pytest.approx(block.target_sparsity, abs=0.02)
    head = report.block_table().splitlines()[0]
    assert "attention target" in head and "MLP target" in head
    assert "attention_shift=0.1" in report.to_markdown()


def test_no_shift_leaves_plans_and_table_as_before():
    report = OWLPruner(OWLPrunerConfig(sparsity=0.5, layerwise="uniform", num_samples=4, seqlen=16)).prune(
        tiny_model("llama", layers=2), dataset=calib_ids(4)
    )
    assert all(b.attention_sparsity is None and b.mlp_sparsity is None for b in report.blocks)
    assert "attention target" not in report.block_table()
    assert {m.target_sparsity for m in report.modules} == {0.5}


def test_search_candidates_carry_the_split():
    config = OWLPrunerConfig(
        sparsity=0.7, layerwise="auto", attention_shift=-0.05, num_samples=12, seqlen=16, batch_size=3,
        auto_holdout=0.25, auto_owl_ms=[3.0], auto_owl_lambdas=[0.05], auto_dlp_alphas=[0.1],
        auto_alphapruning_epsilons=[0.3], auto_atp_betas=[0.1],
    )
    report = OWLPruner(config).prune(tiny_model("llama", layers=3), dataset=calib_ids(12))
    assert all(b.attention_sparsity == pytest.approx(b.target_sparsity - 0.05) for b in report.blocks)
    assert report.sparsity == pytest.approx(0.7, abs=1 / 32)  # whole weights per row of 32 inputs


@pytest.mark.parametrize(
    "kwargs", [dict(attention_shift=1.0), dict(attention_shift=float("nan")), dict(attention_shift="0.1"),
               dict(attention_shift=0.05, pattern="2:4")],
)
def test_attention_shift_is_validated(kwargs):
    with pytest.raises(OWLConfigError, match="attention_shift"):
        OWLPrunerConfig(**kwargs)


def test_attention_shift_round_trips_through_owl_config(tmp_path):
    config = OWLPrunerConfig(attention_shift=-0.1)
    assert OWLPrunerConfig.from_pretrained(config.save_pretrained(tmp_path)).attention_shift == -0.1
    assert OWLPrunerConfig(attention_shift=0.0, pattern="2:4").attention_shift == 0.0


# ------------------------------------------------------------------------------------------------ layerwise="auto"
def _attention_heavy_losses(model, ids, batch_size):
    """Fake per-token scoring that rewards pruning the attention projections more than the MLP."""
    import torch

    gap = 0.0
    for layer in model.model.layers:
        attention = [p for p in layer.self_attn.parameters() if p.dim() == 2]
        mlp = [p for p in layer.mlp.parameters() if p.dim() == 2]
        share = lambda ws: sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)  # noqa: E731
        gap += share(attention) - share(mlp)
    return torch.full((ids.shape[0], 3), 1.0 - gap, dtype=torch.float64)


def test_auto_searches_attention_shifts_and_refits_like_a_direct_run(monkeypatch):
    import copy

    import torch

    import optimum_owl.pruning.search.scoring as scoring

    monkeypatch.setattr(scoring, "token_losses", _attention_heavy_losses)
    base = dict(
        sparsity=0.6, num_samples=12, seqlen=16, batch_size=3, auto_holdout=0.25, auto_families=["atp"],
        auto_atp_betas=[0.02],
    )
    model = tiny_model("llama", layers=3)
    dense = copy.deepcopy(model)
    config = OWLPrunerConfig(layerwise="auto", auto_attention_shifts=[-0.1, 0.05, 0.1], **base)
    report = OWLPruner(config).prune(model, dataset=calib_ids(12))
    shifted = [c for c in report.candidates if c.layerwise.endswith(", screened") and "attention_shift" in c.knob]
    assert sorted(c.knob["attention_shift"] for c in shifted) == [-0.1, 0.05, 0.1]
    assert len({c.loss for c in shifted}) == 3  # each split is scored on its own (not merged with the unsplit plans)
    (chosen,) = [c for c in report.candidates if c.chosen]
    assert chosen.knob.get("attention_shift") == 0.1 and report.allocation["knob"] == chosen.knob
    assert all(b.attention_sparsity == pytest.approx(b.target_sparsity + 0.1) for b in report.blocks)
    # the refit is what a direct run with the chosen family, knob and shift gives
    direct = copy.deepcopy(dense)
    knob = dict(chosen.knob)
    shift = knob.pop("attention_shift")
    layerwise = chosen.family
    OWLPruner(OWLPrunerConfig(layerwise=layerwise, attention_shift=shift, **knob, **base)).prune(direct, dataset=calib_ids(12))
    weights = lambda m: [p for p in m.model.layers.parameters() if p.dim() == 2]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(direct)))


def test_auto_attention_shifts_are_validated():
    with pytest.raises(OWLConfigError, match="auto_attention_shifts"):
        OWLPrunerConfig(auto_attention_shifts=[0.05, 1.5])
    with pytest.raises(OWLConfigError, match="auto_attention_shifts"):
        OWLPrunerConfig(auto_attention_shifts=[0.05], pattern="2:4")
    assert OWLPrunerConfig(auto_attention_shifts=[-0.05, 0.05]).auto_attention_shifts == [-0.05, 0.05]
