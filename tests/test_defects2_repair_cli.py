"""Issue 30 (second defect trial): repair, eval, load errors, GGUF input, model cards. One test (or a few) per item;
each failed before its fix (items 6 (repair), 9, 12, 16, 17, 19, 21, 22, 23)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from optimum_owl.cli import main

from .conftest import calib_ids, tiny_model
from .test_cli_and_eval import _saved_model_and_text, _word_tokenizer
from .test_defects import _flip_tensor_bytes, _one_line_error

ROOT = Path(__file__).resolve().parents[1]
REPAIR_FAST = ["--max-steps", "1", "--seqlen", "32", "--batch-size", "2", "--r", "2"]


def _prune_args(src, text, out, *extra: str) -> list[str]:
    return ["prune", str(src), "--calibration", str(text), "--output-dir", str(out), "--sparsity", "0.5",
            "--num-samples", "2", "--seqlen", "32", "--batch-size", "2", *extra]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """(dense model folder, calibration text, pruned folder from `optimum-owl prune`), built once for the module."""
    root = tmp_path_factory.mktemp("defects2")
    src, text = _saved_model_and_text(root)
    assert main(_prune_args(src, text, root / "pruned")) == 0
    return src, text, root / "pruned"


def _copy(folder: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


def _card_body(text: str) -> str:
    return text.split("\n---\n", 1)[-1]


# ---------------------------------------------------------------------------------------------------------- item 6
def test_6_repair_refuses_a_seqlen_beyond_the_model_context(pruned, tmp_path, capsys):
    from optimum_owl.errors import RepairConfigError
    from optimum_owl.repair import RepairConfig, repair

    _, text, folder = pruned
    line = _one_line_error(capsys, ["repair", str(folder), "--train-data", str(text), "-o", str(tmp_path / "out"),
                                    *REPAIR_FAST, "--seqlen", "200"])
    assert "seqlen" in line and "max_position_embeddings=128" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(RepairConfigError, match="`seqlen`=256 exceeds the model's max_position_embeddings=128"):
        repair(tiny_model("llama"), train_data=calib_ids(4, 256), config=RepairConfig(seqlen=256, max_steps=1))


# ---------------------------------------------------------------------------------------------------------- item 9
def test_9_a_truncated_safetensors_model_is_one_line_naming_the_file(tmp_path, capsys):
    src, text = _saved_model_and_text(tmp_path)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = _one_line_error(capsys, ["eval", str(src), "--text", str(text), "--seqlen", "32"])
    assert str(weights) in line and "truncated or corrupt" in line and "unexpected" not in line
    line = _one_line_error(capsys, _prune_args(src, text, tmp_path / "out"))
    assert str(weights) in line and "unexpected" not in line


def test_9_eval_of_a_compact_checkpoint_with_a_corrupt_embedding_is_one_line(pruned, tmp_path, capsys):
    _, text, folder = pruned
    corrupt = _copy(folder, tmp_path, "corrupt")
    _flip_tensor_bytes(corrupt / "model.safetensors", "model.embed_tokens.weight")
    capsys.readouterr()
    assert main(["eval", str(corrupt), "--text", str(text), "--seqlen", "32"]) == 2
    err = capsys.readouterr().err
    assert "LOAD REPORT" not in err and "Traceback" not in err and "unexpected" not in err
    assert "`model.embed_tokens.weight` fails its CRC-32 check" in err.strip().splitlines()[-1]


def test_9_the_load_report_of_a_successful_load_is_still_logged(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    from optimum_owl.pruning.modeling import load_model

    src, _ = _saved_model_and_text(tmp_path)
    tensors = load_file(src / "model.safetensors")
    tensors["model.unexpected_extra"] = torch.zeros(2)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        load_model(str(src))
    assert "LOAD REPORT" in caplog.text and "unexpected_extra" in caplog.text


# ---------------------------------------------------------------------------------------------------------- item 12
def test_12_magnitude_uniform_prunes_a_model_folder_without_tokenizer_files(tmp_path, capsys):
    src, text = _saved_model_and_text(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, bare / name)
    out = tmp_path / "out"
    assert main(["prune", str(bare), "--method", "magnitude", "--layerwise", "uniform", "--sparsity", "0.5",
                 "-o", str(out)]) == 0
    assert (out / "owl_report.json").is_file() and not (out / "tokenizer.json").exists()
    line = _one_line_error(capsys, _prune_args(bare, text, tmp_path / "out2"))  # wanda + OWL read calibration text
    assert "needs a tokenizer" in line and "--tokenizer" in line and str(bare) in line


# ---------------------------------------------------------------------------------------------------------- item 16
def _repaired(folder: Path, text: Path, out: Path, **save_kwargs):
    from optimum_owl.pruning.modeling import load_model
    from optimum_owl.repair import RepairConfig, repair, save_repaired

    model = load_model(str(folder))
    cfg = RepairConfig(max_steps=1, seqlen=32, per_device_train_batch_size=2, r=2)
    model, report = repair(model, _word_tokenizer(), train_data=str(text), config=cfg)
    save_repaired(model, out, report=report, **save_kwargs)
    return model, report


def test_16_save_repaired_carries_the_pruning_record(pruned, tmp_path):
    _, text, folder = pruned
    _repaired(folder, text, tmp_path / "loaded")  # the folder the model was loaded from holds the record
    moved = _copy(folder, tmp_path, "moved")
    _repaired(moved, text, tmp_path / "explicit", source=folder)
    for out in (tmp_path / "loaded", tmp_path / "explicit"):
        for name in ("owl_report.json", "owl_config.json"):
            assert (out / name).read_bytes() == (folder / name).read_bytes(), (out, name)
        record = json.loads((out / "repair_report.json").read_text())
        assert record["method"] == "masked_lora" and record["steps"] == 1 and record["train_tokens"] > 0


def test_16_save_repaired_of_a_model_pruned_in_memory_writes_its_record(tmp_path):
    from optimum_owl import OWLPruner, OWLPrunerConfig
    from optimum_owl.repair import RepairConfig, repair, save_repaired

    model = tiny_model("llama")
    OWLPruner(OWLPrunerConfig(sparsity=0.5, num_samples=4, seqlen=16, batch_size=2)).prune(model, dataset=calib_ids(4, 16))
    model, report = repair(model, train_data=calib_ids(4, 16), config=RepairConfig(max_steps=1, seqlen=16, r=2))
    save_repaired(model, tmp_path / "out", report=report)
    assert json.loads((tmp_path / "out" / "owl_report.json").read_text())["config"]["sparsity"] == 0.5
    assert json.loads((tmp_path / "out" / "owl_config.json").read_text())["sparsity"] == 0.5


def test_16_cli_repair_output_keeps_the_record_and_its_card_says_pruned(pruned, tmp_path, capsys):
    from optimum_owl.hub import write_card

    _, text, folder = pruned
    out = tmp_path / "repaired"
    assert main(["repair", str(folder), "--train-data", str(text), "-o", str(out), *REPAIR_FAST,
                 "--eval-data", str(text)]) == 0
    assert {"owl_report.json", "owl_config.json", "repair_report.json"} <= {p.name for p in out.iterdir()}
    body = _card_body(write_card(out).read_text())
    assert "not pruned" not in body and "pruned to **48.96% sparsity**" in body
    assert "## Repair" in body and "masked_lora" in body and "after**" in body


def test_16_card_without_a_record_measures_the_weights_and_invents_no_reproduction(pruned, tmp_path):
    from optimum_owl.hub import write_card

    src, _, folder = pruned
    bare = _copy(folder, tmp_path, "bare")
    for name in ("owl_report.json", "owl_config.json"):
        (bare / name).unlink()
    body = _card_body(write_card(bare).read_text())
    assert "not pruned" not in body and "pruned to **48.96% sparsity**" in body and "record" in body
    assert "OWLPrunerConfig(" not in body and "dataset=None" not in body
    dense = _copy(src, tmp_path, "dense")
    assert "**This model is not pruned**: 0.00%" in write_card(dense).read_text()


# ---------------------------------------------------------------------------------------------------------- item 17
def _auto_report(folder: Path):
    """The pruning report of `folder` as `layerwise="auto"` would leave it after choosing ATP β = 0.005."""
    from optimum_owl.pruning.report import Candidate, PruneReport

    report = PruneReport.load(folder)
    report.config["layerwise"] = "auto"
    report.allocation = {"family": "atp", "knob": {"atp_beta": 0.005}, "metric": None}
    for block in report.blocks:
        block.outlier_ratio = None
    report.candidates = [Candidate("uniform", None, None, 3.0), Candidate("owl", 5.0, 0.08, 2.95),
                         Candidate("atp", None, None, 2.9, chosen=True, family="atp", knob={"atp_beta": 0.005})]
    return report


def test_17_card_after_auto_names_the_chosen_family_and_gives_both_commands(pruned):
    from optimum_owl.hub import render_model_card

    body = _card_body(str(render_model_card(_auto_report(pruned[2]), lookup_license=False)))
    method = body.split("## Method", 1)[1].split("##", 1)[0]
    assert "ATP" in method and "β = 0.005" in method and 'layerwise="auto"' in method and "among 3 candidates" in method
    assert "M = 5" not in method and "outlier ratio" not in method
    assert "![Per-block sparsity](" in body  # no outlier ratios: the caption does not promise them
    commands = [line for line in body.splitlines() if line.startswith("optimum-owl prune")]
    assert any("--layerwise auto" in c for c in commands)
    assert any("--layerwise atp --atp-beta 0.005" in c for c in commands)
    assert "layerwise='atp'" in body  # the Python snippet applies the chosen setting


def test_17_card_of_a_fixed_owl_run_still_explains_owl(pruned):
    from optimum_owl.hub import render_model_card
    from optimum_owl.pruning.report import PruneReport

    body = _card_body(str(render_model_card(PruneReport.load(pruned[2]), lookup_license=False)))
    method = body.split("## Method", 1)[1].split("##", 1)[0]
    assert "Outlier Weighed" in method and "M = 5, λ = 0.08" in method
    assert "![Per-block sparsity and outlier ratio](" in body
    assert sum(line.startswith("optimum-owl prune") for line in body.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------- item 19
def test_19_repair_densifies_a_load_sparse_model(pruned, caplog):
    from optimum_owl.inference import SparseLinear
    from optimum_owl.inference.loading import load_sparse
    from optimum_owl.repair import RepairConfig, repair, zero_masks

    model = load_sparse(pruned[2])
    assert any(isinstance(m, SparseLinear) for m in model.modules())
    with caplog.at_level(logging.INFO, logger="optimum_owl.repair"):
        model, report = repair(model, train_data=calib_ids(4, 16),
                               config=RepairConfig(max_steps=1, seqlen=16, r=2, per_device_train_batch_size=2))
    assert "densifying" in caplog.text
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert report.zeros_preserved and report.sparsity_before == pytest.approx(0.4896, abs=1e-3)
    assert zero_masks(model)


# ---------------------------------------------------------------------------------------------------------- item 21
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _write_tiny_gguf(folder: Path) -> str:
    """The tiny Llama of the tests as an F32 GGUF file (llama.cpp tensor names) in `folder`; returns its name."""
    gguf = pytest.importorskip("gguf")
    model = tiny_model("llama")
    cfg = model.config
    folder.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(folder / "tiny.gguf"), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for key, value in model.state_dict().items():
        if key not in top:
            parts = key.split(".")
            top[key] = f"blk.{parts[2]}.{GGUF_NAMES['.'.join(parts[3:-1])]}.weight"
        writer.add_tensor(top[key], value.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return "tiny.gguf"


def test_21_prune_eval_repair_and_export_read_a_gguf_model(tmp_path, capsys):
    from optimum_owl.pruning.modeling import load_model

    src, text = _saved_model_and_text(tmp_path)
    name = _write_tiny_gguf(tmp_path / "gguf")
    source = ["--gguf-file", name, "--tokenizer", str(src)]
    assert main(["eval", str(tmp_path / "gguf"), *source, "--text", str(text), "--seqlen", "32"]) == 0
    assert "block-weight sparsity 0.0000" in capsys.readouterr().out
    out = tmp_path / "pruned"
    assert main(_prune_args(tmp_path / "gguf", text, out, *source)) == 0
    model = load_model(str(out))  # an ordinary compact optimum-owl checkpoint
    assert getattr(model.config.quantization_config, "quant_method", None) == "owl"
    assert main(["repair", str(tmp_path / "gguf"), *source, "--train-data", str(text), "-o", str(tmp_path / "rep"),
                 *REPAIR_FAST]) == 0
    line = _one_line_error(capsys, ["eval", str(tmp_path / "gguf"), "--gguf-file", "missing.gguf", "--text", str(text)])
    assert "missing.gguf" in line
    pytest.importorskip("onnxruntime")
    assert main(["export", "onnx", str(tmp_path / "gguf"), *source, "-o", str(tmp_path / "onnx"),
                 "--max-new-tokens", "2"]) == 0
    assert (tmp_path / "onnx" / "owl_onnx.json").is_file()


# ---------------------------------------------------------------------------------------------------------- item 22
def test_22_card_command_writes_prints_and_protects_the_readme(pruned, tmp_path, capsys):
    folder = _copy(pruned[2], tmp_path, "model")
    before = sorted(p.name for p in folder.iterdir())
    capsys.readouterr()
    assert main(["card", str(folder), "--stdout", "--license", "mit"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("---\n") and "license: mit" in printed and "## Per-block sparsity" in printed
    assert sorted(p.name for p in folder.iterdir()) == before  # --stdout writes nothing
    assert main(["card", str(folder)]) == 0
    assert (folder / "README.md").read_text().startswith("---\n") and (folder / "owl_sparsity.png").is_file()
    (folder / "README.md").write_text("my notes")
    line = _one_line_error(capsys, ["card", str(folder)])
    assert "--overwrite" in line and (folder / "README.md").read_text() == "my notes"


def test_22_push_dry_run_lists_the_files_without_any_network(pruned, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("push --dry-run must not reach the Hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "__init__", no_network)
    folder = _copy(pruned[2], tmp_path, "model")
    before = sorted(p.name for p in folder.iterdir())
    capsys.readouterr()
    assert main(["push", str(folder), "--repo-id", "me/tiny-owl", "--dry-run",
                 "--base-model", "someone/tiny"]) == 0
    out = capsys.readouterr().out
    assert "README.md" in out and "owl_sparsity.png" in out and "model.safetensors" in out and "nothing was uploaded" in out
    assert sorted(p.name for p in folder.iterdir()) == before


# ---------------------------------------------------------------------------------------------------------- item 23
def test_23_repair_logs_a_sparsity_summary_not_one_value_per_block(pruned):
    from transformers import TrainerCallback

    from optimum_owl.pruning.modeling import load_model
    from optimum_owl.repair import RepairConfig, repair

    seen: dict = {}

    class Spy(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.update(logs or {})

    cfg = RepairConfig(max_steps=2, seqlen=16, r=2, per_device_train_batch_size=2, logging_steps=1)
    repair(load_model(str(pruned[2])), train_data=calib_ids(4, 16), config=cfg, callbacks=[Spy()])
    assert seen["sparsity/block_min"] == pytest.approx(0.40625) and seen["sparsity/block_max"] == pytest.approx(0.5625)
    assert "sparsity/block_mean" in seen and "sparsity/total" in seen
    assert not any(key.startswith("sparsity/block_") and key[-1].isdigit() for key in seen)


def test_23_eval_says_how_many_windows_and_tokens_it_scored(pruned, capsys):
    _, text, folder = pruned
    capsys.readouterr()
    assert main(["eval", str(folder), "--text", str(text), "--seqlen", "32", "--max-windows", "5"]) == 0
    assert "on 5 windows of 32 tokens (155 tokens scored, of 600 in the text)" in capsys.readouterr().out


def test_23_repair_takes_o_like_prune_and_export(pruned, tmp_path):
    from optimum_owl.cli import build_parser

    _, text, folder = pruned
    for flag in ("-o", "--output-dir"):
        args = build_parser().parse_args(["repair", str(folder), "--train-data", str(text), flag, str(tmp_path)])
        assert args.output_dir == str(tmp_path)


def test_23_docs_point_to_no_file_outside_the_repository():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if doc.name == "benchmarks-history.md":  # a log of past runs, commands as they were typed
            continue
        text = doc.read_text(encoding="utf-8")
        assert "/work/" not in text and "REPAIR_NOTES" not in text, doc.name
