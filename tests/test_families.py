"""OWL's successors as allocation families: DLP, AlphaPruning, ATP (hand-worked cases, the mean contract, runs)."""

import math

import pytest
import torch

from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.algorithms.allocation import (
    MAX_BLOCK_SPARSITY,
    alphapruning_allocation,
    atp_allocation,
    clamp_preserving_mean,
    dlp_allocation,
    esd_alpha,
    weighted_mean,
)
from optimum_owl.errors import OWLConfigError

from .conftest import calib_ids, tiny_model


def test_dlp_worked_example():
    # m = 1, 2, 3: Σm = 6, I = 1 − m/6 = 5/6, 4/6, 3/6, min-max -> Ĩ = 1, 0.5, 0; s = 0.7 − 0.3·Ĩ + 0.15
    s, clamped = dlp_allocation([1.0, 2.0, 3.0], 0.7, 0.15)
    assert s == pytest.approx([0.55, 0.70, 0.85]) and not clamped
    # the larger a block's mean Wanda score, the more it is pruned; the spread is exactly 2α
    s, _ = dlp_allocation([4.0, 1.0, 2.0, 3.0], 0.5, 0.1)
    assert s == pytest.approx([0.6, 0.4, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3]) and max(s) - min(s) == pytest.approx(0.2)
    assert dlp_allocation([2.0, 2.0, 2.0], 0.6, 0.15)[0] == [0.6, 0.6, 0.6]  # equal scores: uniform, no NaN


def test_alphapruning_worked_example():
    # α̃ = 0, 0.5, 1 -> r = 0.8, 1.0, 1.2 (mean 1) -> s = 0.6·r
    s, clamped = alphapruning_allocation([2.0, 3.0, 4.0], 0.6, 0.2)
    assert s == pytest.approx([0.48, 0.60, 0.72]) and not clamped
    # r = 0.7, 0.7, 1.3 (mean 0.9): scaled by 0.5/0.9 so the mean is exactly S
    s, _ = alphapruning_allocation([1.0, 1.0, 5.0], 0.5, 0.3)
    assert s == pytest.approx([0.35 / 0.9, 0.35 / 0.9, 0.65 / 0.9]) and sum(s) / 3 == pytest.approx(0.5)


def test_atp_worked_example():
    assert atp_allocation(4, 0.7, 0.02)[0] == pytest.approx([0.67, 0.69, 0.71, 0.73])
    assert atp_allocation(3, 0.5, 0.0)[0] == [0.5, 0.5, 0.5]
    assert atp_allocation(1, 0.5, 0.1)[0] == [0.5]


def test_parameter_weighted_mean_is_exactly_the_target():
    weights = [1.0, 1.0, 2.0]  # the last block has twice the prunable weights
    for (s, _), target in (
        (dlp_allocation([1.0, 2.0, 3.0], 0.7, 0.15, weights), 0.7),
        (alphapruning_allocation([2.0, 3.0, 4.0], 0.6, 0.2, weights), 0.6),
        (atp_allocation(3, 0.7, 0.05, weights), 0.7),
    ):
        assert weighted_mean(s, weights) == pytest.approx(target, abs=1e-9)
    # DLP worked with weights: raw 0.85, 0.70, 0.55 shifted by −0.0375 to a weighted mean of 0.7
    s, _ = dlp_allocation([1.0, 2.0, 3.0], 0.7, 0.15, weights)
    assert s == pytest.approx([0.5125, 0.6625, 0.8125])


def test_clamping_keeps_the_mean_like_owl():
    # ATP at 90% with a large β: raw 0.7, 0.9, 1.1 -> the top block is clamped, the others shifted up together
    s, clamped = atp_allocation(3, 0.9, 0.2)
    assert clamped and max(s) == pytest.approx(MAX_BLOCK_SPARSITY) and sum(s) / 3 == pytest.approx(0.9)
    assert s[1] - s[0] == pytest.approx(0.2)  # unclamped blocks keep their difference
    s, clamped = alphapruning_allocation([1.0, 2.0, 9.0], 0.8, 0.5, [3.0, 1.0, 1.0])
    assert clamped and all(0 <= v <= MAX_BLOCK_SPARSITY for v in s)
    assert weighted_mean(s, [3.0, 1.0, 1.0]) == pytest.approx(0.8)
    values, _ = clamp_preserving_mean([0.5, 1.2], 0.0, 1.0, weights=[3.0, 1.0])  # weighted mean 0.675 kept
    assert values == pytest.approx([0.5666666666, 1.0]) and weighted_mean(values, [3.0, 1.0]) == pytest.approx(0.675)


