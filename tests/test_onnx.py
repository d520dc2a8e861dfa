"""Sparse ONNX export: bitmask pack/unpack math, the three storages, KV-cache export checked with onnxruntime."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from optimum_owl.export import (  # noqa: E402
    OnnxCausalLM,
    UnsupportedArchitectureError,
    apply_storage,
    decode_bitmask,
    encode_bitmask,
    export_onnx,
    pack_mask,
    unpack_mask,
)

from .test_hub import tiny_pruned_llama  # noqa: E402


def _run_cli(argv):
    parser = argparse.ArgumentParser(prog="optimum-owl")
    sub = parser.add_subparsers(dest="command")
    for name in ("optimum_owl.commands.push", "optimum_owl.commands.export"):
        importlib.import_module(name).register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


# ------------------------------------------------------------------------------------------------ packing math
def test_pack_bit_order_and_roundtrip():
    assert pack_mask(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1], bool)).tolist() == [1, 1]
    assert pack_mask(np.array([0, 1, 1], bool)).tolist() == [6]
    rng = np.random.default_rng(0)
    for numel in (1, 7, 8, 9, 1000):
        mask = rng.random(numel) < 0.3
        assert np.array_equal(unpack_mask(pack_mask(mask), numel), mask)
    w = rng.standard_normal((13, 11)).astype(np.float16)
    w[rng.random(w.shape) < 0.7] = 0
    packed, values = encode_bitmask(w)
    assert packed.size == (w.size + 7) // 8 and values.size == np.count_nonzero(w)
    assert np.array_equal(decode_bitmask(packed, values, w.shape), w)
    with pytest.raises(ValueError, match="set bits"):
        decode_bitmask(packed, values[:-1], w.shape)
    with pytest.raises(ValueError, match="truncated"):
        unpack_mask(packed[:2], w.size)


# ------------------------------------------------------------------------------------------------ storages
def _matmul_model(weights: dict[str, np.ndarray], opset: int = 17):
    """y = x @ A @ B^T-copy ... : every weight applied in sequence, to test storages on a small graph."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, prev = [], "x"
    for i, name in enumerate(weights):
        nodes.append(helper.make_node("MatMul", [prev, name], [f"h{i}"]))
        prev = f"h{i}"
    dim = next(iter(weights.values())).shape[0]
    out_dim = list(weights.values())[-1].shape[1]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, dim])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [None, out_dim])],
        initializer=[numpy_helper.from_array(w, n) for n, w in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _run(model, x, optimized_path=None):
    options = ort.SessionOptions()
    if optimized_path:
        options.optimized_model_filepath = str(optimized_path)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_storages_are_exact_and_folded(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((48, 40)).astype(np.float32)
    a[rng.random(a.shape) < 0.7] = 0  # pruned
    b = rng.standard_normal((40, 40)).astype(np.float32)  # dense: stays dense
    c = np.ascontiguousarray(a.T)  # a transposed copy (like a tied LM head): stored once
    x = rng.standard_normal((3, 48)).astype(np.float32)
    ref = _run(_matmul_model({"a": a, "b": b, "c": c}), x)
    sizes = {}
    for storage in ("dense", "bitmask", "sparse_initializer"):
        model = _matmul_model({"a": a, "b": b, "c": c})
        stats = apply_storage(model, storage)
        onnx.checker.check_model(model)
        out = _run(model, x, tmp_path / f"{storage}.opt.onnx")
        assert np.array_equal(out, ref), storage  # same dense kernels after folding: bit-identical
        sizes[storage] = model.ByteSize()
        if storage == "dense":
            assert stats.converted == [] and not stats.aliased
        else:
            assert stats.converted == ["a"] and stats.aliased == {"c": "a"}
    assert sizes["bitmask"] < 0.45 * sizes["dense"]
    assert sizes["sparse_initializer"] < sizes["dense"]
    folded = onnx.load(tmp_path / "bitmask.opt.onnx")
    ops = {n.op_type for n in folded.graph.node}
    assert ops == {"MatMul"}, ops  # the decoder (BitShift, CumSum, Gather, Transpose) was constant-folded
    with pytest.raises(ValueError, match="opset"):
        apply_storage(_matmul_model({"a": a}, opset=13), "bitmask")
    with pytest.raises(ValueError, match="storage"):
        apply_storage(_matmul_model({"a": a}), "zip")


# ------------------------------------------------------------------------------------------------ export
def test_export_bitmask_kv_cache_matches_torch(tmp_path):
    model, report, _ = tiny_pruned_llama()
    dense = export_onnx(model, tmp_path / "dense", storage="dense", max_new_tokens=32)
    result = export_onnx(model, tmp_path / "bitmask", storage="bitmask", max_new_tokens=32, report=report)
    meta = json.loads((tmp_path / "bitmask" / "owl_onnx.json").read_text())
    assert meta == result.metadata
    val = meta["validation"]
    assert val["prefill_rel_error"] <= 1e-4 and val["decode_rel_error"] <= 1e-4
    assert val["greedy_equal"] and val["greedy_tokens"] == 32
    assert val["session_creation_s"] > 0
    assert meta["pruned"] and abs(meta["weight_sparsity"] - report.sparsity) < 1e-9
    assert meta["sizes"]["dense_onnx_bytes"] == dense.metadata["sizes"]["onnx_bytes"]
    # hidden 32: the graph itself is ~half of the file, so only the weights shrink a lot (docs/onnx.md: scale)
    assert meta["storage"]["compact_weight_bytes"] < 0.6 * meta["storage"]["dense_weight_bytes"]
    assert result.size_ratio < 0.9
    assert (tmp_path / "bitmask" / "owl_report.json").exists() and (tmp_path / "bitmask" / "config.json").exists()
    # batch of 2 with the same graph, prefill + decode through the cache
    lm = OnnxCausalLM(tmp_path / "bitmask")
    ids = np.array([[3, 17, 42, 7], [9, 1, 100, 64]])
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert np.array_equal(lm.generate(ids, max_new_tokens=8), ref.numpy())


def test_export_sparse_initializer_and_fp16(tmp_path):
    model, _, _ = tiny_pruned_llama()
    sparse = export_onnx(model, tmp_path / "coo", storage="sparse_initializer", max_new_tokens=8)
    assert sparse.metadata["validation"]["prefill_rel_error"] <= 1e-4 and sparse.metadata["validation"]["greedy_equal"]
    assert len(onnx.load(tmp_path / "coo" / "model.onnx").graph.sparse_initializer) > 0
    half = export_onnx(model, tmp_path / "fp16", dtype="float16", max_new_tokens=8)
    assert half.metadata["dtype"] == "float16"
    assert half.metadata["validation"]["prefill_rel_error"] < 1e-2
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left alone


def test_export_unpruned_model_and_card(tmp_path):
    from optimum_owl.hub import onnx_card_section

    torch.manual_seed(0)
    model, _, _ = tiny_pruned_llama(sparsities=(0.0, 0.0))
    result = export_onnx(model, tmp_path / "o", max_new_tokens=4)
    assert result.metadata["pruned"] is False and result.metadata["storage"]["num_converted"] == 0
    assert result.metadata["validation"]["greedy_equal"]
    assert any("not pruned" in line for line in onnx_card_section(result.metadata))


def test_export_bad_input(tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    model, _, _ = tiny_pruned_llama()
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="model_type='bert'"):
        export_onnx(bert, tmp_path / "b")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedArchitectureError, match="llama"):
        export_onnx(gpt2, tmp_path / "g")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        export_onnx(model, tmp_path / "exists")
    with pytest.raises(ValueError, match="storage"):
        export_onnx(model, tmp_path / "s", storage="zip")
    with pytest.raises(ValueError, match="dtype"):
        export_onnx(model, tmp_path / "s", dtype="int8")
    export_onnx(model, tmp_path / "exists", overwrite=True, validate=False)
    assert (tmp_path / "exists" / "model.onnx").exists()
    assert not (tmp_path / "b").exists() and not (tmp_path / "s").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # simulate a missing optional dependency
    with pytest.raises(ImportError, match=r"pip install \"optimum-owl\[onnx\]\""):
        export_onnx(model, tmp_path / "m")


def test_cli_export_onnx(tmp_path, capsys):
    from optimum_owl.hub import save_for_hub

    model, report, config = tiny_pruned_llama()
    folder = tmp_path / "pruned"
    folder.mkdir()
    save_for_hub(model, folder, report, config)
    out = tmp_path / "onnx"
    assert _run_cli(["export", "onnx", str(folder), "-o", str(out), "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "greedy-8 equal: True" in printed and "x the dense export" in printed
    assert json.loads((out / "owl_onnx.json").read_text())["validation"]["greedy_equal"]
    assert (out / "owl_report.json").exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        _run_cli(["export", "onnx", str(folder), "-o", str(out)])
