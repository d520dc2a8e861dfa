"""compressed-tensors `sparse-bitmask` checkpoints (issue 29): written by optimum-owl and read back bit for bit, read
straight into the sparse form, and exchanged with the compressed-tensors library itself (0.13.0, the last release
that has the sparse-bitmask compressor and installs beside transformers 5: those tests skip without it)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from optimum_owl import OWLPruner, OWLPrunerConfig
from optimum_owl.errors import OWLCheckpointError
from optimum_owl.formats.bitmask import compress, decompress
from optimum_owl.formats.compressed_tensors import (
    from_owl_parts,
    is_sparse_bitmask_checkpoint,
    sparsity_config_of,
    to_owl_parts,
)
from optimum_owl.formats.compressed_tensors_load import load_dense
from optimum_owl.inference import SparseLinear, load_sparse, sparsify
from optimum_owl.serialization import save_compressed_tensors, save_pruned

from .conftest import tiny_model


def _has_bitmask_compressor() -> bool:
    try:
        from compressed_tensors.compressors import BitmaskCompressor  # noqa: F401
    except ImportError:
        return False
    return True


needs_ct = pytest.mark.skipif(not _has_bitmask_compressor(), reason="compressed-tensors with the sparse-bitmask "
                              "compressor (<= 0.14; 0.13.0 installs beside transformers 5) is not installed")


def _pruned(arch: str = "llama", sparsity: float = 0.6):
    model = tiny_model(arch)
    OWLPruner(OWLPrunerConfig(sparsity=sparsity, method="magnitude", layerwise="uniform")).prune(model)
    return model


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()]) if t.is_floating_point() else t


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(_bits(sa[key]), _bits(sb[key])), key


# ---------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("shape", [(6, 16), (5, 13), (3, 1), (0, 8)])
def test_parts_match_the_library_layout_and_round_trip(shape):
    """Row-wise little-endian bitmask rows, row offsets = stored elements before each row; `-0.0` kept."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) > 0.6)
    if w.numel():
        w.view(-1)[0] = -0.0
    parts = from_owl_parts(*compress(w)[:2], list(shape))
    rows, cols = shape
    keep = w.view(torch.int32) != 0
    expected = np.packbits(keep.numpy(), axis=-1, bitorder="little") if rows else np.zeros((0, math.ceil(cols / 8)))
    assert parts["bitmask"].dtype == torch.uint8 and np.array_equal(parts["bitmask"].numpy(), expected)
    counts = keep.sum(dim=1)
    assert torch.equal(parts["row_offsets"], torch.cumsum(counts, 0) - counts)
    assert parts["shape"].tolist() == [rows, cols] and parts["shape"].dtype == torch.int64
    values, bitmask, dims = to_owl_parts(parts["compressed"], parts["bitmask"], parts["shape"], parts["row_offsets"], "w")
    assert torch.equal(_bits(decompress(values, bitmask, dims)), _bits(w))


def test_corrupt_parts_are_refused_naming_the_weight():
    w = torch.randn(4, 16) * (torch.rand(4, 16) > 0.5)
    parts = from_owl_parts(*compress(w)[:2], [4, 16])
    good = [parts[k] for k in ("compressed", "bitmask", "shape", "row_offsets")]
    bad_offsets = parts["row_offsets"].clone()
    bad_offsets[-1] += 1
    for i, bad, text in [(3, bad_offsets, "row_offsets"), (0, parts["compressed"][:-1], "mismatch"),
                         (1, parts["bitmask"][:, :1], "bitmask"), (2, torch.tensor([4.0, 16.0]), "shape")]:
        args = list(good)
        args[i] = bad
        with pytest.raises(OWLCheckpointError, match=f"layers.0.q_proj.weight.*{text}|{text}.*layers.0.q_proj"):
            to_owl_parts(*args, name="layers.0.q_proj.weight")


def test_config_of_other_compressed_tensors_checkpoints_is_refused():
    assert sparsity_config_of({"quant_method": "owl"}) is None and sparsity_config_of(None) is None
    with pytest.raises(OWLCheckpointError, match="sparsify"):
        sparsity_config_of({"quant_method": "compressed-tensors", "sparsity_config": {"format": "dense"}})
    w8a8 = {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "int"}, "format": "int-quantized"}
    with pytest.raises(OWLCheckpointError, match="no form for"):
        sparsity_config_of({"quant_method": "compressed-tensors", "config_groups": {"group_0": w8a8},
                            "sparsity_config": {"format": "sparse-bitmask"}})


