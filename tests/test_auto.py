"""`layerwise="owl-auto"`: held-out windows, candidate choice, report, determinism, config errors."""

from __future__ import annotations

import copy

import pytest
import torch

from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.errors import OWLConfigError
from optimum_owl.pruning.report import PruneReport
from optimum_owl.pruning.search.scoring import beats_uniform
from optimum_owl.pruning.search.search import SCREEN_SUFFIX
from optimum_owl.pruning.search.windows import holdout_count

torch.set_num_threads(1)

N, SEQ = 12, 16


def _tiny_llama(layers: int = 3, seed: int = 0, head: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return (LlamaForCausalLM if head else LlamaModel)(config).eval()


def _ids(n: int = N, seqlen: int = SEQ, seed: int = 1) -> torch.LongTensor:
    return torch.randint(3, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _config(**kw) -> OWLPrunerConfig:
    base = dict(
        sparsity=0.7,
        method="wanda",
        layerwise="owl-auto",
        num_samples=N,
        seqlen=SEQ,
        batch_size=4,
        auto_holdout=0.25,
        auto_owl_ms=[2.0, 3.0],
        auto_owl_lambdas=[0.05, 0.15],
        auto_finalists=2,
    )
    base.update(kw)
    return OWLPrunerConfig(**base)


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for n, p in model.model.layers.named_parameters() if p.dim() == 2]


@pytest.fixture(scope="module")
def auto_run():
    model = _tiny_llama()
    dense = copy.deepcopy(model)
    ids = _ids()
    # batch_size 3 divides the 9 statistics windows and the 3 held-out ones, so the refit accumulates its sums in
    # the same batches and order as a direct run over all 12 windows (bit-identical results)
    report = OWLPruner(_config(batch_size=3)).prune(model, dataset=ids)
    return dense, model, ids, report


def test_holdout_count():
    assert holdout_count(128, 0.125) == 16
    assert holdout_count(12, 0.25) == 3
    assert holdout_count(3, 0.1) == 1


def test_beats_uniform_needs_a_gain_beyond_the_noise():
    uniform = torch.tensor([4.0, 4.2, 3.9, 4.1], dtype=torch.float64)
    assert beats_uniform(uniform - 0.1, uniform)  # the same gain on every window: no noise at all
    assert not beats_uniform(uniform + 0.01, uniform)  # worse
    noisy = uniform + torch.tensor([-0.3, 0.25, -0.2, 0.2], dtype=torch.float64)  # lower on average, within noise
    assert noisy.mean() < uniform.mean() and not beats_uniform(noisy, uniform)
    assert beats_uniform(noisy, uniform, z=0.0)
    assert beats_uniform(torch.tensor([3.0]), torch.tensor([3.5]))  # one window: plain comparison


def test_picks_the_lowest_exact_candidate_and_matches_a_direct_run(auto_run):
    dense, model, ids, report = auto_run
    exact = [c for c in report.candidates if not c.layerwise.endswith(SCREEN_SUFFIX)]
    screened = [c for c in report.candidates if c.layerwise.endswith(SCREEN_SUFFIX)]
    assert exact[0].layerwise == "uniform" and len(exact) == 3  # uniform + 2 finalists
    assert len(screened) >= 1 + 2  # uniform + at least one λ for each M
    chosen = [c for c in report.candidates if c.chosen]
    assert len(chosen) == 1 and chosen[0] in exact
    if chosen[0].owl_m is not None:  # an OWL winner has the lowest loss; uniform may win a noisy comparison
        assert chosen[0].loss == min(c.loss for c in exact)
    # The winner is refitted on every window: the model is exactly what a plain run with the chosen setting gives.
    c = chosen[0]
    kw = (
        dict(layerwise="uniform") if c.owl_m is None else dict(layerwise="owl", owl_m=c.owl_m, owl_lambda=c.owl_lambda)
    )
    direct = copy.deepcopy(dense)
    OWLPruner(_config(batch_size=3, **kw)).prune(direct, dataset=ids)
    for a, b in zip(_weights(model), _weights(direct)):
        assert torch.equal(a, b)
    assert [b.target_sparsity for b in report.blocks] == [b.target_sparsity for b in direct.owl_report.blocks]


def test_finalists_are_the_best_screened_owl_candidates(auto_run):
    _, _, _, report = auto_run
    screened = [c for c in report.candidates if c.layerwise == "owl" + SCREEN_SUFFIX]
    exact_owl = [(c.owl_m, c.owl_lambda) for c in report.candidates if c.layerwise == "owl"]
    best = sorted(screened, key=lambda c: (c.loss, c.owl_m, c.owl_lambda))
    assert exact_owl[0] == (best[0].owl_m, best[0].owl_lambda)


def test_report_shows_candidates(auto_run):
    _, _, _, report = auto_run
    text = report.to_markdown()
    assert "held-out loss" in text and "✓" in text and "| screened (3 windows) | owl owl_m=" in text
    again = PruneReport.from_json(report.to_json())
    assert again.candidates == report.candidates
    assert "auto_screen" in report.timings and "auto_exact" in report.timings


def test_candidate_table_labels_screened_and_exact_rows_and_explains_gain_z(auto_run):
    _, _, _, report = auto_run
    lines = report.candidate_table().splitlines()
    screened = [line for line in lines if line.startswith("| screened")]
    exact = [line for line in lines if line.startswith("| exact")]
    assert len(screened) == sum(c.layerwise.endswith(SCREEN_SUFFIX) for c in report.candidates) and len(exact) == 3
    # held out of the calibration windows (as here): the screening scores on every held-out window too
    assert screened[0].startswith("| screened (3 windows) | uniform |") and exact[0].startswith("| exact (3 windows) | uniform |")
    assert "*gain z*: how many standard errors" in lines[0] and "*Screened* rows" in lines[0]


def test_phase_timings_add_up_to_the_total(auto_run):
    """A phase run inside another (the prune passes of the search) is a part of it, not counted twice."""
    _, _, _, report = auto_run
    timings = report.timings
    top = {k: v for k, v in timings.items() if "/" not in k and k != "total"}
    assert sum(top.values()) <= timings["total"] + 1e-3
    nested = {k: v for k, v in timings.items() if "/" in k}
    assert {"auto_exact/prune_pass", "auto_refit/prune_pass"} <= set(nested)
    assert all(v <= timings[k.split("/")[0]] + 1e-3 for k, v in nested.items())
    line = next(x for x in report.to_markdown().splitlines() if x.startswith("- time (s): "))
    total, parts = line.removeprefix("- time (s): total ").split(" = ")
    values = [float(part.split(" (of which")[0].rsplit(" ", 1)[1]) for part in parts.split(" + ")]
    assert parts.split(" + ")[-1].startswith("other ") and "(of which prune_pass" in line
    assert sum(values) == pytest.approx(float(total), abs=0.005 * len(values))


def test_screening_shows_a_progress_bar(monkeypatch):
    import optimum_owl.pruning.search.search as search

    bars = []
    real = search.tqdm
    monkeypatch.setattr(search, "tqdm", lambda *a, **k: bars.append(real(*a, **k)) or bars[-1])
    report = OWLPruner(_config(auto_finalists=1)).prune(_tiny_llama(layers=2), dataset=_ids())
    (bar,) = bars
    screened = sum(c.layerwise.endswith(SCREEN_SUFFIX) for c in report.candidates)
    assert bar.n == screened and screened <= bar.total and bar.desc.startswith("owl-auto screening")


def test_holdout_windows_never_touch_statistics():
    """Changing only the held-out windows changes no statistic and no outlier ratio."""
    ids_a = _ids()
    ids_b = ids_a.clone()
    k = holdout_count(N, 0.25)
    ids_b[N - k :] = _ids(n=k, seed=99)
    states = []
    for ids in (ids_a, ids_b):
        from optimum_owl.pruning.engine import prepare
        from optimum_owl.pruning.modeling import get_blocks_and_units
        from optimum_owl.pruning.passes import RunState, outlier_pass
        from optimum_owl.pruning.runner import BlockRunner
        from optimum_owl.pruning.search.holdout import split_holdout

        model = _tiny_llama()
        path, blocks, units = get_blocks_and_units(model)
        from optimum_owl.pruning.search.state import SearchState

        state = RunState(config=_config(), model=model, path=path, blocks=blocks, units=units,
                         runner=BlockRunner(model, blocks), layerwise="owl-auto")
        search = SearchState.open("owl-auto", state.config)
        with torch.no_grad():
            prepare(state, ids, None, search)
            split_holdout(state, search)
            outlier_pass(state)
        states.append((state, search))
    (a, search_a), (b, search_b) = states
    assert torch.equal(search_a.ids, ids_a[N - k :]) and torch.equal(search_b.ids, ids_b[N - k :])
    assert sum(x.hidden.shape[0] for x in a.inputs0) == N - k
    assert a.outlier_ratios == b.outlier_ratios
    for sa, sb, units in zip(a.dense_stats, b.dense_stats, a.units):
        for u in units:
            assert sa[u.name].tokens == (N - k) * SEQ
            assert torch.equal(sa[u.name].sum_sq, sb[u.name].sum_sq)


def test_deterministic():
    ids = _ids()
    reports, weights = [], []
    for _ in range(2):
        model = _tiny_llama()
        reports.append(OWLPruner(_config(auto_finalists=1)).prune(model, dataset=ids))
        weights.append(_weights(model))
    assert reports[0].candidates == reports[1].candidates
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_uniform_wins_when_owl_only_hurts(monkeypatch):
    """With a scoring that penalises any spread of block sparsities, auto falls back to uniform."""
    import optimum_owl.pruning.search.scoring as auto

    monkeypatch.setattr(auto, "token_losses", _spread_losses(1.0))
    model = _tiny_llama()
    dense = copy.deepcopy(model)
    ids = _ids()
    report = OWLPruner(_config(auto_finalists=1)).prune(model, dataset=ids)
    chosen = [c for c in report.candidates if c.chosen]
    assert chosen[0].layerwise == "uniform"
    assert {b.target_sparsity for b in report.blocks} == {0.7}
    assert report.blocks[0].outlier_ratio is None
    # choosing uniform costs no calibration data: the result is a direct uniform run on all 12 windows
    direct = copy.deepcopy(dense)
    OWLPruner(_config(layerwise="uniform")).prune(direct, dataset=ids)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(direct)))


