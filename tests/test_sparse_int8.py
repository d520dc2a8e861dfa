"""Sparse inference with int8 values (issue 27, inference side): `Packed` / `SparseLinear` with int8 codes and float32
scales, the dense int8 LM head (tied embeddings included), `sparsify(values="int8")`, `load_sparse` of float and
int8 (`owl-bitmask-v2`) checkpoints, `densify` to the dequantized weights, `generate --values int8`, the errors."""

from __future__ import annotations

import copy
import json
import logging
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from optimum_owl.algorithms.quantize import dequantize_int8, quantize_dequantize
from optimum_owl.errors import OWLCheckpointError
from optimum_owl.formats.bitmask import compress, decompress, stored_mask
from optimum_owl.inference import SparseLinear, densify, load_sparse, sparse_summary, sparsify
from optimum_owl.inference.format import (
    dense_int8_packed,
    from_checkpoint_parts,
    pack_dense,
    quantize_packed,
    to_checkpoint_parts,
    unpack_dense,
    unpack_stored,
)
from optimum_owl.inference.head import Int8Embedding, Int8Linear, quantize_rows
from optimum_owl.utils import is_conv1d

from .conftest import ASSETS, tiny_model

SHAPES = [(37, 100), (64, 128), (5, 1), (19, 257), (3, 7), (70, 200)]
IDS = torch.tensor([[5, 9, 14, 3, 22, 7]])
STORIES = ASSETS / "models" / "stories260K"