def _power_law_matrix(alpha: float, n: int = 200, seed: int = 0) -> torch.Tensor:
    """A matrix whose squared singular values are the quantiles of a Pareto law p(λ) ∝ λ^(−alpha), λ ≥ 1."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    eigs = (1.0 - q) ** (-1.0 / (alpha - 1.0))
    u, _ = torch.linalg.qr(torch.randn(2 * n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (u * eigs.sqrt()) @ v.T


@pytest.mark.parametrize("alpha", [2.5, 4.0])
def test_esd_alpha_recovers_a_known_power_law(alpha):
    assert esd_alpha(_power_law_matrix(alpha)) == pytest.approx(alpha, rel=0.12)


def test_esd_alpha_orders_heavier_tails_lower_and_handles_degenerate_matrices():
    assert esd_alpha(_power_law_matrix(2.5)) < esd_alpha(_power_law_matrix(4.0))
    assert esd_alpha(torch.zeros(4, 4)) == 0.0
    assert math.isfinite(esd_alpha(torch.randn(64, 32)))


@pytest.mark.parametrize(
    "layerwise, knob, metric",
    [("dlp", {"dlp_alpha": 0.1}, "mean Wanda score"), ("alphapruning", {"alphapruning_epsilon": 0.3}, "ESD α"),
     ("atp", {"atp_beta": 0.05}, None)],
)
def test_family_runs_record_the_allocation_in_the_report(layerwise, knob, metric):
    model = tiny_model("llama", layers=4)
    config = OWLPrunerConfig(sparsity=0.6, layerwise=layerwise, num_samples=4, seqlen=16, **knob)
    report = OWLPruner(config).prune(model, dataset=calib_ids(4))
    targets = report.block_sparsities
    assert sum(targets) / len(targets) == pytest.approx(0.6, abs=1e-9) and len(set(targets)) > 1
    assert report.allocation == {"family": layerwise, "knob": knob, "metric": metric}
    assert all((b.metric is not None) == (metric is not None) for b in report.blocks)
    assert all(b.outlier_ratio is None for b in report.blocks)
    table = report.block_table()
    assert (metric in table.splitlines()[0]) if metric else table.count("|---:") == 4
    if layerwise == "atp":
        assert targets == pytest.approx([0.525, 0.575, 0.625, 0.675])


def test_data_free_families_with_magnitude_need_no_calibration_data():
    for layerwise in ("atp", "alphapruning"):
        model = tiny_model("gpt2", layers=3)  # Conv1D weights are stored transposed; the spectrum is the same
        report = OWLPruner(OWLPrunerConfig(sparsity=0.5, method="magnitude", layerwise=layerwise)).prune(model)
        assert report.calibration["source"].startswith("none") and report.sparsity == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    "kwargs, field",
    [(dict(dlp_alpha=-0.1), "dlp_alpha"), (dict(alphapruning_epsilon=1.0), "alphapruning_epsilon"),
     (dict(atp_beta=float("nan")), "atp_beta"), (dict(layerwise="dlp", pattern="2:4", nm_mixed=True), "nm_mixed"),
     (dict(layerwise="auto", checkpoint_dir="x"), "checkpoint_dir"), (dict(auto_holdout_tokens=-1), "auto_holdout_tokens"),
     (dict(auto_holdout_tokens=1.5), "auto_holdout_tokens")],
)
def test_family_fields_are_validated(kwargs, field):
    with pytest.raises(OWLConfigError, match=field):
        OWLPrunerConfig(**kwargs)


# ------------------------------------------------------------------------------------------------ layerwise="auto"
def _auto_config(**kw) -> OWLPrunerConfig:
    base = dict(
        sparsity=0.7, layerwise="auto", num_samples=12, seqlen=16, batch_size=3, auto_holdout=0.25,
        auto_owl_ms=[3.0], auto_owl_lambdas=[0.05, 0.15], auto_dlp_alphas=[0.1], auto_alphapruning_epsilons=[0.3],
        auto_atp_betas=[0.1],
    )
    base.update(kw)
    return OWLPrunerConfig(**base)


def _block_weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.model.layers.parameters() if p.dim() == 2]


def _rising_losses(model, ids, batch_size):
    """Fake per-token scoring that rewards sparsity rising with depth (last block minus first block)."""
    fractions = []
    for layer in model.model.layers:
        ws = [p for p in layer.parameters() if p.dim() == 2]
        fractions.append(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))
    return torch.full((ids.shape[0], 3), 1.0 - (fractions[-1] - fractions[0]), dtype=torch.float64)


def test_auto_searches_every_family_and_refits_the_winner_like_a_direct_run(monkeypatch):
    import copy

    import optimum_owl.pruning.search.scoring as scoring

    monkeypatch.setattr(scoring, "token_losses", _rising_losses)
    model = tiny_model("llama", layers=3)
    dense = copy.deepcopy(model)
    ids = calib_ids(12)
    report = OWLPruner(_auto_config()).prune(model, dataset=ids)
    screened = {c.family for c in report.candidates if c.layerwise.endswith(", screened")}
    assert screened == {"uniform", "owl", "dlp", "alphapruning", "atp"}
    # OWL by coordinates: λ along the configured M = 5 (0.05, 0.08, 0.15), then M = 3 at the best λ
    owl = [c.knob for c in report.candidates if c.layerwise == "owl, screened"]
    assert [k["owl_m"] for k in owl] == [5.0, 5.0, 5.0, 3.0] and owl[-1]["owl_lambda"] in (0.05, 0.08, 0.15)
    exact = [c for c in report.candidates if not c.layerwise.endswith(", screened")]
    assert exact[0].family == "uniform" and exact[0].gain_z is None
    assert any(c.family == "owl" and c.knob == {"owl_m": 5.0, "owl_lambda": 0.08} for c in exact)  # paper default
    (chosen,) = [c for c in report.candidates if c.chosen]
    assert chosen.family != "uniform" and chosen.loss == min(c.loss for c in exact)
    assert report.allocation["family"] == chosen.family and report.allocation["knob"] == chosen.knob
    direct = copy.deepcopy(dense)
    kw = dict(layerwise=chosen.family, **chosen.knob)
    OWLPruner(_auto_config(**kw)).prune(direct, dataset=ids)
    assert all(torch.equal(a, b) for a, b in zip(_block_weights(model), _block_weights(direct)))
    assert report.block_sparsities == direct.owl_report.block_sparsities
    assert "gain z" in report.to_markdown()


def _spread_between(low: float, high: float):
    """Fake per-token scoring on the exact check (4 windows here) that rewards a spread of block sparsities between
    `low` and `high`; the screening (3 windows) is scored by `_rising_losses`."""

    def fake(model, ids, batch_size):
        if ids.shape[0] != 4:
            return _rising_losses(model, ids, batch_size)
        fractions = []
        for layer in model.model.layers:
            ws = [p for p in layer.parameters() if p.dim() == 2]
            fractions.append(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))
        spread = max(fractions) - min(fractions)
        return torch.full((ids.shape[0], 3), 1.0 - spread if low < spread < high else 1.0 + spread, dtype=torch.float64)

    return fake


@pytest.mark.parametrize(
    "method, kw, fake, winner, exact_prunes",
    [("wanda", dict(auto_families=["atp"]), _rising_losses, "atp", 2),
     # ATP screens best and is checked last; AlphaPruning (small ε: a small spread) wins the exact check, so it is
     # pruned once more after ATP
     ("sparsegpt", dict(auto_families=["atp", "alphapruning"], auto_finalists=2, alphapruning_epsilon=0.05,
                        auto_alphapruning_epsilons=[0.05]), _spread_between(0.0, 0.1), "alphapruning", 4),
     # the same with Wanda (mask-only): the winner is rebuilt from its packed masks, not pruned once more
     ("wanda", dict(auto_families=["atp", "alphapruning"], auto_finalists=2, alphapruning_epsilon=0.05,
                    auto_alphapruning_epsilons=[0.05]), _spread_between(0.0, 0.1), "alphapruning", 3),
     # every spread loses: uniform (pruned first) wins, rebuilt from its packed masks
     ("wanda", dict(auto_families=["atp", "alphapruning"], auto_finalists=2), _spread_between(0.0, 0.0), "uniform", 3)],
)
def test_auto_scores_on_windows_beyond_the_calibration_and_returns_the_model_it_scored(
    monkeypatch, method, kw, fake, winner, exact_prunes
):
    import copy

    import optimum_owl.pruning.search.scoring as scoring
    import optimum_owl.pruning.search.search as search
    from optimum_owl.pruning.data import draw_windows

    scored: list[int] = []
    monkeypatch.setattr(scoring, "token_losses", lambda m, ids, bs: scored.append(ids.shape[0]) or fake(m, ids, bs))
    prunes: list[int] = []
    real_prune_pass = search.prune_pass
    monkeypatch.setattr(search, "prune_pass", lambda *a, **k: prunes.append(1) or real_prune_pass(*a, **k))
    source = calib_ids(40, seqlen=24, seed=5)  # 40 documents of 24 tokens: 12 calibration windows of 16 and more
    model = tiny_model("llama", layers=3)
    dense = copy.deepcopy(model)
    config = _auto_config(method=method, auto_holdout_tokens=64, **kw)  # 4 windows of 16 tokens
    report = OWLPruner(config).prune(model, dataset=source)
    assert report.calibration["holdout_windows"] == 4 and report.calibration["holdout"].startswith("beyond")
    assert "scored on 4 windows beyond the calibration windows" in report.to_markdown()
    # the screening scores on the first 3 of them, the exact check on all 4: the table says which row is which
    assert "| screened (3 windows) | uniform |" in report.to_markdown() and "| exact (4 windows) | uniform |" in report.to_markdown()
    assert not any("auto_holdout_tokens" in w for w in report.warnings)
    (chosen,) = [c for c in report.candidates if c.chosen]
    assert chosen.family == winner
    # uniform and the finalists, the best screened last (and with SparseGPT the winner once more)
    assert len(prunes) == exact_prunes
    # the screening scores on as many windows as holding out would take (3 of 12), the exact check on all 4
    exact = [c for c in report.candidates if not c.layerwise.endswith(", screened")]
    assert set(scored) == {3, 4} and scored.count(4) == len(exact)
    # no refit: every calibration window was in the statistics, so the result is a direct run on the same data
    direct = copy.deepcopy(dense)
    OWLPruner(_auto_config(method=method, layerwise=winner, **chosen.knob)).prune(direct, dataset=source)
    assert all(torch.equal(a, b) for a, b in zip(_block_weights(model), _block_weights(direct)))
    assert report.block_sparsities == direct.owl_report.block_sparsities
    # and it is the model that was scored: its loss on the drawn windows is the chosen candidate's
    held = draw_windows(source, None, 12, 16, config.seed, extra=4)[1]
    assert float(scoring.chunk_losses(model, held, 3).mean()) == chosen.loss


def test_auto_holds_out_calibration_windows_when_the_source_has_no_other_text(monkeypatch):
    import optimum_owl.pruning.search.scoring as scoring

    monkeypatch.setattr(scoring, "token_losses", _rising_losses)
    ids = calib_ids(12)  # exactly [num_samples, seqlen]: used as is, nothing else to draw from
    report = OWLPruner(_auto_config(auto_families=["atp"])).prune(tiny_model("llama", layers=3), dataset=ids)
    assert any("auto_holdout_tokens" in w and "3 of the 12" in w for w in report.warnings)
    assert report.calibration["holdout_windows"] == 3 and report.calibration["holdout"].startswith("held out")
    quiet = OWLPruner(_auto_config(auto_families=["atp"], auto_holdout_tokens=0)).prune(
        tiny_model("llama", layers=3), dataset=ids)
    assert not any("auto_holdout_tokens" in w for w in quiet.warnings)
    assert quiet.block_sparsities == report.block_sparsities


def test_auto_scores_on_auto_holdout_dataset_and_keeps_every_calibration_window(monkeypatch):
    import copy

    import optimum_owl.pruning.search.scoring as scoring
    from optimum_owl.pruning.data import draw_windows

    scored: list[torch.Tensor] = []
    monkeypatch.setattr(scoring, "token_losses", lambda m, ids, bs: scored.append(ids.clone()) or _rising_losses(m, ids, bs))
    ids = calib_ids(12)  # exactly [num_samples, seqlen]: alone it would force holding calibration windows out
    other = calib_ids(10, seqlen=20, seed=9)  # the text to choose on: 4 windows of 16 drawn from it
    model = tiny_model("llama", layers=3)
    dense = copy.deepcopy(model)
    config = _auto_config(auto_families=["atp"], auto_holdout_tokens=64, auto_holdout_dataset=other)
    report = OWLPruner(config).prune(model, dataset=ids)
    assert not any("auto_holdout_tokens" in w for w in report.warnings)  # nothing held out of the calibration set
    assert report.calibration["holdout_windows"] == 4
    assert report.calibration["holdout"] == "of auto_holdout_dataset tensor[10, 20]"
    held = draw_windows(other, None, 4, 16, config.seed)[0]
    assert all(torch.equal(t, held[: t.shape[0]]) for t in scored)  # only that text was scored: 3 windows, then 4
    assert {t.shape[0] for t in scored} == {3, 4}
    (chosen,) = [c for c in report.candidates if c.chosen]
    assert chosen.family == "atp"
    direct = copy.deepcopy(dense)  # every calibration window went to the statistics: a direct run, no refit
    OWLPruner(_auto_config(layerwise="atp", **chosen.knob)).prune(direct, dataset=ids)
    assert all(torch.equal(a, b) for a, b in zip(_block_weights(model), _block_weights(direct)))


def test_auto_holdout_dataset_is_validated(tmp_path):
    from optimum_owl.errors import CalibrationDataError

    with pytest.raises(OWLConfigError, match="auto_holdout_dataset.*layerwise='auto' or 'owl-auto'"):
        OWLPrunerConfig(layerwise="owl", auto_holdout_dataset="val.jsonl")
    with pytest.raises(OWLConfigError, match="auto_holdout_tokens"):
        OWLPrunerConfig(layerwise="auto", auto_holdout_tokens=0, auto_holdout_dataset="val.jsonl")
    config = OWLPrunerConfig(layerwise="owl-auto", auto_holdout_dataset=tmp_path / "val.jsonl")
    assert config.to_dict()["auto_holdout_dataset"] == str(tmp_path / "val.jsonl")  # a path is kept, as a string
    assert OWLPrunerConfig.from_dict(config.to_dict()).auto_holdout_dataset == str(tmp_path / "val.jsonl")
    assert "auto_holdout_dataset" not in OWLPrunerConfig(layerwise="auto", auto_holdout_dataset=calib_ids(4)).to_dict()
    same = tmp_path / "c4.txt"
    same.write_text("some text " * 400)
    with pytest.raises(OWLConfigError, match="is the calibration source itself"):
        OWLPruner(_auto_config(auto_holdout_dataset=str(same))).prune(tiny_model("llama", layers=2), dataset=str(same))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(CalibrationDataError, match="^`auto_holdout_dataset`: .*empty"):
        OWLPruner(_auto_config(auto_holdout_dataset=str(empty))).prune(tiny_model("llama", layers=2),
                                                                       dataset=calib_ids(12))


def test_auto_keeps_uniform_when_no_family_beats_it_beyond_the_noise(monkeypatch):
    import optimum_owl.pruning.search.scoring as scoring

    def noisy(model, ids, batch_size):  # the gain flips sign from one held-out window to the next: only noise
        base = _rising_losses(model, ids, batch_size)
        signs = torch.tensor([(-1.0) ** i for i in range(ids.shape[0])], dtype=torch.float64).unsqueeze(1)
        return base + signs * (1.0 - base) * 3

    monkeypatch.setattr(scoring, "token_losses", noisy)
    report = OWLPruner(_auto_config(auto_families=["atp"])).prune(tiny_model("llama", layers=3), dataset=calib_ids(12))
    (chosen,) = [c for c in report.candidates if c.chosen]
    assert chosen.family == "uniform" and report.block_sparsities == [0.7, 0.7, 0.7]


def test_chunks_and_holdout_size_for_small_calibration_sets():
    from optimum_owl.pruning.search.scoring import CHUNK_TOKENS, chunk_losses, token_losses
    from optimum_owl.pruning.search.windows import holdout_count

    assert holdout_count(16, 0.125) == 4 and holdout_count(64, 0.125) == 8 and holdout_count(8, 0.125) == 2
    model = tiny_model("llama", layers=2)
    ids = calib_ids(2, seqlen=2 * CHUNK_TOKENS + 1)
    chunks = chunk_losses(model, ids, 2)
    assert chunks.shape == (4,)
    assert float(chunks.mean()) == pytest.approx(float(token_losses(model, ids, 2).mean()))


def test_auto_fields_are_validated():
    with pytest.raises(OWLConfigError, match="auto_families"):
        OWLPrunerConfig(layerwise="auto", auto_families=["owl", "lsa"])
    with pytest.raises(OWLConfigError, match="auto_alphapruning_epsilons"):
        OWLPrunerConfig(layerwise="auto", auto_alphapruning_epsilons=[1.5])
    config = OWLPrunerConfig(layerwise="auto", auto_families="dlp", auto_atp_betas=[0.01])
    assert config.auto_families == ["dlp"] and OWLPrunerConfig.from_dict(config.to_dict()) == config