# ---------------------------------------------------------------------------------------------- our writer
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_written_checkpoint_reads_back_bit_identical_dense_and_sparse(tmp_path, arch):
    model = _pruned(arch)
    with torch.no_grad():  # a signed zero survives (the library's own writer would drop it)
        next(p for n, p in model.named_parameters() if n.endswith("mlp.c_fc.weight" if arch == "gpt2"
                                                                    else "mlp.down_proj.weight")).view(-1)[0] = -0.0
    out = save_pruned(model, tmp_path / "ct", save_format="compressed-tensors")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["sparsity_config"]["format"] == "sparse-bitmask"
    assert config["sparsity_config"]["targets"] == (["Conv1D"] if arch == "gpt2" else ["Linear"])
    assert is_sparse_bitmask_checkpoint(out)
    _same_weights(model, load_dense(out))
    sparse = load_sparse(out)
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == 3 * (4 if arch == "gpt2" else 7)
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert type(model.hf_quantizer).__name__ == "OWLHfQuantizer"  # the model saves compactly again afterwards


def test_sparsified_model_writes_without_a_dense_copy_and_crc_catches_corruption(tmp_path):
    model = _pruned()
    sparse = sparsify(model, min_sparsity=0.3)
    out = save_compressed_tensors(sparse, tmp_path / "ct")
    _same_weights(load_dense(out), _pruned())
    raw = bytearray((out / "model.safetensors").read_bytes())
    header = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + header])
    start = meta["model.layers.1.mlp.up_proj.compressed"]["data_offsets"][0]
    raw[8 + header + start] ^= 0x40
    (out / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(OWLCheckpointError, match="up_proj.compressed.*CRC-32"):
        load_sparse(out)


def test_prune_cli_format_and_generate_and_refusal_of_plain_transformers(tmp_path, capsys):
    from optimum_owl.cli import main
    from optimum_owl.pruning.modeling import load_model

    src = tmp_path / "dense"
    tiny_model().save_pretrained(src)
    out = tmp_path / "ct"
    assert main(["prune", str(src), "--method", "magnitude", "--layerwise", "uniform", "--sparsity", "0.5",
                 "--format", "compressed-tensors", "-o", str(out)]) == 0
    assert "compressed-tensors sparse-bitmask format" in capsys.readouterr().out
    assert (out / "owl_report.json").is_file() and is_sparse_bitmask_checkpoint(out)
    pruner = OWLPruner.from_pretrained(str(src), OWLPrunerConfig(sparsity=0.5, method="magnitude", layerwise="uniform"))
    pruner.prune_and_save(tmp_path / "api", save_format="compressed-tensors")
    _same_weights(load_dense(tmp_path / "api"), load_dense(out))
    assert main(["prune", str(src), "--format", "compact", "--dense-checkpoint", "-o", str(tmp_path / "x")]) == 2
    assert "contradicts --format='compact'" in capsys.readouterr().err
    _same_weights(load_model(out), load_dense(out))  # every command that reads a model reads this format
    # transformers 5.23 alone cannot load it (no sparse compressor in compressed-tensors >= 0.15): never silently
    code = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(out)!r})
        except ImportError as err:
            print("refused:", err)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if "refused" not in run.stdout:  # compressed-tensors >= 0.15 installed: the weights come back MISSING (random)
        assert "MISSING" in run.stdout + run.stderr, run.stdout + run.stderr


# ---------------------------------------------------------------------------------------------- the library itself
def _masked():
    """A tiny Llama pruned outside optimum-owl (no quantizer attached, so `save_pretrained` is transformers' own)."""
    model = tiny_model()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.masked_fill_(torch.rand_like(p) < 0.55, 0.0)  # +0.0: the library's writer drops -0.0
    return model