def _sparse_weight(out: int, inp: int, seed: int, sparsity: float = 0.6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    w[torch.rand(out, inp, generator=g) < sparsity] = 0
    if out > 3:
        w[0] = 0  # an empty row: scale 1.0
        w[1] = torch.randn(inp, generator=g)  # a full row
        w[2, 0] = -0.0  # stored (bit pattern), code 0
        if inp > 2:
            w[3, :2] = torch.tensor([1e-6, 100.0])  # a kept value whose code rounds to 0
    return w


def _pruned_tiny(arch: str, sparsity: float = 0.7, seed: int = 0, **kwargs) -> nn.Module:
    model = tiny_model(arch, seed=seed, **kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if (isinstance(module, nn.Linear) or is_conv1d(module)) and module is not head:
                w = module.weight
                w[torch.rand(w.shape, generator=g) < sparsity] = 0
    return model.eval()


def _generate(model: nn.Module, ids: torch.Tensor = IDS, n: int = 12) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


# ------------------------------------------------------------------------------------------------------ format
@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_packed_equals_the_shared_quantizer_and_round_trips_checkpoint_parts_bit_for_bit(shape, group_size):
    w = _sparse_weight(*shape, seed=shape[0])
    keep = stored_mask(w).reshape(shape)
    codes, scales, deq = quantize_dequantize(w, keep, group_size)
    for transposed in (False, True):
        stored = w.t().contiguous() if transposed else w
        packed = quantize_packed(pack_dense(stored, transposed), group_size)
        assert packed.values.dtype == torch.int8 and torch.equal(packed.scales, scales)
        assert torch.equal(unpack_stored(packed), codes)
        assert packed.nnz == int(keep.sum())  # codes that round to 0 stay stored: the zero set never changes
        assert torch.equal(unpack_dense(packed, transposed), deq.t().contiguous() if transposed else deq)
        values, bitmask, dims = to_checkpoint_parts(packed, transposed)
        # the v2 layout: codes row-major over the STORED layout, the float weight's bitmask and shape
        ref_codes = codes.t().contiguous() if transposed else codes
        ref = compress(ref_codes, stored_mask(stored))
        assert torch.equal(values, ref[0]) and torch.equal(bitmask, ref[1]) and torch.equal(dims, ref[2])
        again = from_checkpoint_parts(values, bitmask, dims.tolist(), transposed, "w", packed.scales, group_size)
        for name in ("mask", "values", "offsets", "scales"):
            assert torch.equal(getattr(again, name), getattr(packed, name)), name
        assert again.group_size == group_size


def test_from_checkpoint_parts_refuses_inconsistent_int8_parts():
    w = _sparse_weight(8, 64, seed=1)
    packed = quantize_packed(pack_dense(w))
    values, bitmask, dims = to_checkpoint_parts(packed, False)
    with pytest.raises(OWLCheckpointError, match="w_scale"):
        from_checkpoint_parts(values, bitmask, dims.tolist(), False, "w", packed.scales[:5])
    with pytest.raises(OWLCheckpointError, match="w_scale"):
        from_checkpoint_parts(values, bitmask, dims.tolist(), False, "w", -packed.scales)
    with pytest.raises(OWLCheckpointError, match="int8"):
        from_checkpoint_parts(values.float(), bitmask, dims.tolist(), False, "w", packed.scales)
    with pytest.raises(OWLCheckpointError, match="w_scale"):  # int8 codes without their scales
        from_checkpoint_parts(values, bitmask, dims.tolist(), False, "w")


# ------------------------------------------------------------------------------------------------ SparseLinear
@pytest.mark.parametrize("group_size", [None, 64])
def test_int8_sparse_linear_computes_the_dequantized_dense_linear(group_size):
    lin = nn.Linear(130, 37)
    with torch.no_grad():
        lin.weight.copy_(_sparse_weight(37, 130, seed=3))
    sparse = SparseLinear.from_dense(lin, values="int8", group_size=group_size)
    dense = sparse.to_dense()
    keep = stored_mask(lin.weight).reshape(37, 130)
    assert torch.equal(dense.weight, quantize_dequantize(lin.weight, keep, group_size)[2])
    assert torch.equal(dense.bias, lin.bias)
    for tokens in (1, 5, 20):  # kernel decode (fp32 and bf16), and prefill (bf16 tiles + GEMM for bf16)
        x = torch.randn(2, tokens, 130)
        with torch.no_grad():
            assert torch.equal(sparse._forward_pure(x.reshape(-1, 130)).reshape(2, tokens, 37), dense(x))  # exact
            for xx in (x, x.bfloat16(), x.half(), x.double()):
                ref = xx.double() @ dense.weight.double().t() + dense.bias.double()
                tol = 1e-4 if xx.dtype in (torch.float32, torch.float64) else 0.01 * (1 + ref.abs().max().item())
                y = sparse(xx)
                assert y.dtype == xx.dtype and y.shape == (2, tokens, 37)
                assert (y.double() - ref).abs().max().item() < tol, (tokens, xx.dtype)
    # state dict = the v2 parts; `.to(bfloat16)` keeps the scales float32 and densifies to bf16
    state = sparse.state_dict()
    assert state["weight"].dtype == torch.int8 and torch.equal(state["weight_scale"], sparse.scales)
    sparse.to(torch.bfloat16)
    assert sparse.scales.dtype == torch.float32 and sparse.weight_dtype == torch.bfloat16
    assert sparse.to_dense().weight.dtype == torch.bfloat16 and sparse.bias.dtype == torch.bfloat16
    assert sparse.weight_nbytes() == sparse.mask.numel() + sparse.values.numel() + 8 * sparse.offsets.numel() + \
        4 * sparse.scales.numel()


# -------------------------------------------------------------------------------------------------------- head
@pytest.mark.parametrize("with_kernel", [True, False])
def test_int8_head_scales_are_bfloat16_exact_and_a_dequantized_head_quantizes_back_to_the_same_codes(
        with_kernel, monkeypatch):
    import optimum_owl.inference.head as head_mod

    if not with_kernel:  # torch's int8 matmul in float32 and dequantized tiles
        monkeypatch.setattr(head_mod, "kernel", lambda: None)
    w = torch.randn(300, 64)
    w[7] = 0
    codes, scales = quantize_rows(w)
    assert torch.equal(scales.bfloat16().float(), scales) and scales[7] == 1.0
    assert codes.abs().max() <= 127 and (codes.abs().amax(1)[:7] >= 126).all()
    again = quantize_rows(codes.float() * scales[:, None])
    assert torch.equal(again[0], codes) and torch.equal(again[1], scales)
    head = Int8Linear(dense_int8_packed(codes, scales), None, torch.float32)
    x = torch.randn(3, 64)
    dense = codes.float() * scales[:, None]
    with torch.no_grad():
        for xx in (x, x.bfloat16(), torch.randn(40, 64), torch.randn(40, 64).bfloat16(), torch.randn(2, 64).half()):
            ref = xx.double() @ dense.double().t()
            tol = 1e-4 if xx.dtype == torch.float32 else 0.02 * ref.abs().max().item()
            y = head(xx)
            assert y.dtype == xx.dtype and y.shape == (xx.shape[0], 300)
            assert (y.double() - ref).abs().max().item() < tol
    assert torch.equal(head._forward_pure(x), x @ dense.t())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "opt"])
