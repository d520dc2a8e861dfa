"""DSnoT-style refinement (`optimum_owl.algorithms.dsnot`) and its use through `OWLPrunerConfig(refine="dsnot")`."""

from __future__ import annotations

import copy

import pytest
import torch

from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.algorithms.dsnot import dsnot_keep_mask, expected_row_error
from optimum_owl.algorithms.masks import keep_mask_nm, keep_mask_per_row
from optimum_owl.errors import OWLConfigError

torch.set_num_threads(1)


def _tiny_llama(layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

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
    return LlamaForCausalLM(config).eval()


def _ids(n: int = 8, seqlen: int = 16, seed: int = 1) -> torch.LongTensor:
    return torch.randint(3, 96, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _case(rows: int = 24, cols: int = 48, tokens: int = 4096, seed: int = 0):
    """A weight, inputs with clearly non-zero feature means, and Wanda's 50% per-row mask."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(tokens, cols, generator=g) * (0.5 + torch.rand(cols, generator=g)) + 2.0 * torch.randn(
        cols, generator=g
    )
    mean, mean_sq = X.mean(0), X.pow(2).mean(0)
    keep = keep_mask_per_row(W.abs() * mean_sq.sqrt(), 0.5)
    return W, X, mean, mean_sq, keep


def test_keeps_row_counts_and_never_raises_the_objective():
    W, _, mean, mean_sq, keep = _case()
    refined = dsnot_keep_mask(W, keep, mean, mean_sq, cycles=50, threshold=0.0)
    assert torch.equal(refined.sum(1), keep.sum(1))
    assert not torch.equal(refined, keep), "non-zero means should give the refinement something to do"
    before, after = expected_row_error(W, keep, mean, mean_sq), expected_row_error(W, refined, mean, mean_sq)
    assert bool((after <= before * (1 + 1e-5) + 1e-6).all())
    assert float(after.sum()) < 0.9 * float(before.sum())


def test_lowers_the_measured_reconstruction_error():
    W, X, mean, mean_sq, keep = _case(seed=3)
    refined = dsnot_keep_mask(W, keep, mean, mean_sq)

    def err(k: torch.Tensor) -> float:
        return float(((W - W * k) @ X.t()).pow(2).sum())

    assert err(refined) < 0.9 * err(keep)


def test_nm_groups_keep_their_counts():
    W, _, mean, mean_sq, _ = _case(rows=8, cols=32, seed=5)
    keep = keep_mask_nm(W.abs() * mean_sq.sqrt(), 2, 4)
    refined = dsnot_keep_mask(W, keep, mean, mean_sq, nm=(2, 4), threshold=0.0)
    assert torch.equal(refined.reshape(8, 8, 4).sum(-1), keep.reshape(8, 8, 4).sum(-1))


def test_zero_mean_inputs_and_threshold_stop():
    W, _, _, _, keep = _case(seed=2)
    mean, mean_sq = torch.zeros(W.shape[1]), torch.ones(W.shape[1])
    # With zero means and unit variances, Wanda's mask is already optimal for the objective: nothing to swap.
    keep = keep_mask_per_row(W.abs(), 0.5)
    assert torch.equal(dsnot_keep_mask(W, keep, mean, mean_sq, threshold=0.0), keep)


def test_shape_errors():
    W, _, mean, mean_sq, keep = _case()
    with pytest.raises(ValueError, match="shape"):
        dsnot_keep_mask(W, keep[:, :-1], mean, mean_sq)
    with pytest.raises(ValueError, match="mean"):
        dsnot_keep_mask(W, keep, mean[:-1], mean_sq)


def _block_outputs(model, ids):
    hidden = []
    handle = model.model.layers[-1].register_forward_hook(
        lambda m, a, o: hidden.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return hidden[0]


def test_pruner_refine_keeps_row_sparsity_and_lowers_block_error():
    ids = _ids(n=8, seqlen=32)
    dense = _tiny_llama(layers=1, seed=4)
    plain, refined = copy.deepcopy(dense), copy.deepcopy(dense)
    base = dict(sparsity=0.6, method="wanda", layerwise="uniform", num_samples=8, seqlen=32, batch_size=4)
    OWLPruner(OWLPrunerConfig(**base)).prune(plain, dataset=ids)
    report = OWLPruner(OWLPrunerConfig(**base, refine="dsnot")).prune(refined, dataset=ids)
    assert report.config["refine"] == "dsnot"
    changed = 0
    for (name, p), (_, r) in zip(plain.model.layers.named_parameters(), refined.model.layers.named_parameters()):
        if p.dim() != 2:
            continue
        assert torch.equal((p == 0).sum(1), (r == 0).sum(1)), name
        changed += int(((p == 0) != (r == 0)).sum())
    assert changed > 0
    target = _block_outputs(dense, ids)
    err_plain = float((_block_outputs(plain, ids) - target).pow(2).sum())
    err_refined = float((_block_outputs(refined, ids) - target).pow(2).sum())
    assert err_refined <= err_plain


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(refine="dsnt"), "refine"),
        (dict(refine="dsnot", method="sparsegpt"), "refine"),
        (dict(refine="dsnot", method="magnitude"), "refine"),
        (dict(dsnot_cycles=0), "dsnot_cycles"),
        (dict(dsnot_cycles=2.5), "dsnot_cycles"),
        (dict(dsnot_threshold=-0.1), "dsnot_threshold"),
        (dict(dsnot_threshold=1.0), "dsnot_threshold"),
    ],
)
def test_bad_refine_fields(kwargs, field):
    with pytest.raises(OWLConfigError, match=f"`{field}`"):
        OWLPrunerConfig(**kwargs)


def test_refine_round_trips():
    config = OWLPrunerConfig(refine="DSnoT", dsnot_cycles=7, dsnot_threshold=0.01)
    assert config.refine == "dsnot"
    assert OWLPrunerConfig.from_dict(config.to_dict()) == config
