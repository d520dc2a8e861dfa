"""Compact (bitmask) checkpoints through `save_pretrained` / `from_pretrained`, the dense export, and every way a
compact checkpoint can be broken."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import optimum_owl  # noqa: F401  (registers quant_method "owl")
from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.errors import OWLCheckpointError
from optimum_owl.formats import OWLHfQuantizer, compressible_names, mark_pruned, size_summary, verify_checkpoint
from optimum_owl.pruning.modeling import get_blocks_and_units
from optimum_owl.serialization import save_dense

from .conftest import tiny_model

MAGNITUDE = dict(method="magnitude", layerwise="uniform")


def pruned(arch="llama", sparsity=0.7, dtype=torch.float32, layers=2):
    model = tiny_model(arch, layers=layers).to(dtype)
    OWLPruner(OWLPrunerConfig(sparsity=sparsity, **MAGNITUDE)).prune(model)
    return model


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def same_file_content(a, b):
    """Same tensors (bitwise) and metadata; the header's key order is not deterministic in safetensors."""
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if set(fa.keys()) != set(fb.keys()) or fa.metadata() != fb.metadata():
            return False
        return all(
            torch.equal(fa.get_tensor(k).reshape(-1).view(torch.uint8), fb.get_tensor(k).reshape(-1).view(torch.uint8))
            for k in fa.keys()
        )


def decoder_linear_ratio(model, folder):
    """Stored bytes / dense bytes over every eligible linear weight (compressed or not)."""
    summary = size_summary(folder)
    stored = dense = 0
    for name in compressible_names(model):
        nbytes = model.get_parameter(name).numel() * model.get_parameter(name).element_size()
        dense += nbytes
        stored += summary["per_tensor"].get(name, [nbytes])[0]
    return stored / dense


@pytest.mark.parametrize(
    "arch,dtype",
    [("llama", torch.float32), ("llama", torch.float16), ("llama", torch.bfloat16), ("gpt2", torch.float32),
     ("opt", torch.float32)],
)
def test_compact_roundtrip_bit_identical(tmp_path, arch, dtype):
    model = pruned(arch, dtype=dtype)
    assert isinstance(model.hf_quantizer, OWLHfQuantizer)  # attached by OWLPruner.prune -> mark_pruned
    model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "owl"
    assert config["quantization_config"]["sparsity"] == 0.7

    _, _, units = get_blocks_and_units(model)
    n_units = sum(len(u) for u in units)
    summary = size_summary(tmp_path / "a")
    assert summary["compressed_tensors"] == n_units
    ratio = decoder_linear_ratio(model, tmp_path / "a")
    assert ratio <= 0.40, ratio

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert loaded.dtype == dtype
    assert isinstance(loaded.hf_quantizer, OWLHfQuantizer) and loaded.hf_quantizer.pre_quantized
    assert_same_weights(model, loaded)
    if dtype == torch.float32:  # (in half precision `.to(dtype)` also casts the rotary buffers, a load does not)
        ids = torch.randint(3, 90, (1, 8))
        assert torch.equal(model(ids).logits, loaded(ids).logits)

    loaded.save_pretrained(tmp_path / "b")  # re-saving a loaded compact model compresses again, identically
    assert same_file_content(tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors")
    loaded.half()  # a pruned model stays an ordinary model


def test_gpt2_conv1d_shapes_are_stored_transposed(tmp_path):
    model = pruned("gpt2")
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("transformer.h.0.mlp.c_fc.weight_shape").tolist() == [32, 128]  # Conv1D: [in, out]
        assert "transformer.wte.weight_bitmask" not in f.keys()  # tied embedding stays dense


def test_load_in_other_dtype(tmp_path):
    model = pruned("llama")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for key, value in model.state_dict().items():
        assert torch.equal(value.to(torch.bfloat16), loaded.state_dict()[key]), key


def test_sharded_compact_checkpoint(tmp_path):
    model = pruned("llama")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(tmp_path))
    assert verify_checkpoint(tmp_path)["compressed_tensors"] == len(compressible_names(model))


def test_calibration_data_never_written(tmp_path):
    model = tiny_model("llama", layers=2)
    OWLPruner(OWLPrunerConfig(sparsity=0.5, **MAGNITUDE)).prune(model)
    mark_pruned(model, OWLPrunerConfig(sparsity=0.5, dataset=["secret calibration text"], tokenizer=object(), **MAGNITUDE))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    qc = json.loads(text)["quantization_config"]
    assert "dataset" not in qc and "tokenizer" not in qc and "secret" not in text
    assert model.config.quantization_config.dataset is None  # the model keeps no reference to the data


