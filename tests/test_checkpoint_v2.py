"""The compact checkpoint with int8 values (`owl-bitmask-v2`, issue 27): round trips bit for bit (codes and scales),
per-file format versions, the errors of a damaged file, and float checkpoints unchanged (`owl-bitmask-v1`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.algorithms.quantize import dequantize_int8
from optimum_owl.errors import OWLCheckpointError
from optimum_owl.formats import drop_int8_grids, int8_grid, size_summary, verify_checkpoint
from optimum_owl.formats.bitmask import decompress
from optimum_owl.formats.int8 import decode_int8
from optimum_owl.pruning.modeling import get_blocks_and_units

from .conftest import calib_ids, tiny_model

DATA_V1 = Path(__file__).parent / "data" / "compact_llama_v0.1.0"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


def _pruned(arch: str = "llama", group_size: int | None = None, method: str = "wanda", dtype=torch.float32):
    model = tiny_model(arch).to(dtype)
    config = OWLPrunerConfig(sparsity=0.5, method=method, layerwise="uniform", num_samples=8, seqlen=16, batch_size=4,
                             values="int8", group_size=group_size)
    OWLPruner(config).prune(model, dataset=calib_ids())
    return model


def _metadata(file: Path) -> dict[str, str]:
    with safe_open(str(file), framework="pt") as handle:
        return handle.metadata()


def _units(model):
    return [u for block in get_blocks_and_units(model)[2] for u in block]


@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize(("arch", "method"), [("llama", "sparsegpt"), ("gpt2", "sparsegpt"), ("opt", "wanda")])
def test_int8_checkpoint_round_trips_bit_for_bit(tmp_path, arch, method, group_size):
    model = _pruned(arch, group_size, method)
    model.save_pretrained(tmp_path / "a")
    file = tmp_path / "a" / "model.safetensors"
    meta = _metadata(file)
    assert (meta["owl_format"], meta["owl_values"], meta["owl_group_size"]) == ("owl-bitmask-v2", "int8",
                                                                                str(group_size or 0))
    stored = load_file(file)
    units = _units(model)
    for unit in units:
        name = f"{unit.name}.weight"
        codes, scale = stored[name], stored[name + "_scale"]
        assert codes.dtype == torch.int8 and scale.dtype == torch.float32
        assert torch.equal(scale, int8_grid(unit.module).scales)
        assert scale.shape[0] == unit.shape[0]  # output features, for GPT-2's [in, out] Conv1D too
        dense_codes = decompress(codes, stored[name + "_bitmask"], stored[name + "_shape"], name, int8=True)
        weight = unit.parameter()
        assert list(dense_codes.shape) == list(weight.shape)
        # the saved codes are the weights in memory divided by their scales, exactly
        out_major = dense_codes.t() if unit.transposed else dense_codes
        back = dequantize_int8(out_major, scale, group_size, weight.dtype)
        assert torch.equal(_bits(back.t() if unit.transposed else back), _bits(weight))
        assert not bool((codes == 0).any())  # the stored elements are the non-zero weights
    assert verify_checkpoint(tmp_path / "a")["int8_tensors"] == len(units)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert _same(model.state_dict(), reloaded.state_dict())
    reloaded.save_pretrained(tmp_path / "b")  # the reloaded model knows its grids: the same file again
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == file.read_bytes()
    assert _same(stored, load_file(tmp_path / "b" / "model.safetensors"))


def test_int8_checkpoint_loads_into_another_dtype_through_float32_scales(tmp_path):
    model = _pruned("gpt2", 64)
    model.save_pretrained(tmp_path / "a")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.bfloat16)
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}  # float32 code*scale, then cast
    assert _same(expected, reloaded.state_dict())
    reloaded.save_pretrained(tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(("_scale", "_bitmask", "_shape")) or a[k].dtype == torch.int8)


def test_bfloat16_int8_checkpoint_round_trips(tmp_path):
    model = _pruned("llama", None, "sparsegpt", torch.bfloat16)
    model.save_pretrained(tmp_path / "a")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert reloaded.dtype == torch.bfloat16 and _same(model.state_dict(), reloaded.state_dict())


def test_sharded_int8_checkpoint_marks_v2_only_the_files_with_scales(tmp_path):
    model = _pruned("opt")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) > 1
    for file in files:
        meta, keys = _metadata(file), load_file(file).keys()
        if any(k.endswith("_scale") for k in keys):
            assert (meta["owl_format"], meta["owl_values"]) == ("owl-bitmask-v2", "int8")
        else:
            assert meta["owl_format"] == "owl-bitmask-v1" and "owl_values" not in meta and "owl_group_size" not in meta
    assert {_metadata(f)["owl_format"] for f in files} == {"owl-bitmask-v1", "owl-bitmask-v2"}
    assert verify_checkpoint(tmp_path)["unchecked_tensors"] == []
    assert _same(model.state_dict(), AutoModelForCausalLM.from_pretrained(tmp_path).state_dict())


def test_float_checkpoints_stay_v1_and_old_ones_load(tmp_path):
    model = tiny_model("llama")
    OWLPruner(OWLPrunerConfig(sparsity=0.5, method="magnitude", layerwise="uniform")).prune(model)
    model.save_pretrained(tmp_path)
    meta = _metadata(tmp_path / "model.safetensors")
    assert meta["owl_format"] == "owl-bitmask-v1" and "owl_values" not in meta
    assert all(len(entry) == 4 for entry in json.loads(meta["owl_crc32"]).values())
    assert "values" not in json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    summary = verify_checkpoint(DATA_V1)
    assert summary["int8_tensors"] == 0 and summary["compressed_tensors"] > 0


def test_size_summary_counts_int8_bytes_against_the_model_dtype(tmp_path):
    model = _pruned("llama")
    model.save_pretrained(tmp_path)
    summary = size_summary(tmp_path)
    units = _units(model)
    assert summary["int8_tensors"] == summary["compressed_tensors"] == len(units)
    dense = sum(u.numel * 4 for u in units)  # float32 model
    assert summary["compressed_dense_bytes"] == dense
    kept = sum(int((u.weight() != 0).sum()) for u in units)
    scales = sum(u.shape[0] * 4 for u in units)
    masks = sum(-(-u.numel // 8) for u in units)
    assert summary["compressed_bytes"] == kept + scales + masks + 16 * len(units)
    assert summary["compressed_ratio"] < 0.25  # 50%: half a byte of codes + 1/8 of mask per 4-byte weight


def test_weights_changed_after_quantization_are_refused_by_name(tmp_path):
    model = _pruned("llama")
    unit = _units(model)[0]
    with torch.no_grad():
        unit.weight()[unit.weight() != 0] *= 1.001
    with pytest.raises(OWLCheckpointError, match=unit.name.replace(".", r"\.") + r"\.weight.*not on the int8 grid"):
        model.save_pretrained(tmp_path / "a")
    assert drop_int8_grids(model) == len(_units(model))
    model.save_pretrained(tmp_path / "b")  # float values again
    assert _metadata(tmp_path / "b" / "model.safetensors")["owl_format"] == "owl-bitmask-v1"


def test_decode_int8_is_code_times_scale_in_float32_then_cast():
    codes = torch.tensor([[127, -3, 0], [1, 0, -127]], dtype=torch.int8)
    scales = torch.tensor([0.1, 1 / 3], dtype=torch.float32)
    out = decode_int8(codes.t().contiguous(), scales, None, transposed=True, dtype=torch.bfloat16)
    assert torch.equal(out, (codes.float() * scales[:, None]).to(torch.bfloat16).t())


# ------------------------------------------------------------------------------------------------ damaged files
def _saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str], str]:
    model = _pruned("llama")
    model.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    return file, load_file(file), _metadata(file), f"{_units(model)[0].name}.weight"


def _rewrite(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file(tensors, str(file), metadata=metadata)


@pytest.mark.parametrize("damage", ["no_scale", "scale_shape", "scale_dtype", "scale_zero", "scale_bits", "v1_marked",
                                    "newer_format", "bad_group_size"])
def test_damaged_int8_checkpoint_is_refused_naming_what(tmp_path, damage):
    file, tensors, meta, name = _saved(tmp_path)
    expected = re.escape(name)
    if damage == "no_scale":
        del tensors[name + "_scale"]
        expected = "scales.*missing"
    elif damage == "scale_shape":
        tensors[name + "_scale"] = tensors[name + "_scale"][:-1].clone()
    elif damage == "scale_dtype":
        tensors[name + "_scale"] = tensors[name + "_scale"].double()
    elif damage == "scale_zero":
        tensors[name + "_scale"] = tensors[name + "_scale"].clone()
        tensors[name + "_scale"][0] = 0.0
    elif damage == "scale_bits":
        tensors[name + "_scale"] = tensors[name + "_scale"] * 1.5
        expected = "CRC-32"
    elif damage == "v1_marked":
        meta = {**meta, "owl_format": "owl-bitmask-v1"}
        expected = "owl-bitmask-v2"
    elif damage == "newer_format":
        meta = {**meta, "owl_format": "owl-bitmask-v3"}
        expected = "Upgrade optimum-owl"
    else:
        meta = {**meta, "owl_group_size": "sixty-four"}
        expected = "owl_group_size"
    _rewrite(file, tensors, meta)
    with pytest.raises(OWLCheckpointError, match=expected):
        verify_checkpoint(tmp_path)
    with pytest.raises((OWLCheckpointError, RuntimeError)):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_mixed_group_sizes_are_refused_at_save(tmp_path):
    from optimum_owl.formats.int8 import set_int8_grid

    model = _pruned("llama", 64)
    unit = _units(model)[0]
    grid = int8_grid(unit.module)
    set_int8_grid(unit.module, grid.scales[:, :1].clone(), None)  # as if this one weight had per-row scales
    with pytest.raises(OWLCheckpointError, match="one group size"):
        model.save_pretrained(tmp_path)


def test_prune_on_load_with_int8_values_saves_v2(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    config = OWLPrunerConfig(sparsity=0.5, method="magnitude", layerwise="uniform", values="int8", group_size=64)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=config)
    assert model.owl_report.quantization["quantized"] == "rtn"
    model.save_pretrained(tmp_path / "pruned")
    meta = _metadata(tmp_path / "pruned" / "model.safetensors")
    assert (meta["owl_format"], meta["owl_group_size"]) == ("owl-bitmask-v2", "64")
    assert _same(model.state_dict(), AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").state_dict())
