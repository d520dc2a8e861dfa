"""Pruning with int8 values (issue 27): the config fields, SparseGPT's joint prune-and-quantize, round to nearest for
the other criteria, the report's quantization errors, resumable runs and the searches."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.algorithms.criteria.sparsegpt_math import sparsegpt_prune, sparsegpt_prune_int8
from optimum_owl.algorithms.quantize import QMAX, dequantize_int8, quantize_int8
from optimum_owl.config_flags import add_config_arguments, config_flags, config_from_args
from optimum_owl.errors import OWLConfigError
from optimum_owl.formats import int8_grid
from optimum_owl.pruning.modeling import get_blocks_and_units

from .conftest import calib_ids, tiny_model


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _units(model):
    return [u for block in get_blocks_and_units(model)[2] for u in block]


def _config(**kwargs) -> OWLPrunerConfig:
    base = dict(sparsity=0.5, layerwise="uniform", num_samples=8, seqlen=16, batch_size=4)
    return OWLPrunerConfig(**{**base, **kwargs})


# ------------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(values="int4"), "values"),
    (dict(values=8), "values"),
    (dict(values="int8", group_size=100), "group_size"),
    (dict(values="int8", group_size=32), "group_size"),
    (dict(values="int8", group_size=0), "group_size"),
    (dict(values="int8", group_size=True), "group_size"),
    (dict(values="int8", group_size="128"), "group_size"),
    (dict(group_size=128), "group_size"),  # float values have no scales
])
def test_config_refuses_bad_values_fields_naming_the_field(kwargs, field):
    with pytest.raises(OWLConfigError, match=f"`{field}`"):
        OWLPrunerConfig(**kwargs)


def test_config_values_serialise_and_float_configs_keep_their_json():
    assert OWLPrunerConfig(values="INT8").values == "int8"
    plain = OWLPrunerConfig().to_dict()
    assert "values" not in plain and "group_size" not in plain  # a float config's JSON is what it was before
    config = OWLPrunerConfig(values="int8", group_size=128)
    data = config.to_dict()
    assert (data["values"], data["group_size"]) == ("int8", 128)
    assert OWLPrunerConfig.from_dict(data) == config
    assert OWLPrunerConfig.from_json(config.to_json_string()) == config
    assert OWLPrunerConfig.from_dict(plain).values == "float"


def test_cli_flags_build_and_reproduce_the_values_fields():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    config = config_from_args(parser.parse_args(["--values", "int8", "--group-size", "128"]))
    assert (config.values, config.group_size) == ("int8", 128)
    flags = config_flags(config.to_dict())
    assert flags[flags.index("--values") + 1] == "int8" and flags[flags.index("--group-size") + 1] == "128"
    assert "--values" not in config_flags(OWLPrunerConfig().to_dict())
    with pytest.raises(SystemExit):
        parser.parse_args(["--values", "int4"])


# ------------------------------------------------------------------------------------------------------- math
def _correlated_case(rows: int = 48, cols: int = 96, samples: int = 512, seed: int = 0):
    """A weight and the Hessian of strongly correlated inputs (a few latent factors plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(samples, 6, generator=g)
    mix = torch.randn(6, cols, generator=g)
    x = latent @ mix + 0.05 * torch.randn(samples, cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    return w, x.t() @ x


@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_joint_sparsegpt_beats_round_to_nearest_on_correlated_inputs(sparsity, group_size):
    w, h = _correlated_case()
    result = sparsegpt_prune_int8(w, h, sparsity, blocksize=32, group_size=group_size)
    assert 0 < result.joint_error < result.rtn_error
    # the errors are what they claim: ||(W_f - Q)X|| / ||W_f X|| from H = X^T X, W_f the float result
    float_w, _ = sparsegpt_prune(w, h, sparsity, blocksize=32)
    diff = (float_w - result.weight).double()
    expected = math.sqrt(float((diff @ h.double() * diff).sum()) / float((float_w.double() @ h.double() * float_w.double()).sum()))
    assert result.joint_error == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("group_size", [None, 64])
def test_joint_sparsegpt_keeps_zeros_and_puts_every_kept_value_on_the_grid(nm, group_size):
    w, h = _correlated_case(rows=40, cols=128, seed=3)
    w_in, h_in = w.clone(), h.clone()
    result = sparsegpt_prune_int8(w, h, 0.6, nm=nm, blocksize=64, group_size=group_size)
    assert torch.equal(w, w_in) and torch.equal(h, h_in)  # inputs untouched
    assert result.codes.dtype == torch.int8 and int(result.codes.abs().max()) <= QMAX
    assert result.scales.dtype == torch.float32
    assert result.scales.shape == ((40,) if group_size is None else (40, 2))
    assert not bool(result.codes[~result.keep].any())  # pruned: code 0 ...
    assert not bool(result.weight[~result.keep].any())  # ... and value 0
    # every value is code * scale exactly, and rounding the values on the scales gives the codes back
    assert torch.equal(result.weight, dequantize_int8(result.codes, result.scales, group_size))
    assert torch.equal(quantize_int8(result.weight, result.scales, group_size), result.codes)
    if nm is not None:
        assert int(result.keep.reshape(40, -1, 4).sum(-1).max()) <= 2
    else:
        assert float((~result.keep).float().mean()) == pytest.approx(0.6, abs=0.01)


def test_float_sparsegpt_is_unchanged_by_the_joint_form():
    w, h = _correlated_case(rows=16, cols=64, seed=5)
    a, keep_a = sparsegpt_prune(w, h, 0.5, blocksize=32)
    b, keep_b = sparsegpt_prune(w, h, 0.5, blocksize=32)
    assert torch.equal(_bits(a), _bits(b)) and torch.equal(keep_a, keep_b)


# ------------------------------------------------------------------------------------------------------- runs
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_pruned_int8_weights_are_on_their_recorded_grid(arch, method):
    model = tiny_model(arch)
    report = OWLPruner(_config(method=method, values="int8")).prune(model, dataset=calib_ids())
    units = _units(model)
    assert set(report.quantization["layers"]) == {u.name for u in units}
    assert report.quantization["quantized"] == ("joint" if method == "sparsegpt" else "rtn")
    assert report.quantization["error"] == ("outputs" if method == "sparsegpt" else "weights")
    for unit in units:
        w, grid = unit.weight(), int8_grid(unit.module)
        assert grid is not None and grid.group_size is None and grid.scales.shape == (unit.shape[0],)
        codes = quantize_int8(w, grid.scales)
        assert torch.equal(_bits(dequantize_int8(codes, grid.scales, None, w.dtype)), _bits(w))
        errors = report.quantization["layers"][unit.name]
        assert set(errors) == ({"rtn", "joint"} if method == "sparsegpt" else {"rtn"})
        assert all(0 < e < 0.05 for e in errors.values())
    for way, mean in report.quantization["mean"].items():
        layers = [e[way] for e in report.quantization["layers"].values()]
        assert mean == pytest.approx(sum(layers) / len(layers), abs=1e-7)
    assert report.sparsity >= 0.5  # a kept weight that rounds to 0 is a zero too
    assert "values: int8" in report.to_markdown()


def test_round_to_nearest_gives_the_same_mask_as_float_values():
    """RTN never revives a pruned weight: the int8 run's zeros are the float run's plus the kept weights that
    round to zero, and its kept weights are the float ones rounded (dense propagation: every block's statistics
    come from dense inputs, so the int8 blocks before it do not change its mask)."""
    a, b = tiny_model("llama"), tiny_model("llama")
    OWLPruner(_config(method="wanda", propagation="dense")).prune(a, dataset=calib_ids())
    OWLPruner(_config(method="wanda", propagation="dense", values="int8", group_size=64)).prune(b, dataset=calib_ids())
    for ua, ub in zip(_units(a), _units(b)):
        wa, wb = ua.weight(), ub.weight()
        assert not bool(wb[wa == 0].any())
        grid = int8_grid(ub.module)
        assert torch.equal(wb, dequantize_int8(quantize_int8(wa, grid.scales, 64) * (wa != 0), grid.scales, 64))


def test_float_runs_report_no_quantization():
    model = tiny_model("llama")
    report = OWLPruner(_config(method="wanda")).prune(model, dataset=calib_ids())
    assert report.quantization == {} and "quantization" not in report.to_dict()
    assert all(int8_grid(u.module) is None for u in _units(model))


def test_bfloat16_model_keeps_codes_times_scales_in_its_dtype():
    model = tiny_model("llama").to(torch.bfloat16)
    OWLPruner(_config(method="sparsegpt", values="int8")).prune(model, dataset=calib_ids())
    for unit in _units(model):
        w, grid = unit.weight(), int8_grid(unit.module)
        codes = quantize_int8(w, grid.scales)
        assert w.dtype == torch.bfloat16
        assert torch.equal(_bits(dequantize_int8(codes, grid.scales, None, torch.bfloat16)), _bits(w))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_resumed_int8_run_restores_weights_grids_and_errors(tmp_path, method):
    config = _config(method=method, values="int8", group_size=64, checkpoint_dir=str(tmp_path / "ckpt"))
    first = tiny_model("llama")
    report = OWLPruner(config).prune(first, dataset=calib_ids())
    again = tiny_model("llama")  # fresh model: every block is restored from the checkpoint folder
    resumed = OWLPruner(config).prune(again, dataset=calib_ids())
    assert any("Resumed" in w for w in resumed.warnings)
    assert resumed.quantization == report.quantization
    for ua, ub in zip(_units(first), _units(again)):
        assert torch.equal(_bits(ua.weight()), _bits(ub.weight()))
        assert torch.equal(int8_grid(ua.module).scales, int8_grid(ub.module).scales)


def test_search_winner_is_quantized_and_saves(tmp_path):
    from optimum_owl.formats import verify_checkpoint

    model = tiny_model("llama")
    config = _config(method="wanda", layerwise="owl-auto", values="int8", num_samples=16, auto_owl_ms=[3.0],
                     auto_owl_lambdas=[0.05])
    report = OWLPruner(config).prune(model, dataset=calib_ids(n=16))
    for unit in _units(model):
        grid = int8_grid(unit.module)
        w = unit.weight()
        assert torch.equal(w, dequantize_int8(quantize_int8(w, grid.scales), grid.scales))
    assert set(report.quantization["layers"]) == {u.name for u in _units(model)}
    model.save_pretrained(tmp_path / "out")  # the writer checks every code against the weights
    assert verify_checkpoint(tmp_path / "out")["int8_tensors"] == len(_units(model))


def test_cli_prune_values_int8_saves_a_quantized_checkpoint(tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from optimum_owl.cli import main
    from optimum_owl.formats import verify_checkpoint

    from .test_cli_and_eval import _saved_model_and_text

    src, text = _saved_model_and_text(tmp_path)
    out = tmp_path / "pruned"
    args = ["prune", str(src), "--calibration", str(text), "--output-dir", str(out), "--sparsity", "0.5",
            "--method", "sparsegpt", "--num-samples", "2", "--seqlen", "32", "--batch-size", "2",
            "--values", "int8", "--group-size", "64"]
    assert main(args) == 0
    assert "values: int8 (joint, group size 64)" in capsys.readouterr().out
    report = json.loads((out / "owl_report.json").read_text())
    assert report["quantization"]["group_size"] == 64 and report["quantization"]["mean"]["joint"] > 0
    assert json.loads((out / "owl_config.json").read_text())["values"] == "int8"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 64
    summary = verify_checkpoint(out)
    assert summary["int8_tensors"] == summary["compressed_tensors"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    for unit in _units(model):  # the saved checkpoint is already quantized: loading gives the grid back
        grid = int8_grid(unit.module)
        assert grid.group_size == 64
        w = unit.weight()
        assert torch.equal(w, dequantize_int8(quantize_int8(w, grid.scales, 64), grid.scales, 64))
    assert main([*args[:-2], "--group-size", "100", "--overwrite"]) == 2  # one line naming the field, exit 2
    assert "`group_size` must be None (one scale per output row) or a positive multiple of 64" in capsys.readouterr().err