def _write_with_compressed_tensors(model, folder) -> None:
    """The save path of compressed-tensors <= 0.14 (llm-compressor's `save_pretrained` wrapper of that era)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig

    compressor = ModelCompressor.from_pretrained_model(
        model, sparsity_config_or_format=BitmaskConfig(global_sparsity=0.5, targets=["Linear"], ignore=["lm_head"]))
    model.save_pretrained(folder, state_dict=compressor.compress(model))
    compressor.update_config(folder)


@needs_ct
def test_checkpoint_written_by_compressed_tensors_loads_sparse_and_dense(tmp_path):
    from optimum_owl.hub.weights import folder_zero_share

    model = _masked()
    _write_with_compressed_tensors(model, tmp_path / "ct")
    assert is_sparse_bitmask_checkpoint(tmp_path / "ct")
    blocks = [p for n, p in model.named_parameters() if n.endswith("proj.weight")]
    share = sum(int((p == 0).sum()) for p in blocks) / sum(p.numel() for p in blocks)
    assert folder_zero_share(tmp_path / "ct") == pytest.approx(share)  # the card's "pruned or not", from the weights
    _same_weights(load_dense(tmp_path / "ct"), model)
    sparse = load_sparse(tmp_path / "ct")
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == 21
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@needs_ct
def test_compressed_tensors_decompresses_our_checkpoint(tmp_path):
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoConfig, AutoModelForCausalLM

    model = _pruned()
    out = save_compressed_tensors(model, tmp_path / "ct")
    config = AutoConfig.from_pretrained(out)
    del config.quantization_config
    target = AutoModelForCausalLM.from_config(config)
    ModelCompressor.from_pretrained(str(out)).decompress(str(out), target)
    model.hf_quantizer = None  # compare plain state dicts
    _same_weights(target, model)


# ---------------------------------------------------------------------------------------------- int8 values
def _int8_modules(model) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear) and m.int8}


def test_int8_values_are_written_as_the_int_quantized_scheme_and_read_back_exactly(tmp_path):
    from optimum_owl.inference import densify

    sparse = sparsify(_pruned(), min_sparsity=0.3, values="int8", quantize_head=False)
    out = save_compressed_tensors(sparse, tmp_path / "ct")
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    scheme = quant["config_groups"]["group_0"]
    assert quant["format"] == scheme["format"] == "int-quantized"
    assert scheme["weights"]["num_bits"] == 8 and scheme["weights"]["strategy"] == "channel"
    assert sorted(scheme["targets"]) == sorted(_int8_modules(sparse))
    back = load_sparse(out, quantize_head=False)
    for name, module in _int8_modules(sparse).items():
        other = back.get_submodule(name)
        assert other.int8 and other.group_size is None
        for buffer in ("mask", "values", "offsets", "scales"):
            assert torch.equal(getattr(module, buffer), getattr(other, buffer)), (name, buffer)
    _same_weights(load_dense(out), densify(back))


@needs_ct
def test_int8_checkpoints_are_exchanged_with_compressed_tensors(tmp_path):
    """compressed-tensors 0.13 decompresses our int8 checkpoint to our dequantized weights, and its own stacked
    int-quantized + sparse-bitmask checkpoint loads into int8 `SparseLinear`s holding its codes and scales."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from transformers import AutoConfig, AutoModelForCausalLM

    from optimum_owl.inference import densify

    sparse = sparsify(_pruned(), min_sparsity=0.3, values="int8", quantize_head=False)
    ours = save_compressed_tensors(sparse, tmp_path / "ours")
    config = AutoConfig.from_pretrained(ours)
    del config.quantization_config
    target = AutoModelForCausalLM.from_config(config)
    ModelCompressor.from_pretrained(str(ours)).decompress(str(ours), target)
    expected = densify(load_sparse(ours, quantize_head=False))
    for name in _int8_modules(sparse):  # the library dequantizes into float16: compare at that precision
        got = target.get_submodule(name).weight.float()
        torch.testing.assert_close(got, expected.get_submodule(name).weight, rtol=1e-3, atol=1e-6)

    model = _masked()
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8, type="int", symmetric=True,
                                                                              strategy="channel"))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                                        format="int-quantized"))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            module.weight_scale.data = (module.weight.detach().abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-8)
            module.quantization_status = QuantizationStatus.CALIBRATION
    compressor = ModelCompressor.from_pretrained_model(
        model, sparsity_config_or_format=BitmaskConfig(targets=["Linear"], ignore=["lm_head"]),
        quantization_format="int-quantized")
    model.save_pretrained(tmp_path / "theirs", state_dict=compressor.compress(model))
    compressor.update_config(tmp_path / "theirs")
    loaded = load_sparse(tmp_path / "theirs")
    modules = _int8_modules(loaded)
    assert len(modules) == 21
    for name, module in modules.items():
        source = model.get_submodule(name)
        scale = source.weight_scale.detach().float()
        codes = torch.round(source.weight.detach() / scale).clamp(-128, 127)
        assert torch.equal(module.scales, scale.reshape(-1))
        torch.testing.assert_close(module.dense_weight().float(), codes * scale, rtol=0, atol=0)


def test_generate_reads_the_format_sparse_and_dense(tmp_path, capsys):
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_owl.cli import main

    stories = Path(__file__).resolve().parents[1] / "optimum_owl" / "assets" / "stories260K"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(stories), AutoTokenizer.from_pretrained(stories)
    config = OWLPrunerConfig(sparsity=0.5, method="magnitude", layerwise="uniform")
    report = OWLPruner(config).prune(model)
    out = save_pruned(model, tmp_path / "ct", report=report, config=config, tokenizer=tokenizer,
                      save_format="compressed-tensors")
    printed = []
    for extra in ([], ["--dense"]):
        assert main(["generate", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "6", *extra]) == 0
        printed.append(capsys.readouterr().out.splitlines())
    assert printed[0][0].startswith("35 sparse linears") and printed[1][0].startswith("no sparse linears")
    assert printed[0][1] == printed[1][1] and printed[0][1].startswith("Once upon a time")  # same greedy text