def test_dense_export(tmp_path):
    model = pruned("llama")
    save_dense(model, tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config
    assert (tmp_path / "dense" / "owl_config.json").exists() and (tmp_path / "dense" / "owl_report.json").exists()
    with safe_open(str(tmp_path / "dense" / "model.safetensors"), "pt") as f:
        assert not any(k.endswith("_bitmask") for k in f.keys())
        assert torch.equal(f.get_tensor("model.layers.0.mlp.up_proj.weight"), model.model.layers[0].mlp.up_proj.weight)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert getattr(dense, "hf_quantizer", None) is None
    assert_same_weights(model, dense)
    # the in-memory model still saves compactly afterwards
    assert isinstance(model.hf_quantizer, OWLHfQuantizer)
    model.save_pretrained(tmp_path / "compact")
    assert size_summary(tmp_path / "compact")["compressed_tensors"] > 0
    with pytest.raises(FileExistsError):
        save_dense(model, tmp_path / "dense")


def test_dequantize_gives_plain_model(tmp_path):
    model = pruned("llama")
    model.save_pretrained(tmp_path / "c")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c").dequantize()
    assert getattr(loaded, "hf_quantizer", None) is None
    loaded.save_pretrained(tmp_path / "d")
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())
    assert_same_weights(model, loaded)


# ------------------------------------------------------------------------------------------------ broken files
@pytest.fixture
def compact_dir(tmp_path):
    model = pruned("llama")
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def rewrite(folder, edit):
    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


NAME = "model.layers.1.mlp.down_proj.weight"


def test_values_mask_length_mismatch(compact_dir):
    rewrite(compact_dir, lambda t: t.__setitem__(NAME, t[NAME][:-1].clone()))
    with pytest.raises(OWLCheckpointError, match=f"{NAME}.*mask/values length mismatch"):
        AutoModelForCausalLM.from_pretrained(compact_dir)


def test_mask_length_mismatch(compact_dir):
    rewrite(compact_dir, lambda t: t.__setitem__(NAME + "_bitmask", t[NAME + "_bitmask"][:-1].clone()))
    with pytest.raises(OWLCheckpointError, match=f"{NAME}_bitmask.*bytes"):
        AutoModelForCausalLM.from_pretrained(compact_dir)


def test_wrong_shape_in_checkpoint(compact_dir):
    rewrite(compact_dir, lambda t: t.__setitem__(NAME + "_shape", torch.tensor([64, 32])))
    with pytest.raises(OWLCheckpointError, match=f"{NAME}.*model expects \\[32, 64\\]"):
        AutoModelForCausalLM.from_pretrained(compact_dir)


def test_config_does_not_match_checkpoint(compact_dir):
    config = json.loads((compact_dir / "config.json").read_text())
    config["intermediate_size"] = 48
    (compact_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(OWLCheckpointError, match="does not belong to this model config"):
        AutoModelForCausalLM.from_pretrained(compact_dir)


def test_missing_companion(compact_dir):
    rewrite(compact_dir, lambda t: t.pop(NAME + "_shape"))
    with pytest.raises(OWLCheckpointError, match=f"{NAME}_shape.*missing"):
        AutoModelForCausalLM.from_pretrained(compact_dir)


def test_corrupt_values_fail_crc(compact_dir, caplog):
    path = compact_dir / "model.safetensors"
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    start, end = header[NAME]["data_offsets"]
    raw[8 + header_len + start + 3] ^= 0x40  # flip one bit inside a stored value
    path.write_bytes(bytes(raw))
    with pytest.raises(OWLCheckpointError, match=f"{NAME}.*CRC-32"):
        verify_checkpoint(compact_dir)
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="conversion"):
        AutoModelForCausalLM.from_pretrained(compact_dir)
    assert "CRC-32" in caplog.text and NAME in caplog.text


@pytest.mark.parametrize("cut", ["truncated", "garbage_header"])
def test_truncated_or_garbage_file(compact_dir, cut):
    path = compact_dir / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if cut == "truncated" else b"\xff" * 8 + raw[8:])
    with pytest.raises(OWLCheckpointError, match="model.safetensors.*corrupt or truncated"):
        AutoModelForCausalLM.from_pretrained(compact_dir)
    with pytest.raises(OWLCheckpointError, match="(?i)truncated|corrupt"):
        verify_checkpoint(compact_dir)


def test_verify_checkpoint_counts(compact_dir):
    summary = verify_checkpoint(compact_dir)
    assert summary["checked_crc"] > 3 * summary["compressed_tensors"] > 0  # every tensor, compressed or not
    assert summary["unchecked_tensors"] == []
    assert summary["compressed_ratio"] <= 0.40


def test_moe_fused_experts_stay_dense_and_roundtrip(tmp_path):
    model = pruned("mixtral")
    model.save_pretrained(tmp_path)
    _, _, units = get_blocks_and_units(model)
    linear_units = [u for block in units for u in block if u.kind == "linear"]
    assert any(u.kind == "expert" for block in units for u in block)
    assert size_summary(tmp_path)["compressed_tensors"] == len(linear_units)  # 3-D expert tensors stay dense
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(tmp_path))


def test_optimum_style_quantize_saves_compact_or_dense(tmp_path):
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    config = OWLPrunerConfig(sparsity=0.5, num_samples=4, seqlen=16, batch_size=2)
    for dense in (False, True):
        model = tiny_model("llama")
        report = OWLPruner.from_pretrained(model, config).quantize(tmp_path / str(dense), dataset=ids, dense=dense)
        assert (tmp_path / str(dense) / "owl_report.json").exists() and report.sparsity > 0.45
        with safe_open(str(tmp_path / str(dense) / "model.safetensors"), framework="pt") as fh:
            assert any(k.endswith("_bitmask") for k in fh.keys()) is not dense
        assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / str(dense)), model)