def test_int8_sparse_model_generates_as_its_dequantized_weights_run_dense(arch, tmp_path):
    model = _pruned_tiny(arch)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    sparsify(model, values="int8")
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert sparse and all(m.int8 and m.sparsity > 0.5 for m in sparse)
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    assert isinstance(model.get_input_embeddings(), Int8Embedding) == tied
    summary = sparse_summary(model)
    assert summary["head_int8"] and summary["head_tied"] == tied
    assert summary["block_bytes"] < 0.3 * summary["block_dense_bytes"]
    out, inp = model.get_output_embeddings().codes.shape  # codes + padding, full mask, row offsets, scales (f32, bf16)
    assert summary["head_bytes"] == out * inp + 64 + out * 8 * -(-inp // 64) + 8 * (out + 1) + 6 * out
    assert summary["head_dense_bytes"] == 4 * out * inp
    out = _generate(model)
    dense = densify(copy.deepcopy(model))
    assert not any(isinstance(m, (SparseLinear, Int8Linear, Int8Embedding)) for m in dense.modules())
    assert (dense.get_output_embeddings().weight is dense.get_input_embeddings().weight) == tied
    assert torch.equal(_generate(dense), out)
    with torch.no_grad():  # the embedding lookup reads the dequantized rows: the same as the dense model's
        assert torch.equal(model.get_input_embeddings()(IDS), dense.get_input_embeddings()(IDS))
    # saved (v2 codes + scales, the head dequantized) and loaded again: the same codes, scales and tokens
    model.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata()["owl_format"] == "owl-bitmask-v2"
    loaded = load_sparse(tmp_path / "m")
    again = {n: m for n, m in loaded.named_modules() if isinstance(m, SparseLinear)}
    for name, m in ((n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)):
        assert torch.equal(again[name].values, m.values) and torch.equal(again[name].scales, m.scales)
    head, head_again = model.get_output_embeddings(), loaded.get_output_embeddings()
    assert torch.equal(head_again.codes, head.codes) and torch.equal(head_again.scales, head.scales)
    assert torch.equal(_generate(loaded), out)


def test_lean_compiled_decode_of_an_int8_model_gives_the_eager_tokens():
    """`inference.decode.generate` (torch.compile): int8 sparse linears (GPT-2 Conv1D), the int8 head's bf16 matmul
    and the tied int8 embedding trace into the graph and give the eager model's tokens."""
    from optimum_owl.inference.decode import compile_unavailable, generate

    if compile_unavailable():
        pytest.skip(compile_unavailable())
    model = _pruned_tiny("gpt2")
    sparsify(model, values="int8")
    model.to(torch.bfloat16)
    assert isinstance(model.get_input_embeddings(), Int8Embedding) and model.get_output_embeddings().scales.dtype == \
        torch.float32
    assert torch.equal(generate(model, IDS, max_new_tokens=8), _generate(model, IDS, 8))


def test_quantize_head_is_switchable_and_float_values_leave_the_head_alone():
    model = _pruned_tiny("llama")
    sparsify(model, values="int8", quantize_head=False)
    assert type(model.get_output_embeddings()) is nn.Linear
    assert all(m.int8 for m in model.modules() if isinstance(m, SparseLinear))
    out = _generate(model)
    assert torch.equal(_generate(densify(copy.deepcopy(model))), out)
    model = _pruned_tiny("gpt2")
    sparsify(model)
    assert type(model.get_output_embeddings()) is nn.Linear and not sparse_summary(model)["int8_linears"]
    reference = sparsify(_pruned_tiny("gpt2"), values="int8")
    sparsify(model, values="int8")  # float values already sparse become int8: the same codes as at once
    for a, b in zip((m for m in model.modules() if isinstance(m, SparseLinear)),
                    (m for m in reference.modules() if isinstance(m, SparseLinear))):
        assert a.int8 and torch.equal(a.values, b.values) and torch.equal(a.scales, b.scales)
    sparsify(_pruned_tiny("gpt2"), quantize_head=True)  # int8 head over float values: allowed


@pytest.mark.skipif(not STORIES.is_dir(), reason="shared assets not found")
def test_stories260k_int8_greedy_generation_equals_the_dequantized_dense_model():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not head:
                w = module.weight
                w[w.abs() <= w.abs().flatten().kthvalue(int(0.7 * w.numel())).values] = 0
    ids = torch.tensor([[1, 400, 300, 259, 260, 301]])
    sparsify(model, values="int8")
    assert sum(isinstance(m, SparseLinear) and m.int8 for m in model.modules()) == 7 * model.config.num_hidden_layers
    out = _generate(model, ids, 40)
    assert torch.equal(_generate(densify(copy.deepcopy(model)), ids, 40), out)


# --------------------------------------------------------------------------------------------------- loading
def _write_v2_by_hand(src: Path, dst: Path, group_size: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """An `owl-bitmask-v2` checkpoint written with safetensors directly from a float compact one (every compressed
    weight as int8 codes + `_scale`, by the shared quantizer; independent of the library's writer). Returns
    `{name: (dense codes [out, in], scales)}`."""
    dst.mkdir()
    for extra in ("config.json", "generation_config.json"):
        if (src / extra).is_file():
            (dst / extra).write_bytes((src / extra).read_bytes())
    with safe_open(str(src / "model.safetensors"), framework="pt") as handle:
        meta = dict(handle.metadata())
    tensors = load_file(str(src / "model.safetensors"))
    transposed = json.loads((src / "config.json").read_text())["model_type"] == "gpt2"
    crc = json.loads(meta["owl_crc32"])
    expected = {}
    for name in [k.removesuffix("_bitmask") for k in list(tensors) if k.endswith("_bitmask")]:
        stored = decompress(tensors[name], tensors[name + "_bitmask"], tensors[name + "_shape"], name=name)
        w = stored.t() if transposed else stored
        codes, scales, _ = quantize_dequantize(w, stored_mask(w).reshape(w.shape), group_size)
        values, bitmask, shape = compress((codes.t() if transposed else codes).contiguous(), stored_mask(stored))
        tensors.update({name: values, name + "_bitmask": bitmask, name + "_shape": shape, name + "_scale": scales})
        parts = [values, bitmask, shape]
        crc[name] = [zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes()) for t in parts] + ["int8", zlib.crc32(
            scales.view(torch.uint8).numpy().tobytes())]
        expected[name] = (codes, scales)
    meta.update(owl_format="owl-bitmask-v2", owl_values="int8", owl_group_size=str(group_size or 0),
                owl_crc32=json.dumps(crc, sort_keys=True))
    save_file(tensors, str(dst / "model.safetensors"), metadata=meta)
    return expected


@pytest.mark.parametrize(("arch", "group_size"), [("llama", None), ("llama", 64), ("gpt2", None)])
def test_load_sparse_reads_a_v2_checkpoint_straight_into_int8_and_quantizes_a_float_one(tmp_path, arch, group_size):
    model = _pruned_tiny(arch, vocab=96)
    reference = copy.deepcopy(model)
    sparsify(model)  # float values: a v1 checkpoint
    model.save_pretrained(tmp_path / "v1")
    expected = _write_v2_by_hand(tmp_path / "v1", tmp_path / "v2", group_size)
    loaded = load_sparse(tmp_path / "v2")
    for name, (codes, scales) in expected.items():
        module = loaded.get_submodule(name.removesuffix(".weight"))
        assert isinstance(module, SparseLinear) and module.group_size == group_size
        assert torch.equal(unpack_stored(module.packed()), codes) and torch.equal(module.scales, scales)
        with torch.no_grad():  # the reference gets the same dequantized weights, dense
            dense = reference.get_submodule(name.removesuffix(".weight"))
            deq = dequantize_int8(codes, scales, group_size)
            dense.weight.copy_(deq.t() if is_conv1d(dense) else deq)
    assert isinstance(loaded.get_output_embeddings(), Int8Linear)  # int8 values: the head by default too
    loaded_float_head = load_sparse(tmp_path / "v2", quantize_head=False)
    assert torch.equal(_generate(loaded_float_head), _generate(reference))
    # a float checkpoint quantized while loading = sparsify(values="int8") of the same weights
    quantized = load_sparse(tmp_path / "v1", values="int8", group_size=group_size, quantize_head=False)
    for name, (codes, scales) in expected.items():
        module = quantized.get_submodule(name.removesuffix(".weight"))
        assert torch.equal(unpack_stored(module.packed()), codes) and torch.equal(module.scales, scales)
    # int8 codes read as float values (dequantized), and the float checkpoint as it is
    as_float = load_sparse(tmp_path / "v2", values="float")
    assert not any(m.int8 for m in as_float.modules() if isinstance(m, SparseLinear))
    assert type(as_float.get_output_embeddings()) is nn.Linear
    assert torch.equal(_generate(as_float), _generate(reference))


def test_load_sparse_refuses_a_corrupt_scale_and_group_size_mismatches(tmp_path):
    model = _pruned_tiny("llama")
    sparsify(model, values="int8", quantize_head=False)
    model.save_pretrained(tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        meta = dict(handle.metadata())
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith("_scale"))
    with pytest.raises(ValueError, match="group_size"):
        load_sparse(tmp_path / "m", values="int8", group_size=128)
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(file), metadata=meta)
    with pytest.raises(OWLCheckpointError, match="scales fail their CRC-32"):
        load_sparse(tmp_path / "m")