def _spread_losses(sign: float):
    """Fake per-token scoring: one token per window whose loss rises (sign 1) or falls (sign -1) with the spread of the
    block sparsities."""

    def fake(model, ids, batch_size):
        fractions = []
        for layer in model.model.layers:
            ws = [p for p in layer.parameters() if p.dim() == 2]
            fractions.append(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))
        return torch.full((ids.shape[0], 1), 1.0 + sign * (max(fractions) - min(fractions)), dtype=torch.float64)

    return fake


def test_owl_winner_is_refitted_like_a_direct_owl_run(monkeypatch):
    import optimum_owl.pruning.search.scoring as auto

    monkeypatch.setattr(auto, "token_losses", _spread_losses(-1.0))
    model = _tiny_llama()
    dense = copy.deepcopy(model)
    ids = _ids()
    report = OWLPruner(_config(batch_size=3)).prune(model, dataset=ids)
    chosen = [c for c in report.candidates if c.chosen][0]
    assert chosen.layerwise == "owl"
    direct = copy.deepcopy(dense)
    OWLPruner(_config(batch_size=3, layerwise="owl", owl_m=chosen.owl_m, owl_lambda=chosen.owl_lambda)).prune(
        direct, dataset=ids
    )
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), _weights(direct)))
    assert [b.outlier_ratio for b in report.blocks] == [b.outlier_ratio for b in direct.owl_report.blocks]
    assert report.calibration["num_samples"] == N