def test_old_float_compact_checkpoints_still_load_and_quantize_at_load():
    data = Path(__file__).parent / "data" / "compact_llama_v0.1.0"
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(data).eval()
    as_stored = load_sparse(data)
    assert all(not m.int8 for m in as_stored.modules() if isinstance(m, SparseLinear))
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.equal(_generate(as_stored, ids, 8), _generate(dense, ids, 8))
    int8 = load_sparse(data, values="int8")
    reference = sparsify(copy.deepcopy(dense), values="int8", min_sparsity=0.0)
    for (name, a), b in zip(((n, m) for n, m in int8.named_modules() if isinstance(m, SparseLinear)),
                            (m for m in reference.modules() if isinstance(m, SparseLinear))):
        assert torch.equal(a.values, b.values) and torch.equal(a.scales, b.scales), name


def test_a_model_pruned_with_int8_values_keeps_its_codes():
    from optimum_owl import OWLPruner, OWLPrunerConfig
    from optimum_owl.formats.int8 import encode_int8, int8_grid

    from .conftest import calib_ids

    model = tiny_model("llama")
    config = OWLPrunerConfig(sparsity=0.5, method="wanda", layerwise="uniform", num_samples=4, seqlen=16, batch_size=4,
                             values="int8", group_size=64)
    OWLPruner(config).prune(model, dataset=calib_ids(n=4))
    grids = {n: (int8_grid(m), encode_int8(m.weight.detach(), int8_grid(m), False, n)) for n, m in model.named_modules()
             if int8_grid(m) is not None}
    assert grids
    with pytest.raises(ValueError, match="group_size=128.*group_size=64"):
        sparsify(copy.deepcopy(model), values="int8", group_size=128)
    sparsify(model, values="int8", min_sparsity=0.0)
    for name, (grid, (codes, bitmask, shape, scales)) in grids.items():
        module = model.get_submodule(name)
        assert module.group_size == 64 and torch.equal(module.scales, grid.scales) and torch.equal(scales, grid.scales)
        assert all(torch.equal(a, b) for a, b in zip(to_checkpoint_parts(module.packed(), False), (codes, bitmask, shape)))


# ---------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_field_and_nothing_sparse_enough_is_said(caplog):
    model = _pruned_tiny("llama", sparsity=0.2)
    with pytest.raises(ValueError, match="values must be one of"):
        sparsify(model, values="int4")
    with pytest.raises(ValueError, match="group_size must be .* multiple of 64"):
        sparsify(model, values="int8", group_size=100)
    with pytest.raises(ValueError, match="group_size=128 applies to int8 values"):
        sparsify(model, group_size=128)
    with pytest.raises(ValueError, match="values must be one of"):
        load_sparse(Path(__file__).parent / "data" / "compact_llama_v0.1.0", values="fp8")
    with pytest.raises(ValueError, match="pass values='int8'"):
        load_sparse(Path(__file__).parent / "data" / "compact_llama_v0.1.0", group_size=128)
    with caplog.at_level(logging.WARNING, logger="optimum_owl.inference.convert"):
        sparsify(model, values="int8", quantize_head=False)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert "none of the 21 eligible linears reaches min_sparsity=0.30" in caplog.text
    assert "Prune the model first, or pass a lower min_sparsity" in caplog.text


def test_generate_cli_with_int8_values_compares_the_dequantized_weights_dense(tmp_path, capsys):
    from optimum_owl.cli import main

    model = _pruned_tiny("llama", vocab=512)  # the stories260K tokenizer's vocabulary
    model.save_pretrained(tmp_path / "dense")
    tok = Path(__file__).resolve().parents[1] / "optimum_owl" / "assets" / "stories260K"
    common = ["--tokenizer", str(tok), "--prompt", "Once upon", "--max-new-tokens", "6", "--threads", "1"]
    assert main(["generate", str(tmp_path / "dense"), *common, "--values", "int8", "--compare-dense",
                 "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "21 sparse linears" in out and "LM head: dense int8" in out and "tokens identical: True" in out
    sparsify(model)  # a float compact checkpoint, quantized while loading (load_sparse)
    model.save_pretrained(tmp_path / "compact")
    assert main(["generate", str(tmp_path / "compact"), *common, "--values", "int8", "--group-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "21 sparse linears" in out and "int8 weights" in out and "LM head: dense int8" in out
    assert main(["generate", str(tmp_path / "dense"), *common, "--values", "int8", "--group-size", "100"]) == 2
    assert "--group-size 100: a multiple of 64" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "dense"), *common, "--dense", "--values", "int8"]) == 2


def test_model_card_says_which_value_forms_were_measured(monkeypatch):
    import optimum_owl.inference as inference
    from optimum_owl.hub.card import sparse_inference_card_section

    text = "\n".join(sparse_inference_card_section())
    assert "with float values (AMD EPYC" in text and "with int8 values" in text
    assert inference.MEASURED_INT8 in text and "not benchmarked" not in text
    monkeypatch.setattr(inference, "MEASURED_INT8", None)
    assert "not benchmarked by optimum-owl yet" in "\n".join(sparse_inference_card_section())
    monkeypatch.setattr(inference, "MEASURED_INT8", "Zen 4, 2 threads: 7.0x dense fp32")
    assert "with int8 values (`values=\"int8\"`" in (text := "\n".join(sparse_inference_card_section()))
    assert "Zen 4, 2 threads: 7.0x dense fp32" in text and "not benchmarked" not in text


@pytest.mark.slow
@pytest.mark.skipif(not (ASSETS / "models" / "smollm2-135m").is_dir(), reason="shared assets not found")
def test_smollm2_int8_greedy_generation_equals_the_dequantized_dense_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = ASSETS / "models" / "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # 60% unstructured, magnitude per row (as a pruned model would be)
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not head:
                w = module.weight
                idx = (w.abs() + 1e-9 * torch.rand(w.shape, generator=g)).topk(int(0.6 * w.shape[1]), dim=1,
                                                                                  largest=False).indices
                w.scatter_(1, idx, 0.0)
    ids = tokenizer("Once upon a time, there was a little girl who", return_tensors="pt")["input_ids"]
    sparsify(model, values="int8")
    assert sum(isinstance(m, SparseLinear) and m.int8 for m in model.modules()) == 7 * 30
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    assert isinstance(model.get_input_embeddings(), Int8Embedding) == tied
    out = _generate(model, ids, 24)
    dense = _generate(densify(copy.deepcopy(model)), ids, 24)
    assert torch.equal(dense, out), (tokenizer.decode(out[0]), tokenizer.decode(dense[0]))