def test_sparsegpt_checks_the_configured_setting_exactly():
    report = OWLPruner(_config(method="sparsegpt", auto_finalists=1, owl_m=3.0, owl_lambda=0.15)).prune(
        _tiny_llama(layers=2), dataset=_ids()
    )
    exact_owl = [(c.owl_m, c.owl_lambda) for c in report.candidates if c.layerwise == "owl"]
    assert (3.0, 0.15) in exact_owl and 1 <= len(exact_owl) <= 2


def test_sparsegpt_and_dsnot_run():
    ids = _ids()
    for kw in (dict(method="sparsegpt"), dict(refine="dsnot")):
        model = _tiny_llama(layers=2)
        report = OWLPruner(_config(auto_finalists=1, **kw)).prune(model, dataset=ids)
        assert sum(c.chosen for c in report.candidates) == 1
        assert abs(report.sparsity - 0.7) < 0.03


def test_needs_a_language_model_head():
    with pytest.raises(OWLConfigError, match="language"):
        OWLPruner(_config()).prune(_tiny_llama(head=False), dataset=_ids())


def test_too_few_windows():
    with pytest.raises(OWLConfigError, match="`num_samples`"):
        OWLPruner(_config(num_samples=1)).prune(_tiny_llama(), dataset=_ids(n=1))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(auto_holdout=0.0), "auto_holdout"),
        (dict(auto_holdout=0.75), "auto_holdout"),
        (dict(auto_holdout="x"), "auto_holdout"),
        (dict(auto_owl_ms=[]), "auto_owl_ms"),
        (dict(auto_owl_ms=[5, -1]), "auto_owl_ms"),
        (dict(auto_owl_lambdas=[-0.1]), "auto_owl_lambdas"),
        (dict(auto_owl_lambdas=[float("nan")]), "auto_owl_lambdas"),
        (dict(auto_finalists=0), "auto_finalists"),
        (dict(auto_finalists=True), "auto_finalists"),
    ],
)
def test_bad_auto_fields(kwargs, field):
    with pytest.raises(OWLConfigError, match=f"`{field}`"):
        OWLPrunerConfig(**kwargs)


def test_auto_fields_round_trip():
    config = OWLPrunerConfig(layerwise="owl-auto", auto_owl_ms=4, auto_owl_lambdas=[0.1, 0.2], auto_holdout=0.2)
    assert config.auto_owl_ms == [4.0]
    assert OWLPrunerConfig.from_dict(config.to_dict()) == config
